"""Benchmark harness: each workload and its raw limit are measured in the same run and
printed as one JSON line ``{"name","n","seconds","rate","baseline_rate","ratio","peak_rss_mb"}``
(extra keys allowed). Sizes run in separate child processes so ``peak_rss_mb`` is that
size's own peak, which is how "memory stays flat as n grows" is shown."""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import time
from collections.abc import Callable
from contextlib import contextmanager


def peak_rss_mb() -> float:
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


@contextmanager
def timer():
    box = {}
    start = time.perf_counter()
    yield box
    box["seconds"] = time.perf_counter() - start


def timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def result(name: str, n: int, seconds: float, baseline_seconds: float, **extra) -> dict:
    rate = n / seconds if seconds else float("inf")
    baseline_rate = n / baseline_seconds if baseline_seconds else float("inf")
    return {
        "name": name,
        "n": n,
        "seconds": round(seconds, 4),
        "rate": round(rate, 1),
        "baseline_rate": round(baseline_rate, 1),
        "ratio": round(rate / baseline_rate, 4),
        "peak_rss_mb": peak_rss_mb(),
        **extra,
    }


def emit(record: dict) -> None:
    print(json.dumps(record), flush=True)


def run_sizes(script: str, sizes: list[int], extra_args: list[str]) -> None:
    """Re-run ``script --n SIZE --child`` once per size, each in a fresh process."""
    for n in sizes:
        proc = subprocess.run(
            [sys.executable, script, "--n", str(n), "--child", *extra_args], env=os.environ.copy(), check=False
        )
        if proc.returncode != 0:
            sys.exit(proc.returncode)


def load_average() -> list[float]:
    """1-, 5- and 15-minute load averages, recorded with every result (a busy machine depresses both sides)."""
    return [round(x, 2) for x in os.getloadavg()]


def interleaved(ours: Callable[[], object], raw: Callable[[], object], repeat: int = 3) -> tuple[float, float, dict]:
    """Median seconds of ``ours`` and of ``raw``, run alternately ``repeat`` times each.

    Alternating means a burst of load from elsewhere hits both sides; the third value
    holds every run's seconds and the load average before and after."""
    import statistics

    before = load_average()
    a, b = [], []
    for _ in range(max(1, repeat)):
        b.append(timed(raw))
        a.append(timed(ours))
    return (
        statistics.median(a),
        statistics.median(b),
        {
            "runs_ours_s": [round(x, 4) for x in a],
            "runs_raw_s": [round(x, 4) for x in b],
            "repeat": len(a),
            "load_before": before,
            "load_after": load_average(),
        },
    )
