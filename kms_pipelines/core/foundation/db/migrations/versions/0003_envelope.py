"""Envelope encryption: DEK inventory and sweep shards.

Revision ID: 0003_envelope
Revises: 0002_access
"""

import sqlalchemy as sa
from alembic import op

revision = "0003_envelope"
down_revision = "0002_access"
branch_labels = None
depends_on = None

TS = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "deks",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), primary_key=True, autoincrement=True),
        sa.Column("key_name", sa.String(200), nullable=False),
        sa.Column("key_version", sa.Integer, nullable=False),
        sa.Column("wrapped", sa.LargeBinary),
        sa.Column("object_id", sa.String(500), nullable=False),
        sa.Column("shard", sa.Integer, nullable=False),
        sa.Column("created_at", TS, nullable=False),
        sa.Column("rewrapped_at", TS),
        sa.Column("shredded_at", TS),
        sa.UniqueConstraint("key_name", "object_id", name="uq_deks_key_object"),
        sa.CheckConstraint("shard >= 0 AND shard < 1024", name="ck_deks_shard"),
        sa.CheckConstraint("wrapped IS NOT NULL OR shredded_at IS NOT NULL", name="ck_deks_wrapped_or_shredded"),
        sqlite_autoincrement=True,  # never reuse a DEK id: blobs name their DEK by id
    )
    op.create_index("ix_deks_sweep", "deks", ["key_name", "key_version", "shard", "id"])


def downgrade() -> None:
    op.drop_index("ix_deks_sweep", "deks")
    op.drop_table("deks")
