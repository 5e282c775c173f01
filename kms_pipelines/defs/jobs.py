"""Jobs and schedules. ``kms_nightly`` is every asset tagged ``kms_nightly``."""

import dagster as dg

from ..core.foundation.policy import load_policy
from ..scaleout import executors

kms_nightly = dg.define_asset_job(
    "kms_nightly",
    selection=dg.AssetSelection.tag("kms_nightly", ""),
    description="The main job: migrations and bootstrap, rotation of each key class when due, break-glass escrow, "
    "RPT chain, ledger checkpoint, audit anomalies, notifications, security events, retirement, then "
    "the compliance report. The backup, the rewrap sweep and the drill are their own jobs.",
    # Its ~26 steps are short and share one KMS context: one process runs them in seconds,
    # where a process per step spends ~12 s each importing the code location (BENCHMARKS.md).
    # Supports in-process only: on celery each short step would pay a task round trip and a
    # context build on a worker, for nothing.
    executor_def=executors.for_job(("in_process",)),
)

kms_nightly_schedule = dg.ScheduleDefinition(
    name="kms_nightly_schedule",
    job=kms_nightly,
    cron_schedule=load_policy().backup.nightly_cron,
    execution_timezone="UTC",
    default_status=dg.DefaultScheduleStatus.RUNNING,
    description="Every night (policy backup.nightly_cron, UTC): reconcile keys to the policy and write the "
    "compliance report.",
)
