"""Backup manifests: verified field by field against a schema, the signature covering every
field, and `restore --trust` pinned to a root fingerprint reached through root manifests
(issue 12, case 2), on real PostgreSQL."""

import json
import os

import pytest
from sqlalchemy import select

from kms_pipelines.core.backup import backups as backup
from kms_pipelines.core.backup import restore
from kms_pipelines.core.foundation.db.models_backup import Backup
from kms_pipelines.core.keys import lifecycle, manifest
from tests.test_restore import backed_up, sim_store, tables  # noqa: F401 - fixture re-used


def _rewrite(kms, key, edit):
    path = kms.objects.root / key
    os.chmod(path, 0o600)
    doc = json.loads(path.read_bytes())
    edit(doc)
    path.write_bytes(json.dumps(doc, indent=1, sort_keys=True).encode())


def _root_fp(kms, n):
    with kms.transaction() as s:
        return lifecycle.get_version(lifecycle.get_key(s, "root"), n).fingerprint


@pytest.mark.parametrize(
    "edit,fragment",
    [
        (lambda d: d.update(alg="amg"), "field 'alg': Input should be 'Ed25519'"),
        (lambda d: d.update(format="kms-backup-manifest/9"), "field 'format'"),
        (lambda d: d["manifest"].update(gfs_class="yearly"), "field 'manifest.gfs_class'"),
        (lambda d: d["manifest"].update(extra_field="rides along"), "field 'manifest.extra_field': Extra inputs"),
        (lambda d: d["manifest"]["database"].update(kind="mysql"), "field 'manifest.database.kind'"),
        (lambda d: d["manifest"].update(archive_size="12"), "field 'manifest.archive_size'"),
    ],
)
def test_case2_malformed_manifest_fields_are_refused_and_nothing_restored(backed_up, pg_database, edit, fragment):
    kms, info = backed_up
    target = pg_database()
    with kms.engine.connect() as conn:
        before = conn.execute(select(Backup.archive_id, Backup.status)).all()
    _rewrite(kms, info.manifest_key, edit)
    with pytest.raises(backup.BackupError, match="does not match the kms-backup-manifest/2 schema") as exc:
        restore.restore(kms, info.archive_id, target)
    assert fragment in str(exc.value)
    assert tables(target) == []
    with kms.engine.connect() as conn:
        assert conn.execute(select(Backup.archive_id, Backup.status)).all() == before


def test_case2_envelope_fields_are_under_the_signature(backed_up, kms_pg):
    kms, info = backed_up
    raw = kms.objects.get_bytes(info.manifest_key)
    doc = json.loads(raw)
    assert doc["format"] == "kms-backup-manifest/2" and doc["alg"] == "Ed25519"
    # an old-format label over the same signature: the signed bytes change, the signature fails
    doc["format"] = "kms-backup-manifest/1"
    with pytest.raises(backup.BackupError, match="signature does not verify"):
        backup.verify_manifest(kms, json.dumps(doc).encode())


def test_restore_trust_pinned_fingerprint_reaches_the_rotated_root(make_kms, pg_database, tmp_path):
    kms = make_kms("postgres")
    sim_store(kms)
    genesis = _root_fp(kms, 1)
    lifecycle.rotate(kms, "root")
    lifecycle.rotate(kms, "root")
    info = backup.create(kms)  # signed by root v3; publishes the root manifests first
    assert [m.version for m in manifest.manifests(kms)] == [1, 2, 3]
    raw = kms.objects.get_bytes(info.manifest_key)
    assert backup.verify_manifest(kms, raw, trust=[genesis])["archive_id"] == info.archive_id
    foreign = "SHA256:" + "ab" * 32
    with pytest.raises(backup.BackupError, match="neither pinned nor reached from the pinned root"):
        backup.verify_manifest(kms, raw, trust=[foreign])
    with pytest.raises(backup.BackupError, match="not a SHA256:<64 hex> root fingerprint"):
        backup.load_trust("SHA256:xyz")
    target = pg_database()
    with pytest.raises(backup.BackupError, match="neither pinned nor reached"):
        restore.restore(kms, info.archive_id, target, trust=foreign)
    assert tables(target) == []
    assert restore.restore(kms, info.archive_id, target, trust=genesis).ok


def test_restore_trust_does_not_pass_a_broken_manifest_chain(make_kms):
    """A manifest missing from the chain cuts trust: v3 is not reached from v1 without v2's."""
    kms = make_kms("postgres")
    sim_store(kms)
    genesis = _root_fp(kms, 1)
    lifecycle.rotate(kms, "root")
    lifecycle.rotate(kms, "root")
    info = backup.create(kms)
    path = kms.objects.root / manifest.object_key(2)
    os.chmod(path, 0o600)
    path.write_bytes(b"removed by an attacker")
    with pytest.raises(backup.BackupError, match="neither pinned nor reached"):
        backup.verify_manifest(kms, kms.objects.get_bytes(info.manifest_key), trust=[genesis])


def test_manifest_signed_by_a_root_after_it_was_replaced_is_refused(make_kms):
    """A retired (but retained, not revoked) root can still sign: a manifest it signs after
    its successor took over is refused, as is one naming another root than its signer."""
    import base64 as b64
    from datetime import timedelta

    from kms_pipelines.core.backup import manifest_schema as schema
    from kms_pipelines.core.foundation.canonical import canonical_bytes

    kms = make_kms("postgres")
    sim_store(kms)
    info = backup.create(kms)
    doc = json.loads(kms.objects.get_bytes(info.manifest_key))
    with kms.transaction() as s:
        old = lifecycle.get_version(lifecycle.get_key(s, "root"), 1)
    kms.clock.advance(timedelta(days=1))
    lifecycle.rotate(kms, "root")
    manifest.publish_pending(kms)  # as the nightly root follow-up does
    kms.clock.advance(timedelta(days=1))
    doc["manifest"]["created_at"] = kms.now().isoformat()  # "made today" by the replaced root v1
    doc["signature"] = b64.b64encode(kms.keystore.sign(old.sign_ref, canonical_bytes(schema.signed_part(doc)))).decode()
    with pytest.raises(backup.BackupError, match="after that root was replaced"):
        backup.verify_manifest(kms, json.dumps(doc).encode())
    with pytest.raises(backup.BackupError, match="after that root was replaced"):
        backup.verify_manifest(kms, json.dumps(doc).encode(), trust=[old.fingerprint])
    doc["manifest"]["root_kid"] = "SHA256:" + "cd" * 32
    doc["signature"] = b64.b64encode(kms.keystore.sign(old.sign_ref, canonical_bytes(schema.signed_part(doc)))).decode()
    with pytest.raises(backup.BackupError, match="but is signed by"):
        backup.verify_manifest(kms, json.dumps(doc).encode())
