"""The KMS console in a real browser (issue 13): Debian's Chromium through Playwright, with
Chromium's CTAP2 virtual authenticator (user verification, resident keys) over CDP, against
the console served by uvicorn on loopback and the KMS state on PostgreSQL.

Sign-in needs the security key *and* a TOTP code; each refusal (wrong or replayed TOTP, an
unknown credential, a cloned authenticator, an expired session) is shown to the user,
audited, and changes nothing. Screenshots of the sign-in, approvals and follow-ups pages go
to docs/screenshots/ (the README shows them)."""

from __future__ import annotations

import base64
import re
from datetime import timedelta
from pathlib import Path

import pytest
from sqlalchemy import func, select

from kms_pipelines.console.app import SESSION_COOKIE, ConsoleConfig, create_app
from kms_pipelines.core.db.models_access import Principal
from kms_pipelines.core.db.models_console import ConsoleCredential, ConsoleSession
from tests.console_support import ConsoleServer, OffsetClock, audit_rows, enrol, issue_link
from tests.ui_support import REPO, chromium_path, free_port, headless_chromium

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

SCREENSHOTS = REPO / "docs" / "screenshots"


def _shot(page, name: str) -> Path:
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    path = SCREENSHOTS / f"{name}.png"
    page.screenshot(path=str(path), full_page=True)
    return path


@pytest.fixture
def console(make_kms):
    """(kms, clock, base url, app factory) on PostgreSQL, wall-clock time plus a movable offset."""
    clock = OffsetClock()
    kms = make_kms("postgres", clock=clock)
    port = free_port()
    base = f"http://localhost:{port}"
    with ConsoleServer(create_app(ConsoleConfig(kms, base)), port) as server:
        yield kms, clock, server.url


def _state(kms):
    """What a refused sign-in must leave untouched: sessions, sign counts, TOTP steps."""
    with kms.engine.connect() as conn:
        return (conn.execute(select(func.count()).select_from(ConsoleSession)).scalar(),
                conn.execute(select(ConsoleCredential.principal, ConsoleCredential.sign_count)
                             .order_by(ConsoleCredential.id)).all(),
                conn.execute(select(Principal.name, Principal.totp_last_step).order_by(Principal.name)).all())


def test_register_then_sign_in_and_every_refusal(console):
    kms, clock, base = console
    chromium = chromium_path()
    alice = enrol(kms, "alice", "security_engineering", base)
    bob = enrol(kms, "bob", "sre_oncall", base)
    carol = enrol(kms, "carol", "compliance_officer", base)
    link = issue_link(kms, alice, requester=alice, approvers=[bob, carol], origin=base)

    with headless_chromium(chromium) as browser:
        alice.open(browser)
        # Registration: the dual-approved link, the key (UV) and alice's TOTP.
        alice.register(link)
        assert len(alice.credentials()) == 1
        assert audit_rows(kms, "console.register", actor="alice", outcome="ok")
        # The link is single-use.
        alice.page.goto(link)
        assert "already used" in alice.page.get_by_role("alert").inner_text()

        # Sign-in with both factors.
        main = alice.sign_in(screenshot=lambda p: _shot(p, "console-sign-in"))
        assert "Signed in as alice" in main and "Manual operations" in main
        cookie = next(c for c in alice.context.cookies() if c["name"] == SESSION_COOKIE)
        assert cookie["httpOnly"] and cookie["secure"] and cookie["sameSite"] == "Strict"
        ok = audit_rows(kms, "console.signin", actor="alice", outcome="ok")
        assert len(ok) == 1 and '"fido2"' in ok[0].detail and '"totp"' in ok[0].detail
        alice.sign_out()

        # Wrong TOTP: refused, audited, nothing changed.
        before = _state(kms)
        msg = alice.sign_in(alice.totp.wrong(), expect_ok=False)
        assert "TOTP code for 'alice' is wrong or stale" in msg
        assert audit_rows(kms, "console.signin", actor="alice", outcome="denied", detail_reason="totp")
        assert _state(kms)[0] == before[0] and _state(kms)[2] == before[2]

        # Replayed TOTP: the code alice signed in with a moment ago.
        alice.sign_in()
        alice.sign_out()
        before = _state(kms)
        msg = alice.sign_in(alice.totp.used(), expect_ok=False)
        assert "already used (replayed code refused)" in msg
        assert audit_rows(kms, "console.signin", actor="alice", outcome="denied", detail_reason="totp_replay")
        assert _state(kms)[0] == before[0] and _state(kms)[2] == before[2]

        # An unknown credential: a key never registered (resident, for localhost) in another browser.
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric import ec

        mallory = enrol.__globals__["Person"]("alice", ["security_engineering"], alice.totp, base).open(browser)
        pkcs8 = ec.generate_private_key(ec.SECP256R1()).private_bytes(
            serialization.Encoding.DER, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
        mallory.cdp.send("WebAuthn.addCredential", {"authenticatorId": mallory.authenticator, "credential": {
            "credentialId": base64.b64encode(b"not-registered-credential-id-01").decode(), "isResidentCredential": True,
            "rpId": "localhost", "privateKey": base64.b64encode(pkcs8).decode(),
            "userHandle": base64.b64encode(b"alice-user-handl").decode(), "signCount": 10}})
        before = _state(kms)
        msg = mallory.sign_in(expect_ok=False)
        assert "this security key is not registered to 'alice'" in msg
        assert audit_rows(kms, "console.signin", actor="alice", outcome="denied", detail_reason="unknown_credential")
        assert _state(kms) == before
        mallory.context.close()

        # A cloned authenticator: alice's own credential with a sign count below the one seen.
        cred = alice.credentials()[0]
        with kms.engine.connect() as conn:
            seen = conn.execute(select(ConsoleCredential.sign_count)).scalar()
        assert seen >= 2
        alice.replace_credential({**cred, "signCount": 0})
        before = _state(kms)
        msg = alice.sign_in(expect_ok=False)
        assert "sign count did not grow" in msg and "cloned authenticator" in msg
        assert audit_rows(kms, "console.signin", actor="alice", outcome="denied", detail_reason="sign_count")
        assert _state(kms)[:2] == before[:2]

        # The genuine key (its counter ahead again) signs in; then the session idles out.
        alice.replace_credential({**cred, "signCount": seen + 5})
        alice.sign_in()
        clock.advance(timedelta(minutes=kms.policy.console.session_idle_minutes, seconds=1))
        alice.page.goto("/approvals")
        alice.page.wait_for_url(re.compile(r"/login\?m="))
        assert "without activity" in alice.page.inner_text("main")
        assert audit_rows(kms, "console.session", actor="alice", outcome="denied", detail_reason="session_expired")
        # The expired cookie opens nothing, not even once more.
        resp = alice.page.request.get(f"{base}/keys", max_redirects=0)
        assert resp.status == 303 and "/login" in resp.headers["location"]
        alice.context.close()
