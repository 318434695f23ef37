"""Projects: a project and its members, and the project of each session and training run.

Revision ID: 0003
Revises: 0002
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "projects",
        sa.Column("id", sa.String(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_table(
        "project_members",
        sa.Column("project_id", sa.String(), nullable=False),
        sa.Column("user", sa.String(), nullable=False),
        sa.PrimaryKeyConstraint("project_id", "user"),
    )
    op.create_index("ix_project_members_user", "project_members", ["user"])
    with op.batch_alter_table("sessions") as batch:
        batch.add_column(sa.Column("project_id", sa.String(), nullable=True))
    with op.batch_alter_table("training_runs") as batch:
        batch.add_column(sa.Column("project_id", sa.String(), nullable=True))
        batch.create_index("ix_training_runs_project_id", ["project_id"])


def downgrade() -> None:
    with op.batch_alter_table("training_runs") as batch:
        batch.drop_index("ix_training_runs_project_id")
        batch.drop_column("project_id")
    with op.batch_alter_table("sessions") as batch:
        batch.drop_column("project_id")
    op.drop_index("ix_project_members_user", "project_members")
    op.drop_table("project_members")
    op.drop_table("projects")
