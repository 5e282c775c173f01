"""Archive vault of retired root/service keys and forensic retrievals (T1).

Revision ID: 0009_vault
Revises: 0008_console
"""

import sqlalchemy as sa
from alembic import op

revision = "0009_vault"
down_revision = "0008_console"
branch_labels = None
depends_on = None

TS = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "archive_copies",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("key_name", sa.String(200), nullable=False),
        sa.Column("key_version", sa.Integer, nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("kek_version", sa.Integer),
        sa.Column("object_key", sa.String(300)),
        sa.Column("manifest_key", sa.String(300)),
        sa.Column("sha256", sa.String(64)),
        sa.Column("size", sa.Integer),
        sa.Column("fingerprint", sa.String(80)),
        sa.Column("retired_at", TS, nullable=False),
        sa.Column("retain_until", TS, nullable=False),
        sa.Column("archived_at", TS, nullable=False),
        sa.Column("deleted_at", TS),
        sa.Column("reason", sa.Text),
        sa.UniqueConstraint("key_name", "key_version", name="uq_archive_copies"),
        sa.CheckConstraint("status IN ('archived','unarchivable','deleted')", name="ck_archive_copies_status"),
    )
    op.create_table(
        "forensic_retrievals",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("key_name", sa.String(200), nullable=False),
        sa.Column("key_version", sa.Integer, nullable=False),
        sa.Column("ticket", sa.String(200), nullable=False),
        sa.Column("requester", sa.String(200), nullable=False),
        sa.Column("approvers", sa.Text, nullable=False),
        sa.Column("refs", sa.Text, nullable=False),
        sa.Column("retrieved_at", TS, nullable=False),
        sa.Column("expires_at", TS, nullable=False),
        sa.Column("purged_at", TS),
        sa.Column("purpose", sa.String(32), nullable=False),
    )


def downgrade() -> None:
    op.drop_table("forensic_retrievals")
    op.drop_table("archive_copies")
