"""The Tinker API routes (`/api/v1/...`) that the unmodified `tinker` SDK calls.

Requests are parsed with the SDK's own pydantic types and protobuf messages, translated
to plain values for the core layer, and results translated back. The protocol is
described in docs/wire-protocol.md; the traps this file handles in docs/wire-protocol.md §7.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from fastapi import APIRouter, Depends, Request, Response
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ValidationError

from tinkerd.api import tinker_wire as wire
from tinkerd.api.auth import api_key_of, caller
from tinkerd.api.bodies import json_body
from tinkerd.api.sdk import types as T
from tinkerd.core.access import User
from tinkerd.core.audit import audit_log
from tinkerd.core.copies import copy_checkpoint
from tinkerd.core.futures import FutureEntry
from tinkerd.core.identity_tokens import ORG_ID, looks_like_token
from tinkerd.core.keys import hash_key
from tinkerd.core.service import Service
from tinkerd.core.session_search import search_sessions
from tinkerd.core.storage_usage import checkpoint_storage_usage
from tinkerd.core.work_cap import QueueFull
from tinkerd.types import AdamParams, LoraSpec, SampleRequest, SamplingParams, UserError

PROTOBUF = "application/x-protobuf"


def parse(model: type[BaseModel], body: Any) -> Any:
    try:
        return model.model_validate(body)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc']) or 'body'}: {e['msg']}" for e in exc.errors()[:5])
        raise UserError(f"invalid {model.__name__}: {problems}") from None


def promise(entry: FutureEntry, model_id: str | None = None, **extra: Any) -> dict:
    out: dict[str, Any] = {"request_id": entry.request_id}
    if model_id is not None:
        out["model_id"] = model_id
    out.update(extra)
    return out


def to_sampling_params(p: Any) -> SamplingParams:
    """The SDK's SamplingParams as plain values; `core/sampling.py` checks them."""
    stop = p.stop
    strings: list[str] = []
    ids: list[int] = []
    ignore_eos = False
    if isinstance(stop, str):
        strings = [stop]
    elif stop is not None:
        stop = list(stop)
        if not stop:
            ignore_eos = True  # [] disables every stop condition, EOS included
        elif all(isinstance(s, str) for s in stop):
            strings = stop
        elif all(isinstance(s, int) for s in stop):
            ids = stop
        else:
            raise UserError("sampling_params.stop must be all strings or all token ids")
    return SamplingParams(
        max_tokens=p.max_tokens,
        temperature=float(p.temperature),
        top_k=int(p.top_k),
        top_p=float(p.top_p),
        seed=p.seed,
        stop_token_ids=ids,
        stop_strings=strings,
        ignore_eos=ignore_eos,
    )


def model_input_tokens(model_input: Any, what: str) -> list[int]:
    tokens: list[int] = []
    for chunk in model_input.chunks:
        if getattr(chunk, "type", None) != "encoded_text":
            raise UserError(f"{what}: chunk type {getattr(chunk, 'type', '?')!r} is not supported by this text model")
        tokens.extend(int(t) for t in chunk.tokens)
    return tokens


def ordered_ids(body: Any) -> tuple[str | None, int | None]:
    """The model_id and seq_id of a training request's body, read before the body is parsed,
    so a request the parse refuses still names the seq_id it uses up."""
    if not isinstance(body, dict):
        return None, None
    model_id, seq_id = body.get("model_id"), body.get("seq_id")
    return (model_id if isinstance(model_id, str) else None,
            seq_id if isinstance(seq_id, int) and not isinstance(seq_id, bool) else None)


@contextmanager
def consumes_seq(service: Service, user: User, model_id: str | None, seq_id: int | None) -> Iterator[None]:
    """A training request refused at submission, whatever refused it, still uses up its seq_id
    (see Service.skip_seq). Except one refused for now only (QueueFull, a 429): the SDK sends
    that very request, with the same seq_id, again."""
    try:
        yield
    except QueueFull:
        raise
    except Exception:
        if model_id is not None:
            service.skip_seq(model_id, seq_id, user)
        raise


def token_user(request: Request, weights_access_token: str | None) -> User | None:
    """The user whose key a request passes as `weights_access_token` (to load a checkpoint
    that user may read and the caller may not); a key the server refuses is a 400."""
    if weights_access_token is None:
        return None
    reader = request.app.state.admission.user_for(weights_access_token)
    if reader is None:
        raise UserError("weights_access_token is not an API key this server accepts", field="weights_access_token")
    return reader


def build_router(service: Service, hold_seconds: float, custom_loss_server_side: bool = True) -> APIRouter:
    r = APIRouter(prefix="/api/v1")

    # -- housekeeping --------------------------------------------------------------------

    completions = service.completions

    @r.post("/client/config")
    async def client_config() -> dict:
        # Batched polling of sampling results (retrieve_futures), with server-numbered clones.
        # JWT exchange (identity tokens: whoami reads the caller from one); batched polling of
        # sampling results (retrieve_futures), with server-numbered clones.
        # custom_loss_server_side: create_custom_loss uploads the traced loss and
        # forward_backward_custom runs it here in one pass (off: the SDK runs it client-side).
        return {"pjwt_auth_enabled": True, "sample_use_retrieve_futures": True, "sample_join_sampling_session": True,
                "custom_loss_server_side": custom_loss_server_side}

    # -- identity --------------------------------------------------------------------------

    def presented_key(request: Request) -> str:
        """The API key itself (not an identity token) of a request, for the routes about keys."""
        key = api_key_of(request) or ""
        if looks_like_token(key):
            raise UserError("send the API key itself (X-API-Key: tml-...), not an identity token", field="X-API-Key")
        return key

    @r.post("/auth/token")
    async def auth_token(request: Request, user: User = Depends(caller)) -> dict:
        return {"jwt": request.app.state.admission.tokens.issue(user.name, hash_key(presented_key(request)))}

    @r.get("/auth/apikey/me")
    async def my_api_key(request: Request, user: User = Depends(caller)) -> dict:
        key_id = request.app.state.admission.keys.key_id(presented_key(request))
        return {
            "key_id": key_id or 0,  # 0: a --api-key key, or any tml- key of a server without keys
            "name": user.name,
            "note": "",
            # tinkerd knows users by name only: the name stands in for the email the CLI prints
            "details": {"org_details": {"name": ORG_ID}, "user_details": {"email": user.name}},
        }

    @r.delete("/auth/apikey/me")
    async def delete_my_api_key(request: Request, user: User = Depends(caller)) -> dict:
        key = presented_key(request)
        keys = request.app.state.admission.keys
        if keys.key_id(key) is None:
            raise UserError("this key was not made with `tinkerd keys create` and cannot be deleted here "
                            "(a --api-key key, or any tml- key of a server without keys)", field="X-API-Key")
        keys.revoke_key(key)
        return {}

    @r.post("/client/dynamic_config")
    async def dynamic_config() -> dict:
        return {}

    @r.post("/telemetry")
    async def telemetry() -> dict:
        return {"status": "accepted"}

    @r.get("/healthz")
    async def healthz() -> dict:
        return {"status": "ok"}

    @r.get("/get_server_capabilities")
    async def capabilities() -> dict:
        return {
            "supported_models": [
                {"model_name": name, "max_context_length": engine.info.max_context, "trainable": True, "sampleable": True}
                for name, engine in service.engines.items()
            ]
        }

    @r.post("/create_session")
    async def create_session(request: Request, user: User = Depends(caller)) -> dict:
        req = parse(T.CreateSessionRequest, await json_body(request))
        session_id = service.create_session(req.tags, req.user_metadata or {}, user, project_id=req.project_id)
        return {"session_id": session_id, "type": "create_session"}

    @r.post("/session_heartbeat")
    async def heartbeat(request: Request, user: User = Depends(caller)) -> Response:
        req = parse(T.SessionHeartbeatRequest, await json_body(request))
        if not service.heartbeat(req.session_id, user):
            return JSONResponse({"detail": f"session {req.session_id} has finished"}, status_code=410)
        return JSONResponse({"type": "session_heartbeat"})

    @r.post("/sessions/{session_id}/finish")
    async def finish(session_id: str, user: User = Depends(caller)) -> dict:
        service.finish_session(session_id, user)
        return {}

    @r.post("/sessions/search")
    async def sessions_search(request: Request, user: User = Depends(caller)) -> dict:
        req = parse(T.SessionSearchRequest, await json_body(request))
        return search_sessions(service.db, req, user)

    @r.post("/cancel_future")
    async def cancel_future() -> dict:
        return {}

    @r.get("/billing/usage/checkpoints/current")
    async def checkpoint_storage(project_id: str | None = None, user: User = Depends(caller)) -> dict:
        return checkpoint_storage_usage(service.db, user, project_id)

    @r.get("/audit")
    async def audit(event_type: str = "all", day: str | None = None, user: User = Depends(caller)) -> dict:
        return audit_log(service.db, user, event_type, day)

    # -- models and training -------------------------------------------------------------

    @r.post("/create_model")
    async def create_model(request: Request, user: User = Depends(caller)) -> dict:
        req = parse(T.CreateModelRequest, await json_body(request))
        lora = req.lora_config or T.LoraConfig(rank=32)
        if getattr(req.optimizer_config, "type", "adamw") != "adamw":
            raise UserError(f"optimizer {req.optimizer_config.type!r} is not supported; use adamw")
        spec = LoraSpec(rank=lora.rank, train_attn=lora.train_attn, train_mlp=lora.train_mlp,
                        train_unembed=lora.train_unembed, seed=lora.seed)  # type: ignore[arg-type]
        model_id, entry = service.create_model(req.session_id, req.model_seq_id, req.base_model, spec, req.user_metadata or {}, user)
        return promise(entry, model_id)

    @r.post("/get_info")
    async def get_info(request: Request, user: User = Depends(caller)) -> dict:
        req = parse(T.GetInfoRequest, await json_body(request))
        run = service.get_run(req.model_id, user)
        engine = service.engine_for(run.base_model)
        return {
            "type": "get_info",
            "model_id": run.id,
            "model_data": {"arch": "llama", "model_name": run.base_model, "tokenizer_id": run.base_model},
            "is_lora": True,
            "lora_rank": run.lora_rank,
            "model_name": run.base_model,
            "max_context_length": engine.info.max_context,
        }

    @r.post("/forward_backward")
    async def forward_backward(request: Request, user: User = Depends(caller)) -> dict:
        if request.headers.get("content-encoding"):
            raise UserError(f"Content-Encoding {request.headers['content-encoding']!r} is not supported")
        body = await request.body()
        if PROTOBUF not in request.headers.get("content-type", ""):
            raise UserError("forward_backward expects a protobuf body (Content-Type: application/x-protobuf)")
        msg = wire.parse_forward_backward(body)
        with consumes_seq(service, user, msg.model_id, msg.seq_id):
            datums = wire.datums_from_proto(msg)
            config = wire.loss_config(msg)
            entry = service.forward_backward(msg.model_id, msg.seq_id, datums, msg.loss_fn, config, msg.forward_only, user)
        return promise(entry, msg.model_id)

    @r.post("/create_custom_loss")
    async def create_custom_loss(request: Request, user: User = Depends(caller)) -> dict:
        # Read by hand, not with the SDK's model: a refused node is named by its name, not its index.
        body = await json_body(request)
        if not isinstance(body, dict) or not isinstance(body.get("session_id"), str):
            raise UserError("create_custom_loss needs session_id", field="session_id")
        entry = service.create_custom_loss(body["session_id"], body.get("custom_loss_seq_id"), body.get("name"),
                                           body.get("inputs"), body.get("graph"), user)
        return promise(entry)

    @r.post("/optim_step")
    async def optim_step(request: Request, user: User = Depends(caller)) -> dict:
        body = await json_body(request)
        with consumes_seq(service, user, *ordered_ids(body)):
            req = parse(T.OptimStepRequest, body)
            p = req.optim_params
            if not isinstance(p, T.AdamParams):
                raise UserError(f"optimizer params {type(p).__name__} are not supported; use adam_params")
            params = AdamParams(p.learning_rate, p.beta1, p.beta2, p.eps, p.weight_decay, p.grad_clip_norm)
            return promise(service.optim_step(req.model_id, req.seq_id, params, user), req.model_id)

    @r.post("/save_weights")
    async def save_weights(request: Request, user: User = Depends(caller)) -> dict:
        body = await json_body(request)
        with consumes_seq(service, user, *ordered_ids(body)):
            req = parse(T.SaveWeightsRequest, body)
            entry = service.save_checkpoint(
                req.model_id, req.seq_id, req.path, "weights", req.ttl_seconds, bool(req.overwrite), req.user_metadata, user=user
            )
        return promise(entry, req.model_id)

    @r.post("/save_weights_for_sampler")
    async def save_weights_for_sampler(request: Request, user: User = Depends(caller)) -> dict:
        body = await json_body(request)
        with consumes_seq(service, user, *ordered_ids(body)):
            req = parse(T.SaveWeightsForSamplerRequest, body)
            session = None
            if req.path is None:
                if req.sampling_session_seq_id is None:
                    raise UserError("save_weights_for_sampler needs path or sampling_session_seq_id")
                session = (service.session_of_model(req.model_id, user), req.sampling_session_seq_id)
            entry = service.save_checkpoint(
                req.model_id, req.seq_id, req.path, "sampler_weights", req.ttl_seconds, True, req.user_metadata,
                sampler_session=session, user=user, inflight=req.kind == "inflight",
            )
        return promise(entry, req.model_id)

    @r.post("/save_weights_external")
    async def save_weights_external(request: Request, user: User = Depends(caller)) -> dict:
        body = await json_body(request)
        with consumes_seq(service, user, *ordered_ids(body)):
            req = parse(T.SaveWeightsExternalRequest, body)
            if req.age_encryption_recipients:
                raise UserError("age_encryption_recipients is not supported by this server")
            entry = service.save_checkpoint(req.model_id, req.seq_id, req.path, "external_weights", req.ttl_seconds, True,
                                            user=user)
        return promise(entry, req.model_id)

    @r.post("/load_weights")
    async def load_weights(request: Request, user: User = Depends(caller)) -> dict:
        body = await json_body(request)
        with consumes_seq(service, user, *ordered_ids(body)):
            req = parse(T.LoadWeightsRequest, body)
            model_id, entry = service.load_weights(
                req.path, req.optimizer, model_id=req.model_id, seq_id=req.seq_id, session_id=req.session_id,
                model_seq_id=req.model_seq_id, user_metadata=req.user_metadata, user=user,
                on_behalf_of=token_user(request, req.weights_access_token),
            )
        return promise(entry, model_id)

    @r.post("/copy_weights")
    async def copy_weights(request: Request, user: User = Depends(caller)) -> dict:
        req = parse(T.CopyWeightsRequest, await json_body(request))
        if req.destination_project_id is None:
            raise UserError("copy_weights needs destination_project_id (copying into a session's run slot is not supported)",
                            field="destination_project_id")
        # RestClient sends the token as a header (kept out of its request logs); the body field works too.
        token = request.headers.get("x-tinker-weights-access-token") or req.weights_access_token
        reader = token_user(request, token)
        try:
            source = service.find_checkpoint(req.source_path, user, reader)
        except UserError as exc:  # a malformed or unknown path, or one neither may read
            raise type(exc)(f"source_path: {exc}", field="source_path") from None
        path = copy_checkpoint(service.db, service.data_dir, source, req.destination_project_id, user, req.ttl_seconds,
                               request.headers.get("x-idempotency-key"))
        return {"tinker_path": path}

    # -- sampling ------------------------------------------------------------------------

    @r.post("/create_sampling_session")
    async def create_sampling_session(request: Request, user: User = Depends(caller)) -> dict:
        req = parse(T.CreateSamplingSessionRequest, await json_body(request))
        sampler_id = service.create_sampling_session(req.session_id, req.sampling_session_seq_id, req.base_model, req.model_path,
                                                     user)
        return {"sampling_session_id": sampler_id, "type": "create_sampling_session"}

    @r.get("/samplers/{sampler_id}")
    async def get_sampler(sampler_id: str, user: User = Depends(caller)) -> dict:
        row = service.get_sampler(sampler_id, user)
        out = {"sampler_id": row.id, "base_model": row.base_model}
        if row.model_path:
            out["model_path"] = row.model_path
        return out

    @r.post("/asample")
    async def asample(request: Request, user: User = Depends(caller)) -> dict:
        req = parse(T.SampleRequest, await json_body(request))
        if req.sampling_session_id is None:
            raise UserError("asample needs sampling_session_id")
        if req.target_prompt_logprobs is not None or req.prompt_alt_tokens_k:
            raise UserError("target_prompt_logprobs and prompt_alt_tokens_k are not supported by this server")
        service.sampler(req.sampling_session_id, user)  # 404 for an unknown sampler, before anything else
        sample_req = SampleRequest(
            prompt=model_input_tokens(req.prompt, "prompt"),
            num_samples=req.num_samples,
            params=to_sampling_params(req.sampling_params),
            prompt_logprobs=bool(req.prompt_logprobs),
            topk_prompt_logprobs=req.topk_prompt_logprobs,
            topk_sample_logprobs=req.topk_sample_logprobs,
            prompt_logprobs_last_n=req.prompt_logprobs_last_n,
            record_stability_info=bool(req.record_stability_info),
            tenant=getattr(request.state, "tenant", ""),
        )
        entry, sequence_ids = service.sample(req.sampling_session_id, req.seq_id, sample_req, user)
        completions.track(req.sampling_session_id, req.seq_id, entry)
        return promise(entry, sample_sequence_ids=sequence_ids)

    @r.post("/join_sampling_session")
    async def join_sampling_session(request: Request, user: User = Depends(caller)) -> dict:
        req = parse(T.JoinSamplingSessionRequest, await json_body(request))
        service.sampler(req.sampling_session_id, user)  # 404 for an unknown sampler, or another user's
        return {"type": "join_sampling_session", "client_counter": completions.join(req.sampling_session_id)}

    # -- futures -------------------------------------------------------------------------

    @r.post("/retrieve_futures")
    async def retrieve_futures(request: Request, user: User = Depends(caller)) -> dict:
        req = parse(T.FuturesRetrieveRequest, await json_body(request))
        target = req.target
        if target.cloned_sampler_id < 0:
            raise UserError("target.cloned_sampler_id must be 0 or more", field="target.cloned_sampler_id")
        if req.prev_cursor < 0:
            raise UserError("prev_cursor must be 0 or more", field="prev_cursor")
        if req.timeout is not None and req.timeout < 0:
            raise UserError("timeout must be 0 or more seconds", field="timeout")
        service.sampler(target.sampling_session_id, user)  # 404 for an unknown sampler, or another user's
        hold = hold_seconds if req.timeout is None else min(req.timeout, hold_seconds)
        done, cursor = await completions.poll(target.sampling_session_id, target.cloned_sampler_id, req.prev_cursor, hold,
                                              list(req.retrieved_request_ids))
        return {"completions": [{"state": "failed" if c.failed else "finished", "request_id": c.request_id} for c in done],
                "cursor": cursor}

    @r.post("/retrieve_future")
    async def retrieve_future(request: Request, user: User = Depends(caller)) -> Response:
        req = parse(T.FutureRetrieveRequest, await json_body(request))
        entry = service.future_for(req.request_id, user)
        if entry is None:
            return JSONResponse(
                {"error": f"unknown request {req.request_id!r}: it never existed or the server restarted while it ran",
                 "category": "server"}
            )
        if not await service.futures.wait(entry, hold_seconds):
            return JSONResponse({"type": "try_again", "request_id": entry.request_id, "queue_state": "active"})
        if entry.failure is not None:
            return JSONResponse({"error": entry.failure.message, "category": entry.failure.category})
        if entry.kind in ("fwdbwd", "sample"):
            if entry.wire_cache is None:
                encode = wire.forward_backward_output if entry.kind == "fwdbwd" else wire.sample_response
                entry.wire_cache = encode(entry.result)
            return Response(entry.wire_cache, media_type=PROTOBUF)
        return JSONResponse(entry.result if entry.result is not None else {})

    return r
