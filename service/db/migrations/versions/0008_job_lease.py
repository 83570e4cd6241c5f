"""jobs.lease_owner, jobs.lease_expires_at, jobs.dispatched_at: worker leases and lost hand-offs

Revision ID: 0008
Revises: 0007

A worker holds a lease on the job it runs and renews it while working; the SCP's
scheduler queues a job again when its lease expires (the worker died) or when a queued
job was not taken long after it was handed to the broker (the message was lost), while
the service runs, not only at the next start (issue #11).
"""
from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.add_column(sa.Column("lease_owner", sa.String(length=128), server_default="", nullable=False))
        batch_op.add_column(sa.Column("lease_expires_at", sa.DateTime(), nullable=True))
        batch_op.add_column(sa.Column("dispatched_at", sa.DateTime(), nullable=True))


def downgrade() -> None:
    # Plain DROP COLUMN (see 0007): a batch would re-create ``jobs``.
    for column in ("dispatched_at", "lease_expires_at", "lease_owner"):
        op.drop_column("jobs", column)
