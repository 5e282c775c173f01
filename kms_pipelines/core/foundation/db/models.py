"""SQLAlchemy models of the KMS state database. Schema changes go through Alembic
(``migrations/versions``); ``tests/test_migrations.py`` checks the two agree."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    String,
    Text,
    UniqueConstraint,
    text,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship


class Base(DeclarativeBase):
    pass


TS = DateTime(timezone=True)

# Key version states (docs/architecture.md, "Keys, versions and states").
PENDING, ACTIVE, ROTATED, REVOKED, DESTROYED = "pending", "active", "rotated", "revoked", "destroyed"
STATES = (PENDING, ACTIVE, ROTATED, REVOKED, DESTROYED)


class Key(Base):
    __tablename__ = "keys"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(200), unique=True)
    key_class: Mapped[str] = mapped_column(String(32))
    created_at: Mapped[datetime] = mapped_column(TS)
    attributes: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)

    versions: Mapped[list[KeyVersion]] = relationship(back_populates="key", order_by="KeyVersion.version")


class KeyVersion(Base):
    __tablename__ = "key_versions"
    __table_args__ = (
        UniqueConstraint("key_id", "version", name="uq_key_versions_key_version"),
        # Exactly one active version per key, held by the database itself.
        Index(
            "uq_key_versions_one_active",
            "key_id",
            unique=True,
            sqlite_where=text("state = 'active'"),
            postgresql_where=text("state = 'active'"),
        ),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    key_id: Mapped[int] = mapped_column(ForeignKey("keys.id"))
    version: Mapped[int] = mapped_column(Integer)
    state: Mapped[str] = mapped_column(String(16))
    wrap_ref: Mapped[str | None] = mapped_column(String(200))
    sign_ref: Mapped[str | None] = mapped_column(String(200))
    public_key: Mapped[bytes | None] = mapped_column(LargeBinary)
    fingerprint: Mapped[str | None] = mapped_column(String(80))
    created_at: Mapped[datetime] = mapped_column(TS)
    activated_at: Mapped[datetime | None] = mapped_column(TS)
    rotated_at: Mapped[datetime | None] = mapped_column(TS)
    revoked_at: Mapped[datetime | None] = mapped_column(TS)
    destroyed_at: Mapped[datetime | None] = mapped_column(TS)
    expires_at: Mapped[datetime | None] = mapped_column(TS)

    key: Mapped[Key] = relationship(back_populates="versions")

    @property
    def label(self) -> str:
        return f"{self.key.name}#v{self.version}"


class LedgerEntry(Base):
    """One key-state change. Append-only: database triggers refuse UPDATE and DELETE."""

    __tablename__ = "ledger_entries"

    seq: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    at: Mapped[datetime] = mapped_column(TS)
    key_name: Mapped[str] = mapped_column(String(200))
    key_version: Mapped[int | None] = mapped_column(Integer)
    from_state: Mapped[str | None] = mapped_column(String(16))
    to_state: Mapped[str] = mapped_column(String(16))
    actor: Mapped[str] = mapped_column(String(200))
    approvers: Mapped[str] = mapped_column(Text, default="[]")  # canonical JSON list
    change_ticket: Mapped[str | None] = mapped_column(String(200))
    reason: Mapped[str | None] = mapped_column(Text)
    event_id: Mapped[str | None] = mapped_column(String(200))
    prev_hash: Mapped[str] = mapped_column(String(64))
    entry_hash: Mapped[str] = mapped_column(String(64), unique=True)
