"""Console identity (clause A2): a human signs in to ``kms console`` with a FIDO2 security
key *and* a TOTP code, and confirms each manual-operation action with a fresh assertion.

* **Relying party** (Yubico ``fido2``): user verification is required on every ceremony and
  the client origin must equal the console's configured origin exactly.
* **Registration** happens once per key, through a link issued under dual control: the
  manual operation ``console-registration`` on the principal, approved like any other
  (``core.access.principals``). The link is single-use and expires after ``console.registration_link_hours``.
  Registering also proves the principal's TOTP, so the key is bound to the enrolled person.
* **Sign-in** uses a discoverable credential: the key says which credential it holds and the
  console refuses one it does not know, one of another principal, and a sign count that did
  not grow (a cloned authenticator). The TOTP code is checked with the CLI's replay rule
  (``check_totp`` is the one place that calls it).
* **Step-up**: an approval or launch is confirmed by an assertion whose challenge is
  SHA-256 over (principal, action, operation, target, ticket, nonce), so a stolen session
  cookie cannot approve, and a confirmation for one action cannot be spent on another.
  ``access.approve`` itself demands such an assertion (``verify_approval``) besides the TOTP
  code, so the console and ``kms approve`` (a FIDO2 client: ``kms_pipelines/fido2_client.py``)
  take the same path and no approval rests on TOTP alone.
* **Software authenticators**: a credential counts as a hardware token only when its
  registration carried an attestation that verifies to a CA in
  ``console.attestation_ca_files``; any other credential (the KMS software authenticator, a
  key registered with "none" attestation) is recorded as software, refused at sign-in and
  approval unless ``console.allow_software_authenticators`` (the demo's and tests' policies),
  and named by A2. Each credential records its origin, AAGUID and attestation format.
* **Sessions** are random tokens held by the browser (only their hash is stored), ended
  after ``console.session_idle_minutes`` idle or ``console.session_absolute_hours``.

* **Integrity**: session and link tokens are stored as HMACs, and every credential and session
  row carries an HMAC over its fields, under a key derived from an Ed25519 signature by the
  keystore (``INTEGRITY_REF``). Someone who can write the database but not use the keystore
  cannot mint a session, rewind a sign count, move a session to another principal or plant a
  credential: such rows are refused, and A2 does not count them.

Every sign-in, refusal, registration, link and step-up is written to the audit chain. No
secret is stored in clear or written to the audit: credentials are public keys, tokens are
hashed, credential ids appear as a short hash.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta

from fido2.webauthn import (
    AttestedCredentialData,
    UserVerificationRequirement,
)
from sqlalchemy import select
from sqlalchemy.orm import Session

from ..foundation.clock import utc
from ..foundation.context import KmsContext
from ..foundation.db.models_access import Principal
from ..foundation.db.models_console import ConsoleCeremony, ConsoleCredential, ConsoleRegistrationLink, ConsoleSession
from ..ledger import audit
from . import principals as access
from .webauthn import (
    ApprovalChallenge,
    RelyingParty,
    _audited,
    _bound_challenge,
    _denied,
    _mac,
    _new_ceremony,
    _options,
    _provenance,
    _registration_options,
    _short,
    _store_credential,
    _take_ceremony,
    _verify_assertion,
    approval_binding,
    begin_step_up,
    credential_intact,
)

REGISTRATION_OPERATION = "console-registration"
# The AAGUID the KMS software authenticator (kms_pipelines/fido2_client.py) states: a label,
# not a proof (anyone can state any AAGUID); only a verified attestation makes a credential hardware.
SOFTWARE_AAGUID = uuid.UUID("6b6d732d-736f-6674-7761-72652d666964")


def _hash(ctx: KmsContext, kind: str, token: str) -> str:
    return _mac(ctx, kind, token)


def _session_mac(ctx: KmsContext, row: ConsoleSession) -> str:
    return _mac(ctx, "session", row.token_hash, row.principal, row.credential_id, row.started_at, row.expires_at)


# ---- TOTP: the one call into the CLI's rule ------------------------------------------


def check_totp(ctx: KmsContext, session: Session, name: str, code: str) -> str:
    """Verify ``name``'s TOTP ``code`` with the CLI's replay rule, inside the caller's
    transaction: ``access.prove_principal``, the one identity check of core."""
    return access.prove_principal(ctx, name, code, session=session)


def _console_principal(session: Session, name: str) -> Principal:
    p = access._principal(session, name)
    if p is None or p.kind != "human" or not p.roles:
        raise _denied("permission", f"{name!r} is not an enrolled human principal with a role", name)
    if p.disabled_at is not None:
        raise _denied("permission", f"principal {name!r} is disabled", name)
    return p


# ---- registration links (dual control) ----------------------------------------------


@dataclass
class IssuedLink:
    token: str  # shown once to the issuing admin; only its hash is stored
    principal: str
    ticket: str
    approvers: list[str]
    expires_at: datetime

    def __repr__(self) -> str:
        return f"IssuedLink(principal={self.principal!r}, ticket={self.ticket!r}, expires_at={self.expires_at})"

    def url(self, origin: str) -> str:
        return f"{origin.rstrip('/')}/register/{self.token}"


def request_registration(ctx: KmsContext, principal: str, *, ticket: str, requested_by: str) -> int:
    """Record the request for a registration link, so approvers find it (manual operation)."""

    def run():
        with ctx.transaction() as s:
            _console_principal(s, principal)
        access.require_permission(ctx, requested_by, REGISTRATION_OPERATION, target=principal)
        return access.request_approval(
            ctx, operation=REGISTRATION_OPERATION, target=principal, ticket=ticket, requester=requested_by
        )

    return _audited(ctx, "console.link.request", requested_by, principal, run, {"ticket": ticket})


def issue_registration_link(ctx: KmsContext, principal: str, *, ticket: str, requested_by: str) -> IssuedLink:
    """A registration link for ``principal``, once ``approvals_required`` other principals
    approved ``console-registration`` of them under ``ticket`` (the approvals are consumed)."""
    request_registration(ctx, principal, ticket=ticket, requested_by=requested_by)
    token = secrets.token_urlsafe(32)
    now = ctx.now()
    expires = now + timedelta(hours=ctx.policy.console.registration_link_hours)
    with ctx.transaction() as s:
        approvers = access.consume_approvals(
            s, ctx, operation=REGISTRATION_OPERATION, target=principal, ticket=ticket, requester=requested_by
        )
        if principal in approvers:  # rolls the consumption back with the transaction
            denied = _denied(
                "self_approval",
                f"{principal!r} approved the registration of their own key; reject "
                f"request and ask two other principals",
                requested_by,
            )
            audit.emit(
                ctx,
                at=now,
                operation="console.link.issue",
                actor=requested_by,
                target_ref=principal,
                outcome="denied",
                detail={"reason": denied.reason, "ticket": ticket},
            )
            raise denied
        row = ConsoleRegistrationLink(
            principal=principal,
            token_hash=_hash(ctx, "link", token),
            ticket=ticket,
            issued_by=requested_by,
            approvers=approvers,
            issued_at=now,
            expires_at=expires,
        )
        s.add(row)
        s.flush()
        audit.record(
            s,
            at=now,
            operation="console.link.issue",
            actor=requested_by,
            target=principal,
            outcome="ok",
            detail={"ticket": ticket, "approvers": approvers, "link": row.id, "expires_at": expires},
        )
    return IssuedLink(token, principal, ticket, approvers, expires)


def _valid_link(session: Session, ctx: KmsContext, token: str, *, lock: bool = False) -> ConsoleRegistrationLink:
    q = select(ConsoleRegistrationLink).where(
        ConsoleRegistrationLink.token_hash == _hash(ctx, "link", str(token or ""))
    )
    link = session.scalars(q.with_for_update() if lock else q).first()
    if link is None:
        raise _denied("link", "unknown registration link")
    if link.used_at is not None:
        raise _denied("link", "this registration link was already used (links are single-use)", link.principal)
    if utc(link.expires_at) <= ctx.now():
        raise _denied(
            "link",
            f"this registration link expired at {utc(link.expires_at).isoformat()}; ask for a new one",
            link.principal,
        )
    return link


def registration_link(ctx: KmsContext, token: str) -> str:
    """The principal a valid link registers, or ConsoleDenied (audited)."""

    def run():
        with ctx.transaction() as s:
            return _valid_link(s, ctx, token).principal

    return _audited(ctx, "console.register", None, None, run)


def begin_registration(ctx: KmsContext, rp: RelyingParty, token: str) -> tuple[str, dict]:
    """(ceremony handle, PublicKeyCredentialCreationOptions as JSON) for the link's principal."""

    def run():
        with ctx.transaction() as s:
            link = _valid_link(s, ctx, token)
            existing = [
                AttestedCredentialData(c.credential_data)
                for c in s.scalars(select(ConsoleCredential).where(ConsoleCredential.principal == link.principal))
            ]
            challenge = secrets.token_bytes(32)
            opts = _registration_options(ctx, rp, link.principal, existing, challenge)
            handle = _new_ceremony(s, ctx, "register", link.principal, challenge, binding={"link": link.id})
            return handle, opts

    return _audited(ctx, "console.register", None, None, run)


def complete_registration(
    ctx: KmsContext, rp: RelyingParty, token: str, *, handle: str, response: dict, totp: str
) -> str:
    """Store the new credential of the link's principal (who also proves their TOTP)."""
    who: list[str] = []

    def run():
        with ctx.transaction() as s:
            principal = _valid_link(s, ctx, token).principal
            who.append(principal)
        ceremony = _take_ceremony(ctx, handle, "register", principal)
        now = ctx.now()
        with ctx.transaction() as s:
            link = _valid_link(s, ctx, token, lock=True)
            if (ceremony.binding or {}).get("link") != link.id:
                raise _denied("ceremony", "the security-key challenge belongs to another registration link", principal)
            _console_principal(s, principal)
            cred = _store_credential(s, ctx, rp, principal, ceremony.challenge, response, link_id=link.id)
            check_totp(ctx, s, principal, totp)
            link.used_at = now
            audit.record(
                s,
                at=now,
                operation="console.register",
                actor=principal,
                target=principal,
                outcome="ok",
                detail={**_provenance(cred), "link": link.id, "ticket": link.ticket},
            )
        return principal

    try:
        return run()
    except access.AccessDenied as exc:
        audit.emit(
            ctx,
            at=ctx.now(),
            operation="console.register",
            actor=(who[0] if who else "anonymous"),
            target_ref=who[0] if who else None,
            outcome="denied",
            detail={"reason": exc.reason, "problem": str(exc)},
        )
        raise


# ---- sign-in and sessions -----------------------------------------------------------


@dataclass
class SignIn:
    token: str  # the session cookie's value; only its hash is stored
    principal: str
    expires_at: datetime

    def __repr__(self) -> str:
        return f"SignIn(principal={self.principal!r}, expires_at={self.expires_at})"


@dataclass
class ConsoleUser:
    principal: str
    roles: list[str]
    session_id: int
    csrf: str
    expires_at: datetime
    idle_until: datetime


def begin_signin(ctx: KmsContext, rp: RelyingParty) -> tuple[str, dict]:
    """A sign-in challenge for a discoverable credential (the key names its credential)."""
    challenge = secrets.token_bytes(32)
    opts, _ = rp.server().authenticate_begin(
        None, user_verification=UserVerificationRequirement.REQUIRED, challenge=challenge
    )
    with ctx.transaction() as s:
        handle = _new_ceremony(s, ctx, "signin", None, challenge)
    return handle, _options(opts)


def complete_signin(ctx: KmsContext, rp: RelyingParty, *, name: str, handle: str, response: dict, totp: str) -> SignIn:
    """Both factors, or ConsoleDenied (audited as a failed sign-in)."""
    name = (name or "").strip()

    def run():
        if not name:
            raise _denied("invalid", "enter your principal name")
        ceremony = _take_ceremony(ctx, handle, "signin")
        now = ctx.now()
        pol = ctx.policy.console
        with ctx.transaction() as s:
            _console_principal(s, name)
            cred = _verify_assertion(s, ctx, rp, ceremony, response, name)
            check_totp(ctx, s, name, totp)
            token = secrets.token_urlsafe(32)
            expires = now + timedelta(hours=pol.session_absolute_hours)
            row = ConsoleSession(
                token_hash=_hash(ctx, "session", token),
                principal=name,
                credential_id=cred.id,
                started_at=now,
                last_seen_at=now,
                expires_at=expires,
            )
            row.mac = _session_mac(ctx, row)
            s.add(row)
            s.flush()
            audit.record(
                s,
                at=now,
                operation="console.signin",
                actor=name,
                target=f"session:{row.id}",
                outcome="ok",
                detail={
                    "credential": _short(cred.credential_id),
                    "sign_count": cred.sign_count,
                    "factors": ["fido2", "totp"],
                },
            )
            return SignIn(token, name, expires)

    return _audited(ctx, "console.signin", name, None, run)


def csrf_token(session_token: str) -> str:
    """Derived from the (HttpOnly) session token: a page can show it, another site cannot know it."""
    return hmac.new(session_token.encode(), b"kms-console-csrf/1", hashlib.sha256).hexdigest()


def current_user(ctx: KmsContext, token: str | None) -> ConsoleUser:
    """The signed-in principal of session ``token`` (its idle timer restarted), or ConsoleDenied
    with reason ``no_session`` or ``session_expired`` (the end is audited once)."""
    if not token:
        raise _denied("no_session", "not signed in")
    now = ctx.now()
    pol = ctx.policy.console
    ended: tuple[str, str] | None = None
    with ctx.transaction() as s:
        row = s.scalars(
            select(ConsoleSession).where(ConsoleSession.token_hash == _hash(ctx, "session", token)).with_for_update()
        ).first()
        if row is None or row.ended_at is not None:
            raise _denied("no_session", "not signed in (unknown or ended session)")
        p = access._principal(s, row.principal)
        # a session lasts only while its principal is enrolled, enabled and holds a role
        roles = sorted(p.roles) if p is not None and p.disabled_at is None else []
        reason: str | None  # why the session ends now; None keeps it
        detail: dict[str, str | None]
        if not hmac.compare_digest(row.mac or "", _session_mac(ctx, row)):
            reason, detail = "integrity", {"reason": "integrity"}
        else:
            idle_limit = utc(row.last_seen_at) + timedelta(minutes=pol.session_idle_minutes)
            reason = (
                "absolute"
                if now >= utc(row.expires_at)
                else "idle"
                if now >= idle_limit
                else "principal_disabled"
                if not roles
                else None
            )
            detail = {"reason": "session_expired", "limit": reason}
        if reason is None:
            row.last_seen_at = now
            return ConsoleUser(
                row.principal,
                roles,
                row.id,
                csrf_token(token),
                utc(row.expires_at),
                now + timedelta(minutes=pol.session_idle_minutes),
            )
        row.ended_at, row.ended_reason = now, reason
        audit.record(
            s,
            at=now,
            operation="console.session",
            actor=row.principal,
            target=f"session:{row.id}",
            outcome="denied",
            detail=detail,
        )
        ended = (row.principal, reason)
    what = {
        "absolute": f"{pol.session_absolute_hours} h after sign-in",
        "idle": f"after {pol.session_idle_minutes} min without activity",
        "principal_disabled": "because the principal was disabled",
        "integrity": "because its stored record was changed outside the console",
    }[ended[1]]
    raise _denied("session_expired", f"your session ended {what}; sign in again", ended[0])


def end_session(ctx: KmsContext, token: str | None) -> None:
    if not token:
        return
    now = ctx.now()
    with ctx.transaction() as s:
        row = s.scalars(
            select(ConsoleSession).where(ConsoleSession.token_hash == _hash(ctx, "session", token)).with_for_update()
        ).first()
        if row is not None and row.ended_at is None:
            row.ended_at, row.ended_reason = now, "signout"
            audit.record(
                s, at=now, operation="console.signout", actor=row.principal, target=f"session:{row.id}", outcome="ok"
            )


def _bound_ceremony(ctx: KmsContext, principal: str, binding: dict, handle: str) -> ConsoleCeremony:
    ceremony = _take_ceremony(ctx, handle, "step-up", principal)
    if not hmac.compare_digest(_bound_challenge(principal, binding, ceremony.nonce), ceremony.challenge):
        raise _denied(
            "binding", f"the security-key confirmation was given for {ceremony.binding}, not for {binding}", principal
        )
    return ceremony


def verify_step_up(
    ctx: KmsContext, rp: RelyingParty, principal: str, binding: dict, *, handle: str, response: dict
) -> None:
    """Refuse (ConsoleDenied, audited) unless ``response`` is ``principal``'s fresh assertion over
    the challenge derived from exactly ``binding``."""

    def run():
        ceremony = _bound_ceremony(ctx, principal, binding, handle)
        now = ctx.now()
        with ctx.transaction() as s:
            cred = _verify_assertion(s, ctx, rp, ceremony, response, principal)
            audit.record(
                s,
                at=now,
                operation="console.step-up",
                actor=principal,
                target=binding.get("target"),
                outcome="ok",
                detail={**binding, "credential": _short(cred.credential_id)},
            )

    _audited(ctx, "console.step-up", principal, binding.get("target"), run, binding)


def begin_approval(
    ctx: KmsContext,
    principal: str,
    *,
    operation: str,
    ticket: str,
    target: str | None = None,
    rp: RelyingParty | None = None,
) -> ApprovalChallenge:
    """The challenge ``principal``'s security key signs to approve exactly (operation, target,
    ticket); without ``target``, the one open request's (as ``access.approve``). Audited on refusal."""

    def run():
        resolved = access.approval_target(ctx, operation, ticket, target, principal)
        handle, options = begin_step_up(ctx, rp, principal, approval_binding(operation, resolved, ticket))
        rp_id = options["publicKey"]["rpId"]
        with ctx.transaction() as s:
            origins = {
                c.origin
                for c in s.scalars(select(ConsoleCredential).where(ConsoleCredential.principal == principal))
                if c.origin
            }
        origin = rp.origin if rp else next(o for o in sorted(origins) if RelyingParty(o).rp_id == rp_id)
        return ApprovalChallenge(handle, options, origin, resolved)

    return _audited(ctx, "approve", principal, target, run, {"ticket": ticket, "for": operation})


# ---- what A2 checks -----------------------------------------------------------------


def credentials_by_principal(ctx: KmsContext, *, hardware_only: bool = False) -> dict[str, int]:
    """Registered credentials per principal, counting only rows whose integrity MAC verifies
    (and, with ``hardware_only``, only attested hardware keys)."""
    with ctx.transaction() as s:
        counts: dict[str, int] = {}
        for c in s.scalars(select(ConsoleCredential)):
            if credential_intact(ctx, c) and not (hardware_only and c.software is not False):
                counts[c.principal] = counts.get(c.principal, 0) + 1
        return counts


def missing_console_factors(ctx: KmsContext) -> dict[str, list[str]]:
    """Every enabled human principal with a role -> the console factors it lacks (``fido2``,
    ``totp``, or ``fido2-hardware`` when its only keys are software authenticators and the
    policy does not allow them); principals lacking none are left out."""
    creds = credentials_by_principal(ctx)
    hardware = (
        creds if ctx.policy.console.allow_software_authenticators else credentials_by_principal(ctx, hardware_only=True)
    )
    gaps: dict[str, list[str]] = {}
    for p in access.list_principals(ctx):
        if p["kind"] != "human" or p["disabled"] or not p["roles"]:
            continue
        name = p["name"]
        missing = (["fido2"] if not creds.get(name) else ["fido2-hardware"] if not hardware.get(name) else []) + (
            [] if p["totp_enrolled"] else ["totp"]
        )
        if missing:
            gaps[name] = missing
    return gaps
