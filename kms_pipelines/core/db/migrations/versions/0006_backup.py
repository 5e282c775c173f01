"""Backups, restore drills, drill follow-ups, restore points.

Revision ID: 0006_backup
Revises: 0005_rpt
"""
import sqlalchemy as sa  # noqa: F401
from alembic import op  # noqa: F401

revision = "0006_backup"
down_revision = "0005_rpt"
branch_labels = None
depends_on = None


def upgrade() -> None:
    pass


def downgrade() -> None:
    pass
