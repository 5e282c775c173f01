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
import threading
import uuid
import weakref
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from urllib.parse import urlparse

from fido2.attestation import Attestation, InvalidData, InvalidSignature, UnsupportedType, verify_x509_chain
from fido2.server import Fido2Server
from fido2.utils import websafe_encode
from fido2.webauthn import (
    AttestationConveyancePreference,
    AttestedCredentialData,
    AuthenticationResponse,
    PublicKeyCredentialRpEntity,
    PublicKeyCredentialUserEntity,
    RegistrationResponse,
    ResidentKeyRequirement,
    UserVerificationRequirement,
)
from sqlalchemy import select
from sqlalchemy.orm import Session

from ..foundation.canonical import canonical_bytes
from ..foundation.clock import utc
from ..foundation.context import KmsContext
from ..foundation.db.models_access import Principal
from ..foundation.db.models_console import ConsoleCeremony, ConsoleCredential, ConsoleRegistrationLink, ConsoleSession
from ..foundation.keystore import ED25519, KeyExists
from ..ledger import audit
from . import principals as access
from .audited_keystore import unwrap

REGISTRATION_OPERATION = "console-registration"
INTEGRITY_REF = "kms-console.integrity"
_INTEGRITY_CONTEXT = b"kms-console-integrity/1"
_STEP_UP_CONTEXT = b"kms-console-step-up/1\n"
_USER_HANDLE_CONTEXT = b"kms-console-user/1\n"
# The AAGUID the KMS software authenticator (kms_pipelines/fido2_client.py) states: a label,
# not a proof (anyone can state any AAGUID); only a verified attestation makes a credential hardware.
SOFTWARE_AAGUID = uuid.UUID("6b6d732d-736f-6674-7761-72652d666964")


class ConsoleDenied(access.AccessDenied):
    """A refused console ceremony; the message says what was wrong. Nothing was changed."""


# ---- relying party ------------------------------------------------------------------


@dataclass(frozen=True)
class RelyingParty:
    """The console as a WebAuthn relying party, at exactly one origin."""

    origin: str

    def __post_init__(self) -> None:
        u = urlparse(self.origin)
        secure = u.scheme == "https" or (u.scheme == "http" and u.hostname == "localhost")
        if not secure or not u.hostname or u.path not in ("", "/") or u.query or u.fragment:
            raise ValueError(
                f"console origin must be https://HOST[:PORT] (or http://localhost[:PORT] for local "
                f"development), got {self.origin!r}"
            )
        object.__setattr__(self, "origin", f"{u.scheme}://{u.netloc}")

    @property
    def rp_id(self) -> str:
        return urlparse(self.origin).hostname

    def server(self, attestation: bool = False) -> Fido2Server:
        # With ``attestation`` the key is asked for its attestation statement, which
        # ``_hardware_attested`` checks against the policy's CAs (the server itself ignores it).
        return Fido2Server(
            PublicKeyCredentialRpEntity(name="KMS console", id=self.rp_id),
            attestation=AttestationConveyancePreference.DIRECT if attestation else None,
            verify_origin=lambda o: o == self.origin,
            verify_attestation=lambda *_: None,
        )


_MAC_KEYS: weakref.WeakKeyDictionary[object, bytes] = weakref.WeakKeyDictionary()
_MAC_LOCK = threading.Lock()


def _mac_key(ctx: KmsContext) -> bytes:
    """The integrity key: SHA-256 of the keystore's (deterministic) Ed25519 signature over a
    fixed label, derived once per process and keystore."""
    ks = ctx.keystore
    backend = unwrap(ks)  # the cache follows the backend object, whichever context wraps it
    with _MAC_LOCK:
        key = _MAC_KEYS.get(backend)
        if key is None:
            if not ks.exists(INTEGRITY_REF):
                try:
                    ks.generate(INTEGRITY_REF, ED25519)
                except KeyExists:
                    pass  # created concurrently
            key = _MAC_KEYS[backend] = hashlib.sha256(ks.sign(INTEGRITY_REF, _INTEGRITY_CONTEXT)).digest()
        return key


def _mac(ctx: KmsContext, kind: str, *fields) -> str:
    doc = canonical_bytes(
        [
            kind,
            *[
                bytes(f).hex()
                if isinstance(f, (bytes, memoryview))
                else (utc(f).isoformat() if isinstance(f, datetime) else f)
                for f in fields
            ],
        ]
    )
    return hmac.new(_mac_key(ctx), doc, hashlib.sha256).hexdigest()


def _hash(ctx: KmsContext, kind: str, token: str) -> str:
    return _mac(ctx, kind, token)


def _credential_mac(ctx: KmsContext, c: ConsoleCredential) -> str:
    # The origin and a hardware verdict are covered when present (rows from before they existed
    # keep their MAC), so a database writer can neither move a key nor promote a software one.
    extra = ([f"origin={c.origin}"] if c.origin else []) + ([] if c.software is not False else ["hardware"])
    return _mac(ctx, "credential", c.principal, c.credential_id, c.credential_data, c.sign_count, *extra)


def _session_mac(ctx: KmsContext, row: ConsoleSession) -> str:
    return _mac(ctx, "session", row.token_hash, row.principal, row.credential_id, row.started_at, row.expires_at)


def credential_intact(ctx: KmsContext, c: ConsoleCredential) -> bool:
    return hmac.compare_digest(c.mac or "", _credential_mac(ctx, c))


def _short(credential_id: bytes) -> str:
    return hashlib.sha256(credential_id).hexdigest()[:16]


def _state(challenge: bytes) -> dict:
    return {"challenge": websafe_encode(challenge), "user_verification": UserVerificationRequirement.REQUIRED}


def _options(opts) -> dict:
    return dict(opts)


def _denied(reason: str, message: str, principal: str | None = None) -> ConsoleDenied:
    return ConsoleDenied(message, reason=reason, principal=principal)


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


# ---- ceremonies ---------------------------------------------------------------------


def _new_ceremony(
    session: Session,
    ctx: KmsContext,
    purpose: str,
    principal: str | None,
    challenge: bytes,
    nonce: bytes = b"",
    binding: dict | None = None,
) -> str:
    now = ctx.now()
    handle = secrets.token_urlsafe(24)
    session.add(
        ConsoleCeremony(
            handle=handle,
            purpose=purpose,
            principal=principal,
            binding=binding,
            nonce=nonce,
            challenge=challenge,
            created_at=now,
            expires_at=now + timedelta(seconds=ctx.policy.console.ceremony_seconds),
        )
    )
    return handle


def _take_ceremony(ctx: KmsContext, handle: str, purpose: str, principal: str | None = None) -> ConsoleCeremony:
    """Mark the ceremony used (in its own transaction: a failed answer cannot be retried)."""
    now = ctx.now()
    with ctx.transaction() as s:
        c = s.scalars(
            select(ConsoleCeremony).where(ConsoleCeremony.handle == str(handle or "")).with_for_update()
        ).first()
        if c is None or c.purpose != purpose or (principal is not None and c.principal != principal):
            problem = "unknown security-key challenge"
        elif c.used_at is not None:
            problem = "security-key challenge already answered (replay refused)"
        elif utc(c.expires_at) <= now:
            problem = f"security-key challenge expired (answer within {ctx.policy.console.ceremony_seconds}s)"
        else:
            c.used_at = now
            return c
    raise _denied("ceremony", problem, principal)


def _verify_assertion(
    session: Session,
    ctx: KmsContext,
    rp: RelyingParty | None,
    ceremony: ConsoleCeremony,
    response: dict,
    principal: str,
) -> ConsoleCredential:
    """The principal's credential that signed ``response`` over the ceremony's challenge with
    user verification and a grown sign count (updated here), or ConsoleDenied. The assertion is
    checked against the origin the credential was registered at (``rp``, the console, for
    credentials from before origins were recorded); a console at another origin refuses it."""
    try:
        parsed = AuthenticationResponse.from_dict(response)
    except (KeyError, TypeError, ValueError):
        raise _denied("webauthn", "malformed security-key response", principal) from None
    cred = session.scalars(
        select(ConsoleCredential).where(ConsoleCredential.credential_id == parsed.raw_id).with_for_update()
    ).first()
    if cred is None or cred.principal != principal:
        raise _denied("unknown_credential", f"this security key is not registered to {principal!r}", principal)
    if not credential_intact(ctx, cred):
        raise _denied(
            "integrity",
            f"the stored security key of {principal!r} fails its integrity check (changed "
            f"outside the console); it is refused",
            principal,
        )
    if cred.software is not False and not ctx.policy.console.allow_software_authenticators:
        raise _denied(
            "software_authenticator",
            f"the security key of {principal!r} is a software authenticator "
            f"(no attestation verified to console.attestation_ca_files); the policy does not allow "
            f"software authenticators (console.allow_software_authenticators)",
            principal,
        )
    expected = RelyingParty(cred.origin) if cred.origin else rp
    if expected is None or (rp is not None and rp.origin != expected.origin):
        raise _denied(
            "webauthn",
            f"this security key was registered at {cred.origin}, not at {rp.origin if rp else 'an unknown origin'}",
            principal,
        )
    try:
        expected.server().authenticate_complete(
            _state(ceremony.challenge), [AttestedCredentialData(cred.credential_data)], parsed
        )
    except ValueError as exc:
        raise _denied("webauthn", f"security-key assertion refused: {exc}", principal) from None
    count = parsed.response.authenticator_data.counter
    if (count or cred.sign_count) and count <= cred.sign_count:
        raise _denied(
            "sign_count",
            f"security key sign count did not grow ({count} after {cred.sign_count}): "
            f"possibly a cloned authenticator; the key is refused",
            principal,
        )
    cred.sign_count, cred.last_used_at = count, ctx.now()
    cred.mac = _credential_mac(ctx, cred)
    return cred


def _hardware_attested(ctx: KmsContext, registration: RegistrationResponse) -> bool:
    """True when the registration's attestation statement verifies and chains to one of the
    policy's CAs (``console.attestation_ca_files``, PEM). Self and "none" attestation prove
    nothing about where the key lives."""
    from cryptography import x509
    from cryptography.hazmat.primitives.serialization import Encoding

    files = ctx.policy.console.attestation_ca_files
    att = registration.response.attestation_object
    if not files or att.fmt == "none":
        return False
    try:
        result = Attestation.for_type(att.fmt)().verify(
            att.att_stmt, att.auth_data, registration.response.client_data.hash
        )
    except (InvalidData, InvalidSignature, UnsupportedType, ValueError):
        return False
    if not result.trust_path:
        return False
    for f in files:
        for ca in x509.load_pem_x509_certificates(Path(f).read_bytes()):
            try:
                verify_x509_chain(result.trust_path + [ca.public_bytes(Encoding.DER)])
                return True
            except (InvalidSignature, ValueError):
                continue
    return False


def _store_credential(
    session: Session,
    ctx: KmsContext,
    rp: RelyingParty,
    principal: str,
    state_challenge: bytes,
    response: dict,
    *,
    link_id: int | None,
) -> ConsoleCredential:
    """Verify a registration ``response`` (UV required, exact origin) and add the credential
    with its origin, AAGUID, attestation format and hardware verdict."""
    try:
        registration = RegistrationResponse.from_dict(response)
        auth = rp.server(attestation=True).register_complete(_state(state_challenge), registration)
    except (KeyError, TypeError, ValueError) as exc:
        raise _denied("webauthn", f"security-key registration refused: {exc}", principal) from None
    cd = auth.credential_data
    if cd is None:
        raise _denied("webauthn", "security-key registration carried no credential", principal)
    if session.scalars(select(ConsoleCredential.id).where(ConsoleCredential.credential_id == cd.credential_id)).first():
        raise _denied("webauthn", "this security key credential is already registered", principal)
    cred = ConsoleCredential(
        principal=principal,
        credential_id=cd.credential_id,
        credential_data=bytes(cd),
        sign_count=auth.counter,
        registered_at=ctx.now(),
        registration_link_id=link_id,
        origin=rp.origin,
        aaguid=str(cd.aaguid),
        attestation=str(registration.response.attestation_object.fmt)[:32],
        software=not _hardware_attested(ctx, registration),
    )
    cred.mac = _credential_mac(ctx, cred)
    session.add(cred)
    return cred


def _provenance(cred: ConsoleCredential) -> dict:
    return {
        "credential": _short(cred.credential_id),
        "aaguid": cred.aaguid,
        "attestation": cred.attestation,
        "authenticator": "software" if cred.software else "hardware",
        "origin": cred.origin,
    }


def _audited(ctx: KmsContext, operation: str, actor: str | None, target: str | None, fn, detail: dict | None = None):
    """Run ``fn``; on refusal, audit it (outside the rolled-back transaction) and re-raise."""
    try:
        return fn()
    except access.AccessDenied as exc:
        audit.emit(
            ctx,
            at=ctx.now(),
            operation=operation,
            actor=(actor or "anonymous")[:200],
            target_ref=target,
            outcome="denied",
            detail={"reason": exc.reason, "problem": str(exc), **(detail or {})},
        )
        raise


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


def _user_handle(name: str) -> bytes:
    return hashlib.sha256(_USER_HANDLE_CONTEXT + name.encode()).digest()[:16]


def _registration_options(ctx: KmsContext, rp: RelyingParty, principal: str, existing: list, challenge: bytes) -> dict:
    # attestation is asked for only where the policy can verify it (CAs configured)
    opts, _ = rp.server(attestation=bool(ctx.policy.console.attestation_ca_files)).register_begin(
        PublicKeyCredentialUserEntity(id=_user_handle(principal), name=principal, display_name=principal),
        credentials=existing,
        resident_key_requirement=ResidentKeyRequirement.REQUIRED,
        user_verification=UserVerificationRequirement.REQUIRED,
        challenge=challenge,
    )
    return _options(opts)


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
                if p is None or p.disabled_at is not None or not p.roles
                else None
            )
            detail = {"reason": "session_expired", "limit": reason}
        if reason is None:
            row.last_seen_at = now
            return ConsoleUser(
                row.principal,
                sorted(p.roles),
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


# ---- step-up: a fresh assertion bound to one action -------------------------------------


def _bound_challenge(principal: str, binding: dict, nonce: bytes) -> bytes:
    return hashlib.sha256(
        _STEP_UP_CONTEXT + canonical_bytes({"principal": principal, **binding}) + b"\n" + nonce
    ).digest()


def step_up_binding(action: str, operation: str, target: str, ticket: str) -> dict:
    return {"action": action, "operation": operation, "target": target, "ticket": ticket}


def begin_step_up(ctx: KmsContext, rp: RelyingParty | None, principal: str, binding: dict) -> tuple[str, dict]:
    """A challenge derived from exactly ``binding``, answerable only by ``principal``'s keys.
    Without ``rp`` (the CLI) the relying party is the origin of the principal's newest key."""
    with ctx.transaction() as s:
        rows = list(
            s.scalars(
                select(ConsoleCredential)
                .where(ConsoleCredential.principal == principal)
                .order_by(ConsoleCredential.id.desc())
            )
        )
        if rp is None and rows:
            rp = next((RelyingParty(c.origin) for c in rows if c.origin), None)
        creds = [
            AttestedCredentialData(c.credential_data)
            for c in rows
            if rp is not None and (c.origin or rp.origin) == rp.origin
        ]
        if not creds:
            raise _denied("unknown_credential", f"{principal!r} has no registered security key", principal)
        nonce = secrets.token_bytes(32)
        challenge = _bound_challenge(principal, binding, nonce)
        opts, _ = rp.server().authenticate_begin(
            creds, user_verification=UserVerificationRequirement.REQUIRED, challenge=challenge
        )
        return _new_ceremony(s, ctx, "step-up", principal, challenge, nonce, binding), _options(opts)


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


# ---- approvals: the FIDO2 half of every human approval (access.approve) ---------------------


@dataclass
class ApprovalChallenge:
    """What a FIDO2 client signs to approve (operation, target, ticket): ``options`` are
    PublicKeyCredentialRequestOptions (JSON), ``origin`` the relying party's origin."""

    handle: str
    options: dict
    origin: str
    target: str


def approval_binding(operation: str, target: str, ticket: str) -> dict:
    return step_up_binding("approve", operation, target, ticket)


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


def verify_approval(
    session: Session,
    ctx: KmsContext,
    ceremony: ConsoleCeremony | None,
    principal: str,
    *,
    operation: str,
    target: str,
    ticket: str,
    response: dict | None,
) -> ConsoleCredential:
    """Inside ``access.approve``'s transaction: ``response`` must be ``principal``'s assertion
    (UV, grown sign count, a registered credential) over the challenge bound to exactly
    (operation, target, ticket). ``ceremony`` is ``take_approval_ceremony``'s."""
    if ceremony is None or not response:
        raise _denied(
            "fido2",
            f"an approval needs {principal!r}'s security-key assertion over ({operation}, "
            f"{target}, {ticket}) besides the TOTP code (`kms approve` asks the key)",
            principal,
        )
    binding = approval_binding(operation, target, ticket)
    if ceremony.binding != binding:
        raise _denied(
            "binding", f"the security-key confirmation was given for {ceremony.binding}, not for {binding}", principal
        )
    return _verify_assertion(session, ctx, None, ceremony, response, principal)


def take_approval_ceremony(ctx: KmsContext, principal: str, handle: str | None) -> ConsoleCeremony | None:
    """Mark the approval's challenge answered (its own transaction: a failed answer is not retried)."""
    if not handle:
        return None
    ceremony = _take_ceremony(ctx, handle, "step-up", principal)
    if not hmac.compare_digest(_bound_challenge(principal, ceremony.binding or {}, ceremony.nonce), ceremony.challenge):
        raise _denied("binding", "the security-key challenge does not match its recorded binding", principal)
    return ceremony


# ---- the first-run ceremony's keys ------------------------------------------------------


def register_ceremony_keys(
    session: Session, ctx: KmsContext, rp: RelyingParty, principals: list[str], make_credential, *, actor: str
) -> None:
    """In the first-run ceremony's transaction (``access.init_principals``): register one security
    key for each new principal, ``make_credential(name, options) -> registration response`` being
    the CLI's FIDO2 client. The ceremony is the root of trust, so no link; a refusal rolls the
    whole ceremony back."""
    for name in principals:
        challenge = secrets.token_bytes(32)
        options = _registration_options(ctx, rp, name, [], challenge)
        cred = _store_credential(session, ctx, rp, name, challenge, make_credential(name, options), link_id=None)
        session.flush()
        audit.record(
            session,
            at=ctx.now(),
            operation="console.register",
            actor=actor,
            target=name,
            outcome="ok",
            detail={**_provenance(cred), "ceremony": True},
        )


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
