"""Data keys and envelope encryption (policy clauses P3, R3, T2).

``encrypt`` gives every object its own DEK, wrapped under the active version of a data
(or export) key, and records one ``deks`` row per DEK. The blob it returns is
self-describing and carries no key material::

    b"KMSE" | format (1 byte) | dek id (8 bytes, big-endian) | nonce (12) | ciphertext | tag (16)

The AES-GCM associated data binds the header, the key name and the object id (plus any
caller AAD), so a blob cannot be replayed against another object's DEK row.

``sweep`` moves every DEK still wrapped under a rotated or revoked version onto the
active one. The unwrap+wrap happens inside the keystore (``KeyStore.rewrap``): inside the
HSM under PKCS#11, in memory only under the software backend. It is batched (one rewrap
call and one commit per batch), reads with keyset pagination on ``id`` within the shard
range, so memory is bounded by the batch and a batch's rows are neighbours in the table
(the old ``(shard, id)`` walk made each batch a hash-scattered sample, touching pages all
over a 1M-DEK table larger than the server's cache), and writes with compare-and-set on
the wrapping version, so a killed sweep re-runs safely and concurrent sweeps of overlapping shards never
double-wrap a DEK. Shards partition the ``deks.shard`` range so Dagster can fan the
sweep out across processes or hosts.

Export keys are never swept: their DEKs are meant to die with the key at export expiry
(``export_keys.expire_due``: crypto-shredding).
"""

from __future__ import annotations

import functools
import logging
import struct
import time
import zlib
from collections import deque
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import Connection, and_, bindparam, func, select, text, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, selectinload

from ..foundation import nightly_steps, retry
from ..foundation.batching import AdaptiveBatch
from ..foundation.clock import utc
from ..foundation.context import KmsContext
from ..foundation.db.models import ACTIVE, DESTROYED, REVOKED, ROTATED, Key, KeyVersion
from ..foundation.db.models_envelope import DEKS, SHARD_SPACE, Dek
from ..foundation.keystore import DecryptionFailed, KeyNotFound
from ..keys import lifecycle

log = logging.getLogger(__name__)

MAGIC = b"KMSE"
FORMAT = 1
_HEADER = struct.Struct(">4sBQ")  # magic, format, dek id
HEADER_SIZE = _HEADER.size
_MIN_BODY = 12 + 16  # nonce + tag
ENVELOPE_CLASSES = ("data", "export")  # key classes that may wrap DEKs
SWEPT_CLASSES = ("data",)  # export DEKs are shredded with their key, never moved


class EnvelopeError(ValueError):
    """A refused or failed envelope operation; the message says why. Nothing was changed."""


class CryptoShredded(EnvelopeError):
    """The DEK's wrapping version was destroyed: the object can never be decrypted again."""


# ---- helpers ---------------------------------------------------------------------------


def shard_of(key_name: str, object_id: str) -> int:
    """Stable shard of an object in ``[0, SHARD_SPACE)`` (stored at insert)."""
    return zlib.crc32(f"{key_name}\x00{object_id}".encode()) % SHARD_SPACE


def shard_range(shard: int | None, shards: int) -> tuple[int, int]:
    """The ``[lo, hi)`` range of stored shard values that sweep partition ``shard`` of ``shards`` covers."""
    if shards < 1 or shards > SHARD_SPACE:
        raise EnvelopeError(f"shards must be between 1 and {SHARD_SPACE}, got {shards}")
    if shard is None:
        return 0, SHARD_SPACE
    if not 0 <= shard < shards:
        raise EnvelopeError(f"shard {shard} is out of range for {shards} shards (0..{shards - 1})")
    return shard * SHARD_SPACE // shards, (shard + 1) * SHARD_SPACE // shards


def _aad(header: bytes, key_name: str, object_id: str, aad: bytes) -> bytes:
    # Length-prefixed so no two (key, object, aad) triples encode alike.
    k, o = key_name.encode(), object_id.encode()
    return b"".join(
        [
            b"kms-envelope/1",
            header,
            struct.pack(">I", len(k)),
            k,
            struct.pack(">I", len(o)),
            o,
            struct.pack(">I", len(aad)),
            aad,
        ]
    )


def parse_header(blob: bytes) -> int:
    """The DEK id a blob names; EnvelopeError if it is not an envelope blob."""
    if not isinstance(blob, (bytes, bytearray, memoryview)) or len(blob) < HEADER_SIZE + _MIN_BODY:
        raise EnvelopeError("not an envelope blob: too short")
    magic, fmt, dek_id = _HEADER.unpack_from(blob)
    if magic != MAGIC:
        raise EnvelopeError("not an envelope blob: bad magic")
    if fmt != FORMAT:
        raise EnvelopeError(f"unsupported envelope format {fmt} (this version reads format {FORMAT})")
    return dek_id


def _check_envelope_key(name: str) -> None:
    cls = lifecycle.key_class_of(name)
    if cls not in ENVELOPE_CLASSES:
        raise EnvelopeError(f"key {name!r} is a {cls} key; envelope encryption uses data:<dataset> or export:<id> keys")


def _lock_key_shared(session: Session, name: str) -> Key:
    """Hold the key row against concurrent version changes (lifecycle takes FOR UPDATE)."""
    q = select(Key).where(Key.name == name).options(selectinload(Key.versions))
    if session.connection().dialect.name == "postgresql":
        q = q.with_for_update(read=True)
    key = session.scalars(q).first()
    if key is None:
        raise EnvelopeError(f"unknown key {name!r} (run `kms init`, or see `kms keys list`)")
    return key


def _export_closed_at(key: Key):
    """For an export key: when it expired (its export is closed), else None."""
    expiries = [utc(v.expires_at) for v in key.versions if v.expires_at is not None]
    return min(expiries) if expiries else None


# ---- encrypt / decrypt -----------------------------------------------------------------


def encrypt(
    ctx: KmsContext, key_name: str, object_id: str, plaintext: bytes, aad: bytes = b"", *, replace: bool = False
) -> bytes:
    """Encrypt ``plaintext`` for ``object_id`` under a fresh DEK wrapped by ``key_name``'s active version.

    One DEK and one ``deks`` row per (key, object). Encrypting an object id that already
    has a DEK is refused unless ``replace=True`` (which retires the old DEK, so blobs made
    with it no longer decrypt).
    """
    _check_envelope_key(key_name)
    if not isinstance(object_id, str) or not object_id or len(object_id) > 500:
        raise EnvelopeError("object_id must be a non-empty string of at most 500 characters")
    if not isinstance(plaintext, (bytes, bytearray, memoryview)):
        raise EnvelopeError("plaintext must be bytes")
    now = ctx.now()
    with ctx.transaction() as session:
        key = _lock_key_shared(session, key_name)
        active = lifecycle.active_version(key)
        if active is None or not active.wrap_ref:
            raise EnvelopeError(f"key {key_name!r} has no active wrapping version")
        if key.key_class == "export":
            closed = _export_closed_at(key)
            if closed is not None and now >= closed:
                raise EnvelopeError(
                    f"export key {key_name} expired at {closed.isoformat()}: create a new export instead"
                )
        existing = session.scalars(
            select(Dek).where(Dek.key_name == key_name, Dek.object_id == object_id).with_for_update()
        ).first()
        if existing is not None:
            if not replace:
                raise EnvelopeError(
                    f"object {object_id!r} already has a DEK under {key_name}; "
                    f"pass replace=True to re-encrypt it under a new DEK"
                )
            session.delete(existing)
            session.flush()
        wrapped = ctx.keystore.new_wrapped_dek(active.wrap_ref)
        row = Dek(
            key_name=key_name,
            key_version=active.version,
            wrapped=wrapped,
            object_id=object_id,
            shard=shard_of(key_name, object_id),
            created_at=now,
        )
        session.add(row)
        try:
            session.flush()
        except IntegrityError:
            raise EnvelopeError(f"object {object_id!r} already has a DEK under {key_name}") from None
        header = _HEADER.pack(MAGIC, FORMAT, row.id)
        body = ctx.keystore.dek_encrypt(
            active.wrap_ref, wrapped, bytes(plaintext), _aad(header, key_name, object_id, aad)
        )
        return header + body


@dataclass(frozen=True)
class BlobInfo:
    dek_id: int
    key_name: str
    key_version: int
    object_id: str
    version_state: str


def describe(ctx: KmsContext, blob: bytes) -> BlobInfo:
    """Which DEK, key version and object a blob belongs to (no decryption)."""
    dek_id = parse_header(blob)
    with ctx.transaction() as session:
        row = session.get(Dek, dek_id)
        if row is None:
            raise EnvelopeError(f"DEK {dek_id} named by the blob is not in the inventory")
        state = session.scalars(
            select(KeyVersion.state).join(Key).where(Key.name == row.key_name, KeyVersion.version == row.key_version)
        ).first()
        return BlobInfo(dek_id, row.key_name, row.key_version, row.object_id, state or "unknown")


def decrypt(ctx: KmsContext, blob: bytes, aad: bytes = b"", *, object_id: str | None = None) -> bytes:
    """Decrypt a blob made by ``encrypt``. With ``object_id`` the blob must belong to that object."""
    dek_id = parse_header(blob)
    with ctx.transaction() as session:
        row = session.get(Dek, dek_id)
        if row is None:
            raise EnvelopeError(
                f"DEK {dek_id} named by the blob is not in the inventory (object re-encrypted or never stored)"
            )
        key_name, version_no, wrapped, obj = row.key_name, row.key_version, row.wrapped, row.object_id
        key = session.scalars(select(Key).where(Key.name == key_name)).first()
        version = next((v for v in key.versions if v.version == version_no), None) if key else None
        if version is None:
            raise EnvelopeError(f"DEK {dek_id}: wrapping key {key_name} v{version_no} does not exist")
        state, wrap_ref, destroyed_at = version.state, version.wrap_ref, version.destroyed_at
    if object_id is not None and object_id != obj:
        raise EnvelopeError(f"blob belongs to object {obj!r}, not {object_id!r}")
    if state == DESTROYED or wrapped is None:
        when = utc(destroyed_at).isoformat() if destroyed_at else "an earlier time"
        kind = "export key" if lifecycle.key_class_of(key_name) == "export" else "key"
        raise CryptoShredded(f"{kind} {key_name} v{version_no} was destroyed at {when}: data crypto-shredded")
    if state == REVOKED:
        raise EnvelopeError(
            f"DEK {dek_id} is wrapped under revoked version {key_name} v{version_no}: "
            f"revoked versions do not decrypt; run `kms envelope sweep` to move it first"
        )
    if state not in (ACTIVE, ROTATED):
        raise EnvelopeError(f"{key_name} v{version_no} is {state}; it cannot decrypt")
    header = bytes(blob[:HEADER_SIZE])
    try:
        return ctx.keystore.dek_decrypt(wrap_ref, wrapped, bytes(blob[HEADER_SIZE:]), _aad(header, key_name, obj, aad))
    except DecryptionFailed:
        raise EnvelopeError(
            f"blob for object {obj!r} does not authenticate under DEK {dek_id} "
            f"(tampered ciphertext or wrong associated data)"
        ) from None
    except KeyNotFound:
        raise EnvelopeError(f"material of {key_name} v{version_no} is missing from the keystore") from None


# ---- inventory -------------------------------------------------------------------------


def deks_on(session: Session, key_name: str, version: int) -> int:
    """How many live (not shredded) DEKs are wrapped under ``key_name`` v``version``."""
    return (
        session.scalar(
            select(func.count())
            .select_from(Dek)
            .where(Dek.key_name == key_name, Dek.key_version == version, Dek.shredded_at.is_(None))
        )
        or 0
    )


@lifecycle.destroy_guard("deks")
def _guard_deks(session: Session, ctx: KmsContext, key: Key, version: KeyVersion) -> str | None:
    n = deks_on(session, key.name, version.version)
    if n:
        return (
            f"{n} DEK(s) are still wrapped under {key.name} v{version.version}; run `kms envelope sweep` "
            f"so they move to the active version first (T2)"
        )
    return None


@dataclass
class InventoryCount:
    key: str
    version: int
    state: str
    deks: int
    shredded: int


def inventory_counts(ctx: KmsContext, key_name: str | None = None) -> list[InventoryCount]:
    """DEK counts per key version (live and shredded), with each version's state."""
    q = (
        select(Dek.key_name, Dek.key_version, KeyVersion.state, func.count(Dek.wrapped), func.count(Dek.shredded_at))
        .select_from(Dek)
        .outerjoin(Key, Key.name == Dek.key_name)
        .outerjoin(KeyVersion, and_(KeyVersion.key_id == Key.id, KeyVersion.version == Dek.key_version))
        .group_by(Dek.key_name, Dek.key_version, KeyVersion.state)
        .order_by(Dek.key_name, Dek.key_version)
    )
    if key_name:
        q = q.where(Dek.key_name == key_name)
    with ctx.engine.connect() as conn:
        return [InventoryCount(k, v, s or "unknown", int(n), int(sh)) for k, v, s, n, sh in conn.execute(q)]


def stranded(
    ctx: KmsContext, *, shard: int | None = None, shards: int = 1, key_name: str | None = None
) -> list[InventoryCount]:
    """Live DEKs left under a retired (rotated), revoked or destroyed version, in a shard range.

    Export keys count too (an expired export whose DEKs were not shredded is a finding).
    """
    lo, hi = shard_range(shard, shards)
    q = (
        select(Dek.key_name, Dek.key_version, KeyVersion.state, func.count())
        .select_from(Dek)
        .join(Key, Key.name == Dek.key_name)
        .join(KeyVersion, and_(KeyVersion.key_id == Key.id, KeyVersion.version == Dek.key_version))
        .where(
            KeyVersion.state.in_([ROTATED, REVOKED, DESTROYED]),
            Dek.shredded_at.is_(None),
            Dek.shard >= lo,
            Dek.shard < hi,
        )
        .group_by(Dek.key_name, Dek.key_version, KeyVersion.state)
        .order_by(Dek.key_name, Dek.key_version)
    )
    if key_name:
        q = q.where(Dek.key_name == key_name)
    with ctx.engine.connect() as conn:
        return [InventoryCount(k, v, s, int(n), 0) for k, v, s, n in conn.execute(q)]


def dek_inventory_frame(ctx: KmsContext):
    """The DEK inventory as a pandas DataFrame (one row per DEK, never wrapped bytes).

    Columns: dek_id, key_name, key_class, key_version, version_state, object_id, shard,
    created_at, rewrapped_at, shredded_at, wrapped_len (0 when shredded).
    """
    import pandas as pd  # lazy import: start-up time (optional/heavy dependency)

    q = (
        select(
            Dek.id.label("dek_id"),
            Dek.key_name,
            Dek.key_version,
            KeyVersion.state.label("version_state"),
            Dek.object_id,
            Dek.shard,
            Dek.created_at,
            Dek.rewrapped_at,
            Dek.shredded_at,
            func.coalesce(func.length(Dek.wrapped), 0).label("wrapped_len"),
        )
        .select_from(Dek)
        .outerjoin(Key, Key.name == Dek.key_name)
        .outerjoin(KeyVersion, and_(KeyVersion.key_id == Key.id, KeyVersion.version == Dek.key_version))
        .order_by(Dek.id)
    )
    with ctx.engine.connect() as conn:
        frame = pd.DataFrame(
            conn.execute(q).mappings().all(),
            columns=[
                "dek_id",
                "key_name",
                "key_version",
                "version_state",
                "object_id",
                "shard",
                "created_at",
                "rewrapped_at",
                "shredded_at",
                "wrapped_len",
            ],
        )
    frame.insert(2, "key_class", frame["key_name"].str.split(":").str[0])
    for col in ("created_at", "rewrapped_at", "shredded_at"):
        frame[col] = pd.to_datetime(frame[col], utc=True)
    return frame


# ---- the rewrap sweep ------------------------------------------------------------------


@dataclass
class SweepProgress:
    key: str
    from_version: int
    to_version: int
    batch: int
    moved: int  # moved in this batch
    total_moved: int  # moved so far in this sweep call
    seconds: float


@dataclass
class SweepResult:
    moved: int = 0
    remaining: int = 0  # live DEKs still on rotated/revoked versions of swept keys in the range
    skipped: int = 0  # lost a compare-and-set race (another sweep moved them first)
    failed: int = 0  # did not unwrap under their recorded version (corrupt row)
    batches: int = 0
    seconds: float = 0.0
    shard: int | None = None
    shards: int = 1
    shard_range: tuple[int, int] = (0, SHARD_SPACE)
    by_key: dict[str, dict] = field(default_factory=dict)
    failed_ids: list[int] = field(default_factory=list)

    @property
    def rate(self) -> float:
        return self.moved / self.seconds if self.seconds else 0.0

    def to_dict(self) -> dict:
        return {
            "moved": self.moved,
            "remaining": self.remaining,
            "skipped": self.skipped,
            "failed": self.failed,
            "batches": self.batches,
            "seconds": round(self.seconds, 3),
            "rate": round(self.rate, 1),
            "shard": self.shard,
            "shards": self.shards,
            "shard_range": list(self.shard_range),
            "by_key": self.by_key,
            "failed_ids": self.failed_ids[:100],
        }


def _sweep_plan(ctx: KmsContext, key_name: str | None) -> list[tuple[str, int, str, list[tuple[int, str]]]]:
    """(key, active version, active wrap ref, [(old version, old wrap ref)]) for every key to sweep."""
    plan = []
    with ctx.transaction() as session:
        q = select(Key).where(Key.key_class.in_(SWEPT_CLASSES)).order_by(Key.name)
        if key_name is not None:
            _check_envelope_key(key_name)
            if lifecycle.key_class_of(key_name) not in SWEPT_CLASSES:
                raise EnvelopeError(f"{key_name} is an export key: its DEKs are shredded at expiry, never swept")
            q = select(Key).where(Key.name == key_name)
        keys = list(session.scalars(q))
        if key_name is not None and not keys:
            raise EnvelopeError(f"unknown key {key_name!r} (run `kms init`, or see `kms keys list`)")
        for key in keys:
            active = lifecycle.active_version(key)
            old = [(v.version, v.wrap_ref) for v in key.versions if v.state in (ROTATED, REVOKED) and v.wrap_ref]
            if active is None or not active.wrap_ref:
                if old:
                    log.warning("key %s has DEK-bearing versions but no active AES version; skipped", key.name)
                continue
            if old:
                plan.append((key.name, active.version, active.wrap_ref, old))
    return plan


def _driver(conn: Connection) -> Any:
    """The psycopg connection under a SQLAlchemy one, in its transaction (COPY and binary
    cursors have no SQLAlchemy form)."""
    raw = conn.connection.driver_connection
    if raw is None:  # only an invalidated connection has none, and each caller has just used it
        raise EnvelopeError("the database connection was invalidated mid-batch; re-run the sweep")
    return raw


def _select_batch(conn, key_name: str, version: int, lo: int, hi: int, after: int, limit: int):
    """The next ``(id, wrapped)`` tuples of the sweep's keyset walk: ids above ``after`` in
    the shard range, in id order (SQL below for SQLite)."""
    if conn.dialect.name == "postgresql":
        # The driver's binary cursor: plain tuples, bytea without hex decoding. Through
        # SQLAlchemy the read cost more Python time per row than the rewrap (100k DEKs).
        with _driver(conn).cursor(binary=True) as cur:
            cur.execute(
                _PG_SELECT_BATCH, {"key": key_name, "v": version, "after": after, "lo": lo, "hi": hi, "limit": limit}
            )
            return cur.fetchall()
    q = (
        select(Dek.id, Dek.wrapped)
        .where(
            Dek.key_name == key_name,
            Dek.key_version == version,
            Dek.id > after,
            Dek.shard >= lo,
            Dek.shard < hi,
            Dek.wrapped.is_not(None),
        )
        .order_by(Dek.id)
        .limit(limit)
    )
    return [tuple(r) for r in conn.execute(q)]


# The same query as the SQLAlchemy form above, on ix_deks_sweep_id (key_name, key_version,
# id, shard). The walk is in id order, not (shard, id): ``shard`` is a hash, so a batch in
# shard order was a random sample of ids whose pages spread over the whole table (at 1M,
# larger than shared_buffers), while id order reads and rewrites neighbouring pages. The
# shard range stays an index condition (checked on the index tuple), so a partition's
# sweep steps over other partitions' index entries but never fetches their rows.
# The version is bounded by a row comparison and ``<=``, not ``=``, and the order is
# ``key_version, id``: with ``key_version = v`` the planner may walk the primary key in id
# order and filter in the heap (it did, on a one-key table), fetching every other shard's
# and version's rows, all of them when few DEKs are left on the old version.
_PG_SELECT_BATCH = (
    "SELECT id, wrapped FROM deks WHERE key_name = %(key)s AND (key_version, id) > (%(v)s, %(after)s) "
    "AND key_version <= %(v)s AND shard >= %(lo)s AND shard < %(hi)s AND wrapped IS NOT NULL "
    "ORDER BY key_version, id LIMIT %(limit)s"
)


_VERSION_STATES = text(
    "SELECT kv.version, kv.state FROM keys AS k JOIN key_versions AS kv ON kv.key_id = k.id WHERE k.name = :key"
)
_VERSION_STATES_PG = text(_VERSION_STATES.text + " FOR SHARE OF k")
# On PostgreSQL a batch travels by binary COPY into a per-connection temporary table and is
# applied with one UPDATE … FROM it: measured faster than binding two arrays to ``unnest``
# (benchmarks/bench_sweep.py times the raw ways). ON COMMIT DELETE ROWS empties it at every
# commit or rollback, so a retried batch never sees a lost attempt's rows.
#
# The join must look each row up by primary key. Left to the planner, it hashed every DEK
# still on the old version for every batch (a hash join whose build side grows with the
# table: O(n) per batch, O(n²) per sweep) and, with statistics from before a rotation,
# once estimated that side at one row. So hash and merge joins are off for this
# transaction, and the old version is compared as a join column (``v.old``), not a
# constant: then the deks side is estimated by ``key_name`` alone (all of the key's rows,
# never stale), and the only cheap plan is the batch table driving primary-key lookups.
_PG_BATCH_TABLE = (
    "SET LOCAL client_min_messages = warning; "  # no "already exists, skipping" notice per batch
    "SET LOCAL enable_hashjoin = off; SET LOCAL enable_mergejoin = off; "
    "CREATE TEMPORARY TABLE IF NOT EXISTS kms_sweep_batch (id bigint, w bytea, old integer) ON COMMIT DELETE ROWS"
)
_PG_BATCH_COPY = "COPY kms_sweep_batch (id, w, old) FROM STDIN (FORMAT BINARY)"
_PG_CAS = (
    "UPDATE deks AS d SET wrapped = v.w, key_version = %(new)s, rewrapped_at = %(at)s "
    "FROM kms_sweep_batch AS v WHERE d.id = v.id AND d.key_version = v.old AND d.key_name = %(key)s"
)


def _commit_batch(ctx: KmsContext, key_name: str, old: int, new: int, pairs: list[tuple[int, bytes]]) -> int | None:
    """Compare-and-set the batch of ``(id, new wrapped)`` pairs onto ``new``; None if the key's
    versions changed underneath."""
    now = ctx.now()
    with ctx.transaction() as session:
        conn = session.connection()
        # Share-lock the key row (lifecycle takes FOR UPDATE to change versions) and read
        # the version states in one round trip.
        query = _VERSION_STATES_PG if conn.dialect.name == "postgresql" else _VERSION_STATES
        states: dict[int, str] = dict(conn.execute(query, {"key": key_name}).all())
        if states.get(new) != ACTIVE or states.get(old) not in (ROTATED, REVOKED):
            return None  # the key rotated (or the old version was destroyed) meanwhile: re-plan
        if conn.dialect.name == "postgresql":
            with _driver(conn).cursor() as cur:
                cur.execute(_PG_BATCH_TABLE)
                with cur.copy(_PG_BATCH_COPY) as copy:
                    copy.set_types(["int8", "bytea", "int4"])
                    for i, w in pairs:
                        copy.write_row((i, w, old))
                cur.execute(_PG_CAS, {"new": new, "at": now, "key": key_name})
                return cur.rowcount
        t = DEKS
        result = conn.execute(
            update(t)
            .where(t.c.id == bindparam("b_id"), t.c.key_version == old, t.c.key_name == key_name)
            .values(wrapped=bindparam("b_w"), key_version=new, rewrapped_at=now),
            [{"b_id": i, "b_w": w} for i, w in pairs],
        )
        return result.rowcount


def _commit_batch_retrying(
    ctx: KmsContext, key_name: str, old: int, new: int, pairs: list[tuple[int, bytes]]
) -> int | None:
    """The batch commit is compare-and-set on the wrapping version, so repeating it after a
    lost connection is safe: rows the lost attempt did commit no longer match and count as
    skipped, never twice."""
    return retry.db_call(
        ctx,
        lambda: _commit_batch(ctx, key_name, old, new, pairs),
        what=f"committing a sweep batch of {key_name}",
    )


def _commit_batch_timed(
    sizer: AdaptiveBatch,
    ctx: KmsContext,
    key_name: str,
    old: int,
    new: int,
    pairs: list[tuple[int, bytes]],
    requested: int,
) -> int | None:
    start = time.perf_counter()
    moved = _commit_batch_retrying(ctx, key_name, old, new, pairs)
    sizer.observe(len(pairs), time.perf_counter() - start, requested=requested)
    return moved


def policy_batching(ctx: KmsContext) -> dict:
    """``sweep`` keyword arguments for the policy's batch sizing (envelope section)."""
    p = ctx.policy.envelope
    return {
        "batch_size": p.batch_size,
        "batch_target_seconds": p.batch_target_commit_ms / 1000 or None,
        "max_batch_size": p.batch_size_max,
    }


def _read_batch(ctx: KmsContext, key_name: str, version: int, lo: int, hi: int, after: int, limit: int):
    with ctx.engine.connect() as conn:
        return _select_batch(conn, key_name, version, lo, hi, after, limit)


def _rewrap_isolating_failures(ctx: KmsContext, old_ref: str, new_ref: str, rows) -> tuple[list, list[int]]:
    """Rewrap one by one after a batch failed, so one corrupt DEK cannot block the rest."""
    good, bad = [], []
    for row in rows:
        try:
            good.append((row[0], ctx.keystore.rewrap(old_ref, new_ref, [row[1]])[0]))
        except DecryptionFailed:
            bad.append(row[0])
    return good, bad


def sweep(
    ctx: KmsContext,
    key_name: str | None = None,
    *,
    shard: int | None = None,
    shards: int = 1,
    batch_size: int = 1000,
    progress: Callable[[SweepProgress], None] | None = None,
    max_batches: int | None = None,
    batch_target_seconds: float | None = None,
    max_batch_size: int | None = None,
) -> SweepResult:
    """Move every live DEK off rotated/revoked versions onto the key's active version.

    ``shard``/``shards`` restrict the sweep to one partition of the shard space (None =
    all). Resumable and idempotent: each batch commits on its own with compare-and-set on
    the wrapping version. ``progress`` is called after every committed batch.
    ``max_batches`` stops early (tests, throttled runs); ``remaining`` says what is left.

    Batches are pipelined: while earlier batches commit (on writer threads, each on its own
    connection, waiting on the database), the next one is read and rewrapped. PostgreSQL
    gets two writers, so two disjoint batches commit at once (``_writers``); SQLite, which
    has one writer lock, gets one. At most ``writers + 1`` batches are in memory.
    With ``batch_target_seconds`` the size starts at ``batch_size`` and follows the commit
    time (``batching.AdaptiveBatch``), up to ``max_batch_size``; without it, it is constant.
    """
    if batch_size < 1:
        raise EnvelopeError(f"batch_size must be at least 1, got {batch_size}")
    lo, hi = shard_range(shard, shards)
    result = SweepResult(shard=shard, shards=shards, shard_range=(lo, hi))
    started = time.perf_counter()
    rerun = (
        "kms envelope sweep"
        + (f" --key {key_name}" if key_name else "")
        + (f" --shard {shard} --shards {shards}" if shard is not None else "")
    )
    total: int | None = None
    try:
        total = retry.db_call(ctx, lambda: _left_to_sweep(ctx, result, key_name), what="counting DEKs to sweep")
        sizer = AdaptiveBatch(
            batch_size, target_seconds=batch_target_seconds, min_size=min(batch_size, 100), max_size=max_batch_size
        )
        return _sweep(ctx, result, key_name, sizer, progress, max_batches, started)
    except retry.DependencyUnavailable as exc:
        # Every committed batch stays committed (compare-and-set): a re-run picks up the rest.
        done = f"{result.moved:,} of {total:,} DEKs" if total is not None else "0 DEKs"
        exc.moved = result.moved  # type: ignore[attr-defined]  # for callers that sweep range by range
        raise exc.annotate(done=done, rerun=rerun) from exc.__cause__
    except Exception as exc:
        # What committed before the failure stays committed. A caller that sweeps range by
        # range and goes on after this error (leases.leased_sweep on a lost lease, raised from
        # ``progress``) counts it from here; ``remaining`` is not known (the sweep stopped).
        exc.sweep_result = result  # type: ignore[attr-defined]
        raise


def _writers(ctx: KmsContext) -> int:
    """Commit threads for the sweep. On PostgreSQL one writer left the reader/rewrapper
    waiting on it (a commit of a batch cost more than reading and rewrapping the next,
    BENCHMARKS.md); two on their own connections commit alternate batches. SQLite has a
    single writer lock, so a second writer would only queue on it."""
    return 2 if ctx.engine.dialect.name == "postgresql" else 1


def _sweep(
    ctx: KmsContext,
    result: SweepResult,
    key_name: str | None,
    sizer: AdaptiveBatch,
    progress,
    max_batches,
    started: float,
) -> SweepResult:
    lo, hi = result.shard_range
    replans = 0
    plan = retry.db_call(ctx, lambda: _sweep_plan(ctx, key_name), what="planning the sweep")
    writers = _writers(ctx)
    with ThreadPoolExecutor(max_workers=writers, thread_name_prefix="kms-sweep-commit") as writer:
        while plan:
            outcome = "done"
            for name, new, new_ref, olds in plan:
                stats = result.by_key.setdefault(name, {"to_version": new, "moved": 0, "skipped": 0, "failed": 0})
                stats["to_version"] = new
                for old, old_ref in olds:
                    outcome = _sweep_version(
                        ctx,
                        writer,
                        writers,
                        result,
                        stats,
                        name,
                        old,
                        old_ref,
                        new,
                        new_ref,
                        lo,
                        hi,
                        sizer,
                        progress,
                        max_batches,
                        started,
                    )
                    if outcome != "done":
                        break
                if outcome != "done":
                    break
            if outcome == "limit":
                break
            if outcome == "done":
                break
            replans += 1
            if replans > 10:
                raise EnvelopeError("key versions kept changing during the sweep; re-run it")
            plan = retry.db_call(ctx, lambda: _sweep_plan(ctx, key_name), what="planning the sweep")
    return _finish(ctx, result, key_name, started)


def _sweep_version(
    ctx,
    writer,
    writers: int,
    result: SweepResult,
    stats: dict,
    name: str,
    old: int,
    old_ref: str,
    new: int,
    new_ref: str,
    lo: int,
    hi: int,
    sizer: AdaptiveBatch,
    progress,
    max_batches,
    started,
) -> str:
    """Sweep one old version of one key in the shard range: "done", "stale" (re-plan) or "limit"."""
    after = 0  # ids start at 1
    # (future | None, pairs count, bad ids) of each batch being committed, oldest first
    pending: deque[tuple[Future[int | None] | None, int, list[int]]] = deque()

    def settle(batch: tuple[Future[int | None] | None, int, list[int]]) -> bool:
        future, count, bad = batch
        moved = future.result() if future is not None else 0
        if moved is None:
            return False
        tally(moved, count, bad)
        if progress is not None:
            progress(SweepProgress(name, old, new, result.batches, moved, result.moved, time.perf_counter() - started))
        return True

    def tally(moved: int, count: int, bad: list[int]) -> None:
        if bad:
            log.error("%d DEK(s) under %s v%d do not unwrap (ids %s); left in place", len(bad), name, old, bad[:20])
            result.failed += len(bad)
            result.failed_ids.extend(bad)
            stats["failed"] += len(bad)
        result.batches += 1
        result.moved += moved
        result.skipped += count - moved
        stats["moved"] += moved
        stats["skipped"] += count - moved

    def settle_all() -> bool:
        """Settle every pending batch in submission order. A stale one (the key's versions
        changed) does not stop the others from being counted: a later batch may have
        committed before the change, and its DEKs did move."""
        fresh = True
        while pending:
            fresh = settle(pending.popleft()) and fresh
        return fresh

    try:
        while True:
            if max_batches is not None and result.batches + len(pending) >= max_batches:
                return "limit" if settle_all() else "stale"
            limit = sizer.size
            rows = retry.db_call(
                ctx,
                functools.partial(_read_batch, ctx, name, old, lo, hi, after, limit),
                what=f"reading a sweep batch of {name}",
            )
            pairs: list = []
            bad: list[int] = []
            if rows:
                after = rows[-1][0]
                try:
                    wrapped = [r[1] for r in rows]
                    pairs = list(
                        zip(
                            (r[0] for r in rows),
                            retry.call(
                                functools.partial(ctx.keystore.rewrap, old_ref, new_ref, wrapped),
                                budget=ctx.policy.faults.hsm.budget(),
                                what=f"rewrapping a sweep batch of {name}",
                            ),
                            strict=True,
                        )
                    )
                except DecryptionFailed:
                    pairs, bad = _rewrap_isolating_failures(ctx, old_ref, new_ref, rows)
                del rows
            if not pairs and not bad:
                return "done" if settle_all() else "stale"
            # Keep at most ``writers`` commits in flight: settle the oldest before adding one.
            while len(pending) >= writers:
                if not settle(pending.popleft()):
                    settle_all()
                    return "stale"
            # Read in id order, so written in id order: the UPDATE visits the heap and the
            # primary key in order (after a failed batch's one-by-one rewrap too). Batches
            # in flight together cover disjoint id ranges, so their row locks never meet.
            future = writer.submit(_commit_batch_timed, sizer, ctx, name, old, new, pairs, limit) if pairs else None
            pending.append((future, len(pairs), bad))
    finally:
        # Never leave a commit running behind an exception. With two writers a batch
        # behind the failed one may have committed: count it (without ``progress``, which
        # may be what raised), so the error's "done" and ``exc.moved`` are true.
        wait([f for f, _, _ in pending if f is not None])
        for future, count, bad in pending:
            if future is None:
                tally(0, count, bad)
            elif not future.cancelled() and future.exception() is None and (moved := future.result()) is not None:
                tally(moved, count, bad)


def _left_to_sweep(ctx: KmsContext, result: SweepResult, key_name: str | None) -> int:
    """Live DEKs of swept keys on rotated/revoked versions in the result's shard range."""
    lo, hi = result.shard_range
    q = (
        select(func.count())
        .select_from(Dek)
        .join(Key, Key.name == Dek.key_name)
        .join(KeyVersion, and_(KeyVersion.key_id == Key.id, KeyVersion.version == Dek.key_version))
        .where(
            KeyVersion.state.in_([ROTATED, REVOKED]),
            Key.key_class.in_(SWEPT_CLASSES),
            Dek.shredded_at.is_(None),
            Dek.shard >= lo,
            Dek.shard < hi,
        )
    )
    if key_name:
        q = q.where(Dek.key_name == key_name)
    with ctx.engine.connect() as conn:
        return int(conn.execute(q).scalar() or 0)


def _finish(ctx: KmsContext, result: SweepResult, key_name: str | None, started: float) -> SweepResult:
    result.remaining = retry.db_call(
        ctx, lambda: _left_to_sweep(ctx, result, key_name), what="counting DEKs left to sweep"
    )
    result.seconds = time.perf_counter() - started
    log.info(
        "sweep shard %s/%d: moved %d DEK(s) in %d batch(es), %.1f/s; %d remaining, %d failed",
        "all" if result.shard is None else result.shard,
        result.shards,
        result.moved,
        result.batches,
        result.rate,
        result.remaining,
        result.failed,
    )
    return result


@nightly_steps.nightly_step("envelope_sweep", order=20)
def nightly_sweep(ctx: KmsContext) -> dict:
    """Nightly: sweep every data key (all shards in this process); fail loudly if DEKs remain."""
    result = sweep(ctx, **policy_batching(ctx))
    if result.remaining:
        raise EnvelopeError(
            f"envelope sweep left {result.remaining} DEK(s) on retired or revoked versions "
            f"({result.failed} failed to unwrap)"
        )
    return {"moved": result.moved, "remaining": result.remaining, "batches": result.batches}


def keys_with_deks(ctx: KmsContext) -> Iterable[str]:
    with ctx.engine.connect() as conn:
        return [r[0] for r in conn.execute(select(Dek.key_name).distinct().order_by(Dek.key_name))]
