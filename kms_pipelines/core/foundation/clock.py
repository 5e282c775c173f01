"""Injectable clocks. Everything that asks "what time is it" asks one of these, so the
simulator and the tests can drive a year of policy in a minute."""

from __future__ import annotations

import threading
from datetime import UTC, datetime, timedelta
from typing import Protocol


def utc(dt: datetime) -> datetime:
    """Normalise to an aware UTC datetime (naive values are taken as UTC, as SQLite returns them)."""
    return dt.replace(tzinfo=UTC) if dt.tzinfo is None else dt.astimezone(UTC)


def parse_time(text: str) -> datetime:
    """ISO-8601 date or datetime, as UTC."""
    try:
        return utc(datetime.fromisoformat(text.replace("Z", "+00:00")))
    except ValueError:
        raise ValueError(f"not an ISO-8601 date/time: {text!r}") from None


class Clock(Protocol):
    def now(self) -> datetime: ...


class SystemClock:
    def now(self) -> datetime:
        return datetime.now(UTC)


class FixedClock:
    def __init__(self, at: datetime):
        self._at = utc(at)

    def now(self) -> datetime:
        return self._at


class SimulatedClock:
    """A clock that only moves when told to (``advance``/``set``)."""

    def __init__(self, start: datetime):
        self._now = utc(start)
        self._lock = threading.Lock()

    def now(self) -> datetime:
        return self._now

    def advance(self, delta: timedelta) -> datetime:
        with self._lock:
            self._now += delta
            return self._now

    def set(self, at: datetime) -> None:
        with self._lock:
            self._now = utc(at)
