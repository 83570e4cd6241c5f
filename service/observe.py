"""What ops watch, read from the database at scrape time: queue depth, oldest pending job,
studies without a result, Storage Commitment states, spool free space.

Counters in the processes say what happened; these gauges say where things stand now, and
they must be right after any restart, so they are computed from the database (the source of
truth) when Prometheus scrapes the SCP process, not kept in memory. No label carries a UID,
a name or any other identifier: only states and destination names.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from datetime import datetime, timedelta

from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from sqlalchemy import func, select

from service.db import JobStore
from service.db.models import CommitmentTransaction, Job, utcnow
from service.domain import JobState
from service.storage import Spool

log = logging.getLogger(__name__)

#: Job states that still owe a result (``failed`` counts while an automatic retry is scheduled).
PENDING_STATES = (JobState.RECEIVED, JobState.QUEUED, JobState.RUNNING)


class ServiceStateCollector(Collector):
    """Prometheus collector over the job and commitment tables (registered by the SCP process)."""

    def __init__(self, store: JobStore, spool: Spool, *, missing_result_after_s: float) -> None:
        self.store = store
        self.spool = spool
        self.missing_result_after_s = missing_result_after_s

    def collect(self) -> Iterator[Metric]:
        try:
            yield from self._collect()
        except Exception as exc:  # a scrape must never take the SCP down; the gap itself alerts
            log.warning("metrics: could not read the service state (%s)", type(exc).__name__)

    def _collect(self) -> Iterator[Metric]:
        now = utcnow()
        with self.store.db.session() as s:
            by_state = dict(s.execute(select(Job.state, func.count()).group_by(Job.state)).all())
            retrying = s.scalar(select(func.count()).where(
                Job.state == JobState.FAILED.value, Job.next_attempt_at.is_not(None)))
            oldest = {
                state: s.scalar(select(func.min(column)).where(Job.state == state.value))
                for state, column in ((JobState.QUEUED, Job.queued_at), (JobState.RUNNING, Job.started_at))
            }
            missing = s.scalar(select(func.count()).where(
                Job.created_at < _ago(now, self.missing_result_after_s),
                (Job.state.in_([st.value for st in PENDING_STATES]))
                | ((Job.state == JobState.FAILED.value) & Job.next_attempt_at.is_not(None)),
            ))
            commitments = s.execute(
                select(CommitmentTransaction.destination, CommitmentTransaction.state, func.count())
                .group_by(CommitmentTransaction.destination, CommitmentTransaction.state)
            ).all()

        jobs = GaugeMetricFamily("strokeseg_jobs", "Jobs by state now (failed = failed for good; "
                                 "retrying = failed with an automatic retry scheduled)", labels=["state"])
        for state in JobState:
            count = int(by_state.get(state.value, 0))
            if state is JobState.FAILED:
                jobs.add_metric(["retrying"], int(retrying or 0))
                count -= int(retrying or 0)
            jobs.add_metric([state.value], count)
        yield jobs

        age = GaugeMetricFamily("strokeseg_oldest_job_age_seconds",
                                "Age of the oldest job in this state (0 when there is none)", labels=["state"])
        for state, since in oldest.items():
            age.add_metric([state.value], max(0.0, (now - since).total_seconds()) if since else 0.0)
        yield age

        yield GaugeMetricFamily(
            "strokeseg_missing_results",
            f"Studies received more than {self.missing_result_after_s:.0f} s ago that have no final "
            "state yet (the missing-result watchdog)",
            value=int(missing or 0),
        )

        committed = GaugeMetricFamily("strokeseg_commitment_transactions",
                                      "Storage Commitment transactions by destination and state",
                                      labels=["destination", "state"])
        for destination, txn_state, count in commitments:
            committed.add_metric([str(destination), str(txn_state)], int(count))
        yield committed

        yield GaugeMetricFamily("strokeseg_spool_free_bytes",
                                "Free bytes on the spool's file system (scp.min_free_mb is the floor)",
                                value=self.spool.free_bytes())


def _ago(now: datetime, seconds: float) -> datetime:
    return now - timedelta(seconds=seconds)
