"""One scheduler for the SCP process's periodic work.

Study completion, job recovery, Storage Commitment time-outs and follow-up, and retention
all run "every N seconds, read the database, act". They are registered here by the SCP's
composition root (:mod:`service.receiver`) instead of each keeping a thread of its own.

Tasks run on *lanes*: one thread per lane, tasks of a lane in registration order when due.
Work that talks to the network or walks the disk (the commitment follow-up, the retention
sweep) gets a lane of its own, so a slow PACS or a large spool never delays the moment a
complete study is queued. A task that raises is logged and runs again at its next turn:
the database is the source of truth, so a missed turn loses nothing.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger(__name__)


@dataclass
class PeriodicTask:
    """``run`` every ``every_s`` seconds (the first time ``first_after_s`` after start)."""

    name: str
    every_s: float
    run: Callable[[], Any]
    first_after_s: float = 0.0
    next_due: float = field(default=0.0, init=False)


class Scheduler:
    """Runs :class:`PeriodicTask` s on named lanes until :meth:`stop`."""

    def __init__(self, *, tick_s: float = 0.1) -> None:
        self.tick_s = tick_s
        self._lanes: dict[str, list[PeriodicTask]] = {}
        self._threads: list[threading.Thread] = []
        self._stop = threading.Event()

    def every(
        self, name: str, every_s: float, run: Callable[[], Any], *,
        lane: str = "main", first_after_s: float = 0.0,
    ) -> PeriodicTask:
        """Register ``run`` on ``lane`` (before :meth:`start`)."""
        if self._threads:
            raise RuntimeError("register tasks before the scheduler starts")
        if every_s < 0:
            raise ValueError(f"{name}: every_s must be >= 0")
        task = PeriodicTask(name, every_s, run, first_after_s)
        self._lanes.setdefault(lane, []).append(task)
        return task

    @property
    def tasks(self) -> dict[str, list[str]]:
        """Task names per lane (for logs and tests)."""
        return {lane: [t.name for t in tasks] for lane, tasks in self._lanes.items()}

    def run_due(self, lane: str) -> None:
        """Run the tasks of ``lane`` that are due now (the lane thread's step; tests call it)."""
        for task in self._lanes.get(lane, []):
            now = time.monotonic()
            if now < task.next_due:
                continue
            task.next_due = now + task.every_s
            try:
                task.run()
            except Exception:
                log.exception("%s failed; trying again in %.1f s", task.name, task.every_s)

    def start(self) -> None:
        now = time.monotonic()
        for lane, tasks in self._lanes.items():
            for task in tasks:
                task.next_due = now + task.first_after_s
            thread = threading.Thread(target=self._run_lane, args=(lane,), name=f"scheduler-{lane}",
                                      daemon=True)
            self._threads.append(thread)
            thread.start()

    def _run_lane(self, lane: str) -> None:
        while not self._stop.is_set():
            self.run_due(lane)
            due = min(t.next_due for t in self._lanes[lane])
            self._stop.wait(max(0.0, min(self.tick_s, due - time.monotonic())) or 0.01)

    def stop(self, timeout_s: float = 15.0) -> None:
        """Stop every lane; a task in flight finishes (network tasks are bounded by their own
        time-outs), and what it did not get to is still in the database for the next start."""
        self._stop.set()
        deadline = time.monotonic() + timeout_s
        for thread in self._threads:
            thread.join(timeout=max(0.0, deadline - time.monotonic()))
        self._threads.clear()
