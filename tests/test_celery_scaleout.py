"""Scale-out for real (issue 15): dek_rewrap_fanout_job on two celery workers, each a
separate process with its own KMS_HOME (nothing shared on disk), PostgreSQL, a SoftHSM2
token standing in for the network HSM, S3 through the moto server, Redis as the broker.

Everything KMS-side runs in subprocesses so each process's PKCS#11 library sees the test's
own token (SOFTHSM2_CONF is read once per process).
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import dagster as dg
import pyotp
import pytest
import yaml
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

from kms_pipelines.core.foundation.keystore.softhsm_setup import init_softhsm_token

from .fixtures.dagster_defs import write_instance_yaml
from .fixtures.kms import KEY_ORIGIN

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]
KEY = "data:identity-documents"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _redis_answers(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1) as s:
            s.sendall(b"PING\r\n")
            return s.recv(16).startswith(b"+PONG")
    except OSError:
        return False


@pytest.fixture(scope="module")
def redis_url():
    """The Redis the scripts keep on 6379 (a database number of our own), else one started here."""
    if _redis_answers(6379):
        yield f"redis://127.0.0.1:6379/{11 + os.getpid() % 4}"
        return
    port = _free_port()
    proc = subprocess.Popen(
        ["redis-server", "--port", str(port), "--save", "", "--appendonly", "no"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 10
        while not _redis_answers(port):
            assert time.monotonic() < deadline, "redis-server did not start"
            time.sleep(0.1)
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        proc.terminate()
        proc.wait(timeout=10)


class Cluster:
    """A control host and celery workers sharing PostgreSQL, an HSM, S3 and Redis only."""

    def __init__(
        self,
        tmp: Path,
        pg_url: str,
        dagster_db_url: str,
        s3_server: str,
        s3_client,
        bucket: str,
        redis: str,
        policy_overrides: dict,
        smtp,
    ):
        self.tmp = tmp
        token = init_softhsm_token(tmp / "hsm", "kms-scaleout", "1234", "5678", for_subprocesses=True)
        policy = yaml.safe_load((REPO / "assets" / "policy.yaml").read_text())
        policy["envelope"].update(policy_overrides)
        # the ceremony's admins register software security keys (kms init --software-keys): the
        # tests' policy allows them, production's does not
        policy["console"]["allow_software_authenticators"] = True
        (tmp / "policy.yaml").write_text(yaml.safe_dump(policy))
        s3_client.create_bucket(Bucket=f"{bucket}-logs")
        self.dagster_home = tmp / "dagster_home"
        self.dagster_home.mkdir()
        write_instance_yaml(self.dagster_home, s3_compute_logs=True)
        d = make_url(dagster_db_url)
        self.base = {k: v for k, v in os.environ.items() if not k.startswith(("KMS_", "DAGSTER_"))}
        self.base.update(
            {
                "PYTHONPATH": str(REPO),
                "PYTHONUNBUFFERED": "1",
                "KMS_POLICY": str(tmp / "policy.yaml"),
                "KMS_DATABASE_URL": pg_url,
                "KMS_OBJECT_STORE": f"s3://{bucket}/kms",
                "KMS_S3_ENDPOINT_URL": s3_server,
                "KMS_KEYSTORE": "pkcs11",
                "KMS_PKCS11_LIB": token.lib_path,
                "KMS_PKCS11_TOKEN": token.label,
                "KMS_PKCS11_PIN": token.pin,
                "SOFTHSM2_CONF": token.conf_path,
                "KMS_EXECUTOR": "celery",
                "KMS_CELERY_BROKER": redis,
                "KMS_CELERY_VISIBILITY_TIMEOUT": "10",
                "DAGSTER_HOME": str(self.dagster_home),
                "DAGSTER_PG_HOST": d.host or "127.0.0.1",
                "DAGSTER_PG_PORT": str(d.port or 5432),
                "DAGSTER_PG_USER": d.username or "postgres",
                "DAGSTER_PG_PASSWORD": d.password or "",
                "DAGSTER_PG_DB": d.database,
                "DAGSTER_COMPUTE_LOG_BUCKET": f"{bucket}-logs",
                "DAGSTER_S3_ENDPOINT_URL": s3_server,
                "AWS_ACCESS_KEY_ID": "test",
                "AWS_SECRET_ACCESS_KEY": "test",
                "AWS_DEFAULT_REGION": "us-east-1",
                # A worker refuses to start without SMTP or Slack (its outbox is on a host nobody reads).
                "KMS_SMTP_HOST": smtp.host,
                "KMS_SMTP_PORT": str(smtp.port),
                "KMS_SMTP_SENDER": "kms@example.com",
            }
        )
        self.redis = redis
        self.workers: dict[str, subprocess.Popen] = {}

    def control_env(self) -> dict:
        return dict(self.base, KMS_HOME=str(self.tmp / "control"))

    def kms(self, *args, check=True) -> subprocess.CompletedProcess:
        out = subprocess.run(
            [sys.executable, "-m", "kms_pipelines.cli", *args],
            env=self.control_env(),
            capture_output=True,
            text=True,
            timeout=300,
        )
        if check:
            assert out.returncode == 0, out.stderr[-2000:]
        return out

    def python(self, code: str) -> str:
        out = subprocess.run(
            [sys.executable, "-c", code], env=self.control_env(), capture_output=True, text=True, timeout=300
        )
        assert out.returncode == 0, out.stderr[-3000:]
        return out.stdout

    def start_worker(self, name: str) -> None:
        env = dict(self.base, KMS_HOME=str(self.tmp / f"home-{name}"), KMS_ROLE="worker")
        log = open(self.tmp / f"{name}.log", "w")
        self.workers[name] = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "kms_pipelines.cli",
                "worker",
                "start",
                "--concurrency",
                "1",
                "--name",
                f"{name}@%h",
            ],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def wait_workers_ready(self, n: int, timeout: float = 90) -> None:
        from celery import Celery

        app = Celery(broker=self.redis, backend=self.redis)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for name, proc in self.workers.items():
                assert proc.poll() is None, f"worker {name} exited: {self.worker_log(name)[-3000:]}"
            if len(app.control.ping(timeout=1.0) or []) >= n:
                return
        raise AssertionError(f"workers not ready: {[self.worker_log(w)[-1500:] for w in self.workers]}")

    def worker_log(self, name: str) -> str:
        return (self.tmp / f"{name}.log").read_text()

    def kill9(self, name: str) -> None:
        os.killpg(self.workers[name].pid, signal.SIGKILL)
        self.workers[name].wait(timeout=30)

    def stop(self) -> None:
        for proc in self.workers.values():
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        for proc in self.workers.values():
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=10)

    def launch_fanout(self) -> subprocess.Popen:
        return subprocess.Popen(
            [
                sys.executable,
                "-m",
                "dagster",
                "job",
                "execute",
                "-m",
                "kms_pipelines.definitions",
                "-j",
                "dek_rewrap_fanout_job",
            ],
            env=self.control_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            cwd=str(REPO),
        )


FILL = r"""
import json, sys
from kms_pipelines.core.envelope import data_keys as envelope
from kms_pipelines.core.keys import lifecycle
from kms_pipelines.core.runtime.wiring import context_from_env
ctx = context_from_env()
n = int(sys.argv[1])
out = {}
for i in range(n):
    out[f"o-{i}"] = envelope.encrypt(ctx, "%s", f"o-{i}", f"payload {i}".encode()).hex()
lifecycle.rotate(ctx, "%s")
json.dump(out, open(sys.argv[2], "w"))
""" % (KEY, KEY)  # noqa: UP031 - the script's own f-string braces rule out str.format

DECRYPT_ALL = r"""
import json, sys
from kms_pipelines.core.envelope import data_keys as envelope
from kms_pipelines.core.runtime.wiring import context_from_env
ctx = context_from_env()
blobs = json.load(open(sys.argv[1]))
bad = [o for o, b in blobs.items() if envelope.decrypt(ctx, bytes.fromhex(b), object_id=o) != f"payload {o[2:]}".encode()]
print(json.dumps({"checked": len(blobs), "bad": bad}))
"""


@pytest.fixture
def cluster(tmp_path, pg_url, pg_database, s3_server, s3_client, s3_bucket, redis_url, smtp_server):
    def make(init: bool = True, **policy_overrides) -> Cluster:
        c = Cluster(
            tmp_path, pg_url, pg_database(), s3_server, s3_client, s3_bucket, redis_url, policy_overrides, smtp_server
        )
        made.append(c)
        if init:
            out = c.kms(
                "init",
                "--admin",
                "sec-1",
                "--admin",
                "sec-2",
                "--admin",
                "sec-3",
                "--json",
                "--console-origin",
                KEY_ORIGIN,
                "--software-keys",
                str(c.tmp / "keys"),
            )
            issuer = pyotp.parse_uri(json.loads(out.stdout)["enrolled"][0]["provisioning_uri"])
            # the signing key is created once, in the HSM, by the first token a proven human issues
            c.kms("token", "issue", "workload:dagster", "--as", "sec-1", "--totp", issuer.now())
        return c

    made: list[Cluster] = []
    yield make
    for c in made:
        c.stop()


def fill(c: Cluster, n: int) -> Path:
    blobs = c.tmp / "blobs.json"
    subprocess.run([sys.executable, "-c", FILL, str(n), str(blobs)], env=c.control_env(), check=True, timeout=300)
    return blobs


def versions(pg_url: str) -> dict:
    engine = create_engine(
        pg_url.replace("postgresql://", "postgresql+psycopg://", 1) if pg_url.startswith("postgresql://") else pg_url
    )
    with engine.connect() as conn:
        rows = dict(
            conn.execute(
                text("SELECT key_version, count(*) FROM deks WHERE key_name = :k GROUP BY 1"), {"k": KEY}
            ).all()
        )
    engine.dispose()
    return rows


def run_events(c: Cluster):
    saved = dict(os.environ)
    os.environ.update({k: v for k, v in c.base.items() if k.startswith(("DAGSTER_", "AWS_"))})
    try:
        instance = dg.DagsterInstance.from_config(str(c.dagster_home))
        try:
            run = instance.get_runs(limit=1)[0]
            return run, instance.all_logs(run.run_id)
        finally:
            instance.dispose()
    finally:
        os.environ.clear()
        os.environ.update(saved)


def slot_metadata(records) -> dict[str, dict]:
    """step key -> output metadata (worker, moved, skipped) of every sweep slot that succeeded."""
    out = {}
    for r in records:
        ev = r.dagster_event
        if ev is not None and ev.event_type_value == "STEP_OUTPUT" and ev.step_key.startswith("sweep_slot_"):
            out[ev.step_key] = {k: v.value for k, v in ev.event_specific_data.metadata.items()}
    return out


def celery_hosts(records) -> set[str]:
    hosts = set()
    for r in records:
        ev = r.dagster_event
        if ev is not None and ev.event_type_value == "ENGINE_EVENT" and ev.step_key:
            md = ev.engine_event_data.metadata if ev.engine_event_data else {}
            if "Celery worker" in md:
                hosts.add(md["Celery worker"].value)
    return hosts


def test_two_workers_share_the_sweep_and_every_dek_still_decrypts(cluster, pg_url):
    c = cluster(batch_size=20, fanout_steps=4, lease_seconds=10)
    blobs = fill(c, 240)
    assert versions(pg_url) == {1: 240}
    c.start_worker("w1")
    c.start_worker("w2")
    c.wait_workers_ready(2)
    run = c.launch_fanout()
    out, _ = run.communicate(timeout=600)
    assert run.returncode == 0, out[-4000:]

    dagster_run, records = run_events(c)
    assert dagster_run.status == dg.DagsterRunStatus.SUCCESS
    hosts = celery_hosts(records)
    assert {h.split("@")[0] for h in hosts} == {"w1", "w2"}, hosts  # shards landed on both workers
    slots = slot_metadata(records)
    assert len(slots) == 4
    assert sum(s["moved"] for s in slots.values()) == 240  # every DEK rewrapped once...
    assert sum(s["skipped"] for s in slots.values()) == 0  # ...and none twice
    assert versions(pg_url) == {2: 240}
    result = json.loads(c.python(DECRYPT_ALL.replace("sys.argv[1]", repr(str(blobs)))))
    assert result == {"checked": 240, "bad": []}
    check = c.kms("envelope", "check", check=False)
    assert check.returncode == 0, check.stdout + check.stderr
    # Nothing was written to a worker's home: no master key, no key files, no object store directory.
    for name in ("w1", "w2"):
        home = c.tmp / f"home-{name}"
        assert not home.exists() or not any(p.is_file() for p in home.rglob("*")), list(home.rglob("*"))


def test_kill_9_of_a_worker_mid_shard_is_retried_and_nothing_is_lost_or_doubled(cluster, pg_url):
    c = cluster(batch_size=10, fanout_steps=2, lease_seconds=8, lease_ranges_per_shard=2)
    blobs = fill(c, 600)
    c.start_worker("w1")
    c.wait_workers_ready(1)
    run = c.launch_fanout()
    # Wait until w1 holds a lease and has committed some batches, then kill it (and its pool).
    deadline = time.monotonic() + 240
    engine = create_engine(
        pg_url.replace("postgresql://", "postgresql+psycopg://", 1) if pg_url.startswith("postgresql://") else pg_url
    )
    try:
        while True:
            assert time.monotonic() < deadline, "w1 never started sweeping"
            with engine.connect() as conn:
                held = conn.execute(text("SELECT count(*) FROM sweep_leases WHERE holder IS NOT NULL")).scalar()
            moved = versions(pg_url).get(2, 0)
            if held and moved >= 30:
                break
            time.sleep(0.2)
        c.kill9("w1")
        killed_at = time.monotonic()
        assert 0 < versions(pg_url).get(2, 0) < 600  # killed mid-way
        c.start_worker("w2")  # the survivor: gets the redelivered steps
        out, _ = run.communicate(timeout=600)
        elapsed = time.monotonic() - killed_at
    finally:
        engine.dispose()
        if run.poll() is None:
            run.kill()
    assert run.returncode == 0, out[-4000:] + c.worker_log("w2")[-3000:]
    assert elapsed < 300, elapsed  # bounded: visibility timeout + lease expiry + the work
    _, records = run_events(c)
    slots = slot_metadata(records)
    assert sum(s["skipped"] for s in slots.values()) == 0  # no DEK rewrapped twice
    assert versions(pg_url) == {2: 600}  # none lost
    result = json.loads(c.python(DECRYPT_ALL.replace("sys.argv[1]", repr(str(blobs)))))
    assert result == {"checked": 600, "bad": []}
    assert c.kms("envelope", "check", check=False).returncode == 0


def test_celery_run_launcher_runs_the_job_on_a_worker_without_daemonic_process_errors(cluster, pg_url):
    """CeleryRunLauncher: the whole run executes inside a worker's (daemonic) pool process; with
    KMS_EXECUTOR=multiprocess its steps run in that process instead of failing to fork."""
    c = cluster(batch_size=50, fanout_steps=2)
    blobs = fill(c, 100)
    cfg = yaml.safe_load((c.dagster_home / "dagster.yaml").read_text())
    cfg["run_coordinator"] = {"module": "dagster._core.run_coordinator", "class": "DefaultRunCoordinator"}
    cfg["run_launcher"] = {
        "module": "dagster_celery.launcher",
        "class": "CeleryRunLauncher",
        "config": {
            "default_queue": "dagster",
            "broker": c.redis,
            "backend": c.redis,
            "config_source": {
                "task_acks_late": True,
                "task_reject_on_worker_lost": True,
                "worker_prefetch_multiplier": 1,
            },
        },
    }
    (c.dagster_home / "dagster.yaml").write_text(yaml.safe_dump(cfg))
    c.base["KMS_EXECUTOR"] = "multiprocess"
    c.start_worker("w1")
    c.wait_workers_ready(1)
    launch = subprocess.run(
        [
            sys.executable,
            "-m",
            "dagster",
            "job",
            "launch",
            "-m",
            "kms_pipelines.definitions",
            "-j",
            "dek_rewrap_fanout_job",
        ],
        env=c.control_env(),
        capture_output=True,
        text=True,
        timeout=300,
        cwd=str(REPO),
    )
    assert launch.returncode == 0, launch.stderr[-3000:]
    deadline = time.monotonic() + 300
    while True:
        run, records = run_events(c)
        if run.status in (dg.DagsterRunStatus.SUCCESS, dg.DagsterRunStatus.FAILURE):
            break
        assert time.monotonic() < deadline, f"run stuck in {run.status}: {c.worker_log('w1')[-3000:]}"
        time.sleep(1)
    text_log = "\n".join(r.user_message or "" for r in records) + c.worker_log("w1")
    assert "daemonic processes are not allowed to have children" not in text_log
    assert run.status == dg.DagsterRunStatus.SUCCESS, text_log[-4000:]
    assert versions(pg_url) == {2: 100}
    result = json.loads(c.python(DECRYPT_ALL.replace("sys.argv[1]", repr(str(blobs)))))
    assert result == {"checked": 100, "bad": []}


def _instance_runs(c: Cluster):
    """Every run (newest first) and a function from run id to its event records."""
    saved = dict(os.environ)
    os.environ.update({k: v for k, v in c.base.items() if k.startswith(("DAGSTER_", "AWS_"))})
    try:
        instance = dg.DagsterInstance.from_config(str(c.dagster_home))
        try:
            runs = instance.get_runs()
            return runs, {r.run_id: instance.all_logs(r.run_id) for r in runs}
        finally:
            instance.dispose()
    finally:
        os.environ.clear()
        os.environ.update(saved)


def test_run_monitoring_fails_a_run_whose_worker_was_killed_and_run_retries_relaunch_it(cluster):
    """A real dagster-daemon (run monitoring every second, run retries on) and CeleryRunLauncher,
    whose run workers the daemon can health-check (DefaultRunLauncher cannot: a dead run worker
    there is only caught by max_runtime_seconds). The run's worker process is killed with
    kill -9 mid-op: the daemon marks the run FAILURE and run retries launch a new run, which
    succeeds on the same celery worker, all within a bounded time."""
    from kms_pipelines.scaleout.celery_settings import settings

    c = cluster(init=False)  # the held job touches no KMS state; the worker still passes the preflight
    hold = c.tmp / "hold"
    hold.write_text("")
    c.base["KMS_TEST_HOLD_FILE"] = str(hold)
    cfg = yaml.safe_load((c.dagster_home / "dagster.yaml").read_text())
    cfg["run_launcher"] = {
        "module": "dagster_celery.launcher",
        "class": "CeleryRunLauncher",
        "config": {
            "default_queue": "dagster",
            "broker": c.redis,
            "backend": c.redis,
            "config_source": settings(c.base),
        },
    }
    cfg["run_monitoring"].update(poll_interval_seconds=1, start_timeout_seconds=60)
    cfg["run_retries"]["max_retries"] = 1
    (c.dagster_home / "dagster.yaml").write_text(yaml.safe_dump(cfg))
    c.start_worker("w1")
    c.wait_workers_ready(1)
    daemon_log = open(c.tmp / "daemon.log", "w")
    daemon = subprocess.Popen(
        [sys.executable, "-m", "dagster._daemon", "run", "-m", "tests.fixtures.held_job"],
        env=c.control_env(),
        cwd=str(REPO),
        stdout=daemon_log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        launch = subprocess.run(
            [sys.executable, "-m", "dagster", "job", "launch", "-m", "tests.fixtures.held_job", "-j", "held_job"],
            env=c.control_env(),
            capture_output=True,
            text=True,
            timeout=120,
            cwd=str(REPO),
        )
        assert launch.returncode == 0, launch.stderr[-3000:]
        deadline, pid = time.monotonic() + 90, None
        while pid is None:  # the run worker (a celery pool process) records its pid when it starts
            assert time.monotonic() < deadline, (c.tmp / "daemon.log").read_text()[-3000:] + c.worker_log("w1")[-3000:]
            runs, logs = _instance_runs(c)
            for r in logs.get(runs[0].run_id, []) if runs else []:
                found = re.match(r"Executing steps in process \(pid: (\d+)\)", r.user_message or "")
                pid = int(found.group(1)) if found else pid
            time.sleep(0.5)
        first = runs[0]
        assert first.status == dg.DagsterRunStatus.STARTED
        os.kill(pid, signal.SIGKILL)
        killed = time.monotonic()
        while True:
            runs, logs = _instance_runs(c)
            run = next(r for r in runs if r.run_id == first.run_id)
            if run.is_finished:
                break
            assert time.monotonic() - killed < 45, (
                f"run still {run.status} 45 s after kill -9: " + (c.tmp / "daemon.log").read_text()[-3000:]
            )
            time.sleep(0.5)
        failed_after = time.monotonic() - killed
        text_log = "\n".join(
            (r.dagster_event.message if r.dagster_event else None) or r.user_message or "" for r in logs[first.run_id]
        )
        assert run.status == dg.DagsterRunStatus.FAILURE, text_log[-3000:]
        assert "Detected run worker status" in text_log  # failed by run monitoring, not by the run itself
        hold.unlink()  # let the retry through
        while True:
            runs, logs = _instance_runs(c)
            retries = [r for r in runs if r.tags.get("dagster/parent_run_id") == first.run_id]
            if retries and retries[0].is_finished:
                break
            assert time.monotonic() - killed < 90, (
                f"no finished retry run: {[(r.run_id, r.status) for r in runs]} "
                + (c.tmp / "daemon.log").read_text()[-3000:]
            )
            time.sleep(0.5)
        assert len(retries) == 1 and retries[0].tags.get("dagster/retry_number") == "1"
        assert retries[0].status == dg.DagsterRunStatus.SUCCESS, c.worker_log("w1")[-3000:]
        assert failed_after < 45
    finally:
        os.killpg(daemon.pid, signal.SIGTERM)
        try:
            daemon.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(daemon.pid, signal.SIGKILL)
            daemon.wait(timeout=10)
        daemon_log.close()
