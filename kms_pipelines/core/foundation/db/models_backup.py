"""SQLAlchemy models for backup (see core/backup/backups.py, core/backup/restore.py, core/backup/drills.py).

``backups`` is the catalogue of archives in the object store (status moves
uploading → complete → verified → pruned; ``failed`` for an upload that never
completed); ``backup_key_refs`` the key versions each archive depends on (the
restore-point destroy guard reads it); ``drills`` / ``drill_followups`` the drill
evidence compliance reads.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import JSON, BigInteger, Float, ForeignKey, Index, Integer, String, Text
from sqlalchemy.orm import Mapped, mapped_column

from .models import TS, Base

UPLOADING, COMPLETE, VERIFIED, PRUNED, FAILED = "uploading", "complete", "verified", "pruned", "failed"
BACKUP_STATUSES = (UPLOADING, COMPLETE, VERIFIED, PRUNED, FAILED)
GOOD_STATUSES = (COMPLETE, VERIFIED)


class Backup(Base):
    __tablename__ = "backups"
    __table_args__ = (Index("ix_backups_status_created", "status", "created_at"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    archive_id: Mapped[str] = mapped_column(String(80), unique=True)
    archive_key: Mapped[str] = mapped_column(String(400))
    manifest_key: Mapped[str] = mapped_column(String(400))
    gfs_class: Mapped[str] = mapped_column(String(16))
    created_at: Mapped[datetime] = mapped_column(TS)
    retain_until: Mapped[datetime] = mapped_column(TS)
    sha256: Mapped[str | None] = mapped_column(String(64))
    size: Mapped[int | None] = mapped_column(BigInteger)
    status: Mapped[str] = mapped_column(String(16))
    db_kind: Mapped[str] = mapped_column(String(16))
    backup_key_version: Mapped[int] = mapped_column(Integer)
    root_kid: Mapped[str | None] = mapped_column(String(80))
    successor_of: Mapped[int | None] = mapped_column(ForeignKey("backups.id"))
    completed_at: Mapped[datetime | None] = mapped_column(TS)
    verified_at: Mapped[datetime | None] = mapped_column(TS)
    pruned_at: Mapped[datetime | None] = mapped_column(TS)
    detail: Mapped[str | None] = mapped_column(Text)


class BackupKeyRef(Base):
    __tablename__ = "backup_key_refs"
    __table_args__ = (Index("ix_backup_key_refs_key", "key_name", "version"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    backup_id: Mapped[int] = mapped_column(ForeignKey("backups.id"))
    key_name: Mapped[str] = mapped_column(String(200))
    version: Mapped[int] = mapped_column(Integer)
    role: Mapped[str] = mapped_column(String(32))  # "data" (ciphertext in the dump) | "archive" (encrypts it)
    deks: Mapped[int | None] = mapped_column(BigInteger)


class Drill(Base):
    __tablename__ = "drills"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    drill_date: Mapped[str] = mapped_column(String(10))  # YYYY-MM-DD
    started_at: Mapped[datetime] = mapped_column(TS)
    finished_at: Mapped[datetime | None] = mapped_column(TS)
    archive_id: Mapped[str | None] = mapped_column(String(80))
    outcome: Mapped[str] = mapped_column(String(16))  # passed | failed
    restore_seconds: Mapped[float | None] = mapped_column(Float)
    participants: Mapped[list[str]] = mapped_column(JSON, default=list)
    findings: Mapped[list[Any]] = mapped_column(JSON, default=list)
    report_path: Mapped[str | None] = mapped_column(String(500))
    report_sha256: Mapped[str | None] = mapped_column(String(64))


class DrillFollowup(Base):
    __tablename__ = "drill_followups"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    drill_id: Mapped[int] = mapped_column(ForeignKey("drills.id"))
    title: Mapped[str] = mapped_column(Text)
    owner: Mapped[str] = mapped_column(String(200))
    due_at: Mapped[datetime] = mapped_column(TS)
    status: Mapped[str] = mapped_column(String(16))  # open | closed
    closed_at: Mapped[datetime | None] = mapped_column(TS)
    closed_by: Mapped[str | None] = mapped_column(String(200))
    resolution: Mapped[str | None] = mapped_column(Text)
