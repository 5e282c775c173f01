"""The COPY verifier (core/ledger/ledger_copy) against the row-by-row reference (ledger.verify_streamed).

1. Property: the document built from COPY's text (``ledger_copy.document`` over
   ``COLUMNS_SQL``, through COPY's escapes and PostgreSQL's ``to_char``) is byte-identical
   to ``ledger.row_canonical`` for every representable timestamp, any Unicode text, NULLs
   and both integer ranges.
2. Every way an insider can tamper with the ledger (the cases of test_ledger, test_cli,
   test_compliance and test_checkpoints, plus escapes and segment boundaries) gives the
   same VerifyResult — same first bad seq, problem, count and head — on both paths, in one
   process and split over three, on the C kernel and on the pure-Python path.
3. The C kernel (``_chain_c``) against the pure-Python path over COPY lines of random chains,
   intact and with any single byte changed; it decides the common row itself (only the rows
   the Python path sends to ``split_line`` go back to Python) and names a changed hash, prev,
   seq or field at its seq.
"""

from __future__ import annotations

import base64
import hashlib
import itertools
import json
from datetime import UTC, datetime, timedelta

import psycopg
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import text
from sqlalchemy.orm import Session

from kms_pipelines.core.foundation import db
from kms_pipelines.core.foundation.db.append_only import create_append_only_triggers, drop_append_only_triggers
from kms_pipelines.core.foundation.partitions import seq_bounds
from kms_pipelines.core.ledger import ledger, ledger_copy

# Text PostgreSQL can store: no NUL, no lone surrogates.
_text = st.text(st.characters(exclude_categories=("Cs",), exclude_characters="\x00"), max_size=40)
_moments = st.datetimes(min_value=datetime(1, 1, 1), max_value=datetime(9999, 12, 31, 23, 59, 59, 999999))


def _rows_of(text):
    return st.tuples(
        st.integers(1, 2**63 - 1),
        _moments,
        text,
        st.none() | st.integers(-(2**31), 2**31 - 1),
        st.none() | text,
        text,
        text,
        text,
        st.none() | text,
        st.none() | text,
        st.none() | text,
        st.text("0123456789abcdef", max_size=64),
    )


_row = _rows_of(_text)
# Rows with no byte that COPY or JSON escapes (the C kernel's own rows), and some that have one.
_plain = st.text(st.characters(exclude_categories=("Cs", "Cc"), exclude_characters='"\\'), max_size=40)
_kernel_row = _rows_of(_plain) | _row

_ROW_SQL = (
    f"SELECT {ledger_copy.COLUMNS_SQL} FROM (SELECT (%s)::bigint AS seq, %s::timestamptz AS at, %s::varchar AS key_name, "
    "(%s)::integer AS key_version, %s::varchar AS from_state, %s::varchar AS to_state, %s::varchar AS actor, "
    "%s::text AS approvers, %s::varchar AS change_ticket, %s::text AS reason, %s::varchar AS event_id, "
    "%s::varchar AS prev_hash, %s::varchar AS entry_hash) t"
)


@pytest.fixture
def pg_conn(pg_url):
    engine = db.make_engine(pg_url)
    with psycopg.connect(ledger_copy.conninfo(engine), autocommit=True) as conn:
        conn.execute("SET client_encoding TO 'UTF8'")
        conn.execute("SET TimeZone TO 'America/St_Johns'")  # a non-UTC session must not matter
        yield conn
    engine.dispose()


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(row=_row)
def test_server_document_is_byte_identical_to_python_canonical(pg_conn, row):
    seq, naive, key, version, frm, to, actor, approvers, ticket, reason, event, prev = row
    at = naive.replace(tzinfo=UTC)
    expected = ledger.row_canonical(seq, at, key, version, frm, to, actor, approvers, ticket, reason, event, prev)
    digest = hashlib.sha256(expected).hexdigest()
    params = (seq, at, key, version, frm, to, actor, approvers, ticket, reason, event, prev, digest)
    with pg_conn.cursor().copy(f"COPY ({_ROW_SQL}) TO STDOUT", params) as copy:
        lines = [bytes(line) for line in copy]
    assert len(lines) == 1
    fields, null = ledger_copy.split_line(lines[0][:-1].decode())
    assert ledger_copy.document(*fields[:12], null) == expected
    # and the verifier's inlined common case agrees (the line as the first entry after seq - 1),
    # on the C kernel and in Python
    for force_python in (False, True):
        result = ledger_copy.verify_lines(lines, expected_seq=seq, prev=prev, force_python=force_python)
        assert result == ledger.VerifyResult(True, 1, seq, digest)
        assert result.verifier == ("copy-python" if force_python else "copy-c")


def _outcome(lines, seq, prev, force_python):
    """verify_lines' result, or the exception it raised (type and message), for comparing paths."""
    try:
        return ledger_copy.verify_lines(lines, expected_seq=seq, prev=prev, force_python=force_python)
    except Exception as exc:  # any exception must be the same on both paths
        return type(exc), str(exc)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(rows=st.lists(_kernel_row, min_size=1, max_size=4), data=st.data())
def test_c_kernel_and_python_agree_on_random_chains_and_any_changed_byte(pg_conn, rows, data):
    first_seq, first_prev = min(rows[0][0], 2**63 - len(rows)), rows[0][11]
    lines, prev = [], first_prev
    for i, (_seq, naive, key, version, frm, to, actor, approvers, ticket, reason, event, _prev) in enumerate(rows):
        seq, at = first_seq + i, naive.replace(tzinfo=UTC)
        raw = ledger.row_canonical(seq, at, key, version, frm, to, actor, approvers, ticket, reason, event, prev)
        digest = hashlib.sha256(raw).hexdigest()
        params = (seq, at, key, version, frm, to, actor, approvers, ticket, reason, event, prev, digest)
        with pg_conn.cursor().copy(f"COPY ({_ROW_SQL}) TO STDOUT", params) as copy:
            lines += [bytes(line) for line in copy]
        prev = digest
    intact = ledger.VerifyResult(True, len(rows), first_seq + len(rows) - 1, prev)
    assert _outcome(lines, first_seq, first_prev, False) == intact == _outcome(lines, first_seq, first_prev, True)
    i = data.draw(st.integers(0, len(lines) - 1), label="line")
    pos = data.draw(st.integers(0, len(lines[i]) - 1), label="byte")
    new = data.draw(st.integers(0, 255).filter(lambda b: b != lines[i][pos]), label="value")
    changed = [*lines[:i], lines[i][:pos] + bytes([new]) + lines[i][pos + 1 :], *lines[i + 1 :]]
    c_side = _outcome(changed, first_seq, first_prev, False)
    assert c_side == _outcome(changed, first_seq, first_prev, True)
    if isinstance(c_side, ledger.VerifyResult):
        assert c_side.verifier == "copy-c"


def _grow(kms, n=30):
    """Append entries whose text needs every escape (quotes, backslash, tab, newline, Unicode)."""
    start = kms.clock.now()
    with Session(kms.engine) as s, s.begin():
        for i in range(n):
            ledger.append(
                s,
                at=start + timedelta(seconds=i, microseconds=i * 7),
                key_name=f"service:svc-{i % 4}",
                key_version=i + 1 if i % 5 else None,
                from_state="active" if i % 3 else None,
                to_state="rotated",
                actor="dagster" if i % 2 else 'o\'brien "x"\\y',
                approvers=["bob", "alice"] if i % 4 == 0 else [],
                change_ticket=f"CHG-{i}" if i % 6 == 0 else None,
                reason="tab\there\nnewline, ünïcødé ✓ \x01" if i % 7 == 0 else "cadence",
                event_id=f"ev-{i}" if i % 9 == 0 else None,
            )


def _tamper(kms, statement):
    with kms.engine.begin() as conn:
        drop_append_only_triggers(conn, "ledger_entries")
        conn.execute(text(statement))
        create_append_only_triggers(conn, "ledger_entries")


def _recomputed(kms, seq, **changes):
    """An UPDATE that changes entry ``seq`` and recomputes its own hash (the next link breaks)."""
    with kms.engine.connect() as conn:
        r = conn.execute(text("SELECT * FROM ledger_entries WHERE seq = :s"), {"s": seq}).mappings().one()
    r = {**r, **changes}
    doc = ledger.entry_document(
        r["seq"],
        r["at"],
        r["key_name"],
        r["key_version"],
        r["from_state"],
        r["to_state"],
        r["actor"],
        json.loads(r["approvers"]),
        r["change_ticket"],
        r["reason"],
        r["event_id"],
        r["prev_hash"],
    )
    sets = ", ".join(f"{k} = '{v}'" for k, v in changes.items())
    return f"UPDATE ledger_entries SET {sets}, entry_hash = '{ledger.entry_hash(doc)}' WHERE seq = {seq}"


# Placeholders: {b} is the first seq of the second of three ranges, {last} the head.
TAMPERS = {
    "actor": "UPDATE ledger_entries SET actor = 'mallory' WHERE seq = 4",
    "actor_seq2": "UPDATE ledger_entries SET actor = 'mallory' WHERE seq = 2",
    "reason": "UPDATE ledger_entries SET reason = 'nothing to see' WHERE seq = 3",
    "reason_tab_backslash": "UPDATE ledger_entries SET reason = E'a\\tb\\\\c\\nd' WHERE seq = {b}",
    "approvers_raw_tab": "UPDATE ledger_entries SET approvers = E'[\"al\\tice\"]' WHERE seq = {b}",
    "at_microsecond": "UPDATE ledger_entries SET at = at + interval '1 microsecond' WHERE seq = {last}",
    "ticket_literal_backslash_N": "UPDATE ledger_entries SET change_ticket = E'\\\\N' WHERE seq = {b}",
    "version_null": "UPDATE ledger_entries SET key_version = NULL WHERE seq = {b}",
    "ticket_set": "UPDATE ledger_entries SET change_ticket = 'CHG-0' WHERE seq = 1",
    "event_set": "UPDATE ledger_entries SET event_id = 'ev' WHERE seq = {b1}",
    "delete_mid": "DELETE FROM ledger_entries WHERE seq = 5",
    "delete_first": "DELETE FROM ledger_entries WHERE seq = 1",
    "delete_boundary_end": "DELETE FROM ledger_entries WHERE seq = {b0}",
    "delete_boundary_start": "DELETE FROM ledger_entries WHERE seq = {b}",
    "delete_last": "DELETE FROM ledger_entries WHERE seq = {last}",
    "delete_tail": "DELETE FROM ledger_entries WHERE seq > {b}",
    "reorder": "UPDATE ledger_entries SET seq = -seq WHERE seq IN ({b0}, {b}); "
    "UPDATE ledger_entries SET seq = CASE WHEN seq = -{b0} THEN {b} ELSE {b0} END WHERE seq < 0",
    "hash_forged": "UPDATE ledger_entries SET entry_hash = 'x' || seq WHERE seq >= {b}",
    "prev_forged": "UPDATE ledger_entries SET prev_hash = repeat('0', 64) WHERE seq = {b}",
    # a row below seq 1 (a forged history entry that key-history queries list first)
    "insert_seq0": "INSERT INTO ledger_entries (seq, at, key_name, key_version, from_state, to_state, actor, "
    "approvers, change_ticket, reason, event_id, prev_hash, entry_hash) SELECT 0, (SELECT max(at) FROM ledger_entries), key_name, key_version, "
    "from_state, 'destroyed', 'mallory', approvers, change_ticket, reason, event_id, prev_hash, repeat('e', 64) "
    "FROM ledger_entries WHERE seq = 1",
    "insert_negative": "INSERT INTO ledger_entries (seq, at, key_name, key_version, from_state, to_state, actor, "
    "approvers, change_ticket, reason, event_id, prev_hash, entry_hash) SELECT -{b}, (SELECT max(at) FROM ledger_entries), key_name, key_version, "
    "from_state, to_state, actor, approvers, change_ticket, reason, event_id, prev_hash, repeat('e', 64) "
    "FROM ledger_entries WHERE seq = {b}",
    # times Python's datetime cannot hold: the row-by-row reference must name them, not raise DataError
    "at_same_date_bc": "UPDATE ledger_entries SET at = at - interval '4051 years' WHERE seq = {b}",
    "at_earliest_bc": "UPDATE ledger_entries SET at = '4713-01-01 00:00:00+00 BC' WHERE seq = 2",
    "at_year_10000": "UPDATE ledger_entries SET at = at + interval '8000 years' WHERE seq = {b1}",
    "at_infinity": "UPDATE ledger_entries SET at = 'infinity' WHERE seq = {last}",
    "at_minus_infinity": "UPDATE ledger_entries SET at = '-infinity' WHERE seq = 3",
    "recomputed_link_break": None,  # built from the row (test_ledger's recomputed-hash case)
    "recomputed_at_boundary": None,
}


def _tampered_kms(make_kms, case):
    kms = make_kms("postgres")
    _grow(kms)
    full = ledger.verify_streamed(kms.engine)
    assert full.ok
    last = full.count
    b = seq_bounds(0, last, 3)[1][0] + 1
    marks = {"b": b, "b0": b - 1, "b1": b + 1, "last": last}
    if case == "recomputed_link_break":
        statement = _recomputed(kms, 7, key_name="root", to_state="destroyed")
    elif case == "recomputed_at_boundary":
        statement = _recomputed(kms, b - 1, actor="mallory")
    else:
        statement = TAMPERS[case].format(**marks)
    _tamper(kms, statement)
    return kms


@pytest.mark.parametrize("path", ["c", "python"])
@pytest.mark.parametrize("case", list(TAMPERS))
def test_copy_verifier_names_the_same_first_bad_seq(make_kms, monkeypatch, case, path):
    kms = _tampered_kms(make_kms, case)
    reference = ledger.verify_streamed(kms.engine)
    one = ledger_copy.verify(kms.engine, workers=1, force_python=path == "python")
    three = ledger_copy.verify(kms.engine, workers=3, force_python=path == "python")
    assert one == reference and three == reference
    assert one.verifier == three.verifier == f"copy-{path}"
    if path == "c":  # the kernel's blocks end anywhere in the chain: blocks of a row or two
        monkeypatch.setattr(ledger_copy, "_BLOCK", 300)
        assert ledger_copy.verify(kms.engine, workers=1) == reference
    if case not in ("delete_last", "delete_tail"):  # a truncated head is caught by checkpoints, not the chain
        assert not reference.ok and reference.first_bad_seq is not None


def test_copy_verifier_agrees_on_an_intact_ledger(make_kms):
    kms = make_kms("postgres")
    _grow(kms)
    reference = ledger.verify_streamed(kms.engine)
    assert reference.ok
    assert ledger.verify(kms.engine) == reference
    for workers in (1, 2, 3, 7):
        assert ledger_copy.verify(kms.engine, workers=workers) == reference
        assert ledger_copy.verify(kms.engine, workers=workers, force_python=True) == reference


def test_a_null_in_a_required_column_is_reported_as_altered(make_kms):
    """An insider who also drops NOT NULL: the row-by-row path crashes on it; COPY names the seq."""
    kms = make_kms("postgres")
    _grow(kms)
    with kms.engine.begin() as conn:
        conn.execute(text("ALTER TABLE ledger_entries ALTER COLUMN actor DROP NOT NULL"))
    _tamper(kms, "UPDATE ledger_entries SET actor = NULL WHERE seq = 3")
    for workers, force_python in itertools.product((1, 3), (False, True)):
        result = ledger_copy.verify(kms.engine, workers=workers, force_python=force_python)
        assert not result.ok and result.first_bad_seq == 3 and "altered" in result.problem and result.count == 2


def test_an_unformattable_timestamp_is_reported_as_altered(make_kms):
    """'infinity' has no RFC 3339 form (nor a Python datetime): both verifiers name its seq."""
    kms = make_kms("postgres")
    _tamper(kms, "UPDATE ledger_entries SET at = 'infinity' WHERE seq = 2")
    reference = ledger.verify_streamed(kms.engine)
    assert not reference.ok and reference.first_bad_seq == 2 and "altered" in reference.problem
    assert reference.count == 1
    for workers, force_python in itertools.product((1, 2), (False, True)):
        assert ledger_copy.verify(kms.engine, workers=workers, force_python=force_python) == reference


def test_the_row_verifier_reads_year_one_in_any_session_time_zone(make_kms):
    """Year 1 UTC is BC in a session west of UTC: the row-by-row verifier reads times in UTC, so
    an entry hashed at 0001-01-01T00:00:00Z (recomputed by an insider) is no DataError there."""
    from sqlalchemy import create_engine

    kms = make_kms("postgres")
    _grow(kms, 4)
    last = ledger.verify_streamed(kms.engine).count
    _tamper(kms, _recomputed(kms, last, at=datetime(1, 1, 1, tzinfo=UTC)))
    west = create_engine(kms.engine.url, connect_args={"options": "-c timezone=America/New_York"})
    try:
        with west.connect() as conn:  # the stored time really is BC in this session
            shown = conn.execute(text(f"SELECT at::text FROM ledger_entries WHERE seq = {last}")).scalar_one()
        assert shown.endswith(" BC")
        reference = ledger.verify_streamed(west)
    finally:
        west.dispose()
    assert reference == ledger.verify_streamed(kms.engine) == ledger_copy.verify(kms.engine, force_python=True)
    assert reference.ok and reference.count == last  # the recomputed head is the checkpoints' to catch


def _copy_lines(kms):
    """The ledger's COPY text lines, as the verifier reads them."""
    with psycopg.connect(ledger_copy.conninfo(kms.engine)) as conn:
        with conn.cursor().copy(ledger_copy._segment_query(0, None)) as copy:
            return [bytes(line) for line in copy]


def _needs_python(line):
    """The rows ``_chain`` sends to ``split_line``/``document`` (its two escape searches)."""
    return bool(ledger_copy._COPY_ESCAPE(line) or ledger_copy._JSON_ESCAPE(line, line.find(b"\t")))


def test_the_c_kernel_decides_every_row_but_those_python_escapes(make_kms):
    assert ledger_copy.c_kernel_built(), "the C kernel is not built: pip install -e . (needs gcc, libssl-dev)"
    kms = make_kms("postgres")
    _grow(kms)
    lines = _copy_lines(kms)
    escaped = sum(map(_needs_python, lines))
    assert 0 < escaped < len(lines)
    reference = ledger.verify_streamed(kms.engine)
    by_block = ledger_copy._CChain(1, ledger.GENESIS_HASH)  # as copy_expert feeds it
    for line in lines:
        by_block.write(line)
    assert by_block.finish() == reference and by_block.deferred == escaped
    by_row = ledger_copy._CChain(1, ledger.GENESIS_HASH)  # as verify_lines does
    for line in lines:
        by_row.write_row(line)
    assert by_row.result() == reference and by_row.deferred == escaped


def _field(line, index, value):
    fields = line[:-1].split(b"\t")
    fields[index] = value
    return b"\t".join(fields) + b"\n"


@pytest.mark.parametrize(
    "change, problem",
    [
        (lambda line: _field(line, 12, b"0" * 64), "was altered"),  # stored hash
        (lambda line: _field(line, 7, b"f" * 64), "does not link"),  # prev
        (lambda line: _field(line, 1, b"999"), "is missing"),  # seq
        (lambda line: _field(line, 2, b"mallory"), "was altered"),  # actor
        (lambda line: _field(line, 3, line.split(b"\t")[3].replace(b"Z", b"1Z")), "was altered"),  # at
        (lambda line: _field(line, 11, b"\\N"), "was altered"),  # version to NULL
        (lambda line: _field(line, 6, b"\\N"), "was altered"),  # a NOT NULL column to NULL
    ],
)
def test_the_c_kernel_names_a_changed_row_at_its_seq(make_kms, change, problem):
    kms = make_kms("postgres")
    _grow(kms)
    lines = _copy_lines(kms)
    # the tenth row the kernel decides alone (no escape): the change is the kernel's to find
    target = [i for i, line in enumerate(lines) if not _needs_python(line)][9]
    changed = [*lines[:target], change(lines[target]), *lines[target + 1 :]]
    assert not _needs_python(changed[target])
    result = ledger_copy.verify_lines(changed)
    assert result.verifier == "copy-c"
    assert not result.ok and result.first_bad_seq == target + 1 and problem in result.problem
    assert result.count == target
    assert result == ledger_copy.verify_lines(changed, force_python=True)


def test_without_the_c_kernel_the_python_path_runs_and_says_so(make_kms, monkeypatch, caplog):
    kms = make_kms("postgres")
    _grow(kms)
    reference = ledger.verify_streamed(kms.engine)
    assert ledger_copy.verify(kms.engine).verifier == "copy-c"
    monkeypatch.setenv(ledger_copy.FORCE_PYTHON_ENV, "1")
    assert ledger_copy.verify(kms.engine).verifier == "copy-python"
    monkeypatch.delenv(ledger_copy.FORCE_PYTHON_ENV)
    monkeypatch.setattr(ledger_copy, "_chain_c", None)  # as on a machine with no compiler
    with caplog.at_level("WARNING", logger=ledger_copy.__name__):
        result = ledger.verify(kms.engine)
    assert result == reference and result.verifier == "copy-python"
    assert "pure-Python path" in caplog.text and "not built" in caplog.text


def test_what_the_kernel_cannot_hold_goes_to_python_with_the_same_verdicts(make_kms):
    """A prev hash longer than the kernel's buffer (an insider who also widened entry_hash) and
    seqs past int64: every row then goes through the Python path, with the Python verdicts."""
    kms = make_kms("postgres")
    _grow(kms)
    lines = _copy_lines(kms)
    long_prev = "ab" * 200
    first = _field(lines[0], 7, long_prev.encode())
    for start, prev, rows in [(1, long_prev, [first, *lines[1:]]), (2**63, ledger.GENESIS_HASH, lines)]:
        c_side = ledger_copy.verify_lines(rows, expected_seq=start, prev=prev)
        assert c_side == ledger_copy.verify_lines(rows, expected_seq=start, prev=prev, force_python=True)
        assert c_side.verifier == "copy-c"
    # the first case: entry 1 links to the long prev but its hash was computed over the real one
    assert ledger_copy.verify_lines([first], prev=long_prev).first_bad_seq == 1


def test_a_timestamp_moved_to_the_same_date_bc_is_reported_as_altered(make_kms):
    """to_char's YYYY prints 2026 BC as 2026: without a guard the COPY document of a row moved
    back 4051 years is byte-identical to the hashed one, and the verifier says ok."""
    kms = make_kms("postgres")
    _grow(kms, 12)
    _tamper(kms, "UPDATE ledger_entries SET at = at - interval '4051 years' WHERE seq = 5")
    with kms.engine.connect() as conn:  # the stored year really is BC now
        assert conn.execute(text("SELECT to_char(at, 'BC') FROM ledger_entries WHERE seq = 5")).scalar_one() == "BC"
    for workers, force_python in itertools.product((1, 3), (False, True)):
        result = ledger_copy.verify(kms.engine, workers=workers, force_python=force_python)
        assert not result.ok and result.first_bad_seq == 5 and "altered" in result.problem and result.count == 4


def test_a_null_hash_at_a_range_boundary_is_reported_not_raised(make_kms):
    """An insider who drops NOT NULL on entry_hash and blanks the entry a later range starts
    from: the verdict names that entry (the range before it finds it altered)."""
    kms = make_kms("postgres")
    _grow(kms, 12)
    b0 = seq_bounds(0, ledger.verify_streamed(kms.engine).count, 3)[1][0]  # the second range starts from its hash
    with kms.engine.begin() as conn:
        conn.execute(text("ALTER TABLE ledger_entries ALTER COLUMN entry_hash DROP NOT NULL"))
    _tamper(kms, f"UPDATE ledger_entries SET entry_hash = NULL WHERE seq = {b0}")
    for workers, force_python in itertools.product((1, 3), (False, True)):
        result = ledger_copy.verify(kms.engine, workers=workers, force_python=force_python)
        assert not result.ok and result.first_bad_seq == b0 and "altered" in result.problem and result.count == b0 - 1


@pytest.mark.parametrize(
    "statement, bad_seq",
    [
        ("UPDATE ledger_entries SET at = at - interval '4051 years' WHERE seq = 6", 6),  # same date, BC
        ("UPDATE ledger_entries SET reason = E'tab\\there\\\\back\\nline\\r\\b\\f\\v\\\\N' WHERE seq = 4", 4),
        (TAMPERS["insert_seq0"], 1),
    ],
)
def test_kms_ledger_verify_names_the_same_first_bad_seq_on_both_verifiers(
    make_kms, master_key, monkeypatch, tmp_path, statement, bad_seq
):
    """End to end, as an operator runs it: the command on the C kernel and with
    KMS_LEDGER_VERIFY_PYTHON=1 after an insider's direct SQL."""
    from click.testing import CliRunner

    from kms_pipelines.cli import cli

    monkeypatch.setenv("KMS_HOME", str(tmp_path / "home"))
    kms = make_kms("postgres")
    _grow(kms, 8)
    _tamper(kms, statement)
    env = {
        "KMS_DATABASE_URL": kms.engine.url.render_as_string(hide_password=False),
        "KMS_MASTER_KEY": base64.b64encode(master_key).decode(),
    }
    reports = {}
    for verifier, extra in (("copy-c", {}), ("copy-python", {ledger_copy.FORCE_PYTHON_ENV: "1"})):
        out = CliRunner().invoke(cli, ["ledger", "verify", "--json"], env={**env, **extra})
        assert out.exit_code == 1, out.output
        reports[verifier] = json.loads(out.stdout)
        assert reports[verifier].pop("verifier") == verifier
        assert reports[verifier]["ok"] is False and reports[verifier]["first_bad_seq"] == bad_seq
    assert reports["copy-c"] == reports["copy-python"]


# Crafted changes to one COPY row: what a naive parser would take as valid, or misparse.
_SEQ_TEXT = [b"0%d", b"00%d", b"+%d", b" %d", b"%d ", b"-%d", b"%d_0", b"%d.0", b"\\N", b"", b"-", b"-0"]
_BIG_SEQS = [
    b"9" * 18,
    b"9" * 19,
    b"-" + b"9" * 18,
    b"9223372036854775807",
    b"9223372036854775808",
    b"-9223372036854775808",
]
_SUFFIXES = [b"\x00", b"\xff", b"\xc3", b"\\", b"\\t", b"\\N", b"\\\\", b'"', b"\x1f", b"\r", b"\n"]


def _craft(rnd, line):
    fields = line[:-1].split(b"\t")
    kind = rnd.randrange(12) if len(fields) == 13 else 10  # after a change of the field count: any byte
    if kind == 0:  # seq text: leading zeros, signs, spaces, huge
        fields[1] = rnd.choice(_SEQ_TEXT).replace(b"%d", fields[1]) if rnd.random() < 0.7 else rnd.choice(_BIG_SEQS)
    elif kind == 1:  # stored hash: upper case, a prefix, one more digit, NULL, empty
        h = fields[12]
        fields[12] = rnd.choice([h.upper(), h[:63], h + b"0", h[:32] + h[32:].upper(), b"\\N", b""])
    elif kind == 2:  # prev: a prefix of the real one, upper case, NULL
        p = fields[7]
        fields[7] = rnd.choice([p[:63], p[:1], p.upper(), p + b"\\N", b"\\N", b""])
    elif kind == 3:  # 14 fields
        fields.insert(rnd.randrange(14), rnd.choice([b"", b"x", b"\\N"]))
    elif kind == 4:  # 12 fields
        del fields[rnd.randrange(13)]
    elif kind == 5:  # a byte a parser must not pass through, at the end of any field
        j = rnd.randrange(13)
        fields[j] += rnd.choice(_SUFFIXES)
    elif kind == 6:  # rows around the kernel's row limit (7000 bytes) and far beyond it
        fields[rnd.choice([2, 4, 5, 6, 8, 9, 10])] = b"a" * rnd.choice([6700, 6800, 6850, 6900, 7000, 20000])
    elif kind == 7:  # approvers: a tab escape, a NULL, a raw control byte, a trailing backslash
        fields[0] = rnd.choice([b'["x\\t"]', b"\\N", b'["\x01"]', b"\\\\N", fields[0] + b"\\"])
    elif kind == 8:  # version: NULL, leading zero, empty, not an integer
        fields[11] = rnd.choice([b"\\N", b"0" + fields[11], b"", b"1e3"])
    elif kind == 9:  # a NOT NULL column made NULL
        fields[rnd.choice([0, 2, 3, 6, 10])] = b"\\N"
    else:  # any byte
        raw = bytearray(b"\t".join(fields))
        raw[rnd.randrange(len(raw))] = rnd.randrange(256)
        return bytes(raw) + b"\n"
    return b"\t".join(fields) + b"\n"


def _rehashed(line):
    """The row with its stored hash recomputed over the Python path's document (an insider
    who rewrote a row and its hash): the kernel must build that same document."""
    try:
        fields, null = ledger_copy.split_line(line[:-1].decode())
        raw = ledger_copy.document(*fields[:12], null) if len(fields) == 13 else None
    except (UnicodeDecodeError, TypeError):
        return line
    if raw is None:
        return line
    return line[:-1].rsplit(b"\t", 1)[0] + b"\t" + hashlib.sha256(raw).hexdigest().encode() + b"\n"


def _block_outcome(rows, seq, prev):
    """The kernel fed as copy_expert feeds it (a row per write, blocks of ~300 bytes so they
    end anywhere in the chain); the result or the exception raised."""
    try:
        return ledger_copy._run(True, seq, prev, lambda write: [write(row) for row in rows])
    except Exception as exc:
        return type(exc), str(exc)


def test_c_kernel_and_python_agree_on_crafted_rows_row_by_row_and_by_block(make_kms, monkeypatch):
    """Seeded differential fuzzing of the kernel's two entry points (kms_chain_row through
    verify_lines, kms_chain_feed through COPY blocks) against the Python path, over real COPY
    rows (every escape) with up to three crafted changes and arbitrary start points."""
    import random

    kms = make_kms("postgres")
    _grow(kms)
    lines = _copy_lines(kms)
    hashes = [ledger.GENESIS_HASH] + [line[:-1].rsplit(b"\t", 1)[1].decode() for line in lines]
    monkeypatch.setattr(ledger_copy, "_BLOCK", 300)
    rnd = random.Random(16)
    for _ in range(1500):
        lo = rnd.randrange(len(lines))
        rows = lines[lo : lo + rnd.randint(1, 6)]
        seq, prev = lo + 1, hashes[lo]
        if rnd.random() < 0.1:  # a caller's start the kernel cannot hold, or a wrong one
            seq, prev = rnd.choice([(2**63, prev), (-(2**63) - 1, prev), (seq + 1, prev), (seq, "ab" * 200)])
        for _ in range(rnd.choice([0, 1, 1, 2, 3])):
            i = rnd.choice([rnd.randrange(len(rows)), len(rows) - 1])
            rows = [*rows[:i], _craft(rnd, rows[i]), *rows[i + 1 :]]
        if rnd.random() < 0.7:  # the last row's hash made right for its changed content
            rows[-1] = _rehashed(rows[-1])
        if rnd.random() < 0.05:  # the stream ends mid-row (no newline)
            rows[-1] = rows[-1][: rnd.randrange(len(rows[-1]))] or b"x"
        python = _outcome(rows, seq, prev, True)
        assert _outcome(rows, seq, prev, False) == python, rows
        # by block: COPY's rows are split at newlines, so a crafted newline makes two rows
        *whole, tail = b"".join(rows).split(b"\n")
        copy_rows = [part + b"\n" for part in whole] + ([tail] if tail else [])
        block = _block_outcome(copy_rows, seq, prev)
        assert block == _outcome(copy_rows, seq, prev, True), copy_rows
        if isinstance(block, ledger.VerifyResult):
            assert block.verifier == "copy-c"
