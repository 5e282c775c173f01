"""The audit log of every KMS operation (policy clause A3) and anomaly detection over it.

``audit_events`` is append-only (database triggers) and hash-chained exactly like the
key-state ledger: each row's hash is SHA-256 over the RFC 8785 encoding of its fields and
the previous row's hash (``ledger.entry_hash``), so ``verify`` names the first altered,
missing or reordered seq. Rows name operations, actors and key *references*; they never
hold key material, plaintext, tokens or TOTP codes (``_clean_detail`` refuses bytes).

Two ways in:

* ``record(session, ...)`` appends inside the caller's transaction: the event commits or
  rolls back with the change it describes (approvals, reviews, consumed approvals).
* ``emit(engine, ...)`` hands the event to a per-engine background writer that appends
  batches in short transactions of its own. The audited keystore and every *refusal* use
  it: a refusal's caller rolls back, so its audit row must not ride in that transaction,
  and a keystore call made while the caller holds a SQLite write lock must not wait for
  a second write transaction (that would deadlock). ``flush(engine)`` waits until every
  emitted event is durable; readers (verify, anomalies, the CLI) flush first. The cost:
  one queue put per keystore operation on the caller's path; the writer takes the chain
  lock once per batch (up to ``BATCH`` rows). Events still queued when a process is
  killed are lost; ``atexit`` flushes on a normal exit.
"""

from __future__ import annotations

import atexit
import functools
import logging
import os
import queue
import threading
import time
import weakref
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from sqlalchemy import select
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.orm import Session

from ..foundation import db, retry
from ..foundation.canonical import canonical_fast
from ..foundation.clock import utc
from ..foundation.db.models_access import AuditEvent
from .ledger import (
    advisory_xact_lock,
    chain_head,
    entry_hash,
    format_time,
    newest_time,
    require_in_order,
)
from .verdict import GENESIS_HASH, VerifyResult

if TYPE_CHECKING:
    from ..foundation.context import KmsContext

log = logging.getLogger(__name__)

OUTCOMES = ("ok", "denied", "error")
_AUDIT_LOCK_ID = 0x4B4D5341  # "KMSA": serialises audit appends on PostgreSQL
BATCH = 500
LINGER_SECONDS = 0.1


class AuditError(ValueError):
    """A refused audit action (unknown anomaly, already reviewed …)."""


# ---- the chain ----------------------------------------------------------------------


def event_document(
    seq: int,
    at: datetime | str,
    actor: str,
    operation: str,
    target: str | None,
    outcome: str,
    detail: str | None,
    prev_hash: str,
) -> dict[str, Any]:
    return {
        "seq": seq,
        "at": at if isinstance(at, str) else format_time(at),
        "actor": actor,
        "op": operation,
        "target": target,
        "outcome": outcome,
        "detail": detail,
        "prev": prev_hash,
    }


def _clean(value: object) -> Any:
    if value is None or isinstance(value, (str, bool, int)):
        return value
    if isinstance(value, float):
        return repr(value)  # canonical_fast is float-free by design
    if isinstance(value, datetime):
        return format_time(value)
    if isinstance(value, (list, tuple, set, frozenset)):
        return [_clean(v) for v in (sorted(value) if isinstance(value, (set, frozenset)) else value)]
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    # bytes (and anything else) are refused: an audit row never carries key material.
    raise TypeError(f"audit detail may not hold {type(value).__name__} values")


def _detail_json(detail: dict[str, Any] | str | None) -> str | None:
    """Canonical JSON of a detail object (or a short text, stored as a JSON string)."""
    return None if not detail else canonical_fast(_clean(detail)).decode()


def head(session_or_conn: Session | Connection) -> tuple[int, str]:
    return chain_head(session_or_conn, AuditEvent.seq, AuditEvent.entry_hash)


@dataclass(frozen=True)
class Event:
    at: datetime
    actor: str
    operation: str
    target: str | None
    outcome: str
    detail: str | None  # canonical JSON text


def make_event(
    *,
    at: datetime,
    operation: str,
    actor: str,
    target: str | None,
    outcome: str,
    detail: dict[str, Any] | str | None = None,
) -> Event:
    if outcome not in OUTCOMES:
        raise ValueError(f"audit outcome must be one of {OUTCOMES}, got {outcome!r}")
    return Event(utc(at), actor or "unknown", operation, target, outcome, _detail_json(detail))


def _append(session: Session, events: Sequence[Event], *, queued: bool = False) -> list[AuditEvent]:
    """Chain ``events``. The chain's time never goes back: a synchronous ``record`` older than
    the newest event by more than ``ledger.RACE_TOLERANCE`` is refused (ChainOrderError, so
    the caller's change rolls back), one that merely lost a race is chained at the newest
    event's time; an event queued by ``emit`` happened already and is never dropped: it is
    chained at the newest event's time (``queued``)."""
    advisory_xact_lock(session, _AUDIT_LOCK_ID)
    seq, prev = head(session)
    newest = newest_time(session, AuditEvent.seq, AuditEvent.at)
    rows = []
    for e in events:
        if newest is not None and e.at < newest:
            if not queued:
                require_in_order(session, AuditEvent.seq, AuditEvent.at, e.at, "audit log")  # or refused
            e = replace(e, at=newest)
        newest = e.at
        seq += 1
        h = entry_hash(event_document(seq, e.at, e.actor, e.operation, e.target, e.outcome, e.detail, prev))
        rows.append(
            AuditEvent(
                seq=seq,
                at=e.at,
                actor=e.actor,
                operation=e.operation,
                target=e.target,
                outcome=e.outcome,
                detail=e.detail,
                prev_hash=prev,
                entry_hash=h,
            )
        )
        prev = h
    session.add_all(rows)
    session.flush()
    return rows


def record(
    session: Session,
    *,
    at: datetime,
    operation: str,
    actor: str,
    target: str | None,
    outcome: str,
    detail: dict[str, Any] | str | None = None,
) -> AuditEvent:
    """Append one hash-chained event inside the caller's transaction."""
    return _append(
        session, [make_event(at=at, operation=operation, actor=actor, target=target, outcome=outcome, detail=detail)]
    )[0]


# ---- the background writer ----------------------------------------------------------


class AuditWriter:
    """Appends emitted events for one engine in batches, on a thread that exits when idle."""

    def __init__(self, engine: Engine, idle_seconds: float = 2.0):
        self._engine_ref = weakref.ref(engine)
        self._idle = idle_seconds
        self._reset()

    def _reset(self) -> None:
        self._pid = os.getpid()
        self._q: queue.Queue[Event] = queue.Queue()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self.dropped = 0
        self.last_error: str | None = None

    def put(self, event: Event) -> None:
        if os.getpid() != self._pid:  # forked: the parent's thread and queue are not ours
            self._reset()
        self._q.put(event)
        with self._lock:
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, name="kms-audit-writer", daemon=True)
                self._thread.start()

    def flush(self, timeout: float = 30.0) -> bool:
        """Wait until every event put so far is written (or dropped). False on timeout."""
        if os.getpid() != self._pid:
            return True
        end = time.monotonic() + timeout
        cond = self._q.all_tasks_done
        with cond:
            while self._q.unfinished_tasks:
                remaining = end - time.monotonic()
                if remaining <= 0:
                    return False
                cond.wait(remaining)
        return True

    def _run(self) -> None:
        while True:
            try:
                first = self._q.get(timeout=self._idle)
            except queue.Empty:
                with self._lock:
                    if self._q.empty():
                        self._thread = None
                        return
                continue
            # Linger briefly so a burst of operations becomes one short write transaction: on
            # SQLite every write transaction takes the database lock the callers also need.
            deadline = time.monotonic() + LINGER_SECONDS
            while self._q.qsize() < BATCH - 1 and time.monotonic() < deadline:
                time.sleep(0.01)
            batch = [first]
            while len(batch) < BATCH:
                try:
                    batch.append(self._q.get_nowait())
                except queue.Empty:
                    break
            try:
                self._write(batch)
            finally:
                for _ in batch:
                    self._q.task_done()

    @staticmethod
    def _append_once(engine: Engine, batch: list[Event]) -> None:
        with Session(engine) as session, session.begin():
            _append(session, batch, queued=True)

    def _write(self, batch: list[Event]) -> None:
        for attempt in range(3):
            engine = self._engine_ref()
            if engine is None:  # the engine was garbage-collected: nowhere left to write to
                self.last_error = "the database engine was disposed before they were written"
                break
            try:
                # A database fault is waited out within the engine's budget (core/foundation/retry.py)
                # rather than dropping the batch after three quick tries.
                retry.db_call(engine, functools.partial(self._append_once, engine, batch), what="writing audit events")
                return
            except Exception as exc:  # noqa: BLE001 - reported below, never raised into callers
                self.last_error = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"
                time.sleep(0.1 * (attempt + 1))
            finally:
                del engine
        self.dropped += len(batch)
        log.error("audit writer could not append %d event(s): %s", len(batch), self.last_error)


_WRITERS: weakref.WeakKeyDictionary[Engine, AuditWriter] = weakref.WeakKeyDictionary()
_WRITERS_LOCK = threading.Lock()


def writer(engine: Engine) -> AuditWriter:
    with _WRITERS_LOCK:
        w = _WRITERS.get(engine)
        if w is None:
            w = _WRITERS[engine] = AuditWriter(engine)
        return w


_WRITABLE: weakref.WeakKeyDictionary[Engine, Engine] = weakref.WeakKeyDictionary()


def _engine_of(target: KmsContext | Engine) -> Engine:
    """The engine events for ``target`` go to. A read-only context (``kms --at``) changes
    nothing, yet what it really does (keystore probes of a report) is still audited, through
    a writable twin of its engine and at the wall-clock time (see ``emit``)."""
    if isinstance(target, Engine):
        return target
    if not getattr(target, "read_only", False):
        return target.engine
    with _WRITERS_LOCK:
        twin = _WRITABLE.get(target.engine)
        if twin is None:
            twin = _WRITABLE[target.engine] = db.make_engine(target.engine.url.render_as_string(hide_password=False))
        return twin


def emit(
    target: KmsContext | Engine,
    *,
    at: datetime,
    operation: str,
    actor: str,
    target_ref: str | None,
    outcome: str,
    detail: dict[str, Any] | None = None,
) -> None:
    """Queue one event for ``target`` (a KmsContext or Engine); see the module docstring."""
    if getattr(target, "read_only", False):
        at = datetime.now(UTC)  # the chosen --at time is never written anywhere
    writer(_engine_of(target)).put(
        make_event(at=at, operation=operation, actor=actor, target=target_ref, outcome=outcome, detail=detail)
    )


def flush(target: KmsContext | Engine, timeout: float = 30.0) -> None:
    """Make every emitted event durable (KmsContext or Engine). Never call it while holding
    a write transaction on a SQLite database: the writer would wait for it."""
    engine = _engine_of(target)
    with _WRITERS_LOCK:
        w = _WRITERS.get(engine)
    if w is not None and not w.flush(timeout):
        raise AuditError(f"audit events were not written within {timeout:.0f}s")


@atexit.register
def _flush_all_at_exit() -> None:  # pragma: no cover - process exit
    with _WRITERS_LOCK:
        writers = list(_WRITERS.values())
    for w in writers:
        w.flush(10.0)


# ---- verification -------------------------------------------------------------------

_COLUMNS = (
    AuditEvent.seq,
    AuditEvent.at,
    AuditEvent.actor,
    AuditEvent.operation,
    AuditEvent.target,
    AuditEvent.outcome,
    AuditEvent.detail,
    AuditEvent.prev_hash,
    AuditEvent.entry_hash,
)


def iter_rows(conn: Connection, batch_size: int = 5000) -> Iterator[tuple[Any, ...]]:
    result = conn.execution_options(stream_results=True, yield_per=batch_size).execute(
        select(*_COLUMNS).order_by(AuditEvent.seq)
    )
    for partition in result.partitions():
        yield from partition


def verify_rows(rows: Iterable[Sequence[Any]]) -> VerifyResult:
    prev, expected_seq, count = GENESIS_HASH, 1, 0
    for seq, at, actor, operation, target, outcome, detail, prev_hash, stored in rows:
        if seq != expected_seq:
            problem = (
                f"event seq {expected_seq} is missing (next present is {seq})"
                if seq > expected_seq
                else f"event seq {seq} is out of order"
            )
            return VerifyResult(False, count, expected_seq - 1, prev, expected_seq, problem)
        if prev_hash != prev:
            return VerifyResult(
                False, count, seq - 1, prev, seq, f"event seq {seq} does not link to seq {seq - 1} (prev_hash mismatch)"
            )
        if entry_hash(event_document(seq, utc(at), actor, operation, target, outcome, detail, prev_hash)) != stored:
            return VerifyResult(
                False, count, seq - 1, prev, seq, f"event seq {seq} was altered (its content does not match its hash)"
            )
        prev, expected_seq, count = stored, seq + 1, count + 1
    return VerifyResult(True, count, count, prev)


def verify(target: KmsContext | Engine) -> VerifyResult:
    """Recompute the whole audit chain (flushing queued events first)."""
    flush(target)
    with _engine_of(target).connect() as conn:
        return verify_rows(iter_rows(conn))


def events(ctx: KmsContext, *, limit: int = 100, actor: str | None = None) -> list[AuditEvent]:
    flush(ctx)
    with ctx.transaction() as session:
        q = select(AuditEvent).order_by(AuditEvent.seq.desc()).limit(limit)
        if actor:
            q = q.where(AuditEvent.actor == actor)
        return list(reversed(list(session.scalars(q))))
