import json
from datetime import timedelta

import dagster as dg
import pytest
from sqlalchemy import select, text

from kms_pipelines.core.foundation.db.models import LedgerEntry
from kms_pipelines.core.keys import lifecycle
from kms_pipelines.core.ledger import checkpoints, ledger, rpt, rpt_verify
from kms_pipelines.core.ledger import rpt_verify as rpt_verify_mod
from kms_pipelines.core.runtime import nightly
from tests.fixtures.dagster_defs import kms_resources, materialize_selection
from tests.test_rpt import admin, issue_n, snapshot


def rewrite_ledger(kms, seq, **changes):
    """A database admin who bypasses the triggers, edits entry ``seq`` and recomputes the hash
    chain from there on, so ``ledger.verify`` passes again."""
    with kms.engine.connect() as conn:
        entries = conn.execute(select(LedgerEntry).order_by(LedgerEntry.seq)).all()
    prev = entries[seq - 2].entry_hash if seq > 1 else ledger.GENESIS_HASH
    statements, params = [], {}
    for e in entries[seq - 1 :]:
        f = {
            "key_name": e.key_name,
            "key_version": e.key_version,
            "from_state": e.from_state,
            "to_state": e.to_state,
            "actor": e.actor,
            "at": e.at,
            "change_ticket": e.change_ticket,
            "reason": e.reason,
            "event_id": e.event_id,
        }
        if e.seq == seq:
            f.update(changes)
        doc = ledger.entry_document(
            e.seq,
            f["at"],
            f["key_name"],
            f["key_version"],
            f["from_state"],
            f["to_state"],
            f["actor"],
            json.loads(e.approvers),
            f["change_ticket"],
            f["reason"],
            f["event_id"],
            prev,
        )
        h = ledger.entry_hash(doc)
        sets = ", ".join(f"{k} = :{k}_{e.seq}" for k in changes) + ", " if e.seq == seq else ""
        statements.append(
            f"UPDATE ledger_entries SET {sets}prev_hash = :p_{e.seq}, entry_hash = :h_{e.seq} WHERE seq = {e.seq}"
        )
        params.update({f"p_{e.seq}": prev, f"h_{e.seq}": h})
        if e.seq == seq:
            params.update({f"{k}_{e.seq}": v for k, v in changes.items()})
        prev = h
    # entry_hash is unique: clear the recomputed range first, then write the new hashes
    admin(
        kms,
        "ledger_entries",
        f"UPDATE ledger_entries SET entry_hash = 'x' || seq WHERE seq >= {seq}",
        *statements,
        params=params,
    )


@pytest.fixture
def checkpointed(kms):
    issue_n(kms, 10, batch=5)
    first = checkpoints.write_checkpoint(kms)
    kms.clock.advance(timedelta(days=1))
    lifecycle.rotate(kms, "root")
    issue_n(kms, 10, start=10, batch=5)
    second = checkpoints.write_checkpoint(kms)
    return kms, first, second


def test_checkpoint_is_signed_canonical_and_write_once(checkpointed):
    kms, first, second = checkpointed
    cps = checkpoints.load_all(kms)
    assert [c.key for c in cps] == [first["key"], second["key"]]
    assert first["kid"].startswith("root#v1:") and second["kid"].startswith("root#v2:")
    assert (second["ledger_size"], second["rpt_size"]) == (ledger.verify(kms.engine).count, 20)
    assert second["rpt_head_hash"] == rpt.token_hash(_last_token(kms))
    assert second["lock_mode"] == "COMPLIANCE" and second["retain_until"] > kms.now() + timedelta(days=2500)
    with pytest.raises(Exception, match="locked"):
        kms.objects.delete(first["key"])
    result = checkpoints.verify(kms)
    assert result.ok and result.checkpoints == 2 and result.latest_checkpoint == second["key"]


def _last_token(kms):
    from tests.test_rpt import rows

    return rows(kms)[-1][1]


def test_same_state_same_time_is_idempotent(checkpointed):
    kms, _, second = checkpointed
    again = checkpoints.write_checkpoint(kms)
    assert again["key"] == second["key"] and len(checkpoints.load_all(kms)) == 2


def test_a_rewrite_with_a_recomputed_chain_is_caught_naming_the_checkpoint_and_seq(checkpointed):
    kms, first, second = checkpointed
    rewrite_ledger(kms, 3, actor="mallory")
    assert ledger.verify(kms.engine).ok  # the admin's rewrite fools the chain alone
    result = checkpoints.verify(kms)
    assert not result.ok and result.area == "ledger"
    assert "ledger rewritten" in result.problem and first["key"] in result.problem
    assert result.first_bad_seq == first["ledger_size"] and f"seq 1..{first['ledger_size']}" in result.problem
    before = snapshot(kms)
    with pytest.raises(rpt.RptError, match="refusing to sign a checkpoint: ledger rewritten"):
        checkpoints.write_checkpoint(kms)
    assert snapshot(kms) == before


def test_a_rewrite_after_the_first_checkpoint_names_the_second(checkpointed):
    kms, first, second = checkpointed
    rewrite_ledger(kms, first["ledger_size"] + 1, reason="rewritten")
    result = checkpoints.verify(kms)
    assert not result.ok and second["key"] in result.problem
    assert f"seq {first['ledger_size'] + 1}..{second['ledger_size']}" in result.problem


def test_rewriting_the_root_rotation_time_to_legitimise_a_forged_token_is_caught(checkpointed):
    kms, first, second = checkpointed
    with kms.engine.connect() as conn:
        rotated = conn.execute(
            select(LedgerEntry.seq).where(LedgerEntry.key_name == "root", LedgerEntry.to_state == "rotated")
        ).scalar_one()
    rewrite_ledger(kms, rotated, at=kms.now() + timedelta(days=30))
    assert ledger.verify(kms.engine).ok
    assert not checkpoints.verify(kms).ok


def test_ledger_truncation_is_caught(checkpointed):
    kms, _, second = checkpointed
    admin(kms, "ledger_entries", f"DELETE FROM ledger_entries WHERE seq > {second['ledger_size'] - 2}")
    result = checkpoints.verify(kms)
    assert not result.ok and "ledger truncated" in result.problem and second["key"] in result.problem


def test_rpt_truncation_is_caught_by_checkpoint_verification(checkpointed):
    kms, _, second = checkpointed
    admin(kms, "rpts", "DELETE FROM rpts WHERE seq > 18")
    result = checkpoints.verify(kms)
    assert not result.ok and result.area == "rpt" and "truncated" in result.problem and result.first_bad_seq == 19


def test_an_altered_checkpoint_object_is_refused(checkpointed):
    kms, _, second = checkpointed
    path = kms.objects._data_path(second["key"])
    obj = json.loads(path.read_bytes())
    obj["document"]["ledger_size"] -= 1
    path.chmod(0o600)
    path.write_bytes(json.dumps(obj).encode())
    checkpoints._PARSED.clear()
    result = checkpoints.verify(kms)
    assert not result.ok and result.area == "checkpoint" and "signature does not verify" in result.problem
    with pytest.raises(rpt.RptError, match="signature does not verify"):
        rpt_verify.verify_chain(kms)


def test_checkpoints_go_to_s3_under_object_lock_compliance(make_kms, s3_store, s3_client):
    kms = make_kms("sqlite")
    kms.objects = s3_store
    issue_n(kms, 3, batch=3)
    cp = checkpoints.write_checkpoint(kms)
    head = s3_client.head_object(Bucket=s3_store.bucket, Key=s3_store._full(cp["key"]))
    assert head["ObjectLockMode"] == "COMPLIANCE"
    assert checkpoints.verify(kms).ok and rpt_verify.verify_chain(kms).checked_against == f"checkpoint {cp['key']}"


def test_write_checkpoint_needs_an_object_store(make_kms):
    kms = make_kms("sqlite")
    kms.objects = None
    with pytest.raises(rpt.RptError, match="no object store"):
        checkpoints.write_checkpoint(kms)


def test_nightly_registers_verify_then_checkpoint(make_kms):
    steps = {s.name: s.order for s in nightly.steps()}
    assert steps["rpt_verify"] == 42 and steps["ledger_checkpoint"] == 45
    kms = make_kms("sqlite")
    issue_n(kms, 2, batch=2)
    out = checkpoints._nightly_checkpoint(kms)
    assert out["rpt_size"] == 2 and rpt_verify_mod._nightly_rpt_verify(kms)["verified"] == 2


RPT_ASSETS = dg.AssetSelection.assets("kms_state", "rpt_chain", "ledger_checkpoint")


def test_dagster_assets_checkpoint_and_block_on_a_broken_chain(code_location, tmp_path):
    home = tmp_path / "home"
    url = f"sqlite:///{home / 'kms.db'}"
    resources = kms_resources(home, url, fixed_time="2026-03-01T02:00:00Z")
    instance = dg.DagsterInstance.ephemeral()
    first = materialize_selection(code_location, RPT_ASSETS, resources, instance)
    assert first.success
    ctx = resources["kms"].context()
    rpt.issue_many(ctx, [("s", {"i": i}) for i in range(5)])
    result = materialize_selection(code_location, RPT_ASSETS, resources, instance, tags={"run": "2"})
    assert result.success
    meta = result.asset_materializations_for_node("rpt_chain")[0].metadata
    assert meta["count"].value == 5 and meta["verified_ok"].value is True
    cp_meta = result.asset_materializations_for_node("ledger_checkpoint")[0].metadata
    assert cp_meta["rpt_size"].value == 5 and cp_meta["lock_mode"].value == "COMPLIANCE"
    # heads and kid shortened for the panel, whole in full_values
    head = rpt.token_hash(_last_token(ctx))
    assert cp_meta["rpt_head_hash"].value == head[:16] + "…" and f"`{head}`" in cp_meta["full_values"].value
    assert cp_meta["kid"].value.startswith("root#v1:SHA256:") and cp_meta["kid"].value.endswith("…")
    checks = {e.check_name: e.passed for e in result.get_asset_check_evaluations()}
    assert checks["rpt_chain_verifies"] and checks["ledger_matches_checkpoints"]
    with ctx.engine.begin() as conn:
        from kms_pipelines.core.foundation.db.append_only import create_append_only_triggers, drop_append_only_triggers

        drop_append_only_triggers(conn, "rpts")
        conn.execute(text("DELETE FROM rpts WHERE seq = 5"))
        create_append_only_triggers(conn, "rpts")
    broken = materialize_selection(code_location, RPT_ASSETS, resources, instance)
    assert not broken.success
    checks = {e.check_name: e for e in broken.get_asset_check_evaluations()}
    assert (
        not checks["rpt_chain_verifies"].passed
        and "truncated" in checks["rpt_chain_verifies"].metadata["problem"].value
    )
    assert broken.asset_materializations_for_node("ledger_checkpoint") == []  # blocked: nothing signed
