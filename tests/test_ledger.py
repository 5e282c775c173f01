import itertools
import json

import pytest
from sqlalchemy import select, text
from sqlalchemy.exc import DBAPIError, IntegrityError

from kms_pipelines.core.foundation.db.append_only import create_append_only_triggers, drop_append_only_triggers
from kms_pipelines.core.foundation.db.models import LedgerEntry
from kms_pipelines.core.keys import lifecycle
from kms_pipelines.core.ledger import ledger, ledger_copy


def _rows(kms):
    with kms.engine.connect() as conn:
        return conn.execute(select(LedgerEntry).order_by(LedgerEntry.seq)).all()


def test_bootstrap_writes_a_verifiable_chain(kms):
    result = ledger.verify(kms.engine)
    assert result.ok and result.count == len(kms.policy.bootstrap_key_names())
    lifecycle.rotate(kms, "root", reason="manual")
    after = ledger.verify(kms.engine)
    assert after.ok and after.count == result.count + 2
    rows = _rows(kms)
    assert [r.seq for r in rows] == list(range(1, after.count + 1))
    assert all(r.prev_hash == p.entry_hash for p, r in itertools.pairwise(rows))


@pytest.mark.parametrize(
    "statement",
    [
        "UPDATE ledger_entries SET actor = 'mallory' WHERE seq = 2",
        "DELETE FROM ledger_entries WHERE seq = 2",
    ],
)
def test_triggers_refuse_update_and_delete(kms, statement):
    before = _rows(kms)
    with pytest.raises((DBAPIError, IntegrityError)) as err:
        with kms.engine.begin() as conn:
            conn.execute(text(statement))
    assert "append-only" in str(err.value)
    assert _rows(kms) == before


def _tamper(kms, statement):
    """Play a database admin: bypass the triggers, change a row, restore the triggers."""
    with kms.engine.begin() as conn:
        drop_append_only_triggers(conn, "ledger_entries")
        conn.execute(text(statement))
        create_append_only_triggers(conn, "ledger_entries")


def _verify(kms):
    """``ledger.verify``; on PostgreSQL (the C kernel by default) the pure-Python path must agree."""
    result = ledger.verify(kms.engine)
    if kms.engine.dialect.name == "postgresql":
        assert result.verifier == "copy-c"
        assert ledger_copy.verify(kms.engine, force_python=True) == result
    return result


def test_verify_names_the_first_altered_entry(kms):
    _tamper(kms, "UPDATE ledger_entries SET actor = 'mallory' WHERE seq = 4")
    result = _verify(kms)
    assert not result.ok and result.first_bad_seq == 4 and "altered" in result.problem
    assert result.count == 3


def test_verify_names_a_deleted_entry(kms):
    _tamper(kms, "DELETE FROM ledger_entries WHERE seq = 5")
    result = _verify(kms)
    assert not result.ok and result.first_bad_seq == 5 and "missing" in result.problem


def test_verify_catches_a_broken_link_with_a_recomputed_hash(kms):
    rows = _rows(kms)
    target = rows[6]
    doc = ledger.entry_document(
        target.seq,
        target.at,
        "root",
        target.key_version,
        target.from_state,
        "destroyed",
        target.actor,
        json.loads(target.approvers),
        target.change_ticket,
        target.reason,
        target.event_id,
        target.prev_hash,
    )
    # The admin recomputes this entry's own hash; the next entry's link now breaks.
    _tamper(
        kms,
        f"UPDATE ledger_entries SET key_name='root', to_state='destroyed', "
        f"entry_hash='{ledger.entry_hash(doc)}' WHERE seq = {target.seq}",
    )
    result = _verify(kms)
    assert not result.ok and result.first_bad_seq == target.seq + 1 and "does not link" in result.problem


def test_truncation_is_caught_against_an_expected_head(kms):
    full = ledger.verify(kms.engine)
    _tamper(kms, f"DELETE FROM ledger_entries WHERE seq = {full.count}")
    with kms.engine.connect() as conn:
        result = ledger.verify_rows(ledger.iter_rows(conn), expected_head=(full.count, full.head_hash))
    assert not result.ok and "truncated" in result.problem
