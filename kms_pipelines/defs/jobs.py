"""Jobs and schedules. ``kms_nightly`` is every asset tagged ``kms_nightly``."""


import dagster as dg

from ..core.policy import load_policy

kms_nightly = dg.define_asset_job(
    "kms_nightly",
    selection=dg.AssetSelection.tag("kms_nightly", ""),
    description="The main job: reconcile keys to the policy, sweep, checkpoint, back up, report.",
)

kms_nightly_schedule = dg.ScheduleDefinition(
    name="kms_nightly_schedule", job=kms_nightly, cron_schedule=load_policy().backup.nightly_cron,
    execution_timezone="UTC", default_status=dg.DefaultScheduleStatus.RUNNING,
)
