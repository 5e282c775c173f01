"""SQLAlchemy models for envelope (see core/envelope/data_keys.py, core/envelope/export_keys.py).

``deks``: one row per data-encryption key, i.e. per encrypted object. The DEK itself is
stored only wrapped under a key version (``key_name``, ``key_version``); ``shard`` is a
stable hash of the object id in ``[0, SHARD_SPACE)`` fixed at insert, so a sweep
partition selects its rows by a range without recomputing anything.
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import (
    BigInteger,
    CheckConstraint,
    DateTime,
    Index,
    Integer,
    LargeBinary,
    String,
    Table,
    UniqueConstraint,
)
from sqlalchemy.orm import Mapped, mapped_column

from .models import Base  # noqa: F401

TS = DateTime(timezone=True)
# BIGINT on PostgreSQL; SQLite only auto-assigns ids to an INTEGER PRIMARY KEY.
DEK_ID = BigInteger().with_variant(Integer(), "sqlite")

SHARD_SPACE = 1024  # virtual shards; a sweep partition i of n covers [i*1024//n, (i+1)*1024//n)


class Dek(Base):
    __tablename__ = "deks"
    __table_args__ = (
        UniqueConstraint("key_name", "object_id", name="uq_deks_key_object"),
        # The sweep reads (key, old version, shard range) in id order: keyset pagination on id,
        # with the shard range checked on the index tuple (migration 0013 says why id first).
        Index("ix_deks_sweep_id", "key_name", "key_version", "id", "shard"),
        CheckConstraint("shard >= 0 AND shard < 1024", name="ck_deks_shard"),
        CheckConstraint("wrapped IS NOT NULL OR shredded_at IS NOT NULL", name="ck_deks_wrapped_or_shredded"),
        {"sqlite_autoincrement": True},  # never reuse a DEK id (blobs name their DEK by id)
    )

    id: Mapped[int] = mapped_column(DEK_ID, primary_key=True, autoincrement=True)
    key_name: Mapped[str] = mapped_column(String(200))
    key_version: Mapped[int] = mapped_column(Integer)
    # NULL once crypto-shredded (its wrapping version destroyed on purpose, e.g. export expiry).
    wrapped: Mapped[bytes | None] = mapped_column(LargeBinary)
    object_id: Mapped[str] = mapped_column(String(500))
    shard: Mapped[int] = mapped_column(Integer)
    created_at: Mapped[datetime] = mapped_column(TS)
    rewrapped_at: Mapped[datetime | None] = mapped_column(TS)
    shredded_at: Mapped[datetime | None] = mapped_column(TS)


# Bulk UPDATEs of deks run as Core statements on the table (no ORM session synchronisation over
# thousands of rows); declarative types ``__table__`` as the wider FromClause, so narrow it once.
assert isinstance(Dek.__table__, Table)
DEKS: Table = Dek.__table__
