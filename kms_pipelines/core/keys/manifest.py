"""Public-key manifests of the root key (clause R1: "publish new public key fingerprints").

Every root version gets one manifest, written write-once (Object Lock / emulated WORM)
to the object store at ``manifests/root/v<N>.json``. It is RFC 8785 canonical JSON:

    {"format": "kms-root-manifest/1", "key": "root", "version": N, "kid": "root.vN",
     "algorithm": "Ed25519", "public_key": <base64 raw 32 bytes>, "fingerprint": "SHA256:<hex>",
     "valid_from": <activation time, UTC>,
     "previous": {"version": N-1, "kid": ..., "fingerprint": ..., "status": "rotated",
                  "signature": <base64 Ed25519 by root vN-1 over SIGNING_CONTEXT + new fingerprint>}
                 | null}

The chain of manifests is verifiable offline with nothing but the manifests
(``verify_chain``): each fingerprint matches its public key, and each new fingerprint is
signed by the previous root. A previous root that was revoked (compromised) does not
sign; its ``status`` says so and ``signature`` is null, which ``verify_chain`` reports.

Publication is idempotent and runs after the rotation commits (``publish_pending``): the
document is a pure function of the database (Ed25519 signatures are deterministic), so a
re-run after a crash writes the same bytes, and an existing object with other bytes is
reported as tampered. Objects are locked for the root's rotation period plus its
retention (the manifest must outlive the key's verify-only life).
"""

from __future__ import annotations

import base64
import hashlib
import json
from dataclasses import asdict, dataclass
from datetime import UTC, datetime, timedelta

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError

from ..foundation.canonical import canonical_bytes
from ..foundation.clock import parse_time, utc
from ..foundation.context import KmsContext
from ..foundation.db.models import ACTIVE, PENDING, REVOKED, ROTATED, KeyVersion
from ..foundation.db.models_rotation import RootManifest
from ..foundation.keystore import fingerprint as fingerprint_of
from ..foundation.keystore import verify_signature
from ..ledger.ledger import format_time
from . import lifecycle

FORMAT = "kms-root-manifest/1"
SIGNING_CONTEXT = b"kms-pipelines root manifest v1\n"
PREFIX = "manifests/root/"


class ManifestError(lifecycle.LifecycleError):
    """A manifest could not be published or does not verify."""


def object_key(version: int) -> str:
    return f"{PREFIX}v{version}.json"


def kid(version: int) -> str:
    return f"root.v{version}"


def signed_message(new_fingerprint: str) -> bytes:
    return SIGNING_CONTEXT + new_fingerprint.encode("ascii")


@dataclass
class ManifestInfo:
    version: int
    kid: str
    fingerprint: str
    previous_fingerprint: str | None
    object_key: str
    url: str
    sha256: str
    published_at: datetime
    new: bool = False

    def to_dict(self) -> dict:
        return asdict(self)


def build(ctx: KmsContext, versions: list[KeyVersion], v: KeyVersion) -> dict:
    """The manifest document of root version ``v`` (``versions``: all root versions)."""
    if v.public_key is None or v.fingerprint is None or v.activated_at is None:
        # a published root version is an activated Ed25519 key; anything less is not a manifest
        fields = (("public key", v.public_key), ("fingerprint", v.fingerprint), ("activation time", v.activated_at))
        missing = " and no ".join(name for name, value in fields if value is None)
        raise ManifestError(f"root v{v.version} has no {missing}; nothing to publish")
    previous = max(
        (x for x in versions if x.version < v.version and x.state != PENDING), key=lambda x: x.version, default=None
    )
    prev_doc = None
    if previous is not None:
        signature = None
        if previous.state in (ACTIVE, ROTATED) and previous.sign_ref:
            signature = base64.b64encode(ctx.keystore.sign(previous.sign_ref, signed_message(v.fingerprint))).decode()
        prev_doc = {
            "version": previous.version,
            "kid": kid(previous.version),
            "fingerprint": previous.fingerprint,
            "status": previous.state,
            "signature": signature,
        }
    return {
        "format": FORMAT,
        "key": "root",
        "version": v.version,
        "kid": kid(v.version),
        "algorithm": "Ed25519",
        "public_key": base64.b64encode(v.public_key).decode(),
        "fingerprint": v.fingerprint,
        "valid_from": format_time(utc(v.activated_at)),
        "previous": prev_doc,
    }


def _retain_until(ctx: KmsContext) -> datetime:
    kc = ctx.policy.key_class("root")
    days = (kc.rotation_days or 0) + (kc.retention_days or ctx.policy.retention.expired_root_service_days)
    # Never shorter than that from the wall clock either: a simulated or replayed clock in
    # the past must not produce a lock that has already ended.
    base = max(ctx.now(), datetime.now(UTC))
    return base + timedelta(days=days)


def publish(ctx: KmsContext, version: int) -> ManifestInfo:
    """Publish root ``version``'s manifest (idempotent; refuses a conflicting existing object)."""
    if ctx.objects is None:
        raise ManifestError("no object store configured: cannot publish the root manifest")
    with ctx.transaction() as session:
        row = session.get(RootManifest, version)
        if row is not None:
            return _info(ctx, row)
        root = lifecycle.get_key(session, "root")
        v = lifecycle.get_version(root, version)
        if v.state == PENDING or not v.public_key:
            raise ManifestError(f"root v{version} is {v.state}; nothing to publish")
        doc = build(ctx, list(root.versions), v)
    body = canonical_bytes(doc)
    digest = hashlib.sha256(body).hexdigest()
    key = object_key(version)
    retain_until = None
    if ctx.objects.exists(key):
        existing = hashlib.sha256(ctx.objects.get_bytes(key)).hexdigest()
        if existing != digest:
            raise ManifestError(
                f"{ctx.objects.url(key)} exists with different content than root v{version}'s "
                f"manifest (sha256 {existing[:16]}… ≠ {digest[:16]}…): tampered or foreign"
            )
    else:
        retain_until = _retain_until(ctx)
        ctx.objects.put(
            key,
            body,
            retain_until=retain_until,
            content_type="application/json",
            metadata={"kid": kid(version), "sha256": digest},
        )
    row = RootManifest(
        root_version=version,
        kid=kid(version),
        fingerprint=doc["fingerprint"],
        previous_version=(doc["previous"] or {}).get("version"),
        previous_fingerprint=(doc["previous"] or {}).get("fingerprint"),
        object_key=key,
        sha256=digest,
        published_at=ctx.now(),
        retain_until=retain_until,
    )
    try:
        with ctx.transaction() as session:
            session.add(row)
    except IntegrityError:  # published concurrently with identical bytes
        with ctx.transaction() as session:
            published = session.get(RootManifest, version)
            if published is None:  # the conflict was not the concurrent publication: report it
                raise
            return _info(ctx, published)
    info = _info(ctx, row)
    info.new = True
    return info


def _info(ctx: KmsContext, row: RootManifest) -> ManifestInfo:
    url = ctx.objects.url(row.object_key) if ctx.objects is not None else row.object_key
    return ManifestInfo(
        row.root_version,
        row.kid,
        row.fingerprint,
        row.previous_fingerprint,
        row.object_key,
        url,
        row.sha256,
        utc(row.published_at),
    )


def publish_pending(ctx: KmsContext) -> list[ManifestInfo]:
    """Publish the manifest of every root version that has none yet (oldest first)."""
    with ctx.transaction() as session:
        root = lifecycle.get_key(session, "root")
        published = set(session.scalars(select(RootManifest.root_version)))
        todo = [
            v.version for v in root.versions if v.version not in published and v.state in (ACTIVE, ROTATED, REVOKED)
        ]
    return [publish(ctx, n) for n in sorted(todo)]


def manifests(ctx: KmsContext) -> list[ManifestInfo]:
    with ctx.transaction() as session:
        return [_info(ctx, r) for r in session.scalars(select(RootManifest).order_by(RootManifest.root_version))]


def latest(ctx: KmsContext) -> ManifestInfo | None:
    rows = manifests(ctx)
    return rows[-1] if rows else None


@dataclass
class ChainCheck:
    ok: bool
    count: int
    problem: str | None = None
    first_bad_version: int | None = None


def verify_documents(docs: list[dict]) -> ChainCheck:
    """Verify manifests offline (public keys only), in version order."""
    docs = sorted(docs, key=lambda d: d.get("version", 0))
    by_version = {d["version"]: d for d in docs}
    for d in docs:
        n = d.get("version")
        try:
            pub = base64.b64decode(d["public_key"])
        except (KeyError, ValueError):
            return ChainCheck(False, len(docs), f"v{n}: public key missing or not base64", n)
        if d.get("format") != FORMAT:
            return ChainCheck(False, len(docs), f"v{n}: unknown format {d.get('format')!r}", n)
        if fingerprint_of(pub) != d.get("fingerprint"):
            return ChainCheck(False, len(docs), f"v{n}: fingerprint does not match the public key", n)
        prev = d.get("previous")
        if prev is None:
            if n != min(by_version):
                return ChainCheck(False, len(docs), f"v{n}: no previous root although earlier manifests exist", n)
            continue
        pdoc = by_version.get(prev.get("version"))
        if pdoc is None:
            return ChainCheck(False, len(docs), f"v{n}: previous manifest v{prev.get('version')} is missing", n)
        if pdoc["fingerprint"] != prev.get("fingerprint"):
            return ChainCheck(False, len(docs), f"v{n}: previous fingerprint differs from v{pdoc['version']}'s", n)
        if prev.get("signature") is None:
            return ChainCheck(False, len(docs), f"v{n}: previous root was {prev.get('status')} and did not sign", n)
        sig = base64.b64decode(prev["signature"])
        if not verify_signature(base64.b64decode(pdoc["public_key"]), signed_message(d["fingerprint"]), sig):
            return ChainCheck(False, len(docs), f"v{n}: previous root's signature over the fingerprint is invalid", n)
    return ChainCheck(True, len(docs))


def verify_chain(ctx: KmsContext) -> ChainCheck:
    """Read every published manifest from the object store and verify the chain offline;
    each object must also match the digest recorded when it was published."""
    docs: list[dict] = []
    for info in manifests(ctx):
        body = ctx.objects.get_bytes(info.object_key)
        if hashlib.sha256(body).hexdigest() != info.sha256:
            return ChainCheck(
                False, len(docs), f"v{info.version}: object differs from the published digest", info.version
            )
        docs.append(json.loads(body))
    return verify_documents(docs)


_DOC_FIELDS = {"format", "key", "version", "kid", "algorithm", "public_key", "fingerprint", "valid_from", "previous"}
_PREV_FIELDS = {"version", "kid", "fingerprint", "status", "signature"}


def document_problem(d) -> str | None:
    """Field-by-field schema check of one manifest document (what an offline verifier needs
    before it trusts any field); None when it is well formed and self-consistent."""
    if not isinstance(d, dict):
        return "not a JSON object"
    if set(d) != _DOC_FIELDS:
        return f"fields {sorted(set(d) ^ _DOC_FIELDS)} missing or unexpected"
    n = d["version"]
    if type(n) is not int or n < 1:
        return "version is not a positive integer"
    if d["format"] != FORMAT or d["key"] != "root" or d["kid"] != kid(n) or d["algorithm"] != "Ed25519":
        return f"v{n}: format, key, kid or algorithm is not a {FORMAT} root manifest's"
    try:
        pub = base64.b64decode(d["public_key"], validate=True)
        parse_time(d["valid_from"])
    except (ValueError, TypeError):
        return f"v{n}: public key or valid_from malformed"
    if len(pub) != 32 or fingerprint_of(pub) != d["fingerprint"]:
        return f"v{n}: fingerprint does not match the public key"
    prev = d["previous"]
    if prev is not None:
        if not isinstance(prev, dict) or set(prev) != _PREV_FIELDS:
            return f"v{n}: previous is not a {sorted(_PREV_FIELDS)} object"
        if type(prev["version"]) is not int or not 0 < prev["version"] < n or prev["kid"] != kid(prev["version"]):
            return f"v{n}: previous version or kid malformed"
        if prev["signature"] is not None:
            try:
                base64.b64decode(prev["signature"], validate=True)
            except (ValueError, TypeError):
                return f"v{n}: previous signature is not base64"
    return None


def reached_from(docs: list[dict], anchors: set[str]) -> dict[int, dict]:
    """The manifests trusted from pinned fingerprints: an anchor itself, or a manifest whose
    previous root (itself reached) signed its fingerprint -- old signs new, never backwards.
    ``docs`` must already pass ``document_problem``."""
    reached: dict[int, dict] = {}
    by_version = {d["version"]: d for d in docs}
    for n in sorted(by_version):
        d = by_version[n]
        if d["fingerprint"] in anchors:
            reached[n] = d
            continue
        prev = d["previous"]
        if not prev or prev["signature"] is None:
            continue
        pdoc = reached.get(prev["version"])
        if pdoc is None or pdoc["fingerprint"] != prev["fingerprint"]:
            continue
        if verify_signature(
            base64.b64decode(pdoc["public_key"]), signed_message(d["fingerprint"]), base64.b64decode(prev["signature"])
        ):
            reached[n] = d
    return reached
