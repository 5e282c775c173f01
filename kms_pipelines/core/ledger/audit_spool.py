"""The audit writer's local spool: emitted audit events the database could not take.

When the background writer (``audit.AuditWriter``) cannot append a batch within the
database's retry budget, the batch is appended here instead of being dropped, and replayed
-- oldest first, ahead of any newer event -- by the next write that reaches the database.

* **Where.** ``<KMS_HOME>/audit-spool/<digest of the database URL>.jsonl``: one file per
  database (never its password), shared by every process on the host through ``flock``.
* **What.** One JSON line per event: exactly the fields the chain hashes (``at``, actor,
  operation, target, outcome, canonical detail; ``audit.make_event`` already refused bytes,
  so no key material can reach it), ``prev`` (the previous line's digest) and ``digest``:
  SHA-256 over ``prev`` and this event's RFC 8785 bytes. An edited, inserted, removed or
  reordered line breaks that chain from that line on (a cut at either end does not). It has no secret, so someone who rewrites the file *and* recomputes
  every digest is not caught here; the file is short-lived and its appearance is loud.
* **Exactly once.** Before the replay transaction commits, its last spooled row's
  ``(seq, entry_hash)`` and the number of lines it took are written (fsync'd) to
  ``<file>.committed``; those lines leave the spool after the commit. A process that dies in
  between leaves the marker: the next replay finds that row in the database (its hash covers
  seq, prev and content, so only this very append can have produced it) and removes those
  lines instead of appending them twice; lines another process spooled meanwhile stay. A
  marker whose row is absent means the commit never happened; the spool is replayed. (A
  digest match against rows is not used: identical events at one simulated time are real.)
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from ..foundation.canonical import canonical_fast
from ..foundation.clock import parse_time
from ..foundation.durable import fsync_dir

SPOOL_DIR = "audit-spool"
FIELDS = ("at", "actor", "op", "target", "outcome", "detail")
_LOCKS: dict[Path, threading.Lock] = {}
_LOCKS_GUARD = threading.Lock()


def _thread_lock(path: Path) -> threading.Lock:
    """flock is per open file, so the threads of one process also share a Lock per spool."""
    with _LOCKS_GUARD:
        return _LOCKS.setdefault(path, threading.Lock())


def _forget_locks_in_child() -> None:  # a lock held by a parent's thread would never be released
    global _LOCKS_GUARD
    _LOCKS.clear()
    _LOCKS_GUARD = threading.Lock()


os.register_at_fork(after_in_child=_forget_locks_in_child)


def spool_path(home: Path, database_url: str) -> Path:
    """The spool file of one database (the URL is rendered without its password)."""
    return Path(home) / SPOOL_DIR / (hashlib.sha256(database_url.encode()).hexdigest()[:16] + ".jsonl")


def _digest(prev: str, event: dict[str, Any]) -> str:
    return hashlib.sha256(prev.encode() + canonical_fast(event)).hexdigest()


def _well_formed(event: dict[str, Any]) -> bool:
    """Shaped as the writer spools it, so a replay cannot fail on it (and block the writes
    behind it): a line with recomputed digests but, say, an unparsable time is set aside."""
    parse_time(event["at"])
    limits = {"actor": 200, "op": 64, "target": 300, "detail": None}  # audit_events' column sizes
    values = [event[name] for name in limits]
    return (
        event["outcome"] in ("ok", "denied", "error")
        and isinstance(event["actor"], str)
        and isinstance(event["op"], str)
        and all(v is None or (isinstance(v, str) and "\x00" not in v) for v in values)
        and all(size is None or len(event[name] or "") <= size for name, size in limits.items())
    )


@dataclass
class SpoolContents:
    events: list[dict[str, Any]]  # the leading lines whose digest chain holds, oldest first
    altered_line: int | None = None  # 1-based number of the first line that breaks it


@dataclass(frozen=True)
class Marker:
    seq: int  # the last replayed row's seq and entry_hash
    entry_hash: str
    lines: int  # spool lines that replay took
    altered: bool  # whether it found a broken tail (set aside after the commit)


class Spool:
    def __init__(self, path: Path):
        self.path = path
        self.marker = path.with_suffix(".committed")

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        with _thread_lock(self.path), open(self.path.with_suffix(".lock"), "a") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            yield  # closing the file releases the flock

    def has_work(self) -> bool:
        """Anything to replay (a cheap stat; the normal path takes no lock)."""
        try:
            return self.path.stat().st_size > 0 or self.marker.exists()
        except OSError:  # none (or an unusable spool place: it must never block database writes)
            return False

    def append(self, events: Sequence[dict[str, Any]]) -> None:
        """Append ``events`` durably (fsync'd) after the last line's digest. Raises OSError."""
        with self.locked():
            lines = self._lines()
            prev = json.loads(lines[-1])["digest"] if lines else ""
            out = []
            for event in events:
                digest = _digest(prev, event)
                out.append(json.dumps({**event, "prev": prev, "digest": digest}, sort_keys=True) + "\n")
                prev = digest
            with open(self.path, "a", encoding="utf-8") as f:
                os.fchmod(f.fileno(), 0o600)
                f.write("".join(out))
                f.flush()
                os.fsync(f.fileno())
            fsync_dir(self.path.parent)

    def _lines(self) -> list[str]:
        try:
            return [line for line in self.path.read_text(encoding="utf-8").splitlines() if line.strip()]
        except (FileNotFoundError, NotADirectoryError):
            return []

    def read(self) -> SpoolContents:
        """The events whose digest chain holds; from the first line that breaks it, nothing.
        The first line's ``prev`` starts the chain: replayed lines leave from the front."""
        prev: str | None = None
        events: list[dict[str, Any]] = []
        lines = self._lines()
        for number, line in enumerate(lines, start=1):
            try:
                record = json.loads(line)
                event = {name: record[name] for name in FIELDS}
                ok = set(record) == {*FIELDS, "prev", "digest"} and record["prev"] == (
                    record["prev"] if prev is None else prev
                )
                ok = ok and _digest(record["prev"], event) == record["digest"] and _well_formed(event)
            except (ValueError, KeyError, TypeError):
                ok = False
            if not ok:
                return SpoolContents(events, number)
            prev = record["digest"]
            events.append(event)
        return SpoolContents(events)

    def count(self) -> int:
        return len(self._lines())

    def write_marker(self, seq: int, entry_hash: str, lines: int, altered: bool) -> None:
        with open(self.marker, "w", encoding="utf-8") as f:
            json.dump({"seq": seq, "entry_hash": entry_hash, "lines": lines, "altered": altered}, f)
            f.flush()
            os.fsync(f.fileno())
        fsync_dir(self.path.parent)

    def read_marker(self) -> Marker | None:
        try:
            data = json.loads(self.marker.read_text(encoding="utf-8"))
            return Marker(int(data["seq"]), str(data["entry_hash"]), int(data["lines"]), bool(data["altered"]))
        except FileNotFoundError:
            return None
        except (ValueError, KeyError, TypeError):
            return Marker(0, "", 0, False)  # unreadable: matches no row, so the spool is replayed

    def clear_marker(self) -> None:
        self.marker.unlink(missing_ok=True)

    def finish(self, lines_done: int, altered: bool) -> None:
        """After a replay committed (under ``locked``): its ``lines_done`` lines leave the
        spool; with ``altered``, every later line (the broken tail) is set aside for the
        investigator rather than replayed. Then the marker goes."""
        rest = self._lines()[lines_done:]
        if altered and rest:
            stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S%fZ")
            self._write_durably(self.path.with_name(f"{self.path.stem}.altered-{stamp}.jsonl"), rest)
            rest = []
        self._write_durably(self.path, rest)
        self.clear_marker()
        fsync_dir(self.path.parent)

    @staticmethod
    def _write_durably(path: Path, lines: list[str]) -> None:
        temporary = path.with_suffix(".tmp")
        with open(temporary, "w", encoding="utf-8") as f:
            os.fchmod(f.fileno(), 0o600)
            f.write("".join(line + "\n" for line in lines))
            f.flush()
            os.fsync(f.fileno())
        os.replace(temporary, path)

    def altered_files(self) -> list[Path]:
        return sorted(self.path.parent.glob(f"{self.path.stem}.altered-*.jsonl"))
