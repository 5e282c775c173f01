"""The archive vault of retired root/service keys (T1): archive on rotation, dual-controlled
retrieval into a read-only forensic keystore, destruction everywhere, and T1 read from
behaviour. Real parts: SoftHSM2 and the software keystore, the moto S3 server on loopback
(Object Lock), SQLite/PostgreSQL."""

from __future__ import annotations

import json
import time
from datetime import UTC, datetime, timedelta

import pyotp
import pytest
from sqlalchemy import delete, select, text

from kms_pipelines.core import compliance
from kms_pipelines.core.access import anomalies
from kms_pipelines.core.access import principals as access
from kms_pipelines.core.foundation.db.models import LedgerEntry
from kms_pipelines.core.foundation.db.models_access import Approval
from kms_pipelines.core.foundation.db.models_vault import ArchiveCopy, ForensicRetrieval
from kms_pipelines.core.foundation.keystore import KeyStoreError
from kms_pipelines.core.foundation.objectstore.local import LocalObjectStore
from kms_pipelines.core.keys import dependents, forensic, lifecycle, retention, rotation, vault
from kms_pipelines.core.ledger import audit, ledger
from tests.fixtures.kms import approve_both, enrol_direct, security_key_file, write_test_policy

TICKET = "INC-4711"


def root_v1_ledger_states(session) -> list[str]:
    """The states root v1 went through, in ledger order."""
    q = (
        select(LedgerEntry)
        .where(LedgerEntry.key_name == "root", LedgerEntry.key_version == 1)
        .order_by(LedgerEntry.seq)
    )
    return [e.to_state for e in session.scalars(q)]


def enrol(kms, name, *roles):
    return pyotp.parse_uri(enrol_direct(kms, name, list(roles)))


def approve(kms, device, name, target, ticket=TICKET, operation=vault.RETRIEVE_OPERATION):
    kms.clock.advance(timedelta(seconds=30))  # a fresh TOTP step for every approval
    return approve_both(kms, name, ticket=ticket, operation=operation, target=target, totp=device.at(kms.now()))


@pytest.fixture(params=["software", "pkcs11"])
def vkms(request, make_kms, s3_store):
    """A bootstrapped context on the requested keystore with the S3 server as object store."""
    keystore = request.getfixturevalue("pkcs11_keystore") if request.param == "pkcs11" else None
    kms = make_kms("sqlite", keystore=keystore)
    kms.objects = s3_store
    yield kms
    _forget_forensic(kms)


def _forget_forensic(kms):
    # The SoftHSM2 token is shared by the whole test session; leave no forensic objects behind.
    for ref in kms.keystore.forensic_refs():
        kms.keystore.forensic_destroy(ref)


@pytest.fixture
def team(vkms):
    """dave (compliance_officer) requests; bob (security_engineering) and carol (compliance_officer) approve."""
    return vkms, {
        n: enrol(vkms, n, r)
        for n, r in (("dave", "compliance_officer"), ("bob", "security_engineering"), ("carol", "compliance_officer"))
    }


def root_v1(kms):
    with kms.transaction() as s:
        return lifecycle.get_version(lifecycle.get_key(s, "root"), 1)


def rotate_root(kms):
    kms.clock.advance(timedelta(days=1))
    return rotation.rotate_key(kms, "root", reason="cadence")


def t1(kms):
    audit.flush(kms)
    return compliance.eval_t1(kms)


def snapshot(kms):
    audit.flush(kms)
    with kms.engine.connect() as conn:
        head = ledger.head(conn)
        approvals = conn.execute(select(Approval.id, Approval.used_at).order_by(Approval.id)).all()
        retrievals = conn.execute(select(ForensicRetrieval.id)).all()
        copies = conn.execute(
            select(ArchiveCopy.key_name, ArchiveCopy.key_version, ArchiveCopy.status).order_by(ArchiveCopy.id)
        ).all()
    objects = sorted(i.key for i in kms.objects.list("")) if kms.objects is not None else []
    return head, approvals, retrievals, sorted(kms.keystore.forensic_refs()), copies, objects


# ---- archive on rotation, retrieval with approvals ---------------------------------------


def test_rotation_archives_the_retired_root_and_dual_control_retrieves_it(team):
    kms, d = team
    v1 = root_v1(kms)
    historic = kms.keystore.encrypt(v1.wrap_ref, b"sealed under root v1", b"case-17")
    rotate_root(kms)

    [copy] = vault.copies(kms)
    assert (copy.key, copy.version, copy.status, copy.problems) == ("root", 1, "archived", [])
    head = kms.objects.head(copy.object_key)
    assert head.lock_mode == "COMPLIANCE" and head.retain_until == copy.retain_until
    assert copy.retain_until == retention.destroy_allowed_from(kms, *_key_and_version(kms, "root", 1))
    with kms.transaction() as s:
        entry = s.scalars(select(LedgerEntry).where(LedgerEntry.to_state == vault.LEDGER_ARCHIVED)).one()
    assert (entry.key_name, entry.key_version) == ("root", 1) and copy.object_key in entry.reason
    assert ledger.verify(kms.engine).ok
    body = kms.objects.get_bytes(copy.object_key)
    assert b"sealed under root v1" not in body and v1.wrap_ref.encode() not in body

    target = vault.target_for("root", 1)
    approve(kms, d["bob"], "bob", target)
    approve(kms, d["carol"], "carol", target)
    r = forensic.retrieve(kms, "root", 1, ticket=TICKET, requested_by="dave")
    assert r.approvers == ["bob", "carol"] and r.notification_failures == []
    fks = forensic.ForensicKeyStore(kms)
    # The retrieved material is the real key: it opens what root v1 sealed a year ago.
    assert fks.decrypt(r.refs[0], historic, b"case-17") == b"sealed under root v1"
    assert any(
        m.get("kind") == "manual_operation" and m.get("subject") == f"Manual archive-retrieve of root#v1 ({TICKET})"
        for m in kms.notifier.read()
    )
    audit.flush(kms)
    assert audit.verify(kms).ok
    assert compliance.eval_t1(kms).status == compliance.PASS, compliance.eval_t1(kms).evidence

    # Approvals are single-use: a second retrieval under the same ticket needs new ones.
    with pytest.raises(access.AccessDenied, match="single-use"):
        forensic.retrieve(kms, "root", 1, ticket=TICKET, requested_by="dave")

    # The material erases itself after the policy TTL.
    kms.clock.advance(timedelta(hours=kms.policy.vault.forensic_ttl_hours, seconds=1))
    with pytest.raises(forensic.ForensicRefused, match="TTL"):
        fks.decrypt(r.refs[0], historic, b"case-17")
    assert r.refs[0] not in kms.keystore.forensic_refs()
    assert t1(kms).status == compliance.PASS


def _key_and_version(kms, name, version):
    with kms.transaction() as s:
        key = lifecycle.get_key(s, name)
        return key, lifecycle.get_version(key, version)


def test_forensic_context_refuses_to_sign_and_live_keystore_cannot_reach_it(team):
    kms, d = team
    rotate_root(kms)
    target = vault.target_for("root", 1)
    approve(kms, d["bob"], "bob", target)
    approve(kms, d["carol"], "carol", target)
    ref = forensic.retrieve(kms, "root", 1, ticket=TICKET, requested_by="dave").refs[0]
    fks = forensic.ForensicKeyStore(kms)
    with pytest.raises(forensic.ForensicRefused, match="never sign"):
        fks.sign(ref, b"backdated RPT")
    with pytest.raises(forensic.ForensicRefused, match="never encrypt"):
        fks.encrypt(ref, b"x")
    for op in (
        lambda: kms.keystore.sign(ref, b"x"),
        lambda: kms.keystore.encrypt(ref, b"x"),
        lambda: kms.keystore.export_secret(ref),
    ):
        with pytest.raises(KeyStoreError):  # not in the live namespace at all
            op()
    assert ref not in kms.keystore.refs()
    if kms.keystore.backend == "pkcs11":  # the token itself forbids everything but decrypt
        assert kms.keystore.forensic_attributes(ref) == {
            "sign": False,
            "encrypt": False,
            "decrypt": True,
            "wrap": False,
            "unwrap": False,
            "extractable": False,
            "sensitive": True,
            "modifiable": False,
        }
    audit.flush(kms)
    with kms.engine.connect() as conn:
        denied = conn.execute(
            text("SELECT count(*) FROM audit_events WHERE operation='sign' AND outcome='denied' AND target=:t"),
            {"t": ref},
        ).scalar()
    assert denied == 1


# ---- refusals change nothing ---------------------------------------------------------------


def test_retrieval_refused_without_approvals_with_one_and_by_the_requester(team):
    kms, d = team
    rotate_root(kms)
    target = vault.target_for("root", 1)

    def refused(match, requester="dave"):
        before = snapshot(kms)
        with pytest.raises(access.AccessDenied, match=match):
            forensic.retrieve(kms, "root", 1, ticket=TICKET, requested_by=requester)
        after = snapshot(kms)
        assert after == before

    refused(r"needs 2 approvals.*has 0")
    approve(kms, d["bob"], "bob", target)
    refused(r"has 1 \(bob\)")
    with pytest.raises(access.AccessDenied, match="self-approval"):
        approve(kms, d["dave"], "dave", target)
    refused(r"has 1 \(bob\)")
    # An approval bound to another ticket or target does not count either.
    approve(kms, d["carol"], "carol", target, ticket="INC-other")
    refused(r"has 1 \(bob\)")
    # The requester's own approval (given before asking) is never counted.
    approve(kms, d["dave"], "dave", target, ticket="INC-2")
    approve(kms, d["bob"], "bob", target, ticket="INC-2")
    before = snapshot(kms)
    with pytest.raises(access.AccessDenied, match=r"dave \(the requester\)"):
        forensic.retrieve(kms, "root", 1, ticket="INC-2", requested_by="dave")
    assert snapshot(kms)[:3] == before[:3]
    # A principal without the role's permission may not even ask.
    enrol(kms, "erin", "sre_oncall")
    refused("archive-retrieve", requester="erin")
    audit.flush(kms)
    with kms.engine.connect() as conn:
        n = conn.execute(
            text("SELECT count(*) FROM audit_events WHERE operation='archive-retrieve' AND outcome='denied'")
        ).scalar()
    assert n >= 4


def test_unknown_version_is_refused_cleanly(vkms):
    with pytest.raises(vault.VaultError, match="no archive copy of root#v7"):
        forensic.retrieve(vkms, "root", 7, ticket=TICKET, requested_by="dave")


# ---- T1 red on tampering -----------------------------------------------------------------


def _bucket_key(kms, object_key):
    return kms.objects.bucket, kms.objects._full(object_key)


def test_tampered_copy_turns_t1_red_and_cannot_be_retrieved(team, s3_client):
    kms, d = team
    rotate_root(kms)
    assert t1(kms).status == compliance.PASS
    [copy] = vault.copies(kms)
    bucket, full = _bucket_key(kms, copy.object_key)
    body = json.loads(kms.objects.get_bytes(copy.object_key))
    body["header"]["retired_at"] = "2027-01-01T00:00:00.000000Z"  # an insider rewrites the times
    # A versioned, locked bucket still accepts a new version over a locked one: that is the attack.
    s3_client.put_object(
        Bucket=bucket,
        Key=full,
        Body=json.dumps(body).encode(),
        ObjectLockMode="COMPLIANCE",
        ObjectLockRetainUntilDate=copy.retain_until + timedelta(days=1),
    )
    finding = t1(kms)
    assert finding.status == compliance.FAIL and "do not match the recorded SHA-256" in finding.evidence
    approve(kms, d["bob"], "bob", vault.target_for("root", 1))
    approve(kms, d["carol"], "carol", vault.target_for("root", 1))
    before = snapshot(kms)
    with pytest.raises(vault.VaultError, match="refusing to retrieve root#v1: .*tampered"):
        forensic.retrieve(kms, "root", 1, ticket=TICKET, requested_by="dave")
    assert snapshot(kms) == before  # approvals not consumed


def test_deleted_unlocked_or_forged_copy_turns_t1_red(vkms, s3_client):
    kms = vkms
    rotate_root(kms)
    [copy] = vault.copies(kms)
    bucket, full = _bucket_key(kms, copy.object_key)
    # Unlocked: a new version with the same bytes but no retention.
    s3_client.put_object(Bucket=bucket, Key=full, Body=kms.objects.get_bytes(copy.object_key))
    assert "not locked until the end of retention" in t1(kms).evidence
    # Deleted: a delete marker hides every version.
    s3_client.delete_object(Bucket=bucket, Key=full)
    assert "unreadable" in t1(kms).evidence and t1(kms).status == compliance.FAIL


def test_forged_manifest_entry_turns_t1_red(vkms, s3_client):
    kms = vkms
    rotate_root(kms)
    [copy] = vault.copies(kms)
    doc = json.loads(kms.objects.get_bytes(copy.manifest_key))
    doc["entry"]["retain_until"] = "2026-02-01T00:00:00.000000Z"
    bucket, full = _bucket_key(kms, copy.manifest_key)
    s3_client.put_object(Bucket=bucket, Key=full, Body=json.dumps(doc).encode())
    finding = t1(kms)
    assert finding.status == compliance.FAIL and "signature does not verify" in finding.evidence


def test_missing_vault_record_or_single_approver_retrieval_is_red(vkms):
    kms = vkms
    rotate_root(kms)
    with kms.transaction() as s:  # an insider removes the record (and so the copy) from the vault's view
        s.execute(delete(ArchiveCopy))
    assert "root#v1: retired" in t1(kms).evidence and t1(kms).status == compliance.FAIL
    vault.archive_pending(kms)
    assert t1(kms).status == compliance.PASS
    with kms.transaction() as s:  # a retrieval recorded straight into the table with one approver
        s.add(
            ForensicRetrieval(
                key_name="root",
                key_version=1,
                ticket="X",
                requester="mallory",
                approvers='["mallory","bob"]',
                refs='["r"]',
                retrieved_at=kms.now(),
                expires_at=kms.now(),
                purpose="investigation",
            )
        )
    finding = t1(kms)
    assert finding.status == compliance.FAIL and "1 approver(s) other than the requester" in finding.evidence


def test_forensic_import_outside_retrieve_is_red(vkms):
    """Someone with keystore access unwraps a copy without going through dual control."""
    kms = vkms
    rotate_root(kms)
    [copy] = vault.copies(kms)
    doc = json.loads(kms.objects.get_bytes(copy.object_key))
    with kms.transaction() as s:
        kek = lifecycle.get_version(lifecycle.get_key(s, "archive"), copy.kek_version)
    import base64

    from kms_pipelines.core.foundation.canonical import canonical_bytes

    wrapped = kms.keystore.dek_decrypt(
        kek.wrap_ref,
        base64.b64decode(doc["wrapped_dek"]),
        base64.b64decode(doc["sealed"]),
        canonical_bytes(doc["header"]),
    )
    kms.keystore.forensic_unwrap(kek.wrap_ref, wrapped, "sneaky")
    finding = t1(kms)
    assert finding.status == compliance.FAIL
    assert "forensic import of sneaky has no dual-approved retrieval" in finding.evidence


def test_archive_wrap_refuses_anything_but_archivable_under_the_archive_kek(vkms):
    kms = vkms
    with kms.transaction() as s:
        kek = lifecycle.active_version(lifecycle.get_key(s, "archive"))
        data = lifecycle.active_version(lifecycle.get_key(s, "data:postgres"))
        root = lifecycle.active_version(lifecycle.get_key(s, "root"))
    with pytest.raises(KeyStoreError, match="cannot leave the keystore"):
        kms.keystore.archive_wrap(kek.wrap_ref, data.wrap_ref)
    with pytest.raises(KeyStoreError, match="not an archive KEK"):
        kms.keystore.archive_wrap(data.wrap_ref, root.wrap_ref)
    with pytest.raises(KeyStoreError, match="not an archive KEK"):
        kms.keystore.archive_wrap(root.wrap_ref, root.wrap_ref)
    with pytest.raises(KeyStoreError, match="not extractable"):  # archivable never means readable
        kms.keystore.export_secret(root.wrap_ref)


# ---- destroy means destroy everywhere ----------------------------------------------------


def _destroy_after_retention(kms, devices):
    for service in kms.policy.dependents["root"]:
        dependents.confirm(kms, "root", 2, service, actor=f"svc:{service}")
    due = [x for x in retention.due_for_destruction(kms) if x.key == "root"]
    assert [x.version for x in due] == [1]
    for name in ("bob", "carol"):
        approve(kms, devices[name], name, due[0].target, ticket=due[0].ticket, operation="destroy")
    return retention.retire_expired(kms)


@pytest.fixture
def fresh_keystore(any_keystore):
    yield any_keystore
    for ref in any_keystore.forensic_refs():
        any_keystore.forensic_destroy(ref)


def test_destruction_at_day_365_removes_keystore_and_archive_copies(make_kms, fresh_keystore, tmp_path):
    kms = make_kms("sqlite", keystore=fresh_keystore)
    kms.objects = LocalObjectStore(tmp_path / "worm", now=kms.clock.now)  # WORM clock = simulated clock
    devices = {n: enrol(kms, n, r) for n, r in (("bob", "security_engineering"), ("carol", "compliance_officer"))}
    v1 = root_v1(kms)
    rotate_root(kms)
    [copy] = vault.copies(kms)
    kms.clock.advance(timedelta(days=364))
    assert retention.due_for_destruction(kms) == []
    kms.clock.advance(timedelta(days=1))
    summary = _destroy_after_retention(kms, devices)
    assert [x["target"] for x in summary.destroyed] == ["root#v1"]
    assert not kms.keystore.exists(v1.wrap_ref) and not kms.keystore.exists(v1.sign_ref)
    assert not kms.objects.exists(copy.object_key) and not kms.objects.exists(copy.manifest_key)
    with kms.transaction() as s:
        states = root_v1_ledger_states(s)
        row = s.scalars(select(ArchiveCopy)).one()
    assert states == ["active", "rotated", "archived", "destroyed", "archive-deleted"]
    assert row.status == "deleted"
    assert t1(kms).status == compliance.PASS, t1(kms).evidence


def test_an_archive_record_deleted_while_its_copy_is_deleted_is_refused_by_name(make_kms, tmp_path, monkeypatch):
    kms = make_kms("sqlite")
    kms.objects = LocalObjectStore(tmp_path / "worm", now=kms.clock.now)
    devices = {n: enrol(kms, n, r) for n, r in (("bob", "security_engineering"), ("carol", "compliance_officer"))}
    rotate_root(kms)
    kms.clock.advance(timedelta(days=365))
    real_delete = kms.objects.delete

    def delete_while_an_insider_deletes_the_record(key):  # the real store call, the deletion slipped in
        with kms.engine.begin() as conn:
            conn.execute(text("DELETE FROM archive_copies WHERE key_name = 'root' AND key_version = 1"))
        return real_delete(key)

    monkeypatch.setattr(kms.objects, "delete", delete_while_an_insider_deletes_the_record)
    with pytest.raises(vault.VaultError) as err:  # the nightly retirement fails loudly
        _destroy_after_retention(kms, devices)
    assert str(err.value) == "root v1: its archive record disappeared while its copy was deleted"
    with kms.transaction() as s:
        states = root_v1_ledger_states(s)
        assert s.scalars(select(ArchiveCopy)).all() == []
    assert states == ["active", "rotated", "archived", "destroyed"]  # no archive deletion recorded


def test_destroyed_key_with_a_surviving_copy_is_red(make_kms, tmp_path):
    kms = make_kms("sqlite")
    kms.objects = LocalObjectStore(tmp_path / "worm", now=kms.clock.now)
    devices = {n: enrol(kms, n, r) for n, r in (("bob", "security_engineering"), ("carol", "compliance_officer"))}
    rotate_root(kms)
    [copy] = vault.copies(kms)
    kms.clock.advance(timedelta(days=365))
    saved = {k: kms.objects.get_bytes(k) for k in (copy.object_key, copy.manifest_key)}
    _destroy_after_retention(kms, devices)
    for k, body in saved.items():  # an insider keeps a copy back in the vault
        kms.objects.put(k, body)
    assert "recorded deleted but still stored" in t1(kms).evidence


def test_s3_archive_copy_is_deleted_once_its_object_lock_ends(make_kms, s3_store):
    """Object Lock on the S3 server runs on the wall clock: retire ~365 d before now so the
    lock ends a few seconds from now, then destroy once it has."""
    from kms_pipelines.core.foundation.clock import SimulatedClock

    wall = datetime.now(UTC)
    clock = SimulatedClock(wall - timedelta(days=366))
    kms = make_kms("sqlite", clock=clock)
    kms.objects = s3_store
    devices = {n: enrol(kms, n, r) for n, r in (("bob", "security_engineering"), ("carol", "compliance_officer"))}
    clock.set(wall - timedelta(days=365) + timedelta(seconds=6))
    rotation.rotate_key(kms, "root", reason="cadence")
    [copy] = vault.copies(kms)
    assert copy.retain_until > datetime.now(UTC)
    with pytest.raises(Exception, match="locked"):
        s3_store.delete(copy.object_key)
    time.sleep(max(0.0, (copy.retain_until - datetime.now(UTC)).total_seconds()) + 1)
    clock.set(copy.retain_until + timedelta(minutes=5))
    _destroy_after_retention(kms, devices)
    assert not s3_store.exists(copy.object_key) and not s3_store.exists(copy.manifest_key)
    assert t1(kms).status == compliance.PASS, t1(kms).evidence


# ---- simulated time ------------------------------------------------------------------------


def test_simulated_400_days_show_the_archive_lifecycle():
    from datetime import date

    from kms_pipelines.core.runtime import simulate

    seen = {}

    def on_day(day, ctx, night):
        if day in (59, 61, 400, 426):
            seen[day] = (vault.copies(ctx), compliance.eval_t1(ctx))

    result = simulate.simulate(
        426,
        date(2026, 1, 1),
        on_day=on_day,
        workload=False,
        steps=["rotate_root", "rotate_service", "rotate_archive", "vault_archive", "retire_expired"],
    )
    archived = {(e.key, e.version): e.day for e in result.of("archived")}
    assert archived[("service:api-gateway", 1)] == 60 and archived[("root", 1)] == 90
    assert archived[("root", 4)] == 360 and seen[59][0] == [] and len(seen[61][0]) == 3
    deleted = {(e.key, e.version): e.day for e in result.of("archive-deleted")}
    assert deleted == {(f"service:{n}", 1): 425 for n in ("api-gateway", "worker-pipelines", "reconciliation-engine")}
    for day in (61, 400, 426):
        assert seen[day][1].status == compliance.PASS, (day, seen[day][1].evidence)
        assert all(c.problems == [] for c in seen[day][0])
    assert "archived root v1" in simulate.format_timeline(result)


# ---- the command line ----------------------------------------------------------------------


def test_cli_archive_verify_retrieve_and_refusals(tmp_path, monkeypatch):
    import os

    from click.testing import CliRunner

    from kms_pipelines.cli import cli
    from kms_pipelines.core.runtime.wiring import context_from_env

    monkeypatch.setenv("KMS_HOME", str(tmp_path / "home"))
    for var in ("KMS_DATABASE_URL", "KMS_KEYSTORE", "KMS_OBJECT_STORE", "KMS_MASTER_KEY", "KMS_WORKLOAD_PRINCIPAL"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("KMS_POLICY", write_test_policy(tmp_path))  # the approvers' keys are software ones

    def run(*args):
        return CliRunner().invoke(cli, list(args), catch_exceptions=False)

    assert run("init").exit_code == 0
    out = run("archive", "verify")
    assert out.exit_code == 0 and "0 archive copies checked, 0 broken" in out.output
    # root v1 is due: it was activated 91 days ago (`kms --at` is refused by a command that writes)
    with context_from_env().engine.begin() as conn:
        conn.execute(
            text("UPDATE key_versions SET activated_at = :t WHERE key_id = (SELECT id FROM keys WHERE name = 'root')"),
            {"t": datetime.now(UTC) - timedelta(days=91)},
        )
    assert run("keys", "rotate", "root", "--if-due").exit_code == 0
    out = run("archive", "list")
    assert out.exit_code == 0 and "root v1  archived" in out.output and "locked until" in out.output
    kms = context_from_env()
    devices = {
        n: enrol(kms, n, r)
        for n, r in (("dave", "compliance_officer"), ("bob", "security_engineering"), ("carol", "compliance_officer"))
    }

    def state():
        audit.flush(kms)
        with kms.engine.connect() as conn:
            return (
                ledger.head(conn),
                conn.execute(select(ForensicRetrieval.id)).all(),
                conn.execute(select(Approval.id, Approval.used_at)).all(),
                sorted(kms.keystore.forensic_refs()),
            )

    before = state()
    dave_next = devices["dave"].at(int(time.time()) + kms.policy.access.totp_interval_seconds)
    out = run(
        "archive",
        "retrieve",
        "root",
        "1",
        "--ticket",
        TICKET,
        "--requested-by",
        "dave",
        "--totp",
        devices["dave"].now(),
    )
    assert out.exit_code == 1 and out.output.count("\n") == 1 and "needs 2 approvals" in out.output
    assert state() == before
    code = devices["bob"].now()
    assert (
        run(
            "approve",
            "--ticket",
            TICKET,
            "--operation",
            "archive-retrieve",
            "--target",
            "root#v1",
            "--as",
            "bob",
            "--totp",
            code,
            "--software-key",
            security_key_file(kms, "bob", tmp_path),
        ).exit_code
        == 0
    )
    code = devices["carol"].now()
    assert (
        run(
            "approve",
            "--ticket",
            TICKET,
            "--operation",
            "archive-retrieve",
            "--target",
            "root#v1",
            "--as",
            "carol",
            "--totp",
            code,
            "--software-key",
            security_key_file(kms, "carol", tmp_path),
        ).exit_code
        == 0
    )
    out = run(
        "archive", "retrieve", "root", "1", "--ticket", TICKET, "--requested-by", "dave", "--totp", dave_next, "--json"
    )
    assert out.exit_code == 0, out.output
    got = json.loads(out.output)
    assert got["approvers"] == ["bob", "carol"] and got["refs"][0] in kms.keystore.forensic_refs()
    # The retrieval ran as dave, who holds archive-retrieve but not decrypt or break-glass: no A3 anomaly.
    assert [a for a in anomalies.detect(kms, datetime.now(UTC)) if a.kind == "operation_without_role"] == []

    [copy] = vault.copies(kms)
    path = tmp_path / "home" / "objects" / copy.object_key
    os.chmod(path, 0o600)
    path.write_bytes(path.read_bytes().replace(b'"root"', b'"r00t"'))  # an insider with disk access
    out = run("archive", "verify")
    assert out.exit_code == 1 and "1 broken" in out.output and "tampered" in out.output


# ---- the forensic drill --------------------------------------------------------------------


def test_monthly_drill_retrieves_an_archived_root_under_dual_control_and_verifies_old_rpts(make_kms):
    from kms_pipelines.core.backup import backups as backup
    from kms_pipelines.core.backup import drills
    from kms_pipelines.core.ledger import rpt

    kms = make_kms("sqlite")
    kms.objects = LocalObjectStore(kms.home / "objects-sim", now=kms.clock.now)
    devices = {n: enrol(kms, n, r) for n, r in (("bob", "security_engineering"), ("carol", "compliance_officer"))}
    for i in range(3):
        rpt.issue(kms, f"subject-{i}", {"n": i})  # signed by root v1
    rotate_root(kms)
    rpt.issue(kms, "after", {"n": 9})  # signed by root v2
    backup.create(kms)

    # Without approvals the drill says so and owns a follow-up; nothing is retrieved.
    report = drills.run_drill(kms)
    assert report.outcome == "failed" and kms.keystore.forensic_refs() == []
    assert "forensic_retrieval failed" in report.findings[0] and "needs 2 approvals" in report.findings[0]
    assert "**Forensic retrieval (T1):** FAILED" in report.markdown

    ticket = forensic.drill_ticket(kms.now())
    for name in ("bob", "carol"):
        approve(kms, devices[name], name, "root#v1", ticket=ticket)
    report = drills.run_drill(kms)
    assert report.outcome == "passed", report.findings
    line = next(x for x in report.markdown.splitlines() if x.startswith("- **Forensic retrieval (T1):** PASSED"))
    assert "root v1 retrieved from the vault" in line and "approved by bob, carol" in line
    assert "the 3 oldest retained RPT(s) it signed verify" in line
    assert kms.keystore.forensic_refs() == []  # released when the drill is done
    assert t1(kms).status == compliance.PASS, t1(kms).evidence


def test_drill_detects_an_rpt_that_does_not_verify_under_the_archived_key(make_kms):
    from kms_pipelines.core.backup import backups as backup
    from kms_pipelines.core.backup import drills
    from kms_pipelines.core.foundation.db.append_only import drop_append_only_triggers
    from kms_pipelines.core.ledger import rpt

    kms = make_kms("sqlite")
    kms.objects = LocalObjectStore(kms.home / "objects-sim", now=kms.clock.now)
    devices = {n: enrol(kms, n, r) for n, r in (("bob", "security_engineering"), ("carol", "compliance_officer"))}
    rpt.issue(kms, "subject", {"n": 1})
    rotate_root(kms)
    backup.create(kms)
    with kms.engine.begin() as conn:  # an insider rewrites the oldest token's signature
        drop_append_only_triggers(conn, "rpts")
        token = conn.execute(text("SELECT token FROM rpts WHERE seq=1")).scalar()
        h, p, s = token.split(".")
        forged = f"{h}.{p}.{s[:-4]}AAAA"
        conn.execute(text("UPDATE rpts SET token=:t WHERE seq=1"), {"t": forged})
    for name in ("bob", "carol"):
        approve(kms, devices[name], name, "root#v1", ticket=forensic.drill_ticket(kms.now()))
    report = drills.run_drill(kms)
    assert any("RPT seq 1 does not verify under the archived key" in f for f in report.findings)


# ---- Dagster ---------------------------------------------------------------------------------


def test_dagster_key_vault_asset_and_check_in_the_nightly_run(tmp_path):
    import dagster as dg

    from kms_pipelines.defs import keys as keys_defs
    from kms_pipelines.defs.foundation import kms_state
    from kms_pipelines.defs.resources import DatabaseResource, KeyStoreResource, KmsResource, ObjectStoreResource
    from tests.fixtures.dagster_defs import FixedClockResource

    home = tmp_path / "home"

    def resources(at):
        return {
            "kms": KmsResource(
                home=str(home),
                database=DatabaseResource(url=f"sqlite:///{home}/kms.db"),
                keystore=KeyStoreResource(kind="software"),
                objects=ObjectStoreResource(url=str(home / "objects")),
                clock=FixedClockResource(fixed_time=at),
            )
        }

    assets = [
        kms_state,
        keys_defs.keys_root,
        keys_defs.keys_service,
        keys_defs.keys_archive,
        keys_defs.key_vault,
        keys_defs.archive_copies_verify,
    ]

    def run(at):
        r = dg.materialize(
            assets, instance=dg.DagsterInstance.ephemeral(), resources=resources(at), raise_on_error=False
        )
        return r, {e.check_name: e for e in r.get_asset_check_evaluations()}

    r, checks = run("2030-01-01T02:00:00Z")
    assert r.success and checks["archive_copies_verify"].passed
    r, checks = run("2030-04-02T02:00:00Z")  # root and every service key rotate: four copies
    assert r.success and checks["archive_copies_verify"].passed
    assert checks["archive_copies_verify"].metadata["copies"].value == 4
    table = r.asset_materializations_for_node("key_vault")[0].metadata["copies"].value
    assert "root#v1" in table and "service:api-gateway#v1" in table
    copy = next(c for c in vault.copies(resources("2030-04-02T03:00:00Z")["kms"].context()) if c.key == "root")
    path = home / "objects" / copy.object_key
    path.chmod(0o600)
    path.write_bytes(path.read_bytes() + b" ")
    r, checks = run("2030-04-02T03:00:00Z")
    assert not checks["archive_copies_verify"].passed
    assert "tampered" in json.dumps(checks["archive_copies_verify"].metadata["problems"].value)


# ---- versions from before the vault --------------------------------------------------------


def test_versions_generated_before_the_vault_warn_and_later_unarchivable_ones_are_red(make_kms, monkeypatch):
    from kms_pipelines.core.foundation.db.models import Key, KeyVersion
    from kms_pipelines.core.foundation.keystore import GENERAL

    real = lifecycle._purpose
    # Root material generated the way it was before this vault existed (not archivable).
    monkeypatch.setattr(lifecycle, "_purpose", lambda cls: GENERAL if cls == "root" else real(cls))
    kms = make_kms("sqlite")
    with kms.transaction() as s:  # the vault (archive KEK v1) was installed a day after root v1
        kek_id = s.scalars(select(Key.id).where(Key.name == "archive")).one()
        s.execute(
            KeyVersion.__table__.update()
            .where(KeyVersion.key_id == kek_id)
            .values(activated_at=kms.now() + timedelta(hours=12))
        )
    rotate_root(kms)
    [copy] = vault.copies(kms)
    assert copy.status == "unarchivable" and "not generated archivable" in copy.reason
    finding = t1(kms)
    assert finding.status == compliance.WARN and "generated before the vault" in finding.evidence
    rotate_root(kms)  # root v2 was generated after the vault existed, and still is not archivable
    finding = t1(kms)
    assert finding.status == compliance.FAIL and "root#v2: generated after the vault existed" in finding.evidence


def test_forensic_material_left_a_day_past_its_ttl_is_red(team):
    kms, d = team
    rotate_root(kms)
    approve(kms, d["bob"], "bob", "root#v1")
    approve(kms, d["carol"], "carol", "root#v1")
    ref = forensic.retrieve(kms, "root", 1, ticket=TICKET, requested_by="dave").refs[0]
    kms.clock.advance(timedelta(hours=kms.policy.vault.forensic_ttl_hours + 1))
    assert t1(kms).status == compliance.PASS  # within a night of the TTL: the nightly purge is due
    kms.clock.advance(timedelta(days=1))
    finding = t1(kms)
    assert finding.status == compliance.FAIL and ref in finding.evidence
    assert forensic.purge_expired(kms) == [ref]
    assert t1(kms).status == compliance.PASS and ref not in kms.keystore.forensic_refs()


def test_a_version_whose_material_vanished_is_reported_and_does_not_block_the_others(vkms):
    kms = vkms
    with kms.transaction() as s:
        v1 = lifecycle.get_version(lifecycle.get_key(s, "service:api-gateway"), 1)
    kms.clock.advance(timedelta(days=1))
    for name in ("service:api-gateway", "service:worker-pipelines"):
        lifecycle.rotate(kms, name)  # straight through lifecycle: nothing archived yet
    kms.keystore.destroy(v1.wrap_ref)  # an insider erases a retained version's material
    made = {(c.key, c.status) for c in vault.archive_pending(kms)}
    assert made == {("service:api-gateway", "failed"), ("service:worker-pipelines", "archived")}
    finding = t1(kms)
    assert finding.status == compliance.FAIL and "service:api-gateway#v1: retired" in finding.evidence


def test_a_retired_version_without_a_retirement_time_is_refused_by_name_and_t1_is_red(vkms):
    kms = vkms
    kms.clock.advance(timedelta(days=1))
    lifecycle.rotate(kms, "service:api-gateway")  # straight through lifecycle: nothing archived yet
    with kms.engine.begin() as conn:  # an insider blanks the time its retention is counted from
        conn.execute(
            text(
                "UPDATE key_versions SET rotated_at = NULL "
                "WHERE version = 1 AND key_id = (SELECT id FROM keys WHERE name = 'service:api-gateway')"
            )
        )
    refusal = "service:api-gateway v1 is rotated but has no retirement time; nothing to archive"
    before = snapshot(kms)
    with pytest.raises(vault.VaultError) as err:
        vault.archive_version(kms, "service:api-gateway", 1)
    assert str(err.value) == refusal
    # the rotation run's catch-up reports it instead of passing over it
    made = [(c.key, c.version, c.status, c.reason) for c in vault.archive_pending(kms)]
    assert made == [("service:api-gateway", 1, "failed", refusal)]
    assert snapshot(kms) == before  # no copy, no object, no ledger entry
    finding = t1(kms)
    assert finding.status == compliance.FAIL
    assert "service:api-gateway#v1: rotated but has no retirement time and no archive copy" in finding.evidence


def test_a_retrieval_row_deleted_while_its_material_is_erased_is_refused_by_name(team, monkeypatch):
    kms, d = team
    rotate_root(kms)
    target = vault.target_for("root", 1)
    approve(kms, d["bob"], "bob", target)
    approve(kms, d["carol"], "carol", target)
    r = forensic.retrieve(kms, "root", 1, ticket=TICKET, requested_by="dave")
    real_destroy = kms.keystore.forensic_destroy

    def destroy_while_an_insider_deletes_the_row(ref):  # the real keystore call, the deletion slipped in
        with kms.engine.begin() as conn:
            conn.execute(text("DELETE FROM forensic_retrievals WHERE id = :id"), {"id": r.id})
        return real_destroy(ref)

    monkeypatch.setattr(kms.keystore, "forensic_destroy", destroy_while_an_insider_deletes_the_row)
    before = snapshot(kms)
    with pytest.raises(vault.VaultError) as err:
        forensic.release(kms, r.id)
    assert str(err.value) == f"forensic retrieval {r.id} disappeared while its material was erased"
    head, approvals, retrievals, forensic_refs, copies, objects = snapshot(kms)
    assert (head, approvals, copies, objects) == (before[0], before[1], before[4], before[5])  # no release recorded
    assert retrievals == [] and forensic_refs == []  # the insider's deletion; the material erased all the same


def test_archive_and_retrieve_on_postgresql(make_kms, s3_store):
    kms = make_kms("postgres")
    kms.objects = s3_store
    devices = {
        n: enrol(kms, n, r)
        for n, r in (("dave", "compliance_officer"), ("bob", "security_engineering"), ("carol", "compliance_officer"))
    }
    v1 = root_v1(kms)
    historic = kms.keystore.encrypt(v1.wrap_ref, b"pg", b"")
    rotate_root(kms)
    for name in ("bob", "carol"):
        approve(kms, devices[name], name, "root#v1")
    r = forensic.retrieve(kms, "root", 1, ticket=TICKET, requested_by="dave")
    assert forensic.ForensicKeyStore(kms).decrypt(r.refs[0], historic) == b"pg"
    assert t1(kms).status == compliance.PASS, t1(kms).evidence
    assert ledger.verify(kms.engine).ok and audit.verify(kms).ok
