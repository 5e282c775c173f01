"""Issue 12, cases 3 and 4: each break the way an insider (or a skipped night) would leave
it, on real PostgreSQL, turning its clause red in the compliance report (core and the
materialized ``policy_compliance_report`` asset, whose ``policy_compliant`` check fails)
with the specific message. Cases 1 and 2 (evidence bundles, backup manifests) are in
tests/test_evidence_trust.py and tests/test_backup_trust.py."""

import base64
import json
import os
import secrets
import shutil
from datetime import timedelta

import pyotp
import pytest
from click.testing import CliRunner
from sqlalchemy import select, text

from kms_pipelines.cli import cli
from kms_pipelines.core import compliance
from kms_pipelines.core.access import anomalies, crosscheck
from kms_pipelines.core.access import principals as access
from kms_pipelines.core.backup import drills
from kms_pipelines.core.envelope import data_keys as envelope
from kms_pipelines.core.foundation.clock import SimulatedClock
from kms_pipelines.core.foundation.db.models_rotation import PartnerNotice, ServiceSeed
from kms_pipelines.core.keys import lifecycle, manifest, manual, rotation
from kms_pipelines.core.ledger import audit, checkpoints
from kms_pipelines.core.response import escrow, events
from kms_pipelines.core.runtime import nightly
from tests.fixtures.kms import KEY_ORIGIN, approve_both, ceremony, totp_now
from tests.test_compliance import CUSTODIANS, _dagster_report, _now
from tests.test_rpt import admin


@pytest.fixture
def state(make_kms, master_key, monkeypatch):
    """test_compliance's fully exercised state, on PostgreSQL: every clause has evidence."""
    monkeypatch.setenv("KMS_MASTER_KEY", base64.b64encode(master_key).decode())
    kms = make_kms("postgres", clock=SimulatedClock(_now()))
    for c in CUSTODIANS:
        escrow.enroll_custodian(kms, c)
    devices = ceremony(kms, {"ann": "security_engineering", "bob": "compliance_officer", "sam": "sre_oncall"})
    nightly.run_nightly(kms)
    report = drills.run_drill(kms, participants=["ann", "bob"])
    assert report.outcome == "passed", report.findings
    kms.devices = devices
    return kms


def red(kms, clause, fragment, *, dagster=True):
    """``clause`` is red with ``fragment`` in its evidence: in core, and in the Dagster asset
    with the policy_compliant check failed naming it."""
    row = compliance.build_report(kms, only=[clause]).row(clause)
    assert row.status == "fail" and fragment in row.evidence, (row.status, row.evidence)
    if dagster:
        meta, rows, check = _dagster_report(kms)
        assert rows[clause]["status"] == "🔴 FAIL", rows[clause]
        assert fragment in meta["report"].value, meta["report"].value  # the evidence, in the Markdown report
        assert not check.passed and clause in check.metadata["failing"].value
    return row


def t3_check_red(kms, fragment):
    """The blocking ``ledger_chain_intact`` check (T3) fails naming the cross-check problem."""
    import dagster as dg

    from kms_pipelines.defs import foundation
    from kms_pipelines.defs import ledger as ledger_defs
    from tests.fixtures.dagster_defs import kms_resources

    resources = kms_resources(
        kms.home, kms.engine.url.render_as_string(hide_password=False), fixed_time=kms.now().isoformat()
    )
    result = dg.materialize(
        [foundation.kms_state, ledger_defs.ledger_chain_intact],
        resources=resources,
        instance=dg.DagsterInstance.ephemeral(),
        raise_on_error=False,
    )
    check = {e.check_name: e for e in result.get_asset_check_evaluations()}["ledger_chain_intact"]
    assert not check.passed and fragment in check.metadata["problem"].value, check.metadata


def green_first(kms, *clauses):
    statuses = {r.clause: r.status for r in compliance.build_report(kms, only=list(clauses)).rows}
    assert all(s == "pass" for s in statuses.values()), statuses


def _env(kms, **extra):
    env = {
        "KMS_HOME": str(kms.home),
        "KMS_DATABASE_URL": kms.engine.url.render_as_string(hide_password=False),
        "KMS_OBJECT_STORE": str(kms.home / "objects"),
        "KMS_KEYSTORE": "software",
    }
    env.update(extra)
    return env


def _cli(kms, *args):
    return CliRunner().invoke(cli, list(args), env=_env(kms), catch_exceptions=False)


# ---- case 3: tail truncation after the newest checkpoint -----------------------------


def test_case3_tail_cut_after_a_rotation_is_red_everywhere(state):
    kms = state
    green_first(kms, "T3", "A3")
    with kms.engine.connect() as conn:
        before = conn.execute(text("SELECT max(seq) FROM ledger_entries")).scalar()
    result = rotation.rotate_now(kms, "service:api-gateway", reason="tenant-rotation")
    assert checkpoints.checkpoint_if_changed(kms) is not None  # what every state-changing command ends with
    assert checkpoints.checkpoint_if_changed(kms) is None  # and never twice for one change
    admin(kms, "ledger_entries", f"DELETE FROM ledger_entries WHERE seq > {before}")  # the rotation's rows
    with kms.engine.connect() as conn:
        replay = crosscheck.replay(conn)
    assert any(
        f"service:api-gateway v{result.new_version} is active but no ledger entry created it" in p
        for p in replay.problems
    ), replay.problems
    cp = checkpoints.verify(kms)
    assert not cp.ok and f"ledger truncated: it ends at seq {before}" in cp.problem
    verify = _cli(kms, "ledger", "verify")
    assert verify.exit_code == 1 and "ledger DISAGREES with" in verify.stderr
    assert "service:api-gateway v1 is rotated but the ledger (seq 2) leaves it active" in verify.stderr
    assert _cli(kms, "ledger", "verify-checkpoints").exit_code == 1
    red(kms, "T3", "ledger truncated")
    t3_check_red(kms, "service:api-gateway v1 is rotated but the ledger (seq 2) leaves it active")
    red(kms, "A3", "has no ledger entry (ledger entries deleted)", dagster=False)


def test_case3_cli_checkpoints_each_state_change_once_and_zero_checkpoints_fail(tmp_path, monkeypatch):
    home = tmp_path / "home"
    for k in [k for k in os.environ if k.startswith("KMS_")]:
        monkeypatch.delenv(k)
    monkeypatch.setenv("KMS_HOME", str(home))
    monkeypatch.setenv("KMS_DATABASE_URL", f"sqlite:///{home / 'kms.db'}")
    runner = CliRunner()

    def kms(*args):
        return runner.invoke(cli, list(args), catch_exceptions=False)

    def cps():
        d = home / "objects" / "checkpoints"
        return sorted(p.name for p in d.rglob("*.json")) if d.exists() else []

    init = kms(
        "init",
        "--admin",
        "sre=sre_oncall",
        "--admin",
        "b",
        "--admin",
        "c",
        "--admin",
        "d",
        "--json",
        "--console-origin",
        KEY_ORIGIN,
        "--software-keys",
        str(tmp_path / "keys"),
    )
    assert init.exit_code == 0
    sre = pyotp.parse_uri(json.loads(init.output)["enrolled"][0]["provisioning_uri"])
    assert len(cps()) == 1  # init moved the ledger
    assert (
        kms(
            "keys",
            "rotate",
            "service:api-gateway",
            "--reason",
            "tenant-rotation",
            "--requested-by",
            "sre",
            "--totp",
            sre.now(),
        ).exit_code
        == 0
    )
    assert len(cps()) == 2
    assert kms("keys", "list").exit_code == 0 and kms("ledger", "verify").exit_code == 0
    assert len(cps()) == 2  # reading changes nothing
    assert kms("ledger", "verify-checkpoints").exit_code == 0
    shutil.rmtree(home / "objects" / "checkpoints")  # as if none had ever been written
    zero = kms("ledger", "verify-checkpoints")
    assert zero.exit_code == 1 and "no signed checkpoint in WORM storage although the ledger holds" in zero.stderr


# ---- case 4: evaluators that read only one table -------------------------------------


def test_case4_t2_material_erased_under_live_deks(state):
    kms = state
    envelope.encrypt(kms, "data:banking-attachments", "doc-1", b"statement")
    with kms.transaction() as s:
        old = lifecycle.active_version(lifecycle.get_key(s, "data:banking-attachments"))
    lifecycle.rotate(kms, "data:banking-attachments")
    green_first(kms, "T2")
    kms.keystore.inner.destroy(old.wrap_ref)  # out of band: no lifecycle, no guard, no audit
    red(
        kms,
        "T2",
        f"data:banking-attachments v{old.version} (rotated) still wraps 1 live DEK(s) but its key "
        f"material is gone from the keystore",
    )


def test_case4_a3_rotation_through_the_unaudited_keystore(state):
    from dataclasses import replace

    kms = state
    green_first(kms, "A3")
    bypass = replace(kms, keystore=kms.keystore.inner)  # the raw backend: no audit events
    r = lifecycle.rotate(bypass, "service:worker-pipelines")
    red(kms, "A3", f"service:worker-pipelines#v{r.new_version} became active but the generation of its key material")


def test_case4_r2_resolved_event_without_a_response(state):
    kms = state
    green_first(kms, "R2")
    ev = events.report(kms, "ci-secret-exposure", "service:api-gateway", "ci")
    with kms.engine.begin() as conn:  # closed by hand, nothing done
        conn.execute(
            text(
                "UPDATE security_events SET status = 'resolved', resolved_at = now(), "
                "response = '{\"steps\": []}' WHERE id = :id"
            ),
            {"id": ev.id},
        )
    red(
        kms,
        "R2",
        f"security event {ev.id[:12]} (ci-secret-exposure on service:api-gateway) is resolved but no "
        f"ledger entry shows a response",
    )


def test_case4_b1_newest_archive_overwritten_with_random_bytes(state):
    from kms_pipelines.core.backup import backups as backup

    kms = state
    green_first(kms, "B1")
    with kms.transaction() as s:
        row = backup.get_backup(s)
        akey, aid = row.archive_key, row.archive_id
    path = kms.objects.root / akey
    size = path.stat().st_size
    os.chmod(path, 0o600)  # an attacker on the storage host
    path.write_bytes(secrets.token_bytes(size))
    red(kms, "B1", f"archive {aid} bytes do not match the sha256 in its signed manifest")


def test_case4_a4_manual_operation_whose_compliance_email_failed(state):
    from kms_pipelines.core.foundation.transports import notifier_from_env

    kms = state
    green_first(kms, "A4")
    kms.notifier = notifier_from_env(
        kms.home,
        {
            "KMS_SMTP_HOST": "127.0.0.1",
            "KMS_SMTP_PORT": "1",
            "KMS_SMTP_SENDER": "kms@example.com",
            "KMS_NOTIFY_RETRY_ATTEMPTS": "1",
            "KMS_SMTP_TIMEOUT": "2",
        },
    )
    d = kms.devices
    access.request_approval(kms, operation="rotate", target="service:api-gateway", ticket="CHG-7", requester="sam")
    for name in ("ann", "bob"):
        approve_both(
            kms, name, ticket="CHG-7", operation="rotate", target="service:api-gateway", totp=totp_now(kms, d[name])
        )
    outcome = manual.manual_rotate(
        kms, "service:api-gateway", ticket="CHG-7", requested_by="sam", totp=totp_now(kms, d["sam"])
    )
    assert outcome.notification_failures  # the email really failed (connection refused on loopback)
    red(kms, "A4", "manual operation CHG-7 (ledger seq")
    assert "not notified: delivery failed on email" in compliance.build_report(kms, only=["A4"]).row("A4").evidence


def test_case4_t3_a4_key_state_edited_without_a_ledger_entry(state):
    kms = state
    green_first(kms, "T3", "A4")
    with kms.engine.begin() as conn:
        conn.execute(
            text(
                "UPDATE key_versions SET state = 'revoked' WHERE state = 'active' AND key_id = "
                "(SELECT id FROM keys WHERE name = 'data:postgres')"
            )
        )
    red(
        kms, "T3", "ledger replay disagrees with key_versions: key_versions: data:postgres v1 is revoked but the ledger"
    )
    t3_check_red(kms, "key_versions: data:postgres v1 is revoked but the ledger")
    red(kms, "A4", "key state changed with no ledger entry (so no approval)", dagster=False)


def test_case4_r1_outbox_only_partner_notice_is_a_warning(state):
    kms = state
    assert kms.policy.partners
    rotation.rotate_key(kms, "root", reason="cadence")  # the fixture's notifier is the local outbox only
    row = compliance.build_report(kms, only=["R1"]).row("R1")
    assert row.status == "warn" and "went only to the local outbox (no SMTP or Slack configured)" in row.evidence
    # a database admin hides the outbox-only deliveries: the notices say "sent", nothing backs them
    admin(
        kms,
        "notification_deliveries",
        "DELETE FROM notification_deliveries WHERE kind = 'root_rotation_partner_notice'",
    )
    red(kms, "R1", "is marked sent but no delivery is recorded", dagster=False)


def test_case4_a3_detection_covers_a_skipped_night_and_report_detects_first(state):
    kms = state
    anomalies.refresh_anomalies(kms)
    burst_at = kms.now() + timedelta(hours=30)
    for i in range(kms.policy.audit.failure_burst_per_hour + 3):
        audit.emit(
            kms,
            at=burst_at + timedelta(seconds=i),
            operation="decrypt",
            actor="workload:api-gateway",
            target_ref="data:postgres",
            outcome="error",
            detail={"error": "KeyNotFound"},
        )
    audit.flush(kms)
    kms.clock.advance(timedelta(hours=80))  # the nightly runs in between were skipped
    row = compliance.build_report(kms, only=["A3"]).row("A3")
    assert row.status == "fail" and "anomaly detection has not covered" in row.evidence

    def written():
        with kms.engine.connect() as conn:
            return (
                tuple(conn.execute(text("SELECT count(*), max(seq) FROM audit_events")).one()),
                conn.execute(text("SELECT count(*) FROM audit_anomalies")).scalar(),
            )

    before = written()
    out = CliRunner().invoke(
        cli,
        ["--at", kms.now().isoformat(), "report", "--clause", "A3", "--format", "json"],
        env=_env(kms),
        catch_exceptions=False,
    )
    a3 = json.loads(out.stdout)["rows"][0]
    assert out.exit_code == 1 and a3["status"] == "fail" and "failure_burst" in a3["evidence"], a3
    assert "anomaly detection has not covered" not in a3["evidence"]  # the report ran detection first
    # --at is read-only (issue 11): the detection ran in memory; no anomaly row, no cursor event at a chosen time
    assert written() == before


def test_case4_b4_moved_kms_home_keeps_its_drill_report(state, tmp_path):
    from dataclasses import replace

    kms = state
    green_first(kms, "B4")
    from kms_pipelines.core.foundation.db.models_backup import Drill

    with kms.engine.begin() as conn:
        stored = conn.execute(select(Drill.report_path)).scalar()
        assert not os.path.isabs(stored) and stored.startswith("runbook/drills/")
        # a row from before this change: an absolute path under the old home
        conn.execute(text("UPDATE drills SET report_path = :p"), {"p": str(kms.home / stored)})
    moved = tmp_path / "moved-home"
    shutil.copytree(kms.home, moved)
    shutil.rmtree(kms.home / "runbook")
    assert compliance.build_report(kms, only=["B4"]).row("B4").status == "fail"  # really gone from the old home
    assert compliance.build_report(replace(kms, home=moved), only=["B4"]).row("B4").status == "pass"


def test_case4_manual_root_rotation_does_the_root_follow_ups(state):
    kms = state
    d = kms.devices
    access.request_approval(kms, operation="rotate", target="root", ticket="CHG-ROOT", requester="sam")
    for name in ("ann", "bob"):
        approve_both(kms, name, ticket="CHG-ROOT", operation="rotate", target="root", totp=totp_now(kms, d[name]))
    outcome = manual.manual_rotate(kms, "root", ticket="CHG-ROOT", requested_by="sam", totp=totp_now(kms, d["sam"]))
    new = outcome.result.new_version
    with kms.transaction() as s:
        seeds = s.execute(select(ServiceSeed.key_name, ServiceSeed.root_version)).all()
        notices = s.scalars(select(PartnerNotice).where(PartnerNotice.root_version == new)).all()
    assert seeds and all(rv == new for _, rv in seeds)
    assert notices and all(n.notified_at is not None for n in notices)
    assert manifest.latest(kms).version == new and manifest.verify_chain(kms).ok
    p1 = compliance.build_report(kms, only=["P1"]).row("P1")
    assert p1.status == "pass", p1.evidence


def test_case4_a1_an_unenrolled_actor_decrypting_and_signing_through_the_library(state):
    from kms_pipelines.core.ledger import rpt

    kms = state
    green_first(kms, "A1")
    blob = envelope.encrypt(kms, "data:identity-documents", "passport-1", b"scan")
    mallory = kms.as_actor("mallory")  # a free-text name: never enrolled, no role, no workload
    assert envelope.decrypt(mallory, blob, object_id="passport-1") == b"scan"
    rpt.issue(mallory, "deal-x", {"amount": "1"})
    red(kms, "A1", "audit actor 'mallory' is no enrolled principal or declared workload")


def test_case3_audit_log_tail_cut_after_the_newest_checkpoint(state):
    """The same class of defect in the audit chain: its head is now in every checkpoint."""
    kms = state
    for i in range(3):
        envelope.encrypt(kms, "data:postgres", f"row-{i}", b"x")
    rotation.rotate_now(kms, "service:api-gateway", reason="tenant-rotation")
    cp = checkpoints.checkpoint_if_changed(kms)
    assert cp["audit_size"] > 0
    green_first(kms, "A3", "T3")
    admin(kms, "audit_events", f"DELETE FROM audit_events WHERE seq > {cp['audit_size'] - 3}")
    assert audit.verify(kms).ok  # the chain alone cannot see a cut tail
    red(
        kms,
        "A3",
        f"audit log truncated: checkpoint {cp['key']} recorded {cp['audit_size']} audit events",
        dagster=False,
    )
    red(kms, "T3", "audit log truncated", dagster=False)
    # new events re-use the cut seqs, so from here on the signed head shows a rewrite instead
    red(kms, "A3", f"checkpoint {cp['key']}")
    assert _cli(kms, "ledger", "verify-checkpoints").exit_code == 1
