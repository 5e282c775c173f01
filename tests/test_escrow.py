"""Break-glass escrow (P4, R4): M-of-N sealing, unseal refusals, 30-day rotation over
simulated days, destruction confirmations and their check."""

import base64
import json
from datetime import timedelta

import pyotp
import pytest
from sqlalchemy import func, select, text

from kms_pipelines.core.access import principals as access
from kms_pipelines.core.foundation.db.models import KeyVersion
from kms_pipelines.core.foundation.db.models_access import Approval
from kms_pipelines.core.foundation.db.models_events import EscrowDestruction, EscrowPackage, EscrowUnseal
from kms_pipelines.core.keys import lifecycle
from kms_pipelines.core.ledger import ledger
from kms_pipelines.core.response import escrow
from kms_pipelines.core.runtime import nightly
from tests.fixtures.kms import approve_both, ceremony

CUSTODIANS = ["custodian-a", "custodian-b", "custodian-c"]


def snapshot(kms):
    with kms.engine.connect() as conn:
        versions = conn.execute(
            select(KeyVersion.key_id, KeyVersion.version, KeyVersion.state).order_by(KeyVersion.id)
        ).all()
        head = ledger.head(conn)
        pkgs = conn.execute(
            select(EscrowPackage.id, EscrowPackage.superseded_at, EscrowPackage.erased_at).order_by(EscrowPackage.id)
        ).all()
        confs = conn.scalar(select(func.count()).select_from(EscrowDestruction))
        unseals = conn.scalar(select(func.count()).select_from(EscrowUnseal))
        approvals_ = conn.execute(select(Approval.id, Approval.used_at).order_by(Approval.id)).all()
    return versions, head, pkgs, confs, unseals, approvals_, sorted(kms.keystore.refs())


@pytest.fixture
def sealed(kms):
    return _seal_all(kms)


@pytest.fixture
def sealed_sqlite(make_kms):
    """Refusal matrices run on SQLite only; the flows above run on both databases."""
    return _seal_all(make_kms("sqlite"))


def _seal_all(kms):
    identities = {c: escrow.enroll_custodian(kms, c)[1] for c in CUSTODIANS}
    pkg = escrow.seal(kms)
    return kms, identities, pkg


def approvals(kms, *, operation, target, ticket, requester="req-sre", requester_roles=("sre_oncall",)):
    """Two TOTP-verified approvals from distinct principals (the access area's API)."""
    from kms_pipelines.core.foundation.db.models_access import Principal

    with kms.transaction() as s:
        enrolled = s.scalars(select(Principal.name).where(Principal.kind == "human")).first() is not None
    if not enrolled:  # the first-run ceremony, once per test
        devices = ceremony(
            kms,
            {requester: list(requester_roles), "appr-sec": "security_engineering", "appr-comp": "compliance_officer"},
        )
        kms.__dict__.setdefault("_test_devices", {}).update(devices)
    secrets_ = {n: d.secret for n, d in kms.__dict__["_test_devices"].items()}
    access.request_approval(kms, operation=operation, target=target, ticket=ticket, requester=requester)
    for name, secret in secrets_.items():
        if name == requester:
            continue
        code = pyotp.TOTP(secret, interval=kms.policy.access.totp_interval_seconds).at(kms.now())
        approve_both(kms, ticket=ticket, operation=operation, approver=name, totp=code, target=target)
    return requester


def test_package_holds_no_plaintext_and_m_shares_recover_the_key(sealed):
    kms, ids, pkg = sealed
    assert (pkg.threshold, pkg.custodians) == (2, CUSTODIANS)
    data = kms.objects.get_bytes(pkg.object_key)
    with kms.transaction() as s:
        ref = lifecycle.get_version(lifecycle.get_key(s, "break-glass"), None).wrap_ref
    value = kms.keystore.export_secret(ref)
    for form in (value, value.hex().encode(), base64.b64encode(value)):
        assert form not in data
    doc = json.loads(data)
    assert set(doc["shares"]) == set(CUSTODIANS) and doc["key_version"] == pkg.key_version
    for pair in (("custodian-a", "custodian-b"), ("custodian-b", "custodian-c"), ("custodian-a", "custodian-c")):
        _, recovered, used = escrow.recover(kms, pkg.package_id, {c: ids[c] for c in pair})
        assert recovered == value and used == sorted(pair)


@pytest.mark.parametrize("bad", ["m_minus_1", "wrong_identity", "foreign_share", "unknown_custodian"])
def test_unseal_refusals_change_nothing(sealed_sqlite, bad):
    kms, ids, pkg = sealed_sqlite
    ticket = "CHG-BG-1"
    requester = approvals(kms, operation="break-glass", target=pkg.package_id, ticket=ticket)
    shares = {
        "m_minus_1": {"custodian-a": ids["custodian-a"]},
        "wrong_identity": {"custodian-a": ids["custodian-a"], "custodian-b": ids["custodian-c"]},
        "foreign_share": {
            "custodian-a": ids["custodian-a"],
            "custodian-b": json.dumps(
                {
                    "format": "kms-escrow-share/1",
                    "package_id": "other",
                    "custodian": "custodian-b",
                    "index": 2,
                    "share": base64.b64encode(b"x" * 16).decode(),
                }
            ),
        },
        "unknown_custodian": {"custodian-a": ids["custodian-a"], "mallory": ids["custodian-b"]},
    }[bad]
    before = snapshot(kms)
    with pytest.raises(escrow.EscrowError) as err:
        escrow.unseal(kms, pkg.package_id, shares, ticket=ticket, requester=requester)
    if bad == "m_minus_1":
        assert "needs 2 custodian shares" in str(err.value) and "got 1" in str(err.value)
    assert "AGE-SECRET-KEY" not in str(err.value)
    assert snapshot(kms) == before


def test_unseal_without_dual_approval_is_refused(sealed):
    kms, ids, pkg = sealed
    before = snapshot(kms)
    with pytest.raises(access.AccessDenied, match="needs 2 approvals"):
        escrow.unseal(kms, pkg.package_id, {c: ids[c] for c in CUSTODIANS[:2]}, ticket="CHG-NONE", requester="nobody")
    assert snapshot(kms) == before


def test_unseal_with_m_shares_and_approvals_rotates_and_reseals(sealed, tmp_path):
    kms, ids, pkg = sealed
    ticket = "CHG-BG-2"
    requester = approvals(kms, operation="break-glass", target=pkg.package_id, ticket=ticket)
    with kms.transaction() as s:
        ref = lifecycle.get_version(lifecycle.get_key(s, "break-glass"), None).wrap_ref
    value = kms.keystore.export_secret(ref)
    kms.keystore.destroy(ref)  # the HSM lost it: unseal must import it back
    out = tmp_path / "bg.key"
    r = escrow.unseal(
        kms,
        pkg.package_id,
        {c: ids[c] for c in ("custodian-b", "custodian-c")},
        ticket=ticket,
        requester=requester,
        out_path=out,
    )
    assert r.imported and kms.keystore.export_secret(ref) == value
    assert out.read_bytes() == value and (out.stat().st_mode & 0o777) == 0o600
    assert r.approvers == ["appr-comp", "appr-sec"] and r.rotated_to == pkg.key_version + 1
    cur = escrow.current_package(kms)
    assert cur.package_id == r.new_package and cur.key_version == r.rotated_to
    assert escrow.get_package(kms, pkg.package_id).superseded_at is not None
    with kms.transaction() as s:
        entries = ledger.entries_for(s, "break-glass")
        assert entries[-1].change_ticket == ticket and entries[-1].reason == "break-glass"
        assert s.scalar(select(func.count()).select_from(EscrowUnseal)) == 1
    outbox = [json.loads(line) for line in (kms.home / "outbox.jsonl").read_text().splitlines()]
    assert any(n.get("kind") == "escrow_unsealed" and "compliance@example.com" in n["recipients"] for n in outbox)
    # approvals are single-use: a second unseal of the new package under the same ticket is refused
    with pytest.raises(access.AccessDenied):
        escrow.unseal(kms, cur.package_id, {c: ids[c] for c in CUSTODIANS[:2]}, ticket=ticket, requester=requester)


def set_break_glass_wrap_ref(kms, version, ref):
    """Play a database admin: set (or NULL) a break-glass version's keystore reference."""
    with kms.engine.begin() as conn:
        conn.execute(
            text(
                "UPDATE key_versions SET wrap_ref = :ref WHERE version = :v "
                "AND key_id = (SELECT id FROM keys WHERE name = 'break-glass')"
            ),
            {"ref": ref, "v": version},
        )


def test_unseal_of_a_version_without_a_keystore_reference_is_refused_and_keeps_the_approvals(sealed_sqlite):
    kms, ids, pkg = sealed_sqlite
    ticket = "CHG-BG-NOREF"
    requester = approvals(kms, operation="break-glass", target=pkg.package_id, ticket=ticket)
    with kms.transaction() as s:
        ref = lifecycle.get_version(lifecycle.get_key(s, "break-glass"), pkg.key_version).wrap_ref
    set_break_glass_wrap_ref(kms, pkg.key_version, None)
    shares = {c: ids[c] for c in CUSTODIANS[:2]}
    before = snapshot(kms)
    with pytest.raises(escrow.EscrowError) as err:
        escrow.unseal(kms, pkg.package_id, shares, ticket=ticket, requester=requester)
    assert str(err.value) == f"break-glass v{pkg.key_version} has no keystore reference to import the key into"
    assert snapshot(kms) == before  # no unseal row, no audit entry, approvals unused, nothing imported
    # the approvals were not consumed: with the reference back, the same approvals unseal
    set_break_glass_wrap_ref(kms, pkg.key_version, ref)
    r = escrow.unseal(kms, pkg.package_id, shares, ticket=ticket, requester=requester)
    assert r.approvers == ["appr-comp", "appr-sec"]


def test_escrow_rotates_every_30_days_over_simulated_days(sealed):
    kms, ids, first = sealed
    seen = [first.package_id]
    for month in range(1, 4):
        for _ in range(29):
            kms.clock.advance(timedelta(days=1))
            assert nightly.steps()  # the escrow step is registered
            assert not escrow.nightly_escrow(kms)["rotated"]
        kms.clock.advance(timedelta(days=1))
        out = escrow.nightly_escrow(kms)
        assert out["rotated"] and out["sealed"], out
        cur = escrow.current_package(kms)
        assert cur.package_id not in seen and cur.key_version == first.key_version + month
        assert escrow.current_problems(kms) == []
        seen.append(cur.package_id)
    assert [p.package_id for p in escrow.packages(kms) if p.superseded_at] == seen[:-1]


def test_unconfirmed_destruction_fails_its_check(sealed):
    kms, ids, old = sealed
    lifecycle.rotate(kms, "break-glass", reason="manual")
    new = escrow.ensure_sealed(kms)
    assert new["sealed"] and new["superseded"] == old.package_id
    days = kms.policy.key_class("break-glass").escrow.destruction_confirm_days
    escrow.confirm_destroyed(kms, old.package_id, "custodian-a", ids["custodian-a"])
    kms.clock.advance(timedelta(days=days) - timedelta(minutes=1))
    assert escrow.destruction_overdue(kms) == []  # still inside the window
    kms.clock.advance(timedelta(minutes=1))
    overdue = escrow.destruction_overdue(kms)
    assert [(o["package_id"], o["missing"]) for o in overdue] == [(old.package_id, ["custodian-b", "custodian-c"])]
    assert kms.objects.exists(old.object_key)
    for c in ("custodian-b", "custodian-c"):
        escrow.confirm_destroyed(kms, old.package_id, c, ids[c])
    assert escrow.destruction_overdue(kms) == []
    assert escrow.get_package(kms, old.package_id).erased_at is not None
    assert not kms.objects.exists(old.object_key)


@pytest.mark.parametrize("bad", ["current_package", "wrong_identity", "not_custodian", "unknown_package"])
def test_confirm_destroyed_refusals_change_nothing(sealed_sqlite, bad):
    kms, ids, old = sealed_sqlite
    lifecycle.rotate(kms, "break-glass", reason="manual")
    escrow.ensure_sealed(kms)
    cur = escrow.current_package(kms)
    args = {
        "current_package": (cur.package_id, "custodian-a", ids["custodian-a"]),
        "wrong_identity": (old.package_id, "custodian-a", ids["custodian-b"]),
        "not_custodian": (old.package_id, "mallory", ids["custodian-b"]),
        "unknown_package": ("bg-nope", "custodian-a", ids["custodian-a"]),
    }[bad]
    before = snapshot(kms)
    with pytest.raises(escrow.EscrowError):
        escrow.confirm_destroyed(kms, *args)
    assert snapshot(kms) == before


def test_a_package_row_deleted_before_its_erasure_is_recorded_is_refused_by_name(sealed_sqlite, monkeypatch):
    from tests.test_rpt import admin

    kms, ids, old = sealed_sqlite
    lifecycle.rotate(kms, "break-glass", reason="manual")
    escrow.ensure_sealed(kms)
    cur = escrow.current_package(kms)
    for c in ("custodian-a", "custodian-b"):
        escrow.confirm_destroyed(kms, old.package_id, c, ids[c])
    real_delete = kms.objects.delete

    def delete_while_an_insider_deletes_the_row(key):  # the real store call, the deletion slipped in
        admin(
            kms,
            "escrow_destructions",
            "DELETE FROM escrow_destructions WHERE package_id = :p",
            "DELETE FROM escrow_packages WHERE id = :p",
            params={"p": old.package_id},
        )
        return real_delete(key)

    monkeypatch.setattr(kms.objects, "delete", delete_while_an_insider_deletes_the_row)
    with pytest.raises(escrow.EscrowError) as err:  # the last confirmation erases the stored copy
        escrow.confirm_destroyed(kms, old.package_id, "custodian-c", ids["custodian-c"])
    assert str(err.value) == f"escrow package {old.package_id} disappeared"
    with kms.engine.connect() as conn:  # the row is not brought back as erased; the current one is untouched
        pkgs = conn.execute(select(EscrowPackage.id, EscrowPackage.erased_at)).all()
    assert pkgs == [(cur.package_id, None)]


def test_seal_refuses_without_enrolled_custodians_and_nightly_reports_it(kms):
    escrow.enroll_custodian(kms, "custodian-a")
    before = snapshot(kms)
    with pytest.raises(escrow.EscrowError, match="not enrolled: custodian-b, custodian-c"):
        escrow.seal(kms)
    assert snapshot(kms) == before
    out = escrow.nightly_escrow(kms)
    assert "not enrolled" in out["problem"]
    assert escrow.current_problems(kms) == ["no current escrow package"]
    with pytest.raises(escrow.EscrowError, match="not a custodian in the policy"):
        escrow.enroll_custodian(kms, "mallory")
    with pytest.raises(escrow.EscrowError, match="already enrolled"):
        escrow.enroll_custodian(kms, "custodian-a")


def test_current_package_version_cannot_be_destroyed(sealed_sqlite):
    kms, ids, pkg = sealed_sqlite
    with kms.transaction() as s:
        key = lifecycle.get_key(s, "break-glass")
        v = lifecycle.get_version(key, pkg.key_version)
        assert escrow._guard_current_package(s, kms, key, v).startswith("break-glass v1 is sealed")
