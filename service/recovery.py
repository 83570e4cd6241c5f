"""Job recovery: nothing received is lost to a restart, a power loss, a dead worker or a lost message.

At start-up, before the SCP listens, :func:`record_unrecorded_instances` records every
received file in the spool that the database does not know: the spool, not the database,
is the system of record for what was received (see the function).

At start-up every queued job is handed over again (its message may have been lost) and
stale running jobs are queued again; while running, :meth:`JobRecovery.recover_stuck`
queues again a job whose worker's lease expired and hands over again a queued job no
worker took, and :meth:`JobRecovery.queue_due_retries` queues failed jobs whose automatic
retry is due. Handing over twice is harmless: workers claim jobs with a compare-and-set,
and a re-run re-sends results with the same SOP Instance UIDs.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

from pydicom import dcmread
from pydicom.dataset import Dataset

from service import metrics
from service.db import JobStore, ReceivedInstance
from service.domain import InstanceSignature
from service.handoff import HandOff
from service.storage import Spool

log = logging.getLogger(__name__)


class JobRecovery:
    """Queue again what was left behind (run by the SCP process's scheduler)."""

    def __init__(
        self, store: JobStore, hand_off: HandOff, *,
        stale_job_after_s: float, lost_dispatch_after_s: float | None = None,
    ) -> None:
        self.store = store
        self.hand_off = hand_off
        self.stale_job_after_s = stale_job_after_s
        self.lost_dispatch_after_s = lost_dispatch_after_s

    def at_start(self) -> list[int]:
        """Hand over queued jobs again and queue stale running ones (called once at start)."""
        job_ids = self.store.jobs_to_requeue(self.stale_job_after_s)
        for job_id in job_ids:
            self.hand_off(job_id)
        if job_ids:
            log.info("re-dispatched %d unfinished job(s) after start", len(job_ids))
        return job_ids

    def recover_stuck(self) -> list[int]:
        """Queue again what a dead worker or a lost broker message left behind, while running.

        A running job whose worker stopped renewing its lease goes back to ``queued``
        and to the broker; a queued job that no worker took ``lost_dispatch_after_s``
        after its hand-off is handed over again.
        """
        job_ids: list[int] = []
        for job_id in self.store.requeue_expired_leases():
            log.warning("job %d: its worker's lease expired (worker lost); queued again", job_id,
                        extra={"job_id": job_id})
            metrics.JOBS_QUEUED.labels(trigger="lease_expired").inc()
            self.hand_off(job_id)
            job_ids.append(job_id)
        if self.lost_dispatch_after_s is not None:
            for job_id in self.store.queued_not_taken(self.lost_dispatch_after_s):
                if job_id in job_ids:
                    continue
                log.warning("job %d: queued and not taken after %.0f s; handing it to the broker again",
                            job_id, self.lost_dispatch_after_s, extra={"job_id": job_id})
                metrics.JOBS_QUEUED.labels(trigger="redispatch").inc()
                self.hand_off(job_id)
                job_ids.append(job_id)
        return job_ids

    def queue_due_retries(self) -> list[int]:
        """Hand over failed jobs whose automatic (delivery) retry is due."""
        job_ids = self.store.due_retries()
        for job_id in job_ids:
            log.info("job %d: automatic delivery retry", job_id, extra={"job_id": job_id})
            metrics.JOBS_QUEUED.labels(trigger="retry").inc()
            self.hand_off(job_id)
        return job_ids


#: The calling AE title recorded for an instance recovered from the spool (the sender's is
#: not in the file).
RECOVERED_FROM_SPOOL = "(spool)"


def record_unrecorded_instances(
    store: JobStore, spool: Spool, describe: Callable[[Dataset], InstanceSignature]
) -> list[Path]:
    """Record every received file that the database does not know; returns their paths.

    Why this exists: the SCP answers C-STORE Success once the file is fsync'd (file and
    folder entry) and its row is committed. On the embedded SQLite database that commit
    does not wait for the disk (``synchronous=NORMAL``, see :mod:`service.db.session`),
    which roughly halves the time a C-STORE takes; a crash of the process keeps the row,
    but a power loss may take back the latest rows. Their files are on disk, so this
    sweep, run at start-up before the SCP listens, records them again and the study
    completes as if nothing happened. Files that cannot be read are left to
    :func:`service.retention.remove_orphans` (the sender got no Success for a torn write,
    which cannot happen here anyway: a file gets its name only once it is complete).
    """
    if not spool.incoming.is_dir():
        return []
    known = store.recorded_paths()
    recorded: list[Path] = []
    for path in sorted(spool.incoming.glob("*/*/*.dcm")):
        if str(path) in known:
            continue
        try:
            ds = dcmread(path, stop_before_pixels=True)
            received = ReceivedInstance(
                str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID), str(ds.SOPInstanceUID),
                str(ds.file_meta.MediaStorageSOPClassUID), str(path), path.stat().st_size,
                RECOVERED_FROM_SPOOL, describe(ds))
        except Exception as exc:  # noqa: BLE001 - an unreadable file must not stop the start
            log.warning("spool file %s is not recorded and cannot be read (%s); left for the orphan sweep",
                        path.name, type(exc).__name__)
            continue
        previous = store.record_received(received).previous_path
        if previous is not None and previous != str(path):
            Path(previous).unlink(missing_ok=True)  # the same instance, re-sent elsewhere later
        recorded.append(path)
    if recorded:
        log.warning("recorded %d received instance(s) that the database had lost (power loss?) "
                    "from the spool", len(recorded))
    return recorded
