"""Nightly encrypted backups (B1, B3) and the restore-point destroy guard (T4).

``create`` streams ``pg_dump -Fc`` (or SQLite's online backup) plus everything under the
policy's ``backup.include_paths`` (``artifacts/kms/``) through tar → zstd → age into the
object store, with a per-object Object Lock retain-until set by its GFS class. The age
identity of each archive is sealed under the active ``backup`` key version
(``keystore.encrypt``, AAD = archive id) and stored in the manifest. The manifest (sizes,
sha256, key versions, tool versions, referenced data-key versions, canaries) is signed by
the active root key and stored beside the archive under the same lock.

A ``backups`` row is written as ``uploading`` first and becomes ``complete`` only after
the archive and manifest were both written and re-read (size/hash, signature); a run
killed mid-upload leaves ``uploading`` (shown as incomplete, later ``failed``) and no
visible archive (the object stores never publish a half-written object).

Key material: under the software keystore the archive carries ``artifacts/kms/keys``
sealed under the master key, which is NOT in the archive (it is escrowed separately;
restoring needs it). Under PKCS#11 the keys stay in the HSM; for SoftHSM2 the token
directory is added under ``hsm/softhsm-tokens/`` (other HSMs: use the vendor's backup).
"""

from __future__ import annotations

import base64
import functools
import json
import os
import secrets
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime, timedelta
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from sqlalchemy import and_, exists, select, text
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session, aliased

from ..envelope import data_keys as envelope
from ..foundation import nightly_steps, retry
from ..foundation.canonical import canonical_bytes
from ..foundation.clock import parse_time, utc
from ..foundation.context import KmsContext
from ..foundation.db.models import ACTIVE, REVOKED, ROTATED, Key, KeyVersion
from ..foundation.db.models_backup import (
    COMPLETE,
    FAILED,
    GOOD_STATUSES,
    PRUNED,
    UPLOADING,
    VERIFIED,
    Backup,
    BackupKeyRef,
)
from ..foundation.keystore import fingerprint, verify_signature
from ..foundation.objectstore import ObjectLocked, ObjectNotFound
from ..keys import lifecycle
from ..keys import manifest as root_manifest
from . import archive as archive_mod
from . import manifest_schema

MANIFEST_FORMAT = manifest_schema.FORMAT
ARCHIVE_FORMAT = manifest_schema.ARCHIVE_FORMAT
NIGHTLY, WEEKLY = "nightly", "weekly"
WEEKDAYS = ("monday", "tuesday", "wednesday", "thursday", "friday", "saturday", "sunday")


class BackupError(ValueError):
    """A refused or failed backup/restore operation; the message names the problem."""


@dataclass
class ArchiveInfo:
    archive_id: str
    archive_key: str
    manifest_key: str
    gfs_class: str
    created_at: datetime
    retain_until: datetime
    sha256: str | None
    size: int | None
    status: str
    backup_key_version: int
    root_kid: str | None
    db_kind: str
    successor_of: str | None = None
    seconds: float | None = None
    data_key_refs: list[dict] = field(default_factory=list)

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass
class BackupSource:
    """What to back up: the live KMS (default) or a restored staging copy (re-keyed successors)."""

    engine: Engine
    home: Path
    keystore: Any


# ---------------------------------------------------------------------------- GFS policy


def classify(ctx: KmsContext, at: datetime) -> str:
    return WEEKLY if WEEKDAYS[utc(at).weekday()] == ctx.policy.backup.weekly_on else NIGHTLY


def retain_until_for(ctx: KmsContext, gfs_class: str, created: datetime) -> datetime:
    days = ctx.policy.backup.keep_weekly_days if gfs_class == WEEKLY else ctx.policy.backup.keep_nightly
    return utc(created) + timedelta(days=days)


# ---------------------------------------------------------------------------- helpers


def _db_kind(engine: Engine) -> str:
    return engine.dialect.name


def _libpq_url(engine: Engine) -> str:
    return engine.url.set(drivername="postgresql").render_as_string(hide_password=False)


def _server_version(engine: Engine) -> str:
    with engine.connect() as conn:
        if _db_kind(engine) == "postgresql":
            return conn.execute(text("SHOW server_version")).scalar_one()
        return "sqlite " + sqlite3.sqlite_version


def tool_versions() -> dict:
    return dict(_tool_versions())


@functools.lru_cache(maxsize=1)
def _tool_versions() -> tuple:
    out = {"python": sys.version.split()[0]}
    for pkg in ("kms-pipelines", "pyrage", "zstandard", "sqlalchemy", "alembic"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = "unknown"
    for tool in ("pg_dump", "pg_restore"):
        path = shutil.which(tool)
        if path:
            out[tool] = subprocess.run([path, "--version"], capture_output=True, text=True).stdout.strip()
    return tuple(out.items())


def _envelope():
    return envelope


def _active(session, name: str) -> KeyVersion:
    key = lifecycle.get_key(session, name)
    v = lifecycle.active_version(key)
    if v is None:
        raise BackupError(f"key {name!r} has no active version (run `kms init`)")
    return v


def _data_key_refs(engine: Engine) -> list[dict]:
    """Live data-key versions the dump holds ciphertext under (DEK counts when the
    envelope module is installed; otherwise every live version)."""
    env = _envelope()
    out = []
    with Session(engine) as session:
        rows = session.execute(
            select(Key.name, KeyVersion.version, KeyVersion.state, KeyVersion.wrap_ref)
            .join(KeyVersion, KeyVersion.key_id == Key.id)
            .where(Key.key_class == "data", KeyVersion.state.in_((ACTIVE, ROTATED, REVOKED)))
            .order_by(Key.name, KeyVersion.version)
        ).all()
        for name, version, state, wrap_ref in rows:
            deks = None
            if env is not None:
                try:
                    deks = int(env.deks_on(session, name, version))
                except Exception:  # noqa: BLE001 - colleague's table not migrated yet: count unknown
                    session.rollback()
                    deks = None
            if deks == 0 and state != ACTIVE:
                continue  # nothing under it in this dump
            out.append({"key": name, "version": version, "state": state, "deks": deks, "wrap_ref": wrap_ref})
    return out


def _sign(ctx: KmsContext, session, manifest: dict) -> dict:
    root = _active(session, "root")
    doc = {"format": MANIFEST_FORMAT, "kid": root.fingerprint, "alg": "Ed25519", "manifest": manifest}
    sig = ctx.keystore.sign(root.sign_ref, canonical_bytes(manifest_schema.signed_part(doc)))
    return {**doc, "signature": base64.b64encode(sig).decode()}


def load_trust(spec: str | os.PathLike) -> list[bytes] | list[str]:
    """What an offline restore pins: a root fingerprint (``SHA256:<hex>``, obtained out of
    band), or a JSON file holding base64 raw Ed25519 public keys, as a list or as
    ``{"root_public_keys": [...]}`` (what ``kms backup trust-export`` writes)."""
    if isinstance(spec, str) and spec.startswith("SHA256:"):
        if len(spec) != 71 or any(c not in "0123456789abcdef" for c in spec[7:]):
            raise BackupError(f"--trust {spec[:30]}… is not a SHA256:<64 hex> root fingerprint")
        return [spec]
    try:
        data = json.loads(Path(spec).read_text())
    except (OSError, ValueError) as exc:
        raise BackupError(f"cannot read trust file {spec}: {exc}") from None
    keys = data.get("root_public_keys") if isinstance(data, dict) else data
    try:
        return [base64.b64decode(k["public_key"] if isinstance(k, dict) else k) for k in keys or []]
    except (ValueError, TypeError, KeyError):
        raise BackupError(f"trust file {spec} does not hold base64 public keys") from None


def trusted_root_keys(ctx: KmsContext) -> dict[str, bytes]:
    """fingerprint → public key of every root version whose signatures still count
    (revoked versions are excluded: a compromised key proves nothing)."""
    with ctx.transaction() as session:
        rows = session.execute(
            select(KeyVersion.fingerprint, KeyVersion.public_key)
            .join(Key, KeyVersion.key_id == Key.id)
            .where(Key.name == "root", KeyVersion.state != REVOKED, KeyVersion.public_key.is_not(None))
        ).all()
    # the query excludes a NULL public key and a root version with one has its fingerprint; the
    # check restates both for the type checker
    return {fp: bytes(pk) for fp, pk in rows if fp is not None and pk is not None}


def pinned_root_keys(ctx: KmsContext, trust: list[bytes] | list[str]) -> dict[str, bytes]:
    """fingerprint → public key of the pinned roots and of every root reached from them by
    the published old-signs-new manifests (``manifests/root/`` in the object store). A root
    whose successor's manifest records it as revoked is left out."""
    pinned: dict[str, bytes | None] = {k: None for k in trust if isinstance(k, str)}
    pinned.update({fingerprint(k): k for k in trust if isinstance(k, bytes)})
    docs: list[dict] = []
    if ctx.objects is not None:
        for info in ctx.objects.list(root_manifest.PREFIX):
            try:
                doc = json.loads(ctx.objects.get_bytes(info.key))
            except ValueError:
                continue  # not a manifest: it cannot extend trust
            if root_manifest.document_problem(doc) is None:
                docs.append(doc)
    reached = root_manifest.reached_from(docs, set(pinned))
    revoked = {d["previous"]["version"] for d in docs if d["previous"] and d["previous"]["status"] == REVOKED}
    out = {fp: pk for fp, pk in pinned.items() if pk is not None}
    for n, d in reached.items():
        if n not in revoked:
            out[d["fingerprint"]] = base64.b64decode(d["public_key"])
    return out


def verify_manifest(ctx: KmsContext, raw: bytes, *, trust: list[bytes] | list[str] | None = None) -> dict:
    """Parse, schema-check field by field, and verify a signed manifest; returns the inner
    manifest or raises BackupError naming the first bad field or the untrusted key."""
    try:
        doc = json.loads(raw)
    except ValueError:
        raise BackupError("manifest is malformed (not JSON)") from None
    problem = manifest_schema.schema_problem(doc)
    if problem:
        raise BackupError(f"manifest does not match the {MANIFEST_FORMAT} schema: {problem}")
    kid = doc["kid"]
    keys = pinned_root_keys(ctx, trust) if trust is not None else trusted_root_keys(ctx)
    public = keys.get(kid)
    if public is None:
        raise BackupError(
            f"manifest is signed by {kid}, which is not a trusted root key"
            + (
                " (neither pinned nor reached from the pinned root by root manifests)"
                if trust is not None
                else " of this KMS (pass --trust)"
            )
        )
    sig = base64.b64decode(doc["signature"])
    if not verify_signature(public, canonical_bytes(manifest_schema.signed_part(doc)), sig):
        raise BackupError("manifest signature does not verify: the manifest was altered or not signed by the root key")
    manifest = doc["manifest"]
    if manifest["root_kid"] != kid:
        raise BackupError(f"manifest names root {manifest['root_kid'][:23]}… but is signed by {kid[:23]}…")
    problem = _signed_outside_window(ctx, trust, kid, manifest["created_at"])
    if problem:
        raise BackupError(f"manifest signed by {kid[:23]}… {problem}")
    return manifest


def _signed_outside_window(ctx: KmsContext, trust, kid: str, created_at: str) -> str | None:
    """A root signs backups only while it is the active root: from its activation to the
    activation of its successor (or its revocation). The window comes from this KMS's
    key_versions, or, for a pinned restore, from the published root manifests."""
    try:
        at = utc(parse_time(created_at))
    except ValueError:
        return f"with an unreadable creation time {created_at!r}"
    start = end = None
    if trust is None:
        with ctx.transaction() as session:
            v = session.scalars(
                select(KeyVersion)
                .join(Key, KeyVersion.key_id == Key.id)
                .where(Key.name == "root", KeyVersion.fingerprint == kid)
            ).first()
            if v is None:
                return None
            start = v.activated_at
            ends = [t for t in (v.rotated_at, v.revoked_at, v.destroyed_at) if t is not None]
            end = min(ends) if ends else None
    elif ctx.objects is not None:
        docs = []
        for info in ctx.objects.list(root_manifest.PREFIX):
            try:
                d = json.loads(ctx.objects.get_bytes(info.key))
            except ValueError:
                continue
            if root_manifest.document_problem(d) is None:
                docs.append(d)
        mine = next((d for d in docs if d["fingerprint"] == kid), None)
        if mine is None:
            return None  # pinned by public key alone: no published window to hold it to
        start = parse_time(mine["valid_from"])
        nxt = [parse_time(d["valid_from"]) for d in docs if d["previous"] and d["previous"]["fingerprint"] == kid]
        end = min(nxt) if nxt else None
    slack = timedelta(seconds=1)
    if start is None or at < utc(start) - slack:
        return f"at {at.isoformat()}, before that root was active"
    if end is not None and at > utc(end) + slack:
        return f"at {at.isoformat()}, after that root was replaced at {utc(end).isoformat()}"
    return None


# ---------------------------------------------------------------------------- create


def _sqlite_snapshot(engine: Engine, dest: Path) -> None:
    if not engine.url.database or engine.url.database == ":memory:":  # sqlite3 would snapshot a new, empty database
        raise BackupError(f"the SQLite URL {engine.url!r} names no database file to snapshot")
    src = sqlite3.connect(engine.url.database)
    try:
        dst = sqlite3.connect(dest)
        with dst:
            src.backup(dst)
        dst.close()
    finally:
        src.close()


def _softhsm_token_dir(keystore) -> Path | None:
    if getattr(keystore, "backend", None) != "pkcs11":
        return None
    conf = os.environ.get("SOFTHSM2_CONF")
    if not conf or not Path(conf).is_file():
        return None
    for line in Path(conf).read_text().splitlines():
        if line.strip().startswith("directories.tokendir"):
            d = Path(line.split("=", 1)[1].strip())
            return d if d.is_dir() else None
    return None


def _walk_files(base: Path):
    for dirpath, dirnames, filenames in os.walk(base):
        dirnames.sort()
        for name in sorted(filenames):
            yield Path(dirpath) / name


def _produce(ctx: KmsContext, source: BackupSource, tmpdir: Path, procs: list):
    kind = _db_kind(source.engine)

    def produce(tar: archive_mod.TarSink) -> None:
        for rel in ctx.policy.backup.include_paths:
            base = source.home / rel
            if base.is_dir():
                for path in _walk_files(base):
                    tar.add_file(str(Path(rel) / path.relative_to(base)), str(path))
        token_dir = _softhsm_token_dir(source.keystore)
        if token_dir is not None:
            for path in _walk_files(token_dir):
                tar.add_file(f"hsm/softhsm-tokens/{path.relative_to(token_dir)}", str(path))
        if kind == "postgresql":
            proc = subprocess.Popen(
                ["pg_dump", "-Fc", "-Z", "0", "--no-owner", "-d", _libpq_url(source.engine)],
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                bufsize=archive_mod.PIPE_BUFFER,
            )
            procs.append(proc)
            assert proc.stdout is not None and proc.stderr is not None  # both are PIPEs, above
            tar.add_stream_in_parts(archive_mod.DB_PART_PREFIX, proc.stdout)
            proc.stdout.close()
            err = proc.stderr.read().decode(errors="replace").strip()
            if proc.wait() != 0:
                failure = BackupError(f"pg_dump failed: {err.splitlines()[-1] if err else proc.returncode}")
                fault = retry.dump_fault("pg_dump", err)
                if fault is not None:
                    raise failure from retry.TransientFault(fault)
                raise failure
        else:
            snap = tmpdir / "kms.sqlite3"
            _sqlite_snapshot(source.engine, snap)
            tar.add_file(archive_mod.DB_SQLITE, str(snap))
            snap.unlink()

    return produce


def create(
    ctx: KmsContext,
    *,
    gfs_class: str | None = None,
    source: BackupSource | None = None,
    successor_of: str | None = None,
    retain_until: datetime | None = None,
) -> ArchiveInfo:
    """Back up the KMS (or ``source``) into a locked, encrypted, signed archive.

    The whole backup is the unit retried after a lost database connection (pg_dump cannot
    resume): an interrupted attempt's archive is marked failed, never good, and the next
    attempt writes a new one. Object-store faults are retried per part inside the upload."""
    return retry.db_call(
        ctx,
        lambda: _create_once(
            ctx, gfs_class=gfs_class, source=source, successor_of=successor_of, retain_until=retain_until
        ),
        what="the backup",
        rerun="kms backup create",
    )


def _create_once(
    ctx: KmsContext,
    *,
    gfs_class: str | None,
    source: BackupSource | None,
    successor_of: str | None,
    retain_until: datetime | None,
) -> ArchiveInfo:
    started = time.perf_counter()
    source = source or BackupSource(ctx.engine, ctx.home, ctx.keystore)
    if ctx.objects is None:
        raise BackupError("no object store configured (KMS_OBJECT_STORE)")
    now = ctx.now()
    gfs = gfs_class or classify(ctx, now)
    if gfs not in (NIGHTLY, WEEKLY):
        raise BackupError(f"gfs class must be nightly or weekly, got {gfs!r}")
    retain = retain_until or retain_until_for(ctx, gfs, now)
    archive_id = f"{now.strftime('%Y%m%dT%H%M%SZ')}-{secrets.token_hex(4)}"
    prefix = f"backups/{now:%Y/%m/%d}/{archive_id}"
    archive_key, manifest_key = prefix + ".tar.zst.age", prefix + ".manifest.json"
    kind = _db_kind(source.engine)
    refs = _data_key_refs(source.engine)
    # An offline restore pinned to a root fingerprint reaches the signing root only
    # through published root manifests: make sure every root version has one.
    root_manifest.publish_pending(ctx)

    with ctx.transaction() as session:
        bkey = _active(session, "backup")
        root = _active(session, "root")
        identity, recipient = archive_mod.new_identity()
        sealed = ctx.keystore.encrypt(bkey.wrap_ref, identity.encode(), aad=archive_id.encode())
        del identity
        pred_id = None
        if successor_of:
            pred = session.scalars(select(Backup).where(Backup.archive_id == successor_of)).first()
            if pred is None:
                raise BackupError(f"no backup {successor_of!r}")
            pred_id = pred.id
        row = Backup(
            archive_id=archive_id,
            archive_key=archive_key,
            manifest_key=manifest_key,
            gfs_class=gfs,
            created_at=now,
            retain_until=retain,
            status=UPLOADING,
            db_kind=kind,
            backup_key_version=bkey.version,
            root_kid=root.fingerprint,
            successor_of=pred_id,
        )
        session.add(row)
        session.flush()
        session.add(BackupKeyRef(backup_id=row.id, key_name="backup", version=bkey.version, role="archive"))
        for r in refs:
            session.add(
                BackupKeyRef(backup_id=row.id, key_name=r["key"], version=r["version"], role="data", deks=r["deks"])
            )
        backup_row_id = row.id

    canaries = []
    for r in refs:
        if not r["wrap_ref"]:
            continue
        plain = secrets.token_bytes(32)
        aad = f"kms-canary:{archive_id}:{r['key']}:v{r['version']}".encode()
        ct = source.keystore.encrypt(r["wrap_ref"], plain, aad=aad)
        canaries.append(
            {
                "key": r["key"],
                "version": r["version"],
                "aad": aad.decode(),
                "ciphertext": base64.b64encode(ct).decode(),
                "plaintext_sha256": __import__("hashlib").sha256(plain).hexdigest(),
            }
        )

    procs: list = []

    def abort() -> None:
        for p in procs:
            if p.poll() is None:
                p.kill()

    tmpdir = Path(tempfile.mkdtemp(prefix="kms-backup-"))
    try:
        stream = archive_mod.encrypted_archive(
            _produce(ctx, source, tmpdir, procs),
            recipient,
            mtime=now.timestamp(),
            level=ctx.policy.backup.compression_level,
            threads=max(1, min(4, os.cpu_count() or 1)),
            on_abort=abort,
        )
        try:
            with stream:
                info = ctx.objects.put(
                    archive_key,
                    stream,
                    retain_until=retain,
                    content_type="application/vnd.kms.backup+age",
                    metadata={"archive-id": archive_id, "gfs-class": gfs},
                )
        except Exception as exc:
            _mark(ctx, backup_row_id, FAILED, detail=f"upload failed: {exc}")
            raise BackupError(f"backup {archive_id} failed during upload: {exc}") from exc
        sha, size = stream.sha256.hexdigest(), stream.size
        if info.sha256 and info.sha256 != sha:
            _mark(ctx, backup_row_id, FAILED, detail="store hash differs from the stream hash")
            raise BackupError(f"backup {archive_id}: object store recorded a different sha256")

        manifest = {
            "archive_id": archive_id,
            "archive_key": archive_key,
            "archive_format": ARCHIVE_FORMAT,
            "archive_sha256": sha,
            "archive_size": size,
            "created_at": now.isoformat(),
            "gfs_class": gfs,
            "retain_until": retain.isoformat(),
            "backup_key": {"name": "backup", "version": bkey.version},
            "sealed_identity": base64.b64encode(sealed).decode(),
            "recipient": recipient,
            "root_kid": root.fingerprint,
            "root_version": root.version,
            "database": {
                "kind": kind,
                "server_version": _server_version(source.engine),
                "format": "pg_dump -Fc -Z0 in parts" if kind == "postgresql" else "sqlite online backup",
            },
            "keystore_backend": getattr(source.keystore, "backend", "unknown"),
            "tool_versions": tool_versions(),
            "data_key_versions": [{k: r[k] for k in ("key", "version", "state", "deks")} for r in refs],
            "canaries": canaries,
            "include_paths": list(ctx.policy.backup.include_paths),
            "successor_of": successor_of,
        }
        with ctx.transaction() as session:
            signed = _sign(ctx, session, manifest)
        raw = json.dumps(signed, indent=1, sort_keys=True).encode()
        try:
            ctx.objects.put(
                manifest_key,
                raw,
                retain_until=retain,
                content_type="application/json",
                metadata={"archive-id": archive_id},
            )
            # Re-read both before calling the archive good.
            head = ctx.objects.head(archive_key)
            if head.size != size or (head.sha256 and head.sha256 != sha):
                raise BackupError("archive as stored differs from what was uploaded")
            verify_manifest(ctx, ctx.objects.get_bytes(manifest_key))
        except Exception as exc:
            _mark(ctx, backup_row_id, FAILED, detail=f"manifest/re-read failed: {exc}")
            raise BackupError(f"backup {archive_id} failed after upload: {exc}") from exc
    finally:
        abort()
        shutil.rmtree(tmpdir, ignore_errors=True)

    with ctx.transaction() as session:
        row = _backup_row(session, backup_row_id)
        row.sha256, row.size, row.status, row.completed_at = sha, size, COMPLETE, ctx.now()
    return ArchiveInfo(
        archive_id,
        archive_key,
        manifest_key,
        gfs,
        now,
        retain,
        sha,
        size,
        COMPLETE,
        bkey.version,
        root.fingerprint,
        kind,
        successor_of,
        round(time.perf_counter() - started, 3),
        [{k: r[k] for k in ("key", "version", "deks")} for r in refs],
    )


def _backup_row(session: Session, row_id: int) -> Backup:
    row = session.get(Backup, row_id)
    if row is None:  # catalogue rows are never deleted, only marked (failed, pruned)
        raise BackupError(f"backup catalogue row {row_id} disappeared")
    return row


def _mark(ctx: KmsContext, row_id: int, status: str, detail: str | None = None) -> None:
    try:
        with ctx.transaction() as session:
            row = _backup_row(session, row_id)
            row.status = status
            if detail:
                row.detail = detail[:2000]
    except Exception:  # noqa: BLE001 - best effort; the row stays 'uploading' = incomplete
        pass


# ---------------------------------------------------------------------------- catalogue


def get_backup(session, archive_id: str | None = None) -> Backup:
    """A backup by archive id (or its object key), or the newest good one when None."""
    q = select(Backup)
    if archive_id:
        q = q.where((Backup.archive_id == archive_id) | (Backup.archive_key == archive_id))
    else:
        q = q.where(Backup.status.in_(GOOD_STATUSES)).order_by(Backup.created_at.desc(), Backup.id.desc())
    row = session.scalars(q).first()
    if row is None:
        raise BackupError(f"no backup {archive_id!r}" if archive_id else "no complete backup exists yet")
    return row


def info_of(row: Backup, successor_archive: str | None = None) -> ArchiveInfo:
    return ArchiveInfo(
        row.archive_id,
        row.archive_key,
        row.manifest_key,
        row.gfs_class,
        utc(row.created_at),
        utc(row.retain_until),
        row.sha256,
        row.size,
        row.status,
        row.backup_key_version,
        row.root_kid,
        row.db_kind,
        successor_archive,
    )


def list_backups(ctx: KmsContext, *, include_pruned: bool = False) -> list[dict]:
    """Each archive's class, age, lock and verification state (``kms backup list``)."""
    now = ctx.now()
    out = []
    with ctx.transaction() as session:
        rows = session.scalars(select(Backup).order_by(Backup.created_at.desc(), Backup.id.desc())).all()
        by_id = {r.id: r for r in rows}
        for r in rows:
            if r.status == PRUNED and not include_pruned:
                continue
            retain = utc(r.retain_until)
            out.append(
                {
                    "archive_id": r.archive_id,
                    "gfs_class": r.gfs_class,
                    "status": r.status,
                    "state": "incomplete" if r.status in (UPLOADING, FAILED) else r.status,
                    "created_at": utc(r.created_at),
                    "age_days": round((now - utc(r.created_at)).total_seconds() / 86400, 2),
                    "retain_until": retain,
                    "locked": retain > now and r.status != PRUNED,
                    "verified": r.status == VERIFIED,
                    "verified_at": utc(r.verified_at) if r.verified_at else None,
                    "size": r.size,
                    "sha256": r.sha256,
                    "backup_key_version": r.backup_key_version,
                    "successor_of": by_id[r.successor_of].archive_id if r.successor_of in by_id else None,
                    "archive_key": r.archive_key,
                }
            )
    return out


def verify_archive(ctx: KmsContext, archive_id: str | None = None) -> dict:
    """Re-read an archive end to end: manifest signature, size and sha256; marks it verified."""
    with ctx.transaction() as session:
        row = get_backup(session, archive_id)
        akey, mkey, aid = row.archive_key, row.manifest_key, row.archive_id
        if row.status not in GOOD_STATUSES:
            raise BackupError(f"backup {aid} is {row.status}, not complete")
    manifest = verify_manifest(ctx, ctx.objects.get_bytes(mkey))
    with ctx.objects.open(akey) as f:
        sha, size = archive_mod.hash_stream(f)
    if (sha, size) != (manifest["archive_sha256"], manifest["archive_size"]):
        raise BackupError(f"archive {aid} does not match its signed manifest (sha256/size differ)")
    head = ctx.objects.head(akey)
    locked = head.locked_at(ctx.now()) and head.lock_mode == "COMPLIANCE"
    mark_verified(ctx, aid)
    return {
        "archive_id": aid,
        "sha256": sha,
        "size": size,
        "manifest_verifies": True,
        "locked": locked,
        "retain_until": head.retain_until,
    }


def mark_verified(ctx: KmsContext, archive_id: str) -> None:
    with ctx.transaction() as session:
        row = get_backup(session, archive_id)
        if row.status in GOOD_STATUSES:
            row.status, row.verified_at = VERIFIED, ctx.now()


def mark_stale_uploads(ctx: KmsContext) -> list[str]:
    """Uploads still 'uploading' after ``stale_upload_hours`` were killed: mark them failed."""
    cutoff = ctx.now() - timedelta(hours=ctx.policy.backup.stale_upload_hours)
    with ctx.transaction() as session:
        rows = session.scalars(select(Backup).where(Backup.status == UPLOADING, Backup.created_at < cutoff)).all()
        for r in rows:
            r.status, r.detail = FAILED, "upload never completed (process killed?)"
        return [r.archive_id for r in rows]


@dataclass
class PruneResult:
    deleted: list[str]
    kept: list[dict]
    failed_uploads: list[str]


def gfs_keep_set(ctx: KmsContext, rows: Sequence[Backup], now: datetime) -> dict[int, str]:
    """id → why it is kept: the newest ``keep_nightly`` archives, weekly archives younger
    than ``keep_weekly_days``, and the newest verified archive. Successors inherit their
    predecessor's place."""
    p = ctx.policy.backup
    originals = sorted(
        (r for r in rows if r.successor_of is None), key=lambda r: (utc(r.created_at), r.id), reverse=True
    )
    keep: dict[int, str] = {}
    for r in originals[: p.keep_nightly]:
        keep[r.id] = f"one of the latest {p.keep_nightly}"
    for r in originals:
        if r.gfs_class == WEEKLY and utc(r.created_at) > now - timedelta(days=p.keep_weekly_days):
            keep.setdefault(r.id, f"weekly within {p.keep_weekly_days} days")
    verified = [r for r in sorted(rows, key=lambda r: (utc(r.created_at), r.id), reverse=True) if r.status == VERIFIED]
    if verified:
        keep.setdefault(verified[0].id, "newest verified archive")
    for r in rows:
        if r.successor_of in keep:
            keep.setdefault(r.id, "re-keyed successor of a kept archive")
    return keep


def prune(ctx: KmsContext, *, dry_run: bool = False) -> PruneResult:
    """Delete archives outside the GFS set whose lock has lapsed (B3)."""
    failed = [] if dry_run else mark_stale_uploads(ctx)
    now = ctx.now()
    with ctx.transaction() as session:
        rows = session.scalars(select(Backup).where(Backup.status.in_(GOOD_STATUSES))).all()
        keep = gfs_keep_set(ctx, rows, now)
        plan = [(r.id, r.archive_id, r.archive_key, r.manifest_key, utc(r.retain_until)) for r in rows]
    deleted, kept = [], []
    for row_id, aid, akey, mkey, retain in sorted(plan, key=lambda p: p[4]):
        if row_id in keep:
            kept.append({"archive_id": aid, "reason": keep[row_id]})
            continue
        if retain > now:
            kept.append({"archive_id": aid, "reason": f"locked until {retain.isoformat()}"})
            continue
        if dry_run:
            deleted.append(aid)
            continue
        try:
            for key in (akey, mkey):
                try:
                    ctx.objects.delete(key)
                except ObjectNotFound:
                    pass
        except ObjectLocked as exc:
            kept.append({"archive_id": aid, "reason": f"store refuses: {exc}"})
            continue
        with ctx.transaction() as session:
            r = _backup_row(session, row_id)
            r.status, r.pruned_at = PRUNED, now
        deleted.append(aid)
    return PruneResult(deleted, kept, failed)


def freshness(ctx: KmsContext) -> dict:
    """The newest good archive and whether it is within ``freshness_hours``."""
    now = ctx.now()
    with ctx.transaction() as session:
        try:
            row = get_backup(session)
        except BackupError:
            return {"fresh": False, "archive_id": None, "age_hours": None}
        age = (now - utc(row.created_at)).total_seconds() / 3600
        return {
            "fresh": age <= ctx.policy.backup.freshness_hours,
            "archive_id": row.archive_id,
            "age_hours": round(age, 2),
            "status": row.status,
        }


def export_trust(ctx: KmsContext) -> dict:
    """The trust file for offline restores: every root public key this KMS still trusts."""
    return {
        "root_public_keys": [
            {"fingerprint": fp, "public_key": base64.b64encode(pk).decode()}
            for fp, pk in trusted_root_keys(ctx).items()
        ]
    }


# ---------------------------------------------------------------------------- T4 guard


def _unsucceeded_refs(session, key_name: str, version: int) -> list[str]:
    succ = aliased(Backup)
    q = (
        select(Backup.archive_id)
        .join(BackupKeyRef, BackupKeyRef.backup_id == Backup.id)
        .where(
            BackupKeyRef.key_name == key_name,
            BackupKeyRef.version == version,
            Backup.status.in_(GOOD_STATUSES + (UPLOADING,)),
            ~exists().where(and_(succ.successor_of == Backup.id, succ.status.in_(GOOD_STATUSES))),
        )
        .order_by(Backup.created_at)
    )
    return list(dict.fromkeys(session.scalars(q).all()))


@lifecycle.destroy_guard("restore_points")
def _restore_points_guard(session, ctx, key, version) -> str | None:
    ids = _unsucceeded_refs(session, key.name, version.version)
    if not ids:
        return None
    shown = ", ".join(ids[:3]) + (f" and {len(ids) - 3} more" if len(ids) > 3 else "")
    return (
        f"{len(ids)} retained backup(s) reference {key.name} v{version.version} without a re-keyed "
        f"successor ({shown}); run `kms backup rekey {key.name} {version.version}`"
    )


# ---------------------------------------------------------------------------- nightly


@nightly_steps.nightly_step("backup", order=50)
def _nightly_backup(ctx: KmsContext) -> dict:
    info = create(ctx)
    verified = verify_archive(ctx, info.archive_id)
    return {
        "archive_id": info.archive_id,
        "gfs_class": info.gfs_class,
        "size": info.size,
        "verified": verified["manifest_verifies"],
    }


@nightly_steps.nightly_step("backup_retention", order=60)
def _nightly_retention(ctx: KmsContext) -> dict:
    result = prune(ctx)
    return {"deleted": len(result.deleted), "kept": len(result.kept)}
