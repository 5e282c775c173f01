"""Temporary export keys (R3): an expiry, then rotation + destruction at once, which
crypto-shreds the export's objects; the ledger says why the ``deks`` guard was skipped."""

from datetime import timedelta

import pytest
from sqlalchemy import select

from kms_pipelines.core.envelope import data_keys as envelope
from kms_pipelines.core.envelope import export_keys
from kms_pipelines.core.foundation.db.models_envelope import Dek
from kms_pipelines.core.keys import lifecycle
from kms_pipelines.core.ledger import ledger
from tests.test_envelope import snapshot


def test_create_sets_the_expiry_from_the_policy_and_is_idempotent(kms):
    info = export_keys.create(kms, "q1-investors")
    assert info.key == "export:q1-investors" and info.created
    ttl = kms.policy.key_class("export").default_ttl_days
    assert info.expires_at == kms.now() + timedelta(days=ttl)
    before = snapshot(kms)
    again = export_keys.create(kms, "q1-investors", ttl_days=1)
    assert not again.created and again.expires_at == info.expires_at
    assert snapshot(kms) == before
    assert export_keys.create(kms, "short", ttl_days=2).expires_at == kms.now() + timedelta(days=2)


@pytest.mark.parametrize(
    "export_id, ttl, message",
    [
        ("", None, "invalid export id"),
        ("../etc", None, "invalid export id"),
        ("a b", None, "invalid export id"),
        ("x" * 101, None, "invalid export id"),
        ("ok", 0, "ttl_days"),
        ("ok", -3, "ttl_days"),
    ],
)
def test_bad_exports_are_refused_without_change(kms, export_id, ttl, message):
    before = snapshot(kms)
    with pytest.raises(envelope.EnvelopeError, match=message):
        export_keys.create(kms, export_id, ttl)
    assert snapshot(kms) == before


def test_expiry_rotates_destroys_and_crypto_shreds(kms):
    info = export_keys.create(kms, "exp-7", ttl_days=3)
    blobs = {f"f{i}": envelope.encrypt(kms, info.key, f"f{i}", f"row {i}".encode()) for i in range(4)}
    data_blob = envelope.encrypt(kms, "data:postgres", "unrelated", b"keep me")
    assert envelope.decrypt(kms, blobs["f1"]) == b"row 1"
    kms.clock.advance(timedelta(days=3) - timedelta(seconds=1))
    assert export_keys.due(kms) == [] and export_keys.expire_due(kms) == []
    kms.clock.advance(timedelta(seconds=1))
    [due] = export_keys.due(kms)
    assert (due.key, due.rotate_needed, due.expired_at) == (info.key, True, info.expires_at)

    [result] = export_keys.expire_due(kms)
    assert (result.rotated_to, result.destroyed, result.shredded_deks, result.refused) == (2, [1], 4, {})
    for blob in blobs.values():
        with pytest.raises(
            envelope.CryptoShredded, match=r"export key export:exp-7 v1 was destroyed at .*: data crypto-shredded"
        ):
            envelope.decrypt(kms, blob)
    assert envelope.decrypt(kms, data_blob) == b"keep me"
    with kms.engine.connect() as conn:
        rows = conn.execute(select(Dek.wrapped, Dek.shredded_at).where(Dek.key_name == info.key)).all()
    assert len(rows) == 4 and all(w is None and at is not None for w, at in rows)
    assert envelope.stranded(kms) == []
    with kms.transaction() as s:
        entries = ledger.entries_for(s, info.key)
    destroyed = [e for e in entries if e.to_state == "destroyed"]
    assert len(destroyed) == 1 and "guard 'deks' skipped on purpose" in destroyed[0].reason
    assert "4 DEK(s)" in destroyed[0].reason
    assert not kms.keystore.exists(next(v for v in _versions(kms, info.key) if v.version == 1).wrap_ref)

    # Idempotent, and a closed export takes no new data.
    before = snapshot(kms)
    assert export_keys.due(kms) == [] and export_keys.expire_due(kms) == []
    with pytest.raises(envelope.EnvelopeError, match="export key export:exp-7 expired at"):
        envelope.encrypt(kms, info.key, "late", b"x")
    assert snapshot(kms) == before


def _versions(kms, name):
    with kms.transaction() as s:
        return list(lifecycle.get_key(s, name).versions)


def test_an_interrupted_expiry_is_finished_by_the_next_run(kms):
    info = export_keys.create(kms, "half", ttl_days=1)
    envelope.encrypt(kms, info.key, "a", b"1")
    kms.clock.advance(timedelta(days=2))
    # Crash after rotate + destroy, before the DEK rows were marked shredded.
    lifecycle.rotate(kms, info.key, reason="export-expiry")
    lifecycle.destroy(kms, info.key, 1, reason="test crash", skip_guards=("deks",))
    [due] = export_keys.due(kms)
    assert (due.rotate_needed, due.versions_to_destroy, due.unshredded_deks) == (False, [], 1)
    [result] = export_keys.expire_due(kms)
    assert (result.rotated_to, result.destroyed, result.shredded_deks) == (None, [], 1)
    assert export_keys.due(kms) == []


def test_the_sweep_never_moves_export_deks(kms):
    info = export_keys.create(kms, "nosweep", ttl_days=10)
    blob = envelope.encrypt(kms, info.key, "a", b"1")
    lifecycle.rotate(kms, info.key)  # e.g. rotated early by an operator
    result = envelope.sweep(kms)
    assert result.moved == 0
    assert envelope.describe(kms, blob).key_version == 1
    assert [(r.key, r.state) for r in envelope.stranded(kms)] == [(info.key, "rotated")]  # flagged until expiry
    kms.clock.advance(timedelta(days=10))
    export_keys.expire_due(kms)
    assert envelope.stranded(kms) == []


def test_the_deks_guard_still_protects_exports_outside_expiry(kms):
    info = export_keys.create(kms, "guarded", ttl_days=10)
    envelope.encrypt(kms, info.key, "a", b"1")
    lifecycle.rotate(kms, info.key)
    before = snapshot(kms)
    with pytest.raises(lifecycle.GuardRefused, match="guard 'deks'"):
        lifecycle.destroy(kms, info.key, 1, reason="manual")
    assert snapshot(kms) == before
