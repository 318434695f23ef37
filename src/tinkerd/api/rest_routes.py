"""The REST routes behind `RestClient` and the `tinker` CLI: runs, checkpoints, sessions.

Listing, publish / unpublish, TTL, delete, weights_info, and downloads of external
weights through URLs that tinkerd signs (HMAC with a per-data-dir secret, one hour) and
serves itself. Shapes: docs/wire-protocol.md §4.6; the session routes: docs/wire-protocol.md §2.4;
signed URLs: docs/wire-protocol.md §4.5. Every datetime is sent timezone-aware. Plus one tinkerd extension: a run's metric history.
Each route acts for the calling user and sees only what that user may (core/access.py).
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import FileResponse, JSONResponse

from tinkerd.api.auth import caller
from tinkerd.api.bodies import json_body
from tinkerd.core.access import User
from tinkerd.core.db import CheckpointRow, RunRow
from tinkerd.core.paths import CHECKPOINT_KINDS, TinkerPath
from tinkerd.core.registry import Forbidden, RunSummary, iso, public_metadata, tinker_path_of
from tinkerd.core.service import Service
from tinkerd.types import UserError

SIGNED_DOWNLOAD_PATH = "/api/v1/signed_download"  # open (no API key): the signature is the credential
MAX_PAGE = 1000
MAX_OFFSET = 1 << 40  # far past any list; SQLite's integers end at 2**63


def checkpoint_json(row: CheckpointRow) -> dict[str, Any]:
    out: dict[str, Any] = {
        "checkpoint_id": f"{row.kind}/{row.name}",
        "checkpoint_type": CHECKPOINT_KINDS[row.kind],
        "time": iso(row.created_at),
        "tinker_path": tinker_path_of(row),
        "size_bytes": row.size_bytes,
        "public": bool(row.public),
    }
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
        out["last_checkpoint"] = checkpoint_json(summary.last_checkpoint)
    if summary.last_sampler_checkpoint is not None:
        out["last_sampler_checkpoint"] = checkpoint_json(summary.last_sampler_checkpoint)
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


def build_rest_router(service: Service) -> APIRouter:
    registry = service.registry
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

    @r.get("/training_runs/{run_id}/checkpoints")
    async def list_run_checkpoints(run_id: str, user: User = Depends(caller)) -> dict:
        rows, total = registry.list_checkpoints(user, run_id)
        return {"checkpoints": [checkpoint_json(c) for c in rows], "cursor": {"offset": 0, "limit": total, "total_count": total}}

    @r.get("/checkpoints")
    async def list_user_checkpoints(limit: int = Query(100), offset: int = Query(0), access_scope: str = Query("owned"),
                                    user: User = Depends(caller)) -> dict:
        """The caller's own checkpoints; with access_scope=accessible (tinkerd extension) also
        every published one."""
        limit, offset = page(limit, offset)
        rows, total = registry.list_checkpoints(user, None, limit, offset, access_scope)
        return {"checkpoints": [checkpoint_json(c) for c in rows], "cursor": {"offset": offset, "limit": limit, "total_count": total}}

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

    return r
