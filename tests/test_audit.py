"""The audit log (A3): every keystore operation, append-only, hash-chained, verifiable;
anomaly detection, review, and the `kms audit` / `kms approve` commands."""

from dataclasses import replace
from datetime import timedelta

import pytest
from sqlalchemy import select, text
from sqlalchemy.exc import DBAPIError

from kms_pipelines.core.access import anomalies
from kms_pipelines.core.access import principals as access
from kms_pipelines.core.foundation.db.append_only import create_append_only_triggers, drop_append_only_triggers
from kms_pipelines.core.foundation.db.models_access import AuditEvent
from kms_pipelines.core.foundation.keystore import DecryptionFailed
from kms_pipelines.core.keys import lifecycle
from kms_pipelines.core.ledger import audit
from tests.fixtures.kms import ceremony, totp_now


def _events(kms):
    audit.flush(kms)
    with kms.engine.connect() as conn:
        return conn.execute(
            select(
                AuditEvent.actor, AuditEvent.operation, AuditEvent.target, AuditEvent.outcome, AuditEvent.detail
            ).order_by(AuditEvent.seq)
        ).all()


def test_every_keystore_operation_is_audited_with_the_actor(kms):
    n0 = len(_events(kms))
    ks = kms.as_actor("svc-owner").keystore
    ks.generate("t.aes", "aes256")
    ks.generate("t.sig", "ed25519")
    blob = ks.encrypt("t.aes", b"hello")
    ks.decrypt("t.aes", blob)
    w = ks.new_wrapped_dek("t.aes")
    ct = ks.dek_encrypt("t.aes", w, b"x")
    ks.dek_decrypt("t.aes", w, ct)
    ks.rewrap("t.aes", "t.aes", [w])
    ks.sign("t.sig", b"m")
    with pytest.raises(DecryptionFailed):
        ks.decrypt("t.aes", b"\0" * 40)
    ks.destroy("t.sig")
    ev = _events(kms)[n0:]
    assert [(e.operation, e.outcome) for e in ev] == [
        ("generate", "ok"),
        ("generate", "ok"),
        ("encrypt", "ok"),
        ("decrypt", "ok"),
        ("wrap", "ok"),
        ("encrypt", "ok"),
        ("decrypt", "ok"),
        ("rewrap", "ok"),
        ("sign", "ok"),
        ("decrypt", "error"),
        ("destroy", "ok"),
    ]
    assert {e.actor for e in ev} == {"svc-owner"}
    assert audit.verify(kms).ok


def test_bootstrap_and_rotation_are_audited(kms):
    ops = {(e.operation, e.actor) for e in _events(kms)}
    assert ("generate", "system") in ops  # make_kms bootstrapped through the audited keystore
    lifecycle.rotate(kms.as_actor("rotator"), "root")
    assert ("generate", "rotator") in {(e.operation, e.actor) for e in _events(kms)}


def test_audit_events_are_append_only_and_tampering_is_named(kms):
    lifecycle.rotate(kms, "root")
    audit.flush(kms)
    with pytest.raises(DBAPIError, match="append-only"):
        with kms.engine.begin() as conn:
            conn.execute(text("UPDATE audit_events SET actor = 'nobody' WHERE seq = 2"))
    with pytest.raises(DBAPIError, match="append-only"):
        with kms.engine.begin() as conn:
            conn.execute(text("DELETE FROM audit_events WHERE seq = 2"))
    assert audit.verify(kms).ok
    # a database admin bypasses the triggers: verify names the first bad seq
    with kms.engine.begin() as conn:
        drop_append_only_triggers(conn, "audit_events")
        conn.execute(text("UPDATE audit_events SET target = 'elsewhere' WHERE seq = 3"))
        create_append_only_triggers(conn, "audit_events")
    r = audit.verify(kms)
    assert not r.ok and r.first_bad_seq == 3 and "altered" in r.problem
    with kms.engine.begin() as conn:
        drop_append_only_triggers(conn, "audit_events")
        conn.execute(text("DELETE FROM audit_events WHERE seq = 2"))
    r = audit.verify(kms)
    assert not r.ok and r.first_bad_seq == 2 and "missing" in r.problem


def test_audit_detail_refuses_bytes(kms):
    with kms.transaction() as s, pytest.raises(TypeError):
        audit.record(s, at=kms.now(), operation="x", actor="a", target=None, outcome="ok", detail={"key": b"\x01" * 32})


def _strict_audit(kms, **update):
    return replace(kms, policy=kms.policy.model_copy(update={"audit": kms.policy.audit.model_copy(update=update)}))


def _kinds(report):
    return sorted({a.kind for a in report.new})


def test_anomalies_are_detected_persisted_once_and_reviewed(kms):
    strict = _strict_audit(kms, decrypt_burst_per_hour=20, failure_burst_per_hour=5, rate_spike_min_events=30)
    d = ceremony(strict, {"carol": "compliance_officer", "sam": "security_engineering", "sre": "sre_oncall"})
    ks = strict.as_actor("workload:api-gateway").keystore
    ref = _wrap_ref(strict, "data:postgres")
    blob = strict.keystore.encrypt(ref, b"x")
    for _ in range(35):  # decrypt burst (and a rate spike: no baseline)
        ks.decrypt(ref, blob)
    for _ in range(6):  # failure burst + operations without the role
        with pytest.raises(access.AccessDenied):
            access.require_permission(strict, "carol", "rotate", target="root")
    lifecycle.rotate(strict, "data:postgres")  # a manual rotation without approvals
    report = anomalies.refresh_anomalies(strict)
    assert _kinds(report) == [
        "decrypt_burst",
        "failure_burst",
        "manual_without_approvals",
        "operation_without_role",
        "rate_spike",
    ]
    by_kind = {a.kind: a for a in report.new}
    assert by_kind["decrypt_burst"].principal == "workload:api-gateway"
    assert by_kind["operation_without_role"].principal == "carol"
    assert "data:postgres" in by_kind["manual_without_approvals"].detail
    assert {a.kind for a in report.unreviewed} == {
        "decrypt_burst",
        "failure_burst",
        "manual_without_approvals",
        "operation_without_role",
    }
    assert anomalies.refresh_anomalies(strict).new == []  # idempotent
    before = len(anomalies.unreviewed(strict))
    with pytest.raises(access.AccessDenied, match="unknown principal 'mallory'"):
        anomalies.review(strict, by_kind["decrypt_burst"].id, "mallory", totp="123456")
    with pytest.raises(access.AccessDenied, match="lacks permission 'review'"):
        anomalies.review(strict, by_kind["decrypt_burst"].id, "sre", totp=totp_now(strict, d["sre"]))
    with pytest.raises(audit.AuditError, match="may not review it"):  # carol raised it
        anomalies.review(strict, by_kind["operation_without_role"].id, "carol", totp=totp_now(strict, d["carol"]))
    assert len(anomalies.unreviewed(strict)) == before
    for a in report.unreviewed:
        strict.clock.advance(timedelta(seconds=30))
        anomalies.review(strict, a.id, "sam", "looked at it", totp=totp_now(strict, d["sam"]))
    strict.clock.advance(timedelta(seconds=30))
    with pytest.raises(audit.AuditError, match="already reviewed"):
        anomalies.review(strict, by_kind["decrypt_burst"].id, "sam", totp=totp_now(strict, d["sam"]))
    assert anomalies.unreviewed(strict) == []
    assert audit.verify(strict).ok


def test_a_quiet_day_has_no_anomalies_and_the_window_moves(kms):
    assert anomalies.refresh_anomalies(kms).new == []
    lifecycle.rotate(kms, "root")
    assert _kinds(anomalies.refresh_anomalies(kms)) == ["manual_without_approvals"]
    kms.clock.advance(timedelta(days=2))
    assert anomalies.refresh_anomalies(kms).recent == []


def _wrap_ref(kms, key):
    with kms.transaction() as s:
        return lifecycle.active_version(lifecycle.get_key(s, key)).wrap_ref
