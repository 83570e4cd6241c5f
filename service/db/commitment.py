"""Storage Commitment bookkeeping: one row per transaction, one per referenced instance.

A C-STORE Success only says the PACS received an object; Storage Commitment
(PS3.4 Annex J, Push Model) is the PACS saying it has taken over
responsibility for keeping it.  The answer (N-EVENT-REPORT) comes back
asynchronously, usually on a *new* association to our SCP and possibly in
another process than the worker that asked, so the database is where the
request and its answer meet:

* the worker records a transaction (state ``requested``) *before* it sends
  the N-ACTION, so a report that races back finds it;
* the SCP's N-EVENT-REPORT handler marks each instance committed or failed
  (with the peer's FailureReason) and the transaction ``committed``,
  ``partially_failed`` or ``failed``;
* a periodic sweep (:meth:`CommitmentStore.flag_timed_out`) marks transactions
  that never got a report ``timed_out``; a late report still counts;
* a transaction that ended ``failed``, ``partially_failed`` or ``timed_out``
  is *followed up* exactly once (:class:`FollowUp`, a compare-and-set on the
  row): re-requested as a new transaction with ``attempt + 1`` and
  ``retry_of`` pointing back, holding the instances
  :meth:`CommitmentStore.instances_to_resend` lists for it; or, when the
  attempts are used up or nothing can be re-sent, closed ``gave_up`` with the
  reason (or ``superseded`` when a later request already covers its
  instances).  :mod:`service.deliver.followup` is the policy that does this.

Everything survives a restart because nothing about a transaction lives only
in memory.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Sequence
from datetime import timedelta

from sqlalchemy import (
    func,
    select,
    update,
)

from service.backoff import backoff_delay_s
from service.db.commitment_types import (
    FAILURE_REASONS,
    FOLLOW_UP_STATES,
    CommitmentState,
    CommitmentSummary,
    DestinationCommitment,
    DestinationState,
    FollowUp,
    InstanceCommitment,
    InstanceCommitState,
    ReportOutcome,
    SOPInstanceRef,
    UncommittedInstance,
    failure_reason_text,
)
from service.db.models import CommitmentInstance, CommitmentTransaction, Job, Study, utcnow
from service.db.session import Database

log = logging.getLogger(__name__)

__all__ = [
    "CommitmentInstance",
    "CommitmentStore",
    "CommitmentTransaction",
    "CommitmentState",
    "FollowUp",
    "InstanceCommitState",
    "FAILURE_REASONS",
    "failure_reason_text",
    "SOPInstanceRef",
    "InstanceCommitment",
    "CommitmentSummary",
    "ReportOutcome",
    "UncommittedInstance",
    "FOLLOW_UP_STATES",
    "DestinationState",
    "DestinationCommitment",
]


def _summary(txn: CommitmentTransaction) -> CommitmentSummary:
    return CommitmentSummary(
        transaction_uid=txn.transaction_uid,
        job_id=txn.job_id,
        destination=txn.destination,
        destination_ae_title=txn.destination_ae_title,
        calling_ae_title=txn.calling_ae_title,
        state=CommitmentState(txn.state),
        requested_at=txn.requested_at,
        reported_at=txn.reported_at,
        action_status=txn.action_status,
        reported_by=txn.reported_by,
        detail=txn.detail,
        attempt=txn.attempt,
        retry_of=txn.retry_of,
        follow_up=FollowUp(txn.follow_up),
        follow_up_at=txn.follow_up_at,
        follow_up_detail=txn.follow_up_detail,
        instances=tuple(
            InstanceCommitment(
                sop_class_uid=i.sop_class_uid,
                sop_instance_uid=i.sop_instance_uid,
                path=i.path,
                state=InstanceCommitState(i.state),
                failure_reason=i.failure_reason,
            )
            for i in txn.instances
        ),
    )


def _open_state(txns: Sequence[CommitmentTransaction]) -> tuple[DestinationState, str]:
    """State and reason of a destination from the transactions holding its uncommitted instances."""
    summaries = [_summary(t) for t in sorted(txns, key=lambda t: t.requested_at)]
    final = [t for t in summaries if t.follow_up is FollowUp.GAVE_UP and t.state in FOLLOW_UP_STATES]
    if final:
        return DestinationState.FAILED, "; ".join(t.follow_up_detail for t in final)
    reasons = []
    for t in summaries:
        if t.state is CommitmentState.REQUESTED:
            reasons.append(f"waiting for the report to attempt {t.attempt}")
        elif t.state in FOLLOW_UP_STATES:
            reasons.append(f"attempt {t.attempt}: {t.failure_summary}; re-request due")
    return DestinationState.PENDING, "; ".join(reasons)


def _outcome_state(committed: int, failed: int) -> CommitmentState:
    if failed == 0:
        return CommitmentState.COMMITTED
    if committed == 0:
        return CommitmentState.FAILED
    return CommitmentState.PARTIALLY_FAILED


def _new_transaction(
    transaction_uid: str,
    instances: Sequence[SOPInstanceRef],
    *,
    job_id: int | None,
    destination: str,
    destination_ae_title: str,
    calling_ae_title: str,
    attempt: int = 1,
    retry_of: str | None = None,
) -> CommitmentTransaction:
    """A ``requested`` transaction row with a ``pending`` row per instance."""
    now = utcnow()
    txn = CommitmentTransaction(
        transaction_uid=transaction_uid,
        job_id=job_id,
        destination=destination,
        destination_ae_title=destination_ae_title,
        calling_ae_title=calling_ae_title,
        state=CommitmentState.REQUESTED.value,
        requested_at=now,
        reported_at=None,
        action_status=None,
        reported_by="",
        detail="",
        attempt=attempt,
        retry_of=retry_of,
        follow_up=FollowUp.NONE.value,
        follow_up_at=None,
        follow_up_detail="",
    )
    for ref in instances:
        txn.instances.append(
            CommitmentInstance(
                sop_class_uid=str(ref.sop_class_uid),
                sop_instance_uid=str(ref.sop_instance_uid),
                path=str(getattr(ref, "path", "") or ""),
                state=InstanceCommitState.PENDING.value,
                failure_reason=None,
                updated_at=now,
            )
        )
    return txn


# -- the store -----------------------------------------------------------------------


class CommitmentStore:
    """The one writer of commitment transactions (worker side and SCP side)."""

    def __init__(self, db: Database) -> None:
        self.db = db

    # -- request (worker) ---------------------------------------------------------------
    def record_request(
        self,
        transaction_uid: str,
        instances: Sequence[SOPInstanceRef],
        *,
        destination: str,
        destination_ae_title: str = "",
        calling_ae_title: str = "",
        job_id: int | None = None,
    ) -> None:
        """Record a transaction as ``requested``; call this *before* sending the N-ACTION.

        The peer may answer on another association within milliseconds of our
        N-ACTION; if the row were written after the N-ACTION response, that
        report would be refused as an unknown transaction.
        """
        if not instances:
            raise ValueError("a commitment transaction needs at least one instance")
        with self.db.session() as s:
            s.add(
                _new_transaction(
                    transaction_uid,
                    instances,
                    job_id=job_id,
                    destination=destination,
                    destination_ae_title=destination_ae_title,
                    calling_ae_title=calling_ae_title,
                )
            )
        log.info(
            "storage commitment %s requested from %s for %d instance(s)",
            transaction_uid, destination, len(instances),
            extra={"job_id": job_id, "transaction_uid": transaction_uid},
        )

    def record_action(
        self, transaction_uid: str, *, status_code: int | None, accepted: bool, detail: str = ""
    ) -> None:
        """Store the N-ACTION answer; a refused or unsent request fails the transaction.

        Only a still-``requested`` transaction is failed: a report that arrived
        before we got here (it can, on another association) is the better truth.
        """
        now = utcnow()
        with self.db.session() as s:
            s.execute(
                update(CommitmentTransaction)
                .where(CommitmentTransaction.transaction_uid == transaction_uid)
                .values(action_status=status_code)
            )
            if accepted:
                return
            result = s.execute(
                update(CommitmentTransaction)
                .where(
                    CommitmentTransaction.transaction_uid == transaction_uid,
                    CommitmentTransaction.state == CommitmentState.REQUESTED.value,
                )
                .values(state=CommitmentState.FAILED.value, detail=detail)
            )
            if result.rowcount == 1:  # type: ignore[attr-defined]
                s.execute(
                    update(CommitmentInstance)
                    .where(
                        CommitmentInstance.transaction_uid == transaction_uid,
                        CommitmentInstance.state == InstanceCommitState.PENDING.value,
                    )
                    .values(state=InstanceCommitState.FAILED.value, updated_at=now)
                )
        log.warning(
            "storage commitment %s not requested: %s", transaction_uid, detail,
            extra={"transaction_uid": transaction_uid},
        )

    # -- report (SCP) ---------------------------------------------------------------------
    def apply_report(
        self,
        transaction_uid: str,
        *,
        committed: Iterable[tuple[str, str]],
        failed: Iterable[tuple[str, str, int | None]],
        reported_by: str = "",
    ) -> ReportOutcome | None:
        """Apply an N-EVENT-REPORT; None when the transaction is unknown.

        ``committed`` holds (SOP class, SOP instance) pairs of the Referenced
        SOP Sequence, ``failed`` (class, instance, FailureReason) of the Failed
        SOP Sequence.  Instances are matched by SOP Instance UID.  A report is
        the peer's final word on the transaction, so an instance it does not
        mention is counted as failed (no reason).  A second report for the
        same transaction (a peer retrying) simply re-applies.
        """
        now = utcnow()
        committed_map = {inst: cls for cls, inst in committed}
        failed_map = {inst: (cls, reason) for cls, inst, reason in failed}
        with self.db.session() as s:
            txn = s.get(CommitmentTransaction, transaction_uid, with_for_update=True)
            if txn is None:
                return None
            known = {i.sop_instance_uid for i in txn.instances}
            n_committed = n_failed = 0
            for inst in txn.instances:
                if inst.sop_instance_uid in failed_map:
                    cls, reason = failed_map[inst.sop_instance_uid]
                    inst.state = InstanceCommitState.FAILED.value
                    inst.failure_reason = reason
                    n_failed += 1
                elif inst.sop_instance_uid in committed_map:
                    cls = committed_map[inst.sop_instance_uid]
                    inst.state = InstanceCommitState.COMMITTED.value
                    inst.failure_reason = None
                    n_committed += 1
                else:
                    cls = inst.sop_class_uid
                    inst.state = InstanceCommitState.FAILED.value
                    inst.failure_reason = None
                    n_failed += 1
                if cls and cls != inst.sop_class_uid:
                    log.warning(
                        "storage commitment %s: report names SOP class %s for an instance "
                        "we sent as %s", transaction_uid, cls, inst.sop_class_uid,
                        extra={"transaction_uid": transaction_uid},
                    )
                inst.updated_at = now
            unmatched = len((committed_map.keys() | failed_map.keys()) - known)
            state = _outcome_state(n_committed, n_failed)
            previous = txn.state
            txn.state = state.value
            txn.reported_at = now
            txn.reported_by = reported_by[:16]
            txn.detail = (
                f"{n_committed} committed, {n_failed} failed"
                + (f", {unmatched} unknown instance(s) in the report" if unmatched else "")
                + (" (late report after time-out)" if previous == CommitmentState.TIMED_OUT.value else "")
            )
            received_at = None
            if state is CommitmentState.COMMITTED and previous != CommitmentState.COMMITTED.value:
                received_at = s.scalar(
                    select(Study.last_received_at)
                    .join(Job, Job.study_instance_uid == Study.study_instance_uid)
                    .where(Job.id == txn.job_id)
                )
            destination = txn.destination
        return ReportOutcome(
            transaction_uid, state, n_committed, n_failed, unmatched, destination, received_at
        )

    # -- sweep ----------------------------------------------------------------------------
    def flag_timed_out(self, older_than_s: float) -> list[str]:
        """Mark ``requested`` transactions older than ``older_than_s`` as ``timed_out``.

        Returns their UIDs.  Run it periodically (e.g. with the study-completion
        loop); the instances stay ``pending`` so a late report can still land.
        """
        cutoff = utcnow() - timedelta(seconds=older_than_s)
        with self.db.session() as s:
            uids = list(
                s.scalars(
                    select(CommitmentTransaction.transaction_uid).where(
                        CommitmentTransaction.state == CommitmentState.REQUESTED.value,
                        CommitmentTransaction.requested_at <= cutoff,
                    )
                )
            )
            if uids:
                s.execute(
                    update(CommitmentTransaction)
                    .where(
                        CommitmentTransaction.transaction_uid.in_(uids),
                        CommitmentTransaction.state == CommitmentState.REQUESTED.value,
                    )
                    .values(
                        state=CommitmentState.TIMED_OUT.value,
                        detail=f"no N-EVENT-REPORT within {older_than_s:g} s",
                    )
                )
        for uid in uids:
            log.warning(
                "storage commitment %s: no report within %g s", uid, older_than_s,
                extra={"transaction_uid": uid},
            )
        return uids

    # -- follow-up (re-send and re-request) -------------------------------------------------
    def due_follow_ups(
        self,
        *,
        max_attempts: int,
        retry_initial_s: float,
        retry_max_interval_s: float,
        limit: int = 20,
    ) -> list[CommitmentSummary]:
        """Transactions that ended without committing everything and need a follow-up now.

        Those still with attempts left are due ``backoff_delay_s(attempt)`` (service.backoff)
        after their report (or their request, when no report came); those whose
        attempts are used up are due at once, to be closed ``gave_up``.  Oldest
        first.
        """
        now = utcnow()
        due: list[CommitmentSummary] = []
        with self.db.session() as s:
            candidates = s.scalars(
                select(CommitmentTransaction)
                .where(
                    CommitmentTransaction.state.in_([st.value for st in FOLLOW_UP_STATES]),
                    CommitmentTransaction.follow_up == FollowUp.NONE.value,
                )
                .order_by(CommitmentTransaction.requested_at)
            )
            for txn in candidates:
                if txn.attempt < max_attempts:
                    ended = txn.reported_at or txn.requested_at
                    wait = backoff_delay_s(
                        txn.attempt, initial_s=retry_initial_s, max_interval_s=retry_max_interval_s
                    )
                    if now < ended + timedelta(seconds=wait):
                        continue
                due.append(_summary(txn))
                if len(due) >= limit:
                    break
        return due

    def begin_follow_up(
        self,
        transaction_uid: str,
        new_transaction_uid: str,
        instances: Sequence[SOPInstanceRef],
        *,
        detail: str,
    ) -> bool:
        """Mark ``transaction_uid`` re-requested and record its successor, atomically.

        The successor (``attempt + 1``, ``retry_of`` = ``transaction_uid``, same
        job, destination and AE titles) is ``requested`` before anything is
        re-sent, like any request.  A compare-and-set on ``follow_up``: False
        (and nothing written) when the transaction is unknown or already
        followed up, so two processes never re-request the same attempt.
        """
        if not instances:
            raise ValueError("a commitment transaction needs at least one instance")
        with self.db.session() as s:
            txn = s.get(CommitmentTransaction, transaction_uid, with_for_update=True)
            if txn is None or txn.follow_up != FollowUp.NONE.value:
                return False
            result = s.execute(
                update(CommitmentTransaction)
                .where(
                    CommitmentTransaction.transaction_uid == transaction_uid,
                    CommitmentTransaction.follow_up == FollowUp.NONE.value,
                )
                .values(
                    follow_up=FollowUp.REREQUESTED.value,
                    follow_up_at=utcnow(),
                    follow_up_detail=detail,
                )
            )
            if result.rowcount != 1:  # type: ignore[attr-defined]
                return False
            s.add(
                _new_transaction(
                    new_transaction_uid,
                    instances,
                    job_id=txn.job_id,
                    destination=txn.destination,
                    destination_ae_title=txn.destination_ae_title,
                    calling_ae_title=txn.calling_ae_title,
                    attempt=txn.attempt + 1,
                    retry_of=transaction_uid,
                )
            )
        log.info(
            "storage commitment %s re-requested as %s: %s", transaction_uid, new_transaction_uid,
            detail, extra={"transaction_uid": transaction_uid},
        )
        return True

    def close_follow_up(self, transaction_uid: str, outcome: FollowUp, detail: str) -> bool:
        """Record a follow-up that re-requests nothing (``gave_up``, ``superseded``); CAS as above."""
        outcome = FollowUp(outcome)
        if outcome in (FollowUp.NONE, FollowUp.REREQUESTED):
            raise ValueError(f"close_follow_up records gave_up or superseded, not {outcome.value!r}")
        with self.db.session() as s:
            result = s.execute(
                update(CommitmentTransaction)
                .where(
                    CommitmentTransaction.transaction_uid == transaction_uid,
                    CommitmentTransaction.follow_up == FollowUp.NONE.value,
                )
                .values(follow_up=outcome.value, follow_up_at=utcnow(), follow_up_detail=detail)
            )
            return bool(result.rowcount == 1)  # type: ignore[attr-defined]

    def destination_states(self, job_ids: Iterable[int]) -> dict[int, list[DestinationCommitment]]:
        """Per job and destination: committed / pending / failed, from each instance's latest request.

        A failure is final (``failed``) only once its transaction was closed
        ``gave_up``; until then a re-request is due or under way (``pending``).
        A late report that commits a given-up transaction makes it ``committed``.
        """
        ids = sorted(set(job_ids))
        if not ids:
            return {}
        with self.db.session() as s:
            rows = s.execute(
                select(CommitmentInstance, CommitmentTransaction)
                .join(CommitmentTransaction)
                .where(CommitmentTransaction.job_id.in_(ids))
                .order_by(CommitmentInstance.id)
            ).all()
            latest: dict[tuple[int, str, str], tuple[CommitmentInstance, CommitmentTransaction]] = {}
            attempts: dict[tuple[int, str], int] = {}
            for inst, txn in rows:
                assert txn.job_id is not None
                key = (txn.job_id, txn.destination)
                attempts[key] = max(attempts.get(key, 0), txn.attempt)
                latest[(txn.job_id, txn.destination, inst.sop_instance_uid)] = (inst, txn)
            groups: dict[tuple[int, str], list[tuple[CommitmentInstance, CommitmentTransaction]]] = {}
            for (job_id, destination, _uid), pair in latest.items():
                groups.setdefault((job_id, destination), []).append(pair)
            out: dict[int, list[DestinationCommitment]] = {}
            for (job_id, destination), pairs in sorted(groups.items()):
                states = [InstanceCommitState(inst.state) for inst, _ in pairs]
                open_txns = {
                    txn.transaction_uid: txn
                    for inst, txn in pairs
                    if inst.state != InstanceCommitState.COMMITTED.value
                }
                committed = states.count(InstanceCommitState.COMMITTED)
                if not open_txns:
                    state, reason = DestinationState.COMMITTED, ""
                else:
                    state, reason = _open_state(list(open_txns.values()))
                out.setdefault(job_id, []).append(
                    DestinationCommitment(
                        job_id=job_id,
                        destination=destination,
                        instances=len(pairs),
                        committed=committed,
                        failed=states.count(InstanceCommitState.FAILED),
                        pending=states.count(InstanceCommitState.PENDING),
                        attempts=attempts[(job_id, destination)],
                        state=state,
                        reason=reason,
                    )
                )
        return out

    # -- read -------------------------------------------------------------------------------
    def transaction(self, transaction_uid: str) -> CommitmentSummary | None:
        with self.db.session() as s:
            txn = s.get(CommitmentTransaction, transaction_uid)
            return None if txn is None else _summary(txn)

    def transactions(
        self, *, job_id: int | None = None, destination: str | None = None, limit: int = 50
    ) -> list[CommitmentSummary]:
        """Newest first."""
        with self.db.session() as s:
            stmt = (
                select(CommitmentTransaction)
                .order_by(CommitmentTransaction.requested_at.desc())
                .limit(limit)
            )
            if job_id is not None:
                stmt = stmt.where(CommitmentTransaction.job_id == job_id)
            if destination is not None:
                stmt = stmt.where(CommitmentTransaction.destination == destination)
            return [_summary(t) for t in s.scalars(stmt)]

    def is_reported(self, transaction_uid: str) -> bool:
        """True once the transaction's outcome is known (cheap; for polling)."""
        with self.db.session() as s:
            state = s.scalar(
                select(CommitmentTransaction.state).where(
                    CommitmentTransaction.transaction_uid == transaction_uid
                )
            )
        return state is not None and CommitmentState(state).is_reported

    def wait_for_report(
        self, transaction_uid: str, timeout_s: float, *, poll_s: float = 0.1
    ) -> CommitmentSummary | None:
        """Poll until the transaction is reported or ``timeout_s`` passes; its summary.

        Polls the database rather than waiting on an in-process signal because
        the report is usually received by the SCP process, not the worker.
        """
        deadline = time.monotonic() + timeout_s
        while not self.is_reported(transaction_uid) and time.monotonic() < deadline:
            time.sleep(poll_s)
        return self.transaction(transaction_uid)

    def instances_to_resend(
        self,
        *,
        destination: str | None = None,
        job_id: int | None = None,
        transaction_uid: str | None = None,
    ) -> list[UncommittedInstance]:
        """Instances whose latest request at a destination failed or timed out.

        "Latest" is per (destination, SOP Instance UID): an instance that failed
        once and was committed by a later transaction is not listed.  Instances
        of transactions still waiting for a report are not listed either.
        ``transaction_uid`` narrows the list to that transaction's instances
        (those it is still the latest request for).
        """
        with self.db.session() as s:
            latest = (
                select(func.max(CommitmentInstance.id))
                .join(CommitmentTransaction)
                .group_by(CommitmentTransaction.destination, CommitmentInstance.sop_instance_uid)
            )
            stmt = (
                select(CommitmentInstance, CommitmentTransaction)
                .join(CommitmentTransaction)
                .where(CommitmentInstance.id.in_(latest))
                .where(
                    (CommitmentInstance.state == InstanceCommitState.FAILED.value)
                    | (
                        (CommitmentInstance.state == InstanceCommitState.PENDING.value)
                        & (CommitmentTransaction.state == CommitmentState.TIMED_OUT.value)
                    )
                )
                .order_by(CommitmentInstance.id)
            )
            if destination is not None:
                stmt = stmt.where(CommitmentTransaction.destination == destination)
            if job_id is not None:
                stmt = stmt.where(CommitmentTransaction.job_id == job_id)
            if transaction_uid is not None:
                stmt = stmt.where(CommitmentTransaction.transaction_uid == transaction_uid)
            return [
                UncommittedInstance(
                    transaction_uid=txn.transaction_uid,
                    transaction_state=CommitmentState(txn.state),
                    job_id=txn.job_id,
                    destination=txn.destination,
                    sop_class_uid=inst.sop_class_uid,
                    sop_instance_uid=inst.sop_instance_uid,
                    path=inst.path,
                    state=InstanceCommitState(inst.state),
                    failure_reason=inst.failure_reason,
                )
                for inst, txn in s.execute(stmt)
            ]
