"""FIDO2/WebAuthn for the KMS (clause A2).

The relying party, credential registration with provenance and row MACs, and assertions bound to
(operation, target, ticket) with user verification and a growing sign count.
``principals.approve`` uses it for the FIDO2 half of every human approval; the console's sign-in,
sessions and registration links sit above it in ``console_auth``.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import threading
import weakref
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from urllib.parse import urlparse

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding
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
from ..foundation.db.models_console import ConsoleCeremony, ConsoleCredential
from ..foundation.keystore import ED25519, KeyExists
from ..ledger import audit
from .audited_keystore import unwrap
from .refusals import AccessDenied

INTEGRITY_REF = "kms-console.integrity"
_INTEGRITY_CONTEXT = b"kms-console-integrity/1"
_STEP_UP_CONTEXT = b"kms-console-step-up/1\n"
_USER_HANDLE_CONTEXT = b"kms-console-user/1\n"


class ConsoleDenied(AccessDenied):
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
        host = urlparse(self.origin).hostname
        if not host:  # __post_init__ refuses such an origin; this keeps the type honest
            raise ValueError(f"console origin {self.origin!r} has no host")
        return host

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


def _credential_mac(ctx: KmsContext, c: ConsoleCredential) -> str:
    # The origin and a hardware verdict are covered when present (rows from before they existed
    # keep their MAC), so a database writer can neither move a key nor promote a software one.
    extra = ([f"origin={c.origin}"] if c.origin else []) + ([] if c.software is not False else ["hardware"])
    return _mac(ctx, "credential", c.principal, c.credential_id, c.credential_data, c.sign_count, *extra)


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
    return attestation_problem(ctx, registration) is None


def _is_ca(cert: x509.Certificate) -> bool:
    try:
        if not cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca:
            return False
    except x509.ExtensionNotFound:
        return False
    try:
        return cert.extensions.get_extension_for_class(x509.KeyUsage).value.key_cert_sign
    except x509.ExtensionNotFound:
        return True


def _valid_at(cert: x509.Certificate, now: datetime) -> bool:
    return cert.not_valid_before_utc <= now <= cert.not_valid_after_utc


def attestation_problem(ctx: KmsContext, registration: RegistrationResponse) -> str | None:
    """None when the registration's attestation statement verifies and chains to one of the
    policy's CAs (``console.attestation_ca_files``, PEM) with every certificate valid now and
    every issuer a CA; otherwise why the key is not taken for hardware. Self and "none"
    attestation prove nothing about where the key lives. fido2 checks the statement's signature
    and the leaf's packed requirements (v3, CA=false, subject, AAGUID); its chain check is
    signatures only, so validity and issuers are checked here."""

    files = ctx.policy.console.attestation_ca_files
    att = registration.response.attestation_object
    if not files:
        return "no attestation CA is configured (console.attestation_ca_files)"
    if att.fmt == "none":
        return '"none" attestation proves nothing about where the key lives'
    try:
        result = Attestation.for_type(att.fmt)().verify(
            att.att_stmt, att.auth_data, registration.response.client_data.hash
        )
    except (InvalidData, InvalidSignature, UnsupportedType, NotImplementedError, ValueError) as exc:
        return f"the {att.fmt} attestation statement does not verify ({type(exc).__name__}: {exc})"
    if not result.trust_path:
        return f"{att.fmt} self attestation (no certificate) proves nothing about where the key lives"
    now = utc(ctx.now())
    try:
        path = [x509.load_der_x509_certificate(der) for der in result.trust_path]
    except ValueError:
        return "an attestation certificate does not parse"
    for cert in path:
        if not _valid_at(cert, now):
            return (
                f"attestation certificate {cert.subject.rfc4514_string()} is not valid at {now.isoformat()} "
                f"(valid {cert.not_valid_before_utc.isoformat()} to {cert.not_valid_after_utc.isoformat()})"
            )
    for issuer in path[1:]:
        if not _is_ca(issuer):
            return f"attestation chain certificate {issuer.subject.rfc4514_string()} is not a CA"
    for f in files:
        for ca in x509.load_pem_x509_certificates(Path(f).read_bytes()):
            if not _valid_at(ca, now):
                continue
            try:
                verify_x509_chain(result.trust_path + [ca.public_bytes(Encoding.DER)])
                return None
            except (InvalidData, InvalidSignature, ValueError):
                continue
    return (
        f"attestation certificate {path[0].subject.rfc4514_string()} does not chain to a CA "
        f"valid now in console.attestation_ca_files"
    )


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
    except AccessDenied as exc:
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
        if rp is None or not creds:
            raise _denied("unknown_credential", f"{principal!r} has no registered security key", principal)
        nonce = secrets.token_bytes(32)
        challenge = _bound_challenge(principal, binding, nonce)
        opts, _ = rp.server().authenticate_begin(
            creds, user_verification=UserVerificationRequirement.REQUIRED, challenge=challenge
        )
        return _new_ceremony(s, ctx, "step-up", principal, challenge, nonce, binding), _options(opts)


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
