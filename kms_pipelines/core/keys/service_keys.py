"""Service keys (clause P2): API credentials, application secrets, audit-event signing.

Every service key version (``service:<name>`` vN) holds an AES-256 key (``wrap_ref``) and
an Ed25519 key (``sign_ref``) in the keystore, plus one **seed** per version.

"Root seeds service keys" (P1)
    Under PKCS#11 keys are non-extractable, so the service key objects themselves cannot
    be wrapped under the root. Instead each service version's *credential seed* is a DEK
    generated inside the keystore and wrapped under the root's active AES key
    (``keystore.new_wrapped_dek(root.wrap_ref)``); only the wrapped bytes are stored
    (``service_seeds``). A root rotation rewraps every seed under the new root in the
    rotation's own transaction (``rewrap_seeds``), and the destroy guard ``root_seeds``
    refuses destroying a root version that still wraps a seed. Without the root, no
    service version can issue or verify a credential.

API credentials
    ``kmsc1.<service>.v<N>.<token>`` where ``token`` is AES-256-GCM, under the seed of
    service version N (unwrapped only inside the keystore), of ``{"c": client_id, "iat":
    …}`` with associated data binding purpose, service and version. Verification decrypts
    it (so a credential cannot be forged or moved to another client, service or version)
    and checks the version is active or rotated: a credential stays valid after a rotation
    until its version is revoked or destroyed. Only a SHA-256 of each credential is stored,
    plus, for credentials re-issued on rotation, a copy sealed as an application secret for
    the client to pick up (``pickup_credential``).

Application secrets
    Envelope encryption: a fresh DEK per secret, wrapped under the service version's AES
    key; associated data binds service, secret name and version (a blob moved to another
    service or name does not decrypt). ``rewrap_secret`` moves a blob to the active
    version without exposing the plaintext outside the keystore.

Audit events
    Ed25519 over the RFC 8785 encoding of ``{"purpose", "service", "version", "event"}``;
    ``verify_audit_event`` needs only the stored public key and accepts active or rotated
    versions (retired versions stay verify-only for their 365-day retention).
"""

from __future__ import annotations

import base64
import hashlib
import json
import struct
from dataclasses import dataclass

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from ..foundation.canonical import canonical_bytes
from ..foundation.context import KmsContext
from ..foundation.db.models import ACTIVE, DESTROYED, ROTATED, Key, KeyVersion
from ..foundation.db.models_rotation import ServiceCredential, ServiceSeed
from ..foundation.keystore import DecryptionFailed, verify_signature
from . import lifecycle

CREDENTIAL_SEED = "credential"
CREDENTIAL_PREFIX = "kmsc1"
SECRET_MAGIC = b"KMSS1"
LIVE = (ACTIVE, ROTATED)


class ServiceKeyError(lifecycle.LifecycleError):
    """A refused service-key operation; the message says why (never key material)."""


def service_key_name(ctx: KmsContext, service: str) -> str:
    name = service if service.startswith("service:") else f"service:{service}"
    return lifecycle.validate_key_name(ctx, name)


def _b64e(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _b64d(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


# ---- seeds (root seeds service keys) -------------------------------------------------


def _root_active(session: Session) -> KeyVersion:
    root = lifecycle.get_key(session, "root")
    v = lifecycle.active_version(root)
    if v is None or not v.wrap_ref:
        raise ServiceKeyError("root has no active AES version to seed service keys")
    return v


def ensure_seed(session: Session, ctx: KmsContext, key_name: str, version: int) -> ServiceSeed:
    """The seed of a service version, created (wrapped under the active root) if missing."""
    seed = _seed(session, key_name, version)
    if seed is not None:
        return seed
    root = _root_active(session)
    seed = ServiceSeed(
        key_name=key_name,
        key_version=version,
        purpose=CREDENTIAL_SEED,
        root_version=root.version,
        wrapped=ctx.keystore.new_wrapped_dek(root.wrap_ref),
        created_at=ctx.now(),
    )
    try:
        with session.begin_nested():
            session.add(seed)
            session.flush()
    except IntegrityError:  # created concurrently
        existing = _seed(session, key_name, version)
        if existing is None:  # the conflict was not the concurrent seed: report it, do not return None
            raise
        return existing
    return seed


def _seed(session: Session, key_name: str, version: int) -> ServiceSeed | None:
    return session.scalars(
        select(ServiceSeed).where(
            ServiceSeed.key_name == key_name, ServiceSeed.key_version == version, ServiceSeed.purpose == CREDENTIAL_SEED
        )
    ).first()


def _root_ref(session: Session, root_version: int) -> str:
    root = lifecycle.get_key(session, "root")
    v = lifecycle.get_version(root, root_version)
    if v.state == DESTROYED:
        raise ServiceKeyError(f"seed is wrapped under destroyed root v{root_version}")
    if not v.wrap_ref:
        raise ServiceKeyError(f"seed is wrapped under root v{root_version}, which has no AES material")
    return v.wrap_ref


def rewrap_seeds(session: Session, ctx: KmsContext, new_root: KeyVersion) -> int:
    """Rewrap every seed not yet under ``new_root`` (called in the root rotation's transaction)."""
    seeds = list(
        session.scalars(
            select(ServiceSeed)
            .where(ServiceSeed.root_version != new_root.version)
            .order_by(ServiceSeed.root_version, ServiceSeed.id)
        )
    )
    moved = 0
    by_root: dict[int, list[ServiceSeed]] = {}
    for s in seeds:
        by_root.setdefault(s.root_version, []).append(s)
    for root_version, group in by_root.items():
        new_wrapped = ctx.keystore.rewrap(
            _root_ref(session, root_version), new_root.wrap_ref, [s.wrapped for s in group]
        )
        for s, w in zip(group, new_wrapped, strict=True):
            s.wrapped, s.root_version, s.rewrapped_at = w, new_root.version, ctx.now()
            moved += 1
    session.flush()
    return moved


def seeds_under(session: Session, root_version: int) -> int:
    return len(list(session.scalars(select(ServiceSeed.id).where(ServiceSeed.root_version == root_version))))


def drop_seed(session: Session, key_name: str, version: int) -> None:
    """Forget a destroyed version's seed (its credentials can never verify again)."""
    for s in session.scalars(
        select(ServiceSeed).where(ServiceSeed.key_name == key_name, ServiceSeed.key_version == version)
    ):
        session.delete(s)


@lifecycle.destroy_guard("root_seeds")
def _root_seeds_guard(session: Session, ctx: KmsContext, key: Key, v: KeyVersion):
    if key.name != "root":
        return None
    n = seeds_under(session, v.version)
    return (
        (f"{n} service-key seed(s) are still wrapped under root v{v.version}; rotate root (which rewraps them) first")
        if n
        else None
    )


# ---- versions -----------------------------------------------------------------------


def _live_version(session: Session, key_name: str, version: int) -> KeyVersion:
    key = lifecycle.get_key(session, key_name)
    v = lifecycle.get_version(key, version)
    if v.state not in LIVE:
        raise ServiceKeyError(f"{key_name} v{version} is {v.state}: it no longer verifies or decrypts")
    return v


def _active(session: Session, key_name: str) -> KeyVersion:
    return lifecycle.get_version(lifecycle.get_key(session, key_name), None)


# ---- API credentials ----------------------------------------------------------------


def _credential_aad(key_name: str, version: int) -> bytes:
    return canonical_bytes({"purpose": "api-credential", "key": key_name, "version": version})


def _mint(session: Session, ctx: KmsContext, key_name: str, v: KeyVersion, client_id: str) -> str:
    seed = ensure_seed(session, ctx, key_name, v.version)
    body = canonical_bytes({"c": client_id, "iat": ctx.now().isoformat()})
    token = ctx.keystore.dek_encrypt(
        _root_ref(session, seed.root_version), seed.wrapped, body, _credential_aad(key_name, v.version)
    )
    return f"{CREDENTIAL_PREFIX}.{key_name.split(':', 1)[1]}.v{v.version}.{_b64e(token)}"


def _validate_client(client_id: str) -> str:
    if not client_id or len(client_id) > 200 or any(c.isspace() for c in client_id):
        raise ServiceKeyError("client id must be 1-200 characters without whitespace")
    return client_id


def issue_credential(ctx: KmsContext, service: str, client_id: str) -> str:
    """A new API credential for ``client_id`` under the service's active version."""
    key_name = service_key_name(ctx, service)
    _validate_client(client_id)
    with ctx.transaction() as session:
        v = _active(session, key_name)
        credential = _mint(session, ctx, key_name, v, client_id)
        _record(session, ctx, key_name, client_id, v.version, credential, sealed=None)
        return credential


def _record(session, ctx, key_name, client_id, version, credential, sealed):
    digest = hashlib.sha256(credential.encode()).hexdigest()
    row = session.scalars(
        select(ServiceCredential).where(
            ServiceCredential.service == key_name,
            ServiceCredential.client_id == client_id,
            ServiceCredential.key_version == version,
        )
    ).first()
    if row is None:
        session.add(
            ServiceCredential(
                service=key_name,
                client_id=client_id,
                key_version=version,
                issued_at=ctx.now(),
                credential_sha256=digest,
                sealed=sealed,
            )
        )
    else:  # a re-issue under the same version replaces the recorded hash
        row.issued_at, row.credential_sha256, row.sealed, row.picked_up_at = ctx.now(), digest, sealed, None
    session.flush()


@dataclass
class CredentialCheck:
    valid: bool
    service: str | None = None
    client_id: str | None = None
    version: int | None = None
    problem: str | None = None

    def __bool__(self) -> bool:
        return self.valid


def verify_credential(ctx: KmsContext, service: str, credential: str) -> CredentialCheck:
    """Valid iff it authenticates under its version's seed and that version is active or rotated."""
    key_name = service_key_name(ctx, service)
    parts = credential.split(".") if isinstance(credential, str) else []
    if len(parts) != 4 or parts[0] != CREDENTIAL_PREFIX or not parts[2].startswith("v") or not parts[2][1:].isdigit():
        return CredentialCheck(False, key_name, problem="malformed credential")
    if f"service:{parts[1]}" != key_name:
        return CredentialCheck(False, key_name, problem=f"credential belongs to service {parts[1]!r}")
    version = int(parts[2][1:])
    try:
        token = _b64d(parts[3])
    except (ValueError, TypeError):
        return CredentialCheck(False, key_name, version=version, problem="malformed credential")
    with ctx.transaction() as session:
        try:
            _live_version(session, key_name, version)
        except lifecycle.LifecycleError as exc:
            return CredentialCheck(False, key_name, version=version, problem=str(exc))
        seed = _seed(session, key_name, version)
        if seed is None:
            return CredentialCheck(False, key_name, version=version, problem="no seed for that version")
        try:
            body = ctx.keystore.dek_decrypt(
                _root_ref(session, seed.root_version), seed.wrapped, token, _credential_aad(key_name, version)
            )
        except DecryptionFailed:
            return CredentialCheck(False, key_name, version=version, problem="credential does not authenticate")
        client_id = json.loads(body)["c"]
        digest = hashlib.sha256(credential.encode()).hexdigest()
        known = session.scalars(
            select(ServiceCredential.id).where(
                ServiceCredential.service == key_name,
                ServiceCredential.client_id == client_id,
                ServiceCredential.key_version == version,
                ServiceCredential.credential_sha256 == digest,
            )
        ).first()
        if known is None:
            return CredentialCheck(False, key_name, client_id, version, "credential was superseded by a re-issue")
        return CredentialCheck(True, key_name, client_id, version)


def needing_follow_up(session: Session, keys: dict[str, Key]) -> list[str]:
    """Services whose active version lacks a seed or has clients without a credential on it."""
    out = []
    seeded = set(session.execute(select(ServiceSeed.key_name, ServiceSeed.key_version)).all())
    creds: dict[str, dict[str, set[int]]] = {}
    for service, client, version in session.execute(
        select(ServiceCredential.service, ServiceCredential.client_id, ServiceCredential.key_version)
    ):
        creds.setdefault(service, {}).setdefault(client, set()).add(version)
    for name, key in keys.items():
        v = lifecycle.active_version(key)
        if v is None:
            continue
        if (name, v.version) not in seeded or any(v.version not in vs for vs in creds.get(name, {}).values()):
            out.append(name)
    return out


def reissue_credentials(ctx: KmsContext, service: str) -> int:
    """After a rotation: a new credential under the active version for every client that
    has none yet. Old credentials stay valid until their version is revoked. The new
    credential is sealed for the client to pick up (``pickup_credential``)."""
    key_name = service_key_name(ctx, service)
    with ctx.transaction() as session:
        v = _active(session, key_name)
        rows = session.scalars(select(ServiceCredential).where(ServiceCredential.service == key_name)).all()
        current = {r.client_id for r in rows if r.key_version == v.version}
        clients = sorted({r.client_id for r in rows} - current)
        for client_id in clients:
            credential = _mint(session, ctx, key_name, v, client_id)
            sealed = _encrypt(session, ctx, key_name, v, f"credential:{client_id}", credential.encode())
            _record(session, ctx, key_name, client_id, v.version, credential, sealed)
        return len(clients)


def pickup_credential(ctx: KmsContext, service: str, client_id: str) -> str:
    """The credential re-issued for ``client_id`` under the active version (once)."""
    key_name = service_key_name(ctx, service)
    with ctx.transaction() as session:
        v = _active(session, key_name)
        row = session.scalars(
            select(ServiceCredential).where(
                ServiceCredential.service == key_name,
                ServiceCredential.client_id == client_id,
                ServiceCredential.key_version == v.version,
            )
        ).first()
        if row is not None and row.picked_up_at is not None:
            raise ServiceKeyError(
                f"the credential for {client_id!r} was already picked up at {row.picked_up_at.isoformat()}"
            )
        if row is None or row.sealed is None:
            raise ServiceKeyError(f"no re-issued credential waiting for {client_id!r} on {key_name} v{v.version}")
        credential = _decrypt(session, ctx, row.sealed, key_name, f"credential:{client_id}").decode()
        row.picked_up_at, row.sealed = ctx.now(), None
        return credential


def credentials(ctx: KmsContext, service: str | None = None) -> list[dict]:
    with ctx.transaction() as session:
        q = select(ServiceCredential).order_by(
            ServiceCredential.service, ServiceCredential.client_id, ServiceCredential.key_version
        )
        if service:
            q = q.where(ServiceCredential.service == service_key_name(ctx, service))
        return [
            {
                "service": r.service,
                "client_id": r.client_id,
                "version": r.key_version,
                "issued_at": r.issued_at,
                "awaiting_pickup": r.sealed is not None,
            }
            for r in session.scalars(q)
        ]


# ---- application secrets -------------------------------------------------------------


def _secret_aad(key_name: str, name: str, version: int) -> bytes:
    return canonical_bytes({"purpose": "app-secret", "service": key_name, "name": name, "version": version})


def _encrypt(session, ctx, key_name: str, v: KeyVersion, name: str, plaintext: bytes) -> bytes:
    wrapped = ctx.keystore.new_wrapped_dek(v.wrap_ref)
    ct = ctx.keystore.dek_encrypt(v.wrap_ref, wrapped, plaintext, _secret_aad(key_name, name, v.version))
    header = canonical_bytes({"s": key_name, "n": name, "v": v.version, "w": _b64e(wrapped)})
    return SECRET_MAGIC + struct.pack(">H", len(header)) + header + ct


def _parse(blob: bytes) -> tuple[dict, bytes]:
    if not isinstance(blob, (bytes, bytearray)) or not blob.startswith(SECRET_MAGIC) or len(blob) < 7:
        raise ServiceKeyError("not an application-secret blob")
    (n,) = struct.unpack(">H", blob[5:7])
    try:
        header = json.loads(blob[7 : 7 + n])
        return header, bytes(blob[7 + n :])
    except ValueError:
        raise ServiceKeyError("application-secret blob has a corrupt header") from None


def _decrypt(session, ctx, blob: bytes, key_name: str, name: str) -> bytes:
    header, ct = _parse(blob)
    if header.get("s") != key_name or header.get("n") != name:
        raise ServiceKeyError(
            f"blob is bound to {header.get('s')} secret {header.get('n')!r}, not {key_name} secret {name!r}"
        )
    v = _live_version(session, key_name, int(header["v"]))
    try:
        return ctx.keystore.dek_decrypt(v.wrap_ref, _b64d(header["w"]), ct, _secret_aad(key_name, name, v.version))
    except DecryptionFailed:
        raise ServiceKeyError(f"{key_name} secret {name!r} does not authenticate (tampered or wrong key)") from None


def encrypt_secret(ctx: KmsContext, service: str, name: str, plaintext: bytes) -> bytes:
    """Encrypt an application secret under the service's active version, bound to (service, name)."""
    key_name = service_key_name(ctx, service)
    if not name:
        raise ServiceKeyError("secret name must not be empty")
    with ctx.transaction() as session:
        return _encrypt(session, ctx, key_name, _active(session, key_name), name, bytes(plaintext))


def decrypt_secret(ctx: KmsContext, service: str, name: str, blob: bytes) -> bytes:
    key_name = service_key_name(ctx, service)
    with ctx.transaction() as session:
        return _decrypt(session, ctx, blob, key_name, name)


def secret_version(blob: bytes) -> int:
    return int(_parse(blob)[0]["v"])


def rewrap_secret(ctx: KmsContext, service: str, name: str, blob: bytes) -> bytes:
    """Move a secret blob to the active version (its DEK is rewrapped inside the keystore)."""
    key_name = service_key_name(ctx, service)
    header, ct = _parse(blob)
    if header.get("s") != key_name or header.get("n") != name:
        raise ServiceKeyError(f"blob is bound to {header.get('s')} secret {header.get('n')!r}")
    with ctx.transaction() as session:
        old = _live_version(session, key_name, int(header["v"]))
        new = _active(session, key_name)
        if old.version == new.version:
            return bytes(blob)
        plaintext = _decrypt(session, ctx, blob, key_name, name)
        return _encrypt(session, ctx, key_name, new, name, plaintext)


# ---- audit-event signing -------------------------------------------------------------


def _event_message(key_name: str, version: int, event: dict) -> bytes:
    return canonical_bytes({"purpose": "audit-event", "service": key_name, "version": version, "event": event})


def sign_audit_event(ctx: KmsContext, service: str, event: dict) -> dict:
    """``{"service", "version", "kid", "event", "signature"}`` signed by the active version."""
    key_name = service_key_name(ctx, service)
    if not isinstance(event, dict):
        raise ServiceKeyError("an audit event is a JSON object")
    with ctx.transaction() as session:
        v = _active(session, key_name)
        signature = ctx.keystore.sign(v.sign_ref, _event_message(key_name, v.version, event))
        return {
            "service": key_name,
            "version": v.version,
            "kid": v.fingerprint,
            "event": event,
            "signature": _b64e(signature),
        }


def verify_audit_event(ctx: KmsContext, signed: dict) -> CredentialCheck:
    """True iff the signature verifies under the named version and that version is active or rotated."""
    try:
        key_name = service_key_name(ctx, signed["service"])
        version = int(signed["version"])
        signature = _b64d(signed["signature"])
        event = signed["event"]
    except (KeyError, TypeError, ValueError):
        return CredentialCheck(False, problem="malformed signed event")
    with ctx.transaction() as session:
        try:
            v = _live_version(session, key_name, version)
        except lifecycle.LifecycleError as exc:
            return CredentialCheck(False, key_name, version=version, problem=str(exc))
        if v.public_key is None:
            return CredentialCheck(False, key_name, version=version, problem=f"{key_name} v{version} has no public key")
        ok = verify_signature(v.public_key, _event_message(key_name, version, event), signature)
        return CredentialCheck(ok, key_name, version=version, problem=None if ok else "bad signature")


def public_key(ctx: KmsContext, service: str, version: int) -> bytes:
    """The public key that verifies a version's audit events offline."""
    key_name = service_key_name(ctx, service)
    with ctx.transaction() as session:
        public = lifecycle.get_version(lifecycle.get_key(session, key_name), version).public_key
    if public is None:
        raise ServiceKeyError(f"{key_name} v{version} has no public key")
    return public
