"""``strokeseg serve`` keeps its worker alive and never leaves it behind (real processes, kill -9)."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest

from tests.conftest import free_port
from tests.peers import Strokeseg, echo_ok, run_cli, storescu, wait_for, write_config
from tests.test_e2e_recovery import HoldingPACS, _children

pytestmark = [pytest.mark.network, pytest.mark.slow]


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"  # a zombie is dead


def test_a_worker_killed_mid_job_is_restarted_and_the_study_delivered_once(
    tmp_path: Path, phantom_cases: list[Path]
) -> None:
    """serve's worker dies inside its first C-STORE: restarted, the job recovered, delivered once."""
    port = free_port()
    with HoldingPACS(hold_s=20.0) as pacs:
        config = write_config(tmp_path / "serve.yaml", scp_port=port, spool=tmp_path / "spool",
                              destinations=[pacs.destination()], completion_timeout_s=1.0,
                              worker={"intra_op_threads": 2, "lease_s": 3.0})
        with Strokeseg("serve", config) as serve:
            assert serve.proc is not None
            wait_for(lambda: echo_ok(port), 60, "serve to start")
            storescu(port, phantom_cases[0] / "dicom")
            assert pacs.first_store.wait(180), serve.output()
            (first,) = _children(serve.proc.pid)
            os.kill(first, signal.SIGKILL)
            killed = time.monotonic()
            assert echo_ok(port)  # the SCP keeps answering meanwhile
            wait_for(lambda: [p for p in _children(serve.proc.pid) if p != first and _alive(p)],
                     60, "a new worker process")
            wait_for(lambda: "\tdelivered\t" in run_cli(config, "jobs").stdout, 120,
                     "the study delivered by the new worker")
            print(f"serve: worker killed mid-job, delivered {time.monotonic() - killed:.1f} s later")
            assert len(pacs.unique()) == 2  # one SEG, one SR: re-sent with the same UIDs
            assert serve.proc.poll() is None
            assert "worker process exited with code -9; starting it again" in serve.output()
            assert serve.stop() == 0, serve.output()


def test_the_worker_dies_with_serve(tmp_path: Path) -> None:
    port = free_port()
    config = write_config(tmp_path / "serve.yaml", scp_port=port, spool=tmp_path / "spool", destinations=[])
    serve = Strokeseg("serve", config).start()
    try:
        assert serve.proc is not None
        wait_for(lambda: echo_ok(port), 60, "serve to start")
        (worker,) = wait_for(lambda: _children(serve.proc.pid), 30, "the worker process")
        serve.proc.kill()  # kill -9: no chance to clean up
        serve.proc.wait()
        deadline = time.monotonic() + 30
        while _alive(worker) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not _alive(worker), "an orphan worker outlived serve"
    finally:
        if serve.proc is not None and serve.proc.poll() is None:
            serve.proc.kill()
