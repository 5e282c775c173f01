"""Workload identities (A2): tokens of at most 15 minutes, checked before every keystore
operation; refused when too long-lived, expired or forged. Each refusal changes nothing."""

import json
from datetime import timedelta

import pytest
from sqlalchemy import select

from kms_pipelines.core.access import principals as access
from kms_pipelines.core.access import tokens
from kms_pipelines.core.access.audited_keystore import unwrap
from kms_pipelines.core.foundation.canonical import canonical_bytes
from kms_pipelines.core.foundation.db.models import KeyVersion
from kms_pipelines.core.foundation.db.models_access import AuditEvent
from kms_pipelines.core.keys import lifecycle
from kms_pipelines.core.ledger import audit, ledger


def snapshot(kms):
    with kms.engine.connect() as conn:
        versions = conn.execute(
            select(KeyVersion.key_id, KeyVersion.version, KeyVersion.state).order_by(KeyVersion.id)
        ).all()
        head = ledger.head(conn)
    return versions, head, sorted(kms.keystore.refs())


def _denials(kms, reason):
    audit.flush(kms)
    with kms.engine.connect() as conn:
        details = conn.execute(select(AuditEvent.detail).where(AuditEvent.outcome == "denied")).scalars().all()
    return [d for d in details if f'"reason":"{reason}"' in (d or "")]


def _refused(kms, wctx, match, reason):
    before = snapshot(kms)
    n = len(_denials(kms, reason))
    with pytest.raises(access.AccessDenied, match=match):
        lifecycle.rotate(wctx, "data:postgres")
    assert snapshot(kms) == before
    assert len(_denials(kms, reason)) == n + 1


def _forge(payload: dict, signature_from: str) -> str:
    """A token with ``payload`` and the signature part of another token."""
    return ".".join([access.TOKEN_PREFIX, tokens._b64u(canonical_bytes(payload)), signature_from.split(".")[2]])


def _claims(token: str) -> dict:
    return json.loads(tokens._unb64u(token.split(".")[1]))


def test_a_token_of_the_policy_ttl_works_and_every_operation_is_checked(kms):
    token = tokens.issue_workload_token(kms, "workload:dagster")
    c = tokens.verify_workload_token(kms, token)
    assert c.sub == "workload:dagster" and c.exp - c.iat == 15 * 60
    wctx = tokens.with_workload_token(kms, token)
    assert lifecycle.rotate(wctx, "data:postgres").rotated
    audit.flush(kms)
    with kms.engine.connect() as conn:
        actors = conn.execute(
            select(AuditEvent.actor).where(AuditEvent.operation == "generate").order_by(AuditEvent.seq.desc()).limit(1)
        ).scalar_one()
    assert actors == "workload:dagster"


def test_a_16_minute_token_is_refused(kms):
    before = snapshot(kms)
    with pytest.raises(access.AccessDenied, match="16 min exceeds the policy cap of 15"):
        tokens.issue_workload_token(kms, "workload:dagster", ttl_minutes=16)
    assert snapshot(kms) == before
    # and one signed with the real key but claiming 16 minutes is refused on use
    ok = tokens.issue_workload_token(kms, "workload:dagster")
    c = _claims(ok)
    long_lived = {**c, "exp": c["iat"] + 16 * 60}
    ks = unwrap(kms.keystore)
    signed = ".".join(
        [
            access.TOKEN_PREFIX,
            tokens._b64u(canonical_bytes(long_lived)),
            tokens._b64u(ks.sign(access.SIGNING_REF, access._TOKEN_CONTEXT + canonical_bytes(long_lived))),
        ]
    )
    _refused(kms, tokens.with_workload_token(kms, signed), "exceeds the policy cap", "token_ttl")


def test_an_expired_token_is_refused(kms):
    token = tokens.issue_workload_token(kms, "workload:dagster", ttl_minutes=5)
    wctx = tokens.with_workload_token(kms, token)
    kms.clock.advance(timedelta(minutes=5))
    _refused(kms, wctx, "expired", "token_expired")


@pytest.mark.parametrize("forge", ["other_subject", "longer_expiry", "foreign_key", "garbage"])
def test_a_forged_token_is_refused(kms, make_kms, forge):
    token = tokens.issue_workload_token(kms, "workload:reconciliation-engine", ttl_minutes=10)
    c = _claims(token)
    if forge == "other_subject":
        forged = _forge({**c, "sub": "workload:dagster"}, token)
    elif forge == "longer_expiry":
        forged = _forge({**c, "exp": c["exp"] + 300}, token)
    elif forge == "foreign_key":  # well-formed and signed, but by another KMS's signing key
        other = make_kms("sqlite", bootstrap=False)
        forged = tokens.issue_workload_token(other, "workload:dagster")
    else:
        forged = "kmswt1.bm90IGpzb24.AAAA"
    _refused(kms, tokens.with_workload_token(kms, forged), "refused", "token")


def test_a_workload_lacking_the_permission_is_refused_and_audited(kms):
    wctx = tokens.with_workload_identity(kms, "workload:reconciliation-engine")
    wctx.keystore.credentials.claims(wctx)  # the identity's first token (creates the signing key)
    _refused(kms, wctx, "lacks permission 'rotate'", "permission")


def test_the_identity_refreshes_its_token_before_expiry(kms):
    wctx = tokens.with_workload_identity(kms, "workload:dagster")
    ident = wctx.keystore.credentials
    assert lifecycle.rotate(wctx, "data:postgres").rotated
    assert ident.issued == 1
    kms.clock.advance(timedelta(minutes=14, seconds=30))  # inside the refresh margin
    assert lifecycle.rotate(wctx, "data:postgres").rotated
    assert ident.issued == 2
    kms.clock.advance(timedelta(hours=3))
    assert lifecycle.rotate(wctx, "data:postgres").rotated
    assert ident.issued == 3


def test_tokens_on_softhsm_and_postgres(make_kms, pkcs11_keystore):
    kms = make_kms("postgres", keystore=pkcs11_keystore)
    assert kms.keystore.backend == "pkcs11"
    wctx = tokens.with_workload_identity(kms, "workload:dagster")
    assert lifecycle.rotate(wctx, "service:api-gateway").rotated
    token = tokens.issue_workload_token(kms, "workload:api-gateway", ttl_minutes=1)
    kms.clock.advance(timedelta(minutes=1))
    _refused(kms, tokens.with_workload_token(kms, token), "expired", "token_expired")
    c = _claims(token)
    _refused(kms, tokens.with_workload_token(kms, _forge({**c, "exp": c["exp"] + 3600}, token)), "signature", "token")
    assert audit.verify(kms).ok
