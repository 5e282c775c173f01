"""Issue 11: authenticated operators. Every case a hostile insider tried is refused with a
one-line error and exit 1, and leaves ledger, audit log (bar its `denied` events) and keys
as they were; on SQLite and PostgreSQL. Plus the dual-control story played by three real
principals with TOTP codes from their own authenticators (pyotp), on the wall clock."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

import pyotp
import pytest
from click.testing import CliRunner
from sqlalchemy import select, text, update

from kms_pipelines.core.access import enrolment, tokens, webauthn
from kms_pipelines.core.access import principals as access
from kms_pipelines.core.compliance import eval_a2
from kms_pipelines.core.foundation.clock import FixedClock
from kms_pipelines.core.foundation.db.models import STATES, Key, KeyVersion, LedgerEntry
from kms_pipelines.core.foundation.db.models_access import Approval, AuditEvent, Principal
from kms_pipelines.core.keys import lifecycle
from kms_pipelines.core.ledger import audit, ledger
from kms_pipelines.core.runtime.wiring import context_from_env
from tests.fixtures.kms import KEY_ORIGIN, approve_both, ceremony, register_key_by_link, totp_now, write_test_policy

ADMINS = (
    "alice=sre_oncall",
    "bob=security_engineering",
    "carol=compliance_officer",
    "dan=security_engineering",
    "erin=security_engineering",
)


# ---- a CLI on each database, on the wall clock ------------------------------------------


class Cli:
    def __init__(self, runner: CliRunner, keys=None):
        self.runner = runner
        self.devices: dict[str, pyotp.TOTP] = {}
        self.keys = keys  # the directory of the principals' software security keys (kms init --software-keys)

    def __call__(self, *args, env=None):
        from kms_pipelines.cli import cli

        if "approve" in args and "--as" in args and "--software-key" not in args:  # the approver's own key
            args = (*args, "--software-key", str(self.keys / f"{args[args.index('--as') + 1]}.fido2.json"))
        try:
            return self.runner.invoke(cli, list(args), catch_exceptions=False, env=env)
        finally:
            audit._flush_all_at_exit()  # what the `kms` process does when it exits

    def init_admins(self, *admins: str) -> list[dict]:
        """The first-run ceremony (`kms init --admin ...`): each admin registers a software
        security key (in ``self.keys``) at the tests' console origin, which the tests' policy
        allows (KMS_POLICY, ``write_test_policy``); their TOTP devices join ``self.devices``."""
        r = self(
            "init",
            *[a for admin in admins for a in ("--admin", admin)],
            "--console-origin",
            KEY_ORIGIN,
            "--software-keys",
            str(self.keys),
            "--json",
        )
        assert r.exit_code == 0, r.output
        enrolled = json.loads(r.output)["enrolled"]
        self.devices.update({e["name"]: pyotp.parse_uri(e["provisioning_uri"]) for e in enrolled})
        return enrolled

    def code(self, name: str) -> str:
        return self.devices[name].now()

    def context(self):
        return context_from_env()

    def state(self) -> dict:
        """Ledger, audit (outcome ok), key versions, approvals: what a refusal must not change."""
        ctx = self.context()
        audit.flush(ctx)
        with ctx.engine.connect() as conn:
            out = {
                "ledger": conn.execute(select(LedgerEntry.seq, LedgerEntry.entry_hash).order_by(LedgerEntry.seq)).all(),
                # a TOTP check reads the sealed secret, a security-key check derives the credential
                # MAC key (audited keystore decrypt, sign): not changes
                "audit_ok": conn.execute(
                    select(AuditEvent.seq, AuditEvent.operation)
                    .where(
                        AuditEvent.outcome == "ok",
                        AuditEvent.target.is_distinct_from(access.SEAL_REF),
                        AuditEvent.target.is_distinct_from(webauthn.INTEGRITY_REF),
                        # a refused manual operation leaves its request on record for the approvers
                        AuditEvent.operation != "approval.request",
                    )
                    .order_by(AuditEvent.seq)
                ).all(),
                "keys": conn.execute(
                    select(KeyVersion.key_id, KeyVersion.version, KeyVersion.state, KeyVersion.activated_at).order_by(
                        KeyVersion.id
                    )
                ).all(),
                "approvals": conn.execute(select(Approval.id, Approval.used_at).order_by(Approval.id)).all(),
                "principals": conn.execute(
                    select(Principal.name, Principal.roles, Principal.disabled_at).order_by(Principal.name)
                ).all(),
            }
        ctx.engine.dispose()
        return out

    def refused(self, match: str, *args, env=None):
        """Run a command that must be refused: one line on stderr naming ``match``, exit 1,
        nothing changed."""
        before = self.state()
        r = self(*args, env=env)
        assert r.exit_code == 1, (args, r.exit_code, r.output)
        lines = [line for line in r.output.splitlines() if line.strip()]
        assert len(lines) == 1 and lines[0].startswith("kms: error: ") and match in lines[0], r.output
        assert self.state() == before, f"{args} changed state"
        return lines[0]


@pytest.fixture(params=["sqlite", "postgres"])
def cli(request, tmp_path, monkeypatch):
    monkeypatch.setenv("KMS_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("KMS_MASTER_KEY", "A" * 43 + "=")
    for var in ("KMS_DATABASE_URL", "KMS_KEYSTORE", "KMS_WORKLOAD_PRINCIPAL", "KMS_OBJECT_STORE", "KMS_ACTOR"):
        monkeypatch.delenv(var, raising=False)
    if request.param == "postgres":
        monkeypatch.setenv("KMS_DATABASE_URL", request.getfixturevalue("pg_url"))
    monkeypatch.setenv("KMS_POLICY", write_test_policy(tmp_path))  # software security keys allowed
    c = Cli(CliRunner(), tmp_path / "keys")
    enrolled = c.init_admins(*ADMINS)
    assert [e["name"] for e in enrolled] == ["alice", "bob", "carol", "dan", "erin"]
    yield c
    audit.flush(context_from_env())


# ---- the dual-control story -------------------------------------------------------------


def test_three_principals_from_enrolment_to_a_dual_approved_manual_rotation(cli):
    """alice, bob and carol were enrolled by the ceremony (each got a provisioning URI once);
    bob and carol approve, alice requests; the ledger names both approvers."""
    for name in ("bob", "carol"):
        r = cli(
            "approve",
            "--ticket",
            "CHG-7",
            "--operation",
            "rotate",
            "--target",
            "root",
            "--as",
            name,
            "--totp",
            cli.code(name),
        )
        assert r.exit_code == 0, r.output
    r = cli(
        "keys",
        "rotate",
        "root",
        "--manual",
        "--ticket",
        "CHG-7",
        "--requested-by",
        "alice",
        "--totp",
        cli.code("alice"),
        "--json",
    )
    assert r.exit_code == 0, r.output
    out = json.loads(r.output)
    assert out["approvers"] == ["bob", "carol"] and out["requester"] == "alice" and out["new_version"] == 2
    ctx = cli.context()
    with ctx.transaction() as s:
        # the rotation's state change (the root follow-ups may add the vault's "archived" record)
        entry = [e for e in ledger.entries_for(s, "root") if e.to_state in STATES][-1]
        assert (entry.to_state, entry.actor, json.loads(entry.approvers), entry.change_ticket, entry.reason) == (
            "active",
            "alice",
            ["bob", "carol"],
            "CHG-7",
            "manual",
        )
    assert ledger.verify(ctx.engine).ok and audit.verify(ctx).ok
    ctx.engine.dispose()
    r = cli("audit", "anomalies")
    assert r.exit_code == 0, r.output  # a manual rotation with its approvals raises nothing
    # dual control is possible now (the console's FIDO2 factor, which these CLI principals have
    # not registered, is A2's other half and judged separately)
    assert "cannot approve any manual operation" not in eval_a2(context_from_env()).evidence


# ---- 1. one operator, three identities ---------------------------------------------------


def test_one_operator_cannot_mint_identities_or_act_as_another(cli):
    # enrolment needs a proven requester...
    cli.refused(
        "TOTP code for 'alice' is wrong",
        "principals",
        "add",
        "s1",
        "--role",
        "security_engineering",
        "--ticket",
        "C7",
        "--requested-by",
        "alice",
        "--totp",
        "000000",
    )
    cli.refused(
        "unknown principal 's1'",
        "principals",
        "add",
        "s2",
        "--role",
        "security_engineering",
        "--ticket",
        "C7",
        "--requested-by",
        "s1",
        "--totp",
        "123456",
    )
    # ...who holds 'principals' (alice is sre_oncall)...
    cli.refused(
        "lacks permission 'principals'",
        "principals",
        "add",
        "s1",
        "--role",
        "security_engineering",
        "--ticket",
        "C7",
        "--requested-by",
        "alice",
        "--totp",
        cli.code("alice"),
    )
    # ...and two approvals by others
    cli.refused(
        "needs 2 approvals",
        "principals",
        "add",
        "s1",
        "--role",
        "security_engineering",
        "--ticket",
        "C7",
        "--requested-by",
        "bob",
        "--totp",
        cli.code("bob"),
    )
    # a claimed name proves nothing: KMS_ACTOR / --requested-by without the claimant's code
    cli.refused(
        "unknown principal 's1'",
        "keys",
        "rotate",
        "root",
        "--manual",
        "--ticket",
        "C7",
        "--requested-by",
        "s1",
        "--totp",
        "123456",
        env={"KMS_ACTOR": "alice"},
    )
    cli.refused(
        "TOTP code for 'carol'",
        "keys",
        "rotate",
        "root",
        "--manual",
        "--ticket",
        "C7",
        "--requested-by",
        "carol",
        "--totp",
        cli.code("alice"),
    )
    cli.refused(
        "TOTP code for 'bob'",
        "approve",
        "--ticket",
        "C7",
        "--operation",
        "rotate",
        "--target",
        "root",
        "--as",
        "bob",
        "--totp",
        cli.code("carol"),
    )


def test_a_new_principal_approves_nothing_during_the_cooling_off(kms):
    """Enrolment is dual-controlled; the newcomer's approvals count only after the policy's
    cooling-off (core, on a simulated clock: the CLI runs on the wall clock)."""
    d = ceremony(kms, {"alice": "security_engineering", "bob": "security_engineering", "carol": "security_engineering"})
    with pytest.raises(access.AccessDenied, match="no principal-add target"):  # no request yet
        approve_both(
            kms,
            "bob",
            ticket="HR-1",
            operation="principal-add",
            target="dave=security_engineering",
            totp=totp_now(kms, d["bob"]),
        )
    kms.clock.advance(timedelta(seconds=30))
    with pytest.raises(access.AccessDenied, match="needs 2 approvals"):  # opens the request
        enrolment.enroll_principal(
            kms, "dave", ["security_engineering"], requested_by="alice", totp=totp_now(kms, d["alice"]), ticket="HR-1"
        )
    for name in ("bob", "carol"):
        approve_both(kms, name, ticket="HR-1", operation="principal-add", totp=totp_now(kms, d[name]))
    kms.clock.advance(timedelta(seconds=30))
    e = enrolment.enroll_principal(
        kms, "dave", ["security_engineering"], requested_by="alice", totp=totp_now(kms, d["alice"]), ticket="HR-1"
    )
    dave = pyotp.parse_uri(e.provisioning_uri)
    with pytest.raises(access.AccessDenied, match="cooling-off"):
        approve_both(kms, "dave", ticket="CHG-1", operation="rotate", target="root", totp=totp_now(kms, dave))
    with kms.transaction() as s:
        assert s.scalars(select(Principal.approve_after).where(Principal.name == "dave")).one() is not None
    kms.clock.advance(timedelta(hours=kms.policy.access.cooling_off_hours, seconds=30))
    # past the cooling-off dave still approves nothing without a security key (TOTP alone is not enough)...
    with pytest.raises(access.AccessDenied, match="security-key assertion"):
        approve_both(kms, "dave", ticket="CHG-1", operation="rotate", target="root", totp=totp_now(kms, dave))
    # ...until he registers one through a dual-approved registration link
    kms.clock.advance(timedelta(seconds=30))
    register_key_by_link(kms, "dave", lambda n: totp_now(kms, dave if n == "dave" else d[n]), requester="alice")
    kms.clock.advance(timedelta(seconds=30))
    assert (
        approve_both(kms, "dave", ticket="CHG-1", operation="rotate", target="root", totp=totp_now(kms, dave)).approver
        == "dave"
    )
    # nobody approves a change to themself
    kms.clock.advance(timedelta(seconds=30))
    with pytest.raises(access.AccessDenied, match="own principal"):
        approve_both(
            kms, "dave", ticket="HR-2", operation="principal-roles", target="dave=sre_oncall", totp=totp_now(kms, dave)
        )

    def dual(operation, call, ticket):
        kms.clock.advance(timedelta(seconds=30))
        with pytest.raises(access.AccessDenied, match="needs 2 approvals"):
            call(totp_now(kms, d["alice"]))
        for name in ("bob", "carol"):
            approve_both(kms, name, ticket=ticket, operation=operation, totp=totp_now(kms, d[name]))
        kms.clock.advance(timedelta(seconds=30))
        return call(totp_now(kms, d["alice"]))

    # a role change restarts the cooling-off
    assert dual(
        "principal-roles",
        lambda c: enrolment.change_roles(kms, "dave", ["sre_oncall"], requested_by="alice", totp=c, ticket="HR-2"),
        "HR-2",
    ) == ["bob", "carol"]
    kms.clock.advance(timedelta(seconds=30))
    with pytest.raises(access.AccessDenied, match="cooling-off"):
        approve_both(kms, "dave", ticket="CHG-3", operation="rotate", target="root", totp=totp_now(kms, dave))
    # a removed principal can no longer prove itself
    dual(
        "principal-remove",
        lambda c: enrolment.remove_principal(kms, "dave", requested_by="alice", totp=c, ticket="HR-3"),
        "HR-3",
    )
    kms.clock.advance(timedelta(seconds=30))
    with pytest.raises(access.AccessDenied, match="was removed"):
        access.prove_principal(kms, "dave", totp_now(kms, dave))


def test_enrolment_role_change_and_removal_need_the_principals_permission_to_approve(kms):
    d = ceremony(kms, {"alice": "security_engineering", "bob": "security_engineering", "carol": "compliance_officer"})
    with pytest.raises(access.AccessDenied, match="lacks permission 'principals'"):
        approve_both(
            kms, "carol", ticket="HR-3", operation="principal-remove", target="bob", totp=totp_now(kms, d["carol"])
        )


# ---- 2. audit review -------------------------------------------------------------------


def _anomaly_by(cli, actor: str) -> str:
    ctx = context_from_env(clock=None)
    lifecycle.rotate(ctx.as_actor(actor), "data:postgres", actor=actor)  # a script bypassing the CLI
    audit.flush(ctx)
    ctx.engine.dispose()
    r = cli("audit", "anomalies")
    assert r.exit_code == 1 and "manual_without_approvals" in r.output
    return next(line.split()[0] for line in r.output.splitlines() if "manual_without_approvals" in line)


def test_audit_review_needs_totp_the_review_permission_and_another_principal(cli):
    anomaly = _anomaly_by(cli, "bob")
    cli.refused("TOTP code for 'carol' is wrong", "audit", "review", anomaly, "--as", "carol", "--totp", "000000")
    cli.refused("may not review it", "audit", "review", anomaly, "--as", "bob", "--totp", cli.code("bob"))
    cli.refused("lacks permission 'review'", "audit", "review", anomaly, "--as", "alice", "--totp", cli.code("alice"))
    cli.refused("unknown principal 'x'", "audit", "review", anomaly, "--as", "x", "--totp", "123456")
    r = cli("audit", "review", anomaly, "--as", "carol", "--totp", cli.code("carol"), "--note", "drill")
    assert r.exit_code == 0 and "reviewed by carol" in r.output, r.output
    r = cli("audit", "anomalies", "--json")
    reviewed = {a["id"]: a["reviewed_by"] for a in json.loads(r.output)["anomalies"]}
    assert reviewed[int(anomaly)] == "carol"


# ---- 3. the clock is not an input for changes -------------------------------------------


def test_at_is_refused_by_every_command_that_writes(cli):
    past = (datetime.now(UTC) - timedelta(hours=2)).isoformat()
    soon = (datetime.now(UTC) + timedelta(minutes=10)).isoformat()
    for args in (
        (
            "--at",
            past,
            "approve",
            "--ticket",
            "C1",
            "--operation",
            "rotate",
            "--target",
            "root",
            "--as",
            "bob",
            "--totp",
            cli.code("bob"),
        ),
        ("--at", "9999-12-31T23:59:59Z", "keys", "rotate", "backup", "--if-due"),
        ("--at", "2030-01-01", "rpt", "issue", "--subject", "deal-1"),
        ("--at", soon, "token", "issue", "workload:api-gateway", "--as", "bob", "--totp", cli.code("bob")),
        (
            "--at",
            past,
            "keys",
            "rotate",
            "root",
            "--manual",
            "--ticket",
            "C1",
            "--requested-by",
            "alice",
            "--totp",
            cli.code("alice"),
        ),
        ("--at", past, "init"),
    ):
        cli.refused("--at is refused for", *args)
    # read-only commands still take it, and keys list works
    assert cli("--at", "2030-01-01", "keys", "list").exit_code == 0
    assert cli("--at", past, "ledger", "verify").exit_code == 0
    assert cli("--at", past, "audit", "anomalies", "--no-refresh").exit_code == 0
    cli.refused("--at is refused for `kms audit anomalies`", "--at", past, "audit", "anomalies")  # refresh writes
    assert cli("keys", "list").exit_code == 0


def test_a_read_only_command_under_at_cannot_write(cli):
    """Under --at the database connection itself is read-only (defence in depth)."""
    from kms_pipelines.core.foundation import db

    ctx = context_from_env(read_only=True)
    with pytest.raises(Exception) as exc, ctx.transaction() as s:
        s.execute(update(Principal).values(roles=["security_engineering"]))
    assert "read-only" in str(exc.value) or "readonly" in str(exc.value).lower()
    ctx.engine.dispose()
    assert db  # imported for make_read_only's module


def test_ledger_and_audit_refuse_an_entry_older_than_the_previous(kms):
    later = kms.now()
    kms.clock.set(later - timedelta(hours=2))  # an insider's rewound clock
    before = _core_state(kms)
    with pytest.raises(ledger.ChainOrderError, match="older than the previous entry"):
        lifecycle.rotate(kms, "root", reason="cadence")
    with pytest.raises(ledger.ChainOrderError, match="older than the previous entry"):
        with kms.transaction() as s:
            audit.record(s, at=kms.now(), operation="x", actor="insider", target=None, outcome="ok")
    assert _core_state(kms) == before
    kms.clock.set(later)
    assert lifecycle.rotate(kms, "root", reason="cadence").rotated


@pytest.mark.parametrize("table, column", [("ledger_entries", "at"), ("audit_events", "at"), ("rpts", "iat")])
def test_the_database_refuses_a_backdated_row_inserted_behind_cores_back(kms, table, column):
    """An insider's direct INSERT (bypassing core's check) of a row older than the newest:
    the time-order trigger refuses it; with the trigger dropped, the same INSERT lands."""
    from kms_pipelines.core.foundation.db.append_only import create_time_order_trigger, drop_time_order_trigger
    from kms_pipelines.core.ledger import rpt

    rpt.issue(kms, "deal-1", {})
    audit.flush(kms)
    with kms.engine.begin() as conn:
        newest = conn.execute(text(f"SELECT * FROM {table} ORDER BY seq DESC LIMIT 1")).mappings().one()
    row = {**newest, "seq": newest["seq"] + 1, column: kms.now() - timedelta(days=1)}
    for unique in ("entry_hash", "token", "token_hash"):
        if unique in row:
            row[unique] = "forged-" + str(row[unique])[7:]
    insert = text(f"INSERT INTO {table} ({', '.join(row)}) VALUES ({', '.join(':' + k for k in row)})")
    before = _core_state(kms)
    with pytest.raises(Exception, match="older than the previous entry"):
        with kms.engine.begin() as conn:
            conn.execute(insert, row)
    assert _core_state(kms) == before
    with kms.engine.begin() as conn:  # the control red: drop the trigger and the backdated row lands
        drop_time_order_trigger(conn, table)
        conn.execute(insert, row)
        create_time_order_trigger(conn, table, column)


def test_a_rotation_at_the_end_of_time_is_refused_and_inventory_never_overflows(kms):
    end = replace_clock(kms, datetime(9999, 12, 31, 23, 59, 59, tzinfo=UTC))
    before = _core_state(kms)
    with pytest.raises(lifecycle.LifecycleError, match="out of range"):
        lifecycle.rotate(end, "backup", reason="cadence", only_if_due=True)
    assert _core_state(kms) == before
    # a version activated at the end of time (written by an old release, or by SQL) lists without OverflowError
    with kms.transaction() as s:
        key_id = s.scalars(select(Key.id).where(Key.name == "backup")).one()
        s.execute(
            update(KeyVersion)
            .where(KeyVersion.key_id == key_id)
            .values(activated_at=datetime(9999, 12, 31, tzinfo=UTC))
        )
    rows = [r for r in lifecycle.inventory(kms) if r.key == "backup"]
    assert rows and rows[0].due_at is None


def replace_clock(kms, at):
    from dataclasses import replace

    return replace(kms, clock=FixedClock(at))


def _core_state(kms):
    audit.flush(kms)
    with kms.engine.connect() as conn:
        return (
            conn.execute(select(LedgerEntry.seq, LedgerEntry.entry_hash).order_by(LedgerEntry.seq)).all(),
            conn.execute(select(AuditEvent.seq).where(AuditEvent.outcome == "ok").order_by(AuditEvent.seq)).all(),
            conn.execute(select(KeyVersion.id, KeyVersion.state).order_by(KeyVersion.id)).all(),
        )


def test_simulate_refuses_a_directory_holding_live_state(cli, tmp_path):
    import os

    home = os.environ["KMS_HOME"]
    r = cli("simulate", "--days", "1", "--home", home)
    assert r.exit_code == 1 and "refused" in r.output and "KMS home" in r.output
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "master.key").write_bytes(b"x" * 32)
    r = cli("simulate", "--days", "1", "--home", str(tmp_path / "other"))
    assert r.exit_code == 1 and "master key" in r.output


def test_token_lifetime_is_capped_from_the_wall_clock_issue_time(cli):
    r = cli("token", "issue", "workload:api-gateway", "--as", "bob", "--totp", cli.code("bob"))
    assert r.exit_code == 0, r.output
    token = r.output.strip()
    claims = json.loads(tokens._unb64u(token.split(".")[1]))
    now = datetime.now(UTC).timestamp()
    assert claims["exp"] - now <= 15 * 60 and claims["exp"] - claims["iat"] <= 15 * 60


# ---- 4. least privilege by key class ---------------------------------------------------


@pytest.mark.parametrize("reason", ["compromise", "tenant-rotation", "ci-exposure"])
def test_r2_reasons_rotate_service_keys_only(cli, reason):
    for key in ("root", "break-glass", "data:postgres", "backup"):
        cli.refused("rotates service keys only", "keys", "rotate", key, "--reason", reason)
    cli.refused(
        "TOTP code for 'alice' is wrong",
        "keys",
        "rotate",
        "service:api-gateway",
        "--reason",
        reason,
        "--requested-by",
        "alice",
        "--totp",
        "000000",
    )
    cli.refused(
        "'carol' lacks permission 'rotate'",
        "keys",
        "rotate",
        "service:api-gateway",
        "--reason",
        reason,
        "--requested-by",
        "carol",
        "--totp",
        cli.code("carol"),
    )
    r = cli(
        "keys",
        "rotate",
        "service:api-gateway",
        "--reason",
        reason,
        "--requested-by",
        "alice",
        "--totp",
        cli.code("alice"),
    )
    assert r.exit_code == 0, r.output
    ctx = cli.context()
    with ctx.transaction() as s:
        moves = [e for e in ledger.entries_for(s, "service:api-gateway") if e.to_state in ("active", "rotated")]
        assert {(e.actor, e.reason) for e in moves[-2:]} == {("alice", reason)}
    ctx.engine.dispose()


def test_tokens_only_for_declared_workloads(cli):
    for name in ("workload:undeclared", "alice"):
        cli.refused("not a workload principal declared", "token", "issue", name, "--as", "bob", "--totp", "123456")


# ---- 5. one reason vocabulary ----------------------------------------------------------


def test_if_due_records_cadence_and_raises_no_anomaly(cli):
    ctx = cli.context()
    with ctx.transaction() as s:  # make backup due: its version was activated long ago
        key_id = s.scalars(select(Key.id).where(Key.name == "backup")).one()
        s.execute(
            update(KeyVersion).where(KeyVersion.key_id == key_id).values(activated_at=datetime(2020, 1, 1, tzinfo=UTC))
        )
    ctx.engine.dispose()
    r = cli("keys", "rotate", "backup", "--if-due")
    assert r.exit_code == 0 and "rotated backup" in r.output, r.output
    ctx = cli.context()
    with ctx.transaction() as s:
        moves = [e for e in ledger.entries_for(s, "backup") if e.to_state in ("active", "rotated")]
        assert {e.reason for e in moves[-2:]} == {"cadence"}
    ctx.engine.dispose()
    r = cli("audit", "anomalies")
    assert r.exit_code == 0 and "manual_without_approvals" not in r.output, r.output


def test_unknown_rotation_reasons_are_refused(kms):
    before = _core_state(kms)
    with pytest.raises(lifecycle.LifecycleError, match="unknown rotation reason"):
        lifecycle.rotate(kms, "root", reason="because")
    assert _core_state(kms) == before


# ---- 6. A2 says when no manual operation can be approved ---------------------------------


def test_a2_warns_until_two_approvers_besides_a_requester_exist(kms):
    f = eval_a2(kms)
    assert f.status == "warn" and "cannot approve any manual operation" in f.evidence
    # an insider adds an approver by SQL, bypassing enrolment: still too few past the cooling-off
    with kms.transaction() as s:
        s.add(
            Principal(
                name="solo",
                kind="human",
                roles=["security_engineering"],
                totp_sealed=b"x",
                created_at=kms.now(),
                approve_after=kms.now() + timedelta(hours=24),
            )
        )
    f = eval_a2(kms)
    assert f.status in ("warn", "fail") and "cannot approve any manual operation" in f.evidence
    with kms.transaction() as s:
        s.execute(text("DELETE FROM principals"))
    ceremony(kms, {"a": "security_engineering", "b": "security_engineering", "c": "sre_oncall"})
    assert "cannot approve any manual operation" not in eval_a2(kms).evidence


# ---- 7. smaller defects ------------------------------------------------------------------


def test_a_token_with_non_canonical_base64_is_refused(cli):
    token = cli("token", "issue", "workload:api-gateway", "--as", "bob", "--totp", cli.code("bob")).output.strip()
    assert cli("token", "verify", token).exit_code == 0
    for forged in (token + "==", token + "=", token[:-1] + ("B" if token[-1] != "B" else "C")):
        cli.refused("workload token refused", "token", "verify", forged)


def test_approvals_must_name_an_existing_target(cli):
    cli.refused(
        "no rotate target 'nope'",
        "approve",
        "--ticket",
        "C1",
        "--operation",
        "rotate",
        "--target",
        "nope",
        "--as",
        "bob",
        "--totp",
        cli.code("bob"),
    )
    cli.refused(
        "no destroy target 'root#v9'",
        "approve",
        "--ticket",
        "C1",
        "--operation",
        "destroy",
        "--target",
        "root#v9",
        "--as",
        "bob",
        "--totp",
        cli.code("bob"),
    )
    cli.refused(
        "no break-glass target 'pkg-404'",
        "approve",
        "--ticket",
        "C1",
        "--operation",
        "break-glass",
        "--target",
        "pkg-404",
        "--as",
        "carol",
        "--totp",
        cli.code("carol"),
    )


@pytest.mark.parametrize("name", ["s1\x1b[31m", "evil\nname", "a" * 65, ".dot", "sp ace", ""])
def test_principal_names_must_match_the_documented_pattern(cli, name):
    cli.refused(
        "invalid principal name",
        "principals",
        "add",
        name,
        "--role",
        "security_engineering",
        "--ticket",
        "C1",
        "--requested-by",
        "bob",
        "--totp",
        "123456",
    )


def test_free_text_limits_are_the_same_on_sqlite_and_postgresql(cli):
    long_ticket, long_target = "T" * 201, "root#v" + "1" * 300
    cli.refused(
        "change ticket is 201 characters long; the limit is 200",
        "approve",
        "--ticket",
        long_ticket,
        "--operation",
        "rotate",
        "--target",
        "root",
        "--as",
        "bob",
        "--totp",
        cli.code("bob"),
    )
    cli.refused(
        "target is 306 characters long; the limit is 300",
        "approve",
        "--ticket",
        "C1",
        "--operation",
        "rotate",
        "--target",
        long_target,
        "--as",
        "bob",
        "--totp",
        cli.code("bob"),
    )
    cli.refused(
        "change ticket is 100000 characters long",
        "keys",
        "rotate",
        "root",
        "--manual",
        "--ticket",
        "X" * 100_000,
        "--requested-by",
        "alice",
        "--totp",
        cli.code("alice"),
    )
    cli.refused(
        "control or format characters",
        "approve",
        "--ticket",
        "C1\x1b[2J",
        "--operation",
        "rotate",
        "--target",
        "root",
        "--as",
        "bob",
        "--totp",
        cli.code("bob"),
    )


def test_every_varchar_column_refuses_an_over_long_value_the_same_way(cli):
    """The generic rule (core/foundation/db/lengths.py) for inputs without their own limit: here the core
    API's actor label (the CLI now records the proven principal, whose name has its own limit)."""
    from kms_pipelines.core.foundation import limits
    from kms_pipelines.core.keys import dependents

    before = cli.state()
    ctx = cli.context()
    with pytest.raises(
        limits.InputError, match="dependent_confirmations.actor is 250 characters long; the limit is 200"
    ):
        dependents.confirm(ctx, "service:api-gateway", 1, "api-gateway", actor="a" * 250)
    ctx.engine.dispose()
    assert cli.state() == before


def test_a_report_at_a_chosen_time_writes_nothing_dated_then(cli):
    before = cli.state()
    r = cli("--at", "2031-06-01T00:00:00Z", "report", "--format", "json")
    assert r.exit_code in (0, 1), r.output
    assert json.loads(r.output)["rows"]
    after = cli.state()
    assert {k: v for k, v in after.items() if k != "audit_ok"} == {k: v for k, v in before.items() if k != "audit_ok"}
    ctx = cli.context()
    with ctx.engine.connect() as conn:  # its keystore probes are audited, at the real time
        newest = conn.execute(select(AuditEvent.at).order_by(AuditEvent.seq.desc()).limit(1)).scalar()
    ctx.engine.dispose()
    assert newest.replace(tzinfo=UTC) < datetime(2031, 1, 1, tzinfo=UTC)
    assert cli("rpt", "issue", "--subject", "after-the-report").exit_code == 0  # the chains still move


def test_dagster_runs_refuse_kms_fixed_time(monkeypatch):
    import dagster as dg

    from kms_pipelines.defs.resources import ClockResource

    with pytest.raises(dg.Failure, match="a fixed time .* is refused"):  # as the Launchpad would set it
        ClockResource(fixed_time="2030-01-01T00:00:00Z").clock()
    monkeypatch.setenv("KMS_FIXED_TIME", "2030-01-01T00:00:00Z")
    with pytest.raises(dg.Failure, match="a fixed time .* is refused"):
        ClockResource().clock()


def test_repeated_wrong_codes_lock_totp_for_a_while(kms):
    """Online guessing of 6-digit codes: after totp_max_failures wrong codes in a row the
    principal cannot prove itself, even with the right code, until the lockout ends."""
    d = ceremony(kms, {"alice": "security_engineering", "bob": "security_engineering", "carol": "security_engineering"})
    pol = kms.policy.access
    right = totp_now(kms, d["alice"])
    wrong = f"{(int(right) + 1) % 1_000_000:06d}"
    for _ in range(pol.totp_max_failures):
        with pytest.raises(access.AccessDenied, match="wrong or stale"):
            access.prove_principal(kms, "alice", wrong)
    before = _core_state(kms)
    with pytest.raises(access.AccessDenied, match="locked until"):
        access.prove_principal(kms, "alice", right)
    with pytest.raises(access.AccessDenied, match="locked until"):  # approvals too
        approve_both(kms, "alice", ticket="C1", operation="rotate", target="root", totp=right)
    assert _core_state(kms)[0::2] == before[0::2]  # ledger and keys unchanged
    kms.clock.advance(timedelta(minutes=pol.totp_lockout_minutes, seconds=30))
    assert access.prove_principal(kms, "alice", totp_now(kms, d["alice"])) == "alice"
    audit.flush(kms)
    with kms.engine.connect() as conn:
        assert conn.execute(select(AuditEvent.actor).where(AuditEvent.operation == "totp.lockout")).scalars().all() == [
            "alice"
        ]
