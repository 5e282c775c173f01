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
  lock once per batch (up to ``BATCH`` rows).

A batch the database does not take within its retry budget is appended to a local spool
(``audit_spool``: fsync'd JSON lines under KMS_HOME) and replayed, oldest first and exactly
once, by the next write or ``flush`` that reaches the database, with its original times.
``verify`` is red while events wait there; ``kms audit spool`` says so without the database.
Only an event the spool cannot take either is dropped (counted, logged at CRITICAL). At a
normal exit ``atexit`` flushes for up to ``EXIT_FLUSH_SECONDS``, then spools what is left;
events still queued when a process is killed are lost.
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
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlalchemy import select
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.orm import Session

from ..foundation import db, retry
from ..foundation.canonical import canonical_fast
from ..foundation.clock import parse_time, utc
from ..foundation.context import kms_home
from ..foundation.db.models_access import AuditEvent
from .audit_spool import Spool, spool_path
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
EXIT_FLUSH_SECONDS = 10.0


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


def _spool_form(e: Event) -> dict[str, Any]:
    """An event as the spool keeps it: the fields the chain hashes, nothing else."""
    return {
        "at": format_time(e.at),
        "actor": e.actor,
        "op": e.operation,
        "target": e.target,
        "outcome": e.outcome,
        "detail": e.detail,
    }


def _from_spool(d: dict[str, Any]) -> Event:
    return Event(parse_time(d["at"]), d["actor"], d["op"], d["target"], d["outcome"], d["detail"])


class _Abandoned(Exception):
    """The exit handler spooled this batch: it must not also commit."""


class AuditWriter:
    """Appends emitted events for one engine in batches, on a thread that exits when idle."""

    def __init__(self, engine: Engine, idle_seconds: float = 2.0, home: Path | None = None):
        self._engine_ref = weakref.ref(engine)
        self._idle = idle_seconds
        self.spool = Spool(spool_path(home or kms_home(), engine.url.render_as_string(hide_password=True)))
        self._reset()

    def _reset(self) -> None:
        self._pid = os.getpid()
        self._q: queue.Queue[Event] = queue.Queue()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        # Who owns the batch in flight: the writer thread commits it, or the exit handler
        # spools it, never both (each takes it under this lock).
        self._commit_lock = threading.Lock()
        self._inflight: list[Event] | None = None
        self._closing = False
        self.dropped = 0  # events neither written nor spooled
        self.spooled = 0  # events this process spooled
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
        """Wait until every event put so far is written (or spooled). False on timeout."""
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

    def replay(self) -> None:
        """Append what the spool holds now (the database's budget; raises if it stays down)."""
        engine = self._engine_ref()
        if engine is not None and self.spool.has_work():
            retry.db_call(
                engine, functools.partial(self._append_once, engine, []), what="replaying spooled audit events"
            )

    def close(self, timeout: float) -> None:
        """At exit: flush for up to ``timeout``, then spool the batch in flight and the queue."""
        if os.getpid() != self._pid or self.flush(timeout):
            return
        with self._commit_lock:
            self._closing = True
            left, self._inflight = list(self._inflight or []), None
        queued = []
        while True:
            try:
                queued.append(self._q.get_nowait())
            except queue.Empty:
                break
        if left or queued:
            self._spool(left + queued)
        for _ in queued:
            self._q.task_done()

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

    def _append_once(self, engine: Engine, batch: list[Event]) -> None:
        """One transaction: whatever the spool holds (oldest, so first), then ``batch``."""
        if not self.spool.has_work():
            with Session(engine) as session:
                tx = session.begin()
                _append(session, batch, queued=True)
                self._commit(tx, batch)
            return
        with self.spool.locked():  # no other thread or process replays or appends meanwhile
            marker = self.spool.read_marker()
            if marker is not None:  # a replay that may have committed (see audit_spool)
                with Session(engine) as session:
                    committed = _entry_hash_at(session, marker.seq) == marker.entry_hash
                if committed:  # ... and did: its process died before the spool was cleared
                    self.spool.finish(marker.lines, marker.altered)
                    log.warning("audit spool: %d event(s) were in the database already", marker.lines)
                else:
                    self.spool.clear_marker()
            contents = self.spool.read()
            with Session(engine) as session:
                tx = session.begin()
                replay = [_from_spool(d) for d in contents.events]
                altered = contents.altered_line is not None
                if altered:  # said in the chain itself; the broken lines are kept aside, not replayed
                    replay.append(
                        make_event(
                            at=replay[-1].at if replay else datetime.now(UTC),
                            operation="audit.spool_altered",
                            actor="system",
                            target=self.spool.path.name,
                            outcome="error",
                            detail={
                                "first_altered_line": contents.altered_line,
                                "lines_replayed": len(contents.events),
                            },
                        )
                    )
                rows = _append(session, replay + batch, queued=True)
                if replay:
                    last = rows[len(replay) - 1]
                    self.spool.write_marker(last.seq, last.entry_hash, len(contents.events), altered)
                self._commit(tx, batch)
            if replay:
                self.spool.finish(len(contents.events), altered)
            if altered:
                log.critical(
                    "audit spool %s was altered from line %d: %d earlier event(s) replayed, the rest set aside",
                    self.spool.path,
                    contents.altered_line,
                    len(contents.events),
                )

    def _commit(self, tx: Any, batch: list[Event]) -> None:
        with self._commit_lock:
            if batch and self._inflight is not batch:
                tx.rollback()
                raise _Abandoned
            tx.commit()
            if batch:
                self._inflight = None

    def _write(self, batch: list[Event]) -> None:
        with self._commit_lock:
            if self._closing:  # the exit handler has stopped writing to the database
                self._spool(batch)
                return
            self._inflight = batch
        engine = self._engine_ref()
        try:
            if engine is None:  # the engine was garbage-collected: nowhere left to write to
                self.last_error = "the database engine was disposed before they were written"
            else:
                # A database fault is waited out within the engine's budget (core/foundation/retry.py).
                retry.db_call(engine, functools.partial(self._append_once, engine, batch), what="writing audit events")
                return
        except _Abandoned:
            return
        except Exception as exc:  # noqa: BLE001 - reported below, never raised into callers
            self.last_error = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"
        finally:
            del engine
        with self._commit_lock:
            mine, self._inflight = self._inflight is batch, None
        if mine:
            self._spool(batch)

    def _spool(self, batch: list[Event]) -> None:
        try:
            self.spool.append([_spool_form(e) for e in batch])
        except OSError as exc:
            self.dropped += len(batch)
            log.critical(
                "audit writer DROPPED %d event(s): the database refused them (%s) and the spool %s too (%s)",
                len(batch),
                self.last_error,
                self.spool.path,
                type(exc).__name__,
            )
            return
        self.spooled += len(batch)
        log.error(
            "audit writer could not append %d event(s) (%s); spooled to %s for replay",
            len(batch),
            self.last_error,
            self.spool.path,
        )


def _entry_hash_at(session: Session, seq: int) -> str | None:
    return session.scalar(select(AuditEvent.entry_hash).where(AuditEvent.seq == seq))


_WRITERS: weakref.WeakKeyDictionary[Engine, AuditWriter] = weakref.WeakKeyDictionary()
_WRITERS_LOCK = threading.Lock()


def writer(engine: Engine, home: Path | None = None) -> AuditWriter:
    """The engine's writer; ``home`` (KMS_HOME by default) holds its spool."""
    with _WRITERS_LOCK:
        w = _WRITERS.get(engine)
        if w is None:
            w = _WRITERS[engine] = AuditWriter(engine, home=home)
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


def _writer_of(target: KmsContext | Engine) -> AuditWriter:
    return writer(_engine_of(target), getattr(target, "home", None))


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
    _writer_of(target).put(
        make_event(at=at, operation=operation, actor=actor, target=target_ref, outcome=outcome, detail=detail)
    )


def flush(target: KmsContext | Engine, timeout: float = 30.0) -> None:
    """Make every emitted event durable (KmsContext or Engine), and replay the spool into the
    database (raises DependencyUnavailable if it stays down). Never call it while holding a
    write transaction on a SQLite database: the writer would wait for it."""
    w = _writer_of(target)
    if not w.flush(timeout):
        raise AuditError(f"audit events were not written within {timeout:.0f}s")
    w.replay()


@atexit.register
def _flush_all_at_exit() -> None:  # pragma: no cover - process exit (tests call close)
    with _WRITERS_LOCK:
        writers = list(_WRITERS.values())
    for w in writers:
        w.close(EXIT_FLUSH_SECONDS)


@dataclass
class SpoolStatus:
    """What the audit writer could not (yet) put in the database."""

    path: str
    spooled: int  # events waiting in the spool
    altered_files: list[str]  # broken spool tails set aside (an insider's edit, or a torn write)
    dropped: int  # events this process lost outright (database and spool both refused)
    last_error: str | None

    @property
    def ok(self) -> bool:
        return not (self.spooled or self.altered_files or self.dropped)

    def problems(self) -> list[str]:
        out = []
        if self.spooled:
            out.append(f"{self.spooled} audit event(s) are spooled in {self.path}, not yet in the database")
        if self.altered_files:
            out.append(f"audit spool lines were altered and set aside: {', '.join(self.altered_files)}")
        if self.dropped:
            out.append(f"{self.dropped} audit event(s) were DROPPED (database and spool refused them)")
        return out


def spool_status(target: KmsContext | Engine, home: Path | None = None) -> SpoolStatus:
    """Read from disk (and this process's writer): works while the database is down.
    ``dropped`` counts this process's losses only (another process logged its own)."""
    w = writer(_engine_of(target), home) if home is not None else _writer_of(target)
    return SpoolStatus(
        path=str(w.spool.path),
        spooled=w.spool.count(),
        altered_files=[str(p) for p in w.spool.altered_files()],
        dropped=w.dropped,
        last_error=w.last_error,
    )


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
    """Recompute the whole audit chain (flushing queued events first). Red too while events
    wait in the spool or a broken spool tail was set aside: the chain is then incomplete."""
    flush(target)
    with _engine_of(target).connect() as conn:
        result = verify_rows(iter_rows(conn))
    status = spool_status(target)
    if result.ok and not status.ok:
        # the first seq the missing events would take
        result.ok, result.first_bad_seq, result.problem = False, result.head_seq + 1, "; ".join(status.problems())
    return result


def events(ctx: KmsContext, *, limit: int = 100, actor: str | None = None) -> list[AuditEvent]:
    flush(ctx)
    with ctx.transaction() as session:
        q = select(AuditEvent).order_by(AuditEvent.seq.desc()).limit(limit)
        if actor:
            q = q.where(AuditEvent.actor == actor)
        return list(reversed(list(session.scalars(q))))
