"""Ledger verification vs the raw read of the same rows (psycopg 3 binary COPY).

    python benchmarks/bench_ledger.py                     # 100k entries
    python benchmarks/bench_ledger.py --full              # 100k and 1M entries
    python benchmarks/bench_ledger.py --n 20000 --repeat 3
    KMS_BENCH_DATABASE_URL=postgresql://... selects the server (default 127.0.0.1:5432).

Builds a throwaway PostgreSQL database holding a valid chain of N entries (bulk COPY),
then, in the same process and interleaved (median of ``--repeat`` runs each), times
``ledger.verify`` with the policy's workers against the raw limit: ``COPY (SELECT <every
ledger column> ORDER BY seq) TO STDOUT (FORMAT binary)`` read to the end by psycopg 3,
doing nothing with the rows. Also reported: the 1-process COPY verifier, the old
row-by-row verifier (SQLAlchemy stream, once) and hashlib alone over the same bytes."""

from __future__ import annotations

import argparse
import resource
import hashlib
import os
import sys
import time
import uuid
from datetime import datetime, timedelta, timezone
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sqlalchemy import create_engine, text  # noqa: E402
from sqlalchemy.engine import make_url  # noqa: E402

from benchmarks.harness import emit, interleaved, load_average, peak_rss_mb, result, run_sizes, timed  # noqa: E402
from kms_pipelines.core import db, ledger, ledger_copy  # noqa: E402
from kms_pipelines.core.policy import load_policy  # noqa: E402
from kms_pipelines.core.canonical import canonical_fast  # noqa: E402

ADMIN = db.normalize_url(os.environ.get("KMS_BENCH_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/postgres"))
STATES = ["active", "rotated", "revoked", "destroyed"]


def build_chain(n: int):
    """Yield (row tuple for COPY, canonical bytes) for a valid chain of n entries."""
    prev = ledger.GENESIS_HASH
    t0 = datetime(2026, 1, 1, tzinfo=timezone.utc)
    for seq in range(1, n + 1):
        at = t0 + timedelta(seconds=seq)
        approvers = ["alice", "bob"] if seq % 7 == 0 else []
        doc = ledger.entry_document(seq, at, f"service:svc-{seq % 50}", seq % 9 + 1, STATES[seq % 3],
                                    STATES[(seq + 1) % 4], "dagster", approvers,
                                    f"CHG-{seq}" if approvers else None, "cadence", None, prev)
        raw = canonical_fast(doc)
        h = hashlib.sha256(raw).hexdigest()
        yield (seq, at.isoformat(), doc["key"], doc["version"], doc["from"], doc["to"], "dagster",
               canonical_fast(approvers).decode(), doc["ticket"], "cadence", None, prev, h), raw
        prev = h


def populate(url: str, n: int) -> None:
    engine = db.make_engine(url)
    db.upgrade(engine)
    conn = engine.raw_connection()
    try:
        cur = conn.cursor()
        cols = ("seq, at, key_name, key_version, from_state, to_state, actor, approvers, change_ticket, "
                "reason, event_id, prev_hash, entry_hash")
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


RAW_COPY = ("COPY (SELECT seq, at, key_name, key_version, from_state, to_state, actor, approvers, change_ticket, "
            "reason, event_id, prev_hash, entry_hash FROM ledger_entries ORDER BY seq) TO STDOUT (FORMAT binary)")


def raw_copy_read(dsn: str) -> None:
    import psycopg

    with psycopg.connect(dsn) as conn, conn.cursor().copy(RAW_COPY) as copy:
        for _ in copy:
            pass


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
            outcome["r"] = ledger.verify(engine, workers=p.verify_workers,
                                         min_entries_per_worker=p.verify_min_entries_per_worker)

        seconds, raw_seconds, runs = interleaved(ours, lambda: raw_copy_read(dsn), repeat)
        assert outcome["r"].ok and outcome["r"].count == n, outcome["r"]
        verify_peak = peak_rss_mb()  # population + the verifier (workers fork from here)
        one_seconds = timed(lambda: ledger.verify(engine, workers=1))
        streamed = timed(lambda: ledger.verify_streamed(engine)) if n <= 200_000 else None
        hash_seconds = hash_baseline_seconds(n)
        rec = result("ledger_verify", n, seconds, raw_seconds,
                     baseline="psycopg 3 COPY (SELECT every ledger column) TO STDOUT (FORMAT binary), rows discarded",
                     workers=p.verify_workers if n >= 2 * p.verify_min_entries_per_worker else 1,
                     one_process_rate=round(n / one_seconds, 1),
                     row_by_row_rate=round(n / streamed, 1) if streamed else None,
                     hashlib_rate=round(n / hash_seconds, 1), load_avg=load_average(), **runs)
        rec["peak_rss_mb"] = verify_peak
        # the verifier's worker processes (forked, each streaming its own COPY)
        rec["workers_peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024, 1)
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
