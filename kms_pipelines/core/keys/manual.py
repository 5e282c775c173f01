"""A manual rotation under dual control (A4): the requester proves themself, the approvals are consumed in the rotation's own transaction, the compliance lists are told."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..access import notifications
from ..access.principals import (
    AccessDenied,
    check_approvals,
    consume_approvals,
    prove_principal,
    request_approval,
    require_permission,
)
from ..foundation import limits
from ..foundation.context import KmsContext
from ..ledger import audit
from . import lifecycle, rotation

# ---- manual operations --------------------------------------------------------------


@dataclass
class ManualOutcome:
    operation: str
    target: str
    ticket: str
    requester: str
    approvers: list[str]
    result: lifecycle.RotationResult
    notification_failures: list[str] = field(default_factory=list)


def manual_rotate(
    ctx: KmsContext, key: str, *, ticket: str, requested_by: str, totp: str | None, reason: str = "manual"
) -> ManualOutcome:
    """Rotate ``key`` as a manual operation: the requester proves themself with TOTP, and the
    rotation runs only with complete approvals, consumed in the rotation's own transaction;
    the ledger entries record requester, approvers, ticket."""
    lifecycle.validate_key_name(ctx, key)
    limits.ticket(ticket)
    with ctx.transaction() as s:
        lifecycle.get_key(s, key)
    prove_principal(ctx, requested_by, totp)
    require_permission(ctx, requested_by, "rotate", target=key)
    request_approval(ctx, operation="rotate", target=key, ticket=ticket, requester=requested_by)
    denied: AccessDenied | None = None
    with ctx.transaction() as s:
        try:
            approvers = sorted(
                a.approver
                for a in check_approvals(s, ctx, operation="rotate", target=key, ticket=ticket, requester=requested_by)
            )
        except AccessDenied as exc:
            denied = exc
    if denied is not None:  # audited outside the (read) transaction above
        audit.emit(
            ctx,
            at=ctx.now(),
            operation="rotate",
            actor=requested_by,
            target_ref=key,
            outcome="denied",
            detail={"reason": denied.reason, "ticket": ticket, "manual": True, "problem": str(denied)},
        )
        raise denied

    actor_ctx = ctx.as_actor(requested_by)
    # The same in-transaction work as a nightly rotation of this class (root: seeds re-wrapped
    # under the new root, partner notices created), so a manual rotation is never half done.
    # It is the KMS's own follow-up work, done under the context's service actor exactly as
    # the nightly run does it, not under the requester's role.
    class_work = rotation._after_rotate(ctx)

    def consume(session, _key, _new, _old):
        got = consume_approvals(session, ctx, operation="rotate", target=key, ticket=ticket, requester=requested_by)
        if got != approvers:
            raise AccessDenied(
                f"approvals for {key} under {ticket!r} changed while rotating; run it again",
                reason="approval",
                principal=requested_by,
            )
        class_work(session, _key, _new, _old)

    result = lifecycle.rotate(
        actor_ctx, key, actor=requested_by, reason=reason, approvers=approvers, ticket=ticket, after_rotate=consume
    )
    if result.rotated:  # after commit, as nightly: manifests published, partners notified, credentials
        rotation.follow_up(ctx, key)
    outcome = ManualOutcome("rotate", key, ticket, requested_by, approvers, result)
    outcome.notification_failures = _notify_manual(ctx, outcome)
    return outcome


def _notify_manual(ctx: KmsContext, o: ManualOutcome) -> list[str]:
    """A4: tell the compliance lists. A failed delivery is reported, never raised, and every
    delivery -- failed ones included -- is recorded in ``notification_deliveries``."""
    r = o.result
    detail = f"Versions: v{r.old_version} -> v{r.new_version}" if r.new_version else ""
    outcome = notifications.notify_manual_operation(
        ctx,
        operation=o.operation,
        target=o.target,
        ticket=o.ticket,
        requester=o.requester,
        approvers=o.approvers,
        detail=detail,
    )
    return [f"{f.channel}: {f.error}" for f in outcome.results if not f.ok]
