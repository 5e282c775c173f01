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
from kms_pipelines.core.foundation.db.models_access import Principal
from kms_pipelines.core.foundation.db.models_console import ConsoleCredential, ConsoleSession
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


def _assert_labelled(page) -> None:
    """Every visible form control has a label (accessible name), and there is one h1."""
    unlabelled = page.evaluate("""() => [...document.querySelectorAll('input:not([type=hidden]), select, textarea')]
        .filter(e => !(e.labels && e.labels.length) && !e.getAttribute('aria-label')).map(e => e.name || e.id)""")
    assert unlabelled == [], f"{page.url}: controls without a label: {unlabelled}"
    assert page.locator("h1").count() == 1, page.url


def _state(kms):
    """What a refused sign-in must leave untouched: sessions, sign counts, TOTP steps."""
    with kms.engine.connect() as conn:
        return (
            conn.execute(select(func.count()).select_from(ConsoleSession)).scalar(),
            conn.execute(
                select(ConsoleCredential.principal, ConsoleCredential.sign_count).order_by(ConsoleCredential.id)
            ).all(),
            conn.execute(select(Principal.name, Principal.totp_last_step).order_by(Principal.name)).all(),
        )


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

        # Only notices the console wrote are shown: a crafted link cannot put text on its pages.
        alice.page.goto("/login?m=Call+the+helpdesk+at+555-0100&t=0")
        assert "555-0100" not in alice.page.inner_text("body")

        # Sign-in with both factors.
        main = alice.sign_in(screenshot=lambda p: (_assert_labelled(p), _shot(p, "console-sign-in")))
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
            serialization.Encoding.DER, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
        mallory.cdp.send(
            "WebAuthn.addCredential",
            {
                "authenticatorId": mallory.authenticator,
                "credential": {
                    "credentialId": base64.b64encode(b"not-registered-credential-id-01").decode(),
                    "isResidentCredential": True,
                    "rpId": "localhost",
                    "privateKey": base64.b64encode(pkcs8).decode(),
                    "userHandle": base64.b64encode(b"alice-user-handl").decode(),
                    "signCount": 10,
                },
            },
        )
        before = _state(kms)
        msg = mallory.sign_in(expect_ok=False)
        assert "this security key is not registered to 'alice'" in msg
        assert audit_rows(kms, "console.signin", actor="alice", outcome="denied", detail_reason="unknown_credential")
        assert _state(kms) == before
        mallory.context.close()

        # A cloned authenticator: alice's own credential with a sign count below the one seen.
        cred = alice.credentials()[0]
        with kms.engine.connect() as conn:
            seen = conn.execute(
                select(ConsoleCredential.sign_count).where(  # the browser's key, not the CLI one
                    ConsoleCredential.principal == "alice", ConsoleCredential.origin == base
                )
            ).scalar()
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


def _team(kms, base):
    """alice (security engineering), bob (SRE on call), carol (compliance), dave (security
    engineering); each registers through a dual-approved link (the CLI bootstrap)."""
    people = {
        n: enrol(kms, n, r, base)
        for n, r in (
            ("alice", "security_engineering"),
            ("bob", "sre_oncall"),
            ("carol", "compliance_officer"),
            ("dave", "security_engineering"),
        )
    }
    a, b, c, d = people.values()
    links = {
        "alice": issue_link(kms, a, requester=a, approvers=[b, c], origin=base),
        "bob": issue_link(kms, b, requester=a, approvers=[c, d], origin=base),
        "carol": issue_link(kms, c, requester=a, approvers=[b, d], origin=base),
        "dave": issue_link(kms, d, requester=a, approvers=[b, c], origin=base),
    }
    return people, links


def _request_article(page, rid: int):
    return page.get_by_role("article", name=re.compile(rf"^Request {rid}:"))


def test_dual_control_in_two_browsers_followups_and_roles(console):
    from kms_pipelines.core.access import anomalies
    from kms_pipelines.core.backup import backups as backup
    from kms_pipelines.core.backup import drills
    from kms_pipelines.core.foundation.db.models import LedgerEntry
    from kms_pipelines.core.foundation.db.models_access import Approval
    from kms_pipelines.core.ledger import ledger

    kms, clock, base = console
    chromium = chromium_path()
    people, links = _team(kms, base)
    alice, bob, carol = people["alice"], people["bob"], people["carol"]
    backup.create(kms)
    fu_title = "Rehearse the PKCS#11 token restore"
    report = drills.run_drill(kms, participants=["bob (sre)"], extra_followups=[{"owner": "carol", "title": fu_title}])
    fu_id = next(f["id"] for f in report.followups if f["title"] == fu_title)
    key = "service:api-gateway"

    with headless_chromium(chromium) as browser:
        for p in (alice, bob, carol):
            p.open(browser)
            p.register(links[p.name])
            p.sign_in()

        # bob (SRE) requests a manual rotation under a change ticket.
        bob.page.goto("/approvals")
        bob.page.get_by_label("Key").select_option(key)
        bob.page.get_by_label("Change ticket").fill("CHG-4242")
        bob.page.get_by_role("button", name="Request rotation").click()
        bob.page.get_by_text(re.compile(r"^Request \d+: manual rotation")).wait_for()
        rid = int(re.search(r"Request (\d+):", bob.page.inner_text("main")).group(1))

        # alice approves in her browser: security key (bound to this request) + fresh TOTP.
        alice.page.goto("/approvals")
        art = _request_article(alice.page, rid)
        art.get_by_label("Your TOTP code").fill(alice.totp.fresh())
        with alice.page.expect_navigation(url=f"{base}/approvals", timeout=30_000):
            art.get_by_role("button", name="Approve with security key").click()
        assert "1/2: alice" in _request_article(alice.page, rid).inner_text()
        _assert_labelled(alice.page)
        _shot(alice.page, "console-approvals")

        # A stolen session cookie (carol's) with carol's TOTP but without her key cannot approve.
        thief = browser.new_context(base_url=base)
        thief.add_cookies([c for c in carol.context.cookies() if c["name"] == SESSION_COOKIE])
        tpage = thief.new_page()
        tpage.goto("/approvals")
        csrf = tpage.locator('meta[name="csrf-token"]').get_attribute("content")
        hdr = {"X-CSRF-Token": csrf, "Origin": base}
        begin = tpage.request.post(f"{base}/approvals/{rid}/step-up", data={"action": "approve"}, headers=hdr)
        assert begin.ok, begin.text()
        with kms.engine.connect() as conn:
            approvals_before = conn.execute(select(func.count()).select_from(Approval)).scalar()
        forged = tpage.request.post(
            f"{base}/approvals/{rid}/approve",
            headers=hdr,
            data={
                "handle": begin.json()["handle"],
                "totp": carol.totp.fresh(),
                "credential": {
                    "id": "AAAA",
                    "rawId": "AAAA",
                    "type": "public-key",
                    "response": {"clientDataJSON": "e30", "authenticatorData": "AAAA", "signature": "AAAA"},
                },
            },
        )
        assert forged.status == 400 and "security-key" in forged.json()["error"]
        with kms.engine.connect() as conn:
            assert conn.execute(select(func.count()).select_from(Approval)).scalar() == approvals_before
        # refused by core's approval (the console's approvals go through access.approve), audited
        assert audit_rows(kms, "approve", actor="carol", outcome="denied")
        thief.close()

        # carol approves with her own key and a fresh TOTP.
        carol.page.goto("/approvals")
        art = _request_article(carol.page, rid)
        art.get_by_label("Your TOTP code").fill(carol.totp.fresh())
        with carol.page.expect_navigation(url=f"{base}/approvals", timeout=30_000):
            art.get_by_role("button", name="Approve with security key").click()
        assert "2/2: alice, carol" in _request_article(carol.page, rid).inner_text()

        # bob, the requester, launches it (confirmed with his key); the ledger names both approvers.
        bob.page.goto("/approvals")
        _request_article(bob.page, rid).get_by_label("Your TOTP code").fill(bob.totp.fresh())
        _request_article(bob.page, rid).get_by_role("button", name="Launch with security key").click()
        bob.page.wait_for_url(f"{base}/keys")
        with kms.engine.connect() as conn:
            entries = conn.execute(
                select(LedgerEntry).where(LedgerEntry.key_name == key, LedgerEntry.change_ticket == "CHG-4242")
            ).all()
        assert entries and all(e.approvers == '["alice","carol"]' and e.actor == "bob" for e in entries)
        assert ledger.verify(kms.engine).ok
        assert "v2" in bob.page.inner_text("main")

        # carol (compliance) closes the drill follow-up.
        carol.page.goto("/followups")
        fu = carol.page.get_by_role("article", name=re.compile(rf"^Follow-up {fu_id}:"))
        _assert_labelled(carol.page)
        _shot(carol.page, "console-followups")
        # Forged form posts with carol's cookie: no CSRF token, or another origin: 403, still open.
        no_csrf = carol.page.request.post(
            f"{base}/followups/{fu_id}/close", form={"resolution": "x"}, headers={"Origin": base}
        )
        csrf = carol.page.locator('meta[name="csrf-token"]').get_attribute("content")
        cross = carol.page.request.post(
            f"{base}/followups/{fu_id}/close",
            headers={"Origin": "https://evil.example"},
            form={"resolution": "x", "csrf": csrf},
        )
        assert no_csrf.status == 403 and "CSRF" in no_csrf.text() and cross.status == 403
        assert [f for d in drills.list_drills(kms) for f in d["followups"] if f["id"] == fu_id][0]["status"] == "open"
        fu.get_by_label("Resolution").fill("Token restore rehearsed on staging; runbook updated")
        fu.get_by_role("button", name=f"Close follow-up {fu_id}").click()
        carol.page.get_by_text(f"Follow-up {fu_id} closed").wait_for()
        closed = [f for d in drills.list_drills(kms) for f in d["followups"] if f["id"] == fu_id]
        assert closed[0]["status"] == "closed"
        assert audit_rows(kms, "drill.followup.close", actor="carol", outcome="ok")

        # Another role's page: 403, audited.
        resp = carol.page.goto("/principals")
        assert resp.status == 403 and "open to security_engineering" in carol.page.inner_text("main")
        resp = bob.page.goto("/report")
        assert resp.status == 403
        assert audit_rows(kms, "console.page", actor="carol", outcome="denied", target="principals")
        # ... and the pages of one's own role answer.
        assert carol.page.goto("/report").status == 200
        assert "A2" in carol.page.inner_text("body")
        assert alice.page.goto("/principals").status == 200
        _assert_labelled(alice.page)
        for path in ("/anomalies", "/keys", "/"):
            assert alice.page.goto(path).status == 200
            _assert_labelled(alice.page)

        # carol's refused page raised a high anomaly; alice (security) reviews it in the browser.
        anomalies.refresh_anomalies(kms)
        pending = [a for a in anomalies.unreviewed(kms) if a.principal == "carol"]
        assert pending and pending[0].kind == "operation_without_role"
        alice.page.goto("/anomalies")
        alice.page.get_by_label(f"Review note for anomaly {pending[0].id}").fill(
            "carol tried the principals page; no harm"
        )
        alice.page.get_by_label(f"Your TOTP code for anomaly {pending[0].id}").fill(alice.totp.fresh())
        alice.page.get_by_role("row", name=re.compile(rf"^{pending[0].id} ")).get_by_role(
            "button", name="Mark reviewed"
        ).click()
        alice.page.get_by_text(f"Anomaly {pending[0].id} (operation_without_role) reviewed.").wait_for()
        assert pending[0].id not in {a.id for a in anomalies.unreviewed(kms)}

        # A registration link issued entirely in the console: alice requests it for erin, bob and
        # carol approve (key + TOTP), alice launches it and hands it over; erin registers, signs in.
        erin = enrol(kms, "erin", "compliance_officer", base)
        alice.page.goto("/principals")
        alice.page.get_by_label("Principal").select_option("erin")
        alice.page.get_by_label("Change ticket").fill("ONB-erin")
        alice.page.get_by_role("button", name="Request registration link").click()
        alice.page.get_by_text(re.compile(r"^Request \d+: registration link for erin")).wait_for()
        reg_id = int(re.search(r"Request (\d+):", alice.page.inner_text("main")).group(1))
        for p in (bob, carol):
            p.page.goto("/approvals")
            art = _request_article(p.page, reg_id)
            art.get_by_label("Your TOTP code").fill(p.totp.fresh())
            with p.page.expect_navigation(url=f"{base}/approvals", timeout=30_000):
                art.get_by_role("button", name="Approve with security key").click()
        alice.page.goto("/approvals")
        _request_article(alice.page, reg_id).get_by_role("button", name="Launch with security key").click()
        issued = alice.page.locator("#issued-link code")
        issued.wait_for()
        erin.open(browser)
        erin.register(issued.inner_text())
        assert "Signed in as erin" in erin.sign_in()


def test_dagster_ui_behind_the_console(make_kms, code_location, postgres_instance, tmp_path):
    """dagster-webserver on loopback with --path-prefix /dagster, reached only through the
    console: a run's page (GraphQL over HTTP and its websocket subscription) for an SRE,
    a redirect to sign-in without a session, 403 for a role that may not operate runs."""
    import os

    import websockets.sync.client as ws_client
    from websockets.exceptions import InvalidStatus

    from tests.fixtures.dagster_defs import kms_resources, materialize_selection
    from tests.ui_support import VENV_BIN, dagster_webserver

    chromium = chromium_path()
    clock = OffsetClock()
    kms = make_kms("postgres", clock=clock)
    kms_url = kms.engine.url.render_as_string(hide_password=False)
    result = materialize_selection(
        code_location, ["key_inventory"], kms_resources(kms.home, kms_url), postgres_instance
    )
    assert result.success
    run_id = result.run_id

    env = {k: v for k, v in os.environ.items() if not k.startswith("KMS_")}
    env.update(
        {
            "KMS_HOME": str(kms.home),
            "KMS_DATABASE_URL": kms_url,
            "DAGSTER_HOME": str(tmp_path / "dagster_home"),
            "PATH": f"{VENV_BIN}:{env.get('PATH', '')}",
        }
    )
    with dagster_webserver(
        env, REPO / "test-artifacts" / "console" / "webserver.log", path_prefix="/dagster"
    ) as dagster:
        dagster.wait_ready(timeout=150)
        port = free_port()
        base = f"http://localhost:{port}"
        with ConsoleServer(create_app(ConsoleConfig(kms, base, dagster.root)), port):
            bob = enrol(kms, "bob", "sre_oncall", base)
            carol = enrol(kms, "carol", "compliance_officer", base)
            dave = enrol(kms, "dave", "security_engineering", base)
            alice = enrol(kms, "alice", "security_engineering", base)
            links = {
                "bob": issue_link(kms, bob, requester=alice, approvers=[carol, dave], origin=base),
                "carol": issue_link(kms, carol, requester=alice, approvers=[bob, dave], origin=base),
            }
            with headless_chromium(chromium) as browser:
                # No session: the UI and its GraphQL endpoint send you to sign in; the websocket is refused.
                anon = browser.new_context(base_url=base)
                page = anon.new_page()
                page.goto(f"/dagster/runs/{run_id}")
                assert "/login" in page.url and "Sign in to open the Dagster UI" in page.inner_text("main")
                resp = page.request.post(
                    f"{base}/dagster/graphql", data={"query": "{ version }"}, headers={"Origin": base}, max_redirects=0
                )
                assert resp.status == 401
                with pytest.raises(InvalidStatus) as refused:
                    ws_client.connect(
                        f"ws://localhost:{port}/dagster/graphql",
                        subprotocols=["graphql-ws"],
                        origin=base,
                        open_timeout=10,
                    )
                assert refused.value.response.status_code == 403
                anon.close()

                for p in (bob, carol):
                    p.open(browser)
                    p.context.add_init_script("window.localStorage.setItem('communityNux', JSON.stringify('1'))")
                    p.register(links[p.name])
                    p.sign_in()

                # bob (SRE on call) opens the run's page through the console.
                frames = []
                bob.page.on("websocket", lambda ws: ws.on("framereceived", lambda f: frames.append((ws.url, f))))
                bob.page.goto(f"/dagster/runs/{run_id}", wait_until="domcontentloaded")
                bob.page.get_by_text(run_id[:8]).first.wait_for(timeout=90_000)
                bob.page.get_by_text("key_inventory").first.wait_for(timeout=90_000)
                bob.page.get_by_text(re.compile("^RUN_SUCCESS$")).first.wait_for(  # streamed over the websocket
                    timeout=90_000
                )
                assert any(url.startswith(f"ws://localhost:{port}/dagster/") for url, _ in frames), frames[:3]
                _shot(bob.page, "console-dagster-run")

                # carol (compliance) may not operate runs: 403, audited.
                resp = carol.page.goto("/dagster/")
                assert resp.status == 403
                assert audit_rows(kms, "console.page", actor="carol", outcome="denied", target="dagster")
