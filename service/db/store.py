"""JobStore: the one writer of instances, studies, job states and deliveries.

Every state change goes through :meth:`JobStore.transition`, which also appends
a :class:`JobEvent`, so each job's history (with timestamps and reasons) is
complete.  Claims are compare-and-set updates, so a job delivered twice by the
broker runs once.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import cast

from sqlalchemy import (
    ColumnElement,
    Connection,
    Table,
    bindparam,
    delete,
    func,
    insert,
    or_,
    select,
    update,
)
from sqlalchemy.exc import IntegrityError

from service.db.models import Delivery, Instance, Job, JobEvent, Study, utcnow
from service.db.received_sqlite import record_received_sqlite, timestamp_writer
from service.db.session import Database
from service.domain import ImageRole, InstanceSignature, JobState

log = logging.getLogger(__name__)

#: Seconds a worker's claim on a job lasts unless renewed (worker.lease_s in the config).
DEFAULT_LEASE_S = 60.0


@dataclass(frozen=True, slots=True)
class DestinationDelivery:
    """C-STORE state of one job's results at one destination (latest attempt per object)."""

    job_id: int
    destination: str
    objects: int
    stored: int
    #: Detail of the newest failed C-STORE among the objects not stored ('' if all stored).
    failure: str

    @property
    def all_stored(self) -> bool:
        return self.stored == self.objects


@dataclass(frozen=True, slots=True)
class JobSummary:
    id: int
    study_instance_uid: str
    state: JobState
    reason: str
    created_at: datetime
    queued_at: datetime | None
    started_at: datetime | None
    finished_at: datetime | None
    attempts: int
    lesion_volume_ml: float | None
    instances: int
    next_attempt_at: datetime | None = None
    superseded_by: int | None = None
    result_dir: str = ""
    #: "" (not assessed), "within" or "outside" the model's validated range.
    validity: str = ""
    validity_reasons: tuple[str, ...] = ()
    #: When an operator released this job's held result (None: never held or not yet).
    released_at: datetime | None = None
    #: The worker holding the running job's lease, and when that lease runs out.
    lease_owner: str = ""
    lease_expires_at: datetime | None = None

    @property
    def display_state(self) -> str:
        """What operators see: a failed job with an automatic retry scheduled is ``retrying``."""
        if self.state is JobState.FAILED and self.next_attempt_at is not None:
            return "retrying"
        return self.state.value


def _summary(job: Job, instances: int = 0) -> JobSummary:
    return JobSummary(
        id=job.id,
        study_instance_uid=job.study_instance_uid,
        state=JobState(job.state),
        reason=job.reason,
        created_at=job.created_at,
        queued_at=job.queued_at,
        started_at=job.started_at,
        finished_at=job.finished_at,
        attempts=job.attempts,
        lesion_volume_ml=job.lesion_volume_ml,
        instances=instances,
        next_attempt_at=job.next_attempt_at,
        superseded_by=job.superseded_by,
        result_dir=job.result_dir,
        validity=job.validity or "",
        validity_reasons=tuple(r for r in (job.validity_reasons or "").split("\n") if r),
        released_at=job.released_at,
        lease_owner=job.lease_owner or "",
        lease_expires_at=job.lease_expires_at,
    )


def validity_fields(status: str, reasons: Sequence[str]) -> dict[str, object]:
    """The job columns that record a result's domain of validity (for ``transition(fields=)``).

    Reasons are stored one per line; a line break inside a reason becomes a
    space rather than failing a job over a cosmetic detail.
    """
    if status not in ("within", "outside"):
        raise ValueError(f"validity must be 'within' or 'outside', got {status!r}")
    lines = (" ".join(r.splitlines()) for r in reasons)
    return {"validity": status, "validity_reasons": "\n".join(line for line in lines if line)}


class JobStore:
    def __init__(self, db: Database) -> None:
        self.db = db
        self._store_time = timestamp_writer(db.engine) if db.engine.dialect.name == "sqlite" else None

    # -- receive -----------------------------------------------------------------
    def record_instance(
        self,
        *,
        study_instance_uid: str,
        series_instance_uid: str,
        sop_instance_uid: str,
        sop_class_uid: str,
        path: str,
        size_bytes: int,
        calling_ae_title: str,
        signature: InstanceSignature | None = None,
    ) -> int:
        """Record (or replace) a received instance and open a job for its study.

        Returns the id of the study's open (``received``) job.  An instance that
        arrives after the study's job was queued opens a new job, so late images
        are processed (as a new result version) rather than dropped.
        """
        return self.record_received(ReceivedInstance(
            study_instance_uid=study_instance_uid,
            series_instance_uid=series_instance_uid,
            sop_instance_uid=sop_instance_uid,
            sop_class_uid=sop_class_uid,
            path=path,
            size_bytes=size_bytes,
            calling_ae_title=calling_ae_title,
            signature=signature,
        )).job_id

    def record_received(self, received: ReceivedInstance) -> RecordedInstance:
        """:meth:`record_instance` for the SCP: also says where the instance was stored before.

        One transaction of SQLAlchemy Core statements, not the ORM: this runs once per
        C-STORE before Success, and the ORM's unit of work cost more than the fsyncs. On
        SQLite the same statements go through the driver (:mod:`service.db.received_sqlite`;
        BEGIN IMMEDIATE serialises writers there, so no two can insert the same row). The study row is updated first, which
        on PostgreSQL locks it, so concurrent associations of one study queue up there.
        The SCP calls it once the file is durable (an fsync'd row never points at a file
        that a power loss could take back), and answers Success once it returns.
        """
        if self._store_time is not None:  # SQLite: the same statements through the driver
            job_id, previous = record_received_sqlite(
                self.db.engine, self._store_time, study_uid=received.study_instance_uid,
                series_uid=received.series_instance_uid, sop_uid=received.sop_instance_uid,
                sop_class_uid=received.sop_class_uid, path=received.path, size_bytes=received.size_bytes,
                calling_ae_title=received.calling_ae_title, signature=received.signature, now=utcnow())
            return RecordedInstance(job_id, previous)
        for attempt in range(3):
            try:
                with self.db.engine.begin() as connection:
                    return _record_received(connection, received, utcnow())
            except IntegrityError:
                # Two associations inserted the same new study/instance at once.
                if attempt == 2:
                    raise
        raise AssertionError("unreachable")

    def last_received_at(self, study_instance_uid: str) -> datetime | None:
        """When the study's latest image arrived (the start of the clinical latency)."""
        with self.db.session() as s:
            return s.scalar(select(Study.last_received_at).where(
                Study.study_instance_uid == study_instance_uid))

    def recorded_path(self, sop_instance_uid: str) -> str | None:
        """Where the instance with this SOP Instance UID is stored, if it was received before."""
        with self.db.session() as s:
            return s.scalar(select(Instance.path).where(Instance.sop_instance_uid == sop_instance_uid))

    def instance_paths(self, study_instance_uid: str) -> list[str]:
        with self.db.session() as s:
            return list(
                s.scalars(
                    select(Instance.path)
                    .where(Instance.study_instance_uid == study_instance_uid)
                    .order_by(Instance.path)
                )
            )

    def instance_signatures(self, study_instance_uid: str) -> list[InstanceSignature]:
        with self.db.session() as s:
            rows = s.execute(
                select(
                    Instance.series_instance_uid,
                    Instance.role,
                    Instance.b_value,
                    Instance.slice_position,
                    Instance.frames,
                ).where(Instance.study_instance_uid == study_instance_uid)
            )
            return [
                InstanceSignature(series, ImageRole.parse(role), b_value, position, frames)
                for series, role, b_value, position, frames in rows
            ]

    # -- assemble ----------------------------------------------------------------
    def received_jobs(self, idle_s: float) -> list[tuple[int, str]]:
        """(job id, study UID) of ``received`` jobs whose study was idle for ``idle_s``."""
        cutoff = utcnow() - timedelta(seconds=idle_s)
        with self.db.session() as s:
            return [
                (int(job_id), str(study_uid))
                for job_id, study_uid in s.execute(
                    select(Job.id, Job.study_instance_uid)
                    .join(Study, Study.study_instance_uid == Job.study_instance_uid)
                    .where(Job.state == JobState.RECEIVED.value, Study.last_received_at <= cutoff)
                    .order_by(Job.id)
                )
            ]

    def complete_studies(self, idle_s: float) -> list[int]:
        """Move ``received`` jobs whose study was idle for ``idle_s`` to ``queued``."""
        ids = [job_id for job_id, _ in self.received_jobs(idle_s)]
        return [i for i in ids if self.queue(i)]

    def queue(self, job_id: int, reason: str = "") -> bool:
        """received -> queued (compare-and-set)."""
        return self.transition(job_id, JobState.QUEUED, reason, expect=(JobState.RECEIVED,))

    def jobs_to_requeue(self, stale_after_s: float) -> list[int]:
        """Queued jobs (their message may be lost) and running jobs older than ``stale_after_s``.

        Running ones are moved back to ``queued``.  Called at start-up, so a
        restart never loses a received-but-unprocessed study.
        """
        cutoff = utcnow() - timedelta(seconds=stale_after_s)
        with self.db.session() as s:
            stale = list(
                s.scalars(
                    select(Job.id).where(
                        Job.state == JobState.RUNNING.value, Job.started_at <= cutoff
                    )
                )
            )
        for job_id in stale:
            self.transition(job_id, JobState.QUEUED, "re-queued after restart", expect=(JobState.RUNNING,))
        with self.db.session() as s:
            return list(
                s.scalars(
                    select(Job.id).where(Job.state == JobState.QUEUED.value).order_by(Job.id)
                )
            )

    # -- state machine ----------------------------------------------------------
    def transition(
        self,
        job_id: int,
        state: JobState | str,
        reason: str = "",
        *,
        expect: Sequence[JobState] | None = None,
        fields: Mapping[str, object] | None = None,
        lease_owner: str | None = None,
        where: Sequence[ColumnElement[bool]] = (),
    ) -> bool:
        """Set a job's state (compare-and-set on ``expect``); False if it was not in ``expect``.

        With ``lease_owner`` the change happens only while that worker holds the job's
        lease: a worker that lost its lease (it stalled, and the job was queued again)
        cannot overwrite what the next one does. Leaving ``running`` ends the lease.
        """
        state = JobState(state)
        now = utcnow()
        values: dict[str, object] = {"state": state.value, "reason": reason, "updated_at": now}
        if state is JobState.QUEUED:
            values["queued_at"] = now
        elif state is JobState.RUNNING:
            values["started_at"] = now
        elif state.is_final:
            values["finished_at"] = now
        if state is not JobState.RUNNING:
            values.update(lease_owner="", lease_expires_at=None)
        values.update(fields or {})
        with self.db.session() as s:
            stmt = update(Job).where(Job.id == job_id, *where)
            if lease_owner is not None:
                stmt = stmt.where(Job.lease_owner == lease_owner)
            if expect is not None:
                stmt = stmt.where(Job.state.in_([JobState(e).value for e in expect]))
            if state is JobState.RUNNING:
                stmt = stmt.values(attempts=Job.attempts + 1)
            result = s.execute(stmt.values(**values))
            if result.rowcount != 1:  # type: ignore[attr-defined]
                return False
            s.add(JobEvent(job_id=job_id, state=state.value, reason=reason, at=now))
        return True

    def claim(self, job_id: int, owner: str = "", lease_s: float = DEFAULT_LEASE_S) -> bool:
        """queued -> running with a lease for ``owner``; False when another worker has it or it is done.

        A running job whose lease has expired (its worker died without finishing it) can be
        claimed again: that is how a re-delivered task after a killed worker gets its job.
        """
        now = utcnow()
        lease = {"lease_owner": owner, "lease_expires_at": now + timedelta(seconds=lease_s)}
        if self.transition(job_id, JobState.RUNNING, expect=(JobState.QUEUED,), fields=lease):
            return True
        return self.transition(
            job_id, JobState.RUNNING, "claimed again: the previous worker's lease expired",
            expect=(JobState.RUNNING,), fields=lease, where=(Job.lease_expires_at < now,),
        )

    def renew_lease(self, job_id: int, owner: str, lease_s: float = DEFAULT_LEASE_S) -> bool:
        """Extend ``owner``'s lease on its running job; False when the lease is no longer its own."""
        with self.db.session() as s:
            result = s.execute(
                update(Job)
                .where(Job.id == job_id, Job.state == JobState.RUNNING.value, Job.lease_owner == owner)
                .values(lease_expires_at=utcnow() + timedelta(seconds=lease_s))
            )
            return bool(result.rowcount == 1)  # type: ignore[attr-defined]

    def requeue_expired_leases(self) -> list[int]:
        """running -> queued for every job whose lease ran out (its worker stopped renewing it)."""
        now = utcnow()
        with self.db.session() as s:
            expired = list(s.execute(
                select(Job.id, Job.lease_owner).where(
                    Job.state == JobState.RUNNING.value, Job.lease_expires_at < now
                )
            ))
        requeued = []
        for job_id, owner in expired:
            reason = f"re-queued: the lease of worker {owner or '?'} expired (worker lost)"
            if self.transition(job_id, JobState.QUEUED, reason, expect=(JobState.RUNNING,),
                               where=(Job.lease_expires_at < now,)):
                requeued.append(job_id)
        return requeued

    def queued_not_taken(self, after_s: float) -> list[int]:
        """Queued jobs handed to the broker (or queued) more than ``after_s`` ago: the message may be lost."""
        cutoff = utcnow() - timedelta(seconds=after_s)
        with self.db.session() as s:
            return list(s.scalars(
                select(Job.id).where(
                    Job.state == JobState.QUEUED.value,
                    or_(Job.dispatched_at < cutoff, Job.dispatched_at.is_(None) & (Job.queued_at < cutoff)),
                ).order_by(Job.id)
            ))

    def mark_dispatched(self, job_id: int) -> None:
        """Record that the job was just handed to the broker."""
        with self.db.session() as s:
            s.execute(update(Job).where(Job.id == job_id).values(dispatched_at=utcnow()))

    def retry(self, job_id: int, reason: str = "retry requested") -> bool:
        """Put a failed job back in the queue (operator action or due automatic retry)."""
        return self.transition(
            job_id, JobState.QUEUED, reason, expect=(JobState.FAILED,), fields={"next_attempt_at": None}
        )

    def release(self, job_id: int, reason: str = "released by operator") -> bool:
        """Queue a held (out-of-range) result for delivery; False unless the job is held.

        ``released_at`` tells the worker not to hold it again: it delivers the
        results the held attempt wrote (or, if those are gone, a re-run of
        the same study) flagged as outside the validated range.
        """
        return self.transition(
            job_id, JobState.QUEUED, reason, expect=(JobState.HELD,), fields={"released_at": utcnow()}
        )

    def newer_delivered(self, job_id: int) -> int | None:
        """The newest later job of the same study that was delivered (None: there is none).

        Releasing a held job after a newer result of the study reached PACS
        would put an older result version on top of it.
        """
        with self.db.session() as s:
            job = s.get(Job, job_id)
            if job is None:
                return None
            newer = s.scalar(
                select(func.max(Job.id)).where(
                    Job.study_instance_uid == job.study_instance_uid,
                    Job.id > job_id,
                    Job.state == JobState.DELIVERED.value,
                )
            )
            return int(newer) if newer is not None else None

    def previous_result(self, job_id: int) -> JobSummary | None:
        """The newest delivered, not yet superseded, earlier job of the same study."""
        with self.db.session() as s:
            job = s.get(Job, job_id)
            if job is None:
                return None
            previous = s.scalars(
                select(Job)
                .where(
                    Job.study_instance_uid == job.study_instance_uid,
                    Job.id < job_id,
                    Job.state == JobState.DELIVERED.value,
                    Job.superseded_by.is_(None),
                )
                .order_by(Job.id.desc())
            ).first()
            return _summary(previous) if previous is not None else None

    def supersede(self, job_id: int) -> list[int]:
        """Mark every earlier delivered job of the same study as superseded by ``job_id``."""
        with self.db.session() as s:
            job = s.get(Job, job_id)
            if job is None:
                return []
            older = list(
                s.scalars(
                    select(Job).where(
                        Job.study_instance_uid == job.study_instance_uid,
                        Job.id < job_id,
                        Job.state == JobState.DELIVERED.value,
                        Job.superseded_by.is_(None),
                    )
                )
            )
            for other in older:
                other.superseded_by = job_id
                s.add(JobEvent(job_id=other.id, state=other.state, reason=f"superseded by job {job_id}", at=utcnow()))
            return [o.id for o in older]

    def due_retries(self) -> list[int]:
        """Failed jobs whose scheduled automatic retry is due, moved back to ``queued``."""
        now = utcnow()
        with self.db.session() as s:
            ids = list(
                s.scalars(
                    select(Job.id)
                    .where(
                        Job.state == JobState.FAILED.value,
                        Job.next_attempt_at.is_not(None),
                        Job.next_attempt_at <= now,
                    )
                    .order_by(Job.id)
                )
            )
        return [i for i in ids if self.retry(i, "automatic retry")]

    # -- deliver -----------------------------------------------------------------
    def record_delivery(
        self,
        job_id: int,
        *,
        destination: str,
        kind: str,
        sop_class_uid: str,
        sop_instance_uid: str,
        path: str,
        status: str,
        status_code: int | None,
        detail: str = "",
    ) -> None:
        with self.db.session() as s:
            s.add(
                Delivery(
                    job_id=job_id,
                    destination=destination,
                    kind=kind,
                    sop_class_uid=sop_class_uid,
                    sop_instance_uid=sop_instance_uid,
                    path=path,
                    status=status,
                    status_code=status_code,
                    detail=detail,
                    at=utcnow(),
                )
            )

    def note(self, job_id: int, reason: str) -> bool:
        """Append a history entry without changing the job's state (e.g. a commitment re-request)."""
        with self.db.session() as s:
            job = s.get(Job, job_id)
            if job is None:
                return False
            s.add(JobEvent(job_id=job_id, state=job.state, reason=reason, at=utcnow()))
        return True

    def finished_studies(self) -> list[tuple[str, list[JobSummary]]]:
        """Studies with at least one job, every job of which is finished for good, with their jobs.

        Finished for good: delivered, refused, or failed with no automatic retry scheduled.
        A study with a job received, queued, running, held (an operator decision is
        pending) or due for a retry is not listed: retention never touches it.
        """
        with self.db.session() as s:
            jobs = list(s.scalars(select(Job).order_by(Job.study_instance_uid, Job.id)))
            by_study: dict[str, list[JobSummary]] = {}
            for job in jobs:
                by_study.setdefault(job.study_instance_uid, []).append(_summary(job))
        done = (JobState.DELIVERED, JobState.REFUSED, JobState.FAILED)
        return [
            (uid, summaries) for uid, summaries in by_study.items()
            if all(j.state in done and j.next_attempt_at is None and j.finished_at is not None
                   for j in summaries)
        ]

    def recorded_paths(self) -> set[str]:
        """Every instance file path the database knows (for finding orphans in the spool)."""
        with self.db.session() as s:
            return set(s.scalars(select(Instance.path)))

    def forget_instances(self, study_instance_uid: str, reason: str) -> int:
        """Drop a study's instance rows (their files are gone) and note it on each of its jobs."""
        now = utcnow()
        with self.db.session() as s:
            removed = s.execute(
                delete(Instance).where(Instance.study_instance_uid == study_instance_uid)
            ).rowcount  # type: ignore[attr-defined]
            for job in s.scalars(select(Job).where(Job.study_instance_uid == study_instance_uid)):
                s.add(JobEvent(job_id=job.id, state=job.state, reason=reason, at=now))
        return int(removed or 0)

    def stored_at(self, job_id: int, destination: str) -> set[str]:
        """SOP Instance UIDs of ``job_id``'s results whose latest C-STORE to ``destination`` succeeded.

        A retry sends only the rest: a destination that already stored an object does not
        get it again.
        """
        with self.db.session() as s:
            rows = list(s.execute(
                select(Delivery.sop_instance_uid, Delivery.status)
                .where(Delivery.job_id == job_id, Delivery.destination == destination)
                .order_by(Delivery.id)
            ))
        latest: dict[str, str] = {}
        for uid, status in rows:
            latest[uid] = status
        return {uid for uid, status in latest.items() if status == "stored"}

    def delivery_states(self, job_ids: Sequence[int]) -> dict[int, list[DestinationDelivery]]:
        """Per job and destination: how many result objects are stored, from each object's latest C-STORE."""
        ids = sorted(set(job_ids))
        if not ids:
            return {}
        with self.db.session() as s:
            rows = list(
                s.scalars(select(Delivery).where(Delivery.job_id.in_(ids)).order_by(Delivery.id))
            )
        latest: dict[tuple[int, str], dict[str, Delivery]] = {}
        for row in rows:
            latest.setdefault((row.job_id, row.destination), {})[row.sop_instance_uid] = row
        out: dict[int, list[DestinationDelivery]] = {}
        for (job_id, destination), by_uid in sorted(latest.items()):
            failed = sorted((d for d in by_uid.values() if d.status != "stored"), key=lambda d: d.id)
            out.setdefault(job_id, []).append(
                DestinationDelivery(
                    job_id=job_id,
                    destination=destination,
                    objects=len(by_uid),
                    stored=len(by_uid) - len(failed),
                    failure=f"{failed[-1].kind} {failed[-1].detail}" if failed else "",
                )
            )
        return out

    # -- read ---------------------------------------------------------------------
    def job(self, job_id: int) -> JobSummary | None:
        with self.db.session() as s:
            job = s.get(Job, job_id)
            if job is None:
                return None
            count = s.scalar(
                select(func.count())
                .select_from(Instance)
                .where(Instance.study_instance_uid == job.study_instance_uid)
            )
            return _summary(job, int(count or 0))

    def jobs(self, *, limit: int = 50, study_instance_uid: str | None = None) -> list[JobSummary]:
        with self.db.session() as s:
            stmt = select(Job).order_by(Job.id.desc()).limit(limit)
            if study_instance_uid:
                stmt = stmt.where(Job.study_instance_uid == study_instance_uid)
            return [_summary(j) for j in s.scalars(stmt)]

    def events(self, job_id: int) -> list[tuple[str, str, datetime]]:
        with self.db.session() as s:
            rows = s.scalars(select(JobEvent).where(JobEvent.job_id == job_id).order_by(JobEvent.id))
            return [(e.state, e.reason, e.at) for e in rows]

    def deliveries(self, job_id: int) -> list[Delivery]:
        with self.db.session() as s:
            return list(s.scalars(select(Delivery).where(Delivery.job_id == job_id).order_by(Delivery.id)))


@dataclass(frozen=True, slots=True)
class ReceivedInstance:
    """One received instance as the SCP records it."""

    study_instance_uid: str
    series_instance_uid: str
    sop_instance_uid: str
    sop_class_uid: str
    path: str
    size_bytes: int
    calling_ae_title: str
    signature: InstanceSignature | None = None


@dataclass(frozen=True, slots=True)
class RecordedInstance:
    """The study's open job, and where the same SOP Instance UID was stored before (or None)."""

    job_id: int
    previous_path: str | None


_STUDIES, _INSTANCES, _JOBS, _EVENTS = (
    cast(Table, model.__table__) for model in (Study, Instance, Job, JobEvent))

# The statements of one C-STORE, built once (SQLAlchemy then reuses their compiled form).
_TOUCH_STUDY = (update(_STUDIES).where(_STUDIES.c.study_instance_uid == bindparam("b_study"))
                .values(last_received_at=bindparam("b_now")))
_NEW_STUDY = insert(_STUDIES)
_PREVIOUS_PATH = select(_INSTANCES.c.path).where(_INSTANCES.c.sop_instance_uid == bindparam("b_sop"))
_NEW_INSTANCE = insert(_INSTANCES)
_REPLACE_INSTANCE = update(_INSTANCES).where(_INSTANCES.c.sop_instance_uid == bindparam("b_sop"))
_OPEN_JOB = (select(_JOBS.c.id).where(_JOBS.c.study_instance_uid == bindparam("b_study"),
                                      _JOBS.c.state == JobState.RECEIVED.value).limit(1))
_NEW_JOB = insert(_JOBS)
_NEW_EVENT = insert(_EVENTS)


def _record_received(connection: Connection, received: ReceivedInstance, now: datetime) -> RecordedInstance:
    """The statements of :meth:`JobStore.record_received`, inside its transaction."""
    study_uid, sop_uid = received.study_instance_uid, received.sop_instance_uid
    if connection.execute(_TOUCH_STUDY, {"b_study": study_uid, "b_now": now}).rowcount == 0:
        connection.execute(_NEW_STUDY, {
            "study_instance_uid": study_uid, "first_received_at": now, "last_received_at": now,
            "calling_ae_title": received.calling_ae_title})
    sig = received.signature or InstanceSignature(received.series_instance_uid)
    row = {
        "study_instance_uid": study_uid, "series_instance_uid": received.series_instance_uid,
        "sop_class_uid": received.sop_class_uid, "path": received.path, "size_bytes": received.size_bytes,
        "received_at": now, "calling_ae_title": received.calling_ae_title, "role": sig.role.value,
        "b_value": sig.b_value, "slice_position": sig.slice_position, "frames": sig.frames,
    }
    previous = connection.execute(_PREVIOUS_PATH, {"b_sop": sop_uid}).scalar()
    if previous is None:
        connection.execute(_NEW_INSTANCE, {"sop_instance_uid": sop_uid, **row})
    else:
        connection.execute(_REPLACE_INSTANCE, {"b_sop": sop_uid, **row})
    job_id = connection.execute(_OPEN_JOB, {"b_study": study_uid}).scalar()
    if job_id is None:
        key = connection.execute(_NEW_JOB, {
            "study_instance_uid": study_uid, "state": JobState.RECEIVED.value, "reason": "",
            "created_at": now, "updated_at": now, "attempts": 0, "model_name": "", "model_version": "",
            "result_dir": ""}).inserted_primary_key
        assert key is not None
        job_id = key[0]
        connection.execute(_NEW_EVENT, {"job_id": job_id, "state": JobState.RECEIVED.value, "reason": "",
                                        "at": now})
    return RecordedInstance(int(job_id), None if previous is None else str(previous))
