"""Storage Commitment states and the values the commitment store hands out.

No database and no network here: the states of a transaction, of each instance in it and
of a job's results at a destination, the peer's Failure Reason codes in operator words, and
the frozen summaries :class:`service.db.commitment.CommitmentStore` returns. The tables are
in :mod:`service.db.models`.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from datetime import datetime
from typing import Protocol


class CommitmentState(enum.StrEnum):
    """Life cycle of one Storage Commitment transaction.

    requested -> committed | partially_failed | failed   (the peer's report)
    requested -> failed                                  (N-ACTION refused or not sent)
    requested -> timed_out                               (no report in time)
    timed_out -> committed | partially_failed | failed   (a late report)
    """

    REQUESTED = "requested"
    COMMITTED = "committed"
    PARTIALLY_FAILED = "partially_failed"
    FAILED = "failed"
    TIMED_OUT = "timed_out"

    @property
    def is_reported(self) -> bool:
        """True once the outcome is known (a report came, or the request was refused)."""
        return self in (
            CommitmentState.COMMITTED,
            CommitmentState.PARTIALLY_FAILED,
            CommitmentState.FAILED,
        )


class FollowUp(enum.StrEnum):
    """What was done about a transaction that did not commit everything.

    ``none`` (the empty string) until the follow-up policy has looked at it;
    each transaction is followed up at most once, so attempts form a chain
    (``retry_of``) and are bounded by the chain's length.
    """

    NONE = ""
    #: A newer transaction (attempt + 1) re-requests its uncommitted instances.
    REREQUESTED = "re-requested"
    #: Final: attempts used up, or its instances cannot be re-sent (reason in follow_up_detail).
    GAVE_UP = "gave_up"
    #: A later request for the same instances (e.g. ``strokeseg retry``) made it moot.
    SUPERSEDED = "superseded"


class InstanceCommitState(enum.StrEnum):
    """Per-instance state inside one transaction."""

    PENDING = "pending"
    COMMITTED = "committed"
    FAILED = "failed"


#: Failure Reason (0008,1197) values of PS3.4 Annex J.3.2.1.3.1 / C.4.2.1.
FAILURE_REASONS: dict[int, str] = {
    0x0110: "processing failure",
    0x0112: "no such object instance",
    0x0119: "class/instance conflict",
    0x0122: "referenced SOP class not supported",
    0x0131: "duplicate transaction UID",
    0x0213: "resource limitation",
}


def failure_reason_text(code: int | None) -> str:
    """Operator words for a Failure Reason code (``None``: the peer gave none)."""
    if code is None:
        return "no failure reason given"
    return f"0x{code:04X} {FAILURE_REASONS.get(code, 'unknown failure reason')}"


class SOPInstanceRef(Protocol):
    """Anything naming an instance: ``ResultObject``, ``deliver.commitment.SOPReference``.

    A ``path`` attribute, when present, is stored so a re-send after a restart
    knows which file to send.
    """

    @property
    def sop_class_uid(self) -> str: ...

    @property
    def sop_instance_uid(self) -> str: ...


@dataclass(frozen=True, slots=True)
class InstanceCommitment:
    sop_class_uid: str
    sop_instance_uid: str
    path: str
    state: InstanceCommitState
    failure_reason: int | None

    @property
    def failure_reason_text(self) -> str:
        return failure_reason_text(self.failure_reason) if self.state is InstanceCommitState.FAILED else ""


@dataclass(frozen=True, slots=True)
class CommitmentSummary:
    transaction_uid: str
    job_id: int | None
    destination: str
    destination_ae_title: str
    calling_ae_title: str
    state: CommitmentState
    requested_at: datetime
    reported_at: datetime | None
    action_status: int | None
    reported_by: str
    detail: str
    instances: tuple[InstanceCommitment, ...]
    attempt: int = 1
    retry_of: str | None = None
    follow_up: FollowUp = FollowUp.NONE
    follow_up_at: datetime | None = None
    follow_up_detail: str = ""

    @property
    def failure_summary(self) -> str:
        """Why this transaction did not commit everything, in operator words ('' if it did)."""
        if self.state is CommitmentState.TIMED_OUT:
            return self.detail or "no N-EVENT-REPORT"
        failed = [i for i in self.instances if i.state is InstanceCommitState.FAILED]
        if not failed:
            return ""
        if self.reported_at is None:  # the N-ACTION was refused or could not be sent
            return self.detail or "commitment request not accepted"
        reasons = sorted({i.failure_reason_text for i in failed})
        return f"{len(failed)} of {len(self.instances)} instance(s) failed: " + ", ".join(reasons)

    @property
    def report_latency_s(self) -> float | None:
        """Seconds from recording the request to the report (None before a report)."""
        if self.reported_at is None:
            return None
        return (self.reported_at - self.requested_at).total_seconds()


@dataclass(frozen=True, slots=True)
class ReportOutcome:
    """What applying one N-EVENT-REPORT did."""

    transaction_uid: str
    state: CommitmentState
    committed: int
    failed: int
    #: Instances the report named that the transaction did not reference.
    unmatched: int
    destination: str = ""
    #: The study's last received image, when this report is the one that made the
    #: transaction ``committed`` (the end of the clinical "committed" latency); else None.
    newly_committed_study_received_at: datetime | None = None


@dataclass(frozen=True, slots=True)
class UncommittedInstance:
    """An instance whose most recent commitment request at a destination did not commit.

    ``failure_reason`` is the peer's code when it answered; ``transaction_state``
    tells a retry policy whether the peer said no (``failed``,
    ``partially_failed``: re-send, then re-request) or never answered
    (``timed_out``: re-request may be enough).
    """

    transaction_uid: str
    transaction_state: CommitmentState
    job_id: int | None
    destination: str
    sop_class_uid: str
    sop_instance_uid: str
    path: str
    state: InstanceCommitState
    failure_reason: int | None


#: Transaction states a follow-up acts on (the peer said no, or never answered).
FOLLOW_UP_STATES = (
    CommitmentState.FAILED,
    CommitmentState.PARTIALLY_FAILED,
    CommitmentState.TIMED_OUT,
)


class DestinationState(enum.StrEnum):
    """Storage commitment of one job's results at one destination, for operators."""

    COMMITTED = "committed"
    #: Requested, no report yet (or a re-request is due / under way).
    PENDING = "pending"
    #: Final: some instance was not committed and no more attempts will be made.
    FAILED = "failed"


@dataclass(frozen=True, slots=True)
class DestinationCommitment:
    """Where a job's results stand at one destination (latest request per instance)."""

    job_id: int
    destination: str
    instances: int
    committed: int
    failed: int
    pending: int
    #: Highest attempt number so far (1 = no re-request yet).
    attempts: int
    state: DestinationState
    #: Why it is not (yet) committed; '' when committed.
    reason: str
