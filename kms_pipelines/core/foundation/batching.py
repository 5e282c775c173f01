"""Batch sizes that follow a target commit time instead of a constant.

A batch's commit cost is a fixed part (round trip, WAL flush, waits on a busy server) plus
a per-row part; small batches pay the fixed part too often, large ones hold locks and
memory longer. After each commit the next size is scaled towards ``target_seconds`` — at
most doubling or halving per step, so one slow commit (a checkpoint, a busy neighbour)
cannot swing it — and kept within [min_size, max_size], which also bounds memory whatever
the table size.

Shrinking only helps when the time is in the per-row part. The last few commits give a
least-squares line ``seconds = fixed + per_row * rows``; when its fixed part alone takes
half the target or more (a loaded server whose every commit waits ~0.3 s whatever its
size), a slow commit makes the batch grow instead: halving there had shrunk a 100k sweep's
batches to the floor and multiplied its commits eightfold against a constant batch.
"""

from __future__ import annotations

import threading
from collections import deque

_WINDOW = 8  # commits the fixed/per-row split is estimated from


class AdaptiveBatch:
    def __init__(self, start: int, *, target_seconds: float | None, min_size: int = 1, max_size: int | None = None):
        if start < 1:
            raise ValueError(f"batch size must be at least 1, got {start}")
        self.min_size = max(1, min_size)
        self.max_size = max(self.min_size, max_size or start)
        self.target_seconds = target_seconds
        self._size = min(max(start, self.min_size), self.max_size) if target_seconds else start
        self._lock = threading.Lock()  # commits are observed on the writer thread
        self._recent: deque[tuple[int, float]] = deque(maxlen=_WINDOW)
        self.history: list[int] = []

    @property
    def size(self) -> int:
        return self._size

    def fixed_seconds(self) -> float | None:
        """The fixed part of a commit estimated from the recent ones; None until two sizes were seen."""
        if len({rows for rows, _ in self._recent}) < 2:
            return None
        n = len(self._recent)
        mean_r = sum(r for r, _ in self._recent) / n
        mean_s = sum(s for _, s in self._recent) / n
        var = sum((r - mean_r) ** 2 for r, _ in self._recent)
        per_row = sum((r - mean_r) * (s - mean_s) for r, s in self._recent) / var
        if per_row <= 0:  # bigger batches took no longer: all of it is fixed
            return mean_s
        return max(0.0, mean_s - per_row * mean_r)

    def observe(self, rows: int, seconds: float, *, requested: int | None = None) -> None:
        """Record one commit of ``rows`` rows that took ``seconds``.

        ``requested``: the size the batch was read at. A pipelined caller (the sweep) reads
        batch k+1 before batch k's commit is observed, so batch k+1 was read at the size
        before that observation; judged against the current size it would count as short
        and be ignored, and the size would grow only every second commit.
        """
        if not self.target_seconds or rows < 1:
            return
        with self._lock:
            # only a full batch says how its size performs; a short last batch does not
            if rows < (self._size if requested is None else requested):
                return
            self._recent.append((rows, seconds))
            scale = self.target_seconds / max(seconds, 1e-6)
            if scale < 1:
                fixed = self.fixed_seconds()
                if fixed is not None and fixed >= self.target_seconds / 2:
                    scale = 2.0  # the time is in the fixed part: fewer, bigger commits
            if scale >= 1:
                # at most double the current size, and no further than this commit's rate reaches the target
                size = min(self._size * 2, rows * scale)
            else:
                size = rows * max(0.5, scale)
            self._size = int(min(self.max_size, max(self.min_size, round(size))))
            self.history.append(self._size)
