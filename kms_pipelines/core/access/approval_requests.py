"""Pending manual operations as approvers see them (A4), and rejecting one.

The approvals themselves, their checks and their consumption stay in ``core.access.principals``; this
module only lists open requests with the approvals they have, and lets a principal holding
``approve`` reject a request: the request is closed and every unused approval of exactly
that (operation, target, ticket) is voided, so it cannot run without a new round.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime

from sqlalchemy import select

from ..foundation.clock import utc
from ..foundation.context import KmsContext
from ..foundation.db.models_access import Approval, ApprovalRequest
from ..ledger import audit
from . import principals as access


@dataclass
class PendingRequest:
    id: int
    operation: str
    target: str
    ticket: str
    requester: str
    requested_at: datetime
    approvers: list[str] = field(default_factory=list)
    required: int = 2

    @property
    def ready(self) -> bool:
        return len(self.approvers) >= self.required


def pending(ctx: KmsContext) -> list[PendingRequest]:
    """Open requests, oldest first, each with its unexpired, unused approvers (requester excluded)."""
    now = ctx.now()
    need = ctx.policy.access.approvals_required
    with ctx.transaction() as s:
        rows = list(
            s.scalars(
                select(ApprovalRequest)
                .where(ApprovalRequest.completed_at.is_(None))
                .order_by(ApprovalRequest.requested_at, ApprovalRequest.id)
            )
        )
        out = []
        for r in rows:
            names = sorted(
                {
                    a.approver
                    for a in s.scalars(
                        select(Approval).where(
                            Approval.operation == r.operation,
                            Approval.target == r.target,
                            Approval.ticket == r.ticket,
                            Approval.used_at.is_(None),
                        )
                    )
                    if utc(a.expires_at) > now and a.approver != r.requester
                }
            )
            out.append(
                PendingRequest(r.id, r.operation, r.target, r.ticket, r.requester, utc(r.requested_at), names, need)
            )
        return out


def get_pending(ctx: KmsContext, request_id: int) -> PendingRequest:
    for r in pending(ctx):
        if r.id == request_id:
            return r
    raise access.AccessDenied(f"no open manual-operation request {request_id}", reason="invalid")


def reject(ctx: KmsContext, request_id: int, *, principal: str, note: str) -> PendingRequest:
    """Close open request ``request_id`` and void its unused approvals (audited)."""
    now = ctx.now()
    note = (note or "").strip()
    try:
        if not note:
            raise access.AccessDenied("a rejection needs a reason", reason="invalid", principal=principal)
        access.require_permission(ctx, principal, "approve", target=f"request:{request_id}")
        with ctx.transaction() as s:
            r = s.get(ApprovalRequest, request_id, with_for_update=True)
            if r is None or r.completed_at is not None:
                raise access.AccessDenied(
                    f"no open manual-operation request {request_id}", reason="invalid", principal=principal
                )
            voided = 0
            for a in s.scalars(
                select(Approval)
                .where(
                    Approval.operation == r.operation,
                    Approval.target == r.target,
                    Approval.ticket == r.ticket,
                    Approval.used_at.is_(None),
                )
                .with_for_update()
            ):
                a.used_at, a.used_by_request = now, f"rejected:{principal}"[:300]
                voided += 1
            r.completed_at = now
            audit.record(
                s,
                at=now,
                operation="approval.reject",
                actor=principal,
                target=r.target,
                outcome="ok",
                detail={
                    "ticket": r.ticket,
                    "for": r.operation,
                    "request": r.id,
                    "requester": r.requester,
                    "voided_approvals": voided,
                    "note": note[:500],
                },
            )
            return PendingRequest(r.id, r.operation, r.target, r.ticket, r.requester, utc(r.requested_at))
    except access.AccessDenied as exc:
        audit.emit(
            ctx,
            at=now,
            operation="approval.reject",
            actor=principal,
            target_ref=f"request:{request_id}",
            outcome="denied",
            detail={"reason": exc.reason, "problem": str(exc)},
        )
        raise
