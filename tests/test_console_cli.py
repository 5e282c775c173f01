"""`kms console registration-link|status` (issue 13): the CLI bootstrap of the first console
keys, under dual control with `kms approve --operation console-registration`."""

import base64
import time

import pyotp
from click.testing import CliRunner

from kms_pipelines.cli import cli
from kms_pipelines.core.foundation.clock import SystemClock
from tests.fixtures.kms import enrol_direct, security_key_file, write_test_policy

ORIGIN = "https://kms.example.test"


def test_registration_link_bootstrap_from_the_cli(make_kms, master_key, monkeypatch):
    monkeypatch.setenv("KMS_MASTER_KEY", base64.b64encode(master_key).decode())
    kms = make_kms("sqlite", clock=SystemClock())
    devices = {
        n: pyotp.parse_uri(enrol_direct(kms, n, r, key=n != "bo"))
        for n, r in (
            ("ann", "security_engineering"),
            ("bo", "sre_oncall"),
            ("cy", "compliance_officer"),
            ("dee", "security_engineering"),
        )
    }
    env = {
        "KMS_HOME": str(kms.home),
        "KMS_DATABASE_URL": kms.engine.url.render_as_string(hide_password=False),
        "KMS_OBJECT_STORE": str(kms.home / "objects"),
        "KMS_KEYSTORE": "software",
        "KMS_POLICY": write_test_policy(kms.home),
    }
    run = lambda *args: CliRunner().invoke(cli, list(args), env=env)  # noqa: E731
    link_cmd = ["console", "registration-link", "bo", "--ticket", "ONB-1", "--requested-by", "ann", "--origin", ORIGIN]
    step = kms.policy.access.totp_interval_seconds

    def ann(steps=0):  # ann's code for this or the next time-step (both inside the ±1 window)
        return devices["ann"].at(int(time.time()) + step * steps)

    refused = run(*link_cmd, "--totp", "000000" if ann() != "000000" else "000001")
    assert refused.exit_code == 1 and "TOTP code for 'ann' is wrong" in refused.output
    first = run(*link_cmd, "--totp", ann())
    assert first.exit_code == 1 and "needs 2 approvals" in first.output and "/register/" not in first.output
    for approver in ("cy", "dee"):
        ok = run(
            "approve",
            "--ticket",
            "ONB-1",
            "--operation",
            "console-registration",
            "--target",
            "bo",
            "--as",
            approver,
            "--totp",
            devices[approver].now(),
            "--software-key",
            security_key_file(kms, approver, kms.home),
        )
        assert ok.exit_code == 0, ok.output
    next_code = ann(1)
    second = run(*link_cmd, "--totp", next_code)
    assert second.exit_code == 0, second.output
    assert "approved by cy, dee" in second.output and f"{ORIGIN}/register/" in second.output
    again = run(*link_cmd, "--totp", next_code)
    assert again.exit_code == 1 and "replayed code refused" in again.output

    status = run("console", "status")
    assert status.exit_code == 1 and "bo: missing fido2" in status.output
    # bo registers a key from the terminal through the link (proving their TOTP), and may approve with it
    link = next(w for w in second.output.split() if "/register/" in w)
    key_file = kms.home / "bo.fido2.json"
    wrong = run(
        "console",
        "register",
        link,
        "--totp",
        "000000" if devices["bo"].now() != "000000" else "000001",
        "--software-key",
        str(key_file),
    )
    assert wrong.exit_code == 1 and "TOTP code for 'bo' is wrong" in wrong.output
    key_file.unlink()  # the refused registration stored nothing; a new key for the next try
    done = run("console", "register", link, "--totp", devices["bo"].now(), "--software-key", str(key_file))
    assert done.exit_code == 0 and "security key registered for bo at https://kms.example.test" in done.output
    status = run("console", "status")
    assert status.exit_code == 0, status.output
    bad = run(
        "console",
        "registration-link",
        "bo",
        "--ticket",
        "ONB-2",
        "--requested-by",
        "ann",
        "--totp",
        ann(),
        "--origin",
        "http://kms.example.test",
    )
    assert bad.exit_code != 0 and "console origin must be https://" in bad.output
