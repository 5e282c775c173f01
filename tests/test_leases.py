"""Sweep leases (core/envelope/leases.py): workers sharing a shard never rewrap the same DEKs at once,
and a dead worker's range is taken over once its lease expires. PostgreSQL, real processes."""

import base64
import itertools
import json
import os
import secrets
import signal
import subprocess
import sys
import threading
import time

import pytest
from sqlalchemy import text

from kms_pipelines.core.envelope import data_keys as envelope
from kms_pipelines.core.envelope import leases
from kms_pipelines.core.keys import lifecycle
from kms_pipelines.core.ledger import audit
from kms_pipelines.core.runtime.wiring import context_from_env

KEY = "data:identity-documents"


def short_leases(ctx, seconds=5, per_shard=4):
    env = ctx.policy.envelope.model_copy(update={"lease_seconds": seconds, "lease_ranges_per_shard": per_shard})
    ctx.policy = ctx.policy.model_copy(update={"envelope": env})
    return ctx


def fill(ctx, n):
    objects = {}
    for i in range(n):
        plain = f"payload {i}".encode()
        objects[f"o-{i}"] = (plain, envelope.encrypt(ctx, KEY, f"o-{i}", plain))
    return objects


def by_version(ctx):
    with ctx.engine.connect() as conn:
        return dict(
            conn.execute(
                text("SELECT key_version, count(*) FROM deks WHERE key_name = :k GROUP BY key_version"), {"k": KEY}
            ).all()
        )


def assert_all_decrypt(ctx, objects):
    for object_id, (plain, blob) in objects.items():
        assert envelope.decrypt(ctx, blob, object_id=object_id) == plain


def test_lease_ranges_tile_the_shard_exactly():
    for shards in (1, 3, 8, 1024):
        for shard in (0, shards - 1):
            ranges = [envelope.shard_range(s, n) for s, n in leases.lease_ranges(shard, shards, 4)]
            assert ranges[0][0] == envelope.shard_range(shard, shards)[0]
            assert ranges[-1][1] == envelope.shard_range(shard, shards)[1]
            assert all(a[1] == b[0] for a, b in itertools.pairwise(ranges))  # contiguous, no overlap


def test_three_workers_on_one_shard_rewrap_every_dek_exactly_once(kms_pg):
    short_leases(kms_pg)
    objects = fill(kms_pg, 80)
    lifecycle.rotate(kms_pg, KEY)
    results, errors = [], []

    def run():
        try:
            results.append(leases.leased_sweep(kms_pg, shard=0, shards=1, batch_size=4, poll_seconds=0.05))
        except Exception as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=run) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors
    # skipped counts DEKs a worker rewrapped but whose commit lost the compare-and-set: double work.
    assert sum(r.moved for r in results) == 80 and sum(r.skipped for r in results) == 0
    assert all(r.remaining == 0 for r in results)
    assert sum(1 for r in results if r.moved) >= 2  # the ranges were shared, not serialised onto one worker
    assert by_version(kms_pg) == {2: 80}
    rows = leases.lease_rows(kms_pg)
    assert len(rows) == 4 and all(r["holder"] is None for r in rows)  # every lease released
    assert_all_decrypt(kms_pg, objects)


def test_without_leases_concurrent_workers_do_double_work(kms_pg):
    """The control: the same race without leases rewraps DEKs twice (caught only by compare-and-set)."""
    fill(kms_pg, 80)
    lifecycle.rotate(kms_pg, KEY)
    results = []
    barrier = threading.Barrier(3)

    def run():
        barrier.wait()
        results.append(envelope.sweep(kms_pg, batch_size=4))

    threads = [threading.Thread(target=run) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert sum(r.moved for r in results) == 80
    assert sum(r.skipped for r in results) > 0


def test_a_live_lease_blocks_and_an_expired_one_is_taken_over(kms_pg):
    short_leases(kms_pg, seconds=5, per_shard=1)
    objects = fill(kms_pg, 20)
    lifecycle.rotate(kms_pg, KEY)
    lo, hi = envelope.shard_range(0, 1)
    assert leases.claim(kms_pg, lo, hi, "ghost-worker", 3)  # a worker that then dies
    assert not leases.claim(kms_pg, lo, hi, "someone-else", 3)  # live lease: refused
    assert by_version(kms_pg) == {1: 20}  # the refused claim changed nothing
    started = time.monotonic()
    result = leases.leased_sweep(kms_pg, batch_size=5, poll_seconds=0.1)
    waited = time.monotonic() - started
    assert 2.0 <= waited < 20, waited  # waited for the ghost's expiry, then took over
    assert result.moved == 20 and result.skipped == 0 and result.remaining == 0
    row = leases.lease_rows(kms_pg)[0]
    assert row["takeovers"] == 1 and row["holder"] is None
    with pytest.raises(leases.LeaseLost, match="taken over"):
        leases.renew(kms_pg, lo, hi, "ghost-worker", 3)  # the ghost, back from a pause, is told to stop
    assert_all_decrypt(kms_pg, objects)


def test_an_insider_expiring_a_lease_lets_the_paused_holder_notice_and_stop(kms_pg):
    """Rewinding a lease by direct SQL hands the range to another worker; the first worker's next
    renew raises LeaseLost, so it stops instead of sweeping alongside the new holder."""
    lo, hi = envelope.shard_range(0, 1)
    assert leases.claim(kms_pg, lo, hi, "worker-a", 60)
    with kms_pg.engine.begin() as conn:
        conn.execute(text("UPDATE sweep_leases SET expires_at = clock_timestamp() - interval '1 second'"))
    assert leases.claim(kms_pg, lo, hi, "worker-b", 60)
    with pytest.raises(leases.LeaseLost):
        leases.renew(kms_pg, lo, hi, "worker-a", 60)
    leases.release(kms_pg, lo, hi, "worker-a")  # a stale release must not free worker-b's lease
    assert leases.lease_rows(kms_pg)[0]["holder"] == "worker-b"


CHILD = r"""
import json, time
from kms_pipelines.core.envelope import leases
from kms_pipelines.core.runtime.wiring import context_from_env

ctx = context_from_env()
env = ctx.policy.envelope.model_copy(update={"lease_seconds": 5, "lease_ranges_per_shard": 2})
ctx.policy = ctx.policy.model_copy(update={"envelope": env})

def progress(p):
    print(json.dumps({"batch": p.batch}), flush=True)
    time.sleep(0.05)  # slow, so the parent kills it in the middle of a range

leases.leased_sweep(ctx, batch_size=10, progress=progress)
print("DONE", flush=True)
"""


@pytest.mark.slow
def test_kill_9_of_a_worker_mid_range_is_taken_over_within_the_lease(tmp_path, pg_url):
    env = dict(
        os.environ,
        KMS_HOME=str(tmp_path / "home"),
        KMS_DATABASE_URL=pg_url,
        KMS_KEYSTORE="software",
        KMS_MASTER_KEY=base64.b64encode(secrets.token_bytes(32)).decode(),
        PYTHONUNBUFFERED="1",
    )
    env.pop("KMS_POLICY", None)
    ctx = short_leases(context_from_env(env), seconds=5, per_shard=2)
    lifecycle.bootstrap(ctx)
    objects = fill(ctx, 400)
    lifecycle.rotate(ctx, KEY)
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        seen = 0
        deadline = time.monotonic() + 120
        while seen < 5 and time.monotonic() < deadline:
            line = child.stdout.readline()
            if not line:
                break
            if line.startswith("{"):
                seen = json.loads(line)["batch"]
        assert seen >= 5, f"child made no progress: {child.stderr.read()[-2000:]}"
        os.kill(child.pid, signal.SIGKILL)
    finally:
        child.kill()
        child.wait(timeout=30)
    assert child.returncode == -signal.SIGKILL
    left = by_version(ctx)
    assert left.get(1, 0) > 0 and left.get(2, 0) >= 50, left  # killed mid-way
    assert any(r["holder"] for r in leases.lease_rows(ctx))  # the dead worker's lease is still there

    started = time.monotonic()
    result = leases.leased_sweep(ctx, batch_size=50, poll_seconds=0.2)
    assert time.monotonic() - started < 5 + 30  # bounded: one lease period plus the work
    assert result.moved == left[1] and result.skipped == 0 and result.remaining == 0  # none lost, none twice
    assert sum(r["takeovers"] for r in leases.lease_rows(ctx)) >= 1
    assert by_version(ctx) == {2: 400}
    assert_all_decrypt(ctx, objects)
    audit.flush(ctx)
    ctx.engine.dispose()


def test_cli_sweep_with_lease_moves_everything_and_leaves_leases_free(tmp_path, pg_url):
    env = dict(
        os.environ,
        KMS_HOME=str(tmp_path / "home"),
        KMS_DATABASE_URL=pg_url,
        KMS_KEYSTORE="software",
        KMS_MASTER_KEY=base64.b64encode(secrets.token_bytes(32)).decode(),
    )
    env.pop("KMS_POLICY", None)
    ctx = context_from_env(env)
    lifecycle.bootstrap(ctx)
    objects = fill(ctx, 30)
    lifecycle.rotate(ctx, KEY)
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "kms_pipelines.cli",
            "envelope",
            "sweep",
            "--lease",
            "--shard",
            "0",
            "--shards",
            "1",
            "--batch-size",
            "7",
            "--json",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    assert result["moved"] == 30 and result["skipped"] == 0 and result["remaining"] == 0
    rows = leases.lease_rows(ctx)
    assert len(rows) == ctx.policy.envelope.lease_ranges_per_shard and all(r["holder"] is None for r in rows)
    assert_all_decrypt(ctx, objects)
    audit.flush(ctx)
    ctx.engine.dispose()
