"""Every Prometheus metric of strokeseg, in one place.  No PHI in labels."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    multiprocess,
)

STUDY_BUCKETS = (1, 2, 5, 10, 20, 30, 60, 120, 300, 600, 1800)

INSTANCES_RECEIVED = Counter(
    "strokeseg_instances_received_total", "Instances stored by the SCP", ["sop_class"]
)
INSTANCE_BYTES = Counter("strokeseg_instances_received_bytes_total", "Bytes of stored instances")
STORE_FAILURES = Counter(
    "strokeseg_store_failures_total", "C-STORE requests answered with a failure", ["status"]
)
WORKER_RESTARTS = Counter(
    "strokeseg_worker_restarts_total", "Worker processes that `serve` had to start again"
)
RESULT_LATENCY_SECONDS = Histogram(
    "strokeseg_result_latency_seconds",
    "From the study's last received image to its results stored at a destination",
    ["destination"],
    buckets=(2, 5, 10, 20, 30, 60, 120, 300, 600, 1800, 3600),
)
COMMITTED_LATENCY_SECONDS = Histogram(
    "strokeseg_committed_latency_seconds",
    "From the study's last received image to the destination's Storage Commitment report "
    "that all its results are committed",
    ["destination"],
    buckets=(2, 5, 10, 20, 30, 60, 120, 300, 600, 1800, 3600),
)
ACTIVE_ASSOCIATIONS = Gauge(
    "strokeseg_active_associations",
    "DICOM associations open on the SCP now (scanners, PACS sending reports)",
    multiprocess_mode="livesum",
)
WORKER_HEARTBEAT = Gauge(
    "strokeseg_worker_heartbeat_timestamp_seconds",
    "Unix time of the worker's last heartbeat (every 15 s while it runs)",
    multiprocess_mode="max",
)
MODEL_INFO = Gauge(
    "strokeseg_model_info", "The models a worker serves (value 1)", ["name", "version", "provider"],
    multiprocess_mode="max",
)
ASSOCIATIONS_REJECTED = Counter(
    "strokeseg_associations_rejected_total", "Associations rejected", ["reason"]
)
JOBS_QUEUED = Counter(
    "strokeseg_jobs_queued_total", "Jobs queued for inference", ["trigger"]  # idle | content | retry
)
JOBS_FINISHED = Counter("strokeseg_jobs_finished_total", "Jobs finished", ["state"])
# Labelled by the refusal's class (a small, stable set), not its free-text reason,
# which may carry numbers and would create a new time series per study.
REFUSALS = Counter("strokeseg_refusals_total", "Studies refused", ["kind"])
JOB_SECONDS = Histogram(
    "strokeseg_job_seconds", "Wall time of one job in the worker", buckets=STUDY_BUCKETS
)
INFERENCE_SECONDS = Histogram(
    "strokeseg_inference_seconds", "Model inference time per study", ["model", "provider"],
    buckets=(0.1, 0.25, 0.5, 1, 2, 3, 5, 10, 30, 60),
)
DELIVERIES = Counter(
    "strokeseg_deliveries_total", "Result objects sent to destinations", ["destination", "status"]
)

COMMITMENT_REQUESTS = Counter(
    "strokeseg_commitment_requests_total",
    "Storage Commitment requests (N-ACTION) sent",
    ["destination", "accepted"],
)

#: Where a worker's time goes, per job: read (DICOM files), intake (classify, stack), preprocess,
#: inference (network and back to the native grid), assess (restriction guard, validity, findings),
#: sources (the headers SEG and SR reference), seg, sr, overlay, write (results to the spool),
#: deliver (C-STORE to every destination).
STAGES = ("read", "intake", "preprocess", "inference", "assess", "sources", "seg", "sr", "overlay",
          "write", "deliver")
STAGE_SECONDS = Histogram(
    "strokeseg_stage_seconds", "Worker time per pipeline stage of one job", ["stage"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
)
_stage_timings: ContextVar[dict[str, float] | None] = ContextVar("stage_timings", default=None)


@contextmanager
def stage(name: str) -> Iterator[None]:
    """Time one pipeline stage into ``strokeseg_stage_seconds{stage}`` (and :func:`collect_stages`)."""
    started = time.perf_counter()
    try:
        yield
    finally:
        elapsed = time.perf_counter() - started
        STAGE_SECONDS.labels(stage=name).observe(elapsed)
        timings = _stage_timings.get()
        if timings is not None:
            timings[name] = timings.get(name, 0.0) + elapsed


@contextmanager
def collect_stages() -> Iterator[dict[str, float]]:
    """The seconds each stage took inside the ``with`` block (for one job's log line)."""
    timings: dict[str, float] = {}
    token = _stage_timings.set(timings)
    try:
        yield timings
    finally:
        _stage_timings.reset(token)


Readiness = Callable[[], list[str]]


def serve_metrics(port: int, addr: str = "0.0.0.0", ready: Readiness | None = None) -> None:
    """Expose /metrics, /healthz (liveness) and /readyz (readiness) on ``port`` (no-op when 0).

    In a prefork worker the tasks run in child processes; with
    ``PROMETHEUS_MULTIPROC_DIR`` set (by ``strokeseg worker`` before anything
    imports this module) the parent serves the children's aggregate.
    ``/readyz`` answers 200 when ``ready()`` lists no problem, else 503 with the problems,
    one per line (no identifiers in them: they are read by probes and people).
    """
    if not port:
        return
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
    else:
        registry = REGISTRY

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 (http.server's name)
            path = self.path.split("?", 1)[0]
            if path == "/healthz":
                self._send(200, b"ok\n", "text/plain; charset=utf-8")
            elif path == "/readyz":
                try:
                    problems = ready() if ready is not None else []
                except Exception as exc:  # a check that crashes is a problem, not a dead server
                    problems = [f"readiness check failed: {type(exc).__name__}"]
                body = ("ready\n" if not problems else "\n".join(problems) + "\n").encode()
                self._send(503 if problems else 200, body, "text/plain; charset=utf-8")
            else:
                self._send(200, generate_latest(registry), CONTENT_TYPE_LATEST)

        def _send(self, code: int, body: bytes, content_type: str) -> None:
            self.send_response(code)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *_: object) -> None:  # probes every few seconds: not for the log
            return

    server = ThreadingHTTPServer((addr, port), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, name="metrics-http", daemon=True).start()


def mark_process_dead(pid: int) -> None:
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        multiprocess.mark_process_dead(pid)
