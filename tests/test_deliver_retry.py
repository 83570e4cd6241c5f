"""A delivery retry sends only what a destination did not store, and shows as ``retrying``.

``run_job`` runs in-process against SQLite; the two destinations are real dcmtk storescp
peers, one of them down for the first attempt.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from service.config import load_settings
from service.domain import JobState
from service.pipeline import WorkerContext, run_job
from tests.conftest import free_port
from tests.peers import StoreSCP, run_cli, write_config
from tests.test_hold import _jobs, _receive_study

pytestmark = pytest.mark.network


def test_retry_skips_the_destination_that_stored_and_is_listed_as_retrying(
    tmp_path: Path, phantom_cases: list[Path]
) -> None:
    down_port = free_port()
    with StoreSCP(tmp_path / "up", ae_title="UP") as up:
        config = write_config(
            tmp_path / "strokeseg.yaml", scp_port=free_port(), spool=tmp_path / "spool",
            destinations=[up.destination("up"),
                          {"name": "down", "ae_title": "DOWN", "host": "127.0.0.1", "port": down_port}],
            delivery={"retry_initial_s": 60, "retry_max_interval_s": 600},
        )
        ctx = WorkerContext.from_settings(load_settings(config))
        try:
            job_id = _receive_study(ctx, phantom_cases[0])
            assert run_job(ctx, job_id) is JobState.FAILED
            summary = ctx.store.job(job_id)
            assert summary is not None and summary.next_attempt_at is not None
            row = _jobs(config)[str(job_id)]
            assert row[1] == "retrying" and "automatic retry at" in row[6]
            first = sorted(p.name for p in up.folder.iterdir())
            assert len(first) == 2  # SEG + SR stored at the destination that was up

            with StoreSCP(tmp_path / "down", port=down_port, ae_title="DOWN") as down:
                assert ctx.store.retry(job_id, "due automatic retry")
                assert run_job(ctx, job_id) is JobState.DELIVERED
                assert len(list(down.folder.iterdir())) == 2
            # nothing was sent again to the destination that already had it
            assert sorted(p.name for p in up.folder.iterdir()) == first
            sent_up = [d for d in ctx.store.deliveries(job_id) if d.destination == "up"]
            assert len(sent_up) == 2
            assert _jobs(config)[str(job_id)][1] == "delivered"
            assert run_cli(config, "jobs").returncode == 0
        finally:
            ctx.db.dispose()
