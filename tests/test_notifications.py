"""Policy notifications (A4): recipients from the policy, delivery evidence, the
"notifications delivered" check and the run-failure sensor, over real SMTP + HTTP."""

import socket

import dagster as dg

from kms_pipelines.core.access import notifications
from kms_pipelines.core.foundation.transports import (
    CompositeNotifier,
    OutboxNotifier,
    RetryPolicy,
    SlackWebhookNotifier,
    SmtpNotifier,
)
from kms_pipelines.core.response import overdue

FAST = RetryPolicy(attempts=2, initial_wait=0.01, max_wait=0.02)


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wire(kms, smtp_port, slack_url):
    kms.notifier = CompositeNotifier(
        [
            OutboxNotifier(kms.home / "outbox.jsonl"),
            SmtpNotifier("127.0.0.1", smtp_port, "kms@example.com", retry=FAST, timeout=2),
            SlackWebhookNotifier(slack_url, retry=FAST),
        ]
    )


def test_policy_recipients_and_delivery_log(kms, smtp_server, slack_receiver):
    _wire(kms, smtp_server.port, slack_receiver.url)
    out = notifications.notify_manual_operation(
        kms, operation="rotate", target="root", ticket="CHG-1", requester="alice", approvers=["bob", "carol"]
    )
    assert out.ok
    assert [m.rcpt_tos for m in smtp_server.messages] == [["compliance@example.com"]]
    assert slack_receiver.payloads[0]["channel"] == "#kms-compliance"
    rows = notifications.recent_deliveries(kms)
    assert sorted(r["channel"] for r in rows) == ["email", "outbox", "slack"] and all(r["ok"] for r in rows)
    assert notifications.delivery_status(kms).ok


def test_failed_delivery_fails_the_check_until_a_later_success(kms, smtp_server, slack_receiver):
    _wire(kms, _closed_port(), slack_receiver.url)
    out = notifications.notify_policy_event(kms, "compromise_response", "subject", "body", ref="event:1")
    assert not out.ok  # never raised
    st = notifications.delivery_status(kms)
    assert not st.ok and [(u["channel"], u["ref"]) for u in st.unresolved] == [("email", "event:1")]
    _wire(kms, smtp_server.port, slack_receiver.url)
    assert notifications.notify_policy_event(kms, "compromise_response", "subject", "body", ref="event:1").ok
    assert notifications.delivery_status(kms).ok


def test_refused_content_and_missing_notifier_are_visible(kms):
    kms.notifier = None
    assert not notifications.notify_policy_event(kms, "run_failure", "s", "b", ref="r1").ok
    kms.notifier = OutboxNotifier(kms.home / "outbox.jsonl")
    out = notifications.notify_policy_event(kms, "run_failure", "s", "-----BEGIN PRIVATE KEY-----", ref="r2")
    assert not out.ok and "key material" in out.error
    assert {u["ref"] for u in notifications.delivery_status(kms).unresolved} == {"r1", "r2"}


def test_run_failure_sensor_notifies(kms_pg, smtp_server, slack_receiver, monkeypatch):
    from kms_pipelines.defs.access import run_failure_notify

    monkeypatch.delenv("KMS_DAGSTER_UI_URL", raising=False)

    @dg.op
    def boom():
        raise RuntimeError("rotation step failed")

    @dg.job
    def failing_job():
        boom()

    instance = dg.DagsterInstance.ephemeral()
    result = failing_job.execute_in_process(
        instance=instance, raise_on_error=False, tags={".dagster/grpc_info": '{"host": "localhost", "port": 4000}'}
    )
    assert not result.success
    failure = next(e for e in result.all_events if e.event_type_value == "PIPELINE_FAILURE")
    _wire(kms_pg, smtp_server.port, slack_receiver.url)

    class FakeKms:  # the sensor only calls .context(); hand it the test's KmsContext
        def context(self):
            return kms_pg

    ctx = dg.build_run_status_sensor_context(
        sensor_name="run_failure_notify",
        dagster_event=failure,
        dagster_instance=instance,
        dagster_run=result.dagster_run,
    )
    run_failure_notify._run_status_sensor_fn(ctx.for_run_failure(), kms=FakeKms())
    mails = [m for m in smtp_server.messages if m.message["X-KMS-Kind"] == "run_failure"]
    assert len(mails) == 1 and "failing_job" in mails[0].message["Subject"]
    # why it failed (the step's own error, not "Steps failed"), where to look, no internal tags
    assert "boom: RuntimeError: rotation step failed" in mails[0].message["Subject"]
    body = mails[0].message.get_content()
    assert (
        f"http://127.0.0.1:3000/runs/{result.run_id}" in body and "- boom: RuntimeError: rotation step failed" in body
    )
    assert ".dagster" not in body and "grpc_info" not in body
    assert any("failing_job" in p["text"] for p in slack_receiver.payloads)
    assert notifications.delivery_status(kms_pg).ok


def test_notify_overdue_asks_rotation_and_drills(kms, monkeypatch):
    import kms_pipelines.core.backup.drills as drills
    import kms_pipelines.core.keys.rotation as rotation

    monkeypatch.setattr(
        rotation,
        "overdue_acknowledgements",
        lambda ctx: [{"id": "investor-portal/root-v2", "description": "no ack after 24 h"}],
        raising=False,
    )
    monkeypatch.setattr(drills, "overdue_followups", lambda ctx: [], raising=False)
    out = overdue.notify_overdue(kms)
    assert out["partner_ack_overdue"] == {"overdue": 1, "notified": 1, "failed": 0}
    assert out["drill_followup_overdue"]["overdue"] == 0
    assert [r["kind"] for r in notifications.recent_deliveries(kms)] == ["partner_ack_overdue"]


def test_notify_overdue_uses_the_real_rotation_and_drills_apis(kms):
    out = overdue.notify_overdue(kms)
    assert set(out) == {"partner_ack_overdue", "drill_followup_overdue"}
    assert all("skipped" not in v for v in out.values()), out
