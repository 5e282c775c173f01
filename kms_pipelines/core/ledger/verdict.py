"""The verdict of a ledger verification (clause T3), shared by both verifiers.

``ledger.verify_rows`` (row by row, any database) and ``ledger_copy`` (PostgreSQL COPY,
split over processes) word a failure the same way, so they name the same first bad seq in
the same words. This module sits below both, so ``ledger.verify`` can pick the COPY path
with a module-level import (no ledger <-> ledger_copy cycle).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

GENESIS_HASH = "0" * 64


@dataclass
class VerifyResult:
    ok: bool
    count: int
    head_seq: int
    head_hash: str
    first_bad_seq: int | None = None
    problem: str | None = None
    # Which verifier produced it ("copy-c", "copy-python", "rows"), so a run on the slower
    # fallback says so; not part of the verdict (two verifiers agreeing compare equal).
    verifier: str | None = field(default=None, compare=False)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def seq_gap(count: int, prev: str, expected_seq: int, seq: int) -> VerifyResult:
    """The first bad seq when ``seq`` came where ``expected_seq`` should have (every verifier
    words a failure the same way, so they name the same first bad seq in the same words)."""
    problem = (
        f"entry seq {expected_seq} is missing (next present is {seq})"
        if seq > expected_seq
        else f"entry seq {seq} is out of order"
    )
    return VerifyResult(False, count, expected_seq - 1, prev, expected_seq, problem)


def broken_link(count: int, prev: str, seq: int) -> VerifyResult:
    return VerifyResult(
        False, count, seq - 1, prev, seq, f"entry seq {seq} does not link to seq {seq - 1} (prev_hash mismatch)"
    )


def altered(count: int, prev: str, seq: int) -> VerifyResult:
    return VerifyResult(
        False, count, seq - 1, prev, seq, f"entry seq {seq} was altered (its content does not match its hash)"
    )
