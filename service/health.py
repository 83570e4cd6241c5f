"""Health of a strokeseg process: what /readyz and ``strokeseg status`` check.

Ready means the process can do its work now: the database answers, the broker answers, the
spool takes a file, and (in a worker) the models are loaded. Each problem is one line an
operator can act on; none carries a patient identifier.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path

from sqlalchemy import text

from service.config import Settings
from service.db import Database

Check = Callable[[], str]  # '' = fine, else the problem


def database_check(db: Database) -> Check:
    def check() -> str:
        try:
            with db.engine.connect() as conn:
                conn.execute(text("SELECT 1"))
        except Exception as exc:
            return f"database unreachable ({type(exc).__name__})"
        return ""
    return check


def broker_check(broker_url: str, timeout_s: float = 3.0) -> Check:
    def check() -> str:
        from kombu.connection import Connection

        try:
            with Connection(broker_url, connect_timeout=timeout_s) as conn:
                conn.ensure_connection(max_retries=1, timeout=timeout_s)
        except Exception as exc:
            return f"broker unreachable ({type(exc).__name__})"
        return ""
    return check


def spool_check(spool_dir: Path) -> Check:
    def check() -> str:
        try:
            spool_dir.mkdir(parents=True, exist_ok=True)
            fd, name = tempfile.mkstemp(dir=spool_dir, prefix=".ready-")
            os.close(fd)
            os.unlink(name)
        except OSError as exc:
            return f"spool {spool_dir} not writable ({exc.strerror or type(exc).__name__})"
        return ""
    return check


def model_check(loaded: Callable[[], bool]) -> Check:
    def check() -> str:
        return "" if loaded() else "models not loaded yet (or failed to load: see the log)"
    return check


def readiness(checks: list[Check]) -> Callable[[], list[str]]:
    """All problems of ``checks`` (empty = ready)."""
    return lambda: [problem for problem in (c() for c in checks) if problem]


def process_checks(settings: Settings, db: Database) -> list[Check]:
    """What any strokeseg process needs: database, broker, spool."""
    return [database_check(db), broker_check(settings.broker_url), spool_check(settings.spool_dir)]


def model_bundles_check(settings: Settings) -> Check:
    """Every routed model bundle is there and matches its card (checked once, at start)."""
    from service.errors import ModelError
    from service.inference.card import load_model_card

    dirs = [settings.model_dir, *(route.model_dir for route in settings.model_routes)]
    problems = []
    for model_dir in dict.fromkeys(dirs):
        try:
            load_model_card(model_dir)
        except ModelError as exc:
            problems.append(f"model bundle {model_dir}: {exc}")
    verdict = "; ".join(problems)
    return lambda: verdict
