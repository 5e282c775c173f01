"""Compromise response (R2): rotate at once, revoke the compromised version, rewrap every
DEK, re-issue credentials, notify security and compliance, link it all to the event.

``respond(ctx, event_id)`` is idempotent: every ledger entry it causes carries the event
id, so a re-run (after a crash, or a second launch) finds the rotation it already did and
does not rotate twice; revocation, the DEK sweep and the event's status are idempotent
by themselves.

Order (and why):
1. ``lifecycle.rotate(key, reason=<type>, event_id=…)`` — a new active version first, so
   the key is never without one;
2. compromise only: ``lifecycle.revoke(reported version, event_id=…)``. The dependents
   guard (T4) exempts emergency revocations (``event_id`` set); the reason recorded in
   the ledger says so. CI-secret exposure and tenant rotation only rotate: the old
   version is retired by the normal rotated → destroyed path (documented decision);
3. ``envelope.sweep(ctx, key)`` for data keys — DEKs on the revoked version move to the
   new one (the revoked material exists until destroyed, and the sweep may read it);
4. ``service_keys.reissue_credentials(ctx, service)`` for service keys;
5. break-glass: re-seal the escrow package for the new version;
6. notify security + compliance (``notifications.notify_policy_event``);
7. mark the event resolved with a summary of the above.

Manual launches (UI / CLI without a sensor) go through ``report_manual`` or
``authorize_manual``: dual approval via ``access.consume_approvals`` bound to
(operation, key, ticket), operation ``revoke`` for a compromise and ``rotate`` otherwise.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from datetime import timedelta

from sqlalchemy import select

from ..access import notifications, tokens
from ..access import principals as access
from ..envelope import data_keys as envelope
from ..foundation.context import KmsContext
from ..foundation.db.models import DESTROYED, REVOKED, LedgerEntry
from ..foundation.db.models_events import EVENT_RESOLVED, SecurityEvent
from ..keys import lifecycle, service_keys
from . import escrow, events
from .events import manual_operation

# security event type -> ledger rotation reason (lifecycle.ROTATION_REASONS)
EVENT_REASONS = {"compromise": "compromise", "ci-secret-exposure": "ci-exposure", "tenant-rotation": "tenant-rotation"}

log = logging.getLogger(__name__)


@dataclass
class ResponseResult:
    event_id: str
    key: str
    type: str
    compromised_version: int
    new_version: int | None = None
    rotated: bool = False  # this call (or an earlier run for the same event) rotated
    rotation_note: str = ""
    revoked: bool = False
    revocation_note: str = ""
    deks_moved: int = 0
    deks_remaining: int = 0
    credentials_reissued: int | None = None
    escrow_package: str | None = None
    notified: bool = False
    notification_failures: list = field(default_factory=list)
    approvers: list = field(default_factory=list)
    ticket: str | None = None
    already_resolved: bool = False
    steps: list = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


def prove_requester(ctx: KmsContext, ticket: str, requester: str, totp: str | None) -> None:
    """A manual launch names a ticket and a requester proven by TOTP (before any change)."""
    if not ticket or not requester or not totp:
        raise events.EventError(
            "a manual compromise response needs --ticket, --requested-by and --totp "
            "(dual approval is bound to the change ticket)"
        )
    access.prove_principal(ctx, requester, totp)


def authorize_manual(session, ctx: KmsContext, *, key: str, event_type: str, ticket: str, requester: str) -> list[str]:
    """Consume dual approvals for a manual compromise response inside ``session`` (the
    requester was proven by ``prove_requester``)."""
    if not ticket or not requester:
        raise events.EventError(
            "a manual compromise response needs --ticket and --requested-by "
            "(dual approval is bound to the change ticket)"
        )
    return list(
        access.consume_approvals(
            session, ctx, operation=manual_operation(event_type), target=key, ticket=ticket, requester=requester
        )
    )


def report_manual(
    ctx: KmsContext,
    *,
    key: str,
    type: str,
    ticket: str,
    requested_by: str,
    totp: str | None,
    source: str = "manual",
    detail: str = "",
) -> tuple[events.EventInfo, list[str]]:
    """Record a manually launched event after consuming dual approvals, in one transaction:
    refused approvals leave no event and consume nothing."""
    events._validate(ctx, type, key, source, detail)
    prove_requester(ctx, ticket, requested_by, totp)
    with ctx.transaction() as session:
        approvers = authorize_manual(session, ctx, key=key, event_type=type, ticket=ticket, requester=requested_by)
        info = events._create(
            session,
            ctx.as_actor(requested_by),
            type,
            key,
            source,
            detail or f"manual launch, ticket {ticket}",
            reported_by=requested_by,
            dedupe=False,
        )
    return info, approvers


def authorize_existing(
    ctx: KmsContext, event_id: str, *, ticket: str, requested_by: str, totp: str | None
) -> list[str]:
    """Dual approval for launching the response to an already reported event by hand."""
    info = events.get(ctx, event_id)
    prove_requester(ctx, ticket, requested_by, totp)
    with ctx.transaction() as session:
        return authorize_manual(session, ctx, key=info.key, event_type=info.type, ticket=ticket, requester=requested_by)


SENSOR = "security_event_sensor"  # the Dagster sensor that launches responses (defs/response.py)


def seal_for_sensor(ctx: KmsContext, event_id: str) -> str:
    """The seal the sensor tags its run for ``event_id`` with (see ``claim_for_sensor``)."""
    return tokens.seal_sensor_launch(ctx, SENSOR, event_id)


def claim_for_sensor(
    ctx: KmsContext, event_id: str, seal: str | None, run_id: str, *, takeover_from: str | None = None
) -> None:
    """A run that says it is the sensor's acts without approval, so it must prove it: the seal
    only the sensor can make (signed with the workload signing key; run tags alone are free text
    to a UI user), and a one-time claim of the still-new event for this run (the seal is visible
    in the genuine run's tags, so a copy or re-execution of that run must not act again).
    ``takeover_from`` lets a retry of a failed sensor run carry on (``events.claim_new``).
    Refusals raise ``EventError`` naming the problem and change nothing."""
    if not tokens.sensor_launch_sealed(ctx, SENSOR, event_id, seal):
        raise events.EventError(
            f"run for security event {event_id} has the sensor's tags but not the sensor's seal; "
            "launch it by hand with ticket, requested_by and requester_totp (dual approval)"
        )
    events.claim_new(ctx, event_id, run_id, takeover_from=takeover_from)


def _event_ledger(ctx: KmsContext, key: str, event_id: str) -> list[LedgerEntry]:
    with ctx.transaction() as session:
        return list(
            session.scalars(
                select(LedgerEntry)
                .where(LedgerEntry.key_name == key, LedgerEntry.event_id == event_id)
                .order_by(LedgerEntry.seq)
            )
        )


def respond(
    ctx: KmsContext,
    event_id: str,
    *,
    approvers: Iterable[str] = (),
    ticket: str | None = None,
    run_id: str | None = None,
    actor: str | None = None,
) -> ResponseResult:
    """Respond to a security event (see module docstring). Safe to re-run."""
    actor = actor or ctx.actor
    approvers = sorted(set(approvers))
    ev = events.get(ctx, event_id)
    result = ResponseResult(ev.id, ev.key, ev.type, ev.key_version, approvers=approvers, ticket=ticket)
    if ev.status == EVENT_RESOLVED:
        result.already_resolved = True
        result.steps.append("event already resolved: nothing to do")
        result.new_version = (ev.response or {}).get("new_version")
        return result
    events.mark_responding(ctx, event_id, run_id)
    reason = EVENT_REASONS[ev.type]  # the event id is on the ledger entry (event_id)

    # 1. rotate (at most once per event: the ledger remembers)
    done = [e for e in _event_ledger(ctx, ev.key, ev.id) if e.to_state == "active"]
    if done:
        result.rotated, result.new_version = True, done[-1].key_version
        result.rotation_note = f"already rotated to v{result.new_version} for this event"
    else:
        with ctx.transaction() as session:
            active = lifecycle.active_version(lifecycle.get_key(session, ev.key))
        if active is not None and active.version == ev.key_version:
            r = lifecycle.rotate(
                ctx, ev.key, actor=actor, reason=reason, approvers=approvers, ticket=ticket, event_id=ev.id
            )
            result.rotated, result.new_version = r.rotated, r.new_version
            result.rotation_note = f"rotated v{r.old_version} -> v{r.new_version}"
        else:
            result.new_version = active.version if active else None
            result.rotation_note = (
                f"v{ev.key_version} was no longer active (active: v{result.new_version}); no extra rotation"
            )
    result.steps.append(result.rotation_note)

    # 2. revoke the reported version (compromise only)
    if ev.type == "compromise":
        with ctx.transaction() as session:
            v = lifecycle.get_version(lifecycle.get_key(session, ev.key), ev.key_version)
            state = v.state
        if state in (REVOKED, DESTROYED):
            result.revoked = state == REVOKED
            result.revocation_note = f"v{ev.key_version} already {state}"
        else:
            lifecycle.revoke(
                ctx,
                ev.key,
                ev.key_version,
                actor=actor,
                reason=f"compromise (security event {ev.id}); dependents confirmation overridden "
                f"by compromise response (T4 emergency exemption)",
                approvers=approvers,
                ticket=ticket,
                event_id=ev.id,
            )
            result.revoked = True
            result.revocation_note = f"revoked v{ev.key_version}"
    else:
        result.revocation_note = f"{ev.type}: rotation only, v{ev.key_version} not revoked"
    result.steps.append(result.revocation_note)

    key_class = lifecycle.key_class_of(ev.key)
    # 3. rewrap DEKs
    if key_class in envelope.SWEPT_CLASSES:
        sweep = envelope.sweep(ctx, ev.key)
        result.deks_moved, result.deks_remaining = sweep.moved, sweep.remaining
        result.steps.append(f"swept {sweep.moved} DEKs ({sweep.remaining} remaining)")
        if sweep.remaining:
            raise events.EventError(
                f"{sweep.remaining} DEKs of {ev.key} are still on old versions after the "
                f"sweep; re-run the response (event {ev.id})"
            )
    # 4. re-issue service credentials
    if key_class == "service":
        result.credentials_reissued = service_keys.reissue_credentials(ctx, ev.key.split(":", 1)[1])
        result.steps.append(f"re-issued {result.credentials_reissued} credentials")
    # 5. break-glass: seal the new version
    if key_class == "break-glass":
        try:
            result.escrow_package = escrow.ensure_sealed(ctx, reason=f"security event {ev.id}").get("package_id")
            result.steps.append(f"escrow re-sealed: package {result.escrow_package}")
        except escrow.EscrowError as exc:
            result.steps.append(f"escrow NOT re-sealed: {exc}")

    # 6. notify
    body = (
        f"Security event {ev.id}: {ev.type} of {ev.key} v{ev.key_version}\n"
        f"source: {ev.source}\nreported at {ev.reported_at.isoformat()} by {ev.reported_by}\n"
        f"detail: {ev.detail or '-'}\n\nResponse:\n"
        + "\n".join(f"- {s}" for s in result.steps)
        + (f"\n\napprovers: {', '.join(approvers)}\nticket: {ticket}" if approvers or ticket else "")
        + (f"\nDagster run: {run_id}" if run_id else "")
    )
    outcome = notifications.notify_policy_event(
        ctx,
        "compromise_response",
        f"{ev.type} response for {ev.key}: v{ev.key_version} -> v{result.new_version}",
        body,
        ref=f"event:{ev.id}",
    )
    result.notified = outcome.ok
    result.notification_failures = [f"{r.channel}:{r.target}: {r.error}" for r in outcome.results if not r.ok]

    # 7. resolve
    summary = {k: v for k, v in result.to_dict().items() if k not in ("steps",)}
    summary["steps"] = result.steps
    summary["run_id"] = run_id
    events.mark_resolved(ctx, ev.id, summary)
    return result


def open_events(ctx: KmsContext) -> list[events.EventInfo]:
    return events.list_events(ctx, status=("new", "responding"))


def response_overdue(ctx: KmsContext, hours: int = 1) -> list[events.EventInfo]:
    """Events not resolved ``hours`` after being reported (for the 'events answered' check)."""
    limit = ctx.now() - timedelta(hours=hours)
    return [e for e in open_events(ctx) if e.reported_at <= limit]


__all__ = [
    "ResponseResult",
    "respond",
    "report_manual",
    "authorize_manual",
    "authorize_existing",
    "manual_operation",
    "open_events",
    "SecurityEvent",
]
