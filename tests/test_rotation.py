"""Rotation (issue 4b): cadence reconcile, root manifest + partner notices/acks, immediate
rotation of service keys, CLI and Dagster. Every refusal asserts nothing changed."""

import base64
import json
from datetime import timedelta

import pytest
from click.testing import CliRunner
from sqlalchemy import select, text

from kms_pipelines.core.foundation.db.models_rotation import PartnerNotice, RootManifest, ServiceSeed
from kms_pipelines.core.foundation.keystore import verify_signature
from kms_pipelines.core.keys import lifecycle, manifest, rotation, service_keys
from tests.test_lifecycle import snapshot


def full_snapshot(kms):
    """Versions, ledger head, keystore refs plus this area's tables."""
    with kms.transaction() as s:
        notices = [
            (n.root_version, n.partner, n.notified_at, n.acked_at)
            for n in s.scalars(select(PartnerNotice).order_by(PartnerNotice.id))
        ]
        manifests = list(s.scalars(select(RootManifest.root_version)))
        seeds = [
            (x.key_name, x.key_version, x.root_version, x.wrapped)
            for x in s.scalars(select(ServiceSeed).order_by(ServiceSeed.id))
        ]
    return snapshot(kms), notices, manifests, seeds


def rotated(results):
    return sorted(r.key for r in results if r.rotated)


def test_reconcile_rotates_each_class_on_its_cadence_and_is_a_no_op_otherwise(kms):
    assert rotated(rotation.reconcile(kms)) == []
    before = full_snapshot(kms)
    assert rotated(rotation.reconcile(kms)) == []
    assert full_snapshot(kms)[0] == before[0]  # nothing rotated, ledger untouched
    kms.clock.advance(timedelta(days=30))
    assert rotated(rotation.reconcile(kms)) == ["backup"]
    kms.clock.advance(timedelta(days=30) - timedelta(seconds=1))
    assert rotated(rotation.reconcile(kms, "service")) == []
    kms.clock.advance(timedelta(seconds=1))
    assert rotated(rotation.reconcile(kms, "service")) == [
        f"service:{n}" for n in sorted(kms.policy.key_class("service").names)
    ]
    kms.clock.advance(timedelta(days=30))
    assert rotated(rotation.reconcile(kms)) == ["backup", "root"]
    assert rotated(rotation.reconcile(kms)) == []


def test_root_rotation_publishes_a_signed_manifest_and_notifies_partners(kms):
    kms.clock.advance(timedelta(days=90))
    [r] = rotation.reconcile(kms, "root")
    assert (r.old_version, r.new_version) == (1, 2)
    infos = manifest.manifests(kms)
    assert [m.version for m in infos] == [1, 2]
    doc = json.loads(kms.objects.get_bytes("manifests/root/v2.json"))
    assert set(doc) >= {"kid", "algorithm", "public_key", "fingerprint", "valid_from", "previous"}
    assert doc["kid"] == "root.v2" and doc["fingerprint"] == r.public_fingerprint
    old_doc = json.loads(kms.objects.get_bytes("manifests/root/v1.json"))
    assert doc["previous"]["fingerprint"] == old_doc["fingerprint"]
    # the previous root's signature over the new fingerprint verifies with the old public key only
    assert verify_signature(
        base64.b64decode(old_doc["public_key"]),
        manifest.signed_message(doc["fingerprint"]),
        base64.b64decode(doc["previous"]["signature"]),
    )
    assert manifest.verify_chain(kms).ok
    head = kms.objects.head("manifests/root/v2.json")
    assert head.retain_until is not None  # write-once
    # every partner notified through the notifier (outbox), within the deadline
    rows = rotation.partner_status(kms)
    assert {x.partner for x in rows} == {p.name for p in kms.policy.partners}
    assert all(x.status == "notified" and x.notified_at <= x.deadline for x in rows)
    sent = [n for n in kms.notifier.read() if n.get("kind") == "root_rotation_partner_notice"]
    assert sorted(n["recipients"][0] for n in sent) == sorted(p.email for p in kms.policy.partners)
    assert all(doc["fingerprint"] in n["body"] and doc["public_key"] not in n["body"] for n in sent)
    assert rotation.check_partners(kms).ok


def test_tampered_manifest_chain_is_detected():
    # offline verification over documents: swap the public key of v2
    from kms_pipelines.core.foundation.keystore.software import SoftwareKeyStore  # noqa: F401

    good = [
        {
            "format": manifest.FORMAT,
            "version": 1,
            "public_key": base64.b64encode(b"\x01" * 32).decode(),
            "fingerprint": "x",
            "previous": None,
        }
    ]
    result = manifest.verify_documents(good)
    assert not result.ok and "fingerprint does not match" in result.problem


def test_partner_check_fails_when_unnotified_24h_after_rotation_and_acks_are_recorded(kms):
    kms.notifier = None  # delivery impossible
    kms.clock.advance(timedelta(days=90))
    rotation.reconcile(kms, "root")
    assert all(r.status == "pending" for r in rotation.partner_status(kms))
    kms.clock.advance(timedelta(hours=23, minutes=59))
    assert rotation.check_partners(kms).ok  # still within 24 h
    kms.clock.advance(timedelta(minutes=1))
    check = rotation.check_partners(kms)
    assert not check.ok and len(check.overdue) == len(kms.policy.partners)
    # delivery restored: the nightly step notifies (late, and shown as late)
    from kms_pipelines.core.foundation.transports import OutboxNotifier

    kms.notifier = OutboxNotifier(kms.home / "outbox.jsonl")
    kms.clock.advance(timedelta(hours=1))
    summary = rotation._notify_step(kms)
    assert len(summary["notified"]) == len(kms.policy.partners) and summary["overdue"] == []
    check = rotation.check_partners(kms)
    assert check.ok and len(check.late) == len(kms.policy.partners)
    a = rotation.ack(kms, "investor-portal", 2, actor="partner-desk")
    assert a.new and rotation.ack(kms, "investor-portal", 2).new is False
    status = {r.partner: r for r in rotation.partner_status(kms)}
    assert status["investor-portal"].acked_by == "partner-desk"
    assert status["issuer-gateway"].acked_at is None


@pytest.mark.parametrize(
    "op",
    [
        lambda k: rotation.ack(k, "unknown-partner", 2),
        lambda k: rotation.ack(k, "investor-portal", 7),
        lambda k: rotation.reconcile(k, "break-glass"),
        lambda k: rotation.rotate_now(k, "service:nope", reason="compromise"),
    ],
)
def test_refusals_change_nothing(kms, op):
    kms.clock.advance(timedelta(days=90))
    rotation.reconcile(kms, "root")
    before = full_snapshot(kms)
    with pytest.raises(lifecycle.LifecycleError) as err:
        op(kms)
    assert str(err.value)
    assert full_snapshot(kms) == before


def test_service_rotates_at_once_on_the_policy_reasons_and_credentials_are_reissued(kms):
    cred = service_keys.issue_credential(kms, "api-gateway", "partner-app")
    r = rotation.rotate_now(kms, "service:api-gateway", reason="ci-exposure", actor="sec-eng")
    assert r.rotated and r.reason == "ci-exposure"
    assert service_keys.verify_credential(kms, "api-gateway", cred).valid  # old stays valid
    new = service_keys.pickup_credential(kms, "api-gateway", "partner-app")
    check = service_keys.verify_credential(kms, "api-gateway", new)
    assert check.valid and check.version == 2
    for reason in ("compromise", "tenant-rotation"):
        assert rotation.rotate_now(kms, "service:api-gateway", reason=reason).rotated
    with kms.transaction() as s:
        versions = [(v.version, v.state) for v in lifecycle.get_key(s, "service:api-gateway").versions]
    assert versions == [(1, "rotated"), (2, "rotated"), (3, "rotated"), (4, "active")]
    notes = [n for n in kms.notifier.read() if n.get("kind") == "manual_rotation"]
    assert len(notes) == 3 and all(n["recipients"] for n in notes)


def test_root_rotated_elsewhere_is_caught_up_by_reconcile(kms):
    service_keys.issue_credential(kms, "worker-pipelines", "c1")
    lifecycle.rotate(kms, "root", reason="compromise")  # e.g. compromise response, plain lifecycle
    with kms.transaction() as s:
        assert {x.root_version for x in s.scalars(select(ServiceSeed))} == {1}
    rotation.reconcile(kms, "root")
    with kms.transaction() as s:
        assert {x.root_version for x in s.scalars(select(ServiceSeed))} == {2}
    assert [m.version for m in manifest.manifests(kms)] == [1, 2]
    assert all(r.notified_at for r in rotation.partner_status(kms, 2))


def test_cli_partners_and_keys_rotate(kms, monkeypatch):
    from kms_pipelines.cli import cli

    kms.clock.advance(timedelta(days=90))
    rotation.reconcile(kms, "root")
    runner = CliRunner()
    obj = {"kms": kms, "at": None}
    from tests.fixtures.kms import ceremony, totp_now

    d = ceremony(kms, {"sre": "sre_oncall", "b": "security_engineering", "c": "security_engineering"})
    # the acknowledgement is recorded by a proven principal, never a claimed name
    res = runner.invoke(
        cli, ["partners", "ack", "regulator-feed", "--version", "2", "--as", "b", "--totp", "000000"], obj=obj
    )
    assert res.exit_code == 1 and "TOTP code for 'b' is wrong" in res.output, res.output
    res = runner.invoke(
        cli,
        ["partners", "ack", "regulator-feed", "--version", "2", "--as", "b", "--totp", totp_now(kms, d["b"])],
        obj=obj,
    )
    assert res.exit_code == 0, res.output
    assert "regulator-feed acknowledged root v2" in res.output
    assert [a.acked_by for a in rotation.partner_status(kms, 2) if a.partner == "regulator-feed"] == ["b"]
    res = runner.invoke(
        cli, ["partners", "ack", "nobody", "--version", "2", "--as", "c", "--totp", totp_now(kms, d["c"])], obj=obj
    )
    assert res.exit_code == 1 and "unknown partner 'nobody'" in res.output
    res = runner.invoke(cli, ["partners", "status", "--json"], obj=obj)
    assert res.exit_code == 0 and len(json.loads(res.output)) == len(kms.policy.partners)
    res = runner.invoke(
        cli,
        [
            "keys",
            "rotate",
            "service:reconciliation-engine",
            "--reason",
            "tenant-rotation",
            "--requested-by",
            "sre",
            "--totp",
            totp_now(kms, d["sre"]),
        ],
        obj=obj,
    )
    assert res.exit_code == 0 and "v1 -> v2" in res.output, res.output
    res = runner.invoke(cli, ["keys", "rotate", "service:api-gateway", "--reason", "bogus"], obj=obj)
    assert res.exit_code == 2
    res = runner.invoke(cli, ["manifest", "verify"], obj=obj)
    assert res.exit_code == 0 and "2 root version(s)" in res.output


def test_dagster_key_assets_and_partner_check(tmp_path):
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

    assets = [kms_state, keys_defs.keys_root, keys_defs.keys_service, keys_defs.keys_data, keys_defs.keys_backup]
    checks = [keys_defs.partners_notified_within_24h, keys_defs.root_manifest_chain_verifies]
    r = dg.materialize(
        assets + checks, instance=dg.DagsterInstance.ephemeral(), resources=resources("2030-01-01T02:00:00Z")
    )
    assert r.success
    md = r.asset_materializations_for_node("keys_root")[0].metadata
    assert md["rotated_count"].value == 0 and md["manifest_kid"].value == "root.v1"
    r = dg.materialize(
        assets + checks, instance=dg.DagsterInstance.ephemeral(), resources=resources("2030-04-02T02:00:00Z")
    )
    assert r.success
    md = r.asset_materializations_for_node("keys_root")[0].metadata
    assert md["rotated"].value == ["root v1->v2"] and md["manifest_kid"].value == "root.v2"
    # the panel shows a short fingerprint; the full one (what `evidence verify --trust` takes) is in
    # full_values, a Markdown long enough for Dagster's "[Show Markdown]" dialog
    short = md["manifest_fingerprint"].value
    assert short.startswith("SHA256:") and short.endswith("…") and len(short) == len("SHA256:") + 17
    full_values = md["full_values"].value
    assert len(full_values) >= 1000 and f"`{short[:-1]}" in full_values
    svc = r.asset_materializations_for_node("keys_service")[0].metadata
    assert svc["rotated_count"].value == 3
    evals = {e.check_name: e.passed for e in r.get_asset_check_evaluations()}
    assert evals == {"partners_notified_within_24h": True, "root_manifest_chain_verifies": True}
    doc = json.loads((home / "objects" / "manifests/root/v2.json").read_bytes())
    assert f"`{doc['fingerprint']}`" in full_values  # whole, in code: selected and copied as one
    text = json.dumps({k: str(v.value) for k, v in md.items()})
    assert doc["public_key"] not in text  # fingerprints only, never key bytes


@pytest.mark.parametrize("column, missing", [("activated_at", "activation time"), ("fingerprint", "fingerprint")])
def test_publishing_a_root_version_with_a_blanked_column_is_refused_by_name(kms, column, missing):
    lifecycle.rotate(kms, "root", reason="compromise")  # plain lifecycle: v2's manifest is not published yet
    with kms.engine.begin() as conn:  # an insider blanks what the manifest would carry
        conn.execute(
            text(
                f"UPDATE key_versions SET {column} = NULL "
                "WHERE version = 2 AND key_id = (SELECT id FROM keys WHERE name = 'root')"
            )
        )
    objects = sorted(i.key for i in kms.objects.list(""))
    before = full_snapshot(kms)
    with pytest.raises(manifest.ManifestError) as err:
        manifest.publish(kms, 2)
    assert str(err.value) == f"root v2 has no {missing}; nothing to publish"
    assert full_snapshot(kms) == before and sorted(i.key for i in kms.objects.list("")) == objects
