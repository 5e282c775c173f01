"""Regulatory proof tokens (policy clause P1) and ``verify_chain`` (the policy's verifyChain).

Token format (documented in README, "RPTs"):

* A compact JWS (RFC 7515) with ``alg`` ``EdDSA`` (Ed25519, RFC 8037). Header and payload
  are RFC 8785 canonical JSON, base64url without padding; the signing input is
  ``ascii(b64(header) + "." + b64(payload))``.
* header: ``{"alg": "EdDSA", "kid": "root#v<N>:SHA256:<hex>"}``. The kid names the root
  version *and* binds it to the SHA-256 fingerprint of its public key, so a verifier can
  check that the public key it holds (database, evidence bundle, published manifest) is
  the one that signed, and a key swapped behind an unchanged version number is refused.
* payload: ``{"seq", "prev", "iat", "subject", "claims"}``; ``seq`` starts at 1, ``prev``
  is the SHA-256 hex of the previous token's compact string (64 zeros for seq 1), ``iat``
  is a NumericDate (integer seconds, RFC 7519).
* The signature is made by the *active* root version through ``ctx.keystore.sign`` (inside
  the HSM under PKCS#11); the private key never leaves the keystore.

Verification (``verify_token_rows``) is a pure function over ``(seq, token)`` rows, public
keys and the root versions' activity windows, so the live verifier (rows from the KMS
database) and the offline one (rows from an evidence bundle, ``core/compliance/evidence.py``) are one
implementation. A version is valid for tokens whose ``iat`` lies in
``[floor(activated_at), end]`` where ``end`` is the earliest of its ``rotated``, ``revoked``
and ``destroyed`` ledger times (iat has one-second resolution, so a token issued in the
same second as the rotation, before it, is accepted: the tolerance is under one second). Tokens signed inside the window stay valid after a
later revocation: they are anchored by the chain and by signed checkpoints.
"""

from __future__ import annotations

import base64
import hashlib
import json
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from sqlalchemy import func, insert, select
from sqlalchemy.engine import Connection
from sqlalchemy.orm import Session

from ..foundation.canonical import canonical_bytes
from ..foundation.clock import utc
from ..foundation.context import KmsContext
from ..foundation.db.models import ACTIVE, Key, KeyVersion, LedgerEntry
from ..foundation.db.models_rpt import RegulatoryProofToken
from ..foundation.keystore import fingerprint as key_fingerprint
from . import ledger

GENESIS_HASH = "0" * 64
ALG = "EdDSA"
ROOT = "root"

_sha256 = hashlib.sha256
_b64d = base64.urlsafe_b64decode


class RptError(ValueError):
    """A refused RPT operation or a broken chain; the message names the problem."""


# ---- encoding ------------------------------------------------------------------------


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def b64url_decode(text: str) -> bytes:
    return _b64d(text + "=" * (-len(text) % 4))


def token_hash(token: str) -> str:
    """SHA-256 hex of a token's compact string (what the next token's ``prev`` holds)."""
    return _sha256(token.encode("ascii")).hexdigest()


def make_kid(version: int, fingerprint: str) -> str:
    return f"{ROOT}#v{version}:{fingerprint}"


def parse_kid(kid: str) -> tuple[int, str] | None:
    """``root#v3:SHA256:…`` -> (3, "SHA256:…"); None when it is not a root kid."""
    if not isinstance(kid, str) or not kid.startswith(ROOT + "#v") or ":" not in kid:
        return None
    number, _, fp = kid[len(ROOT) + 2 :].partition(":")
    return (int(number), fp) if number.isdigit() and fp else None


def signing_input(header: dict[str, Any], payload: dict[str, Any]) -> str:
    return b64url(canonical_bytes(header)) + "." + b64url(canonical_bytes(payload))


def decode(token: str) -> tuple[dict[str, Any], dict[str, Any], bytes]:
    """(header, payload, signature) of a compact token, without verifying anything."""
    try:
        h, p, s = token.split(".")
        return json.loads(b64url_decode(h)), json.loads(b64url_decode(p)), b64url_decode(s)
    except (ValueError, AttributeError) as exc:
        raise RptError(f"not a compact JWS: {exc.__class__.__name__}") from None


def format_iat(iat: int) -> str:
    return datetime.fromtimestamp(iat, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


# ---- public keys and activity windows (pure; fed from the database or a bundle) --------


@dataclass(frozen=True)
class RootKey:
    version: int
    public_key: bytes
    fingerprint: str

    @property
    def kid(self) -> str:
        return make_kid(self.version, self.fingerprint)


@dataclass
class Window:
    """When a root version was allowed to sign, according to the ledger."""

    version: int
    activated_at: datetime | None = None
    ended_at: datetime | None = None
    ended_by: str | None = None  # "rotated" | "revoked" | "destroyed"

    def problem_at(self, iat: int, what: str = "iat ") -> str | None:
        if self.activated_at is None:
            return f"root v{self.version} was never activated according to the ledger"
        if iat < int(self.activated_at.timestamp()):
            return (
                f"signed by root v{self.version} at {what}{format_iat(iat)}, before it was activated "
                f"at {ledger.format_time(self.activated_at)}"
            )
        if self.ended_at is not None and iat > self.ended_at.timestamp():
            return (
                f"signed by root v{self.version} at {what}{format_iat(iat)}, after it was {self.ended_by} "
                f"at {ledger.format_time(self.ended_at)}"
            )
        return None


def key_map(keys: Iterable[RootKey]) -> dict[str, RootKey]:
    """kid -> key, keeping only keys whose public key matches their recorded fingerprint."""
    out = {}
    for k in keys:
        if k.public_key and key_fingerprint(k.public_key) == k.fingerprint:
            out[k.kid] = k
    return out


class WindowCollector:
    """Builds root activity windows from ledger rows (``ledger._COLUMNS`` tuples) as they
    stream past, so an offline verifier needs a single pass over the ledger."""

    def __init__(self) -> None:
        self.windows: dict[int, Window] = {}

    def add(self, at: datetime, key_name: str, key_version: int | None, to_state: str) -> None:
        if key_name != ROOT or key_version is None:
            return
        w = self.windows.setdefault(key_version, Window(key_version))
        at = utc(at)
        if to_state == ACTIVE:
            w.activated_at = at if w.activated_at is None else min(w.activated_at, at)
        elif to_state in ("rotated", "revoked", "destroyed"):
            if w.ended_at is None or at < w.ended_at:
                w.ended_at, w.ended_by = at, to_state

    def tap(self, rows: Iterable[tuple[Any, ...]]) -> Iterator[tuple[Any, ...]]:
        for row in rows:
            if row[2] == ROOT:
                self.add(row[1], row[2], row[3], row[5])
            yield row


# ---- verification (pure) ----------------------------------------------------------------


@dataclass
class ChainResult:
    ok: bool
    count: int
    first_bad_seq: int | None = None
    problem: str | None = None
    head_seq: int = 0
    head_hash: str = GENESIS_HASH
    first_seq: int = 1
    checked_against: str | None = None  # the checkpoint the head was compared with
    seen: dict[int, str] = field(default_factory=dict)  # seq -> token hash at requested marks

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("seen")
        return d


@dataclass(frozen=True)
class Anchor:
    """Where a (partial) verification starts: the token before the first one checked."""

    seq: int = 0
    hash: str = GENESIS_HASH
    iat: int | None = None


def verify_token_rows(
    rows: Iterable[tuple[int, str]],
    keys: dict[str, RootKey],
    windows: dict[int, Window],
    *,
    anchor: Anchor = Anchor(),
    end_seq: int | None = None,
    signatures: bool = True,
    marks: Iterable[int] = (),
    refused: dict[str, str] | None = None,
) -> ChainResult:
    """Verify ``(seq, token)`` rows in seq order, naming the first bad seq and why.

    Checks, per token: its position (no gap, no reorder), that ``prev`` links to the previous
    token, the header (alg, known kid), the Ed25519 signature under the kid's public key, that
    the kid's root version was active at ``iat`` (ledger windows), and that ``iat`` never goes
    backwards. ``end_seq`` demands the rows reach that seq (partitioned runs). ``marks`` lists
    seqs whose token hashes are returned in ``seen`` (checkpoint comparisons). ``refused`` maps
    kids that are known but not trusted (not reached from a pinned root) to the reason.
    With ``signatures=False`` only the hash chain is checked (cheap; checkpoint verification).
    """
    expected, prev, prev_iat, count = anchor.seq + 1, anchor.hash, anchor.iat, 0
    mark_list = sorted(set(m for m in marks if m > anchor.seq))
    mark_i, next_mark = 0, (mark_list[0] if mark_list else -1)
    seen: dict[int, str] = {}
    headers: dict[str, tuple[RootKey, Window | None, Ed25519PublicKey, int | None, float]] = {}
    pubs: dict[str, Ed25519PublicKey] = {}
    loads, sha = json.loads, _sha256

    def fail(seq: int, problem: str) -> ChainResult:
        return ChainResult(
            False, count, seq, f"token seq {seq}: {problem}", expected - 1, prev, anchor.seq + 1, seen=seen
        )

    for seq, token in rows:
        if seq != expected:
            if seq > expected:
                return fail(expected, f"seq gap: token seq {expected} is missing (next present is {seq})")
            return fail(seq, f"seq {seq} appears twice or out of order")
        parts = token.split(".")
        if len(parts) != 3:
            return fail(seq, "malformed token: not a compact JWS")
        hb, pb, sb = parts
        cached = headers.get(hb)
        if cached is None:
            try:
                header = loads(_b64d(hb + "=" * (-len(hb) % 4)))
                alg, kid = header["alg"], header["kid"]
            except (ValueError, KeyError, TypeError):
                return fail(seq, "malformed header")
            if alg != ALG or set(header) != {"alg", "kid"}:
                return fail(seq, f"header must be exactly alg {ALG} and kid (got alg {alg!r})")
            key = keys.get(kid)
            if key is None:
                parsed = parse_kid(kid) if isinstance(kid, str) else None
                why = (
                    f"unknown kid {str(kid)[:40]!r}"
                    if parsed is None
                    else f"unknown kid: no retained public key of root v{parsed[0]} has fingerprint {parsed[1][:23]}…"
                )
                return fail(seq, why)
            if refused and kid in refused:
                return fail(seq, refused[kid])
            pub = pubs.get(kid)
            if pub is None:
                pub = pubs[kid] = Ed25519PublicKey.from_public_bytes(key.public_key)
            window = windows.get(key.version)
            start = int(window.activated_at.timestamp()) if window and window.activated_at else None
            end = window.ended_at.timestamp() if window and window.ended_at else float("inf")
            cached = headers[hb] = (key, window, pub, start, end)
        key, window, pub, start, end = cached
        raw = token.encode("ascii")
        if signatures:
            try:
                pub.verify(_b64d(sb + "=" * (-len(sb) % 4)), raw[: len(hb) + len(pb) + 1])
            except (InvalidSignature, ValueError):
                return fail(seq, f"payload altered: signature does not verify under root v{key.version}")
        try:
            payload = loads(_b64d(pb + "=" * (-len(pb) % 4)))
            p_seq, p_prev, iat = payload["seq"], payload["prev"], payload["iat"]
        except (ValueError, KeyError, TypeError):
            return fail(seq, "malformed payload")
        if p_seq != seq:
            return fail(seq, f"out of order: position {seq} holds the token signed as seq {p_seq} (reordered)")
        if p_prev != prev:
            return fail(seq, f"prev hash does not link to seq {seq - 1}")
        if type(iat) is not int:
            return fail(seq, "iat is not an integer NumericDate")
        if prev_iat is not None and iat < prev_iat:
            return fail(seq, f"iat {format_iat(iat)} goes backwards (seq {seq - 1} has {format_iat(prev_iat)})")
        if start is None or iat < start or iat > end:
            if window is None:
                return fail(seq, f"root v{key.version} has no activity window in the ledger")
            # start/end come from this window, so problem_at names the bound that was crossed.
            return fail(seq, window.problem_at(iat) or f"iat {format_iat(iat)} is outside root v{key.version}'s window")
        prev = sha(raw).hexdigest()
        if seq == next_mark:
            seen[seq] = prev
            mark_i += 1
            next_mark = mark_list[mark_i] if mark_i < len(mark_list) else -1
        prev_iat, expected, count = iat, seq + 1, count + 1
    if end_seq is not None and expected - 1 < end_seq:
        return fail(
            expected,
            f"seq gap: token seq {expected} is missing (the chain ends at seq {expected - 1}, expected seq {end_seq})",
        )
    return ChainResult(True, count, None, None, expected - 1, prev, anchor.seq + 1, seen=seen)


def check_head(result: ChainResult, size: int, head_hash: str, label: str) -> ChainResult:
    """Compare a verified chain with a signed head (checkpoint or evidence seal)."""
    if not result.ok:
        return result
    result.checked_against = label
    if result.head_seq < size:
        result.ok, result.first_bad_seq = False, result.head_seq + 1
        result.problem = (
            f"RPT chain truncated: it ends at seq {result.head_seq} but {label} recorded "
            f"{size} tokens (seq {result.head_seq + 1}..{size} are missing)"
        )
    elif size and result.seen.get(size, head_hash if size < result.first_seq else None) != head_hash:
        result.ok, result.first_bad_seq = False, size
        result.problem = f"token seq {size}: its hash differs from the head recorded by {label} (chain rewritten)"
    return result


# ---- database access -----------------------------------------------------------------------


def root_keys(conn: Connection) -> dict[str, RootKey]:
    """Retained public keys of every root version (kept after the private key is destroyed)."""
    rows = conn.execute(
        select(KeyVersion.version, KeyVersion.public_key, KeyVersion.fingerprint)
        .join(Key, Key.id == KeyVersion.key_id)
        .where(Key.name == ROOT)
    ).all()
    return key_map(RootKey(v, bytes(pk), fp) for v, pk, fp in rows if pk is not None and fp)


def root_windows(conn: Connection) -> dict[int, Window]:
    collector = WindowCollector()
    for at, name, version, to_state in conn.execute(
        select(LedgerEntry.at, LedgerEntry.key_name, LedgerEntry.key_version, LedgerEntry.to_state)
        .where(LedgerEntry.key_name == ROOT)
        .order_by(LedgerEntry.seq)
    ):
        collector.add(at, name, version, to_state)
    return collector.windows


def iter_tokens(
    conn: Connection, *, after_seq: int = 0, upto_seq: int | None = None, batch_size: int = 5000
) -> Iterator[tuple[int, str]]:
    """Stream ``(seq, token)`` in seq order with bounded memory."""
    q = select(RegulatoryProofToken.seq, RegulatoryProofToken.token).where(RegulatoryProofToken.seq > after_seq)
    if upto_seq is not None:
        q = q.where(RegulatoryProofToken.seq <= upto_seq)
    result = conn.execution_options(stream_results=True, yield_per=batch_size).execute(
        q.order_by(RegulatoryProofToken.seq)
    )
    for partition in result.partitions():
        yield from partition


def chain_head(conn: Connection) -> tuple[int, str]:
    """(seq, token hash) of the newest token, or (0, GENESIS_HASH)."""
    row = conn.execute(
        select(RegulatoryProofToken.seq, RegulatoryProofToken.token).order_by(RegulatoryProofToken.seq.desc()).limit(1)
    ).first()
    return (row[0], token_hash(row[1])) if row else (0, GENESIS_HASH)


def anchor_at(conn: Connection, seq: int) -> Anchor:
    """The anchor for verifying tokens after ``seq``: that token's hash and iat as stored."""
    if seq <= 0:
        return Anchor()
    token = conn.execute(select(RegulatoryProofToken.token).where(RegulatoryProofToken.seq == seq)).scalar()
    if token is None:
        raise RptError(f"cannot anchor at token seq {seq}: it is missing (seq gap)")
    try:
        iat = decode(token)[1]["iat"]
    except (RptError, KeyError, TypeError):
        iat = None
    return Anchor(seq, token_hash(token), iat if isinstance(iat, int) else None)


# ---- issue -------------------------------------------------------------------------------

_ISSUE_LOCK = threading.Lock()  # serialises issuers in one process; the database serialises the rest


def _validate(ctx: KmsContext, subject: str, claims: dict[str, Any]) -> None:
    limits = ctx.policy.rpt
    if not isinstance(subject, str) or not subject.strip():
        raise RptError("subject must be a non-empty string")
    if len(subject) > limits.subject_max_length:
        raise RptError(f"subject is {len(subject)} characters; the policy allows {limits.subject_max_length}")
    if not isinstance(claims, dict):
        raise RptError(f"claims must be a JSON object, got {type(claims).__name__}")
    try:
        size = len(canonical_bytes(claims))
    except Exception as exc:  # noqa: BLE001 - rfc8785 raises several types for bad input
        raise RptError(f"claims are not canonicalisable JSON (RFC 8785): {exc.__class__.__name__}") from None
    if size > limits.max_claims_bytes:
        raise RptError(f"claims are {size} bytes of canonical JSON; the policy allows {limits.max_claims_bytes}")


@dataclass(frozen=True)
class _Signer:
    version_id: int
    version: int
    sign_ref: str
    public_key: bytes
    fingerprint: str
    activated_at: datetime

    @property
    def kid(self) -> str:
        return make_kid(self.version, self.fingerprint)


def _active_root(session: Session) -> _Signer:
    """The active root version, in one statement that also locks the root key row for share,
    so no rotation commits between reading it and committing a token it signed."""
    row = session.execute(
        select(
            KeyVersion.id,
            KeyVersion.version,
            KeyVersion.sign_ref,
            KeyVersion.public_key,
            KeyVersion.fingerprint,
            KeyVersion.activated_at,
        )
        .join(Key, Key.id == KeyVersion.key_id)
        .where(Key.name == ROOT, KeyVersion.state == ACTIVE)
        .with_for_update(read=True, of=Key)
    ).first()
    if row is None or not row.sign_ref or not row.public_key or not row.fingerprint:
        raise RptError("the root key has no active signing version (run `kms init`)")
    return _Signer(row.id, row.version, row.sign_ref, bytes(row.public_key), row.fingerprint, utc(row.activated_at))


def _newest(session: Session) -> tuple[int, str, int | None]:
    row = session.execute(
        select(RegulatoryProofToken.seq, RegulatoryProofToken.token_hash, RegulatoryProofToken.iat)
        .order_by(RegulatoryProofToken.seq.desc())
        .limit(1)
    ).first()
    if row is None:
        return 0, GENESIS_HASH, None
    return row[0], row[1], int(utc(row[2]).timestamp())


def issue(ctx: KmsContext, subject: str, claims: dict[str, Any]) -> str:
    """Issue one RPT signed by the active root version; returns the compact JWS.

    The signature is made outside any database transaction (an HSM call must not hold the
    database's write lock, and the audited keystore records its own event), then the token
    is inserted under the ledger lock after re-checking that neither the chain head nor the
    active root version moved; if one did (another process issued or the root rotated),
    it is re-built and re-signed. Issuers in one process are serialised outright.
    """
    return issue_many(ctx, [(subject, claims)])[0]


def issue_many(ctx: KmsContext, items: list[tuple[str, dict[str, Any]]]) -> list[str]:
    """Issue several RPTs as consecutive seqs, committed together (all or none)."""
    items = list(items)
    if not items:
        return []
    for subject, claims in items:
        _validate(ctx, subject, claims)
    with _ISSUE_LOCK:
        for attempt in range(ctx.policy.rpt.issue_retries):
            with ctx.transaction() as session:
                signer = _active_root(session)
                seq, prev, last_iat = _newest(session)
            iat = int(ctx.now().timestamp())
            if last_iat is not None and iat < last_iat:
                raise RptError(
                    f"clock is behind the newest token (seq {seq} has iat {format_iat(last_iat)}, "
                    f"now is {format_iat(iat)}); refusing to issue a token that goes back in time"
                )
            if iat < int(signer.activated_at.timestamp()):
                raise RptError(
                    f"the active root version was activated at {ledger.format_time(signer.activated_at)}, "
                    f"after the issue time {format_iat(iat)}"
                )
            header, pub = {"alg": ALG, "kid": signer.kid}, Ed25519PublicKey.from_public_bytes(signer.public_key)
            rows: list[dict[str, Any]] = []
            head_seq, head_hash = seq, prev
            for subject, claims in items:
                payload = {"seq": head_seq + 1, "prev": head_hash, "iat": iat, "subject": subject, "claims": claims}
                data = signing_input(header, payload).encode("ascii")
                signature = ctx.keystore.sign(signer.sign_ref, data)
                try:
                    pub.verify(signature, data)
                except InvalidSignature:
                    raise RptError(
                        f"the keystore's signature does not verify under root v{signer.version} "
                        f"(wrong key object?); nothing was issued"
                    ) from None
                token = data.decode("ascii") + "." + b64url(signature)
                rows.append(
                    {
                        "seq": head_seq + 1,
                        "token": token,
                        "kid": signer.kid,
                        "iat": datetime.fromtimestamp(iat, UTC),
                        "subject": subject,
                        "prev_hash": head_hash,
                        "token_hash": token_hash(token),
                    }
                )
                head_seq, head_hash = head_seq + 1, rows[-1]["token_hash"]
            with ctx.transaction() as session:
                current = _active_root(session)
                ledger.lock_ledger(session)  # the ledger's lock: seq is assigned like ledger.append's
                moved = current.version_id != signer.version_id or _newest(session)[:2] != (seq, prev)
                if not moved:
                    session.execute(insert(RegulatoryProofToken), rows)
            if not moved:
                return [r["token"] for r in rows]
            time.sleep(0.002 * (attempt + 1))  # the root rotated or another process issued: rebuild
    raise RptError(f"could not issue after {ctx.policy.rpt.issue_retries} attempts: the chain head kept moving")


# ---- verify_chain (live) -------------------------------------------------------------------


def count(ctx: KmsContext) -> int:
    with ctx.engine.connect() as conn:
        return conn.execute(select(func.count()).select_from(RegulatoryProofToken)).scalar_one()
