"""Notifications (A4) in Dagster: overdue reminders, the delivery log with its
"notifications delivered" check, and the run-failure sensor. Logic: core/notifications.py."""

import dagster as dg

from .metadata import markdown_table
from .resources import KmsResource

NIGHTLY = {"kms_nightly": ""}


@dg.asset(group_name="notifications", tags=NIGHTLY, deps=["kms_state"], kinds={"python"},
          description="A4: overdue partner acknowledgements and drill follow-ups notified; delivery evidence.")
def notification_deliveries(kms: KmsResource) -> dg.MaterializeResult:
    from ..core import notifications

    ctx = kms.context()
    overdue = notifications.notify_overdue(ctx)
    st = notifications.delivery_status(ctx)
    recent = notifications.recent_deliveries(ctx, limit=30)
    return dg.MaterializeResult(metadata={
        "overdue_reminders": dg.MetadataValue.json(overdue),
        "delivered_in_window": st.delivered, "failed_in_window": st.failed,
        "undelivered": len(st.unresolved),
        "recent": dg.MetadataValue.md(markdown_table(
            ["at", "kind", "ref", "channel", "target", "outcome"],
            [[f"{r['at']:%Y-%m-%d %H:%M}", r["kind"], r["ref"] or "", r["channel"], r["target"],
              "skipped" if r["skipped"] else ("ok" if r["ok"] else f"FAILED: {(r['error'] or '')[:80]}")]
             for r in recent])),
    })


@dg.asset_check(asset=notification_deliveries,
                description="A4: no notification failed in the policy window without a later successful delivery.")
def notifications_delivered(kms: KmsResource) -> dg.AssetCheckResult:
    from ..core import notifications

    st = notifications.delivery_status(kms.context())
    return dg.AssetCheckResult(passed=st.ok, metadata={
        "window_hours": st.window_hours, "delivered": st.delivered, "failed": st.failed,
        "undelivered": dg.MetadataValue.json(st.unresolved)})


@dg.run_failure_sensor(name="run_failure_notify", default_status=dg.DefaultSensorStatus.RUNNING,
                       description="A4: a failed run notifies security and compliance.")
def run_failure_notify(context: dg.RunFailureSensorContext, kms: KmsResource):
    from ..core import notifications

    run = context.dagster_run
    message = (context.failure_event.message or "")[:1500] if context.failure_event else ""
    notifications.notify_policy_event(
        kms.context(), "run_failure", f"Dagster run of {run.job_name} failed",
        f"job: {run.job_name}\nrun id: {run.run_id}\ntags: "
        + ", ".join(f"{k}={v}" for k, v in sorted(run.tags.items()) if not k.startswith("dagster/"))
        + f"\n\n{message}\n", ref=f"run:{run.run_id}")
