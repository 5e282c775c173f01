"""Ledger verification on PostgreSQL over ``COPY (SELECT …) TO STDOUT``.

The same checks as ``ledger.verify_rows`` (seq order, prev link, RFC 8785 bytes, SHA-256),
with less work per row. psycopg2's ``copy_expert`` hands each COPY text row, as bytes, to a
``write`` callable from its C loop (psycopg 3's COPY iterator spent about as much per row in
Python as the whole raw read); PostgreSQL formats the timestamp (``to_char``). Building the
whole document in SQL was measured slower: the server's ``to_json`` calls cost more than the
client saves.

Two paths check the rows, with the same verdicts (``VerifyResult.verifier`` names the one
that ran):

- **The C kernel** (``copy-c``, the default): ``_chain_c``, compiled by cffi at install time
  from ``_chain_build.py`` and linked to OpenSSL's SHA-256. ``write`` appends the row to a
  256 KiB block (one ``bytearray.extend``); the kernel takes a block per call, without the
  GIL, splits each row's 13 fields, builds the document with the same template as the bytes
  path below, hashes it and checks seq, prev link and stored hash, keeping the chain's state
  in a C struct. About 0.4 µs a row against 3 µs in Python, so the server's COPY, not the
  client, is now the slower side. A row it cannot decide alone (exactly those the Python path
  sends to ``split_line``/``document``: a COPY escape or a byte JSON escapes) goes back to
  ``_chain`` for that row, from the kernel's state.
- **Python** (``copy-python``): the coroutine ``_chain``. A row needing no escape (two
  regex searches decide) becomes its canonical document with one bytes ``%``, any other
  goes through ``document`` and the C-accelerated JSON string encoder. It runs when the
  kernel was not built (no compiler where the package was installed: logged as a warning)
  or when asked (``force_python``, ``KMS_LEDGER_VERIFY_PYTHON=1``).

``tests/test_ledger_copy.py`` proves ``document`` byte-identical to ``ledger.row_canonical``
for every row PostgreSQL can hold (a property test over timestamps in years 1–9999,
arbitrary Unicode text, NULLs, both integer ranges), the kernel's verdicts identical to
``_chain``'s on random chains with any byte changed, and runs every tamper case on both
paths; a row whose timestamp has no RFC 3339 form ('infinity', year 10000+, any year BC) is
reported as altered.

Long ledgers are split into seq ranges verified in parallel: each range starts from the
stored hash of the entry before it, and the ranges are read back in order, so the first bad
seq is the one a single pass names. On the kernel the ranges run in threads (psycopg2 waits
for rows and the kernel hashes them with the GIL released; a process start cost more than
verifying 100k entries); the Python path holds the GIL and uses processes (``partitions``),
the caller verifying the first range itself.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
from collections.abc import Callable, Generator, Iterable
from concurrent.futures import ThreadPoolExecutor
from json.encoder import encode_basestring as _enc  # C-accelerated, = ledger's encoder

import psycopg2  # its copy_expert loops over COPY rows in C (see _verify_range)
from sqlalchemy import text
from sqlalchemy.engine import Engine

from ..foundation.partitions import map_in_processes, seq_bounds
from .verdict import GENESIS_HASH, VerifyResult, altered, broken_link, seq_gap

try:  # the C kernel, compiled by cffi at install time (_chain_build.py)
    from . import _chain_c
except ImportError:  # installed without a C compiler or libssl-dev: the pure-Python path runs
    _chain_c = None  # type: ignore[assignment]  # (the module or None; checked before use)

log = logging.getLogger(__name__)

# Set to 1 to run the pure-Python path although the C kernel is built (tests compare the two).
FORCE_PYTHON_ENV = "KMS_LEDGER_VERIFY_PYTHON"

# In the order the template uses them (approvers, a JSON text put in as it is, first: the
# escape check skips it), so a line unpacks straight into it.
#
# ``at`` is NULL (an altered row) before year 1: to_char's YYYY has no era, so 2026 BC would
# print as 2026 and a row whose time an insider moved back 4051 years would verify. No
# writer can have hashed a BC time (Python's datetime starts at year 1).
COLUMNS_SQL = (
    "approvers, seq, actor, CASE WHEN at >= '0001-01-01 00:00:00+00' "
    "THEN to_char(at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"') END, "
    "event_id, from_state, key_name, prev_hash, reason, change_ticket, to_state, key_version, entry_hash"
)
# ledger._ROW_TEMPLATE with seq and version as PostgreSQL's integer text (canonical decimal, as Python's %d).
_TEMPLATE = (
    '{"actor":%s,"approvers":%s,"at":"%s","event":%s,"from":%s,"key":%s,"prev":"%s",'
    '"reason":%s,"seq":%s,"ticket":%s,"to":%s,"version":%s}'
)

_sha256 = hashlib.sha256
_NULL = "\\N"  # COPY text's NULL; any backslash in data is escaped, so a line without
_HAS_ESCAPE = re.compile(r"\\[^N]").search  # other escapes holds only NULLs and plain text
_COPY_ESCAPES = {"\\": "\\", "b": "\b", "f": "\f", "n": "\n", "r": "\r", "t": "\t", "v": "\v"}
_ESCAPE = re.compile(r"\\(.)", re.S)


def _unescape(field: str) -> str | None:
    if field == _NULL:
        return None
    return _ESCAPE.sub(lambda m: _COPY_ESCAPES.get(m.group(1), m.group(1)), field)


def split_line(line: str) -> tuple[list[str | None], str | None]:
    """A COPY text line (without its newline) as column values, and the value standing for NULL."""
    if _HAS_ESCAPE(line):
        return [_unescape(f) for f in line.split("\t")], None
    fields: list[str | None] = list(line.split("\t"))
    return fields, _NULL


def document(
    approvers: str | None,
    seq: str | None,
    actor: str | None,
    at: str | None,
    event: str | None,
    frm: str | None,
    key: str | None,
    prev_hash: str | None,
    reason: str | None,
    ticket: str | None,
    to: str | None,
    version: str | None,
    null: str | None,
) -> bytes | None:
    """The entry's RFC 8785 bytes from its COPY column text; None when a required column is NULL
    (a field is None only when ``split_line`` unescaped a NULL, and ``null`` is then None too)."""
    if actor is None or key is None or to is None or null in (actor, approvers, at, key, to):
        return None
    return (
        _TEMPLATE
        % (
            _enc(actor),
            approvers,
            at,
            "null" if event is None or event == null else _enc(event),
            "null" if frm is None or frm == null else _enc(frm),
            _enc(key),
            prev_hash,
            "null" if reason is None or reason == null else _enc(reason),
            seq,
            "null" if ticket is None or ticket == null else _enc(ticket),
            _enc(to),
            "null" if version == null else version,
        )
    ).encode("utf-8")


def conninfo(engine: Engine) -> str:
    """libpq connection string of a SQLAlchemy PostgreSQL engine."""
    return engine.url.set(drivername="postgresql").render_as_string(hide_password=False)


def _segment_query(lo: int, hi: int | None) -> str:
    # A LIMIT rather than ``seq <= hi``: when seq ``hi`` is missing, the next row present
    # comes through and the seq check names the gap as a single pass would.
    # The first range has no lower bound: a row an insider added below seq 1 comes first and
    # is named out of order (``seq > 0`` would skip it, and key histories would list it).
    limit = f" LIMIT {int(hi) - int(lo)}" if hi is not None else ""
    where = f" WHERE seq > {int(lo)}" if lo > 0 else ""
    return f"COPY (SELECT {COLUMNS_SQL} FROM ledger_entries{where} ORDER BY seq{limit}) TO STDOUT"


# When a row holds no COPY escape (a backslash other than a NULL's ``\N``) and its fields
# after approvers (the text ones are JSON strings) no quote or control character (tab
# and the final newline are COPY's own), each text field is its own JSON string body,
# byte for byte (UTF-8 in, UTF-8 out, as ``_enc(text).encode()`` gives), and the document
# is one bytes ``%``. Two searches: one pattern with both was 2x slower per row.
_COPY_ESCAPE = re.compile(rb"\\[^N]").search
_JSON_ESCAPE = re.compile(rb'[\x00-\x08\x0b-\x1f"]').search
_BYTES_TEMPLATE = (
    _TEMPLATE.replace('"actor":%s', '"actor":"%s"')
    .replace('"key":%s', '"key":"%s"')
    .replace('"to":%s', '"to":"%s"')
    .encode()
)


def _chain(expected_seq: int, prev: str) -> Generator[None, bytes, VerifyResult]:
    """A coroutine checking COPY text rows (bytes, newline included) sent to it one by one;
    an empty row ends the input. It returns (``StopIteration.value``) the VerifyResult at
    the first bad entry or at the end: the same results as ``ledger.verify_rows``.

    A coroutine so psycopg2's ``copy_expert`` can push rows into it from its C loop
    (``write=chain.send``) while the state stays in local variables."""
    count = 0
    prev_b = prev.encode()
    # Hot loop (one pass per entry): names bound locally; a row needing any escape goes
    # through ``split_line`` and ``document`` (the reference form, property-tested).
    sha, copy_escape, json_escape, template, null = _sha256, _COPY_ESCAPE, _JSON_ESCAPE, _BYTES_TEMPLATE, b"\\N"
    row = yield
    while row:
        if copy_escape(row) or json_escape(row, row.find(b"\t")):
            fields, none = split_line(str(row, "utf-8")[:-1])
            seq_f, prev_hash, stored = fields[1], _utf8(fields[7]), _utf8(fields[12])
            if seq_f is None:  # seq is NOT NULL in the schema; a NULL here is a broken COPY stream
                raise ValueError("ledger COPY row has a NULL seq column")
            seq_s: str | bytes = seq_f
            raw = document(*fields[:12] + [none])
        else:
            (approvers, seq_s, actor, at, event, frm, key, prev_hash, reason, ticket, to, version, stored) = row[
                :-1
            ].split(b"\t")
            if null in (actor, approvers, at, key, to):
                raw = None
            else:
                raw = template % (
                    actor,
                    approvers,
                    at,
                    b"null" if event == null else b'"%s"' % event,
                    b"null" if frm == null else b'"%s"' % frm,
                    key,
                    prev_hash,
                    b"null" if reason == null else b'"%s"' % reason,
                    seq_s,
                    b"null" if ticket == null else b'"%s"' % ticket,
                    to,
                    version if version != null else b"null",
                )
        seq = int(seq_s)
        if seq != expected_seq:
            return seq_gap(count, prev_b.decode(), expected_seq, seq)
        if prev_hash != prev_b:
            return broken_link(count, prev_b.decode(), seq)
        if raw is None or sha(raw).hexdigest().encode() != stored:
            return altered(count, prev_b.decode(), seq)
        prev_b, expected_seq, count = stored, seq + 1, count + 1
        row = yield
    return VerifyResult(True, count, expected_seq - 1, prev_b.decode())


def _utf8(field: str | None) -> bytes | None:
    return None if field is None else field.encode()


def c_kernel_built() -> bool:
    """Whether the C kernel (``_chain_c``) was compiled at install time."""
    return _chain_c is not None


def _use_c(force_python: bool) -> bool:
    if force_python or os.environ.get(FORCE_PYTHON_ENV) == "1":
        return False
    if _chain_c is None:
        log.warning(
            "ledger verify runs its pure-Python path: the C kernel (%s._chain_c) is not built "
            "(reinstall the package with gcc and libssl-dev present)",
            __package__,
        )
        return False
    return True


class _Stop(Exception):
    """Raised from ``write`` to end ``copy_expert`` at the first bad entry; carries the verdict."""

    def __init__(self, result: VerifyResult) -> None:
        super().__init__(result.problem)
        self.result = result


# Rows gathered per call into the C kernel (about 2000 rows): the per-row Python is then one
# bytearray.extend and a length test, and the GIL is released once per block, not per row.
_BLOCK = 1 << 18


class _CChain:
    """The chain's state in the C kernel's struct. ``write`` takes one COPY text row and
    checks them a block at a time (``finish`` checks the rest); ``write_row`` checks each
    row as it comes, for input whose rows may hold a newline byte (``verify_lines``).

    The kernel decides a row needing no escape itself; a row it stops at with ``KMS_DEFER``
    (exactly the rows ``_chain`` sends to ``split_line``/``document``, and any it cannot parse)
    goes through ``_chain`` from the kernel's state, so every verdict is the Python path's.
    A verdict ends the input with ``_Stop``."""

    def __init__(self, expected_seq: int, prev: str) -> None:
        assert _chain_c is not None
        self._ffi, self._lib = _chain_c.ffi, _chain_c.lib
        self.st = self._ffi.new("kms_chain *")
        self._expected, self._long_prev = expected_seq, ""
        self._set_prev(prev.encode())
        self._set_expected(expected_seq)
        self.deferred = 0  # rows checked in Python (tests: the kernel decides the common row)
        self._buf = buf = bytearray()
        extend, flush, check, st, stopped = buf.extend, self._flush, self._lib.kms_chain_row, self.st, self._stopped

        def write(row: bytes) -> None:  # copy_expert calls this from its C loop, once per row
            extend(row)
            if len(buf) >= _BLOCK:
                flush()

        def write_row(row: bytes) -> None:
            status = check(st, row, len(row))
            if status:
                stopped(row, status)

        self.write, self.write_row = write, write_row

    def _flush(self) -> None:
        buf, st, feed = self._buf, self.st, self._lib.kms_chain_feed
        end, pos = len(buf), 0
        with self._ffi.from_buffer(buf) as block:  # no copy; released before buf is cleared
            while pos < end:
                pos += feed(st, block + pos, end - pos)
                if pos < end:  # the row at pos stopped the kernel
                    row_end = buf.find(b"\n", pos) + 1 or end
                    self._stopped(bytes(buf[pos:row_end]), st.status)
                    pos = row_end
        buf.clear()

    def finish(self) -> VerifyResult:
        """The verdict once every row was written (``_Stop`` if the rows still held break it)."""
        self._flush()
        return self.result()

    # What the struct cannot hold stays here, and the kernel then sends every row to Python:
    # an expected seq past int64 (after seq 2**63 - 1, or a caller's start) or a prev hash
    # longer than its buffer (entry_hash is varchar(64), 256 bytes at most, unless an insider
    # altered the column too).
    def _set_prev(self, prev: bytes) -> None:
        fits = len(prev) <= self._lib.KMS_PREV_MAX
        self._long_prev = "" if fits else prev.decode()
        self._ffi.memmove(self.st.prev, prev if fits else b"", len(prev) if fits else 0)
        self.st.prev_len = len(prev) if fits else 0
        self._python_only()

    def _set_expected(self, seq: int) -> None:
        self._expected = seq
        self.st.expected_seq = seq if -(2**63) <= seq < 2**63 else 0
        self._python_only()

    def _python_only(self) -> None:
        self.st.python_only = int(bool(self._long_prev) or not -(2**63) <= self._expected < 2**63)

    def _expected_seq(self) -> int:  # the kernel's while it checks rows, else Python's
        return self._expected if self.st.python_only else self.st.expected_seq

    def _prev(self) -> str:
        return self._long_prev or self._ffi.buffer(self.st.prev, self.st.prev_len)[:].decode()

    def _stopped(self, row: bytes, status: int) -> None:
        st, lib = self.st, self._lib
        if not row:  # as for _chain, an empty row ends the input
            raise _Stop(self.result())
        if status == lib.KMS_DEFER:
            self.deferred += 1
            one = _python_verdict(_chain(self._expected_seq(), self._prev()), lambda write: write(row))
            if not one.ok:
                one.count = st.count  # _chain counted from 0
                raise _Stop(one)
            if one.count:  # the row checked out: the chain goes on from it
                st.count += 1
                self._set_expected(one.head_seq + 1)
                self._set_prev(one.head_hash.encode())
            return
        if status == lib.KMS_GAP:
            raise _Stop(seq_gap(st.count, self._prev(), st.expected_seq, st.seq))
        if status == lib.KMS_LINK:
            raise _Stop(broken_link(st.count, self._prev(), st.seq))
        raise _Stop(altered(st.count, self._prev(), st.seq))

    def result(self) -> VerifyResult:
        return VerifyResult(True, self.st.count, self._expected_seq() - 1, self._prev())


def _python_verdict(
    chain: Generator[None, bytes, VerifyResult], rows: Callable[[Callable[[bytes], None]], None]
) -> VerifyResult:
    """Run ``_chain`` over the rows ``rows`` pushes into its argument; its VerifyResult."""
    next(chain)
    try:
        rows(chain.send)
        chain.send(b"")
    except StopIteration as stop:
        result: VerifyResult = stop.value  # the coroutine's return value (see _chain)
        return result
    raise AssertionError("the chain coroutine ended without a result")  # unreachable: b"" ends it


def _c_verdict(chain: _CChain, rows: Callable[[Callable[[bytes], None]], None], by_row: bool) -> VerifyResult:
    try:
        if by_row:
            rows(chain.write_row)
            return chain.result()
        rows(chain.write)
        return chain.finish()
    except _Stop as stop:
        return stop.result


def _run(
    use_c: bool,
    expected_seq: int,
    prev: str,
    rows: Callable[[Callable[[bytes], None]], None],
    *,
    by_row: bool = False,
) -> VerifyResult:
    """The chain from (``expected_seq``, ``prev``) over the rows ``rows`` pushes into the
    callable it is given (one COPY text row each, newline included), on the C kernel or in
    Python; the result names which ran. ``by_row``: rows may hold a newline byte (not COPY's)."""
    if use_c:
        result = _c_verdict(_CChain(expected_seq, prev), rows, by_row)
        result.verifier = "copy-c"
    else:
        result = _python_verdict(_chain(expected_seq, prev), rows)
        result.verifier = "copy-python"
    return result


def verify_lines(
    lines: Iterable[bytes | bytearray | memoryview],
    expected_seq: int = 1,
    prev: str = GENESIS_HASH,
    *,
    force_python: bool = False,
) -> VerifyResult:
    """Check COPY text lines of ``COLUMNS_SQL`` (bytes-like, newline included); the same
    results as ``ledger.verify_rows``. An empty line ends the input."""

    def push(write: Callable[[bytes], None]) -> None:
        for line in lines:
            if not line:
                return
            write(bytes(line))

    return _run(_use_c(force_python), expected_seq, prev, push, by_row=True)


class _Sink:
    """The file object ``copy_expert`` writes each row to."""

    def __init__(self, write: Callable[[bytes], None]) -> None:
        self.write = write


def _verify_range(dsn: str, lo: int, hi: int | None, use_c: bool) -> VerifyResult:
    # psycopg2's copy_expert, not psycopg 3's COPY iterator: psycopg 3 hands each row
    # (one CopyData message) through Python generators, about 1 µs a row, as much as the
    # whole raw read; psycopg2 loops in C and calls ``write`` once per row.
    # enable_sort=off: rows come in primary-key order from the index. A table without
    # statistics yet (just restored or loaded, before autovacuum's ANALYZE) otherwise gets a
    # full scan and sort per range: measured 2.1x slower over two ranges at 200k entries.
    conn = psycopg2.connect(
        dsn,
        connect_timeout=10,
        client_encoding="UTF8",
        options="-c default_transaction_read_only=on -c enable_sort=off",
    )
    try:
        cur = conn.cursor()
        prev = GENESIS_HASH
        if lo > 0:
            cur.execute("SELECT entry_hash FROM ledger_entries WHERE seq = %s", (lo,))
            row = cur.fetchone()
            if row is None:  # the range before this one ends short and reports the gap first
                return VerifyResult(False, 0, lo - 1, "", lo, f"entry seq {lo} is missing")
            if row[0] is None:  # an insider dropped NOT NULL: the range before names it altered
                return altered(0, "", lo)
            prev = row[0]
        # Stops at the first bad entry: the exception ``write`` raises ends copy_expert
        # mid-stream, and the connection is closed below, never reused.
        return _run(use_c, lo + 1, prev, lambda write: cur.copy_expert(_segment_query(lo, hi), _Sink(write)))
    finally:
        conn.close()


def verify_segment(dsn: str, lo: int, hi: int | None, use_c: bool = True) -> VerifyResult:
    """Verify entries (lo, hi] (to the end when ``hi`` is None), anchored at entry ``lo``'s stored hash."""
    return _verify_range(dsn, lo, hi, use_c and _use_c(False))


def _map_in_threads(
    fn: Callable[[str, int, int | None, bool], VerifyResult], argsets: list[tuple[str, int, int | None, bool]]
) -> list[VerifyResult]:
    """``[fn(*args) for args in argsets]``, the first in this thread, the others in threads.

    On the C kernel threads overlap like processes: psycopg2 waits for rows and the kernel
    hashes them with the GIL released, and a thread costs no process start (0.1-1 s, more
    than verifying 100k entries takes)."""
    with ThreadPoolExecutor(max_workers=len(argsets) - 1) as pool:
        futures = [pool.submit(fn, *args) for args in argsets[1:]]
        return [fn(*argsets[0])] + [f.result() for f in futures]


def verify(
    engine: Engine, *, workers: int = 1, min_entries_per_worker: int = 1, force_python: bool = False
) -> VerifyResult:
    """Verify the whole ledger over COPY, in up to ``workers`` processes; on the C kernel
    unless it is not built or ``force_python`` (or KMS_LEDGER_VERIFY_PYTHON=1) asks for Python."""
    use_c = _use_c(force_python)
    with engine.connect() as conn:
        max_seq = conn.execute(text("SELECT coalesce(max(seq), 0) FROM ledger_entries")).scalar_one()
    parts = min(workers, max(1, max_seq // max(1, min_entries_per_worker)))
    dsn = conninfo(engine)
    if parts <= 1:
        return _verify_range(dsn, 0, None, use_c)
    bounds = seq_bounds(0, max_seq, parts)
    # the last range runs to the end, as a single pass would
    argsets = [(dsn, lo, hi if hi < max_seq else None, use_c) for lo, hi in bounds]
    if use_c:
        results = _map_in_threads(verify_segment, argsets)
    else:  # the Python path holds the GIL: processes; the first range runs in this one
        results = map_in_processes(verify_segment, argsets, first_in_caller=True)
    total = 0
    for (_lo, hi), part in zip(bounds, results, strict=True):
        part.count += total
        if not part.ok:
            return part
        total = part.count
        if hi < max_seq and part.head_seq < hi:  # the chain ended inside this range: nothing follows
            break
    return VerifyResult(True, total, total, part.head_hash, verifier=part.verifier)
