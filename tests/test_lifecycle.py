import threading
from datetime import timedelta

import pytest
from sqlalchemy import func, select, text
from sqlalchemy.exc import IntegrityError

from kms_pipelines.core.foundation.db.models import Key, KeyVersion
from kms_pipelines.core.keys import lifecycle
from kms_pipelines.core.ledger import ledger


def snapshot(kms):
    """Everything a refused operation must leave untouched: versions, ledger, keystore."""
    with kms.engine.connect() as conn:
        versions = conn.execute(
            select(
                KeyVersion.key_id, KeyVersion.version, KeyVersion.state, KeyVersion.wrap_ref, KeyVersion.sign_ref
            ).order_by(KeyVersion.id)
        ).all()
        head = ledger.head(conn)
    return versions, head, sorted(kms.keystore.refs())


def test_init_is_idempotent(kms):
    before = snapshot(kms)
    results = lifecycle.bootstrap(kms)
    assert not any(r.rotated for r in results)
    assert snapshot(kms) == before


def test_rotate_keeps_exactly_one_active_version(kms):
    r = lifecycle.rotate(kms, "service:api-gateway", reason="manual")
    assert (r.old_version, r.new_version) == (1, 2)
    with kms.transaction() as s:
        key = lifecycle.get_key(s, "service:api-gateway")
        assert [(v.version, v.state) for v in key.versions] == [(1, "rotated"), (2, "active")]
    entries = [(e.key_version, e.from_state, e.to_state) for e in _entries(kms, "service:api-gateway")]
    assert entries[-2:] == [(1, "active", "rotated"), (2, "pending", "active")]


def _entries(kms, name):
    with kms.transaction() as s:
        return ledger.entries_for(s, name)


def test_rotate_if_due_follows_the_cadence(kms):
    assert not lifecycle.rotate(kms, "root", only_if_due=True).rotated
    kms.clock.advance(timedelta(days=89, hours=23))
    assert not lifecycle.rotate(kms, "root", only_if_due=True).rotated
    kms.clock.advance(timedelta(hours=1))
    assert lifecycle.rotate(kms, "root", only_if_due=True).rotated
    assert not lifecycle.rotate(kms, "root", only_if_due=True).rotated


@pytest.mark.parametrize(
    "op",
    [
        lambda k: lifecycle.rotate(k, "nope"),
        lambda k: lifecycle.rotate(k, "service:unknown-svc"),
        lambda k: lifecycle.revoke(k, "root", 1, reason="x"),  # active: rotate first
        lambda k: lifecycle.revoke(k, "root", 7, reason="x"),  # no such version
        lambda k: lifecycle.destroy(k, "root", 1, reason="x"),  # active -> destroyed illegal
    ],
)
def test_refusals_change_nothing(kms, op):
    before = snapshot(kms)
    with pytest.raises(lifecycle.LifecycleError) as err:
        op(kms)
    assert str(err.value)
    assert snapshot(kms) == before


def test_destroyed_cannot_come_back(kms):
    lifecycle.rotate(kms, "data:postgres")
    lifecycle.destroy(kms, "data:postgres", 1, reason="test", skip_guards=lifecycle.destroy_guards())
    before = snapshot(kms)
    with kms.transaction() as s:
        key = lifecycle.get_key(s, "data:postgres")
        v1 = lifecycle.get_version(key, 1)
        with pytest.raises(lifecycle.IllegalTransition, match="destroyed → active"):
            lifecycle._transition(s, kms, key, v1, "active", actor="t", reason="x")
    assert snapshot(kms) == before
    with pytest.raises(lifecycle.IllegalTransition):
        lifecycle.revoke(kms, "data:postgres", 1, reason="x")
    assert snapshot(kms) == before


def test_destroy_erases_material_and_records_it(kms):
    with kms.transaction() as s:
        ref = lifecycle.get_version(lifecycle.get_key(s, "data:postgres"), 1).wrap_ref
    lifecycle.rotate(kms, "data:postgres")
    lifecycle.destroy(kms, "data:postgres", 1, reason="test", skip_guards=lifecycle.destroy_guards())
    assert not kms.keystore.exists(ref)
    assert _entries(kms, "data:postgres")[-1].to_state == "destroyed"
    assert ledger.verify(kms.engine).ok


def test_a_failed_transaction_leaves_no_material_behind(kms):
    refs_before = sorted(kms.keystore.refs())
    before = snapshot(kms)

    def boom(*_):
        raise RuntimeError("dependent step failed")

    with pytest.raises(RuntimeError):
        lifecycle.rotate(kms, "root", after_rotate=boom)
    assert snapshot(kms) == before
    assert sorted(kms.keystore.refs()) == refs_before


def test_database_refuses_a_second_active_version(kms):
    with pytest.raises(IntegrityError):
        with kms.engine.begin() as conn:
            key_id = conn.execute(select(Key.id).where(Key.name == "root")).scalar_one()
            conn.execute(
                text(
                    "INSERT INTO key_versions (key_id, version, state, created_at) "
                    "VALUES (:k, 99, 'active', CURRENT_TIMESTAMP)"
                ),
                {"k": key_id},
            )


def test_racing_rotations_on_postgres_rotate_once_and_keep_one_active(make_kms):
    kms = make_kms("postgres")
    kms.clock.advance(timedelta(days=61))
    barrier = threading.Barrier(4)
    results, errors = [], []

    def worker():
        barrier.wait()
        try:
            results.append(lifecycle.rotate(kms, "service:worker-pipelines", only_if_due=True))
        except Exception as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert sum(r.rotated for r in results) == 1
    # Unconditional manual rotations racing: each succeeds in turn, never two active.
    barrier2 = threading.Barrier(3)

    def manual():
        barrier2.wait()
        lifecycle.rotate(kms, "service:worker-pipelines", reason="manual")

    threads = [threading.Thread(target=manual) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    with kms.engine.connect() as conn:
        states = conn.execute(
            select(KeyVersion.state, func.count())
            .join(Key)
            .where(Key.name == "service:worker-pipelines")
            .group_by(KeyVersion.state)
        ).all()
    assert dict(states) == {"active": 1, "rotated": 4}
    assert ledger.verify(kms.engine).ok


def test_inventory_reports_age_and_due(kms):
    kms.clock.advance(timedelta(days=61))
    rows = {(r.key, r.version): r for r in lifecycle.inventory(kms)}
    assert rows[("service:api-gateway", 1)].overdue
    assert not rows[("root", 1)].overdue
    assert rows[("root", 1)].age_days == pytest.approx(61, abs=0.01)
