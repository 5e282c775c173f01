"""The console's principals page enrols (issue 13): the request on the Principals page, two
approvals on the Manual operations page -- each with the approver's security key *and* TOTP,
through ``access.approve`` -- and the requester's launch, which shows the TOTP URI once. Over
HTTP against the ASGI app (Starlette's test client), with the product's software authenticator;
an approval carrying a TOTP code but no key assertion is refused and changes nothing."""

from __future__ import annotations

from datetime import timedelta

import pyotp
import pytest
from sqlalchemy import select
from starlette.testclient import TestClient

from kms_pipelines.console.app import SESSION_COOKIE, ConsoleConfig, create_app
from kms_pipelines.core.access import approval_requests, console_auth
from kms_pipelines.core.foundation.clock import utc
from kms_pipelines.core.foundation.db.models_access import Approval, Principal
from tests.fixtures.kms import KEY_ORIGIN, enrol_direct, security_key


class Person:
    def __init__(self, kms, app, name, role):
        self.kms, self.name = kms, name
        self.totp = pyotp.parse_uri(enrol_direct(kms, name, role))
        self.key = security_key(kms, name)
        self.http = TestClient(app, base_url=KEY_ORIGIN, headers={"origin": KEY_ORIGIN})

    def code(self) -> str:  # one time-step later each time (the replay rule)
        self.kms.clock.advance(timedelta(seconds=self.kms.policy.access.totp_interval_seconds))
        return self.totp.at(self.kms.now())

    def sign_in(self) -> None:
        begin = self.http.post("/login/begin", json={}).json()
        r = self.http.post(
            "/login/complete",
            json={
                "name": self.name,
                "handle": begin["handle"],
                "credential": self.key.get(begin["options"]),
                "totp": self.code(),
            },
        )
        assert r.status_code == 200, r.text
        self.csrf = console_auth.csrf_token(self.http.cookies[SESSION_COOKIE])

    def confirm(self, rid: int, action: str, **body):
        """A step-up for ``action`` on request ``rid``, answered by this person's key."""
        h = {"x-csrf-token": self.csrf}
        begin = self.http.post(f"/approvals/{rid}/step-up", json={"action": action}, headers=h).json()
        return self.http.post(
            f"/approvals/{rid}/{action}",
            headers=h,
            json={"handle": begin["handle"], "credential": self.key.get(begin["options"]), **body},
        )


@pytest.fixture
def people(make_kms):
    kms = make_kms("sqlite")
    app = create_app(ConsoleConfig(kms, KEY_ORIGIN))
    out = {n: Person(kms, app, n, "security_engineering") for n in ("ann", "bo", "cy")}
    for p in out.values():
        p.sign_in()
    return kms, out


def test_enrolment_from_the_principals_page_takes_two_approvals_with_both_factors(people):
    kms, p = people
    ann, bo, cy = p["ann"], p["bo"], p["cy"]
    r = ann.http.post(
        "/principals/enrolment",
        data={"csrf": ann.csrf, "name": "fay", "roles": ["sre_oncall"], "ticket": "HR-9"},
        follow_redirects=False,
    )
    assert r.status_code == 303 and "enrolment+of+fay" in r.headers["location"]
    (rid,) = [r.id for r in approval_requests.pending(kms) if r.target == "fay=sre_oncall"]

    # TOTP without the key's assertion: refused, nothing recorded
    h = {"x-csrf-token": bo.csrf}
    r = bo.http.post(f"/approvals/{rid}/approve", headers=h, json={"totp": bo.code()})
    assert r.status_code == 400 and "security-key assertion" in r.json()["error"]
    with kms.transaction() as s:
        assert s.scalars(select(Approval)).all() == []

    for approver in (bo, cy):
        r = approver.confirm(rid, "approve", totp=approver.code())
        assert r.status_code == 200 and "principal-add of fay=sre_oncall" in r.json()["message"], r.text
    r = ann.confirm(rid, "launch", totp=ann.code())
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["link"].startswith("otpauth://totp/") and "registration link" in out["message"]
    with kms.transaction() as s:
        fay = s.scalars(select(Principal).where(Principal.name == "fay")).one()
        assert fay.roles == ["sre_oncall"] and utc(fay.approve_after) > kms.now()
    assert console_auth.missing_console_factors(kms)["fay"] == ["fido2"]  # next: her key, by a link
