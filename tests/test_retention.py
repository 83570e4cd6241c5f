"""Retention: finished studies leave the spool after their time; nothing unfinished is touched
(SQLite and PostgreSQL; ``strokeseg gc`` as an operator runs it)."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import pytest
from sqlalchemy import update

from service.config import RetentionSettings
from service.db import Database, JobStore
from service.db.commitment import CommitmentStore
from service.db.models import Job, utcnow
from service.domain import JobState
from service.retention import sweep
from service.storage import Spool
from tests.peers import run_cli, write_config

SETTINGS = RetentionSettings(delivered_days=7, failed_days=30)


@dataclass
class _Ref:
    sop_class_uid: str
    sop_instance_uid: str


@pytest.fixture(params=["sqlite", "postgresql"])
def db(request: pytest.FixtureRequest) -> Database:
    url = request.getfixturevalue("sqlite_url" if request.param == "sqlite" else "postgres_url")
    database = Database(url)
    request.addfinalizer(database.dispose)
    return database


def _study(store: JobStore, spool: Spool, uid: str, state: JobState | None, days_ago: float = 0.0,
           *, retry_due: bool = False) -> int:
    """A study with one received image on disk and one job in ``state``, finished ``days_ago``."""
    data = b"\0" * 128 + b"DICM"
    path = spool.store_instance(uid, uid + ".1", uid + ".1.1", data)
    job_id = store.record_instance(study_instance_uid=uid, series_instance_uid=uid + ".1",
                                   sop_instance_uid=uid + ".1.1", sop_class_uid="1.2.840.10008.5.1.4.1.1.4",
                                   path=str(path), size_bytes=len(data), calling_ae_title="MRI1")
    spool.result_dir(job_id).joinpath("SEG_x.dcm").write_bytes(b"seg")
    if state is None:
        return job_id
    assert store.queue(job_id) and store.claim(job_id, "w", 60)
    fields = {"next_attempt_at": utcnow() + timedelta(hours=1)} if retry_due else None
    assert store.transition(job_id, state, fields=fields)
    with store.db.session() as s:
        s.execute(update(Job).where(Job.id == job_id)
                  .values(finished_at=utcnow() - timedelta(days=days_ago)))
    return job_id


def test_only_finished_studies_past_their_retention_are_removed(db: Database, tmp_path: Path) -> None:
    store, commitments, spool = JobStore(db), CommitmentStore(db), Spool(tmp_path / "spool")
    jobs = {
        "1.9.1": _study(store, spool, "1.9.1", JobState.DELIVERED, 8),  # due
        "1.9.2": _study(store, spool, "1.9.2", JobState.DELIVERED, 2),  # too recent
        "1.9.3": _study(store, spool, "1.9.3", JobState.REFUSED, 8),  # refusals are kept longer
        "1.9.4": _study(store, spool, "1.9.4", JobState.REFUSED, 31),  # due
        "1.9.5": _study(store, spool, "1.9.5", JobState.HELD, 100),  # waits for an operator
        "1.9.6": _study(store, spool, "1.9.6", JobState.FAILED, 100, retry_due=True),  # retrying
        "1.9.7": _study(store, spool, "1.9.7", None),  # still receiving
        "1.9.8": _study(store, spool, "1.9.8", JobState.DELIVERED, 8),  # commitment pending
    }
    commitments.record_request("2.25.1", [_Ref("1.2.840.10008.5.1.4.1.1.66.4", "1.9.8.99")],
                               destination="pacs", job_id=jobs["1.9.8"])

    planned = sweep(store, commitments, spool, SETTINGS, dry_run=True)
    assert sorted(r.study_instance_uid for r in planned) == ["1.9.1", "1.9.4"]
    assert all((spool.incoming / uid).is_dir() for uid in jobs)  # a dry run removes nothing

    removed = sweep(store, commitments, spool, SETTINGS)
    assert sorted(r.study_instance_uid for r in removed) == ["1.9.1", "1.9.4"]
    assert all(r.bytes_freed > 0 for r in removed)
    for uid, job_id in jobs.items():
        gone = uid in ("1.9.1", "1.9.4")
        assert (spool.incoming / uid).exists() is not gone, uid
        assert spool.results.joinpath(str(job_id)).exists() is not gone, uid
        assert (store.instance_paths(uid) == []) is gone, uid
    # the history stays, and says what happened
    assert store.job(jobs["1.9.1"]).state is JobState.DELIVERED  # type: ignore[union-attr]
    assert "spool files removed after retention" in store.events(jobs["1.9.1"])[-1][1]
    assert sweep(store, commitments, spool, SETTINGS) == []  # nothing left to do


def test_gc_command(tmp_path: Path) -> None:
    config = write_config(tmp_path / "s.yaml", scp_port=11112, spool=tmp_path / "spool", destinations=[],
                          retention={"delivered_days": 1})
    spool = Spool(tmp_path / "spool")
    db = Database(f"sqlite:///{tmp_path / 'spool' / 'strokeseg.sqlite'}")
    try:
        store = JobStore(db)
        _study(store, spool, "1.8.1", JobState.DELIVERED, 3)
        _study(store, spool, "1.8.2", JobState.DELIVERED, 0)
    finally:
        db.dispose()
    dry = run_cli(config, "gc", "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert "would remove\t1.8.1\tdelivered" in dry.stdout and "1.8.2" not in dry.stdout
    assert (spool.incoming / "1.8.1").is_dir()
    done = run_cli(config, "gc")
    assert done.returncode == 0, done.stderr
    assert "removed 1 studies" in done.stdout
    assert not (spool.incoming / "1.8.1").exists() and (spool.incoming / "1.8.2").is_dir()


def test_unrecorded_files_are_removed_once_old(db: Database, tmp_path: Path) -> None:
    """A file written but never recorded (crash, database fault) does not stay for ever."""
    import os

    from service.retention import ORPHAN_AFTER_S, remove_orphans

    store, spool = JobStore(db), Spool(tmp_path / "spool")
    _study(store, spool, "1.7.1", JobState.DELIVERED, 0)
    recorded = store.instance_paths("1.7.1")[0]
    old_orphan = spool.store_instance("1.7.2", "1.7.2.1", "1.7.2.1.1", b"DICM")
    fresh_orphan = spool.store_instance("1.7.3", "1.7.3.1", "1.7.3.1.1", b"DICM")  # maybe in flight
    past = old_orphan.stat().st_mtime - ORPHAN_AFTER_S - 60
    os.utime(old_orphan, (past, past))
    assert remove_orphans(store, spool, dry_run=True) == [old_orphan] and old_orphan.exists()
    assert remove_orphans(store, spool) == [old_orphan]
    assert not old_orphan.exists() and fresh_orphan.exists() and Path(recorded).exists()
