"""Regulatory proof tokens and ledger checkpoints.

Revision ID: 0005_rpt
Revises: 0004_rotation

Checkpoints live in WORM object storage, not in the database (a database admin must not
be able to rewrite them), so this revision only adds the append-only ``rpts`` table.
"""

import sqlalchemy as sa
from alembic import op

from kms_pipelines.core.foundation.db.append_only import create_append_only_triggers, drop_append_only_triggers

revision = "0005_rpt"
down_revision = "0004_rotation"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "rpts",
        sa.Column("seq", sa.BigInteger, primary_key=True, autoincrement=False),
        sa.Column("token", sa.Text, nullable=False),
        sa.Column("kid", sa.String(120), nullable=False),
        sa.Column("iat", sa.DateTime(timezone=True), nullable=False),
        sa.Column("subject", sa.String(500), nullable=False),
        sa.Column("prev_hash", sa.String(64), nullable=False),
        sa.Column("token_hash", sa.String(64), nullable=False, unique=True),
    )
    op.create_index("ix_rpts_subject", "rpts", ["subject"])
    create_append_only_triggers(op.get_bind(), "rpts")


def downgrade() -> None:
    drop_append_only_triggers(op.get_bind(), "rpts")
    op.drop_index("ix_rpts_subject", "rpts")
    op.drop_table("rpts")
