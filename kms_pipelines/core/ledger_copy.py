"""Ledger verification on PostgreSQL over ``COPY (SELECT …) TO STDOUT``.

The same checks as ``ledger.verify_rows`` (seq order, prev link, RFC 8785 bytes, SHA-256),
with less work per row: COPY's text lines are split rather than parsed into Python
objects, PostgreSQL formats the timestamp (``to_char``), and the canonical document is
filled in from the column text with the C-accelerated JSON string encoder. Building the
whole document in SQL was measured slower: the server's ``to_json`` calls cost more than
the client saves.

``tests/test_ledger_copy.py`` proves ``document`` byte-identical to ``ledger.row_canonical``
for every row PostgreSQL can hold (a property test over timestamps in years 1–9999,
arbitrary Unicode text, NULLs, both integer ranges); a row whose timestamp has no
RFC 3339 form ('infinity', year 10000+) is reported as altered.

Long ledgers are split into seq ranges verified in parallel processes (``partitions``):
each range starts from the stored hash of the entry before it, and the ranges are read
back in order, so the first bad seq is the one a single pass names.
"""

from __future__ import annotations

import hashlib
import re
from json.encoder import encode_basestring as _enc  # C-accelerated, = ledger's encoder

from sqlalchemy import text
from sqlalchemy.engine import Engine

from .ledger import GENESIS_HASH, VerifyResult, altered, broken_link, seq_gap
from .partitions import map_in_processes, seq_bounds

# In the order the template uses them, so a line unpacks straight into it.
COLUMNS_SQL = ("seq, actor, approvers, to_char(at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"'), "
               "event_id, from_state, key_name, prev_hash, reason, change_ticket, to_state, key_version, entry_hash")
# ledger._ROW_TEMPLATE with seq and version as PostgreSQL's integer text (canonical decimal, as Python's %d).
_TEMPLATE = ('{"actor":%s,"approvers":%s,"at":"%s","event":%s,"from":%s,"key":%s,"prev":"%s",'
             '"reason":%s,"seq":%s,"ticket":%s,"to":%s,"version":%s}')

_sha256 = hashlib.sha256
_NULL = "\\N"  # COPY text's NULL; any backslash in data is escaped, so a line without
_HAS_ESCAPE = re.compile(r"\\[^N]").search  # other escapes holds only NULLs and plain text
_COPY_ESCAPES = {"\\": "\\", "b": "\b", "f": "\f", "n": "\n", "r": "\r", "t": "\t", "v": "\v"}
_ESCAPE = re.compile(r"\\(.)", re.S)


def _unescape(field: str) -> str | None:
    if field == _NULL:
        return None
    return _ESCAPE.sub(lambda m: _COPY_ESCAPES.get(m.group(1), m.group(1)), field)


def split_line(line: str) -> tuple[list, object]:
    """A COPY text line (without its newline) as column values, and the value standing for NULL."""
    if _HAS_ESCAPE(line):
        return [_unescape(f) for f in line.split("\t")], None
    return line.split("\t"), _NULL


def document(seq, actor, approvers, at, event, frm, key, prev_hash, reason, ticket, to, version, null) -> bytes | None:
    """The entry's RFC 8785 bytes from its COPY column text; None when a required column is NULL."""
    if null in (actor, approvers, at, key, to):
        return None
    return (_TEMPLATE % (_enc(actor), approvers, at, "null" if event == null else _enc(event),
                         "null" if frm == null else _enc(frm), _enc(key), prev_hash,
                         "null" if reason == null else _enc(reason), seq,
                         "null" if ticket == null else _enc(ticket), _enc(to),
                         "null" if version == null else version)).encode("utf-8")


def conninfo(engine: Engine) -> str:
    """libpq connection string of a SQLAlchemy PostgreSQL engine."""
    return engine.url.set(drivername="postgresql").render_as_string(hide_password=False)


def _segment_query(lo: int, hi: int | None) -> str:
    # A LIMIT rather than ``seq <= hi``: when seq ``hi`` is missing, the next row present
    # comes through and the seq check names the gap as a single pass would.
    limit = f" LIMIT {int(hi) - int(lo)}" if hi is not None else ""
    return f"COPY (SELECT {COLUMNS_SQL} FROM ledger_entries WHERE seq > {int(lo)} ORDER BY seq{limit}) TO STDOUT"


def verify_lines(lines, expected_seq: int = 1, prev: str = GENESIS_HASH, encoding: str = "utf-8") -> VerifyResult:
    """Check COPY text lines of ``COLUMNS_SQL``; the same results as ``ledger.verify_rows``."""
    count = 0
    # Hot loop (one pass per entry): names bound locally, the common line shape inlined;
    # anything unusual (escapes, NULL in a required column) goes through ``document``.
    sha, enc, template, has_escape = _sha256, _enc, _TEMPLATE, _HAS_ESCAPE
    for line in lines:
        line = str(line, encoding)[:-1]
        if has_escape(line):
            fields, null = split_line(line)
            seq_s, prev_hash, stored = fields[0], fields[7], fields[12]
            raw = document(*fields[:12], null)
        else:
            (seq_s, actor, approvers, at, event, frm, key, prev_hash, reason, ticket, to, version,
             stored) = line.split("\t")
            if "\\N" in (actor, approvers, at, key, to):
                raw = None
            else:
                raw = (template % (enc(actor), approvers, at, "null" if event == "\\N" else enc(event),
                                   "null" if frm == "\\N" else enc(frm), enc(key), prev_hash,
                                   "null" if reason == "\\N" else enc(reason), seq_s,
                                   "null" if ticket == "\\N" else enc(ticket), enc(to),
                                   "null" if version == "\\N" else version)).encode()
        seq = int(seq_s)
        if seq != expected_seq:
            return seq_gap(count, prev, expected_seq, seq)
        if prev_hash != prev:
            return broken_link(count, prev, seq)
        if raw is None or sha(raw).hexdigest() != stored:
            return altered(count, prev, seq)
        prev, expected_seq, count = stored, seq + 1, count + 1
    return VerifyResult(True, count, expected_seq - 1, prev)


def _verify_range(engine: Engine, lo: int, hi: int | None) -> VerifyResult:
    # A pooled connection, so the engine's connect behaviour (timeouts, healing) applies.
    raw = engine.raw_connection()
    finished = False
    try:
        conn = raw.driver_connection
        prev = GENESIS_HASH
        if lo > 0:
            row = conn.execute("SELECT entry_hash FROM ledger_entries WHERE seq = %s", (lo,)).fetchone()
            if row is None:  # the range before this one ends short and reports the gap first
                return VerifyResult(False, 0, lo - 1, "", lo, f"entry seq {lo} is missing")
            prev = row[0]
        copy_cm = conn.cursor().copy(_segment_query(lo, hi))
        result = verify_lines(copy_cm.__enter__(), lo + 1, prev, conn.info.encoding)
        if result.ok:  # read to the end: finish the COPY normally
            copy_cm.__exit__(None, None, None)
            finished = True
        return result
    finally:
        # A COPY stopped at a bad entry leaves the connection mid-stream: drop it, never pool it.
        raw.close() if finished else raw.invalidate()


def verify_segment(url: str, lo: int, hi: int | None) -> VerifyResult:
    """Verify entries (lo, hi] (to the end when ``hi`` is None), anchored at entry ``lo``'s stored hash."""
    from .db import make_engine

    engine = make_engine(url, pool_size=1)
    try:
        return _verify_range(engine, lo, hi)
    finally:
        engine.dispose()


def verify(engine: Engine, *, workers: int = 1, min_entries_per_worker: int = 1) -> VerifyResult:
    """Verify the whole ledger over COPY, in up to ``workers`` processes."""
    with engine.connect() as conn:
        max_seq = conn.execute(text("SELECT coalesce(max(seq), 0) FROM ledger_entries")).scalar_one()
    parts = min(workers, max(1, max_seq // max(1, min_entries_per_worker)))
    if parts <= 1:
        return _verify_range(engine, 0, None)
    url = engine.url.render_as_string(hide_password=False)
    bounds = seq_bounds(0, max_seq, parts)
    # the last range runs to the end, as a single pass would
    results = map_in_processes(verify_segment, [(url, lo, hi if hi < max_seq else None) for lo, hi in bounds])
    total = 0
    for (lo, hi), part in zip(bounds, results):
        part.count += total
        if not part.ok:
            return part
        total = part.count
        if hi < max_seq and part.head_seq < hi:  # the chain ended inside this range: nothing follows
            break
    return VerifyResult(True, total, total, part.head_hash)
