"""The audit log of checkpoint events (AdminClient.get_audit_log, `GET /audit`).

Each event is written in the same transaction as the change it records, so the log holds
exactly the changes that happened: `checkpoint_create` (a save, or a copy), `_publish`,
`_unpublish`, `_delete` (by a user) and `_expire` (the janitor, past the TTL). An admin reads
every event; any other user those about checkpoints they own or that are in their projects.
tinkerd has no teams or organizations to change, and projects are changed offline, so the
log has checkpoint events only.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

from sqlalchemy import or_, select
from sqlalchemy.orm import Session, sessionmaker

from tinkerd.core.access import User
from tinkerd.core.db import AuditEventRow, CheckpointRow, RunRow, aware
from tinkerd.types import UserError

EVENT_TYPES = ("all", "checkpoints", "projects", "teams", "organizations")


def record(s: Session, event: str, checkpoint: CheckpointRow, actor: str, **details: Any) -> None:
    """Add the event `checkpoint_<event>` about `checkpoint` to session `s` (committed with it)."""
    run = s.get(RunRow, checkpoint.run_id)
    path = f"tinker://{checkpoint.run_id}/{checkpoint.kind}/{checkpoint.name}"
    s.add(AuditEventRow(event=f"checkpoint_{event}", actor=actor, owner=run.owner if run else "local",
                        project_id=run.project_id if run else None, tinker_path=path, details=details))


def audit_log(db: sessionmaker, user: User, event_type: str = "all", day: str | None = None) -> dict[str, Any]:
    if event_type not in EVENT_TYPES:
        raise UserError(f"event_type must be one of {', '.join(EVENT_TYPES)}; got {event_type!r}", field="event_type")
    try:
        date = dt.date.fromisoformat(day) if day is not None else dt.datetime.now(dt.timezone.utc).date()
    except ValueError:
        raise UserError(f"day must be a date, YYYY-MM-DD; got {day!r}", field="day") from None
    if event_type not in ("all", "checkpoints"):
        return {"entries": []}
    start = dt.datetime.combine(date, dt.time(), tzinfo=dt.timezone.utc)
    q = select(AuditEventRow).where(AuditEventRow.time >= start, AuditEventRow.time < start + dt.timedelta(days=1))
    if not user.admin:
        mine = AuditEventRow.owner == user.name
        q = q.where(or_(mine, AuditEventRow.project_id.in_(sorted(user.projects))) if user.projects else mine)
    with db() as s:
        rows = list(s.scalars(q.order_by(AuditEventRow.time, AuditEventRow.id)))
    return {"entries": [
        {"timestamp": aware(r.time).isoformat(), "event": r.event, "model_id": r.tinker_path.removeprefix("tinker://").split("/")[0],
         "tinker_path": r.tinker_path,
         "event_details": {"actor": r.actor, "owner": r.owner, "project_id": r.project_id, "tinker_path": r.tinker_path,
                           **(r.details or {})}}
        for r in rows
    ]}
