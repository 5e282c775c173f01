"""Leases on ranges of the DEK shard space, so sweep workers on several hosts share the work.

Each sweep shard is cut into ``policy.envelope.lease_ranges_per_shard`` ranges. A worker
sweeps a range only while it holds that range's row in ``sweep_leases``: the claim is one
atomic upsert that succeeds only if the row is free, expired or already ours, with expiry
on the database's clock (hosts' clocks may disagree). The worker renews the lease after
every committed batch; a ``kill -9``'d worker stops renewing, its lease expires after
``lease_seconds`` and another worker takes the range over. So two live workers never
rewrap the same DEKs at once, and no range is left behind by a dead one. The sweep's
compare-and-set on the wrapping version (core/envelope/data_keys.py) stays the correctness
guarantee underneath: a worker paused past its expiry loses its lease at the next renew
and stops. The batch then already committing on its other writer (the sweep commits on two,
data_keys ``_writers``) still finishes, so up to two batches may commit after the lease
expired, one after the worker knew; compare-and-set makes that harmless (rows the new holder
moved first are skipped), never doubled (tests/test_envelope_writers.py).

On SQLite (one host by definition; workers refuse it, see core/foundation/worker.py) the ranges are
swept without leases.
"""

from __future__ import annotations

import logging
import os
import socket
import time
import uuid
from collections.abc import Callable

from sqlalchemy import text

from ..foundation import retry
from ..foundation.context import KmsContext
from ..foundation.db.models_envelope import SHARD_SPACE
from . import data_keys as envelope

log = logging.getLogger(__name__)


class LeaseLost(RuntimeError):
    """Another worker took this range over (our lease expired): stop sweeping it."""


_CLAIM = text(
    "INSERT INTO sweep_leases AS l (range_lo, range_hi, holder, expires_at, claims, takeovers) "
    "VALUES (:lo, :hi, :holder, clock_timestamp() + make_interval(secs => CAST(:ttl AS double precision)), 1, 0) "
    "ON CONFLICT (range_lo, range_hi) DO UPDATE SET holder = EXCLUDED.holder, expires_at = EXCLUDED.expires_at, "
    "  claims = l.claims + 1, "
    "  takeovers = l.takeovers + CASE WHEN l.holder IS NOT NULL AND l.holder <> EXCLUDED.holder THEN 1 ELSE 0 END "
    "WHERE l.holder IS NULL OR l.holder = EXCLUDED.holder OR l.expires_at < clock_timestamp() "
    "RETURNING l.claims"
)
_RENEW = text(
    "UPDATE sweep_leases SET expires_at = clock_timestamp() + make_interval(secs => CAST(:ttl AS double precision)) "
    "WHERE range_lo = :lo AND range_hi = :hi AND holder = :holder"
)
_RELEASE = text(
    "UPDATE sweep_leases SET holder = NULL, expires_at = NULL "
    "WHERE range_lo = :lo AND range_hi = :hi AND holder = :holder"
)


def new_holder() -> str:
    """A lease holder name unique to this process and call: host, pid, random suffix."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


def lease_ranges(shard: int | None, shards: int, per_shard: int) -> list[tuple[int, int]]:
    """The (sub-shard, sub-shards) pairs whose ``envelope.shard_range`` tile sweep shard ``shard`` of ``shards``.

    Sub-shard ``shard*k + j`` of ``shards*k`` covers exactly the j-th k-th of the shard's range,
    so the leased ranges are the envelope module's own partitions, only finer.
    """
    envelope.shard_range(shard, shards)  # validates
    if shard is None:
        shard, shards = 0, 1
    k = max(1, min(per_shard, SHARD_SPACE // shards))
    return [(shard * k + j, shards * k) for j in range(k)]


def _is_pg(ctx: KmsContext) -> bool:
    return ctx.engine.dialect.name == "postgresql"


def claim(ctx: KmsContext, lo: int, hi: int, holder: str, ttl: float) -> bool:
    with ctx.engine.begin() as conn:
        return conn.execute(_CLAIM, {"lo": lo, "hi": hi, "holder": holder, "ttl": ttl}).first() is not None


def renew(ctx: KmsContext, lo: int, hi: int, holder: str, ttl: float) -> None:
    with ctx.engine.begin() as conn:
        if conn.execute(_RENEW, {"lo": lo, "hi": hi, "holder": holder, "ttl": ttl}).rowcount != 1:
            raise LeaseLost(f"lease on shard range [{lo}, {hi}) was taken over by another worker")


def release(ctx: KmsContext, lo: int, hi: int, holder: str) -> None:
    with ctx.engine.begin() as conn:
        conn.execute(_RELEASE, {"lo": lo, "hi": hi, "holder": holder})


def _merge(total: envelope.SweepResult, part: envelope.SweepResult) -> None:
    total.moved += part.moved
    total.skipped += part.skipped
    total.failed += part.failed
    total.batches += part.batches
    total.remaining += part.remaining
    total.failed_ids.extend(part.failed_ids)
    for key, stats in part.by_key.items():
        into = total.by_key.setdefault(key, {"to_version": stats["to_version"], "moved": 0, "skipped": 0, "failed": 0})
        into["to_version"] = stats["to_version"]
        for field in ("moved", "skipped", "failed"):
            into[field] += stats[field]


def leased_sweep(
    ctx: KmsContext,
    key_name: str | None = None,
    *,
    shard: int | None = None,
    shards: int = 1,
    batch_size: int | None = None,
    holder: str | None = None,
    progress: Callable[[envelope.SweepProgress], None] | None = None,
    poll_seconds: float = 0.5,
    **sizing,
) -> envelope.SweepResult:
    """``envelope.sweep`` of one shard, range by range, each range under a lease (see module doc).

    Returns when this worker has itself swept every range of the shard (a range another
    live worker holds is waited for: it is released when done, or expires if that worker
    died, and is then re-swept here, which finds nothing left or takes the rest over).
    Batch sizing is ``envelope.sweep``'s: ``batch_size`` alone is constant; without it, the
    policy's sizing (``envelope.policy_batching``); other ``sizing`` keywords pass through.
    """
    cfg = ctx.policy.envelope
    if batch_size is not None:
        sizing = {"batch_size": batch_size, **sizing}
    elif not sizing:
        sizing = envelope.policy_batching(ctx)
    holder = holder or new_holder()
    lo, hi = envelope.shard_range(shard, shards)
    total = envelope.SweepResult(shard=shard, shards=shards, shard_range=(lo, hi))
    started = time.perf_counter()
    todo = lease_ranges(shard, shards, cfg.lease_ranges_per_shard)
    leased = _is_pg(ctx)
    try:
        while todo:
            waiting = []
            for sub, subs in todo:
                r_lo, r_hi = envelope.shard_range(sub, subs)
                if leased and not claim(ctx, r_lo, r_hi, holder, cfg.lease_seconds):
                    waiting.append((sub, subs))  # another live worker has it
                    continue

                def renewing(p: envelope.SweepProgress, r_lo=r_lo, r_hi=r_hi) -> None:
                    if leased:
                        renew(ctx, r_lo, r_hi, holder, cfg.lease_seconds)
                    if progress is not None:
                        progress(p)

                try:
                    part = envelope.sweep(ctx, key_name, shard=sub, shards=subs, progress=renewing, **sizing)
                except LeaseLost as exc:
                    log.warning("%s; waiting for it to be released", exc)
                    partial = getattr(exc, "sweep_result", None)
                    if partial is not None:  # its batches did commit (compare-and-set): count them
                        _merge(total, partial)
                    waiting.append((sub, subs))
                    continue
                if leased:
                    release(ctx, r_lo, r_hi, holder)
                _merge(total, part)
            if waiting and waiting == todo:
                time.sleep(poll_seconds)
            todo = waiting
    except retry.DependencyUnavailable as exc:
        # Name the shard as the user launched it, not the lease range that was running: every
        # committed batch stays committed, so re-running the shard picks up the rest.
        moved = total.moved + getattr(exc, "moved", 0)
        exc.done = exc.rerun = None
        raise exc.annotate(
            done=f"{moved:,} DEKs",
            rerun="kms envelope sweep"
            + (f" --key {key_name}" if key_name else "")
            + (f" --shard {shard} --shards {shards}" if shard is not None else ""),
        ) from exc.__cause__
    total.seconds = time.perf_counter() - started
    return total


def lease_rows(ctx: KmsContext) -> list[dict]:
    """Every lease row: range, holder, expiry, claims, takeovers (operators: `SELECT * FROM sweep_leases`)."""
    with ctx.engine.connect() as conn:
        return [
            dict(r)
            for r in conn.execute(
                text(
                    "SELECT range_lo, range_hi, holder, expires_at, claims, takeovers FROM sweep_leases "
                    "ORDER BY range_lo"
                )
            ).mappings()
        ]
