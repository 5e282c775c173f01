"""A `kms` command that needs state, run before `kms init` or from the wrong directory:
one line naming the fix, exit 1, and nothing created (no ./.kms, no master key)."""

import os
import subprocess
import sys

import pytest

READS_AND_WRITES = [
    ["keys", "list"],
    ["ledger", "verify"],
    ["report", "--format", "md"],
    ["backup", "list"],
    ["drill", "list"],
    ["audit", "verify"],
    ["events", "list"],
    ["keys", "rotate", "root", "--if-due"],
    ["evidence", "export", "--out", "bundle.kmsev"],
]


def _kms(args, cwd, env):
    return subprocess.run(
        [sys.executable, "-m", "kms_pipelines.cli", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.fixture
def bare_env(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("KMS_")}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (os.getcwd(), env.get("PYTHONPATH")) if p)
    return env


def _tree(path):
    return sorted(str(p.relative_to(path)) for p in path.rglob("*"))


@pytest.mark.parametrize("args", READS_AND_WRITES, ids=lambda a: " ".join(a[:2]))
def test_command_before_init_prints_one_line_and_creates_nothing(tmp_path, bare_env, args):
    before = _tree(tmp_path)
    out = _kms(args, tmp_path, bare_env)
    assert out.returncode == 1, out
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1, out.stderr
    assert "kms init" in lines[0] and "KMS_HOME" in lines[0] and str(tmp_path / ".kms") in lines[0]
    assert "Traceback" not in out.stderr and out.stdout == ""
    assert _tree(tmp_path) == before  # no ./.kms, no master.key, no empty database


def test_kms_home_pointing_at_an_empty_database_is_refused_without_migrating(tmp_path, bare_env):
    home = tmp_path / "state"
    home.mkdir()
    (home / "kms.db").write_bytes(b"")  # an empty SQLite file: a database with no schema
    bare_env["KMS_HOME"] = str(home)
    out = _kms(["keys", "list"], tmp_path, bare_env)
    assert out.returncode == 1 and "not initialised" in out.stderr and "kms init" in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1
    assert sorted(p.name for p in home.iterdir()) == ["kms.db"] and (home / "kms.db").stat().st_size == 0


def test_a_file_that_is_not_a_database_is_named_in_one_line(tmp_path, bare_env):
    home = tmp_path / "state"
    home.mkdir()
    (home / "kms.db").write_bytes(b"not a database at all, just text" * 10)
    bare_env["KMS_HOME"] = str(home)
    out = _kms(["ledger", "verify"], tmp_path, bare_env)
    assert out.returncode == 1 and "is not a KMS database" in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1 and "Traceback" not in out.stderr


def test_missing_master_key_is_named_not_regenerated(tmp_path, bare_env):
    bare_env["KMS_HOME"] = str(tmp_path / "state")
    assert _kms(["init"], tmp_path, bare_env).returncode == 0
    (tmp_path / "state" / "master.key").unlink()
    out = _kms(["keys", "list"], tmp_path, bare_env)
    assert out.returncode == 1 and "master key" in out.stderr and len(out.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "state" / "master.key").exists()  # a read never mints a new master key


def test_after_init_the_same_read_works(tmp_path, bare_env):
    assert _kms(["init"], tmp_path, bare_env).returncode == 0
    out = _kms(["keys", "list"], tmp_path, bare_env)
    assert out.returncode == 0 and "root" in out.stdout


def test_an_uninitialised_postgresql_database_is_named_and_left_empty(tmp_path, bare_env, pg_database):
    from sqlalchemy import create_engine, inspect

    url = pg_database()
    bare_env["KMS_DATABASE_URL"] = url
    bare_env["KMS_HOME"] = str(tmp_path / "state")
    out = _kms(["keys", "list"], tmp_path, bare_env)
    assert out.returncode == 1 and "is not initialised" in out.stderr and "kms init" in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1
    engine = create_engine(url.replace("postgresql://", "postgresql+psycopg://", 1))
    try:
        assert inspect(engine).get_table_names() == []
    finally:
        engine.dispose()
    assert not (tmp_path / "state").exists()
