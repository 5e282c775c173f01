"""One place that turns what core raises into a ``dg.Failure`` the UI shows as one line.

``one_line_failures()`` wraps an asset or op body. A dependency that stayed down for the
whole retry budget (core/foundation/retry.py ``DependencyUnavailable``) or a transient fault that no
retried unit caught becomes a Failure that *allows* the asset's ``dg.RetryPolicy`` to
re-run it (a re-run is safe); a refused or invalid operation (core/runtime/errors.py
``known_errors``) becomes a Failure that bypasses retries, because repeating it cannot
help. Descriptions are the same single lines the CLI prints; metadata never holds key
material. ``run_retry_policy()`` is the RetryPolicy for assets whose re-run is safe, from
``policy.faults.dagster``.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import dagster as dg

from ..core.foundation.policy import load_policy
from ..core.foundation.retry import DependencyUnavailable
from ..core.runtime.errors import connect_failure_line, fault_line, known_errors


def failure_for(exc: BaseException, rerun: str | None = None) -> dg.Failure | None:
    """The ``dg.Failure`` for ``exc``, or None for an unexpected error (a bug keeps its traceback)."""
    if isinstance(exc, DependencyUnavailable):
        return dg.Failure(description=str(exc), metadata=exc.metadata(), allow_retries=True)
    if isinstance(exc, known_errors()):
        return dg.Failure(
            description=str(exc).splitlines()[0] if str(exc) else type(exc).__name__,
            metadata={"error": type(exc).__name__},
            allow_retries=False,
        )
    line = fault_line(exc, rerun)
    if line is not None:
        return dg.Failure(description=line, metadata={"error": type(exc).__name__}, allow_retries=True)
    line = connect_failure_line(exc)
    if line is not None:
        return dg.Failure(description=line, metadata={"error": type(exc).__name__}, allow_retries=False)
    return None


@contextmanager
def one_line_failures(rerun: str | None = None) -> Iterator[None]:
    """Raise a one-line ``dg.Failure`` for any core error escaping the block (see module doc)."""
    try:
        yield
    except dg.Failure:
        raise
    except Exception as exc:
        failure = failure_for(exc, rerun)
        if failure is None:
            raise
        raise failure from exc


def run_retry_policy() -> dg.RetryPolicy:
    """Re-run a safe-to-repeat asset after its in-process retry budget ran out (policy.faults.dagster)."""
    cfg = load_policy().faults.dagster
    return dg.RetryPolicy(
        max_retries=cfg.max_retries,
        delay=cfg.delay_seconds,
        backoff=dg.Backoff.EXPONENTIAL,
        jitter=dg.Jitter.PLUS_MINUS,
    )
