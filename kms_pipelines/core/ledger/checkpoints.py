"""Signed ledger checkpoints in WORM object storage (policy clause T3).

A checkpoint is the RFC 8785 document ``{ledger_size, ledger_head_hash, rpt_size,
rpt_head_hash, at, kid}`` signed (Ed25519, through the keystore) by the active root version
and written once to ``<policy.checkpoints.prefix><time>-L<size>-R<size>.json`` with a
retention date (S3: Object Lock COMPLIANCE), so a database admin who bypasses the
append-only triggers and recomputes the whole hash chain still cannot make the ledger agree
with the checkpoints written before the rewrite. Recording the RPT head as well catches a
truncation of the newest tokens.

``verify_streams`` is pure: it takes checkpoint objects, public keys and row iterators, and
is used for the live database (``verify``) and for offline evidence bundles
(``core/compliance/evidence.py``) alike.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from datetime import datetime, timedelta
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from sqlalchemy import select

from ..foundation import nightly_steps, retry
from ..foundation.canonical import canonical_bytes
from ..foundation.clock import parse_time
from ..foundation.context import KmsContext
from ..foundation.db.models import ACTIVE, Key, KeyVersion
from ..foundation.db.models_access import AuditEvent
from ..foundation.objectstore import ObjectStore
from . import audit, ledger, rpt
from .rpt import RootKey, RptError, WindowCollector
from .verdict import GENESIS_HASH

FORMAT = "kms-checkpoint/1"
FIELDS = ("ledger_size", "ledger_head_hash", "rpt_size", "rpt_head_hash", "at", "kid")
# The audit chain's head, signed too (checkpoints written before it have none): a cut of the
# audit log's tail is then bounded by a checkpoint like the ledger's.
AUDIT_FIELDS = ("audit_size", "audit_head_hash")


@dataclass(frozen=True)
class Checkpoint:
    key: str  # object key (or "evidence seal")
    ledger_size: int
    ledger_head_hash: str
    rpt_size: int
    rpt_head_hash: str
    at: str
    kid: str
    signature: str  # base64url
    audit_size: int | None = None
    audit_head_hash: str | None = None

    @property
    def document(self) -> dict[str, Any]:
        fields = FIELDS + (AUDIT_FIELDS if self.audit_size is not None else ())
        return {f: getattr(self, f) for f in fields}

    @property
    def at_time(self) -> datetime:
        return parse_time(self.at)


@dataclass(frozen=True)
class Seal(Checkpoint):
    """An evidence bundle's seal: a checkpoint document plus what binds it to the bundle's
    bytes (``extra``: header, per-record digests, content hash, counts), all under one signature."""

    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def document(self) -> dict[str, Any]:
        return {**self.extra, **{f: getattr(self, f) for f in FIELDS}}


def encode(document: dict[str, Any], signature: bytes) -> bytes:
    return canonical_bytes({"format": FORMAT, "document": document, "signature": rpt.b64url(signature)})


def parse(key: str, data: bytes) -> Checkpoint:
    """Parse a stored checkpoint object; RptError naming the object if it is malformed."""
    try:
        obj = json.loads(data)
        doc = obj["document"]
        if obj.get("format") != FORMAT or set(doc) not in (set(FIELDS), set(FIELDS + AUDIT_FIELDS)):
            raise ValueError("unexpected fields")
        cp = Checkpoint(key, **doc, signature=obj["signature"])
        if not all(isinstance(getattr(cp, f), int) for f in ("ledger_size", "rpt_size")):
            raise ValueError("sizes must be integers")
        if "audit_size" in doc and (type(cp.audit_size) is not int or not isinstance(cp.audit_head_hash, str)):
            raise ValueError("audit head malformed")
        parse_time(cp.at)
        return cp
    except (ValueError, KeyError, TypeError) as exc:
        raise RptError(f"checkpoint {key} is malformed ({exc.__class__.__name__})") from None


def signature_problem(cp: Checkpoint, keys: dict[str, RootKey]) -> str | None:
    key = keys.get(cp.kid)
    if key is None:
        return f"checkpoint {cp.key}: unknown kid (no retained root public key matches it)"
    try:
        Ed25519PublicKey.from_public_bytes(key.public_key).verify(
            rpt.b64url_decode(cp.signature), canonical_bytes(cp.document)
        )
    except (InvalidSignature, ValueError):
        return f"checkpoint {cp.key}: signature does not verify under root v{key.version} (checkpoint altered)"
    return None


# ---- the pure verifier -----------------------------------------------------------------------


@dataclass
class AuditResult:
    ok: bool
    problem: str | None = None
    area: str | None = None  # "checkpoint" | "ledger" | "rpt"
    first_bad_seq: int | None = None
    checkpoints: int = 0
    latest_checkpoint: str | None = None
    ledger_size: int = 0
    ledger_head_hash: str = GENESIS_HASH
    rpt_size: int = 0
    rpt_head_hash: str = GENESIS_HASH
    rpt_signatures_checked: bool = False

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _tap(rows: Iterable[tuple[Any, ...]], marks: set[int], seen: dict[int, str]) -> Iterator[tuple[Any, ...]]:
    for row in rows:
        if row[0] in marks:
            seen[row[0]] = row[12]
        yield row


def verify_streams(
    checkpoints: list[Checkpoint],
    keys: dict[str, RootKey],
    ledger_rows: Iterable[tuple[Any, ...]],
    rpt_rows: Iterable[tuple[int, str]],
    *,
    rpt_signatures: bool = False,
    seal: Checkpoint | None = None,
    refused: dict[str, str] | None = None,
) -> AuditResult:
    """Check checkpoint signatures, the ledger chain, the ledger against every checkpoint,
    and the RPT chain against every checkpoint, in one pass over each row stream.

    ``seal`` is a signed head that must match the streams *exactly* (evidence bundles).
    ``refused`` maps kids of keys that are present but not trusted to the reason (bundles).
    The ledger is consumed before the RPT rows (bundle order)."""
    res = AuditResult(False, checkpoints=len(checkpoints), rpt_signatures_checked=rpt_signatures)
    ordered = sorted(checkpoints, key=lambda c: (c.at_time, c.key))
    res.latest_checkpoint = ordered[-1].key if ordered else None
    signed = ordered + ([seal] if seal else [])

    def bad(area: str, problem: str, seq: int | None = None) -> AuditResult:
        res.ok, res.area, res.problem, res.first_bad_seq = False, area, problem, seq
        return res

    for cp in signed:
        problem = f"{cp.key}: {refused[cp.kid]}" if refused and cp.kid in refused else signature_problem(cp, keys)
        if problem:
            return bad("checkpoint", problem)
    for earlier, later in itertools.pairwise(ordered):
        if later.ledger_size < earlier.ledger_size or later.rpt_size < earlier.rpt_size:
            return bad(
                "checkpoint",
                f"checkpoint {later.key} records fewer entries than the earlier {earlier.key} "
                f"(a truncated state was signed)",
            )

    # 1. the ledger: chain, windows of the root versions, hashes at every checkpoint's size
    windows = WindowCollector()
    seen: dict[int, str] = {}
    marks = {cp.ledger_size for cp in signed if cp.ledger_size}
    lres = ledger.verify_rows(windows.tap(_tap(ledger_rows, marks, seen)))
    res.ledger_size, res.ledger_head_hash = lres.count, lres.head_hash
    if not lres.ok:
        return bad("ledger", f"ledger broken at seq {lres.first_bad_seq}: {lres.problem}", lres.first_bad_seq)
    previous_ok = 0
    for cp in signed:
        label = "the evidence seal" if cp is seal else f"checkpoint {cp.key} (signed {cp.at})"
        if lres.count < cp.ledger_size:
            return bad(
                "ledger",
                f"ledger truncated: it ends at seq {lres.count} but {label} recorded {cp.ledger_size} entries",
                lres.count + 1,
            )
        if cp.ledger_size and seen.get(cp.ledger_size) != cp.ledger_head_hash:
            return bad(
                "ledger",
                f"ledger rewritten: the entry hash at seq {cp.ledger_size} differs from {label}; "
                f"the chain was recomputed after a change in seq {previous_ok + 1}..{cp.ledger_size}",
                cp.ledger_size,
            )
        if cp is seal and lres.count != cp.ledger_size:
            return bad(
                "ledger",
                f"the ledger holds {lres.count} entries but {label} recorded {cp.ledger_size}",
                cp.ledger_size + 1,
            )
        previous_ok = max(previous_ok, cp.ledger_size)
    for cp in signed:
        version = keys[cp.kid].version
        window = windows.windows.get(version)
        problem = (
            window.problem_at(int(cp.at_time.timestamp()), what="")
            if window
            else f"root v{version} has no activity window in the ledger"
        )
        if problem:
            return bad("checkpoint", f"checkpoint {cp.key}: {problem}")

    # 2. the RPT chain: links (and signatures when asked) and the head at every checkpoint
    cres = rpt.verify_token_rows(
        rpt_rows,
        keys,
        windows.windows,
        signatures=rpt_signatures,
        marks=[cp.rpt_size for cp in signed],
        refused=refused,
    )
    res.rpt_size, res.rpt_head_hash = cres.head_seq, cres.head_hash
    if not cres.ok:
        return bad("rpt", cres.problem or "RPT chain broken", cres.first_bad_seq)
    for cp in signed:
        label = "the evidence seal" if cp is seal else f"checkpoint {cp.key}"
        checked = rpt.check_head(
            rpt.ChainResult(True, cres.count, None, None, cres.head_seq, cres.head_hash, seen=cres.seen),
            cp.rpt_size,
            cp.rpt_head_hash,
            label,
        )
        if not checked.ok:
            return bad("rpt", checked.problem or f"RPT head differs from {label}", checked.first_bad_seq)
        if cp is seal and cres.head_seq != cp.rpt_size:
            return bad(
                "rpt", f"the RPT chain holds {cres.head_seq} tokens but {label} recorded {cp.rpt_size}", cp.rpt_size + 1
            )
    res.ok = True
    return res


# ---- live ---------------------------------------------------------------------------------------


def _prefix(ctx: KmsContext) -> str:
    return ctx.policy.checkpoints.prefix


def _objects(ctx: KmsContext) -> ObjectStore:
    if ctx.objects is None:
        raise RptError("no object store configured (KMS_OBJECT_STORE): checkpoints live in WORM object storage")
    store: ObjectStore = ctx.objects
    return store


_PARSED: dict[tuple[object, ...], Checkpoint] = {}  # WORM objects do not change: parse each version once per process


def load_all(ctx: KmsContext) -> list[Checkpoint]:
    store = _objects(ctx)
    out: list[Checkpoint] = []
    for info in store.list(_prefix(ctx)):
        if not info.key.endswith(".json"):
            continue
        ident = (store.url(info.key), info.size, info.etag, info.last_modified, info.version_id)
        cp = _PARSED.get(ident) if info.etag else None
        if cp is None:
            cp = parse(info.key, store.get_bytes(info.key))
            if info.etag and len(_PARSED) < 100_000:
                _PARSED[ident] = cp
        out.append(cp)
    return out


def latest(ctx: KmsContext, keys: dict[str, RootKey] | None = None) -> Checkpoint | None:
    """The newest checkpoint, signature verified (RptError if it does not verify)."""
    store = _objects(ctx)
    newest = None
    for info in store.list(_prefix(ctx)):
        if info.key.endswith(".json"):
            newest = info.key  # list() is sorted by key; keys start with a fixed-width UTC time
    if newest is None:
        return None
    cp = parse(newest, store.get_bytes(newest))
    if keys is None:
        with ctx.engine.connect() as conn:
            keys = rpt.root_keys(conn)
    problem = signature_problem(cp, keys)
    if problem:
        raise RptError(problem)
    return cp


def verify(ctx: KmsContext, *, rpt_signatures: bool = False, require_checkpoint: bool = True) -> AuditResult:
    """Check the live ledger (and RPT chain) against every checkpoint in the object store.

    State with no checkpoint at all fails (``require_checkpoint``): without one, a cut of
    the ledger's tail cannot be told from a ledger that never had those rows."""
    checkpoints = load_all(ctx)
    batch = ctx.policy.rpt.verify_batch_size
    with ctx.engine.connect() as conn:
        keys = rpt.root_keys(conn)
        result = verify_streams(
            checkpoints,
            keys,
            ledger.iter_rows(conn, batch),
            rpt.iter_tokens(conn, batch_size=batch),
            rpt_signatures=rpt_signatures,
        )
    if result.ok:
        problem = audit_problem(ctx, checkpoints)
        if problem:
            result.ok, result.area, result.problem = False, "audit", problem
    if result.ok and require_checkpoint and not checkpoints and (result.ledger_size or result.rpt_size):
        result.ok, result.area = False, "checkpoint"
        result.problem = (
            f"no signed checkpoint in WORM storage although the ledger holds {result.ledger_size} "
            f"entries and the RPT chain {result.rpt_size} tokens: nothing bounds a cut of their tail"
        )
    return result


def audit_problem(ctx: KmsContext, checkpoints: list[Checkpoint] | None = None) -> str | None:
    """The audit log against the audit heads the checkpoints signed: an entry missing at a
    signed size is a cut tail; another hash there is a rewrite (the chain itself is
    ``audit.verify``'s)."""
    cps = [c for c in (load_all(ctx) if checkpoints is None else checkpoints) if c.audit_size]
    if not cps:
        return None
    marks = {c.audit_size for c in cps}
    with ctx.engine.connect() as conn:
        held = dict(conn.execute(select(AuditEvent.seq, AuditEvent.entry_hash).where(AuditEvent.seq.in_(marks))).all())
    for cp in sorted(cps, key=lambda c: c.audit_size or 0):  # all set: filtered above
        if cp.audit_size not in held:
            return (
                f"audit log truncated: checkpoint {cp.key} recorded {cp.audit_size} audit events, "
                f"audit seq {cp.audit_size} is gone"
            )
        if held[cp.audit_size] != cp.audit_head_hash:
            return f"audit log rewritten: the event hash at audit seq {cp.audit_size} differs from checkpoint {cp.key}"
    return None


def heads(ctx: KmsContext) -> tuple[int, str, int, str]:
    """(ledger size, ledger head hash, RPT size, RPT head hash) of the live state."""
    with ctx.engine.connect() as conn:
        return (*ledger.head(conn), *rpt.chain_head(conn))


def checkpoint_if_changed(ctx: KmsContext, before: tuple[int, str, int, str] | None = None) -> dict[str, Any] | None:
    """Write a checkpoint when the ledger or RPT heads moved (since ``before``, and past the
    newest checkpoint), so every state change is bounded by a WORM checkpoint and no state
    change gets two. None when nothing changed."""
    now_heads = heads(ctx)
    if before is not None and tuple(before) == now_heads:
        return None
    newest = latest(ctx)
    if (
        newest is not None
        and (newest.ledger_size, newest.ledger_head_hash, newest.rpt_size, newest.rpt_head_hash) == now_heads
    ):
        return None
    return write_checkpoint(ctx)


def _signer(ctx: KmsContext) -> tuple[str, str]:
    with ctx.transaction() as session:
        version = session.scalars(
            select(KeyVersion)
            .join(Key, Key.id == KeyVersion.key_id)
            .where(Key.name == rpt.ROOT, KeyVersion.state == ACTIVE)
        ).first()
        if version is None or not version.sign_ref or not version.fingerprint:
            raise RptError("the root key has no active signing version")
        return version.sign_ref, rpt.make_kid(version.version, version.fingerprint)


def sign_document(
    ctx: KmsContext,
    ledger_size: int,
    ledger_head: str,
    rpt_size: int,
    rpt_head: str,
    at: datetime,
    extra: dict[str, Any] | None = None,
) -> tuple[dict[str, Any], bytes]:
    sign_ref, kid = _signer(ctx)
    doc = {
        **(extra or {}),
        "ledger_size": ledger_size,
        "ledger_head_hash": ledger_head,
        "rpt_size": rpt_size,
        "rpt_head_hash": rpt_head,
        "at": ledger.format_time(at),
        "kid": kid,
    }
    return doc, ctx.keystore.sign(sign_ref, canonical_bytes(doc))


def write_checkpoint(ctx: KmsContext) -> dict[str, Any]:
    """Verify the live state against every earlier checkpoint, then sign and write a new one.

    Refuses (RptError, nothing written) when verification fails: a checkpoint must never
    anchor a broken or rewritten ledger. Idempotent for an unchanged state at the same time.
    Retried whole after a lost database connection: a repeat re-verifies and signs anew."""
    return retry.db_call(
        ctx, lambda: _write_checkpoint_once(ctx), what="the ledger checkpoint", rerun="kms ledger checkpoint"
    )


def _write_checkpoint_once(ctx: KmsContext) -> dict[str, Any]:
    store = _objects(ctx)
    result = verify(ctx, require_checkpoint=False)
    if not result.ok:
        raise RptError(f"refusing to sign a checkpoint: {result.problem}")
    now = ctx.now()
    audit.flush(ctx)
    with ctx.engine.connect() as conn:
        audit_size, audit_head = audit.head(conn)
    doc, signature = sign_document(
        ctx,
        result.ledger_size,
        result.ledger_head_hash,
        result.rpt_size,
        result.rpt_head_hash,
        now,
        extra={"audit_size": audit_size, "audit_head_hash": audit_head},
    )
    stamp = now.strftime("%Y%m%dT%H%M%S.%fZ")
    key = f"{_prefix(ctx)}{stamp}-L{result.ledger_size}-R{result.rpt_size}.json"
    retain_until = now + timedelta(days=ctx.policy.checkpoints.retain_days)
    if store.exists(key):
        existing = parse(key, store.get_bytes(key))
        if (existing.ledger_head_hash, existing.rpt_head_hash) != (doc["ledger_head_hash"], doc["rpt_head_hash"]):
            raise RptError(f"checkpoint {key} already exists with different heads")
        info = store.head(key)
    else:
        info = store.put(
            key,
            encode(doc, signature),
            retain_until=retain_until,
            content_type="application/json",
            metadata={"ledger-size": str(doc["ledger_size"]), "rpt-size": str(doc["rpt_size"])},
        )
    return {
        "key": key,
        "url": store.url(key),
        **doc,
        "retain_until": info.retain_until,
        "lock_mode": info.lock_mode,
        "checkpoints_before": result.checkpoints,
    }


@nightly_steps.nightly_step("ledger_checkpoint", order=45)
def _nightly_checkpoint(ctx: KmsContext) -> dict[str, Any]:
    cp = write_checkpoint(ctx)
    return {"key": cp["key"], "ledger_size": cp["ledger_size"], "rpt_size": cp["rpt_size"]}


@nightly_steps.nightly_step("final_checkpoint", order=99)
def _nightly_final_checkpoint(ctx: KmsContext) -> dict[str, Any]:
    """Steps after ``ledger_checkpoint`` (retirement, retention) may move the ledger: end the
    night under a checkpoint too (none when nothing moved)."""
    cp = checkpoint_if_changed(ctx)
    return {"key": cp["key"] if cp else None}
