"""Software keystore specifics: key files sealed at rest, mode 0600, master-key handling."""

import base64
import os
import stat

import pytest

from kms_pipelines.core.foundation.keystore import AES_256, ED25519, KeyStoreError
from kms_pipelines.core.foundation.keystore.software import SoftwareKeyStore, load_master_key


def test_key_files_are_0600_and_never_hold_the_plaintext_value(tmp_path):
    ks = SoftwareKeyStore(tmp_path / "keys", os.urandom(32))
    ks.generate("escrow.v1", AES_256, extractable=True)
    ks.generate("root.v1.sign", ED25519)
    value = ks.export_secret("escrow.v1")
    path = tmp_path / "keys" / "escrow.v1.key"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE((tmp_path / "keys").stat().st_mode) == 0o700
    raw = path.read_bytes()
    for encoding in (value, value.hex().encode(), base64.b64encode(value)):
        assert encoding not in raw


def test_a_different_master_key_cannot_open_the_files(tmp_path):
    SoftwareKeyStore(tmp_path / "keys", os.urandom(32)).generate("k.v1", AES_256)
    other = SoftwareKeyStore(tmp_path / "keys", os.urandom(32))
    with pytest.raises(KeyStoreError, match="does not open under the master key"):
        other.encrypt("k.v1", b"x")


def test_master_key_file_is_created_0600_and_reused(tmp_path):
    first = load_master_key(tmp_path, env_value="")
    assert stat.S_IMODE((tmp_path / "master.key").stat().st_mode) == 0o600
    assert load_master_key(tmp_path, env_value="") == first


def test_group_readable_master_key_is_refused(tmp_path):
    load_master_key(tmp_path, env_value="")
    os.chmod(tmp_path / "master.key", 0o644)
    with pytest.raises(KeyStoreError, match="chmod 600"):
        load_master_key(tmp_path, env_value="")


@pytest.mark.parametrize(
    "value, message", [("not base64!", "not valid base64"), (base64.b64encode(b"short").decode(), "32 bytes")]
)
def test_bad_master_key_env_is_refused(tmp_path, value, message):
    with pytest.raises(KeyStoreError, match=message):
        load_master_key(tmp_path, env_value=value)
    assert not (tmp_path / "master.key").exists()


def test_destroy_overwrites_then_removes(tmp_path):
    ks = SoftwareKeyStore(tmp_path / "keys", os.urandom(32))
    ks.generate("gone.v1", AES_256)
    ks.destroy("gone.v1")
    assert not (tmp_path / "keys" / "gone.v1.key").exists()
    assert "gone.v1" not in ks.refs()
