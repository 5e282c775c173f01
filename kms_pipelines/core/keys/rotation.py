"""Rotation on the policy's cadence (R1, R2, R3, B3) and the evidence around it.

``reconcile(ctx, key_class=None)`` brings each key of the reconciled classes (root,
service, data, backup; break-glass and export keys have their own owners) to the policy:
it rotates what is due (``lifecycle.rotate(only_if_due=True)``, under the key's row lock,
so concurrent runs rotate once) and does nothing otherwise. The nightly steps
``rotate_<class>`` and the Dagster assets ``keys_<class>`` both call it.

What a rotation carries, by class:

* **root** (R1, P1): in the rotation's own transaction every service-key seed is rewrapped
  under the new root (``service_keys.rewrap_seeds``) and one ``partner_notices`` row is
  created per policy partner, with a deadline of ``partner_notice_hours`` (24 h). After the
  commit the public-key manifest is published (``manifest.publish_pending``) and partners
  are notified through ``ctx.notifier`` (``notify_partners``). Both are idempotent and are
  retried by every later reconcile/nightly run, so a crash after the commit loses nothing.
* **service** (R2, P2): a seed for the new version is wrapped under the active root in the
  rotation's transaction; after the commit every client gets a new credential
  (``service_keys.reissue_credentials``); old credentials stay valid until the old
  version is revoked.

Partner-notice semantics (check ``partners_notified_within_24h``): the hard requirement
is the policy's — every partner *notified* within 24 hours of a root rotation; the check
fails while any notice is undelivered past its deadline. Acknowledgements (``kms partners
ack``) are recorded and shown (time to ack, who is still pending) but do not fail it: a
partner's silence is not a breach of our policy.

Immediate rotation (``rotate_now``): ``kms keys rotate service:NAME --reason
compromise|tenant-rotation|ci-exposure`` rotates at once, regardless of cadence, and
notifies the compliance and security lists (A4).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from datetime import datetime, timedelta

from sqlalchemy import select
from sqlalchemy.orm import selectinload

from ..access import notifications
from ..foundation import nightly_steps
from ..foundation.clock import utc
from ..foundation.context import KmsContext
from ..foundation.db.models import ACTIVE, REVOKED, ROTATED, Key, KeyVersion
from ..foundation.db.models_rotation import PartnerNotice, RootManifest, ServiceSeed
from ..foundation.transports import Notification, failures
from . import lifecycle, manifest, service_keys, vault
from .lifecycle import RotationResult

RECONCILED_CLASSES = ("root", "service", "data", "backup", "archive")
# rotation reason -> policy spelling (key_classes.service.rotate_immediately_on)
POLICY_REASONS = {"compromise": "compromise", "tenant-rotation": "tenant-rotation", "ci-exposure": "ci-secret-exposure"}


class RotationError(lifecycle.LifecycleError):
    """A refused rotation-area operation; nothing was changed."""


def keys_of_class(ctx: KmsContext, key_class: str) -> list[str]:
    if key_class not in RECONCILED_CLASSES:
        raise RotationError(
            f"key class {key_class!r} is not reconciled here (choose from {', '.join(RECONCILED_CLASSES)})"
        )
    return [n for n in ctx.policy.bootstrap_key_names() if lifecycle.key_class_of(n) == key_class]


# ---- the rotation and its in-transaction work -------------------------------------


def _after_rotate(ctx: KmsContext):
    def hook(session, key: Key, new: KeyVersion, old: KeyVersion | None) -> None:
        if key.name == "root":
            service_keys.rewrap_seeds(session, ctx, new)
            if old is not None:
                _create_notices(session, ctx, new.version, ctx.now())
        elif key.key_class == "service":
            service_keys.ensure_seed(session, ctx, key.name, new.version)

    return hook


def rotate_key(
    ctx: KmsContext,
    name: str,
    *,
    reason: str,
    actor: str | None = None,
    only_if_due: bool = False,
    approvers=(),
    ticket: str | None = None,
    event_id: str | None = None,
) -> RotationResult:
    """``lifecycle.rotate`` plus the class's in-transaction work and after-commit follow-up."""
    result = lifecycle.rotate(
        ctx,
        name,
        actor=actor,
        reason=reason,
        approvers=approvers,
        ticket=ticket,
        event_id=event_id,
        only_if_due=only_if_due,
        after_rotate=_after_rotate(ctx),
    )
    if result.rotated:
        follow_up(ctx, name)
    return result


def follow_up(ctx: KmsContext, name: str) -> None:
    """After-commit work (idempotent): root -> manifest + partner notices; service -> credentials."""
    if name == "root":
        catch_up_root(ctx)
    elif lifecycle.key_class_of(name) == "service":
        with ctx.transaction() as session:
            v = lifecycle.get_version(lifecycle.get_key(session, name), None)
            service_keys.ensure_seed(session, ctx, name, v.version)
        service_keys.reissue_credentials(ctx, name)
    if lifecycle.key_class_of(name) in ("root", "service") and ctx.objects is not None:
        vault.archive_pending(ctx)  # T1: the retired version's archive copy, in the run that rotated it


def _pending_root_work(session, ctx: KmsContext) -> bool:
    """Cheap test whether ``catch_up_root`` has anything to do."""
    root = lifecycle.get_key(session, "root")
    active = lifecycle.active_version(root)
    if (
        active is not None
        and session.scalars(select(ServiceSeed.id).where(ServiceSeed.root_version != active.version).limit(1)).first()
        is not None
    ):
        return True
    noticed = set(session.scalars(select(PartnerNotice.root_version).distinct()))
    if ctx.policy.partners and any(
        v.version > 1 and v.activated_at is not None and v.version not in noticed for v in root.versions
    ):
        return True
    if session.scalars(select(PartnerNotice.id).where(PartnerNotice.notified_at.is_(None)).limit(1)).first():
        return ctx.notifier is not None
    if ctx.objects is not None:
        published = set(session.scalars(select(RootManifest.root_version)))
        return any(v.version not in published and v.state in (ACTIVE, ROTATED, REVOKED) for v in root.versions)
    return False


def catch_up_root(ctx: KmsContext) -> dict:
    """Finish root rotations that were not (fully) done here, e.g. a compromise rotation
    through ``lifecycle.rotate`` directly or a crash after commit: rewrap stale seeds,
    create missing partner notices, publish manifests, notify partners."""
    with ctx.transaction() as session:
        root = lifecycle.get_key(session, "root", lock=True)
        active = lifecycle.active_version(root)
        rewrapped = service_keys.rewrap_seeds(session, ctx, active) if active is not None else 0
        noticed = set(session.scalars(select(PartnerNotice.root_version)))
        for v in root.versions:
            if v.version > 1 and v.activated_at is not None and v.version not in noticed:
                _create_notices(session, ctx, v.version, utc(v.activated_at))
    published = manifest.publish_pending(ctx) if ctx.objects is not None else []
    sent = notify_partners(ctx)
    return {
        "seeds_rewrapped": rewrapped,
        "manifests_published": [m.version for m in published],
        "partners_notified": sent,
    }


def _plan(ctx: KmsContext, names: list[str]) -> tuple[list[str], list[str], bool]:
    """In one read: which keys are due, which services need follow-up, whether root does."""
    due, services = [], []
    with ctx.transaction() as session:
        keys = {
            k.name: k
            for k in session.scalars(select(Key).where(Key.name.in_(names)).options(selectinload(Key.versions)))
        }
        for name in names:
            key = keys.get(name)
            if key is None:
                raise lifecycle.UnknownKey(f"unknown key {name!r} (run `kms init`, or see `kms keys list`)")
            if lifecycle.is_due(ctx, key):
                due.append(name)
        service_names = [n for n in names if lifecycle.key_class_of(n) == "service"]
        if service_names:
            services = service_keys.needing_follow_up(session, {n: keys[n] for n in service_names})
        root_pending = "root" in names and _pending_root_work(session, ctx)
    return due, services, root_pending


def reconcile(ctx: KmsContext, key_class: str | None = None, *, actor: str | None = None) -> list[RotationResult]:
    """Rotate every key of ``key_class`` (default: all reconciled classes) that is due;
    finish any rotation done elsewhere (manifests, notices, seeds, credentials)."""
    classes = [key_class] if key_class else list(RECONCILED_CLASSES)
    names = [n for cls in classes for n in keys_of_class(ctx, cls)]
    due, services, root_pending = _plan(ctx, names)
    results = []
    for name in names:
        if name in due:  # rotate re-checks under the key's row lock
            results.append(rotate_key(ctx, name, reason="cadence", actor=actor or "kms-reconcile", only_if_due=True))
        else:
            results.append(RotationResult(name, False, reason="not due"))
    rotated = {r.key for r in results if r.rotated}
    if root_pending and "root" not in rotated:
        catch_up_root(ctx)
    for name in services:
        if name not in rotated:
            follow_up(ctx, name)
    return results


def rotate_now(
    ctx: KmsContext,
    name: str,
    *,
    reason: str,
    actor: str | None = None,
    approvers=(),
    ticket: str | None = None,
    event_id: str | None = None,
) -> RotationResult:
    """Rotate a service key at once for an R2 reason (compromise, tenant-rotation,
    ci-exposure), without approvals. Every other class and reason goes through dual control
    (``access.manual_rotate``); a security event's key rotates through ``compromise``."""
    check_immediate(ctx, name, reason)
    result = rotate_key(ctx, name, reason=reason, actor=actor, approvers=approvers, ticket=ticket, event_id=event_id)
    if result.rotated:
        _notify_manual(ctx, name, result, actor or ctx.actor, ticket)
    return result


def check_immediate(ctx: KmsContext, name: str, reason: str) -> None:
    """Refuse (RotationError) unless ``reason`` may rotate ``name`` at once (R2)."""
    lifecycle.validate_key_name(ctx, name)
    if reason not in lifecycle.EMERGENCY_REASONS:
        raise RotationError(
            f"an immediate rotation needs an R2 reason ({', '.join(lifecycle.EMERGENCY_REASONS)}); "
            f"a manual rotation of {name} needs dual approval (keys rotate --manual)"
        )
    if lifecycle.key_class_of(name) != "service":
        raise RotationError(
            f"--reason {reason} rotates service keys only (R2); {name} is a "
            f"{lifecycle.key_class_of(name)} key: rotate it with dual approval "
            f"(`kms keys rotate {name} --manual --ticket T --requested-by YOU --totp CODE`)"
        )
    allowed = ctx.policy.key_class("service").rotate_immediately_on
    if POLICY_REASONS[reason] not in allowed:
        raise RotationError(
            f"the policy does not list {POLICY_REASONS[reason]!r} as a reason to rotate service keys "
            f"at once (rotate_immediately_on: {allowed})"
        )


def _notify_manual(ctx: KmsContext, name: str, result: RotationResult, actor: str, ticket: str | None) -> None:
    """Through notifications.notify_policy_event, so every delivery (a failed one too) is recorded."""
    notifications.notify_policy_event(
        ctx,
        "manual_rotation",
        f"KMS: {name} rotated at once ({result.reason})",
        (
            f"{name} was rotated from v{result.old_version} to v{result.new_version} by {actor} "
            f"(reason: {result.reason}; ticket: {ticket or 'none'}). The old version stays verify-only "
            f"until revoked or retired."
        ),
        ref=ticket or f"{name}#v{result.new_version}",
        audience=("compliance", "security"),
        severity="warning" if result.reason != "manual" else "notice",
    )


# ---- partners (R1) ----------------------------------------------------------------


def _notice_hours(ctx: KmsContext) -> int:
    return ctx.policy.key_class("root").partner_notice_hours or 24


def _create_notices(session, ctx: KmsContext, root_version: int, rotated_at: datetime) -> None:
    existing = set(session.scalars(select(PartnerNotice.partner).where(PartnerNotice.root_version == root_version)))
    deadline = rotated_at + timedelta(hours=_notice_hours(ctx))
    for p in ctx.policy.partners:
        if p.name not in existing:
            session.add(
                PartnerNotice(
                    root_version=root_version,
                    partner=p.name,
                    email=p.email,
                    rotated_at=rotated_at,
                    deadline=deadline,
                    attempts=0,
                )
            )
    session.flush()


def notify_partners(ctx: KmsContext) -> list[str]:
    """Deliver every pending partner notice (at least once); returns ``partner@vN`` sent."""
    if ctx.notifier is None:
        return []
    with ctx.transaction() as session:
        pending = [
            n.id
            for n in session.scalars(
                select(PartnerNotice).where(PartnerNotice.notified_at.is_(None)).order_by(PartnerNotice.id)
            )
        ]
    if not pending:
        return []
    manifests = {m.version: m for m in manifest.manifests(ctx)} if ctx.objects is not None else {}
    sent = []
    for notice_id in pending:
        results = None
        with ctx.transaction() as session:
            q = select(PartnerNotice).where(PartnerNotice.id == notice_id)
            if session.get_bind().dialect.name == "postgresql":
                q = q.with_for_update(skip_locked=True)
            notice = session.scalars(q).first()
            if notice is None or notice.notified_at is not None:
                continue
            info = manifests.get(notice.root_version)
            root = lifecycle.get_key(session, "root")
            v = lifecycle.get_version(root, notice.root_version)
            where = info.url if info else "(manifest publication pending)"
            message = Notification(
                subject=f"Root key rotated: {manifest.kid(v.version)} now signs regulatory proof tokens",
                body=(
                    f"Dear {notice.partner},\n\nour root signing key was rotated at {notice.rotated_at.isoformat()}.\n"
                    f"New key id: {manifest.kid(v.version)}\nFingerprint: {v.fingerprint}\n"
                    f"Public-key manifest (signed by the previous root): {where}\n\n"
                    f"Please update your trust store and acknowledge (ticket ref {manifest.kid(v.version)})."
                ),
                recipients=[notice.email],
                severity="notice",
                kind="root_rotation_partner_notice",
                ref=f"{notice.partner}:{manifest.kid(v.version)}",
            )
            results = ctx.notifier.send(message)
            notice.attempts = (notice.attempts or 0) + 1
            bad = failures(results)
            if bad or not results:
                notice.last_error = "; ".join(f"{r.channel}: {r.error}" for r in bad) or "no channel delivered"
            else:
                notice.notified_at, notice.notification_id, notice.last_error = ctx.now(), message.id, None
                sent.append(f"{notice.partner}@v{notice.root_version}")
        # per channel (after the notice's transaction: SQLite has one writer), so R1 can tell
        # a partner reached by email from one whose notice only reached the local outbox
        if results is not None:
            notifications.record_deliveries(
                ctx, message.id, message.kind, message.ref, message.subject, ("partners",), results
            )
    return sent


@dataclass
class Ack:
    partner: str
    version: int
    acked_at: datetime
    acked_by: str | None  # the column is nullable; every ack written here names its actor
    new: bool


def ack(ctx: KmsContext, partner: str, version: int, *, actor: str | None = None) -> Ack:
    """Record that ``partner`` acknowledged root ``version`` (idempotent)."""
    names = [p.name for p in ctx.policy.partners]
    if partner not in names:
        raise RotationError(f"unknown partner {partner!r} (policy partners: {', '.join(names)})")
    with ctx.transaction() as session:
        q = select(PartnerNotice).where(PartnerNotice.partner == partner, PartnerNotice.root_version == version)
        notice = session.scalars(q.with_for_update()).first()
        if notice is None:
            raise RotationError(
                f"no partner notice for root v{version} (root versions rotated in: "
                f"{sorted(set(session.scalars(select(PartnerNotice.root_version)))) or 'none'})"
            )
        if notice.acked_at is not None:
            return Ack(partner, version, utc(notice.acked_at), notice.acked_by, False)
        acked_at, acked_by = ctx.now(), actor or ctx.actor
        notice.acked_at, notice.acked_by = acked_at, acked_by
        return Ack(partner, version, acked_at, acked_by, True)


@dataclass
class NoticeRow:
    partner: str
    version: int
    rotated_at: datetime
    deadline: datetime
    notified_at: datetime | None
    acked_at: datetime | None
    acked_by: str | None
    attempts: int
    last_error: str | None
    status: str

    def to_dict(self) -> dict:
        return asdict(self)


def partner_status(ctx: KmsContext, version: int | None = None) -> list[NoticeRow]:
    now = ctx.now()
    out = []
    with ctx.transaction() as session:
        q = select(PartnerNotice).order_by(PartnerNotice.root_version, PartnerNotice.partner)
        if version is not None:
            q = q.where(PartnerNotice.root_version == version)
        for n in session.scalars(q):
            deadline = utc(n.deadline)
            notified = utc(n.notified_at) if n.notified_at else None
            if notified is None:
                status = "OVERDUE" if now >= deadline else "pending"
            else:
                status = ("acked" if n.acked_at else "notified") + (" (late)" if notified > deadline else "")
            out.append(
                NoticeRow(
                    n.partner,
                    n.root_version,
                    utc(n.rotated_at),
                    deadline,
                    notified,
                    utc(n.acked_at) if n.acked_at else None,
                    n.acked_by,
                    n.attempts or 0,
                    n.last_error,
                    status,
                )
            )
    return out


@dataclass
class PartnerCheck:
    ok: bool
    overdue: list[NoticeRow]
    late: list[NoticeRow]
    unacked: list[NoticeRow]
    rows: list[NoticeRow]


def check_partners(ctx: KmsContext) -> PartnerCheck:
    """Fails while any partner is still unnotified past the notice deadline (24 h)."""
    rows = partner_status(ctx)
    overdue = [r for r in rows if r.status == "OVERDUE"]
    late = [r for r in rows if r.notified_at and r.notified_at > r.deadline]
    unacked = [r for r in rows if r.acked_at is None]
    return PartnerCheck(not overdue, overdue, late, unacked, rows)


def overdue_partner_acks(ctx: KmsContext) -> list[dict]:
    """Partner notices past their deadline without an acknowledgement (for the events
    area's overdue-notification step): undelivered ones first, then unacknowledged."""
    out = []
    for r in partner_status(ctx):
        if r.acked_at is None and ctx.now() >= r.deadline:
            what = "not notified" if r.notified_at is None else "not acknowledged"
            out.append(
                {
                    "ref": f"partner-notice:{r.partner}:root.v{r.version}",
                    "description": f"{r.partner} {what} root v{r.version} rotation (R1)",
                    "due_at": r.deadline,
                    "notified": r.notified_at is not None,
                }
            )
    return sorted(out, key=lambda d: (d["notified"], d["due_at"]))


# ---- nightly steps ------------------------------------------------------------------


def _step(key_class: str):
    def run(ctx: KmsContext) -> dict:
        results = reconcile(ctx, key_class, actor="kms-nightly")
        return {"rotated": [f"{r.key} v{r.old_version}->v{r.new_version}" for r in results if r.rotated]}

    return run


for _order, _cls in enumerate(RECONCILED_CLASSES, start=10):
    nightly_steps.nightly_step(f"rotate_{_cls}", order=_order)(_step(_cls))


@nightly_steps.nightly_step("notify_partners", order=18)
def _notify_step(ctx: KmsContext) -> dict:
    sent = notify_partners(ctx)
    check = check_partners(ctx)
    return {"notified": sent, "overdue": [f"{r.partner}@v{r.version}" for r in check.overdue]}
