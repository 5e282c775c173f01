"""Anomaly detection over the audit log (A3): rate spikes, operations without the permission, decrypt and failure bursts, manual changes without approvals; their review."""

from __future__ import annotations

import json
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from ..foundation import limits, nightly_steps
from ..foundation.canonical import canonical_fast
from ..foundation.clock import parse_time, utc
from ..foundation.db.models import LedgerEntry
from ..foundation.db.models_access import AuditAnomaly, AuditEvent
from ..ledger.audit import AuditError, _clean, emit, flush, record
from ..ledger.ledger import format_time
from . import principals as access

SEVERITY_RANK = {"low": 0, "medium": 1, "high": 2}


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


# ---- nightly ------------------------------------------------------------------------


def _register_nightly() -> None:
    @nightly_steps.nightly_step("audit_anomalies", order=70)
    def _audit_anomalies(ctx) -> dict:
        report = refresh_anomalies(ctx)
        return {"new": len(report.new), "unreviewed_high": len(report.unreviewed)}


_register_nightly()
