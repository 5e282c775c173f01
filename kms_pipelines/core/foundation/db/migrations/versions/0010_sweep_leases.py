"""Sweep leases: which worker holds which range of the DEK shard space, until when.

Revision ID: 0010_sweep_leases
Revises: 0009_vault
"""

import sqlalchemy as sa
from alembic import op

revision = "0010_sweep_leases"
down_revision = "0009_vault"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "sweep_leases",
        sa.Column("range_lo", sa.Integer, primary_key=True),
        sa.Column("range_hi", sa.Integer, primary_key=True),
        sa.Column("holder", sa.String(200)),  # NULL: free
        sa.Column("expires_at", sa.DateTime(timezone=True)),
        sa.Column("claims", sa.BigInteger, nullable=False, server_default="0"),
        sa.Column("takeovers", sa.BigInteger, nullable=False, server_default="0"),
    )


def downgrade() -> None:
    op.drop_table("sweep_leases")
