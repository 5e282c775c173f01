"""The nightly policy run as plain Python: an ordered registry of steps that each area
contributes (rotations, sweep, checkpoint, escrow, backup …). ``kms simulate`` calls
``run_nightly`` once per simulated day; the Dagster assets call the same core functions.
"""

from __future__ import annotations

import importlib
from typing import Any

from ..foundation.context import KmsContext
from ..foundation.nightly_steps import _STEPS, NightlyStep

# Areas that register steps at import time. Add your module here when you add a step.
STEP_MODULES: tuple[str, ...] = (
    "kms_pipelines.core.envelope.data_keys",
    "kms_pipelines.core.envelope.export_keys",
    "kms_pipelines.core.response.escrow",
    "kms_pipelines.core.response.overdue",
    "kms_pipelines.core.backup.backups",
    "kms_pipelines.core.keys.rotation",
    "kms_pipelines.core.keys.retention",
    "kms_pipelines.core.ledger.checkpoints",
    "kms_pipelines.core.ledger.rpt_verify",
    "kms_pipelines.core.access.anomalies",
    "kms_pipelines.core.keys.forensic",  # vault_archive (the vault step, with forensic purge)
)


def steps() -> list[NightlyStep]:
    for module in STEP_MODULES:
        importlib.import_module(module)
    return sorted(_STEPS.values(), key=lambda s: (s.order, s.name))


def run_nightly(ctx: KmsContext) -> dict[str, Any]:
    """Run every registered step in order; a failing step stops the night (fail loudly)."""
    return {step.name: step.run(ctx) for step in steps()}
