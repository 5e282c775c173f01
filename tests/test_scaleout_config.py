"""Scale-out configuration (issue 15): executors by KMS_EXECUTOR, the celery settings, the
shipped dagster.yaml and deployment files."""

import multiprocessing
import re
from pathlib import Path

import dagster as dg
import pytest
import yaml

from kms_pipelines.scaleout import celery_settings, executors

REPO = Path(__file__).resolve().parents[1]


def _configured_in_child(queue):
    queue.put(executors.configured({"KMS_EXECUTOR": "multiprocess"}))


def test_executor_is_chosen_by_kms_executor():
    assert executors.configured({}) == "multiprocess"
    assert executors.configured({"KMS_EXECUTOR": "in_process"}) == "in_process"
    assert executors.for_job(env={"KMS_EXECUTOR": "celery"}).name == "celery"
    with pytest.raises(ValueError, match="KMS_EXECUTOR must be one of in_process, multiprocess, celery, got 'k8s'"):
        executors.configured({"KMS_EXECUTOR": "k8s"})


def test_a_job_that_does_not_support_the_configured_executor_falls_back_to_its_first():
    assert executors.for_job(("in_process",), env={"KMS_EXECUTOR": "celery"}) is dg.in_process_executor


def test_inside_a_daemonic_process_multiprocess_becomes_in_process():
    """The CeleryRunLauncher case: a prefork child may not start children."""
    queue = multiprocessing.get_context("fork").Queue()
    child = multiprocessing.get_context("fork").Process(target=_configured_in_child, args=(queue,), daemon=True)
    child.start()
    child.join(30)
    assert queue.get(timeout=5) == "in_process"
    assert executors.configured({"KMS_EXECUTOR": "multiprocess"}) == "multiprocess"  # not daemonic here


def test_celery_settings_are_the_measured_ones():
    s = celery_settings.settings({})
    assert s["task_acks_late"] is True and s["task_reject_on_worker_lost"] is True
    assert s["worker_prefetch_multiplier"] == 1
    assert s["broker_transport_options"]["visibility_timeout"] == 60
    assert celery_settings.settings({"KMS_CELERY_VISIBILITY_TIMEOUT": "10"})["broker_transport_options"] == {
        "visibility_timeout": 10
    }
    with pytest.raises(ValueError, match="KMS_CELERY_VISIBILITY_TIMEOUT must be a whole number"):
        celery_settings.settings({"KMS_CELERY_VISIBILITY_TIMEOUT": "soon"})
    with pytest.raises(ValueError, match="KMS_CELERY_BROKER is not set"):
        celery_settings.broker_url({})


def test_every_job_runs_on_the_configured_executor_it_supports():
    """In a fresh process: job modules pick their executor when imported."""
    import json
    import os
    import subprocess
    import sys

    code = (
        "import json; from kms_pipelines.definitions import defs; "
        "print(json.dumps({j.name: j.executor_def.name for j in defs().resolve_all_job_defs()}))"
    )
    env = dict(os.environ, KMS_EXECUTOR="celery", KMS_CELERY_BROKER="redis://127.0.0.1:6379/9", PYTHONPATH=str(REPO))
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    jobs = {k: v for k, v in json.loads(out.stdout.strip().splitlines()[-1]).items() if not k.startswith("__")}
    assert {"dek_rewrap_sweep_job", "dek_rewrap_fanout_job", "backup_nightly", "restore_drill"} <= set(jobs)
    celery = {
        "dek_rewrap_sweep_job",
        "dek_rewrap_fanout_job",
        "backup_nightly",
        "compromise_response",
        "manual_rotation",
        "export_key_expiry_job",
    }
    assert {name for name, executor in jobs.items() if executor == "celery"} == celery & set(jobs)
    # Jobs that declare in-process only keep it (a task round trip per short step is never worth it).
    assert jobs["kms_nightly"] == "in_process" and jobs["key_state_refresh"] == "in_process"
    assert jobs["restore_drill"] == "in_process"  # its runbook report is a file on the host that runs it


def test_dagster_yaml_has_run_monitoring_retries_and_s3_compute_logs():
    cfg = yaml.safe_load((REPO / "deploy" / "dagster.yaml").read_text())
    assert cfg["run_monitoring"]["enabled"] is True and cfg["run_monitoring"]["max_runtime_seconds"] > 0
    assert cfg["run_monitoring"]["start_timeout_seconds"] > 0
    assert cfg["run_retries"]["enabled"] is True and cfg["run_retries"]["max_retries"] >= 1
    assert cfg["compute_logs"]["class"] == "S3ComputeLogManager"


def test_compose_file_parses_and_has_every_service():
    compose = yaml.safe_load((REPO / "deploy" / "docker-compose.yml").read_text())
    services = compose["services"]
    assert {"webserver", "daemon", "console", "postgres", "redis", "softhsm", "s3"} <= set(services)
    workers = [s for s in services.values() if s.get("command", [])[:3] == ["kms", "worker", "start"]]
    assert len(workers) >= 2 and all(w["environment"]["KMS_ROLE"] == "worker" for w in workers)
    for worker in workers:  # a worker's environment passes the preflight
        from kms_pipelines.core.foundation.worker import worker_problems

        env = {k: str(v) for k, v in worker["environment"].items()}
        assert worker_problems(env) == []


def test_readme_scale_out_commands_exist():
    from click.testing import CliRunner

    from kms_pipelines.cli import cli

    readme = (REPO / "README.md").read_text()
    section = readme.split("## Scale-out", 1)[1].split("\n## ", 1)[0]
    assert "kms worker start --concurrency 1" in section and "kms worker check" in section
    for option in re.findall(r"kms worker start ((?:--[a-z-]+ \S+ ?)+)", section):
        for flag in re.findall(r"--[a-z-]+", option):
            assert flag in CliRunner().invoke(cli, ["worker", "start", "--help"]).output
    assert "claims its work in the database" not in readme
