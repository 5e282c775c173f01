"""Great Expectations suites over the key and DEK inventory frames (issue 4b §8)."""

import pandas as pd

from kms_pipelines.core.compliance import quality
from kms_pipelines.core.envelope import data_keys as envelope


def test_suites_pass_on_the_live_inventory_and_fail_on_broken_frames(make_kms):
    kms = make_kms("sqlite")
    envelope.encrypt(kms, "data:postgres", "obj-1", b"x")
    results = {r.name: r for r in quality.validate(kms)}
    assert set(results) == {"key_inventory", "active_per_key", "dek_inventory"}
    assert all(r.success for r in results.values()), [r.to_dict() for r in results.values()]
    inv = quality.key_inventory_frame(kms)
    # two active versions of one key, an unknown state and a duplicate (key, version)
    bad = pd.concat([inv, inv.iloc[[0]]], ignore_index=True)
    bad.loc[len(bad) - 1, "state"] = "active"
    bad.loc[1, "state"] = "weird"
    deks = envelope.dek_inventory_frame(kms)
    deks = pd.concat([deks, deks], ignore_index=True)
    broken = {r.name: r for r in quality.validate(kms, inventory=bad, deks=deks)}
    assert not broken["key_inventory"].success
    assert any("unique" in f for f in broken["key_inventory"].failed)
    assert any("in_set(state)" in f for f in broken["key_inventory"].failed)
    assert not broken["active_per_key"].success
    assert not broken["dek_inventory"].success


def test_dagster_check_runs_the_suites(tmp_path):
    import dagster as dg

    from kms_pipelines.defs.compliance import inventory_frames_valid
    from kms_pipelines.defs.foundation import kms_state
    from kms_pipelines.defs.keys import key_inventory
    from kms_pipelines.defs.resources import DatabaseResource, KeyStoreResource, KmsResource, ObjectStoreResource
    from tests.fixtures.dagster_defs import FixedClockResource

    home = tmp_path / "h"
    kms = KmsResource(
        home=str(home),
        database=DatabaseResource(url=f"sqlite:///{home}/kms.db"),
        keystore=KeyStoreResource(kind="software"),
        objects=ObjectStoreResource(url=str(home / "o")),
        clock=FixedClockResource(fixed_time="2030-01-01T02:00:00Z"),
    )
    r = dg.materialize(
        [kms_state, key_inventory, inventory_frames_valid],
        instance=dg.DagsterInstance.ephemeral(),
        resources={"kms": kms},
    )
    assert r.success
    [ev] = r.get_asset_check_evaluations()
    assert ev.check_name == "inventory_frames_valid" and ev.passed
