"""instance signature: role, b-value, slice position, frames (content-aware completion)

Revision ID: 0003
Revises: 0002
"""
from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("instances", schema=None) as batch_op:
        batch_op.add_column(sa.Column("role", sa.String(length=16), nullable=False, server_default=""))
        batch_op.add_column(sa.Column("b_value", sa.Float(), nullable=True))
        batch_op.add_column(sa.Column("slice_position", sa.Float(), nullable=True))
        batch_op.add_column(sa.Column("frames", sa.Integer(), nullable=False, server_default="1"))


def downgrade() -> None:
    with op.batch_alter_table("instances", schema=None) as batch_op:
        batch_op.drop_column("frames")
        batch_op.drop_column("slice_position")
        batch_op.drop_column("b_value")
        batch_op.drop_column("role")
