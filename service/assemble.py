"""Assemble: decide when a study is complete and hand it to the queue.

A study is complete when no instance of it arrived for
``study.completion_timeout_s`` (and, if its headers still say a part is
missing, ``study.incomplete_extra_wait_s`` more, once), or, content-aware, earlier: once its high-b
DWI series has a regular stack of slice positions, its ADC (or the b0
needed to compute one) covers every one of them, and no image came for
``study.early_completion_grace_s``.  The grace period is what catches a
missing first/last slice still in flight; multi-frame objects fall back to
the idle timeout. Neither closes a study while an open association is still
delivering it (its latest image was of this study) unless it stored nothing for
``study.open_association_hold_s``: a sender stalled mid-study is not a finished study.

Completion only: the SCP process's scheduler (:mod:`service.receiver`) runs
:meth:`StudyAssembler.tick`; recovering lost or stuck jobs is
:mod:`service.recovery`, Storage Commitment follow-up is
:mod:`service.deliver.followup`, and retention is :mod:`service.retention`.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Callable, Collection, Sequence

import numpy as np

from service import metrics
from service.db import JobStore
from service.domain import HIGH_B_MIN, ImageRole, InstanceSignature

log = logging.getLogger(__name__)


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
        if sig.role is ImageRole.DWI and (sig.b_value or 0.0) >= HIGH_B_MIN:
            high_b[(sig.series_instance_uid, float(sig.b_value or 0.0))].add(position)
        elif sig.role is ImageRole.DIRECTIONAL and (sig.b_value or 0.0) >= HIGH_B_MIN:
            directions[(sig.series_instance_uid, float(sig.b_value or 0.0))][position] += 1
        elif sig.role is ImageRole.ADC:
            adc[sig.series_instance_uid].add(position)
        elif sig.role is ImageRole.B0:
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
    """Queues complete studies; :meth:`tick` is run periodically by the SCP's scheduler."""

    def __init__(
        self,
        store: JobStore,
        hand_off: Callable[[int], None],
        *,
        completion_timeout_s: float,
        early_completion_grace_s: float | None = None,
        incomplete_extra_wait_s: float = 0.0,
        still_arriving: Callable[[], Collection[str]] | None = None,
    ) -> None:
        self.store = store
        self.hand_off = hand_off
        self.completion_timeout_s = completion_timeout_s
        self.early_completion_grace_s = early_completion_grace_s
        self.incomplete_extra_wait_s = incomplete_extra_wait_s
        #: Study UIDs an open association is still delivering (the SCP's
        #: :meth:`~service.scp.ReceivingStudies.studies` with the hold time); never closed.
        self.still_arriving = still_arriving
        self._waiting: set[int] = set()
        self._held: set[int] = set()

    def tick(self) -> list[int]:
        """Queue every study that is complete now (idle long enough, or by content); job ids."""
        # One query for both checks (this runs every 0.5 s in the process that answers
        # C-STOREs): the studies idle for the shorter wait, with how long each has been idle.
        shortest = self.completion_timeout_s
        if self.early_completion_grace_s is not None:
            shortest = min(shortest, self.early_completion_grace_s)
        candidates = self.store.received_jobs(shortest)
        if not candidates:
            return []
        arriving = set(self.still_arriving()) if self.still_arriving is not None else set()
        job_ids = self._queue_idle_studies(arriving)
        if self.early_completion_grace_s is not None:
            job_ids += self._queue_studies_complete_by_content(self.early_completion_grace_s, arriving)
        return job_ids

    def _held_open(self, job_id: int, study_uid: str, arriving: set[str]) -> bool:
        """True (logged once per job) while an open association is still sending the study."""
        if study_uid not in arriving:
            self._held.discard(job_id)
            return False
        if job_id not in self._held:
            self._held.add(job_id)
            log.info("job %d: study idle but its association is still open and sending it; waiting",
                     job_id, extra={"job_id": job_id})
        return True

    def _queue_studies_complete_by_content(self, grace_s: float, arriving: set[str]) -> list[int]:
        queued: list[int] = []
        for job_id, study_uid in self.store.received_jobs(grace_s):
            if self._held_open(job_id, study_uid, arriving):
                continue
            if study_looks_complete(self.store.instance_signatures(study_uid)) and self.store.queue(
                job_id, "complete (content-aware)"
            ):
                log.info("study complete by content; job %d queued", job_id, extra={"job_id": job_id})
                metrics.JOBS_QUEUED.labels(trigger="content").inc()
                self.hand_off(job_id)
                queued.append(job_id)
        return queued

    def _queue_idle_studies(self, arriving: set[str]) -> list[int]:
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
            if self._held_open(job_id, study_uid, arriving):
                continue
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
            self._held.discard(job_id)
            if not self.store.queue(job_id, reason):
                continue
            log.info("study %s; job %d queued", reason, job_id, extra=extra)
            metrics.JOBS_QUEUED.labels(trigger="idle").inc()
            self.hand_off(job_id)
            queued.append(job_id)
        return queued
