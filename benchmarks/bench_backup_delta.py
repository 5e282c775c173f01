"""Storage cost of full nightly archives vs a delta scheme (measured, not built).

    python benchmarks/bench_backup_delta.py [--n 1000000] [--change 0.01]

Builds a throwaway PostgreSQL database with N DEKs (the ``deks`` table as the sweep
benchmark fills it), takes the dump a nightly archive holds (``pg_dump -Fc -Z0``, then
``zstd -3``, as ``kms backup create`` does; age adds ~200 bytes), rewraps ``--change`` of
the DEKs (a day of changes), dumps again, and measures three deltas of that day:

* ``row_delta``: the changed rows alone (COPY of the rows, ``zstd -3``) — a logical
  incremental that knows which rows changed;
* ``patch_delta``: ``zstd --patch-from=<yesterday's dump>`` of today's dump — a binary
  delta between consecutive nightly dumps, needing nothing from the database;
* ``unchanged_patch``: the same for a night with no change.

It then prints one JSON line with the yearly cost under GFS (``backup.keep_nightly``
nightlies + weekly archives kept ``backup.keep_weekly_days``, from policy.yaml): the
bytes held at any time and the bytes uploaded per year, for full archives and for a
delta scheme that keeps one full per retained week and a patch per night.
"""

from __future__ import annotations

import argparse
import json
import secrets
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.bench_sweep import BenchDb, _psycopg_url, make_context, populate  # noqa: E402
from benchmarks.harness import load_average  # noqa: E402


def _dump(url: str, out: Path) -> int:
    with out.open("wb") as f:
        subprocess.run(["pg_dump", "-Fc", "-Z", "0", "--no-owner", "-d", url], stdout=f, check=True)
    return out.stat().st_size


def _zstd_size(path: Path, *extra: str) -> int:
    out = path.with_suffix(path.suffix + ".zst")
    subprocess.run(["zstd", "-q", "-f", "-3", "-T0", *extra, str(path), "-o", str(out)], check=True)
    size = out.stat().st_size
    out.unlink()
    return size


def _patch_size(old: Path, new: Path) -> int:
    out = new.with_suffix(".patch.zst")
    subprocess.run(
        ["zstd", "-q", "-f", "-3", "-T0", "--long=31", f"--patch-from={old}", str(new), "-o", str(out)], check=True
    )
    size = out.stat().st_size
    out.unlink()
    return size


def _rewrap(url: str, n: int, fraction: float, out: Path) -> int:
    """Change ``fraction`` of the DEKs (new wrapped bytes, next version); returns the changed rows' zstd size."""
    import psycopg

    ids = sorted(secrets.SystemRandom().sample(range(1, n + 1), int(n * fraction)))
    with psycopg.connect(url) as conn, conn.cursor() as cur:
        cur.execute(
            "UPDATE deks SET wrapped = w, key_version = key_version + 1 FROM unnest(%s::bigint[], %s::bytea[]) "
            "AS u(i, w) WHERE deks.id = u.i",
            (ids, [secrets.token_bytes(40) for _ in ids]),
        )
        conn.commit()
        with out.open("wb") as f, cur.copy("COPY (SELECT * FROM deks WHERE id = ANY(%s)) TO STDOUT", (ids,)) as copy:
            for block in copy:
                f.write(block)
    return _zstd_size(out)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=1_000_000)
    ap.add_argument("--change", type=float, default=0.01, help="fraction of DEKs changed per day")
    args = ap.parse_args()
    from kms_pipelines.core.foundation.keystore.software import SoftwareKeyStore
    from kms_pipelines.core.foundation.policy import load_policy

    backup = load_policy().backup
    bench = BenchDb()
    try:
        with tempfile.TemporaryDirectory() as tmp:
            tmp = Path(tmp)
            ctx = make_context(bench.url, SoftwareKeyStore(tmp / "keys", secrets.token_bytes(32)), tmp)
            populate(ctx, args.n, lambda: secrets.token_bytes(40))
            ctx.engine.dispose()
            url = _psycopg_url(bench.url)
            day0, day1, day2 = tmp / "d0.dump", tmp / "d1.dump", tmp / "d2.dump"
            raw_size = _dump(url, day0)
            full = _zstd_size(day0)
            row_delta = _rewrap(url, args.n, args.change, tmp / "rows.copy")
            _dump(url, day1)
            patch = _patch_size(day0, day1)
            _dump(url, day2)
            unchanged = _patch_size(day1, day2)
    finally:
        bench.drop()
    weeks = -(-backup.keep_weekly_days // 7)
    kept_full = backup.keep_nightly + weeks  # GFS: every restore point is a full archive
    held_full = kept_full * full
    # delta scheme: a full per retained week (the weekly restore points), one patch per night since
    # the newest weekly full, and each retained week's nightly patches until that week ages out.
    weekly_patch = patch * 7  # upper bound: rows changed on different days add up
    held_delta = weeks * full + backup.keep_nightly * patch
    rec = {
        "name": "backup_storage_per_year",
        "n": args.n,
        "daily_change": args.change,
        "dump_bytes": raw_size,
        "full_archive_bytes": full,
        "row_delta_bytes": row_delta,
        "patch_delta_bytes": patch,
        "unchanged_night_patch_bytes": unchanged,
        "gfs_keep_nightly": backup.keep_nightly,
        "gfs_weekly": weeks,
        "full_scheme": {"held_bytes": held_full, "uploaded_per_year_bytes": 365 * full},
        "delta_scheme": {
            "held_bytes": held_delta,
            "uploaded_per_year_bytes": 52 * full + (365 - 52) * patch,
            "weekly_patch_upper_bytes": weekly_patch,
        },
        "forever_incremental": {
            "held_bytes": full + (7 * weeks) * patch,
            "uploaded_per_year_bytes": full + 365 * patch,
        },
        "load_avg": load_average(),
    }
    print(json.dumps(rec), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
