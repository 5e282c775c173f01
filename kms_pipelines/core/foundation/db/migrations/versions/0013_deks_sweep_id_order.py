"""The DEK sweep walks in id order: its index becomes (key_name, key_version, id, shard).

The old (key_name, key_version, shard, id) order made each batch a random sample of ids
(``shard`` is a hash), so at 1M DEKs every batch touched pages across a table larger than
shared_buffers. With ``shard`` last, a shard-range sweep still filters on the index tuple
(an index condition: rows of other shards cost an index entry, never a heap fetch). The
old index is dropped, not kept beside it: the sweep's UPDATE changes ``key_version``, so
every rewrapped row is written into every index on ``deks``. Built without CONCURRENTLY
(Alembic runs migrations in a transaction): writes to ``deks`` wait while it builds (README,
"Production").

Revision ID: 0013_deks_sweep_id_order
Revises: 0012_credential_provenance
"""

from alembic import op

revision = "0013_deks_sweep_id_order"
down_revision = "0012_credential_provenance"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_index("ix_deks_sweep_id", "deks", ["key_name", "key_version", "id", "shard"])
    op.drop_index("ix_deks_sweep", "deks")


def downgrade() -> None:
    op.create_index("ix_deks_sweep", "deks", ["key_name", "key_version", "shard", "id"])
    op.drop_index("ix_deks_sweep_id", "deks")
