"""Where each area registers its nightly step (fn(ctx) -> summary, order); core/runtime/nightly.py imports the areas and runs the steps in order."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from .context import KmsContext


@dataclass(frozen=True)
class NightlyStep:
    name: str
    order: int
    run: Callable[[KmsContext], Any]


_STEPS: dict[str, NightlyStep] = {}

_Step = TypeVar("_Step", bound=Callable[[KmsContext], Any])


def nightly_step(name: str, order: int) -> Callable[[_Step], _Step]:
    """Register ``fn(ctx) -> summary`` as a nightly step; lower ``order`` runs first."""

    def register(fn: _Step) -> _Step:
        _STEPS[name] = NightlyStep(name, order, fn)
        return fn

    return register
