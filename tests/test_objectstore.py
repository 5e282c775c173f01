"""Contract tests for ObjectStore: the same suite against the local directory store and
against S3 (a moto server over HTTP on loopback)."""

from __future__ import annotations

import hashlib
import io
import signal
import socket
import stat
import subprocess
import sys
import textwrap
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from kms_pipelines.core.foundation.objectstore import (
    InvalidKey,
    InvalidObjectStoreURL,
    LocalObjectStore,
    ObjectInfo,
    ObjectLocked,
    ObjectLockNotEnabled,
    ObjectNotFound,
    ObjectStore,
    ObjectStoreError,
    ObjectStoreUnreachable,
    objectstore_from_url,
)
from kms_pipelines.core.foundation.objectstore.s3 import MIN_PART_SIZE, S3ObjectStore

MiB = 1024 * 1024
PART = MIN_PART_SIZE  # small parts so tests exercise multipart quickly


def _future(days: int = 1) -> datetime:
    return datetime.now(UTC) + timedelta(days=days)


class GeneratedStream(io.RawIOBase):
    """A deterministic pseudo-random byte stream of ``size`` bytes, produced on demand.
    Records the largest read() request; optionally raises after ``fail_after`` bytes."""

    def __init__(self, size: int, fail_after: int | None = None):
        self.size = size
        self.pos = 0
        self.fail_after = fail_after
        self.max_request = 0
        self.sha = hashlib.sha256()
        self._period = 1 * MiB + 7  # odd period, so parts differ
        self._block = hashlib.sha512(b"seed").digest() * (2 * MiB // 64 + 1)

    def readable(self) -> bool:
        return True

    def read(self, n: int = -1) -> bytes:
        if n is None or n < 0:
            n = self.size - self.pos
        self.max_request = max(self.max_request, n)
        if self.fail_after is not None and self.pos >= self.fail_after:
            raise OSError("source stream broke mid-way (simulated)")
        n = min(n, self.size - self.pos, 1 * MiB)
        if n <= 0:
            return b""
        off = self.pos % self._period
        out = self._block[off : off + n]
        assert len(out) == n
        self.pos += n
        self.sha.update(out)
        return out


@pytest.fixture(params=["local", "s3"])
def store(request, tmp_path) -> ObjectStore:
    if request.param == "local":
        return LocalObjectStore(tmp_path / "objects")
    server = request.getfixturevalue("s3_server")
    bucket = request.getfixturevalue("s3_bucket")
    return S3ObjectStore(bucket, prefix="kms", endpoint_url=server, part_size=PART)


def _no_pending_uploads(store) -> bool:
    if isinstance(store, S3ObjectStore):
        return not store.client.list_multipart_uploads(Bucket=store.bucket).get("Uploads")
    return not any((store.root / ".kms-tmp").iterdir())


# ---------------------------------------------------------------- contract
def test_is_an_objectstore(store):
    assert isinstance(store, ObjectStore)


def test_put_get_head_list_roundtrip(store):
    body = b"manifest v1\n" * 100
    info = store.put(
        "backups/2026-01-01/manifest.json",
        body,
        content_type="application/json",
        metadata={"kind": "manifest", "sha256-plain": "abc"},
    )
    assert isinstance(info, ObjectInfo)
    assert info.size == len(body)
    assert info.sha256 == hashlib.sha256(body).hexdigest()
    assert store.get_bytes("backups/2026-01-01/manifest.json") == body
    with store.open("backups/2026-01-01/manifest.json") as f:
        assert f.read() == body
    h = store.head("backups/2026-01-01/manifest.json")
    assert h.size == len(body)
    assert h.metadata == {"kind": "manifest", "sha256-plain": "abc"}
    assert h.content_type == "application/json"
    assert h.retain_until is None and not h.locked_at()
    assert h.last_modified is not None and h.last_modified.tzinfo is not None
    assert store.exists("backups/2026-01-01/manifest.json")
    assert not store.exists("backups/2026-01-01/nope")

    for k in ("a/1", "a/2", "ab", "b/1"):
        store.put(k, k.encode())
    assert [o.key for o in store.list("a/")] == ["a/1", "a/2"]
    assert [o.key for o in store.list("a")] == ["a/1", "a/2", "ab"]
    everything = [o.key for o in store.list()]
    assert everything == sorted(everything) and len(everything) == 5
    assert {o.key: o.size for o in store.list("b/")} == {"b/1": 3}
    assert "backups/2026-01-01/manifest.json" in store.url("backups/2026-01-01/manifest.json")


def test_overwrite_unlocked_replaces(store):
    store.put("k", b"one")
    store.put("k", b"two")
    assert store.get_bytes("k") == b"two"


def test_stream_50mb_multipart_bounded_reads(store):
    size = 50 * MiB
    src = GeneratedStream(size)
    info = store.put("backups/big.age", src)
    assert info.size == size
    assert info.sha256 == src.sha.hexdigest()
    if isinstance(store, S3ObjectStore):
        # never asked the source for more than one part at a time ...
        assert src.max_request <= PART
        # ... and the object went up as a multipart upload of 10 parts ("<md5>-10")
        assert info.etag.endswith("-10"), info.etag
        assert store.head("backups/big.age").etag.endswith("-10")
    else:
        assert src.max_request <= 1 * MiB
    assert store.head("backups/big.age").size == size
    # streaming read back
    sha = hashlib.sha256()
    n = 0
    with store.open("backups/big.age") as f:
        while chunk := f.read(1 * MiB):
            sha.update(chunk)
            n += len(chunk)
    assert n == size and sha.hexdigest() == src.sha.hexdigest()


@pytest.mark.parametrize("size", [100, 11 * MiB], ids=["small", "multipart"])
def test_locked_object_cannot_be_deleted_or_replaced(store, size):
    until = _future(3)
    body = GeneratedStream(size)
    info = store.put("ledger/checkpoints/000001.json", body, retain_until=until)
    assert info.lock_mode == "COMPLIANCE"
    h = store.head("ledger/checkpoints/000001.json")
    assert h.lock_mode == "COMPLIANCE"
    assert h.retain_until is not None and abs((h.retain_until - until).total_seconds()) < 2
    assert h.locked_at()

    with pytest.raises(ObjectLocked) as ei:
        store.delete("ledger/checkpoints/000001.json")
    msg = str(ei.value)
    assert "ledger/checkpoints/000001.json" in msg and str(until.year) in msg
    assert ei.value.retain_until is not None
    with pytest.raises(ObjectLocked):
        store.put("ledger/checkpoints/000001.json", b"rewritten history")
    # still there, unchanged
    assert store.exists("ledger/checkpoints/000001.json")
    assert store.head("ledger/checkpoints/000001.json").size == size
    assert hashlib.sha256(store.get_bytes("ledger/checkpoints/000001.json")).hexdigest() == body.sha.hexdigest()


def test_unlocked_delete_is_permanent(store):
    store.put("tmp/x", b"x")
    store.put("tmp/x", b"x2")  # second version on a versioned bucket
    store.delete("tmp/x")
    assert not store.exists("tmp/x")
    assert list(store.list("tmp/")) == []
    with pytest.raises(ObjectNotFound):
        store.get_bytes("tmp/x")
    with pytest.raises(ObjectNotFound):
        store.delete("tmp/x")
    if isinstance(store, S3ObjectStore):  # really gone, not hidden behind a delete marker
        v = store.client.list_object_versions(Bucket=store.bucket, Prefix="kms/tmp/")
        assert not v.get("Versions") and not v.get("DeleteMarkers")


def test_missing_key(store):
    for op in (store.head, store.get_bytes, store.open, store.delete):
        with pytest.raises(ObjectNotFound) as ei:
            op("no/such/key")
        assert "no/such/key" in str(ei.value)
    assert isinstance(ObjectNotFound("k"), ObjectStoreError)


def test_aborted_stream_leaves_nothing(store):
    src = GeneratedStream(40 * MiB, fail_after=12 * MiB)  # dies after two 5 MiB parts went up
    with pytest.raises(IOError, match="broke mid-way"):
        store.put("backups/partial.age", src, retain_until=_future())
    assert not store.exists("backups/partial.age")
    assert list(store.list("backups/")) == []
    assert _no_pending_uploads(store)


def test_bad_keys_and_arguments(store):
    for bad in ("", "/abs", "a/../b", "a//b", "a\\b", "x\x00y", "./a"):
        with pytest.raises(InvalidKey):
            store.put(bad, b"x")
    with pytest.raises(ValueError, match="timezone-aware"):
        store.put("k", b"x", retain_until=datetime.now() + timedelta(days=1))
    with pytest.raises(ValueError, match="not in the future"):
        store.put("k", b"x", retain_until=datetime.now(UTC) - timedelta(seconds=1))
    with pytest.raises(ValueError):
        store.put("k", b"x", metadata={"Bad Name": "v"})
    assert not store.exists("k")


# ---------------------------------------------------------------- S3 only
def _closed_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def test_s3_unreachable_endpoint_is_clear_and_quick(dummy_aws_credentials):
    endpoint = f"http://127.0.0.1:{_closed_port()}"
    st = S3ObjectStore("kms-archive", endpoint_url=endpoint, connect_timeout=0.5, max_attempts=1)
    t0 = time.monotonic()
    for op in (lambda: st.put("k", b"x"), lambda: st.head("k"), lambda: list(st.list()), st.check):
        with pytest.raises(ObjectStoreUnreachable) as ei:
            op()
        assert endpoint in str(ei.value) and "kms-archive" in str(ei.value)
    assert time.monotonic() - t0 < 10


def test_s3_missing_bucket_is_unreachable(s3_server):
    st = S3ObjectStore("kms-no-such-bucket", endpoint_url=s3_server)
    for op in (lambda: st.head("k"), lambda: st.put("k", b"x"), lambda: st.exists("k")):
        with pytest.raises(ObjectStoreUnreachable, match="kms-no-such-bucket.*does not exist"):
            op()


def test_s3_retained_write_needs_object_lock_bucket(s3_server, s3_client):
    s3_client.create_bucket(Bucket="kms-test-no-object-lock")
    st = S3ObjectStore("kms-test-no-object-lock", endpoint_url=s3_server)
    with pytest.raises(ObjectLockNotEnabled, match="kms-test-no-object-lock.*Object Lock"):
        st.put("evidence", b"x", retain_until=_future())
    assert not st.exists("evidence")
    st.put("plain", b"x")  # unretained writes still fine
    st.delete("plain")


def test_s3_prefix_and_url(s3_server, s3_bucket, s3_client, s3_store):
    st = S3ObjectStore(s3_bucket, prefix="/tenant-a/kms/", endpoint_url=s3_server)
    st.put("x/y", b"1")
    assert s3_client.head_object(Bucket=s3_bucket, Key="tenant-a/kms/x/y")["ContentLength"] == 1
    assert [o.key for o in st.list()] == ["x/y"]
    assert st.url("x/y") == f"s3://{s3_bucket}/tenant-a/kms/x/y"
    assert [o.key for o in s3_store.list()] == ["tenant-a/kms/x/y"]


def test_s3_server_itself_refuses_deleting_locked_version(s3_store, s3_client):
    s3_store.put("evidence", b"e", retain_until=_future())
    vid = s3_store.head("evidence").version_id
    from botocore.exceptions import ClientError

    with pytest.raises(ClientError, match="AccessDenied"):
        s3_client.delete_object(Bucket=s3_store.bucket, Key="evidence", VersionId=vid)


# ---------------------------------------------------------------- local only
def test_local_lock_files_are_read_only_and_sidecar(tmp_path):
    st = LocalObjectStore(tmp_path)
    st.put("ck/1", b"c", retain_until=_future())
    st.put("ck/2", b"c")
    assert stat.S_IMODE((tmp_path / "ck/1").stat().st_mode) == 0o444
    assert stat.S_IMODE((tmp_path / "ck/2").stat().st_mode) != 0o444
    assert (tmp_path / ".kms-meta/ck/1.json").exists()
    assert [o.key for o in st.list()] == ["ck/1", "ck/2"]  # sidecars and temp files are not objects
    assert next(iter(st.list("ck/1"))).lock_mode == "COMPLIANCE"
    with pytest.raises(InvalidKey):
        st.put(".kms-meta/ck/1.json", b"{}")


def test_local_lock_expires(tmp_path):
    now = [datetime.now(UTC)]
    st = LocalObjectStore(tmp_path, now=lambda: now[0])
    st.put("k", b"v", retain_until=now[0] + timedelta(days=365))
    with pytest.raises(ObjectLocked):
        st.delete("k")
    now[0] += timedelta(days=366)
    st.delete("k")
    assert not st.exists("k")


def test_local_killed_write_leaves_nothing_visible(tmp_path):
    root = tmp_path / "objs"
    code = textwrap.dedent(f"""
        import sys, itertools
        sys.path.insert(0, {str(Path.cwd())!r})
        from kms_pipelines.core.foundation.objectstore import LocalObjectStore
        class Endless:
            def read(self, n=-1):
                return b"x" * 65536
        LocalObjectStore({str(root)!r}).put("backups/killed.age", Endless())
    """)
    proc = subprocess.Popen([sys.executable, "-c", code])
    try:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            tmp = root / ".kms-tmp"
            if tmp.is_dir() and any(f.stat().st_size > 4 * MiB for f in tmp.iterdir()):
                break
            time.sleep(0.05)
        else:
            pytest.fail("writer never got going")
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    st = LocalObjectStore(root)
    assert not st.exists("backups/killed.age")
    assert list(st.list()) == []


# ---------------------------------------------------------------- from_url
def test_objectstore_from_url(tmp_path, s3_server, s3_bucket, monkeypatch):
    a = objectstore_from_url(f"file://{tmp_path}/a")
    assert isinstance(a, LocalObjectStore) and a.root == tmp_path / "a"
    b = objectstore_from_url(str(tmp_path / "b"))
    assert isinstance(b, LocalObjectStore) and b.root == tmp_path / "b"

    monkeypatch.setenv("KMS_S3_ENDPOINT_URL", s3_server)
    s = objectstore_from_url(f"s3://{s3_bucket}/nightly/")
    assert isinstance(s, S3ObjectStore) and s.prefix == "nightly/" and s.endpoint == s3_server
    s.put("k", b"v")
    assert s.url("k") == f"s3://{s3_bucket}/nightly/k"
    s2 = objectstore_from_url(f"s3://{s3_bucket}", endpoint_url=s3_server)
    assert [o.key for o in s2.list()] == ["nightly/k"]

    for bad in ("", "ftp://host/x", "s3://", "s3:bucket", "file://otherhost/x", "file://relative"):
        with pytest.raises(InvalidObjectStoreURL):
            objectstore_from_url(bad)
