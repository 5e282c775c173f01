"""Console credentials: where each was registered (the origin its assertions are checked
against, so the CLI verifies a key registered in the browser), its authenticator model
(AAGUID), attestation format and whether it is a software authenticator; a credential
registered by the first-run ceremony or `kms principals register-key` has no link.

Revision ID: 0012_credential_provenance
Revises: 0011_principal_trust
"""

import sqlalchemy as sa
from alembic import op

revision = "0012_credential_provenance"
down_revision = "0011_principal_trust"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("console_credentials") as batch:
        batch.add_column(sa.Column("origin", sa.String(300)))
        batch.add_column(sa.Column("aaguid", sa.String(36)))
        batch.add_column(sa.Column("attestation", sa.String(32)))
        # Credentials registered before this revision carried no verified attestation.
        batch.add_column(sa.Column("software", sa.Boolean, nullable=False, server_default=sa.true()))
        batch.alter_column("registration_link_id", existing_type=sa.Integer, nullable=True)


def downgrade() -> None:
    with op.batch_alter_table("console_credentials") as batch:
        batch.alter_column("registration_link_id", existing_type=sa.Integer, nullable=False)
        batch.drop_column("software")
        batch.drop_column("attestation")
        batch.drop_column("aaguid")
        batch.drop_column("origin")
