"""Deliver: ask a destination to commit to keeping what we stored (Storage Commitment Push Model, SCU).

PS3.4 Annex J: after C-STORE we send an N-ACTION (Action Type 1, "Request
Storage Commitment") to the well-known instance 1.2.840.10008.1.20.1.1 with a
Transaction UID and the (SOP class, SOP instance) pairs.  The N-ACTION
response only says the request was accepted; the answer is an N-EVENT-REPORT
that the peer sends later, on this association if it is still open, or
(Orthanc, most PACS) on a new association to our SCP.

This module does only the sending, so that a deliver step can C-STORE and
request commitment on one association (:func:`send_commitment_request`) or
open a dedicated one (:func:`request_commitment`).  Reports are handled by
:mod:`service.commitment_reports`; the caller binds its handlers to the
association here (``evt_handlers``) so a report on the same association is
not lost, and records the transaction in the database *before* sending (a
report can race back on another association before our N-ACTION returns).

Nothing here raises on network trouble: every outcome comes back as an
:class:`ActionResult`, because the transaction is already on record and must
be closed either way; the retry policy (:mod:`service.deliver.followup`:
re-send and re-request, a bounded number of times) reads its state from the
database.
"""

from __future__ import annotations

import logging
import re
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from pydicom.dataset import Dataset
from pydicom.uid import UID, ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE, evt
from pynetdicom.association import Association
from pynetdicom.dimse_messages import N_EVENT_REPORT_RQ, N_EVENT_REPORT_RSP
from pynetdicom.events import EventHandlerType
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    StorageCommitmentPushModel,
    Verification,
)
from pynetdicom.status import code_to_category

from service.config import Destination
from service.domain import ResultObject
from service.errors import ConfigError
from service.tls import tls_args

log = logging.getLogger(__name__)

#: The well-known SOP Instance of the Storage Commitment Push Model SOP Class.
STORAGE_COMMITMENT_INSTANCE_UID = UID("1.2.840.10008.1.20.1.1")
#: Action Type ID of "Request Storage Commitment" (PS3.4 J.3.2).
REQUEST_STORAGE_COMMITMENT = 1
#: What we propose for the commitment context: the two every peer must accept.
COMMITMENT_TRANSFER_SYNTAXES = [ExplicitVRLittleEndian, ImplicitVRLittleEndian]


def new_transaction_uid() -> str:
    """A fresh Transaction UID (``2.25.<uuid4>``): every request, re-requests included,
    needs its own (PS3.4 J.3.2.1.1: the SCP may refuse a duplicate with 0x0131)."""
    return f"2.25.{uuid.uuid4().int}"


_UID_PATTERN = re.compile(r"^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))+$")


def _check_uid(what: str, value: str) -> None:
    if not isinstance(value, str) or len(value) > 64 or not _UID_PATTERN.match(value):
        raise ValueError(f"{what} is not a valid UID: {value!r}")


@dataclass(frozen=True, slots=True)
class SOPReference:
    """One instance to commit; ``path`` is kept so a re-send knows what to send."""

    sop_class_uid: str
    sop_instance_uid: str
    path: str = ""

    def __post_init__(self) -> None:
        _check_uid("SOP Class UID", self.sop_class_uid)
        _check_uid("SOP Instance UID", self.sop_instance_uid)


@dataclass(frozen=True, slots=True)
class CommitmentRequest:
    """A valid Request Storage Commitment: a Transaction UID and one or more instances."""

    transaction_uid: str
    references: tuple[SOPReference, ...]

    def __post_init__(self) -> None:
        _check_uid("Transaction UID", self.transaction_uid)
        if not self.references:
            raise ValueError("a storage commitment request needs at least one instance")
        uids = [r.sop_instance_uid for r in self.references]
        if len(set(uids)) != len(uids):
            raise ValueError("a storage commitment request lists an instance twice")

    @classmethod
    def for_objects(
        cls,
        objects: Iterable[ResultObject | SOPReference],
        *,
        transaction_uid: str | None = None,
    ) -> CommitmentRequest:
        """A request for result objects (or references read back from the database)."""
        refs = tuple(
            o if isinstance(o, SOPReference)
            else SOPReference(o.sop_class_uid, o.sop_instance_uid, str(o.path))
            for o in objects
        )
        return cls(transaction_uid or new_transaction_uid(), refs)

    def action_information(self) -> Dataset:
        """The N-ACTION Action Information: TransactionUID + ReferencedSOPSequence."""
        ds = Dataset()
        ds.TransactionUID = self.transaction_uid
        items = []
        for ref in self.references:
            item = Dataset()
            item.ReferencedSOPClassUID = ref.sop_class_uid
            item.ReferencedSOPInstanceUID = ref.sop_instance_uid
            items.append(item)
        ds.ReferencedSOPSequence = items
        return ds


@dataclass(frozen=True, slots=True)
class ActionResult:
    """The N-ACTION outcome: the peer accepted the request, refused it, or never heard it."""

    transaction_uid: str
    status_code: int | None
    detail: str
    #: Wall-clock seconds the N-ACTION took (request to response).
    action_s: float = 0.0
    #: True when a report for this transaction was seen while the association was open.
    report_seen: bool = False

    @property
    def accepted(self) -> bool:
        return self.status_code is not None and code_to_category(self.status_code) in (
            "Success",
            "Warning",
        )


def add_commitment_requested_context(ae: AE) -> None:
    """Propose the Storage Commitment Push Model context (we are its SCU).

    Call it on the AE that C-STOREs, so one association carries both.
    """
    ae.add_requested_context(StorageCommitmentPushModel, COMMITMENT_TRANSFER_SYNTAXES)


def _has_commitment_context(assoc: Association) -> bool:
    return any(
        cx.abstract_syntax == StorageCommitmentPushModel and cx.as_scu
        for cx in assoc.accepted_contexts
    )


def send_commitment_request(
    assoc: Association,
    request: CommitmentRequest,
    *,
    wait_for_report_s: float = 0.0,
    report_arrived: Callable[[], bool] | None = None,
    poll_s: float = 0.05,
) -> ActionResult:
    """Send the N-ACTION on an established association (e.g. right after the C-STOREs).

    With ``wait_for_report_s`` > 0 the association is kept open until a report
    arrives on it or the time is up, so a peer that answers on the same
    association can.  Give ``report_arrived`` (e.g. ``lambda:
    commitments.is_reported(uid)``) so that a report on another association
    (Orthanc) ends the wait early too.  The report itself is handled by the
    EVT_N_EVENT_REPORT handler bound to the association, not here.  Does not
    release ``assoc``.
    """
    uid = request.transaction_uid
    if not assoc.is_established:
        return ActionResult(uid, None, "association is not established")
    if not _has_commitment_context(assoc):
        return ActionResult(
            uid, None, "destination did not accept the Storage Commitment Push Model context"
        )
    started = time.perf_counter()
    try:
        status, _reply = assoc.send_n_action(
            request.action_information(),
            REQUEST_STORAGE_COMMITMENT,
            StorageCommitmentPushModel,
            STORAGE_COMMITMENT_INSTANCE_UID,
        )
    except Exception as exc:  # network error mid-association; the caller records it
        return ActionResult(
            uid, None, f"N-ACTION failed: {type(exc).__name__}: {exc}",
            time.perf_counter() - started,
        )
    action_s = time.perf_counter() - started
    code = int(status.Status) if "Status" in status else None
    if code is None:
        return ActionResult(uid, None, "no N-ACTION response (timeout or abort)", action_s)
    result = ActionResult(
        uid, code, "commitment requested" if code == 0 else f"N-ACTION status 0x{code:04X}",
        action_s,
    )
    if not result.accepted or wait_for_report_s <= 0:
        return result
    seen = _wait_for_report(assoc, wait_for_report_s, report_arrived, poll_s)
    return ActionResult(uid, code, result.detail, action_s, report_seen=seen)


def _wait_for_report(
    assoc: Association,
    wait_s: float,
    report_arrived: Callable[[], bool] | None,
    poll_s: float,
) -> bool:
    """Keep ``assoc`` open until a report is in (here or elsewhere) or ``wait_s`` passes.

    A report on this association is handled by the reactor thread, which
    answers it *after* the handler has written the database; releasing as soon
    as the database says "reported" would cut that answer off (the peer then
    sees no response).  So a report seen here ends the wait only once our
    N-EVENT-REPORT response has been handed to the network layer, which sends
    it before the A-RELEASE.
    """
    received, answered = threading.Event(), threading.Event()

    def on_received(event: Any) -> None:
        if isinstance(event.message, N_EVENT_REPORT_RQ):
            received.set()

    def on_sent(event: Any) -> None:
        if isinstance(event.message, N_EVENT_REPORT_RSP):
            answered.set()

    assoc.bind(evt.EVT_DIMSE_RECV, on_received)
    assoc.bind(evt.EVT_DIMSE_SENT, on_sent)
    try:
        deadline = time.monotonic() + wait_s
        while assoc.is_established and time.monotonic() < deadline:
            if answered.is_set():
                return True
            if not received.is_set() and report_arrived is not None and report_arrived():
                return True  # reported on another association (Orthanc and most PACS)
            time.sleep(poll_s)
        return answered.is_set() or (report_arrived is not None and report_arrived())
    finally:
        assoc.unbind(evt.EVT_DIMSE_RECV, on_received)
        assoc.unbind(evt.EVT_DIMSE_SENT, on_sent)


def request_commitment(
    destination: Destination,
    request: CommitmentRequest,
    *,
    calling_ae_title: str,
    timeout_s: float = 30.0,
    evt_handlers: Sequence[EventHandlerType] = (),
    wait_for_report_s: float = 0.0,
    report_arrived: Callable[[], bool] | None = None,
) -> ActionResult:
    """Open an association to ``destination`` only for the N-ACTION, then release it.

    ``evt_handlers`` should be :func:`service.commitment_reports.report_handlers`
    so a report sent on this association is recorded; see
    :func:`send_commitment_request` for the wait.  Never raises for network
    problems: an unreachable destination is an :class:`ActionResult` with no
    status.
    """
    where = f"{destination.name} ({destination.ae_title}@{destination.host}:{destination.port})"
    ae = AE(ae_title=calling_ae_title)
    ae.acse_timeout = timeout_s
    ae.dimse_timeout = timeout_s
    ae.network_timeout = timeout_s
    add_commitment_requested_context(ae)
    # Verification too: every SCP accepts it, so a peer without Storage
    # Commitment still completes the association and we can say so, instead of
    # seeing an association aborted for lack of any accepted context.
    ae.add_requested_context(Verification, COMMITMENT_TRANSFER_SYNTAXES)
    try:
        secure = tls_args(destination)
    except ConfigError as exc:
        return ActionResult(request.transaction_uid, None, f"destination {where}: TLS not usable: {exc}")
    assoc = ae.associate(
        destination.host,
        destination.port,
        ae_title=destination.ae_title,
        evt_handlers=list(evt_handlers),
        tls_args=secure,
    )
    if not assoc.is_established:
        reason = "association rejected" if assoc.is_rejected else "unreachable or aborted"
        result = ActionResult(request.transaction_uid, None, f"destination {where}: {reason}")
    else:
        try:
            result = send_commitment_request(
                assoc, request, wait_for_report_s=wait_for_report_s, report_arrived=report_arrived
            )
        finally:
            if assoc.is_established:
                assoc.release()
    log.info(
        "storage commitment %s -> %s: %s (%d instance(s), N-ACTION %.3f s)",
        request.transaction_uid, where, result.detail, len(request.references), result.action_s,
        extra={"transaction_uid": request.transaction_uid},
    )
    return result
