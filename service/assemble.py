"""Assemble: decide when a study is complete and hand it to the queue.

A study is complete when no instance of it arrived for
``study.completion_timeout_s`` (and, if its headers still say a part is
missing, ``study.incomplete_extra_wait_s`` more, once), or, content-aware, earlier: once its high-b
DWI series has a regular stack of slice positions, its ADC (or the b0
needed to compute one) covers every one of them, and no image came for
``study.early_completion_grace_s``.  The grace period is what catches a
missing first/last slice still in flight; multi-frame objects fall back to
the idle timeout.  The database decides, not the broker: at
start-up every queued job is dispatched again (its message may have been
lost) and stale running jobs are re-queued, so a restart loses nothing; while
running, :meth:`StudyAssembler.recover_stuck` queues again a job whose worker's
lease expired and hands over again a queued job no worker took.
Dispatching twice is harmless: workers claim jobs with a compare-and-set.

The same loop flags Storage Commitment requests that got no report
(``delivery.commitment_timeout_s``), and, on a thread of its own because it
does network I/O, runs the commitment follow-up
(:class:`service.deliver.followup.CommitmentFollowUp`): re-send and
re-request what a PACS reported failed or never answered, a bounded number
of times.  Both read their work from the database, so they too carry on
after a restart.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from service import metrics
from service.db import InstanceSignature, JobStore
from service.db.commitment import CommitmentStore

log = logging.getLogger(__name__)

Dispatch = Callable[[int], None]


HIGH_B_MIN = 500.0
MIN_SLICES = 3
POSITION_DECIMALS = 1
SPACING_TOLERANCE = 0.1


def study_completeness(signatures: Sequence[InstanceSignature]) -> bool | None:
    """Whether a study's DWI and ADC/b0 look complete from their headers; None when headers can't tell.

    Incomplete (False): no high-b DWI yet, a hole in its slice stack, no ADC
    or b0 covering it, or a b0 of the DWI's series / an ADC overlapping it
    with slice positions beyond it (a transfer cut after the first slices).
    A directional-only acquisition (Philips, GE and Canon often send no trace)
    stands in for the trace when there is none; it is incomplete while its
    slice positions hold different numbers of directions (a cut mid-volume).
    Multi-frame objects carry their slices inside, so the headers can't tell.
    """
    if not signatures or any(sig.frames > 1 for sig in signatures):
        return None
    high_b: dict[tuple[str, float], set[float]] = defaultdict(set)
    directions: dict[tuple[str, float], dict[float, int]] = defaultdict(lambda: defaultdict(int))
    adc: dict[str, set[float]] = defaultdict(set)
    b0: dict[str, set[float]] = defaultdict(set)
    for sig in signatures:
        if sig.slice_position is None:
            continue
        position = round(sig.slice_position, POSITION_DECIMALS)
        if sig.role == "dwi" and (sig.b_value or 0.0) >= HIGH_B_MIN:
            high_b[(sig.series_instance_uid, float(sig.b_value or 0.0))].add(position)
        elif sig.role == "directional" and (sig.b_value or 0.0) >= HIGH_B_MIN:
            directions[(sig.series_instance_uid, float(sig.b_value or 0.0))][position] += 1
        elif sig.role == "adc":
            adc[sig.series_instance_uid].add(position)
        elif sig.role == "b0":
            b0[sig.series_instance_uid].add(position)
    if not high_b:
        if not directions:
            return False
        b_top = max(b for _, b in directions)
        counts = max((c for (_, b), c in directions.items() if b == b_top), key=len)
        if len(set(counts.values())) != 1:
            return False  # some slice positions still lack directions
        series = next(uid for (uid, b), c in directions.items() if c is counts)
        high_b[(series, b_top)] = set(counts)
    b_max = max(b for _, b in high_b)
    series, positions = max(
        ((uid, p) for (uid, b), p in high_b.items() if b == b_max), key=lambda item: len(item[1])
    )
    if len(positions) < MIN_SLICES:
        return False
    gaps = np.diff(sorted(positions))
    median = float(np.median(gaps))
    if median <= 0 or np.any(np.abs(gaps - median) > SPACING_TOLERANCE * median):
        return False  # a slice is still missing in the middle
    if b0.get(series, set()) - positions:
        return False  # the DWI's own b0 has slices the DWI lacks
    if any(other & positions and other - positions for other in adc.values()):
        return False  # an ADC of the same slab has slices the DWI lacks
    all_b0 = set().union(*b0.values()) if b0 else set()
    return any(positions <= other for other in adc.values()) or positions <= all_b0


def study_looks_complete(signatures: Sequence[InstanceSignature]) -> bool:
    """True when a study's DWI and ADC/b0 look complete from their headers alone."""
    return study_completeness(signatures) is True


class StudyAssembler:
    """Background thread that queues complete studies."""

    def __init__(
        self,
        store: JobStore,
        dispatch: Dispatch,
        *,
        completion_timeout_s: float,
        stale_job_after_s: float,
        poll_s: float = 0.5,
        early_completion_grace_s: float | None = None,
        commitments: CommitmentStore | None = None,
        commitment_timeout_s: float = 300.0,
        follow_up: Callable[[], Any] | None = None,
        follow_up_poll_s: float = 1.0,
        incomplete_extra_wait_s: float = 0.0,
        lost_dispatch_after_s: float | None = None,
        recovery_every_s: float = 5.0,
        retention: tuple[Callable[[], Any], float] | None = None,
    ) -> None:
        self.store = store
        self.dispatch = dispatch
        self.completion_timeout_s = completion_timeout_s
        self.stale_job_after_s = stale_job_after_s
        self.poll_s = poll_s
        self.early_completion_grace_s = early_completion_grace_s
        self.commitments = commitments
        self.commitment_timeout_s = commitment_timeout_s
        self.follow_up = follow_up
        self.follow_up_poll_s = follow_up_poll_s
        self.incomplete_extra_wait_s = incomplete_extra_wait_s
        self.lost_dispatch_after_s = lost_dispatch_after_s
        self.recovery_every_s = recovery_every_s
        self._next_recovery = 0.0
        self.retention = retention
        self._next_retention = 0.0
        self._waiting: set[int] = set()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._follow_up_thread: threading.Thread | None = None

    def recover(self) -> list[int]:
        """Re-dispatch queued jobs and re-queue stale running ones (called at start)."""
        job_ids = self.store.jobs_to_requeue(self.stale_job_after_s)
        for job_id in job_ids:
            self._dispatch(job_id)
        if job_ids:
            log.info("re-dispatched %d unfinished job(s) after start", len(job_ids))
        return job_ids

    def _dispatch(self, job_id: int) -> None:
        try:
            self.dispatch(job_id)
        except Exception:
            # The job stays 'queued' in the DB; recover_stuck() hands it over again.
            log.exception("could not hand job %d to the broker", job_id, extra={"job_id": job_id})
            return
        try:
            self.store.mark_dispatched(job_id)
        except Exception:
            log.exception("could not record the hand-off of job %d", job_id, extra={"job_id": job_id})

    def recover_stuck(self) -> list[int]:
        """Queue again what a dead worker or a lost broker message left behind, while running.

        A running job whose worker stopped renewing its lease goes back to ``queued``
        and to the broker; a queued job that no worker took ``lost_dispatch_after_s``
        after its hand-off is handed over again. Workers claim with a compare-and-set,
        so a second copy of a message does no harm, and a re-run re-sends the results
        already written (same SOP Instance UIDs): delivery stays exactly once.
        """
        job_ids: list[int] = []
        for job_id in self.store.requeue_expired_leases():
            log.warning("job %d: its worker's lease expired (worker lost); queued again", job_id,
                        extra={"job_id": job_id})
            metrics.JOBS_QUEUED.labels(trigger="lease_expired").inc()
            self._dispatch(job_id)
            job_ids.append(job_id)
        if self.lost_dispatch_after_s is not None:
            for job_id in self.store.queued_not_taken(self.lost_dispatch_after_s):
                if job_id in job_ids:
                    continue
                log.warning("job %d: queued and not taken after %.0f s; handing it to the broker again",
                            job_id, self.lost_dispatch_after_s, extra={"job_id": job_id})
                metrics.JOBS_QUEUED.labels(trigger="redispatch").inc()
                self._dispatch(job_id)
                job_ids.append(job_id)
        return job_ids

    def tick(self) -> list[int]:
        """Queue every study that has been idle long enough; returns the job ids."""
        job_ids = self._queue_idle_studies()
        if self.early_completion_grace_s is not None:
            for job_id, study_uid in self.store.received_jobs(self.early_completion_grace_s):
                if study_looks_complete(self.store.instance_signatures(study_uid)) and self.store.queue(
                    job_id, "complete (content-aware)"
                ):
                    log.info("study complete by content; job %d queued", job_id, extra={"job_id": job_id})
                    metrics.JOBS_QUEUED.labels(trigger="content").inc()
                    self._dispatch(job_id)
                    job_ids.append(job_id)
        for job_id in self.store.due_retries():
            log.info("job %d: automatic delivery retry", job_id, extra={"job_id": job_id})
            metrics.JOBS_QUEUED.labels(trigger="retry").inc()
            self._dispatch(job_id)
            job_ids.append(job_id)
        now = time.monotonic()
        if now >= self._next_recovery:
            self._next_recovery = now + self.recovery_every_s
            job_ids += self.recover_stuck()
        if self.retention is not None and now >= self._next_retention:
            sweep, every_s = self.retention
            self._next_retention = now + every_s
            try:
                sweep()
            except Exception:
                log.exception("retention sweep failed; trying again in %.0f s", every_s)
        if self.commitments is not None:
            for uid in self.commitments.flag_timed_out(self.commitment_timeout_s):
                log.warning("storage commitment %s: no report after %.0f s", uid, self.commitment_timeout_s)
        return job_ids

    def _queue_idle_studies(self) -> list[int]:
        """Queue studies idle for the timeout; one that still looks incomplete waits once more.

        A study whose headers say a part is missing (see
        :func:`study_completeness`) gets ``incomplete_extra_wait_s`` more
        before it is queued anyway; intake then refuses it with what is
        missing, rather than a late slice making it a wrong result.
        """
        queued: list[int] = []
        idle = self.store.received_jobs(self.completion_timeout_s)
        if not idle:
            return queued
        waited = {job_id for job_id, _ in self.store.received_jobs(
            self.completion_timeout_s + self.incomplete_extra_wait_s
        )} if self.incomplete_extra_wait_s > 0 else None
        for job_id, study_uid in idle:
            extra = {"job_id": job_id}
            reason = "idle"
            if waited is not None and study_completeness(self.store.instance_signatures(study_uid)) is False:
                if job_id not in waited:
                    if job_id not in self._waiting:
                        self._waiting.add(job_id)
                        log.warning(
                            "job %d: study looks incomplete at the idle timeout; waiting %.0f s more",
                            job_id, self.incomplete_extra_wait_s, extra=extra,
                        )
                    continue
                reason = f"idle; still incomplete after waiting {self.incomplete_extra_wait_s:.0f} s more"
            self._waiting.discard(job_id)
            if not self.store.queue(job_id, reason):
                continue
            log.info("study %s; job %d queued", reason, job_id, extra=extra)
            metrics.JOBS_QUEUED.labels(trigger="idle").inc()
            self._dispatch(job_id)
            queued.append(job_id)
        return queued

    def _run(self) -> None:
        while not self._stop.wait(self.poll_s):
            try:
                self.tick()
            except Exception:
                log.exception("study assembler tick failed; retrying")

    def _run_follow_up(self) -> None:
        assert self.follow_up is not None
        while not self._stop.wait(self.follow_up_poll_s):
            try:
                self.follow_up()
            except Exception:
                log.exception("storage commitment follow-up failed; retrying")

    def start(self) -> None:
        self.recover()
        self._thread = threading.Thread(target=self._run, name="study-assembler", daemon=True)
        self._thread.start()
        if self.follow_up is not None:
            self._follow_up_thread = threading.Thread(
                target=self._run_follow_up, name="commitment-follow-up", daemon=True
            )
            self._follow_up_thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        if self._follow_up_thread is not None:
            # A follow-up in flight finishes its association (bounded by its timeouts);
            # whatever it did not get to is still in the database for the next start.
            self._follow_up_thread.join(timeout=15)
