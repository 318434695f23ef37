"""Who may see and change what.

Every session and training run records its owner: the user whose API key created it. A
run's checkpoints belong to the run's owner (only the owner can save under a run), and a
sampler to its session's owner, so neither stores an owner of its own that could disagree.

- The owner, and any admin, may do everything with a resource.
- Any user may read a *published* checkpoint: list it, sample it, load it as training
  state, download it; and see the run it belongs to, with only its published checkpoints.
- The members of a project (`tinkerd projects create`) may read every run and checkpoint
  in it, as its owner may (a session created with a `project_id` puts its runs there), and
  the runs' metric histories; changing them stays the owner's.
- Nobody else sees anything: a resource the caller may not read answers exactly as one
  that does not exist (404), so its existence does not leak. Changing something the caller
  may only read (a published checkpoint of someone else) is a 403.

Rows made before owners were recorded carry the default owner, `local`: the one user of a
server without keys, whom admins can also reach.
"""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import ColumnElement, exists, or_, select, true

from tinkerd.core.db import CheckpointRow, RunRow
from tinkerd.types import UserError

LOCAL = "local"  # the user of every key while no keys exist, and of `--api-key` keys


@dataclass(frozen=True)
class User:
    name: str
    admin: bool = False
    projects: frozenset[str] = frozenset()  # the projects the user is a member of

    def owns(self, owner: str | None) -> bool:
        return self.admin or (owner or LOCAL) == self.name

    def reads_project(self, project_id: str | None) -> bool:
        return project_id is not None and (self.admin or project_id in self.projects)

    def reads(self, owner: str | None, project_id: str | None) -> bool:
        """Whether the user may read everything of a run with this owner and project."""
        return self.owns(owner) or self.reads_project(project_id)


LOCAL_USER = User(LOCAL)
# What the server itself does for no caller (the janitor, offline commands): everything.
SYSTEM = User("(system)", admin=True)


class NotPermitted(UserError):
    """The caller may read this resource but not change it (HTTP 403)."""

    status = 403


def runs_owned_by(user: User) -> ColumnElement[bool]:
    """The runs listed under access_scope=owned: the caller's own."""
    return RunRow.owner == user.name


def runs_of_readers(user: User) -> ColumnElement[bool]:
    """The runs whose every checkpoint and metric the caller may read: their own and their
    projects' runs."""
    if user.admin:
        return true()
    if not user.projects:
        return RunRow.owner == user.name
    return or_(RunRow.owner == user.name, RunRow.project_id.in_(sorted(user.projects)))


def runs_readable_by(user: User) -> ColumnElement[bool]:
    """The runs a caller may see: their own, their projects', and those with a published checkpoint."""
    if user.admin:
        return true()
    published = exists(select(CheckpointRow.id).where(CheckpointRow.run_id == RunRow.id, CheckpointRow.public.is_(True)))
    return or_(runs_of_readers(user), published)


def checkpoints_readable_by(user: User) -> ColumnElement[bool]:
    """The checkpoints a caller may read, for a query that joins RunRow on the checkpoint's run."""
    if user.admin:
        return true()
    return or_(runs_of_readers(user), CheckpointRow.public.is_(True))


def checkpoints_owned_by(user: User) -> ColumnElement[bool]:
    return RunRow.owner == user.name
