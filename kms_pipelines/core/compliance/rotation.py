"""Evaluators of section R, rotation cadence (R1-R4): each reads the live state and returns a Finding."""

from __future__ import annotations

from dataclasses import asdict
from datetime import timedelta

from sqlalchemy import select

from ..access import notifications
from ..envelope import data_keys as envelope
from ..envelope import export_keys
from ..foundation.clock import utc
from ..foundation.context import KmsContext
from ..foundation.db.models import Key, KeyVersion, LedgerEntry
from ..foundation.db.models_events import EVENT_RESOLVED, SecurityEvent
from ..keys import manifest, rotation
from ..response import compromise, escrow
from .model import Finding, _cadence, _finding, _iso

# ---- R: rotation --------------------------------------------------------------------


def eval_r1(ctx: KmsContext) -> Finding:
    """Root cadence (key_versions), published manifest (object store), partner notices
    (partner_notices) confirmed by channel deliveries (notification_deliveries)."""
    problems, good, details = _cadence(ctx, "root")
    warnings = []
    active = next((k for k in details["keys"]), None)
    latest = manifest.latest(ctx)
    if active is not None:
        if latest is None or latest.version != active["version"]:
            problems.append(
                f"fingerprints of root v{active['version']} are not published "
                f"(latest manifest: {('v' + str(latest.version)) if latest else 'none'})"
            )
        else:
            good.append(f"manifest {latest.kid} published")
    check = rotation.check_partners(ctx)
    if check.overdue:
        problems.append(
            "partners not notified within the deadline: "
            + ", ".join(f"{r.partner}@v{r.version} (due {_iso(r.deadline)})" for r in check.overdue)
        )
    if check.late:
        problems.append("partners notified late: " + ", ".join(f"{r.partner}@v{r.version}" for r in check.late))
    channel_ok, p, w = _r1_channel_deliveries(ctx, check.rows)
    problems += p
    warnings += w
    if check.rows and not check.overdue and not check.late and not p:
        hours = ctx.policy.key_class("root").partner_notice_hours
        good.append(
            f"{channel_ok}/{len(check.rows)} partner notice(s) delivered by email/Slack within {hours} h; "
            f"{len(check.unacked)} awaiting ack"
        )
    details["partner_notices"] = len(check.rows)
    details["channel_deliveries"] = channel_ok
    details["records"] = ["key_versions", "root manifests (object store)", "partner_notices", "notification_deliveries"]
    return _finding(problems, good, details, warnings)


def _r1_channel_deliveries(ctx: KmsContext, rows) -> tuple[int, list[str], list[str]]:
    """A partner notice counts as delivered only through a real channel (email or Slack);
    one that reached only the local outbox is a warning, a notice marked sent with no
    delivery record at all is a failure."""

    sent = [r for r in rows if r.notified_at is not None]
    refs = {f"{r.partner}:{manifest.kid(r.version)}": r for r in sent}
    found = notifications.deliveries_by_ref(ctx, ("root_rotation_partner_notice",), refs)
    problems, warnings, ok = [], [], 0
    for ref, d in found.items():
        r = refs[ref]
        if not d.recorded:
            problems.append(f"partner notice {r.partner}@v{r.version} is marked sent but no delivery is recorded")
        elif d.delivered:
            ok += 1
        elif d.outbox_only:
            warnings.append(
                f"partner notice {r.partner}@v{r.version} went only to the local outbox (no SMTP or "
                f"Slack configured): not delivered to the partner"
            )
        else:
            problems.append(f"partner notice {r.partner}@v{r.version} failed: {', '.join(d.failed[:2])}")
    return ok, problems[:10], warnings[:10]


def eval_r2(ctx: KmsContext) -> Finding:
    problems, good, details = _cadence(ctx, "service")
    sla = ctx.policy.events.response_sla_hours
    late = compromise.response_overdue(ctx, sla)
    open_ = compromise.open_events(ctx)
    warnings = []
    if late:
        problems.append(
            f"{len(late)} security event(s) unanswered past {sla} h: "
            + ", ".join(f"{e.type} on {e.key} ({e.id[:12]})" for e in late[:5])
        )
    elif open_:
        warnings.append(f"{len(open_)} security event(s) being answered (within the {sla} h SLA)")
    else:
        good.append("no open security events")
    resolved, unlinked = _r2_linked_responses(ctx)
    problems += unlinked
    if resolved and not unlinked:
        good.append(f"{resolved} resolved security event(s), each with its response in the ledger")
    details["open_events"] = [e.id for e in open_]
    details["records"] = ["security_events", "ledger_entries", "notification_deliveries"]
    return _finding(problems, good, details, warnings)


def _r2_linked_responses(ctx: KmsContext) -> tuple[int, list[str]]:
    """A resolved event must show its response in records other than its own status: a
    ledger rotation (or revocation) linked to the event, or of the reported version after it
    was reported; a compromise must leave the reported version revoked or destroyed."""
    problems, n = [], 0
    with ctx.transaction() as session:
        resolved = session.scalars(
            select(SecurityEvent).where(SecurityEvent.status == EVENT_RESOLVED).order_by(SecurityEvent.seq)
        ).all()
        for ev in resolved:
            n += 1
            linked = session.scalars(select(LedgerEntry.to_state).where(LedgerEntry.event_id == ev.id)).all()
            later = (
                session.execute(
                    select(LedgerEntry.to_state).where(
                        LedgerEntry.key_name == ev.key_name,
                        LedgerEntry.key_version == ev.key_version,
                        LedgerEntry.to_state.in_(("rotated", "revoked", "destroyed")),
                        LedgerEntry.at >= ev.reported_at,
                    )
                )
                .scalars()
                .all()
            )
            ended = set(linked) | set(later)
            if not ev.response or not (linked or later):
                problems.append(
                    f"security event {ev.id[:12]} ({ev.type} on {ev.key_name}) is resolved but no "
                    f"ledger entry shows a response (no rotation or revocation linked to it)"
                )
            elif ev.type == "compromise" and not ({"revoked", "destroyed"} & ended):
                problems.append(
                    f"compromise event {ev.id[:12]} is resolved but {ev.key_name} v{ev.key_version} was never revoked"
                )
    return n, problems[:10]


def eval_r3(ctx: KmsContext) -> Finding:
    problems, good, details = _cadence(ctx, "data")
    warnings = []
    stranded = envelope.stranded(ctx)
    with ctx.transaction() as session:
        rotated_at = {
            (k, v): utc(t)
            for k, v, t in session.execute(select(Key.name, KeyVersion.version, KeyVersion.rotated_at).join(KeyVersion))
            if t
        }
    grace = timedelta(days=1)  # the sweep runs every night after the rotations
    for s in stranded:
        if lifecycle_class(s.key) == "export":
            continue  # export keys are judged by their expiry below
        since = rotated_at.get((s.key, s.version))
        if s.state == "rotated" and since is not None and ctx.now() - since < grace:
            warnings.append(f"{s.deks} DEK(s) on {s.key} v{s.version} rotated {_iso(since)}, awaiting the sweep")
        else:
            problems.append(f"{s.deks} DEK(s) still wrapped under {s.state} {s.key} v{s.version}")
    due = export_keys.due(ctx)
    if due:
        problems.append(
            "expired export keys still alive: " + ", ".join(f"{d.key} (expired {_iso(d.expired_at)})" for d in due[:5])
        )
    if not stranded and not due:
        good.append("no DEK on a retired version; no expired export key alive")
    details["stranded"] = [asdict(s) for s in stranded]
    details["expired_exports"] = [d.key for d in due]
    return _finding(problems, good, details, warnings)


def lifecycle_class(name: str) -> str:
    return name.split(":", 1)[0]


def eval_r4(ctx: KmsContext) -> Finding:
    problems, good, details = _cadence(ctx, "break-glass")
    overdue = escrow.destruction_overdue(ctx)
    if overdue:
        problems.append(
            "superseded escrow packages not confirmed destroyed: "
            + ", ".join(f"{o['package_id']} (missing {', '.join(o['missing'])})" for o in overdue[:5])
        )
    stale = [p for p in escrow.current_problems(ctx) if "days old" in p or "seals v" in p]
    problems.extend(stale)
    if not overdue:
        superseded = [p for p in escrow.packages(ctx) if p.superseded_at is not None]
        good.append(f"{len(superseded)} superseded package(s), every due destruction confirmed")
    details["destruction_overdue"] = overdue
    return _finding(problems, good, details)
