"""Notifier tests against a real SMTP server and a real HTTP receiver on loopback."""

from __future__ import annotations

import base64
import json
import os
import socket

import pytest

from kms_pipelines.core.foundation.transports import (
    CompositeNotifier,
    DeliveryResult,
    KeyMaterialRefused,
    Notification,
    Notifier,
    NotifyConfigError,
    OutboxNotifier,
    RetryPolicy,
    SlackWebhookNotifier,
    SmtpNotifier,
    failures,
    notifier_from_env,
)

FAST = RetryPolicy(attempts=4, initial_wait=0.01, max_wait=0.05)


def _note(**kw) -> Notification:
    base = dict(
        subject="Manual rotation of service:api-gateway approved",
        body="Rotation of service:api-gateway v3 -> v4 approved by alice and bob (CHG-1042).\n"
        "New public key fingerprint: " + "ab" * 32,
        recipients=["compliance@example.com", "security@example.com"],
        slack_channels=["#kms-compliance"],
        severity="warning",
        kind="manual_rotation",
        ref="CHG-1042",
    )
    base.update(kw)
    return Notification(**base)


def _smtp(server, **kw) -> SmtpNotifier:
    return SmtpNotifier(server.host, server.port, "kms-pipelines@example.com", retry=FAST, timeout=5, **kw)


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_email_arrives(smtp_server):
    n = _note()
    res = _smtp(smtp_server).send(n)
    assert res == [DeliveryResult("email", True, None, f"smtp://127.0.0.1:{smtp_server.port}", 1)]
    assert len(smtp_server.messages) == 1
    got = smtp_server.messages[0]
    assert got.mail_from == "kms-pipelines@example.com"
    assert sorted(got.rcpt_tos) == ["compliance@example.com", "security@example.com"]
    assert got.message["Subject"] == "[KMS WARNING] Manual rotation of service:api-gateway approved"
    assert got.message["X-KMS-Kind"] == "manual_rotation"
    assert got.message["X-KMS-Ref"] == "CHG-1042"
    assert got.message["X-KMS-Notification-Id"] == n.id
    text = got.message.get_content()
    assert "approved by alice and bob" in text and n.id in text


def test_email_with_login(smtp_server):
    res = _smtp(smtp_server, username="kms", password="secret").send(_note())
    assert res[0].ok, res
    assert smtp_server.messages[0].login == "kms"
    bad = _smtp(smtp_server, username="kms", password="wrong").send(_note())
    assert not bad[0].ok and "permanent" in bad[0].error and bad[0].attempts == 1  # auth is not retried
    assert "wrong" not in bad[0].error


def test_email_unreachable_is_retried_then_reported():
    st = SmtpNotifier("127.0.0.1", _closed_port(), "kms@example.com", retry=FAST, timeout=2)
    res = st.send(_note())
    assert len(res) == 1 and not res[0].ok
    assert res[0].attempts == 4 and "gave up after 4" in res[0].error


def test_email_skipped_without_recipients(smtp_server):
    res = _smtp(smtp_server).send(_note(recipients=[]))
    assert res[0].ok and res[0].skipped
    assert smtp_server.messages == []


def test_slack_payload_arrives(slack_receiver):
    n = _note(slack_channels=["#kms-compliance", "#security-ops"])
    res = SlackWebhookNotifier(slack_receiver.url, retry=FAST).send(n)
    assert [(r.channel, r.ok, r.target, r.attempts) for r in res] == [
        ("slack", True, "#kms-compliance", 1),
        ("slack", True, "#security-ops", 1),
    ]
    assert [p["channel"] for p in slack_receiver.payloads] == ["#kms-compliance", "#security-ops"]
    p = slack_receiver.payloads[0]
    assert "Manual rotation of service:api-gateway approved" in p["text"]
    assert "WARNING" in p["text"]
    flat = json.dumps(p)
    assert "CHG-1042" in flat and "approved by alice and bob" in flat


def test_slack_retries_then_delivers(slack_receiver):
    slack_receiver.fail_next(2)
    res = SlackWebhookNotifier(slack_receiver.url, retry=FAST).send(_note())
    assert res[0].ok and res[0].attempts == 3
    assert slack_receiver.requests == 3 and len(slack_receiver.payloads) == 1


def test_slack_always_failing_but_email_still_delivered(tmp_path, smtp_server, slack_receiver):
    slack_receiver.fail_next(10_000)
    outbox = OutboxNotifier(tmp_path / "outbox.jsonl")
    notifier = CompositeNotifier(
        [outbox, _smtp(smtp_server), SlackWebhookNotifier(slack_receiver.url, retry=FAST)], record_to=outbox
    )
    n = _note()
    res = notifier.send(n)
    by = {r.channel: r for r in res}
    assert by["outbox"].ok and by["email"].ok
    assert not by["slack"].ok and "HTTP 500" in by["slack"].error and by["slack"].attempts == 4
    assert "XXXXSECRET" not in by["slack"].error  # the webhook URL is a credential
    assert failures(res) == [by["slack"]]
    assert len(smtp_server.messages) == 1
    # the failure to notify is itself recorded
    lines = outbox.read()
    assert [line["type"] for line in lines] == ["notification", "delivery"]
    assert lines[1]["notification_id"] == n.id and lines[1]["ok"] is False
    assert {r["channel"]: r["ok"] for r in lines[1]["results"]} == {"outbox": True, "email": True, "slack": False}


def test_slack_client_error_not_retried(slack_receiver):
    slack_receiver.fail_next(5, status=404)  # revoked webhook: retrying cannot help
    res = SlackWebhookNotifier(slack_receiver.url, retry=FAST).send(_note())
    assert not res[0].ok and res[0].attempts == 1 and "HTTP 404" in res[0].error
    assert slack_receiver.requests == 1


def test_slack_unreachable_is_retried_then_reported(slack_receiver):
    url = slack_receiver.url.rsplit(":", 1)[0] + ":" + str(_closed_port()) + "/x"
    res = SlackWebhookNotifier(url, retry=FAST).send(_note())
    assert not res[0].ok and res[0].attempts == 4  # connection refused is transient
    assert "/x" not in res[0].target


def test_composite_survives_a_raising_notifier(tmp_path):
    class Broken:
        channel = "pager"

        def send(self, n):
            raise RuntimeError("boom")

    outbox = OutboxNotifier(tmp_path / "o.jsonl")
    res = CompositeNotifier([Broken(), outbox]).send(_note())
    assert [(r.channel, r.ok) for r in res] == [("pager", False), ("outbox", True)]
    assert "boom" in res[0].error


def test_outbox_lines(tmp_path):
    ob = OutboxNotifier(tmp_path / "sub" / "outbox.jsonl")
    assert isinstance(ob, Notifier)
    n1, n2 = _note(), _note(subject="Drill report 2026-11", kind="drill_report", severity="info")
    assert ob.send(n1)[0].ok and ob.send(n2)[0].ok
    lines = (tmp_path / "sub" / "outbox.jsonl").read_text().splitlines()
    assert len(lines) == 2
    rec = json.loads(lines[1])
    assert rec["type"] == "notification" and rec["id"] == n2.id and rec["kind"] == "drill_report"
    assert rec["recipients"] == ["compliance@example.com", "security@example.com"]
    assert oct((tmp_path / "sub" / "outbox.jsonl").stat().st_mode & 0o777) == "0o600"


def test_notification_validation_and_key_material_guard():
    with pytest.raises(ValueError):
        _note(subject="two\nlines")
    with pytest.raises(ValueError):
        _note(recipients=["not-an-email"])
    with pytest.raises(ValueError):
        _note(severity="LOUD!")
    key_b64 = base64.b64encode(os.urandom(32)).decode()
    while not any(c.isupper() for c in key_b64) or not any(c.isdigit() for c in key_b64):
        key_b64 = base64.b64encode(os.urandom(32)).decode()
    with pytest.raises(KeyMaterialRefused) as ei:
        _note(body=f"the new key is {key_b64}")
    assert key_b64 not in str(ei.value)  # the refusal never echoes the secret
    with pytest.raises(KeyMaterialRefused):
        _note(body="-----BEGIN PRIVATE KEY-----\nMC4CAQ...\n-----END PRIVATE KEY-----")
    # hex fingerprints, paths and identifiers are fine
    _note(
        body="fingerprint "
        + os.urandom(32).hex()
        + "\ns3://kms-archive/backups/daily/2026-11-28/kms-backup-2026-11-28.tar.zst.age"
        + "\nartifacts/kms/service/ApiGateway/versions/000123/PublicKeyManifestVersion0004.json"
    )


def test_notifier_from_env(tmp_path, smtp_server, slack_receiver):
    only = notifier_from_env(tmp_path, env={})
    assert isinstance(only, OutboxNotifier) and only.path == tmp_path / "outbox.jsonl"

    env = {
        "KMS_SMTP_HOST": smtp_server.host,
        "KMS_SMTP_PORT": str(smtp_server.port),
        "KMS_SMTP_SENDER": "kms@example.com",
        "KMS_SMTP_USER": "kms",
        "KMS_SMTP_PASSWORD": "secret",
        "KMS_NOTIFY_RETRY_ATTEMPTS": "2",
        "KMS_NOTIFY_RETRY_WAIT": "0.01",
    }
    email_only = notifier_from_env(tmp_path, env=env)
    assert isinstance(email_only, CompositeNotifier)
    assert [type(n) for n in email_only.notifiers] == [OutboxNotifier, SmtpNotifier]
    assert email_only.notifiers[1].retry.attempts == 2
    assert "secret" not in repr(email_only)

    both = notifier_from_env(tmp_path, env={**env, "KMS_SLACK_WEBHOOK_URL": slack_receiver.url})
    assert [type(n) for n in both.notifiers] == [OutboxNotifier, SmtpNotifier, SlackWebhookNotifier]
    assert "XXXXSECRET" not in repr(both)
    res = both.send(_note())
    assert all(r.ok for r in res), res
    assert len(smtp_server.messages) == 1 and len(slack_receiver.payloads) == 1
    assert [line["type"] for line in OutboxNotifier(tmp_path / "outbox.jsonl").read()] == ["notification", "delivery"]

    slack_only = notifier_from_env(tmp_path, env={"KMS_SLACK_WEBHOOK_URL": slack_receiver.url})
    assert [type(n) for n in slack_only.notifiers] == [OutboxNotifier, SlackWebhookNotifier]

    for bad in (
        {"KMS_SMTP_HOST": "mail"},  # no sender
        {**env, "KMS_SMTP_SECURITY": "tls13"},
        {**env, "KMS_SMTP_PORT": "twenty-five"},
        {"KMS_SLACK_WEBHOOK_URL": "hooks.slack.com/services/x"},
    ):
        with pytest.raises(NotifyConfigError):
            notifier_from_env(tmp_path, env=bad)
