"""Restore: into a new PostgreSQL database every check passes; a flipped byte anywhere in
the archive or the manifest, or a truncated archive, is refused before the target is touched."""

import json
import os

import pytest
from sqlalchemy import create_engine, inspect, select

from kms_pipelines.core.backup import backups as backup
from kms_pipelines.core.backup import restore
from kms_pipelines.core.envelope import data_keys as envelope
from kms_pipelines.core.foundation import db
from kms_pipelines.core.foundation.db.models import KeyVersion
from kms_pipelines.core.foundation.db.models_backup import Backup
from kms_pipelines.core.foundation.objectstore.local import LocalObjectStore
from kms_pipelines.core.keys import lifecycle
from kms_pipelines.core.ledger import checkpoints, ledger, rpt


def sim_store(kms):
    kms.objects = LocalObjectStore(kms.home / "objects-sim", now=kms.clock.now)
    return kms.objects


def tables(url):
    engine = create_engine(db.normalize_url(url))
    try:
        return sorted(inspect(engine).get_table_names())
    finally:
        engine.dispose()


def tamper(store, key, fn):
    """What an attacker with write access to the storage host would do."""
    path = store.root / key
    os.chmod(path, 0o600)
    data = bytearray(path.read_bytes())
    path.write_bytes(bytes(fn(data)))


@pytest.fixture
def backed_up(kms_pg):
    kms = kms_pg
    sim_store(kms)
    envelope.encrypt(kms, "data:banking-attachments", "doc-1", b"statement")
    lifecycle.rotate(kms, "data:banking-attachments")
    envelope.encrypt(kms, "data:banking-attachments", "doc-2", b"statement 2")
    for i in range(3):
        rpt.issue(kms, f"deal-{i}", {"amount": i})
    return kms, backup.create(kms)


def test_restore_into_a_new_database_passes_every_check(backed_up, pg_database, tmp_path):
    kms, info = backed_up
    # The live chain moves on after the backup and is checkpointed: the restore point is
    # older than the newest checkpoint and must still verify as what it is.
    rpt.issue(kms, "deal-after-backup", {"amount": 9})
    checkpoints.write_checkpoint(kms)
    target = pg_database()
    report = restore.restore(kms, info.archive_id, target, target_home=tmp_path / "staging")
    statuses = {c.name: c.status for c in report.checks}
    assert report.ok, report.summary()
    assert statuses == {
        "manifest_signature": "passed",
        "archive_sha256": "passed",
        "restore": "passed",
        "migrations": "passed",
        "ledger_chain": "passed",
        "rpt_chain": "passed",
        "canaries": "passed",
    }
    assert "3 recent RPTs" in {c.name: c.detail for c in report.checks}["rpt_chain"]
    # the restored database is the live one: same ledger head, same key versions
    restored = db.make_engine(target)
    try:
        with kms.engine.connect() as a, restored.connect() as b:
            assert ledger.head(a) == ledger.head(b)
            assert rpt.chain_head(b)[0] == 3
            q = select(KeyVersion.wrap_ref, KeyVersion.state).order_by(KeyVersion.id)
            assert a.execute(q).all() == b.execute(q).all()
    finally:
        restored.dispose()
    assert (tmp_path / "staging" / "artifacts" / "kms" / "keys").is_dir()
    with kms.transaction() as s:
        assert s.scalars(select(Backup.status).where(Backup.archive_id == info.archive_id)).one() == "verified"


def test_restore_via_cli_with_a_pinned_trust_file(backed_up, pg_database, tmp_path):
    kms, info = backed_up
    trust = tmp_path / "trust.json"
    trust.write_text(json.dumps(backup.export_trust(kms)))
    manifest = backup.verify_manifest(kms, kms.objects.get_bytes(info.manifest_key), trust=backup.load_trust(trust))
    assert manifest["archive_id"] == info.archive_id
    wrong = tmp_path / "wrong.json"
    wrong.write_text(json.dumps([__import__("base64").b64encode(os.urandom(32)).decode()]))
    target = pg_database()
    with pytest.raises(backup.BackupError, match="not a trusted root key"):
        restore.restore(kms, info.archive_id, target, trust=str(wrong))
    assert tables(target) == []


def _flip(offset):
    def fn(data):
        i = offset if offset >= 0 else len(data) + offset
        data[i] ^= 0x01
        return data

    return fn


TAMPERS = [
    ("archive", _flip(0)),  # age header
    ("archive", _flip(200)),  # sealed file key / first chunk
    ("archive", lambda d: _flip(len(d) // 2)(d)),
    ("archive", _flip(-1)),  # last tag byte
    ("archive", lambda d: d[:-100]),  # truncated
    ("archive", lambda d: d + b"\0"),  # extended
    (
        "manifest",
        lambda d: (
            d.replace(b'"gfs_class": "nightly"', b'"gfs_class": "weekly"')
            if b'"gfs_class": "nightly"' in d
            else d.replace(b'"gfs_class": "weekly"', b'"gfs_class": "nightly"')
        ),
    ),
    ("manifest", lambda d: _flip(d.index(b'"signature"') + 20)(d)),
    ("manifest", lambda d: _flip(d.index(b'"archive_sha256"') + 25)(d)),
    ("manifest", lambda d: d[: len(d) // 2]),
]


def test_tampered_or_truncated_archive_is_refused_before_the_target_is_touched(backed_up, pg_database):
    kms, info = backed_up
    target = pg_database()
    with kms.engine.connect() as conn:
        before = conn.execute(select(Backup.archive_id, Backup.status)).all()
    for where, fn in TAMPERS:
        key = info.archive_key if where == "archive" else info.manifest_key
        path = kms.objects.root / key
        os.chmod(path, 0o600)
        original = path.read_bytes()
        tamper(kms.objects, key, fn)
        assert path.read_bytes() != original
        with pytest.raises(backup.BackupError) as exc:
            restore.restore(kms, info.archive_id, target)
        assert any(w in str(exc.value) for w in ("signature", "sha256", "bytes", "malformed")), (where, exc.value)
        assert tables(target) == [], where
        path.write_bytes(original)
    with kms.engine.connect() as conn:
        assert conn.execute(select(Backup.archive_id, Backup.status)).all() == before
    assert restore.restore(kms, info.archive_id, target).ok  # untouched originals still restore


def test_every_byte_of_the_archive_is_covered(make_kms, tmp_path):
    """Exhaustively over a small SQLite archive: each single-byte flip is refused."""
    kms = make_kms("sqlite")
    sim_store(kms)
    info = backup.create(kms)
    path = kms.objects.root / info.archive_key
    os.chmod(path, 0o600)
    original = path.read_bytes()
    step = max(1, len(original) // 64)
    for i in range(0, len(original), step):
        data = bytearray(original)
        data[i] ^= 0x80
        path.write_bytes(bytes(data))
        target = tmp_path / f"t{i}.db"
        with pytest.raises(backup.BackupError):
            restore.restore(kms, info.archive_id, f"sqlite:///{target}")
        assert not target.exists()
    path.write_bytes(original)
    assert restore.restore(kms, info.archive_id, f"sqlite:///{tmp_path / 'ok.db'}").ok


def test_restore_refuses_the_live_database_and_non_empty_targets(backed_up, pg_database):
    kms, info = backed_up
    live = kms.engine.url.render_as_string(hide_password=False)
    with pytest.raises(backup.BackupError, match="live KMS database"):
        restore.restore(kms, info.archive_id, live)
    with pytest.raises(backup.BackupError, match="not empty"):
        restore.restore(kms, info.archive_id, _nonempty(pg_database))
    with pytest.raises(backup.BackupError, match="sqlite"):
        restore.restore(kms, info.archive_id, "sqlite:////tmp/never-written.db")
    assert not os.path.exists("/tmp/never-written.db")


def _nonempty(pg_database):
    url = pg_database()
    engine = create_engine(db.normalize_url(url))
    with engine.begin() as conn:
        conn.exec_driver_sql("CREATE TABLE precious (x int)")
    engine.dispose()
    return url


def test_restore_takes_a_path_to_the_archive_file_inside_the_store(backed_up, pg_database, tmp_path):
    # `scripts/restore.sh <archive>` as the policy spells it: a file path, not an id.
    kms, info = backed_up
    report = restore.restore(
        kms, str(kms.objects.root / info.archive_key), pg_database(), target_home=tmp_path / "staging"
    )
    assert report.ok and report.archive_id == info.archive_id, report.summary()


def test_restore_takes_a_copied_out_archive_with_its_manifest_and_refuses_a_tampered_copy(
    backed_up, pg_database, tmp_path
):
    import shutil

    kms, info = backed_up
    outside = tmp_path / "fetched"
    outside.mkdir()
    archive = outside / info.archive_key.rsplit("/", 1)[-1]
    manifest = outside / info.manifest_key.rsplit("/", 1)[-1]
    with pytest.raises(backup.BackupError, match="manifest .* is not beside it"):
        shutil.copy(kms.objects.root / info.archive_key, archive)
        restore.restore(kms, str(archive), pg_database())
    shutil.copy(kms.objects.root / info.manifest_key, manifest)
    report = restore.restore(kms, str(archive), pg_database(), target_home=tmp_path / "staging")
    assert report.ok, report.summary()
    data = bytearray(archive.read_bytes())
    data[len(data) // 2] ^= 1
    archive.write_bytes(bytes(data))
    target = pg_database()
    with pytest.raises(backup.BackupError, match="sha256 does not match"):
        restore.restore(kms, str(archive), target)
    assert tables(target) == []


@pytest.mark.parametrize("target", ["sqlite://", "sqlite:///:memory:"])
def test_restore_refuses_a_sqlite_target_without_a_file_before_writing_anything(
    make_kms, tmp_path, monkeypatch, target
):
    kms = make_kms("sqlite")
    sim_store(kms)
    info = backup.create(kms)
    workdir = tmp_path / "cwd"  # ":memory:" used to be written as a file of that name here
    workdir.mkdir()
    monkeypatch.chdir(workdir)
    home = tmp_path / "restore-home"
    with kms.engine.connect() as conn:
        before = conn.execute(select(Backup.archive_id, Backup.status)).all(), ledger.head(conn)
    with pytest.raises(backup.BackupError) as exc:
        restore.restore(kms, info.archive_id, target, target_home=home)
    assert str(exc.value) == f"target SQLite URL {target} names no file; restore into a new file"
    assert list(workdir.iterdir()) == [] and not home.exists()
    with kms.engine.connect() as conn:
        assert (conn.execute(select(Backup.archive_id, Backup.status)).all(), ledger.head(conn)) == before
