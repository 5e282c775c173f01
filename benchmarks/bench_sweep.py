"""DEK rewrap sweep (software keystore, PostgreSQL) against its raw limits, in the same run.

For each size (100k by default, plus 1M with --full), in its own child process:

* ``envelope.sweep.vs_raw_update``: ``envelope.sweep`` of N DEKs against a raw batched
  UPDATE of the same N rows in id order (one commit per batch, on an identical copy of the
  table with the same indexes, each run onto a version of its own), sent three raw ways
  (``RAW_FORMS``: arrays to ``unnest``; binary COPY into a temporary table then
  ``UPDATE … FROM`` it with the planner's plan; the same with the sweep's primary-key plan;
  that over two connections taking alternate batches, so a commit overlaps the next batch as
  in the sweep), each at the sweep's largest batch and at the policy's cap
  (``envelope.batch_size_max``): the fastest of the eight medians is the raw limit;
* ``envelope.sweep.vs_raw_crypto``: the same sweep against a raw ``cryptography``
  ``aes_key_unwrap_with_padding`` + ``aes_key_wrap_with_padding`` loop over the same N
  wrapped DEKs (only the crypto is timed; the rows are streamed in batches);
* ``envelope.sweep``: against the slower of the two (the goal is ratio >= 0.5).

``peak_rss_mb`` is the child's peak after the sweep (population streams through COPY in
chunks and the baselines stream too), so flat memory from 100k to 1M shows in it.
``--pkcs11`` adds ``envelope.sweep.pkcs11``: the same sweep with the keys in SoftHSM2
(rewrap inside the token) on a smaller N, against the software sweep of the same N.

    .venv/bin/python benchmarks/bench_sweep.py [--full] [--pkcs11] [--batch-size 1000]

PostgreSQL comes from KMS_BENCH_DATABASE_URL (default postgresql://postgres@127.0.0.1:5432/postgres);
each child creates and drops its own database.
"""

from __future__ import annotations

import argparse
import os
import secrets
import statistics
import sys
import tempfile
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.harness import emit, load_average, peak_rss_mb, result, run_sizes  # noqa: E402

ADMIN_URL = os.environ.get("KMS_BENCH_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
KEY = "data:postgres"
COPY_CHUNK = 50_000


def _psycopg_url(url: str) -> str:
    return url.replace("postgresql+psycopg://", "postgresql://")


class BenchDb:
    def __init__(self):
        import psycopg
        from sqlalchemy.engine import make_url

        self.name = f"kms_bench_{uuid.uuid4().hex[:10]}"
        with psycopg.connect(_psycopg_url(ADMIN_URL), autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{self.name}"')
        self.url = make_url(ADMIN_URL).set(database=self.name).render_as_string(hide_password=False)

    def drop(self):
        import psycopg

        with psycopg.connect(_psycopg_url(ADMIN_URL), autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{self.name}" WITH (FORCE)')


def make_context(url: str, keystore, home: Path):
    from kms_pipelines.core.foundation import db
    from kms_pipelines.core.foundation.clock import SystemClock
    from kms_pipelines.core.foundation.context import KmsContext
    from kms_pipelines.core.foundation.policy import load_policy
    from kms_pipelines.core.keys import lifecycle

    engine = db.make_engine(url)
    db.upgrade(engine)
    ctx = KmsContext(
        engine=engine, keystore=keystore, policy=load_policy(), clock=SystemClock(), home=home, actor="bench"
    )
    lifecycle.ensure_key(ctx, KEY)
    return ctx


def active_ref(ctx) -> tuple[int, str]:
    from kms_pipelines.core.keys import lifecycle

    with ctx.transaction() as s:
        v = lifecycle.active_version(lifecycle.get_key(s, KEY))
        return v.version, v.wrap_ref


def populate(ctx, n: int, wrap_one) -> float:
    """Stream N DEK rows (wrapped under the active version) into ``deks`` with COPY."""
    import psycopg

    from kms_pipelines.core.envelope.data_keys import shard_of

    version, _ = active_ref(ctx)
    now = datetime.now(UTC)
    start = time.perf_counter()
    with psycopg.connect(_psycopg_url(ctx.engine.url.render_as_string(hide_password=False))) as conn:
        with conn.cursor() as cur:
            for lo in range(1, n + 1, COPY_CHUNK):
                with cur.copy(
                    "COPY deks (id, key_name, key_version, wrapped, object_id, shard, created_at) FROM STDIN"
                ) as copy:
                    for i in range(lo, min(lo + COPY_CHUNK, n + 1)):
                        oid = f"obj-{i}"
                        copy.write_row((i, KEY, version, wrap_one(), oid, shard_of(KEY, oid), now))
            cur.execute("SELECT setval(pg_get_serial_sequence('deks', 'id'), %s)", (n,))
        conn.commit()
        conn.autocommit = True
        conn.execute("VACUUM ANALYZE deks")
    return time.perf_counter() - start


def clone_for_update_baseline(ctx) -> None:
    import psycopg

    with psycopg.connect(_psycopg_url(ctx.engine.url.render_as_string(hide_password=False)), autocommit=True) as conn:
        conn.execute("CREATE TABLE deks_baseline (LIKE deks INCLUDING ALL)")
        conn.execute("INSERT INTO deks_baseline SELECT * FROM deks")
        conn.execute("VACUUM ANALYZE deks_baseline")


RAW_UNNEST = (
    "UPDATE deks_baseline AS d SET wrapped = v.w, key_version = %s, rewrapped_at = now() "
    "FROM unnest(%s::bigint[], %s::bytea[]) AS v(id, w) WHERE d.id = v.id AND d.key_version = %s "
    "AND d.key_name = %s"
)
RAW_COPY_TABLE = (
    "CREATE TEMPORARY TABLE IF NOT EXISTS raw_batch (id bigint, w bytea, old integer) ON COMMIT DELETE ROWS"
)
RAW_COPY_UPDATE = (
    "UPDATE deks_baseline AS d SET wrapped = v.w, key_version = %s, rewrapped_at = now() "
    "FROM raw_batch AS v WHERE d.id = v.id AND d.key_version = %s AND d.key_name = %s"
)
# the sweep's form (core/envelope/data_keys.py): the old version as a join column, hash and
# merge joins off, so every row is a primary-key lookup driven by the batch table
RAW_COPY_PK_SETTINGS = "SET LOCAL enable_hashjoin = off; SET LOCAL enable_mergejoin = off"
RAW_COPY_PK_UPDATE = (
    "UPDATE deks_baseline AS d SET wrapped = v.w, key_version = %s, rewrapped_at = now() "
    "FROM raw_batch AS v WHERE d.id = v.id AND d.key_version = v.old AND d.key_name = %s"
)
# the raw ways of sending a batch, all timed; the fastest is the limit. ``copy_pk_2conn`` is
# ``copy_pk`` over two connections taking alternate batches, so one builds and sends a batch
# while the other's UPDATE and commit run: the sweep overlaps its next batch with the commit
# the same way, and a serial raw UPDATE measured slower than the sweep at 1M.
RAW_FORMS = ("unnest", "copy", "copy_pk", "copy_pk_2conn")


def raw_update_seconds(ctx, n: int, batch: int, old: int, new: int, form: str = "unnest") -> float:
    """Raw batched UPDATE (same rows and indexes as the sweep's write, no reads, no crypto).

    ``form``: ``unnest`` binds the ids and values as two arrays; ``copy`` sends them by
    binary COPY into a temporary table and updates from it with the planner's own plan;
    ``copy_pk`` is ``copy`` with the sweep's plan (primary-key lookups)."""
    import psycopg

    filler = secrets.token_bytes(40)
    url = _psycopg_url(ctx.engine.url.render_as_string(hide_password=False))
    if form == "copy_pk_2conn":
        return _raw_update_two_connections(url, n, batch, old, new, filler)
    with psycopg.connect(url) as conn:
        start = time.perf_counter()
        for lo in range(1, n + 1, batch):
            ids = range(lo, min(lo + batch, n + 1))
            if form == "unnest":
                conn.execute(RAW_UNNEST, (new, list(ids), [filler] * len(ids), old, KEY))
                conn.commit()
            else:
                _copy_batch(conn, ids, filler, old, new, primary_key_plan=form == "copy_pk")
        seconds = time.perf_counter() - start
        assert conn.execute("SELECT count(*) FROM deks_baseline WHERE key_version = %s", (new,)).fetchone()[0] == n
        conn.commit()
    return seconds  # the clone stays for the next interleaved run (the database is dropped at the end)


def _copy_batch(conn, ids: range, filler: bytes, old: int, new: int, *, primary_key_plan: bool) -> None:
    """One raw batch: binary COPY into the temporary table, then UPDATE … FROM it, with the
    planner's plan or the sweep's primary-key plan; committed."""
    with conn.cursor() as cur:
        if primary_key_plan:
            cur.execute(RAW_COPY_PK_SETTINGS)
        cur.execute(RAW_COPY_TABLE)
        with cur.copy("COPY raw_batch (id, w, old) FROM STDIN (FORMAT BINARY)") as copy:
            copy.set_types(["int8", "bytea", "int4"])
            for i in ids:
                copy.write_row((i, filler, old))
        if primary_key_plan:
            cur.execute(RAW_COPY_PK_UPDATE, (new, KEY))
        else:
            cur.execute(RAW_COPY_UPDATE, (new, old, KEY))
    conn.commit()


def _raw_update_two_connections(url: str, n: int, batch: int, old: int, new: int, filler: bytes) -> float:
    """``copy_pk`` with batches alternating between two connections in two threads (psycopg
    releases the GIL while it waits on the server): the raw UPDATE with the overlap the sweep has."""
    import threading

    import psycopg

    conns = [psycopg.connect(url) for _ in range(2)]
    batches = [range(lo, min(lo + batch, n + 1)) for lo in range(1, n + 1, batch)]
    errors: list[BaseException] = []

    def work(conn, mine):
        try:
            for ids in mine:
                _copy_batch(conn, ids, filler, old, new, primary_key_plan=True)
        except BaseException as exc:  # noqa: BLE001 - re-raised in the caller below
            errors.append(exc)

    try:
        threads = [threading.Thread(target=work, args=(conns[k], batches[k::2])) for k in range(2)]
        start = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        seconds = time.perf_counter() - start
        if errors:
            raise errors[0]
        moved = conns[0].execute("SELECT count(*) FROM deks_baseline WHERE key_version = %s", (new,)).fetchone()[0]
        assert moved == n, (moved, n)
        conns[0].commit()
        return seconds
    finally:
        for conn in conns:
            conn.close()


def raw_crypto_seconds(ctx, kek_now: bytes, kek_other: bytes, batch: int) -> tuple[float, int]:
    """Raw unwrap+wrap loop over the same N wrapped DEKs (streamed; only crypto timed)."""
    import psycopg
    from cryptography.hazmat.primitives.keywrap import aes_key_unwrap_with_padding, aes_key_wrap_with_padding

    seconds, count = 0.0, 0
    with psycopg.connect(_psycopg_url(ctx.engine.url.render_as_string(hide_password=False))) as conn:
        with conn.cursor(name="bench_stream") as cur:
            cur.itersize = batch
            cur.execute("SELECT wrapped FROM deks WHERE key_name = %s", (KEY,))
            while True:
                rows = cur.fetchmany(batch)
                if not rows:
                    break
                start = time.perf_counter()
                for (w,) in rows:
                    aes_key_wrap_with_padding(kek_other, aes_key_unwrap_with_padding(kek_now, w))
                seconds += time.perf_counter() - start
                count += len(rows)
    return seconds, count


def software_run(n: int, batch: int, repeat: int = 3) -> None:
    from cryptography.hazmat.primitives.keywrap import aes_key_wrap_with_padding

    from kms_pipelines.core.envelope import data_keys as envelope
    from kms_pipelines.core.foundation.keystore.software import SoftwareKeyStore
    from kms_pipelines.core.keys import lifecycle

    bench = BenchDb()
    try:
        with tempfile.TemporaryDirectory(prefix="kms-bench-sweep-") as tmp:
            store = SoftwareKeyStore(Path(tmp) / "keys", secrets.token_bytes(32))
            ctx = make_context(bench.url, store, Path(tmp))
            old, old_ref = active_ref(ctx)
            kek_old = store._aes(old_ref)  # benchmark only: generate wrapped DEKs fast, outside the API
            populate_s = populate(ctx, n, lambda: aes_key_wrap_with_padding(kek_old, os.urandom(32)))
            clone_for_update_baseline(ctx)
            rss_before = peak_rss_mb()
            # --batch-size 0 (default): the policy's adaptive sizing; N: a constant N
            sizing = envelope.policy_batching(ctx) if not batch else {"batch_size": batch}
            # Interleaved: each repeat rotates, sweeps every DEK to the new version, then runs the
            # raw UPDATE of the same rows (on the clone) at the largest batch that sweep used.
            # Two raw batch sizes (the sweep's largest batch and the policy's cap) times the three
            # raw ways of sending a batch (RAW_FORMS), all timed every round in rotating order
            # (each UPDATE leaves the clone a little more bloated); the fastest median is the raw
            # limit. Every raw run moves the clone to a version of its own, so none is a
            # same-value rewrite.
            cap = sizing.get("max_batch_size") or batch
            sweep_runs, sizes = [], []
            labels = [
                (f"{form}_{which}", form, which)
                for which in ("sweep_max_batch", "policy_max_batch")
                for form in RAW_FORMS
            ]
            update_runs: dict[str, list[float]] = {label: [] for label, _, _ in labels}
            clone_version = old
            for r in range(repeat):
                lifecycle.rotate(ctx, KEY, reason="cadence")
                sizes = []
                sweep = envelope.sweep(ctx, KEY, **sizing, progress=lambda p, sizes=sizes: sizes.append(p.moved))
                assert sweep.moved == n and sweep.remaining == 0, sweep.to_dict()
                sweep_runs.append(sweep.seconds)
                batch = max(sizes)
                shift = r % len(labels)
                for label, form, which in labels[shift:] + labels[:shift]:
                    size = batch if which == "sweep_max_batch" else cap
                    raw_s = raw_update_seconds(ctx, n, size, clone_version, clone_version + 1, form)
                    update_runs[label].append(raw_s)
                    clone_version += 1
            sweep_rss = peak_rss_mb()
            update_medians = {k: statistics.median(v) for k, v in update_runs.items()}
            raw_label = min(update_medians, key=update_medians.get)
            sweep_s, update_s = statistics.median(sweep_runs), update_medians[raw_label]
            # any second KEK will do for the wrap side: only the crypto is timed
            crypto_s, counted = raw_crypto_seconds(ctx, store._aes(active_ref(ctx)[1]), kek_old, batch)
            assert counted == n
            common = {
                "batch_size": batch,
                "adaptive": "batch_target_seconds" in sizing,
                "batches": len(sizes),
                "load_avg": load_average(),
                "repeat": repeat,
                "runs_sweep_s": [round(x, 3) for x in sweep_runs],
                "raw_update_batch": raw_label,
                "policy_max_batch": cap,
                "sweep_commits_last_run": len(sizes),
                "raw_update_rates": {k: round(n / v, 1) for k, v in update_medians.items()},
                "runs_raw_update_s": [round(x, 3) for x in update_runs[raw_label]],
                "backend": "software",
                "database": "postgresql",
                "populate_seconds": round(populate_s, 2),
                "rss_before_sweep_mb": rss_before,
                "sweep_peak_rss_mb": sweep_rss,
            }
            emit(result("envelope.sweep.vs_raw_update", n, sweep_s, update_s, **common))
            emit(result("envelope.sweep.vs_raw_crypto", n, sweep_s, crypto_s, **common))
            slower = max(update_s, crypto_s)
            emit(
                result(
                    "envelope.sweep",
                    n,
                    sweep_s,
                    slower,
                    baseline="raw_update" if slower == update_s else "raw_crypto",
                    raw_update_rate=round(n / update_s, 1),
                    raw_crypto_rate=round(n / crypto_s, 1),
                    **common,
                )
            )
            ctx.engine.dispose()
    finally:
        bench.drop()


def _sweep_with(keystore, n: int, batch: int, home: Path) -> float:
    from kms_pipelines.core.envelope import data_keys as envelope
    from kms_pipelines.core.keys import lifecycle

    bench = BenchDb()
    try:
        ctx = make_context(bench.url, keystore, home)
        _, ref = active_ref(ctx)
        populate(ctx, n, lambda: keystore.new_wrapped_dek(ref))
        lifecycle.rotate(ctx, KEY, reason="cadence")
        sweep = envelope.sweep(ctx, KEY, batch_size=batch or 1000)
        assert sweep.moved == n and sweep.remaining == 0
        ctx.engine.dispose()
        return sweep.seconds
    finally:
        bench.drop()


def pkcs11_run(n: int, batch: int) -> None:
    from kms_pipelines.core.foundation.keystore.softhsm_setup import init_softhsm_token
    from kms_pipelines.core.foundation.keystore.software import SoftwareKeyStore

    with tempfile.TemporaryDirectory(prefix="kms-bench-sweep-hsm-") as tmp:
        token = init_softhsm_token(Path(tmp) / "softhsm", "kms-bench-sweep", "1234", "5678")
        from kms_pipelines.core.foundation.keystore.pkcs11 import Pkcs11KeyStore

        software = SoftwareKeyStore(Path(tmp) / "keys", secrets.token_bytes(32))
        hsm = Pkcs11KeyStore(token.lib_path, token.label, token.pin)
        try:
            base = _sweep_with(software, n, batch, Path(tmp) / "sw")
            seconds = _sweep_with(hsm, n, batch, Path(tmp) / "hsm")
            emit(
                result(
                    "envelope.sweep.pkcs11",
                    n,
                    seconds,
                    base,
                    baseline="software sweep, same n",
                    batch_size=batch,
                    backend="pkcs11 (SoftHSM2)",
                    database="postgresql",
                )
            )
        finally:
            hsm.close()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=None, help="one size (default: 100k; 100k and 1M with --full)")
    parser.add_argument("--full", action="store_true", help="also run 1M DEKs")
    parser.add_argument("--pkcs11", action="store_true", help="also record the PKCS#11 (SoftHSM2) sweep rate")
    parser.add_argument("--pkcs11-n", type=int, default=5000)
    parser.add_argument(
        "--batch-size",
        type=int,
        default=0,
        help="constant DEKs per batch (default 0: policy envelope sizing, adaptive)",
    )
    parser.add_argument("--repeat", type=int, default=3, help="interleaved sweep / raw UPDATE runs (median)")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--mode", choices=["software", "pkcs11"], default="software", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        if args.mode == "pkcs11":
            pkcs11_run(args.n, args.batch_size)
        else:
            software_run(args.n, args.batch_size, args.repeat)
        return 0
    sizes = [args.n] if args.n else ([100_000, 1_000_000] if args.full else [100_000])
    extra = ["--batch-size", str(args.batch_size), "--repeat", str(args.repeat)]
    run_sizes(__file__, sizes, extra + ["--mode", "software"])
    if args.pkcs11:
        run_sizes(__file__, [args.pkcs11_n], extra + ["--mode", "pkcs11"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
