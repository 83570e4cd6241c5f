"""Transient failures are retried, a crash mid-write never sends a SEG without its SR, and new
spool folders are made durable (issue 11 items 3 and 8). ``run_job`` runs in-process on SQLite;
dcmtk's storescp is the PACS."""

from __future__ import annotations

import errno
from pathlib import Path

import pydicom
import pytest
import sqlalchemy.exc
from sqlalchemy import update

import service.derive.results
import service.storage
from service.config import load_settings
from service.db.models import Job, utcnow
from service.domain import JobState
from service.errors import (
    DeliveryError,
    NoDiffusionSeries,
    ResourceUnavailable,
    RetriableError,
    as_strokeseg_error,
)
from service.pipeline import RESULTS_COMPLETE, WorkerContext, run_job
from service.storage import Spool
from tests.conftest import free_port
from tests.peers import StoreSCP, write_config
from tests.test_hold import _jobs, _receive_study

SEG_UID = "1.2.840.10008.5.1.4.1.1.66.4"


def _chained() -> BaseException:
    try:
        try:
            raise OSError(errno.ENOSPC, "No space left on device")
        except OSError as inner:
            raise RuntimeError("could not write the SEG") from inner
    except RuntimeError as outer:
        return outer


@pytest.mark.parametrize(
    ("exc", "retriable"),
    [
        (OSError(errno.ENOSPC, "No space left on device"), True),
        (OSError(errno.EDQUOT, "Disk quota exceeded"), True),
        (sqlalchemy.exc.OperationalError("UPDATE jobs", {}, Exception("database is locked")), True),
        (_chained(), True),
        (DeliveryError("PACS down"), True),
        (OSError(errno.ENOENT, "No such file"), False),
        (ValueError("a bug"), False),
        (NoDiffusionSeries(), False),
    ],
)
def test_the_exception_tree_decides_what_is_retried(exc: BaseException, retriable: bool) -> None:
    known = as_strokeseg_error(exc)
    assert isinstance(known, RetriableError) is retriable
    if isinstance(exc, OSError) and retriable:
        assert isinstance(known, ResourceUnavailable) and "errno" in str(known)


@pytest.mark.network
def test_disk_full_during_a_job_is_retried_not_final(
    tmp_path: Path, phantom_cases: list[Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    with StoreSCP(tmp_path / "pacs") as peer:
        config = write_config(tmp_path / "s.yaml", scp_port=free_port(), spool=tmp_path / "spool",
                              destinations=[peer.destination()],
                              delivery={"retry_initial_s": 30, "retry_max_interval_s": 60})
        ctx = WorkerContext.from_settings(load_settings(config))
        try:
            job_id = _receive_study(ctx, phantom_cases[0])
            real = service.derive.results.save_atomically

            def disk_full(*_: object, **__: object) -> Path:
                raise OSError(errno.ENOSPC, "No space left on device")

            monkeypatch.setattr(service.derive.results, "save_atomically", disk_full)
            assert run_job(ctx, job_id) is JobState.FAILED
            summary = ctx.store.job(job_id)
            assert summary is not None and summary.next_attempt_at is not None
            assert summary.reason.startswith("temporary failure: No space left on device")
            assert _jobs(config)[str(job_id)][1] == "retrying"

            monkeypatch.setattr(service.derive.results, "save_atomically", real)
            assert ctx.store.retry(job_id, "due automatic retry")
            assert run_job(ctx, job_id) is JobState.DELIVERED
            assert len(peer.received()) == 2
        finally:
            ctx.db.dispose()


class _Crash(BaseException):
    """The worker process dying: nothing in run_job catches it."""


@pytest.mark.network
def test_a_crash_between_seg_and_sr_never_sends_the_seg_alone(
    tmp_path: Path, phantom_cases: list[Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    with StoreSCP(tmp_path / "pacs") as peer:
        config = write_config(tmp_path / "s.yaml", scp_port=free_port(), spool=tmp_path / "spool",
                              destinations=[peer.destination()])
        ctx = WorkerContext.from_settings(load_settings(config))
        try:
            job_id = _receive_study(ctx, phantom_cases[0])
            real = service.derive.results.save_atomically
            written: list[Path] = []

            def crash_before_sr(ds: pydicom.Dataset, path: Path) -> Path:
                if path.name.startswith("SR_"):
                    raise _Crash()
                written.append(real(ds, path))
                return written[-1]

            monkeypatch.setattr(service.derive.results, "save_atomically", crash_before_sr)
            with pytest.raises(_Crash):
                run_job(ctx, job_id)
            (orphan_seg,) = written
            assert orphan_seg.exists() and not (orphan_seg.parent / RESULTS_COMPLETE).exists()

            # The worker is gone: its lease runs out and the scheduler queues the job again.
            with ctx.db.session() as s:
                s.execute(update(Job).where(Job.id == job_id).values(lease_expires_at=utcnow()))
            assert ctx.store.requeue_expired_leases() == [job_id]
            monkeypatch.setattr(service.derive.results, "save_atomically", real)
            assert run_job(ctx, job_id) is JobState.DELIVERED
            received = peer.received()
            assert sorted(str(ds.SOPClassUID) == SEG_UID for ds in received) == [False, True]
            assert orphan_seg.stem.split("_", 1)[1] not in {str(ds.SOPInstanceUID) for ds in received}
            assert not orphan_seg.exists()
        finally:
            ctx.db.dispose()


def test_new_spool_folders_are_fsynced_into_their_parents(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    synced: list[Path] = []
    real = service.storage._fsync_dir
    monkeypatch.setattr(service.storage, "_fsync_dir", lambda folder: (synced.append(Path(folder)), real(folder)))
    spool = Spool(tmp_path / "spool")
    path = spool.store_instance("1.2.3", "1.2.3.4", "1.2.3.4.5", b"DICM")
    series_dir = path.parent
    study_dir = series_dir.parent
    # each new folder's entry is made durable in its parent (spool, incoming, study, series
    # were all new), then the file's entry in its folder
    assert synced == [tmp_path, spool.root, spool.incoming, study_dir, series_dir]
    synced.clear()
    spool.store_instance("1.2.3", "1.2.3.4", "1.2.3.4.6", b"DICM")
    assert synced == [series_dir]  # existing folders: only the new file's entry
