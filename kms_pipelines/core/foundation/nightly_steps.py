"""Where each area registers its nightly step (fn(ctx) -> summary, order); core/runtime/nightly.py imports the areas and runs the steps in order."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .context import KmsContext


@dataclass(frozen=True)
class NightlyStep:
    name: str
    order: int
    run: Callable[[KmsContext], Any]


_STEPS: dict[str, NightlyStep] = {}


def nightly_step(name: str, order: int):
    """Register ``fn(ctx) -> summary`` as a nightly step; lower ``order`` runs first."""

    def register(fn):
        _STEPS[name] = NightlyStep(name, order, fn)
        return fn

    return register
