"""A software FIDO2 authenticator for tests that run without a browser (core and compliance
tests). It is not a mock: it holds a real P-256 key, builds real authenticator data and
client data, and signs them as a CTAP2 authenticator would ("none" attestation), so the
console's ``fido2`` relying party verifies every byte. The browser tests use Chromium's
virtual authenticator instead."""

from __future__ import annotations

import hashlib
import secrets

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from fido2.cose import ES256
from fido2.utils import websafe_decode, websafe_encode
from fido2.webauthn import AttestationObject, AttestedCredentialData, AuthenticatorData, CollectedClientData

FLAGS = AuthenticatorData.FLAG


class SoftAuthenticator:
    def __init__(self, origin: str, *, user_verified: bool = True):
        self.origin = origin
        self.user_verified = user_verified
        self.key = ec.generate_private_key(ec.SECP256R1())
        self.credential_id = secrets.token_bytes(32)
        self.sign_count = 0

    def _flags(self, extra=0):
        return FLAGS.UP | (FLAGS.UV if self.user_verified else 0) | extra

    def create(self, options: dict) -> dict:
        """Answer ``navigator.credentials.create`` options (the console's JSON) with a registration."""
        pk = options["publicKey"]
        rp_hash = hashlib.sha256(pk["rp"]["id"].encode()).digest()
        cred = AttestedCredentialData.create(b"\0" * 16, self.credential_id,
                                             ES256.from_cryptography_key(self.key.public_key()))
        auth = AuthenticatorData.create(rp_hash, self._flags(FLAGS.AT), self.sign_count, cred)
        client = CollectedClientData.create("webauthn.create", websafe_decode(pk["challenge"]), self.origin)
        att = AttestationObject.create("none", auth, {})
        return {"id": websafe_encode(self.credential_id), "rawId": websafe_encode(self.credential_id),
                "type": "public-key", "response": {"clientDataJSON": websafe_encode(bytes(client)),
                                                   "attestationObject": websafe_encode(bytes(att))}}

    def get(self, options: dict, *, rp_id: str | None = None, count: int | None = None) -> dict:
        """Answer ``navigator.credentials.get`` options with an assertion (sign count +1, or ``count``)."""
        pk = options["publicKey"]
        self.sign_count = self.sign_count + 1 if count is None else count
        rp_hash = hashlib.sha256((rp_id or pk["rpId"]).encode()).digest()
        auth = AuthenticatorData.create(rp_hash, self._flags(), self.sign_count)
        client = CollectedClientData.create("webauthn.get", websafe_decode(pk["challenge"]), self.origin)
        signature = self.key.sign(bytes(auth) + client.hash, ec.ECDSA(hashes.SHA256()))
        return {"id": websafe_encode(self.credential_id), "rawId": websafe_encode(self.credential_id),
                "type": "public-key", "response": {"clientDataJSON": websafe_encode(bytes(client)),
                                                   "authenticatorData": websafe_encode(bytes(auth)),
                                                   "signature": websafe_encode(signature)}}


def register(kms, rp, token: str, totp_code: str, authenticator: SoftAuthenticator) -> str:
    """Register ``authenticator`` through registration link ``token`` (the console's core path)."""
    from kms_pipelines.core import console_auth

    handle, options = console_auth.begin_registration(kms, rp, token)
    return console_auth.complete_registration(kms, rp, token, handle=handle, response=authenticator.create(options),
                                              totp=totp_code)
