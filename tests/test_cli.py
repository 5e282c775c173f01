"""The `kms` command as operators use it: exit codes, one-line errors, no change on refusal."""

import json
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner
from sqlalchemy import create_engine, select, text

from kms_pipelines.cli import cli
from kms_pipelines.core.foundation.db.append_only import create_append_only_triggers, drop_append_only_triggers
from kms_pipelines.core.foundation.db.models import KeyVersion, LedgerEntry
from kms_pipelines.core.foundation.policy import DEFAULT_POLICY_PATH


@pytest.fixture
def run(tmp_path, monkeypatch):
    monkeypatch.setenv("KMS_HOME", str(tmp_path / "home"))
    for var in ("KMS_DATABASE_URL", "KMS_POLICY", "KMS_KEYSTORE", "KMS_OBJECT_STORE", "KMS_MASTER_KEY"):
        monkeypatch.delenv(var, raising=False)

    def invoke(*args, env=None):
        return CliRunner().invoke(cli, list(args), env=env or {}, catch_exceptions=False)

    invoke.home = tmp_path / "home"
    return invoke


def db_state(url):
    engine = create_engine(url)
    with engine.connect() as conn:
        versions = conn.execute(
            select(KeyVersion.key_id, KeyVersion.version, KeyVersion.state).order_by(KeyVersion.id)
        ).all()
        ledger = conn.execute(select(LedgerEntry.seq, LedgerEntry.entry_hash).order_by(LedgerEntry.seq)).all()
    engine.dispose()
    return versions, ledger


@pytest.fixture(params=["sqlite", "postgres"])
def db_env(request, tmp_path):
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'cli.db'}"
    else:
        url = request.getfixturevalue("pg_database")()
    return {"KMS_DATABASE_URL": url}


def test_init_twice_changes_nothing_the_second_time(run, db_env):
    first = run("init", "--json", env=db_env)
    assert first.exit_code == 0, first.output
    assert len(json.loads(first.output)["created"]) == 11
    before = db_state(db_env["KMS_DATABASE_URL"])
    second = run("init", "--json", env=db_env)
    assert second.exit_code == 0 and json.loads(second.output)["created"] == []
    assert db_state(db_env["KMS_DATABASE_URL"]) == before


def test_rotate_and_list(run, db_env):
    import pyotp

    admins = ("init", "--admin", "sre=sre_oncall", "--admin", "b", "--admin", "c", "--admin", "d", "--json")
    refused = run(*admins, env=db_env)  # every admin registers a security key: for which console?
    assert refused.exit_code == 2 and "--admin needs --console-origin" in refused.output
    if db_env["KMS_DATABASE_URL"].startswith("sqlite:///"):  # refused before anything was created
        assert not Path(db_env["KMS_DATABASE_URL"].removeprefix("sqlite:///")).exists()
    init = run(
        *admins, "--console-origin", "https://kms.example.test", "--software-keys", str(run.home / "keys"), env=db_env
    )
    assert init.exit_code == 0, init.output
    assert sorted(p.name for p in (run.home / "keys").iterdir()) == [f"{n}.fido2.json" for n in ("b", "c", "d", "sre")]
    sre = pyotp.parse_uri(json.loads(init.output)["enrolled"][0]["provisioning_uri"])
    out = run("keys", "rotate", "service:api-gateway", "--reason", "tenant-rotation", env=db_env)
    assert out.exit_code == 2 and "needs --requested-by and --totp" in out.output  # R2 names a proven human
    out = run(
        "keys",
        "rotate",
        "service:api-gateway",
        "--reason",
        "tenant-rotation",
        "--requested-by",
        "sre",
        "--totp",
        sre.now(),
        env=db_env,
    )
    assert out.exit_code == 0 and "v1 -> v2" in out.output
    listing = json.loads(run("keys", "list", "--json", env=db_env).output)
    states = {(r["key"], r["version"]): r["state"] for r in listing}
    assert states[("service:api-gateway", 1)] == "rotated" and states[("service:api-gateway", 2)] == "active"
    assert run("ledger", "verify", env=db_env).exit_code == 0


@pytest.mark.parametrize(
    "args, code, message",
    [
        (("keys", "rotate", "nope"), 1, "unknown key 'nope'"),
        (("keys", "rotate", "service:payroll"), 1, "unknown key 'service:payroll'"),
        (("keys", "rotate"), 2, "Missing argument"),
        (("keys", "rotate", "root", "--reason", "boredom"), 2, "Invalid value"),
        (("keys", "rotate", "root"), 1, "needs dual approval (policy A4)"),
        (("keys", "rotate", "data:postgres", "--reason", "manual"), 1, "kms keys rotate data:postgres --manual"),
        (("--at", "yesterday", "keys", "list"), 2, "not an ISO-8601"),
    ],
)
def test_refusals_exit_nonzero_with_one_line_and_change_nothing(run, db_env, args, code, message):
    run("init", env=db_env)
    before = db_state(db_env["KMS_DATABASE_URL"])
    result = CliRunner().invoke(cli, list(args), env=db_env)
    assert result.exit_code == code, result.output
    assert message in result.output
    assert "Traceback" not in result.output
    assert db_state(db_env["KMS_DATABASE_URL"]) == before


def test_invalid_policy_is_refused_before_anything_changes(run, db_env, tmp_path):
    run("init", env=db_env)
    before = db_state(db_env["KMS_DATABASE_URL"])
    bad = yaml.safe_load(DEFAULT_POLICY_PATH.read_text())
    bad["key_classes"]["root"]["rotation_days"] = -1
    path = tmp_path / "bad-policy.yaml"
    path.write_text(yaml.safe_dump(bad))
    result = CliRunner().invoke(cli, ["keys", "rotate", "root"], env={**db_env, "KMS_POLICY": str(path)})
    assert result.exit_code == 1
    assert "key_classes.root.rotation_days" in result.output
    assert db_state(db_env["KMS_DATABASE_URL"]) == before


def test_unreachable_database_is_a_clear_error(run):
    result = CliRunner().invoke(cli, ["init"], env={"KMS_DATABASE_URL": "postgresql://kms@127.0.0.1:1/kms"})
    assert result.exit_code == 1
    assert "unreachable" in result.output and "127.0.0.1:1" in result.output
    assert "Traceback" not in result.output


def test_ledger_verify_names_the_first_bad_seq(run, db_env):
    run("init", env=db_env)
    intact = CliRunner().invoke(cli, ["ledger", "verify"], env=db_env)
    # which verifier ran: the C kernel over COPY on PostgreSQL, the row-by-row path on SQLite
    sqlite = db_env["KMS_DATABASE_URL"].startswith("sqlite")
    assert intact.exit_code == 0 and f"(verifier: {'rows' if sqlite else 'copy-c'})" in intact.output
    forced = CliRunner().invoke(cli, ["ledger", "verify", "--json"], env={**db_env, "KMS_LEDGER_VERIFY_PYTHON": "1"})
    assert json.loads(forced.stdout)["verifier"] == ("rows" if sqlite else "copy-python")
    engine = create_engine(db_env["KMS_DATABASE_URL"])
    with engine.begin() as conn:
        drop_append_only_triggers(conn, "ledger_entries")
        conn.execute(text("UPDATE ledger_entries SET reason = 'nothing to see' WHERE seq = 3"))
        create_append_only_triggers(conn, "ledger_entries")
    engine.dispose()
    result = CliRunner().invoke(cli, ["ledger", "verify", "--json"], env=db_env)
    assert result.exit_code == 1
    report = json.loads(result.stdout)
    assert report["ok"] is False and report["first_bad_seq"] == 3
    plain = CliRunner().invoke(cli, ["ledger", "verify"], env=db_env)
    assert plain.exit_code == 1 and "seq 3" in plain.output


def test_keys_list_prints_the_full_fingerprint_that_evidence_verify_trusts(run, tmp_path):
    from kms_pipelines.core.compliance import evidence
    from kms_pipelines.core.runtime.wiring import context_from_env

    assert run("init").exit_code == 0
    listed = run("keys", "list")
    root_line = next(line for line in listed.output.splitlines() if line.startswith("root "))
    printed = root_line.split()[-1]
    as_json = next(r for r in json.loads(run("keys", "list", "--json").output) if r["key"] == "root")
    assert printed == as_json["fingerprint"] and len(printed) == len("SHA256:") + 64
    bundle = tmp_path / "evidence.kmsev"
    evidence.export(context_from_env(), bundle)
    assert evidence.verify_bundle(bundle, trusted_fingerprints=[printed]).ok  # pasted as printed


def test_long_commands_say_they_are_alive_on_stderr_and_quick_ones_stay_quiet():
    import time

    import click

    from kms_pipelines.cli import heartbeat

    @click.command()
    @click.argument("seconds", type=float)
    def work(seconds):
        with heartbeat("backup", every=0.2):
            time.sleep(seconds)
        click.echo("done")

    slow = CliRunner().invoke(work, ["0.7"])
    assert slow.stdout == "done\n" and slow.stderr.count("backup: still running (") >= 2
    quick = CliRunner().invoke(work, ["0"])
    assert quick.stdout == "done\n" and quick.stderr == ""
