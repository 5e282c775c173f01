"""Workload identity (A1): short-lived signed workload tokens for the operations a workload is declared with, strictly verified; the credentials the audited keystore checks."""

from __future__ import annotations

import base64
import binascii
import json
import secrets
import threading
from dataclasses import dataclass, replace
from datetime import datetime

from ..foundation.canonical import canonical_bytes
from ..foundation.clock import utc
from ..foundation.context import KmsContext
from ..foundation.keystore import ED25519, KeyExists, KeyNotFound, KeyStore, verify_signature
from ..ledger import audit
from .audited_keystore import AuditedKeyStore, unwrap
from .principals import (
    _TOKEN_CONTEXT,
    CLOCK_SKEW_SECONDS,
    ISSUER,
    SIGNING_REF,
    TOKEN_PREFIX,
    known_permissions,
    permission_for,
    prove_principal,
)
from .refusals import AccessDenied

# ---- workload tokens ----------------------------------------------------------------


@dataclass(frozen=True)
class WorkloadClaims:
    sub: str
    iat: int
    exp: int
    jti: str

    def __repr__(self) -> str:
        return f"WorkloadClaims(sub={self.sub!r}, iat={self.iat}, exp={self.exp}, jti={self.jti!r})"


def _b64u(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64u(text: str) -> bytes:
    """Strict: only the exact unpadded encoding ``_b64u`` produces is accepted, so a token
    has one spelling (no padding, no stray or non-canonical trailing bits)."""
    data = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    if _b64u(data) != text:
        raise binascii.Error("non-canonical base64")
    return data


def _signing_key(ctx: KmsContext, create: bool = True) -> tuple[KeyStore, bytes]:
    ks = unwrap(ctx.keystore)
    if not ks.exists(SIGNING_REF):
        if not create:
            raise KeyNotFound("no workload signing key")
        if getattr(ctx, "role", "control") == "worker":  # scale-out: one key in the HSM/database, never per host
            raise KeyNotFound(
                "no workload signing key in the shared keystore; a worker never creates one "
                "(`kms token issue` on the control host creates it)"
            )
        try:
            ks.generate(SIGNING_REF, ED25519)
            audit.emit(
                ctx,
                at=ctx.now(),
                operation="generate",
                actor=ctx.actor,
                target_ref=SIGNING_REF,
                outcome="ok",
                detail={"algorithm": ED25519, "purpose": "workload tokens"},
            )
        except KeyExists:
            pass
    return ks, ks.public_key(SIGNING_REF)


def issue_token_by(
    ctx: KmsContext, principal: str, *, issued_by: str, totp: str | None, ttl_minutes: float | None = None
) -> str:
    """``kms token issue``: a human hands workload ``principal`` a token. The issuer proves
    themself by TOTP and must hold every operation the workload is declared with, so a token
    never carries more than its issuer may do (A1); the token's subject is the workload, the
    audit event names the issuer. Refused requests change nothing but the audit log."""
    _check_token_request(ctx, principal, ttl_minutes)
    prove_principal(ctx, issued_by, totp)
    granted = known_permissions(None, ctx, issued_by) or frozenset()
    declared = sorted(ctx.policy.access.workload_principals[principal])
    missing = [op for op in declared if op not in granted]
    if missing:
        problem = (
            f"{issued_by!r} lacks permission '{missing[0]}' to issue a token for {principal} "
            f"(declared operations: {', '.join(declared)}; a token never carries more than its issuer "
            f"holds)"
        )
        audit.emit(
            ctx,
            at=ctx.now(),
            operation="token.issue",
            actor=issued_by,
            target_ref=principal,
            outcome="denied",
            detail={"reason": "permission", "missing": missing[0], "problem": problem},
        )
        raise AccessDenied(problem, reason="permission", principal=issued_by)
    return issue_workload_token(ctx.as_actor(issued_by), principal, ttl_minutes)


def _check_token_request(ctx: KmsContext, principal: str, ttl_minutes: float | None) -> float:
    """The TTL to issue ``principal``'s token with, or AccessDenied (audited)."""
    cap = ctx.policy.access.workload_token_ttl_minutes
    ttl = cap if ttl_minutes is None else ttl_minutes
    try:
        if principal not in ctx.policy.access.workload_principals:
            raise AccessDenied(
                f"{principal!r} is not a workload principal declared in the policy", reason="token", principal=principal
            )
        if not 0 < ttl <= cap:
            raise AccessDenied(
                f"requested token TTL of {ttl:g} min exceeds the policy cap of {cap} min (A2)"
                if ttl > cap
                else f"token TTL must be positive, got {ttl:g}",
                reason="token_ttl",
                principal=principal,
            )
    except AccessDenied as exc:
        audit.emit(
            ctx,
            at=ctx.now(),
            operation="token.issue",
            actor=ctx.actor,
            target_ref=principal,
            outcome="denied",
            detail={"reason": exc.reason, "ttl_minutes": str(ttl)},
        )
        raise
    return ttl


def issue_workload_token(ctx: KmsContext, principal: str, ttl_minutes: float | None = None) -> str:
    """A signed token for ``principal`` valid ``ttl_minutes`` (default and maximum: the policy cap).
    Callers that act for a human go through ``issue_token_by``; this is the workload identity's
    own refresh (``WorkloadIdentity``) under the context's actor."""
    ttl = _check_token_request(ctx, principal, ttl_minutes)
    now = ctx.now()
    ks, _ = _signing_key(ctx)
    iat = int(now.timestamp())
    exp = iat + int(ttl * 60)
    claims = {
        "iss": ISSUER,
        "sub": principal,
        "iat": iat,
        "exp": exp,
        "jti": secrets.token_hex(8),
        "kid": SIGNING_REF,
    }
    payload = canonical_bytes(claims)
    signature = ks.sign(SIGNING_REF, _TOKEN_CONTEXT + payload)
    audit.emit(
        ctx,
        at=now,
        operation="token.issue",
        actor=ctx.actor,
        target_ref=principal,
        outcome="ok",
        detail={"jti": claims["jti"], "exp": exp, "ttl_seconds": exp - iat},
    )
    return f"{TOKEN_PREFIX}.{_b64u(payload)}.{_b64u(signature)}"


def _forged(why: str) -> AccessDenied:
    return AccessDenied(f"workload token refused: {why}", reason="token")


def _verify_signed(ctx: KmsContext, token: str) -> WorkloadClaims:
    """Shape, signature and lifetime cap; not the current time (see ``_check_time``)."""
    parts = token.split(".") if isinstance(token, str) else []
    if len(parts) != 3 or parts[0] != TOKEN_PREFIX:
        raise _forged("malformed token")
    try:
        payload, signature = _unb64u(parts[1]), _unb64u(parts[2])
        claims = json.loads(payload)
    except (binascii.Error, ValueError):
        raise _forged("malformed token") from None
    try:
        _, public = _signing_key(ctx, create=False)
    except KeyNotFound:
        raise _forged("no signing key") from None
    if not verify_signature(public, _TOKEN_CONTEXT + payload, signature):
        raise _forged("signature does not verify (forged or altered token)")
    try:
        c = WorkloadClaims(str(claims["sub"]), int(claims["iat"]), int(claims["exp"]), str(claims["jti"]))
    except (KeyError, TypeError, ValueError):
        raise _forged("claims incomplete") from None
    if claims.get("iss") != ISSUER:
        raise _forged("wrong issuer")
    cap = ctx.policy.access.workload_token_ttl_minutes
    if c.exp - c.iat > cap * 60:
        raise AccessDenied(
            f"workload token refused: lifetime of {(c.exp - c.iat) / 60:g} min exceeds the policy "
            f"cap of {cap} min (A2)",
            reason="token_ttl",
            principal=c.sub,
        )
    if c.sub not in ctx.policy.access.workload_principals:
        raise AccessDenied(
            f"workload token refused: {c.sub!r} is not a workload principal", reason="token", principal=c.sub
        )
    return c


def _check_time(ctx: KmsContext, c: WorkloadClaims) -> WorkloadClaims:
    now = ctx.now().timestamp()
    if now >= c.exp:
        raise AccessDenied(
            f"workload token for {c.sub!r} expired at {datetime.fromtimestamp(c.exp, tz=utc(ctx.now()).tzinfo).isoformat()}",
            reason="token_expired",
            principal=c.sub,
        )
    if c.iat > now + CLOCK_SKEW_SECONDS:
        raise AccessDenied(f"workload token for {c.sub!r} is not valid yet", reason="token", principal=c.sub)
    return c


def verify_workload_token(ctx: KmsContext, token: str) -> WorkloadClaims:
    """The token's claims, or AccessDenied if it is malformed, forged, too long-lived,
    expired or not yet valid."""
    return _check_time(ctx, _verify_signed(ctx, token))


def check_workload_permission(
    ctx: KmsContext, claims: WorkloadClaims, permission: str | None, operation: str, ref: str | None = None
) -> None:
    allowed = ctx.policy.access.workload_principals.get(claims.sub, [])
    if permission is not None and permission not in allowed:
        raise AccessDenied(
            f"workload principal {claims.sub!r} lacks permission '{permission}' for keystore "
            f"{operation} (access.workload_principals allows {sorted(allowed)})",
            reason="permission",
            principal=claims.sub,
        )


class _Credentials:
    """What ``AuditedKeyStore`` calls before each keystore operation: the claims, checked
    against the policy's permission for ``operation`` (the wrapper sits below this module and
    gets the check through the credentials it holds, not by importing it)."""

    def claims(self, ctx: KmsContext) -> WorkloadClaims:
        raise NotImplementedError

    def authorize(self, ctx: KmsContext, operation: str, ref: str | None) -> WorkloadClaims:
        claims = self.claims(ctx)
        check_workload_permission(ctx, claims, permission_for(operation), operation, ref)
        return claims


class WorkloadIdentity(_Credentials):
    """Holds a workload principal's token and re-issues it ``workload_token_refresh_seconds``
    before it expires (or when the clock moved before its issue time)."""

    def __init__(self, principal: str, ttl_minutes: float | None = None):
        self.principal = principal
        self.ttl_minutes = ttl_minutes
        self._token: str | None = None
        self._claims: WorkloadClaims | None = None
        self._lock = threading.Lock()
        self.issued = 0

    def __repr__(self) -> str:
        return f"WorkloadIdentity({self.principal!r})"

    def claims(self, ctx: KmsContext) -> WorkloadClaims:
        now = ctx.now().timestamp()
        margin = ctx.policy.access.workload_token_refresh_seconds
        with self._lock:
            c = self._claims
            if c is None or c.exp - now <= margin or c.iat > now + CLOCK_SKEW_SECONDS:
                self._token = issue_workload_token(ctx, self.principal, self.ttl_minutes)
                self._claims = c = _verify_signed(ctx, self._token)
                self.issued += 1
        return _check_time(ctx, c)


class StaticToken(_Credentials):
    """A token presented as is (by a workload that got it elsewhere): never refreshed."""

    def __init__(self, token: str):
        self._token = token
        self._claims: WorkloadClaims | None = None

    def __repr__(self) -> str:
        return "StaticToken(<redacted>)"

    def claims(self, ctx: KmsContext) -> WorkloadClaims:
        if self._claims is None:
            self._claims = _verify_signed(ctx, self._token)
        return _check_time(ctx, self._claims)


def _with_credentials(ctx: KmsContext, credentials) -> KmsContext:
    ks = ctx.keystore if isinstance(ctx.keystore, AuditedKeyStore) else AuditedKeyStore(ctx.keystore)
    return replace(ctx, keystore=ks.with_credentials(credentials))


def with_workload_identity(ctx: KmsContext, principal: str, ttl_minutes: float | None = None) -> KmsContext:
    """A context whose every keystore operation runs under ``principal``'s refreshed token."""
    if principal not in ctx.policy.access.workload_principals:
        raise AccessDenied(f"{principal!r} is not a workload principal declared in the policy", reason="token")
    return _with_credentials(ctx, WorkloadIdentity(principal, ttl_minutes))


def with_workload_token(ctx: KmsContext, token: str) -> KmsContext:
    """A context whose keystore operations present ``token`` as is (checked before each)."""
    return _with_credentials(ctx, StaticToken(token))


# ---- sensor launch seals -------------------------------------------------------------

# Own domain: a seal is never a valid workload token signature, nor the other way round.
_LAUNCH_CONTEXT = b"kms-sensor-launch/1\n"


def seal_sensor_launch(ctx: KmsContext, sensor: str, subject: str) -> str:
    """A signature over (``sensor``, ``subject``) with the workload signing key, for a sensor to
    put on the run it requests. Run tags are free text to anyone who may launch a run from the
    Dagster UI; the seal is what a UI user cannot write, since the key is in the keystore. It
    is copyable from the genuine run's tags, so the op that checks it must also claim its
    subject once (``core/response/compromise.claim_for_sensor``)."""
    ks, _ = _signing_key(ctx)
    return _b64u(ks.sign(SIGNING_REF, _LAUNCH_CONTEXT + canonical_bytes({"sensor": sensor, "subject": subject})))


def sensor_launch_sealed(ctx: KmsContext, sensor: str, subject: str, seal: str | None) -> bool:
    """Whether ``seal`` is ``seal_sensor_launch(ctx, sensor, subject)``'s signature."""
    if not seal or not isinstance(seal, str):
        return False
    try:
        signature = _unb64u(seal)
        _, public = _signing_key(ctx, create=False)
    except (binascii.Error, ValueError, KeyNotFound):
        return False
    return verify_signature(
        public, _LAUNCH_CONTEXT + canonical_bytes({"sensor": sensor, "subject": subject}), signature
    )
