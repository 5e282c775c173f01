"""Canonical JSON (RFC 8785) for everything that is hashed or signed.

``canonical_bytes`` is the general encoder (the ``rfc8785`` library). Hot loops over
fixed-schema rows (ledger and audit verification) use ``canonical_fast``: for documents
whose keys are ASCII and whose values are str / int / bool / None / lists and dicts of
those — no floats — sorted-key ``json.dumps`` yields exactly the RFC 8785 bytes (same
escaping, same key order); ``tests/test_canonical.py`` checks the two agree.
"""

from __future__ import annotations

import json
from typing import Any

import rfc8785


def canonical_bytes(obj: Any) -> bytes:
    return rfc8785.dumps(obj)


_fast = json.JSONEncoder(sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode


def canonical_fast(obj: Any) -> bytes:
    """RFC 8785 bytes for float-free documents with ASCII keys (see module docstring)."""
    return _fast(obj).encode("utf-8")
