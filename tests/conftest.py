"""Shared fixtures: free ports, real dcmtk binaries, phantom studies, databases."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def dcmtk_tool(name: str) -> str:
    """Path of a dcmtk binary.  pynetdicom installs Python apps with the same names
    (storescu, echoscu, ...) that can shadow dcmtk's on PATH: pick the real one."""
    candidates = [f"/usr/bin/{name}", f"/usr/local/bin/{name}", shutil.which(name) or ""]
    for candidate in candidates:
        if candidate and os.access(candidate, os.X_OK):
            out = subprocess.run([candidate, "--version"], capture_output=True, text=True)
            if "dcmtk" in (out.stdout + out.stderr).lower():
                return candidate
    pytest.fail(f"dcmtk's {name} is not installed (apt-get install dcmtk)")


@pytest.fixture(scope="session")
def phantom_cases(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """Three phantom studies (seeds < 1000, never used for training)."""
    from models.synth import write_phantom_cases

    out = tmp_path_factory.mktemp("phantoms")
    return write_phantom_cases(out, 3, seed=7)


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'jobs.sqlite'}"


POSTGRES_ADMIN_URL = os.environ.get(
    "STROKESEG_TEST_POSTGRES", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
)


@pytest.fixture
def postgres_url() -> Iterator[str]:
    """A fresh database on the machine's PostgreSQL server, dropped afterwards."""
    from sqlalchemy import create_engine, text

    name = f"strokeseg_test_{uuid.uuid4().hex[:10]}"
    admin = create_engine(POSTGRES_ADMIN_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    base = POSTGRES_ADMIN_URL.rsplit("/", 1)[0]
    try:
        yield f"{base}/{name}"
    finally:
        with admin.connect() as conn:
            conn.execute(
                text(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = :n"
                ),
                {"n": name},
            )
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}"'))
        admin.dispose()
