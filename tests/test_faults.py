"""Faults in the dependencies mid-run (issue 19): PostgreSQL, S3 and SMTP are cut, reset
or stopped through tests/fixtures/faultproxy.py while real operations run; each either
rides the fault out within the policy's retry budget or ends in one line with exit 1,
and afterwards every chain verifies and every DEK decrypts.

Budgets are shrunk through a policy override (``fast_policy``) so the tests stay short.
"""

from __future__ import annotations

import logging
import re
import time

import pytest
from sqlalchemy import select

from kms_pipelines.core.envelope import data_keys as envelope
from kms_pipelines.core.foundation import retry
from kms_pipelines.core.foundation.db.models_envelope import Dek
from kms_pipelines.core.foundation.policy import FaultBudget, Faults, load_policy
from kms_pipelines.core.keys import lifecycle, rotation
from kms_pipelines.core.ledger import audit, ledger, rpt, rpt_verify

KEY = "data:postgres"
CUT_SECONDS = 5.0


def fast_policy(**budgets):
    """The packaged policy with small retry budgets (waits of 0.1 s doubling to 1 s)."""
    quick = FaultBudget(attempts=30, max_seconds=20, first_wait_seconds=0.1, max_wait_seconds=1.0)
    faults = Faults(**{name: budgets.get(name, quick) for name in ("database", "object_store", "notifications", "hsm")})
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
    from kms_pipelines.core.foundation.clock import SystemClock

    ctx = make_kms(url, clock=SystemClock())  # the per-test database is migrated already (template)
    ctx.policy = fast_policy()
    retry.set_engine_budget(ctx.engine, ctx.policy.faults.database.budget())
    yield ctx, proxy
    proxy.up()
    audit.flush(ctx, timeout=30)  # while the proxy still forwards
    ctx.engine.dispose()


def fill(ctx, n, key=KEY):
    return {
        f"obj-{i}": (f"payload {i}".encode(), envelope.encrypt(ctx, key, f"obj-{i}", f"payload {i}".encode()))
        for i in range(n)
    }


def assert_intact(ctx, objects=None):
    """Ledger, audit and RPT chains verify; every live DEK's object decrypts."""
    audit.flush(ctx, timeout=30)
    assert ledger.verify(ctx.engine).ok
    assert audit.verify(ctx).ok, audit.verify(ctx).problem
    chain = rpt_verify.verify_chain(ctx)
    assert chain.ok, chain.problem
    for object_id, (plain, blob) in (objects or {}).items():
        assert envelope.decrypt(ctx, blob, object_id=object_id) == plain
    audit.flush(ctx, timeout=30)  # the decrypts' own audit events, before any proxy goes away


def retry_lines(caplog):
    return [r.getMessage() for r in caplog.records if r.name == "kms_pipelines.core.foundation.retry"]


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

    caplog.set_level(logging.WARNING, logger="kms_pipelines.core.foundation.retry")
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
    results = [
        rotation.rotate_now(ctx, name, reason="compromise")
        for name in ("service:api-gateway", "service:worker-pipelines", "service:reconciliation-engine")
    ]
    results.append(rotation.rotate_key(ctx, KEY, reason="cadence"))
    assert _waited_out(timer, started) and proxy.resets_done >= 1
    assert all(r.rotated and r.new_version == 2 for r in results), results
    with ctx.transaction() as session:
        for name in ("service:api-gateway", "service:worker-pipelines", "service:reconciliation-engine", KEY):
            key = lifecycle.get_key(session, name)
            assert sorted((v.version, v.state) for v in key.versions) == [(1, "rotated"), (2, "active")], name
    assert_intact(ctx, objects)


def test_checkpoint_rides_out_a_database_cut(kms_via_proxy):
    from kms_pipelines.core.ledger import checkpoints

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
    from kms_pipelines.core.backup import backups as backup

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


# ---- a fault that outlasts the budget --------------------------------------------------------


def _small_budget_policy(tmp_path):
    import yaml

    from kms_pipelines.core.foundation.policy import DEFAULT_POLICY_PATH

    data = yaml.safe_load(DEFAULT_POLICY_PATH.read_text())
    data["faults"]["database"] = {"attempts": 4, "max_seconds": 2, "first_wait_seconds": 0.2, "max_wait_seconds": 0.5}
    path = tmp_path / "policy.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def _kms_cmd(*args):
    import sys

    return [sys.executable, "-c", "import sys; from kms_pipelines.cli import main; main(sys.argv[1:])", *args]


def test_database_down_longer_than_the_budget_ends_in_one_line_and_a_rerun_completes(pg_proxy, tmp_path):
    import os
    import subprocess

    from kms_pipelines.core.runtime.wiring import context_from_env

    url, proxy = pg_proxy
    env = {
        **os.environ,
        "KMS_HOME": str(tmp_path / "home"),
        "KMS_DATABASE_URL": url,
        "KMS_POLICY": str(_small_budget_policy(tmp_path)),
        "KMS_OBJECT_STORE": str(tmp_path / "objects"),
    }
    for var in ("KMS_DEBUG", "KMS_KEYSTORE", "KMS_MASTER_KEY", "KMS_SMTP_HOST", "KMS_SLACK_WEBHOOK_URL"):
        env.pop(var, None)
    ctx = context_from_env(env)
    lifecycle.bootstrap(ctx)  # what `kms init` does on this already migrated database
    objects = fill(ctx, 150)
    lifecycle.rotate(ctx, KEY, reason="cadence")
    audit.flush(ctx)
    ctx.engine.dispose()

    proxy.delay(0.03)  # slow batches, so the cut lands mid-sweep
    sweep = subprocess.Popen(
        _kms_cmd("envelope", "sweep", "--batch-size", "10", "--progress"),
        env=env,
        stderr=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    lines = []
    for line in sweep.stderr:
        lines.append(line.rstrip("\n"))
        if line.startswith("batch 3:"):
            proxy.delay(0)
            proxy.down()  # and stays down for longer than the 2 s budget
            break
    rest, out = sweep.stderr.read(), sweep.stdout.read()
    assert sweep.wait(timeout=60) == 1
    lines += rest.splitlines()
    errors = [x for x in lines if x.startswith("kms: error:")]
    assert len(errors) == 1, lines
    assert "Traceback" not in rest and "Traceback" not in out
    error = errors[0]
    assert error.startswith("kms: error: database connection lost after ") and " of 150 DEKs (retried " in error
    assert error.endswith("; re-run is safe: kms envelope sweep")
    assert not any("wrapped" in x.lower() for x in lines)  # causes are named by type, never by data
    # every line between the batches and the error is a one-line retry notice naming the cause
    # (the audit writer's queued events of the interrupted batches cannot be written while the
    # database is gone: it says so in one line; see README "Faults")
    notices = [x for x in lines if not x.startswith(("batch ", "kms: error:", "audit writer could not append"))]
    assert notices and all("database" in x and "retry" in x for x in notices), "\n".join(notices)

    proxy.up()
    rerun = subprocess.run(_kms_cmd("envelope", "sweep", "--json"), env=env, capture_output=True, text=True)
    assert rerun.returncode == 0, rerun.stderr
    ctx = context_from_env(env)
    try:
        assert envelope.stranded(ctx) == []  # what `kms envelope check` checks
        assert_intact(ctx, objects)
    finally:
        ctx.engine.dispose()


def test_kms_debug_shows_the_traceback_of_an_exhausted_fault(pg_proxy, tmp_path):
    import os
    import subprocess

    url, proxy = pg_proxy
    env = {
        **os.environ,
        "KMS_HOME": str(tmp_path / "home"),
        "KMS_DATABASE_URL": url,
        "KMS_POLICY": str(_small_budget_policy(tmp_path)),
        "KMS_DEBUG": "1",
    }
    assert subprocess.run(_kms_cmd("init"), env={**env, "KMS_DEBUG": ""}, capture_output=True).returncode == 0
    proxy.down()
    done = subprocess.run(_kms_cmd("report", "--clause", "T3"), env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 1
    assert "Traceback" in done.stderr and "DependencyUnavailable" in done.stderr


# ---- S3 ------------------------------------------------------------------------------------


@pytest.fixture
def s3_via_proxy(s3_server, s3_bucket, fault_proxy):
    """An S3ObjectStore (5 MiB parts, small retry budget) whose every request goes through the proxy."""
    from urllib.parse import urlsplit

    from kms_pipelines.core.foundation.objectstore.s3 import MIN_PART_SIZE, S3ObjectStore

    u = urlsplit(s3_server)
    proxy = fault_proxy((u.hostname, u.port))
    store = S3ObjectStore(
        s3_bucket,
        endpoint_url=f"http://127.0.0.1:{proxy.port}",
        region="us-east-1",
        part_size=MIN_PART_SIZE,
        read_timeout=10,
        retry_budget=fast_policy().faults.object_store.budget(),
    )
    return store, proxy


def _backed_up_context(make_kms, store, megabytes: int):
    """A context whose backups are big enough for several multipart parts (incompressible artifacts)."""
    import os

    from kms_pipelines.core.foundation.clock import SystemClock

    ctx = make_kms("sqlite", clock=SystemClock())
    ctx.policy = fast_policy()
    ctx.objects = store
    artifacts = ctx.home / "artifacts" / "kms" / "bulk"
    artifacts.mkdir(parents=True, exist_ok=True)
    (artifacts / "blob.bin").write_bytes(os.urandom(megabytes * 1024 * 1024))
    return ctx


def test_backup_completes_and_verifies_through_resets_during_a_multipart_upload(
    make_kms, s3_via_proxy, caplog, s3_client, s3_bucket
):
    from kms_pipelines.core.backup import backups as backup

    store, proxy = s3_via_proxy
    ctx = _backed_up_context(make_kms, store, megabytes=12)
    objects = fill(ctx, 10)
    caplog.set_level(logging.WARNING, logger="kms_pipelines.core.foundation.retry")
    proxy.reset_midstream(7 * 1024 * 1024, direction="up", times=2)  # inside part 2, then again on its retry
    info = backup.create(ctx)
    assert proxy.resets_done == 2
    assert info.status == backup.COMPLETE and info.size > 10 * 1024 * 1024
    lines = retry_lines(caplog)
    assert any("upload part" in x and "object store" in x for x in lines), lines
    assert not s3_client.list_multipart_uploads(Bucket=s3_bucket).get("Uploads")  # nothing left dangling
    checked = backup.verify_archive(ctx, info.archive_id)
    assert checked["manifest_verifies"] and checked["locked"] and checked["size"] == info.size
    assert_intact(ctx, objects)


def test_restore_completes_through_resets_while_reading_the_archive(make_kms, s3_via_proxy, tmp_path, caplog):
    from kms_pipelines.core.backup import backups as backup
    from kms_pipelines.core.backup import restore

    store, proxy = s3_via_proxy
    ctx = _backed_up_context(make_kms, store, megabytes=8)
    objects = fill(ctx, 10)
    info = backup.create(ctx)
    caplog.set_level(logging.WARNING, logger="kms_pipelines.core.foundation.retry")
    # the first read of the archive (its hash check) and the second (the restore itself) are each cut
    proxy.reset_midstream(3 * 1024 * 1024, direction="down", times=1)
    report = restore.restore(
        ctx, info.archive_id, f"sqlite:///{tmp_path / 'restored.db'}", target_home=tmp_path / "staging"
    )
    assert proxy.resets_done == 1
    assert report.ok, report.summary()
    assert any("S3 read" in x for x in retry_lines(caplog))
    proxy.reset_midstream(6 * 1024 * 1024, direction="down", times=1)
    again = restore.restore(
        ctx, info.archive_id, f"sqlite:///{tmp_path / 'restored2.db'}", target_home=tmp_path / "staging2"
    )
    assert proxy.resets_done == 2 and again.ok, again.summary()
    assert_intact(ctx, objects)


# ---- SMTP ----------------------------------------------------------------------------------


def test_smtp_down_during_a_manual_operation_is_retried_then_recorded_as_failed(
    make_kms, smtp_server, fault_proxy, caplog
):
    from datetime import timedelta

    from kms_pipelines.core.access import notifications
    from kms_pipelines.core.access import principals as access
    from kms_pipelines.core.foundation.transports import CompositeNotifier, OutboxNotifier, RetryPolicy, SmtpNotifier
    from kms_pipelines.core.keys import manual

    ctx = make_kms("sqlite")
    proxy = fault_proxy((smtp_server.host, smtp_server.port))
    budget = FaultBudget(attempts=3, max_seconds=10, first_wait_seconds=0.05, max_wait_seconds=0.1)
    outbox = OutboxNotifier(ctx.home / "outbox.jsonl")
    smtp = SmtpNotifier("127.0.0.1", proxy.port, "kms@example.com", timeout=2, retry=RetryPolicy.from_policy(budget))
    ctx.notifier = CompositeNotifier([outbox, smtp], record_to=outbox)
    from tests.fixtures.kms import approve_both, ceremony

    devices = ceremony(ctx, {"alice": "sre_oncall", "bob": "security_engineering", "carol": "compliance_officer"})
    with pytest.raises(access.AccessDenied):  # opens the request
        manual.manual_rotate(
            ctx, "service:api-gateway", ticket="CHG-19", requested_by="alice", totp=devices["alice"].at(ctx.now())
        )
    for name in ("bob", "carol"):
        ctx.clock.advance(timedelta(seconds=30))
        approve_both(ctx, name, ticket="CHG-19", operation="rotate", totp=devices[name].at(ctx.now()))

    caplog.set_level(logging.WARNING, logger="kms_pipelines.core.foundation.retry")
    proxy.down()  # the SMTP relay is gone for the whole operation
    ctx.clock.advance(timedelta(seconds=30))
    outcome = manual.manual_rotate(
        ctx, "service:api-gateway", ticket="CHG-19", requested_by="alice", totp=devices["alice"].at(ctx.now())
    )

    assert outcome.result.rotated and outcome.result.new_version == 2  # the operation is not held up
    assert len(outcome.notification_failures) == 1 and outcome.notification_failures[0].startswith("email: gave up")
    assert sum("email" in x and "retry" in x for x in retry_lines(caplog)) == 2  # 3 attempts, 2 logged retries
    assert smtp_server.messages == []
    rows = [r for r in notifications.recent_deliveries(ctx) if r["ref"] == "CHG-19"]
    email = [r for r in rows if r["channel"] == "email"]
    assert len(email) == 1 and not email[0]["ok"] and email[0]["attempts"] == 3
    status = notifications.delivery_status(ctx)
    assert not status.ok and any(u["ref"] == "CHG-19" and u["channel"] == "email" for u in status.unresolved)

    # the relay comes back: a later delivery of the same notification resolves the failure
    proxy.up()
    again = notifications.notify_manual_operation(
        ctx,
        operation="rotate",
        target="service:api-gateway",
        ticket="CHG-19",
        requester="alice",
        approvers=["bob", "carol"],
    )
    assert again.ok and len(smtp_server.messages) == 1
    assert notifications.delivery_status(ctx).ok
    assert_intact(ctx)


# ---- Dagster -------------------------------------------------------------------------------


def test_dagster_sweep_fails_with_one_line_and_metadata_and_may_be_retried(pg_proxy, tmp_path):
    import dagster as dg

    from kms_pipelines.defs import envelope as envelope_defs
    from kms_pipelines.defs.failures import run_retry_policy
    from tests.fixtures.dagster_defs import kms_resources

    url, proxy = pg_proxy
    resources = kms_resources(tmp_path / "home", url)
    kms = resources["kms"].model_copy(update={"policy_path": str(_small_budget_policy(tmp_path))})
    ctx = kms.context()
    lifecycle.bootstrap(ctx)
    objects = fill(ctx, 30)
    lifecycle.rotate(ctx, KEY, reason="cadence")
    audit.flush(ctx)
    proxy.down()
    with pytest.raises(dg.Failure) as failed, dg.build_asset_context(partition_key="0") as asset_context:
        envelope_defs.dek_rewrap_sweep(context=asset_context, kms=kms)
    failure = failed.value
    assert "\n" not in failure.description and "Traceback" not in failure.description
    assert re.match(
        r"database connection lost after 0( of [\d,]+)? DEKs \(retried 3× over \d+ s; last: ", failure.description
    ), failure.description
    assert failure.description.endswith(
        f"re-run is safe: kms envelope sweep --shard 0 --shards {len(envelope_defs.SHARD_KEYS)}"
    )
    assert failure.allow_retries
    meta = {k: getattr(v, "value", v) for k, v in failure.metadata.items()}
    assert meta["dependency"] == "database" and meta["attempts"] == 4
    # the asset is re-run by Dagster after the budget, with the policy's numbers
    policy = load_policy().faults.dagster
    assert envelope_defs.dek_rewrap_sweep.op.retry_policy == run_retry_policy()
    assert (run_retry_policy().max_retries, run_retry_policy().delay) == (policy.max_retries, policy.delay_seconds)

    proxy.up()
    for shard in envelope_defs.SHARD_KEYS:
        with dg.build_asset_context(partition_key=shard) as asset_context:
            assert envelope_defs.dek_rewrap_sweep(context=asset_context, kms=kms).metadata["failed"] == 0
    assert not envelope.stranded(ctx)
    assert_intact(ctx, objects)
    audit.flush(ctx)


def test_a_refused_operation_bypasses_the_dagster_retry_policy():
    import dagster as dg

    from kms_pipelines.core.envelope.data_keys import EnvelopeError
    from kms_pipelines.defs.failures import one_line_failures

    with pytest.raises(dg.Failure) as failed, one_line_failures():
        raise EnvelopeError("unknown key 'data:nope' (run `kms init`, or see `kms keys list`)")
    assert failed.value.allow_retries is False and failed.value.description.startswith("unknown key")
    with pytest.raises(ZeroDivisionError), one_line_failures():  # a bug keeps its traceback
        _ = 1 / 0


# ---- HSM -----------------------------------------------------------------------------------


# python-pkcs11 finalises the dead session's object search in a __del__ that reports
# CKR_SESSION_HANDLE_INVALID; that is the fault this test causes, not a failure.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_pkcs11_sessions_are_reopened_after_the_token_drops_them(pkcs11_keystore, caplog):
    """The token forgets every session (as after CKR_DEVICE_REMOVED or an HSM restart): the
    next operation fails with CKR_SESSION_HANDLE_INVALID inside, logs in again on a fresh
    session and succeeds; nothing was lost."""
    store = pkcs11_keystore
    store.generate("kek-old", "aes256")
    store.generate("kek-new", "aes256")
    wrapped = [store.new_wrapped_dek("kek-old") for _ in range(3)]
    blob = store.dek_encrypt("kek-old", wrapped[0], b"hello", b"aad")
    state = store._token()
    dropped = 0
    for pooled in list(store._idle):  # behind the keystore's back: every session handle dies
        pooled.session.close()
        dropped += 1
    if state.login_session is not None:
        state.login_session.close()
    assert dropped >= 1
    caplog.set_level(logging.WARNING, logger="kms_pipelines.core.foundation.keystore.pkcs11")
    moved = store.rewrap("kek-old", "kek-new", wrapped)
    assert any("session lost" in r.getMessage() for r in caplog.records)
    assert store._token() is not state  # a fresh login
    assert store.dek_decrypt("kek-new", moved[0], blob, b"aad") == b"hello"
    assert all(store.dek_encrypt("kek-new", w, b"x") for w in moved)


# ---- what is NOT retried, and the control attacked -------------------------------------------


def test_classifier_separates_transient_from_permanent_errors():
    """Real library exception objects (no server needed to build them)."""
    import smtplib

    import psycopg
    from botocore.exceptions import ClientError, EndpointConnectionError
    from sqlalchemy.exc import IntegrityError, OperationalError

    def pg(sqlstate):
        return OperationalError("SELECT 1", {}, psycopg.errors.lookup(sqlstate)())

    def s3(code, status):
        return ClientError({"Error": {"Code": code}, "ResponseMetadata": {"HTTPStatusCode": status}}, "PutObject")

    transient = [
        pg("40001"),
        pg("40P01"),
        pg("57P01"),
        pg("08006"),
        pg("57P03"),
        OperationalError("x", {}, psycopg.OperationalError("server closed the connection unexpectedly")),
        s3("SlowDown", 503),
        s3("InternalError", 500),
        s3("RequestTimeout", 400),
        EndpointConnectionError(endpoint_url="http://s3"),
        smtplib.SMTPResponseException(421, b"busy"),
        smtplib.SMTPServerDisconnected("gone"),
        ConnectionResetError(),
    ]
    permanent = [
        pg("42P01"),
        pg("23505"),
        IntegrityError("INSERT", {}, psycopg.errors.lookup("23505")()),
        OperationalError("x", {}, psycopg.OperationalError('FATAL:  database "x" does not exist')),
        OperationalError("x", {}, psycopg.OperationalError("password authentication failed")),
        s3("AccessDenied", 403),
        s3("NoSuchBucket", 404),
        smtplib.SMTPResponseException(550, b"no"),
        ValueError("bad input"),
    ]
    assert [e for e in transient if retry.classify(e) is None] == []
    assert [e for e in permanent if retry.classify(e) is not None] == []
    # a wrapped transient cause is found; an exhausted budget is never retried again by an outer unit
    try:
        try:
            raise pg("57P01")
        except OperationalError as inner:
            raise RuntimeError("backup failed") from inner
    except RuntimeError as outer:
        assert retry.classify(outer).dependency == "database"
    exhausted = retry.DependencyUnavailable(retry.Fault("database", "AdminShutdown"), 3, 1.0)
    assert retry.classify(exhausted) is None


def test_a_permanent_error_is_raised_at_once_and_a_transient_one_only_within_the_budget():
    import psycopg
    from sqlalchemy.exc import OperationalError

    calls = []

    def permanent():
        calls.append(1)
        raise ValueError("refused")

    budget = retry.Budget(attempts=5, max_seconds=5, first_wait=0.01, max_wait=0.01)
    with pytest.raises(ValueError):
        retry.call(permanent, budget=budget, what="t")
    assert len(calls) == 1

    def transient():
        calls.append(1)
        raise OperationalError("SELECT 1", {"wrapped": b"\x00" * 40}, psycopg.errors.lookup("57P01")())

    calls.clear()
    with pytest.raises(retry.DependencyUnavailable) as failed:
        retry.call(transient, budget=budget, what="t", done=lambda: "7 of 9 DEKs", rerun="kms envelope sweep")
    assert len(calls) == 5
    line = str(failed.value)
    assert line.startswith(
        "database connection lost after 7 of 9 DEKs (retried 4× over 0 s; last: AdminShutdown 57P01)"
    )
    assert line.endswith("re-run is safe: kms envelope sweep") and "\\x00" not in line and "wrapped" not in line


def test_policy_refuses_a_nonsense_retry_budget(tmp_path):
    import yaml

    from kms_pipelines.core.foundation.policy import DEFAULT_POLICY_PATH, PolicyError, parse_policy

    data = yaml.safe_load(DEFAULT_POLICY_PATH.read_text())
    data["faults"]["database"]["attempts"] = 0
    with pytest.raises(PolicyError, match=r"faults\.database\.attempts"):
        parse_policy(yaml.safe_dump(data))
    data["faults"]["database"]["attempts"] = 3
    data["faults"]["s3"] = {"attempts": 3}
    with pytest.raises(PolicyError, match=r"faults\.s3"):
        parse_policy(yaml.safe_dump(data))


def test_a_rotation_whose_commit_acknowledgement_is_lost_is_not_repeated(kms_pg, monkeypatch):
    """The one fault the proxy cannot aim precisely: the COMMIT reaches the server but its
    reply is lost. Simulated here by raising a real connection-loss error right after a real
    commit (the only stand-in in this file); the retried unit must find its own rotation and
    not rotate a second time."""
    from contextlib import contextmanager

    import psycopg
    from sqlalchemy import event
    from sqlalchemy.exc import OperationalError

    ctx = kms_pg
    ctx.policy = fast_policy()
    real = type(ctx).transaction
    seen = {"n": 0}

    @contextmanager
    def lossy(self):
        flushed = []
        with real(self) as session:
            event.listen(session, "after_flush", lambda *_: flushed.append(1))
            yield session
        wrote = bool(flushed)
        seen["n"] += 1
        if wrote and not seen.get("lost"):  # the rotation's transaction committed: lose its reply
            seen["lost"] = True
            raise OperationalError("COMMIT", {}, psycopg.OperationalError("server closed the connection unexpectedly"))

    monkeypatch.setattr(type(ctx), "transaction", lossy)
    result = lifecycle.rotate(ctx, KEY, reason="cadence")
    monkeypatch.undo()
    assert seen.get("lost")
    assert result.rotated and (result.old_version, result.new_version) == (1, 2)
    with ctx.transaction() as session:
        key = lifecycle.get_key(session, KEY)
        assert sorted((v.version, v.state) for v in key.versions) == [(1, "rotated"), (2, "active")]
        assert ctx.keystore.exists(lifecycle.active_version(key).wrap_ref)  # material kept, not discarded
    assert_intact(ctx)


def test_cli_database_errors_outside_any_retried_unit_are_one_line(tmp_path, fault_proxy, pg_admin):
    """A fault on the first connection (not retried: more likely a wrong URL) and a database
    that refuses for good both end in one line and exit 1, never a traceback."""
    from click.testing import CliRunner

    from kms_pipelines.cli import cli

    proxy = fault_proxy(("127.0.0.1", 5432))
    proxy.down()
    env = {"KMS_HOME": str(tmp_path / "home"), "KMS_DEBUG": "", "KMS_POLICY": None}
    down = CliRunner().invoke(
        cli,
        ["keys", "list"],
        env={**env, "KMS_DATABASE_URL": proxy.url_for("postgresql://postgres@127.0.0.1:5432/postgres")},
    )
    assert down.exit_code == 1
    lines = down.output.strip().splitlines()
    assert len(lines) == 1 and re.fullmatch(
        r"kms: error: database connection lost \(OperationalError: (connection refused|server closed the connection "
        r"unexpectedly)\); nothing was left half-done, re-run is safe: kms keys list",
        lines[0],
    ), lines
    missing = CliRunner().invoke(
        cli,
        ["keys", "list"],
        env={**env, "KMS_DATABASE_URL": "postgresql://postgres@127.0.0.1:5432/kms_no_such_database_19"},
    )
    assert missing.exit_code == 1
    lines = missing.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("kms: error: cannot connect to the KMS database: ")
    assert "does not exist" in lines[0] and "Traceback" not in missing.output


def test_s3_that_stops_answering_for_a_while_is_waited_out(s3_server, s3_bucket, fault_proxy, caplog):
    import threading
    from urllib.parse import urlsplit

    from kms_pipelines.core.foundation.objectstore.s3 import S3ObjectStore

    u = urlsplit(s3_server)
    proxy = fault_proxy((u.hostname, u.port))
    store = S3ObjectStore(
        s3_bucket,
        endpoint_url=f"http://127.0.0.1:{proxy.port}",
        region="us-east-1",
        connect_timeout=0.5,
        read_timeout=0.5,
        retry_budget=fast_policy().faults.object_store.budget(),
    )
    store.put("before", b"reachable")  # the store has answered once: later faults are failovers
    caplog.set_level(logging.WARNING, logger="kms_pipelines.core.foundation.retry")
    proxy.stop_accepting()
    proxy.reset_all()
    timer = threading.Timer(2.0, proxy.resume_accepting)
    timer.start()
    started = time.monotonic()
    store.put("during", b"written once the server answers again")
    timer.join()
    assert time.monotonic() - started >= 2.0
    assert store.get_bytes("during") == b"written once the server answers again"
    assert any("object store" in x and "retry" in x for x in retry_lines(caplog))


def test_an_s3_endpoint_never_reached_fails_at_once_even_with_a_budget(fault_proxy, monkeypatch):
    from kms_pipelines.core.foundation.objectstore import ObjectStoreUnreachable

    for var in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.setenv(var, "test")  # never a real account
    from kms_pipelines.core.foundation.objectstore.s3 import S3ObjectStore

    proxy = fault_proxy(("127.0.0.1", 9))
    proxy.down()
    store = S3ObjectStore(
        "kms-archive",
        endpoint_url=f"http://127.0.0.1:{proxy.port}",
        region="us-east-1",
        connect_timeout=0.5,
        retry_budget=fast_policy().faults.object_store.budget(),
    )
    started = time.monotonic()
    with pytest.raises(ObjectStoreUnreachable, match="unreachable"):
        store.put("k", b"x")
    assert time.monotonic() - started < 3  # a wrong endpoint is not waited on for the whole budget
