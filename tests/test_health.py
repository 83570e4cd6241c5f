"""Probes and ``strokeseg status``: liveness, readiness (database, broker, spool, models)."""

from __future__ import annotations

import urllib.error
import urllib.request
from pathlib import Path

import pytest

from service.db import Database
from tests.conftest import free_port
from tests.peers import Strokeseg, echo_ok, run_cli, wait_for, write_config

pytestmark = pytest.mark.network


def _get(port: int, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as answer:
            return answer.status, answer.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def test_status_reports_every_check_and_the_jobs(tmp_path: Path) -> None:
    config = write_config(tmp_path / "s.yaml", scp_port=free_port(), spool=tmp_path / "spool", destinations=[])
    Database(f"sqlite:///{tmp_path / 'spool' / 'strokeseg.sqlite'}").dispose()  # migrated
    result = run_cli(config, "status")
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    for name in ("database", "broker", "spool", "models"):
        assert f"{name}\tok" in lines, result.stdout
    assert 'strokeseg_jobs{state=queued}\t0' in lines and "strokeseg_missing_results\t0" in lines

    broken = write_config(tmp_path / "b.yaml", scp_port=free_port(), spool=tmp_path / "spool", destinations=[],
                          broker_url=f"redis://127.0.0.1:{free_port()}/0", model_dir=str(tmp_path / "nowhere"))
    result = run_cli(broken, "status")
    assert result.returncode == 1
    assert "broker\tPROBLEM\tbroker unreachable" in result.stdout
    assert "models\tPROBLEM\tmodel bundle" in result.stdout


def test_liveness_and_readiness_endpoints(tmp_path: Path) -> None:
    port, metrics = free_port(), free_port()
    closed = free_port()
    config = write_config(tmp_path / "scp.yaml", scp_port=port, spool=tmp_path / "spool", destinations=[],
                          broker_url=f"redis://127.0.0.1:{closed}/0",
                          metrics={"scp_port": metrics, "worker_port": 0})
    with Strokeseg("scp", config) as scp:
        wait_for(lambda: echo_ok(port), 60, "the SCP")
        assert _get(metrics, "/healthz") == (200, "ok\n")
        code, body = _get(metrics, "/readyz")
        assert code == 503 and "broker unreachable" in body  # the broker is down: not ready
        code, body = _get(metrics, "/metrics")
        assert code == 200 and "strokeseg_jobs" in body
        assert scp.stop() == 0, scp.output()

    scp_port, metrics_port = free_port(), free_port()
    ready = write_config(tmp_path / "ok.yaml", scp_port=scp_port, spool=tmp_path / "spool2", destinations=[],
                         metrics={"scp_port": metrics_port, "worker_port": 0})
    with Strokeseg("scp", ready) as scp:
        wait_for(lambda: echo_ok(scp_port), 60, "the SCP")
        assert _get(metrics_port, "/readyz") == (200, "ready\n")
        assert scp.stop() == 0, scp.output()
