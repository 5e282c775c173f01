"""Object storage for archives, manifests and write-once evidence.

    from kms_pipelines.core.foundation.objectstore import objectstore_from_url
    store = objectstore_from_url(os.environ["KMS_OBJECT_STORE"])

URLs: ``file:///abs/path`` or a plain filesystem path -> ``LocalObjectStore``;
``s3://bucket[/prefix]`` -> ``S3ObjectStore`` (endpoint from ``endpoint_url`` or the
``KMS_S3_ENDPOINT_URL`` environment variable; credentials and region from the usual
AWS environment / config chain, region also from ``KMS_S3_REGION``).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import unquote, urlsplit

from .base import (
    InvalidKey,
    InvalidObjectStoreURL,
    ObjectInfo,
    ObjectLocked,
    ObjectLockNotEnabled,
    ObjectNotFound,
    ObjectStore,
    ObjectStoreError,
    ObjectStoreUnreachable,
)
from .local import LocalObjectStore

if TYPE_CHECKING:
    from ..retry import Budget

__all__ = [
    "InvalidKey",
    "InvalidObjectStoreURL",
    "LocalObjectStore",
    "ObjectInfo",
    "ObjectLockNotEnabled",
    "ObjectLocked",
    "ObjectNotFound",
    "ObjectStore",
    "ObjectStoreError",
    "ObjectStoreUnreachable",
    "S3ObjectStore",
    "objectstore_from_url",
]


def __getattr__(name: str) -> type[ObjectStore]:  # import boto3 only when S3 is actually used
    if name == "S3ObjectStore":
        from .s3 import S3ObjectStore  # lazy import: start-up time (boto3 loads only for S3)

        return S3ObjectStore
    raise AttributeError(name)


def objectstore_from_url(
    url: str,
    *,
    endpoint_url: str | None = None,
    env: Mapping[str, str] | None = None,
    retry_budget: Budget | None = None,
) -> ObjectStore:
    env = os.environ if env is None else env
    if not isinstance(url, str) or not url.strip():
        raise InvalidObjectStoreURL("object store URL is empty (expected file:///path, a path, or s3://bucket/prefix)")
    url = url.strip()
    if "://" not in url:
        if url.startswith("s3:"):
            raise InvalidObjectStoreURL(f"malformed S3 URL {url!r}: expected s3://bucket/prefix")
        return LocalObjectStore(Path(url).expanduser().absolute())
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme == "file":
        if parts.netloc not in ("", "localhost"):
            raise InvalidObjectStoreURL(f"file URL {url!r} names host {parts.netloc!r}; use file:///absolute/path")
        path = unquote(parts.path)
        if not path.startswith("/"):
            raise InvalidObjectStoreURL(f"file URL {url!r} must hold an absolute path (file:///abs/path)")
        if parts.query or parts.fragment:
            raise InvalidObjectStoreURL(f"file URL {url!r} must not have a query or fragment")
        return LocalObjectStore(path)
    if scheme == "s3":
        bucket = parts.netloc
        if not bucket:
            raise InvalidObjectStoreURL(f"S3 URL {url!r} has no bucket (expected s3://bucket/prefix)")
        if parts.query or parts.fragment:
            raise InvalidObjectStoreURL(f"S3 URL {url!r} must not have a query or fragment")
        from .s3 import S3ObjectStore  # lazy import: start-up time (boto3 loads only for S3)

        return S3ObjectStore(
            bucket,
            prefix=unquote(parts.path).strip("/"),
            endpoint_url=endpoint_url or env.get("KMS_S3_ENDPOINT_URL") or None,
            region=env.get("KMS_S3_REGION") or None,
            retry_budget=retry_budget,
        )
    raise InvalidObjectStoreURL(
        f"unsupported object store URL scheme {parts.scheme!r} in {url!r} (use file:// or s3://)"
    )
