"""Ledger verification vs raw hashlib over the same canonical bytes.

    python benchmarks/bench_ledger.py              # 100k entries
    python benchmarks/bench_ledger.py --full       # 100k and 1M entries
    KMS_BENCH_DATABASE_URL=postgresql://... selects the server (default 127.0.0.1:5432).

Builds a throwaway PostgreSQL database holding a valid chain of N entries (bulk COPY),
then in the same process times ``ledger.verify`` (stream rows, rebuild canonical
documents, hash, compare links) against two baselines over the same data: raw
``hashlib.sha256`` over the same canonical bytes (in memory; the hash floor) and
streaming the same rows out of the database (the read floor)."""

from __future__ import annotations

import argparse
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

from benchmarks.harness import emit, peak_rss_mb, result, run_sizes, timed  # noqa: E402
from kms_pipelines.core import db, ledger  # noqa: E402
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


def child(n: int) -> None:
    admin = create_engine(ADMIN, isolation_level="AUTOCOMMIT")
    name = f"kms_bench_{uuid.uuid4().hex[:8]}"
    with admin.connect() as c:
        c.execute(text(f'CREATE DATABASE "{name}"'))
    url = make_url(ADMIN).set(database=name).render_as_string(hide_password=False)
    try:
        # Verification runs first, so the recorded peak RSS is population + verification;
        # both stream, and the baselines afterwards hold at most one chunk.
        populate(url, n)
        engine = db.make_engine(url)

        def read_only():
            with engine.connect() as conn:
                for _ in ledger.iter_rows(conn):
                    pass

        outcome = {}
        seconds = timed(lambda: outcome.setdefault("r", ledger.verify(engine)))
        assert outcome["r"].ok and outcome["r"].count == n, outcome["r"]
        verify_peak = peak_rss_mb()
        read_seconds = timed(read_only)
        baseline = hash_baseline_seconds(n)
        rec = result("ledger_verify", n, seconds, baseline,
                     baseline="hashlib.sha256 over the same canonical bytes (in memory)",
                     db_read_rate=round(n / read_seconds, 1),
                     ratio_vs_db_read=round(read_seconds / seconds, 4))
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
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args.n)
        return
    sizes = [args.n] if args.n else ([100_000, 1_000_000] if args.full else [100_000])
    run_sizes(__file__, sizes, [])


if __name__ == "__main__":
    main()
