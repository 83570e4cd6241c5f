"""SQLAlchemy tables: received instances, studies, jobs with their state history, deliveries.

The database is the source of truth for job state: brokers may lose or repeat
messages, the DB decides what has been done.
"""

from __future__ import annotations

from datetime import UTC, datetime

from sqlalchemy import (
    BigInteger,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship


def utcnow() -> datetime:
    """Naive UTC: every timestamp in the database is UTC."""
    return datetime.now(UTC).replace(tzinfo=None)


class Base(DeclarativeBase):
    pass


UID = String(64)


class Study(Base):
    __tablename__ = "studies"

    study_instance_uid: Mapped[str] = mapped_column(UID, primary_key=True)
    first_received_at: Mapped[datetime] = mapped_column(DateTime(), default=utcnow)
    last_received_at: Mapped[datetime] = mapped_column(DateTime(), default=utcnow)
    calling_ae_title: Mapped[str] = mapped_column(String(16), default="")


class Instance(Base):
    __tablename__ = "instances"

    sop_instance_uid: Mapped[str] = mapped_column(UID, primary_key=True)
    study_instance_uid: Mapped[str] = mapped_column(
        UID, ForeignKey("studies.study_instance_uid"), index=True
    )
    series_instance_uid: Mapped[str] = mapped_column(UID)
    sop_class_uid: Mapped[str] = mapped_column(UID)
    path: Mapped[str] = mapped_column(Text)
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    received_at: Mapped[datetime] = mapped_column(DateTime(), default=utcnow)
    calling_ae_title: Mapped[str] = mapped_column(String(16), default="")
    # What the image contributes (header-only classification at receive time),
    # so the assembler can tell when a study is complete without reading files.
    role: Mapped[str] = mapped_column(String(16), default="", server_default="")
    b_value: Mapped[float | None] = mapped_column(Float)
    slice_position: Mapped[float | None] = mapped_column(Float)
    frames: Mapped[int] = mapped_column(Integer, default=1, server_default="1")


class Job(Base):
    __tablename__ = "jobs"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    study_instance_uid: Mapped[str] = mapped_column(
        UID, ForeignKey("studies.study_instance_uid"), index=True
    )
    state: Mapped[str] = mapped_column(String(16), index=True)
    reason: Mapped[str] = mapped_column(Text, default="")
    created_at: Mapped[datetime] = mapped_column(DateTime(), default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(DateTime(), default=utcnow)
    queued_at: Mapped[datetime | None] = mapped_column(DateTime())
    started_at: Mapped[datetime | None] = mapped_column(DateTime())
    finished_at: Mapped[datetime | None] = mapped_column(DateTime())
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    lesion_volume_ml: Mapped[float | None] = mapped_column(Float)
    model_name: Mapped[str] = mapped_column(String(64), default="")
    model_version: Mapped[str] = mapped_column(String(32), default="")
    result_dir: Mapped[str] = mapped_column(Text, default="")
    # When a failed delivery is tried again automatically (None: not scheduled).
    next_attempt_at: Mapped[datetime | None] = mapped_column(DateTime())
    # A later job of the same study delivered a newer result version.
    superseded_by: Mapped[int | None] = mapped_column(Integer)
    # Domain of validity of the result: "" (not assessed), "within" or "outside",
    # and the reasons for "outside", one per line.
    validity: Mapped[str] = mapped_column(String(16), default="", server_default="")
    validity_reasons: Mapped[str] = mapped_column(Text, default="", server_default="")
    # When an operator released a held (out-of-range) result for delivery.
    released_at: Mapped[datetime | None] = mapped_column(DateTime())
    # The worker that runs the job holds a lease on it and renews it while working; a
    # lease that expires (the worker died) lets the scheduler queue the job again.
    lease_owner: Mapped[str] = mapped_column(String(128), default="", server_default="")
    lease_expires_at: Mapped[datetime | None] = mapped_column(DateTime())
    # When the job was last handed to the broker (a queued job not taken for long is
    # handed over again: the message may be lost).
    dispatched_at: Mapped[datetime | None] = mapped_column(DateTime())

    events: Mapped[list[JobEvent]] = relationship(
        back_populates="job", order_by="JobEvent.id", cascade="all, delete-orphan"
    )
    deliveries: Mapped[list[Delivery]] = relationship(
        back_populates="job", order_by="Delivery.id", cascade="all, delete-orphan"
    )


class JobEvent(Base):
    """Every state a job went through, with when and why."""

    __tablename__ = "job_events"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    job_id: Mapped[int] = mapped_column(ForeignKey("jobs.id"), index=True)
    state: Mapped[str] = mapped_column(String(16))
    reason: Mapped[str] = mapped_column(Text, default="")
    at: Mapped[datetime] = mapped_column(DateTime(), default=utcnow)

    job: Mapped[Job] = relationship(back_populates="events")


class Delivery(Base):
    """One C-STORE of one result object to one destination."""

    __tablename__ = "deliveries"
    __table_args__ = (Index("ix_deliveries_job_destination", "job_id", "destination"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    job_id: Mapped[int] = mapped_column(ForeignKey("jobs.id"))
    destination: Mapped[str] = mapped_column(String(64))
    kind: Mapped[str] = mapped_column(String(16))
    sop_class_uid: Mapped[str] = mapped_column(UID)
    sop_instance_uid: Mapped[str] = mapped_column(UID)
    path: Mapped[str] = mapped_column(Text, default="")
    status: Mapped[str] = mapped_column(String(16))  # "stored" | "failed"
    status_code: Mapped[int | None] = mapped_column(Integer)
    detail: Mapped[str] = mapped_column(Text, default="")
    at: Mapped[datetime] = mapped_column(DateTime(), default=utcnow)

    job: Mapped[Job] = relationship(back_populates="deliveries")


# -- Storage Commitment (see service.db.commitment) ------------------------------


class CommitmentTransaction(Base):
    """One N-ACTION (Request Storage Commitment) sent to one destination."""

    __tablename__ = "commitment_transactions"

    transaction_uid: Mapped[str] = mapped_column(UID, primary_key=True)
    job_id: Mapped[int | None] = mapped_column(ForeignKey("jobs.id"), index=True)
    destination: Mapped[str] = mapped_column(String(64), index=True)
    destination_ae_title: Mapped[str] = mapped_column(String(16), default="")
    calling_ae_title: Mapped[str] = mapped_column(String(16), default="")
    state: Mapped[str] = mapped_column(String(24), index=True)
    requested_at: Mapped[datetime] = mapped_column(DateTime(), default=utcnow)
    reported_at: Mapped[datetime | None] = mapped_column(DateTime())
    action_status: Mapped[int | None] = mapped_column(Integer)
    reported_by: Mapped[str] = mapped_column(String(16), default="")
    detail: Mapped[str] = mapped_column(Text, default="")
    # 1 for the request made after delivery; n + 1 for a re-request of attempt n.
    attempt: Mapped[int] = mapped_column(Integer, default=1, server_default="1")
    retry_of: Mapped[str | None] = mapped_column(UID, index=True)
    follow_up: Mapped[str] = mapped_column(String(16), default="", server_default="", index=True)
    follow_up_at: Mapped[datetime | None] = mapped_column(DateTime())
    follow_up_detail: Mapped[str] = mapped_column(Text, default="", server_default="")

    instances: Mapped[list[CommitmentInstance]] = relationship(
        back_populates="transaction",
        order_by="CommitmentInstance.id",
        cascade="all, delete-orphan",
    )


class CommitmentInstance(Base):
    """One SOP instance referenced by a transaction, with what the peer said about it."""

    __tablename__ = "commitment_instances"
    __table_args__ = (
        UniqueConstraint("transaction_uid", "sop_instance_uid", name="uq_commitment_instance"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    transaction_uid: Mapped[str] = mapped_column(
        UID, ForeignKey("commitment_transactions.transaction_uid"), index=True
    )
    sop_class_uid: Mapped[str] = mapped_column(UID)
    sop_instance_uid: Mapped[str] = mapped_column(UID, index=True)
    path: Mapped[str] = mapped_column(Text, default="")
    state: Mapped[str] = mapped_column(String(16))
    failure_reason: Mapped[int | None] = mapped_column(Integer)
    updated_at: Mapped[datetime] = mapped_column(DateTime(), default=utcnow)

    transaction: Mapped[CommitmentTransaction] = relationship(back_populates="instances")
