"""Helpers for the console's browser tests: the console served by uvicorn on loopback in this
process, people with their own browser context, a virtual FIDO2 authenticator (Chromium's,
over CDP) and a TOTP device, and the dual-controlled bootstrap of their registration links.

Nothing is mocked: WebAuthn runs between Chromium's CTAP2 virtual authenticator and the
console's ``fido2`` relying party, TOTP codes come from each person's pyotp device."""

from __future__ import annotations

import re
import threading
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

import pyotp
import pytest

from kms_pipelines.core.access import console_auth
from kms_pipelines.core.ledger import audit
from tests.fixtures.kms import approve_both, enrol_direct

TICKET_PREFIX = "ONB"


class OffsetClock:
    """Wall-clock time plus an offset the test moves forward (an idle session's 15 minutes)."""

    def __init__(self):
        self.offset = timedelta(0)

    def now(self) -> datetime:
        return datetime.now(UTC) + self.offset

    def advance(self, delta: timedelta) -> None:
        self.offset += delta


class ConsoleServer:
    def __init__(self, app, port: int):
        import uvicorn

        self.server = uvicorn.Server(
            uvicorn.Config(
                app, host="127.0.0.1", port=port, log_level="warning", lifespan="off", ws="websockets-sansio"
            )
        )
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        # WebAuthn needs a secure context: http://localhost is one, http://127.0.0.1 is not.
        self.url = f"http://localhost:{port}"

    def __enter__(self):
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                pytest.fail("the console did not start", pytrace=False)
            time.sleep(0.05)
        return self

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(timeout=15)


class Totp:
    """A person's TOTP device that never offers a code for a time-step already used (the
    console, like the CLI, refuses a replayed step). When the next step is beyond the
    accepted window it moves the test clock to that step (no 30 s sleeps)."""

    def __init__(self, kms, uri: str):
        self.kms, self.device, self.last = kms, pyotp.parse_uri(uri), None

    def _step(self) -> int:
        return int(self.kms.now().timestamp()) // self.kms.policy.access.totp_interval_seconds

    def fresh(self) -> str:
        interval = self.kms.policy.access.totp_interval_seconds
        now = self._step()
        step = now if self.last is None else max(now, self.last + 1)
        if step > now + self.kms.policy.access.totp_window_steps:
            self.kms.clock.advance(timedelta(seconds=(step - now) * interval))
        self.last = step
        return self.device.at(step * interval)

    def used(self) -> str:
        """The code of the step last accepted (a replay)."""
        return self.device.at(self.last * self.kms.policy.access.totp_interval_seconds)

    def wrong(self) -> str:
        valid = {
            self.device.at((self._step() + d) * self.kms.policy.access.totp_interval_seconds) for d in (-2, -1, 0, 1, 2)
        }
        return next(c for c in (f"{n:06d}" for n in range(0, 1000000, 7919)) if c not in valid)


@dataclass
class Person:
    name: str
    roles: list[str]
    totp: Totp
    base: str
    context: object = None
    page: object = None
    cdp: object = None
    authenticator: str | None = None
    cookies: list = field(default_factory=list)

    def open(self, browser, *, authenticator: bool = True) -> Person:
        self.context = browser.new_context(base_url=self.base, viewport={"width": 1200, "height": 860})
        self.page = self.context.new_page()
        self.page.set_default_timeout(30_000)
        if authenticator:
            self.cdp = self.context.new_cdp_session(self.page)
            self.cdp.send("WebAuthn.enable")
            self.authenticator = self.cdp.send(
                "WebAuthn.addVirtualAuthenticator",
                {
                    "options": {
                        "protocol": "ctap2",
                        "transport": "usb",
                        "hasResidentKey": True,
                        "hasUserVerification": True,
                        "isUserVerified": True,
                        "automaticPresenceSimulation": True,
                    }
                },
            )["authenticatorId"]
        return self

    # -- the virtual authenticator's credentials
    def credentials(self) -> list[dict]:
        return self.cdp.send("WebAuthn.getCredentials", {"authenticatorId": self.authenticator})["credentials"]

    def replace_credential(self, credential: dict) -> None:
        self.cdp.send(
            "WebAuthn.removeCredential",
            {"authenticatorId": self.authenticator, "credentialId": credential["credentialId"]},
        )
        self.cdp.send("WebAuthn.addCredential", {"authenticatorId": self.authenticator, "credential": credential})

    # -- pages
    def register(self, url: str) -> None:
        self.page.goto(url)
        self.page.get_by_label(f"TOTP code of {self.name}").fill(self.totp.fresh())
        self.page.get_by_role("button", name="Register security key").click()
        self.page.wait_for_url(re.compile(r"/login\?m="))

    def sign_in(self, code: str | None = None, *, expect_ok: bool = True, screenshot=None) -> str:
        self.page.goto("/login")
        self.page.get_by_label("Principal name").fill(self.name)
        self.page.get_by_label("TOTP code").fill(code or self.totp.fresh())
        if screenshot:
            screenshot(self.page)
        self.page.get_by_role("button", name="Sign in with security key").click()
        if expect_ok:
            self.page.wait_for_url(f"{self.base}/")
            self.page.get_by_text("Signed in as").first.wait_for()
            return self.page.inner_text("body")
        alert = self.page.get_by_role("alert")
        alert.wait_for()
        return alert.inner_text()

    def sign_out(self) -> None:
        self.page.get_by_role("button", name="Sign out").click()
        self.page.wait_for_url(re.compile(r"/login\?m=Signed"))


def enrol(kms, name: str, role: str, base: str) -> Person:
    return Person(name, [role], Totp(kms, enrol_direct(kms, name, role)), base)


def issue_link(kms, target: Person, requester: Person, approvers: list[Person], origin: str) -> str:
    """The documented bootstrap: the request, two `kms approve` (TOTP) by other principals, the link."""
    ticket = f"{TICKET_PREFIX}-{target.name}"
    console_auth.request_registration(kms, target.name, ticket=ticket, requested_by=requester.name)
    for a in approvers:
        approve_both(
            kms,
            a.name,
            ticket=ticket,
            operation=console_auth.REGISTRATION_OPERATION,
            totp=a.totp.fresh(),
            target=target.name,
        )
    return console_auth.issue_registration_link(kms, target.name, ticket=ticket, requested_by=requester.name).url(
        origin
    )


def audit_rows(kms, operation: str, **match) -> list:
    from sqlalchemy import select

    from kms_pipelines.core.foundation.db.models_access import AuditEvent

    audit.flush(kms)
    with kms.engine.connect() as conn:
        rows = conn.execute(select(AuditEvent).where(AuditEvent.operation == operation).order_by(AuditEvent.seq)).all()
    out = []
    for r in rows:
        import json

        detail = json.loads(r.detail) if r.detail else {}
        if all((detail.get(k[7:]) if k.startswith("detail_") else getattr(r, k)) == v for k, v in match.items()):
            out.append(r)
    return out
