"""The SCP process's scheduler: lanes, intervals, a failing task, and the receiver's wiring."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from service.scheduler import Scheduler


def test_a_slow_lane_does_not_delay_another_and_a_failing_task_runs_again() -> None:
    scheduler = Scheduler(tick_s=0.02)
    fast: list[float] = []
    failures = {"n": 0}
    release = threading.Event()

    def flaky() -> None:
        failures["n"] += 1
        raise RuntimeError("database went away")

    scheduler.every("completion", 0.05, lambda: fast.append(time.monotonic()))
    scheduler.every("flaky", 0.05, flaky)
    scheduler.every("follow-up", 0.05, lambda: release.wait(5), lane="network")
    scheduler.start()
    try:
        time.sleep(0.6)  # the network lane is stuck in its first run all this time
        assert len(fast) >= 6, fast
        assert failures["n"] >= 6  # logged, and run again at its next turn
    finally:
        release.set()
        scheduler.stop(timeout_s=5)
    count = len(fast)
    time.sleep(0.2)
    assert len(fast) == count  # stopped means stopped


def test_first_after_and_interval_are_honoured() -> None:
    scheduler = Scheduler(tick_s=0.01)
    runs: list[float] = []
    scheduler.every("sweep", 0.3, lambda: runs.append(time.monotonic()), first_after_s=0.2)
    started = time.monotonic()
    scheduler.start()
    time.sleep(0.65)
    scheduler.stop()
    assert len(runs) == 2, runs
    assert 0.15 <= runs[0] - started <= 0.35
    assert runs[1] - runs[0] == pytest.approx(0.3, abs=0.1)


def test_tasks_cannot_be_added_once_running() -> None:
    scheduler = Scheduler()
    scheduler.every("a", 1.0, lambda: None)
    scheduler.start()
    try:
        with pytest.raises(RuntimeError):
            scheduler.every("b", 1.0, lambda: None)
    finally:
        scheduler.stop()


def test_receiver_schedules_every_periodic_duty(tmp_path: Path) -> None:
    """The composition root wires completion, retries, recovery, commitment time-outs on the
    main lane, and the network and disk work on lanes of their own."""
    from service.config import load_settings
    from service.receiver import Receiver
    from tests.conftest import free_port

    config = tmp_path / "c.yaml"
    config.write_text(
        f"spool_dir: {tmp_path / 'spool'}\nscp:\n  port: {free_port()}\n"
        "metrics:\n  scp_port: 0\n  worker_port: 0\nretention:\n  sweep_every_s: 600\n"
    )
    dispatched: list[int] = []
    receiver = Receiver(load_settings(config), dispatched.append)
    try:
        assert receiver.scheduler.tasks == {
            "main": ["study completion", "automatic retries", "stuck-job recovery",
                     "storage commitment time-outs"],
            "commitment-follow-up": ["storage commitment follow-up"],
            "retention": ["retention sweep"],
        }
    finally:
        receiver.db.dispose()
