"""Keys, versions and their state machine (docs/architecture.md, "Keys, versions and states").

``pending → active → rotated → (revoked) → destroyed``; ``revoked`` is reachable from
active/rotated (compromise). Exactly one active version per key (a partial unique
index, plus a row lock on the key while its versions change). Every state change writes
its ledger entry in the same transaction. Key material is created in the keystore
before the transaction that activates it; a crash between the two leaves an unused
keystore object, never a version without material.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from sqlalchemy import select
from sqlalchemy.orm import Session, selectinload

from ..access import crosscheck
from ..foundation import retry
from ..foundation.clock import utc
from ..foundation.context import KmsContext
from ..foundation.db.models import ACTIVE, DESTROYED, PENDING, REVOKED, ROTATED, Key, KeyVersion, LedgerEntry
from ..foundation.keystore import AES_256, ARCHIVABLE, ARCHIVE_KEK, ED25519, GENERAL, KeyNotFound, fingerprint
from ..ledger import audit, ledger

TRANSITIONS: dict[str, frozenset[str]] = {
    PENDING: frozenset({ACTIVE, DESTROYED}),
    ACTIVE: frozenset({ROTATED, REVOKED}),
    ROTATED: frozenset({REVOKED, DESTROYED}),
    REVOKED: frozenset({DESTROYED}),
    DESTROYED: frozenset(),
}


# The one vocabulary of rotation reasons, whichever path rotates (CLI, Dagster, events, expiry).
ROTATION_REASONS = ("cadence", "manual", "compromise", "tenant-rotation", "ci-exposure", "export-expiry", "break-glass")
# R2: the reasons that rotate a service key at once, without approvals.
EMERGENCY_REASONS = ("compromise", "tenant-rotation", "ci-exposure")


class LifecycleError(ValueError):
    """A refused lifecycle operation; the message says exactly why. Nothing was changed."""


class UnknownKey(LifecycleError):
    pass


class IllegalTransition(LifecycleError):
    pass


class GuardRefused(LifecycleError):
    def __init__(self, guard: str, reason: str, action: str = "destroy"):
        super().__init__(f"{action} refused by guard '{guard}': {reason}")
        self.guard, self.reason, self.action = guard, reason, action


def key_class_of(name: str) -> str:
    return name.split(":", 1)[0]


def validate_key_name(ctx: KmsContext, name: str) -> str:
    cls = key_class_of(name)
    try:
        kc = ctx.policy.key_class(cls)
    except ValueError:
        raise UnknownKey(f"unknown key {name!r}: key class {cls!r} is not in the policy") from None
    if cls in ("service", "data"):
        suffix = name.split(":", 1)[1] if ":" in name else ""
        if suffix not in (kc.names or []):
            raise UnknownKey(f"unknown key {name!r}: the policy lists {cls} keys {kc.names}")
    elif cls == "export":
        if ":" not in name or not name.split(":", 1)[1]:
            raise UnknownKey(f"export keys are named export:<id>, got {name!r}")
    elif ":" in name:
        raise UnknownKey(f"unknown key {name!r}: {cls} keys take no suffix")
    return name


# ---- queries -------------------------------------------------------------------------


def get_key(session: Session, name: str, *, lock: bool = False) -> Key:
    q = select(Key).where(Key.name == name).options(selectinload(Key.versions))
    if lock:
        q = q.with_for_update()
    key = session.scalars(q).first()
    if key is None:
        raise UnknownKey(f"unknown key {name!r} (run `kms init`, or see `kms keys list`)")
    return key


def active_version(key: Key) -> KeyVersion | None:
    return next((v for v in key.versions if v.state == ACTIVE), None)


def get_version(key: Key, version: int | None) -> KeyVersion:
    if version is None:
        v = active_version(key)
        if v is None:
            raise LifecycleError(f"key {key.name!r} has no active version")
        return v
    for v in key.versions:
        if v.version == version:
            return v
    raise UnknownKey(f"key {key.name!r} has no version {version}")


def rotation_days(ctx: KmsContext, key_name: str) -> int | None:
    return ctx.policy.key_class(key_class_of(key_name)).rotation_days


def due_at(ctx: KmsContext, key_name: str, version: KeyVersion) -> datetime | None:
    """When the version must be rotated: its cadence, or its expiry for export keys."""
    if version.expires_at is not None:
        return utc(version.expires_at)
    days = rotation_days(ctx, key_name)
    if days is None or version.activated_at is None:
        return None
    try:
        return utc(version.activated_at) + timedelta(days=days)
    except OverflowError:  # a version activated near datetime.max (refused since; see rotate)
        return None


def is_due(ctx: KmsContext, key: Key, at: datetime | None = None) -> bool:
    v = active_version(key)
    if v is None:
        return True
    when = due_at(ctx, key.name, v)
    return when is not None and (at or ctx.now()) >= when


# ---- state changes -------------------------------------------------------------------


def _new_refs(name: str, version: int, algorithms: Iterable[str]) -> dict[str, str]:
    stem = f"{name}.v{version}.{secrets.token_hex(3)}"
    refs = {}
    if AES_256 in algorithms:
        refs["wrap_ref"] = f"{stem}.wrap"
    if ED25519 in algorithms:
        refs["sign_ref"] = f"{stem}.sign"
    return refs


def _purpose(key_class: str) -> str:
    """T1 vault: root/service AES material may leave the keystore only wrapped under an archive KEK."""
    return {"root": ARCHIVABLE, "service": ARCHIVABLE, "archive": ARCHIVE_KEK}.get(key_class, GENERAL)


def _generate_material(ctx: KmsContext, name: str, version: int) -> dict:
    kc = ctx.policy.key_class(key_class_of(name))
    refs = _new_refs(name, version, kc.algorithms)
    out: dict = dict(refs)
    if "wrap_ref" in refs:
        # Break-glass material must be escrowed, so it is the one class generated extractable.
        ctx.keystore.generate(
            refs["wrap_ref"],
            AES_256,
            extractable=key_class_of(name) == "break-glass",
            purpose=_purpose(key_class_of(name)),
        )
    if "sign_ref" in refs:
        generated = ctx.keystore.generate(refs["sign_ref"], ED25519)
        out["public_key"] = generated.public_key
        out["fingerprint"] = fingerprint(generated.public_key)
    return out


def _transition(
    session: Session,
    ctx: KmsContext,
    key: Key,
    version: KeyVersion,
    to_state: str,
    *,
    actor: str,
    reason: str | None,
    approvers=(),
    ticket=None,
    event_id=None,
) -> None:
    if to_state not in TRANSITIONS[version.state]:
        raise IllegalTransition(f"illegal transition for {key.name} v{version.version}: {version.state} → {to_state}")
    now = ctx.now()
    from_state, version.state = version.state, to_state
    stamp = {ACTIVE: "activated_at", ROTATED: "rotated_at", REVOKED: "revoked_at", DESTROYED: "destroyed_at"}
    setattr(version, stamp[to_state], now)
    session.flush()
    entry = ledger.append(
        session,
        at=now,
        key_name=key.name,
        key_version=version.version,
        from_state=from_state,
        to_state=to_state,
        actor=actor,
        approvers=approvers,
        change_ticket=ticket,
        reason=reason,
        event_id=event_id,
    )
    # The audit log's own record of the state change, in the same transaction: the ledger and
    # the audit chain must agree event for event (core/access/crosscheck.py).
    audit.record(
        session,
        at=now,
        operation=crosscheck.TRANSITION_OP,
        actor=actor,
        target=f"{key.name}#v{version.version}",
        outcome="ok",
        detail={"seq": entry.seq, "from": from_state, "to": to_state},
    )


@dataclass
class RotationResult:
    key: str
    rotated: bool
    old_version: int | None = None
    new_version: int | None = None
    reason: str | None = None
    public_fingerprint: str | None = None


def ensure_key(
    ctx: KmsContext,
    name: str,
    *,
    actor: str = "kms-init",
    expires_at: datetime | None = None,
    attributes: dict | None = None,
) -> RotationResult:
    """Create the key with one active version unless it exists already (idempotent)."""
    validate_key_name(ctx, name)
    with ctx.transaction() as session:
        existing = session.scalars(select(Key).where(Key.name == name)).first()
        if existing is not None:
            return RotationResult(name, False, reason="exists")
    material = _generate_material(ctx, name, 1)
    with ctx.transaction() as session:
        if session.scalars(select(Key).where(Key.name == name).with_for_update()).first() is not None:
            _discard_material(ctx, material)  # lost a creation race; the winner's key stands
            return RotationResult(name, False, reason="exists")
        key = Key(name=name, key_class=key_class_of(name), created_at=ctx.now(), attributes=attributes or {})
        session.add(key)
        session.flush()
        v = KeyVersion(key_id=key.id, version=1, state=PENDING, created_at=ctx.now(), expires_at=expires_at, **material)
        session.add(v)
        session.flush()
        _transition(session, ctx, key, v, ACTIVE, actor=actor, reason="bootstrap")
        return RotationResult(name, True, None, 1, "bootstrap", material.get("fingerprint"))


def _discard_material(ctx: KmsContext, material: dict) -> None:
    for ref_field in ("wrap_ref", "sign_ref"):
        if material.get(ref_field):
            try:
                ctx.keystore.destroy(material[ref_field])
            except KeyNotFound:
                pass


def rotate(
    ctx: KmsContext,
    name: str,
    *,
    actor: str | None = None,
    reason: str = "manual",
    approvers: Iterable[str] = (),
    ticket: str | None = None,
    event_id: str | None = None,
    only_if_due: bool = False,
    expires_at: datetime | None = None,
    after_rotate: Callable[[Session, Key, KeyVersion, KeyVersion | None], None] | None = None,
) -> RotationResult:
    """Rotate ``name``: a new active version, the old one ``rotated``, ledger entries for both.

    With ``only_if_due`` the rotation happens only when the policy cadence (or export
    expiry) says so; the check runs under the key's row lock, so concurrent callers
    rotate it once.
    """
    actor = actor or ctx.actor
    validate_key_name(ctx, name)
    if reason not in ROTATION_REASONS:
        raise LifecycleError(f"unknown rotation reason {reason!r}; reasons are {', '.join(ROTATION_REASONS)}")
    _check_representable(ctx, name)

    def plan() -> RotationResult | int:
        with ctx.transaction() as session:
            # refused before any key material is made; ledger.append checks again under its lock
            ledger.require_in_order(session, LedgerEntry.seq, LedgerEntry.at, ctx.now(), "ledger")
            key = get_key(session, name)
            if only_if_due and not is_due(ctx, key):
                return RotationResult(name, False, reason="not due")
            return max(v.version for v in key.versions) + 1

    planned = retry.db_call(ctx, plan, what=f"the rotation of {name}")
    if isinstance(planned, RotationResult):
        return planned
    material = _generate_material(ctx, name, planned)

    def commit() -> RotationResult:
        with ctx.transaction() as session:
            key = get_key(session, name, lock=True)
            mine = _version_holding(key, material)
            if mine is not None:
                # An earlier attempt committed but its acknowledgement was lost with the
                # connection: the rotation happened once; report it, never rotate twice.
                return RotationResult(
                    name,
                    True,
                    mine.version - 1 if mine.version > 1 else None,
                    mine.version,
                    reason,
                    material.get("fingerprint"),
                )
            if only_if_due and not is_due(ctx, key):
                raise _NotDueAnymore()
            current = active_version(key)
            new_number = max(v.version for v in key.versions) + 1
            new = KeyVersion(
                key_id=key.id,
                version=new_number,
                state=PENDING,
                created_at=ctx.now(),
                expires_at=expires_at,
                **material,
            )
            session.add(new)
            if current is not None:
                _transition(
                    session,
                    ctx,
                    key,
                    current,
                    ROTATED,
                    actor=actor,
                    reason=reason,
                    approvers=approvers,
                    ticket=ticket,
                    event_id=event_id,
                )
            session.flush()
            _transition(
                session,
                ctx,
                key,
                new,
                ACTIVE,
                actor=actor,
                reason=reason,
                approvers=approvers,
                ticket=ticket,
                event_id=event_id,
            )
            if after_rotate is not None:
                after_rotate(session, key, new, current)
            return RotationResult(
                name, True, current.version if current else None, new_number, reason, material.get("fingerprint")
            )

    try:
        # The rotation's transaction is the unit retried after a lost connection: it either
        # committed whole (found by its key refs on the next attempt) or not at all.
        return retry.db_call(ctx, commit, what=f"the rotation of {name}")
    except _NotDueAnymore:
        _discard_material(ctx, material)
        return RotationResult(name, False, reason="not due")
    except retry.DependencyUnavailable:
        # Whether the last attempt committed is unknown: keep the new key material (an unused
        # keystore object at worst) rather than risk destroying an active version's key.
        raise
    except BaseException:
        _discard_material(ctx, material)
        raise


def _version_holding(key: Key, material: dict) -> KeyVersion | None:
    refs = {material.get("wrap_ref"), material.get("sign_ref")} - {None}
    return next((v for v in key.versions if refs & {v.wrap_ref, v.sign_ref}), None)


def _check_representable(ctx: KmsContext, name: str) -> None:
    """Refuse a time whose next due date cannot be represented (e.g. 9999-12-31)."""
    try:
        ctx.now() + timedelta(days=(rotation_days(ctx, name) or 0) + 366)
    except OverflowError:
        raise LifecycleError(
            f"time {ctx.now().isoformat()} is out of range: the next rotation of {name} would fall after year 9999"
        ) from None


class _NotDueAnymore(Exception):
    pass


# Called inside the state-change transaction after every guard agreed; returns the
# approvers to record (e.g. access.consume_approvals), or raises to refuse. Approvals are
# thus consumed atomically with the transition, never for a refused one.
Authorize = Callable[[Session], "Iterable[str]"]

RevokeGuard = Callable[..., "str | None"]  # (session, ctx, key, version, *, reason, event_id)
_REVOKE_GUARDS: dict[str, RevokeGuard] = {}


def revoke_guard(name: str):
    """Register a revoke guard (same pattern as ``destroy_guard``): it returns None to
    allow the revocation, or the reason it refuses. Guards see ``reason``/``event_id`` so an
    emergency (compromise) revocation can be told apart from a routine retirement."""

    def register(fn: RevokeGuard) -> RevokeGuard:
        _REVOKE_GUARDS[name] = fn
        return fn

    return register


def check_revoke(
    session: Session,
    ctx: KmsContext,
    key: Key,
    v: KeyVersion,
    *,
    reason: str | None = None,
    event_id: str | None = None,
    skip: Iterable[str] = (),
) -> list[tuple[str, str]]:
    destroy_guards()  # refuses unless runtime/guards.py registered every guard (revoke ones too)
    refusals = []
    for guard_name, guard in dict(_REVOKE_GUARDS).items():
        if guard_name in skip:
            continue
        why = guard(session, ctx, key, v, reason=reason, event_id=event_id)
        if why:
            refusals.append((guard_name, why))
    return refusals


def revoke(
    ctx: KmsContext,
    name: str,
    version: int,
    *,
    actor: str | None = None,
    reason: str,
    approvers: Iterable[str] = (),
    ticket: str | None = None,
    event_id: str | None = None,
    skip_guards: Iterable[str] = (),
    authorize: Authorize | None = None,
) -> None:
    """Revoke a version (compromise). An active version must be rotated away first, so
    the key is never left without an active version. Revoke guards (e.g. dependents
    must have confirmed the new version, T4) may refuse; the message names the guard."""
    with ctx.transaction() as session:
        key = get_key(session, name, lock=True)
        v = get_version(key, version)
        if v.state == ACTIVE:
            raise IllegalTransition(
                f"{name} v{version} is active: rotate the key before revoking it (compromise response does both)"
            )
        if REVOKED in TRANSITIONS[v.state]:
            refusals = check_revoke(session, ctx, key, v, reason=reason, event_id=event_id, skip=skip_guards)
            if refusals:
                guard, why = refusals[0]
                raise GuardRefused(guard, why, action="revoke")
        if authorize is not None:
            approvers = sorted(set(approvers) | set(authorize(session)))
        _transition(
            session,
            ctx,
            key,
            v,
            REVOKED,
            actor=actor or ctx.actor,
            reason=reason,
            approvers=approvers,
            ticket=ticket,
            event_id=event_id,
        )


DestroyGuard = Callable[[Session, KmsContext, Key, KeyVersion], "str | None"]
_DESTROY_GUARDS: dict[str, DestroyGuard] = {}


def destroy_guard(name: str):
    """Register a guard: it returns None to allow destruction, or the reason it refuses."""

    def register(fn: DestroyGuard) -> DestroyGuard:
        _DESTROY_GUARDS[name] = fn
        return fn

    return register


# Which guards exist is decided above this module: the areas that own them register them
# (``@destroy_guard`` / ``@revoke_guard``) and ``core/runtime/guards.py`` imports every such
# area, then calls ``guards_loaded``. The CLI, the console, the Dagster resources and the test
# fixtures import it before they build a context. A destroy or revoke decision before that
# refuses loudly, so a guard can never be skipped because its module was not loaded yet.
_GUARDS_LOADED: list[str] = []  # the modules that runtime/guards.py loaded (empty: not yet)


def guards_loaded(modules: Iterable[str]) -> None:
    """Called once by ``core/runtime/guards.py`` after it imported every guard module."""
    _GUARDS_LOADED[:] = list(modules)


def destroy_guards() -> dict[str, DestroyGuard]:
    if not _GUARDS_LOADED:
        raise LifecycleError(
            "destroy/revoke guards are not loaded: import kms_pipelines.core.runtime.guards "
            "before deciding a destroy or revoke (nothing was changed)"
        )
    return dict(_DESTROY_GUARDS)


def check_destroy(
    session: Session, ctx: KmsContext, key: Key, v: KeyVersion, skip: Iterable[str] = ()
) -> list[tuple[str, str]]:
    """Every guard that refuses destroying ``v``, as (guard, reason) pairs."""
    refusals = []
    if DESTROYED not in TRANSITIONS[v.state]:
        refusals.append(
            ("state", f"{key.name} v{v.version} is {v.state}; only rotated or revoked versions can be destroyed")
        )
    for guard_name, guard in destroy_guards().items():
        if guard_name in skip:
            continue
        reason = guard(session, ctx, key, v)
        if reason:
            refusals.append((guard_name, reason))
    return refusals


def destroy(
    ctx: KmsContext,
    name: str,
    version: int,
    *,
    actor: str | None = None,
    reason: str,
    approvers: Iterable[str] = (),
    ticket: str | None = None,
    event_id: str | None = None,
    skip_guards: Iterable[str] = (),
    authorize: Authorize | None = None,
) -> None:
    """Destroy a version after every guard agrees; then erase its keystore material.
    ``authorize`` (e.g. dual approval) runs in the same transaction, after the guards.

    The state change commits first; the erase follows and is retried by re-running
    destroy on a version that is already ``destroyed`` but whose material remains.
    """
    actor = actor or ctx.actor
    with ctx.transaction() as session:
        key = get_key(session, name, lock=True)
        v = get_version(key, version)
        if v.state != DESTROYED:
            refusals = check_destroy(session, ctx, key, v, skip_guards)
            if refusals:
                guard, why = refusals[0]
                raise GuardRefused(guard, why)
            if authorize is not None:
                approvers = sorted(set(approvers) | set(authorize(session)))
            _transition(
                session,
                ctx,
                key,
                v,
                DESTROYED,
                actor=actor,
                reason=reason,
                approvers=approvers,
                ticket=ticket,
                event_id=event_id,
            )
        refs = [r for r in (v.wrap_ref, v.sign_ref) if r]
    for ref in refs:
        try:
            ctx.keystore.destroy(ref)
        except KeyNotFound:
            pass  # already erased by an earlier, interrupted attempt


@dataclass
class InventoryRow:
    key: str
    key_class: str
    version: int
    state: str
    created_at: datetime
    activated_at: datetime | None
    age_days: float | None
    due_at: datetime | None
    overdue: bool
    fingerprint: str | None = None
    expires_at: datetime | None = None
    extra: dict = field(default_factory=dict)


def inventory(ctx: KmsContext) -> list[InventoryRow]:
    now = ctx.now()
    rows = []
    with ctx.transaction() as session:
        for key in session.scalars(select(Key).options(selectinload(Key.versions)).order_by(Key.name)):
            for v in key.versions:
                due = due_at(ctx, key.name, v) if v.state == ACTIVE else None
                age = (now - utc(v.activated_at)).total_seconds() / 86400 if v.activated_at else None
                rows.append(
                    InventoryRow(
                        key.name,
                        key.key_class,
                        v.version,
                        v.state,
                        utc(v.created_at),
                        utc(v.activated_at) if v.activated_at else None,
                        round(age, 2) if age is not None else None,
                        due,
                        bool(due and now >= due),
                        v.fingerprint,
                        utc(v.expires_at) if v.expires_at else None,
                    )
                )
    return rows


def bootstrap(ctx: KmsContext, actor: str = "kms-init") -> list[RotationResult]:
    """Ensure one active version for every key class the policy requires."""
    return [ensure_key(ctx, name, actor=actor) for name in ctx.policy.bootstrap_key_names()]
