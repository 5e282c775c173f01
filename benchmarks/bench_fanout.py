"""Where does a celery fan-out of the rewrap sweep beat one ``kms envelope sweep`` process?

For each N (and W workers), on one PostgreSQL database, software keystore (shared master
key, sealed key files copied to each worker home as a mounted secret would be):

* ``sweep.single``: wall time of ``kms envelope sweep`` (a fresh process, start-up included);
* ``sweep.fanout``: wall time of ``dagster job execute -j dek_rewrap_fanout_job`` with
  KMS_EXECUTOR=celery and W already-running ``kms worker start`` workers (one process each,
  every step sweeping shards through leases), the same N DEKs moved;
* ``sweep.fanout_inprocess``: the same job with KMS_EXECUTOR=in_process (Dagster's own
  run overhead without celery).

The three are interleaved (single, in-process, celery; ``--repeat`` rounds, median of each
reported, every round's seconds and the load average before and after recorded), so a burst
of load from elsewhere hits all three. The workers run through every round (their start-up
is not measured; idle, they only poll Redis).

``ratio`` = single seconds / fan-out seconds (> 1: the fan-out pays). Needs Redis
(KMS_BENCH_REDIS_URL, default redis://127.0.0.1:6379/9) and PostgreSQL (KMS_BENCH_DATABASE_URL).

    .venv/bin/python benchmarks/bench_fanout.py --sizes 20000 100000 --workers 2
    .venv/bin/python benchmarks/bench_fanout.py --pkcs11 --sizes 20000   # one size per run: one SoftHSM token per process
"""

from __future__ import annotations

import argparse
import base64
import functools
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.bench_sweep import BenchDb, populate  # noqa: E402
from benchmarks.harness import emit, result  # noqa: E402

KEY = "data:identity-documents"
REDIS = os.environ.get("KMS_BENCH_REDIS_URL", "redis://127.0.0.1:6379/9")
CONSOLE_ORIGIN = "https://kms.bench.test"  # the admins' keys are registered for it; nothing serves it


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sizes", type=int, nargs="+", default=[20_000])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--pkcs11", action="store_true", help="keys in a SoftHSM2 token shared by every process")
    parser.add_argument("--repeat", type=int, default=3, help="interleaved rounds (median reported)")
    args = parser.parse_args()
    import statistics

    import yaml
    from aiosmtpd.controller import Controller
    from aiosmtpd.handlers import Sink
    from moto.server import ThreadedMotoServer
    from sqlalchemy.engine import make_url

    from kms_pipelines.core.keys import lifecycle
    from kms_pipelines.core.runtime.wiring import context_from_env

    # A worker refuses to start without SMTP or Slack (its outbox is on a host nobody reads).
    smtp = Controller(Sink(), hostname="127.0.0.1", port=_free_port())
    smtp.start()
    s3 = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    s3.start()
    host, port = s3.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    import boto3

    boto3.client(
        "s3", endpoint_url=endpoint, region_name="us-east-1", aws_access_key_id="test", aws_secret_access_key="test"
    ).create_bucket(Bucket="bench", ObjectLockEnabledForBucket=True)
    for n in args.sizes:
        kms_db, dagster_db = BenchDb(), BenchDb()
        tmp = Path(tempfile.mkdtemp(prefix="kms-fanout-"))
        workers = []
        try:
            policy = yaml.safe_load((REPO / "assets" / "policy.yaml").read_text())
            policy["envelope"]["fanout_steps"] = args.workers
            # the ceremony's admins register software security keys (kms init --software-keys),
            # which only a policy allowing software authenticators accepts
            policy["console"]["allow_software_authenticators"] = True
            (tmp / "policy.yaml").write_text(yaml.safe_dump(policy))
            (tmp / "dagster").mkdir()
            cfg = yaml.safe_load((REPO / "deploy" / "dagster.yaml").read_text())
            cfg.pop("compute_logs")
            (tmp / "dagster" / "dagster.yaml").write_text(yaml.safe_dump(cfg))
            d = make_url(dagster_db.url)
            base = {k: v for k, v in os.environ.items() if not k.startswith(("KMS_", "DAGSTER_"))}
            base.update(
                PYTHONPATH=str(REPO),
                KMS_POLICY=str(tmp / "policy.yaml"),
                KMS_DATABASE_URL=kms_db.url,
                KMS_OBJECT_STORE=f"s3://bench/kms-{n}",
                KMS_S3_ENDPOINT_URL=endpoint,
                KMS_KEYSTORE="software",
                KMS_MASTER_KEY=base64.b64encode(secrets.token_bytes(32)).decode(),
                KMS_CELERY_BROKER=REDIS,
                DAGSTER_HOME=str(tmp / "dagster"),
                DAGSTER_PG_HOST=d.host or "127.0.0.1",
                DAGSTER_PG_PORT=str(d.port or 5432),
                DAGSTER_PG_USER=d.username or "postgres",
                DAGSTER_PG_PASSWORD=d.password or "",
                DAGSTER_PG_DB=d.database,
                AWS_ACCESS_KEY_ID="test",
                AWS_SECRET_ACCESS_KEY="test",
                AWS_DEFAULT_REGION="us-east-1",
                KMS_SMTP_HOST="127.0.0.1",
                KMS_SMTP_PORT=str(smtp.port),
                KMS_SMTP_SENDER="kms-bench@example.com",
            )
            if args.pkcs11:
                from kms_pipelines.core.foundation.keystore.softhsm_setup import init_softhsm_token

                token = init_softhsm_token(tmp / "hsm", "kms-bench", "1234", "5678", for_subprocesses=True)
                os.environ["SOFTHSM2_CONF"] = token.conf_path  # this process populates and rotates through it too
                base.update(
                    KMS_KEYSTORE="pkcs11",
                    KMS_PKCS11_LIB=token.lib_path,
                    KMS_PKCS11_TOKEN=token.label,
                    KMS_PKCS11_PIN=token.pin,
                    SOFTHSM2_CONF=token.conf_path,
                )
            control = dict(base, KMS_HOME=str(tmp / "control"))

            def run(cmd, env=control):
                out = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=str(REPO))
                if out.returncode:
                    raise SystemExit(f"{' '.join(cmd[2:5])} exited {out.returncode}: {out.stderr[-1500:]}")
                return out

            out = run(
                [
                    sys.executable,
                    "-m",
                    "kms_pipelines.cli",
                    "init",
                    "--admin",
                    "sec-1",
                    "--admin",
                    "sec-2",
                    "--admin",
                    "sec-3",
                    "--json",
                    "--console-origin",
                    CONSOLE_ORIGIN,
                    "--software-keys",
                    str(tmp / "keys"),
                ]
            )
            import json

            import pyotp

            issuer = pyotp.parse_uri(json.loads(out.stdout)["enrolled"][0]["provisioning_uri"])
            # the workload signing key is created by the first token a proven human issues
            run(
                [
                    sys.executable,
                    "-m",
                    "kms_pipelines.cli",
                    "token",
                    "issue",
                    "workload:dagster",
                    "--as",
                    "sec-1",
                    "--totp",
                    issuer.now(),
                ]
            )
            ctx = context_from_env(control)
            with ctx.transaction() as s:
                ref = lifecycle.active_version(lifecycle.get_key(s, KEY)).wrap_ref
            from kms_pipelines.core.access.audited_keystore import unwrap

            raw = unwrap(ctx.keystore)
            populate_ctx(ctx, n, functools.partial(raw.new_wrapped_dek, ref))

            def rotate_and_share(ctx=ctx, tmp=tmp):  # bound now: this loop's context and directory
                lifecycle.rotate(ctx, KEY, reason="cadence")
                for w in range(
                    args.workers if not args.pkcs11 else 0
                ):  # the sealed key files, as a mounted secret would hold them
                    dst = tmp / f"home-{w}" / "artifacts" / "kms" / "keys"
                    shutil.rmtree(dst, ignore_errors=True)
                    shutil.copytree(tmp / "control" / "artifacts" / "kms" / "keys", dst)

            rotate_and_share()  # the workers' key files exist before they start (preflight)
            for w in range(args.workers):
                env = dict(base, KMS_HOME=str(tmp / f"home-{w}"), KMS_ROLE="worker", KMS_EXECUTOR="celery")
                workers.append(
                    subprocess.Popen(
                        [sys.executable, "-m", "kms_pipelines.cli", "worker", "start", "--name", f"bench{w}@%h"],
                        env=env,
                        stdout=subprocess.DEVNULL,
                        stderr=subprocess.DEVNULL,
                        start_new_session=True,
                    )
                )
            from celery import Celery

            app = Celery(broker=REDIS, backend=REDIS)
            while len(app.control.ping(timeout=1.0) or []) < args.workers:
                for p in workers:
                    if p.poll() is not None:
                        raise SystemExit(
                            f"bench worker exited with {p.returncode} (run `kms worker check` with its env)"
                        )

            def timed_run(cmd, env=control):
                rotate_and_share()
                started = time.perf_counter()
                run(cmd, env)
                return time.perf_counter() - started

            job = [
                sys.executable,
                "-m",
                "dagster",
                "job",
                "execute",
                "-m",
                "kms_pipelines.definitions",
                "-j",
                "dek_rewrap_fanout_job",
            ]
            singles, inprocs, fanouts, loads = [], [], [], [os.getloadavg()]
            for _ in range(max(1, args.repeat)):
                singles.append(timed_run([sys.executable, "-m", "kms_pipelines.cli", "envelope", "sweep"]))
                inprocs.append(timed_run(job, dict(control, KMS_EXECUTOR="in_process")))
                fanouts.append(timed_run(job, dict(control, KMS_EXECUTOR="celery")))
                loads.append(os.getloadavg())
            single, inprocess, fanout = (statistics.median(x) for x in (singles, inprocs, fanouts))
            emit(
                result(
                    "sweep.fanout.pkcs11" if args.pkcs11 else "sweep.fanout",
                    n,
                    fanout,
                    single,
                    workers=args.workers,
                    single_seconds=round(single, 2),
                    inprocess_job_seconds=round(inprocess, 2),
                    runs_single_s=[round(x, 2) for x in singles],
                    runs_inprocess_s=[round(x, 2) for x in inprocs],
                    runs_fanout_s=[round(x, 2) for x in fanouts],
                    repeat=len(fanouts),
                    load_average=[round(x, 2) for x in loads[-1]],
                    load_before=[round(x, 2) for x in loads[0]],
                    load_per_round=[[round(x, 2) for x in la] for la in loads[1:]],
                )
            )
        finally:
            for p in workers:
                os.killpg(p.pid, signal.SIGTERM)
            for p in workers:
                p.wait(timeout=30)
            kms_db.drop()
            dagster_db.drop()
            shutil.rmtree(tmp, ignore_errors=True)
    s3.stop()
    smtp.stop()


def _free_port() -> int:
    import socket

    with socket.socket() as sock:  # aiosmtpd cannot bind port 0 (it connects to itself to check)
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def populate_ctx(ctx, n, wrap_one):
    import benchmarks.bench_sweep as bench_sweep

    bench_sweep.KEY = KEY  # a key the policy declares, so `kms init` made it
    populate(ctx, n, wrap_one)


if __name__ == "__main__":
    main()
