"""Workers share nothing on disk (issue 15): a worker whose configuration only works on one
host refuses to start with one line, and nothing is generated on it."""

import base64
import json
import os
import re
import secrets
import shutil
import subprocess
import sys
from dataclasses import replace

import pytest

from kms_pipelines.core.access import principals as access
from kms_pipelines.core.access import tokens
from kms_pipelines.core.access.audited_keystore import unwrap
from kms_pipelines.core.foundation.keystore import KeyNotFound, keystore_from_env
from kms_pipelines.core.foundation.worker import WorkerConfigError, require_worker_env, worker_problems

GOOD = {
    "KMS_DATABASE_URL": "postgresql://kms@db/kms",
    "KMS_OBJECT_STORE": "s3://kms-prod/objects",
    "KMS_KEYSTORE": "pkcs11",
    "KMS_PKCS11_LIB": "/usr/lib/hsm.so",
    "KMS_PKCS11_TOKEN": "kms",
    "KMS_PKCS11_PIN": "0000",
    "KMS_SMTP_HOST": "smtp.internal",
    "KMS_SMTP_SENDER": "kms@example.com",
}


def kms(args, env, tmp_path):
    full = {k: v for k, v in os.environ.items() if not k.startswith("KMS_")}
    full.update(env, KMS_HOME=str(tmp_path / "worker-home"))
    return subprocess.run(
        [sys.executable, "-m", "kms_pipelines.cli", *args], env=full, capture_output=True, text=True, timeout=120
    )


def test_a_shared_nothing_configuration_passes():
    assert worker_problems(GOOD) == []
    require_worker_env(GOOD)


@pytest.mark.parametrize(
    "change, named",
    [
        ({"KMS_DATABASE_URL": ""}, "KMS_DATABASE_URL is not set"),
        ({"KMS_DATABASE_URL": "sqlite:////var/kms/kms.db"}, "KMS_DATABASE_URL is sqlite"),
        ({"KMS_OBJECT_STORE": "file:///var/kms/objects"}, "KMS_OBJECT_STORE is file://"),
        ({"KMS_OBJECT_STORE": "/var/kms/objects"}, "KMS_OBJECT_STORE is a local path"),
        ({"KMS_OBJECT_STORE": ""}, "KMS_OBJECT_STORE is not set"),
        ({"KMS_KEYSTORE": "software"}, "software keystore without a shared master key"),
        ({"KMS_PKCS11_PIN": ""}, "KMS_KEYSTORE=pkcs11 needs KMS_PKCS11_PIN"),
        ({"KMS_SMTP_HOST": ""}, "neither KMS_SMTP_HOST nor KMS_SLACK_WEBHOOK_URL is set"),
        ({"KMS_SMTP_SENDER": ""}, "KMS_SMTP_SENDER is required when KMS_SMTP_HOST is set"),
        ({"KMS_SMTP_HOST": "", "KMS_SLACK_WEBHOOK_URL": "hooks.slack.com/x"}, "Slack webhook URL must be an http"),
    ],
)
def test_each_one_host_setting_is_refused_by_name(change, named, tmp_path):
    env = {**GOOD, **change}
    with pytest.raises(WorkerConfigError, match=named):
        require_worker_env(env, home=tmp_path)
    out = kms(["worker", "check"], env, tmp_path)
    assert out.returncode == 1 and out.stdout == ""
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and named in lines[0] and lines[0].startswith("kms: error: this worker cannot run")
    assert not (tmp_path / "worker-home").exists()  # refused before anything was created


def test_every_missing_piece_is_named_in_the_one_line(tmp_path):
    out = kms(["worker", "check"], {"KMS_DATABASE_URL": "sqlite:////x.db", "KMS_OBJECT_STORE": "file:///o"}, tmp_path)
    line = out.stderr.strip()
    assert out.returncode == 1 and len(line.splitlines()) == 1
    for named in ("sqlite", "file://", "shared master key", "no sealed key files"):
        assert named in line


def test_a_worker_command_generates_nothing_on_its_host(tmp_path):
    """KMS_ROLE=worker: any command refuses before the home, master.key or key files exist."""
    env = {
        "KMS_ROLE": "worker",
        "KMS_DATABASE_URL": "sqlite:////tmp/never.db",
        "KMS_KEYSTORE": "software",
        "KMS_OBJECT_STORE": str(tmp_path / "objects"),
    }
    out = kms(["keys", "list"], env, tmp_path)
    assert out.returncode == 1 and "this worker cannot run on a host of its own" in out.stderr
    assert not (tmp_path / "worker-home").exists() and not (tmp_path / "objects").exists()
    assert not os.path.exists("/tmp/never.db")


def test_slack_alone_is_enough_for_notifications():
    env = {**GOOD, "KMS_SMTP_HOST": "", "KMS_SLACK_WEBHOOK_URL": "https://hooks.slack.com/services/T/B/x"}
    assert worker_problems(env) == []


def test_a_worker_without_smtp_or_slack_refuses_before_writing_an_outbox(tmp_path):
    """The outbox is a file on the worker's disk: nobody on that host reads it, so notices written
    there are lost. The refusal names both settings, and no home or outbox.jsonl appears."""
    env = {k: v for k, v in GOOD.items() if not k.startswith("KMS_SMTP")}
    out = kms(["worker", "check"], env, tmp_path)
    line = out.stderr.strip()
    assert out.returncode == 1 and len(line.splitlines()) == 1
    assert "neither KMS_SMTP_HOST nor KMS_SLACK_WEBHOOK_URL is set" in line and "outbox.jsonl" in line
    assert not (tmp_path / "worker-home").exists()  # nothing changed: no home, no outbox.jsonl
    assert kms(["worker", "check"], GOOD, tmp_path).returncode == 0  # the same env with SMTP passes


def _control_keystore(tmp_path):
    """A control host's software keystore with two sealed keys, its master key in a secret file,
    and a worker home holding a copy of the key files (as a mounted secret would)."""
    from kms_pipelines.core.foundation.keystore.base import AES_256, ED25519
    from kms_pipelines.core.foundation.keystore.software import SoftwareKeyStore

    master = secrets.token_bytes(32)
    (tmp_path / "mk").write_text(base64.b64encode(master).decode() + "\n")
    ks = SoftwareKeyStore(tmp_path / "control" / "artifacts" / "kms" / "keys", master)
    ks.generate("data:kek@v1", AES_256)
    ks.generate("kms-access.workload-signing", ED25519)
    ks.close()
    keys = tmp_path / "worker-home" / "artifacts" / "kms" / "keys"
    shutil.copytree(tmp_path / "control" / "artifacts" / "kms" / "keys", keys)
    env = {**GOOD, "KMS_KEYSTORE": "software", "KMS_MASTER_KEY_FILE": str(tmp_path / "mk")}
    return env, keys


def _snapshot(root):
    return {
        p.relative_to(root).as_posix(): (p.read_bytes() if p.is_file() else None, p.stat().st_mode)
        for p in sorted(root.rglob("*"))
    }


def test_a_software_worker_with_the_shared_master_key_and_mounted_key_files_passes(tmp_path):
    env, keys = _control_keystore(tmp_path)
    assert worker_problems(env, home=tmp_path / "worker-home") == []
    assert kms(["worker", "check"], env, tmp_path).returncode == 0


@pytest.mark.parametrize(
    "break_it, named",
    [
        (
            "wrong_master",
            "2 sealed key file(s) at {keys} do not open: data:kek@v1.key (does not open under the master key)",
        ),
        (
            "tampered_file",
            "1 sealed key file(s) at {keys} do not open: data:kek@v1.key (does not open under the master key)",
        ),
        ("not_a_key_file", "1 sealed key file(s) at {keys} do not open: data:kek@v1.key (not a sealed key file)"),
        ("unreadable", "1 sealed key file(s) at {keys} do not open: zz.key (cannot be read: Is a directory)"),
        ("empty_master_file", "KMS_MASTER_KEY_FILE {mk} is empty"),
        ("missing_master_file", "KMS_MASTER_KEY_FILE {mk} cannot be read (No such file or directory)"),
        ("bad_master", "KMS_MASTER_KEY must decode to 32 bytes, got 16"),
        ("no_key_files", "software keystore has no sealed key files at {keys}"),
    ],
)
def test_a_software_worker_whose_key_files_do_not_open_refuses_in_one_line(tmp_path, break_it, named):
    """An insider (or a stale secret) gives the worker key files from another control host, a
    tampered file, or no master key: the preflight opens every file under the master key and
    names what fails, before a step dies mid-shard with KeyNotFound. Nothing is changed."""
    env, keys = _control_keystore(tmp_path)
    mk = tmp_path / "mk"
    if break_it == "wrong_master":
        mk.write_text(base64.b64encode(secrets.token_bytes(32)).decode())
    elif break_it == "tampered_file":
        doc = json.loads((keys / "data:kek@v1.key").read_text())
        sealed = bytearray(base64.b64decode(doc["sealed"]))
        sealed[-1] ^= 1
        doc["sealed"] = base64.b64encode(bytes(sealed)).decode()
        (keys / "data:kek@v1.key").write_text(json.dumps(doc))
    elif break_it == "not_a_key_file":
        (keys / "data:kek@v1.key").write_text("{}")
    elif break_it == "unreadable":  # root reads any mode, so a directory stands in for an unreadable file
        (keys / "zz.key").mkdir()
    elif break_it == "empty_master_file":
        mk.write_text("\n")
    elif break_it == "missing_master_file":
        mk.unlink()
    elif break_it == "bad_master":
        env = {**env, "KMS_MASTER_KEY": base64.b64encode(secrets.token_bytes(16)).decode()}
    elif break_it == "no_key_files":
        shutil.rmtree(keys)
    named = named.format(keys=keys, mk=mk)
    home = tmp_path / "worker-home"
    home.mkdir(exist_ok=True)
    before = _snapshot(home), (mk.read_bytes() if mk.exists() else None)
    with pytest.raises(WorkerConfigError, match=re.escape(named)):
        require_worker_env(env, home=home)
    out = kms(["worker", "check"], env, tmp_path)
    lines = out.stderr.strip().splitlines()
    assert out.returncode == 1 and len(lines) == 1 and named in lines[0], out.stderr
    assert (_snapshot(home), (mk.read_bytes() if mk.exists() else None)) == before  # nothing changed
    assert not (home / "master.key").exists()  # and no host-local master key was generated


def test_master_key_file_is_read_and_a_missing_one_is_named(tmp_path):
    key = secrets.token_bytes(32)
    (tmp_path / "mk").write_text(base64.b64encode(key).decode() + "\n")
    ks = keystore_from_env(tmp_path / "home", {"KMS_KEYSTORE": "software", "KMS_MASTER_KEY_FILE": str(tmp_path / "mk")})
    assert not (tmp_path / "home" / "master.key").exists()  # the shared key was used, none generated
    ks.close()
    with pytest.raises(Exception, match="KMS_MASTER_KEY_FILE .*cannot be read"):
        keystore_from_env(tmp_path / "h2", {"KMS_KEYSTORE": "software", "KMS_MASTER_KEY_FILE": str(tmp_path / "no")})


def test_a_worker_never_creates_the_workload_signing_key(make_kms):
    ctx = make_kms("sqlite")
    worker = replace(ctx, role="worker")
    with pytest.raises(KeyNotFound, match="a worker never creates one"):
        tokens.issue_workload_token(worker, "workload:dagster")
    assert not unwrap(ctx.keystore).exists(access.SIGNING_REF)  # nothing generated
    token = tokens.issue_workload_token(ctx, "workload:dagster")  # the control host creates it once
    assert tokens.verify_workload_token(worker, token).sub == "workload:dagster"  # and the worker uses it


def test_a_drill_on_a_worker_is_refused_before_it_restores_or_writes_anything(make_kms):
    """A drill's runbook report is a file under KMS_HOME; written on a worker, the control host
    (and compliance, which checks its SHA-256) would never find it. Nothing is recorded."""
    from sqlalchemy import func, select

    from kms_pipelines.core.backup import drills
    from kms_pipelines.core.backup.backups import BackupError
    from kms_pipelines.core.foundation.db.models_backup import Drill

    ctx = make_kms("sqlite")
    with pytest.raises(BackupError, match="run restore_drill on the control host, not on a worker"):
        drills.run_drill(replace(ctx, role="worker"))
    with ctx.transaction() as s:
        assert s.scalar(select(func.count()).select_from(Drill)) == 0
    assert not (ctx.home / "runbook").exists()
