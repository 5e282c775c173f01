"""Security events, notifications log, break-glass escrow packages.

Revision ID: 0007_events_escrow
Revises: 0006_backup
"""

import sqlalchemy as sa
from alembic import op

from kms_pipelines.core.foundation.db.append_only import create_append_only_triggers

revision = "0007_events_escrow"
down_revision = "0006_backup"
branch_labels = None
depends_on = None

TS = sa.DateTime(timezone=True)
APPEND_ONLY = ("notification_deliveries", "escrow_destructions", "escrow_unseals")


def upgrade() -> None:
    op.create_table(
        "security_events",
        sa.Column("seq", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("id", sa.String(64), nullable=False, unique=True),
        sa.Column("type", sa.String(32), nullable=False),
        sa.Column("key_name", sa.String(200), nullable=False),
        sa.Column("key_version", sa.Integer, nullable=False),
        sa.Column("source", sa.String(200), nullable=False),
        sa.Column("detail", sa.Text, nullable=False),
        sa.Column("reported_at", TS, nullable=False),
        sa.Column("reported_by", sa.String(200), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("response_run_id", sa.String(200)),
        sa.Column("resolved_at", TS),
        sa.Column("response", sa.JSON),
        sa.CheckConstraint(
            "type IN ('compromise','ci-secret-exposure','tenant-rotation')", name="ck_security_events_type"
        ),
        sa.CheckConstraint("status IN ('new','responding','resolved')", name="ck_security_events_status"),
    )
    op.create_index("ix_security_events_key", "security_events", ["key_name", "status"])
    op.create_table(
        "notification_deliveries",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("at", TS, nullable=False),
        sa.Column("notification_id", sa.String(64), nullable=False),
        sa.Column("kind", sa.String(64), nullable=False),
        sa.Column("ref", sa.String(200)),
        sa.Column("subject", sa.Text, nullable=False),
        sa.Column("audience", sa.String(64), nullable=False),
        sa.Column("channel", sa.String(32), nullable=False),
        sa.Column("target", sa.String(300), nullable=False),
        sa.Column("ok", sa.Boolean, nullable=False),
        sa.Column("skipped", sa.Boolean, nullable=False),
        sa.Column("attempts", sa.Integer, nullable=False),
        sa.Column("error", sa.Text),
    )
    op.create_index("ix_notification_deliveries_at", "notification_deliveries", ["at"])
    op.create_table(
        "escrow_custodians",
        sa.Column("name", sa.String(100), primary_key=True),
        sa.Column("recipient", sa.String(200), nullable=False),
        sa.Column("enrolled_at", TS, nullable=False),
        sa.Column("enrolled_by", sa.String(200), nullable=False),
    )
    op.create_table(
        "escrow_packages",
        sa.Column("id", sa.String(64), primary_key=True),
        sa.Column("key_name", sa.String(200), nullable=False),
        sa.Column("key_version", sa.Integer, nullable=False),
        sa.Column("created_at", TS, nullable=False),
        sa.Column("superseded_at", TS),
        sa.Column("threshold", sa.Integer, nullable=False),
        sa.Column("custodians", sa.JSON, nullable=False),
        sa.Column("object_key", sa.String(300), nullable=False),
        sa.Column("sha256", sa.String(64), nullable=False),
        sa.Column("erased_at", TS),
        sa.Column("created_by", sa.String(200), nullable=False),
        sa.Column("reason", sa.String(200), nullable=False),
    )
    # At most one current (not superseded) package per key.
    op.create_index(
        "uq_escrow_packages_one_current",
        "escrow_packages",
        ["key_name"],
        unique=True,
        sqlite_where=sa.text("superseded_at IS NULL"),
        postgresql_where=sa.text("superseded_at IS NULL"),
    )
    op.create_table(
        "escrow_destructions",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("package_id", sa.String(64), sa.ForeignKey("escrow_packages.id"), nullable=False),
        sa.Column("custodian", sa.String(100), nullable=False),
        sa.Column("confirmed_at", TS, nullable=False),
        sa.Column("confirmed_by", sa.String(200), nullable=False),
        sa.UniqueConstraint("package_id", "custodian", name="uq_escrow_destructions_pkg_custodian"),
    )
    op.create_table(
        "escrow_unseals",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("package_id", sa.String(64), sa.ForeignKey("escrow_packages.id"), nullable=False),
        sa.Column("at", TS, nullable=False),
        sa.Column("requester", sa.String(200), nullable=False),
        sa.Column("ticket", sa.String(200), nullable=False),
        sa.Column("approvers", sa.JSON, nullable=False),
        sa.Column("custodians", sa.JSON, nullable=False),
        sa.Column("key_version", sa.Integer, nullable=False),
    )
    for table in APPEND_ONLY:
        create_append_only_triggers(op.get_bind(), table)


def downgrade() -> None:
    op.drop_table("escrow_unseals")
    op.drop_table("escrow_destructions")
    op.drop_index("uq_escrow_packages_one_current", "escrow_packages")
    op.drop_table("escrow_packages")
    op.drop_table("escrow_custodians")
    op.drop_index("ix_notification_deliveries_at", "notification_deliveries")
    op.drop_table("notification_deliveries")
    op.drop_index("ix_security_events_key", "security_events")
    op.drop_table("security_events")
