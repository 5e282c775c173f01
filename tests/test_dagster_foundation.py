"""The code location loads, and kms_nightly's foundation assets run against PostgreSQL
(KMS database and Dagster instance storage both on the real server)."""

import dagster as dg
from sqlalchemy import text

from kms_pipelines.core.foundation import db
from kms_pipelines.core.foundation.db.append_only import create_append_only_triggers, drop_append_only_triggers
from tests.fixtures.dagster_defs import kms_resources, materialize_selection

FOUNDATION = dg.AssetSelection.assets("kms_state", "key_inventory")


def test_code_location_has_the_main_job_and_schedule(code_location):
    assert code_location.resolve_job_def("kms_nightly") is not None
    schedule = code_location.resolve_schedule_def("kms_nightly_schedule")
    assert schedule.cron_schedule == "0 2 * * *" and schedule.execution_timezone == "UTC"


def test_foundation_assets_materialize_on_postgres(code_location, postgres_instance, pg_database, tmp_path):
    kms_url = pg_database()
    resources = kms_resources(tmp_path / "home", kms_url)
    result = materialize_selection(code_location, FOUNDATION, resources, postgres_instance)
    assert result.success
    state = result.asset_materializations_for_node("kms_state")[0].metadata
    assert state["revision"].value == db.head_revision(db.make_engine(kms_url))
    assert len(state["bootstrapped_keys"].value) == 11
    inventory = result.asset_materializations_for_node("key_inventory")[0].metadata
    assert inventory["active"].value == 11 and inventory["overdue"].value == 0
    checks = {e.check_name: e.passed for e in result.get_asset_check_evaluations()}
    assert checks["ledger_chain_intact"] and checks["keys_within_cadence"]
    # Second run: nothing to bootstrap, records land in the PostgreSQL-backed instance.
    again = materialize_selection(code_location, FOUNDATION, resources, postgres_instance)
    assert again.success
    assert again.asset_materializations_for_node("kms_state")[0].metadata["bootstrapped_keys"].value == []
    assert len(postgres_instance.get_runs()) == 2


def test_a_broken_ledger_blocks_everything_downstream(code_location, pg_database, tmp_path):
    kms_url = pg_database()
    resources = kms_resources(tmp_path / "home", kms_url)
    instance = dg.DagsterInstance.ephemeral()
    assert materialize_selection(code_location, FOUNDATION, resources, instance).success
    engine = db.make_engine(kms_url)
    with engine.begin() as conn:
        drop_append_only_triggers(conn, "ledger_entries")
        conn.execute(text("UPDATE ledger_entries SET actor = 'mallory' WHERE seq = 2"))
        create_append_only_triggers(conn, "ledger_entries")
    engine.dispose()
    result = materialize_selection(code_location, FOUNDATION, resources, instance)
    assert not result.success
    checks = {e.check_name: e for e in result.get_asset_check_evaluations()}
    assert not checks["ledger_chain_intact"].passed
    assert checks["ledger_chain_intact"].metadata["first_bad_seq"].value == "2"  # text: a seq is not a plot
    assert result.asset_materializations_for_node("key_inventory") == []


def test_keys_out_of_cadence_fail_their_check(code_location, tmp_path):
    home = tmp_path / "home"
    url = f"sqlite:///{home / 'kms.db'}"
    instance = dg.DagsterInstance.ephemeral()
    assert materialize_selection(code_location, FOUNDATION, kms_resources(home, url), instance).success
    later = kms_resources(home, url, fixed_time="2099-01-01T00:00:00Z")
    result = materialize_selection(code_location, dg.AssetSelection.assets("key_inventory"), later, instance)
    check = {e.check_name: e for e in result.get_asset_check_evaluations()}["keys_within_cadence"]
    assert not check.passed
    assert any(item["key"] == "root" for item in check.metadata["overdue"].value)


def test_every_job_schedule_sensor_and_resource_explains_itself_in_plain_text():
    """What the UI shows in its lists: a description for each, and no raw reST markup."""
    from kms_pipelines.definitions import defs

    d = defs()
    repo = d.get_repository_def()
    missing = [j.name for j in repo.get_all_jobs() if not j.name.startswith("__") and not j.description]
    missing += [s.name for s in repo.schedule_defs if not s.description]
    missing += [s.name for s in repo.sensor_defs if not s.description]
    assert missing == []
    for name, resource in (d.resources or {}).items():
        description = type(resource).__doc__ or ""
        assert description.strip() and "``" not in description and "\n" not in description.strip(), name


def test_dg_check_defs_as_the_readme_words_it():
    """`dg check defs` from the repository root, with no DAGSTER_HOME: clean, and it does not
    pick up the production instance (deploy/dagster.yaml needs DAGSTER_PG_*)."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DAGSTER_", "KMS_"))}
    out = subprocess.run(
        [str(Path(sys.executable).parent / "dg"), "check", "defs"],
        cwd=repo,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert "All definitions loaded successfully" in out.stdout + out.stderr
    assert "Traceback" not in out.stderr and "DagsterInvalidConfigError" not in out.stderr
    assert not (repo / "dagster.yaml").exists()
