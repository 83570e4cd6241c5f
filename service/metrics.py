"""Every Prometheus metric of strokeseg, in one place.  No PHI in labels."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram, start_http_server

STUDY_BUCKETS = (1, 2, 5, 10, 20, 30, 60, 120, 300, 600, 1800)

INSTANCES_RECEIVED = Counter(
    "strokeseg_instances_received_total", "Instances stored by the SCP", ["sop_class"]
)
INSTANCE_BYTES = Counter("strokeseg_instances_received_bytes_total", "Bytes of stored instances")
STORE_FAILURES = Counter(
    "strokeseg_store_failures_total", "C-STORE requests answered with a failure", ["status"]
)
ASSOCIATIONS_REJECTED = Counter(
    "strokeseg_associations_rejected_total", "Associations rejected", ["reason"]
)
JOBS_QUEUED = Counter("strokeseg_jobs_queued_total", "Jobs queued for inference")
JOBS_FINISHED = Counter("strokeseg_jobs_finished_total", "Jobs finished", ["state"])
REFUSALS = Counter("strokeseg_refusals_total", "Studies refused", ["reason"])
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
QUEUE_DEPTH = Gauge("strokeseg_jobs_waiting", "Jobs received or queued, not yet running")


def serve_metrics(port: int, addr: str = "0.0.0.0") -> None:
    """Expose /metrics on ``port`` (no-op when 0)."""
    if port:
        start_http_server(port, addr=addr)
