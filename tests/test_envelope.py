"""Envelope encryption (P3, R3, T2): one DEK per object, the DEK inventory, the rewrap
sweep (batched, sharded, compare-and-set, resumable) and the ``deks`` destroy guard."""

import itertools
import threading

import pytest
from sqlalchemy import select, text

from kms_pipelines.core.envelope import data_keys as envelope
from kms_pipelines.core.foundation.db.models import KeyVersion
from kms_pipelines.core.foundation.db.models_envelope import SHARD_SPACE, Dek
from kms_pipelines.core.keys import lifecycle
from kms_pipelines.core.ledger import ledger
from kms_pipelines.core.runtime import nightly

KEY = "data:postgres"


def snapshot(kms):
    """What a refused operation must leave untouched: DEK rows, versions, ledger, keystore."""
    with kms.engine.connect() as conn:
        deks = conn.execute(
            select(Dek.id, Dek.key_name, Dek.key_version, Dek.wrapped, Dek.object_id, Dek.shredded_at).order_by(Dek.id)
        ).all()
        versions = conn.execute(
            select(KeyVersion.key_id, KeyVersion.version, KeyVersion.state).order_by(KeyVersion.id)
        ).all()
        head = ledger.head(conn)
    return deks, versions, head, sorted(kms.keystore.refs())


def fill(kms, n, key=KEY, prefix="obj"):
    return {
        f"{prefix}-{i}": (
            f"payload {i} ".encode() * (i % 5 + 1),
            envelope.encrypt(kms, key, f"{prefix}-{i}", f"payload {i} ".encode() * (i % 5 + 1)),
        )
        for i in range(n)
    }


def assert_all_decrypt(kms, objects):
    for object_id, (plain, blob) in objects.items():
        assert envelope.decrypt(kms, blob, object_id=object_id) == plain


def versions_of(kms, key=KEY):
    with kms.engine.connect() as conn:
        return dict(
            conn.execute(
                select(Dek.key_version, text("count(*)")).where(Dek.key_name == key).group_by(Dek.key_version)
            ).all()
        )


# ---- encrypt / decrypt -------------------------------------------------------------------


def test_encrypt_makes_one_dek_per_object_and_a_self_describing_blob(kms):
    plain = b"investor identity document \x00\xff" * 10
    blob = envelope.encrypt(kms, KEY, "doc-1", plain, b"tenant-7")
    assert blob[:4] == envelope.MAGIC and blob[4] == envelope.FORMAT
    dek_id = envelope.parse_header(blob)
    assert plain not in blob
    with kms.engine.connect() as conn:
        row = conn.execute(select(Dek).where(Dek.id == dek_id)).one()
    assert (row.key_name, row.key_version, row.object_id) == (KEY, 1, "doc-1")
    assert 0 <= row.shard < SHARD_SPACE and row.shard == envelope.shard_of(KEY, "doc-1")
    assert row.wrapped not in blob and len(row.wrapped) == 40  # AES-KWP of a 32-byte DEK
    assert envelope.decrypt(kms, blob, b"tenant-7") == plain
    assert envelope.decrypt(kms, blob, b"tenant-7", object_id="doc-1") == plain
    info = envelope.describe(kms, blob)
    assert (info.dek_id, info.key_name, info.key_version, info.version_state) == (dek_id, KEY, 1, "active")
    other = envelope.encrypt(kms, KEY, "doc-2", plain, b"tenant-7")
    assert envelope.parse_header(other) != dek_id and other[envelope.HEADER_SIZE :] != blob[envelope.HEADER_SIZE :]
    assert count_on(kms, 1) == 2


def count_on(kms, version, key=KEY):
    with kms.transaction() as session:
        return envelope.deks_on(session, key, version)


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda b: b[:-1] + bytes([b[-1] ^ 1]), "does not authenticate"),
        (lambda b: b[:20] + bytes([b[20] ^ 1]) + b[21:], "does not authenticate"),
        (lambda b: b"XXXX" + b[4:], "bad magic"),
        (lambda b: b[:4] + b"\x09" + b[5:], "unsupported envelope format 9"),
        (lambda b: b[:12], "too short"),
        (lambda b: b[:5] + (10**9).to_bytes(8, "big") + b[13:], "not in the inventory"),
    ],
)
def test_tampered_or_foreign_blobs_are_refused(kms, mutate, message):
    blob = envelope.encrypt(kms, KEY, "o", b"secret bytes")
    with pytest.raises(envelope.EnvelopeError, match=message) as err:
        envelope.decrypt(kms, mutate(blob))
    assert "secret" not in str(err.value)


def test_aad_binds_the_caller_data_and_the_object(kms):
    blob = envelope.encrypt(kms, KEY, "a", b"x", b"ctx-1")
    with pytest.raises(envelope.EnvelopeError, match="does not authenticate"):
        envelope.decrypt(kms, blob, b"ctx-2")
    with pytest.raises(envelope.EnvelopeError, match="belongs to object 'a', not 'b'"):
        envelope.decrypt(kms, blob, b"ctx-1", object_id="b")
    # Pointing the DEK row at another object id breaks the binding, too.
    with kms.engine.begin() as conn:
        conn.execute(text("UPDATE deks SET object_id = 'b' WHERE object_id = 'a'"))
    with pytest.raises(envelope.EnvelopeError, match="does not authenticate"):
        envelope.decrypt(kms, blob, b"ctx-1")


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda k: envelope.encrypt(k, "data:nope", "o", b"x"), "unknown key"),
        (lambda k: envelope.encrypt(k, "root", "o", b"x"), "root key"),
        (lambda k: envelope.encrypt(k, "service:api-gateway", "o", b"x"), "service key"),
        (lambda k: envelope.encrypt(k, KEY, "", b"x"), "object_id"),
        (lambda k: envelope.encrypt(k, KEY, "o" * 501, b"x"), "object_id"),
        (lambda k: envelope.encrypt(k, KEY, "o", "text"), "bytes"),
        (lambda k: envelope.encrypt(k, KEY, "existing", b"again"), "already has a DEK"),
        (lambda k: envelope.sweep(k, "data:nope"), "unknown key"),
        (lambda k: envelope.sweep(k, "export:x"), "never swept"),
        (lambda k: envelope.sweep(k, shard=4, shards=4), "out of range"),
        (lambda k: envelope.sweep(k, shards=0), "shards must be"),
        (lambda k: envelope.sweep(k, batch_size=0), "batch_size"),
    ],
)
def test_refusals_change_nothing(kms, call, message):
    envelope.encrypt(kms, KEY, "existing", b"first")
    lifecycle.rotate(kms, KEY)
    before = snapshot(kms)
    with pytest.raises(envelope.EnvelopeError, match=message):
        call(kms)
    assert snapshot(kms) == before


def test_replace_retires_the_old_dek(kms):
    old = envelope.encrypt(kms, KEY, "report", b"v1")
    new = envelope.encrypt(kms, KEY, "report", b"v2", replace=True)
    assert envelope.decrypt(kms, new) == b"v2"
    with pytest.raises(envelope.EnvelopeError, match="not in the inventory"):
        envelope.decrypt(kms, old)
    assert count_on(kms, 1) == 1


# ---- the sweep ---------------------------------------------------------------------------


def test_sweep_moves_every_dek_to_the_active_version_in_batches(kms):
    objects = fill(kms, 13, prefix="v1")
    lifecycle.rotate(kms, KEY)
    objects |= fill(kms, 9, prefix="v2")
    lifecycle.rotate(kms, KEY)
    objects |= fill(kms, 4, prefix="v3")
    other = fill(kms, 5, key="data:identity-documents")
    lifecycle.rotate(kms, "data:identity-documents")
    assert versions_of(kms) == {1: 13, 2: 9, 3: 4}
    seen = []
    result = envelope.sweep(kms, KEY, batch_size=5, progress=seen.append)
    assert (result.moved, result.remaining, result.failed, result.skipped) == (22, 0, 0, 0)
    assert result.batches == 3 + 2 and len(seen) == 5
    assert [p.total_moved for p in seen][-1] == 22 and {(p.from_version, p.to_version) for p in seen} == {
        (1, 3),
        (2, 3),
    }
    assert versions_of(kms) == {3: 26}
    assert versions_of(kms, "data:identity-documents") == {1: 5}  # only the named key
    assert_all_decrypt(kms, objects | other)
    again = envelope.sweep(kms, KEY, batch_size=5)
    assert (again.moved, again.batches, again.remaining) == (0, 0, 0)
    everything = envelope.sweep(kms)
    assert everything.moved == 5 and everything.remaining == 0
    assert_all_decrypt(kms, objects | other)
    with kms.engine.connect() as conn:
        assert conn.execute(text("SELECT count(*) FROM deks WHERE rewrapped_at IS NULL")).scalar() == 4


def test_a_revoked_version_refuses_to_decrypt_until_the_sweep_moves_its_deks(kms):
    objects = fill(kms, 6)
    lifecycle.rotate(kms, KEY, reason="compromise")
    lifecycle.revoke(kms, KEY, 1, reason="compromise")
    blob = objects["obj-0"][1]
    with pytest.raises(envelope.EnvelopeError, match="revoked version data:postgres v1"):
        envelope.decrypt(kms, blob)
    assert envelope.stranded(kms)[0].state == "revoked"
    result = envelope.sweep(kms)
    assert result.moved == 6 and result.remaining == 0 and envelope.stranded(kms) == []
    assert_all_decrypt(kms, objects)


def test_shards_partition_the_work(kms):
    objects = fill(kms, 24)
    lifecycle.rotate(kms, KEY)
    ranges = [envelope.shard_range(i, 3) for i in range(3)]
    assert ranges[0][0] == 0 and ranges[-1][1] == SHARD_SPACE
    assert all(a[1] == b[0] for a, b in itertools.pairwise(ranges))
    moved = []
    for i in range(3):
        r = envelope.sweep(kms, shard=i, shards=3, batch_size=4)
        moved.append(r.moved)
        with kms.engine.connect() as conn:
            left = conn.execute(text("SELECT shard FROM deks WHERE key_version = 1")).scalars().all()
        assert all(s >= ranges[i][1] for s in left)  # this shard and the ones before are done
    assert sum(moved) == 24 and sum(1 for m in moved if m) >= 2
    assert_all_decrypt(kms, objects)


def test_concurrent_sweeps_never_double_wrap(kms_pg):
    objects = fill(kms_pg, 60)
    lifecycle.rotate(kms_pg, KEY)
    results, errors = [], []

    def run():
        try:
            results.append(envelope.sweep(kms_pg, batch_size=4))
        except Exception as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=run) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert sum(r.moved for r in results) == 60  # each DEK moved exactly once (compare-and-set)
    assert all(r.remaining == 0 for r in results)
    assert versions_of(kms_pg) == {2: 60}
    assert_all_decrypt(kms_pg, objects)


def test_a_lost_compare_and_set_moves_nothing(kms):
    fill(kms, 3)
    lifecycle.rotate(kms, KEY)
    with kms.engine.connect() as conn:
        ids = conn.execute(select(Dek.id).order_by(Dek.id)).scalars().all()
    envelope.sweep(kms)
    before = snapshot(kms)
    # A slow sweeper that read the rows under v1 before they moved: its writes match nothing.
    assert envelope._commit_batch(kms, KEY, 1, 2, [(i, b"\x00" * 40) for i in ids]) == 0
    assert snapshot(kms) == before


def test_rotation_during_a_sweep_replans_onto_the_new_active_version(kms):
    objects = fill(kms, 20)
    lifecycle.rotate(kms, KEY)
    rotated = []

    def rotate_once(p):
        if not rotated:
            rotated.append(lifecycle.rotate(kms, KEY).new_version)

    result = envelope.sweep(kms, batch_size=4, progress=rotate_once)
    assert rotated == [3]
    assert result.remaining == 0 and versions_of(kms) == {3: 20}
    assert_all_decrypt(kms, objects)


def test_on_postgresql_two_batches_commit_at_once_on_their_own_connections(kms_pg, monkeypatch):
    # Observation only: the wrapper calls the real commit. A barrier of two in front of the
    # first two commits is passed only if both are in flight together; with one writer it
    # times out and the sweep fails.
    objects = fill(kms_pg, 24)
    lifecycle.rotate(kms_pg, KEY)
    real = envelope._commit_batch
    barrier = threading.Barrier(2, timeout=10)
    threads = []

    def observed(ctx, key_name, old, new, pairs):
        threads.append(threading.current_thread().name)
        if len(threads) <= 2:
            barrier.wait()
        return real(ctx, key_name, old, new, pairs)

    monkeypatch.setattr(envelope, "_commit_batch", observed)
    result = envelope.sweep(kms_pg, batch_size=4)
    assert (result.moved, result.remaining, result.skipped, result.batches) == (24, 0, 0, 6)
    assert len(set(threads[:2])) == 2 and all(t.startswith("kms-sweep-commit") for t in threads)
    assert versions_of(kms_pg) == {2: 24}
    assert_all_decrypt(kms_pg, objects)


def test_a_batch_that_committed_before_a_rotation_is_counted_when_an_earlier_one_goes_stale(kms_pg, monkeypatch):
    # The first batch's commit is held until the second has committed, then the key rotates
    # and the first commit finds its versions changed (stale). The second batch's DEKs did
    # move to v2, so they must be counted, and the re-planned sweep moves everything to v3.
    objects = fill(kms_pg, 12)
    lifecycle.rotate(kms_pg, KEY)
    real = envelope._commit_batch
    second_done = threading.Event()
    calls = []

    def ordered(ctx, key_name, old, new, pairs):
        calls.append((old, new, len(pairs)))
        if len(calls) == 1:
            assert second_done.wait(10), "the second batch never committed beside the first"
            lifecycle.rotate(ctx, KEY)
            return real(ctx, key_name, old, new, pairs)
        try:
            return real(ctx, key_name, old, new, pairs)
        finally:
            second_done.set()

    monkeypatch.setattr(envelope, "_commit_batch", ordered)
    result = envelope.sweep(kms_pg, batch_size=4)
    assert calls[:2] == [(1, 2, 4), (1, 2, 4)]
    assert result.remaining == 0 and result.skipped == 0
    assert result.moved == 12 + 4  # the second batch moved v1 -> v2, then again v2 -> v3
    assert versions_of(kms_pg) == {3: 12}
    assert_all_decrypt(kms_pg, objects)


def test_a_corrupt_dek_is_isolated_and_reported(kms):
    objects = fill(kms, 10)
    lifecycle.rotate(kms, KEY)
    with kms.engine.begin() as conn:
        bad_id = conn.execute(text("SELECT id FROM deks WHERE object_id = 'obj-3'")).scalar()
        conn.execute(text("UPDATE deks SET wrapped = :w WHERE id = :i"), {"w": b"\x01" * 40, "i": bad_id})
    result = envelope.sweep(kms, batch_size=4)
    assert (result.moved, result.failed, result.remaining, result.failed_ids) == (9, 1, 1, [bad_id])
    assert [(r.key, r.version, r.deks) for r in envelope.stranded(kms)] == [(KEY, 1, 1)]
    del objects["obj-3"]
    assert_all_decrypt(kms, objects)
    with pytest.raises(envelope.EnvelopeError, match="sweep left 1 DEK"):
        envelope.nightly_sweep(kms)


def test_max_batches_stops_and_a_rerun_resumes(kms):
    objects = fill(kms, 17)
    lifecycle.rotate(kms, KEY)
    first = envelope.sweep(kms, batch_size=5, max_batches=2)
    assert (first.moved, first.remaining) == (10, 7)
    assert_all_decrypt(kms, objects)  # half-swept: both versions still decrypt
    second = envelope.sweep(kms, batch_size=5)
    assert (second.moved, second.remaining) == (7, 0)
    assert_all_decrypt(kms, objects)


def test_sweep_under_pkcs11_rewraps_inside_the_token(make_kms, pkcs11_keystore):
    kms = make_kms("postgres", keystore=pkcs11_keystore)
    objects = fill(kms, 12)
    lifecycle.rotate(kms, KEY)
    result = envelope.sweep(kms, batch_size=5)
    assert (result.moved, result.remaining) == (12, 0)
    assert_all_decrypt(kms, objects)


# ---- destroy guard, inventory, nightly ---------------------------------------------------


def test_destroy_is_refused_while_deks_remain_and_names_the_guard(kms):
    objects = fill(kms, 3)
    lifecycle.rotate(kms, KEY)
    before = snapshot(kms)
    with pytest.raises(
        lifecycle.GuardRefused, match="guard 'deks': 3 DEK\\(s\\) are still wrapped under data:postgres v1"
    ) as err:
        lifecycle.destroy(kms, KEY, 1, reason="retire")
    assert err.value.guard == "deks"
    assert snapshot(kms) == before
    envelope.sweep(kms)
    with kms.transaction() as s:
        key = lifecycle.get_key(s, KEY)
        refusals = lifecycle.check_destroy(s, kms, key, lifecycle.get_version(key, 1))
    assert "deks" not in [g for g, _ in refusals]
    assert_all_decrypt(kms, objects)


def test_inventory_frame_has_no_key_material(kms):
    fill(kms, 4)
    lifecycle.rotate(kms, KEY)
    fill(kms, 2, prefix="new")
    frame = envelope.dek_inventory_frame(kms)
    assert list(frame.columns) == [
        "dek_id",
        "key_name",
        "key_class",
        "key_version",
        "version_state",
        "object_id",
        "shard",
        "created_at",
        "rewrapped_at",
        "shredded_at",
        "wrapped_len",
    ]
    assert len(frame) == 6 and set(frame["key_class"]) == {"data"}
    assert sorted(frame["version_state"].unique()) == ["active", "rotated"]
    assert (frame["wrapped_len"] == 40).all()
    for column in frame.columns:
        assert not frame[column].map(lambda v: isinstance(v, (bytes, bytearray, memoryview))).any()
    counts = envelope.inventory_counts(kms)
    assert [(c.version, c.state, c.deks) for c in counts] == [(1, "rotated", 4), (2, "active", 2)]


def test_nightly_steps_are_registered_in_order(kms):
    names = [(s.name, s.order) for s in nightly.steps()]
    assert ("envelope_sweep", 20) in names and ("export_expiry", 21) in names
    objects = fill(kms, 5)
    lifecycle.rotate(kms, KEY)
    summary = next(s for s in nightly.steps() if s.name == "envelope_sweep").run(kms)
    assert summary == {"moved": 5, "remaining": 0, "batches": 1}
    assert_all_decrypt(kms, objects)


def test_the_batch_update_looks_rows_up_by_primary_key_even_on_stale_statistics(kms_pg):
    """Left to the planner, every batch hashed all the DEKs left on the old version (O(n) per
    batch); with statistics from before a rotation it also took that version for one row."""
    fill(kms_pg, 3)
    with kms_pg.engine.connect() as conn:  # one transaction, rolled back at the end
        conn.execute(
            text(
                "INSERT INTO deks (key_name, key_version, wrapped, object_id, shard, created_at) "
                "SELECT :key, 1, '\\x00'::bytea, 'bulk-' || i, i % 1024, now() FROM generate_series(1, 20000) AS i"
            ),
            {"key": KEY},
        )
        conn.execute(text("ANALYZE deks"))  # every row on v1 as far as the planner knows
        conn.execute(text("UPDATE deks SET key_version = 2"))  # now none is
        raw = conn.connection.driver_connection
        with raw.cursor() as cur:
            cur.execute(envelope._PG_BATCH_TABLE)
            with cur.copy(envelope._PG_BATCH_COPY) as copy:
                copy.set_types(["int8", "bytea", "int4"])
                for i in range(1, 5001):
                    copy.write_row((i, b"\x01" * 40, 2))
            cur.execute("EXPLAIN " + envelope._PG_CAS, {"new": 3, "at": None, "key": KEY})
            plan = "\n".join(r[0] for r in cur.fetchall())
        conn.rollback()
    assert "Nested Loop" in plan and "Index Scan using deks_pkey" in plan, plan
    assert "Hash" not in plan and "Merge" not in plan, plan
    assert plan.index("Seq Scan on kms_sweep_batch") < plan.index("Index Scan using deks_pkey"), plan  # batch drives


@pytest.mark.parametrize("shard", [None, 1])
def test_the_sweep_walks_in_id_order_within_its_shard_range(kms, monkeypatch, shard):
    """``shard`` is a hash, so the old ``(shard, id)`` walk made each batch a random sample of
    ids spread over the whole table; in id order a batch's rows are neighbours."""
    fill(kms, 40)
    lifecycle.rotate(kms, KEY)
    committed: list[list[int]] = []
    real = envelope._commit_batch

    def spy(ctx, key_name, old, new, pairs):
        committed.append([i for i, _ in pairs])
        return real(ctx, key_name, old, new, pairs)

    monkeypatch.setattr(envelope, "_commit_batch", spy)
    shards = 1 if shard is None else 2
    result = envelope.sweep(kms, shard=shard, shards=shards, batch_size=4)
    ids = [i for batch in committed for i in batch]
    assert len(committed) >= 3 and ids == sorted(ids) and len(set(ids)) == len(ids) == result.moved
    lo, hi = envelope.shard_range(shard, shards)
    with kms.engine.connect() as conn:
        in_range = conn.execute(select(Dek.id).where(Dek.shard >= lo, Dek.shard < hi).order_by(Dek.id)).scalars().all()
    assert ids == in_range  # every DEK of the range, once, and nothing outside it


def test_a_shard_range_batch_is_read_by_index_condition_in_id_order(kms_pg):
    """A partition's read must not fetch other partitions' rows to reject them (else a fan-out
    worker of N shards would read N times the heap); the shard range is checked on the index."""
    fill(kms_pg, 3)
    with kms_pg.engine.connect() as conn:  # one transaction, rolled back at the end
        conn.execute(
            text(
                "INSERT INTO deks (key_name, key_version, wrapped, object_id, shard, created_at) "
                "SELECT :key, 1, '\\x00'::bytea, 'bulk-' || i, (i * 7919) % 1024, now() "
                "FROM generate_series(1, 20000) AS i"
            ),
            {"key": KEY},
        )
        conn.execute(text("ANALYZE deks"))
        lo, hi = envelope.shard_range(1, 2)
        with conn.connection.driver_connection.cursor() as cur:
            args = {"key": KEY, "v": 1, "after": 0, "lo": lo, "hi": hi, "limit": 5000}
            cur.execute("EXPLAIN " + envelope._PG_SELECT_BATCH, args)
            plan = "\n".join(r[0] for r in cur.fetchall())
        conn.rollback()
    assert "Index Scan using ix_deks_sweep_id on deks" in plan, plan
    cond = next(line for line in plan.splitlines() if "Index Cond" in line)
    assert "shard >=" in cond and "shard <" in cond, plan
    assert "Sort" not in plan, plan  # the index gives id order: no sort of the key's rows per batch


def test_sweep_skips_a_key_whose_active_version_lost_its_wrap_ref_and_says_so(kms, caplog):
    objects = fill(kms, 6)
    lifecycle.rotate(kms, KEY)
    with kms.engine.begin() as conn:  # an insider blanks the active version's keystore reference
        conn.execute(
            text(
                "UPDATE key_versions SET wrap_ref = NULL "
                "WHERE version = 2 AND key_id = (SELECT id FROM keys WHERE name = :k)"
            ),
            {"k": KEY},
        )
    before = snapshot(kms)
    with caplog.at_level("WARNING", logger=envelope.__name__):
        result = envelope.sweep(kms, KEY)
    assert (result.moved, result.failed, result.remaining) == (0, 0, 6)  # nothing moved; still reported left
    assert f"key {KEY} has DEK-bearing versions but no active AES version; skipped" in caplog.messages
    assert snapshot(kms) == before and versions_of(kms) == {1: 6}
    with pytest.raises(envelope.EnvelopeError, match="envelope sweep left 6 DEK"):
        envelope.nightly_sweep(kms)  # the nightly run goes red on what was skipped
    assert_all_decrypt(kms, objects)  # still on v1, whose material is intact


def test_the_sweep_refuses_a_connection_invalidated_under_it(kms_pg):
    """Only reachable when the pooled connection under an open transaction is invalidated
    (SQLAlchemy's own Connection.invalidate() makes .connection raise instead): done here
    directly on the real PostgreSQL connection, then the batch read is attempted."""
    fill(kms_pg, 3)
    lifecycle.rotate(kms_pg, KEY)
    before = snapshot(kms_pg)
    with kms_pg.engine.connect() as conn:
        conn.begin()
        conn.connection.invalidate()
        with pytest.raises(envelope.EnvelopeError) as err:
            envelope._select_batch(conn, KEY, 1, 0, SHARD_SPACE, (-1, 0), 10)
        conn.invalidate()  # let SQLAlchemy discard it, as its own error handling would
    assert str(err.value) == "the database connection was invalidated mid-batch; re-run the sweep"
    assert snapshot(kms_pg) == before
