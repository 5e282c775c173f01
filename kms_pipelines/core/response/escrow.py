"""Break-glass escrow (P4, R4): the break-glass key sealed as an M-of-N package.

Sealing (``seal``) takes the active break-glass version's value (the one key class the
keystore generates extractable), encrypts it with AES-256-GCM under a fresh 128-bit
*escrow KEK*, splits that KEK with Shamir secret sharing (pycryptodome,
``Crypto.Protocol.SecretSharing.Shamir``, threshold M of N from the policy) and encrypts
each share to its custodian's age X25519 recipient (pyrage). The package is JSON with no
plaintext; it goes to the object store (``escrow/packages/<id>.json``) and its metadata
to ``escrow_packages``. Sealing a new package supersedes the current one.

Custodians (``policy.key_classes.break-glass.escrow.custodians``) are enrolled with
``enroll_custodian``: either their own ``age1…`` recipient, or a generated keypair whose
private identity goes to the custodian (``kms escrow custodian add NAME --out FILE``).
Enrolment is the dual-controlled manual operation ``custodian-add`` (approvals bound to the
custodian and the exact key); only before the first-run ceremony are the first custodians
enrolled without it. A person seals by hand with ``manual_seal`` (proven by TOTP, holding
``break-glass`` and ``export``).

R4: the nightly step ``escrow`` (order 30) rotates break-glass when its 30-day cadence is
due — even unused — and seals the new version. Every custodian confirms the superseded
package destroyed (``confirm_destroyed``, proving identity with their age identity);
``destruction_overdue`` (the ``escrow_destruction_confirmed`` check) lists those missing
after ``destruction_confirm_days``. When all have confirmed, our stored copy is deleted.

``unseal`` needs M valid shares (M−1 is refused and nothing changes) plus dual approval
(``access.consume_approvals(operation="break-glass", target=<package id>)``); it records
an ``escrow_unseals`` row, audits, imports the recovered key into the keystore if its
material is gone, notifies security + compliance, then rotates break-glass at once and
seals the new version. Key material never reaches logs, metadata or exception text.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import secrets
import uuid
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from datetime import datetime, timedelta
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from sqlalchemy import select
from sqlalchemy.orm import Session

from ..access import enrolment, notifications
from ..access import principals as access
from ..foundation import nightly_steps
from ..foundation.canonical import canonical_fast
from ..foundation.clock import utc
from ..foundation.context import KmsContext
from ..foundation.db.models_events import EscrowCustodian, EscrowDestruction, EscrowPackage, EscrowUnseal
from ..foundation.objectstore.base import ObjectNotFound
from ..keys import lifecycle
from ..ledger import audit

KEY_NAME = "break-glass"
FORMAT = "kms-escrow/1"
SHARE_FORMAT = "kms-escrow-share/1"
PREFIX = "escrow/packages/"


class EscrowError(ValueError):
    """A refused escrow operation; the message names the problem. Nothing was changed."""


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _unb64(text: str) -> bytes:
    return base64.b64decode(text, validate=True)


def escrow_policy(ctx: KmsContext):
    esc = ctx.policy.key_class(KEY_NAME).escrow
    if esc is None:
        raise EscrowError("policy has no key_classes.break-glass.escrow block")
    return esc


def _audit(session, ctx: KmsContext, operation: str, target: str, outcome: str, detail: str | None = None) -> None:
    audit.record(
        session,
        at=ctx.now(),
        operation=operation,
        actor=ctx.actor,
        target=target,
        outcome=outcome,
        detail={"note": detail} if detail else None,
    )


# ---- custodians ---------------------------------------------------------------------------


def enroll_custodian(
    ctx: KmsContext,
    name: str,
    *,
    recipient: str | None = None,
    replace: bool = False,
    actor: str | None = None,
    requested_by: str | None = None,
    totp: str | None = None,
    ticket: str | None = None,
) -> tuple[str, str | None]:
    """Enroll a policy custodian. With ``recipient`` (their own ``age1…`` key) nothing secret is
    made here; without it a keypair is generated and its identity (``AGE-SECRET-KEY-…``) is
    returned once for the custodian to keep. Returns (recipient, identity or None).

    Who holds a share of the break-glass key is an identity decision, dual-controlled like
    principal enrolment: the manual operation ``custodian-add`` on target ``NAME=age1…`` (or
    ``NAME=new-keypair``), requested by ``requested_by`` proven by ``totp`` and holding
    ``principals``, approved by two other principals holding ``approve`` and ``principals``.
    Only before the first-run ceremony (no human principal yet, so nobody could request or
    approve) may the first custodians be enrolled without it, as part of that set-up, and
    never by replacing a key."""
    import pyrage  # lazy import: start-up time (optional/heavy dependency)

    esc = escrow_policy(ctx)
    if name not in esc.custodians:
        raise EscrowError(f"{name!r} is not a custodian in the policy (custodians: {esc.custodians})")
    if recipient is not None:
        try:
            pyrage.x25519.Recipient.from_str(recipient)
        except Exception:  # noqa: BLE001
            raise EscrowError(f"not an age X25519 recipient (age1…): {recipient[:12]!r}…") from None
    _refuse_enrolled(ctx, name, replace)
    manual = (requested_by, totp, ticket) != (None, None, None)
    if not manual and (replace or not enrolment.first_run(ctx)):
        raise EscrowError(
            f"enrolling escrow custodian {name} is a manual operation under dual control: give "
            f"--ticket, --requested-by and --totp, after two other principals holding 'approve' and "
            f"'principals' ran `kms approve --operation {access.CUSTODIAN_OPERATION} --target "
            f"{_custodian_target(name, recipient)} …` (only the first custodians, before "
            f"`kms init --admin`, are enrolled without it)"
        )
    made: list[str] = []

    def apply(session, now, approvers, who):
        rcpt = recipient
        if rcpt is None:
            ident = pyrage.x25519.Identity.generate()
            made.append(str(ident))
            rcpt = str(ident.to_public())
        existing = session.get(EscrowCustodian, name, with_for_update=True)
        if existing is not None and not replace:  # enrolled since the check above
            raise EscrowError(f"custodian {name!r} is already enrolled")
        if existing is None:
            session.add(EscrowCustodian(name=name, recipient=rcpt, enrolled_at=now, enrolled_by=who))
        else:
            existing.recipient, existing.enrolled_at, existing.enrolled_by = rcpt, now, who
        session.flush()
        audit.record(
            session,
            at=now,
            operation="escrow.custodian.enroll",
            actor=who,
            target=name,
            outcome="ok",
            detail={
                "note": "replaced" if existing else "enrolled",
                "recipient": rcpt,
                **({"ticket": ticket, "approvers": approvers} if manual else {"first_run": True}),
            },
        )
        made.insert(0, rcpt)

    if manual:
        enrolment._principal_change(
            ctx,
            access.CUSTODIAN_OPERATION,
            name,
            None,
            ticket=ticket or "",
            requested_by=requested_by or "",
            totp=totp,
            target=_custodian_target(name, recipient),
            apply=lambda s, now, approvers: apply(s, now, approvers, requested_by),
        )
    else:
        with ctx.transaction() as session:
            if not enrolment.first_run(ctx, session):  # the ceremony ran meanwhile
                raise EscrowError("principals were enrolled meanwhile: custodian enrolment now needs dual control")
            apply(session, ctx.now(), [], actor or "kms-init")
    return made[0], (made[1] if len(made) > 1 else None)


def _custodian_target(name: str, recipient: str | None) -> str:
    """The approval target of a custodian enrolment: the name and the exact key approved (a
    generated keypair is approved as such), so approvals never carry over to another key."""
    return f"{name}={recipient or 'new-keypair'}"


def _refuse_enrolled(ctx: KmsContext, name: str, replace: bool) -> None:
    with ctx.transaction() as session:
        if session.get(EscrowCustodian, name) is not None and not replace:
            raise EscrowError(
                f"custodian {name!r} is already enrolled (use --replace to change their key; "
                f"the next package is sealed to the new key)"
            )


def custodians(ctx: KmsContext) -> list[dict]:
    esc = escrow_policy(ctx)
    with ctx.transaction() as session:
        enrolled = {c.name: c for c in session.scalars(select(EscrowCustodian))}
    return [
        {
            "name": n,
            "enrolled": n in enrolled,
            "recipient": enrolled[n].recipient if n in enrolled else None,
            "enrolled_at": utc(enrolled[n].enrolled_at) if n in enrolled else None,
        }
        for n in esc.custodians
    ]


def _recipients(ctx: KmsContext) -> dict[str, str]:
    rows = custodians(ctx)
    missing = [r["name"] for r in rows if not r["enrolled"]]
    if missing:
        raise EscrowError(f"custodians not enrolled: {', '.join(missing)} (`kms escrow custodian add NAME --out FILE`)")
    return {r["name"]: r["recipient"] for r in rows}


# ---- sealing --------------------------------------------------------------------------------


@dataclass
class PackageInfo:
    package_id: str
    key: str
    key_version: int
    created_at: datetime
    superseded_at: datetime | None
    threshold: int
    custodians: list[str]
    object_key: str
    sha256: str
    erased_at: datetime | None = None
    confirmations: dict[str, datetime] = field(default_factory=dict)  # custodian -> confirmed_at
    reason: str = ""

    def to_dict(self) -> dict:
        return asdict(self)

    def get(self, name, default=None):  # convenience for dict-like callers
        return getattr(self, name, default)


def _package_row(session: Session, package_id: str) -> EscrowPackage:
    p = session.get(EscrowPackage, package_id)
    if p is None:  # packages are never deleted, only marked superseded / erased
        raise EscrowError(f"escrow package {package_id} disappeared")
    return p


def _pkg_info(session: Session, p: EscrowPackage) -> PackageInfo:
    confs = {
        d.custodian: utc(d.confirmed_at)
        for d in session.scalars(select(EscrowDestruction).where(EscrowDestruction.package_id == p.id))
    }
    return PackageInfo(
        p.id,
        p.key_name,
        p.key_version,
        utc(p.created_at),
        utc(p.superseded_at) if p.superseded_at else None,
        p.threshold,
        list(p.custodians),
        p.object_key,
        p.sha256,
        utc(p.erased_at) if p.erased_at else None,
        confs,
        p.reason,
    )


def _header(package_id: str, version: int, threshold: int, names: list[str]) -> bytes:
    return canonical_fast(
        {
            "format": FORMAT,
            "package_id": package_id,
            "key": KEY_NAME,
            "key_version": version,
            "threshold": threshold,
            "custodians": names,
        }
    )


def build_package(
    ctx: KmsContext, package_id: str, version: int, value: bytes, recipients: dict[str, str], threshold: int
) -> bytes:
    """The package JSON for one break-glass key value (no plaintext in it)."""
    import pyrage  # lazy import: start-up time (optional/heavy dependency)
    from Crypto.Protocol.SecretSharing import Shamir

    names = list(recipients)
    kek = secrets.token_bytes(16)
    header = _header(package_id, version, threshold, names)
    nonce = secrets.token_bytes(12)
    sealed = nonce + AESGCM(kek).encrypt(nonce, value, header)
    shares = Shamir.split(threshold, len(names), kek)
    out = {}
    for name, (index, share) in zip(names, shares, strict=True):
        plain = json.dumps(
            {"format": SHARE_FORMAT, "package_id": package_id, "custodian": name, "index": index, "share": _b64(share)},
            sort_keys=True,
        ).encode()
        ct = pyrage.encrypt(plain, [pyrage.x25519.Recipient.from_str(recipients[name])])
        out[name] = {"index": index, "recipient": recipients[name], "age": _b64(ct)}
    del kek, shares
    doc = {
        "format": FORMAT,
        "package_id": package_id,
        "key": KEY_NAME,
        "key_version": version,
        "created_at": ctx.now().isoformat(),
        "threshold": threshold,
        "custodians": names,
        "scheme": {
            "split": "shamir-gf(2^128)/pycryptodome",
            "share_encryption": "age-x25519",
            "key_encryption": "aes-128-gcm, aad=canonical header",
        },
        "sealed_key": _b64(sealed),
        "shares": out,
    }
    return json.dumps(doc, indent=1, sort_keys=True).encode()


def seal(ctx: KmsContext, *, reason: str = "rotation", actor: str | None = None) -> PackageInfo:
    """Seal the active break-glass version into a new package; supersede the current one."""
    esc = escrow_policy(ctx)
    recipients = _recipients(ctx)
    with ctx.transaction() as session:
        v = lifecycle.get_version(lifecycle.get_key(session, KEY_NAME), None)
        version, ref = v.version, v.wrap_ref
    value = ctx.keystore.export_secret(ref)
    package_id = f"bg-v{version}-{uuid.uuid4().hex[:12]}"
    data = build_package(ctx, package_id, version, value, recipients, esc.threshold)
    del value
    object_key = f"{PREFIX}{package_id}.json"
    if ctx.objects is None:
        raise EscrowError("no object store configured for escrow packages")
    info = ctx.objects.put(
        object_key,
        data,
        content_type="application/json",
        metadata={"kms-kind": "escrow-package", "kms-key-version": str(version)},
    )
    digest = info.sha256 or hashlib.sha256(data).hexdigest()
    try:
        with ctx.transaction() as session:
            now = ctx.now()
            current = session.scalars(
                select(EscrowPackage)
                .where(EscrowPackage.key_name == KEY_NAME, EscrowPackage.superseded_at.is_(None))
                .with_for_update()
            ).first()
            if current is not None:
                current.superseded_at = now
                session.flush()
            row = EscrowPackage(
                id=package_id,
                key_name=KEY_NAME,
                key_version=version,
                created_at=now,
                threshold=esc.threshold,
                custodians=list(recipients),
                object_key=object_key,
                sha256=digest,
                created_by=actor or ctx.actor,
                reason=reason[:200],
            )
            session.add(row)
            session.flush()
            _audit(
                session,
                ctx,
                "escrow.seal",
                package_id,
                "ok",
                f"break-glass v{version}; supersedes {current.id if current else 'nothing'}",
            )
            result = _pkg_info(session, row)
    except BaseException:
        try:
            ctx.objects.delete(object_key)
        except Exception:  # noqa: BLE001
            pass
        raise
    notifications.notify_policy_event(
        ctx,
        "escrow_sealed",
        f"Break-glass v{version} sealed ({esc.threshold} of {len(recipients)})",
        f"Package {package_id} sealed for {', '.join(recipients)} ({reason}).\n"
        + (
            f"Superseded package {current.id}: every custodian must confirm its destruction within "
            f"{esc.destruction_confirm_days} days (`kms escrow confirm-destroyed`).\n"
            if current
            else ""
        ),
        ref=package_id,
    )
    return result


SEAL_PERMISSIONS = ("break-glass", "export")


def manual_seal(ctx: KmsContext, *, principal: str, totp: str | None) -> PackageInfo:
    """``kms escrow seal``: a human seals the active break-glass version now. They prove
    themselves by TOTP and hold ``break-glass`` and ``export`` (sealing exports the key's value
    into the package; security_engineering in the shipped policy). The nightly step seals under
    its service actor instead (``nightly_escrow``)."""
    escrow_policy(ctx)
    access.prove_principal(ctx, principal, totp)
    for permission in SEAL_PERMISSIONS:
        access.require_permission(ctx, principal, permission, target=KEY_NAME)
    return seal(ctx.as_actor(principal), reason="manual seal", actor=principal)


def current_package(ctx: KmsContext) -> PackageInfo | None:
    with ctx.transaction() as session:
        p = session.scalars(
            select(EscrowPackage).where(EscrowPackage.key_name == KEY_NAME, EscrowPackage.superseded_at.is_(None))
        ).first()
        return _pkg_info(session, p) if p else None


def packages(ctx: KmsContext) -> list[PackageInfo]:
    with ctx.transaction() as session:
        return [
            _pkg_info(session, p)
            for p in session.scalars(select(EscrowPackage).order_by(EscrowPackage.created_at, EscrowPackage.id))
        ]


def get_package(ctx: KmsContext, package_id: str) -> PackageInfo:
    with ctx.transaction() as session:
        p = session.get(EscrowPackage, package_id)
        if p is None:
            raise EscrowError(f"unknown escrow package {package_id!r} (see `kms escrow status`)")
        return _pkg_info(session, p)


def ensure_sealed(ctx: KmsContext, *, reason: str = "rotation") -> dict:
    """Seal the active break-glass version unless the current package already holds it."""
    with ctx.transaction() as session:
        active = lifecycle.get_version(lifecycle.get_key(session, KEY_NAME), None).version
    cur = current_package(ctx)
    if cur is not None and cur.key_version == active:
        return {"sealed": False, "package_id": cur.package_id, "key_version": active}
    info = seal(ctx, reason=reason)
    return {
        "sealed": True,
        "package_id": info.package_id,
        "key_version": active,
        "superseded": cur.package_id if cur else None,
    }


@nightly_steps.nightly_step("escrow", order=30)
def nightly_escrow(ctx: KmsContext) -> dict:
    """R4: rotate break-glass when its cadence is due (even unused), then seal the active
    version. Custodians not enrolled do not stop the night: the problem is returned and
    the ``escrow_current`` check fails."""
    r = lifecycle.rotate(ctx, KEY_NAME, only_if_due=True, reason="cadence", actor="nightly:escrow")
    out: dict = {"rotated": r.rotated, "version": r.new_version}
    try:
        out.update(ensure_sealed(ctx, reason="cadence rotation" if r.rotated else "ensure sealed"))
    except EscrowError as exc:
        out["problem"] = str(exc)
    return out


# ---- destruction confirmations ------------------------------------------------------------


def _check_identity(session, custodian: str, identity: str) -> None:
    import pyrage  # lazy import: start-up time (optional/heavy dependency)

    row = session.get(EscrowCustodian, custodian)
    if row is None:
        raise EscrowError(f"custodian {custodian!r} is not enrolled")
    try:
        public = str(pyrage.x25519.Identity.from_str(identity.strip()).to_public())
    except Exception:  # noqa: BLE001 -- never echo the identity
        raise EscrowError(f"the identity given for {custodian} is not an age X25519 identity") from None
    if not secrets.compare_digest(public, row.recipient):
        raise EscrowError(f"the identity given does not belong to custodian {custodian}")


def confirm_destroyed(
    ctx: KmsContext, package_id: str, custodian: str, identity: str, *, actor: str | None = None
) -> PackageInfo:
    """A custodian confirms their copy of a superseded package is destroyed (R4), proving
    who they are with their age identity. Idempotent per (package, custodian)."""
    with ctx.transaction() as session:
        p = session.get(EscrowPackage, package_id)
        if p is None:
            raise EscrowError(f"unknown escrow package {package_id!r} (see `kms escrow status`)")
        if custodian not in p.custodians:
            raise EscrowError(f"{custodian!r} is not a custodian of package {package_id}")
        if p.superseded_at is None:
            raise EscrowError(f"package {package_id} is the current package; only superseded packages are destroyed")
        _check_identity(session, custodian, identity)
        existing = session.scalars(
            select(EscrowDestruction).where(
                EscrowDestruction.package_id == package_id, EscrowDestruction.custodian == custodian
            )
        ).first()
        if existing is None:
            session.add(
                EscrowDestruction(
                    package_id=package_id, custodian=custodian, confirmed_at=ctx.now(), confirmed_by=actor or custodian
                )
            )
            session.flush()
            _audit(session, ctx, "escrow.confirm-destroyed", package_id, "ok", custodian)
        info = _pkg_info(session, p)
        all_confirmed = set(info.confirmations) >= set(p.custodians)
        erase = all_confirmed and p.erased_at is None
    if erase:  # every custodian destroyed theirs: delete our stored copy too
        try:
            ctx.objects.delete(info.object_key)
        except ObjectNotFound:
            pass
        with ctx.transaction() as session:
            p = _package_row(session, package_id)
            p.erased_at = ctx.now()
            info = _pkg_info(session, p)
    return info


def destruction_overdue(ctx: KmsContext) -> list[dict]:
    """Superseded packages a custodian has not confirmed destroyed within the policy window."""
    days = escrow_policy(ctx).destruction_confirm_days
    now = ctx.now()
    out = []
    for p in packages(ctx):
        if p.superseded_at is None:
            continue
        due = p.superseded_at + timedelta(days=days)
        missing = [c for c in p.custodians if c not in p.confirmations]
        if missing and now >= due:
            out.append(
                {
                    "package_id": p.package_id,
                    "key_version": p.key_version,
                    "superseded_at": p.superseded_at.isoformat(),
                    "due": due.isoformat(),
                    "missing": missing,
                }
            )
    return out


def current_problems(ctx: KmsContext) -> list[str]:
    """Why the escrow is not in order right now (empty list = fine)."""
    problems = []
    with ctx.transaction() as session:
        active = lifecycle.active_version(lifecycle.get_key(session, KEY_NAME))
    cur = current_package(ctx)
    if cur is None:
        problems.append("no current escrow package")
    elif active is None or cur.key_version != active.version:
        problems.append(
            f"current package seals v{cur.key_version}, but the active version is v{active.version if active else '-'}"
        )
    else:
        age = ctx.now() - cur.created_at
        days = ctx.policy.key_class(KEY_NAME).rotation_days
        if days and age > timedelta(days=days):
            problems.append(f"current package {cur.package_id} is {age.days} days old (policy: {days})")
        if ctx.objects is not None and not ctx.objects.exists(cur.object_key):
            problems.append(f"current package object {cur.object_key} is missing from the object store")
    return problems


# ---- unsealing ---------------------------------------------------------------------------


@dataclass
class UnsealResult:
    package_id: str
    key_version: int
    custodians: list
    approvers: list
    imported: bool
    rotated_to: int | None
    new_package: str | None
    key_ref: str


def _load_doc(ctx: KmsContext, p: PackageInfo) -> dict:
    try:
        data = ctx.objects.get_bytes(p.object_key)
    except ObjectNotFound:
        raise EscrowError(f"package {p.package_id} is no longer in the object store ({p.object_key})") from None
    if hashlib.sha256(data).hexdigest() != p.sha256:
        raise EscrowError(f"package {p.package_id} in the object store does not match its recorded SHA-256")
    return json.loads(data)


def _decrypt_share(doc: dict, name: str, given) -> tuple[int, bytes]:
    """A custodian's share from their age identity (``AGE-SECRET-KEY-…``) or from the share
    document they decrypted themselves (JSON bytes/str)."""
    import pyrage  # lazy import: start-up time (optional/heavy dependency)

    entry = doc["shares"].get(name)
    if entry is None:
        raise EscrowError(f"{name!r} holds no share of package {doc['package_id']}")
    text = given.decode() if isinstance(given, (bytes, bytearray)) else str(given)
    text = text.strip()
    if text.startswith("AGE-SECRET-KEY-"):
        try:
            ident = pyrage.x25519.Identity.from_str(text)
            plain = pyrage.decrypt(_unb64(entry["age"]), [ident])
        except Exception:  # noqa: BLE001
            raise EscrowError(f"the identity given for {name} does not open their share") from None
    else:
        plain = text.encode()
    try:
        share = json.loads(plain)
        ok = (
            share.get("format") == SHARE_FORMAT
            and share.get("package_id") == doc["package_id"]
            and share.get("custodian") == name
            and int(share.get("index")) == int(entry["index"])
        )
        value = _unb64(share["share"])
    except Exception:  # noqa: BLE001
        raise EscrowError(f"the share given for {name} is not a share document of this package") from None
    if not ok or len(value) != 16:
        raise EscrowError(f"the share given for {name} belongs to another package or custodian")
    return int(entry["index"]), value


def recover(ctx: KmsContext, package_id: str, shares: Mapping[str, object]) -> tuple[PackageInfo, bytes, list[str]]:
    """Reconstruct the sealed key from >= M shares (no state change). Refuses M−1."""
    from Crypto.Protocol.SecretSharing import Shamir  # lazy import: start-up time (optional/heavy dependency)

    p = get_package(ctx, package_id)
    names = sorted(set(shares))
    if len(names) < p.threshold:
        raise EscrowError(
            f"unseal needs {p.threshold} custodian shares of package {package_id}, got "
            f"{len(names)}; nothing was changed"
        )
    doc = _load_doc(ctx, p)
    pieces = [_decrypt_share(doc, n, shares[n]) for n in names]
    kek = Shamir.combine(pieces[: p.threshold] if len(pieces) > p.threshold else pieces)
    sealed = _unb64(doc["sealed_key"])
    try:
        value = AESGCM(kek).decrypt(
            sealed[:12], sealed[12:], _header(p.package_id, p.key_version, p.threshold, list(doc["custodians"]))
        )
    except InvalidTag:
        raise EscrowError(
            f"the shares do not reconstruct the key of package {package_id} (a share is wrong); nothing was changed"
        ) from None
    return p, value, names


def unseal(
    ctx: KmsContext,
    package_id: str,
    shares: Mapping[str, object],
    *,
    ticket: str,
    requester: str,
    out_path: str | os.PathLike | None = None,
) -> UnsealResult:
    """Break glass: M shares + dual approval. Then import (if needed), notify, rotate, re-seal.

    With ``out_path`` the recovered key is also written there (mode 0600, refused if the
    file exists) for the emergency procedure that needs the raw value."""
    if not ticket or not requester:
        raise EscrowError("unseal needs a change ticket and a requester (dual approval is bound to them)")
    p, value, used = recover(ctx, package_id, shares)
    if p.superseded_at is not None:
        raise EscrowError(
            f"package {package_id} was superseded at {p.superseded_at.isoformat()}; unseal the current package"
        )
    if out_path is not None and Path(out_path).exists():
        raise EscrowError(f"{out_path} exists; refusing to overwrite it")
    with ctx.transaction() as session:
        approvers = list(
            access.consume_approvals(
                session, ctx, operation="break-glass", target=package_id, ticket=ticket, requester=requester
            )
        )
        session.add(
            EscrowUnseal(
                package_id=package_id,
                at=ctx.now(),
                requester=requester,
                ticket=ticket,
                approvers=sorted(approvers),
                custodians=used,
                key_version=p.key_version,
            )
        )
        _audit(
            session,
            ctx.as_actor(requester),
            "escrow.unseal",
            package_id,
            "ok",
            f"break-glass v{p.key_version}; custodians {', '.join(used)}; ticket {ticket}",
        )
        key = lifecycle.get_key(session, KEY_NAME)
        ref = lifecycle.get_version(key, p.key_version).wrap_ref
        if not ref:  # raised inside the transaction: the approvals stay unconsumed
            raise EscrowError(f"{KEY_NAME} v{p.key_version} has no keystore reference to import the key into")
    imported = False
    if not ctx.keystore.exists(ref):
        ctx.keystore.import_secret(ref, value)
        imported = True
    if out_path is not None:
        fd = os.open(out_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as fh:
            fh.write(value)
    del value
    notifications.notify_policy_event(
        ctx,
        "escrow_unsealed",
        f"BREAK-GLASS unsealed: package {package_id} (v{p.key_version})",
        f"Break-glass package {package_id} (key v{p.key_version}) was unsealed.\n"
        f"requested by: {requester}\napproved by: {', '.join(sorted(approvers))}\nticket: {ticket}\n"
        f"custodian shares used: {', '.join(used)}\n"
        f"The break-glass key is rotated and re-sealed immediately.",
        ref=ticket,
    )
    r = lifecycle.rotate(ctx, KEY_NAME, actor=requester, reason="break-glass", approvers=approvers, ticket=ticket)
    new_pkg = None
    try:
        new_pkg = seal(ctx, reason=f"rotation after break-glass use ({package_id})").package_id
    except EscrowError:
        pass  # escrow_current fails loudly until sealed
    return UnsealResult(package_id, p.key_version, used, sorted(approvers), imported, r.new_version, new_pkg, ref)


def status(ctx: KmsContext) -> dict:
    cur = current_package(ctx)
    return {
        "current": cur.to_dict() if cur else None,
        "custodians": custodians(ctx),
        "destruction_overdue": destruction_overdue(ctx),
        "problems": current_problems(ctx),
        "packages": [p.to_dict() for p in packages(ctx)],
    }


@lifecycle.destroy_guard("escrow")
def _guard_current_package(session, ctx: KmsContext, key, version) -> str | None:
    """The version sealed in the current escrow package is the break-glass of last resort."""
    if key.name != KEY_NAME:
        return None
    cur = session.scalars(
        select(EscrowPackage).where(EscrowPackage.key_name == KEY_NAME, EscrowPackage.superseded_at.is_(None))
    ).first()
    if cur is not None and cur.key_version == version.version:
        return f"break-glass v{version.version} is sealed in the current escrow package {cur.id}"
    return None
