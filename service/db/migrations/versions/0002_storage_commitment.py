"""storage commitment transactions and per-instance state

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-27 10:00:00.000000
"""
from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0002'
down_revision = '0001'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('commitment_transactions',
    sa.Column('transaction_uid', sa.String(length=64), nullable=False),
    sa.Column('job_id', sa.Integer(), nullable=True),
    sa.Column('destination', sa.String(length=64), nullable=False),
    sa.Column('destination_ae_title', sa.String(length=16), nullable=False),
    sa.Column('calling_ae_title', sa.String(length=16), nullable=False),
    sa.Column('state', sa.String(length=24), nullable=False),
    sa.Column('requested_at', sa.DateTime(), nullable=False),
    sa.Column('reported_at', sa.DateTime(), nullable=True),
    sa.Column('action_status', sa.Integer(), nullable=True),
    sa.Column('reported_by', sa.String(length=16), nullable=False),
    sa.Column('detail', sa.Text(), nullable=False),
    sa.ForeignKeyConstraint(['job_id'], ['jobs.id'], ),
    sa.PrimaryKeyConstraint('transaction_uid')
    )
    with op.batch_alter_table('commitment_transactions', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_commitment_transactions_destination'), ['destination'], unique=False)
        batch_op.create_index(batch_op.f('ix_commitment_transactions_job_id'), ['job_id'], unique=False)
        batch_op.create_index(batch_op.f('ix_commitment_transactions_state'), ['state'], unique=False)

    op.create_table('commitment_instances',
    sa.Column('id', sa.Integer(), autoincrement=True, nullable=False),
    sa.Column('transaction_uid', sa.String(length=64), nullable=False),
    sa.Column('sop_class_uid', sa.String(length=64), nullable=False),
    sa.Column('sop_instance_uid', sa.String(length=64), nullable=False),
    sa.Column('path', sa.Text(), nullable=False),
    sa.Column('state', sa.String(length=16), nullable=False),
    sa.Column('failure_reason', sa.Integer(), nullable=True),
    sa.Column('updated_at', sa.DateTime(), nullable=False),
    sa.ForeignKeyConstraint(['transaction_uid'], ['commitment_transactions.transaction_uid'], ),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('transaction_uid', 'sop_instance_uid', name='uq_commitment_instance')
    )
    with op.batch_alter_table('commitment_instances', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_commitment_instances_sop_instance_uid'), ['sop_instance_uid'], unique=False)
        batch_op.create_index(batch_op.f('ix_commitment_instances_transaction_uid'), ['transaction_uid'], unique=False)


def downgrade() -> None:
    with op.batch_alter_table('commitment_instances', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_commitment_instances_transaction_uid'))
        batch_op.drop_index(batch_op.f('ix_commitment_instances_sop_instance_uid'))

    op.drop_table('commitment_instances')
    with op.batch_alter_table('commitment_transactions', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_commitment_transactions_state'))
        batch_op.drop_index(batch_op.f('ix_commitment_transactions_job_id'))
        batch_op.drop_index(batch_op.f('ix_commitment_transactions_destination'))

    op.drop_table('commitment_transactions')
