"""Batch sizes that follow a target commit time instead of a constant.

A batch's commit cost is a fixed part (round trip, WAL flush) plus a per-row part; small
batches pay the fixed part too often, large ones hold locks and memory longer. After
each commit the next size is scaled towards ``target_seconds`` — at most doubling or
halving per step, so one slow commit (a checkpoint, a busy neighbour) cannot swing it —
and kept within [min_size, max_size], which also bounds memory whatever the table size.
"""

from __future__ import annotations

import threading


class AdaptiveBatch:
    def __init__(self, start: int, *, target_seconds: float | None, min_size: int = 1, max_size: int | None = None):
        if start < 1:
            raise ValueError(f"batch size must be at least 1, got {start}")
        self.min_size = max(1, min_size)
        self.max_size = max(self.min_size, max_size or start)
        self.target_seconds = target_seconds
        self._size = min(max(start, self.min_size), self.max_size) if target_seconds else start
        self._lock = threading.Lock()  # commits are observed on the writer thread
        self.history: list[int] = []

    @property
    def size(self) -> int:
        return self._size

    def observe(self, rows: int, seconds: float) -> None:
        """Record one commit of ``rows`` rows that took ``seconds``."""
        if not self.target_seconds or rows < 1:
            return
        with self._lock:
            # only a full batch says how the current size performs; a short last batch does not
            if rows < self._size:
                return
            scale = self.target_seconds / max(seconds, 1e-6)
            scale = min(2.0, max(0.5, scale))
            self._size = int(min(self.max_size, max(self.min_size, round(rows * scale))))
            self.history.append(self._size)
