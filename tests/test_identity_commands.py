"""Issue 11, the remaining human commands: `kms escrow custodian add` (dual-controlled like
principal enrolment), `kms escrow seal`, `kms events report` and `kms token issue` act for a
principal proven by TOTP, never for `KMS_ACTOR`. Each refusal is one line, exit 1 (exit 2 for a
missing option), and leaves ledger, audit log (bar `denied` events), keys, approvals,
principals, escrow custodians and packages, and security events as they were; on SQLite and
PostgreSQL, on the wall clock, with codes from the principals' own authenticators (pyotp)."""

from __future__ import annotations

import json
import time
from datetime import UTC

import pyotp
import pyrage
import pytest
from click.testing import CliRunner
from sqlalchemy import select

from kms_pipelines.core.access import principals as access
from kms_pipelines.core.access import tokens
from kms_pipelines.core.foundation.db.models import KeyVersion
from kms_pipelines.core.foundation.db.models_access import Approval, AuditEvent
from kms_pipelines.core.foundation.db.models_backup import Drill, DrillFollowup
from kms_pipelines.core.foundation.db.models_events import EscrowCustodian, EscrowPackage, SecurityEvent
from kms_pipelines.core.foundation.db.models_rotation import DependentConfirmation
from kms_pipelines.core.ledger import audit
from kms_pipelines.core.runtime.wiring import context_from_env
from tests.fixtures.kms import ceremony, enrol_direct, security_key_file, write_test_policy
from tests.test_access_dagster import dagster_kms  # noqa: F401 -- the fixture, on SQLite and PostgreSQL
from tests.test_identity import ADMINS, Cli

CUSTODIANS = ("custodian-a", "custodian-b", "custodian-c")


class OpsCli(Cli):
    """test_identity's CLI, whose "nothing changed" also covers escrow and security events,
    and which hands each principal a fresh code (the replay rule accepts a time-step once)."""

    def __init__(self, runner: CliRunner, keys):
        super().__init__(runner, keys)
        self.used: dict[str, int] = {}

    def fresh(self, name: str) -> str:
        """A code for a time-step ``name`` has not used, within the ±1 step window: this step,
        then the next; a third use in one step waits for the clock."""
        interval = 30
        while True:
            now_step = int(time.time()) // interval
            step = max(self.used.get(name, now_step - 1) + 1, now_step)
            if step <= now_step + 1:
                self.used[name] = step
                return self.devices[name].at(step * interval)
            time.sleep(interval - time.time() % interval + 0.1)

    def state(self) -> dict:
        out = super().state()
        ctx = self.context()
        with ctx.engine.connect() as conn:
            out["custodians"] = conn.execute(
                select(EscrowCustodian.name, EscrowCustodian.recipient, EscrowCustodian.enrolled_by).order_by(
                    EscrowCustodian.name
                )
            ).all()
            out["packages"] = conn.execute(
                select(EscrowPackage.id, EscrowPackage.superseded_at).order_by(EscrowPackage.id)
            ).all()
            out["events"] = conn.execute(
                select(SecurityEvent.id, SecurityEvent.status).order_by(SecurityEvent.seq)
            ).all()
            out["confirmations"] = conn.execute(
                select(DependentConfirmation.service, DependentConfirmation.actor).order_by(DependentConfirmation.id)
            ).all()
            out["followups"] = conn.execute(
                select(DrillFollowup.id, DrillFollowup.status, DrillFollowup.closed_by).order_by(DrillFollowup.id)
            ).all()
        ctx.engine.dispose()
        return out

    def usage_refused(self, missing: str, *args):
        """A command missing a required option: click's usage error (exit 2), nothing changed."""
        before = self.state()
        r = self(*args)
        assert r.exit_code == 2 and missing in r.output, (args, r.exit_code, r.output)
        assert self.state() == before, f"{args} changed state"

    def audit_actor(self, operation: str, target: str | None = None) -> list[str]:
        ctx = self.context()
        audit.flush(ctx)
        q = select(AuditEvent.actor).where(AuditEvent.operation == operation, AuditEvent.outcome == "ok")
        if target is not None:
            q = q.where(AuditEvent.target == target)
        with ctx.engine.connect() as conn:
            actors = conn.execute(q.order_by(AuditEvent.seq)).scalars().all()
        ctx.engine.dispose()
        return actors


@pytest.fixture(params=["sqlite", "postgres"])
def ops(request, tmp_path, monkeypatch):
    monkeypatch.setenv("KMS_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("KMS_MASTER_KEY", "A" * 43 + "=")
    for var in ("KMS_DATABASE_URL", "KMS_KEYSTORE", "KMS_WORKLOAD_PRINCIPAL", "KMS_OBJECT_STORE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("KMS_ACTOR", "alice")  # claimed by the shell: must decide nothing
    if request.param == "postgres":
        monkeypatch.setenv("KMS_DATABASE_URL", request.getfixturevalue("pg_url"))
    monkeypatch.setenv("KMS_POLICY", write_test_policy(tmp_path))  # software security keys allowed
    c = OpsCli(CliRunner(), tmp_path / "keys")
    c.init_admins(*ADMINS)  # `kms approve --as NAME` then answers with NAME's key (test_identity's Cli)
    yield c
    audit.flush(context_from_env())


def _recipient() -> str:
    return str(pyrage.x25519.Identity.generate().to_public())


def _cooling_off_principal(ops: OpsCli, name: str) -> None:
    """Test set-up: a security engineer enrolled just now (approvals count only after the
    cooling-off), as a dual-controlled enrolment leaves them, with a security key of their
    own, so that the cooling-off is what refuses them."""
    ctx = ops.context()
    ops.devices[name] = pyotp.parse_uri(enrol_direct(ctx, name, "security_engineering", cooling_off=True))
    security_key_file(ctx, name, ops.keys)  # where `kms approve --as NAME` finds it
    ctx.engine.dispose()


def _custodians_enrolled(ops: OpsCli) -> None:
    """Test set-up for sealing: the policy's custodians with keys of their own."""
    ctx = ops.context()
    with ctx.transaction() as s:
        for name in CUSTODIANS:
            s.add(EscrowCustodian(name=name, recipient=_recipient(), enrolled_at=ctx.now(), enrolled_by="test-setup"))
    ctx.engine.dispose()


# ---- escrow custodian add: a dual-controlled manual operation ------------------------------


def test_custodian_add_is_dual_controlled_like_principal_enrolment(ops):
    rcpt, other = _recipient(), _recipient()
    add = ("escrow", "custodian", "add", "custodian-a", "--recipient", rcpt, "--ticket", "ESC-1")
    target = f"custodian-a={rcpt}"
    # KMS_ACTOR=alice, and no requester: after the ceremony nobody enrols a custodian alone
    ops.refused(
        "is a manual operation under dual control", "escrow", "custodian", "add", "custodian-a", "--recipient", rcpt
    )
    ops.usage_refused("--ticket, --requested-by and --totp go together", *add, "--requested-by", "bob")
    ops.refused("TOTP code for 'bob' is wrong", *add, "--requested-by", "bob", "--totp", "000000")
    ops.refused("unknown principal 'mallory'", *add, "--requested-by", "mallory", "--totp", "123456")
    ops.refused("'alice' lacks permission 'principals'", *add, "--requested-by", "alice", "--totp", ops.fresh("alice"))
    code = ops.fresh("bob")
    ops.refused("needs 2 approvals", *add, "--requested-by", "bob", "--totp", code)  # opens the request
    ops.refused("already used (replayed code refused)", *add, "--requested-by", "bob", "--totp", code)

    approve = ("approve", "--ticket", "ESC-1", "--operation", "custodian-add")
    r = ops(*approve, "--as", "dan", "--totp", ops.fresh("dan"))
    assert r.exit_code == 0 and "(1/2)" in r.output and target in r.output, r.output
    ops.refused("has 1 (dan)", *add, "--requested-by", "bob", "--totp", ops.fresh("bob"))  # one approval
    # the requester, a principal in cooling-off, one without 'principals', and another key: refused
    ops.refused("self-approval refused", *approve, "--as", "bob", "--totp", ops.devices["bob"].now())
    _cooling_off_principal(ops, "fay")
    ops.refused("'fay' is in the cooling-off period", *approve, "--as", "fay", "--totp", ops.fresh("fay"))
    ops.refused("'carol' lacks permission 'principals'", *approve, "--as", "carol", "--totp", ops.fresh("carol"))
    ops.refused(
        f"no custodian-add target 'custodian-a={other}'",
        *approve,
        "--target",
        f"custodian-a={other}",
        "--as",
        "erin",
        "--totp",
        ops.fresh("erin"),
    )
    r = ops(*approve, "--as", "erin", "--totp", ops.fresh("erin"))
    assert r.exit_code == 0 and "(2/2)" in r.output, r.output

    # approvals bind to the exact key: the requester cannot swap in another one
    ops.refused(
        "needs 2 approvals",
        "escrow",
        "custodian",
        "add",
        "custodian-a",
        "--recipient",
        other,
        "--ticket",
        "ESC-1",
        "--requested-by",
        "bob",
        "--totp",
        ops.fresh("bob"),
    )
    r = ops(*add, "--requested-by", "bob", "--totp", ops.fresh("bob"))
    assert r.exit_code == 0 and r.output.strip() == f"enrolled custodian-a ({rcpt})", r.output
    ctx = ops.context()
    with ctx.transaction() as s:
        row = s.get(EscrowCustodian, "custodian-a")
        assert (row.recipient, row.enrolled_by) == (rcpt, "bob")
        used = s.scalars(
            select(Approval.approver).where(Approval.operation == "custodian-add", Approval.used_at.is_not(None))
        ).all()
        assert sorted(used) == ["dan", "erin"]
    ctx.engine.dispose()
    assert ops.audit_actor("escrow.custodian.enroll") == ["bob"]
    # single-use: the same approvals enrol nothing else, and replacing the key is dual-controlled too
    ops.refused("already enrolled", *add, "--requested-by", "bob", "--totp", ops.fresh("bob"))
    ops.refused(
        "needs 2 approvals",
        "escrow",
        "custodian",
        "add",
        "custodian-a",
        "--recipient",
        other,
        "--replace",
        "--ticket",
        "ESC-1",
        "--requested-by",
        "bob",
        "--totp",
        ops.fresh("bob"),
    )


def test_a_generated_custodian_keypair_is_approved_as_such(ops, tmp_path):
    out = tmp_path / "custodian-b.age"
    add = ("escrow", "custodian", "add", "custodian-b", "--out", str(out), "--ticket", "ESC-2")
    ops.refused("needs 2 approvals", *add, "--requested-by", "dan", "--totp", ops.fresh("dan"))
    assert not out.exists()
    for name in ("bob", "erin"):
        r = ops("approve", "--ticket", "ESC-2", "--operation", "custodian-add", "--as", name, "--totp", ops.fresh(name))
        assert r.exit_code == 0 and "custodian-b=new-keypair" in r.output, r.output
    r = ops(*add, "--requested-by", "dan", "--totp", ops.fresh("dan"))
    assert r.exit_code == 0 and "identity written to" in r.output, r.output
    identity = pyrage.x25519.Identity.from_str(out.read_text().strip())
    ctx = ops.context()
    with ctx.transaction() as s:
        assert s.get(EscrowCustodian, "custodian-b").recipient == str(identity.to_public())
    ctx.engine.dispose()
    assert (out.stat().st_mode & 0o777) == 0o600


@pytest.mark.parametrize("database", ["sqlite", "postgres"])
def test_the_first_custodians_are_enrolled_before_the_ceremony_only(database, request, tmp_path, monkeypatch):
    """Before `kms init --admin` nobody could request or approve: the first custodians are part
    of the first-run set-up (as in the demo), recorded as kms-init; never a key replacement."""
    monkeypatch.setenv("KMS_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("KMS_MASTER_KEY", "A" * 43 + "=")
    monkeypatch.setenv("KMS_ACTOR", "mallory")
    for var in ("KMS_DATABASE_URL", "KMS_KEYSTORE", "KMS_WORKLOAD_PRINCIPAL", "KMS_OBJECT_STORE"):
        monkeypatch.delenv(var, raising=False)
    if database == "postgres":
        monkeypatch.setenv("KMS_DATABASE_URL", request.getfixturevalue("pg_url"))
    monkeypatch.setenv("KMS_POLICY", write_test_policy(tmp_path))  # software security keys allowed
    ops = OpsCli(CliRunner(), tmp_path / "keys")
    assert ops("init").exit_code == 0
    r = ops("escrow", "custodian", "add", "custodian-a", "--out", str(tmp_path / "a.age"))
    assert r.exit_code == 0, r.output
    assert ops.audit_actor("escrow.custodian.enroll") == ["kms-init"]
    ops.refused(
        "is a manual operation under dual control",
        "escrow",
        "custodian",
        "add",
        "custodian-a",
        "--recipient",
        _recipient(),
        "--replace",
    )
    ops.init_admins("ann", "ben", "cid")
    ops.refused(
        "is a manual operation under dual control",
        "escrow",
        "custodian",
        "add",
        "custodian-b",
        "--recipient",
        _recipient(),
    )
    audit.flush(context_from_env())


# ---- escrow seal ----------------------------------------------------------------------------


def test_escrow_seal_acts_for_a_proven_principal_holding_break_glass_and_export(ops):
    _custodians_enrolled(ops)
    ops.usage_refused("Missing option '--totp'", "escrow", "seal", "--as", "bob")
    ops.usage_refused("Missing option '--as'", "escrow", "seal", "--totp", "123456")
    ops.refused("TOTP code for 'bob' is wrong", "escrow", "seal", "--as", "bob", "--totp", "000000")
    ops.refused("unknown principal 'mallory'", "escrow", "seal", "--as", "mallory", "--totp", "123456")
    ops.refused(
        "'carol' lacks permission 'break-glass'", "escrow", "seal", "--as", "carol", "--totp", ops.fresh("carol")
    )
    ops.refused("'alice' lacks permission 'export'", "escrow", "seal", "--as", "alice", "--totp", ops.fresh("alice"))
    code = ops.fresh("bob")
    r = ops("escrow", "seal", "--as", "bob", "--totp", code, "--json")
    assert r.exit_code == 0, r.output
    package = json.loads(r.output)["package_id"]
    ops.refused("already used (replayed code refused)", "escrow", "seal", "--as", "bob", "--totp", code)
    ctx = ops.context()
    with ctx.transaction() as s:
        assert s.get(EscrowPackage, package).created_by == "bob"
    ctx.engine.dispose()
    assert ops.audit_actor("escrow.seal", package) == ["bob"]
    assert "bob" in ops.audit_actor("export")  # the key value left the keystore for bob, audited as such


# ---- events report --------------------------------------------------------------------------


def test_events_report_acts_for_a_proven_principal_holding_what_the_response_does(ops):
    report = ("events", "report", "--type", "compromise", "--key", "data:postgres", "--source", "siem")
    ops.usage_refused("Missing option '--totp'", *report, "--as", "bob")
    ops.refused("TOTP code for 'bob' is wrong", *report, "--as", "bob", "--totp", "000000")
    ops.refused("unknown principal 'mallory'", *report, "--as", "mallory", "--totp", "123456")
    # a compromise is answered by revoking: 'revoke' (security_engineering); the others by rotating
    ops.refused("'alice' lacks permission 'revoke'", *report, "--as", "alice", "--totp", ops.fresh("alice"))
    ops.refused(
        "'carol' lacks permission 'rotate'",
        "events",
        "report",
        "--type",
        "ci-secret-exposure",
        "--key",
        "service:api-gateway",
        "--source",
        "gitleaks",
        "--as",
        "carol",
        "--totp",
        ops.fresh("carol"),
    )
    code = ops.fresh("bob")
    r = ops(*report, "--as", "bob", "--totp", code, "--json")
    assert r.exit_code == 0, r.output
    event = json.loads(r.output)
    assert event["reported_by"] == "bob" and event["type"] == "compromise"
    ops.refused(
        "already used (replayed code refused)",
        "events",
        "report",
        "--type",
        "tenant-rotation",
        "--key",
        "service:api-gateway",
        "--source",
        "tenant",
        "--as",
        "bob",
        "--totp",
        code,
    )
    assert ops.audit_actor("security-event.report", "data:postgres") == ["bob"]
    r = ops(
        "events",
        "report",
        "--type",
        "ci-secret-exposure",
        "--key",
        "service:api-gateway",
        "--source",
        "gitleaks",
        "--as",
        "alice",
        "--totp",
        ops.fresh("alice"),
        "--json",
    )
    assert r.exit_code == 0 and json.loads(r.output)["reported_by"] == "alice", r.output


# ---- token issue ----------------------------------------------------------------------------


def test_token_issue_acts_for_a_proven_principal_who_holds_every_operation_of_the_token(ops):
    issue = ("token", "issue", "workload:api-gateway")
    ops.usage_refused("Missing option '--totp'", *issue, "--as", "bob")
    ops.usage_refused("Missing option '--as'", *issue, "--totp", "123456")
    ops.refused("TOTP code for 'bob' is wrong", *issue, "--as", "bob", "--totp", "000000")
    ops.refused("unknown principal 'mallory'", *issue, "--as", "mallory", "--totp", "123456")
    ops.refused(
        "'alice' lacks permission 'sign' to issue a token for workload:api-gateway",
        *issue,
        "--as",
        "alice",
        "--totp",
        ops.fresh("alice"),
    )
    ops.refused("'carol' lacks permission 'decrypt'", *issue, "--as", "carol", "--totp", ops.fresh("carol"))
    code = ops.fresh("bob")
    r = ops(*issue, "--as", "bob", "--totp", code)
    assert r.exit_code == 0, r.output
    token = r.output.strip()
    claims = json.loads(tokens._unb64u(token.split(".")[1]))
    assert claims["sub"] == "workload:api-gateway"  # the subject is the workload, not the issuer
    ops.refused("already used (replayed code refused)", *issue, "--as", "bob", "--totp", code)
    assert ops.audit_actor("token.issue", "workload:api-gateway") == ["bob"]
    assert ops("token", "verify", token).exit_code == 0


# ---- the other human verbs that recorded a claimed name ------------------------------------


def test_dependent_confirmations_and_drill_closures_record_a_proven_principal(ops):
    confirm = ("dependents", "confirm", "service:api-gateway", "--version", "1", "--service", "api-gateway")
    ops.usage_refused("Missing option '--totp'", *confirm, "--as", "alice")
    ops.refused("TOTP code for 'alice' is wrong", *confirm, "--as", "alice", "--totp", "000000")
    ops.refused("unknown principal 'mallory'", *confirm, "--as", "mallory", "--totp", "123456")
    r = ops(*confirm, "--as", "alice", "--totp", ops.fresh("alice"))
    assert r.exit_code == 0, r.output
    assert ops.state()["confirmations"] == [("api-gateway", "alice")]

    ctx = ops.context()
    with ctx.transaction() as s:  # a drill that left one gap to fix
        drill = Drill(drill_date="2026-01-01", started_at=ctx.now(), outcome="failed")
        s.add(drill)
        s.flush()
        s.add(
            DrillFollowup(
                drill_id=drill.id, title="restore took too long", owner="alice", due_at=ctx.now(), status="open"
            )
        )
    ctx.engine.dispose()
    followup = str(ops.state()["followups"][0][0])
    close = ("drill", "close-followup", followup, "--resolution", "faster restore path")
    ops.usage_refused("Missing option '--as'", *close, "--totp", "123456")
    ops.refused("TOTP code for 'carol' is wrong", *close, "--as", "carol", "--totp", "000000")
    ops.refused("unknown principal 'mallory'", *close, "--as", "mallory", "--totp", "123456")
    code = ops.fresh("carol")
    r = ops(*close, "--as", "carol", "--totp", code)
    assert r.exit_code == 0 and f"closed follow-up {followup}" in r.output, r.output
    assert ops.state()["followups"][0][1:] == ("closed", "carol")


def test_a_cadence_rotation_is_recorded_as_the_service_not_a_claimed_person(ops):
    from datetime import datetime

    from sqlalchemy import update

    from kms_pipelines.core.foundation.db.models import Key, KeyVersion
    from kms_pipelines.core.ledger import ledger

    ops.refused("--actor 'alice' is not a service actor", "keys", "rotate", "backup", "--if-due", "--actor", "alice")
    ctx = ops.context()
    with ctx.transaction() as s:  # make backup due
        key_id = s.scalars(select(Key.id).where(Key.name == "backup")).one()
        s.execute(
            update(KeyVersion).where(KeyVersion.key_id == key_id).values(activated_at=datetime(2020, 1, 1, tzinfo=UTC))
        )
    ctx.engine.dispose()
    r = ops("keys", "rotate", "backup", "--if-due")  # KMS_ACTOR=alice in the environment: ignored
    assert r.exit_code == 0 and "rotated backup" in r.output, r.output
    ctx = ops.context()
    with ctx.transaction() as s:
        moves = [e for e in ledger.entries_for(s, "backup") if e.to_state in ("active", "rotated")]
        assert {(e.actor, e.reason) for e in moves[-2:]} == {("kms-reconcile", "cadence")}
    ctx.engine.dispose()


# ---- Dagster: a compromise response launched by a person proves them like the CLI ----------


def test_a_manual_compromise_response_from_the_launchpad_proves_its_requester(dagster_kms):
    """The Launchpad's `compromise_response` without the sensor's launch is a person's manual
    operation: a claimed `requested_by` without that principal's TOTP code changes nothing."""
    from kms_pipelines.defs.response import OP_NAME, compromise_response
    from tests.test_access_dagster import AT

    res, instance = dagster_kms
    ctx = res.context()
    devices = ceremony(ctx, {"lead": "security_engineering", "b": "security_engineering", "c": "security_engineering"})

    def state():
        audit.flush(ctx)
        with ctx.engine.connect() as conn:
            return (
                conn.execute(select(SecurityEvent.id)).all(),
                conn.execute(
                    select(KeyVersion.key_id, KeyVersion.version, KeyVersion.state).order_by(KeyVersion.id)
                ).all(),
                conn.execute(
                    select(AuditEvent.seq).where(
                        AuditEvent.outcome == "ok",
                        AuditEvent.target.is_distinct_from(access.SEAL_REF),
                        AuditEvent.operation != "approval.request",
                    )
                ).all(),
                conn.execute(select(Approval.id, Approval.used_at)).all(),
            )

    base = {"key": "service:api-gateway", "type": "compromise", "ticket": "INC-1", "requested_by": "lead"}
    before = state()
    for extra, match in (
        ({}, "needs --ticket, --requested-by and --totp"),
        ({"requester_totp": "000000"}, "TOTP code for 'lead' is wrong"),
        ({"requested_by": "mallory", "requester_totp": "123456"}, "unknown principal 'mallory'"),
        ({"requester_totp": devices["lead"].at(AT)}, "needs 2 approvals"),
    ):
        result = compromise_response.execute_in_process(
            run_config={"ops": {OP_NAME: {"config": {**base, **extra}}}},
            resources={"kms": res},
            instance=instance,
            raise_on_error=False,
        )
        assert not result.success
        failure = [e for e in result.all_events if e.event_type_value == "STEP_FAILURE"][0]
        assert match in failure.step_failure_data.error.to_string(), failure.step_failure_data.error.to_string()
        assert state() == before
