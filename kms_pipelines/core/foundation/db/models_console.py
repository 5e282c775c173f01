"""SQLAlchemy models of the browser console's identity (core/access/console_auth.py): FIDO2
credentials, dual-approved registration links, sign-in sessions and WebAuthn ceremonies.

Nothing secret is stored in clear: credentials hold public keys only, and links and
sessions are stored as keyed hashes of the random token the browser holds; credential and
session rows carry an integrity MAC (core/access/console_auth.py).
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import JSON, BigInteger, Boolean, Integer, LargeBinary, String
from sqlalchemy.orm import Mapped, mapped_column

from .models import TS, Base


class ConsoleCredential(Base):
    """A principal's registered FIDO2 authenticator (WebAuthn attested credential data)."""

    __tablename__ = "console_credentials"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    principal: Mapped[str] = mapped_column(String(200), index=True)
    credential_id: Mapped[bytes] = mapped_column(LargeBinary, unique=True)
    credential_data: Mapped[bytes] = mapped_column(LargeBinary)  # AAGUID, id and COSE public key
    sign_count: Mapped[int] = mapped_column(BigInteger)  # newest counter seen; must only grow
    registered_at: Mapped[datetime] = mapped_column(TS)
    registration_link_id: Mapped[int | None] = mapped_column(Integer)  # None: registered by the CLI
    last_used_at: Mapped[datetime | None] = mapped_column(TS)
    mac: Mapped[str] = mapped_column(String(64))  # HMAC over principal, id, data, sign_count (+ origin, hardware)
    origin: Mapped[str | None] = mapped_column(String(300))  # the RP origin it was registered at
    aaguid: Mapped[str | None] = mapped_column(String(36))  # authenticator model, as the key stated it
    attestation: Mapped[str | None] = mapped_column(String(32))  # attestation format ("none", "packed", ...)
    # True unless the attestation verified to a CA in console.attestation_ca_files: nothing else
    # proves the credential lives in a hardware token.
    software: Mapped[bool] = mapped_column(Boolean, default=True)


class ConsoleRegistrationLink(Base):
    """A single-use, expiring link to register one principal's security key, issued under
    dual control (manual operation ``console-registration`` on the principal)."""

    __tablename__ = "console_registration_links"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    principal: Mapped[str] = mapped_column(String(200), index=True)
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    ticket: Mapped[str] = mapped_column(String(200))
    issued_by: Mapped[str] = mapped_column(String(200))
    approvers: Mapped[list[str]] = mapped_column(JSON)
    issued_at: Mapped[datetime] = mapped_column(TS)
    expires_at: Mapped[datetime] = mapped_column(TS)
    used_at: Mapped[datetime | None] = mapped_column(TS)


class ConsoleSession(Base):
    """A signed-in browser session (FIDO2 + TOTP); idle and absolute limits from the policy."""

    __tablename__ = "console_sessions"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    principal: Mapped[str] = mapped_column(String(200), index=True)
    credential_id: Mapped[int] = mapped_column(Integer)
    started_at: Mapped[datetime] = mapped_column(TS)
    last_seen_at: Mapped[datetime] = mapped_column(TS)
    expires_at: Mapped[datetime] = mapped_column(TS)  # absolute limit
    ended_at: Mapped[datetime | None] = mapped_column(TS)
    ended_reason: Mapped[str | None] = mapped_column(String(32))
    mac: Mapped[str] = mapped_column(String(64))  # HMAC over token hash, principal, credential, times


class ConsoleCeremony(Base):
    """One WebAuthn challenge (registration, sign-in or a step-up bound to an action); single-use."""

    __tablename__ = "console_ceremonies"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    handle: Mapped[str] = mapped_column(String(64), unique=True)
    purpose: Mapped[str] = mapped_column(String(16))  # register | signin | step-up
    principal: Mapped[str | None] = mapped_column(String(200))
    binding: Mapped[dict[str, Any] | None] = mapped_column(JSON)  # step-up: the exact action it authorises
    nonce: Mapped[bytes] = mapped_column(LargeBinary)
    challenge: Mapped[bytes] = mapped_column(LargeBinary)
    created_at: Mapped[datetime] = mapped_column(TS)
    expires_at: Mapped[datetime] = mapped_column(TS)
    used_at: Mapped[datetime | None] = mapped_column(TS)
