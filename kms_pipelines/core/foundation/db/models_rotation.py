"""SQLAlchemy models for rotation (core/keys/rotation.py, service_keys.py, manifest.py,
dependents.py, retention.py). Schema: migrations/versions/0004_rotation.py."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import Index, Integer, LargeBinary, String, Text, UniqueConstraint
from sqlalchemy.orm import Mapped, mapped_column

from .models import TS, Base


class ServiceSeed(Base):
    """Per service-key-version secret (a DEK) wrapped under the root's AES key: "root
    seeds service keys" (P1). Root rotation rewraps every seed under the new root."""

    __tablename__ = "service_seeds"
    __table_args__ = (
        UniqueConstraint("key_name", "key_version", "purpose", name="uq_service_seeds"),
        Index("ix_service_seeds_root", "root_version"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    key_name: Mapped[str] = mapped_column(String(200))
    key_version: Mapped[int] = mapped_column(Integer)
    purpose: Mapped[str] = mapped_column(String(32))
    root_version: Mapped[int] = mapped_column(Integer)  # root version whose AES key wraps it
    wrapped: Mapped[bytes] = mapped_column(LargeBinary)
    created_at: Mapped[datetime] = mapped_column(TS)
    rewrapped_at: Mapped[datetime | None] = mapped_column(TS)


class ServiceCredential(Base):
    """One API credential issued to a client under a service key version. Only a hash of
    the credential is kept, plus (for reissued ones) a copy sealed under the service key
    for the client to pick up."""

    __tablename__ = "service_credentials"
    __table_args__ = (UniqueConstraint("service", "client_id", "key_version", name="uq_service_credentials"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    service: Mapped[str] = mapped_column(String(200))
    client_id: Mapped[str] = mapped_column(String(200))
    key_version: Mapped[int] = mapped_column(Integer)
    issued_at: Mapped[datetime] = mapped_column(TS)
    credential_sha256: Mapped[str] = mapped_column(String(64))
    sealed: Mapped[bytes | None] = mapped_column(LargeBinary)
    picked_up_at: Mapped[datetime | None] = mapped_column(TS)


class RootManifest(Base):
    """A published public-key manifest of a root version (append-only)."""

    __tablename__ = "root_manifests"

    root_version: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    kid: Mapped[str] = mapped_column(String(100))
    fingerprint: Mapped[str] = mapped_column(String(80))
    previous_version: Mapped[int | None] = mapped_column(Integer)
    previous_fingerprint: Mapped[str | None] = mapped_column(String(80))
    object_key: Mapped[str] = mapped_column(String(300))
    sha256: Mapped[str] = mapped_column(String(64))
    published_at: Mapped[datetime] = mapped_column(TS)
    retain_until: Mapped[datetime | None] = mapped_column(TS)


class PartnerNotice(Base):
    """One partner's notice of one root rotation: created with the rotation (same
    transaction), marked notified when delivery succeeded, acked when the partner says so."""

    __tablename__ = "partner_notices"
    __table_args__ = (UniqueConstraint("root_version", "partner", name="uq_partner_notices"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    root_version: Mapped[int] = mapped_column(Integer)
    partner: Mapped[str] = mapped_column(String(200))
    email: Mapped[str] = mapped_column(String(300))
    rotated_at: Mapped[datetime] = mapped_column(TS)
    deadline: Mapped[datetime] = mapped_column(TS)
    notified_at: Mapped[datetime | None] = mapped_column(TS)
    notification_id: Mapped[str | None] = mapped_column(String(64))
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    last_error: Mapped[str | None] = mapped_column(Text)
    acked_at: Mapped[datetime | None] = mapped_column(TS)
    acked_by: Mapped[str | None] = mapped_column(String(200))


class DependentConfirmation(Base):
    """A dependent service confirmed it uses a key version (append-only, T4)."""

    __tablename__ = "dependent_confirmations"
    __table_args__ = (UniqueConstraint("key_name", "key_version", "service", name="uq_dependent_confirmations"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    key_name: Mapped[str] = mapped_column(String(200))
    key_version: Mapped[int] = mapped_column(Integer)
    service: Mapped[str] = mapped_column(String(200))
    confirmed_at: Mapped[datetime] = mapped_column(TS)
    actor: Mapped[str] = mapped_column(String(200))
