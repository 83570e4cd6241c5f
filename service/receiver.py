"""The SCP process's composition root: the receiving side, wired from the settings.

The counterpart of :class:`service.pipeline.WorkerContext`. It builds, once, what the
process that receives studies runs:

* the DICOM listener (:class:`service.scp.StorageSCP`), with the Storage Commitment report
  handlers (:mod:`service.commitment_reports`);
* one :class:`service.scheduler.Scheduler` for the periodic work, each task reading its
  work from the database so it carries on after a restart:

  - ``main`` lane: study completion (:class:`service.assemble.StudyAssembler`), automatic
    retries and stuck-job recovery (:class:`service.recovery.JobRecovery`), Storage
    Commitment requests without a report flagged ``timed_out``;
  - ``commitment-follow-up`` lane (network I/O): re-send and re-request what a PACS did
    not commit (:class:`service.deliver.followup.CommitmentFollowUp`);
  - ``retention`` lane (disk I/O): the retention sweep (:mod:`service.retention`);

* the metrics endpoint with the database-derived gauges and the readiness checks.

``strokeseg scp`` runs one; ``strokeseg serve`` runs one next to its worker.
"""

from __future__ import annotations

import functools
import logging

from service.assemble import StudyAssembler
from service.commitment_reports import report_handlers
from service.config import Settings
from service.db import Database, JobStore
from service.db.commitment import CommitmentStore
from service.deliver.followup import CommitmentFollowUp
from service.handoff import Dispatch, HandOff
from service.intake import signature_of
from service.metrics import serve_metrics
from service.recovery import JobRecovery, record_unrecorded_instances
from service.retention import remove_orphans, sweep
from service.scheduler import Scheduler
from service.scp import StorageSCP
from service.storage import Spool

log = logging.getLogger(__name__)

#: How often the main lane looks for complete studies and due retries (seconds).
ASSEMBLE_EVERY_S = 0.5
#: How often due automatic retries and Storage Commitment time-outs are looked for: their
#: delays are seconds to minutes, and each look is a query in the process that answers
#: C-STOREs (measured: the scheduler's queries took ~4 % of the SCP's time while receiving).
HOUSEKEEPING_EVERY_S = 2.0
#: How often stuck jobs (expired leases, messages no worker took) are looked for.
RECOVERY_EVERY_S = 5.0
#: How often the commitment follow-up looks for work.
FOLLOW_UP_EVERY_S = 1.0


class Receiver:
    """SCP + scheduler (+ metrics) in this process; :meth:`start` and :meth:`stop` them."""

    def __init__(
        self, settings: Settings, dispatch: Dispatch, *, stale_job_after_s: float | None = None
    ) -> None:
        self.settings = settings
        self.db = Database(settings.database_url, lock_timeout_s=settings.database_lock_timeout_s)
        self.store = JobStore(self.db)
        # The C-STORE path's own engine: on SQLite its commits do not wait for the disk,
        # because the spool can rebuild its rows (record_unrecorded_instances, at start).
        self.intake_db = Database(settings.database_url, migrate=False, durable_commits=False,
                                  lock_timeout_s=settings.database_lock_timeout_s)
        self.intake_store = JobStore(self.intake_db)
        self.spool = Spool(settings.spool_dir)
        self.commitments = CommitmentStore(self.db)
        self.scp = _storage_scp(settings, self.intake_store, self.spool, self.commitments)
        hand_off = HandOff(self.store, dispatch)
        self.assembler = StudyAssembler(
            self.store,
            hand_off,
            completion_timeout_s=settings.study.completion_timeout_s,
            incomplete_extra_wait_s=settings.study.incomplete_extra_wait_s,
            early_completion_grace_s=(
                settings.study.early_completion_grace_s if settings.study.early_completion else None
            ),
            still_arriving=(
                functools.partial(self.scp.receiving.studies, settings.study.open_association_hold_s)
                if settings.study.open_association_hold_s > 0 else None
            ),
        )
        self.recovery = JobRecovery(
            self.store,
            hand_off,
            stale_job_after_s=(
                settings.study.stale_job_after_s if stale_job_after_s is None else stale_job_after_s
            ),
            lost_dispatch_after_s=settings.worker.lost_dispatch_after_s,
        )
        self.scheduler = self._schedule()
        self._serve_metrics()

    def _schedule(self) -> Scheduler:
        settings = self.settings
        scheduler = Scheduler()
        scheduler.every("study completion", ASSEMBLE_EVERY_S, self.assembler.tick)
        scheduler.every("automatic retries", HOUSEKEEPING_EVERY_S, self.recovery.queue_due_retries)
        scheduler.every("stuck-job recovery", RECOVERY_EVERY_S, self.recovery.recover_stuck)
        scheduler.every("storage commitment time-outs", HOUSEKEEPING_EVERY_S, self._flag_commitment_time_outs)
        follow_up = CommitmentFollowUp(
            self.commitments,
            self.store,
            settings.destinations,
            calling_ae_title=settings.scp.ae_title,
            max_attempts=settings.delivery.commitment_max_attempts,
            retry_initial_s=settings.delivery.retry_initial_s,
            retry_max_interval_s=settings.delivery.retry_max_interval_s,
            evt_handlers=report_handlers(self.commitments),
        )
        scheduler.every("storage commitment follow-up", FOLLOW_UP_EVERY_S, follow_up.tick,
                        lane="commitment-follow-up", first_after_s=FOLLOW_UP_EVERY_S)
        if settings.retention.sweep_every_s > 0:
            scheduler.every("retention sweep", settings.retention.sweep_every_s, self._sweep,
                            lane="retention")
        return scheduler

    def _flag_commitment_time_outs(self) -> None:
        timeout_s = self.settings.delivery.commitment_timeout_s
        for uid in self.commitments.flag_timed_out(timeout_s):
            log.warning("storage commitment %s: no report after %.0f s", uid, timeout_s)

    def _sweep(self) -> None:
        sweep(self.store, self.commitments, self.spool, self.settings.retention)
        remove_orphans(self.store, self.spool)

    def _serve_metrics(self) -> None:
        settings = self.settings
        if settings.metrics.scp_port:
            from prometheus_client import REGISTRY

            from service.observe import ServiceStateCollector

            REGISTRY.register(ServiceStateCollector(
                self.store, self.spool, missing_result_after_s=settings.metrics.missing_result_after_s))
        from service.health import process_checks, readiness

        serve_metrics(settings.metrics.scp_port, addr=settings.metrics.host,
                      ready=readiness(process_checks(settings, self.db)))

    def start(self) -> None:
        """Record what the spool holds and the database lost, listen, hand over what a previous
        run left queued, then run the periodic work."""
        record_unrecorded_instances(self.intake_store, self.spool, signature_of)
        self.scp.start()
        self.recovery.at_start()
        self.scheduler.start()

    def stop(self) -> None:
        self.scp.stop()
        self.scheduler.stop()
        self.intake_db.dispose()
        self.db.dispose()


def _storage_scp(
    settings: Settings, store: JobStore, spool: Spool, commitments: CommitmentStore
) -> StorageSCP:
    scp = settings.scp
    return StorageSCP(
        ae_title=scp.ae_title,
        host=scp.host,
        port=scp.port,
        spool=spool,
        store=store,
        allowed_calling_aets=scp.allowed_calling_aets,
        max_associations=scp.max_associations,
        max_pdu_size=scp.max_pdu_size,
        commitments=commitments,
        describe=signature_of,
        min_free_bytes=int(scp.min_free_mb * 2**20),
        allowed_networks=scp.allowed_networks,
        tls=scp.tls,
    )
