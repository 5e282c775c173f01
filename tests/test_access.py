"""Principals, permissions, dual-control approvals with TOTP (A1, A2, A4). Every refusal
asserts that nothing changed: key versions, ledger, keystore, approvals, TOTP state."""

from dataclasses import replace
from datetime import timedelta

import pyotp
import pytest
from sqlalchemy import select

from kms_pipelines.core import access, audit, ledger, lifecycle
from kms_pipelines.core.db.models import STATES, KeyVersion
from kms_pipelines.core.db.models_access import Approval, AuditEvent, Principal

TICKET = "CHG-1001"


def snapshot(kms):
    """Everything a refused operation must leave untouched."""
    with kms.engine.connect() as conn:
        versions = conn.execute(select(KeyVersion.key_id, KeyVersion.version, KeyVersion.state,
                                       KeyVersion.wrap_ref, KeyVersion.sign_ref).order_by(KeyVersion.id)).all()
        head = ledger.head(conn)
        approvals = conn.execute(select(Approval.id, Approval.used_at, Approval.used_by_request)
                                 .order_by(Approval.id)).all()
        totp = conn.execute(select(Principal.name, Principal.totp_last_step).order_by(Principal.name)).all()
    return versions, head, sorted(kms.keystore.refs()), approvals, totp


def enrol(kms, name, *roles):
    e = access.enroll_principal(kms, name, roles or ["security_engineering"])
    return pyotp.parse_uri(e.provisioning_uri)


def code(kms, device, steps=0):
    return device.at(kms.now() + timedelta(seconds=30 * steps))


def denied_events(kms, **match):
    audit.flush(kms)
    with kms.engine.connect() as conn:
        rows = conn.execute(select(AuditEvent).where(AuditEvent.outcome == "denied")
                            .order_by(AuditEvent.seq)).all()
    return [r for (r,) in [(row,) for row in rows]
            if all(getattr(r, k) == v for k, v in match.items())]


@pytest.fixture
def team(kms):
    """alice (sre_oncall) requests; bob (security_engineering) and carol (compliance_officer) approve."""
    devices = {"alice": enrol(kms, "alice", "sre_oncall"), "bob": enrol(kms, "bob", "security_engineering"),
               "carol": enrol(kms, "carol", "compliance_officer")}
    return kms, devices


def _tick(kms, seconds=30):
    kms.clock.advance(timedelta(seconds=seconds))


# ---- principals and permissions (A1) ------------------------------------------------

def test_totp_secret_is_stored_sealed_never_in_clear(kms):
    device = enrol(kms, "bob")
    with kms.engine.connect() as conn:
        sealed = conn.execute(select(Principal.totp_sealed).where(Principal.name == "bob")).scalar_one()
    assert sealed and device.secret.encode() not in sealed
    assert repr(access.enroll_principal(kms, "dora", ["sre_oncall"])).count("otpauth") == 0


def test_permission_matrix_comes_from_the_policy(kms):
    enrol(kms, "carol", "compliance_officer")
    enrol(kms, "sam", "sre_oncall")
    access.require_permission(kms, "carol", "export")
    access.require_permission(kms, "sam", "rotate")
    access.require_permission(kms, "workload:api-gateway", "decrypt")
    for who, op in (("carol", "rotate"), ("sam", "destroy"), ("workload:api-gateway", "rotate"), ("mallory", "read")):
        before = snapshot(kms)
        with pytest.raises(access.AccessDenied, match=f"lacks permission '{op}'"):
            access.require_permission(kms, who, op, target="root")
        assert snapshot(kms) == before
        assert denied_events(kms, actor=who, operation=op), f"refusal of {who}/{op} not audited"


def test_enrolment_refuses_unknown_roles_and_duplicates(kms):
    enrol(kms, "bob")
    before = snapshot(kms)
    for args in (("bob", ["sre_oncall"]), ("eve", ["janitor"]), ("eve", []), ("workload:eve", ["sre_oncall"])):
        with pytest.raises(access.AccessDenied):
            access.enroll_principal(kms, *args)
    assert snapshot(kms) == before


# ---- dual control (A4) --------------------------------------------------------------

def test_manual_rotation_runs_with_two_approvals_and_records_them(team):
    kms, d = team
    before = snapshot(kms)
    with pytest.raises(access.AccessDenied, match="needs 2 approvals"):
        access.manual_rotate(kms, "service:api-gateway", ticket=TICKET, requested_by="alice")
    assert snapshot(kms) == before
    # approvers find the open request by ticket + operation (no --target needed)
    info = access.approve(kms, "bob", ticket=TICKET, operation="rotate", totp=code(kms, d["bob"]))
    assert (info.target, info.have, info.required) == ("service:api-gateway", 1, 2)
    access.approve(kms, "carol", ticket=TICKET, operation="rotate", totp=code(kms, d["carol"]))
    o = access.manual_rotate(kms, "service:api-gateway", ticket=TICKET, requested_by="alice")
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
        access.approve(kms, name, ticket=ticket, operation="rotate", target=target, totp=code(kms, d[name]))


def _refused_rotation(kms, match, key="root", ticket=TICKET, requester="alice"):
    before = snapshot(kms)
    with pytest.raises(access.AccessDenied, match=match):
        access.manual_rotate(kms, key, ticket=ticket, requested_by=requester)
    assert snapshot(kms) == before
    assert denied_events(kms, operation="rotate", actor=requester, target=key)


def test_missing_approval_is_refused(team):
    kms, d = team
    _approve_both(kms, d, who=("bob",))
    _refused_rotation(kms, r"has 1 \(bob\).*missing 1")


def test_one_approver_twice_counts_once(team):
    kms, d = team
    _approve_both(kms, d, who=("bob",))
    _tick(kms)
    before = snapshot(kms)
    with pytest.raises(access.AccessDenied, match="already approved"):
        access.approve(kms, "bob", ticket=TICKET, operation="rotate", target="root", totp=code(kms, d["bob"]))
    assert snapshot(kms) == before
    _refused_rotation(kms, "has 1")


def test_self_approval_is_refused(team):
    kms, d = team
    with pytest.raises(access.AccessDenied):
        access.manual_rotate(kms, "root", ticket=TICKET, requested_by="alice")  # opens the request
    before = snapshot(kms)
    with pytest.raises(access.AccessDenied, match="self-approval"):
        access.approve(kms, "alice", ticket=TICKET, operation="rotate", totp=code(kms, d["alice"]))
    assert snapshot(kms) == before
    assert denied_events(kms, operation="approve", actor="alice")


def test_an_approval_by_the_requester_is_never_counted(team):
    kms, d = team
    # alice approved before anyone asked; then she requests it herself
    _approve_both(kms, d, who=("alice", "bob"))
    _refused_rotation(kms, r"alice \(the requester\)")


def test_wrong_role_requester_and_approver_are_refused(team):
    kms, d = team
    _approve_both(kms, d)
    _refused_rotation(kms, "'carol' lacks permission 'rotate'", requester="carol")
    # a policy in which compliance officers may not approve: carol's approval stops counting
    acc = kms.policy.access
    strict = replace(kms, policy=kms.policy.model_copy(update={"access": acc.model_copy(update={
        "permissions": {**acc.permissions, "approve": ["sre_oncall", "security_engineering"]}})}))
    _refused_rotation(strict, r"carol \(lacks permission 'approve'\)")
    _tick(strict)
    before = snapshot(strict)
    with pytest.raises(access.AccessDenied, match="lacks permission 'approve'"):
        access.approve(strict, "carol", ticket="CHG-2", operation="rotate", target="root",
                       totp=code(strict, d["carol"]))
    assert snapshot(strict) == before


def test_stale_and_wrong_totp_codes_are_refused(team):
    kms, d = team
    for bad in (code(kms, d["bob"], steps=-3), code(kms, d["bob"], steps=+3), "000000", "12ab56"):
        if bad == code(kms, d["bob"]):
            continue
        before = snapshot(kms)
        with pytest.raises(access.AccessDenied, match="TOTP"):
            access.approve(kms, "bob", ticket=TICKET, operation="rotate", target="root", totp=bad)
        assert snapshot(kms) == before
    # within the policy window (±1 step) a code from the previous step still works
    access.approve(kms, "bob", ticket=TICKET, operation="rotate", target="root", totp=code(kms, d["bob"], steps=-1))


def test_a_replayed_totp_code_is_refused(team):
    kms, d = team
    c = code(kms, d["bob"])
    access.approve(kms, "bob", ticket=TICKET, operation="rotate", target="root", totp=c)
    before = snapshot(kms)
    with pytest.raises(access.AccessDenied, match="already used"):
        access.approve(kms, "bob", ticket="CHG-OTHER", operation="rotate", target="root", totp=c)
    assert snapshot(kms) == before
    _tick(kms)
    access.approve(kms, "bob", ticket="CHG-OTHER", operation="rotate", target="root", totp=code(kms, d["bob"]))


def test_a_replayed_approval_is_refused(team):
    kms, d = team
    _approve_both(kms, d)
    access.manual_rotate(kms, "root", ticket=TICKET, requested_by="alice")
    _refused_rotation(kms, "already used")


def test_approvals_expire_and_bind_to_operation_target_and_ticket(team):
    kms, d = team
    _approve_both(kms, d, target="root", ticket=TICKET)
    _refused_rotation(kms, "has 0", key="data:postgres")           # other target
    _refused_rotation(kms, "has 0", ticket="CHG-9999")             # other ticket
    with kms.transaction() as s:
        with pytest.raises(access.AccessDenied):                   # other operation
            access.consume_approvals(s, kms, operation="destroy", target="root", ticket=TICKET, requester="alice")
    kms.clock.advance(timedelta(minutes=kms.policy.access.approval_ttl_minutes))
    _refused_rotation(kms, r"bob \(expired\)")


def test_consume_approvals_marks_used_only_with_the_callers_transaction(team):
    kms, d = team
    for name in ("bob", "carol"):
        access.approve(kms, name, ticket=TICKET, operation="destroy", target="data:postgres#v1",
                       totp=code(kms, d[name]))
    with pytest.raises(RuntimeError):
        with kms.transaction() as s:
            assert access.consume_approvals(s, kms, operation="destroy", target="data:postgres#v1",
                                            ticket=TICKET, requester="kms-nightly") == ["bob", "carol"]
            raise RuntimeError("the destroy failed")
    with kms.transaction() as s:  # rolled back: still usable, once
        assert access.consume_approvals(s, kms, operation="destroy", target="data:postgres#v1",
                                        ticket=TICKET, requester="kms-nightly") == ["bob", "carol"]
    with kms.transaction() as s, pytest.raises(access.AccessDenied, match="single-use"):
        access.consume_approvals(s, kms, operation="destroy", target="data:postgres#v1", ticket=TICKET,
                                 requester="kms-nightly")


def test_a_failed_rotation_consumes_no_approval(team):
    kms, d = team
    _approve_both(kms, d)
    before = snapshot(kms)
    orig = lifecycle._transition

    def boom(*a, **k):
        raise RuntimeError("database went away")

    lifecycle._transition = boom
    try:
        with pytest.raises(RuntimeError):
            access.manual_rotate(kms, "root", ticket=TICKET, requested_by="alice")
    finally:
        lifecycle._transition = orig
    assert snapshot(kms) == before
    assert access.manual_rotate(kms, "root", ticket=TICKET, requested_by="alice").result.rotated
