"""The ObjectStore protocol: where archives, manifests and write-once evidence live.

Two backends implement it with the same semantics (one contract test suite runs
against both):

* ``LocalObjectStore`` (``local.py``) -- files under a directory; the embedded default.
* ``S3ObjectStore`` (``s3.py``) -- an S3 bucket with Object Lock (COMPLIANCE mode).

Semantics every backend honours:

* Keys are relative, ``/``-separated names (``backups/2026-01-01/archive.age``). No
  leading ``/``, no empty, ``.`` or ``..`` segments, no backslashes or NUL bytes.
* ``put`` streams a file-like body in bounded chunks (memory stays flat for
  multi-GB archives) and returns the object's ``ObjectInfo`` including the SHA-256 of
  the bytes written. A put that fails half-way leaves **no visible object**.
* ``put(..., retain_until=dt)`` makes the object write-once until ``dt``: ``delete``
  refuses with ``ObjectLocked`` and a second ``put`` to the same key refuses too
  (evidence is never silently superseded). ``dt`` must be timezone-aware and in the
  future.
* ``delete`` is permanent (on a versioned S3 bucket it removes the object's versions,
  not just hides them behind a delete marker).
* Errors are ``ObjectStoreError`` subclasses with messages naming the key, bucket or
  endpoint concerned.
"""

from __future__ import annotations

import io
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import BinaryIO, Protocol, runtime_checkable

Body = bytes | bytearray | memoryview | BinaryIO

#: Chunk size used when copying streams (local store, hashing).
COPY_CHUNK = 1024 * 1024

LOCK_MODE_COMPLIANCE = "COMPLIANCE"


class ObjectStoreError(Exception):
    """Base class of every object-store failure."""


class InvalidKey(ObjectStoreError, ValueError):
    """The object key is not a safe relative name."""


class InvalidObjectStoreURL(ObjectStoreError, ValueError):
    """``objectstore_from_url`` could not make sense of the URL."""


class ObjectNotFound(ObjectStoreError, KeyError):
    def __init__(self, key: str, where: str = ""):
        self.key = key
        self.where = where
        super().__init__(f"object not found: {key!r}" + (f" in {where}" if where else ""))

    def __str__(self) -> str:  # KeyError would repr() the message otherwise
        return str(self.args[0])


class ObjectLocked(ObjectStoreError):
    """The object is under retention (WORM) and may not be deleted or replaced yet."""

    def __init__(self, key: str, retain_until: datetime | None, action: str = "delete", where: str = ""):
        self.key = key
        self.retain_until = retain_until
        self.action = action
        until = retain_until.isoformat() if retain_until else "an unknown date"
        super().__init__(
            f"refusing to {action} {key!r}"
            + (f" in {where}" if where else "")
            + f": object is locked (retention) until {until}"
        )


class ObjectStoreUnreachable(ObjectStoreError):
    """The store cannot be reached, or its bucket/root does not exist."""


class ObjectLockNotEnabled(ObjectStoreError):
    """A retained (WORM) write was asked of a bucket that has no Object Lock."""


@dataclass(frozen=True)
class ObjectInfo:
    key: str
    size: int
    etag: str | None = None  # S3 ETag without quotes ("<md5>-<parts>" for multipart); local: sha256
    sha256: str | None = None  # hex SHA-256 of the content when the backend knows it
    last_modified: datetime | None = None
    retain_until: datetime | None = None
    lock_mode: str | None = None  # "COMPLIANCE" when locked
    metadata: Mapping[str, str] = field(default_factory=dict)
    content_type: str | None = None
    version_id: str | None = None

    def locked_at(self, now: datetime | None = None) -> bool:
        """True while a retention lock is in force at ``now`` (default: current UTC time)."""
        if self.retain_until is None:
            return False
        now = now or datetime.now(UTC)
        return self.retain_until > now


@runtime_checkable
class ObjectStore(Protocol):
    """What the rest of kms_pipelines may ask of object storage."""

    def put(
        self,
        key: str,
        data: Body,
        *,
        retain_until: datetime | None = None,
        content_type: str | None = None,
        metadata: dict[str, str] | None = None,
    ) -> ObjectInfo: ...

    def open(self, key: str) -> BinaryIO:
        """A streaming reader over the object's content. Close it when done."""

    def get_bytes(self, key: str) -> bytes: ...

    def head(self, key: str) -> ObjectInfo: ...

    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        """Objects whose key starts with ``prefix`` (a string prefix, as in S3), sorted by key."""

    def exists(self, key: str) -> bool: ...

    def delete(self, key: str) -> None:
        """Delete permanently; ``ObjectLocked`` while retention is in force, ``ObjectNotFound``
        if there is no such object."""

    def url(self, key: str) -> str:
        """A human-readable location (``s3://bucket/key``, ``file:///path``) for display."""


_BAD_SEGMENTS = {"", ".", ".."}
_CTRL = re.compile(r"[\x00-\x1f\x7f\\]")


def validate_key(key: str) -> str:
    """Return ``key`` if it is a safe relative object name, else raise ``InvalidKey``."""
    if not isinstance(key, str) or not key:
        raise InvalidKey(f"object key must be a non-empty string, got {key!r}")
    if len(key.encode("utf-8")) > 1024:
        raise InvalidKey(f"object key longer than 1024 bytes: {key[:60]!r}...")
    if _CTRL.search(key):
        raise InvalidKey(f"object key contains a control character or backslash: {key!r}")
    if key.startswith("/"):
        raise InvalidKey(f"object key must be relative (no leading '/'): {key!r}")
    if any(seg in _BAD_SEGMENTS for seg in key.split("/")):
        raise InvalidKey(f"object key has an empty, '.' or '..' segment: {key!r}")
    return key


def validate_prefix(prefix: str) -> str:
    """Prefixes may be empty or end in '/', otherwise they follow the key rules."""
    if prefix == "":
        return prefix
    validate_key(prefix.rstrip("/") or "x")
    if prefix.startswith("/"):
        raise InvalidKey(f"prefix must be relative: {prefix!r}")
    return prefix


def validate_retain_until(retain_until: datetime | None, now: datetime | None = None) -> datetime | None:
    if retain_until is None:
        return None
    if not isinstance(retain_until, datetime):
        raise ValueError(f"retain_until must be a datetime, got {type(retain_until).__name__}")
    if retain_until.tzinfo is None or retain_until.utcoffset() is None:
        raise ValueError("retain_until must be timezone-aware (use UTC)")
    now = now or datetime.now(UTC)
    if retain_until <= now:
        raise ValueError(f"retain_until {retain_until.isoformat()} is not in the future")
    return retain_until.astimezone(UTC)


def validate_metadata(metadata: Mapping[str, str] | None) -> dict[str, str]:
    """User metadata: lower-case ASCII names ([a-z0-9-_]), printable ASCII values.
    (S3 sends metadata as HTTP headers, so the same rule keeps both backends equal.)"""
    out: dict[str, str] = {}
    for k, v in (metadata or {}).items():
        if not isinstance(k, str) or not re.fullmatch(r"[a-z0-9][a-z0-9_-]*", k):
            raise ValueError(f"metadata name must match [a-z0-9][a-z0-9_-]*: {k!r}")
        if not isinstance(v, str) or not all(0x20 <= ord(c) < 0x7F for c in v):
            raise ValueError(f"metadata value for {k!r} must be printable ASCII")
        out[k] = v
    return out


def as_stream(data: Body) -> BinaryIO:
    """Wrap bytes-likes in a BytesIO; pass file-likes through."""
    if isinstance(data, (bytes, bytearray, memoryview)):
        return io.BytesIO(bytes(data))
    if not hasattr(data, "read"):
        raise TypeError(f"object body must be bytes or a binary file-like, got {type(data).__name__}")
    return data


def read_full(stream: BinaryIO, n: int) -> bytes:
    """Read up to ``n`` bytes, looping over short reads; returns b"" only at EOF."""
    chunks: list[bytes] = []
    remaining = n
    while remaining > 0:
        chunk = stream.read(remaining)
        if not chunk:
            break
        if isinstance(chunk, str):
            raise TypeError("object body must be a binary stream (read() returned str)")
        chunks.append(chunk)
        remaining -= len(chunk)
    return b"".join(chunks)
