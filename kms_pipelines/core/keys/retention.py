"""Retention and retirement of root and service key versions (clauses T1, T4).

* A root or service version that left ``active`` (rotated, or revoked) is kept
  ``retention_days`` (365) from that moment, verify-only, then destroyed. The destroy
  guard ``retention`` refuses earlier destruction and names the instant it becomes
  allowed. Retention is counted from the *first* retirement (rotation, else revocation).
* Destruction needs dual approval (``retention.destroy_requires_dual_approval``): the
  nightly step ``retire_expired`` lists every version whose retention has ended as *due*,
  under a deterministic change ticket (``retire-<key>-v<N>``), and destroys it only when
  two distinct permitted principals approved ``destroy`` on that exact target and ticket
  (``access.consume_approvals``, consumed in the destroy's own transaction). Otherwise it
  stays due and is reported "awaiting approvals" — never destroyed silently.
* Other guards still apply to every destroy (``dependents`` confirmed the newer version,
  ``deks``, ``restore_points`` — the hook the backup area fills), and a refused destroy
  names the guard that refused it. A destroyed service version's seed is forgotten, so
  its credentials can never verify again.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from datetime import datetime

from sqlalchemy import select
from sqlalchemy.orm import Session, selectinload

from ..access import notifications
from ..access import principals as access
from ..access.refusals import AccessDenied
from ..foundation import nightly_steps
from ..foundation.context import KmsContext
from ..foundation.db.models import REVOKED, ROTATED, Key, KeyVersion
from . import lifecycle, service_keys, vault
from .retention_window import RETAINED_CLASSES, destroy_allowed_from, retention_days, retired_at

DESTROY_OPERATION = "destroy"
# The nightly run requests destruction as the Dagster workload principal (policy
# access.workload_principals); approvers approve (destroy, key#vN, retire-… ticket).
NIGHTLY_REQUESTER = "workload:dagster"


def ticket_for(key_name: str, version: int) -> str:
    return f"retire-{key_name.replace(':', '-')}-v{version}"


def target_for(key_name: str, version: int) -> str:
    return f"{key_name}#v{version}"


@lifecycle.destroy_guard("retention")
def _retention_guard(session: Session, ctx: KmsContext, key: Key, v: KeyVersion):
    days = retention_days(ctx, key.key_class)
    if days is None:
        return None
    retired, allowed = retired_at(v), destroy_allowed_from(ctx, key, v)
    if retired is None or allowed is None:
        return f"{key.name} v{v.version} was never retired; it must be kept {days} days after retirement (T1)"
    if ctx.now() < allowed:
        return (
            f"{key.name} v{v.version} must be kept {days} days after its retirement on "
            f"{retired.isoformat()} (T1); destroy allowed from {allowed.isoformat()}"
        )
    return None


@dataclass
class DueVersion:
    key: str
    version: int
    state: str
    retired_at: datetime
    allowed_from: datetime
    ticket: str
    target: str

    def to_dict(self) -> dict:
        return asdict(self)


def due_for_destruction(ctx: KmsContext, at: datetime | None = None) -> list[DueVersion]:
    """Retired root/service versions whose retention has ended (not yet destroyed)."""
    now = at or ctx.now()
    out = []
    with ctx.transaction() as session:
        keys = session.scalars(
            select(Key)
            .where(Key.key_class.in_(RETAINED_CLASSES))
            .options(selectinload(Key.versions))
            .order_by(Key.name)
        )
        for key in keys:
            for v in key.versions:
                if v.state not in (ROTATED, REVOKED):
                    continue
                retired, allowed = retired_at(v), destroy_allowed_from(ctx, key, v)
                if retired is not None and allowed is not None and now >= allowed:
                    out.append(
                        DueVersion(
                            key.name,
                            v.version,
                            v.state,
                            retired,
                            allowed,
                            ticket_for(key.name, v.version),
                            target_for(key.name, v.version),
                        )
                    )
    return out


def _consume_approvals(ctx: KmsContext, target: str, ticket: str, requester: str):
    def authorize(session: Session) -> list[str]:
        return list(
            access.consume_approvals(
                session, ctx, operation=DESTROY_OPERATION, target=target, ticket=ticket, requester=requester
            )
        )

    return authorize


def destroy_version(
    ctx: KmsContext,
    key_name: str,
    version: int,
    *,
    ticket: str | None = None,
    requester: str | None = None,
    reason: str = "retention ended (T1)",
    approvers: Iterable[str] | None = None,
) -> list[str]:
    """Destroy a version under dual approval after every guard agrees. Guards are checked
    first (the refusal names the guard and consumes no approval); then the approvals for
    (destroy, ``key#vN``, ticket) are consumed in the same transaction as the transition.
    ``approvers`` given explicitly bypass the access area (only when the policy does not
    require dual approval for destruction). Returns the approvers recorded."""
    requester = requester or ctx.actor
    ticket = ticket or ticket_for(key_name, version)
    recorded: list[str] = []

    def authorize(session: Session) -> list[str]:
        if approvers is not None and not ctx.policy.retention.destroy_requires_dual_approval:
            names = list(approvers)
        else:
            names = _consume_approvals(ctx, target_for(key_name, version), ticket, requester)(session)
        recorded.extend(names)
        if key_name.startswith("service:"):
            service_keys.drop_seed(session, key_name, version)
        return names

    lifecycle.destroy(ctx, key_name, version, actor=requester, reason=reason, ticket=ticket, authorize=authorize)
    if ctx.objects is not None:
        vault.on_destroyed(ctx, key_name, version)  # T1: the archive copy goes too (once its lock ends)
    return recorded


@dataclass
class RetireSummary:
    due: list[DueVersion] = field(default_factory=list)
    destroyed: list[dict] = field(default_factory=list)
    awaiting_approval: list[dict] = field(default_factory=list)
    refused: list[dict] = field(default_factory=list)
    archive: dict = field(default_factory=dict)  # T1 vault: archive copies deleted / still locked

    def to_dict(self) -> dict:
        return {
            "due": [d.to_dict() for d in self.due],
            "destroyed": self.destroyed,
            "awaiting_approval": self.awaiting_approval,
            "refused": self.refused,
            "archive": self.archive,
        }


def retire_expired(ctx: KmsContext, *, actor: str = NIGHTLY_REQUESTER) -> RetireSummary:
    """Destroy every due version that has its dual approval; file an approval request
    for the rest and report them as awaiting approval."""
    summary = RetireSummary(due=due_for_destruction(ctx))
    for d in summary.due:
        item = {"key": d.key, "version": d.version, "ticket": d.ticket, "target": d.target}
        try:
            approvers = destroy_version(ctx, d.key, d.version, ticket=d.ticket, requester=actor)
            summary.destroyed.append({**item, "approvers": approvers})
            _notify_destroyed(ctx, d, actor, approvers)
        except lifecycle.GuardRefused as exc:
            summary.refused.append({**item, "guard": exc.guard, "reason": exc.reason})
        except ImportError:
            summary.awaiting_approval.append({**item, "missing": "access control (issue 3) is not installed"})
        except AccessDenied as exc:
            summary.awaiting_approval.append({**item, "missing": str(exc)})
            _request_approval(ctx, d, actor)
    if ctx.objects is not None:
        summary.archive = vault.delete_expired(ctx)
    return summary


def _request_approval(ctx: KmsContext, d: DueVersion, requester: str) -> None:
    try:
        access.request_approval(ctx, operation=DESTROY_OPERATION, target=d.target, ticket=d.ticket, requester=requester)
    except access.AccessDenied:
        pass  # reported through awaiting_approval already


def _notify_destroyed(ctx: KmsContext, d: DueVersion, requester: str, approvers: list[str]) -> None:
    """A4: a destruction is a manual, dual-approved operation; tell the compliance lists."""
    fn = getattr(notifications, "notify_manual_operation", None)
    if fn is not None:
        fn(
            ctx,
            operation=DESTROY_OPERATION,
            target=d.target,
            ticket=d.ticket,
            requester=requester,
            approvers=approvers,
            detail=f"retention ended {d.allowed_from.isoformat()} (T1)",
        )


@nightly_steps.nightly_step("retire_expired", order=60)
def _retire_step(ctx: KmsContext) -> dict:
    s = retire_expired(ctx)
    return {
        "due": [d.target for d in s.due],
        "destroyed": [d["target"] for d in s.destroyed],
        "awaiting_approval": [d["target"] for d in s.awaiting_approval],
        "refused": [f"{d['target']} ({d['guard']})" for d in s.refused],
        "archive_deleted": s.archive.get("deleted", []),
    }
