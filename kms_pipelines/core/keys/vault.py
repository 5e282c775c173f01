"""The archive vault of retired root and service keys (clause T1, second sentence).

* **Archive on retirement.** When a root or service version leaves ``active``, the run
  that rotated it (``rotation.follow_up``; the nightly step ``vault_archive`` catches up
  manual and compromise rotations) writes an archive copy: the version's AES material,
  wrapped by the keystore itself (``archive_wrap``: AES key wrap with padding, inside the
  HSM under PKCS#11) under the active *archive KEK* (key class ``archive``), then sealed
  with AES-GCM under a fresh DEK wrapped by the same KEK, with the copy's header
  (key, version, fingerprint, times, KEK version) as associated data. The copy and a
  manifest entry signed by the active root go to the object store under Object Lock until
  retirement + ``retention.expired_root_service_days``; a ledger entry (``→ archived``)
  names the object and its SHA-256.
  Ed25519 signing keys are *not* archived: verifying historical RPTs needs only their
  public key (kept in the header and in the signed manifest), and a vault that can give a
  signing key back is a vault that can forge history.
* **Retrieval under dual control** lives in ``core/keys/forensic.py`` (the manual operation
  ``archive-retrieve``, the read-only forensic keystore, its TTL, the forensic drill).
* **Destroy means destroy everywhere** (``on_destroyed``): after a version's keystore
  material is erased, its archive copy and manifest are deleted as soon as their Object
  Lock has expired (``retention.retire_expired`` retries every night until then); the ledger records
  ``→ archive-deleted``.
* **T1 evidence** (``t1_findings``): behaviour, not a policy flag — see the function.
"""

from __future__ import annotations

import base64
import hashlib
import json
import secrets
from dataclasses import asdict, dataclass, field
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session, selectinload

from ..foundation.canonical import canonical_bytes
from ..foundation.clock import utc
from ..foundation.context import KmsContext
from ..foundation.db.models import DESTROYED, REVOKED, ROTATED, Key, KeyVersion
from ..foundation.db.models_access import AuditEvent
from ..foundation.db.models_vault import ARCHIVED, DELETED, UNARCHIVABLE, ArchiveCopy, ForensicRetrieval
from ..foundation.keystore import KeyNotFound, NotArchivable, verify_signature
from ..foundation.objectstore import ObjectLocked, ObjectNotFound
from ..ledger import audit, ledger
from . import lifecycle
from .retention_window import destroy_allowed_from, retired_at

KEK_KEY = "archive"
ARCHIVED_CLASSES = ("root", "service")
RETRIEVE_OPERATION = "archive-retrieve"
COPY_FORMAT = "kms-vault-copy/1"
MANIFEST_FORMAT = "kms-vault-manifest/1"
LEDGER_ARCHIVED = "archived"
LEDGER_DELETED = "archive-deleted"


class VaultError(lifecycle.LifecycleError):
    """A refused or failed vault operation; the message says why. Nothing was changed."""


def target_for(key_name: str, version: int) -> str:
    return f"{key_name}#v{version}"


def b64text(data: bytes) -> str:
    return base64.b64encode(data).decode()


def stamp(at: datetime | None) -> str | None:
    return ledger.format_time(utc(at)) if at is not None else None


# ---- archiving ----------------------------------------------------------------------


def _retention(ctx: KmsContext, key: Key, v: KeyVersion) -> tuple[datetime, datetime] | None:
    start, end = retired_at(v), destroy_allowed_from(ctx, key, v)
    return (start, end) if start is not None and end is not None else None


def _active_kek(session: Session) -> KeyVersion:
    try:
        kek = lifecycle.active_version(lifecycle.get_key(session, KEK_KEY))
    except lifecycle.UnknownKey:
        kek = None
    if kek is None or not kek.wrap_ref:
        raise VaultError(
            "no active archive KEK (key 'archive'): add key_classes.archive to the policy and run `kms init`"
        )
    return kek


def _vault_since(session: Session) -> datetime | None:
    """When the first archive KEK became active: versions created earlier were generated
    non-archivable (under PKCS#11, non-extractable) and are the only ones excused."""
    first = session.scalars(
        select(KeyVersion.activated_at).join(Key).where(Key.name == KEK_KEY, KeyVersion.version == 1)
    ).first()
    return utc(first) if first is not None else None


def _pending(ctx: KmsContext) -> list[tuple[str, int]]:
    now = ctx.now()
    with ctx.transaction() as session:
        done = set(session.execute(select(ArchiveCopy.key_name, ArchiveCopy.key_version)).all())
        out = []
        for key in session.scalars(
            select(Key)
            .where(Key.key_class.in_(ARCHIVED_CLASSES))
            .options(selectinload(Key.versions))
            .order_by(Key.name)
        ):
            for v in key.versions:
                span = _retention(ctx, key, v)
                # without a retirement time archive_version refuses it by name (reported, not skipped)
                if v.state in (ROTATED, REVOKED) and (key.name, v.version) not in done and (not span or now < span[1]):
                    out.append((key.name, v.version))
    return out


@dataclass
class CopyInfo:
    key: str
    version: int
    status: str
    object_key: str | None = None
    manifest_key: str | None = None
    sha256: str | None = None
    retain_until: datetime | None = None
    kek_version: int | None = None
    reason: str | None = None
    problems: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["retain_until"] = self.retain_until.isoformat() if self.retain_until else None
        return d


def archive_version(ctx: KmsContext, key_name: str, version: int) -> CopyInfo:
    """Write the archive copy of one retired root/service version (idempotent per version)."""
    if ctx.objects is None:
        raise VaultError("no object store configured: the vault needs one (KMS_OBJECT_STORE)")
    now = ctx.now()
    with ctx.transaction() as session:
        existing = session.scalars(
            select(ArchiveCopy).where(ArchiveCopy.key_name == key_name, ArchiveCopy.key_version == version)
        ).first()
        if existing is not None:
            return _copy_info(existing)
        key = lifecycle.get_key(session, key_name)
        v = lifecycle.get_version(key, version)
        if key.key_class not in ARCHIVED_CLASSES or v.state not in (ROTATED, REVOKED):
            raise VaultError(
                f"{key_name} v{version} is a {v.state} {key.key_class} version; only retired root and "
                f"service versions are archived"
            )
        span = _retention(ctx, key, v)
        if span is None:
            # a retired version carries rotated_at/revoked_at; without one there is no window to lock to
            raise VaultError(f"{key_name} v{version} is {v.state} but has no retirement time; nothing to archive")
        retired, retain_until = span
        kek = _active_kek(session)
        root = lifecycle.get_version(lifecycle.get_key(session, "root"), None)
        header = {
            "format": COPY_FORMAT,
            "key": key_name,
            "version": version,
            "key_class": key.key_class,
            "fingerprint": v.fingerprint,
            "public_key": b64text(v.public_key) if v.public_key else None,
            "material": "aes256",
            "created_at": stamp(v.created_at),
            "activated_at": stamp(v.activated_at),
            "retired_at": stamp(retired),
            "retain_until": stamp(retain_until),
            "archived_at": stamp(now),
            "kek": {"key": KEK_KEY, "version": kek.version},
        }
        wrap_ref, kek_ref, kek_version = v.wrap_ref, kek.wrap_ref, kek.version
        signer = (root.version, root.sign_ref, root.fingerprint)
    try:
        wrapped_key = ctx.keystore.archive_wrap(kek_ref, wrap_ref)
    except KeyNotFound:
        raise VaultError(f"{key_name} v{version}: its keystore material is gone; nothing left to archive") from None
    except NotArchivable as exc:
        # Generated before the vault existed (non-archivable): recorded, and judged by T1.
        return _record(
            ctx,
            ArchiveCopy(
                key_name=key_name,
                key_version=version,
                status=UNARCHIVABLE,
                retired_at=retired,
                retain_until=retain_until,
                archived_at=now,
                fingerprint=header["fingerprint"],
                reason=str(exc)[:500],
            ),
            None,
        )
    aad = canonical_bytes(header)
    wrapped_dek = ctx.keystore.new_wrapped_dek(kek_ref)
    sealed = ctx.keystore.dek_encrypt(kek_ref, wrapped_dek, wrapped_key, aad)
    body = canonical_bytes({"header": header, "wrapped_dek": b64text(wrapped_dek), "sealed": b64text(sealed)})
    digest = hashlib.sha256(body).hexdigest()
    stem = (
        f"{ctx.policy.vault.prefix}{key_name.replace(':', '/')}/v{version}/"
        f"{now.strftime('%Y%m%dT%H%M%SZ')}-{secrets.token_hex(4)}"
    )
    object_key, manifest_key = f"{stem}.copy.json", f"{stem}.manifest.json"
    entry = {
        "format": MANIFEST_FORMAT,
        "key": key_name,
        "version": version,
        "fingerprint": header["fingerprint"],
        "object_key": object_key,
        "sha256": digest,
        "size": len(body),
        "retain_until": header["retain_until"],
        "archived_at": header["archived_at"],
        "kek_version": kek_version,
        "signer": {"key": "root", "version": signer[0], "fingerprint": signer[2]},
    }
    signature = ctx.keystore.sign(signer[1], canonical_bytes(entry))
    manifest_body = canonical_bytes({"entry": entry, "signature": b64text(signature)})
    try:
        ctx.objects.put(
            object_key, body, retain_until=retain_until, content_type="application/json", metadata={"sha256": digest}
        )
        ctx.objects.put(manifest_key, manifest_body, retain_until=retain_until, content_type="application/json")
    except ValueError as exc:  # e.g. the retention already ended by the object store's clock
        raise VaultError(f"{key_name} v{version}: archive copy not written: {exc}") from None
    row = ArchiveCopy(
        key_name=key_name,
        key_version=version,
        status=ARCHIVED,
        kek_version=kek_version,
        object_key=object_key,
        manifest_key=manifest_key,
        sha256=digest,
        size=len(body),
        fingerprint=header["fingerprint"],
        retired_at=retired,
        retain_until=retain_until,
        archived_at=now,
    )
    return _record(ctx, row, f"archive copy {object_key} sha256={digest} (locked until {header['retain_until']})")


def _record(ctx: KmsContext, row: ArchiveCopy, ledger_reason: str | None) -> CopyInfo:
    with ctx.transaction() as session:
        key = lifecycle.get_key(session, row.key_name, lock=True)
        if session.scalars(
            select(ArchiveCopy.id).where(
                ArchiveCopy.key_name == row.key_name, ArchiveCopy.key_version == row.key_version
            )
        ).first():
            raise VaultError(f"{row.key_name} v{row.key_version} was archived concurrently; the other copy stands")
        session.add(row)
        v = lifecycle.get_version(key, row.key_version)
        if ledger_reason is not None:
            ledger.append(
                session,
                at=ctx.now(),
                key_name=row.key_name,
                key_version=row.key_version,
                from_state=v.state,
                to_state=LEDGER_ARCHIVED,
                actor=ctx.actor,
                approvers=(),
                change_ticket=None,
                reason=ledger_reason,
                event_id=None,
            )
        audit.record(
            session,
            at=ctx.now(),
            operation="archive",
            actor=ctx.actor,
            target=target_for(row.key_name, row.key_version),
            outcome="ok" if row.status == ARCHIVED else "error",
            detail={
                "status": row.status,
                "object": row.object_key,
                "sha256": row.sha256,
                **({"reason": row.reason} if row.reason else {}),
            },
        )
        session.flush()
        return _copy_info(row)


def _copy_info(row: ArchiveCopy) -> CopyInfo:
    return CopyInfo(
        row.key_name,
        row.key_version,
        row.status,
        row.object_key,
        row.manifest_key,
        row.sha256,
        utc(row.retain_until),
        row.kek_version,
        row.reason,
    )


FAILED = "failed"  # not recorded: the next run tries again, and T1 is red meanwhile


def archive_pending(ctx: KmsContext) -> list[CopyInfo]:
    """Archive every retired root/service version within its retention that has no copy yet.
    One version that cannot be archived does not stop the others (nor the rotation run)."""
    out = []
    for name, version in _pending(ctx):
        try:
            out.append(archive_version(ctx, name, version))
        except VaultError as exc:
            out.append(CopyInfo(name, version, FAILED, reason=str(exc)))
    return out


# ---- verification ---------------------------------------------------------------------


def _signer_key(session: Session, version: int) -> bytes | None:
    return session.scalars(
        select(KeyVersion.public_key).join(Key).where(Key.name == "root", KeyVersion.version == version)
    ).first()


def verify_copy(ctx: KmsContext, row: ArchiveCopy, session: Session) -> list[str]:
    """Problems with one archived copy: manifest signature, bytes against the hash, lock."""
    name = target_for(row.key_name, row.key_version)
    problems = []
    try:
        body = ctx.objects.get_bytes(row.object_key)
        head = ctx.objects.head(row.object_key)
    except Exception as exc:  # noqa: BLE001 - any failure to read it is the finding
        return [f"{name}: archive copy {row.object_key} unreadable ({type(exc).__name__})"]
    if hashlib.sha256(body).hexdigest() != row.sha256:
        problems.append(f"{name}: archive copy bytes do not match the recorded SHA-256 (tampered)")
    if (
        head.retain_until is None
        or utc(head.retain_until) < utc(row.retain_until)
        or (head.lock_mode not in (None, "COMPLIANCE"))
    ):
        problems.append(
            f"{name}: archive copy is not locked until the end of retention "
            f"({stamp(row.retain_until)}; object lock {stamp(head.retain_until) or 'none'})"
        )
    try:
        doc = json.loads(ctx.objects.get_bytes(row.manifest_key))
        entry, signature = doc["entry"], base64.b64decode(doc["signature"])
    except Exception as exc:  # noqa: BLE001
        return problems + [f"{name}: manifest entry {row.manifest_key} unreadable ({type(exc).__name__})"]
    public = _signer_key(session, int(entry.get("signer", {}).get("version", 0)))
    if public is None or not verify_signature(public, canonical_bytes(entry), signature):
        problems.append(f"{name}: manifest entry signature does not verify under the root version it names")
    expected = {
        "key": row.key_name,
        "version": row.key_version,
        "object_key": row.object_key,
        "sha256": row.sha256,
        "retain_until": stamp(row.retain_until),
    }
    wrong = [k for k, val in expected.items() if entry.get(k) != val]
    if wrong:
        problems.append(f"{name}: manifest entry disagrees with the vault record on {', '.join(wrong)}")
    return problems


def copies(ctx: KmsContext, *, verify: bool = True) -> list[CopyInfo]:
    """Every vault record, verified (``kms archive list`` / ``kms archive verify``)."""
    out = []
    with ctx.transaction() as session:
        for row in session.scalars(select(ArchiveCopy).order_by(ArchiveCopy.key_name, ArchiveCopy.key_version)):
            info = _copy_info(row)
            if verify and row.status == ARCHIVED:
                info.problems = verify_copy(ctx, row, session)
            out.append(info)
    return out


# ---- destroy means destroy everywhere -------------------------------------------------


def on_destroyed(ctx: KmsContext, key_name: str, version: int) -> str | None:
    """Delete the archive copy of a destroyed version once its lock has expired.
    Returns ``deleted``, ``locked`` (retried nightly) or None when there is no copy."""
    with ctx.transaction() as session:
        row = session.scalars(
            select(ArchiveCopy).where(ArchiveCopy.key_name == key_name, ArchiveCopy.key_version == version)
        ).first()
        if row is None or row.status != ARCHIVED:
            return None
        keys = [row.object_key, row.manifest_key]
    try:
        for k in keys:
            try:
                ctx.objects.delete(k)
            except ObjectNotFound:
                pass
    except ObjectLocked:
        return "locked"
    with ctx.transaction() as session:
        key = lifecycle.get_key(session, key_name, lock=True)
        row = session.scalars(
            select(ArchiveCopy).where(ArchiveCopy.key_name == key_name, ArchiveCopy.key_version == version)
        ).first()
        if row is None:  # vault records are never deleted, only marked DELETED
            raise VaultError(f"{key_name} v{version}: its archive record disappeared while its copy was deleted")
        row.status, row.deleted_at = DELETED, ctx.now()
        ledger.append(
            session,
            at=ctx.now(),
            key_name=key_name,
            key_version=version,
            from_state=lifecycle.get_version(key, version).state,
            to_state=LEDGER_DELETED,
            actor=ctx.actor,
            approvers=(),
            change_ticket=None,
            reason=f"archive copy {keys[0]} and its manifest deleted after retention",
            event_id=None,
        )
    return "deleted"


def delete_expired(ctx: KmsContext) -> dict[str, list[str]]:
    """Retry the archive deletion of every destroyed version whose copy is still stored."""
    with ctx.transaction() as session:
        todo = session.execute(
            select(ArchiveCopy.key_name, ArchiveCopy.key_version)
            .join(Key, Key.name == ArchiveCopy.key_name)
            .join(KeyVersion, (KeyVersion.key_id == Key.id) & (KeyVersion.version == ArchiveCopy.key_version))
            .where(ArchiveCopy.status == ARCHIVED, KeyVersion.state == DESTROYED)
        ).all()
    out: dict[str, list[str]] = {"deleted": [], "locked": []}
    for name, version in todo:
        outcome = on_destroyed(ctx, name, version)
        if outcome:
            out[outcome].append(target_for(name, version))
    return out


@lifecycle.destroy_guard("archive_copies")
def _kek_guard(session: Session, ctx: KmsContext, key: Key, v: KeyVersion):
    """An archive KEK version stays while any stored copy is wrapped under it."""
    if key.name != KEK_KEY:
        return None
    n = len(
        session.scalars(
            select(ArchiveCopy.id).where(ArchiveCopy.kek_version == v.version, ArchiveCopy.status == ARCHIVED)
        ).all()
    )
    return f"{n} archive cop{'y' if n == 1 else 'ies'} still wrapped under archive KEK v{v.version}" if n else None


# ---- T1 evidence ------------------------------------------------------------------------


def t1_findings(ctx: KmsContext) -> tuple[list[str], list[str], list[str], dict]:
    """(problems, good, warnings, details) for clause T1's second sentence.

    Red: a retired root/service version within retention (or with no retirement time) with no copy, an unarchivable
    one generated after the vault existed, a copy that fails verification (manifest
    signature, bytes vs hash, lock until the end of retention) or was deleted early; a
    destroyed version whose copy is still stored after its lock ended; a retrieval or
    forensic import without the required distinct approvers; forensic material alive
    past its TTL. Versions generated before the vault existed (non-archivable) are warned."""
    problems: list[str] = []
    warnings: list[str] = []
    need = ctx.policy.access.approvals_required
    now = ctx.now()
    verified = legacy = deleted = 0
    with ctx.transaction() as session:
        since = _vault_since(session)
        if since is None:
            problems.append("no archive KEK: the vault does not exist")
        rows = {(r.key_name, r.key_version): r for r in session.scalars(select(ArchiveCopy))}
        for key in session.scalars(
            select(Key)
            .where(Key.key_class.in_(ARCHIVED_CLASSES))
            .options(selectinload(Key.versions))
            .order_by(Key.name)
        ):
            for v in key.versions:
                span = _retention(ctx, key, v)
                name, row = target_for(key.name, v.version), rows.get((key.name, v.version))
                if span is None:
                    if v.state in (ROTATED, REVOKED) and row is None:  # its window cannot even be computed
                        problems.append(f"{name}: {v.state} but has no retirement time and no archive copy")
                    continue
                if v.state in (ROTATED, REVOKED) and now < span[1]:
                    if row is None:
                        problems.append(f"{name}: retired {stamp(span[0])} but has no archive copy")
                    elif row.status == UNARCHIVABLE:
                        if since is not None and utc(v.created_at) >= since:
                            problems.append(f"{name}: generated after the vault existed but not archivable")
                        else:
                            legacy += 1
                            warnings.append(f"{name}: generated before the vault, not archivable ({row.reason})")
                    elif row.status == DELETED:
                        problems.append(f"{name}: archive copy deleted {stamp(row.deleted_at)}, within retention")
                    else:
                        found = verify_copy(ctx, row, session)
                        problems += found
                        verified += not found
                elif v.state == DESTROYED and row is not None and row.object_key:
                    stored = ctx.objects.exists(row.object_key)
                    if row.status == DELETED:
                        deleted += 1
                        if stored:
                            problems.append(f"{name}: archive copy recorded deleted but still stored")
                    elif stored:
                        try:
                            lock = ctx.objects.head(row.object_key).retain_until
                        except Exception:  # noqa: BLE001
                            lock = None
                        if lock is not None and utc(lock) > now:
                            warnings.append(f"{name}: destroyed; archive copy deleted when its lock ends {stamp(lock)}")
                        else:
                            problems.append(
                                f"{name}: destroyed, but its archive copy is still stored after its lock ended"
                            )
        retrievals = list(session.scalars(select(ForensicRetrieval)))
        for r in retrievals:
            names = set(json.loads(r.approvers)) - {r.requester}
            if len(names) < need:
                problems.append(
                    f"retrieval #{r.id} of {target_for(r.key_name, r.key_version)} had {len(names)} "
                    f"approver(s) other than the requester (dual control needs {need})"
                )
        retrieved_refs = {ref for r in retrievals for ref in json.loads(r.refs)}
        # Erasure runs on use, `kms archive purge` and nightly: one night of grace before it is red.
        grace = timedelta(days=1)
        alive_refs = {
            ref
            for r in retrievals
            if r.purged_at is None and utc(r.expires_at) + grace > now
            for ref in json.loads(r.refs)
        }
        for target, detail in session.execute(
            select(AuditEvent.target, AuditEvent.detail).where(
                AuditEvent.operation == RETRIEVE_OPERATION, AuditEvent.outcome == "ok"
            )
        ):
            if target not in retrieved_refs and _is_forensic(detail):
                problems.append(f"forensic import of {target} has no dual-approved retrieval")
    try:
        stale = sorted(set(ctx.keystore.forensic_refs()) - alive_refs)
    except AttributeError:
        stale = []
    if stale:
        problems.append(f"forensic material alive without a live retrieval (TTL ended?): {', '.join(stale)}")
    good = [
        f"{verified} retired root/service version(s) have verified, locked archive copies; {deleted} archive "
        f"cop{'y' if deleted == 1 else 'ies'} deleted with their keys; {len(retrievals)} retrieval(s), each "
        f"dual-approved"
    ]
    return (
        problems,
        good,
        warnings,
        {
            "archived_verified": verified,
            "archive_deleted": deleted,
            "legacy_unarchivable": legacy,
            "retrievals": len(retrievals),
        },
    )


def _is_forensic(detail: Any) -> bool:
    if isinstance(detail, str):
        try:
            detail = json.loads(detail)
        except ValueError:
            return False
    return isinstance(detail, dict) and bool(detail.get("forensic"))
