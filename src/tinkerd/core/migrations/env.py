"""Alembic's entry point, given an open connection by core/migrate.py (tinkerd never runs
the `alembic` command against a live database, so there is no alembic.ini)."""

from __future__ import annotations

from alembic import context

from tinkerd.core.db import Base

config = context.config
connection = config.attributes["connection"]
context.configure(
    connection=connection,
    target_metadata=Base.metadata,
    render_as_batch=True,  # SQLite alters a table by copying it: revisions use op.batch_alter_table
    transactional_ddl=True,  # core/migrate.py runs every revision and the version stamp in one transaction
)
with context.begin_transaction():
    context.run_migrations()
