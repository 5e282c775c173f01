"""Envelope encryption: DEK inventory and sweep shards.

Revision ID: 0003_envelope
Revises: 0002_access
"""
import sqlalchemy as sa  # noqa: F401
from alembic import op  # noqa: F401

revision = "0003_envelope"
down_revision = "0002_access"
branch_labels = None
depends_on = None


def upgrade() -> None:
    pass


def downgrade() -> None:
    pass
