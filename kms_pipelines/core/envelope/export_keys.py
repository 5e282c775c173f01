"""Temporary export keys (policy clause R3): ``export:<id>`` keys that carry an expiry.

At expiry the key is rotated at once (nothing new is ever encrypted for a closed export)
and every earlier version is destroyed, which crypto-shreds the export's objects: their
DEKs were wrapped only under those versions. The destroy skips the ``deks`` guard on
purpose, and the ledger entry says so; every other destroy guard still applies. The
DEK rows are then marked shredded (wrapped bytes dropped), so the inventory shows what
was shredded and when. ``expire_due`` is idempotent and resumes an interrupted run.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from sqlalchemy import func, select, update

from ..foundation import nightly_steps
from ..foundation.clock import utc
from ..foundation.context import KmsContext
from ..foundation.db.models import ACTIVE, DESTROYED, Key
from ..foundation.db.models_envelope import DEKS, Dek
from ..keys import lifecycle
from .data_keys import EnvelopeError, deks_on

log = logging.getLogger(__name__)

_EXPORT_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._@-]{0,99}$")
SHRED_GUARD = "deks"


@dataclass
class ExportKey:
    key: str
    export_id: str
    expires_at: datetime
    created: bool


def key_name_for(export_id: str) -> str:
    if not isinstance(export_id, str) or not _EXPORT_ID.match(export_id):
        raise EnvelopeError(
            f"invalid export id {export_id!r}: 1-100 of letters, digits and . _ @ -, starting with a letter or digit"
        )
    return f"export:{export_id}"


def create(ctx: KmsContext, export_id: str, ttl_days: int | None = None, *, actor: str | None = None) -> ExportKey:
    """Create the export's key (idempotent): one active version expiring after ``ttl_days``
    (default: the policy's ``key_classes.export.default_ttl_days``)."""
    name = key_name_for(export_id)
    ttl = ttl_days if ttl_days is not None else ctx.policy.key_class("export").default_ttl_days
    if ttl is None or ttl <= 0:
        raise EnvelopeError(f"ttl_days must be a positive number of days, got {ttl_days!r}")
    result = lifecycle.ensure_key(
        ctx,
        name,
        actor=actor or ctx.actor,
        expires_at=ctx.now() + timedelta(days=ttl),
        attributes={"export_id": export_id, "ttl_days": ttl},
    )
    return ExportKey(name, export_id, expires_at(ctx, name), result.rotated)


def expires_at(ctx: KmsContext, key_name: str) -> datetime:
    with ctx.transaction() as session:
        key = lifecycle.get_key(session, key_name)
        times = [utc(v.expires_at) for v in key.versions if v.expires_at is not None]
    if not times:
        raise EnvelopeError(f"{key_name} carries no expiry")
    return min(times)


@dataclass
class DueExport:
    key: str
    expired_at: datetime
    versions_to_destroy: list[int]
    rotate_needed: bool
    unshredded_deks: int


def due(ctx: KmsContext, key_name: str | None = None) -> list[DueExport]:
    """Export keys past expiry that still have work: rotate, destroy, or mark DEKs shredded."""
    now = ctx.now()
    out = []
    with ctx.transaction() as session:
        q = select(Key).where(Key.key_class == "export").order_by(Key.name)
        if key_name:
            q = q.where(Key.name == key_name)
        for key in session.scalars(q):
            times = [utc(v.expires_at) for v in key.versions if v.expires_at is not None]
            if not times or now < min(times):
                continue
            active = lifecycle.active_version(key)
            rotate_needed = active is not None and active.expires_at is not None
            to_destroy = [v.version for v in key.versions if v.state not in (ACTIVE, DESTROYED)]
            destroyed = [v.version for v in key.versions if v.state == DESTROYED]
            unshredded = (
                session.scalar(
                    select(func.count())
                    .select_from(Dek)
                    .where(Dek.key_name == key.name, Dek.key_version.in_(destroyed), Dek.shredded_at.is_(None))
                )
                if destroyed
                else 0
            )
            if rotate_needed or to_destroy or unshredded:
                out.append(DueExport(key.name, min(times), to_destroy, rotate_needed, int(unshredded or 0)))
    return out


@dataclass
class ExpiryResult:
    key: str
    expired_at: datetime
    rotated_to: int | None = None
    destroyed: list[int] = field(default_factory=list)
    shredded_deks: int = 0
    refused: dict[int, str] = field(default_factory=dict)  # version -> "guard: reason"

    @property
    def complete(self) -> bool:
        return not self.refused


def expire_due(ctx: KmsContext, key_name: str | None = None, *, actor: str = "export-expiry") -> list[ExpiryResult]:
    """Rotate and destroy every expired export key (crypto-shredding its objects)."""
    results = []
    for item in due(ctx, key_name):
        res = ExpiryResult(item.key, item.expired_at)
        if item.rotate_needed:
            r = lifecycle.rotate(ctx, item.key, actor=actor, reason="export-expiry", only_if_due=True)
            if r.rotated:
                res.rotated_to = r.new_version
        with ctx.transaction() as session:
            key = lifecycle.get_key(session, item.key)
            targets = [
                (v.version, deks_on(session, key.name, v.version))
                for v in key.versions
                if v.state not in (ACTIVE, DESTROYED)
            ]
        for version, live in targets:
            reason = (
                f"export {item.key.split(':', 1)[1]} expired at {item.expired_at.isoformat()}: "
                f"crypto-shredding its {live} DEK(s) (R3); destroy guard '{SHRED_GUARD}' skipped on purpose, "
                f"shredding the export's data is the point of export expiry"
            )
            try:
                lifecycle.destroy(ctx, item.key, version, actor=actor, reason=reason, skip_guards=(SHRED_GUARD,))
                res.destroyed.append(version)
            except lifecycle.GuardRefused as refusal:
                res.refused[version] = f"{refusal.guard}: {refusal.reason}"
                log.warning("export expiry of %s v%d refused by guard %s", item.key, version, refusal.guard)
        res.shredded_deks = _mark_shredded(ctx, item.key)
        results.append(res)
    return results


def _mark_shredded(ctx: KmsContext, key_name: str) -> int:
    now = ctx.now()
    with ctx.transaction() as session:
        key = lifecycle.get_key(session, key_name)
        destroyed = [v.version for v in key.versions if v.state == DESTROYED]
        if not destroyed:
            return 0
        t = DEKS
        # on the session's connection: a Core UPDATE's result there is a CursorResult (rowcount)
        result = session.connection().execute(
            update(t)
            .where(t.c.key_name == key_name, t.c.key_version.in_(destroyed), t.c.shredded_at.is_(None))
            .values(wrapped=None, shredded_at=now)
        )
        return result.rowcount or 0


@nightly_steps.nightly_step("export_expiry", order=21)
def nightly_export_expiry(ctx: KmsContext) -> dict:
    results = expire_due(ctx)
    return {
        "expired": [r.key for r in results],
        "shredded_deks": sum(r.shredded_deks for r in results),
        "refused": {r.key: r.refused for r in results if r.refused},
    }
