"""SQLAlchemy models of the archive vault (T1, core/keys/vault.py). Schema: migrations/versions/0009_vault.py."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import Integer, String, Text, UniqueConstraint
from sqlalchemy.orm import Mapped, mapped_column

from .models import TS, Base

ARCHIVED, UNARCHIVABLE, DELETED = "archived", "unarchivable", "deleted"


class ArchiveCopy(Base):
    """One retired root/service version's copy in the vault (or why it has none)."""

    __tablename__ = "archive_copies"
    __table_args__ = (UniqueConstraint("key_name", "key_version", name="uq_archive_copies"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    key_name: Mapped[str] = mapped_column(String(200))
    key_version: Mapped[int] = mapped_column(Integer)
    status: Mapped[str] = mapped_column(String(16))
    kek_version: Mapped[int | None] = mapped_column(Integer)  # archive KEK version that wraps it
    object_key: Mapped[str | None] = mapped_column(String(300))
    manifest_key: Mapped[str | None] = mapped_column(String(300))
    sha256: Mapped[str | None] = mapped_column(String(64))
    size: Mapped[int | None] = mapped_column(Integer)
    fingerprint: Mapped[str | None] = mapped_column(String(80))
    retired_at: Mapped[datetime] = mapped_column(TS)
    retain_until: Mapped[datetime] = mapped_column(TS)
    archived_at: Mapped[datetime] = mapped_column(TS)
    deleted_at: Mapped[datetime | None] = mapped_column(TS)
    reason: Mapped[str | None] = mapped_column(Text)  # why a version is unarchivable


class ForensicRetrieval(Base):
    """A dual-controlled retrieval of an archive copy into the forensic keystore."""

    __tablename__ = "forensic_retrievals"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    key_name: Mapped[str] = mapped_column(String(200))
    key_version: Mapped[int] = mapped_column(Integer)
    ticket: Mapped[str] = mapped_column(String(200))
    requester: Mapped[str] = mapped_column(String(200))
    approvers: Mapped[str] = mapped_column(Text)  # canonical JSON list
    refs: Mapped[str] = mapped_column(Text)  # canonical JSON list of forensic keystore refs
    retrieved_at: Mapped[datetime] = mapped_column(TS)
    expires_at: Mapped[datetime] = mapped_column(TS)
    purged_at: Mapped[datetime | None] = mapped_column(TS)
    purpose: Mapped[str] = mapped_column(String(32))  # investigation | drill
