"""Every destroy and revoke guard, registered (clauses T1, T4, B3, R4 …).

The registry lives low, in ``keys/lifecycle`` (``destroy_guard``, ``revoke_guard``); the areas
that own a guard register it at import. This module imports each such area, at module level so
import-linter sees the dependency, and tells lifecycle the registry is complete. The CLI
(``runtime/wiring``), the Dagster resources (``defs/resources``) and the test fixtures import
it; ``tests/test_layering.py`` proves every guard is registered when the CLI and the Dagster
definitions load. A new guard's module goes in ``GUARD_MODULES``.
"""

from __future__ import annotations

from types import ModuleType

from ..backup import backups
from ..envelope import data_keys
from ..keys import dependents, lifecycle, retention, service_keys, vault
from ..response import escrow

GUARD_MODULES: tuple[ModuleType, ...] = (retention, dependents, service_keys, data_keys, backups, escrow, vault)

# guard name -> the module that registers it (the test checks these against the registry)
DESTROY_GUARDS = {
    "retention": retention,
    "dependents": dependents,
    "root_seeds": service_keys,
    "deks": data_keys,
    "restore_points": backups,
    "escrow": escrow,
    "archive_copies": vault,
}
REVOKE_GUARDS = {"dependents": dependents}

lifecycle.guards_loaded(m.__name__ for m in GUARD_MODULES)
