"""Session search (`RestClient.search_sessions`, `POST /sessions/search`): newest first, with
a cursor, among the sessions the caller may see.

Which sessions a caller may see: their own, and those in projects they are a member of (an
admin: every one). tinkerd's session states map onto the SDK's as: active → `active`,
finished → `client_finished` (reason `success`: the finish route records no other), expired
(its client stopped heartbeating, or the server restarted) → no status. Nothing is ever
`cancelled` or `failed`. Display names are not stored, so a `display_name` filter matches
no session (with `session_id`, only that session).

Filters that SQL cannot express on both SQLite and Postgres alike (metadata pairs, the
cursor's timestamp) are applied while the rows stream by, newest first: the scan stops as
soon as one page and one more are found.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import false, func, or_, select
from sqlalchemy.orm import sessionmaker

from tinkerd.core.access import User
from tinkerd.core.db import CheckpointRow, ProjectRow, RunRow, SessionRow, aware
from tinkerd.types import NotFound, UserError

STATUS_OF = {"active": {"type": "active"}, "finished": {"type": "client_finished", "reason": {"type": "success"}}}


def owner_name(urn: str) -> str:
    """A user named by a URN (`tinkerd:user:alice`, as whoami names users) or by name."""
    return urn.rsplit(":", 1)[-1]


def _status_matches(status: str, queries: list[Any] | None) -> bool:
    if queries is None:
        return True
    for q in queries:
        if q.type == "active" and status == "active":
            return True
        if q.type == "client_finished" and status == "finished" and (q.reasons is None or "success" in q.reasons):
            return True
    return False


def search_sessions(db: sessionmaker, req: Any, user: User) -> dict[str, Any]:
    """`req` is the SDK's SessionSearchRequest; the answer its SessionSearchResponse, as JSON."""
    q = select(SessionRow)
    with db() as s:
        if req.project_ids is not None:
            for project_id in req.project_ids:
                if s.get(ProjectRow, project_id) is None or not user.reads_project(project_id):
                    raise NotFound(f"project_ids: unknown project {project_id!r} (only its members may search it)",
                                   field="project_ids")
            q = q.where(SessionRow.project_id.in_(req.project_ids))
    owner = req.owner.type
    if owner == "own":
        q = q.where(SessionRow.owner == user.name)
    elif not user.admin:
        visible = SessionRow.owner == user.name
        if user.projects:
            visible = or_(visible, SessionRow.project_id.in_(sorted(user.projects)))
        q = q.where(visible)
    if owner == "user":
        q = q.where(SessionRow.owner.in_([owner_name(u) for u in req.owner.owner_urns]))
    if req.session_id is not None or req.display_name is not None:
        q = q.where(SessionRow.id == req.session_id) if req.session_id is not None else q.where(false())
    after = None
    if req.cursor is not None:
        if req.cursor.last_created_at.tzinfo is None:
            raise UserError("cursor.last_created_at must carry a timezone", field="cursor")
        after = (req.cursor.last_created_at, req.cursor.last_session_id)
    found: list[SessionRow] = []
    with db() as s:
        for row in s.scalars(q.order_by(SessionRow.created_at.desc(), SessionRow.id.desc()).execution_options(yield_per=200)):
            if after is not None and (aware(row.created_at), row.id) >= after:
                continue
            metadata = row.user_metadata or {}
            if any(metadata.get(k) != v for k, v in req.user_metadata.items()):
                continue
            if not _status_matches(row.status, req.statuses):
                continue
            found.append(row)
            if len(found) > req.limit:
                break
        page, more = found[:req.limit], len(found) > req.limit
        counts = {}
        if page:
            counts = {sid: (int(n), int(size)) for sid, n, size in s.execute(
                select(RunRow.session_id, func.count(CheckpointRow.id), func.coalesce(func.sum(CheckpointRow.size_bytes), 0))
                .join(CheckpointRow, CheckpointRow.run_id == RunRow.id)
                .where(RunRow.session_id.in_([r.id for r in page])).group_by(RunRow.session_id))}
    sessions = []
    for row in page:
        n, size = counts.get(row.id, (0, 0))
        summary: dict[str, Any] = {
            "session_id": row.id, "created_at": aware(row.created_at).isoformat(), "owner": row.owner,
            "project_id": row.project_id or "", "checkpoints_count": n, "checkpoint_storage_bytes": size,
            "user_metadata": {str(k): v for k, v in (row.user_metadata or {}).items() if isinstance(v, str)},
        }
        if row.status in STATUS_OF:
            summary["status"] = STATUS_OF[row.status]
        sessions.append(summary)
    cursor = {"last_created_at": aware(page[-1].created_at).isoformat(), "last_session_id": page[-1].id} if more else None
    return {"sessions": sessions, "next_cursor": cursor}
