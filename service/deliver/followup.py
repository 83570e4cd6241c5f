"""Deliver: re-send and re-request what a PACS did not commit (Storage Commitment follow-up).

A Storage Commitment report can list instances in its Failed SOP Sequence
(e.g. 0x0112 "no such object instance": the PACS lost or purged what it
acknowledged), a request can be refused, and a report can never come.  For
each such transaction :class:`CommitmentFollowUp` does exactly one of:

* **re-request** -- while attempts are left: record a new transaction
  (``attempt + 1``, ``retry_of`` the old one) for the instances
  :meth:`~service.db.commitment.CommitmentStore.instances_to_resend` lists,
  C-STORE them again from the spool (same files, same SOP Instance UIDs, so
  a PACS that still has them simply overwrites or ignores them) and send a
  new N-ACTION with a new Transaction UID.  Its report is recorded by the
  SCP's handler like any other and may lead to the next attempt;
* **give up** -- once ``max_attempts`` requests were made for those
  instances, or they cannot be re-sent (destination no longer configured for
  commitment, result files gone): close the transaction ``gave_up`` with the
  reason, which ``strokeseg jobs`` shows as ``failed``;
* **supersede** -- when a later request (e.g. ``strokeseg retry``) already
  covers the instances: nothing to do.

Attempts after the first wait ``delivery.retry_initial_s`` after the failed
attempt's report, doubling up to ``delivery.retry_max_interval_s`` (the
same policy as a failed delivery).  Everything is read from and written to
the database before anything goes on the wire, and each transaction is
followed up once (a compare-and-set), so the loop can stop at any point
and a restarted process carries on: a re-request whose N-ACTION never went
out is flagged ``timed_out`` by the assembler's sweep and followed up again.

Nothing here raises for network trouble; :meth:`CommitmentFollowUp.tick`
runs on the study assembler's follow-up thread (see
:class:`service.assemble.StudyAssembler`).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from pydicom import dcmread
from pynetdicom.events import EventHandlerType

from service import metrics
from service.config import Destination
from service.db import JobStore
from service.db.commitment import (
    CommitmentStore,
    CommitmentSummary,
    FollowUp,
    UncommittedInstance,
)
from service.deliver.commitment import (
    CommitmentRequest,
    SOPReference,
    new_transaction_uid,
    request_commitment,
)
from service.deliver.record import record_store_attempt
from service.deliver.storescu import store_objects
from service.domain import ResultObject
from service.errors import DeliveryError

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class FollowUpResult:
    """What one follow-up did with one transaction."""

    transaction_uid: str
    outcome: FollowUp
    #: The re-request's Transaction UID (``outcome`` re-requested), else None.
    new_transaction_uid: str | None
    detail: str


@dataclass
class CommitmentFollowUp:
    """Re-send and re-request uncommitted instances, a bounded number of times.

    ``destinations`` are the configured ones (looked up by name, since a
    transaction records the destination's name); ``evt_handlers`` should be
    :func:`service.commitment_reports.report_handlers` so a peer reporting on the
    requesting association is recorded too.
    """

    commitments: CommitmentStore
    jobs: JobStore
    destinations: Sequence[Destination]
    calling_ae_title: str
    max_attempts: int = 3
    retry_initial_s: float = 30.0
    retry_max_interval_s: float = 600.0
    evt_handlers: Sequence[EventHandlerType] = field(default_factory=list)
    wait_for_report_s: float = 5.0
    timeout_s: float = 30.0

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise ValueError("max_attempts must be at least 1")

    def tick(self) -> list[FollowUpResult]:
        """Follow up every transaction that is due now; returns what was done."""
        results = []
        for txn in self.commitments.due_follow_ups(
            max_attempts=self.max_attempts,
            retry_initial_s=self.retry_initial_s,
            retry_max_interval_s=self.retry_max_interval_s,
        ):
            try:
                result = self.follow_up(txn)
            except Exception:  # one bad transaction must not stop the others
                log.exception(
                    "storage commitment %s: follow-up failed; will try again",
                    txn.transaction_uid, extra={"transaction_uid": txn.transaction_uid},
                )
                continue
            if result is not None:
                results.append(result)
        return results

    def follow_up(self, txn: CommitmentSummary) -> FollowUpResult | None:
        """Re-request, give up on or supersede ``txn``; None if another process got there first."""
        uid = txn.transaction_uid
        why = txn.failure_summary or txn.state.value
        destination = next(
            (d for d in self.destinations if d.name == txn.destination and d.storage_commitment),
            None,
        )
        if destination is None:
            return self._close(
                txn, FollowUp.GAVE_UP,
                f"gave up after attempt {txn.attempt}: {why}; destination {txn.destination!r} "
                "is no longer configured for storage commitment",
            )
        todo = self.commitments.instances_to_resend(
            destination=txn.destination, job_id=txn.job_id, transaction_uid=uid
        )
        if not todo:
            return self._close(
                txn, FollowUp.SUPERSEDED, "a later request covers its uncommitted instances"
            )
        if txn.attempt >= self.max_attempts:
            return self._close(txn, FollowUp.GAVE_UP, f"gave up after {txn.attempt} attempt(s): {why}")
        missing = [t for t in todo if not t.path or not Path(t.path).is_file()]
        if missing:
            return self._close(
                txn, FollowUp.GAVE_UP,
                f"gave up after attempt {txn.attempt}: {why}; cannot re-send "
                f"{len(missing)} instance(s): result file missing from the spool",
            )

        attempt = txn.attempt + 1
        request = CommitmentRequest(
            new_transaction_uid(),
            tuple(SOPReference(t.sop_class_uid, t.sop_instance_uid, t.path) for t in todo),
        )
        detail = (
            f"{why}; re-sending {len(todo)} instance(s) and re-requesting as "
            f"{request.transaction_uid} (attempt {attempt} of {self.max_attempts})"
        )
        if not self.commitments.begin_follow_up(
            uid, request.transaction_uid, request.references, detail=detail
        ):
            return None
        if txn.job_id is not None:
            self.jobs.note(txn.job_id, f"storage commitment at {txn.destination}: {detail}")
        log.warning(
            "storage commitment %s at %s: %s", uid, txn.destination, detail,
            extra={"job_id": txn.job_id, "transaction_uid": uid},
        )
        self._resend_and_request(txn, destination, request, todo, attempt)
        return FollowUpResult(uid, FollowUp.REREQUESTED, request.transaction_uid, detail)

    # -- steps ----------------------------------------------------------------------------
    def _close(self, txn: CommitmentSummary, outcome: FollowUp, detail: str) -> FollowUpResult | None:
        if not self.commitments.close_follow_up(txn.transaction_uid, outcome, detail):
            return None
        extra = {"job_id": txn.job_id, "transaction_uid": txn.transaction_uid}
        if outcome is FollowUp.GAVE_UP:
            log.error("storage commitment at %s failed: %s", txn.destination, detail, extra=extra)
            if txn.job_id is not None:
                self.jobs.note(txn.job_id, f"storage commitment at {txn.destination} failed: {detail}")
        else:
            log.info("storage commitment %s: %s", txn.transaction_uid, detail, extra=extra)
        return FollowUpResult(txn.transaction_uid, outcome, None, detail)

    def _objects(self, job_id: int | None, todo: Sequence[UncommittedInstance]) -> list[ResultObject]:
        """The files to re-send, as result objects (kind from the job's deliveries)."""
        kinds = {d.sop_instance_uid: d.kind for d in self.jobs.deliveries(job_id)} if job_id else {}
        objects = []
        for t in todo:
            path = Path(t.path)
            ds = dcmread(path, stop_before_pixels=True)
            if str(ds.SOPInstanceUID) != t.sop_instance_uid:
                raise DeliveryError(f"{path} no longer holds SOP instance {t.sop_instance_uid}")
            objects.append(ResultObject.of(kinds.get(t.sop_instance_uid, "DICOM"), path, ds))
        return objects

    def _resend_and_request(
        self,
        txn: CommitmentSummary,
        destination: Destination,
        request: CommitmentRequest,
        todo: Sequence[UncommittedInstance],
        attempt: int,
    ) -> None:
        new_uid = request.transaction_uid
        label = f"re-sent for storage commitment attempt {attempt} of {self.max_attempts}"
        try:
            objects = self._objects(txn.job_id, todo)
        except Exception as exc:  # a result file unreadable or replaced: this attempt fails
            self.commitments.record_action(
                new_uid, status_code=None, accepted=False,
                detail=f"re-send failed: cannot read a result file: {type(exc).__name__}: {exc}",
            )
            return
        try:
            outcomes = store_objects(
                destination, objects, calling_ae_title=self.calling_ae_title, timeout_s=self.timeout_s
            )
        except DeliveryError as exc:
            self.commitments.record_action(
                new_uid, status_code=None, accepted=False, detail=f"re-send failed: {exc}"
            )
            record_store_attempt(
                self.jobs, txn.job_id, destination.name, objects, None, error=str(exc), label=label
            )
            return
        record_store_attempt(self.jobs, txn.job_id, destination.name, objects, outcomes, label=label)
        not_stored = [o for o in outcomes if not o.stored]
        if not_stored:
            self.commitments.record_action(
                new_uid, status_code=None, accepted=False,
                detail="re-send failed: " + ", ".join(
                    f"{o.obj.kind} {o.obj.sop_instance_uid} {o.detail}" for o in not_stored
                ),
            )
            return
        action = request_commitment(
            destination,
            request,
            calling_ae_title=self.calling_ae_title,
            timeout_s=self.timeout_s,
            evt_handlers=self.evt_handlers,
            wait_for_report_s=self.wait_for_report_s,
            report_arrived=lambda: self.commitments.is_reported(new_uid),
        )
        self.commitments.record_action(
            new_uid, status_code=action.status_code, accepted=action.accepted, detail=action.detail
        )
        metrics.COMMITMENT_REQUESTS.labels(
            destination=destination.name, accepted=str(action.accepted).lower()
        ).inc()
