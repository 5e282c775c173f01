"""The append-only, hash-chained key-state ledger (policy clause T3).

Each entry's hash is SHA-256 over the RFC 8785 encoding of its fields, including the
previous entry's hash, so any edit, insertion, deletion or reorder breaks the chain at a
nameable seq. Database triggers refuse UPDATE/DELETE; ``verify`` trusts neither the
triggers nor the stored hashes. Signed checkpoints (see ``checkpoints``) catch a rewrite
that recomputes the whole chain.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Iterator, Sequence
from datetime import datetime, timedelta
from json.encoder import encode_basestring as _encode_str  # C-accelerated
from typing import TYPE_CHECKING, Any

from sqlalchemy import and_, case, func, null, select, text
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.orm import Session

from ..foundation.canonical import canonical_fast
from ..foundation.clock import utc
from ..foundation.db.models import LedgerEntry
from . import ledger_copy
from .verdict import GENESIS_HASH, VerifyResult, altered, broken_link, seq_gap

if TYPE_CHECKING:
    from ..foundation.context import KmsContext

# A mapped column of a hash-chained table (``LedgerEntry.seq``, ``RptEntry.entry_hash``...).
Column = Any

_sha256 = hashlib.sha256
_LEDGER_LOCK_ID = 0x4B4D53  # "KMS": serialises appends on PostgreSQL


def format_time(at: datetime) -> str:
    if at.tzinfo is not None and at.utcoffset():
        at = utc(at)
    return at.isoformat(timespec="microseconds")[:26] + "Z"


def entry_document(
    seq: int,
    at: datetime | str,
    key_name: str,
    key_version: int | None,
    from_state: str | None,
    to_state: str,
    actor: str,
    approvers: Sequence[str],
    change_ticket: str | None,
    reason: str | None,
    event_id: str | None,
    prev_hash: str,
) -> dict[str, Any]:
    return {
        "seq": seq,
        "at": at if isinstance(at, str) else format_time(at),
        "key": key_name,
        "version": key_version,
        "from": from_state,
        "to": to_state,
        "actor": actor,
        "approvers": list(approvers),
        "ticket": change_ticket,
        "reason": reason,
        "event": event_id,
        "prev": prev_hash,
    }


def entry_hash(document: dict[str, Any]) -> str:
    return hashlib.sha256(canonical_fast(document)).hexdigest()


# The verifier's hot path builds the same RFC 8785 bytes as ``canonical_fast(entry_document(...))``
# straight from a row, without an intermediate dict (tests/test_canonical.py checks they agree).
# ``approvers`` is the stored canonical JSON text, used as is: any edit to it changes the hash.
_ROW_TEMPLATE = (
    '{"actor":%s,"approvers":%s,"at":"%s","event":%s,"from":%s,"key":%s,"prev":"%s",'
    '"reason":%s,"seq":%d,"ticket":%s,"to":%s,"version":%s}'
)


def _q(value: str | None) -> str:
    return "null" if value is None else _encode_str(value)


def row_canonical(
    seq: int,
    at: datetime,
    key_name: str,
    key_version: int | None,
    from_state: str | None,
    to_state: str,
    actor: str,
    approvers_json: str,
    ticket: str | None,
    reason: str | None,
    event_id: str | None,
    prev_hash: str,
) -> bytes:
    return (
        _ROW_TEMPLATE
        % (
            _encode_str(actor),
            approvers_json,
            format_time(at),
            _q(event_id),
            _q(from_state),
            _encode_str(key_name),
            prev_hash,
            _q(reason),
            seq,
            _q(ticket),
            _encode_str(to_state),
            "null" if key_version is None else int(key_version),
        )
    ).encode("utf-8")


def advisory_xact_lock(session: Session, lock_id: int) -> None:
    """Serialise appends to a hash chain for the rest of the transaction.

    SQLite transactions here start with BEGIN IMMEDIATE (db.engine), which already
    serialises writers; PostgreSQL needs an explicit transaction-scoped lock."""
    if session.get_bind().dialect.name == "postgresql":
        session.execute(text("SELECT pg_advisory_xact_lock(:id)"), {"id": lock_id})


def lock_ledger(session: Session) -> None:
    advisory_xact_lock(session, _LEDGER_LOCK_ID)


def chain_head(session_or_conn: Session | Connection, seq_column: Column, hash_column: Column) -> tuple[int, str]:
    """(seq, hash) of the newest row of a hash-chained table, or (0, GENESIS_HASH) when empty."""
    row = session_or_conn.execute(select(seq_column, hash_column).order_by(seq_column.desc()).limit(1)).first()
    return (row[0], row[1]) if row else (0, GENESIS_HASH)


class ChainOrderError(ValueError):
    """An entry older than its chain's newest entry: a chain's time only moves forward."""


# Writers that read the clock before they got the chain's lock may lose a race by a moment
# (another process appended in between): such an entry is chained at the newest entry's
# time. Anything older than this is a rewound clock and is refused.
RACE_TOLERANCE = timedelta(seconds=60)


def newest_time(session_or_conn: Session | Connection, seq_column: Column, at_column: Column) -> datetime | None:
    at = session_or_conn.execute(select(at_column).order_by(seq_column.desc()).limit(1)).scalar()
    return None if at is None else utc(at)


def require_in_order(
    session_or_conn: Session | Connection, seq_column: Column, at_column: Column, at: datetime, chain: str
) -> datetime:
    """The time to chain an entry stamped ``at`` with: ``at``, or the newest entry's time if
    ``at`` lost a race by less than ``RACE_TOLERANCE``; ChainOrderError if it is older."""
    newest = newest_time(session_or_conn, seq_column, at_column)
    if newest is None or utc(at) >= newest:
        return utc(at)
    if newest - utc(at) <= RACE_TOLERANCE:
        return newest
    raise ChainOrderError(
        f"the {chain} refuses an entry at {format_time(at)}: it is older than the previous "
        f"entry ({format_time(newest)}); time in the {chain} only moves forward"
    )


def head(session_or_conn: Session | Connection) -> tuple[int, str]:
    """(seq, entry_hash) of the newest ledger entry."""
    return chain_head(session_or_conn, LedgerEntry.seq, LedgerEntry.entry_hash)


def append(
    session: Session,
    *,
    at: datetime,
    key_name: str,
    key_version: int | None,
    from_state: str | None,
    to_state: str,
    actor: str,
    approvers: Sequence[str] = (),
    change_ticket: str | None = None,
    reason: str | None = None,
    event_id: str | None = None,
) -> LedgerEntry:
    """Append one entry inside the caller's transaction (so it commits with the state change)."""
    lock_ledger(session)
    at = require_in_order(session, LedgerEntry.seq, LedgerEntry.at, at, "ledger")
    seq, prev = head(session)
    approvers = sorted(approvers)
    doc = entry_document(
        seq + 1,
        at,
        key_name,
        key_version,
        from_state,
        to_state,
        actor,
        approvers,
        change_ticket,
        reason,
        event_id,
        prev,
    )
    entry = LedgerEntry(
        seq=seq + 1,
        at=utc(at),
        key_name=key_name,
        key_version=key_version,
        from_state=from_state,
        to_state=to_state,
        actor=actor,
        approvers=canonical_fast(approvers).decode(),
        change_ticket=change_ticket,
        reason=reason,
        event_id=event_id,
        prev_hash=prev,
        entry_hash=entry_hash(doc),
    )
    session.add(entry)
    session.flush()
    return entry


_COLUMNS = (
    LedgerEntry.seq,
    LedgerEntry.at,
    LedgerEntry.key_name,
    LedgerEntry.key_version,
    LedgerEntry.from_state,
    LedgerEntry.to_state,
    LedgerEntry.actor,
    LedgerEntry.approvers,
    LedgerEntry.change_ticket,
    LedgerEntry.reason,
    LedgerEntry.event_id,
    LedgerEntry.prev_hash,
    LedgerEntry.entry_hash,
)


# PostgreSQL holds times from 4713 BC to 294276 AD and 'infinity'; Python's datetime (so psycopg)
# only years 1-9999 and raises DataError on the rest. No writer can have hashed such a time, so
# the verifier reads it as NULL (an altered row, the verdict ledger_copy gives it) instead of
# failing on the whole ledger. Read in UTC, so the bounds do not move with the session time zone.
_LOADABLE_AT = case(
    (
        and_(LedgerEntry.at >= text("'0001-01-01 00:00:00+00'"), LedgerEntry.at < text("'10000-01-01 00:00:00+00'")),
        func.timezone("UTC", LedgerEntry.at),
    ),
    else_=null(),
)


def iter_rows(
    conn: Connection, batch_size: int = 5000, after_seq: int | None = None, *, unloadable_at_as_null: bool = False
) -> Iterator[tuple[Any, ...]]:
    """Stream ledger rows in seq order with bounded memory (server-side cursor on PostgreSQL);
    every row unless ``after_seq``: a row an insider added below seq 1 must reach the verifier.
    ``unloadable_at_as_null`` (the verifier, on PostgreSQL): ``at`` is None where Python cannot
    hold the stored time (BC, year 10000+, 'infinity'), naive UTC elsewhere."""
    columns: tuple[Any, ...] = _COLUMNS
    if unloadable_at_as_null and conn.dialect.name == "postgresql":
        columns = (_COLUMNS[0], _LOADABLE_AT, *_COLUMNS[2:])
    q = select(*columns).order_by(LedgerEntry.seq)
    if after_seq is not None:
        q = q.where(LedgerEntry.seq > after_seq)
    result = conn.execution_options(stream_results=True, yield_per=batch_size).execute(q)
    for partition in result.partitions():
        yield from partition


def verify_rows(rows: Iterable[Sequence[Any]], expected_head: tuple[int, str] | None = None) -> VerifyResult:
    """Recompute the chain over ledger rows (tuples in ``_COLUMNS`` order)."""
    prev, expected_seq, count = GENESIS_HASH, 1, 0
    for (
        seq,
        at,
        key_name,
        key_version,
        from_state,
        to_state,
        actor,
        approvers,
        ticket,
        reason,
        event_id,
        prev_hash,
        stored_hash,
    ) in rows:
        if seq != expected_seq:
            return seq_gap(count, prev, expected_seq, seq)
        if prev_hash != prev:
            return broken_link(count, prev, seq)
        if at is None:  # a time no writer can have hashed (see _LOADABLE_AT)
            return altered(count, prev, seq)
        raw = row_canonical(
            seq, at, key_name, key_version, from_state, to_state, actor, approvers, ticket, reason, event_id, prev_hash
        )
        if _sha256(raw).hexdigest() != stored_hash:
            return altered(count, prev, seq)
        prev, expected_seq, count = stored_hash, seq + 1, count + 1
    if expected_head is not None and (count, prev) != tuple(expected_head):
        exp_seq, exp_hash = expected_head
        if count < exp_seq:
            return VerifyResult(
                False,
                count,
                count,
                prev,
                count + 1,
                f"ledger truncated: ends at seq {count}, expected head seq {exp_seq}",
            )
        if count == exp_seq:
            return VerifyResult(
                False, count, count, prev, count, f"head hash at seq {count} differs from the expected head"
            )
    return VerifyResult(True, count, count, prev)


def verify(
    engine: Engine, batch_size: int = 5000, *, workers: int = 1, min_entries_per_worker: int = 1
) -> VerifyResult:
    """Verify the whole ledger, streaming, naming the first bad seq.

    PostgreSQL goes over COPY, split over up to ``workers`` threads (``ledger_copy``, on its
    C kernel when built; processes on its Python path); SQLite streams rows through SQLAlchemy (``verify_rows``). The
    result's ``verifier`` names the path that ran."""
    if engine.dialect.name == "postgresql":
        return ledger_copy.verify(engine, workers=workers, min_entries_per_worker=min_entries_per_worker)
    return verify_streamed(engine, batch_size)


def verify_with_policy(ctx: KmsContext) -> VerifyResult:
    """``verify`` with the policy's parallelism (``ledger.verify_workers``)."""
    p = ctx.policy.ledger
    return verify(ctx.engine, workers=p.verify_workers, min_entries_per_worker=p.verify_min_entries_per_worker)


def verify_streamed(engine: Engine, batch_size: int = 5000) -> VerifyResult:
    """The row-by-row verifier on any database (the reference the COPY path is tested against)."""
    with engine.connect() as conn:
        result = verify_rows(iter_rows(conn, batch_size, unloadable_at_as_null=True))
    result.verifier = "rows"
    return result


def entries_for(session: Session, key_name: str, key_version: int | None = None) -> list[LedgerEntry]:
    q = select(LedgerEntry).where(LedgerEntry.key_name == key_name)
    if key_version is not None:
        q = q.where(LedgerEntry.key_version == key_version)
    return list(session.scalars(q.order_by(LedgerEntry.seq)))
