"""Key storage behind one narrow protocol: software (cryptography) or PKCS#11 (HSM)."""

from __future__ import annotations

import os
from pathlib import Path

from .base import (  # noqa: F401
    AES_256,
    ARCHIVABLE,
    ARCHIVE_KEK,
    GENERAL,
    ED25519,
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


def keystore_from_env(home: Path, env: dict | None = None) -> KeyStore:
    """Build the keystore the environment asks for (``KMS_KEYSTORE=software|pkcs11``)."""
    env = os.environ if env is None else env
    kind = env.get("KMS_KEYSTORE", "software")
    if kind == "software":
        from .software import SoftwareKeyStore, load_master_key

        return SoftwareKeyStore(home / "artifacts" / "kms" / "keys", load_master_key(home, env.get("KMS_MASTER_KEY")))
    if kind == "pkcs11":
        from .pkcs11 import Pkcs11KeyStore

        missing = [v for v in ("KMS_PKCS11_LIB", "KMS_PKCS11_TOKEN", "KMS_PKCS11_PIN") if not env.get(v)]
        if missing:
            raise KeyStoreError(f"KMS_KEYSTORE=pkcs11 needs {', '.join(missing)}")
        return Pkcs11KeyStore(env["KMS_PKCS11_LIB"], env["KMS_PKCS11_TOKEN"], env["KMS_PKCS11_PIN"])
    raise KeyStoreError(f"KMS_KEYSTORE must be 'software' or 'pkcs11', got {kind!r}")
