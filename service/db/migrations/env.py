"""Alembic environment: runs with the connection handed in by service.db.session."""

from __future__ import annotations

from alembic import context
from sqlalchemy import text

from service.db.models import Base

target_metadata = Base.metadata


def run_migrations_online() -> None:
    connection = context.config.attributes["connection"]
    if connection.dialect.name == "postgresql":
        # Several processes (SCP, workers) may start at once: migrate one at a time.
        connection.execute(text("SELECT pg_advisory_xact_lock(727274)"))
    context.configure(
        connection=connection,
        target_metadata=target_metadata,
        render_as_batch=connection.dialect.name == "sqlite",
    )
    with context.begin_transaction():
        context.run_migrations()


if context.is_offline_mode():
    raise RuntimeError("offline migrations are not supported; run `strokeseg db-upgrade`")
run_migrations_online()
