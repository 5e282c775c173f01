"""Access control and audit in Dagster (A1–A4): the ``audit_anomalies`` asset with its
checks, and the ``manual_rotation`` job launched from the Launchpad under dual control."""

import dagster as dg
from pydantic import Field

from ..core.access import anomalies
from ..core.keys import manual
from ..core.ledger import audit, checkpoints
from .failures import one_line_failures
from .metadata import seq_text
from .resources import KmsResource

NIGHTLY = {"kms_nightly": ""}


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
    result = audit.verify(kms.context())
    return dg.AssetCheckResult(
        passed=result.ok,
        severity=dg.AssetCheckSeverity.ERROR,
        metadata={
            "events": result.count,
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
