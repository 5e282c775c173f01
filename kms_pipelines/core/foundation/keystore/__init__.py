"""Key storage behind one narrow protocol: software (cryptography) or PKCS#11 (HSM)."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

from .base import (
    AES_256,
    ARCHIVABLE,
    ARCHIVE_KEK,
    ED25519,
    GENERAL,
    DecryptionFailed,
    GeneratedKey,
    KeyExists,
    KeyNotFound,
    KeyStore,
    KeyStoreError,
    NotArchivable,
    fingerprint,
    verify_signature,
)

__all__ = [
    "AES_256",
    "ARCHIVABLE",
    "ARCHIVE_KEK",
    "ED25519",
    "GENERAL",
    "DecryptionFailed",
    "GeneratedKey",
    "KeyExists",
    "KeyNotFound",
    "KeyStore",
    "KeyStoreError",
    "NotArchivable",
    "fingerprint",
    "keystore_from_env",
    "verify_signature",
]


def _master_key_value(env: Mapping[str, str]) -> str | None:
    """KMS_MASTER_KEY, or the contents of KMS_MASTER_KEY_FILE (a mounted secret shared by every host)."""
    if env.get("KMS_MASTER_KEY"):
        return env["KMS_MASTER_KEY"]
    path = env.get("KMS_MASTER_KEY_FILE")
    if path:
        try:
            return Path(path).read_text().strip()
        except OSError as exc:
            raise KeyStoreError(f"KMS_MASTER_KEY_FILE {path} cannot be read ({exc.strerror})") from None
    return None


def keystore_from_env(home: Path, env: Mapping[str, str] | None = None) -> KeyStore:
    """Build the keystore the environment asks for (``KMS_KEYSTORE=software|pkcs11``)."""
    env = os.environ if env is None else env
    kind = env.get("KMS_KEYSTORE", "software")
    if kind == "software":
        from .software import (  # lazy import: start-up time (only the configured backend loads)
            SoftwareKeyStore,
            load_master_key,
        )

        return SoftwareKeyStore(home / "artifacts" / "kms" / "keys", load_master_key(home, _master_key_value(env)))
    if kind == "pkcs11":
        from .pkcs11 import Pkcs11KeyStore  # lazy import: start-up time (python-pkcs11 loads only for an HSM)

        missing = [v for v in ("KMS_PKCS11_LIB", "KMS_PKCS11_TOKEN", "KMS_PKCS11_PIN") if not env.get(v)]
        if missing:
            raise KeyStoreError(f"KMS_KEYSTORE=pkcs11 needs {', '.join(missing)}")
        return Pkcs11KeyStore(env["KMS_PKCS11_LIB"], env["KMS_PKCS11_TOKEN"], env["KMS_PKCS11_PIN"])
    raise KeyStoreError(f"KMS_KEYSTORE must be 'software' or 'pkcs11', got {kind!r}")
