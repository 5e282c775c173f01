"""Principals, permissions, dual-control approvals with TOTP (A1, A2, A4). Every refusal
asserts that nothing changed: key versions, ledger, keystore, approvals, TOTP state."""

from dataclasses import replace
from datetime import timedelta

import pytest
from sqlalchemy import select

from kms_pipelines.core.access import enrolment
from kms_pipelines.core.access import principals as access
from kms_pipelines.core.foundation.db.models import STATES, KeyVersion
from kms_pipelines.core.foundation.db.models_access import Approval, AuditEvent, Principal
from kms_pipelines.core.keys import lifecycle, manual
from kms_pipelines.core.ledger import audit, ledger
from tests.fixtures.kms import approve_both, ceremony

TICKET = "CHG-1001"


def snapshot(kms, requester=None):
    """Everything a refused operation must leave untouched (but the requester's TOTP step:
    a verified code is spent even when the operation is then refused)."""
    with kms.engine.connect() as conn:
        versions = conn.execute(
            select(
                KeyVersion.key_id, KeyVersion.version, KeyVersion.state, KeyVersion.wrap_ref, KeyVersion.sign_ref
            ).order_by(KeyVersion.id)
        ).all()
        head = ledger.head(conn)
        approvals = conn.execute(
            select(Approval.id, Approval.used_at, Approval.used_by_request).order_by(Approval.id)
        ).all()
        totp = conn.execute(
            select(Principal.name, Principal.totp_last_step).where(Principal.name != requester).order_by(Principal.name)
        ).all()
    return versions, head, sorted(kms.keystore.refs()), approvals, totp


def rotate_as(kms, d, key, requester="alice", ticket=TICKET):
    """A manual rotation by ``requester`` with a fresh code (the clock moves one time-step)."""
    _tick(kms)
    return manual.manual_rotate(kms, key, ticket=ticket, requested_by=requester, totp=code(kms, d[requester]))


def code(kms, device, steps=0):
    return device.at(kms.now() + timedelta(seconds=30 * steps))


def denied_events(kms, **match):
    audit.flush(kms)
    with kms.engine.connect() as conn:
        rows = conn.execute(select(AuditEvent).where(AuditEvent.outcome == "denied").order_by(AuditEvent.seq)).all()
    return [r for (r,) in [(row,) for row in rows] if all(getattr(r, k) == v for k, v in match.items())]


@pytest.fixture
def team(kms):
    """alice (sre_oncall) requests; bob (security_engineering) and carol (compliance_officer) approve."""
    devices = ceremony(
        kms, {"alice": "sre_oncall", "bob": "security_engineering", "carol": "compliance_officer", "sam": "sre_oncall"}
    )
    return kms, devices


def _tick(kms, seconds=30):
    kms.clock.advance(timedelta(seconds=seconds))


# ---- principals and permissions (A1) ------------------------------------------------


def test_totp_secret_is_stored_sealed_never_in_clear(team):
    kms, d = team
    with kms.engine.connect() as conn:
        sealed = conn.execute(select(Principal.totp_sealed).where(Principal.name == "bob")).scalar_one()
    assert sealed and d["bob"].secret.encode() not in sealed
    assert "otpauth" not in repr(
        enrolment.Enrolment("dora", "human", ["sre_oncall"], d["bob"].provisioning_uri(name="x"))
    )


def test_permission_matrix_comes_from_the_policy(team):
    kms, _ = team
    access.require_permission(kms, "carol", "export")
    access.require_permission(kms, "sam", "rotate")
    access.require_permission(kms, "workload:api-gateway", "decrypt")
    for who, op in (("carol", "rotate"), ("sam", "destroy"), ("workload:api-gateway", "rotate"), ("mallory", "read")):
        before = snapshot(kms)
        with pytest.raises(access.AccessDenied, match=f"lacks permission '{op}'"):
            access.require_permission(kms, who, op, target="root")
        assert snapshot(kms) == before
        assert denied_events(kms, actor=who, operation=op), f"refusal of {who}/{op} not audited"


def test_the_ceremony_refuses_unknown_roles_too_few_principals_and_a_second_run(kms):
    for admins, match in (
        ({"a": ["janitor"], "b": ["sre_oncall"], "c": ["sre_oncall"]}, "roles from"),
        ({"a": [], "b": ["sre_oncall"], "c": ["sre_oncall"]}, "roles from"),
        ({"a": ["sre_oncall"], "b": ["sre_oncall"]}, "at least 3"),
        ({"a\x1b[31m": ["sre_oncall"], "b": ["sre_oncall"], "c": ["sre_oncall"]}, "invalid"),
        (
            {"a": ["security_engineering"], "b": ["security_engineering"], "c": ["sre_oncall"]},
            "at least 3 principals holding 'principals'",
        ),
    ):
        before = snapshot(kms)
        with pytest.raises(ValueError, match=match):
            enrolment.init_principals(kms, admins)
        assert snapshot(kms) == before
    ceremony(kms, {"a": "security_engineering", "b": "security_engineering", "c": "sre_oncall"})
    before = snapshot(kms)
    with pytest.raises(access.AccessDenied, match="already ran"):
        enrolment.init_principals(kms, {"x": ["sre_oncall"], "y": ["sre_oncall"], "z": ["sre_oncall"]})
    assert snapshot(kms) == before


# ---- dual control (A4) --------------------------------------------------------------


def test_manual_rotation_runs_with_two_approvals_and_records_them(team):
    kms, d = team
    before = snapshot(kms, "alice")
    with pytest.raises(access.AccessDenied, match="needs 2 approvals"):
        rotate_as(kms, d, "service:api-gateway")
    assert snapshot(kms, "alice") == before
    # approvers find the open request by ticket + operation (no --target needed)
    info = approve_both(kms, "bob", ticket=TICKET, operation="rotate", totp=code(kms, d["bob"]))
    assert (info.target, info.have, info.required) == ("service:api-gateway", 1, 2)
    approve_both(kms, "carol", ticket=TICKET, operation="rotate", totp=code(kms, d["carol"]))
    o = rotate_as(kms, d, "service:api-gateway")
    assert o.result.rotated and (o.result.old_version, o.result.new_version) == (1, 2)
    assert o.approvers == ["bob", "carol"] and o.notification_failures == []
    with kms.transaction() as s:
        # the two state changes (the nightly-equivalent follow-up may add the vault's "archived" record)
        entries = [e for e in ledger.entries_for(s, "service:api-gateway") if e.to_state in STATES][-2:]
        assert {(e.actor, e.approvers, e.change_ticket) for e in entries} == {("alice", '["bob","carol"]', TICKET)}
        assert all(a.used_at is not None for a in s.scalars(select(Approval)))
    assert ledger.verify(kms.engine).ok and audit.verify(kms).ok
    outbox = kms.notifier.read()
    assert any(TICKET in (m.get("subject") or "") for m in outbox)


def _approve_both(kms, d, target="root", ticket=TICKET, who=("bob", "carol")):
    for name in who:
        approve_both(kms, name, ticket=ticket, operation="rotate", target=target, totp=code(kms, d[name]))


def _refused_rotation(kms, d, match, key="root", ticket=TICKET, requester="alice"):
    before = snapshot(kms, requester)
    with pytest.raises(access.AccessDenied, match=match):
        rotate_as(kms, d, key, requester, ticket)
    assert snapshot(kms, requester) == before
    assert denied_events(kms, operation="rotate", actor=requester, target=key)


def test_missing_approval_is_refused(team):
    kms, d = team
    _approve_both(kms, d, who=("bob",))
    _refused_rotation(kms, d, r"has 1 \(bob\).*missing 1")


def test_one_approver_twice_counts_once(team):
    kms, d = team
    _approve_both(kms, d, who=("bob",))
    _tick(kms)
    before = snapshot(kms)
    with pytest.raises(access.AccessDenied, match="already approved"):
        approve_both(kms, "bob", ticket=TICKET, operation="rotate", target="root", totp=code(kms, d["bob"]))
    assert snapshot(kms) == before
    _refused_rotation(kms, d, "has 1")


def test_self_approval_is_refused(team):
    kms, d = team
    with pytest.raises(access.AccessDenied):
        rotate_as(kms, d, "root")  # opens the request
    before = snapshot(kms)
    with pytest.raises(access.AccessDenied, match="self-approval"):
        approve_both(kms, "alice", ticket=TICKET, operation="rotate", totp=code(kms, d["alice"]))
    assert snapshot(kms) == before
    assert denied_events(kms, operation="approve", actor="alice")


def test_an_approval_by_the_requester_is_never_counted(team):
    kms, d = team
    # alice approved before anyone asked; then she requests it herself
    _approve_both(kms, d, who=("alice", "bob"))
    _refused_rotation(kms, d, r"alice \(the requester\)")


def test_wrong_role_requester_and_approver_are_refused(team):
    kms, d = team
    _approve_both(kms, d)
    _refused_rotation(kms, d, "'carol' lacks permission 'rotate'", requester="carol")
    # a policy in which compliance officers may not approve: carol's approval stops counting
    acc = kms.policy.access
    strict = replace(
        kms,
        policy=kms.policy.model_copy(
            update={
                "access": acc.model_copy(
                    update={"permissions": {**acc.permissions, "approve": ["sre_oncall", "security_engineering"]}}
                )
            }
        ),
    )
    _refused_rotation(strict, d, r"carol \(lacks permission 'approve'\)")
    _tick(strict)
    before = snapshot(strict)
    with pytest.raises(access.AccessDenied, match="lacks permission 'approve'"):
        approve_both(strict, "carol", ticket="CHG-2", operation="rotate", target="root", totp=code(strict, d["carol"]))
    assert snapshot(strict) == before


def test_stale_and_wrong_totp_codes_are_refused(team):
    kms, d = team
    for bad in (code(kms, d["bob"], steps=-3), code(kms, d["bob"], steps=+3), "000000", "12ab56"):
        if bad == code(kms, d["bob"]):
            continue
        before = snapshot(kms)
        with pytest.raises(access.AccessDenied, match="TOTP"):
            approve_both(kms, "bob", ticket=TICKET, operation="rotate", target="root", totp=bad)
        assert snapshot(kms) == before
    # within the policy window (±1 step) a code from the previous step still works
    approve_both(kms, "bob", ticket=TICKET, operation="rotate", target="root", totp=code(kms, d["bob"], steps=-1))


def test_a_replayed_totp_code_is_refused(team):
    kms, d = team
    c = code(kms, d["bob"])
    approve_both(kms, "bob", ticket=TICKET, operation="rotate", target="root", totp=c)
    before = snapshot(kms)
    with pytest.raises(access.AccessDenied, match="already used"):
        approve_both(kms, "bob", ticket="CHG-OTHER", operation="rotate", target="root", totp=c)
    assert snapshot(kms) == before
    _tick(kms)
    approve_both(kms, "bob", ticket="CHG-OTHER", operation="rotate", target="root", totp=code(kms, d["bob"]))


def test_a_replayed_approval_is_refused(team):
    kms, d = team
    _approve_both(kms, d)
    rotate_as(kms, d, "root")
    _refused_rotation(kms, d, "already used")


def test_approvals_expire_and_bind_to_operation_target_and_ticket(team):
    kms, d = team
    _approve_both(kms, d, target="root", ticket=TICKET)
    _refused_rotation(kms, d, "has 0", key="data:postgres")  # other target
    _refused_rotation(kms, d, "has 0", ticket="CHG-9999")  # other ticket
    with kms.transaction() as s:
        with pytest.raises(access.AccessDenied):  # other operation
            access.consume_approvals(s, kms, operation="destroy", target="root", ticket=TICKET, requester="alice")
    kms.clock.advance(timedelta(minutes=kms.policy.access.approval_ttl_minutes))
    _refused_rotation(kms, d, r"bob \(expired\)")


def test_consume_approvals_marks_used_only_with_the_callers_transaction(team):
    kms, d = team
    for name in ("bob", "carol"):
        approve_both(kms, name, ticket=TICKET, operation="destroy", target="data:postgres#v1", totp=code(kms, d[name]))
    with pytest.raises(RuntimeError):
        with kms.transaction() as s:
            assert access.consume_approvals(
                s, kms, operation="destroy", target="data:postgres#v1", ticket=TICKET, requester="kms-nightly"
            ) == ["bob", "carol"]
            raise RuntimeError("the destroy failed")
    with kms.transaction() as s:  # rolled back: still usable, once
        assert access.consume_approvals(
            s, kms, operation="destroy", target="data:postgres#v1", ticket=TICKET, requester="kms-nightly"
        ) == ["bob", "carol"]
    with kms.transaction() as s, pytest.raises(access.AccessDenied, match="single-use"):
        access.consume_approvals(
            s, kms, operation="destroy", target="data:postgres#v1", ticket=TICKET, requester="kms-nightly"
        )


def test_a_failed_rotation_consumes_no_approval(team):
    kms, d = team
    _approve_both(kms, d)
    before = snapshot(kms, "alice")
    orig = lifecycle._transition

    def boom(*a, **k):
        raise RuntimeError("database went away")

    lifecycle._transition = boom
    try:
        with pytest.raises(RuntimeError):
            rotate_as(kms, d, "root")
    finally:
        lifecycle._transition = orig
    assert snapshot(kms, "alice") == before
    assert rotate_as(kms, d, "root").result.rotated
