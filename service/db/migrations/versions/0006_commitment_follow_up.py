"""commitment_transactions: attempt chain and follow-up (re-send and re-request)

Revision ID: 0006
Revises: 0005
"""
from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("commitment_transactions", schema=None) as batch_op:
        batch_op.add_column(sa.Column("attempt", sa.Integer(), server_default="1", nullable=False))
        batch_op.add_column(sa.Column("retry_of", sa.String(length=64), nullable=True))
        batch_op.add_column(sa.Column("follow_up", sa.String(length=16), server_default="", nullable=False))
        batch_op.add_column(sa.Column("follow_up_at", sa.DateTime(), nullable=True))
        batch_op.add_column(sa.Column("follow_up_detail", sa.Text(), server_default="", nullable=False))
        batch_op.create_index(batch_op.f("ix_commitment_transactions_retry_of"), ["retry_of"], unique=False)
        batch_op.create_index(batch_op.f("ix_commitment_transactions_follow_up"), ["follow_up"], unique=False)
    # Transactions that ended uncommitted before this version are not re-sent out of the
    # blue after an upgrade; they are closed, and `strokeseg commitments` says why.
    op.execute(
        "UPDATE commitment_transactions SET follow_up = 'gave_up', "
        "follow_up_detail = 'ended before automatic re-send existed (schema 0006); not re-sent' "
        "WHERE state IN ('failed', 'partially_failed', 'timed_out')"
    )


def downgrade() -> None:
    with op.batch_alter_table("commitment_transactions", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_commitment_transactions_follow_up"))
        batch_op.drop_index(batch_op.f("ix_commitment_transactions_retry_of"))
        batch_op.drop_column("follow_up_detail")
        batch_op.drop_column("follow_up_at")
        batch_op.drop_column("follow_up")
        batch_op.drop_column("retry_of")
        batch_op.drop_column("attempt")
