"""Dagster: the manual_rotation job (Launchpad config, same approvals) and the
audit_anomalies asset with its checks; resources run under a workload token (A2)."""

from datetime import UTC, datetime, timedelta

import dagster as dg
import pytest
from sqlalchemy import select

from kms_pipelines.core.access import anomalies
from kms_pipelines.core.foundation.db.models import STATES, KeyVersion
from kms_pipelines.core.foundation.db.models_access import AuditEvent
from kms_pipelines.core.ledger import audit, ledger
from kms_pipelines.defs.access import audit_anomalies, audit_chain_intact, manual_rotation, no_unreviewed_high_anomalies
from kms_pipelines.defs.foundation import kms_state
from kms_pipelines.defs.resources import DatabaseResource, KeyStoreResource, KmsResource, ObjectStoreResource
from tests.fixtures.dagster_defs import FixedClockResource
from tests.fixtures.kms import approve_both, ceremony, write_test_policy

AT = datetime(2026, 2, 1, 9, 0, tzinfo=UTC)


def make_resource(tmp_path, url, at=AT):
    return KmsResource(
        home=str(tmp_path / "home"),
        database=DatabaseResource(url=url),
        keystore=KeyStoreResource(kind="software"),
        objects=ObjectStoreResource(url=str(tmp_path / "objects")),
        clock=FixedClockResource(fixed_time=at.isoformat()),
    )


@pytest.fixture(params=["sqlite", "postgres"])
def dagster_kms(request, tmp_path, monkeypatch):
    monkeypatch.setenv("KMS_MASTER_KEY", "B" * 43 + "=")
    monkeypatch.setenv("KMS_POLICY", write_test_policy(tmp_path))  # the approvers' keys are software ones
    url = f"sqlite:///{tmp_path / 'kms.db'}" if request.param == "sqlite" else request.getfixturevalue("pg_url")
    res = make_resource(tmp_path, url)
    instance = dg.DagsterInstance.ephemeral()
    assert dg.materialize([kms_state], resources={"kms": res}, instance=instance).success
    return res, instance


def _snapshot(ctx):
    with ctx.engine.connect() as conn:
        return (
            conn.execute(select(KeyVersion.key_id, KeyVersion.version, KeyVersion.state).order_by(KeyVersion.id)).all(),
            ledger.head(conn),
        )


def _config(code, key="root", ticket="CHG-42", requester="alice"):
    return {
        "ops": {
            "manual_rotate_key": {
                "config": {"key": key, "ticket": ticket, "requester": requester, "requester_totp": code}
            }
        }
    }


def _team(ctx):
    return ceremony(ctx, {"alice": "sre_oncall", "bob": "security_engineering", "carol": "compliance_officer"})


def _alice(devices, step):
    """alice's code for time-step ``step`` around AT (the run's fixed clock accepts ±1 step):
    each launch proves her with a newer step, as the replay rule wants."""
    return devices["alice"].at(AT + timedelta(seconds=30 * step))


def test_manual_rotation_job_enforces_the_same_approvals(dagster_kms):
    res, instance = dagster_kms
    ctx = res.context()
    devices = _team(ctx)
    before = _snapshot(ctx)
    result = manual_rotation.execute_in_process(
        run_config=_config(_alice(devices, -1)), resources={"kms": res}, instance=instance, raise_on_error=False
    )
    assert not result.success
    failure = [e for e in result.all_events if e.event_type_value == "STEP_FAILURE"][0]
    assert "needs 2 approvals" in failure.step_failure_data.error.to_string()
    # a dg.Failure: one line in the run view (and the failure email), not a traceback
    assert failure.step_failure_data.user_failure_data.description.startswith("rotate of root under ticket")
    assert "\n" not in failure.step_failure_data.user_failure_data.description
    assert _snapshot(ctx) == before
    approve_both(ctx, "bob", ticket="CHG-42", operation="rotate", totp=devices["bob"].at(AT))
    result = manual_rotation.execute_in_process(
        run_config=_config(_alice(devices, 0)), resources={"kms": res}, instance=instance, raise_on_error=False
    )
    assert not result.success and _snapshot(ctx) == before
    approve_both(ctx, "carol", ticket="CHG-42", operation="rotate", totp=devices["carol"].at(AT))
    result = manual_rotation.execute_in_process(
        run_config=_config(_alice(devices, 1)), resources={"kms": res}, instance=instance
    )
    assert result.success
    assert result.output_for_node("manual_rotate_key")["approvers"] == ["bob", "carol"]
    with ctx.transaction() as s:
        # the rotation's state change (the root follow-ups may add the vault's "archived" record)
        e = [e for e in ledger.entries_for(s, "root") if e.to_state in STATES][-1]
        assert (e.actor, e.approvers, e.change_ticket) == ("alice", '["bob","carol"]', "CHG-42")
    # keystore operations of the run ran under the Dagster workload token
    audit.flush(ctx)
    with ctx.engine.connect() as conn:
        actors = set(conn.execute(select(AuditEvent.actor).where(AuditEvent.operation == "generate")).scalars())
    assert "workload:dagster" in actors


def test_manual_rotation_config_is_typed_for_the_launchpad():
    fields = (
        manual_rotation.run_config_schema.config_type.fields["ops"]
        .config_type.fields["manual_rotate_key"]
        .config_type.fields["config"]
        .config_type.fields
    )
    assert set(fields) == {"key", "ticket", "requester", "requester_totp"}
    assert all(f.is_required for f in fields.values())
    assert "Approvals must exist first" in manual_rotation.description


@pytest.mark.parametrize("blank", ["key", "ticket", "requester", "requester_totp"])
def test_manual_rotation_refuses_an_empty_field_and_changes_nothing(dagster_kms, blank):
    res, instance = dagster_kms
    ctx = res.context()
    before = _snapshot(ctx)
    config = {"key": "root", "ticket": "CHG-42", "requester": "alice", "requester_totp": "123456", blank: ""}
    result = manual_rotation.execute_in_process(
        run_config={"ops": {"manual_rotate_key": {"config": config}}},
        resources={"kms": res},
        instance=instance,
        raise_on_error=False,
    )
    assert not result.success
    failure = [e for e in result.all_events if e.event_type_value == "STEP_FAILURE"][0]
    assert blank in failure.step_failure_data.error.to_string()
    assert _snapshot(ctx) == before


def test_audit_anomalies_asset_and_checks(dagster_kms):
    res, instance = dagster_kms
    ctx = res.context()
    devices = ceremony(ctx, {"sam": "security_engineering", "sue": "security_engineering", "sid": "sre_oncall"})
    # a plain (undual-controlled) manual rotation: a high-severity anomaly
    from kms_pipelines.core.keys import lifecycle

    lifecycle.rotate(ctx, "data:postgres")
    result = dg.materialize(
        [audit_anomalies, audit_chain_intact, no_unreviewed_high_anomalies],
        resources={"kms": res},
        instance=instance,
        raise_on_error=False,
    )
    checks = {c.check_name: c.passed for c in result.get_asset_check_evaluations()}
    assert checks == {"audit_chain_intact": True, "no_unreviewed_high_anomalies": False}
    mat = result.asset_materializations_for_node("audit_anomalies")[0]
    assert mat.metadata["unreviewed_high"].value == 1
    for step, a in enumerate(anomalies.unreviewed(ctx)):
        anomalies.review(ctx, a.id, "sam", "planned drill", totp=devices["sam"].at(AT + timedelta(seconds=30 * step)))
    result = dg.materialize(
        [audit_anomalies, audit_chain_intact, no_unreviewed_high_anomalies], resources={"kms": res}, instance=instance
    )
    assert all(c.passed for c in result.get_asset_check_evaluations())


def test_the_resource_refreshes_its_workload_token(tmp_path, monkeypatch):
    monkeypatch.setenv("KMS_MASTER_KEY", "C" * 43 + "=")
    url = f"sqlite:///{tmp_path / 'kms.db'}"
    instance = dg.DagsterInstance.ephemeral()
    assert dg.materialize([kms_state], resources={"kms": make_resource(tmp_path, url)}, instance=instance).success
    later = make_resource(tmp_path, url, at=AT + timedelta(minutes=30))
    assert dg.materialize([kms_state], resources={"kms": later}, instance=instance).success
    ident = later.context().keystore.credentials
    from kms_pipelines.core.keys import lifecycle

    lifecycle.rotate(later.context(), "data:postgres")
    assert ident.issued >= 2  # one token at AT, a fresh one 30 minutes later
