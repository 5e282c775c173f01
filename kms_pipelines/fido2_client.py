"""The CLI as a FIDO2 client: ``kms approve`` and ``kms init --admin`` get their WebAuthn
answers here, for the challenges core hands out (``console_auth.begin_approval`` …).

* ``HardwareKey``: a plugged-in security key over CTAP HID, through Yubico's ``Fido2Client``
  (CTAP2, falling back to CTAP1), with user verification (the key's PIN, asked on the
  terminal, or its built-in biometrics) and the console's origin as the client-data origin.
* ``SoftwareAuthenticator``: **a software CTAP2-style authenticator for the demo and tests.**
  It holds a real P-256 key in a file and signs real authenticator and client data, so the
  relying party verifies every byte; but the key is a file, not a token. It states the AAGUID
  ``console_auth.SOFTWARE_AAGUID`` and "none" attestation, so it is registered as a software
  authenticator, which core refuses unless the policy sets
  ``console.allow_software_authenticators`` (the demo's and the tests' policies do; the
  production policy does not) and A2 names every principal whose only key is one.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import tempfile
from pathlib import Path

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from fido2.cose import ES256
from fido2.utils import websafe_decode, websafe_encode
from fido2.webauthn import AttestationObject, AttestedCredentialData, AuthenticatorData, CollectedClientData

FLAGS = AuthenticatorData.FLAG
SOFTWARE_KIND = "kms-software-fido2/1"


class Fido2ClientError(ValueError):
    """The authenticator could not answer; the message says why."""


class SoftwareAuthenticator:
    """See the module docstring: demo and tests only, refused by the production policy.

    ``user_verified=False`` and ``get(count=…)`` exist so tests can play a key without user
    verification and a cloned key (sign count going backwards)."""

    def __init__(self, origin: str, *, user_verified: bool = True, path: Path | None = None):
        from .core.access.console_auth import SOFTWARE_AAGUID

        self.origin = origin
        self.user_verified = user_verified
        self.aaguid = SOFTWARE_AAGUID.bytes
        self.key = ec.generate_private_key(ec.SECP256R1())
        self.credential_id = secrets.token_bytes(32)
        self.sign_count = 0
        self.path = Path(path) if path else None

    # -- the credential file (0600: it holds the private key) -----------------------------
    @classmethod
    def load(cls, path: str | os.PathLike) -> SoftwareAuthenticator:
        path = Path(path)
        try:
            doc = json.loads(path.read_text())
            if doc.get("kind") != SOFTWARE_KIND:
                raise ValueError(f"kind is {doc.get('kind')!r}, not {SOFTWARE_KIND!r}")
            me = cls.__new__(cls)
            me.origin, me.user_verified, me.path = doc["origin"], True, path
            me.aaguid = bytes.fromhex(doc["aaguid"])
            key = serialization.load_pem_private_key(doc["private_key"].encode(), password=None)
            if not isinstance(key, ec.EllipticCurvePrivateKey):
                raise ValueError("private_key is not an EC key")
            me.key = key
            me.credential_id = websafe_decode(doc["credential_id"])
            me.sign_count = int(doc["sign_count"])
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise Fido2ClientError(f"software authenticator file {path}: {exc}") from None
        return me

    def save(self) -> None:
        if self.path is None:
            return
        doc = {
            "kind": SOFTWARE_KIND,
            "note": "software FIDO2 authenticator for the demo and tests; not a token",
            "origin": self.origin,
            "aaguid": self.aaguid.hex(),
            "credential_id": websafe_encode(self.credential_id),
            "sign_count": self.sign_count,
            "private_key": self.key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            ).decode(),
        }
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=f".{self.path.name}.")
        with os.fdopen(fd, "w") as f:  # mkstemp: mode 0600
            json.dump(doc, f)
        os.replace(tmp, self.path)  # the sign count never goes back on a crash

    # -- WebAuthn answers ------------------------------------------------------------------
    def _flags(self, extra=0):
        return FLAGS.UP | (FLAGS.UV if self.user_verified else 0) | extra

    def create(self, options: dict) -> dict:
        """Answer ``navigator.credentials.create`` options with a registration ("none" attestation)."""
        pk = options["publicKey"]
        rp_hash = hashlib.sha256(pk["rp"]["id"].encode()).digest()
        cred = AttestedCredentialData.create(
            self.aaguid, self.credential_id, ES256.from_cryptography_key(self.key.public_key())
        )
        auth = AuthenticatorData.create(rp_hash, self._flags(FLAGS.AT), self.sign_count, cred)
        client = CollectedClientData.create("webauthn.create", websafe_decode(pk["challenge"]), self.origin)
        att = AttestationObject.create(*self._attestation(auth, client))
        self.save()
        return {
            "id": websafe_encode(self.credential_id),
            "rawId": websafe_encode(self.credential_id),
            "type": "public-key",
            "response": {
                "clientDataJSON": websafe_encode(bytes(client)),
                "attestationObject": websafe_encode(bytes(att)),
            },
        }

    def _attestation(self, auth: AuthenticatorData, client: CollectedClientData) -> tuple[str, AuthenticatorData, dict]:
        """(format, authenticator data, statement) of the registration: "none", as a software key
        has no vendor to vouch for it (tests override this to send "packed" attestations)."""
        return "none", auth, {}

    def get(self, options: dict, *, rp_id: str | None = None, count: int | None = None) -> dict:
        """Answer ``navigator.credentials.get`` options (sign count +1, or ``count``)."""
        pk = options["publicKey"]
        if count is None and self.path is not None and self.path.exists():
            # the file holds the counter: another process (another `kms approve`) may have signed since
            self.sign_count = max(self.sign_count, SoftwareAuthenticator.load(self.path).sign_count)
        self.sign_count = self.sign_count + 1 if count is None else count
        self.save()
        rp_hash = hashlib.sha256((rp_id or pk["rpId"]).encode()).digest()
        auth = AuthenticatorData.create(rp_hash, self._flags(), self.sign_count)
        client = CollectedClientData.create("webauthn.get", websafe_decode(pk["challenge"]), self.origin)
        signature = self.key.sign(bytes(auth) + client.hash, ec.ECDSA(hashes.SHA256()))
        return {
            "id": websafe_encode(self.credential_id),
            "rawId": websafe_encode(self.credential_id),
            "type": "public-key",
            "response": {
                "clientDataJSON": websafe_encode(bytes(client)),
                "authenticatorData": websafe_encode(bytes(auth)),
                "signature": websafe_encode(signature),
            },
        }


class HardwareKey:
    """A security key plugged in over USB (CTAP HID), driven by ``fido2.client.Fido2Client``."""

    def __init__(self, origin: str, *, prompt=print, ask_pin=None):
        self.origin, self.prompt, self.ask_pin = origin, prompt, ask_pin

    def _client(self):
        from fido2.client import DefaultClientDataCollector, Fido2Client, UserInteraction
        from fido2.hid import CtapHidDevice

        outer = self

        class Interaction(UserInteraction):
            def prompt_up(self):
                outer.prompt("Touch your security key now.")

            def request_pin(self, permissions, rp_id):
                return outer.ask_pin() if outer.ask_pin else None

            def request_uv(self, permissions, rp_id):
                return True

        devices = list(CtapHidDevice.list_devices())
        if not devices:
            raise Fido2ClientError("no FIDO2 security key found (plug one in, or check USB HID permissions)")
        if len(devices) > 1:
            raise Fido2ClientError(f"{len(devices)} FIDO2 security keys are plugged in; leave only yours")
        return Fido2Client(devices[0], DefaultClientDataCollector(self.origin), user_interaction=Interaction())

    def create(self, options: dict) -> dict:
        from fido2.client import ClientError

        try:
            return dict(self._client().make_credential(options["publicKey"]))
        except ClientError as exc:
            raise Fido2ClientError(f"the security key refused to register: {exc}") from None

    def get(self, options: dict) -> dict:
        from fido2.client import ClientError

        try:
            return dict(self._client().get_assertion(options["publicKey"]).get_response(0))
        except ClientError as exc:
            raise Fido2ClientError(f"the security key gave no assertion: {exc}") from None


def authenticator(origin: str, software_key: str | os.PathLike | None = None, *, create: bool = False, **kw):
    """The CLI's authenticator: the software one in ``software_key`` (a new file with ``create``),
    otherwise the plugged-in hardware key."""
    if software_key is None:
        return HardwareKey(origin, **kw)
    path = Path(software_key)
    if create:
        if path.exists():
            raise Fido2ClientError(f"software authenticator file {path} already exists; not overwritten")
        return SoftwareAuthenticator(origin, path=path)
    return SoftwareAuthenticator.load(path)
