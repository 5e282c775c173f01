"""Enrolment (A1, A2): the first-run ceremony, then adding, re-rolling and removing principals as dual-controlled manual operations with a cooling-off period."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta

import pyotp
from sqlalchemy import select
from sqlalchemy.orm import Session

from ..foundation import limits
from ..foundation.context import KmsContext
from ..foundation.db.models_access import Principal
from ..ledger import audit
from . import webauthn
from .principals import (
    ISSUER,
    _principal,
    _require_active,
    _seal,
    consume_approvals,
    prove_principal,
    request_approval,
    require_permission,
    role_permissions,
)
from .refusals import AccessDenied

# ---- principals ---------------------------------------------------------------------


@dataclass
class Enrolment:
    name: str
    kind: str
    roles: list[str]
    provisioning_uri: str | None  # shown once, to the operator enrolling the principal

    def __repr__(self) -> str:  # the URI holds the secret: keep it out of reprs and logs
        return f"Enrolment(name={self.name!r}, kind={self.kind!r}, roles={self.roles!r})"


def _check_roles(ctx: KmsContext, roles: Sequence[str]) -> list[str]:
    pol = ctx.policy.access
    roles = sorted(set(roles))
    bad = [r for r in roles if r not in pol.roles]
    if not roles or bad:
        raise AccessDenied(f"human principals need roles from {pol.roles}; got {roles}", reason="invalid")
    return roles


def _new_human(
    ctx: KmsContext,
    session: Session,
    name: str,
    roles: list[str],
    *,
    actor: str,
    now: datetime,
    approve_after: datetime,
    detail: dict,
) -> str:
    """Insert a human principal with a fresh sealed TOTP secret; the provisioning URI is returned once."""
    limits.principal_name(name)
    if name.startswith("workload:"):
        raise AccessDenied("human principals may not be named workload:*", reason="invalid")
    if _principal(session, name) is not None:
        raise AccessDenied(f"principal {name!r} already exists", reason="invalid")
    secret = pyotp.random_base32()
    session.add(
        Principal(
            name=name,
            kind="human",
            roles=roles,
            totp_sealed=_seal(ctx, name, secret),
            created_at=now,
            approve_after=approve_after,
        )
    )
    session.flush()
    audit.record(
        session,
        at=now,
        operation="principal.add",
        actor=actor,
        target=name,
        outcome="ok",
        detail={"kind": "human", "roles": roles, "approve_after": approve_after.isoformat(), **detail},
    )
    return pyotp.TOTP(secret, interval=ctx.policy.access.totp_interval_seconds).provisioning_uri(
        name=name, issuer_name=ISSUER
    )


def init_principals(
    ctx: KmsContext, admins: Mapping[str, Sequence[str]], *, actor: str = "kms-init", keys: tuple | None = None
) -> list[Enrolment]:
    """The first-run ceremony: enrol the first human principals while none exists.

    ``keys = (origin, make_credential)`` registers a FIDO2 security key for each of them in the
    same transaction (``webauthn.register_ceremony_keys``; ``make_credential(name, options)``
    is the CLI's FIDO2 client), so they can approve: every approval needs the key and TOTP.

    It needs at least ``approvals_required + 1`` principals (a requester and a quorum of
    approvers for the next enrolment) and may run once: afterwards every enrolment, role
    change and removal is a dual-controlled manual operation (``enroll_principal`` …).
    Ceremony principals are the root of trust and are not subject to the cooling-off."""
    need = ctx.policy.access.approvals_required + 1
    _refuse_second_ceremony(ctx)
    if len(admins) < need:
        raise AccessDenied(
            f"the first-run ceremony enrols at least {need} principals (a requester and "
            f"{need - 1} approvers for every later enrolment); got {len(admins)}",
            reason="invalid",
        )
    checked = {limits.principal_name(n): _check_roles(ctx, r) for n, r in admins.items()}
    admins_of_principals = [n for n, r in checked.items() if "principals" in role_permissions(ctx, r)]
    if len(admins_of_principals) < need:
        raise AccessDenied(
            f"the first-run ceremony needs at least {need} principals holding 'principals' (roles "
            f"{', '.join(ctx.policy.access.permissions.get('principals', []))}): a requester and "
            f"{need - 1} approvers for every later enrolment; got {admins_of_principals}",
            reason="invalid",
        )
    now = ctx.now()
    out = []
    with ctx.transaction() as s:
        _refuse_second_ceremony(ctx, s)
        for name, roles in checked.items():
            uri = _new_human(ctx, s, name, roles, actor=actor, now=now, approve_after=now, detail={"ceremony": True})
            out.append(Enrolment(name, "human", roles, uri))
        if keys is not None:
            origin, make_credential = keys
            webauthn.register_ceremony_keys(
                s, ctx, webauthn.RelyingParty(origin), list(checked), make_credential, actor=actor
            )
    return out


def first_run(ctx: KmsContext, session: Session | None = None) -> bool:
    """True until the first-run ceremony has enrolled a human principal (removed ones count:
    their rows stay), i.e. while nobody could yet prove themselves."""
    if session is None:
        with ctx.transaction() as s:
            return first_run(ctx, s)
    return session.scalars(select(Principal.name).where(Principal.kind == "human")).first() is None


def _refuse_second_ceremony(ctx: KmsContext, session: Session | None = None) -> None:
    if session is None:
        with ctx.transaction() as s:
            return _refuse_second_ceremony(ctx, s)
    if session.scalars(select(Principal.name).where(Principal.kind == "human")).first() is not None:
        raise AccessDenied(
            "the first-run ceremony already ran (human principals exist); enrol more with "
            "`kms principals add NAME --role R --ticket T --requested-by YOU --totp CODE` "
            "and two approvals",
            reason="invalid",
        )


def _principal_target(name: str, roles: Sequence[str] | None = None) -> str:
    """The approval target of a principal operation: ``NAME`` or ``NAME=role1,role2``."""
    return name if roles is None else f"{name}={','.join(sorted(set(roles)))}"


def _principal_change(
    ctx: KmsContext,
    operation: str,
    name: str,
    roles: Sequence[str] | None,
    *,
    ticket: str,
    requested_by: str,
    totp: str | None,  # None is refused by prove_principal, with the audit that goes with it
    apply,
    target: str | None = None,
) -> list[str]:
    """Run ``apply(session, now, approvers)`` as the dual-controlled manual ``operation`` on
    principal (or escrow custodian) ``name``: requester proven by TOTP and holding
    ``principals``; approvals consumed in the change's own transaction. The approvals bind to
    ``target`` (default ``NAME`` or ``NAME=ROLES``). Returns the approvers."""
    limits.principal_name(name)
    limits.ticket(ticket)
    prove_principal(ctx, requested_by, totp)
    require_permission(ctx, requested_by, "principals", target=name)
    target = target or _principal_target(name, roles)
    request_approval(ctx, operation=operation, target=target, ticket=ticket, requester=requested_by)
    with ctx.transaction() as s:
        approvers = consume_approvals(s, ctx, operation=operation, target=target, ticket=ticket, requester=requested_by)
        apply(s, ctx.now(), approvers)
    return approvers


def enroll_principal(
    ctx: KmsContext,
    name: str,
    roles: Sequence[str] = (),
    *,
    requested_by: str,
    totp: str,
    ticket: str,
    kind: str = "human",
) -> Enrolment:
    """Add a principal as a manual operation (dual control, A4). Humans get roles, a TOTP
    enrolment whose provisioning URI is returned once, and the policy's cooling-off before
    their approvals count; workloads must be declared in the policy and get no secret."""
    pol = ctx.policy.access
    if kind not in ("human", "workload"):
        raise AccessDenied(f"principal kind must be human or workload, got {kind!r}", reason="invalid")
    if kind == "workload":
        if name not in pol.workload_principals:
            raise AccessDenied(
                f"workload principal {name!r} is not declared in the policy (access.workload_principals)",
                reason="invalid",
            )
        if roles:
            raise AccessDenied("workload principals take their operations from the policy, not roles", reason="invalid")
        limits.ticket(ticket)
        prove_principal(ctx, requested_by, totp)
        require_permission(ctx, requested_by, "principals", target=name)
        now = ctx.now()
        with ctx.transaction() as s:  # grants nothing the policy does not already: no approvals
            if _principal(s, name) is not None:
                raise AccessDenied(f"principal {name!r} already exists", reason="invalid")
            s.add(Principal(name=name, kind="workload", roles=[], created_at=now))
            s.flush()
            audit.record(
                s,
                at=now,
                operation="principal.add",
                actor=requested_by,
                target=name,
                outcome="ok",
                detail={"kind": "workload", "ticket": ticket},
            )
        return Enrolment(name, "workload", [], None)
    limits.principal_name(name)
    roles = _check_roles(ctx, roles)
    with ctx.transaction() as s:
        if _principal(s, name) is not None:
            raise AccessDenied(f"principal {name!r} already exists", reason="invalid")
    uri: list[str] = []

    def apply(s, now, approvers):
        after = now + timedelta(hours=pol.cooling_off_hours)
        uri.append(
            _new_human(
                ctx,
                s,
                name,
                roles,
                actor=requested_by,
                now=now,
                approve_after=after,
                detail={"ticket": ticket, "approvers": approvers},
            )
        )

    _principal_change(
        ctx, "principal-add", name, roles, ticket=ticket, requested_by=requested_by, totp=totp, apply=apply
    )
    return Enrolment(name, "human", roles, uri[0])


def request_enrolment(ctx: KmsContext, name: str, roles: Sequence[str], *, ticket: str, requester: str) -> int:
    """Record (for the approvers) the request to enrol human ``name`` with ``roles``: the manual
    operation principal-add on ``NAME=ROLE,...`` (the console's enrolment form; the requester is
    already proven by their session). ``enroll_principal`` later consumes the approvals."""
    limits.principal_name(name)
    roles = _check_roles(ctx, roles)
    require_permission(ctx, requester, "principals", target=name)
    with ctx.transaction() as s:
        if _principal(s, name) is not None:
            raise AccessDenied(f"principal {name!r} already exists", reason="invalid")
    return request_approval(
        ctx, operation="principal-add", target=_principal_target(name, roles), ticket=ticket, requester=requester
    )


def change_roles(
    ctx: KmsContext, name: str, roles: Sequence[str], *, requested_by: str, totp: str, ticket: str
) -> list[str]:
    """Replace ``name``'s roles (dual control); its approvals count again only after the cooling-off."""
    roles = _check_roles(ctx, roles)

    def apply(s, now, approvers):
        p = _principal(s, name, lock=True)
        if p is None or p.kind != "human" or p.disabled_at is not None:
            raise AccessDenied(f"no active human principal {name!r}", reason="invalid")
        old = list(p.roles)
        p.roles = roles
        p.approve_after = now + timedelta(hours=ctx.policy.access.cooling_off_hours)
        audit.record(
            s,
            at=now,
            operation="principal.roles",
            actor=requested_by,
            target=name,
            outcome="ok",
            detail={"from": old, "to": roles, "ticket": ticket, "approvers": approvers},
        )

    _require_active(ctx, name)
    return _principal_change(
        ctx, "principal-roles", name, roles, ticket=ticket, requested_by=requested_by, totp=totp, apply=apply
    )


def remove_principal(ctx: KmsContext, name: str, *, requested_by: str, totp: str, ticket: str) -> list[str]:
    """Disable ``name`` (dual control). The row stays, so its history keeps naming it."""

    def apply(s, now, approvers):
        p = _principal(s, name, lock=True)
        if p is None or p.kind != "human" or p.disabled_at is not None:
            raise AccessDenied(f"no active human principal {name!r}", reason="invalid")
        p.disabled_at = now
        audit.record(
            s,
            at=now,
            operation="principal.remove",
            actor=requested_by,
            target=name,
            outcome="ok",
            detail={"ticket": ticket, "approvers": approvers},
        )

    _require_active(ctx, name)
    return _principal_change(
        ctx, "principal-remove", name, None, ticket=ticket, requested_by=requested_by, totp=totp, apply=apply
    )
