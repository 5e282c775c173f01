"""Foundation: keys, key versions, the append-only key-state ledger.

Revision ID: 0001_foundation
Revises:
"""

import sqlalchemy as sa
from alembic import op

from kms_pipelines.core.foundation.db.append_only import create_append_only_triggers

revision = "0001_foundation"
down_revision = None
branch_labels = None
depends_on = None

TS = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "keys",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("name", sa.String(200), nullable=False, unique=True),
        sa.Column("key_class", sa.String(32), nullable=False),
        sa.Column("created_at", TS, nullable=False),
        sa.Column("attributes", sa.JSON, nullable=False),
    )
    op.create_table(
        "key_versions",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("key_id", sa.Integer, sa.ForeignKey("keys.id"), nullable=False),
        sa.Column("version", sa.Integer, nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("wrap_ref", sa.String(200)),
        sa.Column("sign_ref", sa.String(200)),
        sa.Column("public_key", sa.LargeBinary),
        sa.Column("fingerprint", sa.String(80)),
        sa.Column("created_at", TS, nullable=False),
        sa.Column("activated_at", TS),
        sa.Column("rotated_at", TS),
        sa.Column("revoked_at", TS),
        sa.Column("destroyed_at", TS),
        sa.Column("expires_at", TS),
        sa.UniqueConstraint("key_id", "version", name="uq_key_versions_key_version"),
        sa.CheckConstraint(
            "state IN ('pending','active','rotated','revoked','destroyed')", name="ck_key_versions_state"
        ),
    )
    op.create_index(
        "uq_key_versions_one_active",
        "key_versions",
        ["key_id"],
        unique=True,
        sqlite_where=sa.text("state = 'active'"),
        postgresql_where=sa.text("state = 'active'"),
    )
    op.create_table(
        "ledger_entries",
        sa.Column("seq", sa.BigInteger, primary_key=True, autoincrement=False),
        sa.Column("at", TS, nullable=False),
        sa.Column("key_name", sa.String(200), nullable=False),
        sa.Column("key_version", sa.Integer),
        sa.Column("from_state", sa.String(16)),
        sa.Column("to_state", sa.String(16), nullable=False),
        sa.Column("actor", sa.String(200), nullable=False),
        sa.Column("approvers", sa.Text, nullable=False),
        sa.Column("change_ticket", sa.String(200)),
        sa.Column("reason", sa.Text),
        sa.Column("event_id", sa.String(200)),
        sa.Column("prev_hash", sa.String(64), nullable=False),
        sa.Column("entry_hash", sa.String(64), nullable=False, unique=True),
    )
    op.create_index("ix_ledger_entries_key", "ledger_entries", ["key_name", "key_version"])
    create_append_only_triggers(op.get_bind(), "ledger_entries")


def downgrade() -> None:
    op.drop_table("ledger_entries")
    op.drop_index("uq_key_versions_one_active", "key_versions")
    op.drop_table("key_versions")
    op.drop_table("keys")
