"""Ledger verification vs the raw read of the same rows (psycopg 3 binary COPY).

    python benchmarks/bench_ledger.py                     # 100k entries
    python benchmarks/bench_ledger.py --full              # 100k and 1M entries
    python benchmarks/bench_ledger.py --n 20000 --repeat 3
    KMS_BENCH_DATABASE_URL=postgresql://... selects the server (default 127.0.0.1:5432).

Builds a throwaway PostgreSQL database holding a valid chain of N entries (bulk COPY),
then, in the same process and interleaved (median of ``--repeat`` runs each), times
``ledger.verify`` with the policy's workers against the raw limit: the fastest of several
raw reads of ``COPY (SELECT <every ledger column> ORDER BY seq) TO STDOUT`` doing nothing
with the rows (psycopg 3 text and binary, psycopg2 ``copy_expert`` text and binary, and
psycopg2 over two connections in parallel, the same with the planner's sort turned off
(rows from the primary-key index, as the verifier reads them), and the whole table in its
physical order;
every one's rate is in ``raw_rates``). Also
reported: the 1-process COPY verifier, the old row-by-row verifier (SQLAlchemy stream,
once) and hashlib alone over the same bytes."""

from __future__ import annotations

import argparse
import hashlib
import os
import statistics
import sys
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sqlalchemy import create_engine, text  # noqa: E402
from sqlalchemy.engine import make_url  # noqa: E402

from benchmarks.harness import emit, load_average, peak_rss_mb, result, run_sizes, timed  # noqa: E402
from kms_pipelines.core.foundation import db
from kms_pipelines.core.foundation.canonical import canonical_fast  # noqa: E402
from kms_pipelines.core.foundation.policy import load_policy  # noqa: E402
from kms_pipelines.core.ledger import ledger, ledger_copy  # noqa: E402

ADMIN = db.normalize_url(os.environ.get("KMS_BENCH_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/postgres"))
STATES = ["active", "rotated", "revoked", "destroyed"]


def build_chain(n: int):
    """Yield (row tuple for COPY, canonical bytes) for a valid chain of n entries."""
    prev = ledger.GENESIS_HASH
    t0 = datetime(2026, 1, 1, tzinfo=UTC)
    for seq in range(1, n + 1):
        at = t0 + timedelta(seconds=seq)
        approvers = ["alice", "bob"] if seq % 7 == 0 else []
        doc = ledger.entry_document(
            seq,
            at,
            f"service:svc-{seq % 50}",
            seq % 9 + 1,
            STATES[seq % 3],
            STATES[(seq + 1) % 4],
            "dagster",
            approvers,
            f"CHG-{seq}" if approvers else None,
            "cadence",
            None,
            prev,
        )
        raw = canonical_fast(doc)
        h = hashlib.sha256(raw).hexdigest()
        yield (
            (
                seq,
                at.isoformat(),
                doc["key"],
                doc["version"],
                doc["from"],
                doc["to"],
                "dagster",
                canonical_fast(approvers).decode(),
                doc["ticket"],
                "cadence",
                None,
                prev,
                h,
            ),
            raw,
        )
        prev = h


def populate(url: str, n: int) -> None:
    engine = db.make_engine(url)
    db.upgrade(engine)
    conn = engine.raw_connection()
    try:
        cur = conn.cursor()
        cols = (
            "seq, at, key_name, key_version, from_state, to_state, actor, approvers, change_ticket, "
            "reason, event_id, prev_hash, entry_hash"
        )
        with cur.copy(f"COPY ledger_entries ({cols}) FROM STDIN") as copy:
            for row, _raw in build_chain(n):
                copy.write_row(row)
        conn.commit()
    finally:
        conn.close()
    engine.dispose()


def hash_baseline_seconds(n: int, chunk: int = 10_000) -> float:
    """Time only hashlib over the chain's canonical bytes, built (untimed) in bounded chunks."""
    total, pending = 0.0, []
    sha = hashlib.sha256

    def flush():
        start = time.perf_counter()
        for raw in pending:
            sha(raw).hexdigest()
        return time.perf_counter() - start

    for _row, raw in build_chain(n):
        pending.append(raw)
        if len(pending) == chunk:
            total += flush()
            pending.clear()
    return total + flush()


RAW_COLUMNS = (
    "seq, at, key_name, key_version, from_state, to_state, actor, approvers, change_ticket, "
    "reason, event_id, prev_hash, entry_hash"
)
RAW_COPY = f"COPY (SELECT {RAW_COLUMNS} FROM ledger_entries ORDER BY seq) TO STDOUT"


class _Discard:
    write = len  # copy_expert calls write(row) from C: a C no-op, nothing kept


def _pg3_read(dsn: str, sql: str) -> None:
    import psycopg

    with psycopg.connect(dsn) as conn, conn.cursor().copy(sql) as copy:
        for _ in copy:
            pass


def _pg2_read(dsn: str, sql: str, options: str = "") -> None:
    import psycopg2

    conn = psycopg2.connect(dsn, options=options)
    try:
        conn.cursor().copy_expert(sql, _Discard())
    finally:
        conn.close()


def _pg2_read_halves(dsn: str, n: int, options: str = "") -> None:
    """Two connections each reading half the rows at once (psycopg2 waits for rows without the GIL)."""
    from concurrent.futures import ThreadPoolExecutor

    half = n // 2
    sqls = [
        f"COPY (SELECT {RAW_COLUMNS} FROM ledger_entries WHERE seq <= {half} ORDER BY seq) TO STDOUT",
        f"COPY (SELECT {RAW_COLUMNS} FROM ledger_entries WHERE seq > {half} ORDER BY seq) TO STDOUT",
    ]
    with ThreadPoolExecutor(2) as pool:
        list(pool.map(lambda sql: _pg2_read(dsn, sql, options), sqls))


def raw_reads(dsn: str, n: int) -> dict:
    """Every raw way of reading the ledger's rows measured here, rows discarded; the fastest
    in each run is the raw limit (BENCHMARKS.md: "the fastest raw way in the same run")."""
    return {
        "psycopg3 COPY binary": lambda: _pg3_read(dsn, RAW_COPY + " (FORMAT binary)"),
        "psycopg3 COPY text": lambda: _pg3_read(dsn, RAW_COPY),
        "psycopg2 copy_expert text": lambda: _pg2_read(dsn, RAW_COPY),
        "psycopg2 copy_expert binary": lambda: _pg2_read(dsn, RAW_COPY + " (FORMAT binary)"),
        "psycopg2 copy_expert text, 2 connections in parallel": lambda: _pg2_read_halves(dsn, n),
        # as the verifier reads: rows in primary-key order from the index, never a sort (a
        # table just loaded has no statistics, and the planner would sort it per query)
        "psycopg2 copy_expert text, 2 connections, index order (enable_sort=off)": lambda: _pg2_read_halves(
            dsn, n, "-c enable_sort=off"
        ),
        # the table in its physical order: no index scan, no sort (a verifier needs seq order)
        "psycopg2 copy_expert text, COPY ledger_entries (table order)": lambda: _pg2_read(
            dsn, "COPY ledger_entries TO STDOUT"
        ),
    }


def raw_copy_read(dsn: str) -> None:
    _pg3_read(dsn, RAW_COPY + " (FORMAT binary)")


def child(n: int, repeat: int) -> None:
    admin = create_engine(ADMIN, isolation_level="AUTOCOMMIT")
    name = f"kms_bench_{uuid.uuid4().hex[:8]}"
    with admin.connect() as c:
        c.execute(text(f'CREATE DATABASE "{name}"'))
    url = make_url(ADMIN).set(database=name).render_as_string(hide_password=False)
    try:
        populate(url, n)
        engine = db.make_engine(url)
        dsn = ledger_copy.conninfo(engine)
        p = load_policy().ledger
        outcome = {}

        def ours():
            outcome["r"] = ledger.verify(
                engine, workers=p.verify_workers, min_entries_per_worker=p.verify_min_entries_per_worker
            )

        raws = raw_reads(dsn, n)
        # Interleaved: each round times every raw way, then ours; medians per side.
        before = load_average()
        raw_runs: dict[str, list[float]] = {k: [] for k in raws}
        ours_runs: list[float] = []
        for _ in range(max(1, repeat)):
            for way, fn in raws.items():
                raw_runs[way].append(timed(fn))
            ours_runs.append(timed(ours))
        assert outcome["r"].ok and outcome["r"].count == n, outcome["r"]
        raw_medians = {k: statistics.median(v) for k, v in raw_runs.items()}
        fastest = min(raw_medians, key=raw_medians.get)
        seconds, raw_seconds = statistics.median(ours_runs), raw_medians[fastest]
        verify_peak = peak_rss_mb()  # population + the verifier (its first segment runs here)
        one_seconds = timed(lambda: ledger.verify(engine, workers=1))
        streamed = timed(lambda: ledger.verify_streamed(engine)) if n <= 200_000 else None
        hash_seconds = hash_baseline_seconds(n)
        parts = min(p.verify_workers, max(1, n // p.verify_min_entries_per_worker))
        rec = result(
            "ledger_verify",
            n,
            seconds,
            raw_seconds,
            baseline=f"{fastest}: COPY (SELECT every ledger column) TO STDOUT, rows discarded "
            "(the fastest raw read measured in this run)",
            raw_rates={k: round(n / v, 1) for k, v in raw_medians.items()},
            workers=parts,
            one_process_rate=round(n / one_seconds, 1),
            one_process_ratio=round(raw_seconds / one_seconds, 4),
            row_by_row_rate=round(n / streamed, 1) if streamed else None,
            hashlib_rate=round(n / hash_seconds, 1),
            load_avg=load_average(),
            runs_ours_s=[round(x, 4) for x in ours_runs],
            runs_raw_s=[round(x, 4) for x in raw_runs[fastest]],
            repeat=len(ours_runs),
            load_before=before,
            load_after=load_average(),
        )
        # This process verifies the first segment itself, so its peak covers one segment's
        # memory (the workers' are alike; they are the fork server's children, not ours).
        rec["peak_rss_mb"] = verify_peak
        emit(rec)
        engine.dispose()
    finally:
        with admin.connect() as c:
            c.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int)
    ap.add_argument("--full", action="store_true", help="also run 1,000,000 entries")
    ap.add_argument("--repeat", type=int, default=3, help="interleaved runs of each side (median reported)")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args.n, args.repeat)
        return
    sizes = [args.n] if args.n else ([100_000, 1_000_000] if args.full else [100_000])
    run_sizes(__file__, sizes, ["--repeat", str(args.repeat)])


if __name__ == "__main__":
    main()
