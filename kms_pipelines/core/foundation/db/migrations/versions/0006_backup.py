"""Backups, restore drills, drill follow-ups, restore points.

Revision ID: 0006_backup
Revises: 0005_rpt
"""

import sqlalchemy as sa
from alembic import op

revision = "0006_backup"
down_revision = "0005_rpt"
branch_labels = None
depends_on = None

TS = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "backups",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("archive_id", sa.String(80), nullable=False, unique=True),
        sa.Column("archive_key", sa.String(400), nullable=False),
        sa.Column("manifest_key", sa.String(400), nullable=False),
        sa.Column("gfs_class", sa.String(16), nullable=False),
        sa.Column("created_at", TS, nullable=False),
        sa.Column("retain_until", TS, nullable=False),
        sa.Column("sha256", sa.String(64)),
        sa.Column("size", sa.BigInteger),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("db_kind", sa.String(16), nullable=False),
        sa.Column("backup_key_version", sa.Integer, nullable=False),
        sa.Column("root_kid", sa.String(80)),
        sa.Column("successor_of", sa.Integer, sa.ForeignKey("backups.id")),
        sa.Column("completed_at", TS),
        sa.Column("verified_at", TS),
        sa.Column("pruned_at", TS),
        sa.Column("detail", sa.Text),
        sa.CheckConstraint("status IN ('uploading','complete','verified','pruned','failed')", name="ck_backups_status"),
        sa.CheckConstraint("gfs_class IN ('nightly','weekly')", name="ck_backups_gfs_class"),
    )
    op.create_index("ix_backups_status_created", "backups", ["status", "created_at"])
    op.create_table(
        "backup_key_refs",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("backup_id", sa.Integer, sa.ForeignKey("backups.id"), nullable=False),
        sa.Column("key_name", sa.String(200), nullable=False),
        sa.Column("version", sa.Integer, nullable=False),
        sa.Column("role", sa.String(32), nullable=False),
        sa.Column("deks", sa.BigInteger),
    )
    op.create_index("ix_backup_key_refs_key", "backup_key_refs", ["key_name", "version"])
    op.create_table(
        "drills",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("drill_date", sa.String(10), nullable=False),
        sa.Column("started_at", TS, nullable=False),
        sa.Column("finished_at", TS),
        sa.Column("archive_id", sa.String(80)),
        sa.Column("outcome", sa.String(16), nullable=False),
        sa.Column("restore_seconds", sa.Float),
        sa.Column("participants", sa.JSON, nullable=False),
        sa.Column("findings", sa.JSON, nullable=False),
        sa.Column("report_path", sa.String(500)),
        sa.Column("report_sha256", sa.String(64)),
    )
    op.create_table(
        "drill_followups",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("drill_id", sa.Integer, sa.ForeignKey("drills.id"), nullable=False),
        sa.Column("title", sa.Text, nullable=False),
        sa.Column("owner", sa.String(200), nullable=False),
        sa.Column("due_at", TS, nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("closed_at", TS),
        sa.Column("closed_by", sa.String(200)),
        sa.Column("resolution", sa.Text),
        sa.CheckConstraint("status IN ('open','closed')", name="ck_drill_followups_status"),
    )


def downgrade() -> None:
    op.drop_table("drill_followups")
    op.drop_table("drills")
    op.drop_index("ix_backup_key_refs_key", "backup_key_refs")
    op.drop_table("backup_key_refs")
    op.drop_index("ix_backups_status_created", "backups")
    op.drop_table("backups")
