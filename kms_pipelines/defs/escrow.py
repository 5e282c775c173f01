"""Break-glass escrow (P4, R4) in Dagster: the nightly asset that rotates break-glass when
due and seals it M-of-N, and the checks that the current package is in order and that
superseded packages were confirmed destroyed. Logic: core/response/escrow.py."""

import dagster as dg

from .metadata import markdown_table, shorten
from .resources import KmsResource

NIGHTLY = {"kms_nightly": ""}


@dg.asset(
    group_name="escrow",
    tags=NIGHTLY,
    deps=["kms_state"],
    kinds={"python"},
    description="R4/P4: break-glass rotated every 30 days (even unused) and sealed as an M-of-N package.",
)
def break_glass_escrow(context: dg.AssetExecutionContext, kms: KmsResource) -> dg.MaterializeResult:
    from ..core.response import escrow

    ctx = kms.context()
    summary = escrow.nightly_escrow(ctx)
    if summary.get("problem"):
        context.log.warning(summary["problem"])
    st = escrow.status(ctx)
    cur = st["current"]
    return dg.MaterializeResult(
        metadata={
            "rotated": bool(summary.get("rotated")),
            "sealed_now": bool(summary.get("sealed")),
            "current_package": cur["package_id"] if cur else "none",
            "key_version": cur["key_version"] if cur else 0,
            "threshold": f"{cur['threshold']} of {len(cur['custodians'])}" if cur else "-",
            "problem": summary.get("problem") or "none",
            "packages": dg.MetadataValue.md(
                markdown_table(
                    ["package", "version", "created", "superseded", "confirmed destroyed by", "erased"],
                    [
                        [
                            p["package_id"],
                            p["key_version"],
                            f"{p['created_at']:%Y-%m-%d}",
                            f"{p['superseded_at']:%Y-%m-%d}" if p["superseded_at"] else "current",
                            ", ".join(sorted(p["confirmations"])) or "-",
                            "yes" if p["erased_at"] else "",
                        ]
                        for p in st["packages"][-20:]
                    ],
                )
            ),
            "custodians": dg.MetadataValue.md(
                markdown_table(
                    ["custodian", "enrolled", "recipient"],
                    # the age recipient shortened (full: `kms escrow custodian list`), so the table fits the metadata column
                    [
                        [c["name"], "yes" if c["enrolled"] else "**NO**", shorten(c["recipient"], 16) or "-"]
                        for c in st["custodians"]
                    ],
                )
            ),
        }
    )


@dg.asset_check(
    asset=break_glass_escrow,
    blocking=True,
    description="P4: the active break-glass version is sealed in a current, stored, in-cadence package.",
)
def escrow_current(kms: KmsResource) -> dg.AssetCheckResult:
    from ..core.response import escrow

    problems = escrow.current_problems(kms.context())
    return dg.AssetCheckResult(passed=not problems, metadata={"problems": dg.MetadataValue.json(problems)})


@dg.asset_check(
    asset=break_glass_escrow,
    description="R4: every custodian confirmed each superseded package destroyed within the window.",
)
def escrow_destruction_confirmed(kms: KmsResource) -> dg.AssetCheckResult:
    from ..core.response import escrow

    ctx = kms.context()
    overdue = escrow.destruction_overdue(ctx)
    return dg.AssetCheckResult(
        passed=not overdue,
        metadata={
            "window_days": escrow.escrow_policy(ctx).destruction_confirm_days,
            "overdue": dg.MetadataValue.json(overdue),
        },
    )
