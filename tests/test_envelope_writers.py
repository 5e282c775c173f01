"""The sweep's two commit threads on PostgreSQL (core/envelope/data_keys.py ``_writers``),
attacked: a writer's backend killed mid-commit, one writer failing while the other's commit
is in flight, a progress callback raising with commits in flight, ``max_batches`` with two
writers, and a rotation plus a revoke racing the sweep. Every test ends with every object
decrypting and no commit thread left behind."""

import threading
import time
from dataclasses import replace

import psycopg
import pytest
from sqlalchemy import create_engine, select, text

from kms_pipelines.core.envelope import data_keys as envelope
from kms_pipelines.core.envelope import leases
from kms_pipelines.core.foundation import retry
from kms_pipelines.core.foundation.db.models_envelope import Dek
from kms_pipelines.core.keys import lifecycle
from tests.test_envelope import KEY, assert_all_decrypt, fill, versions_of


def commit_threads() -> list[str]:
    return [t.name for t in threading.enumerate() if t.name.startswith("kms-sweep-commit")]


def dek_ids(kms) -> list[int]:
    with kms.engine.connect() as conn:
        return list(conn.execute(select(Dek.id).where(Dek.key_name == KEY).order_by(Dek.id)).scalars())


def wait_for_blocked_update(kms, deadline_seconds: float = 20.0) -> int:
    """The pid of a backend whose sweep UPDATE waits on a row lock."""
    deadline = time.monotonic() + deadline_seconds
    with kms.engine.connect() as conn:
        while time.monotonic() < deadline:
            pid = conn.execute(
                text(
                    "SELECT pid FROM pg_stat_activity WHERE datname = current_database() "
                    "AND pid <> pg_backend_pid() AND wait_event_type = 'Lock' AND query LIKE 'UPDATE deks AS d%'"
                )
            ).scalar()
            if pid is not None:
                return pid
            conn.rollback()
            time.sleep(0.02)
    raise AssertionError("no sweep commit ever waited on the held rows")


def test_a_writer_backend_terminated_mid_commit_is_retried_and_nothing_is_double_wrapped(kms_pg, caplog):
    # An insider (or a DBA, or a failover) kills the backend of the writer whose commit is
    # waiting on rows another transaction holds. The commit is compare-and-set, so its retry
    # on a new connection must move exactly its own rows; the other writer's batches commit
    # meanwhile; the counts still add up to the total.
    objects = fill(kms_pg, 24)
    lifecycle.rotate(kms_pg, KEY)
    first_batch = dek_ids(kms_pg)[:4]
    outcome: dict = {}

    def run():
        try:
            outcome["result"] = envelope.sweep(kms_pg, batch_size=4)
        except Exception as exc:  # noqa: BLE001 - reported by the assertions below
            outcome["error"] = exc

    holder = kms_pg.engine.connect()
    try:
        holder.execute(text("SELECT id FROM deks WHERE id = ANY(:ids) FOR UPDATE"), {"ids": first_batch})
        sweeper = threading.Thread(target=run)
        sweeper.start()
        pid = wait_for_blocked_update(kms_pg)
        with kms_pg.engine.connect() as conn:
            assert conn.execute(text("SELECT pg_terminate_backend(:pid)"), {"pid": pid}).scalar() is True
    finally:
        holder.rollback()
        holder.close()
    sweeper.join(60)
    assert not sweeper.is_alive(), "the sweep hung after its writer's backend was terminated"
    assert "error" not in outcome, outcome.get("error")
    result = outcome["result"]
    assert "committing a sweep batch of data:postgres" in caplog.text  # the retry said what it retried
    assert (result.moved, result.remaining, result.skipped, result.failed) == (24, 0, 0, 0)
    assert versions_of(kms_pg) == {2: 24}
    assert_all_decrypt(kms_pg, objects)
    assert commit_threads() == []


def test_a_failing_writer_surfaces_its_error_after_the_other_commit_finished_and_leaves_no_thread(kms_pg, monkeypatch):
    # The second batch's commit fails at once while the first one's is still running. The
    # sweep must raise the second's error only after the first commit finished (no commit
    # left running behind the exception), leave no commit thread, and leave every DEK
    # decryptable on one version or the other; a re-run moves the rest.
    objects = fill(kms_pg, 16)
    lifecycle.rotate(kms_pg, KEY)
    real = envelope._commit_batch
    calls, first_finished = [], threading.Event()
    second_failed = threading.Event()

    def flaky(ctx, key_name, old, new, pairs):
        calls.append([i for i, _ in pairs])
        if len(calls) == 1:
            assert second_failed.wait(10)
            time.sleep(0.2)  # still committing when the main thread sees the failure
            try:
                return real(ctx, key_name, old, new, pairs)
            finally:
                first_finished.set()
        if len(calls) == 2:
            second_failed.set()
            raise RuntimeError("writer two broke")
        return real(ctx, key_name, old, new, pairs)

    monkeypatch.setattr(envelope, "_commit_batch", flaky)
    with pytest.raises(RuntimeError, match="writer two broke"):
        envelope.sweep(kms_pg, batch_size=4)
    assert first_finished.is_set(), "the sweep raised while a commit was still running"
    assert commit_threads() == []
    # The first batch committed; the failed one did not. The batch submitted while the
    # failure waited its turn (errors surface in submission order) may commit too.
    assert 2 <= len(calls) <= 3
    with kms_pg.engine.connect() as conn:
        moved = set(conn.execute(select(Dek.id).where(Dek.key_version == 2)).scalars())
    assert moved == set(calls[0]) | (set(calls[2]) if len(calls) == 3 else set())
    assert_all_decrypt(kms_pg, objects)
    monkeypatch.setattr(envelope, "_commit_batch", real)
    rerun = envelope.sweep(kms_pg, batch_size=4)
    assert (rerun.moved, rerun.remaining, rerun.skipped) == (16 - len(moved), 0, 0)
    assert_all_decrypt(kms_pg, objects)


def test_a_database_outage_on_one_writer_reports_the_batches_the_other_writer_committed(kms_pg, monkeypatch):
    # The first batch's commit keeps losing its connection until the budget runs out, while
    # the second batch commits on the other writer. The error's ``done`` (what an operator and
    # leased_sweep read to know what was finished) must count the second batch: it moved.
    objects = fill(kms_pg, 16)
    lifecycle.rotate(kms_pg, KEY)
    policy = kms_pg.policy
    faults = policy.faults.model_copy(
        update={"database": policy.faults.database.model_copy(update={"attempts": 2, "first_wait_seconds": 0.0})}
    )
    kms_pg.policy = policy.model_copy(update={"faults": faults})
    real = envelope._commit_batch
    second_done = threading.Event()
    batches: list[tuple[int, ...]] = []

    def lost(ctx, key_name, old, new, pairs):
        ids = tuple(i for i, _ in pairs)
        if ids not in batches:
            batches.append(ids)
        if batches.index(ids) == 0:
            assert second_done.wait(10)
            raise psycopg.OperationalError("server closed the connection unexpectedly")
        try:
            return real(ctx, key_name, old, new, pairs)
        finally:
            second_done.set()

    monkeypatch.setattr(envelope, "_commit_batch", lost)
    with pytest.raises(retry.DependencyUnavailable) as raised:
        envelope.sweep(kms_pg, batch_size=4)
    on_new = versions_of(kms_pg).get(2, 0)
    assert on_new >= 4  # the second batch (at least) committed beside the failing first
    assert raised.value.moved == on_new
    assert f"{on_new:,} of 16 DEKs" in str(raised.value)
    assert commit_threads() == []
    assert_all_decrypt(kms_pg, objects)


def test_a_raising_progress_callback_waits_for_the_commits_in_flight(kms_pg, monkeypatch):
    # progress raises on the first settled batch (as leased_sweep's renew does on a lost
    # lease) while the next batch is committing on the other writer.
    objects = fill(kms_pg, 20)
    lifecycle.rotate(kms_pg, KEY)
    real = envelope._commit_batch
    running, finished = [], []

    def observed(ctx, key_name, old, new, pairs):
        running.append(len(pairs))
        time.sleep(0.05)
        try:
            return real(ctx, key_name, old, new, pairs)
        finally:
            finished.append(len(pairs))

    def stop(p):
        raise RuntimeError("lease lost")

    monkeypatch.setattr(envelope, "_commit_batch", observed)
    with pytest.raises(RuntimeError, match="lease lost"):
        envelope.sweep(kms_pg, batch_size=4, progress=stop)
    assert len(finished) == len(running) <= 2  # at most one commit beyond the one reported
    assert commit_threads() == []
    assert versions_of(kms_pg) == {1: 20 - 4 * len(finished), 2: 4 * len(finished)}
    assert_all_decrypt(kms_pg, objects)


@pytest.mark.parametrize("max_batches", [1, 2, 3])
def test_max_batches_with_two_writers_commits_exactly_that_many(kms_pg, monkeypatch, max_batches):
    objects = fill(kms_pg, 20)
    lifecycle.rotate(kms_pg, KEY)
    real = envelope._commit_batch
    commits = []

    def counted(ctx, key_name, old, new, pairs):
        commits.append(len(pairs))
        return real(ctx, key_name, old, new, pairs)

    monkeypatch.setattr(envelope, "_commit_batch", counted)
    result = envelope.sweep(kms_pg, batch_size=4, max_batches=max_batches)
    assert commits == [4] * max_batches
    assert (result.batches, result.moved, result.remaining) == (max_batches, 4 * max_batches, 20 - 4 * max_batches)
    assert versions_of(kms_pg) == {1: 20 - 4 * max_batches, 2: 4 * max_batches}
    assert_all_decrypt(kms_pg, objects)


def test_a_rotation_and_a_revoke_racing_two_writers_leave_every_dek_on_the_active_version(kms_pg):
    # Another operator rotates the key twice and revokes the versions it retires while the
    # sweep runs with small batches on two writers. Compare-and-set plus re-planning must
    # leave every DEK on the final active version, none double-wrapped (all decrypt).
    objects = fill(kms_pg, 60)
    lifecycle.rotate(kms_pg, KEY)
    started, racer_errors = threading.Event(), []

    def race():
        try:
            assert started.wait(10)
            for retired in (2, 3):
                lifecycle.rotate(kms_pg, KEY, reason="compromise")
                lifecycle.revoke(kms_pg, KEY, retired, reason="compromise")
                time.sleep(0.01)
        except Exception as exc:  # noqa: BLE001 - reported below
            racer_errors.append(exc)

    def progress(p):
        started.set()
        time.sleep(0.005)  # keep the sweep in flight while the racer works

    racer = threading.Thread(target=race)
    racer.start()
    result = envelope.sweep(kms_pg, batch_size=3, progress=progress)
    racer.join(30)
    assert not racer_errors, racer_errors
    assert result.failed == 0 and result.skipped == 0
    rerun = envelope.sweep(kms_pg, batch_size=3)  # the race may have ended after the sweep's last plan
    assert rerun.remaining == 0 and rerun.failed == 0 and rerun.skipped == 0
    assert versions_of(kms_pg) == {4: 60}
    assert envelope.stranded(kms_pg) == []
    assert_all_decrypt(kms_pg, objects)
    assert commit_threads() == []


def test_a_lease_lost_mid_sweep_lets_at_most_one_more_batch_commit_and_nothing_double_wraps(kms_pg, monkeypatch):
    # An insider expires worker-a's lease by SQL after its second batch and hands the range
    # to worker-b (which then stalls; its short lease expires). worker-a learns of the loss
    # at the next renew: with two writers one more batch may already be committing then (it
    # was one with a single writer). Compare-and-set keeps that harmless: at the end every
    # DEK is on v2 exactly once and decrypts.
    env = kms_pg.policy.envelope.model_copy(update={"lease_seconds": 30, "lease_ranges_per_shard": 1})
    kms_pg.policy = kms_pg.policy.model_copy(update={"envelope": env})
    objects = fill(kms_pg, 40)
    lifecycle.rotate(kms_pg, KEY)
    events: list[str] = []
    real_commit, real_renew, real_claim = envelope._commit_batch, leases.renew, leases.claim

    def commit(ctx, key_name, old, new, pairs):
        moved = real_commit(ctx, key_name, old, new, pairs)
        events.append("commit")
        return moved

    def renew(ctx, lo, hi, holder, ttl):
        try:
            real_renew(ctx, lo, hi, holder, ttl)
        except leases.LeaseLost:
            events.append("lost")
            raise

    def claim(ctx, lo, hi, holder, ttl):
        took = real_claim(ctx, lo, hi, holder, ttl)
        events.append("claimed" if took else "refused")
        return took

    def insider(p):
        if p.batch == 2 and "expired" not in events:
            with kms_pg.engine.begin() as conn:
                conn.execute(text("UPDATE sweep_leases SET expires_at = clock_timestamp() - interval '1 second'"))
            lo, hi = envelope.shard_range(None, 1)
            assert real_claim(kms_pg, lo, hi, "worker-b", 1)  # then stalls; expires in 1 s
            events.append("expired")

    monkeypatch.setattr(envelope, "_commit_batch", commit)
    monkeypatch.setattr(leases, "renew", renew)
    monkeypatch.setattr(leases, "claim", claim)
    result = leases.leased_sweep(kms_pg, batch_size=4, holder="worker-a", progress=insider, poll_seconds=0.1)
    assert "lost" in events, events
    expired, lost = events.index("expired"), events.index("lost")
    retaken = events.index("claimed", lost)
    assert events[expired:retaken].count("commit") <= 2, events  # after the lease was gone
    assert events[lost:retaken].count("commit") <= 1, events  # after worker-a knew it
    assert result.remaining == 0
    # every DEK moved once, by worker-a: before the loss, in the batch committing then, or after it retook the range
    assert (result.moved, result.skipped) == (40, 0), (result.moved, result.skipped, events)
    assert versions_of(kms_pg) == {2: 40}
    assert_all_decrypt(kms_pg, objects)
    row = leases.lease_rows(kms_pg)[0]
    assert row["holder"] is None and row["takeovers"] >= 1
    assert commit_threads() == []


def test_two_writers_never_hold_one_connection_while_waiting_for_another(kms_pg):
    # A pool of exactly one connection and no overflow: the reader and both writers take
    # turns on it. If any step of a batch held a connection while asking the pool for a
    # second one (a nested transaction in the commit, a read inside it), this would wait
    # out the pool timeout and fail instead of finishing.
    objects = fill(kms_pg, 30)
    lifecycle.rotate(kms_pg, KEY)
    tiny = create_engine(kms_pg.engine.url, pool_size=1, max_overflow=0, pool_timeout=5)
    try:
        ctx = replace(kms_pg, engine=tiny)
        started = time.monotonic()
        result = envelope.sweep(ctx, batch_size=4)
        assert time.monotonic() - started < 5  # never waited out a pool timeout
    finally:
        tiny.dispose()
    assert (result.moved, result.remaining, result.skipped) == (30, 0, 0)
    assert versions_of(kms_pg) == {2: 30}
    assert_all_decrypt(kms_pg, objects)
    assert commit_threads() == []


def test_a_rotation_is_not_starved_by_the_two_writers_share_locks(kms_pg, monkeypatch):
    # Each commit share-locks the key row; lifecycle takes FOR UPDATE on it to rotate or
    # revoke. With two writers whose slow commits overlap, the row always has a share
    # holder: if new share lockers could jump the waiting FOR UPDATE, a compromise rotation
    # would wait for the whole sweep. It must get in within a few commits' time.
    # The delay is injected (a sleep inside each commit's transaction, after its share lock),
    # because real commits on a small test table are too quick to overlap for long.
    # Sized so a starved rotation (waiting for the whole sweep, ~30 commits / 2 writers) and
    # a loaded CI machine's slow rotation (well under 6 commits' time) stay far apart.
    objects = fill(kms_pg, 120)
    lifecycle.rotate(kms_pg, KEY)
    real_driver, commit_seconds = envelope._driver, 0.3

    def slow_commit(conn):
        if threading.current_thread().name.startswith("kms-sweep-commit"):
            time.sleep(commit_seconds)
        return real_driver(conn)

    monkeypatch.setattr(envelope, "_driver", slow_commit)
    sweeping, waited = threading.Event(), []

    def rotate_mid_sweep():
        assert sweeping.wait(10)
        time.sleep(2 * commit_seconds)  # both writers busy by now
        t0 = time.monotonic()
        lifecycle.rotate(kms_pg, KEY, reason="compromise")
        waited.append(time.monotonic() - t0)

    rotator = threading.Thread(target=rotate_mid_sweep)
    rotator.start()
    result = envelope.sweep(kms_pg, batch_size=4, progress=lambda p: sweeping.set())
    rotator.join(30)
    assert waited and waited[0] < 6 * commit_seconds, waited  # the sweep alone takes ~15 commits' time
    assert result.remaining == 0 and versions_of(kms_pg) == {3: 120}
    assert_all_decrypt(kms_pg, objects)
    assert commit_threads() == []
