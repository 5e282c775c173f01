"""verify_chain, the policy's verifyChain over the live RPT chain (P1, T3): in parallel over seq ranges, and against the newest signed checkpoint."""

from __future__ import annotations

import multiprocessing
from collections.abc import Iterable

from sqlalchemy import create_engine, func, select

from ..foundation import nightly_steps
from ..foundation.context import KmsContext
from ..foundation.db import make_engine, normalize_url
from ..foundation.db.models_rpt import RegulatoryProofToken
from ..foundation.partitions import map_in_processes, seq_bounds
from . import checkpoints
from .rpt import (
    ChainResult,
    RootKey,
    RptError,
    Window,
    anchor_at,
    check_head,
    iter_tokens,
    root_keys,
    root_windows,
    token_hash,
    verify_token_rows,
)


def _partition_worker(
    url: str, keys: dict[str, RootKey], windows: dict[int, Window], lo: int, hi: int, batch_size: int
) -> ChainResult:
    url = normalize_url(url)
    # SQLite: a plain engine (the KMS engine begins every transaction IMMEDIATE, which
    # would serialise the readers); PostgreSQL: the usual factory.
    engine = create_engine(url) if url.startswith("sqlite") else make_engine(url, pool_size=1)
    try:
        with engine.connect() as conn:
            try:
                anchor = anchor_at(conn, lo)
            except RptError:
                return ChainResult(False, 0, lo, f"token seq {lo}: seq gap: token seq {lo} is missing", lo - 1)
            return verify_token_rows(
                iter_tokens(conn, after_seq=lo, upto_seq=hi, batch_size=batch_size),
                keys,
                windows,
                anchor=anchor,
                end_seq=hi,
            )
    finally:
        engine.dispose()


def verify_chain(
    ctx: KmsContext, last: int | None = None, *, workers: int = 1, against_checkpoint: bool = True
) -> ChainResult:
    """verifyChain: every link, signature and signing window; exit-worthy on the first bad token.

    ``last=N`` verifies only the newest N tokens, anchored at the token before them.
    ``workers>1`` splits the seq range over processes, each checking its partition plus the
    link to the token before it. The head is compared with the newest signed checkpoint
    (``core/ledger/checkpoints``) so truncation of the newest tokens is caught.
    """
    if last is not None and last < 1:
        raise RptError("--last must be at least 1")
    batch = ctx.policy.rpt.verify_batch_size
    with ctx.engine.connect() as conn:
        keys, windows = root_keys(conn), root_windows(conn)
        max_seq = conn.execute(select(func.max(RegulatoryProofToken.seq))).scalar() or 0
    start = max(0, max_seq - last) if last else 0
    checkpoint = None
    if against_checkpoint and ctx.objects is not None:
        checkpoint = checkpoints.latest(ctx, keys)
    marks = [checkpoint.rpt_size] if checkpoint else []
    # A daemonic process (a Celery prefork worker) may not fork a pool: verify in this process.
    if workers <= 1 or max_seq - start < 2 * workers or multiprocessing.current_process().daemon:
        with ctx.engine.connect() as conn:
            anchor = anchor_at(conn, start)
            result = verify_token_rows(
                iter_tokens(conn, after_seq=start, batch_size=batch), keys, windows, anchor=anchor, marks=marks
            )
    else:
        result = _verify_parallel(ctx, keys, windows, start, max_seq, workers, batch, marks)
    if checkpoint is not None:
        result = check_head(result, checkpoint.rpt_size, checkpoint.rpt_head_hash, f"checkpoint {checkpoint.key}")
    return result


def _verify_parallel(
    ctx: KmsContext,
    keys: dict[str, RootKey],
    windows: dict[int, Window],
    start: int,
    max_seq: int,
    workers: int,
    batch: int,
    marks: Iterable[int],
) -> ChainResult:
    url = ctx.engine.url.render_as_string(hide_password=False)
    bounds = seq_bounds(start, max_seq, workers)
    parts = map_in_processes(_partition_worker, [(url, keys, windows, lo, hi, batch) for lo, hi in bounds])
    total = 0
    for part in parts:
        if not part.ok:
            part.count += total
            part.first_seq = start + 1
            return part
        total += part.count
    last_part = parts[-1]
    result = ChainResult(True, total, None, None, last_part.head_seq, last_part.head_hash, start + 1)
    if marks:
        # the checkpoint's token: one point read (each partition already verified it in place)
        with ctx.engine.connect() as conn:
            for m in marks:
                if start < m <= max_seq:
                    t = conn.execute(select(RegulatoryProofToken.token).where(RegulatoryProofToken.seq == m)).scalar()
                    if t is not None:
                        result.seen[m] = token_hash(t)
    return result


@nightly_steps.nightly_step("rpt_verify", order=42)
def _nightly_rpt_verify(ctx: KmsContext) -> dict[str, int]:
    result = verify_chain(ctx)
    if not result.ok:
        raise RptError(f"RPT chain broken at seq {result.first_bad_seq}: {result.problem}")
    return {"verified": result.count, "head_seq": result.head_seq}
