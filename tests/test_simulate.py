"""Simulated time (issue 4b, "Done when"): 456 simulated nights through the same nightly
logic, asserting every rotation on its cadence day, zero DEKs left on old versions after
each night's sweep, and retention/destruction exactly when allowed."""

from datetime import date

import pytest
from click.testing import CliRunner

from kms_pipelines.core.envelope import data_keys as envelope
from kms_pipelines.core.keys import manifest, retention
from kms_pipelines.core.ledger import ledger
from kms_pipelines.core.runtime import nightly, simulate

START = date(2026, 1, 1)
DAYS = 456  # > 400, and long enough to see the first service (day 425) and root (day 455) destructions
# The nightly steps this area's promises depend on (the full nightly also backs up, seals escrow,
# checkpoints …; `kms simulate` runs all of them, the test keeps to these for runtime).
STEPS = [
    "rotate_root",
    "rotate_service",
    "rotate_data",
    "rotate_backup",
    "notify_partners",
    "envelope_sweep",
    "retire_expired",
]


@pytest.fixture(scope="module")
def year():
    observed = {"stranded": {}, "final": {}}

    def on_day(day, ctx, night):
        left = envelope.stranded(ctx)
        if left:
            observed["stranded"][day] = left
        if day == DAYS:
            observed["final"] = {
                "ledger": ledger.verify(ctx.engine),
                "manifests": manifest.verify_chain(ctx),
                "due": retention.due_for_destruction(ctx),
                "deks": envelope.dek_inventory_frame(ctx),
            }

    result = simulate.simulate(DAYS, START, steps=STEPS, on_day=on_day)
    return result, observed


def cadence(first, every, until=DAYS):
    return list(range(first, until + 1, every))


def test_every_rotation_happens_on_its_cadence_day(year):
    result, _ = year
    pol = simulate._policy(None)
    root, svc, data, backup = (pol.key_class(c).rotation_days for c in ("root", "service", "data", "backup"))
    assert result.days_of("rotated", "root") == cadence(root, root) == [90, 180, 270, 360, 450]
    for name in pol.key_class("service").names:
        assert result.days_of("rotated", f"service:{name}") == cadence(svc, svc)
    for name in pol.key_class("data").names:
        assert result.days_of("rotated", f"data:{name}") == cadence(data, data) == [180, 360]
    assert result.days_of("rotated", "backup") == cadence(backup, backup)
    # root rotations published a manifest and notified every partner the same night
    notified = [e.day for e in result.of("notified")]
    assert notified == [] or set(notified) <= set(cadence(root, root))


def test_sweep_leaves_zero_deks_on_old_versions(year):
    result, observed = year
    assert observed["stranded"] == {}  # after every single night
    deks = observed["final"]["deks"]
    assert len(deks) == 20 and set(deks["version_state"]) == {"active"}
    assert sorted(e.day for e in result.of("swept")) == [180, 360]


def test_retention_and_destruction_happen_exactly_when_allowed(year):
    result, observed = year
    pol = simulate._policy(None)
    keep = pol.key_class("service").retention_days
    svc, root = pol.key_class("service").rotation_days, pol.key_class("root").rotation_days
    destroyed = sorted((e.day, e.key, e.version) for e in result.of("destroyed"))
    expected = sorted(
        [(svc + keep, f"service:{n}", 1) for n in pol.key_class("service").names] + [(root + keep, "root", 1)]
    )
    assert destroyed == expected  # day 425 (services v1), day 455 (root v1)
    # approvals were given on exactly those nights, and every destruction recorded both approvers
    assert sorted((e.day, e.key, e.version) for e in result.of("approved")) == expected
    assert all("sim-approver-a" in e.detail and "sim-approver-b" in e.detail for e in result.of("destroyed"))
    # nothing else is due yet: service v2 (rotated day 120) only on day 485
    assert observed["final"]["due"] == []
    assert observed["final"]["ledger"].ok and observed["final"]["manifests"].ok
    assert observed["final"]["manifests"].count == 6  # v1 .. v6


def test_cli_simulate_prints_a_timeline():
    from kms_pipelines.cli import cli

    res = CliRunner().invoke(
        cli, ["simulate", "--days", "61", "--from", "2026-01-01", "--steps", "rotate_service,rotate_backup"]
    )
    assert res.exit_code == 0, res.output
    lines = res.stdout.splitlines()
    assert lines[0].startswith("simulated 61 day(s) from 2026-01-01")
    # progress and the one-line verdict go to stderr, so the timeline (and --json) stay clean
    progress = res.stderr.splitlines()
    assert progress[-2].startswith("simulate: day 61 of 61")
    assert progress[-1].startswith("simulated 61 day(s) in ") and "rotated" in progress[-1]
    day60 = next(line for line in lines if line.startswith("day   60"))
    assert "rotated service:api-gateway v1" in day60 and "2026-03-02" in day60
    res = CliRunner().invoke(cli, ["simulate", "--days", "3", "--steps", "nope"])
    assert res.exit_code == 2 and "unknown step" in res.output
    res = CliRunner().invoke(cli, ["simulate", "--days", "3", "--from", "not-a-date"])
    assert res.exit_code == 2


def test_all_nightly_steps_are_registered():
    names = {s.name for s in nightly.steps()}
    assert set(STEPS) <= names
