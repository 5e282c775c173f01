"""The narrow KeyStore protocol every backend implements.

Callers name key objects by an opaque reference string (``ref``) that the lifecycle
layer derives from the key version. Backends never hand raw key material to their
callers except where the protocol says so explicitly (``unwrap_secret`` for the
break-glass/backup secrets that must leave the keystore by design). Data keys (DEKs)
travel only in wrapped form; every operation that needs a DEK in the clear takes the
wrapped bytes and the wrapping key's ref, so under PKCS#11 the DEK lives only inside
the token.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

AES_256 = "aes256"
ED25519 = "ed25519"
ALGORITHMS = (AES_256, ED25519)

# What an AES key object may do beyond its ordinary use (T1 archive vault):
GENERAL = "general"
ARCHIVE_KEK = "archive-kek"  # wraps archivable keys into the vault, and nothing else
ARCHIVABLE = "archivable"  # may leave the keystore only wrapped under an archive KEK
PURPOSES = (GENERAL, ARCHIVE_KEK, ARCHIVABLE)


class KeyStoreError(Exception):
    """A keystore operation failed. Messages never contain key material."""


class KeyNotFound(KeyStoreError):
    pass


class KeyStoreSessionLost(KeyStoreError):
    """The HSM session (or token connection) was lost mid-operation; nothing was done and
    the next operation opens a fresh session, so the caller's unit may be retried."""

    def __init__(self, message: str, cause: str):
        super().__init__(message)
        self.cause = cause


class KeyExists(KeyStoreError):
    pass


class NotArchivable(KeyStoreError):
    """The key was not generated archivable (e.g. before the archive vault existed)."""


class DecryptionFailed(KeyStoreError):
    """Ciphertext or associated data did not authenticate under the named key."""


@dataclass(frozen=True)
class GeneratedKey:
    ref: str
    algorithm: str
    public_key: bytes | None = None  # raw public key for signing keys


@runtime_checkable
class KeyStore(Protocol):
    """What the rest of kms_pipelines may ask of key storage (software or HSM)."""

    backend: str

    def generate(self, ref: str, algorithm: str, *, extractable: bool = False, purpose: str = GENERAL) -> GeneratedKey:
        """Create a new key object. ``extractable`` is only honoured for AES keys that
        must be escrowed (break-glass); it never applies to signing keys. ``purpose``
        (AES only) marks an archive KEK or a key that may be archived under one."""

    def exists(self, ref: str) -> bool: ...

    def public_key(self, ref: str) -> bytes:
        """Raw public key bytes of a signing key (32 bytes for Ed25519)."""

    def sign(self, ref: str, message: bytes) -> bytes: ...

    # --- symmetric use of a key-encryption key directly (small secrets only) ---
    def encrypt(self, ref: str, plaintext: bytes, aad: bytes = b"") -> bytes:
        """AES-256-GCM; returns nonce(12) || ciphertext || tag(16)."""

    def decrypt(self, ref: str, blob: bytes, aad: bytes = b"") -> bytes: ...

    # --- envelope encryption: DEKs only ever leave as wrapped bytes ---
    def new_wrapped_dek(self, kek_ref: str) -> bytes:
        """Generate a fresh AES-256 DEK and return it wrapped (AES key wrap with padding)."""

    def dek_encrypt(self, kek_ref: str, wrapped_dek: bytes, plaintext: bytes, aad: bytes = b"") -> bytes: ...

    def dek_decrypt(self, kek_ref: str, wrapped_dek: bytes, blob: bytes, aad: bytes = b"") -> bytes: ...

    def rewrap(self, old_kek_ref: str, new_kek_ref: str, wrapped_deks: Sequence[bytes]) -> list[bytes]:
        """Unwrap each DEK under the old KEK and wrap it under the new one, in one batch."""

    def export_secret(self, ref: str) -> bytes:
        """Raw value of an extractable AES key (break-glass escrow only). Refuses others."""

    def import_secret(self, ref: str, value: bytes) -> GeneratedKey:
        """Store an AES key whose value came from escrow (unseal after break-glass)."""

    # --- T1 archive vault: retired AES material leaves only wrapped under an archive KEK ---
    def archive_wrap(self, kek_ref: str, ref: str) -> bytes:
        """AES key wrap with padding of the ``archivable`` key ``ref`` under the ``archive-kek``
        ``kek_ref``; refuses any other pairing."""

    def forensic_unwrap(self, kek_ref: str, wrapped: bytes, ref: str) -> GeneratedKey:
        """Unwrap an archived AES key into the forensic namespace: a separate, decrypt-only
        object that no live operation can reach (sign/encrypt/wrap are impossible)."""

    def forensic_decrypt(self, ref: str, blob: bytes, aad: bytes = b"") -> bytes: ...

    def forensic_destroy(self, ref: str) -> None: ...

    def forensic_refs(self) -> Iterable[str]: ...

    def destroy(self, ref: str) -> None:
        """Remove the key object for good (HSM object destroyed / file securely erased)."""

    def refs(self) -> Iterable[str]:
        """Every key reference the backend currently holds."""

    def close(self) -> None: ...


def verify_signature(public_key: bytes, message: bytes, signature: bytes) -> bool:
    """Verify an Ed25519 signature with only the public key: no keystore needed, so
    auditors can run it offline."""
    try:
        Ed25519PublicKey.from_public_bytes(public_key).verify(signature, message)
        return True
    except (InvalidSignature, ValueError):
        return False


def fingerprint(public_key: bytes) -> str:
    return "SHA256:" + hashlib.sha256(public_key).hexdigest()
