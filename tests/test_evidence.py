import io
import json
import os
import subprocess
import sys
from datetime import timedelta

import pytest
import zstandard
from sqlalchemy import text

from kms_pipelines.core.compliance import evidence
from kms_pipelines.core.keys import lifecycle
from kms_pipelines.core.ledger import checkpoints, rpt
from tests.test_rpt import admin, issue_n, snapshot


def _make_bundle(kms, tmp_path):
    issue_n(kms, 15, batch=5)
    checkpoints.write_checkpoint(kms)
    kms.clock.advance(timedelta(days=1))
    lifecycle.rotate(kms, "root")
    issue_n(kms, 15, start=15, batch=5)
    checkpoints.write_checkpoint(kms)
    issue_n(kms, 3, start=30)  # after the last checkpoint: covered by the seal
    report = evidence.export(kms, tmp_path / "evidence.jsonl.zst")
    assert report.sealed and report.live_ok and (report.rpts, report.checkpoints, report.root_keys) == (33, 2, 2)
    return kms, tmp_path / "evidence.jsonl.zst"


@pytest.fixture
def bundle(make_kms, tmp_path):
    return _make_bundle(make_kms("sqlite"), tmp_path)


def _offline_env(tmp_path):
    """A machine state with no database and no keystore: the KMS URL points nowhere."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("KMS_")}
    env.update(
        KMS_DATABASE_URL="postgresql://nobody@127.0.0.1:1/none",
        KMS_HOME=str(tmp_path / "empty-home"),
        KMS_KEYSTORE="pkcs11",
        KMS_OBJECT_STORE="s3://no-such-bucket",
        KMS_S3_ENDPOINT_URL="http://127.0.0.1:1",
    )
    return env


def _kms(args, env):
    return subprocess.run(
        [sys.executable, "-m", "kms_pipelines.cli", *args], env=env, capture_output=True, text=True, timeout=120
    )


def test_bundle_verifies_offline_with_no_database_or_keystore(kms, tmp_path):
    _, path = _make_bundle(kms, tmp_path)
    env = _offline_env(tmp_path)
    assert _kms(["ledger", "verify"], env).returncode == 1  # really no database here
    proc = _kms(["evidence", "verify", str(path), "--json"], env)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["ok"] and out["sealed"] and out["rpts"] == 33 and out["checkpoints"] == 2
    assert not (tmp_path / "empty-home").exists() or not any((tmp_path / "empty-home").rglob("*.key"))


def test_trusted_fingerprints(bundle):
    kms, path = bundle
    with kms.transaction() as s:
        fp = lifecycle.get_version(lifecycle.get_key(s, "root"), 1).fingerprint
    assert evidence.verify_bundle(path, trusted_fingerprints=[fp]).ok
    result = evidence.verify_bundle(path, trusted_fingerprints=["SHA256:" + "00" * 32])
    assert not result.ok and "trusted fingerprint" in result.problem


def _rewrite(path, edit):
    """Decompress, let ``edit`` change the list of records, recompress (an attacker with the file)."""
    with open(path, "rb") as fh:
        lines = io.TextIOWrapper(zstandard.ZstdDecompressor().stream_reader(fh), encoding="utf-8").read().splitlines()
    records = [json.loads(line) for line in lines]
    records = edit(records)
    body = "".join(json.dumps(r, separators=(",", ":")) + "\n" for r in records).encode()
    path.write_bytes(zstandard.ZstdCompressor(write_checksum=True).compress(body))  # a careful attacker


def _token_edit(records):
    for r in records:
        if r["t"] == "R" and r["s"] == 7:
            h, p, s = r["k"].split(".")
            payload = json.loads(rpt.b64url_decode(p))
            payload["subject"] = "someone-else"
            r["k"] = ".".join([h, rpt.b64url(json.dumps(payload).encode()), s])
    return records


def _drop_newest_tokens(records):
    return [r for r in records if not (r["t"] == "R" and r["s"] > 31)]


def _drop_newest_ledger(records):
    last = max(r["r"][0] for r in records if r["t"] == "L")
    return [r for r in records if not (r["t"] == "L" and r["r"][0] == last)]


def _drop_end(records):
    return records[:-1]


@pytest.mark.parametrize(
    "edit,area,fragment",
    [
        (_token_edit, "rpt", "token seq 7: payload altered"),
        (_drop_newest_tokens, "rpt", "RPT chain truncated"),
        (_drop_newest_ledger, "ledger", "ledger truncated"),
        (_drop_end, "bundle", "truncated (no end record)"),
    ],
)
def test_tampered_bundles_fail_offline(bundle, edit, area, fragment, tmp_path):
    _, path = bundle
    _rewrite(path, edit)
    result = evidence.verify_bundle(path)
    assert not result.ok and result.area == area and fragment in result.problem, result
    if edit is _token_edit:  # and through the CLI, on the machine with no database
        proc = _kms(["evidence", "verify", str(path)], _offline_env(tmp_path))
        assert proc.returncode == 1 and fragment in proc.stderr


def test_a_damaged_file_is_a_clean_failure(bundle, tmp_path):
    _, path = bundle
    path.write_bytes(path.read_bytes()[:-200])
    result = evidence.verify_bundle(path)
    assert not result.ok and result.area == "bundle"
    with pytest.raises(rpt.RptError, match="not found"):
        evidence.verify_bundle(tmp_path / "missing.zst")


def test_exporting_a_rewritten_database_leaves_the_bundle_unsealed(make_kms, tmp_path):
    from tests.test_checkpoints import rewrite_ledger

    kms = make_kms("sqlite")
    issue_n(kms, 4, batch=4)
    checkpoints.write_checkpoint(kms)
    rewrite_ledger(kms, 2, actor="mallory")
    report = evidence.export(kms, tmp_path / "ev.zst")
    assert not report.live_ok and not report.sealed and "ledger rewritten" in report.problem
    result = evidence.verify_bundle(tmp_path / "ev.zst")
    assert not result.ok and "ledger rewritten" in result.problem


def test_cli_issue_verify_checkpoint_export(tmp_path, monkeypatch):
    from click.testing import CliRunner

    from kms_pipelines.cli import cli
    from kms_pipelines.core.foundation import db

    home = tmp_path / "home"
    for k in [k for k in os.environ if k.startswith("KMS_")]:
        monkeypatch.delenv(k)
    monkeypatch.setenv("KMS_HOME", str(home))
    monkeypatch.setenv("KMS_DATABASE_URL", f"sqlite:///{home / 'kms.db'}")
    runner = CliRunner()

    def kms(*args):
        return runner.invoke(cli, list(args), catch_exceptions=False)

    assert kms("init").exit_code == 0
    issued = kms("rpt", "issue", "--subject", "issuer-1", "--claims", '{"amount": "10"}', "--json")
    assert issued.exit_code == 0 and json.loads(issued.stdout)["seq"] == 1
    assert kms("rpt", "issue", "--subject", "x", "--claims", "[1]").exit_code == 2
    refused = kms("rpt", "issue", "--subject", "", "--claims", "{}")
    assert refused.exit_code == 1 and "subject must be a non-empty string" in refused.stderr
    assert kms("ledger", "checkpoint").exit_code == 0
    ok = kms("rpt", "verify-chain", "--last", "1")
    assert ok.exit_code == 0 and "RPT chain intact: 1 token" in ok.stdout
    assert kms("ledger", "verify-checkpoints", "--rpt-signatures").exit_code == 0
    assert kms("evidence", "export", "--out", str(tmp_path / "b.zst")).exit_code == 0

    class _Ctx:  # only what tests.test_rpt.admin needs
        engine = db.make_engine(f"sqlite:///{home / 'kms.db'}")

    admin(_Ctx, "rpts", "DELETE FROM rpts WHERE seq = 1")
    _Ctx.engine.dispose()
    broken = kms("rpt", "verify-chain")
    assert broken.exit_code == 1 and "RPT chain BROKEN at seq 1" in broken.stderr and "truncated" in broken.stderr
    assert kms("ledger", "verify-checkpoints").exit_code == 1
    assert kms("ledger", "checkpoint").exit_code == 1  # refuses to sign the truncated state
    assert kms("evidence", "verify", str(tmp_path / "b.zst")).exit_code == 0  # the bundle predates the deletion
    assert kms("evidence", "export", "--out", str(tmp_path / "c.zst")).exit_code == 1
    assert kms("evidence", "verify", str(tmp_path / "c.zst")).exit_code == 1


def test_exporting_a_root_version_with_a_key_but_no_fingerprint_is_refused_and_writes_nothing(make_kms, tmp_path):
    kms = make_kms("sqlite")
    issue_n(kms, 3)
    out = tmp_path / "ev.zst"
    evidence.export(kms, out)  # publishes root v1's manifest; a refusal must leave this bundle as it is
    previous = out.read_bytes()
    with kms.engine.begin() as conn:  # an insider (or a half-done repair) blanks the fingerprint
        conn.execute(
            text(
                "UPDATE key_versions SET fingerprint = NULL "
                "WHERE version = 1 AND key_id = (SELECT id FROM keys WHERE name = 'root')"
            )
        )
    before = snapshot(kms)
    with pytest.raises(rpt.RptError) as exc:
        evidence.export(kms, out)
    assert str(exc.value) == "root v1 has a public key but no fingerprint; cannot export it"
    assert snapshot(kms) == before
    assert out.read_bytes() == previous and sorted(p.name for p in tmp_path.iterdir()) == ["ev.zst", "home0"]
