"""Retention and retirement (T1, T4): 365-day retention guard, dependents guard on revoke
and destroy, dual-approved destruction (real access API), nightly retire_expired."""

from datetime import timedelta

import pytest
from click.testing import CliRunner

from kms_pipelines.core import compliance
from kms_pipelines.core.access import principals as access
from kms_pipelines.core.keys import dependents, lifecycle, retention, rotation, service_keys
from tests.fixtures.kms import approve_both, ceremony
from tests.test_rotation import full_snapshot

SVC = "service:api-gateway"


@pytest.fixture
def approvers(kms):
    devices = ceremony(
        kms, {"sec-a": "security_engineering", "sec-b": "security_engineering", "sec-c": "security_engineering"}
    )
    kms.__dict__["_requester_device"] = devices.pop("sec-c")
    return devices


def approve(kms, approvers, target, ticket, operation="destroy"):
    for name, totp in approvers.items():
        kms.clock.advance(timedelta(seconds=31))
        approve_both(kms, ticket=ticket, operation=operation, approver=name, totp=totp.at(kms.now()), target=target)


def retire_service_v1(kms):
    cred = service_keys.issue_credential(kms, "api-gateway", "client")
    r = rotation.rotate_key(kms, SVC, reason="manual")
    rotated_at = kms.now()
    return cred, r, rotated_at


def test_destroy_is_refused_one_second_before_retention_ends_and_allowed_at_it(kms, approvers):
    cred, _, rotated_at = retire_service_v1(kms)
    dependents.confirm(kms, SVC, 2, "api-gateway")
    kms.clock.set(rotated_at + timedelta(days=365) - timedelta(minutes=5))
    approve(kms, approvers, f"{SVC}#v1", "CHG-1")
    assert kms.now() < rotated_at + timedelta(days=365)
    before = full_snapshot(kms)
    with pytest.raises(lifecycle.GuardRefused) as err:
        retention.destroy_version(kms, SVC, 1, ticket="CHG-1", requester="workload:dagster")
    assert err.value.guard == "retention" and "destroy allowed from" in str(err.value)
    assert full_snapshot(kms) == before
    assert service_keys.verify_credential(kms, "api-gateway", cred).valid  # verify-only, still valid
    kms.clock.set(rotated_at + timedelta(days=365))
    got = retention.destroy_version(kms, SVC, 1, ticket="CHG-1", requester="workload:dagster")
    assert got == ["sec-a", "sec-b"]  # approvals were not spent
    with kms.transaction() as s:
        v1 = lifecycle.get_version(lifecycle.get_key(s, SVC), 1)
        assert v1.state == "destroyed"
        refs = (v1.wrap_ref, v1.sign_ref)
    assert not any(kms.keystore.exists(r) for r in refs)
    assert not service_keys.verify_credential(kms, "api-gateway", cred).valid
    from kms_pipelines.core.ledger import ledger

    with kms.transaction() as s:
        last = ledger.entries_for(s, SVC, 1)[-1]
        assert (last.to_state, last.change_ticket, last.approvers) == ("destroyed", "CHG-1", '["sec-a","sec-b"]')


def test_destroy_without_dual_approval_or_before_dependents_confirm_is_refused(kms, approvers):
    _, _, rotated_at = retire_service_v1(kms)
    kms.clock.set(rotated_at + timedelta(days=366))
    before = full_snapshot(kms)
    with pytest.raises(lifecycle.GuardRefused) as err:  # dependents first
        retention.destroy_version(kms, SVC, 1, requester="workload:dagster")
    assert err.value.guard == "dependents" and "api-gateway" in str(err.value)
    assert full_snapshot(kms) == before
    dependents.confirm(kms, SVC, 2, "api-gateway")
    before = full_snapshot(kms)
    approve(kms, dict(list(approvers.items())[:1]), f"{SVC}#v1", retention.ticket_for(SVC, 1))  # only one
    with pytest.raises(access.AccessDenied, match="needs 2 approvals"):
        retention.destroy_version(kms, SVC, 1, requester="workload:dagster")
    assert full_snapshot(kms)[0] == before[0]


def test_revoke_waits_for_dependents_except_in_an_emergency(kms):
    retire_service_v1(kms)
    before = full_snapshot(kms)
    with pytest.raises(lifecycle.GuardRefused) as err:
        lifecycle.revoke(kms, SVC, 1, reason="retired")
    assert err.value.guard == "dependents" and err.value.action == "revoke"
    assert full_snapshot(kms) == before
    with pytest.raises(dependents.DependentsError, match="not a dependent"):
        dependents.confirm(kms, SVC, 2, "worker-pipelines")
    with pytest.raises(lifecycle.LifecycleError, match="has no version 9"):
        dependents.confirm(kms, SVC, 9, "api-gateway")
    assert full_snapshot(kms) == before
    lifecycle.revoke(kms, SVC, 1, reason="compromise", event_id="evt-1")  # emergency: not held back
    with pytest.raises(dependents.DependentsError, match="only an active or rotated"):
        dependents.confirm(kms, SVC, 1, "api-gateway")  # revoked now
    # root: every listed dependent must confirm the newer version
    kms.clock.advance(timedelta(days=90))
    rotation.reconcile(kms, "root")
    for svc in kms.policy.dependents["root"][:-1]:
        dependents.confirm(kms, "root", 2, svc)
    with pytest.raises(lifecycle.GuardRefused, match=kms.policy.dependents["root"][-1]):
        lifecycle.revoke(kms, "root", 1, reason="retired")
    dependents.confirm(kms, "root", 2, kms.policy.dependents["root"][-1])
    lifecycle.revoke(kms, "root", 1, reason="retired")


def test_nightly_retire_expired_waits_for_approvals_then_destroys(kms, approvers):
    _, _, rotated_at = retire_service_v1(kms)
    dependents.confirm(kms, SVC, 2, "api-gateway")
    kms.clock.set(rotated_at + timedelta(days=364))
    assert retention.retire_expired(kms).due == []
    kms.clock.set(rotated_at + timedelta(days=365))
    s = retention.retire_expired(kms)
    assert [d.target for d in s.due] == [f"{SVC}#v1"] and s.destroyed == []
    assert "needs 2 approvals" in s.awaiting_approval[0]["missing"]
    approve(kms, approvers, f"{SVC}#v1", retention.ticket_for(SVC, 1))
    s = retention.retire_expired(kms)
    assert s.destroyed == [
        {
            "key": SVC,
            "version": 1,
            "ticket": retention.ticket_for(SVC, 1),
            "target": f"{SVC}#v1",
            "approvers": ["sec-a", "sec-b"],
        }
    ]
    assert retention.retire_expired(kms).due == []


def _code(kms):
    """A fresh code of the requester sec-c (the clock moves one time-step first)."""
    kms.clock.advance(timedelta(seconds=31))
    return kms.__dict__["_requester_device"].at(kms.now())


def test_cli_keys_destroy_and_revoke_name_the_refusing_guard(kms, approvers):
    from kms_pipelines.cli import cli

    def run(*args):
        return CliRunner().invoke(cli, list(args), obj={"kms": kms, "at": None})

    retire_service_v1(kms)
    before = full_snapshot(kms)
    res = run(
        "keys", "revoke", SVC, "--version", "1", "--ticket", "T-9", "--requested-by", "sec-c", "--totp", _code(kms)
    )
    assert res.exit_code == 1 and "revoke refused by guard 'dependents'" in res.output, res.output
    assert full_snapshot(kms) == before
    res = run(
        "dependents",
        "confirm",
        SVC,
        "--version",
        "2",
        "--service",
        "api-gateway",
        "--as",
        "sec-c",
        "--totp",
        _code(kms),
    )
    assert res.exit_code == 0, res.output
    before = full_snapshot(kms)
    res = run("keys", "destroy", SVC, "--version", "1", "--requested-by", "sec-c", "--totp", _code(kms))
    assert res.exit_code == 1 and "destroy refused by guard 'retention'" in res.output, res.output
    assert full_snapshot(kms) == before
    approve(kms, {"sec-b": approvers["sec-b"]}, f"{SVC}#v1", "T-9", operation="revoke")
    res = run(
        "keys", "revoke", SVC, "--version", "1", "--ticket", "T-9", "--requested-by", "sec-c", "--totp", _code(kms)
    )
    assert res.exit_code == 1 and "needs 2 approvals" in res.output, res.output
    assert full_snapshot(kms)[0] == before[0]
    res = run("retention", "due")
    assert res.exit_code == 0 and "nothing due" in res.output


def test_t1_reports_a_destroyed_version_with_no_destruction_time(kms):
    """A destroyed row whose destroyed_at was cleared outside the KMS is a T1 finding. The
    evaluator used to crash on it in utc(None) (found by mypy, issue 17)."""
    rotation.rotate_key(kms, SVC, reason="manual")
    with kms.transaction() as s:
        v1 = lifecycle.get_version(lifecycle.get_key(s, SVC), 1)
        v1.state, v1.destroyed_at = "destroyed", None
    finding = compliance.eval_t1(kms)
    assert finding.status == compliance.FAIL
    assert f"{SVC} v1 destroyed -, before its retention ended" in finding.evidence


def test_a_retired_version_whose_retirement_time_was_blanked_is_never_destroyed(kms, approvers):
    from sqlalchemy import text

    _, _, rotated_at = retire_service_v1(kms)
    dependents.confirm(kms, SVC, 2, "api-gateway")
    kms.clock.set(rotated_at + timedelta(days=400))  # long past the retention it had
    approve(kms, approvers, f"{SVC}#v1", "CHG-NORET")
    with kms.engine.begin() as conn:  # an insider blanks the time the window is counted from
        conn.execute(
            text(
                "UPDATE key_versions SET rotated_at = NULL "
                "WHERE version = 1 AND key_id = (SELECT id FROM keys WHERE name = :k)"
            ),
            {"k": SVC},
        )
    assert [(d.key, d.version) for d in retention.due_for_destruction(kms)] == []
    before = full_snapshot(kms)
    with pytest.raises(lifecycle.GuardRefused) as err:
        retention.destroy_version(kms, SVC, 1, ticket="CHG-NORET", requester="workload:dagster")
    assert err.value.guard == "retention"
    assert f"{SVC} v1 was never retired; it must be kept 365 days after retirement (T1)" in str(err.value)
    assert full_snapshot(kms) == before
