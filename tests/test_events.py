"""Security events (R2): reporting, the sensor launching compromise_response exactly once,
the response itself, manual launches under dual approval, and the HTTP intake."""

import base64
import json
import secrets
import threading
import urllib.error
import urllib.request

import dagster as dg
import pyotp
import pytest
from click.testing import CliRunner
from sqlalchemy import select, text

from kms_pipelines.core.envelope import data_keys as envelope
from kms_pipelines.core.foundation.db.models import KeyVersion
from kms_pipelines.core.foundation.db.models_events import SecurityEvent
from kms_pipelines.core.keys import lifecycle, service_keys
from kms_pipelines.core.ledger import ledger
from kms_pipelines.core.response import compromise, events
from kms_pipelines.defs.resources import (
    ClockResource,
    DatabaseResource,
    KeyStoreResource,
    KmsResource,
    ObjectStoreResource,
)
from kms_pipelines.defs.response import compromise_response, security_event_sensor
from tests.fixtures.kms import KEY_ORIGIN, write_test_policy


def snapshot(kms):
    with kms.engine.connect() as conn:
        versions = conn.execute(
            select(KeyVersion.key_id, KeyVersion.version, KeyVersion.state).order_by(KeyVersion.id)
        ).all()
        evs = conn.execute(select(SecurityEvent.id, SecurityEvent.status).order_by(SecurityEvent.seq)).all()
        head = ledger.head(conn)
    return versions, evs, head, sorted(kms.keystore.refs())


def states(kms, key):
    with kms.transaction() as s:
        return [(v.version, v.state) for v in lifecycle.get_key(s, key).versions]


# ---- the end-to-end "done when" ------------------------------------------------------


@pytest.fixture(params=["sqlite", "postgres"])
def e2e_env(request, tmp_path, monkeypatch, smtp_server, slack_receiver):
    home = tmp_path / "kmshome"
    url = request.getfixturevalue("pg_url") if request.param == "postgres" else f"sqlite:///{home / 'kms.db'}"
    env = {
        "KMS_HOME": str(home),
        "KMS_DATABASE_URL": url,
        "KMS_KEYSTORE": "software",
        "KMS_MASTER_KEY": base64.b64encode(secrets.token_bytes(32)).decode(),
        "KMS_OBJECT_STORE": str(home / "objects"),
        "KMS_SMTP_HOST": smtp_server.host,
        "KMS_SMTP_PORT": str(smtp_server.port),
        "KMS_SMTP_SENDER": "kms@example.com",
        "KMS_SLACK_WEBHOOK_URL": slack_receiver.url,
        "KMS_NOTIFY_RETRY_WAIT": "0.01",
        "KMS_NOTIFY_RETRY_MAX_WAIT": "0.05",
        "USER": "sec-oncall",
        # the tests' policy: the ceremony's admins register software security keys
        "KMS_POLICY": write_test_policy(tmp_path),
    }
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    monkeypatch.delenv("KMS_FIXED_TIME", raising=False)
    return env


def _resource(env) -> KmsResource:
    database, keystore = DatabaseResource(url=env["KMS_DATABASE_URL"]), KeyStoreResource(kind="software")
    objects, clock = ObjectStoreResource(url=env["KMS_OBJECT_STORE"]), ClockResource()
    return KmsResource(
        home=env["KMS_HOME"], policy_path=None, database=database, keystore=keystore, objects=objects, clock=clock
    )


def _tick(instance, cursor, kms_res):
    with dg.build_sensor_context(instance=instance, cursor=cursor, resources={"kms": kms_res}) as ctx:
        return security_event_sensor.evaluate_tick(ctx)


def _refresh_shows_the_revocation(instance, response, kms_res):
    """The UI's key_inventory must not show a revoked version as active until the next nightly run."""
    from kms_pipelines.definitions import defs
    from kms_pipelines.defs.response import refresh_after_compromise_response

    with dg.build_run_status_sensor_context(
        sensor_name=refresh_after_compromise_response.name,
        dagster_instance=instance,
        dagster_run=response.dagster_run,
        dagster_event=response.get_run_success_event(),
    ) as ctx:
        request = refresh_after_compromise_response(ctx)
    assert request.run_key == f"refresh-after-{response.run_id}"
    job = defs().resolve_job_def("key_state_refresh")
    refreshed = job.execute_in_process(instance=instance, resources={"kms": kms_res})
    assert refreshed.success
    [mat] = [m for m in refreshed.asset_materializations_for_node("key_inventory")]
    rows = {(r.data["key"], r.data["v"]): r.data["state"] for r in mat.metadata["inventory"].value.records}
    assert rows[("data:postgres", 1)] == "revoked" and rows[("data:postgres", 2)] == "active"
    assert refreshed.asset_materializations_for_node("security_events")[0].metadata["open"].value == 0


def test_end_to_end_cli_report_sensor_one_run_then_none(e2e_env, smtp_server, slack_receiver, tmp_path):
    from kms_pipelines.cli import cli
    from kms_pipelines.core.runtime.wiring import context_from_env

    runner = CliRunner()
    res = runner.invoke(
        cli,
        [
            "init",
            "--admin",
            "sec",
            "--admin",
            "sec2",
            "--admin",
            "sec3",
            "--json",
            "--console-origin",
            KEY_ORIGIN,
            "--software-keys",
            str(tmp_path / "keys"),
        ],
    )
    assert res.exit_code == 0, res.output
    sec = pyotp.parse_uri(json.loads(res.output)["enrolled"][0]["provisioning_uri"])
    kms = context_from_env()
    blobs = {f"doc-{i}": envelope.encrypt(kms, "data:postgres", f"doc-{i}", f"row {i}".encode()) for i in range(25)}

    # the reporter proves themself (security_engineering: a compromise's response revokes)
    res = runner.invoke(
        cli,
        [
            "events",
            "report",
            "--type",
            "compromise",
            "--key",
            "data:postgres",
            "--source",
            "gitleaks",
            "--detail",
            "DEK backup found in a public bucket",
            "--as",
            "sec",
            "--totp",
            sec.now(),
            "--json",
        ],
    )
    assert res.exit_code == 0, res.output
    event_id = json.loads(res.output)["id"]

    kms_res = _resource(e2e_env)
    instance = dg.DagsterInstance.ephemeral()
    tick = _tick(instance, None, kms_res)
    assert len(tick.run_requests) == 1
    rr = tick.run_requests[0]
    assert rr.run_key == f"security-event-{event_id}"
    result = compromise_response.execute_in_process(
        run_config=rr.run_config,
        instance=instance,
        resources={"kms": kms_res},
        tags={**rr.tags, "dagster/run_key": rr.run_key},
    )
    assert result.success

    again = _tick(instance, tick.cursor, kms_res)
    assert again.run_requests == []
    lost_cursor = _tick(instance, None, kms_res)
    assert lost_cursor.run_requests == []  # the event is resolved and its run key was used

    assert states(kms, "data:postgres") == [(1, "revoked"), (2, "active")]
    _refresh_shows_the_revocation(instance, result, kms_res)
    for object_id, blob in blobs.items():
        assert envelope.decrypt(kms, blob, object_id=object_id) == f"row {object_id[4:]}".encode()
        assert envelope.describe(kms, blob).key_version == 2
    ev = events.get(kms, event_id)
    assert ev.status == "resolved" and ev.response_run_id == result.run_id
    with kms.transaction() as s:
        linked = [(e.key_version, e.to_state) for e in ledger.entries_for(s, "data:postgres") if e.event_id == event_id]
    assert sorted(linked) == [(1, "revoked"), (1, "rotated"), (2, "active")]

    mails = [m for m in smtp_server.messages if m.message["X-KMS-Kind"] == "compromise_response"]
    assert len(mails) == 1
    assert sorted(mails[0].rcpt_tos) == ["compliance@example.com", "security@example.com"]
    assert event_id in mails[0].message.get_content()
    slack = [p for p in slack_receiver.payloads if "compromise response" in p["text"]]
    assert len(slack) == 1 and slack[0]["channel"] == "#kms-compliance"


def _init_cli(tmp_path):
    from kms_pipelines.cli import cli

    res = CliRunner().invoke(
        cli,
        ["init", "--admin", "sec", "--admin", "sec2", "--admin", "sec3", "--json", "--console-origin", KEY_ORIGIN]
        + ["--software-keys", str(tmp_path / "keys")],
    )
    assert res.exit_code == 0, res.output


def _failure_line(result) -> str:
    [failure] = [e for e in result.all_events if e.event_type_value == "STEP_FAILURE"]
    line = failure.step_failure_data.user_failure_data.description
    assert "\n" not in line
    return line


def test_launchpad_run_with_the_sensors_tags_cannot_act_as_the_sensor(e2e_env, tmp_path):
    """A Launchpad user can type any run tag. Tagging a run for an existing event as the
    sensor's (with no seal, a seal for another event, or the genuine run's seal copied after
    that run took the event up) must not answer the event without dual approval."""
    from kms_pipelines.core.runtime.wiring import context_from_env
    from kms_pipelines.defs.response import EVENT_TAG, OP_NAME, SEAL_TAG, TRIGGER_TAG

    _init_cli(tmp_path)
    kms = context_from_env()
    ev = events.report(kms.as_actor("intake:siem"), "compromise", "service:api-gateway", "siem", "replay seen")
    other = events.report(kms.as_actor("intake:siem"), "compromise", "data:postgres", "siem", "bucket leak")
    kms_res, instance = _resource(e2e_env), dg.DagsterInstance.ephemeral()
    config = {"ops": {OP_NAME: {"config": {"event_id": ev.id}}}}
    sensor_tags = {EVENT_TAG: ev.id, TRIGGER_TAG: "sensor"}

    def launch(tags):
        return compromise_response.execute_in_process(
            run_config=config, instance=instance, resources={"kms": kms_res}, tags=tags, raise_on_error=False
        )

    seal_of_other = compromise.seal_for_sensor(kms, other.id)  # a genuine seal, for another event
    before = snapshot(kms)
    for forged in (
        sensor_tags,
        {**sensor_tags, SEAL_TAG: "AAAA"},
        {**sensor_tags, SEAL_TAG: seal_of_other},
        {EVENT_TAG: ev.id},  # the event tag alone also claims the sensor's path
    ):
        result = launch(forged)
        assert not result.success
        assert f"security event {ev.id} has the sensor's tags but not the sensor's seal" in _failure_line(result)
        assert snapshot(kms) == before and events.get(kms, ev.id).response_run_id is None

    # the sensor's own run still answers the event
    tick = _tick(instance, None, kms_res)
    [rr] = [r for r in tick.run_requests if r.tags[EVENT_TAG] == ev.id]
    genuine = compromise_response.execute_in_process(
        run_config=rr.run_config, instance=instance, resources={"kms": kms_res}, tags=rr.tags
    )
    assert genuine.success and events.get(kms, ev.id).response_run_id == genuine.run_id
    assert states(kms, "service:api-gateway") == [(1, "revoked"), (2, "active")]

    # its tags, seal included, copied onto another run (or a re-execution): refused, nothing changed
    after = snapshot(kms)
    replay = launch(rr.tags)
    assert not replay.success
    assert f"security event {ev.id} is resolved (taken up by run {genuine.run_id})" in _failure_line(replay)
    assert snapshot(kms) == after and events.get(kms, ev.id).response_run_id == genuine.run_id


def test_sensor_claim_is_once_per_event_and_run(kms):
    ev = events.report(kms, "compromise", "service:api-gateway", "siem", "replay seen")
    seal = compromise.seal_for_sensor(kms, ev.id)
    with pytest.raises(events.EventError, match="not the sensor's seal"):
        compromise.claim_for_sensor(kms, ev.id, seal[:-2] + ("AA" if seal[-2:] != "AA" else "AB"), "run-a")
    compromise.claim_for_sensor(kms, ev.id, seal, "run-a")
    compromise.claim_for_sensor(kms, ev.id, seal, "run-a")  # an op retry inside the same run
    before = snapshot(kms)
    # the genuine run crashed while responding: a copy of it is refused; a manual launch (dual approval) remains
    with pytest.raises(events.EventError, match=r"is responding \(taken up by run run-a\).*requester_totp"):
        compromise.claim_for_sensor(kms, ev.id, seal, "run-b")
    assert snapshot(kms) == before and events.get(kms, ev.id).response_run_id == "run-a"


def test_a_retry_of_a_failed_sensor_run_carries_on_and_nothing_else_may(kms):
    """deploy/dagster.yaml retries a lost run (``run_retries``). Dagster gives the retry a
    parent/root run id (the Launchpad cannot), so a retry of the sensor's failed run may take
    over its claim and finish answering the event; a run that is not its retry, or a retry
    while the first run still runs, or of a resolved event, may not. A real (ephemeral)
    Dagster instance holds the runs; the takeover is checked against the real database."""
    from kms_pipelines.defs.response import EVENT_TAG, SEAL_TAG, TRIGGER_TAG, failed_ancestor

    instance = dg.DagsterInstance.ephemeral()
    ev = events.report(kms, "compromise", "service:api-gateway", "siem", "replay seen")
    seal = compromise.seal_for_sensor(kms, ev.id)
    tags = {EVENT_TAG: ev.id, TRIGGER_TAG: "sensor", SEAL_TAG: seal}
    first = instance.create_run_for_job(compromise_response, tags=tags, status=dg.DagsterRunStatus.STARTED)
    compromise.claim_for_sensor(kms, ev.id, seal, first.run_id)  # then its worker was lost
    retry = instance.create_run_for_job(
        compromise_response, tags=tags, parent_run_id=first.run_id, root_run_id=first.run_id
    )
    stranger = instance.create_run_for_job(compromise_response, tags=tags)  # a Launchpad run with copied tags
    before = snapshot(kms)

    # the first run is still STARTED: no takeover, the retry is refused, nothing changes
    assert failed_ancestor(instance, retry, first.run_id) is None
    with pytest.raises(events.EventError, match=rf"is responding \(taken up by run {first.run_id}\)"):
        compromise.claim_for_sensor(kms, ev.id, seal, retry.run_id, takeover_from=None)

    instance.report_run_failed(instance.get_run_by_id(first.run_id))
    assert failed_ancestor(instance, stranger, first.run_id) is None  # not its retry
    assert failed_ancestor(instance, retry, "some-other-run") is None  # not the claim holder
    # a takeover named for a run that does not hold the claim is refused too
    with pytest.raises(events.EventError, match="is responding"):
        compromise.claim_for_sensor(kms, ev.id, seal, stranger.run_id, takeover_from=stranger.run_id)
    assert snapshot(kms) == before and events.get(kms, ev.id).response_run_id == first.run_id

    holder = failed_ancestor(instance, retry, events.get(kms, ev.id).response_run_id)
    assert holder == first.run_id
    compromise.claim_for_sensor(kms, ev.id, seal, retry.run_id, takeover_from=holder)
    assert events.get(kms, ev.id).response_run_id == retry.run_id
    result = compromise.respond(kms.as_actor("dagster:compromise_response"), ev.id, approvers=[], run_id=retry.run_id)
    assert result.revoked and events.get(kms, ev.id).status == "resolved"
    assert states(kms, "service:api-gateway") == [(1, "revoked"), (2, "active")]
    with kms.engine.connect() as conn:
        assert (
            conn.execute(text("SELECT count(*) FROM audit_events WHERE operation = 'security-event.takeover'")).scalar()
            == 1
        )

    # resolved: even the retry's own retry cannot take it up again
    instance.report_run_failed(instance.get_run_by_id(retry.run_id))
    again = instance.create_run_for_job(
        compromise_response, tags=tags, parent_run_id=retry.run_id, root_run_id=first.run_id
    )
    after = snapshot(kms)
    with pytest.raises(events.EventError, match="is resolved"):
        compromise.claim_for_sensor(
            kms, ev.id, seal, again.run_id, takeover_from=failed_ancestor(instance, again, retry.run_id)
        )
    assert snapshot(kms) == after


# ---- reporting ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "args, match",
    [
        (("exfiltration", "service:api-gateway", "scanner", ""), "unknown event type"),
        (("compromise", "service:nope", "scanner", ""), "unknown key"),
        (("compromise", "nope", "scanner", ""), "unknown key"),
        (("tenant-rotation", "data:postgres", "scanner", ""), "compromise instead"),
        (("compromise", "service:api-gateway", "", ""), "source"),
        (
            (
                "ci-secret-exposure",
                "service:api-gateway",
                "ci",
                "token " + base64.b64encode(secrets.token_bytes(32)).decode(),
            ),
            "key material",
        ),
    ],
)
def test_report_refusals_change_nothing(make_kms, args, match):
    kms = make_kms("sqlite")
    before = snapshot(kms)
    with pytest.raises(events.EventError, match=match):
        events.report(kms, *args)
    assert snapshot(kms) == before


def test_report_records_active_version_and_dedupes_open_events(kms):
    lifecycle.rotate(kms, "service:worker-pipelines")
    first = events.report(kms, "ci-secret-exposure", "service:worker-pipelines", "github-actions", "printed in log")
    assert first.key_version == 2 and first.status == "new" and first.duplicate_of is None
    again = events.report(kms, "ci-secret-exposure", "service:worker-pipelines", "github-actions", "retry")
    assert again.duplicate_of == first.id
    other = events.report(kms, "compromise", "service:worker-pipelines", "github-actions", "")
    assert other.id != first.id
    assert [e.id for e in events.list_events(kms, status="new")] == [first.id, other.id]


def test_cli_report_refusal_is_one_line_exit_1(tmp_path, monkeypatch):
    from kms_pipelines.cli import cli

    monkeypatch.setenv("KMS_HOME", str(tmp_path / "h"))
    monkeypatch.delenv("KMS_DATABASE_URL", raising=False)
    runner = CliRunner()
    assert runner.invoke(cli, ["init"]).exit_code == 0
    res = runner.invoke(
        cli,
        [
            "events",
            "report",
            "--type",
            "compromise",
            "--key",
            "service:nope",
            "--source",
            "x",
            "--as",
            "sec",
            "--totp",
            "123456",
        ],
    )
    assert res.exit_code == 1 and res.output.count("\n") == 1 and "unknown key" in res.output
    res = runner.invoke(
        cli, ["events", "report", "--type", "nope", "--key", "root", "--source", "x", "--as", "sec", "--totp", "123456"]
    )
    assert res.exit_code == 2


# ---- the response ---------------------------------------------------------------------


def test_respond_is_idempotent_and_never_rotates_twice(kms):
    service_keys.issue_credential(kms, "api-gateway", "client-1")
    ev = events.report(kms, "compromise", "service:api-gateway", "siem", "credential replay seen")
    # a run that crashed after rotating: the ledger remembers the event
    lifecycle.rotate(kms, "service:api-gateway", reason="compromise", event_id=ev.id)
    r = compromise.respond(kms, ev.id)
    assert r.rotated and r.new_version == 2 and "already rotated" in r.rotation_note
    assert r.revoked and r.credentials_reissued == 1
    assert states(kms, "service:api-gateway") == [(1, "revoked"), (2, "active")]
    before = snapshot(kms)
    again = compromise.respond(kms, ev.id)
    assert again.already_resolved and snapshot(kms) == before


def test_ci_secret_exposure_rotates_without_revoking(kms):
    ev = events.report(kms, "ci-secret-exposure", "service:reconciliation-engine", "gitlab-ci", "echoed in job")
    r = compromise.respond(kms, ev.id)
    assert not r.revoked and r.new_version == 2
    assert states(kms, "service:reconciliation-engine") == [(1, "rotated"), (2, "active")]


def test_manual_launch_without_approvals_is_refused_and_changes_nothing(kms_pg, tmp_path):
    from kms_pipelines.core.access import principals as access
    from tests.fixtures.kms import ceremony, totp_now

    d = ceremony(kms_pg, {"lead": "security_engineering", "b": "security_engineering", "c": "compliance_officer"})
    before = snapshot(kms_pg)
    with pytest.raises(access.AccessDenied, match="TOTP code for 'lead' is wrong"):
        compromise.report_manual(
            kms_pg, key="service:api-gateway", type="compromise", ticket="INC-9", requested_by="lead", totp="000000"
        )
    with pytest.raises(access.AccessDenied, match="needs 2 approvals"):
        compromise.report_manual(
            kms_pg,
            key="service:api-gateway",
            type="compromise",
            ticket="INC-9",
            requested_by="lead",
            totp=totp_now(kms_pg, d["lead"]),
        )
    assert snapshot(kms_pg) == before


def test_manual_launch_with_dual_approval(kms):
    from tests.test_escrow import approvals

    requester = approvals(
        kms,
        operation="revoke",
        target="service:api-gateway",
        ticket="INC-8",
        requester="sec-lead",
        requester_roles=["security_engineering"],
    )
    # approvals are bound to the ticket: another ticket is refused and nothing changes
    from datetime import timedelta

    from kms_pipelines.core.access import principals as access
    from tests.fixtures.kms import totp_now

    device = kms.__dict__["_test_devices"][requester]
    before = snapshot(kms)
    with pytest.raises(access.AccessDenied):
        compromise.report_manual(
            kms,
            key="service:api-gateway",
            type="compromise",
            ticket="INC-9",
            requested_by=requester,
            totp=totp_now(kms, device),
        )
    assert snapshot(kms) == before
    kms.clock.advance(timedelta(seconds=30))
    info, approvers = compromise.report_manual(
        kms,
        key="service:api-gateway",
        type="compromise",
        ticket="INC-8",
        requested_by=requester,
        totp=totp_now(kms, device),
    )
    assert approvers == ["appr-comp", "appr-sec"]
    r = compromise.respond(kms, info.id, approvers=approvers, ticket="INC-8")
    with kms.transaction() as s:
        last = ledger.entries_for(s, "service:api-gateway")[-1]
    assert last.to_state == "revoked" and last.change_ticket == "INC-8" and json.loads(last.approvers) == approvers
    assert r.revoked


# ---- HTTP intake ----------------------------------------------------------------------


def test_http_intake_requires_token_and_reports(kms):
    token = secrets.token_urlsafe(24)
    server = events.make_intake_server(kms, token)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{server.server_address[1]}/events"

    def post(body, auth=None):
        req = urllib.request.Request(
            url,
            data=json.dumps(body).encode(),
            method="POST",
            headers={"Content-Type": "application/json", **({"Authorization": f"Bearer {auth}"} if auth else {})},
        )
        try:
            with urllib.request.urlopen(req, timeout=5) as resp:
                return resp.status, json.loads(resp.read())
        except urllib.error.HTTPError as exc:
            return exc.code, json.loads(exc.read())

    try:
        body = {"type": "ci-secret-exposure", "key": "service:api-gateway", "source": "jenkins", "detail": "log"}
        before = snapshot(kms)
        assert post(body)[0] == 401
        assert post(body, "wrong-token-wrong-token")[0] == 401
        assert post({**body, "key": "service:nope"}, token)[0] == 400
        assert snapshot(kms) == before
        status, created = post(body, token)
        assert status == 201 and created["key_version"] == 1
        status, dup = post(body, token)
        assert status == 200 and dup["duplicate_of"] == created["id"]
    finally:
        server.shutdown()
        server.server_close()
