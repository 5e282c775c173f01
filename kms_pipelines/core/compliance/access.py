"""Evaluators of section A, access controls (A1-A4): each reads the live state and returns a Finding."""

from __future__ import annotations

import json
from datetime import timedelta

from sqlalchemy import func, select

from ..access import anomalies, console_auth, crosscheck, notifications, tokens
from ..access import principals as access
from ..foundation.context import KmsContext
from ..foundation.db.models import LedgerEntry
from ..foundation.db.models_access import AuditEvent
from ..foundation.db.models_events import EscrowCustodian
from ..ledger import audit, checkpoints
from .model import _FACTOR_NAMES, Finding, _finding, _iso, _join
from .rotation import lifecycle_class

PROBE_CLIENT = "kms-compliance-probe"
# Clause text fixes these (A1 names the three roles; A2 caps workload identities at 15 min);
# the policy file must agree with them, which is what A1/A2 check.
A1_ROLES = ("sre_oncall", "security_engineering", "compliance_officer")
A2_MAX_TOKEN_MINUTES = 15


# ---- A: access --------------------------------------------------------------------


def eval_a1(ctx: KmsContext) -> Finding:
    problems, good = [], []
    pol = ctx.policy.access
    if sorted(pol.roles) != sorted(A1_ROLES):
        problems.append(f"policy roles are {sorted(pol.roles)}, the clause allows exactly {list(A1_ROLES)}")
    stray = {
        op: sorted(set(roles) - set(pol.roles)) for op, roles in pol.permissions.items() if set(roles) - set(pol.roles)
    }
    if stray:
        problems.append(f"permission matrix grants to roles outside the policy: {stray}")
    material = ("decrypt", "encrypt", "sign", "export", "rotate", "destroy", "break-glass")
    missing = [op for op in material if op not in pol.permissions]
    if missing:
        problems.append(f"permission matrix lacks {missing}")
    principals = access.list_principals(ctx)
    for p in principals:
        if p["kind"] == "human" and (not p["roles"] or set(p["roles"]) - set(pol.roles)):
            problems.append(f"principal {p['name']} holds roles {p['roles']} outside the policy")
        if p["kind"] == "workload" and p["name"] not in pol.workload_principals:
            problems.append(f"workload principal {p['name']} is not declared in the policy")
    humans = [p for p in principals if p["kind"] == "human"]
    actors, strangers = _a1_audit_actors(ctx, principals)
    problems += strangers
    if not problems:
        good.append(
            f"roles {sorted(pol.roles)}; matrix of {len(pol.permissions)} permissions; "
            f"{len(humans)} human and {len(pol.workload_principals)} workload principal(s) within it; "
            f"all {actors} audit actor(s) enrolled or declared"
        )
    return _finding(
        problems,
        good,
        {
            "principals": [{k: p[k] for k in ("name", "kind", "roles")} for p in principals],
            "records": ["policy roles", "principals", "audit_events actors"],
        },
    )


def _a1_audit_actors(ctx: KmsContext, principals: list[dict]) -> tuple[int, list[str]]:
    """Who really acted: every actor of a successful operation in the audit log must be an
    enrolled principal, an escrow custodian, a declared workload or one of the KMS's own
    declared service actors -- a name nobody enrolled is access outside the role model."""
    pol = ctx.policy.access
    audit.flush(ctx)
    with ctx.engine.connect() as conn:
        rows = conn.execute(
            select(AuditEvent.actor, func.count(), func.min(AuditEvent.seq))
            .where(AuditEvent.outcome == "ok")
            .group_by(AuditEvent.actor)
        ).all()
        custodians = set(conn.execute(select(EscrowCustodian.name)).scalars())
    known = (
        {p["name"] for p in principals}
        | set(pol.workload_principals)
        | custodians
        | {a for a in pol.service_actors if not a.endswith("*")}
    )
    families = tuple(a[:-1] for a in pol.service_actors if a.endswith("*"))
    strangers = sorted(
        (seq, actor, n)
        for actor, n, seq in rows
        if actor not in known and not (families and actor.startswith(families))
    )
    return len(rows), [
        f"audit actor {actor!r} is no enrolled principal or declared workload ({n} operation(s), "
        f"first at audit seq {seq})"
        for seq, actor, n in strangers[:5]
    ]


def eval_a2(ctx: KmsContext) -> Finding:
    problems, good, warnings = [], [], []
    cap = ctx.policy.access.workload_token_ttl_minutes
    if cap > A2_MAX_TOKEN_MINUTES:
        problems.append(f"policy token TTL {cap} min exceeds the clause's {A2_MAX_TOKEN_MINUTES} min")
    principal = next(iter(sorted(ctx.policy.access.workload_principals)), None)
    if principal:
        claims = tokens.verify_workload_token(ctx, tokens.issue_workload_token(ctx, principal))
        lifetime = (claims.exp - claims.iat) / 60
        if lifetime > cap:
            problems.append(f"a fresh workload token lives {lifetime:g} min (cap {cap})")
        else:
            good.append(f"workload tokens live {lifetime:g} min (cap {cap})")
    since = ctx.now() - timedelta(days=ctx.policy.audit.baseline_days)
    with ctx.engine.connect() as conn:
        issued = (
            conn.execute(
                select(AuditEvent.detail).where(
                    AuditEvent.operation == "token.issue", AuditEvent.outcome == "ok", AuditEvent.at >= since
                )
            )
            .scalars()
            .all()
        )
    too_long = 0
    for detail in issued:
        try:
            if int(json.loads(detail or "{}").get("ttl_seconds", 0)) > cap * 60:
                too_long += 1
        except (ValueError, TypeError, AttributeError):
            continue
    if too_long:
        problems.append(f"{too_long} workload token(s) issued with a lifetime over {cap} min")
    humans = [p for p in access.list_principals(ctx) if p["kind"] == "human" and not p["disabled"]]
    approvers = [p for p in humans if "approve" in p["permissions"]]
    no_totp = [p["name"] for p in approvers if not p["totp_enrolled"]]
    now = ctx.now()
    able = [p for p in approvers if p["totp_enrolled"] and p["approve_after"] is not None and p["approve_after"] <= now]
    need = ctx.policy.access.approvals_required
    if no_totp:
        problems.append(f"approvers without TOTP enrolment: {', '.join(no_totp)}")
    elif len(able) < need or len(humans) < need + 1:
        warnings.append(
            f"cannot approve any manual operation: dual control needs {need} approvers besides a "
            f"requester; {len(able)} principal(s) may approve now (past the cooling-off) of "
            f"{len(humans)} active human principal(s)"
        )
    else:
        good.append(f"{len(able)} approver(s) past the cooling-off, all TOTP-enrolled")
    admins = [p for p in able if "principals" in p["permissions"]]
    if humans and len(admins) < need + 1:
        warnings.append(
            f"no principal can be enrolled, re-roled or removed: that needs {need + 1} principals "
            f"holding 'principals' (a requester and {need} approvers); {len(admins)} can act now"
        )
    good.append(
        f"{len(issued)} token(s) issued in {ctx.policy.audit.baseline_days} d, none over the cap"
        if not too_long
        else ""
    )
    console_problems, console_good = _a2_console_factors(ctx)
    problems += console_problems
    good += console_good
    return _finding(
        problems, good, {"cap_minutes": cap, "tokens_checked": len(issued), "approvers": len(approvers)}, warnings
    )


def _a2_console_factors(ctx: KmsContext) -> tuple[list[str], list[str]]:
    """A2's console half: every enabled human principal with a role has a registered FIDO2
    security key and a TOTP enrolment (``kms console`` signs in with both)."""
    gaps = console_auth.missing_console_factors(ctx)
    if gaps:
        return [
            "console principals without both factors: "
            + "; ".join(
                f"{name} lacks {' and '.join(_FACTOR_NAMES.get(f, f) for f in m)}" for name, m in sorted(gaps.items())
            )
        ], []
    return [], ["every console principal with a role has a FIDO2 security key and TOTP"]


def eval_a3(ctx: KmsContext) -> Finding:
    problems, good = [], []
    result = audit.verify(ctx)
    if result.ok:
        good.append(f"audit chain verifies ({result.count} events)")
    else:
        problems.append(f"audit chain broken at seq {result.first_bad_seq}: {result.problem}")
    problems += _a3_ledger_matches_audit(ctx, good)
    problems += _a3_audit_matches_checkpoints(ctx, good)
    coverage = anomalies.detection_coverage(ctx)
    if coverage["gap"]:
        problems.append(coverage["gap"])
    else:
        good.append(f"anomaly detection covers every event through {_iso(coverage['through'])}")
    pending = anomalies.unreviewed(ctx)
    # found by a detection run held in memory (kms report --at) and so never reviewed
    unstored = [
        a
        for a in (ctx.detection.new if ctx.detection is not None else [])
        if a.severity in ctx.policy.audit.review_severities
    ]
    names = [f"#{a.id} {a.kind}" for a in pending] + [f"{a.kind} (found by this report, not stored)" for a in unstored]
    if names:
        problems.append(
            f"{len(names)} unreviewed {'/'.join(ctx.policy.audit.review_severities)} anomaly(ies): "
            + ", ".join(names[:5])
        )
    else:
        good.append("no unreviewed high-severity anomaly")
    return _finding(
        problems,
        good,
        {
            "events": result.count,
            "unreviewed": [a.id for a in pending],
            "records": ["audit_events", "ledger_entries", "key_versions", "audit cursor"],
        },
    )


def _a3_audit_matches_checkpoints(ctx: KmsContext, good: list[str]) -> list[str]:
    """The audit log is immutable only if a cut of its tail shows: its head is signed into
    every checkpoint in WORM storage."""
    if ctx.objects is None:
        return []
    problem = checkpoints.audit_problem(ctx)
    if problem:
        return [problem]
    good.append("audit log holds every event the signed checkpoints recorded")
    return []


def _a3_ledger_matches_audit(ctx: KmsContext, good: list[str]) -> list[str]:
    """Every key-state change is in both the ledger and the audit log, and every new
    version's material was generated through the audited keystore."""
    audit.flush(ctx)
    with ctx.engine.connect() as conn:
        cross = crosscheck.ledger_vs_audit(conn)
    if cross.ok:
        good.append(f"ledger and audit log agree event for event ({cross.entries} ledger entries)")
    return cross.problems[:5]


def _is_manual(ctx: KmsContext, key_name: str, to_state: str, reason: str | None, event_id: str | None) -> bool:
    if reason == "manual":
        return True
    if to_state == "destroyed" and ctx.policy.retention.destroy_requires_dual_approval:
        return lifecycle_class(key_name) != "export"  # export expiry crypto-shreds automatically (R3)
    if to_state == "revoked":
        return not event_id  # sensor-driven compromise response carries its event id
    return False


def eval_a4(ctx: KmsContext) -> Finding:
    """Manual ops: dual approval and a ticket (ledger), a delivered compliance notification
    per ticket (notification_deliveries), state changes only through the ledger (key_versions)."""

    problems, good, warnings = [], [], []
    need = ctx.policy.access.approvals_required
    manual = bad = 0
    tickets: dict[str, int] = {}
    with ctx.engine.connect() as conn:
        rows = conn.execution_options(stream_results=True, yield_per=5000).execute(
            select(
                LedgerEntry.seq,
                LedgerEntry.key_name,
                LedgerEntry.key_version,
                LedgerEntry.to_state,
                LedgerEntry.reason,
                LedgerEntry.event_id,
                LedgerEntry.approvers,
                LedgerEntry.change_ticket,
            ).order_by(LedgerEntry.seq)
        )
        for seq, key, version, to_state, reason, event_id, approvers, ticket in rows:
            if not _is_manual(ctx, key, to_state, reason, event_id):
                continue
            manual += 1
            if ticket:
                tickets.setdefault(ticket, seq)
            names = json.loads(approvers or "[]")
            if len(set(names)) < need or not ticket:
                bad += 1
                if bad <= 5:
                    problems.append(
                        f"ledger seq {seq} ({key} v{version} → {to_state}) has {len(set(names))} "
                        f"approver(s) and ticket {ticket or 'none'}"
                    )
        replay = crosscheck.replay(conn)
    if bad > 5:
        problems.append(f"… {bad} manual ledger entries without dual approval in all")
    problems += _a4_state_outside_ledger(replay)
    notified, p, w = _a4_notifications(ctx, tickets)
    problems += p
    warnings += w
    st = notifications.delivery_status(ctx)
    if not st.ok:
        problems.append(
            f"{len(st.unresolved)} notification(s) undelivered in {st.window_hours} h: "
            + ", ".join(f"{u['kind']} via {u['channel']}" for u in st.unresolved[:5])
        )
    if not problems:
        good.append(
            f"{manual} manual ledger operation(s), each with ≥{need} approvers and a ticket; "
            f"{notified}/{len(tickets)} ticket(s) notified by email/Slack; "
            f"{st.delivered} notification(s) delivered in {st.window_hours} h, none failed; "
            f"key_versions changed only through the ledger"
        )
    return _finding(
        problems,
        good,
        {
            "manual_ops": manual,
            "without_dual_approval": bad,
            "undelivered": len(st.unresolved),
            "tickets": len(tickets),
            "tickets_notified": notified,
            "records": ["ledger_entries", "notification_deliveries", "key_versions"],
        },
        warnings,
    )


def _a4_state_outside_ledger(replay) -> list[str]:
    """A state change that bypassed the ledger bypassed the approvals too."""
    edits = [p for p in replay.problems if p.startswith("key_versions:")]
    return [f"key state changed with no ledger entry (so no approval): {_join(edits[:3])}"] if edits else []


def _a4_notifications(ctx: KmsContext, tickets: dict[str, int]) -> tuple[int, list[str], list[str]]:
    """(tickets notified, problems, warnings): a manual operation counts as notified only
    when its compliance notification reached a real channel and none of its channels failed."""
    found = notifications.deliveries_by_ref(ctx, notifications.MANUAL_KINDS, tickets)
    problems, warnings, notified = [], [], 0
    for ticket, d in found.items():
        seq = tickets[ticket]
        if not d.recorded:
            problems.append(f"manual operation {ticket} (ledger seq {seq}): no compliance notification recorded")
        elif d.failed:
            problems.append(
                f"manual operation {ticket} (ledger seq {seq}) not notified: "
                f"delivery failed on {', '.join(d.failed[:2])}"
            )
        elif d.outbox_only:
            warnings.append(
                f"manual operation {ticket}: notification written only to the local outbox "
                f"(no SMTP or Slack configured)"
            )
        else:
            notified += 1
    return notified, problems[:10], warnings[:5]
