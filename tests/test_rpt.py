import json
import threading
from datetime import timedelta

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from sqlalchemy import func, select, text
from sqlalchemy.exc import DBAPIError, IntegrityError

from kms_pipelines.core.foundation.canonical import canonical_bytes
from kms_pipelines.core.foundation.db.append_only import create_append_only_triggers, drop_append_only_triggers
from kms_pipelines.core.foundation.db.models_rpt import RegulatoryProofToken
from kms_pipelines.core.keys import lifecycle
from kms_pipelines.core.ledger import checkpoints, ledger, rpt, rpt_verify

# ---- helpers shared by the rpt/checkpoint/evidence tests -------------------------------------


def rows(kms):
    with kms.engine.connect() as conn:
        return conn.execute(
            select(RegulatoryProofToken.seq, RegulatoryProofToken.token).order_by(RegulatoryProofToken.seq)
        ).all()


def snapshot(kms):
    """What a refused operation must leave untouched: tokens, ledger head, checkpoints, keystore."""
    with kms.engine.connect() as conn:
        head = ledger.head(conn)
    objs = sorted(i.key for i in kms.objects.list("")) if kms.objects is not None else []
    return rows(kms), head, objs, sorted(kms.keystore.refs())


def admin(kms, table, *statements, params=None):
    """Play a database admin: bypass the append-only triggers, change rows, restore them."""
    with kms.engine.begin() as conn:
        drop_append_only_triggers(conn, table)
        for st in statements:
            conn.execute(text(st), params or {})
        create_append_only_triggers(conn, table)


def set_token(kms, seq, token):
    admin(kms, "rpts", "UPDATE rpts SET token = :t WHERE seq = :s", params={"t": token, "s": seq})


def issue_n(kms, n, start=0, step=timedelta(minutes=1), batch=1):
    """Issue n tokens, ``batch`` per call (issue() for 1, issue_many() above), the clock
    moving ``step`` between calls."""
    out = []
    for lo in range(start, start + n, batch):
        items = [(f"issuer-{i % 7}", {"n": i, "deal": f"D-{i}"}) for i in range(lo, min(lo + batch, start + n))]
        out += [rpt.issue(kms, *items[0])] if len(items) == 1 else rpt.issue_many(kms, items)
        kms.clock.advance(step)
    return out


def root_version(kms, number):
    with kms.transaction() as s:
        return lifecycle.get_version(lifecycle.get_key(s, "root"), number)


def forge(kms, version_number, *, seq, prev, iat, subject="forged", claims=None):
    """A token signed through the keystore by a chosen root version (what an insider with
    access to an old, rotated key could make), bypassing ``rpt.issue``'s checks."""
    v = root_version(kms, version_number)
    header = {"alg": "EdDSA", "kid": rpt.make_kid(v.version, v.fingerprint)}
    payload = {"seq": seq, "prev": prev, "iat": iat, "subject": subject, "claims": claims or {}}
    data = rpt.signing_input(header, payload)
    return data + "." + rpt.b64url(kms.keystore.sign(v.sign_ref, data.encode("ascii")))


def chain_head(kms):
    with kms.engine.connect() as conn:
        return rpt.chain_head(conn)


def corrupt_signature(token):
    data, sig = token.rsplit(".", 1)
    raw = bytearray(rpt.b64url_decode(sig))
    raw[0] ^= 0x01
    return data + "." + rpt.b64url(bytes(raw))


def insert_raw(kms, seq, token):
    header, payload, _ = rpt.decode(token)
    with kms.engine.begin() as conn:
        conn.execute(
            text(
                "INSERT INTO rpts (seq, token, kid, iat, subject, prev_hash, token_hash) "
                "VALUES (:s, :t, :k, :i, :sub, :p, :h)"
            ),
            {
                "s": seq,
                "t": token,
                "k": header["kid"],
                "i": kms.now(),
                "sub": payload["subject"],
                "p": payload["prev"],
                "h": rpt.token_hash(token),
            },
        )


# ---- issue -------------------------------------------------------------------------------------


def test_token_is_a_compact_eddsa_jws_over_canonical_json(kms):
    token = rpt.issue(kms, "issuer-42", {"amount": "1000.00", "currency": "EUR", "z": [1, {"b": 2, "a": 1}]})
    h64, p64, s64 = token.split(".")
    assert "=" not in token
    header, payload = json.loads(rpt.b64url_decode(h64)), json.loads(rpt.b64url_decode(p64))
    assert rpt.b64url_decode(h64) == canonical_bytes(header) and rpt.b64url_decode(p64) == canonical_bytes(payload)
    v = root_version(kms, 1)
    assert header == {"alg": "EdDSA", "kid": f"root#v1:{v.fingerprint}"}
    assert payload["seq"] == 1 and payload["prev"] == "0" * 64 and payload["subject"] == "issuer-42"
    assert payload["iat"] == int(kms.now().timestamp())
    Ed25519PublicKey.from_public_bytes(v.public_key).verify(rpt.b64url_decode(s64), f"{h64}.{p64}".encode())
    second = rpt.issue(kms, "issuer-42", {})
    assert rpt.decode(second)[1]["prev"] == rpt.token_hash(token)
    with kms.transaction() as s:
        stored = list(s.scalars(select(RegulatoryProofToken).order_by(RegulatoryProofToken.seq)))
    assert [r.token for r in stored] == [token, second]
    assert stored[1].prev_hash == rpt.token_hash(token) == stored[0].token_hash
    assert stored[1].kid == header["kid"] and stored[1].subject == "issuer-42"


@pytest.mark.parametrize(
    "subject,claims,match",
    [
        ("", {}, "subject must be a non-empty"),
        ("x" * 201, {}, "the policy allows 200"),
        ("s", ["not", "an", "object"], "claims must be a JSON object"),
        ("s", {"blob": "x" * 20000}, "the policy allows 16384"),
        ("s", {"nan": float("nan")}, "not canonicalisable"),
    ],
)
def test_bad_issue_requests_are_refused_and_change_nothing(kms, subject, claims, match):
    issue_n(kms, 2)
    before = snapshot(kms)
    with pytest.raises(rpt.RptError, match=match):
        rpt.issue(kms, subject, claims)
    assert snapshot(kms) == before


def test_issue_refuses_a_clock_that_went_backwards(kms):
    issue_n(kms, 2)
    before = snapshot(kms)
    kms.clock.advance(timedelta(hours=-1))
    with pytest.raises(rpt.RptError, match="goes back in time"):
        rpt.issue(kms, "s", {})
    assert snapshot(kms) == before


def test_rpts_table_is_append_only(kms):
    issue_n(kms, 3)
    before = rows(kms)
    for st in ("UPDATE rpts SET subject = 'mallory' WHERE seq = 2", "DELETE FROM rpts WHERE seq = 3"):
        with pytest.raises((DBAPIError, IntegrityError)) as err:
            with kms.engine.begin() as conn:
                conn.execute(text(st))
        assert "append-only" in str(err.value)
    assert rows(kms) == before


def test_issue_signs_inside_the_hsm(make_kms, pkcs11_keystore):
    kms = make_kms("sqlite", keystore=pkcs11_keystore)
    issue_n(kms, 5)
    lifecycle.rotate(kms, "root")
    issue_n(kms, 5, start=5)
    assert rpt_verify.verify_chain(kms).ok
    assert rpt.decode(rows(kms)[-1][1])[0]["kid"].startswith("root#v2:")


def test_concurrent_issuers_and_a_rotation_keep_one_contiguous_chain(kms_pg):
    kms = kms_pg
    barrier = threading.Barrier(5)
    errors = []

    def issuer(k):
        barrier.wait()
        try:
            for i in range(15):
                rpt.issue(kms, f"thread-{k}", {"i": i})
        except Exception as exc:  # noqa: BLE001
            errors.append(exc)

    def rotator():
        barrier.wait()
        lifecycle.rotate(kms, "root")

    threads = [threading.Thread(target=issuer, args=(k,)) for k in range(4)] + [threading.Thread(target=rotator)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    result = rpt_verify.verify_chain(kms)
    assert result.ok and result.count == 60
    assert [s for s, _ in rows(kms)] == list(range(1, 61))


# ---- verify_chain ----------------------------------------------------------------------------


def test_a_thousand_tokens_across_three_root_rotations_verify(make_kms):
    kms = make_kms("sqlite")
    for block in range(4):
        issue_n(kms, 10, start=block * 250, step=timedelta(minutes=3))  # one by one
        issue_n(kms, 240, start=block * 250 + 10, step=timedelta(minutes=3), batch=20)
        if block < 3:
            kms.clock.advance(timedelta(days=90))
            assert lifecycle.rotate(kms, "root", only_if_due=True).rotated
    # the oldest version's private key is destroyed; its retained public key still verifies
    lifecycle.destroy(kms, "root", 1, reason="test", skip_guards=lifecycle.destroy_guards())
    assert not kms.keystore.exists(root_version(kms, 1).sign_ref)
    result = rpt_verify.verify_chain(kms)
    assert result.ok, result.problem
    assert (result.count, result.head_seq) == (1000, 1000)
    kids = {rpt.decode(t)[0]["kid"].split(":")[0] for _, t in rows(kms)}
    assert kids == {"root#v1", "root#v2", "root#v3", "root#v4"}
    last = rpt_verify.verify_chain(kms, last=100)
    assert last.ok and last.count == 100 and last.first_seq == 901 and last.head_hash == result.head_hash


@pytest.fixture
def chain(make_kms):
    """40 tokens, a root rotation after the 20th (SQLite; the PostgreSQL variant is below)."""
    kms = make_kms("sqlite")
    issue_n(kms, 20, batch=5)
    lifecycle.rotate(kms, "root")
    issue_n(kms, 20, start=20, batch=5)
    assert rpt_verify.verify_chain(kms).ok
    return kms


def _expect(kms, seq, *fragments, **kw):
    result = rpt_verify.verify_chain(kms, **kw)
    assert not result.ok and result.first_bad_seq == seq, result
    for f in fragments:
        assert f in result.problem, result.problem
    return result


def test_payload_edit_is_caught(chain):
    seq, token = rows(chain)[9]
    h, p, s = token.split(".")
    payload = json.loads(rpt.b64url_decode(p))
    payload["claims"]["deal"] = "D-999"
    set_token(chain, seq, ".".join([h, rpt.b64url(canonical_bytes(payload)), s]))
    _expect(chain, 10, "token seq 10", "payload altered: signature does not verify")


def test_signature_swap_is_caught(chain):
    r = rows(chain)
    forged = r[4][1].rsplit(".", 1)[0] + "." + r[5][1].rsplit(".", 1)[1]
    set_token(chain, 5, forged)
    _expect(chain, 5, "signature does not verify")


def test_reorder_is_caught(chain):
    r = rows(chain)
    admin(
        chain,
        "rpts",
        "UPDATE rpts SET token = :a WHERE seq = 12",
        "UPDATE rpts SET token = :b WHERE seq = 13",
        params={"a": r[12][1], "b": r[11][1]},
    )
    _expect(chain, 12, "out of order", "signed as seq 13")


def test_deletion_in_the_middle_is_caught(chain):
    admin(chain, "rpts", "DELETE FROM rpts WHERE seq = 17")
    _expect(chain, 17, "seq gap", "token seq 17 is missing")


def test_truncation_of_the_newest_tokens_is_caught_against_the_checkpoint(chain):
    checkpoints.write_checkpoint(chain)
    admin(chain, "rpts", "DELETE FROM rpts WHERE seq > 36")
    result = _expect(chain, 37, "truncated", "recorded 40 tokens", "checkpoints/ledger/")
    assert result.count == 36
    assert not checkpoints.verify(chain).ok


def test_a_token_signed_by_a_rotated_key_after_its_rotation_is_rejected(chain):
    head_seq, head_hash = chain_head(chain)
    chain.clock.advance(timedelta(minutes=5))
    token = forge(chain, 1, seq=head_seq + 1, prev=head_hash, iat=int(chain.now().timestamp()))
    insert_raw(chain, head_seq + 1, token)
    result = _expect(chain, 41, "signed by root v1 at iat", "after it was rotated at")
    assert "2026-01-01T" in result.problem


def test_a_backdated_token_from_a_rotated_key_is_rejected(chain):
    head_seq, head_hash = chain_head(chain)
    token = forge(chain, 1, seq=head_seq + 1, prev=head_hash, iat=int(root_version(chain, 1).activated_at.timestamp()))
    insert_raw(chain, head_seq + 1, token)
    _expect(chain, 41, "goes backwards")


def test_unknown_kid_is_rejected(chain):
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    head_seq, head_hash = chain_head(chain)
    rogue = Ed25519PrivateKey.generate()
    header = {"alg": "EdDSA", "kid": "root#v2:SHA256:" + "ab" * 32}
    payload = {
        "seq": head_seq + 1,
        "prev": head_hash,
        "iat": int(chain.now().timestamp()),
        "subject": "x",
        "claims": {},
    }
    data = rpt.signing_input(header, payload)
    insert_raw(chain, head_seq + 1, data + "." + rpt.b64url(rogue.sign(data.encode())))
    _expect(chain, 41, "unknown kid", "root v2")


def test_last_n_is_anchored_at_the_token_before(chain):
    set_token(chain, 5, rows(chain)[5][1])  # damage early in the chain
    assert rpt_verify.verify_chain(chain, last=30).ok  # seq 11..40 untouched
    _expect(chain, 5, last=40)
    with pytest.raises(rpt.RptError, match="at least 1"):
        rpt_verify.verify_chain(chain, last=0)


def test_parallel_verification_finds_the_same_first_bad_token(kms_pg):
    kms = kms_pg
    rpt.issue_many(kms, [(f"s{i}", {"i": i}) for i in range(120)])
    assert rpt_verify.verify_chain(kms, workers=2).ok
    assert rpt_verify.verify_chain(kms, workers=2).count == 120
    r = rows(kms)
    set_token(kms, 61, corrupt_signature(r[60][1]))  # the first token of the second partition
    assert _expect(kms, 61, "signature", workers=2).first_bad_seq == 61
    admin(kms, "rpts", "DELETE FROM rpts WHERE seq = 90")
    admin(kms, "rpts", "DELETE FROM rpts WHERE seq = 60")  # the boundary token itself
    assert _expect(kms, 60, "seq gap", workers=2)


def test_issue_many_is_all_or_nothing(kms):
    issue_n(kms, 2)
    before = snapshot(kms)
    with pytest.raises(rpt.RptError):
        rpt.issue_many(kms, [("ok", {}), ("", {})])
    assert snapshot(kms) == before
    tokens = rpt.issue_many(kms, [("a", {}), ("b", {})])
    assert [rpt.decode(t)[1]["seq"] for t in tokens] == [3, 4]
    with kms.engine.connect() as conn:
        assert conn.execute(select(func.count()).select_from(RegulatoryProofToken)).scalar() == 4


def test_tamper_cases_on_postgres(kms_pg):
    kms = kms_pg
    issue_n(kms, 10, batch=5)
    lifecycle.rotate(kms, "root")
    issue_n(kms, 10, start=10, batch=5)
    checkpoints.write_checkpoint(kms)
    r = rows(kms)
    set_token(kms, 4, corrupt_signature(r[3][1]))
    _expect(kms, 4, "signature does not verify")
    set_token(kms, 4, r[3][1])
    assert rpt_verify.verify_chain(kms).ok
    admin(kms, "rpts", "DELETE FROM rpts WHERE seq = 20")
    _expect(kms, 20, "truncated", "recorded 20 tokens")
    head_seq, head_hash = chain_head(kms)
    insert_raw(kms, 20, forge(kms, 1, seq=20, prev=head_hash, iat=int(kms.now().timestamp()) + 60))
    _expect(kms, 20, "signed by root v1", "after it was rotated")
