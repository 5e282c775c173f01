"""The clause-by-clause policy compliance report (issue 8) as the last asset of
``kms_nightly``, with its non-blocking ``policy_compliant`` check.

The asset body calls ``core.compliance.build_report``; the only thing added here is the
Dagster side of the evidence: for each clause, the latest evaluation of the asset checks
that evidence it (result, run id with a link to the run, time), read from the instance.
Overview sections (key age against cadence, DEK counts, backups, drills) make the one
page a compliance officer opens the place to start.

Also the Great Expectations check over the key and DEK inventory frames (``inventory_frames_valid``,
on ``key_inventory``); its suites live in ``core.compliance.quality`` (GE is imported lazily there)."""

from datetime import UTC, datetime

import dagster as dg

from ..core import compliance
from ..core.compliance import quality
from .charts import (
    backup_timeline,
    backups_table,
    dek_counts_table,
    drill_history_md,
    key_age_chart,
    key_age_table,
    open_followups_md,
)
from .foundation import NIGHTLY
from .metadata import markdown_table
from .resources import KmsResource

ASSET = "policy_compliance_report"
CHECK = "policy_compliant"
# Every other kms_nightly asset, so the report runs last and reads what they produced.
UPSTREAM = [
    "kms_state",
    "key_inventory",
    "keys_root",
    "keys_service",
    "keys_data",
    "keys_backup",
    "key_retirement",
    "keys_archive",
    "key_vault",
    "rpt_chain",
    "ledger_checkpoint",
    "dek_inventory",
    "break_glass_escrow",
    "audit_anomalies",
    "notification_deliveries",
    "security_events",
]


def run_url(run_id: str) -> str:
    return f"/runs/{run_id}"


def check_evidence(instance, clause: compliance.Clause) -> list[dict]:
    """The latest completed evaluation of each asset check mapped to ``clause``."""
    from dagster._core.storage.asset_check_execution_record import AssetCheckExecutionRecordStatus as Status

    out = []
    for ref in clause.checks:
        asset, name = ref.split("/", 1)
        key = dg.AssetCheckKey(dg.AssetKey(asset), name)
        records = instance.event_log_storage.get_asset_check_execution_history(
            key, limit=1, status={Status.SUCCEEDED, Status.FAILED}
        )
        if not records:
            out.append({"check": ref, "passed": None})
            continue
        rec = records[0]
        at = datetime.fromtimestamp(rec.create_timestamp, tz=UTC)
        out.append(
            {
                "check": ref,
                "passed": rec.status == Status.SUCCEEDED,
                "run_id": rec.run_id,
                "run_url": run_url(rec.run_id),
                "at": at.strftime("%Y-%m-%d %H:%M UTC"),
                **({"partition": rec.partition} if rec.partition else {}),
            }
        )
    return out


def _report_table(report: compliance.Report) -> dg.TableMetadataValue:
    """One row per clause, narrow enough for the asset page's metadata column at a 1600 px
    window (tests/test_ui_browser.py measures it): short headers, a coloured status mark, the
    clause's checks as one mark and count, the newest check run's short id and time. What each
    clause says, its control, its evidence and a link to each check's run are in the ``report``
    Markdown beside it (and `kms report`, docs/policy.md)."""
    schema = dg.TableSchema(
        columns=[
            dg.TableColumn("clause", "string", description="policy clause id (docs/policy.md)"),
            dg.TableColumn("status", "string", description="🟢 PASS, 🟠 WARN, ⚪ UNKNOWN or 🔴 FAIL"),
            dg.TableColumn(
                "checks",
                "string",
                description="the clause's asset checks, latest evaluation of each: "
                "✅ all passed, ❌ N failed, ⚪ some never ran, – none mapped",
            ),
            dg.TableColumn(
                "run",
                "string",
                description="first 8 characters of the id of the run that evaluated the "
                "newest check (open it from latest_check_run or the report)",
            ),
            dg.TableColumn("checked", "string", description="when that run evaluated it (UTC)"),
        ]
    )
    records = []
    for r in report.rows:
        ran = [c for c in r.checks if c.get("passed") is not None]
        latest = max(ran, key=lambda c: c["at"]) if ran else None
        records.append(
            dg.TableRecord(
                {
                    "clause": r.clause,
                    "status": compliance.BADGE[r.status],
                    "checks": compliance.checks_summary(r.checks),
                    "run": latest["run_id"][:8] if latest else "",
                    # "YYYY-MM-DD HH:MM UTC" -> "MM-DD HH:MM": the column header says UTC
                    "checked": latest["at"][5:16] if latest else "",
                }
            )
        )
    return dg.MetadataValue.table(records=records, schema=schema)


def _latest_check_run(report: compliance.Report) -> dict:
    ran = [c for r in report.rows for c in r.checks if c.get("passed") is not None]
    if not ran:
        return {}
    latest = max(ran, key=lambda c: c["at"])
    return {"latest_check_run": dg.MetadataValue.url(latest["run_url"])}


def _overview(ctx) -> dict:
    """Item 2: key ages against cadence, DEK counts, backups and drills, one page."""
    from ..core.backup import backups as backup
    from ..core.backup import drills
    from ..core.envelope import data_keys as envelope
    from ..core.keys import lifecycle

    cadence = {
        name: ctx.policy.key_class(name).rotation_days
        for name in ("root", "service", "data", "backup", "break-glass", "export", "archive")
    }
    inventory = lifecycle.inventory(ctx)
    backups = backup.list_backups(ctx)
    drill_rows = drills.list_drills(ctx)
    now = ctx.now()
    return {
        "key_age_vs_cadence": dg.MetadataValue.md(key_age_chart(inventory, cadence)),
        "key_ages": key_age_table(inventory, cadence),
        "dek_counts": dek_counts_table(envelope.inventory_counts(ctx)),
        "backups": backups_table(backups),
        "backup_timeline": dg.MetadataValue.md(backup_timeline(backups, now)),
        "drill_history": dg.MetadataValue.md(drill_history_md(drill_rows)),
        "open_followups": dg.MetadataValue.md(open_followups_md(drill_rows, now)),
    }


@dg.asset(
    name=ASSET,
    group_name="evidence",
    tags=NIGHTLY,
    deps=UPSTREAM,
    kinds={"python"},
    check_specs=[
        dg.AssetCheckSpec(
            CHECK,
            asset=ASSET,
            blocking=False,
            description="Every policy clause (docs/policy.md) passes; fails naming the failing clauses.",
        )
    ],
    description="Clause-by-clause policy compliance report (clauses P1–B4, docs/policy.md): for each clause id the control that "
    "enforces it, its latest evidence (live state + latest asset-check run) and its status. "
    "Same content as `kms report --format md|html|json`.",
)
def policy_compliance_report(context: dg.AssetExecutionContext, kms: KmsResource) -> dg.MaterializeResult:
    ctx = kms.context()
    instance = context.instance
    report = compliance.build_report(ctx, evidence=lambda c: check_evidence(instance, c))
    failing = [r.clause for r in report.failing]
    if failing:
        context.log.warning(f"policy clauses failing: {', '.join(failing)}")
    counts = report.counts()
    metadata = {
        "overall": report.overall,
        "failing_clauses": len(failing),
        "failing": dg.MetadataValue.json(failing),
        "counts": dg.MetadataValue.json(counts),
        "report": dg.MetadataValue.md(compliance.render_markdown(report, run_url=run_url)),
        "clauses": _report_table(report),
        **_latest_check_run(report),
        "generated_at": report.generated_at.isoformat(),
    }
    try:
        metadata.update(_overview(ctx))
    except Exception as exc:  # noqa: BLE001 -- the overview must never hide the report itself
        context.log.warning(f"overview sections skipped: {type(exc).__name__}: {exc}")
    return dg.MaterializeResult(
        metadata=metadata,
        check_results=[
            dg.AssetCheckResult(
                check_name=CHECK,
                passed=not failing,
                severity=dg.AssetCheckSeverity.ERROR,
                metadata={
                    "failing": dg.MetadataValue.json(failing),
                    "counts": dg.MetadataValue.json(counts),
                    "overall": report.overall,
                },
            )
        ],
    )


# ---------------------------------------------------------------- data quality of the inventories


@dg.asset_check(
    asset="key_inventory",
    blocking=True,
    description="Great Expectations: inventory types, unique key versions, allowed states, exactly one "
    "active version per key; DEK inventory ids unique and on existing versions.",
)
def inventory_frames_valid(kms: KmsResource) -> dg.AssetCheckResult:
    results = quality.validate(kms.context())
    return dg.AssetCheckResult(
        passed=all(r.success for r in results),
        metadata={
            "suites": dg.MetadataValue.md(
                markdown_table(
                    ["suite", "rows", "success", "failed expectations"],
                    [[r.name, r.rows, "yes" if r.success else "**no**", ", ".join(r.failed) or "-"] for r in results],
                )
            ),
            "failed": dg.MetadataValue.json({r.name: r.failed for r in results if not r.success}),
        },
    )
