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
import json
import logging
import os
import queue
import threading
import time
import weakref
from collections import Counter, defaultdict
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta, timezone
from typing import Iterable, Iterator, Sequence

from sqlalchemy import func, select
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session

from ..foundation import retry
from ..foundation.canonical import canonical_fast
from ..foundation.clock import parse_time, utc
from ..foundation.db.models import LedgerEntry
from ..foundation.db.models_access import AuditAnomaly, AuditEvent
from ..ledger.ledger import (
    GENESIS_HASH,
    VerifyResult,
    advisory_xact_lock,
    chain_head,
    entry_hash,
    format_time,
    newest_time,
    require_in_order,
)

log = logging.getLogger(__name__)

OUTCOMES = ("ok", "denied", "error")
_AUDIT_LOCK_ID = 0x4B4D5341  # "KMSA": serialises audit appends on PostgreSQL
BATCH = 500
LINGER_SECONDS = 0.1
SEVERITY_RANK = {"low": 0, "medium": 1, "high": 2}


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
) -> dict:
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


def _clean(value):
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


def _detail_json(detail: dict | str | None) -> str | None:
    """Canonical JSON of a detail object (or a short text, stored as a JSON string)."""
    return None if not detail else canonical_fast(_clean(detail)).decode()


def head(session_or_conn) -> tuple[int, str]:
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
    *, at: datetime, operation: str, actor: str, target: str | None, outcome: str, detail: dict | str | None = None
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
    detail: dict | str | None = None,
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
            if engine is None:
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


def _engine_of(target) -> Engine:
    """The engine events for ``target`` go to. A read-only context (``kms --at``) changes
    nothing, yet what it really does (keystore probes of a report) is still audited, through
    a writable twin of its engine and at the wall-clock time (see ``emit``)."""
    if isinstance(target, Engine):
        return target
    if not getattr(target, "read_only", False):
        return target.engine
    from ..foundation import db

    with _WRITERS_LOCK:
        twin = _WRITABLE.get(target.engine)
        if twin is None:
            twin = _WRITABLE[target.engine] = db.make_engine(target.engine.url.render_as_string(hide_password=False))
        return twin


def emit(
    target,
    *,
    at: datetime,
    operation: str,
    actor: str,
    target_ref: str | None,
    outcome: str,
    detail: dict | None = None,
) -> None:
    """Queue one event for ``target`` (a KmsContext or Engine); see the module docstring."""
    if getattr(target, "read_only", False):
        at = datetime.now(timezone.utc)  # the chosen --at time is never written anywhere
    writer(_engine_of(target)).put(
        make_event(at=at, operation=operation, actor=actor, target=target_ref, outcome=outcome, detail=detail)
    )


def flush(target, timeout: float = 30.0) -> None:
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


def iter_rows(conn, batch_size: int = 5000) -> Iterator[tuple]:
    result = conn.execution_options(stream_results=True, yield_per=batch_size).execute(
        select(*_COLUMNS).order_by(AuditEvent.seq)
    )
    for partition in result.partitions():
        yield from partition


def verify_rows(rows: Iterable[tuple]) -> VerifyResult:
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


def verify(target) -> VerifyResult:
    """Recompute the whole audit chain (flushing queued events first)."""
    flush(target)
    with _engine_of(target).connect() as conn:
        return verify_rows(iter_rows(conn))


# ---- anomaly detection --------------------------------------------------------------


@dataclass
class Anomaly:
    kind: str
    severity: str
    principal: str | None
    window_start: datetime
    window_end: datetime
    count: int
    detail: dict = field(default_factory=dict)
    scope: str = ""  # what the finding is about beyond principal and window (e.g. the key)

    @property
    def fingerprint(self) -> str:
        return f"{self.kind}|{self.principal or '-'}|{self.scope}|{format_time(self.window_start)}"


def _hour(at: datetime) -> datetime:
    return utc(at).replace(minute=0, second=0, microsecond=0)


def detect(ctx, at: datetime | None = None) -> list[Anomaly]:
    """Anomalies in the policy window ending at ``at`` (default now), computed from the
    audit log and the ledger: rate spikes per principal against the trailing baseline,
    operations by principals lacking the permission, decrypt bursts, failure bursts,
    manual ledger changes without approvals."""
    from . import principals as access

    pol = ctx.policy.audit
    end = utc(at or ctx.now())
    window = timedelta(hours=pol.anomaly_window_hours)
    start = end - window
    base_start = start - timedelta(days=pol.baseline_days)
    flush(ctx)
    found: list[Anomaly] = []
    with ctx.engine.connect() as conn:
        base = dict(
            conn.execute(
                select(AuditEvent.actor, func.count())
                .where(AuditEvent.at >= base_start, AuditEvent.at < start)
                .group_by(AuditEvent.actor)
            ).all()
        )
        rows = conn.execution_options(stream_results=True, yield_per=5000).execute(
            select(AuditEvent.at, AuditEvent.actor, AuditEvent.operation, AuditEvent.outcome, AuditEvent.detail)
            .where(AuditEvent.at >= start, AuditEvent.at <= end)
            .order_by(AuditEvent.seq)
        )
        per_actor: Counter = Counter()
        decrypts: Counter = Counter()
        failures: Counter = Counter()
        unauthorized: dict[tuple, list] = defaultdict(list)
        perms_cache: dict[str, frozenset | None] = {}
        with Session(bind=conn) as session:
            for ev_at, actor, operation, outcome, detail in rows:
                hour = _hour(ev_at)
                per_actor[actor] += 1
                if operation == "decrypt" and outcome == "ok":
                    decrypts[(actor, hour)] += 1
                if outcome != "ok":
                    failures[(actor, hour)] += 1
                if outcome == "denied" and detail and '"reason":"permission"' in detail:
                    unauthorized[(actor, hour)].append(operation)
                    continue
                needed = access.permission_for(operation)
                if outcome == "ok" and needed:
                    if actor not in perms_cache:
                        perms_cache[actor] = access.known_permissions(session, ctx, actor)
                    granted = perms_cache[actor]
                    if granted is not None and needed not in granted:
                        unauthorized[(actor, hour)].append(operation)
    periods = max(1.0, pol.baseline_days * 24 / pol.anomaly_window_hours)
    for actor, n in sorted(per_actor.items()):
        baseline = base.get(actor, 0) / periods
        if n >= pol.rate_spike_min_events and n > pol.rate_spike_factor * max(baseline, 1.0):
            found.append(
                Anomaly(
                    "rate_spike",
                    "medium",
                    actor,
                    _hour(start),
                    end,
                    n,
                    {"baseline_per_window": round(baseline, 2), "factor": pol.rate_spike_factor},
                )
            )
    for (actor, hour), n in sorted(decrypts.items()):
        if n > pol.decrypt_burst_per_hour:
            found.append(
                Anomaly(
                    "decrypt_burst",
                    "high",
                    actor,
                    hour,
                    hour + timedelta(hours=1),
                    n,
                    {"limit_per_hour": pol.decrypt_burst_per_hour},
                )
            )
    for (actor, hour), n in sorted(failures.items()):
        if n > pol.failure_burst_per_hour:
            found.append(
                Anomaly(
                    "failure_burst",
                    "high",
                    actor,
                    hour,
                    hour + timedelta(hours=1),
                    n,
                    {"limit_per_hour": pol.failure_burst_per_hour},
                )
            )
    for (actor, hour), ops in sorted(unauthorized.items()):
        found.append(
            Anomaly(
                "operation_without_role",
                "high",
                actor,
                hour,
                hour + timedelta(hours=1),
                len(ops),
                {"operations": sorted(set(ops))},
            )
        )
    found.extend(_manual_without_approvals(ctx, start, end))
    return found


def _manual_without_approvals(ctx, start: datetime, end: datetime) -> list[Anomaly]:
    destroy_needs = ctx.policy.retention.destroy_requires_dual_approval
    seen: dict[tuple, Anomaly] = {}
    with ctx.engine.connect() as conn:
        for seq, at, key, version, to_state, reason, approvers, actor in conn.execute(
            select(
                LedgerEntry.seq,
                LedgerEntry.at,
                LedgerEntry.key_name,
                LedgerEntry.key_version,
                LedgerEntry.to_state,
                LedgerEntry.reason,
                LedgerEntry.approvers,
                LedgerEntry.actor,
            )
            .where(LedgerEntry.at >= start, LedgerEntry.at <= end)
            .order_by(LedgerEntry.seq)
        ):
            manual = reason == "manual" or (destroy_needs and to_state == "destroyed")
            if not manual or len(json.loads(approvers or "[]")) >= ctx.policy.access.approvals_required:
                continue
            at = utc(at)
            k = (key, at)
            if k not in seen:
                seen[k] = Anomaly(
                    "manual_without_approvals",
                    "high",
                    actor,
                    at,
                    at,
                    0,
                    {"key": key, "ledger_seqs": [], "to_states": []},
                    scope=key,
                )
            a = seen[k]
            a.count += 1
            a.detail["ledger_seqs"].append(seq)
            a.detail["to_states"].append(to_state)
            a.detail["version"] = version
    return list(seen.values())


@dataclass
class AnomalyReport:
    new: list[AuditAnomaly]
    recent: list[AuditAnomaly]
    unreviewed: list[AuditAnomaly]  # of the severities the policy says must be reviewed


DETECTION_OP = "audit.anomalies"


def detection_cursor(ctx) -> datetime | None:
    """Where the last detection run ended: kept in the audit chain itself (each run's
    ``audit.anomalies`` event records ``through``), so the cursor is tamper-evident."""
    flush(ctx)
    with ctx.engine.connect() as conn:
        details = (
            conn.execute(
                select(AuditEvent.detail)
                .where(AuditEvent.operation == DETECTION_OP)
                .order_by(AuditEvent.seq.desc())
                .limit(20)
            )
            .scalars()
            .all()
        )
    for detail in details:
        try:
            return utc(parse_time(json.loads(detail or "{}")["through"]))
        except (ValueError, KeyError, TypeError):
            continue  # an older event without a cursor
    return None


@dataclass
class DetectionPreview:
    """Detection run in memory through ``through`` and not stored (``kms report --at``:
    the database is read-only there, and nothing may be recorded at a chosen time)."""

    through: datetime
    new: list[Anomaly]  # found, and not yet stored as an audit_anomalies row


def _scan(ctx, end: datetime) -> tuple[dict[str, Anomaly], datetime | None, datetime]:
    """Every anomaly in the windows from the stored cursor through ``end`` (by fingerprint),
    the cursor, and where the scanned span starts."""
    window = timedelta(hours=ctx.policy.audit.anomaly_window_hours)
    cursor = detection_cursor(ctx)
    if cursor is None:  # the first run reads the whole log, not only the last window
        with ctx.engine.connect() as conn:
            first = conn.execute(select(func.min(AuditEvent.at))).scalar()
        cursor = utc(first) if first is not None and utc(first) < end - window else None
    found: dict[str, Anomaly] = {}
    step_end = end if cursor is None or cursor >= end - window else cursor + window
    while True:
        for a in detect(ctx, min(step_end, end)):
            found.setdefault(a.fingerprint, a)
        if step_end >= end:
            break
        step_end += window
    return found, cursor, (cursor if cursor is not None and cursor < end - window else end - window)


def preview_anomalies(ctx, at: datetime | None = None) -> DetectionPreview:
    """What ``refresh_anomalies`` would find through ``at``, computed without writing."""
    end = utc(at or ctx.now())
    found, _cursor, _start = _scan(ctx, end)
    with ctx.engine.connect() as conn:
        stored = (
            set(
                conn.execute(
                    select(AuditAnomaly.fingerprint).where(AuditAnomaly.fingerprint.in_(list(found)))
                ).scalars()
            )
            if found
            else set()
        )
    return DetectionPreview(end, [a for fp, a in found.items() if fp not in stored])


def refresh_anomalies(ctx, at: datetime | None = None) -> AnomalyReport:
    """Detect and persist anomalies over every event since the last run, however long ago
    (window by window from the stored cursor), then move the cursor (idempotent: one row
    per fingerprint)."""
    end = utc(at or ctx.now())
    window = timedelta(hours=ctx.policy.audit.anomaly_window_hours)
    found, cursor, start_covered = _scan(ctx, end)
    with ctx.transaction() as session:
        existing = set(
            session.scalars(select(AuditAnomaly.fingerprint).where(AuditAnomaly.fingerprint.in_(list(found))))
        )
        new = []
        for a in found.values():
            if a.fingerprint in existing:
                continue
            existing.add(a.fingerprint)
            row = AuditAnomaly(
                fingerprint=a.fingerprint,
                kind=a.kind,
                severity=a.severity,
                principal=a.principal,
                window_start=a.window_start,
                window_end=a.window_end,
                count=a.count,
                detail=canonical_fast(_clean(a.detail)).decode(),
                detected_at=end,
            )
            session.add(row)
            new.append(row)
        session.flush()
        if cursor is None or end > cursor:
            record(
                session,
                at=end,
                operation=DETECTION_OP,
                actor=ctx.actor,
                target=None,
                outcome="ok",
                detail={
                    "new": len(new),
                    "kinds": sorted({r.kind for r in new}),
                    "from": format_time(start_covered),
                    "through": format_time(end),
                },
            )
    start = end - window
    return AnomalyReport(new, list_anomalies(ctx, since=start), unreviewed(ctx))


def detection_coverage(ctx) -> dict:
    """A3: has detection looked at every event older than one window? ``gap`` names the
    events it has not seen (detection skipped for longer than its window). A detection run
    held in memory (``ctx.detection``, ``kms report --at``) counts as having looked."""
    cursor = detection_cursor(ctx)
    preview = ctx.detection
    if preview is not None and (cursor is None or preview.through > cursor):
        cursor = preview.through
    limit = utc(ctx.now()) - timedelta(hours=ctx.policy.audit.anomaly_window_hours)
    q = select(func.count(), func.min(AuditEvent.at)).where(AuditEvent.at < limit, AuditEvent.operation != DETECTION_OP)
    if cursor is not None:
        q = q.where(AuditEvent.at > cursor)
    with ctx.engine.connect() as conn:
        n, oldest = conn.execute(q).one()
    gap = None
    if n:
        gap = (
            f"anomaly detection has not covered {n} audit event(s) since "
            f"{format_time(utc(oldest)) if oldest else '-'} (last run through "
            f"{format_time(cursor) if cursor else 'never'})"
        )
    return {"through": cursor, "unseen": int(n or 0), "gap": gap}


def list_anomalies(ctx, *, since: datetime | None = None, only_unreviewed: bool = False) -> list[AuditAnomaly]:
    with ctx.transaction() as session:
        q = select(AuditAnomaly).order_by(AuditAnomaly.id)
        if since is not None:
            q = q.where(AuditAnomaly.detected_at >= since)
        if only_unreviewed:
            q = q.where(AuditAnomaly.reviewed_at.is_(None))
        return list(session.scalars(q))


def unreviewed(ctx) -> list[AuditAnomaly]:
    """Unreviewed anomalies of the severities the policy requires to be reviewed."""
    sev = ctx.policy.audit.review_severities
    return [a for a in list_anomalies(ctx, only_unreviewed=True) if a.severity in sev]


def review(ctx, anomaly_id: int, principal: str, note: str | None = None, *, totp: str | None) -> AuditAnomaly:
    """Mark an anomaly reviewed by ``principal``, proven by their TOTP code, who holds
    ``review`` and is not the principal whose actions raised the anomaly."""
    from ..foundation import limits
    from . import principals as access

    limits.text(note, "review note", required=False)
    target = f"anomaly:{anomaly_id}"
    now = ctx.now()
    problem = None
    with ctx.transaction() as session:
        row = session.get(AuditAnomaly, anomaly_id)
        if row is None:
            problem = f"no audit anomaly with id {anomaly_id}"
        elif row.reviewed_at:
            problem = f"anomaly {anomaly_id} was already reviewed by {row.reviewed_by}"
        elif row.principal == principal:
            problem = f"{principal!r} raised anomaly {anomaly_id} and may not review it (another reviewer is needed)"
    if problem is not None:
        emit(
            ctx,
            at=now,
            operation="audit.review",
            actor=str(principal)[:200],
            target_ref=target,
            outcome="denied",
            detail={"reason": "invalid", "problem": problem},
        )
        raise AuditError(problem)
    access.prove_principal(ctx, principal, totp)
    access.require_permission(ctx, principal, "review", target=target)
    with ctx.transaction() as session:
        row = session.get(AuditAnomaly, anomaly_id, with_for_update=True)
        if row.reviewed_at:  # reviewed concurrently
            raise AuditError(f"anomaly {anomaly_id} was already reviewed by {row.reviewed_by}")
        row.reviewed_at, row.reviewed_by, row.review_note = now, principal, note
        record(
            session,
            at=now,
            operation="audit.review",
            actor=principal,
            target=target,
            outcome="ok",
            detail={"kind": row.kind, "severity": row.severity},
        )
        return row


def events(ctx, *, limit: int = 100, actor: str | None = None) -> list[AuditEvent]:
    flush(ctx)
    with ctx.transaction() as session:
        q = select(AuditEvent).order_by(AuditEvent.seq.desc()).limit(limit)
        if actor:
            q = q.where(AuditEvent.actor == actor)
        return list(reversed(list(session.scalars(q))))


# ---- nightly ------------------------------------------------------------------------


def _register_nightly() -> None:
    from .. import nightly

    @nightly.nightly_step("audit_anomalies", order=70)
    def _audit_anomalies(ctx) -> dict:
        report = refresh_anomalies(ctx)
        return {"new": len(report.new), "unreviewed_high": len(report.unreviewed)}


_register_nightly()
