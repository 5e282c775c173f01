"""SQLAlchemy models for security events, notification deliveries and break-glass escrow
(core/response/events.py, core/response/compromise.py, core/access/notifications.py, core/response/escrow.py).

Schema changes go through migration ``0007_events_escrow``."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import JSON, Boolean, CheckConstraint, ForeignKey, Index, Integer, String, Text, UniqueConstraint, text
from sqlalchemy.orm import Mapped, mapped_column

from .models import TS, Base

# security_events.status
EVENT_NEW, EVENT_RESPONDING, EVENT_RESOLVED = "new", "responding", "resolved"


class SecurityEvent(Base):
    """A reported compromise / CI-secret exposure / tenant rotation (R2). ``seq`` orders
    events for the sensor cursor; ``id`` is what run keys and ledger entries name."""

    __tablename__ = "security_events"
    __table_args__ = (
        CheckConstraint(
            "type IN ('compromise','ci-secret-exposure','tenant-rotation')", name="ck_security_events_type"
        ),
        CheckConstraint("status IN ('new','responding','resolved')", name="ck_security_events_status"),
        Index("ix_security_events_key", "key_name", "status"),
    )

    seq: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    id: Mapped[str] = mapped_column(String(64), unique=True)
    type: Mapped[str] = mapped_column(String(32))
    key_name: Mapped[str] = mapped_column(String(200))
    key_version: Mapped[int] = mapped_column(Integer)  # the version active when reported
    source: Mapped[str] = mapped_column(String(200))
    detail: Mapped[str] = mapped_column(Text, default="")
    reported_at: Mapped[datetime] = mapped_column(TS)
    reported_by: Mapped[str] = mapped_column(String(200))
    status: Mapped[str] = mapped_column(String(16), default=EVENT_NEW)
    response_run_id: Mapped[str | None] = mapped_column(String(200))
    resolved_at: Mapped[datetime | None] = mapped_column(TS)
    response: Mapped[dict[str, Any] | None] = mapped_column(JSON)  # summary of what the response did (no key material)


class NotificationDelivery(Base):
    """One delivery outcome per channel of one policy notification. Append-only."""

    __tablename__ = "notification_deliveries"
    __table_args__ = (Index("ix_notification_deliveries_at", "at"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    at: Mapped[datetime] = mapped_column(TS)
    notification_id: Mapped[str] = mapped_column(String(64))
    kind: Mapped[str] = mapped_column(String(64))
    ref: Mapped[str | None] = mapped_column(String(200))
    subject: Mapped[str] = mapped_column(Text)
    audience: Mapped[str] = mapped_column(String(64))  # e.g. "compliance+security"
    channel: Mapped[str] = mapped_column(String(32))  # outbox | email | slack
    target: Mapped[str] = mapped_column(String(300), default="")
    ok: Mapped[bool] = mapped_column(Boolean)
    skipped: Mapped[bool] = mapped_column(Boolean, default=False)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    error: Mapped[str | None] = mapped_column(Text)


class EscrowCustodian(Base):
    """A break-glass custodian (listed in the policy) and their age X25519 recipient."""

    __tablename__ = "escrow_custodians"

    name: Mapped[str] = mapped_column(String(100), primary_key=True)
    recipient: Mapped[str] = mapped_column(String(200))  # "age1…" public key
    enrolled_at: Mapped[datetime] = mapped_column(TS)
    enrolled_by: Mapped[str] = mapped_column(String(200))


class EscrowPackage(Base):
    """A sealed M-of-N package of one break-glass key version (P4, R4)."""

    __tablename__ = "escrow_packages"
    __table_args__ = (
        # At most one current (not superseded) package per key.
        Index(
            "uq_escrow_packages_one_current",
            "key_name",
            unique=True,
            sqlite_where=text("superseded_at IS NULL"),
            postgresql_where=text("superseded_at IS NULL"),
        ),
    )

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    key_name: Mapped[str] = mapped_column(String(200))
    key_version: Mapped[int] = mapped_column(Integer)
    created_at: Mapped[datetime] = mapped_column(TS)
    superseded_at: Mapped[datetime | None] = mapped_column(TS)
    threshold: Mapped[int] = mapped_column(Integer)
    custodians: Mapped[list[str]] = mapped_column(JSON)
    object_key: Mapped[str] = mapped_column(String(300))
    sha256: Mapped[str] = mapped_column(String(64))
    erased_at: Mapped[datetime | None] = mapped_column(TS)  # our stored copy deleted
    created_by: Mapped[str] = mapped_column(String(200))
    reason: Mapped[str] = mapped_column(String(200))


class EscrowDestruction(Base):
    """A custodian's confirmation that their copy of a superseded package is destroyed. Append-only."""

    __tablename__ = "escrow_destructions"
    __table_args__ = (UniqueConstraint("package_id", "custodian", name="uq_escrow_destructions_pkg_custodian"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    package_id: Mapped[str] = mapped_column(ForeignKey("escrow_packages.id"))
    custodian: Mapped[str] = mapped_column(String(100))
    confirmed_at: Mapped[datetime] = mapped_column(TS)
    confirmed_by: Mapped[str] = mapped_column(String(200))


class EscrowUnseal(Base):
    """Evidence of one break-glass unseal (who, why, approvals, shares used). Append-only."""

    __tablename__ = "escrow_unseals"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    package_id: Mapped[str] = mapped_column(ForeignKey("escrow_packages.id"))
    at: Mapped[datetime] = mapped_column(TS)
    requester: Mapped[str] = mapped_column(String(200))
    ticket: Mapped[str] = mapped_column(String(200))
    approvers: Mapped[list[str]] = mapped_column(JSON)
    custodians: Mapped[list[str]] = mapped_column(JSON)
    key_version: Mapped[int] = mapped_column(Integer)
