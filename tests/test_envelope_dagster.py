"""The envelope layer in Dagster: the sweep's shards run as separate runs under the
multiprocess executor on a PostgreSQL-backed instance; the blocking check; the nightly
schedule; the export-expiry sensor and its job."""

import base64
import os
import secrets
import subprocess
import sys
from datetime import UTC, datetime, timedelta

import dagster as dg
import pytest
from sqlalchemy import text

from kms_pipelines.core.envelope import data_keys as envelope
from kms_pipelines.core.envelope import export_keys
from kms_pipelines.core.foundation.policy import load_policy
from kms_pipelines.core.keys import lifecycle
from kms_pipelines.core.runtime.wiring import context_from_env
from kms_pipelines.defs import envelope as envelope_defs
from tests.fixtures.dagster_defs import REPO, kms_resources

KEY = "data:banking-attachments"


def sweep_job():
    """Reconstructable target: the code location's sweep job, resources from KMS_* env."""
    from kms_pipelines.definitions import defs

    return defs().resolve_job_def("dek_rewrap_sweep_job")


@pytest.fixture
def kms_env(tmp_path, monkeypatch, pg_url):
    """KMS_* environment (inherited by run/step subprocesses) on a migrated PostgreSQL DB."""
    env = {
        "KMS_HOME": str(tmp_path / "home"),
        "KMS_DATABASE_URL": pg_url,
        "KMS_KEYSTORE": "software",
        "KMS_MASTER_KEY": base64.b64encode(secrets.token_bytes(32)).decode(),
        "KMS_OBJECT_STORE": str(tmp_path / "home" / "objects"),
    }
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    for name in ("KMS_POLICY", "KMS_FIXED_TIME"):
        monkeypatch.delenv(name, raising=False)
    ctx = context_from_env()
    lifecycle.bootstrap(ctx)
    yield ctx
    from kms_pipelines.core.ledger import audit

    audit.flush(ctx)  # the audited keystore writes in the background; finish before the DB is dropped
    ctx.engine.dispose()


RUN_ONE_SHARD = r"""
import sys
import dagster as dg
from tests.test_envelope_dagster import sweep_job

result = dg.execute_job(dg.reconstructable(sweep_job), instance=dg.DagsterInstance.get(),
                        tags={"dagster/partition": sys.argv[1]}, raise_on_error=False)
print("RUN", result.run_id, result.success, flush=True)
"""


@pytest.mark.slow
def test_shards_fan_out_under_the_multiprocess_executor_on_postgres(kms_env, postgres_instance, tmp_path):
    """Three shard runs launched at once from separate processes (as separate hosts would),
    each executing its step in a child process (multiprocess executor), sharing the
    PostgreSQL Dagster instance and the PostgreSQL KMS database."""
    ctx = kms_env
    shards = envelope_defs.SHARD_KEYS
    assert len(shards) == load_policy().envelope.shards
    run_shards = shards[:3]
    covered_hi = envelope.shard_range(1, len(shards))[1]  # data in shards 0 and 1; shard 2 stays empty
    object_ids = [o for o in (f"att-{i}" for i in range(2000)) if envelope.shard_of(KEY, o) < covered_hi][:60]
    blobs = {o: envelope.encrypt(ctx, KEY, o, f"attachment {o}".encode()) for o in object_ids}
    lifecycle.rotate(ctx, KEY)
    lifecycle.rotate(ctx, KEY)
    blobs |= {f"new-{i}": envelope.encrypt(ctx, KEY, f"new-{i}", f"attachment new-{i}".encode()) for i in range(5)}
    assert sum(r.deks for r in envelope.stranded(ctx)) == 60

    env = dict(os.environ, DAGSTER_HOME=str(tmp_path / "dagster_home"))
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", RUN_ONE_SHARD, shard],
            env=env,
            cwd=str(REPO),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for shard in run_shards
    ]
    outputs = [p.communicate(timeout=300) for p in procs]
    run_ids = []
    for (out, err), proc in zip(outputs, procs, strict=True):
        line = next((ln for ln in out.splitlines() if ln.startswith("RUN ")), None)
        assert proc.returncode == 0 and line and line.endswith(" True"), err[-3000:]
        run_ids.append(line.split()[1])

    moved = {}
    for shard, run_id in zip(run_shards, run_ids, strict=True):
        logs = [e for e in postgres_instance.all_logs(run_id) if e.dagster_event]
        assert "STEP_WORKER_STARTING" in {e.dagster_event.event_type_value for e in logs}  # own process
        assert postgres_instance.get_run_by_id(run_id).status == dg.DagsterRunStatus.SUCCESS
        [mat] = [
            e.dagster_event.event_specific_data.materialization
            for e in logs
            if e.dagster_event.event_type_value == "ASSET_MATERIALIZATION"
        ]
        assert mat.partition == shard and mat.metadata["remaining"].value == 0
        moved[shard] = mat.metadata["moved"].value
        [check] = [
            e.dagster_event.event_specific_data
            for e in logs
            if e.dagster_event.event_type_value == "ASSET_CHECK_EVALUATION"
        ]
        assert check.check_name == "no_deks_on_retired_versions" and check.passed
        assert postgres_instance.get_run_by_id(run_id).tags["kms/sweep"] == "rewrap"
    assert sum(moved.values()) == 60 and moved[run_shards[0]] > 0 and moved[run_shards[1]] > 0
    assert moved[run_shards[2]] == 0
    assert envelope.stranded(ctx) == []
    for object_id, blob in blobs.items():
        assert envelope.decrypt(ctx, blob, object_id=object_id) == f"attachment {object_id}".encode()


def test_the_check_fails_when_a_shard_keeps_a_dek_on_a_retired_version(tmp_path):
    home = tmp_path / "home"
    resources = kms_resources(home, f"sqlite:///{home / 'kms.db'}")
    ctx = resources["kms"].context()
    from kms_pipelines.core.foundation import db

    db.upgrade(ctx.engine)
    lifecycle.bootstrap(ctx)
    envelope.encrypt(ctx, KEY, "broken", b"x")
    lifecycle.rotate(ctx, KEY)
    with ctx.engine.begin() as conn:
        shard = conn.execute(text("SELECT shard FROM deks")).scalar()
        conn.execute(text("UPDATE deks SET wrapped = :w"), {"w": b"\x02" * 40})
    partition = next(
        k
        for k in envelope_defs.SHARD_KEYS
        if envelope.shard_range(int(k), len(envelope_defs.SHARD_KEYS))[0]
        <= shard
        < envelope.shard_range(int(k), len(envelope_defs.SHARD_KEYS))[1]
    )
    result = dg.materialize(
        [envelope_defs.dek_rewrap_sweep],
        partition_key=partition,
        resources=resources,
        instance=dg.DagsterInstance.ephemeral(),
        raise_on_error=False,
    )
    [check] = result.get_asset_check_evaluations()
    assert not check.passed and check.metadata["stranded_deks"].value == 1
    [mat] = result.asset_materializations_for_node("dek_rewrap_sweep")
    assert mat.metadata["failed"].value == 1 and mat.metadata["moved"].value == 0
    for value in mat.metadata.values():
        assert "\\x02" not in str(value) and "0202" not in str(value)
    other = next(k for k in envelope_defs.SHARD_KEYS if k != partition)
    ok = dg.materialize(
        [envelope_defs.dek_rewrap_sweep],
        partition_key=other,
        resources=resources,
        instance=dg.DagsterInstance.ephemeral(),
        raise_on_error=False,
    )
    assert ok.get_asset_check_evaluations()[0].passed


def test_the_schedule_launches_every_shard_once_per_night():
    when = datetime(2026, 3, 4, 2, 30, tzinfo=UTC)
    requests = envelope_defs.dek_rewrap_sweep_schedule(dg.build_schedule_context(scheduled_execution_time=when))
    assert [r.partition_key for r in requests] == envelope_defs.SHARD_KEYS
    keys = {r.run_key for r in requests}
    assert len(keys) == len(requests) and all("2026-03-04T0230" in k for k in keys)
    assert envelope_defs.dek_rewrap_sweep_schedule.cron_schedule == load_policy().envelope.sweep_cron


def test_code_location_has_the_envelope_definitions(code_location):
    assert code_location.resolve_job_def("dek_rewrap_sweep_job") is not None
    assert code_location.resolve_job_def("export_key_expiry_job") is not None
    assert code_location.resolve_sensor_def("export_key_expiry_sensor") is not None
    assert code_location.resolve_schedule_def("dek_rewrap_sweep_schedule") is not None
    nightly = code_location.resolve_job_def("kms_nightly")
    assert "dek_inventory" in {k.to_user_string() for k in nightly.asset_layer.executable_asset_keys}


def test_export_expiry_sensor_launches_an_idempotent_shredding_run(tmp_path):
    home = tmp_path / "home"
    url = f"sqlite:///{home / 'kms.db'}"
    now = kms_resources(home, url)
    ctx = now["kms"].context()
    from kms_pipelines.core.foundation import db

    db.upgrade(ctx.engine)
    lifecycle.bootstrap(ctx)
    info = export_keys.create(ctx, "board-pack", ttl_days=1)
    blob = envelope.encrypt(ctx, info.key, "deck.pdf", b"numbers")

    def sensor(resources):
        with dg.build_sensor_context(resources=resources) as context:
            return envelope_defs.export_key_expiry_sensor(context)

    skip = sensor({"kms": now["kms"]})
    assert isinstance(skip, dg.SkipReason)
    later = kms_resources(home, url, fixed_time=(info.expires_at + timedelta(minutes=5)).isoformat())
    first = sensor({"kms": later["kms"]})
    second = sensor({"kms": later["kms"]})
    assert [r.run_key for r in first] == [r.run_key for r in second]  # same work, same run key
    [request] = first
    assert request.tags["kms/export_key"] == info.key

    result = envelope_defs.export_key_expiry_job.execute_in_process(
        run_config=request.run_config, resources={"kms": later["kms"]}, instance=dg.DagsterInstance.ephemeral()
    )
    assert result.success
    assert result.output_for_node("expire_export_keys") == 1
    with pytest.raises(envelope.CryptoShredded, match="data crypto-shredded"):
        envelope.decrypt(later["kms"].context(), blob)
    assert isinstance(sensor({"kms": later["kms"]}), dg.SkipReason)
