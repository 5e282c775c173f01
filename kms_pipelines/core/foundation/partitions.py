"""Split a seq range over processes and run one worker per part (chain verifiers).

Hash chains (ledger, RPT) can be verified in parallel because every row stores its
predecessor's hash: each part starts from the stored hash of the row before it, and the
parts are read back in order, so the first failing part names the same first bad seq as
a single pass would."""

from __future__ import annotations

import multiprocessing
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from typing import TypeVar

T = TypeVar("T")


def seq_bounds(start: int, end: int, parts: int) -> list[tuple[int, int]]:
    """Half-open (lo, hi] ranges covering (start, end] in ``parts`` near-equal pieces."""
    step = -(-(end - start) // max(1, parts))
    return [(lo, min(lo + step, end)) for lo in range(start, end, step)] if end > start else []


def map_in_processes(
    fn: Callable[..., T], argsets: Sequence[tuple[object, ...]], *, first_in_caller: bool = False
) -> list[T]:
    """``[fn(*args) for args in argsets]``, one process per argset, results in order.
    ``first_in_caller``: the first argset runs in the calling process meanwhile, so one
    process fewer is started (``fn`` must then be safe to run in the caller).

    Workers come from a fork server, never from a plain fork of the caller: the caller has
    threads (the audit writer, the sweep's commit thread, Dagster's) and a fork copies any
    lock one of them holds, which hung a worker for good in a CI run. The server process is
    single-threaded and imports the verifiers once (``fn``'s module is preloaded). The server
    stays up for the life of the caller, so only the first call pays its start; each worker
    still re-runs the caller's main script before it starts (multiprocessing's spawn
    preparation; Python 3.11's forkserver cannot preload ``__main__``)."""
    if not argsets:
        return []
    local, remote = (argsets[0], argsets[1:]) if first_in_caller else (None, argsets)
    if local is not None and not remote:
        return [fn(*local)]
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload([fn.__module__])
    with ProcessPoolExecutor(max_workers=len(remote), mp_context=ctx) as pool:
        futures = [pool.submit(fn, *args) for args in remote]
        first = [fn(*local)] if local is not None else []
        return first + [f.result() for f in futures]
