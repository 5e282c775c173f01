"""Policy-level notifications (A4): who gets what, and evidence that it was delivered.

``core/foundation/transports.py`` knows *how* to deliver (SMTP, Slack webhook, outbox, retries). This
module decides *who* is told about *what*, from ``policy.notifications``:

==========================  ==============================  =========
kind                        audience                        severity
==========================  ==============================  =========
``manual_operation``        compliance                      notice
``compromise_response``     security + compliance           critical
``security_event``          security + compliance           warning
``run_failure``             security + compliance           error
``partner_ack_overdue``     security + compliance           warning
``drill_followup_overdue``  compliance                      warning
``escrow_unsealed``         security + compliance           critical
``escrow_sealed``           compliance                      info
==========================  ==============================  =========

Every kind also goes to every Slack channel in ``policy.notifications.slack_channels``.
Each per-channel outcome is appended to ``notification_deliveries``; the
``notifications_delivered`` check (``delivery_status``) fails while a delivery in the
policy window failed and no later delivery of the same (kind, ref) on the same channel
succeeded. A failure to notify never raises into the operation that caused it: it is
recorded, logged and shown by the check.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import timedelta

from sqlalchemy import select

from ..foundation.context import KmsContext
from ..foundation.db.models_events import NotificationDelivery
from ..foundation.transports import DeliveryResult, Notification

log = logging.getLogger(__name__)

AUDIENCE_BY_KIND: dict[str, tuple[tuple[str, ...], str]] = {
    "manual_operation": (("compliance",), "notice"),
    "compromise_response": (("security", "compliance"), "critical"),
    "security_event": (("security", "compliance"), "warning"),
    "run_failure": (("security", "compliance"), "error"),
    "partner_ack_overdue": (("security", "compliance"), "warning"),
    "drill_followup_overdue": (("compliance",), "warning"),
    "escrow_unsealed": (("security", "compliance"), "critical"),
    "escrow_sealed": (("compliance",), "info"),
}
AUDIENCES = ("compliance", "security")


def recipients(ctx: KmsContext, audience: Iterable[str]) -> tuple[list[str], list[str]]:
    """(email addresses, Slack channels) for ``audience`` from the policy, de-duplicated."""
    n = ctx.policy.notifications
    emails: list[str] = []
    for who in audience:
        if who not in AUDIENCES:
            raise ValueError(f"unknown notification audience {who!r}; known: {list(AUDIENCES)}")
        for address in n.compliance_emails if who == "compliance" else n.security_emails:
            if address not in emails:
                emails.append(address)
    return emails, list(n.slack_channels)


@dataclass
class NotifyOutcome:
    notification_id: str | None
    kind: str
    ok: bool
    results: list = field(default_factory=list)  # notify.DeliveryResult
    error: str | None = None

    def summary(self) -> dict:
        return {
            "notification_id": self.notification_id,
            "kind": self.kind,
            "ok": self.ok,
            "channels": {f"{r.channel}:{r.target}": ("ok" if r.ok else "FAILED") for r in self.results},
            "error": self.error,
        }


def notify_policy_event(
    ctx: KmsContext,
    kind: str,
    subject: str,
    body: str,
    ref: str | None = None,
    *,
    audience: Iterable[str] | None = None,
    severity: str | None = None,
) -> NotifyOutcome:
    """Send one notification to the policy's lists for ``kind`` and record every delivery.

    Never raises for a delivery problem (including refused content or a missing notifier);
    the outcome and the ``notification_deliveries`` rows say what happened."""
    default_audience, default_severity = AUDIENCE_BY_KIND.get(kind, (("compliance",), "info"))
    audience = tuple(audience or default_audience)
    emails, channels = recipients(ctx, audience)
    try:
        note = Notification(
            subject=subject,
            body=body,
            recipients=emails,
            slack_channels=channels,
            severity=severity or default_severity,
            kind=kind,
            ref=ref,
        )
    except ValueError as exc:  # KeyMaterialRefused or malformed text: visible, not raised
        results = [DeliveryResult("none", False, f"notification refused: {exc}", "", 0)]
        record_deliveries(ctx, None, kind, ref, subject, audience, results)
        log.warning("notification %s (%s) refused: %s", kind, ref, exc)
        return NotifyOutcome(None, kind, False, results, str(exc))
    if ctx.notifier is None:
        results = [DeliveryResult("none", False, "no notifier configured", "", 0)]
    else:
        try:
            results = list(ctx.notifier.send(note))
        except Exception as exc:  # noqa: BLE001 -- a notifier bug is still only a failed delivery
            results = [
                DeliveryResult(
                    getattr(ctx.notifier, "channel", "notifier"),
                    False,
                    f"unexpected {type(exc).__name__}: {exc}",
                    "",
                    0,
                )
            ]
    record_deliveries(ctx, note.id, kind, ref, subject, audience, results)
    ok = all(r.ok for r in results)
    if not ok:
        log.warning(
            "notification %s (%s) had failed deliveries: %s",
            kind,
            ref,
            [(r.channel, r.error) for r in results if not r.ok],
        )
    return NotifyOutcome(note.id, kind, ok, results)


def record_deliveries(ctx: KmsContext, notification_id, kind, ref, subject, audience, results) -> None:
    """Append one ``notification_deliveries`` row per channel outcome (never raises)."""
    now = ctx.now()
    try:
        with ctx.transaction() as session:
            for r in results:
                session.add(
                    NotificationDelivery(
                        at=now,
                        notification_id=notification_id or "-",
                        kind=kind,
                        ref=ref,
                        subject=subject[:1000],
                        audience="+".join(audience),
                        channel=r.channel,
                        target=(r.target or "")[:300],
                        ok=bool(r.ok),
                        skipped=bool(r.skipped),
                        attempts=int(r.attempts or 0),
                        error=r.error,
                    )
                )
    except Exception as exc:  # noqa: BLE001 -- the database being down must not hide the send
        log.error("could not record notification deliveries for %s (%s): %s", kind, ref, exc)


def notify_manual_operation(
    ctx: KmsContext,
    *,
    operation: str,
    target: str,
    ticket: str | None,
    requester: str,
    approvers: Iterable[str],
    detail: str = "",
) -> NotifyOutcome:
    """A4: every manual operation is announced to the compliance lists."""
    approvers = sorted(approvers)
    body = (
        f"Manual operation '{operation}' on {target}\n"
        f"requested by: {requester}\napproved by: {', '.join(approvers) or '(none)'}\n"
        f"change ticket: {ticket or '(none)'}\n" + (f"\n{detail}\n" if detail else "")
    )
    return notify_policy_event(
        ctx, "manual_operation", f"Manual {operation} of {target} ({ticket or 'no ticket'})", body, ref=ticket or target
    )


# ---- the "notifications delivered" check ----------------------------------------------


@dataclass
class DeliveryStatus:
    ok: bool
    window_hours: int
    delivered: int
    failed: int
    unresolved: list[dict]  # failures without a later success of the same (kind, ref, channel)


def delivery_status(ctx: KmsContext, window_hours: int | None = None) -> DeliveryStatus:
    window_hours = window_hours or ctx.policy.notifications.delivery_window_hours
    since = ctx.now() - timedelta(hours=window_hours)
    with ctx.transaction() as session:
        rows = list(
            session.scalars(
                select(NotificationDelivery).where(NotificationDelivery.at >= since).order_by(NotificationDelivery.id)
            )
        )
    last: dict[tuple, NotificationDelivery] = {}
    for r in rows:  # in id order: the last outcome per (kind, ref, channel) wins
        last[(r.kind, r.ref, r.channel)] = r
    unresolved = [
        {
            "at": r.at.isoformat() if r.at else None,
            "kind": r.kind,
            "ref": r.ref,
            "channel": r.channel,
            "target": r.target,
            "error": (r.error or "")[:300],
        }
        for r in last.values()
        if not r.ok
    ]
    return DeliveryStatus(
        not unresolved,
        window_hours,
        sum(1 for r in rows if r.ok and not r.skipped),
        sum(1 for r in rows if not r.ok),
        unresolved,
    )


def recent_deliveries(ctx: KmsContext, limit: int = 50) -> list[dict]:
    with ctx.transaction() as session:
        rows = list(session.scalars(select(NotificationDelivery).order_by(NotificationDelivery.id.desc()).limit(limit)))
    return [
        {
            "at": r.at,
            "kind": r.kind,
            "ref": r.ref,
            "channel": r.channel,
            "target": r.target,
            "ok": r.ok,
            "skipped": r.skipped,
            "attempts": r.attempts,
            "error": r.error,
        }
        for r in rows
    ]


# ---- per-reference delivery evidence (A4, R1) -----------------------------------------

CHANNELS = ("email", "slack")  # real channels; "outbox" is a local file, not a delivery
MANUAL_KINDS = ("manual_operation", "manual_rotation")  # what announces a manual operation (A4)


@dataclass
class RefDelivery:
    ref: str
    recorded: bool = False
    delivered: list[str] = field(default_factory=list)  # "email:addr" reached (last outcome ok)
    failed: list[str] = field(default_factory=list)  # "email:addr (error)" whose last outcome failed
    outbox_only: bool = False


def deliveries_by_ref(ctx: KmsContext, kinds: Iterable[str], refs: Iterable[str]) -> dict[str, RefDelivery]:
    """For each ref, the last outcome per (channel, target) of its notifications of ``kinds``,
    over the whole history (not a window: an old failure stays a failure until resent)."""
    refs = sorted(set(refs))
    out = {r: RefDelivery(r) for r in refs}
    if not refs:
        return out
    last: dict[tuple, NotificationDelivery] = {}
    with ctx.transaction() as session:
        for i in range(0, len(refs), 500):
            for row in session.scalars(
                select(NotificationDelivery)
                .where(NotificationDelivery.kind.in_(list(kinds)), NotificationDelivery.ref.in_(refs[i : i + 500]))
                .order_by(NotificationDelivery.id)
            ):
                last[(row.ref, row.channel, row.target)] = row
    for (ref, channel, target), row in last.items():
        d = out[ref]
        d.recorded = True
        if not row.ok:
            d.failed.append(f"{channel}:{target} ({(row.error or 'failed')[:120]})")
        elif channel in CHANNELS and not row.skipped:
            d.delivered.append(f"{channel}:{target}")
    for d in out.values():
        d.outbox_only = d.recorded and not d.failed and not d.delivered
    return out
