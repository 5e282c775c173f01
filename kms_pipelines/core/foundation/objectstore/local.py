"""Local-directory object store: the embedded default (laptop, demo, single host).

Layout under ``root_dir``::

    <key>                      the object's bytes (mode 0444 while locked, else 0600)
    .kms-meta/<key>.json       sidecar: size, sha256, content type, metadata,
                               retain_until + lock_mode (the emulated Object Lock)
    .kms-meta/.lock            flock() guarding check-then-rename sections
    .kms-tmp/                  in-flight writes (same filesystem, so rename is atomic)

Writes stream into ``.kms-tmp`` and become visible with one ``os.replace``: a write
that is killed or whose source raises leaves nothing at ``<key>``. The sidecar is
renamed into place *before* the data, so an object is never visible without its lock.
Retention is enforced by this class (delete/overwrite refused while locked) and
signalled by file mode 0444; it is emulation -- root on the same host can still remove
files. Use S3 Object Lock where tamper resistance against administrators matters.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import tempfile
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, BinaryIO

from ..durable import fsync_dir
from .base import (
    COPY_CHUNK,
    LOCK_MODE_COMPLIANCE,
    Body,
    InvalidKey,
    ObjectInfo,
    ObjectLocked,
    ObjectNotFound,
    ObjectStoreError,
    ObjectStoreUnreachable,
    as_stream,
    validate_key,
    validate_metadata,
    validate_prefix,
    validate_retain_until,
)

META_DIR = ".kms-meta"
TMP_DIR = ".kms-tmp"
_RESERVED = (META_DIR, TMP_DIR)


def _utc_now() -> datetime:
    return datetime.now(UTC)


class LocalObjectStore:
    backend = "local"

    def __init__(
        self, root_dir: str | os.PathLike[str], *, create: bool = True, now: Callable[[], datetime] = _utc_now
    ):
        self.root = Path(root_dir).absolute()
        self._now = now
        try:
            if create:
                self.root.mkdir(parents=True, exist_ok=True)
            if not self.root.is_dir():
                raise ObjectStoreUnreachable(f"local object store root {self.root} does not exist")
            (self.root / META_DIR).mkdir(exist_ok=True)
            (self.root / TMP_DIR).mkdir(exist_ok=True)
        except OSError as exc:
            raise ObjectStoreUnreachable(f"local object store root {self.root} is not usable: {exc}") from exc

    def __repr__(self) -> str:
        return f"LocalObjectStore({str(self.root)!r})"

    # ------------------------------------------------------------------ paths
    def _key(self, key: str) -> str:
        validate_key(key)
        if key.split("/", 1)[0] in _RESERVED:
            raise InvalidKey(f"object key {key!r} uses a name reserved by the local store")
        return key

    def _data_path(self, key: str) -> Path:
        p = self.root / self._key(key)
        real_root = os.path.realpath(self.root)
        if not os.path.realpath(p).startswith(real_root + os.sep):
            raise InvalidKey(f"object key {key!r} resolves outside the store root")
        return p

    def _meta_path(self, key: str) -> Path:
        return self.root / META_DIR / (self._key(key) + ".json")

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        fd = os.open(self.root / META_DIR / ".lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)

    def _read_meta(self, key: str) -> dict[str, Any]:
        try:
            meta: dict[str, Any] = json.loads(self._meta_path(key).read_text())
            return meta
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as exc:
            raise ObjectStoreError(f"corrupt sidecar for {key!r} in {self.root}: {exc}") from exc

    def _info(self, key: str, path: Path, st: os.stat_result | None = None) -> ObjectInfo:
        st = st or path.stat()
        meta = self._read_meta(key)
        retain = meta.get("retain_until")
        sha = meta.get("sha256") if meta.get("size") == st.st_size else None
        return ObjectInfo(
            key=key,
            size=st.st_size,
            etag=sha,
            sha256=sha,
            last_modified=datetime.fromtimestamp(st.st_mtime, UTC),
            retain_until=datetime.fromisoformat(retain) if retain else None,
            lock_mode=meta.get("lock_mode"),
            metadata=dict(meta.get("metadata") or {}),
            content_type=meta.get("content_type"),
        )

    # ------------------------------------------------------------------- API
    def put(
        self,
        key: str,
        data: Body,
        *,
        retain_until: datetime | None = None,
        content_type: str | None = None,
        metadata: dict[str, str] | None = None,
    ) -> ObjectInfo:
        path = self._data_path(key)
        retain_until = validate_retain_until(retain_until, self._now())
        meta_in = validate_metadata(metadata)
        stream = as_stream(data)

        tmp_dir = self.root / TMP_DIR
        fd, tmp_name = tempfile.mkstemp(dir=tmp_dir, prefix="put-")
        tmp = Path(tmp_name)
        sha = hashlib.sha256()
        size = 0
        try:
            with os.fdopen(fd, "wb") as out:
                while True:
                    chunk = stream.read(COPY_CHUNK)
                    if not chunk:
                        break
                    if isinstance(chunk, str):
                        raise TypeError("object body must be a binary stream (read() returned str)")
                    out.write(chunk)
                    sha.update(chunk)
                    size += len(chunk)
                out.flush()
                os.fsync(out.fileno())
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise

        digest = sha.hexdigest()
        sidecar: dict[str, Any] = {
            "version": 1,
            "key": key,
            "size": size,
            "sha256": digest,
            "content_type": content_type,
            "metadata": meta_in,
            "retain_until": retain_until.isoformat() if retain_until else None,
            "lock_mode": LOCK_MODE_COMPLIANCE if retain_until else None,
            "written_at": self._now().isoformat(),
        }
        try:
            with self._locked():
                if path.is_file():
                    current = self._info(key, path)
                    if current.locked_at(self._now()):
                        raise ObjectLocked(key, current.retain_until, "overwrite", str(self.root))
                elif path.exists():
                    raise ObjectStoreError(f"cannot write {key!r}: a directory of that name exists in {self.root}")
                try:
                    path.parent.mkdir(parents=True, exist_ok=True)
                except (FileExistsError, NotADirectoryError) as exc:
                    raise ObjectStoreError(
                        f"cannot write {key!r} in {self.root}: a parent segment is an object, not a prefix"
                    ) from exc
                meta_path = self._meta_path(key)
                meta_path.parent.mkdir(parents=True, exist_ok=True)
                mfd, mtmp_name = tempfile.mkstemp(dir=tmp_dir, prefix="meta-")
                with os.fdopen(mfd, "w") as mout:
                    json.dump(sidecar, mout, sort_keys=True)
                    mout.flush()
                    os.fsync(mout.fileno())
                mode = 0o444 if retain_until else 0o600
                os.chmod(mtmp_name, mode)
                os.replace(mtmp_name, meta_path)  # lock first ...
                os.chmod(tmp, mode)
                os.replace(tmp, path)  # ... then the data becomes visible
                fsync_dir(meta_path.parent)
                fsync_dir(path.parent)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        st = path.stat()
        return ObjectInfo(
            key=key,
            size=size,
            etag=digest,
            sha256=digest,
            last_modified=datetime.fromtimestamp(st.st_mtime, UTC),
            retain_until=retain_until,
            lock_mode=sidecar["lock_mode"],
            metadata=meta_in,
            content_type=content_type,
        )

    def open(self, key: str) -> BinaryIO:
        path = self._data_path(key)
        try:
            return open(path, "rb")
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            raise ObjectNotFound(key, str(self.root)) from None

    def get_bytes(self, key: str) -> bytes:
        with self.open(key) as f:
            return f.read()

    def head(self, key: str) -> ObjectInfo:
        path = self._data_path(key)
        try:
            st = path.stat()
        except (FileNotFoundError, NotADirectoryError):
            raise ObjectNotFound(key, str(self.root)) from None
        if not path.is_file():
            raise ObjectNotFound(key, str(self.root))
        return self._info(key, path, st)

    def exists(self, key: str) -> bool:
        return self._data_path(key).is_file()

    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        validate_prefix(prefix)
        base = self.root / prefix.rsplit("/", 1)[0] if "/" in prefix else self.root
        keys: list[str] = []
        if base.is_dir():
            for dirpath, dirnames, filenames in os.walk(base):
                rel_dir = os.path.relpath(dirpath, self.root)
                if rel_dir == ".":
                    dirnames[:] = [d for d in dirnames if d not in _RESERVED]
                    rel_dir = ""
                for name in filenames:
                    k = f"{rel_dir}/{name}" if rel_dir else name
                    if k.startswith(prefix):
                        keys.append(k)
        for k in sorted(keys):
            p = self.root / k
            try:
                yield self._info(k, p)
            except FileNotFoundError:  # deleted while listing
                continue

    def delete(self, key: str) -> None:
        path = self._data_path(key)
        with self._locked():
            info = self.head(key)
            if info.locked_at(self._now()):
                raise ObjectLocked(key, info.retain_until, "delete", str(self.root))
            path.unlink()
            self._meta_path(key).unlink(missing_ok=True)
            # tidy empty prefix directories (never the root or reserved dirs)
            for d in (path.parent, self._meta_path(key).parent):
                while d not in (self.root, self.root / META_DIR) and self.root in d.parents:
                    try:
                        d.rmdir()
                    except OSError:
                        break
                    d = d.parent

    def url(self, key: str) -> str:
        return self._data_path(key).as_uri()
