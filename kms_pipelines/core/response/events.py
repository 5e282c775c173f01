"""Security events (R2): compromise, CI-secret exposure, tenant rotation.

``report`` records an event against a key (validated against the policy and the
database) together with the version that was active when it was reported; the Dagster
``security_event_sensor`` turns each new event into exactly one ``compromise_response``
run (cursor = ``seq``, run key = ``security-event-<id>``); ``core/response/compromise.py`` does
the response. The HTTP intake (``serve_intake``) lets CI systems post events with a
bearer token.

Types and what the response does (documented decision):

* ``compromise``          rotate at once, **revoke** the reported version, rewrap DEKs,
                          re-issue service credentials. Allowed for every key class.
* ``ci-secret-exposure``  rotate at once, rewrap, re-issue; no revocation (the exposed
  ``tenant-rotation``     material is retired by the normal rotated → destroyed path).
                          Allowed only for classes whose policy ``rotate_immediately_on``
                          lists the type (service keys).
"""

from __future__ import annotations

import hmac
import json
import uuid
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from datetime import datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from sqlalchemy import select

from ..access import principals as access
from ..foundation.clock import utc
from ..foundation.context import KmsContext
from ..foundation.db.models_events import EVENT_NEW, EVENT_RESOLVED, EVENT_RESPONDING, SecurityEvent
from ..foundation.transports import find_key_material
from ..keys import lifecycle
from ..ledger import audit

EVENT_TYPES = ("compromise", "ci-secret-exposure", "tenant-rotation")
STATUSES = (EVENT_NEW, EVENT_RESPONDING, EVENT_RESOLVED)


class EventError(ValueError):
    """A refused security-event operation; the message names the problem. Nothing changed."""


class UnknownEvent(EventError):
    pass


@dataclass
class EventInfo:
    seq: int
    id: str
    type: str
    key: str
    key_version: int
    source: str
    detail: str
    reported_at: datetime
    reported_by: str
    status: str
    response_run_id: str | None
    resolved_at: datetime | None
    response: dict | None
    duplicate_of: str | None = None  # set by report() when an open event already covered this

    def to_dict(self) -> dict:
        return asdict(self)


# Here, not in compromise (which imports this module), so the intake needs no import of it.
def manual_operation(event_type: str) -> str:
    """The access operation a manual launch of this response needs approvals for."""
    return "revoke" if event_type == "compromise" else "rotate"


def _info(e: SecurityEvent, duplicate_of: str | None = None) -> EventInfo:
    return EventInfo(
        e.seq,
        e.id,
        e.type,
        e.key_name,
        e.key_version,
        e.source,
        e.detail,
        utc(e.reported_at),
        e.reported_by,
        e.status,
        e.response_run_id,
        utc(e.resolved_at) if e.resolved_at else None,
        e.response,
        duplicate_of,
    )


def _validate(ctx: KmsContext, type: str, key: str, source: str, detail: str) -> None:
    if type not in EVENT_TYPES:
        raise EventError(f"unknown event type {type!r}; expected one of {list(EVENT_TYPES)}")
    if not source or not source.strip() or len(source) > 200 or "\n" in source:
        raise EventError("event source must be a non-empty single line of at most 200 characters")
    if len(detail or "") > 4000:
        raise EventError("event detail is longer than 4000 characters")
    try:
        lifecycle.validate_key_name(ctx, key)
    except lifecycle.LifecycleError as exc:
        raise EventError(str(exc)) from None
    kc = ctx.policy.key_class(lifecycle.key_class_of(key))
    if type != "compromise" and type not in kc.rotate_immediately_on:
        raise EventError(
            f"{type} events apply to key classes whose policy rotates immediately on them "
            f"({lifecycle.key_class_of(key)} does not); report a compromise instead"
        )
    found = find_key_material(detail or "") or find_key_material(source)
    if found:
        raise EventError(
            f"event text contains {found} that looks like key material or a token; "
            "describe the exposure without pasting the secret"
        )


def report(
    ctx: KmsContext,
    type: str,
    key: str,
    source: str,
    detail: str = "",
    *,
    reported_by: str | None = None,
    dedupe: bool = True,
) -> EventInfo:
    """Record a security event. An open (new/responding) event of the same key and type
    reported within ``policy.events.duplicate_window_hours`` is returned instead of a new
    one (``duplicate_of`` set), so a CI system that retries does not cause two rotations."""
    _validate(ctx, type, key, source, detail or "")
    with ctx.transaction() as session:
        return _create(session, ctx, type, key, source, detail or "", reported_by=reported_by, dedupe=dedupe)


def report_by(
    ctx: KmsContext, type: str, key: str, source: str, detail: str = "", *, principal: str, totp: str | None
) -> EventInfo:
    """``kms events report``: a human reports an event. The sensor answers it without further
    approval (R2), so the reporter proves themselves by TOTP and holds what the response does:
    ``revoke`` for a compromise (the reported version is revoked), ``rotate`` otherwise
    (``manual_operation``). CI systems report through the intake under a bearer
    token instead (actor ``intake:<source>``)."""
    _validate(ctx, type, key, source, detail or "")
    with ctx.transaction() as session:
        lifecycle.get_key(session, key)  # an unknown key is named before any code is spent
    access.prove_principal(ctx, principal, totp)
    access.require_permission(ctx, principal, manual_operation(type), target=key)
    return report(ctx.as_actor(principal), type, key, source, detail, reported_by=principal)


def _create(
    session, ctx: KmsContext, type: str, key: str, source: str, detail: str, *, reported_by: str | None, dedupe: bool
) -> EventInfo:
    now = ctx.now()
    k = lifecycle.get_key(session, key, lock=True)  # unknown key -> LifecycleError (one line)
    active = lifecycle.active_version(k)
    if active is None:
        raise EventError(f"key {key!r} has no active version to respond to")
    if dedupe:
        since = now - timedelta(hours=ctx.policy.events.duplicate_window_hours)
        open_event = session.scalars(
            select(SecurityEvent)
            .where(
                SecurityEvent.key_name == key,
                SecurityEvent.type == type,
                SecurityEvent.status.in_((EVENT_NEW, EVENT_RESPONDING)),
                SecurityEvent.reported_at >= since,
            )
            .order_by(SecurityEvent.seq)
            .limit(1)
        ).first()
        if open_event is not None:
            return _info(open_event, duplicate_of=open_event.id)
    event = SecurityEvent(
        id=uuid.uuid4().hex,
        type=type,
        key_name=key,
        key_version=active.version,
        source=source.strip(),
        detail=detail,
        reported_at=now,
        reported_by=reported_by or ctx.actor,
        status=EVENT_NEW,
    )
    session.add(event)
    session.flush()
    _audit(session, ctx, "security-event.report", key, "ok", f"{type} event {event.id} from {source.strip()}")
    return _info(event)


def _audit(session, ctx: KmsContext, operation: str, target: str, outcome: str, detail: str | None) -> None:
    """Append to the audit log when the access area's audit module is present."""
    audit.record(
        session,
        at=ctx.now(),
        operation=operation,
        actor=ctx.actor,
        target=target,
        outcome=outcome,
        detail={"note": detail} if detail else None,
    )


def get(ctx: KmsContext, event_id: str) -> EventInfo:
    with ctx.transaction() as session:
        return _info(_load(session, event_id))


def _load(session, event_id: str, *, lock: bool = False) -> SecurityEvent:
    q = select(SecurityEvent).where(SecurityEvent.id == event_id)
    if lock:
        q = q.with_for_update()
    e = session.scalars(q).first()
    if e is None:
        raise UnknownEvent(f"unknown security event {event_id!r} (see `kms events list`)")
    return e


def list_events(
    ctx: KmsContext,
    *,
    status: str | Iterable[str] | None = None,
    after_seq: int = 0,
    limit: int | None = None,
    key: str | None = None,
) -> list[EventInfo]:
    q = select(SecurityEvent).where(SecurityEvent.seq > after_seq)
    if status is not None:
        statuses = [status] if isinstance(status, str) else list(status)
        bad = [s for s in statuses if s not in STATUSES]
        if bad:
            raise EventError(f"unknown status {bad}; expected {list(STATUSES)}")
        q = q.where(SecurityEvent.status.in_(statuses))
    if key is not None:
        q = q.where(SecurityEvent.key_name == key)
    q = q.order_by(SecurityEvent.seq)
    if limit is not None:
        q = q.limit(limit)
    with ctx.transaction() as session:
        return [_info(e) for e in session.scalars(q)]


def claim_new(ctx: KmsContext, event_id: str, run_id: str, *, takeover_from: str | None = None) -> EventInfo:
    """Take up a new event for ``run_id`` once: the sensor's run claims its event before it acts,
    so no other run (a copy or re-execution of it) can act as that run afterwards. The same run
    may claim again (an op retry inside it). ``takeover_from``: a run the caller has checked is
    this run's parent or root and ended without success (a ``run_retries`` retry of a lost
    sensor run); it may pass its claim on while the event is still being answered. Refused
    claims change nothing."""
    with ctx.transaction() as session:
        e = _load(session, event_id, lock=True)
        if e.response_run_id == run_id:
            return _info(e)
        if takeover_from is not None and e.response_run_id == takeover_from and e.status == EVENT_RESPONDING:
            e.response_run_id = run_id
            _audit(
                session,
                ctx,
                "security-event.takeover",
                e.key_name,
                "ok",
                f"run {run_id} carries on failed run {takeover_from}",
            )
            return _info(e)
        if e.status != EVENT_NEW or e.response_run_id is not None:
            raise EventError(
                f"security event {event_id} is {e.status} (taken up by run {e.response_run_id or '-'}); "
                "only the sensor's first run answers it without approval: launch by hand with ticket, "
                "requested_by and requester_totp"
            )
        e.status, e.response_run_id = EVENT_RESPONDING, run_id
        return _info(e)


def mark_responding(ctx: KmsContext, event_id: str, run_id: str | None) -> EventInfo:
    with ctx.transaction() as session:
        e = _load(session, event_id, lock=True)
        if e.status == EVENT_NEW:
            e.status = EVENT_RESPONDING
        if run_id:
            e.response_run_id = run_id
        return _info(e)


def mark_resolved(ctx: KmsContext, event_id: str, response: dict) -> EventInfo:
    with ctx.transaction() as session:
        e = _load(session, event_id, lock=True)
        e.status = EVENT_RESOLVED
        e.resolved_at = ctx.now()
        e.response = response
        _audit(session, ctx, "security-event.resolve", e.key_name, "ok", f"{e.type} event {e.id} resolved")
        return _info(e)


# ---- HTTP intake for CI systems ----------------------------------------------------------


def intake_token_ok(presented: str | None, expected: str) -> bool:
    if not presented or not expected:  # an empty configured token must not match an empty header
        return False
    return hmac.compare_digest(presented.encode(), expected.encode())


def make_intake_server(ctx: KmsContext, token: str, host: str = "127.0.0.1", port: int = 0):
    """A small HTTP server: ``POST /events`` with ``Authorization: Bearer <token>`` and a
    JSON body ``{"type", "key", "source", "detail"}`` -> 201 with the event (200 for a
    duplicate); 401 without the token, 400 for a refused event, 413 for a large body.
    ``serve_forever()`` it (``kms events serve``) or run it in a thread (tests)."""
    if not token or len(token) < 16:
        raise EventError("the intake needs a bearer token of at least 16 characters (KMS_EVENTS_TOKEN)")
    limit = ctx.policy.events.intake_max_body_bytes

    class Handler(BaseHTTPRequestHandler):
        def _reply(self, status: int, payload: dict) -> None:
            body = json.dumps(payload, default=str).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_POST(self):  # noqa: N802
            if self.path.rstrip("/") != "/events":
                return self._reply(404, {"error": "not found; POST /events"})
            auth = self.headers.get("Authorization", "")
            presented = auth[7:] if auth.startswith("Bearer ") else None
            if not intake_token_ok(presented, token):
                return self._reply(401, {"error": "missing or wrong bearer token"})
            try:
                length = int(self.headers.get("Content-Length") or 0)
            except ValueError:
                return self._reply(400, {"error": "bad Content-Length"})
            if length > limit:
                return self._reply(413, {"error": f"body larger than {limit} bytes"})
            try:
                data = json.loads(self.rfile.read(length) or b"{}")
                if not isinstance(data, dict):
                    raise ValueError("expected a JSON object")
                unknown = set(data) - {"type", "key", "source", "detail"}
                if unknown:
                    raise ValueError(f"unknown fields {sorted(unknown)}")
                info = report(
                    ctx.as_actor(f"intake:{data.get('source', '?')}"[:200]),
                    str(data.get("type", "")),
                    str(data.get("key", "")),
                    str(data.get("source", "")),
                    str(data.get("detail", "")),
                )
            except (ValueError, lifecycle.LifecycleError) as exc:
                return self._reply(400, {"error": str(exc)})
            return self._reply(200 if info.duplicate_of else 201, info.to_dict())

        def do_GET(self):  # noqa: N802
            if self.path.rstrip("/") == "/health":
                return self._reply(200, {"ok": True})
            return self._reply(404, {"error": "not found"})

        def log_message(self, *args):  # requests are audited, not logged with headers
            pass

    server = ThreadingHTTPServer((host, port), Handler)
    server.daemon_threads = True
    return server
