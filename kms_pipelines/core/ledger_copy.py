"""Ledger verification on PostgreSQL over ``COPY (SELECT …) TO STDOUT``.

The same checks as ``ledger.verify_rows`` (seq order, prev link, RFC 8785 bytes, SHA-256),
but PostgreSQL assembles each entry's canonical document in the query, so the client only
splits a line, compares two hashes and runs SHA-256 over bytes it never decodes.
``DOCUMENT_SQL`` must produce exactly ``ledger.row_canonical``'s bytes for every row the
database can hold; tests/test_ledger_copy.py proves it with a property test (timestamps
across years 1–9999, arbitrary Unicode text, NULLs), and a row whose document cannot be
built (an 'infinity' or year-10000 timestamp) is reported as altered.

Long ledgers are split into seq ranges verified in parallel processes (``partitions``):
each range starts from the stored hash of the entry before it, and the ranges are read
back in order, so the first bad seq is the one a single pass names.
"""

from __future__ import annotations

import hashlib
import re

import psycopg
from sqlalchemy.engine import Engine

from .ledger import GENESIS_HASH, VerifyResult
from .partitions import map_in_processes, seq_bounds

# Key order and formatting of ledger._ROW_TEMPLATE. to_json(text) escapes exactly as
# json.encoder.encode_basestring (\" \\ \b \f \n \r \t, other C0 as lowercase \u00xx).
DOCUMENT_SQL = (
    """'{"actor":' || to_json(actor)::text || ',"approvers":' || approvers"""
    """ || ',"at":"' || to_char(at AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US"Z"')"""
    """ || '","event":' || coalesce(to_json(event_id)::text, 'null')"""
    """ || ',"from":' || coalesce(to_json(from_state)::text, 'null')"""
    """ || ',"key":' || to_json(key_name)::text || ',"prev":"' || prev_hash"""
    """ || '","reason":' || coalesce(to_json(reason)::text, 'null') || ',"seq":' || seq::text"""
    """ || ',"ticket":' || coalesce(to_json(change_ticket)::text, 'null') || ',"to":' || to_json(to_state)::text"""
    """ || ',"version":' || coalesce(key_version::text, 'null') || '}'""")

_sha256 = hashlib.sha256
# COPY text format escapes (what PostgreSQL emits for backslash, tab, newline, …) and NULL.
_COPY_ESCAPES = {b"\\": b"\\", b"b": b"\b", b"f": b"\f", b"n": b"\n", b"r": b"\r", b"t": b"\t", b"v": b"\v"}
_ESCAPE = re.compile(rb"\\(.)", re.S)


def _unescape(field: bytes) -> bytes | None:
    if field == b"\\N":
        return None
    return _ESCAPE.sub(lambda m: _COPY_ESCAPES.get(m.group(1), m.group(1)), field)


def conninfo(engine: Engine) -> str:
    """libpq connection string of a SQLAlchemy PostgreSQL engine."""
    return engine.url.set(drivername="postgresql").render_as_string(hide_password=False)


def _segment_query(lo: int, hi: int | None) -> str:
    # A LIMIT rather than ``seq <= hi``: when seq ``hi`` is missing, the next row present
    # comes through and the seq check names the gap as a single pass would.
    limit = f" LIMIT {int(hi) - int(lo)}" if hi is not None else ""
    return (f"COPY (SELECT seq, prev_hash, entry_hash, {DOCUMENT_SQL} FROM ledger_entries"
            f" WHERE seq > {int(lo)} ORDER BY seq{limit}) TO STDOUT")


def verify_lines(lines, expected_seq: int = 1, prev: str = GENESIS_HASH) -> VerifyResult:
    """Check COPY text lines ``seq, prev_hash, entry_hash, document``; same results as ``verify_rows``."""
    prev_b, count = prev.encode(), 0
    for line in lines:
        line = bytes(line)
        if b"\\" in line:
            seq_b, prev_hash, stored, doc = (_unescape(f) for f in line[:-1].split(b"\t"))
        else:
            seq_b, prev_hash, stored, doc = line[:-1].split(b"\t")
        seq = int(seq_b)
        if seq != expected_seq:
            problem = (f"entry seq {expected_seq} is missing (next present is {seq})" if seq > expected_seq
                       else f"entry seq {seq} is out of order")
            return VerifyResult(False, count, expected_seq - 1, prev_b.decode(), expected_seq, problem)
        if prev_hash != prev_b:
            return VerifyResult(False, count, seq - 1, prev_b.decode(), seq,
                                f"entry seq {seq} does not link to seq {seq - 1} (prev_hash mismatch)")
        if doc is None or _sha256(doc).hexdigest().encode() != stored:
            return VerifyResult(False, count, seq - 1, prev_b.decode(), seq,
                                f"entry seq {seq} was altered (its content does not match its hash)")
        prev_b, expected_seq, count = stored, seq + 1, count + 1
    return VerifyResult(True, count, expected_seq - 1, prev_b.decode())


def verify_segment(dsn: str, lo: int, hi: int | None) -> VerifyResult:
    """Verify entries (lo, hi] (to the end when ``hi`` is None), anchored at entry ``lo``'s stored hash."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("SET client_encoding TO 'UTF8'")
        prev = GENESIS_HASH
        if lo > 0:
            row = conn.execute("SELECT entry_hash FROM ledger_entries WHERE seq = %s", (lo,)).fetchone()
            if row is None:  # the range before this one ends short and reports the gap first
                return VerifyResult(False, 0, lo - 1, "", lo, f"entry seq {lo} is missing")
            prev = row[0]
        with conn.cursor().copy(_segment_query(lo, hi)) as copy:
            return verify_lines(copy, lo + 1, prev)


def verify(engine: Engine, *, workers: int = 1, min_entries_per_worker: int = 1) -> VerifyResult:
    """Verify the whole ledger over COPY, in up to ``workers`` processes."""
    dsn = conninfo(engine)
    with psycopg.connect(dsn, autocommit=True) as conn:
        max_seq = conn.execute("SELECT coalesce(max(seq), 0) FROM ledger_entries").fetchone()[0]
    parts = min(workers, max(1, max_seq // max(1, min_entries_per_worker)))
    if parts <= 1:
        return verify_segment(dsn, 0, None)
    bounds = seq_bounds(0, max_seq, parts)
    # the last range runs to the end, as a single pass would
    results = map_in_processes(verify_segment, [(dsn, lo, hi if hi < max_seq else None) for lo, hi in bounds])
    total = 0
    for (lo, hi), part in zip(bounds, results):
        part.count += total
        if not part.ok:
            return part
        total = part.count
        if hi < max_seq and part.head_seq < hi:  # the chain ended inside this range: nothing follows
            break
    return VerifyResult(True, total, total, part.head_hash)
