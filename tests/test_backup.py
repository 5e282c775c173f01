"""Backups: locked archives on the S3 protocol server, GFS retention over 100 simulated
days, a kill -9 mid-upload, and the restore-point destroy guard (T4)."""

import os
import signal
import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import create_engine, select, text

from kms_pipelines.core.backup import backups as backup
from kms_pipelines.core.backup import rekey
from kms_pipelines.core.foundation.clock import SimulatedClock
from kms_pipelines.core.foundation.db.models_backup import Backup
from kms_pipelines.core.foundation.objectstore import ObjectLocked
from kms_pipelines.core.foundation.objectstore.local import LocalObjectStore
from kms_pipelines.core.keys import lifecycle


def catalogue(kms):
    with kms.engine.connect() as conn:
        return conn.execute(select(Backup.archive_id, Backup.status, Backup.retain_until).order_by(Backup.id)).all()


def objects(store):
    return sorted((o.key, o.size, o.sha256) for o in store.list("backups/"))


def sim_store(kms):
    """A local store that reads the same (simulated) clock as the KMS."""
    kms.objects = LocalObjectStore(kms.home / "objects-sim", now=kms.clock.now)
    return kms.objects


def test_backup_on_s3_is_locked_and_delete_is_refused(make_kms, s3_store, s3_client, s3_bucket):
    kms = make_kms("postgres", clock=SimulatedClock(datetime.now(UTC)))
    kms.objects = s3_store
    info = backup.create(kms)
    assert info.status == "complete" and info.size > 0
    head = s3_client.head_object(Bucket=s3_bucket, Key=info.archive_key)
    assert head["ObjectLockMode"] == "COMPLIANCE"
    assert head["ObjectLockRetainUntilDate"] >= info.retain_until - timedelta(seconds=1)
    verified = backup.verify_archive(kms, info.archive_id)
    assert verified["manifest_verifies"] and verified["locked"]

    before = (catalogue(kms), objects(s3_store))
    for key in (info.archive_key, info.manifest_key):
        with pytest.raises(ObjectLocked):
            s3_store.delete(key)
        version = s3_client.head_object(Bucket=s3_bucket, Key=key)["VersionId"]
        with pytest.raises(s3_client.exceptions.ClientError) as exc:
            s3_client.delete_object(Bucket=s3_bucket, Key=key, VersionId=version)
        assert "AccessDenied" in str(exc.value)
    # prune keeps it: it is the newest (and verified) archive and still locked
    assert backup.prune(kms).deleted == []
    assert (catalogue(kms), objects(s3_store)) == before


def test_manifest_records_what_the_issue_asks(kms):
    sim_store(kms)
    info = backup.create(kms)
    manifest = backup.verify_manifest(kms, kms.objects.get_bytes(info.manifest_key))
    assert manifest["archive_sha256"] == info.sha256 and manifest["archive_size"] == info.size
    assert manifest["backup_key"] == {"name": "backup", "version": 1}
    assert manifest["database"]["kind"] in ("sqlite", "postgresql") and manifest["database"]["server_version"]
    assert {"python", "pyrage", "zstandard"} <= set(manifest["tool_versions"])
    data_keys = {d["key"] for d in manifest["data_key_versions"]}
    assert data_keys == {f"data:{n}" for n in kms.policy.key_classes.data.names}
    assert len(manifest["canaries"]) == len(manifest["data_key_versions"])
    assert "AGE-SECRET-KEY" not in kms.objects.get_bytes(info.manifest_key).decode()


def test_100_simulated_days_leave_exactly_the_gfs_set(make_kms):
    start = datetime(2026, 1, 1, 2, 0, tzinfo=UTC)
    kms = make_kms("sqlite", clock=SimulatedClock(start))
    store = sim_store(kms)
    created = []
    for _ in range(100):
        info = backup.create(kms)
        created.append(info)
        backup.prune(kms)
        kms.clock.advance(timedelta(days=1))
    kms.clock.advance(timedelta(days=-1))  # back to the last night
    now = kms.now()
    p = kms.policy.backup
    expected = {i.archive_id for i in created[-p.keep_nightly :]}
    expected |= {
        i.archive_id
        for i in created
        if i.gfs_class == "weekly" and i.created_at > now - timedelta(days=p.keep_weekly_days)
    }
    remaining = {r.archive_id for r in catalogue(kms) if r.status != "pruned"}
    assert remaining == expected
    assert len(expected) == 7 + 12  # 7 nightlies (one a Sunday) + the other Sundays of 90 days
    assert {o[0] for o in objects(store)} == (
        {i.archive_key for i in created if i.archive_id in expected}
        | {i.manifest_key for i in created if i.archive_id in expected}
    )
    assert all(i.gfs_class == ("weekly" if i.created_at.weekday() == 6 else "nightly") for i in created)


def _verified_nightly_then_nine_unverified(make_kms):
    """Ten nightlies a day apart on SQLite with the simulated store; only the first verified."""
    kms = make_kms("sqlite")
    sim_store(kms)
    first = backup.create(kms, gfs_class="nightly")
    backup.verify_archive(kms, first.archive_id)
    for _ in range(9):
        kms.clock.advance(timedelta(days=1))
        backup.create(kms, gfs_class="nightly")  # complete, never verified
    return kms, first


def test_prune_never_deletes_the_newest_verified_archive(make_kms):
    kms, first = _verified_nightly_then_nine_unverified(make_kms)
    result = backup.prune(kms)
    remaining = {r.archive_id for r in catalogue(kms) if r.status != "pruned"}
    assert first.archive_id in remaining
    assert len(result.deleted) == 2 and len(remaining) == 8


def test_create_refuses_without_store_and_changes_nothing(kms):
    kms.objects = None
    before = catalogue(kms)
    with pytest.raises(backup.BackupError, match="no object store"):
        backup.create(kms)
    assert catalogue(kms) == before


def test_failed_dump_leaves_no_archive_and_no_good_row(kms_pg, tmp_path, monkeypatch):
    kms = kms_pg
    sim_store(kms)
    # a pg_dump that writes part of a dump and then fails: the pipeline must abort the upload
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "pg_dump").write_text(
        "#!/bin/sh\nhead -c 20000000 /dev/urandom\necho 'pg_dump: error: lost connection' >&2\nexit 1\n"
    )
    (fake / "pg_dump").chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake}:{os.environ['PATH']}")
    with pytest.raises(backup.BackupError, match="lost connection"):
        backup.create(kms)
    assert objects(kms.objects) == []
    assert [r.status for r in catalogue(kms)] == ["failed"]
    with pytest.raises(backup.BackupError, match="no complete backup"):
        backup.verify_archive(kms)


@pytest.mark.slow
def test_kill_9_during_upload_leaves_no_archive_marked_good(tmp_path, pg_url, s3_server, s3_bucket, s3_client):
    home = tmp_path / "home"
    big = home / "artifacts" / "kms" / "published"
    big.mkdir(parents=True)
    with open(big / "bulk.bin", "wb") as f:  # incompressible, so the upload takes a while
        for _ in range(12):
            f.write(os.urandom(8 << 20))
    env = dict(
        os.environ,
        KMS_HOME=str(home),
        KMS_DATABASE_URL=pg_url,
        KMS_OBJECT_STORE=f"s3://{s3_bucket}",
        KMS_S3_ENDPOINT_URL=s3_server,
        KMS_MASTER_KEY="MDEyMzQ1Njc4OWFiY2RlZjAxMjM0NTY3ODlhYmNkZWY=",
    )
    kms_bin = os.path.join(os.path.dirname(sys.executable), "kms")
    subprocess.run([kms_bin, "init"], env=env, check=True, capture_output=True)
    proc = subprocess.Popen([kms_bin, "backup", "create"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    engine = create_engine(pg_url.replace("postgresql://", "postgresql+psycopg://"))
    try:
        deadline = time.time() + 60
        while time.time() < deadline:
            with engine.connect() as conn:
                row = conn.execute(text("SELECT status FROM backups")).first()
            uploads = s3_client.list_multipart_uploads(Bucket=s3_bucket).get("Uploads", [])
            if row and row[0] == "uploading" and uploads:
                break
            assert proc.poll() is None, proc.communicate()
            time.sleep(0.05)
        else:
            pytest.fail("upload never started")
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        with engine.connect() as conn:
            statuses = [r[0] for r in conn.execute(text("SELECT status FROM backups"))]
        assert statuses == ["uploading"]
        # only root manifests (published before the backup starts), no archive or backup manifest
        assert s3_client.list_objects_v2(Bucket=s3_bucket, Prefix="backups/").get("KeyCount", 0) == 0
        listing = subprocess.run([kms_bin, "backup", "list"], env=env, capture_output=True, text=True)
        assert "incomplete" in listing.stdout
        refused = subprocess.run([kms_bin, "backup", "verify"], env=env, capture_output=True, text=True)
        assert refused.returncode == 1 and "no complete backup" in refused.stderr
        # hours later the stale upload is marked failed, never good
        # (`kms --at` is refused by a command that writes: age the upload's row instead)
        with engine.begin() as conn:
            conn.execute(text("UPDATE backups SET created_at = created_at - interval '7 hours'"))
        subprocess.run([kms_bin, "backup", "prune"], env=env, check=True, capture_output=True)
        with engine.connect() as conn:
            assert [r[0] for r in conn.execute(text("SELECT status FROM backups"))] == ["failed"]
    finally:
        if proc.poll() is None:
            proc.kill()
        engine.dispose()


def test_restore_point_guard_refuses_destroy_until_rekeyed(make_kms):
    kms = make_kms("sqlite")
    sim_store(kms)
    from kms_pipelines.core.envelope import data_keys as envelope

    envelope.encrypt(kms, "data:postgres", "row-1", b"secret row")
    lifecycle.rotate(kms, "data:postgres")
    info = backup.create(kms)
    with kms.transaction() as s:
        key = lifecycle.get_key(s, "data:postgres")
        v1 = lifecycle.get_version(key, 1)
        reason = backup._restore_points_guard(s, kms, key, v1)
    assert reason and info.archive_id in reason and "rekey" in reason

    done = rekey.rekey_restore_points(kms, "data:postgres", 1)
    assert [d["predecessor"] for d in done] == [info.archive_id]
    with kms.transaction() as s:
        key = lifecycle.get_key(s, "data:postgres")
        assert backup._restore_points_guard(s, kms, key, lifecycle.get_version(key, 1)) is None
        # the successor is linked and does not reference v1 any more (its DEK was swept in staging)
        succ = s.scalars(select(Backup).where(Backup.archive_id == done[0]["successor"])).one()
        assert succ.successor_of is not None and succ.status == "complete"
    manifest = backup.verify_manifest(kms, kms.objects.get_bytes(succ.manifest_key))
    assert ("data:postgres", 1) not in {(d["key"], d["version"]) for d in manifest["data_key_versions"]}
    assert manifest["successor_of"] == info.archive_id


def _delete_catalogue_row_on(kms, method, when):
    """An insider deletes the backup's catalogue row while the store call ``when(key)`` runs:
    the real local store, with the deletion slipped in before that call."""
    real = getattr(kms.objects, method)

    def interleaved(key, *args, **kwargs):
        if when(key):
            with kms.engine.begin() as conn:
                row = "SELECT id FROM backups WHERE archive_key = :k OR manifest_key = :k"
                conn.execute(text(f"DELETE FROM backup_key_refs WHERE backup_id IN ({row})"), {"k": key})
                conn.execute(text(f"DELETE FROM backups WHERE id IN ({row})"), {"k": key})
        return real(key, *args, **kwargs)

    setattr(kms.objects, method, interleaved)


def test_a_catalogue_row_deleted_mid_backup_is_refused_by_name_and_nothing_is_marked_good(make_kms):
    kms = make_kms("sqlite")
    sim_store(kms)
    _delete_catalogue_row_on(kms, "put", lambda key: key.startswith("backups/") and key.endswith(".json"))
    with pytest.raises(backup.BackupError) as exc:
        backup.create(kms)
    assert str(exc.value) == "backup catalogue row 1 disappeared"
    assert catalogue(kms) == []  # no row brought back, none marked complete
    with pytest.raises(backup.BackupError, match="no complete backup"):
        backup.verify_archive(kms)


def test_a_catalogue_row_deleted_mid_prune_is_refused_by_name_and_the_rest_is_untouched(make_kms):
    kms, _ = _verified_nightly_then_nine_unverified(make_kms)
    doomed = [aid for aid in backup.prune(kms, dry_run=True).deleted]
    assert len(doomed) == 2
    before = catalogue(kms)
    _delete_catalogue_row_on(kms, "delete", lambda key: doomed[0] in key)
    with pytest.raises(backup.BackupError) as exc:
        backup.prune(kms)
    assert str(exc.value).startswith("backup catalogue row ") and str(exc.value).endswith(" disappeared")
    assert catalogue(kms) == [r for r in before if r.archive_id != doomed[0]]  # the second is not pruned either
