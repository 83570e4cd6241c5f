"""Bookkeeping of one C-STORE attempt: a delivery row per object and the Prometheus count.

The worker's first delivery and the Storage Commitment follow-up's re-sends
record attempts the same way, so ``strokeseg jobs`` and the dashboards see
both alike.
"""

from __future__ import annotations

from collections.abc import Sequence

from service import metrics
from service.db import JobStore
from service.deliver.storescu import StoreOutcome
from service.domain import ResultObject


def record_store_attempt(
    jobs: JobStore,
    job_id: int | None,
    destination: str,
    objects: Sequence[ResultObject],
    outcomes: Sequence[StoreOutcome] | None,
    *,
    error: str = "",
    label: str = "",
) -> None:
    """Record the attempt to send ``objects`` to ``destination``.

    ``outcomes`` are the per-object C-STORE results; ``None`` means the
    association itself failed (``error`` says why) and every object failed.
    ``label`` prefixes each stored detail (e.g. which re-send this was).
    Without a ``job_id`` only the metric is counted.
    """
    rows = (
        [(obj, None, error, False) for obj in objects]
        if outcomes is None
        else [(o.obj, o.status_code, o.detail, o.stored) for o in outcomes]
    )
    for obj, status_code, detail, stored in rows:
        status = "stored" if stored else "failed"
        metrics.DELIVERIES.labels(destination=destination, status=status).inc()
        if job_id is not None:
            jobs.record_delivery(
                job_id,
                destination=destination,
                kind=obj.kind,
                sop_class_uid=obj.sop_class_uid,
                sop_instance_uid=obj.sop_instance_uid,
                path=str(obj.path),
                status=status,
                status_code=status_code,
                detail=f"{label}: {detail}" if label else detail,
            )
