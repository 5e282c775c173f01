"""Faults in the dependencies mid-run (issue 19): PostgreSQL, S3 and SMTP are cut, reset
or stopped through tests/fixtures/faultproxy.py while real operations run; each either
rides the fault out within the policy's retry budget or ends in one line with exit 1,
and afterwards every chain verifies and every DEK decrypts.

Budgets are shrunk through a policy override (``fast_policy``) so the tests stay short.
"""

from __future__ import annotations

import logging
import time

import pytest
from sqlalchemy import select

from kms_pipelines.core import audit, envelope, ledger, lifecycle, retry, rotation, rpt
from kms_pipelines.core.db.models_envelope import Dek
from kms_pipelines.core.policy import FaultBudget, Faults, load_policy

KEY = "data:postgres"
CUT_SECONDS = 5.0


def fast_policy(**budgets):
    """The packaged policy with small retry budgets (waits of 0.1 s doubling to 1 s)."""
    quick = FaultBudget(attempts=30, max_seconds=20, first_wait_seconds=0.1, max_wait_seconds=1.0)
    faults = Faults(**{name: budgets.get(name, quick) for name in ("database", "object_store", "notifications",
                                                                    "hsm")})
    return load_policy().model_copy(update={"faults": faults})


@pytest.fixture
def pg_proxy(pg_url, fault_proxy):
    """(proxied database URL, proxy) for this test's PostgreSQL database."""
    from sqlalchemy.engine import make_url

    u = make_url(pg_url)
    proxy = fault_proxy((u.host or "127.0.0.1", u.port or 5432))
    return u.set(host="127.0.0.1", port=proxy.port).render_as_string(hide_password=False), proxy


@pytest.fixture
def kms_via_proxy(make_kms, pg_proxy):
    """A bootstrapped context whose every database connection goes through the proxy."""
    url, proxy = pg_proxy
    from kms_pipelines.core.clock import SystemClock

    ctx = make_kms(url, clock=SystemClock())  # the per-test database is migrated already (template)
    ctx.policy = fast_policy()
    retry.set_engine_budget(ctx.engine, ctx.policy.faults.database.budget())
    yield ctx, proxy
    proxy.up()
    audit.flush(ctx, timeout=30)  # while the proxy still forwards
    ctx.engine.dispose()


def fill(ctx, n, key=KEY):
    return {f"obj-{i}": (f"payload {i}".encode(), envelope.encrypt(ctx, key, f"obj-{i}", f"payload {i}".encode()))
            for i in range(n)}


def assert_intact(ctx, objects=None):
    """Ledger, audit and RPT chains verify; every live DEK's object decrypts."""
    audit.flush(ctx, timeout=30)
    assert ledger.verify(ctx.engine).ok
    assert audit.verify(ctx).ok, audit.verify(ctx).problem
    chain = rpt.verify_chain(ctx)
    assert chain.ok, chain.problem
    for object_id, (plain, blob) in (objects or {}).items():
        assert envelope.decrypt(ctx, blob, object_id=object_id) == plain


def retry_lines(caplog):
    return [r.getMessage() for r in caplog.records if r.name == "kms_pipelines.core.retry"]


# ---- PostgreSQL ----------------------------------------------------------------------------

def test_sweep_rides_out_a_database_cut(kms_via_proxy, caplog):
    ctx, proxy = kms_via_proxy
    objects = fill(ctx, 120)
    lifecycle.rotate(ctx, KEY, reason="cadence")
    cut_at = {}

    def progress(p):
        if p.batch == 3 and not cut_at:
            cut_at["t"] = time.monotonic()
            proxy.cut(CUT_SECONDS)

    caplog.set_level(logging.WARNING, logger="kms_pipelines.core.retry")
    result = envelope.sweep(ctx, KEY, batch_size=10, progress=progress)
    assert cut_at and time.monotonic() - cut_at["t"] >= CUT_SECONDS - 0.5  # it really waited the cut out
    assert result.remaining == 0 and result.failed == 0
    assert result.moved + result.skipped == 120
    lines = retry_lines(caplog)
    assert lines and all("database" in line and "retry" in line for line in lines)
    with ctx.engine.connect() as conn:
        versions = set(conn.execute(select(Dek.key_version).where(Dek.key_name == KEY)).scalars())
    assert versions == {2}
    assert_intact(ctx, objects)


def _cut_mid_operation(proxy, after=0.3, seconds=CUT_SECONDS):
    """Slow every round trip so the operation is still running when the cut lands."""
    import threading

    def cut():
        proxy.delay(0)
        proxy.cut(seconds)

    proxy.delay(0.02)
    timer = threading.Timer(after, cut)
    timer.daemon = True
    timer.start()
    return timer


def _waited_out(timer, started):
    timer.join()  # the cut really landed while the operation ran (or before it ended) ...
    return time.monotonic() - started >= CUT_SECONDS  # ... and the operation waited it out


def test_rotation_rides_out_a_database_cut(kms_via_proxy):
    ctx, proxy = kms_via_proxy
    objects = fill(ctx, 5)
    started = time.monotonic()
    timer = _cut_mid_operation(proxy, after=0.05)
    results = [rotation.rotate_now(ctx, name, reason="compromise") for name in
               ("service:api-gateway", "service:worker-pipelines", "service:reconciliation-engine")]
    results.append(rotation.rotate_key(ctx, KEY, reason="cadence"))
    assert _waited_out(timer, started) and proxy.resets_done >= 1
    assert all(r.rotated and r.new_version == 2 for r in results), results
    with ctx.transaction() as session:
        for name in ("service:api-gateway", "service:worker-pipelines", "service:reconciliation-engine", KEY):
            key = lifecycle.get_key(session, name)
            assert sorted((v.version, v.state) for v in key.versions) == [(1, "rotated"), (2, "active")], name
    assert_intact(ctx, objects)


def test_checkpoint_rides_out_a_database_cut(kms_via_proxy):
    from kms_pipelines.core import checkpoints

    ctx, proxy = kms_via_proxy
    rpt.issue(ctx, "subject-1", {"n": 1})
    started = time.monotonic()
    proxy.cut(CUT_SECONDS)  # the pooled connections die; the checkpoint starts mid-outage
    cp = checkpoints.write_checkpoint(ctx)
    assert time.monotonic() - started >= CUT_SECONDS - 0.5
    assert cp["ledger_size"] > 0 and cp["rpt_size"] == 1
    assert checkpoints.verify(ctx).ok
    assert_intact(ctx)


def test_report_rides_out_a_database_cut(kms_via_proxy):
    from kms_pipelines.core import compliance

    ctx, proxy = kms_via_proxy
    baseline = {r.clause: r.status for r in compliance.build_report(ctx).rows}
    started = time.monotonic()
    timer = _cut_mid_operation(proxy, after=0.2)
    report = compliance.build_report(ctx)
    assert _waited_out(timer, started)
    assert {r.clause: r.status for r in report.rows} == baseline
    assert not any("evaluation failed" in r.evidence for r in report.rows)
    assert_intact(ctx)


def test_backup_rides_out_a_database_cut(kms_via_proxy):
    from kms_pipelines.core import backup

    ctx, proxy = kms_via_proxy
    objects = fill(ctx, 20)
    started = time.monotonic()
    timer = _cut_mid_operation(proxy, after=0.3)
    info = backup.create(ctx)
    assert _waited_out(timer, started)
    assert info.status == backup.COMPLETE
    statuses = [b["status"] for b in backup.list_backups(ctx)]
    assert statuses.count(backup.COMPLETE) == 1  # an interrupted attempt is never marked good
    checked = backup.verify_archive(ctx, info.archive_id)
    assert checked["manifest_verifies"] and checked["sha256"] == info.sha256
    assert_intact(ctx, objects)
