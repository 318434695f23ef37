"""Checkpoint storage in use (`tinker billing checkpoint-storage`,
AdminClient.get_current_checkpoint_storage_usage): the checkpoints' byte counts as the
checkpoints table records them at each save, summed per project and owner.

What a caller is shown: their own checkpoints and those in projects they are a member of (an
admin: every one), or, with `project_id`, only that project's (a project they are not in is
a 404). tinkerd charges nothing, so the price fields (the rate and each row's projected
monthly cost) are left out, and so is the email: users are known by name only.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import sessionmaker

from tinkerd.core.access import User, runs_of_readers
from tinkerd.core.db import CheckpointRow, ProjectRow, RunRow
from tinkerd.core.identity_tokens import USER_URN_PREFIX
from tinkerd.types import NotFound

BYTES_PER_GIGABYTE = 10**9  # the unit the SDK reports storage in


def checkpoint_storage_usage(db: sessionmaker, user: User, project_id: str | None = None) -> dict[str, Any]:
    q = (select(RunRow.project_id, RunRow.owner, func.count(CheckpointRow.id), func.coalesce(func.sum(CheckpointRow.size_bytes), 0))
         .join(RunRow, RunRow.id == CheckpointRow.run_id)
         .where(runs_of_readers(user))
         .group_by(RunRow.project_id, RunRow.owner)
         .order_by(RunRow.project_id, RunRow.owner))
    with db() as s:
        if project_id is not None:
            if s.get(ProjectRow, project_id) is None or not user.reads_project(project_id):
                raise NotFound(f"unknown project {project_id!r} (only its members may see its storage)", field="project_id")
            q = q.where(RunRow.project_id == project_id)
        rows = s.execute(q).all()
    return {"data": [
        {"project_id": project, "org_user_urn": USER_URN_PREFIX + owner, "user_name": owner, "checkpoint_count": int(count),
         "size_bytes": int(size), "size_gigabytes": int(size) / BYTES_PER_GIGABYTE}
        for project, owner, count, size in rows
    ]}
