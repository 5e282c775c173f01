"""Notifications (A4) in Dagster: overdue reminders, the delivery log with its
"notifications delivered" check, and the run-failure sensor. Logic: core/access/notifications.py."""

import dagster as dg

from .metadata import markdown_table
from .resources import KmsResource

NIGHTLY = {"kms_nightly": ""}


@dg.asset(
    group_name="notifications",
    tags=NIGHTLY,
    deps=["kms_state"],
    kinds={"python"},
    description="A4: overdue partner acknowledgements and drill follow-ups notified; delivery evidence.",
)
def notification_deliveries(kms: KmsResource) -> dg.MaterializeResult:
    from ..core.access import notifications
    from ..core.response import overdue as overdue_mod

    ctx = kms.context()
    overdue = overdue_mod.notify_overdue(ctx)
    st = notifications.delivery_status(ctx)
    recent = notifications.recent_deliveries(ctx, limit=30)
    return dg.MaterializeResult(
        metadata={
            "overdue_reminders": dg.MetadataValue.json(overdue),
            "delivered_in_window": st.delivered,
            "failed_in_window": st.failed,
            "undelivered": len(st.unresolved),
            "recent": dg.MetadataValue.md(
                markdown_table(
                    # narrow for the metadata column: the outbox's file path is configuration, not news
                    ["at (UTC)", "what", "to", "outcome"],
                    [
                        [
                            f"{r['at']:%m-%d %H:%M}",
                            f"{r['kind']} {r['ref'] or ''}".strip(),
                            r["channel"] if r["channel"] == "outbox" else f"{r['channel']} {r['target']}",
                            "⏭ skipped"
                            if r["skipped"]
                            else ("✅ ok" if r["ok"] else f"❌ FAILED: {(r['error'] or '')[:80]}"),
                        ]
                        for r in recent
                    ],
                )
            ),
        }
    )


@dg.asset_check(
    asset=notification_deliveries,
    description="A4: no notification failed in the policy window without a later successful delivery.",
)
def notifications_delivered(kms: KmsResource) -> dg.AssetCheckResult:
    from ..core.access import notifications

    st = notifications.delivery_status(kms.context())
    return dg.AssetCheckResult(
        passed=st.ok,
        metadata={
            "window_hours": st.window_hours,
            "delivered": st.delivered,
            "failed": st.failed,
            "undelivered": dg.MetadataValue.json(st.unresolved),
        },
    )


def ui_base_url() -> str:
    """Where people open the Dagster UI, for links in notifications (KMS_DAGSTER_UI_URL)."""
    import os

    return (os.environ.get("KMS_DAGSTER_UI_URL") or "http://127.0.0.1:3000").rstrip("/")


def _why(event) -> str:
    """One line saying why a step failed: a dg.Failure's description, else the error's message."""
    data = event.event_specific_data
    user = getattr(data, "user_failure_data", None)
    if user is not None and user.description:
        return user.description.strip().splitlines()[0]
    error = getattr(data, "error", None)
    while error is not None and error.cause is not None and "dagster" in (error.cls_name or "").lower():
        error = error.cause  # past Dagster's wrappers to the error the step raised
    if error is None:
        return event.message or "failed"
    lines = [ln for ln in error.message.strip().splitlines() if ln.strip()]
    return lines[-1] if lines else error.cls_name or "failed"


def _public_tags(tags) -> list[str]:
    # Dagster's own tags (dagster/…, .dagster/grpc_info with host and port) are not for the mail.
    return [f"{k}={v}" for k, v in sorted(tags.items()) if not k.startswith(("dagster/", ".dagster"))]


@dg.run_failure_sensor(
    name="run_failure_notify",
    default_status=dg.DefaultSensorStatus.RUNNING,
    description="A4: a failed run notifies security and compliance, with why and a link to the run.",
)
def run_failure_notify(context: dg.RunFailureSensorContext, kms: KmsResource):
    from ..core.access import notifications

    run = context.dagster_run
    steps = [f"{e.step_key}: {_why(e)}"[:300] for e in context.get_step_failure_events()]
    headline = (
        steps[0]
        if steps
        else ((context.failure_event.message or "run failed") if context.failure_event else "run failed")
    )
    tags = _public_tags(run.tags)
    notifications.notify_policy_event(
        kms.context(),
        "run_failure",
        f"Dagster run of {run.job_name} failed: {headline}"[:200],
        f"job: {run.job_name}\nrun: {ui_base_url()}/runs/{run.run_id}\n"
        + (f"tags: {', '.join(tags)}\n" if tags else "")
        + "\n"
        + ("\n".join(f"- {s}" for s in steps) or headline)
        + "\n",
        ref=f"run:{run.run_id}",
    )
