"""Restore an archive into a target database (B2), refusing anything unverified.

Order, and why: (1) the manifest signature is verified against a trusted root public
key -- this KMS's own key_versions, or a pinned trust file (``--trust``, written by
``kms backup trust-export``) for an offline restore at another site; (2) the archive
is streamed once and its size + sha256 compared with the signed manifest; (3) the
target is checked to be a new, empty database that is not the live one. Only then is
anything written: the archive is decrypted (age identity unsealed with the backup key
version named in the manifest), decompressed, the artifacts unpacked under the target
home and the dump fed to ``pg_restore --clean --if-exists --no-owner --exit-on-error
--single-transaction`` (or the SQLite file written). Then: Alembic migrations,
ledger verification, ``rpt.verify_chain`` over the recent RPTs, and one canary per
live data-key version decrypted with the restored key material.

A tampered or truncated archive or manifest fails at (1)/(2): the target is untouched.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import os
import secrets
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime
from pathlib import Path, PurePosixPath

from sqlalchemy import create_engine, inspect, select, text
from sqlalchemy.engine import make_url

from ..foundation import db as db_mod
from ..foundation.context import KmsContext
from ..foundation.db.models import Key, KeyVersion
from ..foundation.keystore.software import SoftwareKeyStore
from ..foundation.objectstore import ObjectNotFound
from ..ledger import ledger, rpt_verify
from . import archive as archive_mod
from .backups import BackupError, get_backup, load_trust, mark_verified, verify_manifest

PASSED, FAILED, SKIPPED = "passed", "failed", "skipped"


@dataclass
class Check:
    name: str
    status: str
    detail: str = ""


@dataclass
class RestoreReport:
    archive_id: str
    target: str
    started_at: datetime
    seconds: float = 0.0
    restore_seconds: float = 0.0
    checks: list[Check] = field(default_factory=list)
    manifest: dict = field(default_factory=dict, repr=False)

    @property
    def ok(self) -> bool:
        return bool(self.checks) and all(c.status != FAILED for c in self.checks)

    def failed(self) -> list[Check]:
        return [c for c in self.checks if c.status == FAILED]

    def summary(self) -> str:
        return "; ".join(
            f"{c.name}: {c.status}" + (f" ({c.detail})" if c.detail and c.status != PASSED else "") for c in self.checks
        )

    def as_dict(self) -> dict:
        d = asdict(self)
        d.pop("manifest")
        d["ok"] = self.ok
        return d


ARCHIVE_SUFFIX = ".tar.zst.age"


def _manifest_key_for(archive_key: str) -> str:
    suffix = ARCHIVE_SUFFIX
    if not archive_key.endswith(suffix):
        raise BackupError(f"{archive_key!r} is not an archive key (…{suffix})")
    return archive_key[: -len(suffix)] + ".manifest.json"


class _CopiedArchive:
    """A read-only view of an archive file and its manifest copied out of the store, under
    the object keys the signed manifest names, so they are verified like stored objects."""

    def __init__(self, files: dict[str, Path]):
        self._files = files

    def _path(self, key: str) -> Path:
        if key not in self._files:
            raise ObjectNotFound(f"{key} is not among the copied files")
        return self._files[key]

    def get_bytes(self, key: str) -> bytes:
        return self._path(key).read_bytes()

    def open(self, key: str):
        return self._path(key).open("rb")


def archive_from_path(ctx: KmsContext, archive: str) -> tuple[KmsContext, str]:
    """Accept a path to an archive file, the way the policy spells `scripts/restore.sh <archive>`.
    Inside the local object store it is that object. Elsewhere (a copy fetched out of S3)
    it is read where it lies, with its signed manifest beside it, and verified exactly as
    a stored object would be. Anything else (an id, an object key) is returned unchanged."""
    path = Path(archive)
    if not archive.endswith(ARCHIVE_SUFFIX) or not path.is_file():
        return ctx, archive
    real = path.resolve()
    root = getattr(ctx.objects, "root", None)
    if root is not None and real.is_relative_to(Path(root).resolve()):
        return ctx, real.relative_to(Path(root).resolve()).as_posix()
    manifest = real.with_name(real.name[: -len(ARCHIVE_SUFFIX)] + ".manifest.json")
    if not manifest.is_file():
        raise BackupError(
            f"{archive}: its signed manifest {manifest.name} is not beside it; "
            f"copy both, or pass the archive id (`kms backup list`)"
        )
    try:
        archive_key = json.loads(manifest.read_bytes())["manifest"]["archive_key"]  # a name only: verified next
    except (ValueError, KeyError, TypeError):
        raise BackupError(f"{manifest}: not a backup manifest") from None
    if not isinstance(archive_key, str) or not archive_key.endswith(ARCHIVE_SUFFIX):
        raise BackupError(f"{manifest}: not a backup manifest")
    view = _CopiedArchive({archive_key: real, _manifest_key_for(archive_key): manifest})
    return replace(ctx, objects=view), archive_key


def _locate(ctx: KmsContext, archive: str) -> tuple[str, str]:
    """(archive_key, manifest_key) from an archive id or object key."""
    try:
        with ctx.transaction() as session:
            row = get_backup(session, archive)
            return row.archive_key, row.manifest_key
    except BackupError:
        if archive.endswith(".tar.zst.age"):  # offline: an object key not in this catalogue
            return archive, _manifest_key_for(archive)
        raise


def _redact(url: str) -> str:
    return db_mod.engine.redacted(db_mod.normalize_url(url))


def _same_database(a: str, b: str) -> bool:
    ua, ub = make_url(db_mod.normalize_url(a)), make_url(db_mod.normalize_url(b))
    return (ua.get_backend_name(), ua.host, ua.port, ua.database) == (
        ub.get_backend_name(),
        ub.host,
        ub.port,
        ub.database,
    )


def _check_target(ctx: KmsContext, target_url: str, db_kind: str) -> None:
    target = make_url(db_mod.normalize_url(target_url))
    live = ctx.engine.url.render_as_string(hide_password=False)
    if _same_database(live, target_url):
        raise BackupError("refusing to restore over the live KMS database; restore into a new (staging) database")
    if target.get_backend_name() != db_kind:
        raise BackupError(f"archive holds a {db_kind} database; target is {target.get_backend_name()}")
    if db_kind == "sqlite":
        # an in-memory target would vanish with the restore's engine, and ":memory:" would be
        # written as a file of that name in the working directory
        if not target.database or target.database == ":memory:":
            raise BackupError(f"target SQLite URL {target_url} names no file; restore into a new file")
        path = Path(target.database)
        if path.exists() and path.stat().st_size > 0:
            raise BackupError(f"target SQLite file {path} already exists; restore into a new file")
        return
    engine = create_engine(db_mod.normalize_url(target_url))
    try:
        try:
            tables = inspect(engine).get_table_names()
        except Exception as exc:  # noqa: BLE001
            raise BackupError(
                f"target database {_redact(target_url)} is unreachable: {str(exc).splitlines()[0][:200]}"
            ) from None
        if tables:
            raise BackupError(
                f"target database {_redact(target_url)} is not empty ({len(tables)} tables); "
                f"restore into a new database"
            )
    finally:
        engine.dispose()


def verify_before_restore(
    ctx: KmsContext, archive: str, *, trust: list[bytes] | list[str] | None = None
) -> tuple[dict, str]:
    """Steps (1) and (2): signed manifest, then the archive's size and sha256. Returns
    (manifest, archive_key); raises BackupError naming what does not match."""
    archive_key, manifest_key = _locate(ctx, archive)
    try:
        raw = ctx.objects.get_bytes(manifest_key)
    except ObjectNotFound:
        raise BackupError(f"manifest {manifest_key} not found: refusing to restore an archive without one") from None
    manifest = verify_manifest(ctx, raw, trust=trust)
    if manifest.get("archive_key") != archive_key:
        raise BackupError("manifest belongs to a different archive")
    try:
        with ctx.objects.open(archive_key) as f:
            sha, size = archive_mod.hash_stream(f)
    except ObjectNotFound:
        raise BackupError(f"archive {archive_key} not found") from None
    if size != manifest["archive_size"]:
        raise BackupError(
            f"archive {manifest['archive_id']} is {size} bytes, its signed manifest says "
            f"{manifest['archive_size']}: truncated or altered; nothing restored"
        )
    if sha != manifest["archive_sha256"]:
        raise BackupError(
            f"archive {manifest['archive_id']} sha256 does not match its signed manifest: altered; nothing restored"
        )
    return manifest, archive_key


def _unseal_identity(ctx: KmsContext, manifest: dict) -> str:
    version = manifest["backup_key"]["version"]
    with ctx.transaction() as session:
        wrap_ref = session.scalars(
            select(KeyVersion.wrap_ref)
            .join(Key, KeyVersion.key_id == Key.id)
            .where(Key.name == "backup", KeyVersion.version == version)
        ).first()
    if not wrap_ref:
        raise BackupError(f"backup key v{version} that sealed this archive is not in this KMS")
    sealed = base64.b64decode(manifest["sealed_identity"])
    try:
        return ctx.keystore.decrypt(wrap_ref, sealed, aad=manifest["archive_id"].encode()).decode()
    except Exception as exc:  # noqa: BLE001 - keystore errors name no material
        raise BackupError(f"cannot unseal the archive key with backup v{version}: {exc}") from None


def _safe_member(name: str, allowed: tuple[str, ...]) -> PurePosixPath | None:
    p = PurePosixPath(name)
    if p.is_absolute() or ".." in p.parts or not p.parts:
        raise BackupError(f"archive member {name!r} has an unsafe path")
    return p if any(str(p).startswith(a.rstrip("/") + "/") for a in allowed) else None


def _software_master(keystore):
    """The software keystore's sealing key object (possibly behind an auditing wrapper)."""
    seen = 0
    while keystore is not None and seen < 5:
        if getattr(keystore, "backend", None) == "software" and hasattr(keystore, "_master"):
            return keystore._master
        keystore = next(
            (
                getattr(keystore, a)
                for a in ("inner", "_inner", "wrapped", "_wrapped", "keystore", "_keystore", "backend_store")
                if hasattr(keystore, a)
            ),
            None,
        )
        seen += 1
    return None


def restored_keystore(ctx: KmsContext, home: Path):
    """Keystore over the restored key material: the archived software key files opened
    with this site's master key (escrowed separately, never in the archive); under
    PKCS#11 the live token (HSM objects are not in the archive)."""
    master = _software_master(ctx.keystore)
    keys_dir = home / "artifacts" / "kms" / "keys"
    if master is not None and keys_dir.is_dir():
        ks = SoftwareKeyStore.__new__(SoftwareKeyStore)
        SoftwareKeyStore.__init__(ks, keys_dir, master_key=b"\0" * 32)
        ks._master = master
        return ks
    return ctx.keystore


def staging_context(ctx: KmsContext, url: str, home: Path) -> KmsContext:
    return replace(
        ctx,
        engine=db_mod.make_engine(url),
        keystore=restored_keystore(ctx, home),
        home=home,
        actor=f"{ctx.actor}:staging",
    )


def restore(
    ctx: KmsContext,
    archive: str,
    target_url: str,
    *,
    target_home: str | os.PathLike | None = None,
    trust: list[bytes] | list[str] | str | None = None,
) -> RestoreReport:
    """Verify, then restore ``archive`` (file path, id or object key) into ``target_url`` and check it."""
    started, t0 = ctx.now(), time.perf_counter()
    ctx, archive = archive_from_path(ctx, archive)
    if isinstance(trust, (str, os.PathLike)):
        trust = load_trust(trust)
    manifest, archive_key = verify_before_restore(ctx, archive, trust=trust)
    kind = manifest["database"]["kind"]
    _check_target(ctx, target_url, kind)
    identity = _unseal_identity(ctx, manifest)
    report = RestoreReport(manifest["archive_id"], _redact(target_url), started, manifest=manifest)
    report.checks.append(Check("manifest_signature", PASSED, f"signed by {manifest['root_kid']}"))
    report.checks.append(Check("archive_sha256", PASSED, manifest["archive_sha256"]))

    home = Path(target_home) if target_home else Path(tempfile.mkdtemp(prefix="kms-restore-"))
    home.mkdir(parents=True, exist_ok=True)
    allowed = tuple(manifest.get("include_paths") or ["artifacts/kms"]) + ("hsm",)
    target = make_url(db_mod.normalize_url(target_url))
    pg_proc: subprocess.Popen[bytes] | None = None
    sqlite_written = False
    try:
        with ctx.objects.open(archive_key) as src:
            for member, data in archive_mod.iter_archive(src, identity):
                name = member.name
                if name.startswith(archive_mod.DB_PART_PREFIX):
                    if pg_proc is None:
                        pg_proc = subprocess.Popen(
                            [
                                "pg_restore",
                                "--clean",
                                "--if-exists",
                                "--no-owner",
                                "--exit-on-error",
                                "--single-transaction",
                                "-d",
                                target.set(drivername="postgresql").render_as_string(hide_password=False),
                            ],
                            stdin=subprocess.PIPE,
                            stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE,
                        )
                    assert pg_proc.stdin is not None  # a PIPE, above
                    shutil.copyfileobj(data, pg_proc.stdin, archive_mod.PIPE_BUFFER)
                elif name == archive_mod.DB_SQLITE:
                    assert target.database  # _check_target refused a SQLite URL without a file
                    with open(target.database, "wb") as out:
                        shutil.copyfileobj(data, out, archive_mod.PIPE_BUFFER)
                    sqlite_written = True
                else:
                    rel = _safe_member(name, allowed)
                    if rel is None:
                        continue
                    dest = home / rel
                    dest.parent.mkdir(parents=True, exist_ok=True)
                    with open(dest, "wb") as out:
                        shutil.copyfileobj(data, out)
                    os.chmod(dest, 0o600)
        if pg_proc is not None:
            assert pg_proc.stdin is not None and pg_proc.stderr is not None  # PIPEs, above
            pg_proc.stdin.close()
            err = pg_proc.stderr.read().decode(errors="replace").strip()
            if pg_proc.wait() != 0:
                raise BackupError(f"pg_restore failed: {err.splitlines()[-1] if err else pg_proc.returncode}")
        elif not sqlite_written:
            raise BackupError("archive holds no database dump")
    except archive_mod.ArchiveError as exc:
        raise BackupError(str(exc)) from None
    except BrokenPipeError:
        err = pg_proc.stderr.read().decode(errors="replace").strip() if pg_proc and pg_proc.stderr else ""
        raise BackupError(f"pg_restore failed: {err.splitlines()[-1] if err else 'exited early'}") from None
    finally:
        if pg_proc is not None and pg_proc.poll() is None:
            pg_proc.kill()
            pg_proc.wait()
    report.restore_seconds = round(time.perf_counter() - t0, 3)
    report.checks.append(Check("restore", PASSED, f"{kind} restored in {report.restore_seconds}s"))

    staged = staging_context(ctx, target_url, home)
    try:
        _post_checks(ctx, staged, manifest, report)
    finally:
        staged.engine.dispose()
    report.seconds = round(time.perf_counter() - t0, 3)
    if report.ok:
        try:
            mark_verified(ctx, manifest["archive_id"])
        except BackupError:
            pass  # an offline archive not in this catalogue
    return report


def _run_check(report: RestoreReport, name: str, fn) -> None:
    try:
        status, detail = fn()
    except Exception as exc:  # noqa: BLE001 - a check that raises has failed; say why
        status, detail = FAILED, f"{type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}"
    report.checks.append(Check(name, status, detail))


def _post_checks(ctx: KmsContext, staged: KmsContext, manifest: dict, report: RestoreReport) -> None:
    def migrations():
        db_mod.upgrade(staged.engine)
        return PASSED, f"at revision {db_mod.current_revision(staged.engine)}"

    def ledger_chain():
        r = ledger.verify(staged.engine)
        return (PASSED, f"{r.count} entries") if r.ok else (FAILED, f"first bad seq {r.first_bad_seq}: {r.problem}")

    def rpt_chain():
        # A restore point is older than the live chain: the newest checkpoint in the shared
        # object store describes the live head, so comparing against it would report the
        # restored chain as truncated. Links, signatures and signing windows are checked.
        r = rpt_verify.verify_chain(staged, last=ctx.policy.drills.recent_rpts_to_verify, against_checkpoint=False)
        return (PASSED, f"{r.count} recent RPTs") if r.ok else (FAILED, f"first bad seq {r.first_bad_seq}: {r.problem}")

    def canaries():
        items = manifest.get("canaries") or []
        if not items:
            return SKIPPED, "no live data-key versions at backup time"
        with staged.transaction() as session:
            refs = {
                (n, v): r
                for n, v, r in session.execute(
                    select(Key.name, KeyVersion.version, KeyVersion.wrap_ref).join(
                        KeyVersion, KeyVersion.key_id == Key.id
                    )
                )
            }
        bad = []
        for c in items:
            ref = refs.get((c["key"], c["version"]))
            try:
                plain = staged.keystore.decrypt(ref, base64.b64decode(c["ciphertext"]), aad=c["aad"].encode())
                if hashlib.sha256(plain).hexdigest() != c["plaintext_sha256"]:
                    bad.append(f"{c['key']} v{c['version']}: wrong plaintext")
            except Exception as exc:  # noqa: BLE001
                bad.append(f"{c['key']} v{c['version']}: {type(exc).__name__}")
        if bad:
            return FAILED, "; ".join(bad)
        return PASSED, f"{len(items)} data-key versions decrypt"

    _run_check(report, "migrations", migrations)
    _run_check(report, "ledger_chain", ledger_chain)
    _run_check(report, "rpt_chain", rpt_chain)
    _run_check(report, "canaries", canaries)


# ---------------------------------------------------------------------------- staging


def staging_server_url(ctx: KmsContext, staging_url: str | None = None) -> str | None:
    """The PostgreSQL server that hosts staging databases: ``KMS_DRILL_STAGING_URL`` or the
    live KMS database's server. None for an embedded SQLite KMS."""
    url = staging_url or os.environ.get("KMS_DRILL_STAGING_URL")
    if url:
        return db_mod.normalize_url(url)
    if ctx.engine.dialect.name == "postgresql":
        return ctx.engine.url.set(database="postgres").render_as_string(hide_password=False)
    return None


@contextlib.contextmanager
def staging_target(
    ctx: KmsContext, staging_url: str | None = None, *, label: str = "staging", keep: bool = False
) -> Iterator[tuple[str, Path]]:
    """A new, empty staging database (``kms_<label>_<date>_<rand>``) and home directory;
    dropped afterwards unless ``keep``."""
    stamp = ctx.now().strftime("%Y%m%d")
    name = f"kms_{label}_{stamp}_{secrets.token_hex(3)}"
    home = Path(tempfile.mkdtemp(prefix=f"kms-{label}-"))
    server = staging_server_url(ctx, staging_url)
    admin = None
    try:
        if server is None:
            url = f"sqlite:///{home / (name + '.db')}"
        else:
            admin = create_engine(server, isolation_level="AUTOCOMMIT")
            with admin.connect() as conn:
                conn.execute(text(f'CREATE DATABASE "{name}"'))
            url = make_url(server).set(database=name).render_as_string(hide_password=False)
        yield url, home
    finally:
        if not keep:
            if admin is not None:
                with admin.connect() as conn:
                    conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
            shutil.rmtree(home, ignore_errors=True)
        if admin is not None:
            admin.dispose()
