"""The code location: every module under ``kms_pipelines/defs`` is loaded automatically."""

from pathlib import Path

import dagster as dg

from . import defs as defs_package


@dg.definitions
def defs() -> dg.Definitions:
    return dg.load_defs(defs_root=defs_package, project_root=Path(__file__).resolve().parent.parent)
