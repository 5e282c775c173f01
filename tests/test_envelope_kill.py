"""docs/architecture.md ("Bad input and faults"): a sweep killed with SIGKILL mid-way, then re-run, leaves every DEK readable
and every object decrypting to its original bytes (PostgreSQL, thousands of DEKs)."""

import base64
import json
import os
import secrets
import signal
import subprocess
import sys
import time

import pytest
from sqlalchemy import text

from kms_pipelines.core.envelope import data_keys as envelope
from kms_pipelines.core.keys import lifecycle
from kms_pipelines.core.runtime.wiring import context_from_env

KEY = "data:identity-documents"
N = 2000

CHILD = r"""
import json, sys, time
from kms_pipelines.core.envelope import data_keys as envelope
from kms_pipelines.core.runtime.wiring import context_from_env

ctx = context_from_env()

def progress(p):
    print(json.dumps({"batch": p.batch, "total": p.total_moved}), flush=True)
    time.sleep(0.02)  # a slow-ish sweep, so the parent can kill it in the middle

envelope.sweep(ctx, batch_size=25, progress=progress)
print("DONE", flush=True)
"""


@pytest.mark.slow
def test_kill_9_mid_sweep_then_rerun_leaves_every_object_readable(tmp_path, pg_url):
    env = dict(
        os.environ,
        KMS_HOME=str(tmp_path / "home"),
        KMS_DATABASE_URL=pg_url,
        KMS_KEYSTORE="software",
        KMS_MASTER_KEY=base64.b64encode(secrets.token_bytes(32)).decode(),
        PYTHONUNBUFFERED="1",
    )
    env.pop("KMS_POLICY", None)
    ctx = context_from_env(env)
    lifecycle.bootstrap(ctx)
    originals = {}
    for i in range(N):
        plain = secrets.token_bytes(16 + i % 48)
        originals[f"id-{i}"] = (plain, envelope.encrypt(ctx, KEY, f"id-{i}", plain))
    lifecycle.rotate(ctx, KEY)

    child = subprocess.Popen(
        [sys.executable, "-c", CHILD],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=os.getcwd(),
    )
    seen = 0
    deadline = time.monotonic() + 120
    try:
        while seen < 10 and time.monotonic() < deadline:
            line = child.stdout.readline()
            if not line:
                break
            if line.startswith("{"):
                seen = json.loads(line)["batch"]
        assert seen >= 10, f"sweep child made no progress: {child.stderr.read()[-2000:]}"
        os.kill(child.pid, signal.SIGKILL)
    finally:
        child.kill()
        child.wait(timeout=30)
    assert child.returncode == -signal.SIGKILL

    with ctx.engine.connect() as conn:
        by_version = dict(
            conn.execute(
                text("SELECT key_version, count(*) FROM deks WHERE key_name = :k GROUP BY key_version"), {"k": KEY}
            ).all()
        )
    assert by_version.get(2, 0) >= 10 * 25 and by_version.get(1, 0) > 0, by_version  # killed mid-way
    assert sum(by_version.values()) == N

    result = envelope.sweep(ctx, batch_size=500)
    assert result.remaining == 0 and result.failed == 0
    assert result.moved == by_version[1]
    assert envelope.stranded(ctx) == []
    for object_id, (plain, blob) in originals.items():
        assert envelope.decrypt(ctx, blob, object_id=object_id) == plain
    from kms_pipelines.core.ledger import audit

    audit.flush(ctx)  # the audited keystore writes in the background; finish before the DB is dropped
    ctx.engine.dispose()
