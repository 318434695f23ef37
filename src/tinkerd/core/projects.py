"""Projects, as hosted Tinker has them: a named group of users who share their work.

A session created with a `project_id` (the SDK's `ServiceClient(project_id=...)` or
`TINKER_PROJECT_ID`) puts its training runs, and so their checkpoints, in that project;
every member may then read them (list, sample, load as training state, download, see the
metric history), while changing them stays with their owner (core/access.py). Projects are
made and given members offline, like keys (`tinkerd projects ...`, against the data dir,
also while the server runs); a project's id is the name it was created with.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from sqlalchemy import delete, select
from sqlalchemy.orm import sessionmaker

from tinkerd.core.db import ProjectMemberRow, ProjectRow
from tinkerd.core.keys import check_user_name
from tinkerd.types import NotFound, UserError

PROJECT_NAME = re.compile(r"^[A-Za-z0-9._-]{1,64}$")


def check_project_name(name: object) -> str:
    if not isinstance(name, str) or not PROJECT_NAME.match(name):
        raise UserError(f"invalid project name {name!r}: 1-64 letters, digits, '.', '_' or '-'")
    return name


@dataclass(frozen=True)
class Project:
    name: str
    members: tuple[str, ...]


class Projects:
    def __init__(self, db: sessionmaker):
        self.db = db

    def create(self, name: str, members: list[str]) -> Project:
        check_project_name(name)
        for member in members:
            check_user_name(member)
        with self.db.begin() as s:
            if s.get(ProjectRow, name) is not None:
                raise UserError(f"project {name!r} exists already")
            s.add(ProjectRow(id=name))
            s.add_all(ProjectMemberRow(project_id=name, user=member) for member in sorted(set(members)))
        return Project(name, tuple(sorted(set(members))))

    def add_members(self, name: str, members: list[str]) -> None:
        for member in members:
            check_user_name(member)
        with self.db.begin() as s:
            self._require(s, name)
            present = set(s.scalars(select(ProjectMemberRow.user).where(ProjectMemberRow.project_id == name)))
            s.add_all(ProjectMemberRow(project_id=name, user=m) for m in sorted(set(members) - present))

    def remove_members(self, name: str, members: list[str]) -> None:
        with self.db.begin() as s:
            self._require(s, name)
            s.execute(delete(ProjectMemberRow).where(ProjectMemberRow.project_id == name, ProjectMemberRow.user.in_(members)))

    def list(self) -> list[Project]:
        with self.db() as s:
            names = list(s.scalars(select(ProjectRow.id).order_by(ProjectRow.created_at, ProjectRow.id)))
            members: dict[str, list[str]] = {}
            for project_id, user in s.execute(select(ProjectMemberRow.project_id, ProjectMemberRow.user)
                                              .order_by(ProjectMemberRow.user)):
                members.setdefault(project_id, []).append(user)
        return [Project(n, tuple(members.get(n, []))) for n in names]

    @staticmethod
    def _require(s, name: str) -> None:  # noqa: ANN001 - a SQLAlchemy session
        if s.get(ProjectRow, name) is None:
            raise NotFound(f"no project {name!r}")
