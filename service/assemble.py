"""Assemble: decide when a study is complete and hand it to the queue.

A study is complete when no instance of it arrived for
``study.completion_timeout_s``.  The database decides, not the broker: at
start-up every queued job is dispatched again (its message may have been
lost) and stale running jobs are re-queued, so a restart loses nothing.
Dispatching twice is harmless: workers claim jobs with a compare-and-set.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

from service import metrics
from service.db import JobStore
from service.db.commitment import CommitmentStore

log = logging.getLogger(__name__)

Dispatch = Callable[[int], None]


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
        commitments: CommitmentStore | None = None,
        commitment_timeout_s: float = 300.0,
    ) -> None:
        self.store = store
        self.dispatch = dispatch
        self.completion_timeout_s = completion_timeout_s
        self.stale_job_after_s = stale_job_after_s
        self.poll_s = poll_s
        self.commitments = commitments
        self.commitment_timeout_s = commitment_timeout_s
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

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
            # The job stays 'queued' in the DB and is re-dispatched at the next start.
            log.exception("could not hand job %d to the broker", job_id, extra={"job_id": job_id})

    def tick(self) -> list[int]:
        """Queue every study that has been idle long enough; returns the job ids."""
        job_ids = self.store.complete_studies(self.completion_timeout_s)
        for job_id in job_ids:
            log.info("study complete; job %d queued", job_id, extra={"job_id": job_id})
            metrics.JOBS_QUEUED.inc()
            self._dispatch(job_id)
        if self.commitments is not None:
            for uid in self.commitments.flag_timed_out(self.commitment_timeout_s):
                log.warning("storage commitment %s: no report after %.0f s", uid, self.commitment_timeout_s)
        return job_ids

    def _run(self) -> None:
        while not self._stop.wait(self.poll_s):
            try:
                self.tick()
            except Exception:
                log.exception("study assembler tick failed; retrying")

    def start(self) -> None:
        self.recover()
        self._thread = threading.Thread(target=self._run, name="study-assembler", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
