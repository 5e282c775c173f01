"""S3 object store with Object Lock (COMPLIANCE) for write-once evidence.

* Bodies are streamed: anything that does not fit in one part goes up as an explicit
  multipart upload with parts of ``part_size`` bytes (default 8 MiB, minimum 5 MiB),
  one part in memory at a time, so a multi-GB archive costs ~one part of RAM. Any
  failure -- the S3 call, or the source stream raising -- aborts the upload, so no
  object and no dangling upload is left behind. Maximum object size is
  ``10_000 * part_size`` (78 GiB at the default).
* ``retain_until`` writes the object with ``ObjectLockMode=COMPLIANCE`` and that
  retain-until date. The bucket must have been created with Object Lock enabled;
  otherwise ``ObjectLockNotEnabled`` is raised before anything is uploaded.
* Retention is read with ``head_object`` (moto's GET ?retention is broken).
* ``delete`` is permanent: on a versioned bucket (every Object Lock bucket is) it
  deletes the object's versions by version id -- which Object Lock refuses while a
  retention is in force -- rather than adding a delete marker that merely hides them.
* Connection failures and a missing bucket raise ``ObjectStoreUnreachable`` naming the
  endpoint and bucket.
"""

from __future__ import annotations

import hashlib
import io
import logging
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, BinaryIO

import boto3
from botocore.config import Config
from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    ConnectionClosedError,
    ConnectTimeoutError,
    EndpointConnectionError,
    NoCredentialsError,
    ReadTimeoutError,
)

if TYPE_CHECKING:
    from hashlib import _Hash

from .. import retry
from .base import (
    LOCK_MODE_COMPLIANCE,
    Body,
    ObjectInfo,
    ObjectLocked,
    ObjectLockNotEnabled,
    ObjectNotFound,
    ObjectStoreError,
    ObjectStoreUnreachable,
    as_stream,
    read_full,
    validate_key,
    validate_metadata,
    validate_prefix,
    validate_retain_until,
)

log = logging.getLogger(__name__)

MIN_PART_SIZE = 5 * 1024 * 1024
DEFAULT_PART_SIZE = 8 * 1024 * 1024
MAX_PARTS = 10_000

_UNREACHABLE = (EndpointConnectionError, ConnectTimeoutError, ReadTimeoutError, ConnectionClosedError)


def _code(exc: ClientError) -> str:
    return str(exc.response.get("Error", {}).get("Code", ""))


def _status(exc: ClientError) -> int:
    return int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)


def _utc(dt: datetime | None) -> datetime | None:
    if dt is None:
        return None
    if dt.tzinfo is None:
        return dt.replace(tzinfo=UTC)
    return dt.astimezone(UTC)


class _FirstContact(Exception):
    """A connection error before the store ever answered: surfaced at once, not retried."""

    def __init__(self, inner: BaseException):
        super().__init__(str(inner))
        self.inner = inner


class _ResumingBody(io.RawIOBase):
    """An object's bytes; a read cut by a reset or timeout re-issues the GET from the offset
    reached (``Range``), pinned to the same object version by its ETag (``IfMatch``)."""

    def __init__(self, store: S3ObjectStore, key: str, full: str, resp: dict[str, Any]):
        self._store, self._key, self._full = store, key, full
        self._etag = resp.get("ETag")
        self._body = resp["Body"]
        self._pos = 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        def once() -> bytes:
            if self._body is None:
                extra = {"IfMatch": self._etag} if self._etag else {}
                self._body = self._store.client.get_object(
                    Bucket=self._store.bucket, Key=self._full, Range=f"bytes={self._pos}-", **extra
                )["Body"]
            try:
                chunk: bytes = self._body.read(len(buffer))
                return chunk
            except BaseException:
                self._drop()
                raise

        try:
            data = retry.call(once, budget=self._store.retry_budget, what=f"S3 read {self._key!r}")
        except (ClientError, BotoCoreError) as exc:
            raise self._store._error(exc, "read", self._key) from exc
        n = len(data)
        buffer[:n] = data
        self._pos += n
        return n

    def _drop(self) -> None:
        body, self._body = self._body, None
        if body is not None:
            try:
                body.close()
            except Exception:  # noqa: BLE001 - the connection is already broken
                pass

    def close(self) -> None:
        self._drop()
        super().close()


class S3ObjectStore:
    backend = "s3"

    def __init__(
        self,
        bucket: str,
        prefix: str = "",
        endpoint_url: str | None = None,
        region: str | None = None,
        client: Any = None,
        *,
        part_size: int = DEFAULT_PART_SIZE,
        connect_timeout: float = 5.0,
        read_timeout: float = 60.0,
        max_attempts: int = 3,
        retry_budget: Any = None,
    ):
        """``retry_budget`` (a core.foundation.retry.Budget, from ``policy.faults.object_store``) makes every
        request -- each multipart part on its own -- a unit retried on 5xx, SlowDown, timeouts
        and connection resets; botocore then makes one attempt per call, so the retries are
        counted and logged once. A download cut mid-stream resumes with a ranged GET."""
        if not bucket or "/" in bucket:
            raise ObjectStoreError(f"invalid S3 bucket name {bucket!r}")
        if part_size < MIN_PART_SIZE:
            raise ValueError(f"part_size must be at least {MIN_PART_SIZE} bytes (S3 minimum), got {part_size}")
        prefix = prefix.strip("/")
        if prefix:
            validate_prefix(prefix + "/")
            prefix += "/"
        self.bucket = bucket
        self.prefix = prefix
        self.part_size = part_size
        self.retry_budget = retry_budget
        self._reached = False  # a store never reached is misconfigured, not failing over: no retries
        if client is None:
            cfg = Config(
                connect_timeout=connect_timeout,
                read_timeout=read_timeout,
                retries={"total_max_attempts": 1, "mode": "standard"}
                if retry_budget is not None
                else {"max_attempts": max_attempts, "mode": "standard"},
                s3={"addressing_style": "path"} if endpoint_url else {},
            )
            client = boto3.session.Session().client(
                "s3", endpoint_url=endpoint_url, region_name=region or "us-east-1", config=cfg
            )
        self.client = client
        self.endpoint = client.meta.endpoint_url
        self._lock_enabled: bool | None = None
        self._versioned: bool | None = None
        self._bucket_ok = False

    def __repr__(self) -> str:
        return f"S3ObjectStore(bucket={self.bucket!r}, prefix={self.prefix!r}, endpoint={self.endpoint!r})"

    # ------------------------------------------------------------- helpers
    def _full(self, key: str) -> str:
        return self.prefix + validate_key(key)

    def _rel(self, full_key: str) -> str:
        return full_key[len(self.prefix) :] if self.prefix and full_key.startswith(self.prefix) else full_key

    def _where(self) -> str:
        return f"s3://{self.bucket} at {self.endpoint}"

    def _error(self, exc: Exception, action: str, key: str | None = None) -> ObjectStoreError:
        """Translate a boto error into our hierarchy (returned, for ``raise ... from exc``)."""
        what = f"{action} {key!r}" if key else action
        if isinstance(exc, _UNREACHABLE):
            return ObjectStoreUnreachable(
                f"S3 endpoint {self.endpoint} unreachable (bucket {self.bucket!r}) during {what}: {exc}"
            )
        if isinstance(exc, NoCredentialsError):
            return ObjectStoreError(
                f"no AWS credentials for S3 bucket {self.bucket!r} at {self.endpoint} "
                "(set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or an instance role)"
            )
        if isinstance(exc, ClientError):
            code = _code(exc)
            if code == "NoSuchBucket":
                return ObjectStoreUnreachable(
                    f"S3 bucket {self.bucket!r} does not exist at {self.endpoint} (during {what})"
                )
            if code in ("NoSuchKey", "404", "NotFound") and key is not None:
                return ObjectNotFound(key, self._where())
            return ObjectStoreError(f"S3 {what} failed in {self._where()}: {code}: {exc}")
        if isinstance(exc, BotoCoreError):
            return ObjectStoreError(f"S3 {what} failed in {self._where()}: {exc}")
        return ObjectStoreError(f"S3 {what} failed in {self._where()}: {exc!r}")

    def _retrying(self, action: str, key: str | None, fn: Callable[[], Any]) -> Any:
        """Run ``fn`` (one request, safe to repeat) under the retry budget, if any."""
        if self.retry_budget is None:
            return fn()

        def once() -> Any:
            try:
                out = fn()
            except ClientError:
                self._reached = True  # the server answered: a 5xx/SlowDown is worth waiting out
                raise
            except BotoCoreError as exc:
                if not self._reached:
                    raise _FirstContact(exc) from None  # "from None": the classifier must not see a fault
                raise
            self._reached = True
            return out

        try:
            return retry.call(once, budget=self.retry_budget, what=f"S3 {action} {key!r}" if key else f"S3 {action}")
        except _FirstContact as exc:
            raise exc.inner from None

    def _call(self, action: str, key: str | None, fn: Callable[..., Any], **kwargs: Any) -> Any:
        try:
            return self._retrying(action, key, lambda: fn(**kwargs))
        except (ClientError, BotoCoreError) as exc:
            if (
                isinstance(exc, ClientError)
                and _status(exc) == 404
                and _code(exc) in ("404", "NotFound")
                and key is not None
            ):
                self.check()  # 404 on HEAD has no body: distinguish missing bucket from missing key
            raise self._error(exc, action, key) from exc

    def check(self) -> None:
        """Verify the endpoint is reachable and the bucket exists (cached once it does)."""
        if self._bucket_ok:
            return
        try:
            self.client.head_bucket(Bucket=self.bucket)
        except ClientError as exc:
            if _status(exc) == 404 or _code(exc) in ("404", "NoSuchBucket", "NotFound"):
                raise ObjectStoreUnreachable(f"S3 bucket {self.bucket!r} does not exist at {self.endpoint}") from exc
            raise self._error(exc, "head bucket") from exc
        except BotoCoreError as exc:
            raise self._error(exc, "head bucket") from exc
        self._bucket_ok = True

    def _ensure_object_lock(self) -> None:
        if self._lock_enabled:
            return
        try:
            cfg = self.client.get_object_lock_configuration(Bucket=self.bucket)
            enabled = cfg.get("ObjectLockConfiguration", {}).get("ObjectLockEnabled") == "Enabled"
        except ClientError as exc:
            if _code(exc) != "ObjectLockConfigurationNotFoundError":
                raise self._error(exc, "read Object Lock configuration") from exc
            enabled = False
        except BotoCoreError as exc:
            raise self._error(exc, "read Object Lock configuration") from exc
        if not enabled:
            raise ObjectLockNotEnabled(
                f"S3 bucket {self.bucket!r} at {self.endpoint} does not have Object Lock enabled; "
                "write-once (retain_until) objects need a bucket created with Object Lock"
            )
        self._lock_enabled = True

    def _is_versioned(self) -> bool:
        if self._versioned is None:
            resp = self._call("read versioning of", None, self.client.get_bucket_versioning, Bucket=self.bucket)
            self._versioned = resp.get("Status") in ("Enabled", "Suspended")
        return self._versioned

    def _info_from_head(self, key: str, h: dict[str, Any]) -> ObjectInfo:
        return ObjectInfo(
            key=key,
            size=int(h.get("ContentLength", 0)),
            etag=(h.get("ETag") or "").strip('"') or None,
            last_modified=_utc(h.get("LastModified")),
            retain_until=_utc(h.get("ObjectLockRetainUntilDate")),
            lock_mode=h.get("ObjectLockMode"),
            metadata=dict(h.get("Metadata") or {}),
            content_type=h.get("ContentType"),
            version_id=h.get("VersionId"),
        )

    # ----------------------------------------------------------------- API
    def put(
        self,
        key: str,
        data: Body,
        *,
        retain_until: datetime | None = None,
        content_type: str | None = None,
        metadata: dict[str, str] | None = None,
    ) -> ObjectInfo:
        full = self._full(key)
        retain_until = validate_retain_until(retain_until)
        meta = validate_metadata(metadata)
        stream = as_stream(data)
        if retain_until is not None:
            self._ensure_object_lock()
        # write-once: never supersede an object that is still under retention
        try:
            current = self.head(key)
        except ObjectNotFound:
            current = None
        if current is not None and current.locked_at():
            raise ObjectLocked(key, current.retain_until, "overwrite", self._where())

        extra: dict[str, Any] = {"Bucket": self.bucket, "Key": full}
        if content_type:
            extra["ContentType"] = content_type
        if meta:
            extra["Metadata"] = meta
        if retain_until is not None:
            extra["ObjectLockMode"] = LOCK_MODE_COMPLIANCE
            extra["ObjectLockRetainUntilDate"] = retain_until

        sha = hashlib.sha256()
        first = read_full(stream, self.part_size)
        if len(first) < self.part_size:
            sha.update(first)
            resp = self._call("put", key, self.client.put_object, Body=first, **extra)
            size = len(first)
        else:
            resp, size = self._multipart(key, extra, stream, first, sha)
        if retain_until is not None:
            self._confirm_retention(key, full, resp.get("VersionId"), retain_until)
        return ObjectInfo(
            key=key,
            size=size,
            etag=(resp.get("ETag") or "").strip('"') or None,
            sha256=sha.hexdigest(),
            last_modified=datetime.now(UTC),
            retain_until=retain_until,
            lock_mode=LOCK_MODE_COMPLIANCE if retain_until else None,
            metadata=meta,
            content_type=content_type,
            version_id=resp.get("VersionId"),
        )

    def _confirm_retention(self, key: str, full: str, version_id: str | None, retain_until: datetime) -> None:
        """Read the lock back; apply it with PutObjectRetention if the server dropped it.

        Real S3 applies the lock headers of CreateMultipartUpload atomically; moto ignores
        them, so a multipart object there would otherwise be written unlocked. Either way
        a retained write only returns once the lock has been read back from the server.
        """
        vid = {"VersionId": version_id} if version_id else {}

        def locked() -> bool:
            h = self._call("head", key, self.client.head_object, Bucket=self.bucket, Key=full, **vid)
            got = _utc(h.get("ObjectLockRetainUntilDate"))
            # S3 stores the date at one-second precision
            return (
                h.get("ObjectLockMode") == LOCK_MODE_COMPLIANCE
                and got is not None
                and got >= retain_until.replace(microsecond=0)
            )

        if locked():
            return
        self._call(
            "set retention on",
            key,
            self.client.put_object_retention,
            Bucket=self.bucket,
            Key=full,
            Retention={"Mode": LOCK_MODE_COMPLIANCE, "RetainUntilDate": retain_until},
            **vid,
        )
        if not locked():
            raise ObjectStoreError(f"Object Lock could not be confirmed on {key!r} in {self._where()} after writing it")

    def _multipart(
        self, key: str, extra: dict[str, Any], stream: BinaryIO, first: bytes, sha: _Hash
    ) -> tuple[dict[str, Any], int]:
        mpu = self._call("start multipart upload of", key, self.client.create_multipart_upload, **extra)
        upload_id = mpu["UploadId"]
        ids = {"Bucket": self.bucket, "Key": extra["Key"], "UploadId": upload_id}
        parts: list[dict[str, Any]] = []
        size = 0
        try:
            chunk = first
            number = 1
            while chunk:
                if number > MAX_PARTS:
                    raise ObjectStoreError(
                        f"object {key!r} exceeds {MAX_PARTS} parts of {self.part_size} bytes; raise part_size"
                    )
                sha.update(chunk)
                r = self._call("upload part of", key, self.client.upload_part, PartNumber=number, Body=chunk, **ids)
                part = {"PartNumber": number, "ETag": r["ETag"]}
                for ck in ("ChecksumCRC32", "ChecksumCRC32C", "ChecksumSHA1", "ChecksumSHA256", "ChecksumCRC64NVME"):
                    if r.get(ck):
                        part[ck] = r[ck]
                parts.append(part)
                size += len(chunk)
                chunk = read_full(stream, self.part_size)
                number += 1
            resp = self._call(
                "complete multipart upload of",
                key,
                self.client.complete_multipart_upload,
                MultipartUpload={"Parts": parts},
                **ids,
            )
        except BaseException:
            try:
                self.client.abort_multipart_upload(**ids)
            except Exception as abort_exc:  # pragma: no cover - best effort, but say so
                log.error(
                    "could not abort multipart upload %s of %r in %s: %s", upload_id, key, self._where(), abort_exc
                )
            raise
        return resp, size

    def open(self, key: str) -> BinaryIO:
        full = self._full(key)
        resp = self._call("get", key, self.client.get_object, Bucket=self.bucket, Key=full)
        if self.retry_budget is None:
            body: BinaryIO = resp["Body"]
            return body
        return io.BufferedReader(_ResumingBody(self, key, full, resp), buffer_size=1024 * 1024)

    def get_bytes(self, key: str) -> bytes:
        body = self.open(key)
        try:
            return body.read()
        except (BotoCoreError, OSError) as exc:
            raise self._error(exc, "read", key) from exc
        finally:
            body.close()

    def head(self, key: str) -> ObjectInfo:
        h = self._call("head", key, self.client.head_object, Bucket=self.bucket, Key=self._full(key))
        return self._info_from_head(key, h)

    def exists(self, key: str) -> bool:
        try:
            self.head(key)
        except ObjectNotFound:
            return False
        return True

    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        """Key, size, etag and last_modified per object; lock state and metadata need ``head``."""
        validate_prefix(prefix)
        pages = self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=self.prefix + prefix)
        try:
            for page in pages:
                for o in page.get("Contents", []) or []:
                    yield ObjectInfo(
                        key=self._rel(o["Key"]),
                        size=int(o["Size"]),
                        etag=(o.get("ETag") or "").strip('"') or None,
                        last_modified=_utc(o.get("LastModified")),
                    )
        except (ClientError, BotoCoreError) as exc:
            raise self._error(exc, f"list prefix {prefix!r}") from exc

    def delete(self, key: str) -> None:
        full = self._full(key)
        info = self.head(key)
        if info.locked_at():
            raise ObjectLocked(key, info.retain_until, "delete", self._where())
        if not self._is_versioned():
            self._delete_one(key, full, None, info)
            return
        versions: list[tuple[str, bool]] = []  # (version id, is delete marker)
        pages = self.client.get_paginator("list_object_versions").paginate(Bucket=self.bucket, Prefix=full)
        try:
            for page in pages:
                versions += [(v["VersionId"], False) for v in page.get("Versions", []) or [] if v["Key"] == full]
                versions += [(m["VersionId"], True) for m in page.get("DeleteMarkers", []) or [] if m["Key"] == full]
        except (ClientError, BotoCoreError) as exc:
            raise self._error(exc, "list versions of", key) from exc
        # refuse before touching anything if any retained version is still locked
        for vid, marker in versions:
            if marker or vid == info.version_id:
                continue
            h = self._call("head", key, self.client.head_object, Bucket=self.bucket, Key=full, VersionId=vid)
            older = self._info_from_head(key, h)
            if older.locked_at():
                raise ObjectLocked(key, older.retain_until, f"delete (version {vid} of)", self._where())
        for vid, _ in versions:
            self._delete_one(key, full, vid, info)

    def _delete_one(self, key: str, full: str, version_id: str | None, info: ObjectInfo) -> None:
        kwargs: dict[str, Any] = {"Bucket": self.bucket, "Key": full}
        if version_id is not None:
            kwargs["VersionId"] = version_id
        try:
            self.client.delete_object(**kwargs)
        except ClientError as exc:
            msg = str(exc.response.get("Error", {}).get("Message", "")).lower()
            if _code(exc) == "AccessDenied" and (info.lock_mode or "lock" in msg or "retention" in msg):
                raise ObjectLocked(key, info.retain_until, "delete", self._where()) from exc
            raise self._error(exc, "delete", key) from exc
        except BotoCoreError as exc:
            raise self._error(exc, "delete", key) from exc

    def url(self, key: str) -> str:
        return f"s3://{self.bucket}/{self._full(key)}"
