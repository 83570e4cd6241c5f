"""Worker leases: a job whose worker died, or whose broker message was lost, is run again while
the service runs, and only the worker holding the lease records the outcome (SQLite and PostgreSQL).
"""

from __future__ import annotations

import time
from datetime import timedelta

import pytest
from sqlalchemy import update

from service.db import Database, JobStore
from service.db.models import Job, utcnow
from service.domain import JobState
from service.handoff import HandOff
from service.pipeline import LeaseKeeper
from service.recovery import JobRecovery


@pytest.fixture(params=["sqlite", "postgresql"])
def store(request: pytest.FixtureRequest) -> JobStore:
    url = request.getfixturevalue("sqlite_url" if request.param == "sqlite" else "postgres_url")
    db = Database(url)
    request.addfinalizer(db.dispose)
    return JobStore(db)


def _queued_job(store: JobStore, study: str = "1.2.840.7") -> int:
    job_id = store.record_instance(
        study_instance_uid=study, series_instance_uid=study + ".1", sop_instance_uid=study + ".1.1",
        sop_class_uid="1.2.840.10008.5.1.4.1.1.4", path="/spool/x.dcm", size_bytes=10,
        calling_ae_title="MRI1",
    )
    assert store.queue(job_id)
    return job_id


def _expire(store: JobStore, job_id: int, column: str = "lease_expires_at", ago_s: float = 5.0) -> None:
    """What the clock does to a lease nobody renews (a killed worker)."""
    with store.db.session() as s:
        s.execute(update(Job).where(Job.id == job_id).values({column: utcnow() - timedelta(seconds=ago_s)}))


def test_a_live_lease_is_exclusive(store: JobStore) -> None:
    job_id = _queued_job(store)
    assert store.claim(job_id, "worker-a", 60)
    assert not store.claim(job_id, "worker-b", 60)
    summary = store.job(job_id)
    assert summary is not None and summary.lease_owner == "worker-a"
    assert summary.lease_expires_at is not None and summary.lease_expires_at > utcnow()
    assert store.renew_lease(job_id, "worker-a", 60)
    assert not store.renew_lease(job_id, "worker-b", 60)


def test_an_expired_lease_can_be_claimed_again_and_the_old_worker_cannot_finish(store: JobStore) -> None:
    job_id = _queued_job(store)
    assert store.claim(job_id, "worker-a", 60)
    _expire(store, job_id)
    assert store.claim(job_id, "worker-b", 60)  # the re-delivered task of a killed worker
    summary = store.job(job_id)
    assert summary is not None and summary.lease_owner == "worker-b" and summary.attempts == 2
    assert not store.renew_lease(job_id, "worker-a", 60)
    assert not store.transition(job_id, JobState.DELIVERED, expect=(JobState.RUNNING,), lease_owner="worker-a")
    assert store.transition(job_id, JobState.DELIVERED, expect=(JobState.RUNNING,), lease_owner="worker-b")
    done = store.job(job_id)
    assert done is not None and done.state is JobState.DELIVERED
    assert done.lease_owner == "" and done.lease_expires_at is None
    assert "lease expired" in " ".join(reason for _, reason, _ in store.events(job_id))


def test_only_expired_leases_are_queued_again(store: JobStore) -> None:
    dead = _queued_job(store, "1.2.840.8")
    alive = _queued_job(store, "1.2.840.9")
    assert store.claim(dead, "worker-a", 60) and store.claim(alive, "worker-b", 60)
    _expire(store, dead)
    assert store.requeue_expired_leases() == [dead]
    assert store.job(dead).state is JobState.QUEUED  # type: ignore[union-attr]
    assert store.job(alive).state is JobState.RUNNING  # type: ignore[union-attr]
    assert store.requeue_expired_leases() == []


def test_lease_keeper_renews_until_the_job_ends(store: JobStore) -> None:
    job_id = _queued_job(store)
    assert store.claim(job_id, "worker-a", 0.6)
    with LeaseKeeper(store, job_id, "worker-a", 0.6) as keeper:
        time.sleep(1.5)  # 2.5 leases: without renewal it would have expired
        assert store.requeue_expired_leases() == []
    assert not keeper.lost
    time.sleep(0.8)
    assert store.requeue_expired_leases() == [job_id]  # stopped renewing: the worker is gone


def test_lease_keeper_notices_a_lost_lease(store: JobStore) -> None:
    job_id = _queued_job(store)
    assert store.claim(job_id, "worker-a", 0.6)
    _expire(store, job_id)
    assert store.claim(job_id, "worker-b", 60)
    with LeaseKeeper(store, job_id, "worker-a", 0.6) as keeper:
        time.sleep(0.5)
    assert keeper.lost


def test_scheduler_recovers_dead_workers_and_lost_messages_while_running(store: JobStore) -> None:
    """The SCP's periodic recovery: no restart needed, each job handed over once per check."""
    dispatched: list[int] = []
    recovery = JobRecovery(store, HandOff(store, dispatched.append), stale_job_after_s=900,
                           lost_dispatch_after_s=30)
    crashed = _queued_job(store, "1.2.840.10")
    lost = _queued_job(store, "1.2.840.11")
    fresh = _queued_job(store, "1.2.840.12")
    assert store.claim(crashed, "worker-a", 60)
    _expire(store, crashed)
    _expire(store, lost, column="queued_at", ago_s=60)  # queued a minute ago, never taken
    assert sorted(recovery.recover_stuck()) == sorted([crashed, lost])
    assert sorted(dispatched) == sorted([crashed, lost]) and fresh not in dispatched
    assert store.job(crashed).state is JobState.QUEUED  # type: ignore[union-attr]
    # Handed over just now: not again at the next check, only after lost_dispatch_after_s.
    assert recovery.recover_stuck() == []
    _expire(store, lost, column="dispatched_at", ago_s=60)
    assert recovery.recover_stuck() == [lost]
