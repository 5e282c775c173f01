"""benchmarks/run_all.py renders BENCHMARKS.md's table from results JSON and touches nothing else."""

import pytest

from benchmarks import run_all

DOC = {
    "finished": "2026-11-29 14:00 UTC",
    "quick": True,
    "machine": "2 CPU x86_64, Python 3.11.7",
    "records": [
        {
            "name": "ledger_verify",
            "n": 100000,
            "rate": 250000.0,
            "baseline_rate": 600000.0,
            "ratio": 0.4167,
            "peak_rss_mb": 80.1,
            "command": "benchmarks/bench_ledger.py --n 100000",
            "load_avg_before": [5.1, 5, 5],
            "load_avg_after": [5.3, 5, 5],
            "raw_rates": {"psycopg3 COPY binary": 500000.0, "psycopg2 copy_expert text": 600000.0},
            "one_process_rate": 180000.0,
        },
        {
            "name": "envelope.sweep.vs_raw_update",
            "n": 1000000,
            "rate": 45000.0,
            "baseline_rate": 50000.0,
            "ratio": 0.9,
            "peak_rss_mb": 99.0,
            "command": "benchmarks/bench_sweep.py --full",
            "load_avg_before": [0.4, 1, 1],
            "load_avg_after": [0.9, 1, 1],
        },
    ],
}


def test_the_table_is_regenerated_between_the_markers_only(tmp_path):
    doc = tmp_path / "BENCHMARKS.md"
    doc.write_text(f"# Benchmarks\n\nintro\n\n{run_all.BEGIN}\nold table | 1 |\n{run_all.END}\n\n## Reading\nkept\n")
    run_all.rewrite(DOC, doc)
    text = doc.read_text()
    assert text.startswith("# Benchmarks\n\nintro\n\n") and text.endswith("\n## Reading\nkept\n")
    assert "old table" not in text
    assert (
        "| Ledger verification (PostgreSQL, COPY) | `benchmarks/bench_ledger.py --n 100000` | 100k | 250,000/s | "
        "600,000/s | **0.417** ✗ ⚠ | ≥ 0.5 | 80.1 MB | 5.1 → 5.3 |" in text
    )
    assert "| 1M | 45,000/s | 50,000/s | **0.900** ✓ | ≥ 0.8 |" in text  # measured at load 0.9: no ⚠
    # every raw way measured is named, fastest first
    assert (
        "Ledger raw reads at 100k (the fastest is the raw limit): psycopg2 copy_expert text 600,000/s; "
        "psycopg3 COPY binary 500,000/s. One process: 180,000/s."
    ) in text
    assert "Shared machine: the 1-minute load average reached 5.3 on 2 CPUs" in text  # 5.3 > 2 cores
    run_all.rewrite(DOC, doc)
    assert doc.read_text() == text  # idempotent


def test_a_quiet_run_carries_no_load_warning(tmp_path):
    doc = tmp_path / "BENCHMARKS.md"
    doc.write_text(f"{run_all.BEGIN}\n{run_all.END}\n")
    quiet = {
        **DOC,
        "records": [{**r, "load_avg_before": [0.4, 1, 1], "load_avg_after": [0.6, 1, 1]} for r in DOC["records"]],
    }
    run_all.rewrite(quiet, doc)
    assert "Shared machine" not in doc.read_text()


def test_a_document_without_markers_is_refused_and_unchanged(tmp_path):
    doc = tmp_path / "BENCHMARKS.md"
    doc.write_text("# hand-written\n")
    with pytest.raises(SystemExit, match="markers are missing"):
        run_all.rewrite(DOC, doc)
    assert doc.read_text() == "# hand-written\n"


def test_the_repository_document_has_the_markers():
    text = run_all.DOC.read_text()
    assert text.count(run_all.BEGIN) == 1 and text.count(run_all.END) == 1


def test_only_keeps_the_other_benchmarks_rows_and_names_each_run(tmp_path):
    # DOC's records predate the ``bench``/``run_at`` fields: their benchmark comes from the command
    rerun = {
        **DOC["records"][1],
        "rate": 52000.0,
        "ratio": 0.95,
        "bench": "sweep",
        "run_at": "2026-11-30 09:00 UTC",
        "sizes": "full",
    }
    merged = run_all.merge(DOC, [rerun], ["sweep"])
    assert [r["name"] for r in merged] == ["ledger_verify", "envelope.sweep.vs_raw_update"]
    assert merged[0]["run_at"] == "2026-11-29 14:00 UTC" and merged[0]["sizes"] == "quick"
    assert merged[1]["rate"] == 52000.0  # the old sweep row is gone, not listed twice
    doc = tmp_path / "BENCHMARKS.md"
    doc.write_text(f"{run_all.BEGIN}\n{run_all.END}\n")
    run_all.rewrite({**DOC, "finished": "2026-11-30 09:00 UTC", "quick": False, "records": merged}, doc)
    text = doc.read_text()
    assert (
        "Results from several runs on 2 CPU x86_64, Python 3.11.7: ledger 2026-11-29 14:00 UTC (quick); "
        "sweep 2026-11-30 09:00 UTC (full)." in text
    )
    assert "| 1M | 52,000/s | 50,000/s | **0.950** ✓ |" in text
