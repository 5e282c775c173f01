"""Dependent services confirm new key material before the old is revoked (clause T4).

The policy's ``dependents`` block lists, per key, the services that use it. A service
confirms a version with ``confirm(ctx, key_name, version, service)`` (``kms dependents
confirm``). A confirmation of version *w* vouches that the service no longer needs any
version below *w*.

Guards (both named ``dependents``):

* revoke guard: revoking version *v* is refused while a listed dependent has not
  confirmed a live (active or rotated) version newer than *v*. An emergency revocation
  (a compromise: ``event_id`` set, or ``reason`` starting with ``compromise``) is not held
  back: waiting for confirmations would keep compromised material trusted.
* destroy guard: the same condition before destruction (docs/architecture.md, "Keys, versions and states"), with no exemption.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from ..foundation.context import KmsContext
from ..foundation.db.models import ACTIVE, ROTATED, Key, KeyVersion
from ..foundation.db.models_rotation import DependentConfirmation
from . import lifecycle


class DependentsError(lifecycle.LifecycleError):
    """A refused confirmation; nothing was changed."""


@dataclass
class Confirmation:
    key: str
    version: int
    service: str
    confirmed_at: datetime
    actor: str
    new: bool


def dependents_of(ctx: KmsContext, key_name: str) -> list[str]:
    return list(ctx.policy.dependents.get(key_name, []))


def confirm(ctx: KmsContext, key_name: str, version: int, service: str, *, actor: str | None = None) -> Confirmation:
    """Record that ``service`` uses ``key_name`` v``version``. Idempotent."""
    lifecycle.validate_key_name(ctx, key_name)
    listed = dependents_of(ctx, key_name)
    if service not in listed:
        raise DependentsError(
            f"{service!r} is not a dependent of {key_name} in the policy (dependents: {', '.join(listed) or 'none'})"
        )
    actor = actor or ctx.actor
    try:
        with ctx.transaction() as session:
            key = lifecycle.get_key(session, key_name)
            v = lifecycle.get_version(key, version)
            if v.state not in (ACTIVE, ROTATED):
                raise DependentsError(
                    f"{key_name} v{version} is {v.state}: only an active or rotated version can be confirmed"
                )
            existing = _find(session, key_name, version, service)
            if existing is not None:
                return Confirmation(key_name, version, service, existing.confirmed_at, existing.actor, False)
            row = DependentConfirmation(
                key_name=key_name, key_version=version, service=service, confirmed_at=ctx.now(), actor=actor
            )
            session.add(row)
            session.flush()
            return Confirmation(key_name, version, service, row.confirmed_at, actor, True)
    except IntegrityError:  # a concurrent identical confirmation won
        with ctx.transaction() as session:
            won = _find(session, key_name, version, service)
            if won is None:  # the conflict was not the concurrent confirmation: report it
                raise
            return Confirmation(key_name, version, service, won.confirmed_at, won.actor, False)


def _find(session: Session, key_name: str, version: int, service: str) -> DependentConfirmation | None:
    return session.scalars(
        select(DependentConfirmation).where(
            DependentConfirmation.key_name == key_name,
            DependentConfirmation.key_version == version,
            DependentConfirmation.service == service,
        )
    ).first()


def unconfirmed(session: Session, ctx: KmsContext, key: Key, v: KeyVersion) -> list[str]:
    """Dependents of ``key`` that have not confirmed a live version newer than ``v``."""
    listed = dependents_of(ctx, key.name)
    if not listed:
        return []
    live_newer = {x.version for x in key.versions if x.version > v.version and x.state in (ACTIVE, ROTATED)}
    if not live_newer:
        return listed
    confirmed = set(
        session.scalars(
            select(DependentConfirmation.service).where(
                DependentConfirmation.key_name == key.name, DependentConfirmation.key_version.in_(live_newer)
            )
        )
    )
    return [s for s in listed if s not in confirmed]


def status(ctx: KmsContext, key_name: str | None = None) -> list[dict]:
    """Per key with dependents: which services confirmed which versions."""
    out = []
    with ctx.transaction() as session:
        names = [key_name] if key_name else sorted(ctx.policy.dependents)
        for name in names:
            rows = session.scalars(
                select(DependentConfirmation)
                .where(DependentConfirmation.key_name == name)
                .order_by(DependentConfirmation.key_version, DependentConfirmation.service)
            )
            for r in rows:
                out.append(
                    {
                        "key": r.key_name,
                        "version": r.key_version,
                        "service": r.service,
                        "confirmed_at": r.confirmed_at,
                        "actor": r.actor,
                    }
                )
    return out


def _emergency(reason: str | None, event_id: str | None) -> bool:
    return bool(event_id) or (reason or "").startswith("compromise")


def _describe(key: Key, v: KeyVersion, missing: list[str], action: str) -> str:
    return (
        f"{', '.join(missing)} ha{'s' if len(missing) == 1 else 've'} not confirmed a version of {key.name} "
        f"newer than v{v.version}; {action} after `kms dependents confirm` (T4)"
    )


@lifecycle.revoke_guard("dependents")
def _revoke_guard(session: Session, ctx: KmsContext, key: Key, v: KeyVersion, *, reason=None, event_id=None):
    if _emergency(reason, event_id):
        return None
    missing = unconfirmed(session, ctx, key, v)
    return _describe(key, v, missing, "revoke") if missing else None


@lifecycle.destroy_guard("dependents")
def _destroy_guard(session: Session, ctx: KmsContext, key: Key, v: KeyVersion):
    missing = unconfirmed(session, ctx, key, v)
    return _describe(key, v, missing, "destroy") if missing else None
