"""Receive Storage Commitment reports (N-EVENT-REPORT, Push Model, SCU side of PS3.4 Annex J).

After we ask a PACS to commit (see :mod:`service.deliver.commitment`), it
answers with an N-EVENT-REPORT: Event Type 1 (all committed) or 2 (some
failed), with the Transaction UID, a Referenced SOP Sequence of committed
instances and a Failed SOP Sequence with a Failure Reason each.  Most PACS
(Orthanc among them) send it on a NEW association to our SCP and propose the
context with the SCP role for themselves (SCP/SCU Role Selection), which an
AE only accepts when the context was added with both roles allowed; that is
what :func:`add_storage_commitment` does.

Like every handler of ours, :class:`CommitmentReportHandler` never raises: it
records the report and answers a DIMSE status.  An unknown transaction or a
malformed report is answered with a failure status so the peer's operator
sees it; a database problem with Processing Failure so the peer may retry.

A shared leaf, not part of :mod:`service.scp`: the SCP binds these handlers to its
listener, and the worker binds them to the associations it opens to a PACS (a peer may
report on the same association), so neither side imports the other.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE, evt
from pynetdicom.events import EventHandlerType
from pynetdicom.sop_class import StorageCommitmentPushModel  # type: ignore[attr-defined]

from service import metrics
from service.db.commitment import CommitmentStore
from service.db.models import utcnow

log = logging.getLogger(__name__)

# N-EVENT-REPORT response statuses (PS3.7 10.1.1.1.8, Annex C).
SUCCESS = 0x0000
PROCESSING_FAILURE = 0x0110
NO_SUCH_EVENT_TYPE = 0x0113
INVALID_ARGUMENT_VALUE = 0x0115
NO_SUCH_SOP_CLASS = 0x0118

#: Event Type IDs of the Storage Commitment Push Model (PS3.4 J.3.3).
COMMITTED_ALL = 1
COMMITTED_WITH_FAILURES = 2


def _peer_ae_title(event: Any) -> str:
    """The AE that sent the report: the requestor on a new association, the
    acceptor when it came back on our own (requesting) association."""
    try:
        assoc = event.assoc
        peer = assoc.acceptor if assoc.is_requestor else assoc.requestor
        return str(peer.ae_title).strip()
    except Exception:
        return ""


def _references(ds: Dataset, keyword: str) -> list[Dataset]:
    return list(ds.get(keyword) or [])


@dataclass
class CommitmentReportHandler:
    """EVT_N_EVENT_REPORT handler: apply a commitment report to the database.

    Returns ``(status, None)`` as pynetdicom expects; never raises.
    """

    store: CommitmentStore

    def __call__(self, event: Any) -> tuple[int, Dataset | None]:
        peer = _peer_ae_title(event)
        try:
            return self._handle(event, peer), None
        except Exception:  # never let a report abort the association
            log.exception("storage commitment report from %s could not be recorded", peer)
            return PROCESSING_FAILURE, None

    def _handle(self, event: Any, peer: str) -> int:
        sop_class = str(getattr(event.request, "AffectedSOPClassUID", "") or "")
        if sop_class != StorageCommitmentPushModel:
            log.warning("N-EVENT-REPORT from %s for SOP class %s refused", peer, sop_class)
            return NO_SUCH_SOP_CLASS
        event_type = event.event_type
        if event_type not in (COMMITTED_ALL, COMMITTED_WITH_FAILURES):
            log.warning("storage commitment report from %s: unknown event type %s", peer, event_type)
            return NO_SUCH_EVENT_TYPE
        try:
            info: Dataset = event.event_information
            transaction_uid = str(info.get("TransactionUID", "") or "").strip()
            committed = [
                (str(item.ReferencedSOPClassUID), str(item.ReferencedSOPInstanceUID))
                for item in _references(info, "ReferencedSOPSequence")
            ]
            failed = [
                (
                    str(item.ReferencedSOPClassUID),
                    str(item.ReferencedSOPInstanceUID),
                    int(item.FailureReason) if item.get("FailureReason") is not None else None,
                )
                for item in _references(info, "FailedSOPSequence")
            ]
        except Exception as exc:  # undecodable Event Information or items without UIDs
            log.warning(
                "storage commitment report from %s is malformed (%s)", peer, type(exc).__name__
            )
            return INVALID_ARGUMENT_VALUE
        if not transaction_uid:
            log.warning("storage commitment report from %s has no Transaction UID", peer)
            return INVALID_ARGUMENT_VALUE
        extra = {"transaction_uid": transaction_uid}
        outcome = self.store.apply_report(
            transaction_uid, committed=committed, failed=failed, reported_by=peer
        )
        if outcome is None:
            log.warning(
                "storage commitment report from %s for unknown transaction %s refused",
                peer, transaction_uid, extra=extra,
            )
            return INVALID_ARGUMENT_VALUE
        if outcome.newly_committed_study_received_at is not None:
            metrics.COMMITTED_LATENCY_SECONDS.labels(destination=outcome.destination).observe(
                max(0.0, (utcnow() - outcome.newly_committed_study_received_at).total_seconds())
            )
        log_fn = log.info if outcome.failed == 0 else log.warning
        log_fn(
            "storage commitment %s reported by %s: %s (%d committed, %d failed%s)",
            transaction_uid, peer, outcome.state.value, outcome.committed, outcome.failed,
            f", {outcome.unmatched} not ours" if outcome.unmatched else "",
            extra=extra,
        )
        return SUCCESS


def report_handlers(store: CommitmentStore) -> list[EventHandlerType]:
    """The handler tuple(s) to bind: on our server, and on associations we request
    (so a report sent back on the same association is recorded too)."""
    return [(evt.EVT_N_EVENT_REPORT, CommitmentReportHandler(store))]


def add_storage_commitment(ae: AE, store: CommitmentStore) -> list[EventHandlerType]:
    """Let ``ae`` accept commitment reports; returns the handlers to start the server with.

    The context is added with ``scu_role=True, scp_role=True`` so the SCP role
    a PACS proposes for itself on a new association is accepted; without it
    pynetdicom rejects the role selection and the report never arrives.
    """
    ae.add_supported_context(
        StorageCommitmentPushModel,
        [ExplicitVRLittleEndian, ImplicitVRLittleEndian],
        scu_role=True,
        scp_role=True,
    )
    return report_handlers(store)
