"""Console identity in core (issue 13, clause A2), on SQLite and PostgreSQL, with a software
FIDO2 authenticator (tests/fido2_soft.py: real keys and signatures): registration links under
dual control that expire and work once; sign-in with both factors; each refusal audited and
changing nothing; step-up assertions bound to exactly one action; session limits from the
policy; A2 red while a principal with a role lacks a factor."""

from __future__ import annotations

import copy
from datetime import timedelta

import pyotp
import pytest
from sqlalchemy import func, select

from kms_pipelines.core import compliance
from kms_pipelines.core.access import approval_requests, console_auth, webauthn
from kms_pipelines.core.access import principals as access
from kms_pipelines.core.foundation.db.models_access import AuditEvent, Principal
from kms_pipelines.core.foundation.db.models_console import ConsoleCredential, ConsoleRegistrationLink, ConsoleSession
from kms_pipelines.core.keys import manual
from kms_pipelines.core.ledger import audit
from tests.fido2_soft import SoftAuthenticator, register
from tests.fixtures.kms import approve_both, enrol_direct

ORIGIN = "https://kms.example.test"
RP = webauthn.RelyingParty(ORIGIN)


class Device:
    """A TOTP device; the simulated clock moves one step before each code (the replay rule)."""

    def __init__(self, kms, uri):
        self.kms, self.totp = kms, pyotp.parse_uri(uri)

    def code(self) -> str:
        self.kms.clock.advance(timedelta(seconds=self.kms.policy.access.totp_interval_seconds))
        return self.totp.at(self.kms.now())


@pytest.fixture
def team(kms):
    devices = {}
    for name, role in (
        ("ann", "security_engineering"),
        ("bo", "sre_oncall"),
        ("cy", "compliance_officer"),
        ("dee", "security_engineering"),
    ):
        devices[name] = Device(kms, enrol_direct(kms, name, role))
    return kms, devices


def _link(kms, devices, target, requester="ann", approvers=None, ticket=None):
    ticket = ticket or f"ONB-{target}"
    approvers = approvers or [n for n in devices if n not in (requester, target)][:2]
    console_auth.request_registration(kms, target, ticket=ticket, requested_by=requester)
    for a in approvers:
        approve_both(
            kms, a, ticket=ticket, operation=console_auth.REGISTRATION_OPERATION, totp=devices[a].code(), target=target
        )
    return console_auth.issue_registration_link(kms, target, ticket=ticket, requested_by=requester)


def _state(kms):
    audit.flush(kms)
    with kms.engine.connect() as conn:
        return (
            conn.execute(select(func.count()).select_from(ConsoleSession)).scalar(),
            conn.execute(
                select(ConsoleCredential.id, ConsoleCredential.sign_count).order_by(ConsoleCredential.id)
            ).all(),
            conn.execute(select(Principal.name, Principal.totp_last_step).order_by(Principal.name)).all(),
            conn.execute(
                select(func.count())
                .select_from(ConsoleRegistrationLink)
                .where(ConsoleRegistrationLink.used_at.is_not(None))
            ).scalar(),
        )


def _denied(kms, operation, reason):
    audit.flush(kms)
    with kms.engine.connect() as conn:
        rows = (
            conn.execute(
                select(AuditEvent.detail).where(AuditEvent.operation == operation, AuditEvent.outcome == "denied")
            )
            .scalars()
            .all()
        )
    return [d for d in rows if f'"reason":"{reason}"' in (d or "")]


def _sign_in(kms, key, name, code, **kw):
    handle, options = console_auth.begin_signin(kms, RP)
    return console_auth.complete_signin(kms, RP, name=name, handle=handle, response=key.get(options, **kw), totp=code)


def test_registration_link_is_dual_controlled_single_use_and_expires(team):
    kms, devices = team
    # Without approvals: refused naming what is missing; no link exists.
    console_auth.request_registration(kms, "bo", ticket="ONB-1", requested_by="ann")
    with pytest.raises(access.AccessDenied, match="needs 2 approvals"):
        console_auth.issue_registration_link(kms, "bo", ticket="ONB-1", requested_by="ann")
    # Only a role holding console-registration may ask for one.
    with pytest.raises(access.AccessDenied, match="lacks permission 'console-registration'"):
        console_auth.request_registration(kms, "ann", ticket="ONB-2", requested_by="cy")
    with kms.engine.connect() as conn:
        assert conn.execute(select(func.count()).select_from(ConsoleRegistrationLink)).scalar() == 0

    # The principal may not approve their own key's registration.
    with pytest.raises(webauthn.ConsoleDenied, match="approved the registration of their own key"):
        _link(kms, devices, "bo", ticket="ONB-1", approvers=["bo", "cy"])
    approval_requests.reject(kms, approval_requests.pending(kms)[0].id, principal="dee", note="self-approved")
    with kms.engine.connect() as conn:
        assert conn.execute(select(func.count()).select_from(ConsoleRegistrationLink)).scalar() == 0
    link = _link(kms, devices, "bo", ticket="ONB-1")
    assert link.approvers == ["cy", "dee"] and link.url(ORIGIN).startswith(f"{ORIGIN}/register/")
    assert link.token not in repr(link)
    # The approvals were consumed: a second link needs a new round.
    with pytest.raises(access.AccessDenied, match="already used"):
        console_auth.issue_registration_link(kms, "bo", ticket="ONB-1", requested_by="ann")

    # Expired: refused and audited, nothing registered.
    kms.clock.advance(timedelta(hours=kms.policy.console.registration_link_hours, seconds=1))
    before = _state(kms)
    with pytest.raises(webauthn.ConsoleDenied, match="expired"):
        register(kms, RP, link.token, devices["bo"].code(), SoftAuthenticator(ORIGIN))
    assert _denied(kms, "console.register", "link") and _state(kms) == before

    fresh = _link(kms, devices, "bo", ticket="ONB-3")
    key = SoftAuthenticator(ORIGIN)
    assert register(kms, RP, fresh.token, devices["bo"].code(), key) == "bo"
    with pytest.raises(webauthn.ConsoleDenied, match="already used"):
        register(kms, RP, fresh.token, devices["bo"].code(), SoftAuthenticator(ORIGIN))
    # A wrong TOTP at registration stores nothing.
    other = _link(kms, devices, "cy", ticket="ONB-4")
    before = _state(kms)
    with pytest.raises(access.AccessDenied, match="wrong or stale"):
        register(kms, RP, other.token, "000000", SoftAuthenticator(ORIGIN))
    assert _state(kms)[:2] == before[:2]


def test_sign_in_needs_both_factors_and_each_refusal_changes_nothing(team):
    kms, devices = team
    key = SoftAuthenticator(ORIGIN)
    register(kms, RP, _link(kms, devices, "bo").token, devices["bo"].code(), key)

    grant = _sign_in(kms, key, "bo", devices["bo"].code())
    user = console_auth.current_user(kms, grant.token)
    assert user.principal == "bo" and user.roles == ["sre_oncall"] and len(user.csrf) == 64

    cases = [
        ("totp", "wrong or stale", lambda: _sign_in(kms, key, "bo", "000000")),
        (
            "unknown_credential",
            "not registered to 'bo'",
            lambda: _sign_in(kms, SoftAuthenticator(ORIGIN), "bo", devices["bo"].code()),
        ),
        ("unknown_credential", "not registered to 'cy'", lambda: _sign_in(kms, key, "cy", devices["cy"].code())),
        ("sign_count", "did not grow", lambda: _sign_in(kms, key, "bo", devices["bo"].code(), count=1)),
        ("webauthn", "User verification required", lambda: _sign_in(kms, _unverified(key), "bo", devices["bo"].code())),
        ("webauthn", "Invalid origin", lambda: _sign_in(kms, _elsewhere(key), "bo", devices["bo"].code())),
        (
            "webauthn",
            "Wrong RP ID hash",
            lambda: _sign_in(kms, key, "bo", devices["bo"].code(), rp_id="evil.example.test"),
        ),
    ]
    for reason, message, attempt in cases:
        before = _state(kms)
        with pytest.raises(access.AccessDenied, match=message):
            attempt()
        after = _state(kms)
        assert after[0] == before[0] and after[1] == before[1] and after[3] == before[3], reason
        assert _denied(kms, "console.signin", reason), reason

    # A replayed TOTP step and a replayed ceremony.
    code = devices["bo"].code()
    _sign_in(kms, key, "bo", code)
    with pytest.raises(access.AccessDenied, match="already used"):
        _sign_in(kms, key, "bo", code)
    handle, options = console_auth.begin_signin(kms, RP)
    answer = key.get(options)
    console_auth.complete_signin(kms, RP, name="bo", handle=handle, response=answer, totp=devices["bo"].code())
    with pytest.raises(webauthn.ConsoleDenied, match="already answered"):
        console_auth.complete_signin(kms, RP, name="bo", handle=handle, response=answer, totp=devices["bo"].code())
    # A challenge answered too late.
    handle, options = console_auth.begin_signin(kms, RP)
    kms.clock.advance(timedelta(seconds=kms.policy.console.ceremony_seconds + 1))
    with pytest.raises(webauthn.ConsoleDenied, match="expired"):
        console_auth.complete_signin(
            kms, RP, name="bo", handle=handle, response=key.get(options), totp=devices["bo"].code()
        )


def _unverified(key):
    clone = copy.copy(key)  # the same credential, answering without user verification
    clone.user_verified = False
    return clone


def _elsewhere(key):
    clone = copy.copy(key)  # the same credential, used from a phishing origin
    clone.origin = "https://phish.example.test"
    return clone


def test_step_up_is_bound_to_exactly_one_action(team):
    kms, devices = team
    key = SoftAuthenticator(ORIGIN)
    register(kms, RP, _link(kms, devices, "bo").token, devices["bo"].code(), key)
    binding = webauthn.step_up_binding("approve", "rotate", "root", "CHG-1")
    handle, options = webauthn.begin_step_up(kms, RP, "bo", binding)
    answer = key.get(options)
    for other in (
        webauthn.step_up_binding("approve", "rotate", "root", "CHG-2"),
        webauthn.step_up_binding("launch", "rotate", "root", "CHG-1"),
        webauthn.step_up_binding("approve", "destroy", "root", "CHG-1"),
    ):
        h2, o2 = webauthn.begin_step_up(kms, RP, "bo", binding)
        with pytest.raises(webauthn.ConsoleDenied, match="confirmation was given for"):
            console_auth.verify_step_up(kms, RP, "bo", other, handle=h2, response=key.get(o2))
    # The answer to one challenge does not fit another challenge of the same binding either.
    h3, _ = webauthn.begin_step_up(kms, RP, "bo", binding)
    with pytest.raises(webauthn.ConsoleDenied, match="Wrong challenge"):
        console_auth.verify_step_up(kms, RP, "bo", binding, handle=h3, response=answer)
    console_auth.verify_step_up(kms, RP, "bo", binding, handle=handle, response=answer)
    with pytest.raises(webauthn.ConsoleDenied, match="already answered"):
        console_auth.verify_step_up(kms, RP, "bo", binding, handle=handle, response=answer)
    # Another principal cannot answer bo's challenge.
    h4, o4 = webauthn.begin_step_up(kms, RP, "bo", binding)
    with pytest.raises(webauthn.ConsoleDenied, match="unknown security-key challenge"):
        console_auth.verify_step_up(kms, RP, "cy", binding, handle=h4, response=key.get(o4))
    assert _denied(kms, "console.step-up", "binding")


def test_sessions_end_idle_and_absolute_per_policy(team):
    kms, devices = team
    pol = kms.policy.console
    key = SoftAuthenticator(ORIGIN)
    register(kms, RP, _link(kms, devices, "bo").token, devices["bo"].code(), key)
    grant = _sign_in(kms, key, "bo", devices["bo"].code())
    kms.clock.advance(timedelta(minutes=pol.session_idle_minutes - 1))
    console_auth.current_user(kms, grant.token)
    kms.clock.advance(timedelta(minutes=pol.session_idle_minutes, seconds=1))
    with pytest.raises(webauthn.ConsoleDenied, match="without activity"):
        console_auth.current_user(kms, grant.token)
    with pytest.raises(webauthn.ConsoleDenied, match="not signed in"):
        console_auth.current_user(kms, grant.token)
    assert _denied(kms, "console.session", "session_expired")

    grant = _sign_in(kms, key, "bo", devices["bo"].code())
    for _ in range(pol.session_absolute_hours * 60 // (pol.session_idle_minutes - 1) + 2):
        kms.clock.advance(timedelta(minutes=pol.session_idle_minutes - 1))
        try:
            console_auth.current_user(kms, grant.token)
        except webauthn.ConsoleDenied as exc:
            assert f"{pol.session_absolute_hours} h after sign-in" in str(exc)
            break
    else:
        pytest.fail("an active session outlived the absolute limit")
    console_auth.end_session(kms, _sign_in(kms, key, "bo", devices["bo"].code()).token)


def test_a2_is_red_while_a_principal_with_a_role_lacks_a_factor(team):
    kms, devices = team  # the team's keys came with their enrolment; eve has none yet
    devices["eve"] = Device(kms, enrol_direct(kms, "eve", "compliance_officer", key=False))
    finding = compliance.evaluate(kms, compliance.clause("A2"))
    assert finding.status == compliance.FAIL
    assert "eve lacks fido2" in finding.evidence and "ann lacks" not in finding.evidence
    register(kms, RP, _link(kms, devices, "eve").token, devices["eve"].code(), SoftAuthenticator(ORIGIN))
    finding = compliance.evaluate(kms, compliance.clause("A2"))
    assert "console principals" not in finding.evidence, finding.evidence
    assert "every console principal with a role has a FIDO2 security key and TOTP" in finding.evidence
    # An insider deletes a principal's credential row: A2 turns red again, naming them.
    from sqlalchemy import delete

    with kms.engine.begin() as conn:
        conn.execute(delete(ConsoleCredential).where(ConsoleCredential.principal == "cy"))
    finding = compliance.evaluate(kms, compliance.clause("A2"))
    assert finding.status == compliance.FAIL and "cy lacks fido2" in finding.evidence


def test_an_insider_with_database_access_cannot_forge_console_identity(team):
    """Direct SQL, as an insider who can write the database but not use the keystore: a
    rewound sign count (to pass a cloned key), a session moved to another principal, a minted
    session, a planted credential. Each is refused; A2 stops counting the planted key."""
    from sqlalchemy import delete, insert, update

    kms, devices = team
    with kms.engine.begin() as conn:  # set-up: bo starts without the key of their enrolment
        conn.execute(delete(ConsoleCredential).where(ConsoleCredential.principal == "bo"))
    key = SoftAuthenticator(ORIGIN)
    register(kms, RP, _link(kms, devices, "bo").token, devices["bo"].code(), key)
    grant = _sign_in(kms, key, "bo", devices["bo"].code())
    _sign_in(kms, key, "bo", devices["bo"].code())

    # 1. Rewind the stored sign count so a clone's low counter passes: the row no longer verifies.
    with kms.engine.begin() as conn:
        conn.execute(update(ConsoleCredential).where(ConsoleCredential.principal == "bo").values(sign_count=0))
    clone = copy.copy(key)
    with pytest.raises(webauthn.ConsoleDenied, match="fails its integrity check"):
        _sign_in(kms, clone, "bo", devices["bo"].code(), count=1)
    assert _denied(kms, "console.signin", "integrity")
    assert "bo" not in console_auth.credentials_by_principal(kms)
    assert compliance.evaluate(kms, compliance.clause("A2")).status == compliance.FAIL

    # 2. Move bo's live session to ann: refused and ended.
    with kms.engine.begin() as conn:
        conn.execute(update(ConsoleSession).where(ConsoleSession.ended_at.is_(None)).values(principal="ann"))
    with pytest.raises(webauthn.ConsoleDenied, match="changed outside the console"):
        console_auth.current_user(kms, grant.token)

    # 3. Mint a session for ann with a token of the insider's choosing.
    now = kms.now()
    with kms.engine.begin() as conn:
        conn.execute(
            insert(ConsoleSession).values(
                token_hash=__import__("hashlib").sha256(b"insider-token").hexdigest(),
                principal="ann",
                credential_id=1,
                started_at=now,
                last_seen_at=now,
                expires_at=now + timedelta(hours=1),
                mac="0" * 64,
            )
        )
    with pytest.raises(webauthn.ConsoleDenied, match="not signed in"):
        console_auth.current_user(kms, "insider-token")

    # 4. Plant a credential row for cy (the insider's own key): A2 does not count it, sign-in refuses it.
    planted = SoftAuthenticator(ORIGIN)
    from fido2.cose import ES256
    from fido2.webauthn import AttestedCredentialData

    data = AttestedCredentialData.create(
        b"\0" * 16, planted.credential_id, ES256.from_cryptography_key(planted.key.public_key())
    )
    with kms.engine.begin() as conn:  # in place of cy's own key
        conn.execute(delete(ConsoleCredential).where(ConsoleCredential.principal == "cy"))
        conn.execute(
            insert(ConsoleCredential).values(
                principal="cy",
                credential_id=planted.credential_id,
                credential_data=bytes(data),
                sign_count=0,
                registered_at=now,
                registration_link_id=0,
                mac="0" * 64,
            )
        )
    assert "cy" not in console_auth.credentials_by_principal(kms)
    assert "cy lacks fido2" in compliance.evaluate(kms, compliance.clause("A2")).evidence
    with pytest.raises(webauthn.ConsoleDenied, match="fails its integrity check"):
        _sign_in(kms, planted, "cy", devices["cy"].code())


def test_reject_closes_a_request_and_voids_its_approvals(team):
    from kms_pipelines.core.foundation.db.models_access import Approval

    kms, devices = team
    access.request_approval(kms, operation="rotate", target="root", ticket="CHG-9", requester="bo")
    approve_both(kms, "ann", ticket="CHG-9", operation="rotate", totp=devices["ann"].code(), target="root")
    (req,) = approval_requests.pending(kms)
    assert req.approvers == ["ann"] and not req.ready
    # Refused without a reason, and for a principal without 'approve' (nothing changes).
    with pytest.raises(access.AccessDenied, match="needs a reason"):
        approval_requests.reject(kms, req.id, principal="cy", note=" ")
    with pytest.raises(access.AccessDenied, match="unknown principal"):
        approval_requests.reject(kms, req.id, principal="mallory", note="no")
    assert [r.id for r in approval_requests.pending(kms)] == [req.id]

    approval_requests.reject(kms, req.id, principal="cy", note="wrong key")
    assert approval_requests.pending(kms) == []
    with kms.engine.connect() as conn:
        assert conn.execute(select(Approval.used_by_request)).scalars().all() == ["rejected:cy"]
    # The voided approval does not count: a second approver alone cannot complete it.
    approve_both(kms, "dee", ticket="CHG-9", operation="rotate", totp=devices["dee"].code(), target="root")
    with pytest.raises(access.AccessDenied, match="needs 2 approvals"):
        manual.manual_rotate(kms, "root", ticket="CHG-9", requested_by="bo", totp=devices["bo"].code())
    with pytest.raises(access.AccessDenied, match="no open manual-operation request"):
        approval_requests.reject(kms, req.id, principal="cy", note="again")
    assert _denied(kms, "approval.reject", "invalid")
