"""Launch one job on the Dagster instance at $DAGSTER_HOME through the same code location
the UI loads (workspace.yaml, location ``kms_pipelines``), wait for it, and print progress
while it runs and a one-line verdict at the end.

Launched this way (not executed in-process by a CLI), the run is the UI's own: it is listed
under Runs and on the job's page, and "Re-execute" works on it. Used by scripts/demo.sh:

    python scripts/lib/run_job.py kms_nightly
    python scripts/lib/run_job.py backup_nightly --partition 2026-11-28
    python scripts/lib/run_job.py dek_rewrap_sweep_job --partition shard-0 --config-json '{...}'

Exit 0 when the run succeeded, 1 when it failed (the verdict names the first failure).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
LOCATION = "kms_pipelines"  # workspace.yaml's location_name; pyproject's [tool.dg.project] code_location_name
HEARTBEAT_SECONDS = 10
TIMEOUT_SECONDS = 1800


def _launch(job: str, run_id: str, partition: str | None, config_json: str | None, log: Path) -> None:
    cmd = [
        str(Path(sys.executable).parent / "dagster"),
        "job",
        "launch",
        "-w",
        str(REPO / "workspace.yaml"),
        "-l",
        LOCATION,
        "-j",
        job,
        "--run-id",
        run_id,
    ]
    if partition:
        cmd += ["--tags", json.dumps({"dagster/partition": partition})]
    if config_json:
        cmd += ["--config-json", config_json]
    with log.open("a") as out:
        proc = subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=REPO)
    if proc.returncode != 0:
        sys.exit(f"error: could not launch {job} (see {log})")


def _describe(event) -> str | None:
    """One progress line for the events a reader cares about; None for the rest."""
    de = event.dagster_event
    kind = de.event_type_value
    if kind == "ASSET_MATERIALIZATION":
        mat = de.event_specific_data.materialization
        return f"  materialized {mat.asset_key.to_user_string()}" + (f" [{mat.partition}]" if mat.partition else "")
    if kind == "ASSET_CHECK_EVALUATION":
        ev = de.event_specific_data
        return f"  check {ev.asset_key.to_user_string()}/{ev.check_name}: {'passed' if ev.passed else 'FAILED'}"
    if kind == "STEP_FAILURE":
        err = de.event_specific_data.error
        why = (err.message.strip().splitlines() or [""])[-1] if err else ""
        return f"  step {event.step_key} FAILED: {why[:200]}"
    return None


def wait(instance, job: str, run_id: str, started: float) -> tuple[bool, dict]:
    import dagster as dg

    done = {dg.DagsterRunStatus.SUCCESS, dg.DagsterRunStatus.FAILURE, dg.DagsterRunStatus.CANCELED}
    cursor, last_line = None, time.monotonic()
    counts = {"assets": 0, "checks_passed": 0, "checks_failed": 0, "failure": ""}
    while True:
        run = instance.get_run_by_id(run_id)
        conn = instance.get_records_for_run(run_id, cursor=cursor) if run else None
        if conn:
            cursor = conn.cursor
        for record in conn.records if conn else []:
            event = record.event_log_entry
            if not event.dagster_event:
                continue
            line = _describe(event)
            kind = event.dagster_event.event_type_value
            if kind == "ASSET_MATERIALIZATION":
                counts["assets"] += 1
            elif kind == "ASSET_CHECK_EVALUATION":
                counts["checks_passed" if event.dagster_event.event_specific_data.passed else "checks_failed"] += 1
            elif kind == "STEP_FAILURE" and not counts["failure"]:
                counts["failure"] = (line or "").strip()
            elif kind in ("RUN_FAILURE", "PIPELINE_FAILURE", "ENGINE_EVENT") and not counts["failure"]:
                # A run that fails outside any step (the worker could not start, a storage error).
                error = getattr(event.dagster_event.event_specific_data, "error", None)
                if error is not None or kind != "ENGINE_EVENT":
                    why = (error.message.strip().splitlines() or [""])[-1] if error else (event.message or "")
                    counts["failure"] = f"{kind.lower()}: {why[:300]}"
            if line:
                print(line, flush=True)
                last_line = time.monotonic()
        if run and run.status in done:
            return run.status == dg.DagsterRunStatus.SUCCESS, counts
        now = time.monotonic()
        if now - last_line >= HEARTBEAT_SECONDS:
            state = run.status.value.lower() if run else "launching"
            print(f"  … {job} {state}, {now - started:.0f} s", flush=True)
            last_line = now
        if now - started > TIMEOUT_SECONDS:
            return False, {**counts, "failure": f"no result after {TIMEOUT_SECONDS} s"}
        time.sleep(0.5)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("job")
    parser.add_argument("--partition")
    parser.add_argument("--config-json")
    args = parser.parse_args(argv)
    if not os.environ.get("DAGSTER_HOME"):
        sys.exit("error: set DAGSTER_HOME to the Dagster instance directory (the demo uses $KMS_HOME/dagster)")

    import dagster as dg

    run_id = str(uuid.uuid4())
    log = Path(os.environ["DAGSTER_HOME"]) / "launch.log"
    label = args.job + (f" [{args.partition}]" if args.partition else "")
    print(f"==> {label}: launching run {run_id[:8]}", flush=True)
    started = time.monotonic()
    _launch(args.job, run_id, args.partition, args.config_json, log)
    with dg.DagsterInstance.get() as instance:
        ok, c = wait(instance, args.job, run_id, started)
    seconds = time.monotonic() - started
    checks = f"{c['checks_passed']} check(s) passed" + (f", {c['checks_failed']} FAILED" if c["checks_failed"] else "")
    if ok:
        print(
            f"{label}: succeeded in {seconds:.0f} s: {c['assets']} materialization(s), {checks} "
            f"(run {run_id[:8]} in the UI)",
            flush=True,
        )
        return 0
    print(
        f"{label}: FAILED after {seconds:.0f} s: {c['failure'] or 'see the run in the UI'}; {checks} "
        f"(run {run_id[:8]}, launcher log {log})",
        file=sys.stderr,
        flush=True,
    )
    return 1


if __name__ == "__main__":
    sys.exit(main())
