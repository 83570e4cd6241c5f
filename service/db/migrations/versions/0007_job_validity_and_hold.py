"""jobs.validity, jobs.validity_reasons, jobs.released_at: domain of validity and hold-back

Revision ID: 0007
Revises: 0006

The job records whether its result lies inside the model's validated range
(issue #9), so ``strokeseg jobs`` and a site's audit can show it without
opening the SR; ``released_at`` records the operator release of a result the
``assess.outside_range_policy: hold`` policy kept back (job state ``held``).
Jobs from before this version were not assessed: validity ''.
"""
from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.add_column(sa.Column("validity", sa.String(length=16), server_default="", nullable=False))
        batch_op.add_column(sa.Column("validity_reasons", sa.Text(), server_default="", nullable=False))
        batch_op.add_column(sa.Column("released_at", sa.DateTime(), nullable=True))


def downgrade() -> None:
    # A held job would be unreadable by an older version (no such state): back to failed,
    # which `strokeseg retry` re-delivers.
    op.execute(
        "UPDATE jobs SET state = 'failed', reason = reason || ' (held before downgrade)' "
        "WHERE state = 'held'"
    )
    # Plain DROP COLUMN (SQLite >= 3.35 has it), not a batch: on SQLite a batch
    # re-creates ``jobs``, which the job_events/deliveries foreign keys forbid once
    # there are jobs.
    for column in ("released_at", "validity_reasons", "validity"):
        op.drop_column("jobs", column)
