"""A real browser test of the Dagster UI (issue 8, item 3).

After a demo-equivalent run (``kms init``, then the ``kms_nightly`` job, a nightly backup,
the monthly restore drill and the policy compliance report, all recorded in a
PostgreSQL-backed Dagster instance built from the repo's deploy/dagster.yaml), the test starts
``dagster-webserver`` on loopback with the project's workspace.yaml and drives Debian's
headless Chromium through Playwright: the asset catalog, the drill report's asset page and
the compliance report's asset page must show their content. Screenshots are saved to
test-artifacts/ui/*.png.
"""

from __future__ import annotations

import os
import re
import subprocess
from datetime import datetime, timedelta, timezone
from pathlib import Path

import dagster as dg
import pytest

from tests.fixtures.dagster_defs import kms_resources
from tests.ui_support import REPO, VENV_BIN, chromium_path, dagster_webserver, headless_chromium

pytestmark = [pytest.mark.slow, pytest.mark.timeout(420)]

ARTIFACTS = REPO / "test-artifacts" / "ui"
UI_TIMEOUT_MS = 60_000  # the machine is slow and shared: wait for content, never sleep
COMPLIANCE_ASSET = "policy_compliance_report"
DRILL_PARTICIPANTS = ["dana", "lee"]
DRILL_FOLLOWUP = "sam: rehearse the PKCS#11 token restore"


def _kms_env(home: Path, database_url: str) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("KMS_") or k == "KMS_TEST_DATABASE_URL"}
    env.update({"KMS_HOME": str(home), "KMS_DATABASE_URL": database_url, "PATH": f"{VENV_BIN}:{env.get('PATH', '')}"})
    return env


def _run_jobs(code_location: dg.Definitions, resources: dict, instance: dg.DagsterInstance, now: datetime) -> dict:
    """The demo's runs, in-process against the webserver's instance: kms_nightly, the nightly
    backup (yesterday's partition), last month's restore drill and the compliance report."""
    from kms_pipelines.defs import backup as backup_defs
    from kms_pipelines.defs import jobs as jobs_defs

    keys = {k.to_user_string() for a in code_location.assets or [] for k in getattr(a, "keys", [])}
    if COMPLIANCE_ASSET not in keys:
        pytest.fail(f"asset {COMPLIANCE_ASSET} is not in the code location (defs/compliance.py)", pytrace=False)
    # The report is part of kms_nightly; it is materialized once more after the backup and the
    # drill so that its latest evidence includes them, as on the first night after a drill.
    compliance_job = dg.define_asset_job("ui_test_compliance_report", selection=[COMPLIANCE_ASSET])
    defs = dg.Definitions(
        assets=code_location.assets, asset_checks=code_location.asset_checks, resources=resources,
        jobs=[jobs_defs.kms_nightly, backup_defs.backup_nightly, backup_defs.restore_drill, compliance_job])

    yesterday = (now - timedelta(days=1)).strftime("%Y-%m-%d")
    last_month = (now.replace(day=1) - timedelta(days=1)).strftime("%Y-%m-01")
    results = {
        "kms_nightly": defs.resolve_job_def("kms_nightly").execute_in_process(instance=instance, raise_on_error=False),
        "backup_nightly": defs.resolve_job_def("backup_nightly").execute_in_process(
            instance=instance, partition_key=yesterday, raise_on_error=False),
        "restore_drill": defs.resolve_job_def("restore_drill").execute_in_process(
            instance=instance, partition_key=last_month, raise_on_error=False,
            run_config={"ops": {"restore_drill_report": {"config": {
                "participants": DRILL_PARTICIPANTS, "followups": [DRILL_FOLLOWUP]}}}}),
    }
    results["compliance"] = defs.resolve_job_def(compliance_job.name).execute_in_process(
        instance=instance, raise_on_error=False)
    return results


def _failure(result) -> str:
    events = [e for e in result.all_events if e.event_type_value in ("STEP_FAILURE", "RUN_FAILURE")]
    return "; ".join(f"{e.step_key}: {(e.event_specific_data.error.message.strip() if getattr(e.event_specific_data, 'error', None) else e.message)[:300]}"
                     for e in events[:3])


def _shot(page, name: str) -> Path:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    path = ARTIFACTS / f"{name}.png"
    page.screenshot(path=str(path))
    return path


def _body_text(page) -> str:
    return page.inner_text("body")


def _wait_text(scope, text: str | re.Pattern, timeout: int = UI_TIMEOUT_MS):
    """Wait until ``text`` is visible in ``scope`` (a page or a locator); fail with what the page shows."""
    from playwright.sync_api import TimeoutError as PwTimeout

    page = getattr(scope, "page", scope)
    locator = scope.get_by_text(text).first
    try:
        locator.wait_for(state="visible", timeout=timeout)
    except PwTimeout:
        _shot(page, "failure-" + re.sub(r"[^a-z0-9]+", "-", str(getattr(text, "pattern", text)).lower()).strip("-"))
        pytest.fail(f"{page.url}: {text!r} not shown within {timeout // 1000}s; page text starts:\n"
                    f"{_body_text(page)[:1500]}", pytrace=False)
    return locator


def _enroll_custodians(ctx) -> None:
    """The policy's break-glass custodians enroll with their own age recipients (as they would
    with `kms escrow custodian add NAME --recipient age1…`), so kms_nightly can seal escrow."""
    import pyrage

    from kms_pipelines.core import escrow

    for name in escrow.escrow_policy(ctx).custodians:
        escrow.enroll_custodian(ctx, name, recipient=str(pyrage.x25519.Identity.generate().to_public()))


def _demo_run(code_location, postgres_instance, pg_database, tmp_path) -> tuple[dict, dict]:
    """KMS state on one fresh PostgreSQL database and the Dagster instance (the repo's
    dagster.yaml, DAGSTER_PG_* from the postgres_instance fixture) on another."""
    home = tmp_path / "kms"
    kms_url = pg_database()  # empty: `kms init` migrates it, as in the demo
    env = _kms_env(home, kms_url)
    env["DAGSTER_HOME"] = str(tmp_path / "dagster_home")  # where postgres_instance copied dagster.yaml
    for var in ("DAGSTER_PG_HOST", "DAGSTER_PG_PORT", "DAGSTER_PG_USER", "DAGSTER_PG_PASSWORD", "DAGSTER_PG_DB"):
        env[var] = os.environ[var]
    init = subprocess.run([str(VENV_BIN / "kms"), "init"], cwd=REPO, env=env, capture_output=True, text=True, timeout=180)
    assert init.returncode == 0, f"kms init failed: {init.stderr[-2000:]}"
    assert "database at revision" in init.stdout

    resources = kms_resources(home, kms_url)
    _enroll_custodians(resources["kms"].context())
    now = datetime.now(timezone.utc).replace(microsecond=0)
    results = _run_jobs(code_location, resources, postgres_instance, now)
    for name, result in results.items():
        assert result.success, f"{name} failed: {_failure(result)}"
    return env, results


def test_dagster_ui_shows_catalog_drill_report_and_compliance_report(code_location, postgres_instance, pg_database,
                                                                    tmp_path):
    chromium = chromium_path()  # before the slow demo run: a missing browser fails at once, never skips
    env, results = _demo_run(code_location, postgres_instance, pg_database, tmp_path)
    drill_md = results["restore_drill"].asset_materializations_for_node("restore_drill_report")[0].metadata["report"].value
    assert "**Participants:** dana, lee" in drill_md and "## Follow-ups" in drill_md

    with dagster_webserver(env, ARTIFACTS / "webserver.log") as server:
        info = server.wait_ready(timeout=150)
        assert "dagster_webserver_version" in info
        with headless_chromium(chromium) as browser:
            context = browser.new_context(viewport={"width": 1280, "height": 800})
            # Dagster shows a "join the community" dialog on loopback until dismissed once;
            # mark it dismissed (as "Skip" would) so it does not cover the pages under test.
            context.add_init_script("window.localStorage.setItem('communityNux', JSON.stringify('1'))")
            page = context.new_page()
            page.set_default_timeout(UI_TIMEOUT_MS)

            # 1. Asset catalog: the real code location's assets, materialized by the runs above.
            page.goto(f"{server.url}/assets", wait_until="domcontentloaded")
            for name in ("key_inventory", "kms_state", "break_glass_escrow"):
                _wait_text(page, re.compile(rf"^{name}$"))
            _wait_text(page, re.compile(r"^Materialized$"))
            assert page.get_by_text(re.compile(r"^Materialized$")).count() >= 5, _body_text(page)[:1500]
            _shot(page, "asset-catalog")

            # 2. The drill report's asset page: its latest materialization's Markdown report,
            #    rendered in the metadata table of the overview.
            page.goto(f"{server.url}/assets/restore_drill_report", wait_until="domcontentloaded")
            _wait_text(page, "Latest materialization")
            title = _wait_heading(page, re.compile(r"^Restore drill \d{4}-\d{2}-\d{2}$"))
            for heading in ("Checks", "Findings", "Follow-ups"):
                _wait_heading(page, heading)
            for text in ("Participants:", "dana, lee", "PASSED", "rehearse the PKCS#11 token restore",
                         "None: every check passed."):
                _wait_text(page, text)
            title.evaluate("e => e.scrollIntoView({block: 'start'})")
            _shot(page, "restore-drill-report")

            # 3. The compliance report's asset page: the clause table in the metadata, and the
            #    Markdown report (behind "[Show Markdown]") with one row per policy clause.
            page.goto(f"{server.url}/assets/{COMPLIANCE_ASSET}", wait_until="domcontentloaded")
            _wait_text(page, "Latest materialization")
            for clause in ("R1", "T3"):
                _wait_text(page, re.compile(rf"^{clause}$"))
            page.get_by_text("[Show Markdown]").first.click()
            dialog = page.get_by_role("dialog")
            report = _wait_heading(dialog, "KMS policy compliance report")
            for clause in ("P1", "R1", "B2", "T3"):
                _wait_text(dialog, re.compile(rf"^{clause}$"))
            _wait_text(dialog, re.compile(r"^Overall:"))
            report.evaluate("e => e.scrollIntoView({block: 'start'})")
            _shot(page, "compliance-report")
            context.close()


def _wait_heading(scope, name):
    from playwright.sync_api import TimeoutError as PwTimeout

    heading = scope.get_by_role("heading", name=name).first
    try:
        heading.wait_for(state="visible", timeout=UI_TIMEOUT_MS)
    except PwTimeout:
        page = getattr(scope, "page", scope)
        _shot(page, "failure-heading")
        pytest.fail(f"{page.url}: heading {name!r} not shown within {UI_TIMEOUT_MS // 1000}s; page text starts:\n"
                    f"{_body_text(page)[:1500]}", pytrace=False)
    return heading
