"""Forensic retrieval from the archive vault (T1): dual control, the read-only forensic
keystore, its TTL, and the monthly forensic drill.

``retrieve`` is the manual operation ``archive-retrieve``: ``access.approvals_required``
approvals from principals other than the requester, bound to (operation, ``key#vN``,
ticket), TOTP-proven, single-use. The copy is verified first (``vault.verify_copy``), then
opened and unwrapped into the keystore's forensic namespace (decrypt only), audited, and the
compliance lists are told. The material erases itself after ``vault.forensic_ttl_hours``.
"""

from __future__ import annotations

import base64
import json
import secrets
from dataclasses import asdict, dataclass, field
from datetime import datetime, timedelta

from sqlalchemy import select
from sqlalchemy.orm import Session

from ..access import notifications
from ..access import principals as access
from ..foundation import nightly_steps
from ..foundation.canonical import canonical_bytes
from ..foundation.context import KmsContext
from ..foundation.db.models import DESTROYED
from ..foundation.db.models_rpt import RegulatoryProofToken
from ..foundation.db.models_vault import ARCHIVED, UNARCHIVABLE, ArchiveCopy, ForensicRetrieval
from ..foundation.keystore import KeyNotFound, verify_signature
from ..foundation.keystore import fingerprint as fingerprint_of
from ..ledger import audit, rpt
from . import lifecycle
from .vault import (
    FAILED,
    KEK_KEY,
    RETRIEVE_OPERATION,
    VaultError,
    archive_pending,
    b64text,
    stamp,
    target_for,
    verify_copy,
)

# ---- retrieval under dual control -------------------------------------------------------
# The two functions below are the only calls into the access area's permission and approval API
# (identity work may re-point them); elsewhere this module only names access.AccessDenied.


def _require_retrieval(ctx: KmsContext, requester: str, target: str, ticket: str) -> None:
    """Refuse unless the requester holds the permission and the approvals are complete
    (read only: nothing is consumed; refusals are audited)."""
    access.require_permission(ctx, requester, RETRIEVE_OPERATION, target=target)
    access.request_approval(ctx, operation=RETRIEVE_OPERATION, target=target, ticket=ticket, requester=requester)
    with ctx.transaction() as s:
        try:
            access.check_approvals(
                s, ctx, operation=RETRIEVE_OPERATION, target=target, ticket=ticket, requester=requester
            )
            denied = None
        except access.AccessDenied as exc:
            denied = exc
    if denied is not None:
        audit.emit(
            ctx,
            at=ctx.now(),
            operation=RETRIEVE_OPERATION,
            actor=requester,
            target_ref=target,
            outcome="denied",
            detail={"reason": denied.reason, "ticket": ticket, "manual": True, "problem": str(denied)},
        )
        raise denied


def _consume_retrieval(session: Session, ctx: KmsContext, requester: str, target: str, ticket: str) -> list[str]:
    return list(
        access.consume_approvals(
            session, ctx, operation=RETRIEVE_OPERATION, target=target, ticket=ticket, requester=requester
        )
    )


@dataclass
class Retrieval:
    id: int
    key: str
    version: int
    ticket: str
    requester: str
    approvers: list[str]
    refs: list[str]
    expires_at: datetime
    fingerprint: str | None = None
    public_key: bytes | None = None  # from the copy's authenticated header (verify only)
    notification_failures: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        d = {**asdict(self), "expires_at": self.expires_at.isoformat()}
        d["public_key"] = b64text(self.public_key) if self.public_key else None
        return d


def retrieve(
    ctx: KmsContext, key_name: str, version: int, *, ticket: str, requested_by: str, purpose: str = "investigation"
) -> Retrieval:
    """Import an archived version into the forensic keystore, under dual control."""
    lifecycle.validate_key_name(ctx, key_name)
    target = target_for(key_name, version)
    with ctx.transaction() as session:
        row = session.scalars(
            select(ArchiveCopy).where(ArchiveCopy.key_name == key_name, ArchiveCopy.key_version == version)
        ).first()
        if row is None or row.status != ARCHIVED:
            raise VaultError(
                f"no archive copy of {target} in the vault"
                + (f" (status {row.status})" if row is not None else "; see `kms archive list`")
            )
        problems = verify_copy(ctx, row, session)
        if problems:
            raise VaultError(f"refusing to retrieve {target}: " + "; ".join(problems))
        object_key = row.object_key
        kek = lifecycle.get_version(lifecycle.get_key(session, KEK_KEY), row.kek_version)
        if kek.state == DESTROYED or not kek.wrap_ref:
            raise VaultError(f"archive KEK v{row.kek_version} of {target} is destroyed; the copy cannot be opened")
        kek_ref = kek.wrap_ref
    _require_retrieval(ctx, requested_by, target, ticket)
    doc = json.loads(ctx.objects.get_bytes(object_key))
    header = doc["header"]
    if header.get("key") != key_name or header.get("version") != version:
        raise VaultError(f"archive copy of {target} names {header.get('key')} v{header.get('version')}")
    ttl = timedelta(hours=ctx.policy.vault.forensic_ttl_hours)
    now = ctx.now()
    ref = f"{key_name.replace(':', '.')}.v{version}.forensic.{secrets.token_hex(4)}"
    imported = False
    try:
        with ctx.transaction() as session:
            approvers = _consume_retrieval(session, ctx, requested_by, target, ticket)
            wrapped_key = _open(ctx, kek_ref, doc)
            ctx.keystore.forensic_unwrap(kek_ref, wrapped_key, ref)
            imported = True
            r = ForensicRetrieval(
                key_name=key_name,
                key_version=version,
                ticket=ticket,
                requester=requested_by,
                approvers=json.dumps(approvers),
                refs=json.dumps([ref]),
                retrieved_at=now,
                expires_at=now + ttl,
                purpose=purpose,
            )
            session.add(r)
            session.flush()
            audit.record(
                session,
                at=now,
                operation=RETRIEVE_OPERATION,
                actor=requested_by,
                target=target,
                outcome="ok",
                detail={
                    "ticket": ticket,
                    "approvers": approvers,
                    "forensic_ref": ref,
                    "expires_at": stamp(now + ttl),
                    "purpose": purpose,
                },
            )
            result = Retrieval(
                r.id,
                key_name,
                version,
                ticket,
                requested_by,
                approvers,
                [ref],
                now + ttl,
                header.get("fingerprint"),
                base64.b64decode(header["public_key"]) if header.get("public_key") else None,
            )
    except BaseException:
        if imported:
            _erase(ctx, ref)
        raise
    result.notification_failures = _notify(ctx, result)
    return result


def _open(ctx: KmsContext, kek_ref: str, doc: dict) -> bytes:
    """The copy's wrapped key; the header must authenticate as the seal's associated data."""
    wrapped_dek, sealed, aad = (
        base64.b64decode(doc["wrapped_dek"]),
        base64.b64decode(doc["sealed"]),
        canonical_bytes(doc["header"]),
    )
    opener = getattr(ctx.keystore, "archive_open", None)  # audited as archive-retrieve when wrapped
    return (
        opener(kek_ref, wrapped_dek, sealed, aad)
        if opener
        else ctx.keystore.dek_decrypt(kek_ref, wrapped_dek, sealed, aad)
    )


def _notify(ctx: KmsContext, r: Retrieval) -> list[str]:
    """A4/T1: compliance hears of every retrieval. A failed delivery is reported, never raised,
    and every delivery is recorded (``notification_deliveries``)."""
    outcome = notifications.notify_manual_operation(
        ctx,
        operation=RETRIEVE_OPERATION,
        target=target_for(r.key, r.version),
        ticket=r.ticket,
        requester=r.requester,
        approvers=r.approvers,
        detail=f"Imported into the forensic keystore (verify/decrypt only); erases itself at "
        f"{r.expires_at.isoformat()}.",
    )
    return [f"{f.channel}: {f.error}" for f in outcome.results if not f.ok]


def _retrieval(session: Session, retrieval_id: int) -> ForensicRetrieval:
    row = session.get(ForensicRetrieval, retrieval_id)
    if row is None:  # retrievals are never deleted, only marked purged
        raise VaultError(f"forensic retrieval {retrieval_id} disappeared while its material was erased")
    return row


def _erase(ctx: KmsContext, ref: str) -> None:
    try:
        ctx.keystore.forensic_destroy(ref)
    except KeyNotFound:
        pass


def purge_expired(ctx: KmsContext) -> list[str]:
    """Erase forensic material whose TTL has passed; returns the refs erased."""
    now = ctx.now()
    with ctx.transaction() as session:
        due = [
            (r.id, json.loads(r.refs))
            for r in session.scalars(
                select(ForensicRetrieval).where(
                    ForensicRetrieval.purged_at.is_(None), ForensicRetrieval.expires_at <= now
                )
            )
        ]
    erased = []
    for rid, refs in due:
        for ref in refs:
            _erase(ctx, ref)
            erased.append(ref)
        with ctx.transaction() as session:
            row = _retrieval(session, rid)
            row.purged_at = now
            audit.record(
                session,
                at=now,
                operation="archive.forensic_expired",
                actor=ctx.actor,
                target=target_for(row.key_name, row.key_version),
                outcome="ok",
                detail={"refs": refs},
            )
    return erased


class ForensicRefused(VaultError):
    pass


class ForensicKeyStore:
    """The forensic keystore context: verify and decrypt only, and only until the TTL.

    It exposes no sign, encrypt or wrap; the objects behind it are created decrypt-only
    (PKCS#11: CKA_SIGN/ENCRYPT/WRAP false), so not even the backend could sign with them."""

    def __init__(self, ctx: KmsContext):
        self._ctx = ctx

    def _live(self, ref: str) -> None:
        purge_expired(self._ctx)
        with self._ctx.transaction() as session:
            rows = session.scalars(select(ForensicRetrieval).where(ForensicRetrieval.purged_at.is_(None)))
            if not any(ref in json.loads(r.refs) for r in rows):
                raise ForensicRefused(f"forensic key {ref!r} is not (or no longer) retrieved; its TTL may have ended")

    def decrypt(self, ref: str, blob: bytes, aad: bytes = b"") -> bytes:
        self._live(ref)
        return self._ctx.keystore.forensic_decrypt(ref, blob, aad)

    @staticmethod
    def verify(public_key: bytes, message: bytes, signature: bytes) -> bool:
        return verify_signature(public_key, message, signature)

    def sign(self, ref: str, message: bytes) -> bytes:
        audit.emit(
            self._ctx,
            at=self._ctx.now(),
            operation="sign",
            actor=self._ctx.actor,
            target_ref=ref,
            outcome="denied",
            detail={"forensic": True, "reason": "forensic keys never sign"},
        )
        raise ForensicRefused(f"the forensic keystore is read-only: {ref!r} may verify and decrypt, never sign")

    def encrypt(self, ref: str, plaintext: bytes, aad: bytes = b"") -> bytes:
        raise ForensicRefused(f"the forensic keystore is read-only: {ref!r} may verify and decrypt, never encrypt")


def release(ctx: KmsContext, retrieval_id: int) -> list[str]:
    """Erase a retrieval's forensic material before its TTL (e.g. when a drill is done)."""
    with ctx.transaction() as session:
        row = session.get(ForensicRetrieval, retrieval_id)
        if row is None or row.purged_at is not None:
            return []
        refs = json.loads(row.refs)
    for ref in refs:
        _erase(ctx, ref)
    with ctx.transaction() as session:
        row = _retrieval(session, retrieval_id)
        row.purged_at = ctx.now()
        audit.record(
            session,
            at=ctx.now(),
            operation="archive.forensic_released",
            actor=ctx.actor,
            target=target_for(row.key_name, row.key_version),
            outcome="ok",
            detail={"refs": refs},
        )
    return refs


# ---- the forensic drill (B2 restore drill, T1) ---------------------------------------------


def drill_ticket(at: datetime) -> str:
    """The change ticket of a month's forensic drill retrieval, known in advance to approvers."""
    return f"drill-forensic-{at:%Y-%m}"


def drill_check(ctx: KmsContext, *, requested_by: str, ticket: str | None = None) -> dict:
    """Retrieve the oldest archived root version under dual control and verify the oldest
    retained RPTs it signed with the public key the archive copy carries (authenticated as
    the copy's associated data). Returns a drill check ``{name, status, detail}``."""
    name = "forensic_retrieval"
    with ctx.transaction() as session:
        row = session.scalars(
            select(ArchiveCopy)
            .where(ArchiveCopy.key_name == "root", ArchiveCopy.status == ARCHIVED)
            .order_by(ArchiveCopy.key_version)
        ).first()
        version = row.key_version if row is not None else None
    if version is None:
        return {"name": name, "status": "passed", "detail": "no archived root version yet: nothing to retrieve"}
    ticket = ticket or drill_ticket(ctx.now())
    try:
        r = retrieve(ctx, "root", version, ticket=ticket, requested_by=requested_by, purpose="drill")
    except (access.AccessDenied, VaultError) as exc:
        return {
            "name": name,
            "status": "failed",
            "detail": f"root v{version} not retrieved under ticket {ticket}: {exc}",
        }
    try:
        public, fp = r.public_key, r.fingerprint
        if not public or fingerprint_of(public) != fp:
            return {
                "name": name,
                "status": "failed",
                "detail": f"root v{version}: archived public key does not match its fingerprint",
            }
        kid = rpt.make_kid(version, fp)
        limit = ctx.policy.drills.recent_rpts_to_verify
        with ctx.transaction() as session:
            tokens = session.execute(
                select(RegulatoryProofToken.seq, RegulatoryProofToken.token)
                .where(RegulatoryProofToken.kid == kid)
                .order_by(RegulatoryProofToken.seq)
                .limit(limit)
            ).all()
        bad = [seq for seq, token in tokens if not _rpt_signed_by(token, kid, public)]
        if bad:
            return {
                "name": name,
                "status": "failed",
                "detail": f"root v{version} retrieved (approved by {', '.join(r.approvers)}); RPT seq "
                f"{bad[0]} does not verify under the archived key ({len(bad)} of {len(tokens)})",
            }
        return {
            "name": name,
            "status": "passed",
            "detail": f"root v{version} retrieved from the vault under ticket {ticket} (requested by "
            f"{requested_by}, approved by {', '.join(r.approvers)}); the {len(tokens)} oldest "
            f"retained RPT(s) it signed verify under the archived key {fp}",
        }
    finally:
        release(ctx, r.id)


def _rpt_signed_by(token: str, kid: str, public: bytes) -> bool:
    try:
        header, _payload, signature = rpt.decode(token)
    except rpt.RptError:
        return False
    signing_input = token.rsplit(".", 1)[0].encode("ascii")
    return header.get("kid") == kid and verify_signature(public, signing_input, signature)


# ---- nightly ---------------------------------------------------------------------------
# The archive step lives here, above the vault, because it also purges expired forensic
# imports (``purge_expired``): the vault never imports forensic.


@nightly_steps.nightly_step("vault_archive", order=16)
def _archive_step(ctx: KmsContext) -> dict:
    made = archive_pending(ctx)
    return {
        "archived": [target_for(c.key, c.version) for c in made if c.status == ARCHIVED],
        "unarchivable": [target_for(c.key, c.version) for c in made if c.status == UNARCHIVABLE],
        "failed": [f"{target_for(c.key, c.version)}: {c.reason}" for c in made if c.status == FAILED],
        "forensic_expired": purge_expired(ctx),
    }
