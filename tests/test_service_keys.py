"""Service keys (P1, P2) on both keystores: credentials, app secrets, audit signing,
seeds wrapped under the root and rewrapped by root rotation."""

from datetime import timedelta

import pytest
from sqlalchemy import select, text

from kms_pipelines.core.foundation.db.models_rotation import ServiceSeed
from kms_pipelines.core.keys import dependents, lifecycle, rotation, service_keys
from tests.test_rotation import full_snapshot


@pytest.fixture(params=["software", "pkcs11"])
def skms(request, make_kms):
    ks = request.getfixturevalue("pkcs11_keystore") if request.param == "pkcs11" else None
    return make_kms("sqlite", keystore=ks)


def test_credentials_survive_rotation_until_revocation(skms):
    cred = service_keys.issue_credential(skms, "api-gateway", "client-a")
    other = service_keys.issue_credential(skms, "api-gateway", "client-b")
    check = service_keys.verify_credential(skms, "api-gateway", cred)
    assert check.valid and check.client_id == "client-a" and check.version == 1
    assert not service_keys.verify_credential(skms, "worker-pipelines", cred).valid  # bound to its service
    forged = cred[:-4] + ("AAAA" if not cred.endswith("AAAA") else "BBBB")
    assert not service_keys.verify_credential(skms, "api-gateway", forged).valid
    assert not service_keys.verify_credential(skms, "api-gateway", "kmsc1.api-gateway.v9.xx").valid
    skms.clock.advance(timedelta(days=60))
    assert [r.key for r in rotation.reconcile(skms, "service") if r.rotated][0] == "service:api-gateway"
    assert service_keys.verify_credential(skms, "api-gateway", cred).valid  # rotated: still valid
    fresh = service_keys.pickup_credential(skms, "api-gateway", "client-a")
    assert service_keys.verify_credential(skms, "api-gateway", fresh).version == 2
    with pytest.raises(service_keys.ServiceKeyError, match="already picked up"):
        service_keys.pickup_credential(skms, "api-gateway", "client-a")
    dependents.confirm(skms, "service:api-gateway", 2, "api-gateway")
    lifecycle.revoke(skms, "service:api-gateway", 1, reason="retired")
    assert not service_keys.verify_credential(skms, "api-gateway", cred).valid  # revoked: invalid
    assert not service_keys.verify_credential(skms, "api-gateway", other).valid
    assert service_keys.verify_credential(skms, "api-gateway", fresh).valid


def test_app_secrets_are_bound_to_service_and_name(skms):
    blob = service_keys.encrypt_secret(skms, "worker-pipelines", "db-password", b"s3cret")
    assert b"s3cret" not in blob
    assert service_keys.decrypt_secret(skms, "worker-pipelines", "db-password", blob) == b"s3cret"
    for service, name in (("worker-pipelines", "other-name"), ("api-gateway", "db-password")):
        with pytest.raises(service_keys.ServiceKeyError):
            service_keys.decrypt_secret(skms, service, name, blob)
    tampered = blob[:-1] + bytes([blob[-1] ^ 1])
    with pytest.raises(service_keys.ServiceKeyError, match="does not authenticate"):
        service_keys.decrypt_secret(skms, "worker-pipelines", "db-password", tampered)
    rotation.rotate_now(skms, "service:worker-pipelines", reason="compromise")
    assert service_keys.decrypt_secret(skms, "worker-pipelines", "db-password", blob) == b"s3cret"
    moved = service_keys.rewrap_secret(skms, "worker-pipelines", "db-password", blob)
    assert service_keys.secret_version(moved) == 2
    assert service_keys.decrypt_secret(skms, "worker-pipelines", "db-password", moved) == b"s3cret"


def test_audit_events_signed_and_verified(skms):
    signed = service_keys.sign_audit_event(skms, "reconciliation-engine", {"op": "reconcile", "n": 3})
    assert service_keys.verify_audit_event(skms, signed).valid
    bad = dict(signed, event={"op": "reconcile", "n": 4})
    assert not service_keys.verify_audit_event(skms, bad).valid
    rotation.rotate_now(skms, "service:reconciliation-engine", reason="tenant-rotation")
    assert service_keys.verify_audit_event(skms, signed).valid  # verify-only after rotation
    assert service_keys.sign_audit_event(skms, "reconciliation-engine", {"op": "x"})["version"] == 2


def test_root_seeds_service_keys_and_root_rotation_rewraps_them(skms):
    cred = service_keys.issue_credential(skms, "api-gateway", "client-z")
    with skms.transaction() as s:
        assert {(x.key_name, x.root_version) for x in s.scalars(select(ServiceSeed))} == {("service:api-gateway", 1)}
    skms.clock.advance(timedelta(days=90))
    rotation.reconcile(skms, "root")
    with skms.transaction() as s:
        assert {x.root_version for x in s.scalars(select(ServiceSeed))} == {2}
    assert service_keys.verify_credential(skms, "api-gateway", cred).valid
    # the old root can no longer be needed for any seed: the root_seeds guard agrees
    with skms.transaction() as s:
        root = lifecycle.get_key(s, "root")
        assert service_keys._root_seeds_guard(s, skms, root, lifecycle.get_version(root, 1)) is None
        assert "still wrapped under root v2" in service_keys._root_seeds_guard(
            s, skms, root, lifecycle.get_version(root, 2)
        )


@pytest.mark.parametrize(
    "op",
    [
        lambda k: service_keys.issue_credential(k, "nope", "c"),
        lambda k: service_keys.issue_credential(k, "api-gateway", "has space"),
        lambda k: service_keys.encrypt_secret(k, "api-gateway", "", b"x"),
        lambda k: service_keys.pickup_credential(k, "api-gateway", "never-issued"),
        lambda k: service_keys.decrypt_secret(k, "api-gateway", "n", b"garbage"),
    ],
)
def test_refusals_change_nothing(kms, op):
    before = full_snapshot(kms)
    with pytest.raises(lifecycle.LifecycleError) as err:
        op(kms)
    assert str(err.value)
    assert full_snapshot(kms) == before


def _blank(kms, column, key_name, version):
    """Play a database admin: NULL one column of one key version."""
    with kms.engine.begin() as conn:
        conn.execute(
            text(
                f"UPDATE key_versions SET {column} = NULL "
                "WHERE version = :v AND key_id = (SELECT id FROM keys WHERE name = :k)"
            ),
            {"v": version, "k": key_name},
        )


def test_a_blanked_root_wrap_ref_or_service_public_key_is_refused_by_name(kms):
    signed = service_keys.sign_audit_event(kms, "api-gateway", {"action": "login"})
    cred = service_keys.issue_credential(kms, "api-gateway", "client-a")  # its seed is wrapped under root v1
    lifecycle.rotate(kms, "root", reason="compromise")  # plain lifecycle: the seed is not rewrapped yet
    _blank(kms, "wrap_ref", "root", 1)
    before = full_snapshot(kms)
    for op in (
        lambda: service_keys.issue_credential(kms, "api-gateway", "client-b"),
        lambda: service_keys.verify_credential(kms, "api-gateway", cred),
    ):
        with pytest.raises(service_keys.ServiceKeyError) as err:
            op()
        assert str(err.value) == "seed is wrapped under root v1, which has no AES material"
    assert full_snapshot(kms) == before
    _blank(kms, "public_key", "service:api-gateway", 1)
    before = full_snapshot(kms)
    with pytest.raises(service_keys.ServiceKeyError) as err:
        service_keys.public_key(kms, "api-gateway", 1)
    assert str(err.value) == "service:api-gateway v1 has no public key"
    check = service_keys.verify_audit_event(kms, signed)
    assert not check.valid and check.problem == "service:api-gateway v1 has no public key"
    assert full_snapshot(kms) == before
