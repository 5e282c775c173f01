"""The hardware verdict for a security key's attestation (A2, core/access/webauthn.attestation_problem).

Real parts: certificate chains generated here with ``cryptography`` (a vendor root, an attestation
leaf, an intermediate, a foreign root), a real P-256 attestation key signing a real "packed"
statement over real authenticator and client data (fido2's own types), verified by the code the
console registers keys with. No security key is needed: what makes a key hardware is only that
its attestation chains to a configured CA, and these chains are built the way a vendor's are.
"""

from __future__ import annotations

import dataclasses
import uuid
from datetime import timedelta

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from fido2.cose import ES256
from sqlalchemy import select

from kms_pipelines.core.access import webauthn
from kms_pipelines.core.foundation.db.models_console import ConsoleCredential
from kms_pipelines.fido2_client import SoftwareAuthenticator
from tests.fixtures.kms import KEY_ORIGIN

OID_AAGUID = x509.ObjectIdentifier("1.3.6.1.4.1.45724.1.1.4")
AAGUID = uuid.UUID("00000000-1111-2222-3333-444455556666").bytes


def _name(cn: str, *, attestation: bool = False) -> x509.Name:
    attrs = [
        x509.NameAttribute(NameOID.COUNTRY_NAME, "SE"),
        x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Test Key Vendor"),
        x509.NameAttribute(NameOID.COMMON_NAME, cn),
    ]
    if attestation:  # the packed format's subject requirement
        attrs.insert(2, x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, "Authenticator Attestation"))
    return x509.Name(attrs)


def _cert(subject, key, issuer_name, issuer_key, now, *, ca, days=(-30, 365), key_usage=None, aaguid=None):
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now + timedelta(days=days[0]))
        .not_valid_after(now + timedelta(days=days[1]))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if key_usage is not None:
        builder = builder.add_extension(key_usage, critical=True)
    if aaguid is not None:
        builder = builder.add_extension(x509.UnrecognizedExtension(OID_AAGUID, b"\x04\x10" + aaguid), critical=False)
    return builder.sign(issuer_key, hashes.SHA256())


def _usage(*, cert_sign: bool) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=not cert_sign,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=cert_sign,
        crl_sign=cert_sign,
        encipher_only=False,
        decipher_only=False,
    )


class Vendor:
    """A vendor's attestation root and what it issues."""

    def __init__(self, name: str, now):
        self.now = now
        self.key = ec.generate_private_key(ec.SECP256R1())
        self.name = _name(f"{name} Root CA")
        self.root = _cert(self.name, self.key, self.name, self.key, now, ca=True, key_usage=_usage(cert_sign=True))

    def pem(self, tmp_path) -> str:
        path = tmp_path / f"{uuid.uuid4().hex}.pem"
        path.write_bytes(self.root.public_bytes(serialization.Encoding.PEM))
        return str(path)

    def leaf(self, *, issuer=None, **kw):
        """An attestation key and its certificate (issued by the root, or by ``issuer`` = (name, key))."""
        key = ec.generate_private_key(ec.SECP256R1())
        issuer_name, issuer_key = issuer or (self.name, self.key)
        kw.setdefault("aaguid", AAGUID)
        kw.setdefault("ca", False)
        return key, _cert(_name("Test Key Attestation", attestation=True), key, issuer_name, issuer_key, self.now, **kw)

    def intermediate(self, *, ca=True, key_usage=None):
        key = ec.generate_private_key(ec.SECP256R1())
        name = _name("Test Key Intermediate CA")
        return name, key, _cert(name, key, self.name, self.key, self.now, ca=ca, key_usage=key_usage)


class AttestingAuthenticator(SoftwareAuthenticator):
    """The software authenticator answering with a "packed" attestation: signed by an attestation
    key with certificate chain ``x5c`` (basic attestation), or, without one, by the credential key
    itself (self attestation)."""

    def __init__(self, origin: str, attestation_key=None, x5c=()):
        super().__init__(origin)
        self.aaguid = AAGUID
        self.attestation_key, self.x5c = attestation_key, [c.public_bytes(serialization.Encoding.DER) for c in x5c]

    def _attestation(self, auth, client):
        signer = self.attestation_key or self.key
        statement = {"alg": ES256.ALGORITHM, "sig": signer.sign(bytes(auth) + client.hash, ec.ECDSA(hashes.SHA256()))}
        if self.x5c:
            statement["x5c"] = self.x5c
        return "packed", auth, statement


@pytest.fixture
def setup(make_kms, tmp_path):
    kms = make_kms("sqlite")
    vendor, foreign = Vendor("Test Key Vendor", kms.now()), Vendor("Foreign", kms.now())
    console = kms.policy.console.model_copy(update={"attestation_ca_files": [vendor.pem(tmp_path)]})
    kms = dataclasses.replace(kms, policy=kms.policy.model_copy(update={"console": console}))
    return kms, vendor, foreign


def _register(kms, authenticator, principal="alice"):
    """The console's registration path (``_store_credential``): the stored verdict and its reason."""
    rp = webauthn.RelyingParty(KEY_ORIGIN)
    challenge = b"c" * 32
    response = authenticator.create(webauthn._registration_options(kms, rp, principal, [], challenge))
    problem = webauthn.attestation_problem(kms, webauthn.RegistrationResponse.from_dict(response))
    with kms.transaction() as s:
        webauthn._store_credential(s, kms, rp, principal, challenge, response, link_id=None)
    with kms.transaction() as s:
        cred = s.scalars(select(ConsoleCredential).where(ConsoleCredential.principal == principal)).one()
        assert webauthn.credential_intact(kms, cred)
        return cred.software, cred.attestation, problem


def test_a_chain_to_the_configured_ca_is_hardware(setup):
    kms, vendor, _ = setup
    key, leaf = vendor.leaf()
    assert _register(kms, AttestingAuthenticator(KEY_ORIGIN, key, [leaf])) == (False, "packed", None)


def test_a_chain_through_an_intermediate_ca_is_hardware(setup):
    kms, vendor, _ = setup
    name, ikey, inter = vendor.intermediate(key_usage=_usage(cert_sign=True))
    key, leaf = vendor.leaf(issuer=(name, ikey))
    assert _register(kms, AttestingAuthenticator(KEY_ORIGIN, key, [leaf, inter])) == (False, "packed", None)


def test_a_chain_to_a_foreign_ca_is_software_and_says_why(setup):
    kms, _, foreign = setup
    key, leaf = foreign.leaf()
    software, fmt, problem = _register(kms, AttestingAuthenticator(KEY_ORIGIN, key, [leaf]))
    assert software and fmt == "packed"
    assert problem == (
        f"attestation certificate {leaf.subject.rfc4514_string()} does not chain to a CA valid now in "
        "console.attestation_ca_files"
    )


def test_a_foreign_leaf_claiming_the_vendors_issuer_name_is_software(setup):
    """An attacker's root with the vendor's exact name: names match, signatures do not."""
    kms, vendor, foreign = setup
    key, leaf = foreign.leaf(issuer=(vendor.name, foreign.key))
    software, _, problem = _register(kms, AttestingAuthenticator(KEY_ORIGIN, key, [leaf]))
    assert software and "does not chain to a CA" in problem


def test_packed_self_attestation_is_software(setup):
    kms, _, _ = setup
    software, fmt, problem = _register(kms, AttestingAuthenticator(KEY_ORIGIN))
    assert software and fmt == "packed"
    assert problem == "packed self attestation (no certificate) proves nothing about where the key lives"


def test_none_attestation_is_software(setup):
    kms, _, _ = setup
    software, fmt, problem = _register(kms, SoftwareAuthenticator(KEY_ORIGIN))
    assert software and fmt == "none" and problem.startswith('"none" attestation')


@pytest.mark.parametrize("days, when", [((-400, -1), "expired"), ((1, 400), "not yet valid")])
def test_a_leaf_outside_its_validity_is_software(setup, days, when):
    kms, vendor, _ = setup
    key, leaf = vendor.leaf(days=days)
    software, _, problem = _register(kms, AttestingAuthenticator(KEY_ORIGIN, key, [leaf]))
    assert software and problem.startswith(f"attestation certificate {leaf.subject.rfc4514_string()} is not valid at")


def test_an_expired_configured_ca_is_not_trusted(make_kms, tmp_path):
    kms = make_kms("sqlite")
    vendor = Vendor("Test Key Vendor", kms.now() - timedelta(days=400))  # root valid -430 .. -35 days
    key, leaf = vendor.leaf(days=(400, 800))  # the leaf itself valid now
    console = kms.policy.console.model_copy(update={"attestation_ca_files": [vendor.pem(tmp_path)]})
    kms = dataclasses.replace(kms, policy=kms.policy.model_copy(update={"console": console}))
    software, _, problem = _register(kms, AttestingAuthenticator(KEY_ORIGIN, key, [leaf]))
    assert software and "does not chain to a CA valid now" in problem


def test_a_leaf_marked_as_a_ca_is_software(setup):
    """The packed format requires CA=false on the attestation certificate (fido2 checks it)."""
    kms, vendor, _ = setup
    key, leaf = vendor.leaf(ca=True)
    software, _, problem = _register(kms, AttestingAuthenticator(KEY_ORIGIN, key, [leaf]))
    assert software and "CA=false" in problem


def test_a_leaf_for_another_aaguid_is_software(setup):
    kms, vendor, _ = setup
    key, leaf = vendor.leaf(aaguid=uuid.uuid4().bytes)
    software, _, problem = _register(kms, AttestingAuthenticator(KEY_ORIGIN, key, [leaf]))
    assert software and "AAGUID" in problem


@pytest.mark.parametrize(
    "ca, key_usage", [(False, None), (True, _usage(cert_sign=False))], ids=["not-a-ca", "no-cert-sign-usage"]
)
def test_an_issuer_that_may_not_issue_certificates_is_software(setup, ca, key_usage):
    """An end-entity certificate of the vendor's (say another product's attestation key, if it
    leaked) signing an attestation leaf: the signatures chain, but it may not issue."""
    kms, vendor, _ = setup
    name, ikey, inter = vendor.intermediate(ca=ca, key_usage=key_usage)
    key, leaf = vendor.leaf(issuer=(name, ikey))
    software, _, problem = _register(kms, AttestingAuthenticator(KEY_ORIGIN, key, [leaf, inter]))
    assert software and problem == f"attestation chain certificate {inter.subject.rfc4514_string()} is not a CA"


def test_a_signature_by_another_key_than_the_leafs_is_software(setup):
    kms, vendor, _ = setup
    _, leaf = vendor.leaf()
    software, _, problem = _register(
        kms, AttestingAuthenticator(KEY_ORIGIN, ec.generate_private_key(ec.SECP256R1()), [leaf])
    )
    assert software and "does not verify" in problem


def test_an_ed25519_ca_among_the_files_is_skipped_not_a_crash(setup, tmp_path):
    """fido2's chain check raises for a CA key type it does not handle; the next CA is tried."""
    from cryptography.hazmat.primitives.asymmetric import ed25519

    kms, vendor, _ = setup
    ed_key = ed25519.Ed25519PrivateKey.generate()
    ed_name = _name("Ed25519 Root")
    ed_root = x509.CertificateBuilder().subject_name(ed_name).issuer_name(ed_name).public_key(ed_key.public_key())
    ed_root = (
        ed_root.serial_number(1)
        .not_valid_before(kms.now() - timedelta(days=1))
        .not_valid_after(kms.now() + timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(ed_key, None)
    )
    first = tmp_path / "ed25519.pem"
    first.write_bytes(ed_root.public_bytes(serialization.Encoding.PEM))
    files = [str(first), *kms.policy.console.attestation_ca_files]
    console = kms.policy.console.model_copy(update={"attestation_ca_files": files})
    kms = dataclasses.replace(kms, policy=kms.policy.model_copy(update={"console": console}))
    key, leaf = vendor.leaf()
    assert _register(kms, AttestingAuthenticator(KEY_ORIGIN, key, [leaf])) == (False, "packed", None)
