"""A real browser test of the Dagster UI after the demo (issues 8 and 14).

The test runs ``scripts/demo.sh`` itself on scratch state (KMS_HOME in a temporary
directory, the demo's own Dagster instance under it), then starts ``dagster-webserver`` on
loopback with the project's workspace.yaml over that instance and drives Debian's headless
Chromium through Playwright. It asserts what a newcomer sees right after the demo: the
demo's runs listed and re-executable, every asset materialized and every check evaluated,
the drill report page populated, and a compliance report without FAIL. Screenshots are
saved to test-artifacts/ui/*.png.
"""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import dagster as dg
import pytest
from playwright.sync_api import expect

from tests.ui_support import REPO, VENV_BIN, chromium_path, dagster_webserver, headless_chromium

# The demo alone takes ~3 minutes on 2 shared cores.
pytestmark = [pytest.mark.slow, pytest.mark.timeout(1200)]

ARTIFACTS = REPO / "test-artifacts" / "ui"
UI_TIMEOUT_MS = 60_000  # the machine is slow and shared: wait for content, never sleep
COMPLIANCE_ASSET = "policy_compliance_report"
DEMO_JOBS = ("kms_nightly", "backup_nightly", "restore_drill", "dek_rewrap_sweep_job")


def _run_demo(tmp_path: Path) -> tuple[dict, str]:
    """``./scripts/demo.sh`` as a user runs it, from the already-installed venv."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("KMS_", "DAGSTER_"))}
    env.update(
        {
            "KMS_HOME": str(tmp_path / ".kms"),
            "KMS_VENV": str(VENV_BIN.parent),
            "KMS_SKIP_INSTALL": "1",
            "PATH": f"{VENV_BIN}:{env.get('PATH', '')}",
        }
    )
    demo = subprocess.run(
        [str(REPO / "scripts" / "demo.sh")], cwd=REPO, env=env, capture_output=True, text=True, timeout=1000
    )
    assert demo.returncode == 0, f"demo.sh failed:\n{demo.stdout[-3000:]}\n{demo.stderr[-3000:]}"
    env["DAGSTER_HOME"] = str(tmp_path / ".kms" / "dagster")
    return env, demo.stdout + demo.stderr


def _assert_instance_state(dagster_home: str) -> dict:
    """Every asset of the code location materialized, every check evaluated, every demo run
    a success launched from the workspace's code location (so the UI can re-execute it)."""
    from kms_pipelines.definitions import defs

    graph = defs().get_repository_def().asset_graph
    with dg.DagsterInstance.from_config(dagster_home) as instance:
        never = [
            k.to_user_string()
            for k in graph.get_all_asset_keys()
            if instance.get_latest_materialization_event(k) is None
        ]
        assert never == [], f"never materialized after the demo: {never}"
        unevaluated = [
            f"{k.asset_key.to_user_string()}/{k.name}"
            for k in graph.asset_check_keys
            if not instance.event_log_storage.get_asset_check_execution_history(k, limit=1)
        ]
        assert unevaluated == [], f"checks never evaluated after the demo: {unevaluated}"
        runs = instance.get_runs()
        by_job = {job: [r for r in runs if r.job_name == job] for job in DEMO_JOBS}
        assert all(by_job.values()), {job: len(rs) for job, rs in by_job.items()}
        for run in runs:
            assert run.status == dg.DagsterRunStatus.SUCCESS, (run.job_name, run.status)
            assert run.remote_job_origin is not None and run.remote_job_origin.location_name == "kms_pipelines"
        return {job: rs[0].run_id for job, rs in by_job.items()}


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
        pytest.fail(
            f"{page.url}: {text!r} not shown within {timeout // 1000}s; page text starts:\n{_body_text(page)[:1500]}",
            pytrace=False,
        )
    return locator


@pytest.fixture(scope="module")
def after_demo(tmp_path_factory):
    """The demo run once for this module's tests, and a webserver over its instance."""
    chromium = chromium_path()  # before the slow demo: a missing browser fails at once, never skips
    env, demo_output = _run_demo(tmp_path_factory.mktemp("demo"))
    overall = next(line for line in demo_output.splitlines() if "Overall:" in line)
    run_ids = _assert_instance_state(env["DAGSTER_HOME"])
    with dagster_webserver(env, ARTIFACTS / "webserver.log") as server:
        info = server.wait_ready(timeout=150)
        assert "dagster_webserver_version" in info
        yield {"chromium": chromium, "env": env, "overall": overall, "run_ids": run_ids, "server": server}


def _new_page(browser, width: int, height: int):
    context = browser.new_context(viewport={"width": width, "height": height})
    # Dagster shows a "join the community" dialog on loopback until dismissed once;
    # mark it dismissed (as "Skip" would) so it does not cover the pages under test.
    context.add_init_script("window.localStorage.setItem('communityNux', JSON.stringify('1'))")
    page = context.new_page()
    page.set_default_timeout(UI_TIMEOUT_MS)
    return context, page


def test_dagster_ui_after_the_demo_shows_its_runs_and_a_report_without_fail(after_demo):
    overall, run_ids, server = after_demo["overall"], after_demo["run_ids"], after_demo["server"]
    assert "FAIL" not in overall, overall
    with headless_chromium(after_demo["chromium"]) as browser:
        context, page = _new_page(browser, 1280, 800)

        # 1. The demo's runs are the UI's runs: listed, and re-executable from their page.
        page.goto(f"{server.url}/runs", wait_until="domcontentloaded")
        for job in DEMO_JOBS:
            _wait_text(page, re.compile(rf"^{job}$"))
        _shot(page, "runs")
        page.goto(f"{server.url}/runs/{run_ids['kms_nightly']}", wait_until="domcontentloaded")
        reexecute = page.get_by_role("button", name=re.compile("Re-execute")).first
        reexecute.wait_for(state="visible", timeout=UI_TIMEOUT_MS)
        # The button is drawn disabled until the UI has matched the run to the loaded code
        # location, which takes seconds on a busy machine: wait for it, and fail if it never comes.
        try:
            expect(reexecute).to_be_enabled(timeout=UI_TIMEOUT_MS)
        except AssertionError:
            _shot(page, "failure-reexecute-disabled")
            pytest.fail(
                f"Re-execute stayed disabled on the demo's kms_nightly run for {UI_TIMEOUT_MS // 1000}s", pytrace=False
            )

        # 2. Asset catalog: the real code location's assets, materialized by the demo.
        page.goto(f"{server.url}/assets", wait_until="domcontentloaded")
        for name in ("key_inventory", "kms_state", "break_glass_escrow"):  # the list is virtualised: the rest
            # are below the fold; _assert_instance_state checked every asset
            _wait_text(page, re.compile(rf"^{name}$"))
        _wait_text(page, re.compile(r"^Materialized$"))
        assert page.get_by_text(re.compile(r"^Materialized$")).count() >= 5, _body_text(page)[:1500]
        _shot(page, "asset-catalog")

        # 3. The drill report's asset page: the demo's drill, rendered from its Markdown.
        page.goto(f"{server.url}/assets/restore_drill_report", wait_until="domcontentloaded")
        _wait_text(page, "Latest materialization")
        _wait_text(page, "[Show Markdown]").click()
        dialog = page.get_by_role("dialog")
        title = _wait_heading(dialog, re.compile(r"^Restore drill \d{4}-\d{2}-\d{2}$"))
        for heading in ("Checks", "Findings", "Follow-ups"):
            _wait_heading(dialog, heading)
        for text in ("Participants:", "PASSED", "None: every check passed."):
            _wait_text(dialog, text)
        title.evaluate("e => e.scrollIntoView({block: 'start'})")
        _shot(page, "restore-drill-report")

        # 4. The compliance report's asset page: the clause table in the metadata, and the
        #    Markdown report (behind "[Show Markdown]") with one row per policy clause and
        #    the same verdict as the terminal: nothing the demo did is red.
        page.goto(f"{server.url}/assets/{COMPLIANCE_ASSET}", wait_until="domcontentloaded")
        _wait_text(page, "Latest materialization")
        for clause in ("R1", "T3"):
            _wait_text(page, re.compile(rf"^{clause}$"))
        page.get_by_text("[Show Markdown]").first.click()
        dialog = page.get_by_role("dialog")
        report = _wait_heading(dialog, "KMS policy compliance report")
        for clause in ("P1", "R1", "B2", "T3"):
            _wait_text(dialog, re.compile(rf"^{clause}$"))
        verdict = _wait_text(dialog, re.compile(r"^Overall:")).locator("xpath=..").inner_text()
        assert "FAIL" not in verdict and verdict.split("—")[0].split(":")[1].strip() in overall, (verdict, overall)
        assert "🔴" not in dialog.inner_text(), "a clause is red in the UI after the demo"
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
        pytest.fail(
            f"{page.url}: heading {name!r} not shown within {UI_TIMEOUT_MS // 1000}s; page text starts:\n"
            f"{_body_text(page)[:1500]}",
            pytrace=False,
        )
    return heading


# The asset page's metadata panel (dagster-webserver 1.13): a Key | Timestamp | Value table in a
# container that scrolls horizontally when a value is wider than its column.
METADATA_PANEL = "[class*='assetEventMetadataScrollContainer']"

# Reports the panel's widths and every metadata value (a table, a chart (<pre>) or a plain value)
# that ends past its right edge. Nothing is restyled first: the panel is measured as a user sees it,
# so a long hash or path in a plain text entry counts as much as a wide table.
_MEASURE_PANEL = """
(panel) => {
  const outer = panel.querySelector('table');
  const right = panel.getBoundingClientRect().left + panel.clientWidth;
  const tables = Array.from(outer.querySelectorAll('td table, td pre')).map((el) => {
    const key = el.closest('td').closest('tr').querySelector(':scope > td').innerText.trim();
    const header = Array.from(el.querySelectorAll('th')).map((h) => h.innerText.trim()).join(' | ');
    return {key, what: el.tagName === 'PRE' ? 'chart' : `table [${header.slice(0, 120)}]`,
            width: Math.round(el.getBoundingClientRect().width), past: Math.round(el.getBoundingClientRect().right - right)};
  });
  // A plain value (text, a path, a link, inline Markdown): where its text ends, overflow included.
  const plain = [];
  for (const tr of outer.querySelectorAll(':scope > tbody > tr')) {
    const value = tr.querySelector(':scope > td:last-child');
    if (!value || value.querySelector('table, pre')) continue;
    const range = document.createRange();
    range.selectNodeContents(value);
    const edge = range.getBoundingClientRect().right;
    const text = value.innerText.trim();
    plain.push({key: tr.querySelector(':scope > td').innerText.trim(), what: `value "${text.slice(0, 40)}${text.length > 40 ? '…' : ''}"`,
                width: Math.round(edge - value.getBoundingClientRect().left), past: Math.round(edge - right)});
  }
  const items = tables.concat(plain);
  return {scroll_width: panel.scrollWidth, client_width: panel.clientWidth, items};
}
"""

# The same for an open "[Show Markdown]" dialog: its content box scrolls when a table is too wide.
_MEASURE_DIALOG = """
(dialog) => Array.from(dialog.querySelectorAll('table, pre')).map((el) => {
  let box = el.parentElement;
  while (box && !['auto', 'scroll', 'hidden', 'clip'].includes(getComputedStyle(box).overflowX)) box = box.parentElement;
  box = box || document.documentElement;
  const header = Array.from(el.querySelectorAll('th')).map((h) => h.innerText.trim()).join(' | ');
  return {what: el.tagName === 'PRE' ? 'chart' : `table [${header.slice(0, 120)}]`,
          width: Math.round(el.getBoundingClientRect().width), scroll_width: box.scrollWidth, client_width: box.clientWidth};
})
"""


def test_metadata_tables_fit_the_asset_page_at_1600px(after_demo):
    """Issue 14: at a 1600x1000 window nothing in any asset's metadata (table metadata, inline
    Markdown, plain values such as hashes and paths, and the tables of every "[Show Markdown]"
    dialog) is clipped or needs horizontal scrolling. The panel is measured as drawn, with no
    word-breaking added by the test. Every asset is visited: the demo materialized each one."""
    from playwright.sync_api import TimeoutError as PwTimeout

    from kms_pipelines.definitions import defs

    server = after_demo["server"]
    assets = sorted(k.to_user_string() for k in defs().get_repository_def().asset_graph.get_all_asset_keys())
    measured, too_wide = 0, []
    with headless_chromium(after_demo["chromium"]) as browser:
        context, page = _new_page(browser, 1600, 1000)
        for asset in assets:
            page.goto(f"{server.url}/assets/{asset}", wait_until="domcontentloaded")
            panel = page.locator(METADATA_PANEL).first
            try:
                panel.locator("tbody tr").first.wait_for(state="visible", timeout=UI_TIMEOUT_MS)
            except PwTimeout:
                _shot(page, f"failure-metadata-{asset}")
                pytest.fail(
                    f"{asset}: no metadata panel ({METADATA_PANEL}) within {UI_TIMEOUT_MS // 1000}s; "
                    f"page text starts:\n{_body_text(page)[:1500]}",
                    pytrace=False,
                )
            if asset == COMPLIANCE_ASSET:
                _wait_text(panel, re.compile(r"^B4$"))  # the clause table's last row is drawn
            # Dialogs first: the panel measurement below restyles the page.
            links = panel.get_by_text("[Show Markdown]")
            for i in range(links.count()):
                label = links.nth(i).locator("xpath=ancestor::tr[1]/td[1]").inner_text().strip()
                links.nth(i).click()
                dialog = page.get_by_role("dialog")
                dialog.wait_for(state="visible")
                for item in page.evaluate(_MEASURE_DIALOG, dialog.element_handle()):
                    measured += 1
                    if item["scroll_width"] > item["client_width"] + 1:
                        too_wide.append(
                            f"{asset} [Show Markdown] {label}: {item['what']} is {item['width']} px, its "
                            f"dialog shows {item['client_width']} of {item['scroll_width']} px"
                        )
                page.keyboard.press("Escape")
                dialog.wait_for(state="hidden")
            if asset == COMPLIANCE_ASSET:
                # the clause table (the page's first table metadata) in view, for the README's screenshot
                panel.locator("td table").first.evaluate("e => e.scrollIntoView({block: 'center'})")
                _shot(page, "compliance-clauses-1600")
            got = page.evaluate(_MEASURE_PANEL, panel.element_handle())
            measured += sum(1 for i in got["items"] if not i["what"].startswith("value "))
            if got["scroll_width"] > got["client_width"] + 1:
                wide = [
                    f"{i['key']}: {i['what']} is {i['width']} px, {i['past']} px past the edge"
                    for i in got["items"]
                    if i["past"] > 1
                ]
                too_wide.append(
                    f"{asset}: the metadata panel shows {got['client_width']} of {got['scroll_width']} px; "
                    + ("; ".join(wide) or "(no table, chart or value past the edge)")
                )
                _shot(page, f"failure-wide-{asset}")
        context.close()
    assert measured >= 20, f"only {measured} tables and charts found: the selectors no longer match the UI"
    assert too_wide == [], "\n".join(too_wide)
