"""Alembic revisions of the metadata schema, run by core/migrate.py whenever tinkerd opens
its database (docs/database.md says how to add one)."""
