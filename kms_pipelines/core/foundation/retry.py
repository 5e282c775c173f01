"""Riding out faults in the dependencies: which errors are transient, and bounded retries.

One classifier (``classify``) decides whether an exception is a transient fault of a
dependency -- a database failover, an S3 5xx, a dropped SMTP connection, a lost HSM
session -- or a permanent error that must surface at once. ``call`` retries a unit of work
that is safe to repeat (a compare-and-set sweep batch, one multipart part, a notification
with its idempotency key, a rotation/checkpoint/report transaction) with exponential
backoff and jitter (tenacity), bounded by a ``Budget`` from ``policy.faults``. Each retry
logs one line naming the dependency and the cause. When the budget runs out the last
error becomes ``DependencyUnavailable``: one line naming the dependency, what was done so
far and that a re-run is safe (the CLI prints it; the Dagster layer raises ``dg.Failure``).

Causes are built from exception types, SQLSTATEs, S3 error codes and SMTP reply codes,
never from ``str()`` of a database error: SQLAlchemy's text carries the statement's
parameters, which may be wrapped keys.
"""

from __future__ import annotations

import logging
import re
import smtplib
import socket
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from tenacity import (
    RetryCallState,
    Retrying,
    retry_if_exception,
    stop_after_attempt,
    stop_before_delay,
    wait_exponential_jitter,
)

from .keystore.base import KeyStoreSessionLost

log = logging.getLogger(__name__)
T = TypeVar("T")

DATABASE, OBJECT_STORE, SMTP, SLACK, HSM = "database", "object store", "SMTP server", "Slack", "HSM"


@dataclass(frozen=True)
class Budget:
    """How long one unit of work rides out a failing dependency (``policy.faults.<dependency>``)."""

    attempts: int = 6  # tries in all, the first included
    max_seconds: float = 60.0  # no new attempt starts after this long
    first_wait: float = 0.5  # seconds; doubles per retry, with jitter
    max_wait: float = 10.0  # cap on one wait

    def __post_init__(self) -> None:
        if self.attempts < 1:
            raise ValueError("retry attempts must be >= 1")
        if min(self.max_seconds, self.first_wait, self.max_wait) < 0:
            raise ValueError("retry waits and limits must be >= 0")


@dataclass(frozen=True)
class Fault:
    """A transient fault: which dependency, and a short cause safe to log."""

    dependency: str
    cause: str
    lost: bool = True  # a lost connection/session (vs. a refused-for-now request: 5xx, 4xx, deadlock)

    def phrase(self) -> str:
        return f"{self.dependency} {'connection lost' if self.lost else 'unavailable'} ({self.cause})"


class TransientFault(Exception):
    """Raised by code that knows a failure is transient but has no library exception to show
    (e.g. ``pg_dump`` exiting on a dropped connection). ``fault`` says which and why."""

    def __init__(self, fault: Fault):
        super().__init__(fault.phrase())
        self.fault = fault


class DependencyUnavailable(RuntimeError):
    """A dependency stayed down for the whole retry budget. ``str()`` is the one line users see."""

    def __init__(
        self,
        fault: Fault,
        attempts: int,
        seconds: float,
        *,
        what: str = "",
        done: str | None = None,
        rerun: str | None = None,
    ):
        self.fault, self.attempts, self.seconds, self.what = fault, attempts, seconds, what
        self.done, self.rerun = done, rerun
        super().__init__(self._line())

    def _line(self) -> str:
        head = f"{self.fault.dependency} {'connection lost' if self.fault.lost else 'unavailable'}"
        where = f" after {self.done}" if self.done else (f" during {self.what}" if self.what else "")
        tail = f"; re-run is safe: {self.rerun}" if self.rerun else "; nothing was left half-done, re-run is safe"
        return (
            f"{head}{where} (retried {max(0, self.attempts - 1)}× over {self.seconds:.0f} s; "
            f"last: {self.fault.cause}){tail}"
        )

    def annotate(self, *, done: str | None = None, rerun: str | None = None) -> DependencyUnavailable:
        """Add what the interrupted operation had finished, and the command that resumes it."""
        if done is not None and self.done is None:
            self.done = done
        if rerun is not None and self.rerun is None:
            self.rerun = rerun
        self.args = (self._line(),)
        return self

    def metadata(self) -> dict[str, Any]:
        return {
            "dependency": self.fault.dependency,
            "cause": self.fault.cause,
            "attempts": self.attempts,
            "seconds": round(self.seconds, 1),
            "done": self.done or "",
            "rerun": self.rerun or "",
        }


# ---- classification ---------------------------------------------------------------------

# 08xxx connection exception, 57P01 admin shutdown, 57P02 crash shutdown, 57P03 cannot connect
# now (starting up / recovering), 40001 serialization failure, 40P01 deadlock, 53300 too many
# connections, 55P03 lock not available.
_PG_LOST = ("57P01", "57P02", "57P03")
_PG_RETRY = ("40001", "40P01", "53300", "55P03")
_S3_CODES = {
    "SlowDown",
    "Throttling",
    "ThrottlingException",
    "RequestTimeout",
    "RequestTimeoutException",
    "InternalError",
    "ServiceUnavailable",
    "RequestLimitExceeded",
    "BandwidthLimitExceeded",
}
# libpq's words for a connection that was refused, dropped or not yet accepted (psycopg sets
# no SQLSTATE on these; "does not exist" / authentication failures are not among them).
_LIBPQ_LOST = (
    "server closed the connection",
    "terminating connection",
    "connection refused",
    "no connection to the server",
    "the database system is",
    "could not receive data",
    "could not send data",
    "ssl syscall error",
    "connection reset",
    "timeout expired",
    "connection is closed",
    "connection timed out",
    "consuming input failed",
    "connection is lost",
)


def _database(exc: BaseException) -> Fault | None:
    try:
        import psycopg  # lazy import: start-up time (optional/heavy dependency)
        from sqlalchemy import exc as sa_exc
    except ImportError:  # pragma: no cover - both are dependencies
        return None
    orig = exc
    if isinstance(exc, sa_exc.DBAPIError):
        orig = exc.orig if exc.orig is not None else exc
        if exc.connection_invalidated:
            return Fault(DATABASE, type(orig).__name__)
    elif isinstance(exc, sa_exc.TimeoutError):  # pool checkout timed out
        return Fault(DATABASE, "connection pool timeout", lost=False)
    if isinstance(orig, psycopg.Error):
        state = getattr(orig, "sqlstate", None) or ""
        name = type(orig).__name__ + (f" {state}" if state else "")
        if state.startswith("08") or state in _PG_LOST:
            return Fault(DATABASE, name)
        if state in _PG_RETRY:
            return Fault(DATABASE, name, lost=False)
        if not state and isinstance(orig, (psycopg.OperationalError, psycopg.InterfaceError)):
            phrase = _libpq_phrase(str(orig))
            if phrase:
                return Fault(DATABASE, f"{name}: {phrase}")
    return None


def _object_store(exc: BaseException) -> Fault | None:
    try:
        from botocore import exceptions as bx  # lazy import: start-up time (optional/heavy dependency)
        from urllib3 import exceptions as ux
    except ImportError:  # pragma: no cover
        return None
    if isinstance(exc, bx.ClientError):
        err = exc.response.get("Error", {}) or {}
        code = str(err.get("Code") or "")
        status = int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0)
        if status >= 500 or status == 429 or code in _S3_CODES:
            return Fault(OBJECT_STORE, f"{status or ''} {code}".strip(), lost=False)
        return None
    if isinstance(
        exc,
        (
            bx.ConnectionError,
            bx.HTTPClientError,
            bx.ResponseStreamingError,
            bx.IncompleteReadError,
            ux.ProtocolError,
            ux.ReadTimeoutError,
            ux.NewConnectionError,
        ),
    ):
        return Fault(OBJECT_STORE, type(exc).__name__)
    return None


def _smtp(exc: BaseException) -> Fault | None:
    if isinstance(exc, smtplib.SMTPResponseException) and 400 <= exc.smtp_code < 500:
        return Fault(SMTP, f"SMTP {exc.smtp_code}", lost=False)
    if isinstance(exc, (smtplib.SMTPServerDisconnected, smtplib.SMTPConnectError)):
        return Fault(SMTP, type(exc).__name__)
    return None


def _hsm(exc: BaseException) -> Fault | None:
    if isinstance(exc, KeyStoreSessionLost):
        return Fault(HSM, exc.cause)
    return None


def classify(exc: BaseException) -> Fault | None:
    """The transient fault ``exc`` is (or wraps, through ``raise … from``), else None (permanent).

    An exhausted ``DependencyUnavailable`` is never transient again: an outer unit must not
    multiply an inner unit's budget.
    """
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, DependencyUnavailable):
            return None
        if isinstance(current, TransientFault):
            return current.fault
        for probe in (_database, _object_store, _smtp, _hsm):
            fault = probe(current)
            if fault is not None:
                return fault
        if isinstance(current, (ConnectionError, socket.timeout, TimeoutError)):
            return Fault("dependency", type(current).__name__)
        current = current.__cause__ or (None if current.__suppress_context__ else current.__context__)
    return None


def _libpq_phrase(text: str) -> str | None:
    """The libpq/server words that matched, to the end of their clause ("the database system
    is shutting down"): fixed server text, never statement data."""
    low = text.lower()
    phrase = next((p for p in _LIBPQ_LOST if p in low), None)
    if phrase is None:
        return None
    tail = low[low.index(phrase) :].splitlines()[0]
    return re.split(r"[.:;(\n]", tail, maxsplit=1)[0].strip()[:80]


def dump_fault(tool: str, stderr_text: str) -> Fault | None:
    """A ``pg_dump``/``pg_restore`` exit caused by a lost server connection (libpq's messages)."""
    phrase = _libpq_phrase(stderr_text)
    return Fault(DATABASE, f"{tool}: {phrase}") if phrase else None


# ---- retrying -----------------------------------------------------------------------------


def call(
    fn: Callable[[], T],
    *,
    budget: Budget,
    what: str,
    done: Callable[[], str | None] | None = None,
    rerun: str | None = None,
) -> T:
    """Run ``fn`` (a unit that is safe to repeat); retry transient faults within ``budget``.

    A permanent error is raised at once, unchanged. When the budget runs out, raises
    ``DependencyUnavailable`` from the last error. ``done`` is called then to say what the
    operation had finished. Each retry logs one line: the unit, the dependency, the cause.
    """
    started = time.monotonic()
    last: list[Fault] = []

    def retryable(exc: BaseException) -> bool:
        fault = classify(exc)
        if fault is not None:
            last[:] = [fault]
        return fault is not None

    def before_sleep(state: RetryCallState) -> None:
        fault = last[0]
        log.warning(
            "%s: %s; retry %d of %d in %.1f s",
            what,
            fault.phrase(),
            state.attempt_number,
            budget.attempts - 1,
            state.upcoming_sleep,
        )

    retrying = Retrying(
        stop=stop_after_attempt(budget.attempts) | stop_before_delay(budget.max_seconds),
        wait=wait_exponential_jitter(initial=budget.first_wait, max=budget.max_wait, jitter=budget.first_wait),
        retry=retry_if_exception(retryable),
        before_sleep=before_sleep,
        reraise=True,
    )
    attempts = 0
    try:
        for attempt in retrying:
            with attempt:
                attempts = attempt.retry_state.attempt_number
                return fn()
    except Exception as exc:
        fault = classify(exc)
        if fault is None:
            raise
        raise DependencyUnavailable(
            fault, attempts, time.monotonic() - started, what=what, done=done() if done else None, rerun=rerun
        ) from exc
    raise AssertionError("unreachable")  # pragma: no cover


# Each engine carries the database budget of the policy it was made for (tests shrink it).
_ENGINE_BUDGETS: weakref.WeakKeyDictionary[object, Budget] = weakref.WeakKeyDictionary()


def set_engine_budget(engine: object, budget: Budget) -> None:
    _ENGINE_BUDGETS[engine] = budget


def engine_budget(engine: object) -> Budget:
    return _ENGINE_BUDGETS.get(engine) or Budget()


def db_call(
    ctx_or_engine: object,  # a KmsContext (its policy's budget) or an Engine
    fn: Callable[[], T],
    *,
    what: str,
    done: Callable[[], str | None] | None = None,
    rerun: str | None = None,
) -> T:
    """``call`` with the database budget of a KmsContext's policy (or an Engine's)."""
    policy = getattr(ctx_or_engine, "policy", None)
    budget = policy.faults.database.budget() if policy is not None else engine_budget(ctx_or_engine)
    return call(fn, budget=budget, what=what, done=done, rerun=rerun)
