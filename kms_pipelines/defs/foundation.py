"""The KMS database: ``kms_state``, the first asset of ``kms_nightly`` (migrations, bootstrap of every
policy key), upstream of every section's assets, with its blocking ledger check."""

import dagster as dg

from ..core.access import crosscheck
from ..core.foundation import db
from ..core.keys import lifecycle
from ..core.ledger import ledger
from .metadata import seq_text
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
