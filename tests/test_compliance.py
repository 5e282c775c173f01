"""The clause-by-clause compliance report (issue 8): a fully exercised state passes every
clause; breaking one clause per policy section (P, R, T, A, B) turns that clause's row
red in the core report, in `kms report --format json` and in the materialized
``policy_compliance_report`` asset, while an untouched clause stays green."""

import base64
import json
from datetime import UTC, datetime, timedelta

import dagster as dg
import pytest
from click.testing import CliRunner
from sqlalchemy import text

from kms_pipelines.cli import cli
from kms_pipelines.core import compliance
from kms_pipelines.core.backup import drills
from kms_pipelines.core.foundation.clock import SimulatedClock
from kms_pipelines.core.foundation.db.append_only import create_append_only_triggers, drop_append_only_triggers
from kms_pipelines.core.ledger import ledger, rpt
from kms_pipelines.core.response import escrow
from kms_pipelines.core.runtime import nightly
from kms_pipelines.defs import compliance as compliance_defs
from kms_pipelines.defs import foundation
from kms_pipelines.defs import keys as keys_defs
from kms_pipelines.defs import ledger as ledger_defs
from tests.fixtures.dagster_defs import kms_resources
from tests.fixtures.kms import approve_both, ceremony, write_test_policy

CUSTODIANS = ["custodian-a", "custodian-b", "custodian-c"]
ALL = [c.id for c in compliance.CLAUSES]


def _now() -> datetime:
    # Close to the wall clock: the Dagster resources build a local object store whose WORM
    # clock is the system clock, so archive locks must be set relative to real time.
    return datetime.now(UTC).replace(microsecond=0)


@pytest.fixture
def exercised(make_kms, master_key, monkeypatch, tmp_path):
    """Bootstrap + custodians sealed + four approvers with TOTP and a console FIDO2 key + one nightly run
    (rotations, sweep, escrow, RPT verify, checkpoint, backup, retention, anomalies) +
    a passed restore drill: every clause has its evidence."""
    monkeypatch.setenv("KMS_MASTER_KEY", base64.b64encode(master_key).decode())
    # the CLI and Dagster reports load the policy too: the tests' one (software security keys allowed)
    monkeypatch.setenv("KMS_POLICY", write_test_policy(tmp_path))
    kms = make_kms("sqlite", clock=SimulatedClock(_now()))
    for c in CUSTODIANS:
        escrow.enroll_custodian(kms, c)
    devices = ceremony(
        kms,
        {"ann": "security_engineering", "bob": "compliance_officer", "cy": "sre_oncall", "dee": "security_engineering"},
    )
    _register_console_keys(kms, devices)
    nightly.run_nightly(kms)
    report = drills.run_drill(kms, participants=["ann", "bob"])
    assert report.outcome == "passed", report.findings
    return kms


def _register_console_keys(kms, devices) -> None:
    """A2: each principal registers a FIDO2 key (software authenticator) through a link that
    ann requests and two others approve with both factors (the clock moves one step per code)."""
    from kms_pipelines.core.access import console_auth, webauthn
    from tests.fido2_soft import SoftAuthenticator, register

    rp = webauthn.RelyingParty("https://kms.example.test")

    def code(name):
        kms.clock.advance(timedelta(seconds=kms.policy.access.totp_interval_seconds))
        return devices[name].at(kms.now())

    for name in devices:
        ticket = f"ONB-{name}"
        console_auth.request_registration(kms, name, ticket=ticket, requested_by="ann")
        for approver in [n for n in devices if n not in ("ann", name)][:2]:
            approve_both(
                kms,
                approver,
                ticket=ticket,
                operation=console_auth.REGISTRATION_OPERATION,
                totp=code(approver),
                target=name,
            )
        link = console_auth.issue_registration_link(kms, name, ticket=ticket, requested_by="ann")
        register(kms, rp, link.token, code(name), SoftAuthenticator(rp.origin))


def _statuses(report: compliance.Report) -> dict[str, str]:
    return {r.clause: r.status for r in report.rows}


def _cli_report(kms, *args):
    env = {
        "KMS_HOME": str(kms.home),
        "KMS_DATABASE_URL": kms.engine.url.render_as_string(hide_password=False),
        "KMS_OBJECT_STORE": str(kms.home / "objects"),
        "KMS_KEYSTORE": "software",
    }
    return CliRunner().invoke(cli, ["--at", kms.now().isoformat(), "report", *args], env=env, catch_exceptions=False)


def _materialize(kms, *assets, instance=None):
    instance = instance or dg.DagsterInstance.ephemeral()
    resources = kms_resources(
        kms.home, kms.engine.url.render_as_string(hide_password=False), fixed_time=kms.now().isoformat()
    )
    result = dg.materialize(list(assets), instance=instance, resources=resources, raise_on_error=False)
    assert result.success, [e.message for e in result.all_events if e.is_failure]
    return result


def _dagster_report(kms, instance=None):
    result = _materialize(kms, compliance_defs.policy_compliance_report, instance=instance)
    meta = result.asset_materializations_for_node("policy_compliance_report")[0].metadata
    rows = {rec.data["clause"]: rec.data for rec in meta["clauses"].value.records}
    check = {e.check_name: e for e in result.get_asset_check_evaluations()}["policy_compliant"]
    return meta, rows, check


def _assert_red(kms, broken: str, untouched: str) -> None:
    """The broken clause is red and the untouched one green, three ways."""
    core = _statuses(compliance.build_report(kms))
    assert core[broken] == "fail", compliance.build_report(kms, only=[broken]).rows[0].evidence
    assert core[untouched] == "pass", compliance.build_report(kms, only=[untouched]).rows[0].evidence

    out = _cli_report(kms, "--format", "json")
    assert out.exit_code == 1
    doc = json.loads(out.output)
    cli_rows = {r["clause"]: r for r in doc["rows"]}
    assert cli_rows[broken]["status"] == "fail" and cli_rows[broken]["red"] is True
    assert cli_rows[untouched]["status"] == "pass" and cli_rows[untouched]["red"] is False
    assert broken in doc["failing"] and doc["overall"] == "fail"

    meta, rows, check = _dagster_report(kms)
    assert rows[broken]["status"] == "🔴 FAIL" and rows[untouched]["status"] == "🟢 PASS"
    assert "red" not in rows[broken]  # colour, not a true/false column
    assert not check.passed and broken in check.metadata["failing"].value
    assert meta["failing_clauses"].value >= 1 and meta["overall"].value == "fail"
    assert f"| **{broken}** | 🔴 FAIL |" in meta["report"].value


def test_catalogue_is_the_twenty_clauses_of_design_section_6():
    assert ALL == [f"{s}{i}" for s in "PRTAB" for i in range(1, 5)]
    assert all(c.text and c.control and callable(c.evaluate) for c in compliance.CLAUSES)


def test_fully_exercised_state_passes_every_clause(exercised):
    kms = exercised
    report = compliance.build_report(kms)
    assert {r.clause: (r.status, r.evidence) for r in report.rows if r.status != "pass"} == {}
    assert report.overall == "pass" and not report.failing

    out = _cli_report(kms, "--format", "json")
    assert out.exit_code == 0, out.output
    doc = json.loads(out.output)
    assert doc["overall"] == "pass" and [r["clause"] for r in doc["rows"]] == ALL

    # Dagster: run a check first, so the report shows it as evidence with a link to its run.
    instance = dg.DagsterInstance.ephemeral()
    first = _materialize(kms, foundation.kms_state, ledger_defs.ledger_chain_intact, instance=instance)
    meta, rows, check = _dagster_report(kms, instance=instance)
    assert all(r["status"] == "🟢 PASS" for r in rows.values()), {
        k: r["policy"] for k, r in rows.items() if r["status"] != "🟢 PASS"
    }
    assert check.passed and meta["overall"].value == "pass" and meta["failing_clauses"].value == 0
    # T3's two checks: ledger_chain_intact ran (in `first`), ledger_matches_checkpoints never did
    assert rows["T3"]["checks"] == "⚪ 1/2" and rows["T3"]["run"] == first.run_id[:8]
    assert rows["T3"]["checked"] and rows["P2"]["checks"] == "–"  # P2: no asset check maps to it
    assert meta["latest_check_run"].value == f"/runs/{first.run_id}"  # a link in the UI
    assert f"(/runs/{first.run_id})" in meta["report"].value
    assert "`kms_state/ledger_chain_intact`: ✅ passed in run" in meta["report"].value
    # item 2: pictures and tables alongside the report
    assert "root v1" in meta["key_age_vs_cadence"].value and "│" in meta["key_age_vs_cadence"].value
    assert {r.data["key"] for r in meta["key_ages"].value.records} >= {"root", "backup", "break-glass"}
    assert [r.data["class"] for r in meta["backups"].value.records] in (["nightly"], ["weekly"])
    assert "passed" in meta["drill_history"].value and meta["open_followups"].value == "no open follow-ups"
    text_meta = str({k: v.value for k, v in meta.items() if k != "clauses"})
    assert "AGE-SECRET-KEY" not in text_meta and "kmsc1." not in text_meta


def test_r_root_past_its_cadence_is_red(exercised):
    """R: 91 days pass without a rotation (no nightly run): R1 red. The drill is then
    older than 31 days too, so B2 is red; A1 is untouched."""
    kms = exercised
    kms.clock.advance(timedelta(days=91))
    report = compliance.build_report(kms, only=["R1", "B2"])
    assert "root v1 is 91.0 days old" in report.row("R1").evidence
    assert report.row("B2").status == "fail" and "cadence 31 d" in report.row("B2").evidence
    _assert_red(kms, "R1", "A1")
    assert _statuses(compliance.build_report(kms, only=["B2"]))["B2"] == "fail"


def test_t_ledger_tampered_behind_the_triggers_is_red(exercised):
    kms = exercised
    with kms.engine.begin() as conn:  # a database admin bypasses the append-only triggers
        drop_append_only_triggers(conn, "ledger_entries")
        conn.execute(text("UPDATE ledger_entries SET actor = 'mallory' WHERE seq = 2"))
        create_append_only_triggers(conn, "ledger_entries")
    assert "seq 2" in compliance.build_report(kms, only=["T3"]).row("T3").evidence
    _assert_red(kms, "T3", "P3")


def test_a_manual_rotation_without_approvers_inserted_by_bypass_is_red(exercised):
    """A: a 'manual' ledger entry with no approvers and no ticket, appended around the
    access controls. The chain stays valid, but the entry moved no key_versions row, so the
    ledger replay turns T3 red as well (issue 12); A4 names the missing approvals."""
    kms = exercised
    with kms.transaction() as session:
        ledger.append(
            session,
            at=kms.now(),
            key_name="service:api-gateway",
            key_version=1,
            from_state="active",
            to_state="rotated",
            actor="mallory",
            reason="manual",
        )
    evidence = compliance.build_report(kms, only=["A4"]).row("A4").evidence
    assert "0 approver(s) and ticket none" in evidence
    _assert_red(kms, "A4", "B3")
    t3 = compliance.build_report(kms, only=["T3"]).row("T3")
    assert t3.status == "fail" and "ledger replay disagrees with key_versions" in t3.evidence


def test_b_no_backup_within_freshness_hours_is_red(exercised):
    kms = exercised
    kms.clock.advance(timedelta(hours=kms.policy.backup.freshness_hours + 1))
    assert "limit 26 h" in compliance.build_report(kms, only=["B1"]).row("B1").evidence
    _assert_red(kms, "B1", "T3")


def test_p_tampered_rpt_is_red(exercised):
    kms = exercised
    tokens = [rpt.issue(kms, f"deal-{i}", {"amount": i}) for i in range(3)]
    header, payload, sig = tokens[1].split(".")
    forged = ".".join([header, payload[:-2] + ("AA" if payload[-2:] != "AA" else "BB"), sig])
    with kms.engine.begin() as conn:
        drop_append_only_triggers(conn, "rpts")
        conn.execute(text("UPDATE rpts SET token = :t WHERE seq = 2"), {"t": forged})
        create_append_only_triggers(conn, "rpts")
    assert "seq 2" in compliance.build_report(kms, only=["P1"]).row("P1").evidence
    _assert_red(kms, "P1", "A1")


def test_an_evaluator_that_crashes_fails_its_clause_and_names_the_error(exercised, monkeypatch):
    kms = exercised

    def boom(ctx):
        raise RuntimeError("backend unreachable")

    monkeypatch.setattr(
        compliance.report,
        "CLAUSES",
        tuple(
            compliance.Clause(c.id, c.text, c.control, boom if c.id == "T2" else c.evaluate, c.checks)
            for c in compliance.CLAUSES
        ),
    )
    report = compliance.build_report(kms, only=["T2", "A1"])
    assert report.row("T2").status == "fail"
    assert report.row("T2").evidence == "evaluation failed: RuntimeError: backend unreachable"
    assert report.row("A1").status == "pass" and report.overall == "fail"


def test_renderings_show_failing_rows_red(exercised, tmp_path):
    kms = exercised
    kms.clock.advance(timedelta(hours=30))  # B1 fails
    report = compliance.build_report(kms)
    page = compliance.render_html(report)
    assert '<tr class="fail" data-clause="B1">' in page and '<tr class="pass" data-clause="A1">' in page
    assert "tr.fail { background: #fde7e7; }" in page and "{{" not in page
    md = compliance.render_markdown(report)
    assert "| **B1** | 🔴 FAIL |" in md and "| **A1** | 🟢 PASS |" in md
    out = _cli_report(kms, "--format", "html", "--out", str(tmp_path / "r.html"))
    assert out.exit_code == 1 and "failing B1" in out.output
    assert '<tr class="fail" data-clause="B1">' in (tmp_path / "r.html").read_text()
    only = _cli_report(kms, "--format", "md", "--clause", "a1")
    assert only.exit_code == 0 and "| **A1** | 🟢 PASS |" in only.output and "**B1**" not in only.output
    bad = _cli_report(kms, "--clause", "Z9")
    assert bad.exit_code == 2 and "unknown clause id(s) Z9" in bad.output


def test_richer_metadata_on_the_areas_assets(exercised):
    """Item 2: key age against cadence (picture), DEK counts per key version, the backup list
    with GFS class and lock + timeline, drill history and open follow-ups with asset links."""
    from kms_pipelines.core.envelope import data_keys as envelope
    from kms_pipelines.defs import backup as backup_defs
    from kms_pipelines.defs import envelope as envelope_defs

    kms = exercised
    envelope.encrypt(kms, "data:postgres", "invoice-1", b"secret row")
    envelope.encrypt(kms, "data:postgres", "invoice-2", b"secret row")
    result = _materialize(kms, keys_defs.key_inventory, envelope_defs.dek_inventory, backup_defs.backup_retention)
    inv = result.asset_materializations_for_node("key_inventory")[0].metadata
    chart = inv["age_vs_cadence"].value
    assert "root v1" in chart and "/ 90 d" in chart and "/ 60 d" in chart and "OVERDUE" not in chart
    deks = result.asset_materializations_for_node("dek_inventory")[0].metadata["dek_counts"].value.records
    assert [(r.data["key"], r.data["v"], r.data["live"]) for r in deks] == [("data:postgres", 1, 2)]
    ret = result.asset_materializations_for_node("backup_retention")[0].metadata
    (archive,) = ret["backup_list"].value.records
    assert archive.data["locked_until"] > kms.now().strftime("%Y-%m-%d") and archive.data["class"] in (
        "nightly",
        "weekly",
    )
    assert archive.data["state"] == "✅ verified" and archive.data["archive"] in ret["archives"].value
    assert ("W" if archive.data["class"] == "weekly" else "N") in ret["timeline"].value  # upper case: locked
    assert "secret row" not in str(inv) + str(ret)

    # past its cadence the chart marks the key
    kms.clock.advance(timedelta(days=61))
    inv = _materialize(kms, keys_defs.key_inventory).asset_materializations_for_node("key_inventory")[0].metadata
    assert "service:api-gateway v1" in inv["age_vs_cadence"].value and "OVERDUE" in inv["age_vs_cadence"].value

    md = compliance_defs._overview(kms)
    assert "passed" in md["drill_history"].value
