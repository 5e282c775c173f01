"""Security events, notifications log, break-glass escrow packages.

Revision ID: 0007_events_escrow
Revises: 0006_backup
"""
import sqlalchemy as sa  # noqa: F401
from alembic import op  # noqa: F401

revision = "0007_events_escrow"
down_revision = "0006_backup"
branch_labels = None
depends_on = None


def upgrade() -> None:
    pass


def downgrade() -> None:
    pass
