"""The schema of a signed backup manifest, checked field by field before any field is used.

A manifest that parses as JSON is not yet a manifest: every field has a type and, where the
set of values is closed (``alg``, ``format``, ``gfs_class``, the database kind), a known
value. Unknown fields are refused too, so nothing rides along unchecked. Format 2 signs the
whole envelope (format, kid, alg and the manifest); format 1 (older archives) signed only the
manifest, so its envelope fields are accepted only with their single legal values.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

FORMAT_V1 = "kms-backup-manifest/1"
FORMAT = "kms-backup-manifest/2"
ARCHIVE_FORMAT = "tar+zstd+age/1"

Hex64 = Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]
Fingerprint = Annotated[str, Field(pattern=r"^SHA256:[0-9a-f]{64}$")]
Version = Annotated[int, Field(ge=1)]
Text = Annotated[str, Field(min_length=1, max_length=4096)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class _BackupKey(_Strict):
    name: Literal["backup"]
    version: Version


class _Database(_Strict):
    kind: Literal["postgresql", "sqlite"]
    server_version: Text
    format: Text


class _DataKeyVersion(_Strict):
    key: Text
    version: Version
    state: Literal["active", "rotated", "revoked"]
    deks: Annotated[int, Field(ge=0)] | None


class _Canary(_Strict):
    key: Text
    version: Version
    aad: Text
    ciphertext: Text
    plaintext_sha256: Hex64


class Manifest(_Strict):
    archive_id: Text
    archive_key: Text
    archive_format: Literal["tar+zstd+age/1"]
    archive_sha256: Hex64
    archive_size: Annotated[int, Field(ge=0)]
    created_at: Text
    gfs_class: Literal["nightly", "weekly"]
    retain_until: Text
    backup_key: _BackupKey
    sealed_identity: Text
    recipient: Annotated[str, Field(pattern=r"^age1[0-9a-z]+$")]
    root_kid: Fingerprint
    root_version: Version
    database: _Database
    keystore_backend: Text
    tool_versions: dict[str, str]
    data_key_versions: list[_DataKeyVersion]
    canaries: list[_Canary]
    include_paths: list[Text]
    successor_of: Text | None


class Envelope(_Strict):
    format: Literal["kms-backup-manifest/1", "kms-backup-manifest/2"]
    kid: Fingerprint
    alg: Literal["Ed25519"]
    signature: Annotated[str, Field(pattern=r"^[A-Za-z0-9+/]+={0,2}$")]
    manifest: Manifest


def schema_problem(doc) -> str | None:
    """None if ``doc`` is a well-formed signed manifest, else the first bad field, named."""
    try:
        Envelope.model_validate(doc)
    except ValidationError as exc:
        err = exc.errors()[0]
        where = ".".join(str(p) for p in err["loc"]) or "manifest"
        return f"field {where!r}: {err['msg']}"
    return None


def signed_part(doc: dict) -> dict:
    """What the signature covers: for format 2 every field but the signature itself."""
    if doc["format"] == FORMAT_V1:
        return doc["manifest"]
    return {k: v for k, v in doc.items() if k != "signature"}
