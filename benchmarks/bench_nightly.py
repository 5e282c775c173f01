"""kms_nightly launched the way the Launchpad launches it, against the same job executed
in-process, in the same run; plus the code location's load time.

Prints JSON lines (benchmarks/harness.py):
  code_location_load   seconds to import kms_pipelines.definitions and build the Definitions
                       (fresh interpreter; baseline = `import dagster` alone)
  kms_nightly_launched wall seconds from launch to run end through the instance's run
                       launcher and the workspace code location (what the UI does);
                       baseline = the same job's execute_in_process in a warm process.
                       ratio = in-process seconds / launched seconds (goal >= 0.5, i.e.
                       launched within 2x of in-process). The launched time is an upper
                       bound for the Launchpad: it includes starting the `dagster job launch`
                       CLI and its code server, which the running UI already has.

    .venv/bin/python benchmarks/bench_nightly.py [--repeat 3]

Runs on scratch state (a temporary KMS_HOME and DAGSTER_HOME); touches nothing else.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.harness import emit, result  # noqa: E402

LOAD = "import time; t = time.perf_counter(); {stmt}; print(time.perf_counter() - t)"


def _fresh_seconds(stmt: str, env: dict) -> float:
    out = subprocess.run(
        [sys.executable, "-c", LOAD.format(stmt=stmt)], env=env, capture_output=True, text=True, check=True, cwd=REPO
    )
    return float(out.stdout.strip().splitlines()[-1])


def _prepare(home: Path) -> dict:
    env = dict(
        os.environ,
        KMS_HOME=str(home / ".kms"),
        DAGSTER_HOME=str(home / ".kms" / "dagster"),
        PYTHONPATH=os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p),
    )
    for var in ("KMS_DATABASE_URL", "KMS_OBJECT_STORE", "KMS_KEYSTORE", "KMS_MASTER_KEY", "KMS_POLICY"):
        env.pop(var, None)
    dagster_home = Path(env["DAGSTER_HOME"])
    dagster_home.mkdir(parents=True)
    # The development instance of scripts/lib/env.sh (ensure_dev_instance): runs launch at once.
    (dagster_home / "dagster.yaml").write_text(
        "telemetry:\n  enabled: false\nrun_coordinator:\n  module: dagster._core.run_coordinator\n"
        "  class: DefaultRunCoordinator\n"
    )
    kms = [sys.executable, "-m", "kms_pipelines.cli"]
    subprocess.run([*kms, "init"], env=env, check=True, capture_output=True, cwd=REPO)
    from kms_pipelines.core.foundation.policy import load_policy

    for custodian in load_policy().key_class("break-glass").escrow.custodians:
        subprocess.run(
            [*kms, "escrow", "custodian", "add", custodian, "--out", str(home / f"{custodian}.age")],
            env=env,
            check=True,
            capture_output=True,
            cwd=REPO,
        )
    return env


IN_PROCESS = """
import sys, time
import dagster as dg
from kms_pipelines.definitions import defs
job = defs().resolve_job_def("kms_nightly")
with dg.DagsterInstance.get() as instance:
    times = []
    for _ in range(int(sys.argv[1])):
        t = time.perf_counter()
        assert job.execute_in_process(instance=instance).success
        times.append(time.perf_counter() - t)
print(" ".join(str(s) for s in times))
"""


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="kms-bench-nightly-") as tmp:
        env = _prepare(Path(tmp))
        load = statistics.median(
            _fresh_seconds("from kms_pipelines.definitions import defs; defs()", env) for _ in range(args.repeat)
        )
        dagster_only = statistics.median(_fresh_seconds("import dagster", env) for _ in range(args.repeat))
        emit(
            result(
                "code_location_load",
                1,
                load,
                dagster_only,
                load_seconds=round(load, 3),
                import_dagster_seconds=round(dagster_only, 3),
            )
        )

        # The first nightly bootstraps escrow and the first checkpoint; time steady-state nights.
        subprocess.run(
            [sys.executable, str(REPO / "scripts/lib/run_job.py"), "kms_nightly"],
            env=env,
            check=True,
            capture_output=True,
            cwd=REPO,
        )
        out = (
            subprocess.run(
                [sys.executable, "-c", IN_PROCESS, str(args.repeat)],
                env=env,
                check=True,
                capture_output=True,
                text=True,
                cwd=REPO,
            )
            .stdout.strip()
            .splitlines()
        )
        in_process = statistics.median(float(s) for s in out[-1].split())
        launched_runs = []
        for _ in range(args.repeat):
            t = time.perf_counter()
            subprocess.run(
                [sys.executable, str(REPO / "scripts/lib/run_job.py"), "kms_nightly"],
                env=env,
                check=True,
                capture_output=True,
                cwd=REPO,
            )
            launched_runs.append(time.perf_counter() - t)
        launched = statistics.median(launched_runs)
        emit(
            result(
                "kms_nightly_launched",
                1,
                launched,
                in_process,
                launched_seconds=round(launched, 2),
                in_process_seconds=round(in_process, 2),
                repeat=args.repeat,
                executor="in_process",
                cpus=os.cpu_count(),
                load_avg=round(os.getloadavg()[0], 2),
            )
        )


if __name__ == "__main__":
    main()
