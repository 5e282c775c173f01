"""No approval without both factors (issue 13, A2/A4): ``access.approve`` -- the one approval
path of the console and ``kms approve`` -- needs the approver's FIDO2 assertion over exactly
(operation, target, ticket) *and* their TOTP code. Each forgery an insider would try is
refused with a one-line error, audited, and changes nothing (approvals, sign count, TOTP step);
on SQLite and PostgreSQL, with the product's software authenticator (real keys, real signatures)."""

import json
from dataclasses import replace
from datetime import timedelta

import pytest
from sqlalchemy import select, update

from kms_pipelines.core.access import console_auth
from kms_pipelines.core.access import principals as access
from kms_pipelines.core.compliance import FAIL, eval_a2
from kms_pipelines.core.foundation.db.models_access import Approval, AuditEvent, Principal
from kms_pipelines.core.foundation.db.models_console import ConsoleCredential
from kms_pipelines.core.foundation.policy import load_policy
from kms_pipelines.core.ledger import audit
from kms_pipelines.fido2_client import SoftwareAuthenticator
from tests.fixtures.kms import KEY_ORIGIN, approve_both, ceremony, security_key, totp_now

TICKET = "CHG-2001"


@pytest.fixture
def team(kms):
    return ceremony(kms, {"alice": "sre_oncall", "bob": "security_engineering", "carol": "security_engineering"})


def state(kms):
    with kms.engine.connect() as conn:
        return (
            conn.execute(select(Approval.id)).all(),
            conn.execute(
                select(ConsoleCredential.principal, ConsoleCredential.sign_count).order_by(ConsoleCredential.id)
            ).all(),
            conn.execute(select(Principal.name, Principal.totp_last_step).order_by(Principal.name)).all(),
        )


def denied(kms, reason):
    audit.flush(kms)
    with kms.transaction() as s:
        return [
            r.seq
            for r in s.scalars(
                select(AuditEvent).where(
                    AuditEvent.outcome == "denied", AuditEvent.operation == "approve", AuditEvent.actor == "bob"
                )
            )
            if json.loads(r.detail).get("reason") == reason
        ]


def refused(kms, match, reason, *, assertion, totp, ctx=None, target="root", ticket=TICKET):
    kms.clock.advance(timedelta(seconds=30))  # a fresh TOTP step: only the assertion is wrong
    before = state(kms)
    with pytest.raises(access.AccessDenied, match=match) as exc:
        access.approve(
            ctx or kms, "bob", ticket=ticket, operation="rotate", target=target, totp=totp(), assertion=assertion
        )
    assert "\n" not in str(exc.value) and exc.value.reason == reason
    assert state(kms) == before, "a refused approval changed something"
    assert denied(kms, reason), f"refusal {reason} not audited"


def challenge(kms, ticket=TICKET, target="root", operation="rotate", who="bob"):
    return console_auth.begin_approval(kms, who, operation=operation, ticket=ticket, target=target)


def test_every_approval_takes_a_bound_fresh_user_verified_assertion_and_totp(kms, team):
    bob = security_key(kms, "bob")
    code = lambda: totp_now(kms, team["bob"])  # noqa: E731

    # TOTP alone (the old path) approves nothing
    refused(kms, "needs 'bob''s security-key assertion", "fido2", assertion=None, totp=code)
    # an assertion given for another ticket, target or operation
    for other in (
        challenge(kms, ticket="CHG-OTHER"),
        challenge(kms, target="service:api-gateway"),
        challenge(kms, operation="destroy", target="root"),
    ):
        refused(
            kms,
            "confirmation was given for",
            "binding",
            totp=code,
            assertion={"handle": other.handle, "credential": bob.get(other.options)},
        )
    # a key never registered, and carol's registered key, answering bob's challenge
    for stranger in (SoftwareAuthenticator(KEY_ORIGIN), security_key(kms, "carol")):
        ch = challenge(kms)
        refused(
            kms,
            "not registered to 'bob'",
            "unknown_credential",
            totp=code,
            assertion={"handle": ch.handle, "credential": stranger.get(ch.options)},
        )
    # a cloned authenticator: after bob's key signed an approval (stored count 1 or more), a copy
    # presents a count that does not grow
    kms.clock.advance(timedelta(seconds=30))
    approve_both(kms, "bob", ticket="CHG-EARLIER", operation="rotate", target="root", totp=code())
    with kms.transaction() as s:
        stored = s.scalars(select(ConsoleCredential.sign_count).where(ConsoleCredential.principal == "bob")).one()
    assert stored >= 1
    ch = challenge(kms)
    refused(
        kms,
        "sign count did not grow",
        "sign_count",
        totp=code,
        assertion={"handle": ch.handle, "credential": bob.get(ch.options, count=stored)},
    )
    # no user verification (the key was only touched, no PIN or biometrics)
    bob.user_verified = False
    ch = challenge(kms)
    refused(
        kms,
        "User verification required",
        "webauthn",
        totp=code,
        assertion={"handle": ch.handle, "credential": bob.get(ch.options)},
    )
    bob.user_verified = True
    # a replayed answer: the challenge was spent by the refusal above
    refused(
        kms,
        "already answered",
        "ceremony",
        totp=code,
        assertion={"handle": ch.handle, "credential": bob.get(ch.options)},
    )
    # a good assertion with a wrong TOTP code: refused, and the sign count is not advanced
    ch = challenge(kms)
    wrong = "000000" if code() != "000000" else "000001"
    refused(
        kms,
        "TOTP code for 'bob' is wrong",
        "totp",
        totp=lambda: wrong,
        assertion={"handle": ch.handle, "credential": bob.get(ch.options)},
    )
    # a software authenticator under the production policy (which does not allow them)
    strict = replace(kms, policy=load_policy())
    ch = challenge(kms)
    refused(
        kms,
        "software authenticator",
        "software_authenticator",
        ctx=strict,
        totp=code,
        assertion={"handle": ch.handle, "credential": bob.get(ch.options)},
    )

    # both factors: recorded, and the audit names both
    kms.clock.advance(timedelta(seconds=30))
    info = approve_both(kms, "bob", ticket=TICKET, operation="rotate", target="root", totp=code())
    assert (info.approver, info.target, info.have) == ("bob", "root", 1)  # for this ticket
    audit.flush(kms)
    with kms.engine.connect() as conn:
        ok = (
            conn.execute(select(AuditEvent.detail).where(AuditEvent.operation == "approve", AuditEvent.outcome == "ok"))
            .scalars()
            .all()
        )
    last = json.loads(ok[-1])
    assert last["factors"] == ["fido2", "totp"] and last["authenticator"] == "software"


def test_a_promoted_or_moved_credential_fails_its_integrity_check(kms, team):
    """An insider with database access marks bob's software key as hardware: refused."""
    with kms.engine.begin() as conn:
        conn.execute(update(ConsoleCredential).where(ConsoleCredential.principal == "bob").values(software=False))
    ch = challenge(kms)
    refused(
        kms,
        "fails its integrity check",
        "integrity",
        totp=lambda: totp_now(kms, team["bob"]),
        assertion={"handle": ch.handle, "credential": security_key(kms, "bob").get(ch.options)},
    )


def test_a2_names_principals_whose_keys_are_software_authenticators_unless_allowed(kms, team):
    assert "console principals without both factors" not in eval_a2(kms).evidence
    strict = replace(kms, policy=load_policy())
    finding = eval_a2(strict)
    text = finding.evidence
    assert finding.status == FAIL, finding
    for name in ("alice", "bob", "carol"):
        assert f"{name} lacks a hardware FIDO2 key" in text
    assert console_auth.missing_console_factors(strict)["bob"] == ["fido2-hardware"]
    with kms.transaction() as s:
        c = s.scalars(select(ConsoleCredential).where(ConsoleCredential.principal == "bob")).one()
        assert (c.aaguid, c.attestation, c.software, c.origin) == (
            str(console_auth.SOFTWARE_AAGUID),
            "none",
            True,
            KEY_ORIGIN,
        )
