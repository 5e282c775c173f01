"""One KeyStore contract, run against the software backend and a real SoftHSM2 token.

Then PKCS#11-only tests: what cannot leave the token, clear configuration errors, threads, fork.
"""

from __future__ import annotations

import multiprocessing
import os
import secrets
import threading

import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.keywrap import aes_key_unwrap_with_padding, aes_key_wrap_with_padding

from kms_pipelines.core.foundation.keystore import (
    AES_256,
    ED25519,
    DecryptionFailed,
    KeyExists,
    KeyNotFound,
    KeyStoreError,
    verify_signature,
)
from tests.fixtures.softhsm import unique_ref


def _assert_no_secret(exc: BaseException, *secrets_: bytes | str) -> None:
    text = f"{exc} {exc!r}"
    for value in secrets_:
        if isinstance(value, str):
            assert value not in text
            continue
        assert value.hex() not in text
        assert value.hex().upper() not in text
        assert repr(value) not in text


# ============================================================================================
# The contract: every backend
# ============================================================================================


def test_backend_name(any_keystore):
    assert any_keystore.backend in ("software", "pkcs11")


def test_generate_both_algorithms(any_keystore):
    ks = any_keystore
    aes, ed = unique_ref("aes"), unique_ref("ed")
    g1 = ks.generate(aes, AES_256)
    g2 = ks.generate(ed, ED25519)
    assert (g1.ref, g1.algorithm, g1.public_key) == (aes, AES_256, None)
    assert g2.ref == ed and g2.algorithm == ED25519
    assert isinstance(g2.public_key, bytes) and len(g2.public_key) == 32
    assert ks.public_key(ed) == g2.public_key
    assert ks.exists(aes) and ks.exists(ed)
    assert {aes, ed} <= set(ks.refs())


def test_unsupported_algorithm_and_bad_ref(any_keystore):
    with pytest.raises(KeyStoreError, match="unsupported algorithm"):
        any_keystore.generate(unique_ref(), "rsa2048")
    with pytest.raises(KeyStoreError, match="invalid key reference"):
        any_keystore.generate("../escape", AES_256)


@pytest.mark.parametrize("first,second", [(AES_256, AES_256), (ED25519, ED25519), (AES_256, ED25519)])
def test_duplicate_ref_refused(any_keystore, first, second):
    ref = unique_ref("dup")
    any_keystore.generate(ref, first)
    with pytest.raises(KeyExists, match=ref):
        any_keystore.generate(ref, second)
    with pytest.raises(KeyExists):
        any_keystore.import_secret(ref, secrets.token_bytes(32))


def test_sign_verify_with_public_key_only(any_keystore):
    ref = unique_ref("sig")
    public = any_keystore.generate(ref, ED25519).public_key
    message = b"ledger checkpoint 42 " + secrets.token_bytes(16)
    signature = any_keystore.sign(ref, message)
    assert len(signature) == 64
    assert verify_signature(public, message, signature)
    assert not verify_signature(public, message + b"x", signature)
    other = any_keystore.generate(unique_ref("sig"), ED25519).public_key
    assert not verify_signature(other, message, signature)


def test_wrong_key_kind_is_refused(any_keystore):
    aes, ed = unique_ref("aes"), unique_ref("ed")
    any_keystore.generate(aes, AES_256)
    any_keystore.generate(ed, ED25519)
    with pytest.raises(KeyStoreError) as info:
        any_keystore.sign(aes, b"m")
    assert not isinstance(info.value, KeyNotFound)
    with pytest.raises(KeyStoreError) as info:
        any_keystore.public_key(aes)
    assert not isinstance(info.value, KeyNotFound)
    with pytest.raises(KeyStoreError) as info:
        any_keystore.encrypt(ed, b"m")
    assert not isinstance(info.value, KeyNotFound)
    with pytest.raises(KeyStoreError):
        any_keystore.new_wrapped_dek(ed)


def test_encrypt_decrypt_round_trip_with_aad(any_keystore):
    ref = unique_ref("kek")
    any_keystore.generate(ref, AES_256)
    for plaintext in (b"", b"x", b"app secret " * 100):
        blob = any_keystore.encrypt(ref, plaintext, b"tenant=1")
        assert len(blob) == 12 + len(plaintext) + 16
        assert any_keystore.decrypt(ref, blob, b"tenant=1") == plaintext
    # fresh nonce every time
    assert any_keystore.encrypt(ref, b"same") != any_keystore.encrypt(ref, b"same")
    assert any_keystore.decrypt(ref, any_keystore.encrypt(ref, b"no aad")) == b"no aad"


def test_wrong_aad_or_tampering_fails(any_keystore):
    ref, other = unique_ref("kek"), unique_ref("kek")
    any_keystore.generate(ref, AES_256)
    any_keystore.generate(other, AES_256)
    blob = any_keystore.encrypt(ref, b"secret value", b"aad-1")
    with pytest.raises(DecryptionFailed):
        any_keystore.decrypt(ref, blob, b"aad-2")
    with pytest.raises(DecryptionFailed):
        any_keystore.decrypt(ref, blob)
    tampered = bytearray(blob)
    tampered[15] ^= 0x01
    with pytest.raises(DecryptionFailed):
        any_keystore.decrypt(ref, bytes(tampered), b"aad-1")
    with pytest.raises(DecryptionFailed):
        any_keystore.decrypt(ref, blob[:-1], b"aad-1")
    with pytest.raises(DecryptionFailed):
        any_keystore.decrypt(ref, blob[:10], b"aad-1")
    with pytest.raises(DecryptionFailed) as info:
        any_keystore.decrypt(other, blob, b"aad-1")
    assert "secret value" not in str(info.value)


def test_dek_envelope_round_trip(any_keystore):
    kek, other = unique_ref("kek"), unique_ref("kek")
    any_keystore.generate(kek, AES_256)
    any_keystore.generate(other, AES_256)
    wrapped = any_keystore.new_wrapped_dek(kek)
    assert len(wrapped) == 40  # RFC 5649 wrap of a 32-byte key
    assert any_keystore.new_wrapped_dek(kek) != wrapped
    blob = any_keystore.dek_encrypt(kek, wrapped, b"row 17 payload", b"table=accounts")
    assert len(blob) == 12 + 14 + 16
    assert any_keystore.dek_decrypt(kek, wrapped, blob, b"table=accounts") == b"row 17 payload"
    with pytest.raises(DecryptionFailed):
        any_keystore.dek_decrypt(kek, wrapped, blob, b"table=other")
    with pytest.raises(DecryptionFailed):
        any_keystore.dek_decrypt(kek, any_keystore.new_wrapped_dek(kek), blob, b"table=accounts")
    with pytest.raises(DecryptionFailed):
        any_keystore.dek_decrypt(other, wrapped, blob, b"table=accounts")
    with pytest.raises(DecryptionFailed):
        any_keystore.dek_encrypt(other, wrapped, b"x")
    bad = bytearray(wrapped)
    bad[5] ^= 0xFF
    with pytest.raises(DecryptionFailed):
        any_keystore.dek_decrypt(kek, bytes(bad), blob, b"table=accounts")


def test_rewrap_then_old_kek_not_needed(any_keystore):
    old, new = unique_ref("kek-v1"), unique_ref("kek-v2")
    any_keystore.generate(old, AES_256)
    any_keystore.generate(new, AES_256)
    wrapped = [any_keystore.new_wrapped_dek(old) for _ in range(5)]
    blobs = [any_keystore.dek_encrypt(old, w, f"record {i}".encode(), b"aad") for i, w in enumerate(wrapped)]
    rewrapped = any_keystore.rewrap(old, new, wrapped)
    assert len(rewrapped) == len(wrapped)
    assert all(a != b for a, b in zip(wrapped, rewrapped, strict=True))
    assert any_keystore.rewrap(old, new, []) == []
    any_keystore.destroy(old)
    for i, (w, blob) in enumerate(zip(rewrapped, blobs, strict=True)):
        assert any_keystore.dek_decrypt(new, w, blob, b"aad") == f"record {i}".encode()
    with pytest.raises(KeyNotFound):
        any_keystore.dek_decrypt(old, wrapped[0], blobs[0], b"aad")


def test_rewrap_refuses_foreign_dek(any_keystore):
    old, new, stranger = unique_ref("kek"), unique_ref("kek"), unique_ref("kek")
    for ref in (old, new, stranger):
        any_keystore.generate(ref, AES_256)
    batch = [any_keystore.new_wrapped_dek(old), any_keystore.new_wrapped_dek(stranger)]
    with pytest.raises(DecryptionFailed, match=old):
        any_keystore.rewrap(old, new, batch)


def test_destroy_then_use_is_key_not_found(any_keystore):
    aes, ed = unique_ref("aes"), unique_ref("ed")
    any_keystore.generate(aes, AES_256)
    any_keystore.generate(ed, ED25519)
    wrapped = any_keystore.new_wrapped_dek(aes)
    any_keystore.destroy(aes)
    any_keystore.destroy(ed)
    assert not any_keystore.exists(aes) and not any_keystore.exists(ed)
    assert aes not in set(any_keystore.refs()) and ed not in set(any_keystore.refs())
    with pytest.raises(KeyNotFound):
        any_keystore.encrypt(aes, b"x")
    with pytest.raises(KeyNotFound):
        any_keystore.dek_encrypt(aes, wrapped, b"x")
    with pytest.raises(KeyNotFound):
        any_keystore.sign(ed, b"x")
    with pytest.raises(KeyNotFound):
        any_keystore.public_key(ed)
    with pytest.raises(KeyNotFound):
        any_keystore.destroy(aes)
    # the ref can be reused after destruction
    any_keystore.generate(aes, AES_256)


def test_unknown_ref_is_key_not_found(any_keystore):
    ref = unique_ref("nobody")
    known = unique_ref("kek")
    any_keystore.generate(known, AES_256)
    wrapped = any_keystore.new_wrapped_dek(known)
    assert not any_keystore.exists(ref)
    calls = [
        lambda: any_keystore.public_key(ref),
        lambda: any_keystore.sign(ref, b"m"),
        lambda: any_keystore.encrypt(ref, b"m"),
        lambda: any_keystore.decrypt(ref, b"\0" * 40),
        lambda: any_keystore.new_wrapped_dek(ref),
        lambda: any_keystore.dek_encrypt(ref, wrapped, b"m"),
        lambda: any_keystore.dek_decrypt(ref, wrapped, b"\0" * 40),
        lambda: any_keystore.rewrap(ref, known, [wrapped]),
        lambda: any_keystore.rewrap(known, ref, [wrapped]),
        lambda: any_keystore.export_secret(ref),
        lambda: any_keystore.destroy(ref),
    ]
    for call in calls:
        with pytest.raises(KeyNotFound, match=ref):
            call()


def test_export_refused_for_non_extractable_keys(any_keystore):
    aes, ed = unique_ref("aes"), unique_ref("ed")
    any_keystore.generate(aes, AES_256)
    any_keystore.generate(ed, ED25519, extractable=True)  # never applies to signing keys
    for ref in (aes, ed):
        with pytest.raises(KeyStoreError, match=ref) as info:
            any_keystore.export_secret(ref)
        assert not isinstance(info.value, KeyNotFound)
        assert "not extractable" in str(info.value)


def test_extractable_escrow_round_trip(any_keystore):
    ref, restored = unique_ref("break-glass"), unique_ref("break-glass-restored")
    any_keystore.generate(ref, AES_256, extractable=True)
    value = any_keystore.export_secret(ref)
    assert isinstance(value, bytes) and len(value) == 32
    blob = any_keystore.encrypt(ref, b"escrowed", b"pkg")
    wrapped = any_keystore.new_wrapped_dek(ref)
    # the exported value really is the key: cryptography opens what the keystore produced
    assert AESGCM(value).decrypt(blob[:12], blob[12:], b"pkg") == b"escrowed"
    assert len(aes_key_unwrap_with_padding(value, wrapped)) == 32
    # unseal after break-glass: import under a new ref, everything still opens
    any_keystore.import_secret(restored, value)
    assert any_keystore.export_secret(restored) == value
    assert any_keystore.decrypt(restored, blob, b"pkg") == b"escrowed"
    assert any_keystore.dek_decrypt(restored, wrapped, any_keystore.dek_encrypt(ref, wrapped, b"d")) == b"d"
    with pytest.raises(KeyStoreError, match="32 bytes"):
        any_keystore.import_secret(unique_ref(), value[:16])


def test_errors_never_carry_key_material(any_keystore):
    ref, other = unique_ref("bg"), unique_ref("bg")
    any_keystore.generate(ref, AES_256, extractable=True)
    any_keystore.generate(other, AES_256)
    value = any_keystore.export_secret(ref)
    wrapped = any_keystore.new_wrapped_dek(ref)
    dek = aes_key_unwrap_with_padding(value, wrapped)
    blob = any_keystore.dek_encrypt(ref, wrapped, b"PLAINTEXT-MARKER", b"a")
    failures = []
    for call in (
        lambda: any_keystore.dek_decrypt(other, wrapped, blob, b"a"),
        lambda: any_keystore.dek_decrypt(ref, wrapped, blob, b"b"),
        lambda: any_keystore.decrypt(ref, blob, b"a"),
        lambda: any_keystore.rewrap(other, ref, [wrapped]),
        lambda: any_keystore.import_secret(ref, value),
        lambda: any_keystore.export_secret(other),
        lambda: any_keystore.import_secret(unique_ref(), value + b"\x01"),
    ):
        with pytest.raises(KeyStoreError) as info:
            call()
        failures.append(info.value)
    for exc in failures:
        _assert_no_secret(exc, value, dek, wrapped, "PLAINTEXT-MARKER")


# ============================================================================================
# Cross-backend format compatibility
# ============================================================================================


def test_pkcs11_wrapped_dek_opens_with_cryptography(pkcs11_keystore):
    ref = unique_ref("kek-x")
    pkcs11_keystore.generate(ref, AES_256, extractable=True)
    kek = pkcs11_keystore.export_secret(ref)
    wrapped = pkcs11_keystore.new_wrapped_dek(ref)
    dek = aes_key_unwrap_with_padding(kek, wrapped)
    assert len(dek) == 32
    blob = pkcs11_keystore.dek_encrypt(ref, wrapped, b"portable", b"aad")
    assert AESGCM(dek).decrypt(blob[:12], blob[12:], b"aad") == b"portable"
    # and the other way: a DEK wrapped by cryptography is usable inside the token
    dek2 = secrets.token_bytes(32)
    wrapped2 = aes_key_wrap_with_padding(kek, dek2)
    nonce = secrets.token_bytes(12)
    ct = nonce + AESGCM(dek2).encrypt(nonce, b"from outside", b"")
    assert pkcs11_keystore.dek_decrypt(ref, wrapped2, ct) == b"from outside"


def test_data_moves_between_backends(pkcs11_keystore, software_keystore):
    ref = unique_ref("shared-kek")
    pkcs11_keystore.generate(ref, AES_256, extractable=True)
    software_keystore.import_secret(ref, pkcs11_keystore.export_secret(ref))

    # software-wrapped DEK + software ciphertext -> opened in the token, and vice versa
    w_sw = software_keystore.new_wrapped_dek(ref)
    c_sw = software_keystore.dek_encrypt(ref, w_sw, b"made in software", b"a")
    assert pkcs11_keystore.dek_decrypt(ref, w_sw, c_sw, b"a") == b"made in software"
    w_hsm = pkcs11_keystore.new_wrapped_dek(ref)
    c_hsm = pkcs11_keystore.dek_encrypt(ref, w_hsm, b"made in the HSM", b"a")
    assert software_keystore.dek_decrypt(ref, w_hsm, c_hsm, b"a") == b"made in the HSM"
    # direct KEK encryption, both ways
    assert pkcs11_keystore.decrypt(ref, software_keystore.encrypt(ref, b"s2h")) == b"s2h"
    assert software_keystore.decrypt(ref, pkcs11_keystore.encrypt(ref, b"h2s")) == b"h2s"

    # rewrap in the token onto a new KEK; software with the same new KEK opens the result
    new = unique_ref("shared-kek-v2")
    pkcs11_keystore.generate(new, AES_256, extractable=True)
    software_keystore.import_secret(new, pkcs11_keystore.export_secret(new))
    [w_new] = pkcs11_keystore.rewrap(ref, new, [w_sw])
    assert software_keystore.dek_decrypt(new, w_new, c_sw, b"a") == b"made in software"


# ============================================================================================
# PKCS#11 only
# ============================================================================================


def _direct_session(token_info):
    """A python-pkcs11 session opened by the TEST, not by the keystore (the keystore's login
    in this process is application-wide, so no PIN is needed while it is connected)."""
    import pkcs11

    token = pkcs11.lib(token_info.lib_path).get_token(token_label=token_info.label)
    return token.open(rw=True)


def test_non_extractable_keys_cannot_leave_the_token(pkcs11_keystore, softhsm_token):
    import pkcs11
    from pkcs11 import Attribute, KeyType, Mechanism, ObjectClass

    aes, ed = unique_ref("aes"), unique_ref("ed")
    pkcs11_keystore.generate(aes, AES_256)
    pkcs11_keystore.generate(ed, ED25519)
    with _direct_session(softhsm_token) as s:
        kek = s.get_key(object_class=ObjectClass.SECRET_KEY, id=aes.encode())
        priv = s.get_key(object_class=ObjectClass.PRIVATE_KEY, id=ed.encode())
        for key in (kek, priv):
            assert key[Attribute.TOKEN] is True
            assert key[Attribute.SENSITIVE] is True
            assert key[Attribute.EXTRACTABLE] is False
            assert key[Attribute.ALWAYS_SENSITIVE] is True
            assert key[Attribute.NEVER_EXTRACTABLE] is True
            assert key[Attribute.LOCAL] is True  # generated inside the token
            with pytest.raises(pkcs11.exceptions.AttributeSensitive):
                key[Attribute.VALUE]
        with pytest.raises(pkcs11.exceptions.AttributeSensitive):
            priv[Attribute.VALUE]
        wrapper = s.generate_key(
            KeyType.AES, 256, store=False, template={Attribute.WRAP: True, Attribute.EXTRACTABLE: False}
        )
        try:
            for key in (kek, priv):
                for mechanism in (Mechanism.AES_KEY_WRAP_PAD, Mechanism.AES_KEY_WRAP):
                    with pytest.raises(
                        (
                            pkcs11.exceptions.KeyUnextractable,
                            pkcs11.exceptions.KeyNotWrappable,
                            pkcs11.exceptions.MechanismInvalid,
                        )
                    ):
                        wrapper.wrap_key(key, mechanism=mechanism)
        finally:
            wrapper.destroy()
        # the keystore's own refusal
        with pytest.raises(KeyStoreError, match="not extractable"):
            pkcs11_keystore.export_secret(aes)


def test_dek_session_objects_are_destroyed(pkcs11_keystore, softhsm_token):
    from pkcs11 import Attribute

    kek, new = unique_ref("kek"), unique_ref("kek")
    pkcs11_keystore.generate(kek, AES_256)
    pkcs11_keystore.generate(new, AES_256)
    wrapped = [pkcs11_keystore.new_wrapped_dek(kek) for _ in range(3)]
    blob = pkcs11_keystore.dek_encrypt(kek, wrapped[0], b"x")
    pkcs11_keystore.dek_decrypt(kek, wrapped[0], blob)
    with pytest.raises(DecryptionFailed):
        pkcs11_keystore.dek_decrypt(kek, wrapped[1], blob)
    pkcs11_keystore.rewrap(kek, new, wrapped)
    with _direct_session(softhsm_token) as s:
        # session objects are visible to every session of the application
        leftovers = list(s.get_objects({Attribute.TOKEN: False}))
    assert leftovers == []


def _one_line(exc: BaseException) -> str:
    text = str(exc)
    assert "\n" not in text
    return text


def test_wrong_pin_is_a_clear_error(softhsm_token):
    from kms_pipelines.core.foundation.keystore.pkcs11 import Pkcs11KeyStore

    store = Pkcs11KeyStore(softhsm_token.lib_path, softhsm_token.label, "987654")
    with pytest.raises(KeyStoreError) as info:
        store.refs()
    text = _one_line(info.value)
    assert "incorrect PIN" in text and softhsm_token.label in text
    assert "987654" not in text and softhsm_token.pin not in repr(store)
    store.close()


def test_wrong_pin_while_another_keystore_is_logged_in(pkcs11_keystore, softhsm_token):
    from kms_pipelines.core.foundation.keystore.pkcs11 import Pkcs11KeyStore

    pkcs11_keystore.refs()  # logged in now
    store = Pkcs11KeyStore(softhsm_token.lib_path, softhsm_token.label, "987654")
    with pytest.raises(KeyStoreError, match="incorrect PIN") as info:
        store.exists("anything")
    assert "987654" not in str(info.value)
    pkcs11_keystore.refs()  # the good one is unaffected


def test_missing_token_is_a_clear_error(softhsm_token):
    from kms_pipelines.core.foundation.keystore.pkcs11 import Pkcs11KeyStore

    store = Pkcs11KeyStore(softhsm_token.lib_path, "no-such-token", softhsm_token.pin)
    with pytest.raises(KeyStoreError) as info:
        store.generate(unique_ref(), AES_256)
    text = _one_line(info.value)
    assert "'no-such-token' not found in" in text and softhsm_token.lib_path in text
    assert f"available tokens: '{softhsm_token.label}'" in text


def test_missing_or_bad_library_is_a_clear_error(tmp_path, softhsm_token):
    from kms_pipelines.core.foundation.keystore.pkcs11 import Pkcs11KeyStore

    missing = str(tmp_path / "libnope.so")
    with pytest.raises(KeyStoreError) as info:
        Pkcs11KeyStore(missing, "x", "1234").refs()
    text = _one_line(info.value)
    assert missing in text and "not found" in text

    garbage = tmp_path / "libgarbage.so"
    garbage.write_bytes(b"not an ELF object")
    with pytest.raises(KeyStoreError) as info:
        Pkcs11KeyStore(str(garbage), "x", "1234").refs()
    text = _one_line(info.value)
    assert str(garbage) in text and "could not be loaded" in text


def test_keystore_from_env_builds_pkcs11(softhsm_token, tmp_path):
    from kms_pipelines.core.foundation.keystore import keystore_from_env

    env = {
        "KMS_KEYSTORE": "pkcs11",
        "KMS_PKCS11_LIB": softhsm_token.lib_path,
        "KMS_PKCS11_TOKEN": softhsm_token.label,
        "KMS_PKCS11_PIN": softhsm_token.pin,
    }
    store = keystore_from_env(tmp_path, env)
    try:
        assert store.backend == "pkcs11"
        ref = unique_ref()
        store.generate(ref, AES_256)
        assert store.exists(ref)
    finally:
        store.close()


def test_two_instances_close_independently(softhsm_token):
    from kms_pipelines.core.foundation.keystore.pkcs11 import Pkcs11KeyStore

    a = Pkcs11KeyStore(softhsm_token.lib_path, softhsm_token.label, softhsm_token.pin)
    b = Pkcs11KeyStore(softhsm_token.lib_path, softhsm_token.label, softhsm_token.pin)
    ref = unique_ref()
    a.generate(ref, AES_256)
    blob = b.encrypt(ref, b"shared")
    a.close()  # must not log b out
    assert b.decrypt(ref, blob) == b"shared"
    b.close()
    # closed stores reconnect lazily
    assert a.decrypt(ref, blob) == b"shared"
    a.close()


def test_concurrent_use_from_eight_threads(softhsm_token):
    from kms_pipelines.core.foundation.keystore.pkcs11 import Pkcs11KeyStore

    store = Pkcs11KeyStore(softhsm_token.lib_path, softhsm_token.label, softhsm_token.pin, pool_size=4)
    kek, sig = unique_ref("kek"), unique_ref("sig")
    store.generate(kek, AES_256)
    public = store.generate(sig, ED25519).public_key
    errors: list[BaseException] = []
    start = threading.Barrier(8)

    def worker(n: int) -> None:
        try:
            start.wait()
            for i in range(40):
                msg = f"thread {n} item {i}".encode()
                aad = f"{n}/{i}".encode()
                assert store.decrypt(kek, store.encrypt(kek, msg, aad), aad) == msg
                wrapped = store.new_wrapped_dek(kek)
                assert store.dek_decrypt(kek, wrapped, store.dek_encrypt(kek, wrapped, msg, aad), aad) == msg
                if i % 10 == 0:
                    assert verify_signature(public, msg, store.sign(sig, msg))
        except BaseException as exc:  # noqa: BLE001 - surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    store.close()
    assert not any(t.is_alive() for t in threads)
    assert errors == []


def _child_work(store, kek, sig, blob, queue):
    try:
        out = {"decrypted": store.decrypt(kek, blob, b"fork")}
        wrapped = store.new_wrapped_dek(kek)
        out["wrapped"] = wrapped
        out["blob"] = store.dek_encrypt(kek, wrapped, b"from the child", b"fork")
        out["sig"] = store.sign(sig, b"child")
        out["pid"] = os.getpid()
        store.close()
        queue.put(("ok", out))
    except BaseException as exc:  # noqa: BLE001
        queue.put(("error", f"{type(exc).__name__}: {exc}"))


def _fork_scenario(lib_path, label, pin, report):
    """A parent that uses the keystore, forks twice, and checks what each child made.

    Runs in a freshly spawned, single-threaded interpreter: forking the pytest process itself
    would copy whatever lock another test's leftover thread holds at that instant (inside
    SoftHSM or Python), and the child could hang on it; that is a property of fork() in a
    threaded process, not of the keystore under test."""
    from kms_pipelines.core.foundation.keystore.pkcs11 import Pkcs11KeyStore

    try:
        store = Pkcs11KeyStore(lib_path, label, pin)
        kek, sig = unique_ref("kek"), unique_ref("sig")
        store.generate(kek, AES_256)
        public = store.generate(sig, ED25519).public_key
        blob = store.encrypt(kek, b"made by the parent", b"fork")  # parent is logged in, sessions pooled

        ctx = multiprocessing.get_context("fork")
        children = []
        for _ in range(2):
            queue = ctx.Queue()
            proc = ctx.Process(target=_child_work, args=(store, kek, sig, blob, queue))
            proc.start()
            status, payload = queue.get(timeout=60)
            proc.join(timeout=60)
            children.append(
                {
                    "exitcode": proc.exitcode,
                    "status": status,
                    "pid": payload["pid"] if status == "ok" else None,
                    "error": None if status == "ok" else payload,
                    "decrypted": status == "ok" and payload["decrypted"] == b"made by the parent",
                    # what the child made opens in the parent, whose sessions still work after the fork
                    "opens_in_parent": status == "ok"
                    and store.dek_decrypt(kek, payload["wrapped"], payload["blob"], b"fork") == b"from the child",
                    "signature_verifies": status == "ok" and verify_signature(public, b"child", payload["sig"]),
                }
            )
        parent_still_works = store.decrypt(kek, blob, b"fork") == b"made by the parent"
        store.close()
        report.put(("ok", {"parent_pid": os.getpid(), "children": children, "parent_still_works": parent_still_works}))
    except BaseException as exc:  # noqa: BLE001
        report.put(("error", f"{type(exc).__name__}: {exc}"))


def test_use_after_fork(softhsm_token):
    spawn = multiprocessing.get_context("spawn")
    report = spawn.Queue()
    proc = spawn.Process(
        target=_fork_scenario, args=(softhsm_token.lib_path, softhsm_token.label, softhsm_token.pin, report)
    )
    proc.start()
    status, payload = report.get(timeout=180)
    proc.join(timeout=60)
    assert proc.exitcode == 0
    assert status == "ok", payload
    assert len(payload["children"]) == 2
    for child in payload["children"]:
        assert child["exitcode"] == 0 and child["status"] == "ok", child["error"]
        assert child["pid"] != payload["parent_pid"]
        assert child["decrypted"] and child["opens_in_parent"] and child["signature_verifies"], child
    assert payload["parent_still_works"]


def test_cached_handles_follow_destroy_by_another_instance(softhsm_token):
    from kms_pipelines.core.foundation.keystore.pkcs11 import Pkcs11KeyStore

    a = Pkcs11KeyStore(softhsm_token.lib_path, softhsm_token.label, softhsm_token.pin, pool_size=1)
    b = Pkcs11KeyStore(softhsm_token.lib_path, softhsm_token.label, softhsm_token.pin, pool_size=1)
    try:
        ref = unique_ref()
        a.generate(ref, AES_256)
        a.encrypt(ref, b"warm the handle cache")
        b.destroy(ref)
        with pytest.raises(KeyNotFound):
            a.encrypt(ref, b"x")
        b.generate(ref, AES_256)  # same ref, new key
        a.encrypt(ref, b"warm again")
        assert b.decrypt(ref, a.encrypt(ref, b"new key")) == b"new key"
    finally:
        a.close()
        b.close()
