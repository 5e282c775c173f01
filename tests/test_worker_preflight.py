"""Workers share nothing on disk (issue 15): a worker whose configuration only works on one
host refuses to start with one line, and nothing is generated on it."""

import base64
import os
import secrets
import subprocess
import sys
from dataclasses import replace

import pytest

from kms_pipelines.core import access
from kms_pipelines.core.keystore import KeyNotFound, keystore_from_env
from kms_pipelines.core.worker import WorkerConfigError, require_worker_env, worker_problems

GOOD = {"KMS_DATABASE_URL": "postgresql://kms@db/kms", "KMS_OBJECT_STORE": "s3://kms-prod/objects",
        "KMS_KEYSTORE": "pkcs11", "KMS_PKCS11_LIB": "/usr/lib/hsm.so", "KMS_PKCS11_TOKEN": "kms",
        "KMS_PKCS11_PIN": "0000"}


def kms(args, env, tmp_path):
    full = {k: v for k, v in os.environ.items() if not k.startswith("KMS_")}
    full.update(env, KMS_HOME=str(tmp_path / "worker-home"))
    return subprocess.run([sys.executable, "-m", "kms_pipelines.cli", *args], env=full, capture_output=True,
                          text=True, timeout=120)


def test_a_shared_nothing_configuration_passes():
    assert worker_problems(GOOD) == []
    require_worker_env(GOOD)


@pytest.mark.parametrize("change, named", [
    ({"KMS_DATABASE_URL": ""}, "KMS_DATABASE_URL is not set"),
    ({"KMS_DATABASE_URL": "sqlite:////var/kms/kms.db"}, "KMS_DATABASE_URL is sqlite"),
    ({"KMS_OBJECT_STORE": "file:///var/kms/objects"}, "KMS_OBJECT_STORE is file://"),
    ({"KMS_OBJECT_STORE": "/var/kms/objects"}, "KMS_OBJECT_STORE is a local path"),
    ({"KMS_OBJECT_STORE": ""}, "KMS_OBJECT_STORE is not set"),
    ({"KMS_KEYSTORE": "software"}, "software keystore without a shared master key"),
    ({"KMS_PKCS11_PIN": ""}, "KMS_KEYSTORE=pkcs11 needs KMS_PKCS11_PIN"),
])
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
    out = kms(["worker", "check"], {"KMS_DATABASE_URL": "sqlite:////x.db", "KMS_OBJECT_STORE": "file:///o"},
              tmp_path)
    line = out.stderr.strip()
    assert out.returncode == 1 and len(line.splitlines()) == 1
    for named in ("sqlite", "file://", "shared master key", "no sealed key files"):
        assert named in line


def test_a_worker_command_generates_nothing_on_its_host(tmp_path):
    """KMS_ROLE=worker: any command refuses before the home, master.key or key files exist."""
    env = {"KMS_ROLE": "worker", "KMS_DATABASE_URL": "sqlite:////tmp/never.db", "KMS_KEYSTORE": "software",
           "KMS_OBJECT_STORE": str(tmp_path / "objects")}
    out = kms(["keys", "list"], env, tmp_path)
    assert out.returncode == 1 and "this worker cannot run on a host of its own" in out.stderr
    assert not (tmp_path / "worker-home").exists() and not (tmp_path / "objects").exists()
    assert not os.path.exists("/tmp/never.db")


def test_a_software_worker_with_a_shared_master_key_and_mounted_key_files_passes(tmp_path):
    keys = tmp_path / "artifacts" / "kms" / "keys"
    keys.mkdir(parents=True)
    (keys / "kms-access.workload-signing.key").write_text("{}")  # a mounted, sealed key file
    env = {**GOOD, "KMS_KEYSTORE": "software", "KMS_MASTER_KEY_FILE": str(tmp_path / "mk")}
    assert worker_problems(env, home=tmp_path) == []


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
        access.issue_workload_token(worker, "workload:dagster")
    assert not access.unwrap(ctx.keystore).exists(access.SIGNING_REF)  # nothing generated
    token = access.issue_workload_token(ctx, "workload:dagster")  # the control host creates it once
    assert access.verify_workload_token(worker, token).sub == "workload:dagster"  # and the worker uses it
