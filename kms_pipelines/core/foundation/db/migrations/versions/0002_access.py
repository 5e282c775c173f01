"""Access control: principals, TOTP enrolments, approvals, workload tokens, audit events.

Revision ID: 0002_access
Revises: 0001_foundation
"""

import sqlalchemy as sa
from alembic import op

from kms_pipelines.core.foundation.db.append_only import create_append_only_triggers

revision = "0002_access"
down_revision = "0001_foundation"
branch_labels = None
depends_on = None

TS = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "principals",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("name", sa.String(200), nullable=False, unique=True),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("roles", sa.JSON, nullable=False),
        sa.Column("totp_sealed", sa.LargeBinary),
        sa.Column("totp_last_step", sa.BigInteger),
        sa.Column("created_at", TS, nullable=False),
        sa.Column("disabled_at", TS),
        sa.CheckConstraint("kind IN ('human','workload')", name="ck_principals_kind"),
    )
    op.create_table(
        "approval_requests",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("operation", sa.String(32), nullable=False),
        sa.Column("target", sa.String(300), nullable=False),
        sa.Column("ticket", sa.String(200), nullable=False),
        sa.Column("requester", sa.String(200), nullable=False),
        sa.Column("requested_at", TS, nullable=False),
        sa.Column("completed_at", TS),
    )
    op.create_index("ix_approval_requests_binding", "approval_requests", ["operation", "target", "ticket"])
    op.create_table(
        "approvals",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("operation", sa.String(32), nullable=False),
        sa.Column("target", sa.String(300), nullable=False),
        sa.Column("ticket", sa.String(200), nullable=False),
        sa.Column("approver", sa.String(200), nullable=False),
        sa.Column("approved_at", TS, nullable=False),
        sa.Column("expires_at", TS, nullable=False),
        sa.Column("totp_step", sa.BigInteger, nullable=False),
        sa.Column("used_at", TS),
        sa.Column("used_by_request", sa.String(300)),
    )
    op.create_index("ix_approvals_binding", "approvals", ["operation", "target", "ticket"])
    op.create_table(
        "audit_events",
        sa.Column("seq", sa.BigInteger, primary_key=True, autoincrement=False),
        sa.Column("at", TS, nullable=False),
        sa.Column("actor", sa.String(200), nullable=False),
        sa.Column("operation", sa.String(64), nullable=False),
        sa.Column("target", sa.String(300)),
        sa.Column("outcome", sa.String(16), nullable=False),
        sa.Column("detail", sa.Text),
        sa.Column("prev_hash", sa.String(64), nullable=False),
        sa.Column("entry_hash", sa.String(64), nullable=False, unique=True),
        sa.CheckConstraint("outcome IN ('ok','denied','error')", name="ck_audit_events_outcome"),
    )
    op.create_index("ix_audit_events_at", "audit_events", ["at"])
    op.create_index("ix_audit_events_actor_at", "audit_events", ["actor", "at"])
    create_append_only_triggers(op.get_bind(), "audit_events")
    op.create_table(
        "audit_anomalies",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("fingerprint", sa.String(300), nullable=False, unique=True),
        sa.Column("kind", sa.String(48), nullable=False),
        sa.Column("severity", sa.String(16), nullable=False),
        sa.Column("principal", sa.String(200)),
        sa.Column("window_start", TS, nullable=False),
        sa.Column("window_end", TS, nullable=False),
        sa.Column("count", sa.Integer, nullable=False),
        sa.Column("detail", sa.Text, nullable=False),
        sa.Column("detected_at", TS, nullable=False),
        sa.Column("reviewed_at", TS),
        sa.Column("reviewed_by", sa.String(200)),
        sa.Column("review_note", sa.Text),
    )


def downgrade() -> None:
    op.drop_table("audit_anomalies")
    op.drop_index("ix_audit_events_actor_at", "audit_events")
    op.drop_index("ix_audit_events_at", "audit_events")
    op.drop_table("audit_events")
    op.drop_index("ix_approvals_binding", "approvals")
    op.drop_table("approvals")
    op.drop_index("ix_approval_requests_binding", "approval_requests")
    op.drop_table("approval_requests")
    op.drop_table("principals")
