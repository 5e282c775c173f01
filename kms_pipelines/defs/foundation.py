"""The KMS database and key inventory: the first assets of ``kms_nightly``."""

import dagster as dg

from ..core.access import crosscheck
from ..core.foundation import db
from ..core.keys import lifecycle
from ..core.ledger import ledger
from .metadata import inventory_table, seq_text
from .resources import KmsResource

NIGHTLY = {"kms_nightly": ""}


@dg.asset(
    group_name="keys",
    tags=NIGHTLY,
    kinds={"sql"},
    description="KMS state database at the latest migration, with one active version of every policy key.",
)
def kms_state(context: dg.AssetExecutionContext, kms: KmsResource) -> dg.MaterializeResult:
    ctx = kms.context()
    db.upgrade(ctx.engine)
    created = [r.key for r in lifecycle.bootstrap(ctx, actor="dagster:kms_state") if r.rotated]
    if created:
        context.log.info(f"bootstrapped {len(created)} keys: {', '.join(created)}")
    with ctx.engine.connect() as conn:
        head_seq, head_hash = ledger.head(conn)
    return dg.MaterializeResult(
        metadata={
            "revision": db.current_revision(ctx.engine),
            "bootstrapped_keys": dg.MetadataValue.json(created),
            "ledger_head_seq": head_seq,
            "ledger_head_hash": head_hash,
            "keystore_backend": ctx.keystore.backend,
        }
    )


@dg.asset_check(
    asset=kms_state,
    blocking=True,
    description="Ledger chain intact (T3): recomputes every hash, replays the ledger against "
    "key_versions and matches it with the audit log event for event.",
)
def ledger_chain_intact(kms: KmsResource) -> dg.AssetCheckResult:
    ctx = kms.context()
    result = ledger.verify_with_policy(ctx)
    # The cross-check replays a chain that verified; on a broken chain the chain's problem is the answer.
    cross = crosscheck.verify(ctx) if result.ok else None
    passed, problem = (cross.ok, cross.problem) if cross else (False, result.problem)
    return dg.AssetCheckResult(
        passed=passed,
        severity=dg.AssetCheckSeverity.ERROR,
        metadata={
            "entries": result.count,
            "head_hash": result.head_hash,
            "first_bad_seq": seq_text(result.first_bad_seq),
            "problem": problem or "none",
            "crosscheck_problems": dg.MetadataValue.json(cross.problems if cross else []),
            "records_read": ", ".join(cross.sources) if cross else "ledger_entries",
        },
    )


@dg.asset(
    group_name="keys",
    tags=NIGHTLY,
    deps=[kms_state],
    kinds={"sql"},
    description="Every key version with its state, age and rotation due date from the policy.",
)
def key_inventory(kms: KmsResource) -> dg.MaterializeResult:
    rows = lifecycle.inventory(kms.context())
    live = [r for r in rows if r.state != "destroyed"]
    return dg.MaterializeResult(
        metadata={
            "versions": len(rows),
            "active": sum(r.state == "active" for r in rows),
            "overdue": sum(r.overdue for r in rows),
            "inventory": inventory_table(live),
            # issue 8 item 2: the active versions' age against their class cadence, as a bar chart
            "age_vs_cadence": dg.MetadataValue.md(_age_chart(kms, rows)),
        }
    )


def _age_chart(kms: KmsResource, rows) -> str:
    from .charts import key_age_chart

    policy = kms.context().policy
    return key_age_chart(
        rows,
        {
            c: policy.key_class(c).rotation_days
            for c in ("root", "service", "data", "backup", "break-glass", "export", "archive")
        },
    )


@dg.asset_check(asset=key_inventory, description="Keys within cadence (R1–R4): no active version past its due date.")
def keys_within_cadence(kms: KmsResource) -> dg.AssetCheckResult:
    # An overdue row always has its due date (lifecycle.inventory: overdue = due_at and now >= due_at).
    overdue = [(r, r.due_at) for r in lifecycle.inventory(kms.context()) if r.overdue and r.due_at is not None]
    return dg.AssetCheckResult(
        passed=not overdue,
        metadata={
            "overdue": dg.MetadataValue.json(
                [{"key": r.key, "version": r.version, "due_at": due.isoformat()} for r, due in overdue]
            )
        },
    )
