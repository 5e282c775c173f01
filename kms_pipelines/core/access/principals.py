"""Principals, roles, dual-control approvals with TOTP, and short-lived workload identities
(policy clauses A1, A2, A4).

* **Approvals take both factors** (A2): ``approve`` needs the approver's FIDO2 assertion over
  exactly (operation, target, ticket) (``webauthn.verify_approval``) and their TOTP code.
* **Identity is proven, never asserted** (A2): ``prove_principal(ctx, name, code)`` is the
  one check that human ``name`` is acting — ``code`` must be their current TOTP code, for a
  time-step newer than any they used (a replayed code is refused). Every human action calls
  it: approvals, the requester of a manual operation, anomaly review, principal changes.
* **Principals** (A1): humans hold roles from the policy (``sre_oncall``,
  ``security_engineering``, ``compliance_officer``); the permission matrix
  ``access.permissions`` maps each operation to the roles that may perform it. Workload
  principals (``workload:<name>``) are declared in ``access.workload_principals`` with the
  operations each may perform. A refusal names the missing permission and is audited.
  The first principals come from the first-run ceremony (``init_principals``); afterwards
  enrolment, role change and removal are manual operations under dual control, and a new
  (or re-roled) principal approves nothing for ``cooling_off_hours``.
* **TOTP**: each human is enrolled with a TOTP secret (pyotp), stored *sealed* by the
  keystore (``SEAL_REF``, AES-GCM, bound to the principal's name) — never in clear in the
  database. A code is accepted within ``totp_window_steps`` steps of now.
* **Dual control** (A4): a manual operation runs only with ``approvals_required`` approvals
  from distinct principals holding ``approve`` and past their cooling-off, none of them the
  requester, each bound to exactly (operation, target, ticket) with an existing target,
  unexpired (``approval_ttl_minutes``) and single-use. ``consume_approvals`` marks them used
  in the caller's transaction.
* **Workload tokens** (A2): ``issue_workload_token`` signs canonical JSON claims
  (sub, iat, exp, jti) with an Ed25519 key held in the keystore (``SIGNING_REF``); TTL is
  capped by ``workload_token_ttl_minutes``; verification accepts only the canonical
  encoding. The audited keystore checks the token before each operation and a
  ``WorkloadIdentity`` re-issues it before expiry.

Every time comes from ``ctx.clock``; entry points that change state run on the wall clock.
"""

from __future__ import annotations

import hmac
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta

import pyotp
from sqlalchemy import select
from sqlalchemy.orm import Session

from ..foundation import limits
from ..foundation.clock import utc
from ..foundation.context import KmsContext
from ..foundation.db.models import Key, KeyVersion
from ..foundation.db.models_access import Approval, ApprovalRequest, Principal
from ..foundation.db.models_events import EscrowPackage
from ..foundation.keystore import AES_256, KeyExists
from ..ledger import audit
from . import webauthn
from .refusals import AccessDenied

SEAL_REF = "kms-access.totp-seal"
SIGNING_REF = "kms-access.workload-signing"
TOKEN_PREFIX = "kmswt1"
_TOKEN_CONTEXT = b"kms-workload-token/1\n"
CLOCK_SKEW_SECONDS = 60
ISSUER = "kms-pipelines"

# audit/keystore operation -> the permission (policy key) it needs
_PERMISSION_FOR = {
    "generate": "rotate",
    "rewrap": "rotate",
    "rotate": "rotate",
    "encrypt": "encrypt",
    "wrap": "encrypt",
    "decrypt": "decrypt",
    "sign": "sign",
    "export": "export",
    "import": "break-glass",
    "break-glass": "break-glass",
    "destroy": "destroy",
    "revoke": "revoke",
    "approve": "approve",
    "read": "read",
    "archive-retrieve": "archive-retrieve",
}


def permission_for(operation: str) -> str | None:
    return _PERMISSION_FOR.get(operation)


def _seal(ctx: KmsContext, name: str, secret: str) -> bytes:
    ks = ctx.keystore
    if not ks.exists(SEAL_REF):
        try:
            ks.generate(SEAL_REF, AES_256)
        except KeyExists:
            pass  # created concurrently
    return ks.encrypt(SEAL_REF, secret.encode(), aad=f"kms-totp|{name}".encode())


def _unseal(ctx: KmsContext, p: Principal) -> str:
    return ctx.keystore.decrypt(SEAL_REF, p.totp_sealed, aad=f"kms-totp|{p.name}".encode()).decode()


# Identity operations: who may act (principals) and who holds a break-glass share (escrow
# custodians). Each is dual-controlled; approving one needs 'approve' and 'principals'.
CUSTODIAN_OPERATION = "custodian-add"
PRINCIPAL_OPERATIONS = ("principal-add", "principal-roles", "principal-remove", CUSTODIAN_OPERATION)


def _require_active(ctx: KmsContext, name: str) -> None:
    limits.principal_name(name)
    with ctx.transaction() as s:
        p = _principal(s, name)
        if p is None or p.kind != "human" or p.disabled_at is not None:
            raise AccessDenied(f"no active human principal {name!r}", reason="invalid")


def _principal(session: Session, name: str, *, lock: bool = False) -> Principal | None:
    q = select(Principal).where(Principal.name == name)
    if lock:
        q = q.with_for_update()
    return session.scalars(q).first()


def role_permissions(ctx: KmsContext, roles: Sequence[str]) -> frozenset[str]:
    return frozenset(op for op, allowed in ctx.policy.access.permissions.items() if set(roles) & set(allowed))


def known_permissions(session: Session | None, ctx: KmsContext, name: str) -> frozenset[str] | None:
    """The permissions of ``name``, or None if it is no known principal."""
    wl = ctx.policy.access.workload_principals
    if name in wl:
        return frozenset(wl[name])
    if session is None:
        with ctx.transaction() as s:
            return known_permissions(s, ctx, name)
    p = _principal(session, name)
    if p is None or p.kind != "human":
        return None
    if p.disabled_at is not None:
        return frozenset()
    return role_permissions(ctx, p.roles)


def _missing_permission(ctx: KmsContext, principal: str, operation: str, granted: frozenset | None) -> str:
    if granted is None:
        return (
            f"unknown principal {principal!r}: it lacks permission '{operation}' (enrol it with `kms principals add`)"
        )
    if principal in ctx.policy.access.workload_principals:
        return (
            f"workload principal {principal!r} lacks permission '{operation}' "
            f"(access.workload_principals allows {sorted(granted)})"
        )
    roles = ctx.policy.access.permissions.get(operation, [])
    return f"{principal!r} lacks permission '{operation}' (granted to roles: {', '.join(roles) or 'none'})"


def require_permission(
    ctx: KmsContext, principal: str, operation: str, *, target: str | None = None, session: Session | None = None
) -> None:
    """Refuse (AccessDenied naming the missing permission, audited) unless ``principal``
    holds ``operation``. Pass the caller's ``session`` when inside a transaction."""
    if operation not in ctx.policy.access.permissions:
        raise AccessDenied(
            f"unknown operation {operation!r}; the policy knows {sorted(ctx.policy.access.permissions)}",
            reason="invalid",
        )
    granted = known_permissions(session, ctx, principal)
    if granted is not None and operation in granted:
        return
    message = _missing_permission(ctx, principal, operation, granted)
    audit.emit(
        ctx,
        at=ctx.now(),
        operation=operation,
        actor=principal,
        target_ref=target,
        outcome="denied",
        detail={"reason": "permission", "missing": operation},
    )
    raise AccessDenied(message, reason="permission", principal=principal)


def is_service_actor(ctx: KmsContext, name: str) -> bool:
    """``name`` is one of the KMS's own processes (``access.service_actors``, ``prefix:*``
    families included): a label for automation, never a person."""
    declared = ctx.policy.access.service_actors
    return name in declared or any(
        a.endswith("*") and name.startswith(a[:-1]) and len(name) > len(a) - 1 for a in declared
    )


def list_principals(ctx: KmsContext) -> list[dict]:
    with ctx.transaction() as s:
        rows = [
            {
                "name": p.name,
                "kind": p.kind,
                "roles": list(p.roles),
                "permissions": sorted(role_permissions(ctx, p.roles))
                if p.kind == "human"
                else sorted(ctx.policy.access.workload_principals.get(p.name, [])),
                "totp_enrolled": p.totp_sealed is not None,
                "disabled": p.disabled_at is not None,
                "approve_after": utc(p.approve_after) if p.approve_after else None,
            }
            for p in s.scalars(select(Principal).order_by(Principal.name))
        ]
    enrolled = {r["name"] for r in rows}
    for name, ops in sorted(ctx.policy.access.workload_principals.items()):
        if name not in enrolled:
            rows.append(
                {
                    "name": name,
                    "kind": "workload",
                    "roles": [],
                    "permissions": sorted(ops),
                    "totp_enrolled": False,
                    "disabled": False,
                    "approve_after": None,
                }
            )
    return rows


# ---- TOTP ---------------------------------------------------------------------------


def _verify_totp(ctx: KmsContext, p: Principal, code: str) -> int:
    """The time-step ``code`` matches (and record it), or AccessDenied. Runs under the
    principal's row lock so two uses of one code cannot both pass."""
    pol = ctx.policy.access
    if p.totp_sealed is None:
        raise AccessDenied(f"{p.name!r} has no TOTP enrolment", reason="totp", principal=p.name)
    if p.totp_locked_until is not None and utc(p.totp_locked_until) > ctx.now():
        raise AccessDenied(
            f"TOTP for {p.name!r} is locked until {utc(p.totp_locked_until).isoformat()} after "
            f"{pol.totp_max_failures} wrong codes in a row",
            reason="totp_locked",
            principal=p.name,
        )
    code = (code or "").strip()
    if not code.isdigit():
        raise AccessDenied(f"TOTP code for {p.name!r} must be digits", reason="totp", principal=p.name)
    totp = pyotp.TOTP(_unseal(ctx, p), interval=pol.totp_interval_seconds)
    now_step = int(ctx.now().timestamp()) // pol.totp_interval_seconds
    matched = None
    for step in range(now_step + pol.totp_window_steps, now_step - pol.totp_window_steps - 1, -1):
        if hmac.compare_digest(totp.generate_otp(step), code):
            matched = step
            break
    if matched is None:
        raise AccessDenied(
            f"TOTP code for {p.name!r} is wrong or stale (accepted within "
            f"±{pol.totp_window_steps} step(s) of {pol.totp_interval_seconds}s)",
            reason="totp",
            principal=p.name,
        )
    if p.totp_last_step is not None and matched <= p.totp_last_step:
        raise AccessDenied(
            f"TOTP code for {p.name!r} was already used (replayed code refused)", reason="totp_replay", principal=p.name
        )
    p.totp_last_step = matched
    p.totp_failures = 0
    return matched


def _count_totp_failure(ctx: KmsContext, name: str, exc: AccessDenied) -> None:
    """After a wrong or stale code (its own transaction: the refused one rolled back), count
    it; ``totp_max_failures`` in a row lock the principal's TOTP for ``totp_lockout_minutes``."""
    if exc.reason != "totp" or not isinstance(name, str):
        return
    pol = ctx.policy.access
    with ctx.transaction() as s:
        p = _principal(s, name, lock=True)
        if p is None or p.kind != "human" or p.totp_sealed is None:
            return
        p.totp_failures = (p.totp_failures or 0) + 1
        if p.totp_failures >= pol.totp_max_failures:
            p.totp_failures, p.totp_locked_until = 0, ctx.now() + timedelta(minutes=pol.totp_lockout_minutes)
            audit.record(
                s,
                at=ctx.now(),
                operation="totp.lockout",
                actor=name,
                target=name,
                outcome="denied",
                detail={"until": utc(p.totp_locked_until).isoformat()},
            )


def prove_principal(ctx: KmsContext, name: str, code: str | None, *, session: Session | None = None) -> str:
    """Prove that human principal ``name`` is the one acting: ``code`` must be their current
    TOTP code, for a time-step newer than any they used before (the replay rule). Returns
    ``name``; otherwise AccessDenied (audited as ``authenticate``/denied). Every human action
    calls this; a claimed name (``--as``, ``--requested-by``, ``KMS_ACTOR``) is never trusted alone.

    Wrong codes count towards the lockout (``totp_max_failures``) only without ``session``:
    with it, the check (and the used time-step) commits or rolls back with the caller's change."""
    if session is None:
        try:
            with ctx.transaction() as s:
                return prove_principal(ctx, name, code, session=s)
        except AccessDenied as exc:
            audit.emit(
                ctx,
                at=ctx.now(),
                operation="authenticate",
                actor=str(name)[:200],
                target_ref=None,
                outcome="denied",
                detail={"reason": exc.reason, "problem": str(exc)},
            )
            _count_totp_failure(ctx, name, exc)
            raise
    try:
        limits.principal_name(name)
    except limits.InputError as exc:
        raise AccessDenied(str(exc), reason="invalid", principal=None) from None
    p = _principal(session, name, lock=True)
    if p is None or p.kind != "human":
        raise AccessDenied(
            f"unknown principal {name!r}: only enrolled humans can prove themselves with TOTP",
            reason="totp",
            principal=name,
        )
    if p.disabled_at is not None:
        raise AccessDenied(f"principal {name!r} was removed", reason="totp", principal=name)
    _verify_totp(ctx, p, code or "")
    return name


# ---- approvals ----------------------------------------------------------------------


@dataclass
class ApprovalInfo:
    id: int
    operation: str
    target: str
    ticket: str
    approver: str
    expires_at: datetime
    have: int
    required: int


def _check_binding(ctx: KmsContext, operation: str, ticket: str) -> None:
    ops = list(ctx.policy.access.manual_operations) + list(PRINCIPAL_OPERATIONS)
    if operation not in ops:
        raise AccessDenied(f"operation {operation!r} takes no approvals; manual operations are {ops}", reason="invalid")
    if not ticket or not ticket.strip():
        raise AccessDenied("a change ticket is required", reason="invalid")
    limits.ticket(ticket)


def _open_requests(session: Session, operation: str, ticket: str, target: str | None = None) -> list[ApprovalRequest]:
    q = select(ApprovalRequest).where(
        ApprovalRequest.operation == operation, ApprovalRequest.ticket == ticket, ApprovalRequest.completed_at.is_(None)
    )
    if target is not None:
        q = q.where(ApprovalRequest.target == target)
    return list(session.scalars(q.order_by(ApprovalRequest.id)))


def request_approval(ctx: KmsContext, *, operation: str, target: str, ticket: str, requester: str) -> int:
    """Record (idempotently) that ``requester`` asks to run ``operation`` on ``target`` under
    ``ticket``, so approvers can find it by ticket and operation."""
    _check_binding(ctx, operation, ticket)
    limits.target(target)
    limits.text(requester, "requester", 200)
    now = ctx.now()
    with ctx.transaction() as s:
        for r in _open_requests(s, operation, ticket, target):
            if r.requester == requester:
                return r.id
        row = ApprovalRequest(operation=operation, target=target, ticket=ticket, requester=requester, requested_at=now)
        s.add(row)
        s.flush()
        audit.record(
            s,
            at=now,
            operation="approval.request",
            actor=requester,
            target=target,
            outcome="ok",
            detail={"ticket": ticket, "for": operation},
        )
        return row.id


def _resolve_target(
    session: Session, operation: str, ticket: str, target: str | None, approver: str
) -> tuple[str, list[ApprovalRequest]]:
    requests = _open_requests(session, operation, ticket, target)
    if target is None:
        targets = sorted({r.target for r in requests})
        if len(targets) != 1:
            raise AccessDenied(
                f"no open request for {operation} under ticket {ticket!r}; name the target with --target"
                if not targets
                else f"ticket {ticket!r} has requests for {targets}; name one with --target",
                reason="invalid",
                principal=approver,
            )
        target = targets[0]
    return target, requests


def approval_target(ctx: KmsContext, operation: str, ticket: str, target: str | None, approver: str) -> str:
    """The target an approval of (operation, ticket) binds to: ``target``, or the one open request's."""
    _check_binding(ctx, operation, ticket)
    if target is not None:
        limits.target(target)
    with ctx.transaction() as s:
        return _resolve_target(s, operation, ticket, target, approver)[0]


def approve(
    ctx: KmsContext,
    approver: str | None = None,
    *,
    ticket: str,
    operation: str,
    totp: str | None = None,
    target: str | None = None,
    assertion: dict | None = None,
) -> ApprovalInfo:
    """Record ``approver``'s approval of (operation, target, ticket), proven by both factors.

    Without ``target`` the approval binds to the one open request for (operation, ticket).
    The approver proves themself with a FIDO2 assertion *and* a TOTP code (replay rule):
    ``assertion`` is ``{"handle", "credential"}``, the answer to
    ``console_auth.begin_approval`` -- the registered key's signature (user verification,
    grown sign count) over a challenge bound to exactly (operation, target, ticket). The
    approver holds ``approve`` (and ``principals`` for a principal operation), is past their
    cooling-off, and the target exists (a key, key#vN, escrow package, or an open request).
    There is no other way to approve: the console and ``kms approve`` both call this.
    """
    if not approver:
        raise AccessDenied("an approval names its approver (--as)", reason="invalid")
    limits.principal_name(approver, "approver")
    limits.ticket(ticket)
    if target is not None:
        limits.target(target)
    now = ctx.now()
    pol = ctx.policy.access
    try:
        _check_binding(ctx, operation, ticket)
        assertion = assertion if isinstance(assertion, dict) else {}
        ceremony = webauthn.take_approval_ceremony(ctx, approver, str(assertion.get("handle") or ""))
        with ctx.transaction() as s:
            p = _principal(s, approver, lock=True)
            if p is None or p.kind != "human":
                raise AccessDenied(
                    f"unknown principal {approver!r}: approvals come from enrolled humans",
                    reason="permission",
                    principal=approver,
                )
            # never None for an enrolled human (checked above); the guard keeps it so
            granted = known_permissions(s, ctx, approver) or frozenset()
            for needed in _approver_permissions(operation):
                if needed not in granted:
                    raise AccessDenied(
                        _missing_permission(ctx, approver, needed, granted), reason="permission", principal=approver
                    )
            if p.approve_after is None or utc(p.approve_after) > now:
                raise AccessDenied(_cooling_off_message(ctx, p), reason="cooling_off", principal=approver)
            target, requests = _resolve_target(s, operation, ticket, target, approver)
            if operation in PRINCIPAL_OPERATIONS and target.split("=", 1)[0] == approver:
                raise AccessDenied(
                    f"{approver!r} may not approve a change to their own principal",
                    reason="self_approval",
                    principal=approver,
                )
            if target is not None and not requests and not _target_exists(s, operation, target):
                raise AccessDenied(
                    f"no {operation} target {target!r}: approvals name an existing key (or key#vN), "
                    f"escrow package, or an open request",
                    reason="invalid",
                    principal=approver,
                )
            if any(r.requester == approver for r in requests if r.target == target):
                raise AccessDenied(
                    f"{approver!r} requested {operation} of {target} and may not approve it (self-approval refused)",
                    reason="self_approval",
                    principal=approver,
                )
            mine = s.scalars(
                select(Approval).where(
                    Approval.operation == operation,
                    Approval.target == target,
                    Approval.ticket == ticket,
                    Approval.approver == approver,
                    Approval.used_at.is_(None),
                    Approval.expires_at > now,
                )
            ).first()
            if mine is not None:
                raise AccessDenied(
                    f"{approver!r} has already approved {operation} of {target} under {ticket!r} "
                    f"(one approver counts once)",
                    reason="duplicate",
                    principal=approver,
                )
            cred = webauthn.verify_approval(
                s,
                ctx,
                ceremony,
                approver,
                operation=operation,
                target=target,
                ticket=ticket,
                response=assertion.get("credential"),
            )
            step = _verify_totp(ctx, p, totp or "")
            row = Approval(
                operation=operation,
                target=target,
                ticket=ticket,
                approver=approver,
                approved_at=now,
                expires_at=now + timedelta(minutes=pol.approval_ttl_minutes),
                totp_step=step,
            )
            s.add(row)
            s.flush()
            have = len(
                set(
                    s.scalars(
                        select(Approval.approver).where(
                            Approval.operation == operation,
                            Approval.target == target,
                            Approval.ticket == ticket,
                            Approval.used_at.is_(None),
                            Approval.expires_at > now,
                        )
                    )
                )
            )
            audit.record(
                s,
                at=now,
                operation="approve",
                actor=approver,
                target=target,
                outcome="ok",
                detail={
                    "ticket": ticket,
                    "for": operation,
                    "approval_id": row.id,
                    "factors": ["fido2", "totp"],
                    **webauthn._provenance(cred),
                },
            )
            return ApprovalInfo(
                row.id, operation, target, ticket, approver, utc(row.expires_at), have, pol.approvals_required
            )
    except AccessDenied as exc:
        audit.emit(
            ctx,
            at=now,
            operation="approve",
            actor=approver,
            target_ref=target,
            outcome="denied",
            detail={"reason": exc.reason, "ticket": ticket, "for": operation, "problem": str(exc)},
        )
        _count_totp_failure(ctx, approver, exc)
        raise


def _approver_permissions(operation: str) -> tuple[str, ...]:
    return ("approve", "principals") if operation in PRINCIPAL_OPERATIONS else ("approve",)


def _cooling_off_message(ctx: KmsContext, p: Principal) -> str:
    if p.approve_after is None:
        return f"{p.name!r} may not approve (no cooling-off end recorded)"
    return (
        f"{p.name!r} is in the cooling-off period until {utc(p.approve_after).isoformat()} "
        f"(access.cooling_off_hours: {ctx.policy.access.cooling_off_hours:g} h) and may not approve yet"
    )


def _target_exists(session: Session, operation: str, target: str) -> bool:
    if operation in PRINCIPAL_OPERATIONS:
        return False  # only an open request names a principal change
    name, _, version = target.partition("#v")
    q = select(Key.id).where(Key.name == name)
    if version:
        if not version.isdigit():
            return False
        q = q.join(KeyVersion, KeyVersion.key_id == Key.id).where(KeyVersion.version == int(version))
    if session.scalars(q).first() is not None:
        return True
    if operation == "break-glass":
        return session.get(EscrowPackage, target) is not None
    return False


def _usable_approvals(
    session: Session, ctx: KmsContext, *, operation: str, target: str, ticket: str, requester: str, lock: bool
) -> tuple[list[Approval], list[str], int]:
    now = ctx.now()
    q = (
        select(Approval)
        .where(Approval.operation == operation, Approval.target == target, Approval.ticket == ticket)
        .order_by(Approval.approved_at, Approval.id)
    )
    if lock:
        q = q.with_for_update()
    valid: list[Approval] = []
    ignored: list[str] = []
    used = 0
    for a in session.scalars(q):
        if a.used_at is not None:
            used += 1
            continue
        if utc(a.expires_at) <= now:
            ignored.append(f"{a.approver} (expired)")
        elif a.approver == requester:
            ignored.append(f"{a.approver} (the requester)")
        elif any(v.approver == a.approver for v in valid):
            ignored.append(f"{a.approver} (counted once)")
        elif missing := [
            n
            for n in _approver_permissions(operation)
            if n not in (known_permissions(session, ctx, a.approver) or frozenset())
        ]:
            ignored.append(f"{a.approver} (lacks permission '{missing[0]}')")
        elif not _past_cooling_off(session, a):
            ignored.append(f"{a.approver} (approved during their cooling-off)")
        else:
            valid.append(a)
    return valid, ignored, used


def _past_cooling_off(session: Session, a: Approval) -> bool:
    p = _principal(session, a.approver)
    return p is not None and p.approve_after is not None and utc(p.approve_after) <= utc(a.approved_at)


def check_approvals(
    session: Session, ctx: KmsContext, *, operation: str, target: str, ticket: str, requester: str, lock: bool = False
) -> list[Approval]:
    """The approvals that would be consumed, or AccessDenied naming what is missing."""
    _check_binding(ctx, operation, ticket)
    need = ctx.policy.access.approvals_required
    valid, ignored, used = _usable_approvals(
        session, ctx, operation=operation, target=target, ticket=ticket, requester=requester, lock=lock
    )
    if len(valid) < need:
        parts = [
            f"{operation} of {target} under ticket {ticket!r} needs {need} approvals from distinct principals "
            f"holding 'approve', none of them the requester {requester!r}; "
            f"has {len(valid)}" + (f" ({', '.join(a.approver for a in valid)})" if valid else "")
        ]
        if ignored:
            parts.append("not counted: " + ", ".join(ignored))
        if used:
            parts.append(f"{used} approval(s) for this ticket were already used (approvals are single-use)")
        parts.append(
            f"missing {need - len(valid)}: `kms approve --ticket {ticket} --operation {operation} "
            f"--target {target} --as PRINCIPAL --totp CODE` (with the approver's security key)"
        )
        raise AccessDenied("; ".join(parts), reason="approval", principal=requester)
    return valid[:need]


def consume_approvals(
    session: Session, ctx: KmsContext, *, operation: str, target: str, ticket: str, requester: str
) -> list[str]:
    """Check and mark used (in the caller's transaction) the approvals for exactly
    (operation, target, ticket); return the approvers' names. Refusals are audited."""
    now = ctx.now()
    try:
        chosen = check_approvals(
            session, ctx, operation=operation, target=target, ticket=ticket, requester=requester, lock=True
        )
    except AccessDenied as exc:
        audit.emit(
            ctx,
            at=now,
            operation=operation,
            actor=requester,
            target_ref=target,
            outcome="denied",
            detail={"reason": exc.reason, "ticket": ticket, "manual": True, "problem": str(exc)},
        )
        raise
    tag = f"{requester}:{operation}:{target}"[:300]
    for a in chosen:
        a.used_at, a.used_by_request = now, tag
    for r in _open_requests(session, operation, ticket, target):
        r.completed_at = now
    approvers = sorted(a.approver for a in chosen)
    session.flush()
    audit.record(
        session,
        at=now,
        operation="approval.consume",
        actor=requester,
        target=target,
        outcome="ok",
        detail={"ticket": ticket, "for": operation, "approvers": approvers},
    )
    return approvers
