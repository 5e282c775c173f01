"""Rotation evidence: public-key manifests, partner notices and acks, dependent confirmations.

Revision ID: 0004_rotation
Revises: 0003_envelope
"""

import sqlalchemy as sa
from alembic import op

from kms_pipelines.core.foundation.db.append_only import create_append_only_triggers, drop_append_only_triggers

revision = "0004_rotation"
down_revision = "0003_envelope"
branch_labels = None
depends_on = None

TS = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "service_seeds",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("key_name", sa.String(200), nullable=False),
        sa.Column("key_version", sa.Integer, nullable=False),
        sa.Column("purpose", sa.String(32), nullable=False),
        sa.Column("root_version", sa.Integer, nullable=False),
        sa.Column("wrapped", sa.LargeBinary, nullable=False),
        sa.Column("created_at", TS, nullable=False),
        sa.Column("rewrapped_at", TS),
        sa.UniqueConstraint("key_name", "key_version", "purpose", name="uq_service_seeds"),
    )
    op.create_index("ix_service_seeds_root", "service_seeds", ["root_version"])
    op.create_table(
        "service_credentials",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("service", sa.String(200), nullable=False),
        sa.Column("client_id", sa.String(200), nullable=False),
        sa.Column("key_version", sa.Integer, nullable=False),
        sa.Column("issued_at", TS, nullable=False),
        sa.Column("credential_sha256", sa.String(64), nullable=False),
        sa.Column("sealed", sa.LargeBinary),
        sa.Column("picked_up_at", TS),
        sa.UniqueConstraint("service", "client_id", "key_version", name="uq_service_credentials"),
    )
    op.create_table(
        "root_manifests",
        sa.Column("root_version", sa.Integer, primary_key=True, autoincrement=False),
        sa.Column("kid", sa.String(100), nullable=False),
        sa.Column("fingerprint", sa.String(80), nullable=False),
        sa.Column("previous_version", sa.Integer),
        sa.Column("previous_fingerprint", sa.String(80)),
        sa.Column("object_key", sa.String(300), nullable=False),
        sa.Column("sha256", sa.String(64), nullable=False),
        sa.Column("published_at", TS, nullable=False),
        sa.Column("retain_until", TS),
    )
    create_append_only_triggers(op.get_bind(), "root_manifests")
    op.create_table(
        "partner_notices",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("root_version", sa.Integer, nullable=False),
        sa.Column("partner", sa.String(200), nullable=False),
        sa.Column("email", sa.String(300), nullable=False),
        sa.Column("rotated_at", TS, nullable=False),
        sa.Column("deadline", TS, nullable=False),
        sa.Column("notified_at", TS),
        sa.Column("notification_id", sa.String(64)),
        sa.Column("attempts", sa.Integer, nullable=False, server_default="0"),
        sa.Column("last_error", sa.Text),
        sa.Column("acked_at", TS),
        sa.Column("acked_by", sa.String(200)),
        sa.UniqueConstraint("root_version", "partner", name="uq_partner_notices"),
    )
    op.create_table(
        "dependent_confirmations",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("key_name", sa.String(200), nullable=False),
        sa.Column("key_version", sa.Integer, nullable=False),
        sa.Column("service", sa.String(200), nullable=False),
        sa.Column("confirmed_at", TS, nullable=False),
        sa.Column("actor", sa.String(200), nullable=False),
        sa.UniqueConstraint("key_name", "key_version", "service", name="uq_dependent_confirmations"),
    )
    create_append_only_triggers(op.get_bind(), "dependent_confirmations")


def downgrade() -> None:
    bind = op.get_bind()
    for table in ("dependent_confirmations", "root_manifests"):
        drop_append_only_triggers(bind, table)
    op.drop_table("dependent_confirmations")
    op.drop_table("partner_notices")
    op.drop_table("root_manifests")
    op.drop_table("service_credentials")
    op.drop_index("ix_service_seeds_root", "service_seeds")
    op.drop_table("service_seeds")
