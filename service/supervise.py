"""Supervision of the worker process that ``strokeseg serve`` runs beside its SCP.

The embedded deployment is one command, so that command must keep its parts alive: a worker
that dies (killed, out of memory, a crash in a native library) is started again with backoff
while the SCP keeps receiving, and the worker never outlives ``serve`` (on Linux the kernel
sends it SIGTERM when its parent dies, even by kill -9), so workers cannot pile up across
restarts. Jobs the dead worker held are queued again by the SCP's lease recovery.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import signal
import subprocess
import threading
import time
from collections.abc import Sequence

from service import metrics
from service.backoff import backoff_delay_s

log = logging.getLogger(__name__)

_PR_SET_PDEATHSIG = 1
#: A worker that ran this long before dying counts as healthy: the backoff starts over.
STABLE_AFTER_S = 60.0


def _die_with_parent() -> None:
    """In the child, before exec: SIGTERM when the parent exits (Linux prctl; no-op elsewhere)."""
    name = ctypes.util.find_library("c")
    if name is None:
        return
    try:
        libc = ctypes.CDLL(name, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    except (OSError, AttributeError):
        return


class WorkerSupervisor:
    """Runs ``command`` as a child process and restarts it with backoff until :meth:`stop`."""

    def __init__(self, command: Sequence[str], *, initial_backoff_s: float = 1.0,
                 max_backoff_s: float = 60.0) -> None:
        self.command = list(command)
        self.initial_backoff_s = initial_backoff_s
        self.max_backoff_s = max_backoff_s
        self.restarts = 0
        self.process: subprocess.Popen[bytes] | None = None
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._watch, name="worker-supervisor", daemon=True)

    def _spawn(self) -> subprocess.Popen[bytes]:
        parent = os.getpid()

        def before_exec() -> None:
            _die_with_parent()
            if os.getppid() != parent:  # the parent died before prctl took effect
                os._exit(1)

        return subprocess.Popen(self.command, env=os.environ.copy(), preexec_fn=before_exec)  # noqa: PLW1509

    def start(self) -> None:
        with self._lock:
            self.process = self._spawn()
        self._thread.start()

    def _watch(self) -> None:
        failures = 0
        while not self._stop.is_set():
            with self._lock:
                process = self.process
            assert process is not None
            started = time.monotonic()
            code = process.wait()
            if self._stop.is_set():
                return
            failures = 1 if time.monotonic() - started >= STABLE_AFTER_S else failures + 1
            delay = backoff_delay_s(failures, initial_s=self.initial_backoff_s, max_interval_s=self.max_backoff_s)
            log.error("worker process exited with code %s; starting it again in %.0f s "
                      "(the SCP keeps receiving)", code, delay)
            metrics.WORKER_RESTARTS.inc()
            if self._stop.wait(delay):
                return
            with self._lock:
                if self._stop.is_set():
                    return
                self.process = self._spawn()
                self.restarts += 1

    def stop(self, timeout_s: float = 60.0) -> None:
        """Stop supervising and end the worker (SIGTERM, then SIGKILL after ``timeout_s``)."""
        self._stop.set()
        with self._lock:
            process = self.process
        if process is not None and process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
