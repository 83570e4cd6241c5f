"""Hand a queued job to the broker and record that it was handed over.

Used by the assembler (a study became complete) and by job recovery (a job to send again).
The database decides, not the broker: a job is ``queued`` in the database before it is
handed over, a failed hand-off leaves it there for recovery to try again, and the recorded
hand-off time lets recovery tell a message no worker took from one just sent.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from service.db import JobStore

log = logging.getLogger(__name__)

#: Sends a job id to the workers (Celery's send_task, or a list's append in tests).
Dispatch = Callable[[int], None]


class HandOff:
    """``hand_off(job_id)``: dispatch, then record the hand-off; never raises."""

    def __init__(self, store: JobStore, dispatch: Dispatch) -> None:
        self.store = store
        self.dispatch = dispatch

    def __call__(self, job_id: int) -> None:
        extra = {"job_id": job_id}
        try:
            self.dispatch(job_id)
        except Exception:
            # The job stays 'queued' in the DB; recovery hands it over again.
            log.exception("could not hand job %d to the broker", job_id, extra=extra)
            return
        try:
            self.store.mark_dispatched(job_id)
        except Exception:
            log.exception("could not record the hand-off of job %d", job_id, extra=extra)
