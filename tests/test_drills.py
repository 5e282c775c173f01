"""Restore drills: the report renders every required field, follow-ups are due 5 business
days out and can be closed, the B4 checks fail when they should; Dagster wiring."""

from datetime import UTC, datetime, timedelta

import dagster as dg
import pytest
from sqlalchemy import func, select

from kms_pipelines.core.backup import backups as backup
from kms_pipelines.core.backup import drills
from kms_pipelines.core.foundation.clock import SimulatedClock
from kms_pipelines.core.foundation.db.models_backup import Drill, DrillFollowup
from kms_pipelines.core.foundation.objectstore.local import LocalObjectStore


def test_business_days():
    thu = datetime(2026, 1, 1, 6, tzinfo=UTC)
    assert drills.add_business_days(thu, 5) == datetime(2026, 1, 8, 6, tzinfo=UTC)
    fri = datetime(2026, 1, 2, tzinfo=UTC)
    assert drills.add_business_days(fri, 1) == datetime(2026, 1, 5, tzinfo=UTC)


def test_drill_report_has_every_required_field(kms_pg):
    kms = kms_pg
    kms.objects = LocalObjectStore(kms.home / "objects-sim", now=kms.clock.now)
    info = backup.create(kms)
    report = drills.run_drill(
        kms,
        participants=["alice (sre)", "bob (security)"],
        extra_followups=[{"owner": "carol", "title": "Shorten restore runbook step 3"}],
    )
    assert report.outcome == "passed", report.findings
    assert report.archive_id == info.archive_id and report.restore_seconds > 0
    md = report.markdown
    for field in (
        "**Date:** 2026-01-01",
        "**Participants:** alice (sre), bob (security)",
        "**Outcome:** PASSED",
        "## Findings",
        "## Follow-ups",
        "Time to restore",
        "| canaries | passed |",
        "| Shorten restore runbook step 3 | carol | 2026-01-08 | open |",
    ):
        assert field in md, field
    path = kms.home / "runbook" / "drills" / "2026-01-01.md"
    assert path.read_text() == md
    assert drills.status(kms)["within_cadence"] and not drills.status(kms)["overdue_followups"]

    # the follow-up goes overdue after 5 business days, then closes
    kms.clock.advance(timedelta(days=8))
    st = drills.status(kms)
    assert [f["owner"] for f in st["overdue_followups"]] == ["carol"]
    fu_id = report.followups[0]["id"]
    closed = drills.close_followup(kms, fu_id, actor="carol", resolution="runbook updated")
    assert closed["late"] and not drills.status(kms)["overdue_followups"]
    with kms.engine.connect() as conn:
        before = conn.execute(select(DrillFollowup.id, DrillFollowup.status, DrillFollowup.closed_by)).all()
    for bad in (
        lambda: drills.close_followup(kms, fu_id, resolution="again"),
        lambda: drills.close_followup(kms, 9999, resolution="x"),
        lambda: drills.close_followup(kms, fu_id, resolution=" "),
    ):
        with pytest.raises(backup.BackupError):
            bad()
    with kms.engine.connect() as conn:
        assert conn.execute(select(DrillFollowup.id, DrillFollowup.status, DrillFollowup.closed_by)).all() == before
    kms.clock.advance(timedelta(days=24))
    assert not drills.status(kms)["within_cadence"]  # 32 days since the drill


def test_failed_drill_records_findings_and_owned_followups(make_kms):
    kms = make_kms("sqlite")
    kms.objects = LocalObjectStore(kms.home / "objects-sim", now=kms.clock.now)
    info = backup.create(kms)
    path = kms.objects.root / info.archive_key
    path.chmod(0o600)
    path.write_bytes(path.read_bytes()[:-10])  # truncated archive
    report = drills.run_drill(kms)
    assert report.outcome == "failed"
    assert report.participants == [f"{r} (rotation)" for r in kms.policy.drills.on_call]  # nobody enrolled
    assert report.findings and "restore refused" in report.findings[0]
    assert report.followups[0]["owner"] == kms.policy.drills.followup_owner
    assert "**Outcome:** FAILED" in report.markdown
    with kms.engine.connect() as conn:
        assert conn.execute(select(func.count()).select_from(Drill)).scalar_one() == 1


def _resources(kms, fixed):
    from kms_pipelines.defs.resources import DatabaseResource, KeyStoreResource, KmsResource, ObjectStoreResource
    from tests.fixtures.dagster_defs import FixedClockResource

    database = DatabaseResource(url=kms.engine.url.render_as_string(hide_password=False))
    objects = ObjectStoreResource(url=f"file://{kms.home / 'objects'}")
    clock = FixedClockResource(fixed_time=fixed)
    keystore = KeyStoreResource(kind="software")
    return {"kms": KmsResource(home=str(kms.home), database=database, keystore=keystore, objects=objects, clock=clock)}


def test_dagster_backup_and_drill_assets(make_kms, monkeypatch, master_key):
    import base64

    from kms_pipelines.defs import backup as backup_defs

    monkeypatch.setenv("KMS_MASTER_KEY", base64.b64encode(master_key).decode())
    now = datetime.now(UTC).replace(microsecond=0)
    kms = make_kms("sqlite", clock=SimulatedClock(now))
    resources = _resources(kms, now.isoformat())
    instance = dg.DagsterInstance.ephemeral()
    result = dg.materialize(
        [
            backup_defs.nightly_backup,
            backup_defs.backup_retention,
            backup_defs.backup_fresh,
            backup_defs.backup_manifest_verifies,
            backup_defs.backup_locked,
        ],
        instance=instance,
        resources=resources,
        partition_key=(now - timedelta(days=1)).strftime("%Y-%m-%d"),
    )
    assert result.success
    checks = {e.check_name: e.passed for e in result.get_asset_check_evaluations()}
    assert checks == {"backup_fresh": True, "backup_manifest_verifies": True, "backup_locked": True}
    backup_md = result.asset_materializations_for_node("nightly_backup")[0].metadata
    sha256 = backup.list_backups(kms)[0]["sha256"]  # shortened for the panel, whole in full_values
    assert backup_md["sha256"].value == sha256[:16] + "…" and f"`{sha256}`" in backup_md["full_values"].value
    root_kid = backup_md["root_kid"].value
    assert root_kid.endswith("…") and f"`{root_kid[:-1]}" in backup_md["full_values"].value
    assert backup_md["archive"].value.startswith("…/") and len(backup_md["full_values"].value) >= 1000
    md = result.asset_materializations_for_node("backup_retention")[0].metadata["archives"].value
    assert "nightly" in md or "weekly" in md
    drill = dg.materialize(
        [backup_defs.restore_drill_report, backup_defs.drill_within_cadence, backup_defs.drill_followups_on_time],
        instance=instance,
        resources=resources,
        partition_key=(now.replace(day=1) - timedelta(days=1)).strftime("%Y-%m-01"),
        run_config={"ops": {"restore_drill_report": {"config": {"participants": ["dana"]}}}},
    )
    assert drill.success
    meta = drill.asset_materializations_for_node("restore_drill_report")[0].metadata
    assert "**Participants:** dana" in meta["report"].value and meta["outcome"].value == "passed"
    assert "AGE-SECRET-KEY" not in str(meta) and "sealed" not in str(meta)
    ctx = dg.build_schedule_context(scheduled_execution_time=datetime(2026, 3, 1, 6, tzinfo=UTC))
    req = backup_defs.restore_drill_schedule(ctx)
    assert req.partition_key == "2026-03-01"


def test_a_drill_for_an_earlier_month_is_titled_by_that_month_and_the_day_it_ran():
    from kms_pipelines.core.backup import drills

    common = dict(
        participants=["dana"],
        outcome="passed",
        archive_id="a",
        target="t",
        restore_seconds=1.0,
        total_seconds=2.0,
        checks=[],
        findings=[],
        followups=[],
    )
    assert drills.render_markdown(date="2026-11-29", period="2026-10", **common).startswith(
        "# Restore drill for 2026-10 (performed 2026-11-29)\n"
    )
    assert drills.render_markdown(date="2026-11-02", period="2026-11", **common).startswith(
        "# Restore drill 2026-11-02\n"
    )
    assert drills.render_markdown(date="2026-11-02", **common).startswith("# Restore drill 2026-11-02\n")


def test_default_participants_are_enrolled_people_not_role_names(kms):
    from kms_pipelines.core.backup import drills

    before = drills.default_participants(kms)
    assert before == [f"{r} (rotation)" for r in kms.policy.drills.on_call]  # nobody enrolled yet, and it says so
    from tests.fixtures.kms import enrol_direct

    enrol_direct(kms, "dana", ["sre_oncall"])
    enrol_direct(kms, "lee", ["security_engineering"])
    enrol_direct(kms, "cora", ["compliance_officer"])  # not a drill role
    assert drills.default_participants(kms) == ["dana", "lee"]
