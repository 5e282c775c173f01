"""No key material anywhere it could leak: audit rows, the Dagster event log, captured logs.

Runs real work through Dagster (bootstrap, a dual-controlled manual rotation, the audit
anomalies asset) and the CLI-level core calls (enrolment, approvals, tokens), then collects
every secret value the KMS holds — each key object's raw value from the software keystore,
the master key, TOTP secrets, workload tokens — and searches for each in several encodings.
"""

import base64
import logging
from datetime import UTC, datetime

import dagster as dg
import pyotp
from sqlalchemy import select

from kms_pipelines.core.access import tokens as tokens_mod
from kms_pipelines.core.access.audited_keystore import unwrap
from kms_pipelines.core.foundation.db.models_access import AuditAnomaly, AuditEvent, Principal
from kms_pipelines.core.ledger import audit
from kms_pipelines.defs.access import audit_anomalies, audit_chain_intact, manual_rotation
from kms_pipelines.defs.foundation import kms_state
from kms_pipelines.defs.resources import DatabaseResource, KeyStoreResource, KmsResource, ObjectStoreResource
from tests.fixtures.dagster_defs import FixedClockResource
from tests.fixtures.kms import approve_both, ceremony, write_test_policy

AT = datetime(2026, 4, 1, 12, 0, tzinfo=UTC)
MASTER = base64.b64encode(bytes(range(32))).decode()


def _encodings(secret: bytes) -> set[str]:
    forms = {
        secret.hex(),
        secret.hex().upper(),
        base64.b64encode(secret).decode(),
        base64.urlsafe_b64encode(secret).decode().rstrip("="),
        base64.b32encode(secret).decode().rstrip("="),
        secret.decode("latin-1"),
    }
    return {f for f in forms if len(f) >= 16}


def test_no_key_material_in_audit_rows_event_log_or_logs(tmp_path, monkeypatch, caplog, capfd):
    caplog.set_level(logging.DEBUG)
    monkeypatch.setenv("KMS_MASTER_KEY", MASTER)
    monkeypatch.setenv("KMS_POLICY", write_test_policy(tmp_path))  # the approvers' keys are software ones
    res = KmsResource(
        home=str(tmp_path / "home"),
        database=DatabaseResource(url=f"sqlite:///{tmp_path / 'kms.db'}"),
        keystore=KeyStoreResource(kind="software"),
        objects=ObjectStoreResource(url=str(tmp_path / "objects")),
        clock=FixedClockResource(fixed_time=AT.isoformat()),
    )
    instance = dg.DagsterInstance.ephemeral()
    runs = [dg.materialize([kms_state], resources={"kms": res}, instance=instance)]
    ctx = res.context()
    devices = ceremony(ctx, {"alice": "sre_oncall", "bob": "security_engineering", "carol": "compliance_officer"})
    uris = {n: d.provisioning_uri(name=n) for n, d in devices.items()}
    for n in ("bob", "carol"):
        approve_both(
            ctx,
            n,
            ticket="CHG-S",
            operation="rotate",
            target="service:api-gateway",
            totp=pyotp.parse_uri(uris[n]).at(AT),
        )
    runs.append(
        manual_rotation.execute_in_process(
            run_config={
                "ops": {
                    "manual_rotate_key": {
                        "config": {
                            "key": "service:api-gateway",
                            "ticket": "CHG-S",
                            "requester": "alice",
                            "requester_totp": devices["alice"].at(AT),
                        }
                    }
                }
            },
            resources={"kms": res},
            instance=instance,
        )
    )
    ks = ctx.keystore
    blob = ks.encrypt(_wrap_ref(ctx), b"customer secret 0123456789abcdef")
    ks.decrypt(_wrap_ref(ctx), blob)
    tokens = [tokens_mod.issue_workload_token(ctx, "workload:api-gateway")]
    runs.append(dg.materialize([audit_anomalies, audit_chain_intact], resources={"kms": res}, instance=instance))
    assert all(r.success for r in runs)

    # every secret the KMS holds
    inner = unwrap(ctx.keystore)
    secrets = {f"key {ref}": inner._load(ref)[1] for ref in inner.refs()}
    secrets["master key"] = base64.b64decode(MASTER)
    for n, uri in uris.items():
        secrets[f"totp {n}"] = pyotp.parse_uri(uri).secret.encode()
        secrets[f"totp {n} raw"] = base64.b32decode(pyotp.parse_uri(uri).secret)
    for i, t in enumerate(tokens):
        secrets[f"token {i}"] = t.encode()
        secrets[f"token {i} signature"] = t.split(".")[2].encode()
    secrets["plaintext"] = b"customer secret 0123456789abcdef"
    assert len(secrets) > 20

    # everywhere it must not be
    audit.flush(ctx)
    with ctx.engine.connect() as conn:
        audit_text = "\n".join(repr(tuple(r)) for r in conn.execute(select(AuditEvent.__table__)).all())
        audit_text += "\n".join(repr(tuple(r)) for r in conn.execute(select(AuditAnomaly.__table__)).all())
        sealed = conn.execute(select(Principal.totp_sealed)).scalars().all()
    assert audit_text.count("\n") > 25
    event_log = "\n".join(repr(rec) for r in runs for rec in instance.all_logs(r.run_id))
    assert "manual_rotate_key" in event_log
    out, err = capfd.readouterr()
    places = {
        "audit rows": audit_text,
        "dagster event log": event_log,
        "captured logs": caplog.text,
        "stdout/stderr": out + err,
        "sealed totp column": repr(sealed),
    }
    leaks = [
        (what, where)
        for what, secret in secrets.items()
        for enc in _encodings(secret)
        for where, text in places.items()
        if enc in text
    ]
    assert leaks == []


def _wrap_ref(ctx):
    from kms_pipelines.core.keys import lifecycle

    with ctx.transaction() as s:
        return lifecycle.active_version(lifecycle.get_key(s, "data:postgres")).wrap_ref
