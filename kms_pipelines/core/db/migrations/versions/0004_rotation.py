"""Rotation evidence: public-key manifests, partner notices and acks, dependent confirmations.

Revision ID: 0004_rotation
Revises: 0003_envelope
"""
import sqlalchemy as sa  # noqa: F401
from alembic import op  # noqa: F401

revision = "0004_rotation"
down_revision = "0003_envelope"
branch_labels = None
depends_on = None


def upgrade() -> None:
    pass


def downgrade() -> None:
    pass
