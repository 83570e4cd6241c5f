"""Engine, sessions and schema migrations (alembic) for the job database."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from sqlalchemy import Engine, create_engine, event
from sqlalchemy.orm import Session, sessionmaker

log = logging.getLogger(__name__)

MIGRATIONS_DIR = Path(__file__).resolve().parent / "migrations"


#: How long a statement may wait for a lock (and, on PostgreSQL, run) before it fails. A locked
#: database must cost the SCP a bounded wait and a 0xA700 answer, not a hung association.
DEFAULT_LOCK_TIMEOUT_S = 10.0


def _sqlite_pragmas(lock_timeout_s: float, durable_commits: bool = True) -> Any:
    synchronous = "FULL" if durable_commits else "NORMAL"

    def on_connect(dbapi_connection: Any, _record: Any) -> None:
        # WAL lets the SCP write while a worker reads; busy_timeout waits for locks
        # instead of failing, which matters with two processes on one file.
        dbapi_connection.isolation_level = None  # let the "begin" hook issue BEGIN
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        # FULL: a commit is on disk (the WAL fsync'd) when it returns. NORMAL (WAL): a commit
        # survives a crash of the process but a power loss may take back the latest ones;
        # the database is never corrupted either way (https://sqlite.org/pragma.html#pragma_synchronous).
        cursor.execute(f"PRAGMA synchronous={synchronous}")
        cursor.execute(f"PRAGMA busy_timeout={int(lock_timeout_s * 1000)}")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.close()

    return on_connect


def make_engine(
    database_url: str, *, lock_timeout_s: float = DEFAULT_LOCK_TIMEOUT_S, durable_commits: bool = True
) -> Engine:
    """An engine whose statements wait at most ``lock_timeout_s`` for a lock.

    ``durable_commits=False`` applies to SQLite only (``synchronous=NORMAL``): the SCP's
    engine, whose rows the spool can rebuild (:func:`service.recovery.record_unrecorded_instances`).
    PostgreSQL commits stay synchronous: its server can restart on its own, without the
    process that would rebuild the rows.
    """
    if database_url.startswith("sqlite"):
        path = database_url.split("///", 1)[-1]
        if path and path != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(database_url, connect_args={"timeout": lock_timeout_s})
        event.listen(engine, "connect", _sqlite_pragmas(lock_timeout_s, durable_commits))
        # pysqlite's own transaction handling starts transactions lazily, so two
        # processes can both read and then collide on write (SQLITE_BUSY without
        # waiting).  BEGIN IMMEDIATE takes the write lock up front and the
        # busy_timeout makes the other writer wait instead of fail.
        event.listen(engine, "begin", lambda conn: conn.exec_driver_sql("BEGIN IMMEDIATE"))
        return engine
    if database_url.startswith("postgresql"):
        milliseconds = int(lock_timeout_s * 1000)
        return create_engine(
            database_url, pool_pre_ping=True, pool_timeout=lock_timeout_s,
            connect_args={
                "connect_timeout": max(1, int(lock_timeout_s)),
                # a statement waits at most this for a lock, and runs at most 3x as long
                "options": f"-c lock_timeout={milliseconds} -c statement_timeout={3 * milliseconds}",
            },
        )
    return create_engine(database_url, pool_pre_ping=True, pool_timeout=lock_timeout_s)


def alembic_config() -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    return cfg


def upgrade_schema(engine: Engine) -> None:
    """Bring the schema to the newest migration (idempotent)."""
    cfg = alembic_config()
    with engine.begin() as connection:
        cfg.attributes["connection"] = connection
        command.upgrade(cfg, "head")


def schema_behind(engine: Engine) -> str | None:
    """Why the schema is not the one this code needs (``None`` when it is at head).

    Read-only commands check this instead of migrating: changing a hospital's schema is
    ``strokeseg db-upgrade``'s job (or the services' at start), not a side effect of
    listing jobs.
    """
    from alembic.runtime.migration import MigrationContext
    from alembic.script import ScriptDirectory

    head = ScriptDirectory.from_config(alembic_config()).get_current_head()
    with engine.connect() as connection:
        current = MigrationContext.configure(connection).get_current_revision()
    if current == head:
        return None
    found = f"at revision {current}" if current else "empty (no strokeseg schema)"
    return (f"the database schema is {found}, this strokeseg needs {head}: "
            "run `strokeseg db-upgrade` (with the same --config)")


class Database:
    """An engine plus a session factory; ``session()`` commits or rolls back."""

    def __init__(self, database_url: str, *, migrate: bool = True,
                 lock_timeout_s: float = DEFAULT_LOCK_TIMEOUT_S, durable_commits: bool = True) -> None:
        self.engine = make_engine(database_url, lock_timeout_s=lock_timeout_s, durable_commits=durable_commits)
        if migrate:
            upgrade_schema(self.engine)
        self._factory = sessionmaker(self.engine, expire_on_commit=False)

    @contextmanager
    def session(self) -> Iterator[Session]:
        session = self._factory()
        try:
            yield session
            session.commit()
        except BaseException:
            session.rollback()
            raise
        finally:
            session.close()

    def dispose(self) -> None:
        self.engine.dispose()
