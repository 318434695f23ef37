"""The REST routes behind `RestClient` and the `tinker` CLI: runs, checkpoints, sessions.

Listing, publish / unpublish, TTL, delete, weights_info, and downloads of external
weights through URLs that tinkerd signs (HMAC with a per-data-dir secret, one hour) and
serves itself. Shapes: docs/wire-protocol.md §4.6; the session routes: docs/wire-protocol.md §2.4;
signed URLs: docs/wire-protocol.md §4.5. Every datetime is sent timezone-aware. Plus one tinkerd extension: a run's metric history.
Each route acts for the calling user and sees only what that user may (core/access.py).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse

from tinkerd.api.auth import caller
from tinkerd.api.bodies import SIGNED_UPLOAD_PATH, json_body
from tinkerd.core.access import User
from tinkerd.core.checkpoint_archive import CheckpointArchive
from tinkerd.core.db import CheckpointRow, RunRow, aware, utcnow
from tinkerd.core.paths import CHECKPOINT_KINDS, TinkerPath
from tinkerd.core.registry import (
    DOWNLOAD_URL_LIFETIME,
    CheckpointSearch,
    Forbidden,
    RunSummary,
    iso,
    public_metadata,
    tinker_path_of,
)
from tinkerd.core.service import Service
from tinkerd.core.uploads import WeightsUploads, check_lora_config
from tinkerd.types import UserError

SIGNED_DOWNLOAD_PATH = "/api/v1/signed_download"  # open (no API key): the signature is the credential
SIGNED_ARCHIVE_PATH = "/api/v1/signed_archive"  # open, as above: one tar of a checkpoint (SDK 0.34 / 0.35)
SIGNED_TRACE_PATH = "/api/v1/signed_trace"  # open, as above: a session's trace (`tinker session export-trace`)
MAX_PAGE = 1000
MAX_OFFSET = 1 << 40  # far past any list; SQLite's integers end at 2**63


def checkpoint_json(row: CheckpointRow, base_model: str | None = None) -> dict[str, Any]:
    """`base_model`: the model of the checkpoint's run (SDK 0.39 and later show it on every checkpoint)."""
    out: dict[str, Any] = {
        "checkpoint_id": f"{row.kind}/{row.name}",
        "checkpoint_type": CHECKPOINT_KINDS[row.kind],
        "time": iso(row.created_at),
        "tinker_path": tinker_path_of(row),
        "size_bytes": row.size_bytes,
        "public": bool(row.public),
    }
    if base_model is not None:
        out["base_model"] = base_model
    metadata = public_metadata(row.user_metadata)
    if metadata:
        out["user_metadata"] = metadata
    if row.expires_at is not None:
        out["expires_at"] = iso(row.expires_at)
    return out


def run_json(summary: RunSummary) -> dict[str, Any]:
    run = summary.run
    out: dict[str, Any] = {
        "training_run_id": run.id,
        "base_model": run.base_model,
        "model_owner": run.owner,
        "is_lora": True,
        "corrupted": bool(run.corrupted),
        "lora_rank": run.lora_rank,
        "last_request_time": iso(run.last_request_time),
    }
    if summary.last_checkpoint is not None:
        out["last_checkpoint"] = checkpoint_json(summary.last_checkpoint, run.base_model)
    if summary.last_sampler_checkpoint is not None:
        out["last_sampler_checkpoint"] = checkpoint_json(summary.last_sampler_checkpoint, run.base_model)
    metadata = public_metadata(run.user_metadata)
    if metadata:
        out["user_metadata"] = metadata
    return out


def run_activity_json(run: RunRow, progress: tuple[int, float | None], connected: bool) -> dict[str, Any]:
    """tinkerd extension fields of a run (the SDK's TrainingRun ignores fields it does not know)."""
    steps, latest_loss = progress
    return {"created_at": iso(run.created_at), "steps": steps, "latest_loss": latest_loss, "connected": connected}


def weights_info_json(run: RunRow) -> dict[str, Any]:
    return {
        "base_model": run.base_model,
        "is_lora": True,
        "lora_rank": run.lora_rank,
        "train_attn": run.train_attn,
        "train_mlp": run.train_mlp,
        "train_unembed": run.train_unembed,
        "optimizer_config": {"type": "adamw"},
    }


def page(limit: int, offset: int) -> tuple[int, int]:
    if limit < 0 or offset < 0:
        raise UserError(f"limit and offset must be >= 0, got limit={limit}, offset={offset}")
    if offset > MAX_OFFSET:
        raise UserError(f"offset must be at most {MAX_OFFSET}, got {offset}")
    return min(limit, MAX_PAGE), offset


def sdk_version(request: Request) -> tuple[int, ...]:
    """The tinker SDK's version from the header every SDK request carries; (0,) when absent."""
    parts = []
    for part in request.headers.get("x-stainless-package-version", "0").split(".")[:2]:
        if not part.isdigit():
            break
        parts.append(int(part))
    return tuple(parts) or (0,)


SEARCH_FIELDS = {"project_ids", "user_metadata", "checkpoint_type", "owner", "base_models", "limit", "cursor"}
KINDS_BY_TYPE = {label: kind for kind, label in CHECKPOINT_KINDS.items()}


def string_list(body: dict, name: str) -> list[str] | None:
    value = body.get(name)
    if value is None:
        return None
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise UserError(f"{name} must be a list of strings or null", field=name)
    return value


def checkpoint_search(body: Any) -> CheckpointSearch:
    """A CheckpointSearchRequest body (SDK 0.39), checked field by field."""
    if not isinstance(body, dict):
        raise UserError("expected a JSON object (CheckpointSearchRequest)")
    unknown = sorted(set(body) - SEARCH_FIELDS)
    if unknown:
        raise UserError(f"unknown field(s): {', '.join(unknown)}", field=unknown[0])
    search = CheckpointSearch(project_ids=string_list(body, "project_ids"), base_models=string_list(body, "base_models"))
    metadata = body.get("user_metadata") or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise UserError("user_metadata must be an object of string values", field="user_metadata")
    search.user_metadata = metadata
    checkpoint_type = body.get("checkpoint_type")
    if checkpoint_type is not None:
        if not isinstance(checkpoint_type, str) or checkpoint_type not in KINDS_BY_TYPE:
            raise UserError(f"checkpoint_type must be one of {', '.join(KINDS_BY_TYPE)} or null, got {checkpoint_type!r}",
                            field="checkpoint_type")
        search.kind = KINDS_BY_TYPE[checkpoint_type]
    owner = body.get("owner") or {"type": "own"}
    owner_type = owner.get("type") if isinstance(owner, dict) else None
    if owner_type not in ("own", "accessible", "user"):
        raise UserError('owner must be {"type": "own"}, {"type": "accessible"} or {"type": "user", "owner_urns": [...]}',
                        field="owner")
    search.owner = owner_type
    if owner_type == "user":
        urns = owner.get("owner_urns")
        if not isinstance(urns, list) or not (1 <= len(urns) <= 10) or not all(isinstance(u, str) and u for u in urns):
            raise UserError("owner.owner_urns must list 1 to 10 owners", field="owner_urns")
        search.owner_names = [u.rsplit(":", 1)[-1] for u in urns]  # "user:alice" or "alice": the user alice
    limit = body.get("limit", 50)
    if isinstance(limit, bool) or not isinstance(limit, int) or not (1 <= limit <= 200):
        raise UserError(f"limit must be an integer from 1 to 200, got {limit!r}", field="limit")
    search.limit = limit
    cursor = body.get("cursor")
    if cursor is not None:
        try:
            created = dt.datetime.fromisoformat(str(cursor["last_created_at"]).replace("Z", "+00:00"))
            if created.tzinfo is None:
                raise ValueError("not timezone-aware")
            search.after = (created.astimezone(dt.timezone.utc), int(cursor["last_checkpoint_uuid"]))
        except (TypeError, KeyError, ValueError):
            raise UserError("cursor must be a next_cursor this server returned, unchanged", field="cursor") from None
    return search


def build_rest_router(service: Service) -> APIRouter:
    registry = service.registry
    uploads = WeightsUploads(registry, service.data_dir)
    r = APIRouter(prefix="/api/v1")

    def ckpt_path(run_id: str, kind: str, name: str) -> TinkerPath:
        return TinkerPath.parse(f"tinker://{run_id}/{kind}/{name}")

    # -- training runs -------------------------------------------------------------------

    def runs_json(summaries: list[RunSummary]) -> list[dict[str, Any]]:
        progress = registry.run_progress([s.run.id for s in summaries])
        return [{**run_json(s), **run_activity_json(s.run, progress[s.run.id], s.run.id in service.models)} for s in summaries]

    @r.get("/training_runs")
    async def list_training_runs(limit: int = Query(20), offset: int = Query(0), base_model: str | None = Query(None),
                                 search: str | None = Query(None), access_scope: str = Query("owned"),
                                 project_id: str | None = Query(None), user: User = Depends(caller)) -> dict:
        """base_model and search (a substring of the run id or base model) are tinkerd extensions."""
        limit, offset = page(limit, offset)
        runs, total = registry.list_runs(user, limit, offset, base_model, search, access_scope, project_id)
        return {"training_runs": runs_json(runs), "cursor": {"offset": offset, "limit": limit, "total_count": total}}

    @r.get("/training_runs/{run_id}")
    async def get_training_run(run_id: str, user: User = Depends(caller)) -> dict:
        return runs_json([registry.run(run_id, user)])[0]

    @r.get("/training_runs/{run_id}/metrics")
    async def metric_history(run_id: str, after_id: int = Query(0, ge=0, le=MAX_OFFSET), user: User = Depends(caller)) -> dict:
        """tinkerd extension: every metric each forward/backward/optim_step reported, in order;
        with after_id (the last_id of an earlier answer), only the metrics recorded since."""
        rows = registry.metric_history(run_id, user, after_id)
        return {
            "training_run_id": run_id,
            "metrics": [{"id": m.id, "seq_id": m.seq_id, "kind": m.kind, "key": m.key, "value": m.value, "time": iso(m.time)} for m in rows],
            "last_id": rows[-1].id if rows else after_id,
        }

    # -- checkpoints ---------------------------------------------------------------------

    def checkpoints_json(rows: list[CheckpointRow]) -> list[dict[str, Any]]:
        base_models = registry.base_models_of([c.run_id for c in rows])
        return [checkpoint_json(c, base_models.get(c.run_id)) for c in rows]

    @r.get("/training_runs/{run_id}/checkpoints")
    async def list_run_checkpoints(run_id: str, user: User = Depends(caller)) -> dict:
        rows, total = registry.list_checkpoints(user, run_id)
        return {"checkpoints": checkpoints_json(rows), "cursor": {"offset": 0, "limit": total, "total_count": total}}

    @r.get("/checkpoints")
    async def list_user_checkpoints(limit: int = Query(100), offset: int = Query(0), access_scope: str = Query("owned"),
                                    user: User = Depends(caller)) -> dict:
        """The caller's own checkpoints; with access_scope=accessible (tinkerd extension) also
        every published one."""
        limit, offset = page(limit, offset)
        rows, total = registry.list_checkpoints(user, None, limit, offset, access_scope)
        return {"checkpoints": checkpoints_json(rows), "cursor": {"offset": offset, "limit": limit, "total_count": total}}

    @r.post("/checkpoints/search")
    async def search_checkpoints(request: Request, user: User = Depends(caller)) -> dict:
        """SDK 0.39's search_checkpoints: filters in the body, newest first, a keyset cursor."""
        search = checkpoint_search(await json_body(request))
        rows, after = registry.search_checkpoints(user, search)
        next_cursor = None if after is None else {"last_created_at": iso(after[0]), "last_checkpoint_uuid": str(after[1])}
        return {"checkpoints": checkpoints_json(rows), "next_cursor": next_cursor}

    @r.delete("/training_runs/{run_id}/checkpoints/{kind}/{name}")
    async def delete_checkpoint(run_id: str, kind: str, name: str, user: User = Depends(caller)) -> dict:
        registry.delete_checkpoint(ckpt_path(run_id, kind, name), user)
        return {}

    @r.post("/training_runs/{run_id}/checkpoints/{kind}/{name}/publish")
    async def publish(run_id: str, kind: str, name: str, user: User = Depends(caller)) -> dict:
        registry.set_public(ckpt_path(run_id, kind, name), True, user)
        return {}

    @r.delete("/training_runs/{run_id}/checkpoints/{kind}/{name}/publish")
    async def unpublish(run_id: str, kind: str, name: str, user: User = Depends(caller)) -> dict:
        registry.set_public(ckpt_path(run_id, kind, name), False, user)
        return {}

    @r.put("/training_runs/{run_id}/checkpoints/{kind}/{name}/ttl")
    async def set_ttl(run_id: str, kind: str, name: str, request: Request, user: User = Depends(caller)) -> dict:
        body = await json_body(request)
        if not isinstance(body, dict) or "ttl_seconds" not in body:
            raise UserError('expected {"ttl_seconds": int | null}')
        expires = registry.set_ttl(ckpt_path(run_id, kind, name), body["ttl_seconds"], user)
        return {"expires_at": iso(expires)}

    @r.get("/training_runs/{run_id}/checkpoints/{kind}/{name}/external_weights_urls")
    async def external_weights_urls(run_id: str, kind: str, name: str, request: Request, user: User = Depends(caller)) -> dict:
        base = str(request.base_url).rstrip("/") + SIGNED_DOWNLOAD_PATH
        urls, expires = registry.download_urls(ckpt_path(run_id, kind, name), base, user)
        return {"urls": urls, "expires": iso(expires)}

    @r.get("/signed_download")
    async def signed_download(token: str = Query(...)):
        try:
            file = registry.open_download(token)
        except Forbidden as exc:
            return JSONResponse({"detail": str(exc)}, status_code=403)
        return FileResponse(file, filename=file.name, media_type="application/octet-stream")

    @r.get("/training_runs/{run_id}/checkpoints/{kind}/{name}/archive")
    async def checkpoint_archive_url(run_id: str, kind: str, name: str, request: Request, user: User = Depends(caller)) -> dict:
        """SDK 0.34 / 0.35: a signed URL of the checkpoint as one tar (docs/wire-protocol.md §8);
        answered as JSON, which those clients take as readily as a redirect."""
        base = str(request.base_url).rstrip("/") + SIGNED_ARCHIVE_PATH
        url, expires = registry.archive_url(ckpt_path(run_id, kind, name), base, user)
        return {"url": url, "expires": iso(expires)}

    @r.get("/signed_archive")
    async def signed_archive(token: str = Query(...)):
        try:
            row = registry.open_archive(token)
        except Forbidden as exc:
            return JSONResponse({"detail": str(exc)}, status_code=403)
        archive = CheckpointArchive(Path(row.directory), aware(row.created_at).timestamp())
        file_name = f"{row.run_id}_{row.kind}_{row.name}.tar".replace(":", "_")
        return StreamingResponse(archive, media_type="application/x-tar", headers={
            "Content-Length": str(archive.size), "Content-Disposition": f'attachment; filename="{file_name}"'})

    # -- weights uploads (SDK 0.39: external_weights_upload_start / _finish) --------------------

    @r.post("/external_weights_upload_start")
    async def external_weights_upload_start(request: Request, user: User = Depends(caller)) -> dict:
        body = await json_body(request)
        if not isinstance(body, dict):
            raise UserError('expected {"base_model": str, "lora_config": {...}, "destination_project_id": str | null}')
        unknown = sorted(set(body) - {"base_model", "lora_config", "destination_project_id"})
        if unknown:
            raise UserError(f"unknown field(s): {', '.join(unknown)}", field=unknown[0])
        base_model, project_id = body.get("base_model"), body.get("destination_project_id")
        if not isinstance(base_model, str) or not base_model:
            raise UserError("base_model (a served model's name) is required", field="base_model")
        service.engine_for(base_model)  # a UserError naming the served models
        if project_id is not None and (not isinstance(project_id, str) or not project_id):
            raise UserError("destination_project_id must be a project's name or null", field="destination_project_id")
        url_base = str(request.base_url).rstrip("/") + SIGNED_UPLOAD_PATH
        upload_id, urls, expires = uploads.start(user, base_model, check_lora_config(body.get("lora_config")), project_id, url_base)
        if sdk_version(request) >= (0, 40):  # 0.40 gives each URL with the headers its PUT must send
            return {"upload_id": upload_id, "urls": {n: {"url": u, "headers": {}} for n, u in urls.items()}, "expires": iso(expires)}
        return {"upload_id": upload_id, "urls": urls, "expires": iso(expires)}

    @r.put("/signed_upload")
    async def signed_upload(request: Request, token: str = Query(...)):
        try:
            size = await uploads.receive(token, request.stream())
        except Forbidden as exc:
            return JSONResponse({"detail": str(exc)}, status_code=403)
        return {"size_bytes": size}

    @r.post("/external_weights_upload_finish")
    async def external_weights_upload_finish(request: Request, user: User = Depends(caller)) -> dict:
        body = await json_body(request)
        upload_id = body.get("upload_id") if isinstance(body, dict) else None
        if not isinstance(upload_id, str) or not upload_id:
            raise UserError('expected {"upload_id": str}', field="upload_id")
        return {"tinker_path": await asyncio.to_thread(uploads.finish, upload_id, user)}

    @r.post("/weights_info")
    async def weights_info(request: Request, user: User = Depends(caller)) -> dict:
        body = await json_body(request)
        if not isinstance(body, dict) or not isinstance(body.get("tinker_path"), str):
            raise UserError('expected {"tinker_path": "tinker://..."}')
        run, _ = registry.weights_info(body["tinker_path"], user)
        return weights_info_json(run)

    # -- sessions ------------------------------------------------------------------------

    @r.get("/sessions")
    async def list_sessions(limit: int = Query(20), offset: int = Query(0), access_scope: str = Query("owned"),
                            user: User = Depends(caller)) -> dict:
        limit, offset = page(limit, offset)
        return {"sessions": [s.id for s in registry.list_sessions(user, limit, offset, access_scope)]}

    @r.put("/sessions/{session_id}/project")
    async def assign_session_project(session_id: str, request: Request, user: User = Depends(caller)) -> dict:
        """Move a session of the caller's, with its training runs, into a project they are in."""
        body = await json_body(request)
        project_id = body.get("project_id") if isinstance(body, dict) else None
        if not isinstance(project_id, str) or not project_id:
            raise UserError("project_id (a project's name) is required", field="project_id")
        service.assign_session_project(session_id, project_id, user)
        return {}

    @r.get("/sessions/{session_id}")
    async def get_session(session_id: str, user: User = Depends(caller)) -> dict:
        row, runs, samplers = registry.session(session_id, user)
        out: dict[str, Any] = {"training_run_ids": runs, "sampler_ids": samplers}
        metadata = public_metadata(row.user_metadata)
        if metadata:
            out["user_metadata"] = metadata
        return out

    @r.get("/sessions/{session_id}/trace_export")
    async def trace_export(session_id: str, request: Request, user: User = Depends(caller)) -> dict:
        """A signed URL of the session's trace (docs/wire-protocol.md §2.4). The trace is built
        from memory when the URL is fetched, so it is ready at once: the SDK need not poll."""
        registry.session(session_id, user)  # NotFound unless the caller owns it
        token = registry.sign_trace(session_id, utcnow() + DOWNLOAD_URL_LIFETIME)
        return {"status": "ready", "url": str(request.base_url).rstrip("/") + f"{SIGNED_TRACE_PATH}?token={token}"}

    @r.get("/signed_trace")
    async def signed_trace(token: str = Query(...)):
        try:
            session_id = registry.open_trace(token)
        except Forbidden as exc:
            return JSONResponse({"detail": str(exc)}, status_code=403)
        trace = await asyncio.to_thread(service.traces.chrome_trace, session_id)  # up to 10,000 requests: off the loop
        body = json.dumps(trace, separators=(",", ":")).encode()
        return Response(body, media_type="application/json",
                        headers={"Content-Disposition": f'attachment; filename="{session_id}.json"'})

    return r
