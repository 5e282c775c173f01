"""Console identity: FIDO2 credentials, registration links, sessions, WebAuthn ceremonies.

Revision ID: 0008_console
Revises: 0007_events_escrow
"""

import sqlalchemy as sa
from alembic import op

revision = "0008_console"
down_revision = "0007_events_escrow"
branch_labels = None
depends_on = None

TS = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "console_credentials",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("principal", sa.String(200), nullable=False),
        sa.Column("credential_id", sa.LargeBinary, nullable=False, unique=True),
        sa.Column("credential_data", sa.LargeBinary, nullable=False),
        sa.Column("sign_count", sa.BigInteger, nullable=False),
        sa.Column("registered_at", TS, nullable=False),
        sa.Column("registration_link_id", sa.Integer, nullable=False),
        sa.Column("last_used_at", TS),
        sa.Column("mac", sa.String(64), nullable=False),
    )
    op.create_index("ix_console_credentials_principal", "console_credentials", ["principal"])
    op.create_table(
        "console_registration_links",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("principal", sa.String(200), nullable=False),
        sa.Column("token_hash", sa.String(64), nullable=False, unique=True),
        sa.Column("ticket", sa.String(200), nullable=False),
        sa.Column("issued_by", sa.String(200), nullable=False),
        sa.Column("approvers", sa.JSON, nullable=False),
        sa.Column("issued_at", TS, nullable=False),
        sa.Column("expires_at", TS, nullable=False),
        sa.Column("used_at", TS),
    )
    op.create_index("ix_console_registration_links_principal", "console_registration_links", ["principal"])
    op.create_table(
        "console_sessions",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("token_hash", sa.String(64), nullable=False, unique=True),
        sa.Column("principal", sa.String(200), nullable=False),
        sa.Column("credential_id", sa.Integer, nullable=False),
        sa.Column("started_at", TS, nullable=False),
        sa.Column("last_seen_at", TS, nullable=False),
        sa.Column("expires_at", TS, nullable=False),
        sa.Column("ended_at", TS),
        sa.Column("ended_reason", sa.String(32)),
        sa.Column("mac", sa.String(64), nullable=False),
    )
    op.create_index("ix_console_sessions_principal", "console_sessions", ["principal"])
    op.create_table(
        "console_ceremonies",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("handle", sa.String(64), nullable=False, unique=True),
        sa.Column("purpose", sa.String(16), nullable=False),
        sa.Column("principal", sa.String(200)),
        sa.Column("binding", sa.JSON),
        sa.Column("nonce", sa.LargeBinary, nullable=False),
        sa.Column("challenge", sa.LargeBinary, nullable=False),
        sa.Column("created_at", TS, nullable=False),
        sa.Column("expires_at", TS, nullable=False),
        sa.Column("used_at", TS),
        sa.CheckConstraint("purpose IN ('register','signin','step-up')", name="ck_console_ceremonies_purpose"),
    )


def downgrade() -> None:
    for table in ("console_ceremonies", "console_sessions", "console_registration_links", "console_credentials"):
        op.drop_table(table)
