"""Access control and audit in Dagster (A1–A4): the ``audit_anomalies`` asset with its
checks, the ``manual_rotation`` job launched from the Launchpad under dual control, and
notifications (A4): overdue reminders, the delivery log with its "notifications delivered"
check, and the run-failure sensor. Logic: core/access (anomalies, notifications), core/keys/manual.py."""

import dagster as dg
from pydantic import Field

from ..core.access import anomalies
from ..core.keys import manual
from ..core.ledger import audit, checkpoints
from .failures import one_line_failures
from .foundation import NIGHTLY
from .metadata import markdown_table, seq_text
from .resources import KmsResource

_SEVERITY = {"high": "🔴", "medium": "🟠", "low": "⚪"}


def _anomaly_table(rows) -> dg.TableMetadataValue:
    """Anomalies in the window, narrow enough for the metadata column at a 1600 px window
    (tests/test_ui_browser.py measures it); `kms audit anomalies` has every field."""
    schema = dg.TableSchema(
        columns=[
            dg.TableColumn("id", "int"),
            dg.TableColumn(
                "anomaly",
                "string",
                description="severity (🔴 high, 🟠 medium, ⚪ low) and kind, in words (decrypt burst = decrypt_burst)",
            ),
            dg.TableColumn("principal", "string"),
            dg.TableColumn("window", "string", description="start of the detection window (UTC)"),
            dg.TableColumn("n", "int", description="events in the window"),
            dg.TableColumn("reviewed", "string", description="who reviewed it (`kms audit review`); ❗ nobody yet"),
        ]
    )
    return dg.MetadataValue.table(
        records=[
            dg.TableRecord(
                {
                    "id": a.id,
                    "anomaly": f"{_SEVERITY.get(a.severity, a.severity)} {a.kind.replace('_', ' ')}",
                    "principal": a.principal or "",
                    "window": f"{a.window_start:%m-%d %H:%M}",
                    "n": int(a.count),
                    "reviewed": a.reviewed_by or "❗ nobody",
                }
            )
            for a in rows
        ],
        schema=schema,
    )


@dg.asset(
    group_name="audit",
    tags=NIGHTLY,
    deps=["kms_state"],
    kinds={"sql"},
    description="Anomalies in the audit log over the policy window (A3): rate spikes, operations "
    "without the role, decrypt and failure bursts, manual operations without approvals.",
)
def audit_anomalies(kms: KmsResource) -> dg.MaterializeResult:
    report = anomalies.refresh_anomalies(kms.context())
    return dg.MaterializeResult(
        metadata={
            "new": len(report.new),
            "in_window": len(report.recent),
            "unreviewed_high": len(report.unreviewed),
            "anomalies": _anomaly_table(report.recent),
        }
    )


@dg.asset_check(
    asset=audit_anomalies, blocking=True, description="Audit log chain intact (A3): recomputes every audit event hash."
)
def audit_chain_intact(kms: KmsResource) -> dg.AssetCheckResult:
    ctx = kms.context()
    result = audit.verify(ctx)  # red too while events wait in the audit spool
    spool = audit.spool_status(ctx)
    return dg.AssetCheckResult(
        passed=result.ok,
        severity=dg.AssetCheckSeverity.ERROR,
        metadata={
            "events": result.count,
            "spooled": spool.spooled,
            "dropped": spool.dropped,
            "head_hash": result.head_hash,
            "first_bad_seq": seq_text(result.first_bad_seq),
            "problem": result.problem or "none",
        },
    )


@dg.asset_check(
    asset=audit_anomalies,
    description="No unreviewed high-severity audit anomalies (A3); review with `kms audit review`.",
)
def no_unreviewed_high_anomalies(kms: KmsResource) -> dg.AssetCheckResult:
    pending = anomalies.unreviewed(kms.context())
    return dg.AssetCheckResult(
        passed=not pending,
        severity=dg.AssetCheckSeverity.ERROR,
        metadata={
            "unreviewed": len(pending),
            "ids": dg.MetadataValue.json([a.id for a in pending]),
            "kinds": dg.MetadataValue.json(sorted({a.kind for a in pending})),
        },
    )


class ManualRotationConfig(dg.Config):
    """Approvals must exist first: two other principals run `kms approve --ticket T --operation
    rotate --target KEY --as NAME --totp CODE` (with their security keys); only then launch with the same key
    and ticket."""

    key: str = Field(min_length=1, description="Key to rotate, e.g. service:api-gateway (required)")
    ticket: str = Field(min_length=1, description="Change ticket the two approvals were recorded under (required)")
    requester: str = Field(
        min_length=1, description="Enrolled principal requesting it; may not be an approver (required)"
    )
    requester_totp: str = Field(
        min_length=1, description="The requester's current TOTP code (proves the requester; required)"
    )


@dg.op(description="Rotate a key as a manual operation: runs only with complete dual-control approvals (A4).")
def manual_rotate_key(context: dg.OpExecutionContext, config: ManualRotationConfig, kms: KmsResource) -> dict:
    ctx = kms.context()
    with one_line_failures():
        o = manual.manual_rotate(
            ctx, config.key, ticket=config.ticket, requested_by=config.requester, totp=config.requester_totp
        )
        cp = checkpoints.checkpoint_if_changed(ctx)  # every state change ends bounded by a WORM checkpoint
    r = o.result
    context.add_output_metadata(
        {
            "checkpoint": cp["key"] if cp else "unchanged",
            "key": r.key,
            "old_version": r.old_version or 0,
            "new_version": r.new_version or 0,
            "ticket": o.ticket,
            "requester": o.requester,
            "approvers": dg.MetadataValue.json(o.approvers),
            "notification_failures": dg.MetadataValue.json(o.notification_failures),
        }
    )
    return {"key": r.key, "new_version": r.new_version, "approvers": o.approvers}


@dg.job(
    description="Manual rotation under dual control (A4). Approvals must exist first: two other "
    "principals approve with `kms approve --ticket T --operation rotate --target KEY`, their security "
    "keys and TOTP codes; then launch here with the same key and ticket, the requester and their TOTP "
    "code."
)
def manual_rotation():
    manual_rotate_key()


# ---------------------------------------------------------------- notifications (A4)


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
