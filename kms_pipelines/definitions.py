"""The code location: every module under ``kms_pipelines/defs`` is loaded automatically."""

from pathlib import Path

import dagster as dg

from . import defs as defs_package
from .core.runtime import guards  # noqa: F401  (every destroy/revoke guard registered before a job runs)
from .scaleout import executors


@dg.definitions
def defs() -> dg.Definitions:
    loaded = dg.load_defs(defs_root=defs_package, project_root=Path(__file__).resolve().parent.parent)
    # The default executor of every job that does not declare its own (KMS_EXECUTOR, scaleout/executors.py).
    return dg.Definitions.merge(loaded, dg.Definitions(executor=executors.for_job()))
