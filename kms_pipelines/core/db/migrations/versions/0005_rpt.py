"""Regulatory proof tokens and ledger checkpoints.

Revision ID: 0005_rpt
Revises: 0004_rotation
"""
import sqlalchemy as sa  # noqa: F401
from alembic import op  # noqa: F401

revision = "0005_rpt"
down_revision = "0004_rotation"
branch_labels = None
depends_on = None


def upgrade() -> None:
    pass


def downgrade() -> None:
    pass
