"""SQLAlchemy models for access control and audit (core/access/principals.py, core/ledger/audit.py).

``audit_events`` is append-only (database triggers refuse UPDATE/DELETE) and hash-chained.
No column here ever holds key material: TOTP secrets are stored sealed by the keystore.
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import JSON, BigInteger, Index, Integer, LargeBinary, String, Text
from sqlalchemy.orm import Mapped, mapped_column

from .models import TS, Base


class Principal(Base):
    """A human (roles + TOTP enrolment) or workload principal."""

    __tablename__ = "principals"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(200), unique=True)
    kind: Mapped[str] = mapped_column(String(16))  # human | workload
    roles: Mapped[list[str]] = mapped_column(JSON, default=list)
    totp_sealed: Mapped[bytes | None] = mapped_column(LargeBinary)  # keystore-sealed base32 secret
    totp_last_step: Mapped[int | None] = mapped_column(BigInteger)  # newest accepted time-step (replay refusal)
    created_at: Mapped[datetime] = mapped_column(TS)
    disabled_at: Mapped[datetime | None] = mapped_column(TS)
    # A4 cooling-off: approvals by this principal count only from this time on (None: never).
    approve_after: Mapped[datetime | None] = mapped_column(TS)
    # Online guessing of 6-digit codes: wrong codes in a row lock TOTP for a while.
    totp_failures: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    totp_locked_until: Mapped[datetime | None] = mapped_column(TS)


class ApprovalRequest(Base):
    """A manual operation waiting for (or done with) its dual-control approvals."""

    __tablename__ = "approval_requests"
    __table_args__ = (Index("ix_approval_requests_binding", "operation", "target", "ticket"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    operation: Mapped[str] = mapped_column(String(32))
    target: Mapped[str] = mapped_column(String(300))
    ticket: Mapped[str] = mapped_column(String(200))
    requester: Mapped[str] = mapped_column(String(200))
    requested_at: Mapped[datetime] = mapped_column(TS)
    completed_at: Mapped[datetime | None] = mapped_column(TS)


class Approval(Base):
    """One principal's TOTP-verified approval of exactly (operation, target, ticket); single-use."""

    __tablename__ = "approvals"
    __table_args__ = (Index("ix_approvals_binding", "operation", "target", "ticket"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    operation: Mapped[str] = mapped_column(String(32))
    target: Mapped[str] = mapped_column(String(300))
    ticket: Mapped[str] = mapped_column(String(200))
    approver: Mapped[str] = mapped_column(String(200))
    approved_at: Mapped[datetime] = mapped_column(TS)
    expires_at: Mapped[datetime] = mapped_column(TS)
    totp_step: Mapped[int] = mapped_column(BigInteger)
    used_at: Mapped[datetime | None] = mapped_column(TS)
    used_by_request: Mapped[str | None] = mapped_column(String(300))


class AuditEvent(Base):
    """One KMS operation (A3). Append-only, hash-chained like the ledger."""

    __tablename__ = "audit_events"
    __table_args__ = (Index("ix_audit_events_at", "at"), Index("ix_audit_events_actor_at", "actor", "at"))

    seq: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    at: Mapped[datetime] = mapped_column(TS)
    actor: Mapped[str] = mapped_column(String(200))
    operation: Mapped[str] = mapped_column(String(64))
    target: Mapped[str | None] = mapped_column(String(300))
    outcome: Mapped[str] = mapped_column(String(16))  # ok | denied | error
    detail: Mapped[str | None] = mapped_column(Text)  # canonical JSON object, hashed as stored
    prev_hash: Mapped[str] = mapped_column(String(64))
    entry_hash: Mapped[str] = mapped_column(String(64), unique=True)


class AuditAnomaly(Base):
    """A finding of the anomaly detector; reviewed by a principal with ``read``."""

    __tablename__ = "audit_anomalies"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    fingerprint: Mapped[str] = mapped_column(String(300), unique=True)
    kind: Mapped[str] = mapped_column(String(48))
    severity: Mapped[str] = mapped_column(String(16))
    principal: Mapped[str | None] = mapped_column(String(200))
    window_start: Mapped[datetime] = mapped_column(TS)
    window_end: Mapped[datetime] = mapped_column(TS)
    count: Mapped[int] = mapped_column(Integer)
    detail: Mapped[str] = mapped_column(Text)
    detected_at: Mapped[datetime] = mapped_column(TS)
    reviewed_at: Mapped[datetime | None] = mapped_column(TS)
    reviewed_by: Mapped[str | None] = mapped_column(String(200))
    review_note: Mapped[str | None] = mapped_column(Text)
