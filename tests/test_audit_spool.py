"""The audit writer's spool: events the database cannot take are kept on disk and replayed.

PostgreSQL is made unreachable for real through tests/fixtures/faultproxy.py (every
connection reset, the port closed) with a database retry budget shrunk to about a second.
"""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
import textwrap
from datetime import timedelta

import pytest
from sqlalchemy import func, select

from kms_pipelines.core.foundation import retry
from kms_pipelines.core.foundation.clock import utc
from kms_pipelines.core.foundation.db.models_access import AuditEvent
from kms_pipelines.core.ledger import audit
from kms_pipelines.core.ledger.audit_spool import Spool

QUICK = retry.Budget(attempts=2, max_seconds=1.0, first_wait=0.1, max_wait=0.2)


@pytest.fixture
def outage(make_kms, pg_url, fault_proxy):
    """(ctx, proxy): a bootstrapped PostgreSQL context whose every connection goes through
    the proxy, with a one-second database budget."""
    from sqlalchemy.engine import make_url

    u = make_url(pg_url)
    proxy = fault_proxy((u.host or "127.0.0.1", u.port or 5432))
    ctx = make_kms(u.set(host="127.0.0.1", port=proxy.port).render_as_string(hide_password=False))
    retry.set_engine_budget(ctx.engine, QUICK)
    audit.flush(ctx)
    yield ctx, proxy
    proxy.up()


def _newest(ctx):
    with ctx.engine.connect() as conn:
        return conn.execute(select(AuditEvent.at).order_by(AuditEvent.seq.desc()).limit(1)).scalar_one()


def _emit_during_outage(ctx, proxy, n=5, operation="test.spooled"):
    """``n`` events at distinct times after the chain's newest, emitted with the database down."""
    start = utc(_newest(ctx)) + timedelta(seconds=1)
    proxy.down()
    times = [start + timedelta(seconds=i) for i in range(n)]
    for i, at in enumerate(times):
        audit.emit(ctx, at=at, operation=operation, actor=f"actor-{i}", target_ref="t", outcome="ok", detail={"i": i})
    assert audit.writer(ctx.engine).flush(30)
    return times


def _rows(ctx, operation="test.spooled"):
    with ctx.engine.connect() as conn:
        return conn.execute(
            select(AuditEvent.actor, AuditEvent.at).where(AuditEvent.operation == operation).order_by(AuditEvent.seq)
        ).all()


def test_events_of_an_outage_are_spooled_then_replayed_in_order_with_their_times(outage):
    ctx, proxy = outage
    times = _emit_during_outage(ctx, proxy)
    w = audit.writer(ctx.engine)
    status = audit.spool_status(ctx)
    assert (status.spooled, status.dropped, status.ok) == (5, 0, False)  # red while spooled, nothing dropped
    assert "5 audit event(s) are spooled" in status.problems()[0]
    assert w.spool.path.parent == ctx.home / "audit-spool"
    assert oct(w.spool.path.stat().st_mode & 0o777) == "0o600"

    proxy.up()
    audit.flush(ctx)  # replays
    assert audit.spool_status(ctx).ok and w.spool.count() == 0 and not w.spool.marker.exists()
    assert [(a, utc(t)) for a, t in _rows(ctx)] == [(f"actor-{i}", t) for i, t in enumerate(times)]
    assert audit.verify(ctx).ok


def test_a_later_write_replays_the_spool_first(outage):
    """The next batch that reaches the database carries the spooled events ahead of itself."""
    ctx, proxy = outage
    times = _emit_during_outage(ctx, proxy, n=3)
    proxy.up()
    audit.emit(
        ctx, at=times[-1] + timedelta(seconds=1), operation="test.spooled", actor="after", target_ref="t", outcome="ok"
    )
    assert audit.writer(ctx.engine).flush(30)
    assert [a for a, _ in _rows(ctx)] == ["actor-0", "actor-1", "actor-2", "after"]
    assert audit.spool_status(ctx).ok


def test_verify_is_red_while_events_wait_in_the_spool(outage, monkeypatch):
    """A replay that cannot run (here: refused by the writer, as if the database still were
    down for it) leaves ``verify`` red naming the spool, although the stored chain holds."""
    ctx, proxy = outage
    _emit_during_outage(ctx, proxy, n=2)
    proxy.up()
    monkeypatch.setattr(audit.AuditWriter, "replay", lambda self: None)  # mock: only the replay is skipped
    result = audit.verify(ctx)
    assert not result.ok and "2 audit event(s) are spooled" in result.problem
    monkeypatch.undo()
    assert audit.verify(ctx).ok


def test_a_replay_that_dies_after_its_commit_writes_nothing_twice(outage, monkeypatch):
    """A crash between "appended to the database" and "spool emptied" (mocked: emptying the
    spool raises once, where the process would die) leaves the marker; the next replay finds
    that row committed and only empties the spool."""
    ctx, proxy = outage
    _emit_during_outage(ctx, proxy)
    proxy.up()
    real_finish = Spool.finish

    def die(self, *args):
        raise SystemExit("killed after the commit")

    monkeypatch.setattr(Spool, "finish", die)
    with pytest.raises(SystemExit):
        audit.flush(ctx)
    w = audit.writer(ctx.engine)
    assert w.spool.marker.exists() and w.spool.count() == 5 and len(_rows(ctx)) == 5  # committed, not cleared
    monkeypatch.setattr(Spool, "finish", real_finish)
    audit.flush(ctx)
    audit.flush(ctx)
    assert len(_rows(ctx)) == 5 and w.spool.count() == 0 and not w.spool.marker.exists()
    assert audit.verify(ctx).ok


def test_a_replay_that_dies_before_its_commit_is_replayed_once(outage, monkeypatch):
    """The marker is written before the commit; a commit that never happened (mocked: it
    raises) leaves a marker whose row is absent, and the spool is replayed in full."""
    ctx, proxy = outage
    _emit_during_outage(ctx, proxy)
    proxy.up()

    def die(self, tx, batch):
        raise SystemExit("killed before the commit")

    monkeypatch.setattr(audit.AuditWriter, "_commit", die)
    with pytest.raises(SystemExit):
        audit.flush(ctx)
    w = audit.writer(ctx.engine)
    assert w.spool.marker.exists() and _rows(ctx) == []
    monkeypatch.undo()
    audit.flush(ctx)
    assert len(_rows(ctx)) == 5 and w.spool.count() == 0
    assert audit.verify(ctx).ok


def test_an_edited_spool_line_is_not_replayed_and_is_said_in_the_chain(outage):
    """An insider changes the actor of the third spooled line (keeping its digest). The two
    lines before it are replayed, the chain records ``audit.spool_altered``, the altered
    lines are set aside for the investigator, the stored chain verifies and verify is red."""
    ctx, proxy = outage
    _emit_during_outage(ctx, proxy)
    w = audit.writer(ctx.engine)
    lines = w.spool.path.read_text().splitlines()
    record = json.loads(lines[2])
    record["actor"] = "someone-else"
    lines[2] = json.dumps(record, sort_keys=True)
    w.spool.path.write_text("\n".join(lines) + "\n")

    proxy.up()
    result = audit.verify(ctx)
    assert [a for a, _ in _rows(ctx)] == ["actor-0", "actor-1"]
    with ctx.engine.connect() as conn:
        altered = (
            conn.execute(select(AuditEvent.detail).where(AuditEvent.operation == "audit.spool_altered")).scalars().all()
        )
    assert [json.loads(d) for d in altered] == [{"first_altered_line": 3, "lines_replayed": 2}]
    with ctx.engine.connect() as conn:
        assert audit.verify_rows(audit.iter_rows(conn)).ok  # what was written chains correctly
    assert not result.ok and "altered and set aside" in result.problem
    (held,) = w.spool.altered_files()
    assert len(held.read_text().splitlines()) == 3 and "someone-else" in held.read_text()
    assert w.spool.count() == 0
    held.unlink()  # the investigator took it
    assert audit.verify(ctx).ok


def test_nothing_secret_reaches_the_spool(outage, master_key):
    """Real keystore operations during the outage: their events are spooled, never the key
    material, the wrapped DEK, the plaintext or the ciphertext."""
    ctx, proxy = outage
    ks = ctx.as_actor("svc").keystore
    ks.generate("t.aes", "aes256")
    proxy.down()
    wrapped = ks.new_wrapped_dek("t.aes")
    blob = ks.dek_encrypt("t.aes", wrapped, b"plaintext-canary")
    assert audit.writer(ctx.engine).flush(30)
    text = audit.writer(ctx.engine).spool.path.read_text()
    assert '"op": "wrap"' in text and '"op": "encrypt"' in text
    for secret in (master_key, wrapped, blob, b"plaintext-canary"):
        for form in (secret, base64.b64encode(secret), secret.hex().encode()):
            assert form.decode("latin-1") not in text
    proxy.up()
    audit.flush(ctx)


def test_the_spool_unwritable_too_counts_the_events_as_dropped(outage, caplog):
    ctx, proxy = outage
    w = audit.writer(ctx.engine)
    w.spool.path.parent.write_text("")  # a file where the spool directory should be: every append fails
    _emit_during_outage(ctx, proxy, n=2)
    status = audit.spool_status(ctx)
    assert status.dropped == 2 and not status.ok and "DROPPED" in " ".join(status.problems())
    assert any(r.levelname == "CRITICAL" and "DROPPED 2 event(s)" in r.getMessage() for r in caplog.records)
    w.spool.path.parent.unlink()
    proxy.up()


def test_events_queued_at_exit_are_spooled_when_the_database_is_down(outage):
    """A real process emits with the database down and exits normally: the exit handler
    waits its bounded time, then spools the batch in flight and the queue; the parent
    replays them."""
    ctx, proxy = outage
    url = ctx.engine.url.render_as_string(hide_password=False)
    script = textwrap.dedent(
        f"""
        from datetime import UTC, datetime
        from kms_pipelines.core.foundation import db, retry
        from kms_pipelines.core.ledger import audit
        engine = db.make_engine({url!r})
        retry.set_engine_budget(engine, retry.Budget(attempts=1000, max_seconds=120))  # outlasts the exit wait
        audit.EXIT_FLUSH_SECONDS = 1.0
        for i in range(7):
            audit.emit(engine, at=datetime.now(UTC), operation="test.exit", actor=f"p{{i}}", target_ref=None, outcome="ok")
        """
    )
    proxy.down()
    env = {**os.environ, "KMS_HOME": str(ctx.home), "PYTHONPATH": os.getcwd()}
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "spooled to" in done.stderr
    proxy.up()
    spool = audit.writer(ctx.engine).spool  # the same file: same home, same database URL
    assert spool.count() == 7 and audit.spool_status(ctx).spooled == 7
    audit.flush(ctx)
    assert [a for a, _ in _rows(ctx, "test.exit")] == [f"p{i}" for i in range(7)]
    assert spool.count() == 0
    with ctx.engine.connect() as conn:
        assert conn.execute(select(func.count()).where(AuditEvent.operation == "test.exit")).scalar() == 7
    assert audit.verify(ctx).ok


def test_kms_audit_spool_is_red_while_the_database_is_down(outage):
    """``kms audit spool`` reads only KMS_HOME, so it answers during the outage itself."""
    from click.testing import CliRunner

    from kms_pipelines.cli import cli

    ctx, proxy = outage
    _emit_during_outage(ctx, proxy, n=4)
    env = {"KMS_HOME": str(ctx.home), "KMS_DATABASE_URL": ctx.engine.url.render_as_string(hide_password=False)}
    red = CliRunner().invoke(cli, ["audit", "spool"], env=env)
    assert red.exit_code == 1 and "AUDIT SPOOL: 4 audit event(s) are spooled" in red.output
    as_json = CliRunner().invoke(cli, ["audit", "spool", "--json"], env=env)
    assert as_json.exit_code == 1 and json.loads(as_json.stdout)["spooled"] == 4
    proxy.up()
    audit.flush(ctx)
    green = CliRunner().invoke(cli, ["audit", "spool"], env=env)
    assert green.exit_code == 0 and "audit spool empty" in green.output


def test_the_dagster_audit_check_is_red_for_an_altered_spool(tmp_path, monkeypatch, pg_url):
    """``audit_chain_intact`` (blocking) turns red when spool lines were altered and set aside."""
    import dagster as dg

    from kms_pipelines.defs.access import audit_anomalies, audit_chain_intact
    from kms_pipelines.defs.foundation import kms_state
    from tests.fixtures.kms import write_test_policy
    from tests.test_access_dagster import make_resource

    monkeypatch.setenv("KMS_MASTER_KEY", "B" * 43 + "=")
    monkeypatch.setenv("KMS_POLICY", write_test_policy(tmp_path))
    res, instance = make_resource(tmp_path, pg_url), dg.DagsterInstance.ephemeral()
    assert dg.materialize([kms_state], resources={"kms": res}, instance=instance).success
    ctx = res.context()
    spool = audit.writer(ctx.engine, ctx.home).spool
    event = {"at": "2026-02-01T09:00:01.000000Z", "actor": "a", "op": "test.x", "target": None, "outcome": "ok"}
    spool.append([{**event, "detail": None}, {**event, "actor": "b", "detail": None}])  # as the writer spools
    spool.path.write_text(spool.path.read_text().replace('"actor": "b"', '"actor": "c"'))  # the insider's edit

    result = dg.materialize(
        [audit_anomalies, audit_chain_intact], resources={"kms": res}, instance=instance, raise_on_error=False
    )
    (check,) = result.get_asset_check_evaluations()
    assert not check.passed and "altered and set aside" in check.metadata["problem"].value
    assert [a for a, _ in _rows(ctx, "test.x")] == ["a"]


def test_the_exit_handler_and_a_late_commit_never_both_keep_a_batch(outage):
    """``close`` spools the batch the writer is still retrying; when the database comes back
    that retry must not commit it too (the exit handler owns it now)."""
    ctx, proxy = outage
    retry.set_engine_budget(ctx.engine, retry.Budget(attempts=1000, max_seconds=30, first_wait=0.1, max_wait=0.3))
    start = utc(_newest(ctx)) + timedelta(seconds=1)
    proxy.down()
    for i in range(3):
        audit.emit(
            ctx, at=start + timedelta(seconds=i), operation="test.late", actor=f"l{i}", target_ref=None, outcome="ok"
        )
    w = audit.writer(ctx.engine)
    w.close(1.0)  # the writer is still inside its 30 s budget
    assert w.spool.count() == 3
    proxy.up()
    assert w.flush(30)  # its retry now reaches the database and gives the batch up
    audit.flush(ctx)
    assert [a for a, _ in _rows(ctx, "test.late")] == ["l0", "l1", "l2"]
    assert audit.verify(ctx).ok


def test_a_well_chained_but_malformed_line_is_set_aside_not_replayed_forever(outage):
    """An insider who recomputes the digests can still not block every later audit write
    with a line the database would refuse (here: an operation longer than its column)."""
    ctx, proxy = outage
    w = audit.writer(ctx.engine)
    at = audit.format_time(utc(_newest(ctx)) + timedelta(seconds=1))
    good = {"at": at, "actor": "a", "op": "test.ok", "target": None, "outcome": "ok", "detail": None}
    w.spool.append([good, {**good, "op": "x" * 65}])  # both digests correct
    audit.emit(
        ctx, at=utc(_newest(ctx)) + timedelta(seconds=2), operation="test.ok", actor="b", target_ref=None, outcome="ok"
    )
    assert w.flush(30)
    assert [a for a, _ in _rows(ctx, "test.ok")] == ["a", "b"]
    assert len(_rows(ctx, "audit.spool_altered")) == 1 and len(w.spool.altered_files()) == 1
    assert not audit.verify(ctx).ok
