"""Notifications to the compliance distribution lists (email + Slack), with a local outbox.

Policy A4: "All manual operations require dual authorization with recorded change
approvals and Slack/Email notifications to compliance distribution lists." This module
delivers those notifications and reports, per channel, whether delivery worked -- a
failure to notify is returned (and recorded in the outbox), never swallowed.

Backends (all implement ``Notifier.send(notification) -> list[DeliveryResult]``):

* ``OutboxNotifier(path)``      appends one JSON line per notification (the embedded
                                default, and always on in production so evidence
                                exists locally); ``record_delivery`` appends the
                                per-channel outcome as a second line.
* ``SmtpNotifier(...)``         stdlib smtplib; security "none" | "starttls" | "ssl".
* ``SlackWebhookNotifier(url)`` slack_sdk WebhookClient; anything but HTTP 200 fails.
* ``CompositeNotifier([...])``  sends to all; one channel failing never stops the others.

SMTP and Slack retry transient failures (connection errors, SMTP 4xx, HTTP 429/5xx)
with exponential backoff and jitter (core/foundation/retry.py, tenacity), bounded by ``RetryPolicy``
(defaults: ``policy.faults.notifications``). Permanent failures
(SMTP 5xx / auth, HTTP 4xx) are not retried.

Environment read by ``notifier_from_env(home)``:

    KMS_SMTP_HOST           SMTP server host; email is enabled when set
    KMS_SMTP_PORT           port (default 25, or 587 for starttls, 465 for ssl)
    KMS_SMTP_SENDER         From address (required when KMS_SMTP_HOST is set)
    KMS_SMTP_USER           login user (optional)
    KMS_SMTP_PASSWORD       login password (optional; requires KMS_SMTP_USER)
    KMS_SMTP_SECURITY       none | starttls | ssl (default none)
    KMS_SMTP_TIMEOUT        socket timeout in seconds (default 10)
    KMS_SLACK_WEBHOOK_URL   Slack incoming-webhook URL; Slack is enabled when set
    KMS_NOTIFY_RETRY_ATTEMPTS   attempts per delivery, including the first (default: policy faults.notifications)
    KMS_NOTIFY_RETRY_WAIT       first backoff wait in seconds, doubling (default: policy)
    KMS_NOTIFY_RETRY_MAX_WAIT   cap on one backoff wait in seconds (default: policy)

With neither SMTP nor Slack configured the result is ``OutboxNotifier(home /
"outbox.jsonl")``; otherwise a ``CompositeNotifier`` of the outbox plus the configured
channels, recording delivery outcomes in the outbox.

Key-material guard: ``Notification`` refuses subject/body/ref text holding a PEM private
key block or a long (>= 43 chars) high-entropy base64/base64url run -- the shape of a
raw 256-bit key or a bearer token. Hex runs are deliberately *not* refused: a SHA-256
fingerprint in hex is indistinguishable from a hex-encoded 256-bit key, and publishing
fingerprints is what R1 requires. So: fingerprints/hashes in hex, never base64.
"""

from __future__ import annotations

import fcntl
import functools
import itertools
import json
import logging
import math
import os
import re
import smtplib
import ssl
import uuid
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from email.message import EmailMessage
from email.utils import formatdate, make_msgid
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, TypeVar, runtime_checkable
from urllib.parse import urlsplit

from .retry import Budget, DependencyUnavailable, Fault, TransientFault
from .retry import call as retry_call

if TYPE_CHECKING:
    from .policy import FaultBudget

log = logging.getLogger(__name__)

T = TypeVar("T")
_N = TypeVar("_N", int, float)  # a number read from the environment

SECURITY_MODES = ("none", "starttls", "ssl")


class NotifyError(Exception):
    """Base class for notification errors (configuration, refused content)."""


class NotifyConfigError(NotifyError, ValueError):
    pass


class KeyMaterialRefused(NotifyError, ValueError):
    """The notification text looks like it carries key material; it is not sent."""


class _Transient(TransientFault):
    """A delivery failure worth retrying (core/foundation/retry.py's classifier sees it as transient)."""

    def __init__(self, text: str):
        super().__init__(Fault("notification channel", text, lost=False))
        self.args = (text,)


class _Permanent(Exception):
    """A delivery failure that retrying will not fix."""


# --------------------------------------------------------------------------- guard
_B64_RUN = re.compile(r"[A-Za-z0-9+/_-]{43,}={0,2}")
_HEX = re.compile(r"[0-9a-fA-F]+")
_PEM_PRIVATE = re.compile(r"-----BEGIN [A-Z0-9 ]*PRIVATE KEY-----")
_ENTROPY_BITS = 4.2  # random base64 of 43+ chars measures ~4.7-5.3 bits/char; prose/paths < 4


_CLASS_CHANGE_RATIO = 0.4


def _class_changes(s: str) -> float:
    s = re.sub(r"[/+_-]", "", s)  # path/identifier separators don't count as switches
    cls = ["u" if c.isupper() else "l" if c.islower() else "d" if c.isdigit() else "o" for c in s]
    return sum(a != b for a, b in itertools.pairwise(cls)) / max(1, len(s) - 1)


def _entropy(s: str) -> float:
    n = len(s)
    return -sum(c / n * math.log2(c / n) for c in Counter(s).values())


def find_key_material(text: str) -> str | None:
    """Describe (without echoing it) the first key-like run in ``text``, or None."""
    if _PEM_PRIVATE.search(text):
        return "a PEM private key block"
    for m in _B64_RUN.finditer(text):
        run = m.group(0).rstrip("=")
        if _HEX.fullmatch(run):
            continue  # hashes and fingerprints are published in hex on purpose
        if not (re.search(r"[A-Z]", run) and re.search(r"[a-z]", run) and re.search(r"[0-9]", run)):
            continue
        # Random base64 switches character class (upper/lower/digit) at ~65% of positions
        # and has high symbol entropy; CamelCase identifiers and paths switch at word
        # boundaries only (~10-25%). Both tests must agree before we refuse.
        if _class_changes(run) >= _CLASS_CHANGE_RATIO and _entropy(run) >= _ENTROPY_BITS:
            return f"a {len(m.group(0))}-character base64-like run at offset {m.start()}"
    return None


def check_no_key_material(**fields: str | None) -> None:
    for name, text in fields.items():
        if not text:
            continue
        found = find_key_material(text)
        if found:
            raise KeyMaterialRefused(
                f"notification {name} contains {found} that looks like key material or a token; "
                "refusing to send (publish fingerprints as hex, never keys)"
            )


# --------------------------------------------------------------------------- model
_EMAIL = re.compile(r"[^@\s,<>\"']+@[^@\s,<>\"']+")


def _utcnow() -> datetime:
    return datetime.now(UTC)


@dataclass
class Notification:
    subject: str
    body: str
    recipients: list[str] = field(default_factory=list)  # email addresses
    slack_channels: list[str] = field(default_factory=list)  # "#kms-compliance"
    severity: str = "info"  # info | notice | warning | error | critical (any lower-case word)
    kind: str = "generic"  # e.g. manual_rotation, compromise_response, drill_report
    ref: str | None = None  # ticket / run id / key ref the notification is about
    id: str = field(default_factory=lambda: uuid.uuid4().hex)
    created_at: datetime = field(default_factory=_utcnow)

    def __post_init__(self) -> None:
        if not isinstance(self.subject, str) or not self.subject.strip():
            raise ValueError("notification subject must be a non-empty string")
        if "\r" in self.subject or "\n" in self.subject:
            raise ValueError("notification subject must be a single line")
        if not isinstance(self.body, str):
            raise ValueError("notification body must be a string")
        self.recipients = list(self.recipients)
        self.slack_channels = list(self.slack_channels)
        for r in self.recipients:
            if not isinstance(r, str) or not _EMAIL.fullmatch(r):
                raise ValueError(f"not an email address: {r!r}")
        for c in self.slack_channels:
            if not isinstance(c, str) or not re.fullmatch(r"[#@]?[\w.-]{1,80}", c):
                raise ValueError(f"not a Slack channel name: {c!r}")
        if not re.fullmatch(r"[a-z]+", self.severity or ""):
            raise ValueError(f"severity must be a lower-case word, got {self.severity!r}")
        if not re.fullmatch(r"[\w.:-]+", self.kind or ""):
            raise ValueError(f"kind must be an identifier, got {self.kind!r}")
        if self.ref is not None and ("\r" in self.ref or "\n" in self.ref):
            raise ValueError("notification ref must be a single line")
        check_no_key_material(subject=self.subject, body=self.body, ref=self.ref)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["created_at"] = self.created_at.isoformat()
        return d


@dataclass(frozen=True)
class DeliveryResult:
    channel: str  # "outbox" | "email" | "slack"
    ok: bool
    error: str | None = None
    target: str = ""  # outbox path, smtp host:port, Slack channel -- never a secret
    attempts: int = 0
    skipped: bool = False  # nothing to deliver on this channel (e.g. no recipients)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def failures(results: Iterable[DeliveryResult]) -> list[DeliveryResult]:
    return [r for r in results if not r.ok]


@runtime_checkable
class Notifier(Protocol):
    def send(self, notification: Notification) -> list[DeliveryResult]: ...


@dataclass(frozen=True)
class RetryPolicy:
    """A delivery's retry budget (defaults: ``policy.faults.notifications``); the retrying
    itself is core/foundation/retry.py's, shared with the database and the object store."""

    attempts: int = 4  # total tries, including the first
    initial_wait: float = 1.0  # seconds; doubles each retry, plus jitter
    max_wait: float = 30.0
    max_seconds: float = 60.0  # no new attempt after this long

    def __post_init__(self) -> None:
        if self.attempts < 1:
            raise NotifyConfigError("retry attempts must be >= 1")
        if self.initial_wait < 0 or self.max_wait < 0 or self.max_seconds < 0:
            raise NotifyConfigError("retry waits must be >= 0")

    @classmethod
    def from_policy(cls, budget: FaultBudget) -> RetryPolicy:
        """From a ``policy.faults.notifications`` block."""
        return cls(budget.attempts, budget.first_wait_seconds, budget.max_wait_seconds, budget.max_seconds)

    def budget(self) -> Budget:
        return Budget(self.attempts, self.max_seconds, self.initial_wait, self.max_wait)


def _deliver_with_retry(
    policy: RetryPolicy,
    fn: Callable[[], T],
    what: str = "notification delivery",
) -> tuple[int, str | None, T | None]:
    """Run ``fn`` under the retry policy. Returns (attempts, error or None, fn's result).
    The notification carries its id (idempotency key), so a repeated delivery is recognisable."""
    attempts = 0

    def attempt() -> T:
        nonlocal attempts
        attempts += 1
        return fn()

    try:
        result = retry_call(attempt, budget=policy.budget(), what=what)
        return attempts, None, result
    except DependencyUnavailable as exc:
        return attempts, f"gave up after {attempts}: {exc.__cause__ or exc.fault.cause}", None
    except _Permanent as exc:
        return attempts, f"permanent failure on attempt {attempts}: {exc}", None
    except Exception as exc:  # a bug or an unexpected library error: still a visible failure
        return attempts, f"unexpected {type(exc).__name__}: {exc}", None


# --------------------------------------------------------------------------- outbox
class OutboxNotifier:
    """Append-only JSON-lines outbox. Lines: {"type": "notification", ...} and
    {"type": "delivery", "notification_id": ..., "results": [...]}."""

    channel = "outbox"

    def __init__(self, path: str | os.PathLike[str]):
        self.path = Path(path)

    def __repr__(self) -> str:
        return f"OutboxNotifier({str(self.path)!r})"

    def _append(self, record: dict[str, Any]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        line = (json.dumps(record, sort_keys=True, default=str) + "\n").encode("utf-8")
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)  # whole lines even with concurrent writers
            os.write(fd, line)
            os.fsync(fd)
        finally:
            os.close(fd)

    def send(self, notification: Notification) -> list[DeliveryResult]:
        try:
            self._append({"type": "notification", **notification.to_dict()})
        except OSError as exc:
            return [DeliveryResult("outbox", False, f"cannot append to {self.path}: {exc}", str(self.path), 1)]
        return [DeliveryResult("outbox", True, None, str(self.path), 1)]

    def record_delivery(self, notification: Notification, results: Sequence[DeliveryResult]) -> None:
        self._append(
            {
                "type": "delivery",
                "notification_id": notification.id,
                "at": _utcnow().isoformat(),
                "ok": all(r.ok for r in results),
                "results": [r.to_dict() for r in results],
            }
        )

    def read(self) -> list[dict[str, Any]]:
        if not self.path.exists():
            return []
        with open(self.path, encoding="utf-8") as f:
            return [json.loads(line) for line in f if line.strip()]


# --------------------------------------------------------------------------- smtp
class SmtpNotifier:
    channel = "email"

    def __init__(
        self,
        host: str,
        port: int | None = None,
        sender: str = "",
        username: str | None = None,
        password: str | None = None,
        security: str = "none",
        timeout: float = 10.0,
        *,
        retry: RetryPolicy = RetryPolicy(),
        ssl_context: ssl.SSLContext | None = None,
    ):
        if security not in SECURITY_MODES:
            raise NotifyConfigError(f"SMTP security must be one of {SECURITY_MODES}, got {security!r}")
        if not host:
            raise NotifyConfigError("SMTP host is required")
        if not sender or not _EMAIL.fullmatch(sender):
            raise NotifyConfigError(f"SMTP sender must be an email address, got {sender!r}")
        if password and not username:
            raise NotifyConfigError("SMTP password given without a username")
        self.host = host
        self.port = int(port) if port else {"none": 25, "starttls": 587, "ssl": 465}[security]
        self.sender = sender
        self.username = username
        self._password = password
        self.security = security
        self.timeout = timeout
        self.retry = retry
        self.ssl_context = ssl_context

    def __repr__(self) -> str:  # never the password
        return f"SmtpNotifier({self.host}:{self.port}, security={self.security!r}, sender={self.sender!r})"

    @property
    def target(self) -> str:
        return f"smtp://{self.host}:{self.port}"

    def build_message(self, n: Notification) -> EmailMessage:
        msg = EmailMessage()
        msg["Subject"] = f"[KMS {n.severity.upper()}] {n.subject}"
        msg["From"] = self.sender
        msg["To"] = ", ".join(n.recipients)
        msg["Date"] = formatdate(usegmt=True)
        msg["Message-ID"] = make_msgid(domain=self.sender.rsplit("@", 1)[1])
        msg["X-KMS-Notification-Id"] = n.id
        msg["X-KMS-Kind"] = n.kind
        msg["X-KMS-Severity"] = n.severity
        if n.ref:
            msg["X-KMS-Ref"] = n.ref
        footer = f"\n\n--\nkind: {n.kind}\nseverity: {n.severity}\n"
        if n.ref:
            footer += f"ref: {n.ref}\n"
        footer += f"notification id: {n.id}\nsent by kms-pipelines at {n.created_at.isoformat()}\n"
        msg.set_content(n.body + footer)
        return msg

    def _deliver(self, msg: EmailMessage, recipients: list[str]) -> dict[str, Any]:
        ctx = self.ssl_context or ssl.create_default_context()
        try:
            if self.security == "ssl":
                smtp: smtplib.SMTP = smtplib.SMTP_SSL(self.host, self.port, timeout=self.timeout, context=ctx)
            else:
                smtp = smtplib.SMTP(self.host, self.port, timeout=self.timeout)
            with smtp:
                smtp.ehlo()
                if self.security == "starttls":
                    smtp.starttls(context=ctx)
                    smtp.ehlo()
                if self.username:
                    smtp.login(self.username, self._password or "")
                return smtp.send_message(msg, from_addr=self.sender, to_addrs=recipients)
        except (smtplib.SMTPAuthenticationError, smtplib.SMTPNotSupportedError, ssl.SSLCertVerificationError) as exc:
            raise _Permanent(f"{type(exc).__name__}: {exc}") from exc
        except smtplib.SMTPRecipientsRefused as exc:
            raise _Permanent(f"all recipients refused: {sorted(exc.recipients)}") from exc
        except smtplib.SMTPResponseException as exc:
            text = f"SMTP {exc.smtp_code} {exc.smtp_error!r}"
            if 400 <= exc.smtp_code < 500:
                raise _Transient(text) from exc
            raise _Permanent(text) from exc
        except (smtplib.SMTPException, OSError) as exc:  # disconnects, refused, timeouts, TLS
            raise _Transient(f"{type(exc).__name__}: {exc} ({self.target})") from exc

    def send(self, notification: Notification) -> list[DeliveryResult]:
        if not notification.recipients:
            return [DeliveryResult("email", True, None, self.target, 0, skipped=True)]
        msg = self.build_message(notification)
        attempts, error, refused = _deliver_with_retry(
            self.retry,
            lambda: self._deliver(msg, notification.recipients),
            f"email {notification.id} via {self.target}",
        )
        if error is None and refused:
            error = f"refused recipients: {sorted(refused)}"  # partial delivery is still a failure
        if error:
            log.warning("email notification %s via %s failed: %s", notification.id, self.target, error)
        return [DeliveryResult("email", error is None, error, self.target, attempts)]


# --------------------------------------------------------------------------- slack
_SEVERITY_EMOJI = {
    "info": ":information_source:",
    "notice": ":memo:",
    "warning": ":warning:",
    "error": ":x:",
    "critical": ":rotating_light:",
}


class SlackWebhookNotifier:
    """Posts to a Slack incoming webhook. With ``slack_channels`` set, one post per channel
    carrying ``"channel"`` (honoured by legacy webhooks; app webhooks post to their own
    channel); with none, one post to the webhook's channel."""

    channel = "slack"

    def __init__(self, webhook_url: str, *, retry: RetryPolicy = RetryPolicy(), timeout: int = 10):
        parts = urlsplit(webhook_url or "")
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise NotifyConfigError("Slack webhook URL must be an http(s) URL")
        from slack_sdk.webhook import WebhookClient  # lazy import: start-up time (optional/heavy dependency)

        self._url = webhook_url
        self._host = parts.netloc.rsplit("@", 1)[-1]
        self.retry = retry
        # retry_handlers=[]: tenacity is the one retry layer, so attempts are counted once
        self._client = WebhookClient(webhook_url, timeout=timeout, retry_handlers=[])

    def __repr__(self) -> str:  # the URL is a credential
        return f"SlackWebhookNotifier(host={self._host!r})"

    def _redact(self, text: str) -> str:
        return text.replace(self._url, f"<webhook {self._host}>")

    @staticmethod
    def payload(n: Notification, channel: str | None) -> dict[str, Any]:
        emoji = _SEVERITY_EMOJI.get(n.severity, ":bell:")
        body = n.body if len(n.body) <= 2900 else n.body[:2900] + "\n…(truncated; full text in email/outbox)"
        context = (
            f"kind `{n.kind}` · severity `{n.severity}`" + (f" · ref `{n.ref}`" if n.ref else "") + f" · id `{n.id}`"
        )
        p: dict[str, Any] = {
            "text": f"{emoji} [KMS {n.severity.upper()}] {n.subject}",
            "blocks": [
                {"type": "header", "text": {"type": "plain_text", "text": f"[KMS] {n.subject}"[:150]}},
                {"type": "section", "text": {"type": "mrkdwn", "text": body or " "}},
                {"type": "context", "elements": [{"type": "mrkdwn", "text": context}]},
            ],
        }
        if channel:
            p["channel"] = channel
        return p

    def _post(self, payload: dict[str, Any]) -> None:
        try:
            resp = self._client.send_dict(payload)
        except Exception as exc:  # URLError, timeouts, connection resets
            raise _Transient(self._redact(f"{type(exc).__name__}: {exc}")) from exc
        if resp.status_code == 200:
            return
        text = self._redact(f"HTTP {resp.status_code}: {str(resp.body)[:200]}")
        if resp.status_code == 429 or resp.status_code >= 500:
            raise _Transient(text)
        raise _Permanent(text)

    def send(self, notification: Notification) -> list[DeliveryResult]:
        results = []
        channels: list[str | None] = [*notification.slack_channels] or [None]  # None: the webhook's own channel
        for ch in channels:
            payload = self.payload(notification, ch)
            attempts, error, _ = _deliver_with_retry(
                self.retry, functools.partial(self._post, payload), f"Slack {notification.id} to {ch or 'webhook'}"
            )
            if error:
                log.warning("Slack notification %s to %s failed: %s", notification.id, ch or "webhook", error)
            results.append(DeliveryResult("slack", error is None, error, ch or f"webhook@{self._host}", attempts))
        return results


# --------------------------------------------------------------------------- composite
class CompositeNotifier:
    """Send to every notifier in turn; a raising or failing channel never stops the rest.
    With ``record_to``, the collected results are appended to that outbox."""

    def __init__(self, notifiers: Sequence[Notifier], *, record_to: OutboxNotifier | None = None):
        self.notifiers = list(notifiers)
        self.record_to = record_to

    def __repr__(self) -> str:
        return f"CompositeNotifier({self.notifiers!r})"

    def send(self, notification: Notification) -> list[DeliveryResult]:
        results: list[DeliveryResult] = []
        for nt in self.notifiers:
            try:
                results.extend(nt.send(notification))
            except Exception as exc:
                results.append(
                    DeliveryResult(
                        getattr(nt, "channel", type(nt).__name__), False, f"unexpected {type(exc).__name__}: {exc}"
                    )
                )
        if self.record_to is not None:
            try:
                self.record_to.record_delivery(notification, results)
            except OSError as exc:
                results.append(
                    DeliveryResult("outbox", False, f"cannot record delivery: {exc}", str(self.record_to.path))
                )
        return results


# --------------------------------------------------------------------------- factory
def notifier_from_env(home: Path, env: Mapping[str, str] = os.environ, *, retry: FaultBudget | None = None) -> Notifier:
    """Build the notifier from ``KMS_*`` variables (see module docstring). ``retry`` is the
    policy's ``faults.notifications`` block; the ``KMS_NOTIFY_RETRY_*`` variables override it."""
    home = Path(home)
    outbox = OutboxNotifier(home / "outbox.jsonl")

    def num(name: str, default: _N, conv: Callable[[str], _N]) -> _N:
        raw = env.get(name)
        if raw is None or raw == "":
            return default
        try:
            return conv(raw)
        except ValueError:
            raise NotifyConfigError(f"{name} must be a number, got {raw!r}") from None

    base = RetryPolicy.from_policy(retry) if retry is not None else RetryPolicy()
    retry_policy = RetryPolicy(
        attempts=num("KMS_NOTIFY_RETRY_ATTEMPTS", base.attempts, int),
        initial_wait=num("KMS_NOTIFY_RETRY_WAIT", base.initial_wait, float),
        max_wait=num("KMS_NOTIFY_RETRY_MAX_WAIT", base.max_wait, float),
        max_seconds=base.max_seconds,
    )
    channels: list[Notifier] = []
    host = env.get("KMS_SMTP_HOST", "").strip()
    if host:
        security = (env.get("KMS_SMTP_SECURITY") or "none").strip().lower()
        if security not in SECURITY_MODES:
            raise NotifyConfigError(f"KMS_SMTP_SECURITY must be one of {SECURITY_MODES}, got {security!r}")
        sender = (env.get("KMS_SMTP_SENDER") or "").strip()
        if not sender:
            raise NotifyConfigError("KMS_SMTP_SENDER is required when KMS_SMTP_HOST is set")
        channels.append(
            SmtpNotifier(
                host,
                num("KMS_SMTP_PORT", 0, int) or None,
                sender,
                username=env.get("KMS_SMTP_USER") or None,
                password=env.get("KMS_SMTP_PASSWORD") or None,
                security=security,
                timeout=num("KMS_SMTP_TIMEOUT", 10.0, float),
                retry=retry_policy,
            )
        )
    webhook = (env.get("KMS_SLACK_WEBHOOK_URL") or "").strip()
    if webhook:
        channels.append(SlackWebhookNotifier(webhook, retry=retry_policy))
    if not channels:
        return outbox
    return CompositeNotifier([outbox, *channels], record_to=outbox)


__all__ = [
    "CompositeNotifier",
    "DeliveryResult",
    "KeyMaterialRefused",
    "Notification",
    "Notifier",
    "NotifyConfigError",
    "NotifyError",
    "OutboxNotifier",
    "RetryPolicy",
    "SlackWebhookNotifier",
    "SmtpNotifier",
    "check_no_key_material",
    "failures",
    "find_key_material",
    "notifier_from_env",
]
