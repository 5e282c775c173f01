"""Software keystore: `cryptography` primitives, key files encrypted at rest.

Each key object is one file ``<dir>/<ref>.key`` holding its value sealed with
AES-256-GCM under the master key (``KMS_MASTER_KEY``, base64, or a generated
``master.key`` of mode 0600). Plaintext key values exist only in this process's memory.
"""

from __future__ import annotations

import base64
import json
import os
import re
import secrets
import threading
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.keywrap import (
    InvalidUnwrap,
    aes_key_unwrap_with_padding,
    aes_key_wrap_with_padding,
)

from .base import (
    AES_256,
    ALGORITHMS,
    ARCHIVABLE,
    ARCHIVE_KEK,
    ED25519,
    GENERAL,
    PURPOSES,
    DecryptionFailed,
    GeneratedKey,
    KeyExists,
    KeyNotFound,
    KeyStoreError,
    NotArchivable,
)

_REF = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:@-]{0,199}$")
_FORMAT = "kms-software-key/1"
FORENSIC = "forensic"  # purpose of keys imported from the archive vault (decrypt only)
FORENSIC_DIR = "forensic"


def _aad(ref: str, algorithm: str, extractable: bool, purpose: str) -> bytes:
    # The purpose is bound only when it is not the default, so older key files still open.
    tail = "" if purpose == GENERAL else f"|{purpose}"
    return f"{_FORMAT}|{ref}|{algorithm}|{int(extractable)}{tail}".encode()


def validate_ref(ref: str) -> str:
    if not isinstance(ref, str) or not _REF.match(ref) or ".." in ref:
        raise KeyStoreError(f"invalid key reference {ref!r}: use letters, digits and . _ : @ -")
    return ref


def load_master_key(home: Path, env_value: str | None = None) -> bytes:
    """The master key from ``KMS_MASTER_KEY`` or ``<home>/master.key`` (created 0600 on first use)."""
    env_value = env_value if env_value is not None else os.environ.get("KMS_MASTER_KEY")
    if env_value:
        try:
            key = base64.b64decode(env_value, validate=True)
        except ValueError as exc:
            raise KeyStoreError("KMS_MASTER_KEY is not valid base64") from exc
        if len(key) != 32:
            raise KeyStoreError(f"KMS_MASTER_KEY must decode to 32 bytes, got {len(key)}")
        return key
    path = home / "master.key"
    home.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        mode = path.stat().st_mode & 0o777
        if mode & 0o077:
            raise KeyStoreError(f"{path} is readable by group/other (mode {mode:o}); chmod 600 it") from None
        key = base64.b64decode(path.read_bytes().strip())
        if len(key) != 32:
            raise KeyStoreError(f"{path} does not hold a 32-byte base64 key") from None
        return key
    with os.fdopen(fd, "wb") as fh:
        fh.write(base64.b64encode(secrets.token_bytes(32)) + b"\n")
    return load_master_key(home, env_value="")


def _unseal(master: AESGCM, ref: str, doc: dict[str, Any]) -> tuple[str, bytes, bool, str]:
    """(algorithm, value, extractable, purpose) of one key file's JSON, opened under ``master``."""
    algorithm, extractable = doc["algorithm"], bool(doc["extractable"])
    purpose = doc.get("purpose", GENERAL)
    sealed = base64.b64decode(doc["sealed"])
    try:
        value = master.decrypt(sealed[:12], sealed[12:], _aad(ref, algorithm, extractable, purpose))
    except InvalidTag:
        raise KeyStoreError(
            f"key file for {ref!r} does not open under the master key (wrong KMS_MASTER_KEY or tampered file)"
        ) from None
    return algorithm, value, extractable, purpose


def key_file_problems(directory: Path, master_key: bytes) -> list[str]:
    """Each key file in ``directory`` that cannot be read or does not open under ``master_key``,
    as ``name (why)``; empty when every one opens. Reads only: nothing is created, changed or
    cached, and no opened value outlives this call (a worker's preflight, core/foundation/worker.py)."""
    master, bad = AESGCM(master_key), []
    for path in sorted(directory.glob("*.key")):
        try:
            _unseal(master, path.name[:-4], json.loads(path.read_text()))
        except OSError as exc:
            bad.append(f"{path.name} (cannot be read: {exc.strerror})")
        except KeyStoreError:
            bad.append(f"{path.name} (does not open under the master key)")
        except (ValueError, KeyError, TypeError):
            bad.append(f"{path.name} (not a sealed key file)")
    return bad


class SoftwareKeyStore:
    backend = "software"

    def __init__(self, directory: str | os.PathLike[str], master_key: bytes | None = None):
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        os.chmod(self.directory, 0o700)
        self._master = AESGCM(master_key if master_key is not None else load_master_key(self.directory.parent))
        self._cache: dict[str, tuple[str, bytes, bool, str]] = {}
        self._lock = threading.Lock()

    # ---- files -----------------------------------------------------------------
    def _path(self, ref: str, purpose: str = GENERAL) -> Path:
        # Forensic imports live in their own directory, out of reach of every live lookup.
        base = self.directory / FORENSIC_DIR if purpose == FORENSIC else self.directory
        return base / f"{validate_ref(ref)}.key"

    def _store(self, ref: str, algorithm: str, value: bytes, extractable: bool, purpose: str = GENERAL) -> None:
        path = self._path(ref, purpose)
        path.parent.mkdir(mode=0o700, exist_ok=True)
        nonce = secrets.token_bytes(12)
        sealed = nonce + self._master.encrypt(nonce, value, _aad(ref, algorithm, extractable, purpose))
        doc = {
            "format": _FORMAT,
            "algorithm": algorithm,
            "extractable": extractable,
            "sealed": base64.b64encode(sealed).decode(),
        }
        if purpose != GENERAL:
            doc["purpose"] = purpose
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            raise KeyExists(f"key {ref!r} already exists in the software keystore") from None
        with os.fdopen(fd, "w") as fh:
            json.dump(doc, fh)
            fh.flush()
            os.fsync(fh.fileno())

    def _load(self, ref: str, forensic: bool = False) -> tuple[str, bytes, bool, str]:
        slot = f"{FORENSIC}/{ref}" if forensic else ref
        cached = self._cache.get(slot)
        if cached is not None:
            return cached
        path = self._path(ref, FORENSIC if forensic else GENERAL)
        try:
            doc = json.loads(path.read_text())
        except FileNotFoundError:
            where = "forensic keystore" if forensic else "software keystore"
            raise KeyNotFound(f"key {ref!r} not found in the {where}") from None
        entry = _unseal(self._master, ref, doc)
        if (entry[3] == FORENSIC) != forensic:
            raise KeyStoreError(f"key file for {ref!r} is in the wrong namespace (tampered keystore directory)")
        with self._lock:
            self._cache[slot] = entry
        return entry

    def _aes(self, ref: str) -> bytes:
        algorithm, value, _, _ = self._load(ref)
        if algorithm != AES_256:
            raise KeyStoreError(f"key {ref!r} is {algorithm}, not an AES-256 key")
        return value

    def _signer(self, ref: str) -> Ed25519PrivateKey:
        algorithm, value, _, _ = self._load(ref)
        if algorithm != ED25519:
            raise KeyStoreError(f"key {ref!r} is {algorithm}, not a signing key")
        return Ed25519PrivateKey.from_private_bytes(value)

    # ---- protocol ----------------------------------------------------------------
    def generate(self, ref: str, algorithm: str, *, extractable: bool = False, purpose: str = GENERAL) -> GeneratedKey:
        if algorithm not in ALGORITHMS:
            raise KeyStoreError(f"unsupported algorithm {algorithm!r}; expected one of {', '.join(ALGORITHMS)}")
        if purpose not in PURPOSES or (purpose != GENERAL and algorithm != AES_256):
            raise KeyStoreError(f"purpose {purpose!r} is not available for {algorithm} keys")
        if algorithm == AES_256:
            self._store(ref, algorithm, AESGCM.generate_key(256), extractable, purpose)
            return GeneratedKey(ref, algorithm)
        private = Ed25519PrivateKey.generate()
        raw = private.private_bytes(
            serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption()
        )
        self._store(ref, algorithm, raw, False)
        return GeneratedKey(ref, algorithm, self.public_key(ref))

    def exists(self, ref: str) -> bool:
        return self._path(ref).exists()

    def public_key(self, ref: str) -> bytes:
        return self._signer(ref).public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)

    def sign(self, ref: str, message: bytes) -> bytes:
        return self._signer(ref).sign(message)

    def encrypt(self, ref: str, plaintext: bytes, aad: bytes = b"") -> bytes:
        nonce = secrets.token_bytes(12)
        return nonce + AESGCM(self._aes(ref)).encrypt(nonce, plaintext, aad)

    def decrypt(self, ref: str, blob: bytes, aad: bytes = b"") -> bytes:
        try:
            return AESGCM(self._aes(ref)).decrypt(blob[:12], blob[12:], aad)
        except (InvalidTag, ValueError):
            raise DecryptionFailed(f"ciphertext does not authenticate under key {ref!r}") from None

    def new_wrapped_dek(self, kek_ref: str) -> bytes:
        return aes_key_wrap_with_padding(self._aes(kek_ref), AESGCM.generate_key(256))

    def _unwrap(self, kek: bytes, kek_ref: str, wrapped: bytes) -> bytes:
        try:
            return aes_key_unwrap_with_padding(kek, wrapped)
        except (InvalidUnwrap, ValueError):
            raise DecryptionFailed(f"wrapped DEK does not unwrap under key {kek_ref!r}") from None

    def dek_encrypt(self, kek_ref: str, wrapped_dek: bytes, plaintext: bytes, aad: bytes = b"") -> bytes:
        dek = self._unwrap(self._aes(kek_ref), kek_ref, wrapped_dek)
        nonce = secrets.token_bytes(12)
        return nonce + AESGCM(dek).encrypt(nonce, plaintext, aad)

    def dek_decrypt(self, kek_ref: str, wrapped_dek: bytes, blob: bytes, aad: bytes = b"") -> bytes:
        dek = self._unwrap(self._aes(kek_ref), kek_ref, wrapped_dek)
        try:
            return AESGCM(dek).decrypt(blob[:12], blob[12:], aad)
        except (InvalidTag, ValueError):
            raise DecryptionFailed("ciphertext does not authenticate under its DEK") from None

    def rewrap(self, old_kek_ref: str, new_kek_ref: str, wrapped_deks: Sequence[bytes]) -> list[bytes]:
        old, new = self._aes(old_kek_ref), self._aes(new_kek_ref)
        return [aes_key_wrap_with_padding(new, self._unwrap(old, old_kek_ref, w)) for w in wrapped_deks]

    def export_secret(self, ref: str) -> bytes:
        algorithm, value, extractable, _ = self._load(ref)
        if algorithm != AES_256 or not extractable:
            raise KeyStoreError(f"key {ref!r} is not extractable")
        return value

    def import_secret(self, ref: str, value: bytes) -> GeneratedKey:
        if len(value) != 32:
            raise KeyStoreError("imported AES-256 key must be 32 bytes")
        self._store(ref, AES_256, value, True)
        return GeneratedKey(ref, AES_256)

    # ---- archive vault (T1) -----------------------------------------------------------
    def _archive_kek(self, kek_ref: str) -> bytes:
        algorithm, value, _, purpose = self._load(kek_ref)
        if algorithm != AES_256 or purpose != ARCHIVE_KEK:
            raise KeyStoreError(f"key {kek_ref!r} is not an archive KEK")
        return value

    def archive_wrap(self, kek_ref: str, ref: str) -> bytes:
        kek = self._archive_kek(kek_ref)
        algorithm, value, _, purpose = self._load(ref)
        if algorithm != AES_256 or purpose != ARCHIVABLE:
            raise NotArchivable(f"key {ref!r} was not generated archivable; it cannot leave the keystore")
        return aes_key_wrap_with_padding(kek, value)

    def forensic_unwrap(self, kek_ref: str, wrapped: bytes, ref: str) -> GeneratedKey:
        value = self._unwrap(self._archive_kek(kek_ref), kek_ref, wrapped)
        try:
            self._store(ref, AES_256, value, False, FORENSIC)
        except KeyExists:
            raise KeyExists(f"key {ref!r} already exists in the forensic keystore") from None
        return GeneratedKey(ref, AES_256)

    def forensic_decrypt(self, ref: str, blob: bytes, aad: bytes = b"") -> bytes:
        _, value, _, _ = self._load(ref, forensic=True)
        try:
            return AESGCM(value).decrypt(blob[:12], blob[12:], aad)
        except (InvalidTag, ValueError):
            raise DecryptionFailed(f"ciphertext does not authenticate under forensic key {ref!r}") from None

    def forensic_destroy(self, ref: str) -> None:
        self._erase(self._path(ref, FORENSIC), ref, f"{FORENSIC}/{ref}")

    def forensic_refs(self) -> Iterable[str]:
        return sorted(p.name[:-4] for p in (self.directory / FORENSIC_DIR).glob("*.key"))

    def destroy(self, ref: str) -> None:
        self._erase(self._path(ref), ref, ref)

    def _erase(self, path: Path, ref: str, slot: str) -> None:
        try:
            size = path.stat().st_size
        except FileNotFoundError:
            raise KeyNotFound(f"key {ref!r} not found in the software keystore") from None
        # Overwrite before unlinking so the sealed value does not linger in free blocks.
        with open(path, "r+b") as fh:
            fh.write(secrets.token_bytes(size))
            fh.flush()
            os.fsync(fh.fileno())
        path.unlink()
        with self._lock:
            self._cache.pop(slot, None)

    def refs(self) -> Iterable[str]:
        return sorted(p.name[:-4] for p in self.directory.glob("*.key"))

    def close(self) -> None:
        with self._lock:
            self._cache.clear()
