"""Principals: the earliest time each may approve (cooling-off, A4) and a TOTP lockout after
repeated wrong codes; the ledger, audit log and RPT chain refuse an entry older than the
previous one (database triggers).

Revision ID: 0011_principal_trust
Revises: 0010_sweep_leases
"""

import sqlalchemy as sa
from alembic import op

from kms_pipelines.core.foundation.db.append_only import create_time_order_trigger, drop_time_order_trigger

revision = "0011_principal_trust"
down_revision = "0010_sweep_leases"
branch_labels = None
depends_on = None

CHAINS = (("ledger_entries", "at"), ("audit_events", "at"), ("rpts", "iat"))


def upgrade() -> None:
    with op.batch_alter_table("principals") as batch:
        batch.add_column(sa.Column("approve_after", sa.DateTime(timezone=True)))
        batch.add_column(sa.Column("totp_failures", sa.Integer, nullable=False, server_default="0"))
        batch.add_column(sa.Column("totp_locked_until", sa.DateTime(timezone=True)))
    # Principals enrolled before this revision keep approving: their enrolment predates the rule.
    op.execute("UPDATE principals SET approve_after = created_at")
    for table, column in CHAINS:
        create_time_order_trigger(op.get_bind(), table, column)


def downgrade() -> None:
    for table, _ in CHAINS:
        drop_time_order_trigger(op.get_bind(), table)
    with op.batch_alter_table("principals") as batch:
        batch.drop_column("totp_locked_until")
        batch.drop_column("totp_failures")
        batch.drop_column("approve_after")
