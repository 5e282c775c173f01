"""The raw-handle bulk rewrap (core/foundation/keystore/pkcs11_raw) on SoftHSM2 against python-pkcs11's path."""

import pytest

from kms_pipelines.core.foundation.keystore.base import AES_256, DecryptionFailed
from tests.fixtures.softhsm import unique_ref


@pytest.fixture
def keks(pkcs11_keystore):
    old, new = unique_ref("kek-v1"), unique_ref("kek-v2")
    pkcs11_keystore.generate(old, AES_256)
    pkcs11_keystore.generate(new, AES_256)
    return old, new


def _session_objects(store):
    """Objects visible to a fresh session that are not token objects (a DEK left behind would be one)."""
    from pkcs11 import Attribute

    with store._session("count", "x") as s:
        return len(list(s.get_objects({Attribute.TOKEN: False})))


def test_raw_rewrap_is_byte_identical_to_python_pkcs11(pkcs11_keystore, keks):
    old, new = keks
    wrapped = [pkcs11_keystore.new_wrapped_dek(old) for _ in range(40)]
    blobs = [pkcs11_keystore.dek_encrypt(old, w, f"record {i}".encode(), b"aad") for i, w in enumerate(wrapped)]
    assert pkcs11_keystore.raw_rewrap  # the default
    raw = pkcs11_keystore.rewrap(old, new, wrapped)
    pkcs11_keystore.raw_rewrap = False
    reference = pkcs11_keystore.rewrap(old, new, wrapped)
    assert raw == reference and len(raw) == 40 and all(len(w) == 40 for w in raw)
    assert all(a != b for a, b in zip(wrapped, raw, strict=True))
    for i, (w, blob) in enumerate(zip(raw, blobs, strict=True)):
        assert pkcs11_keystore.dek_decrypt(new, w, blob, b"aad") == f"record {i}".encode()
    assert _session_objects(pkcs11_keystore) == 0  # every unwrapped DEK was destroyed


@pytest.mark.parametrize("raw", [True, False])
def test_a_foreign_dek_in_the_batch_is_refused_by_index_and_leaves_nothing(pkcs11_keystore, keks, raw):
    old, new = keks
    stranger = unique_ref("kek")
    pkcs11_keystore.generate(stranger, AES_256)
    batch = [pkcs11_keystore.new_wrapped_dek(old), pkcs11_keystore.new_wrapped_dek(stranger)]
    pkcs11_keystore.raw_rewrap = raw
    with pytest.raises(DecryptionFailed, match=r"#1 does not unwrap under key") as err:
        pkcs11_keystore.rewrap(old, new, batch)
    assert batch[1].hex() not in str(err.value)
    assert _session_objects(pkcs11_keystore) == 0
    # the keystore is still usable afterwards (the session went back to the pool)
    assert len(pkcs11_keystore.rewrap(old, new, batch[:1])) == 1
