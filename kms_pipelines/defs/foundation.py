"""The KMS database: ``kms_state``, the first asset of ``kms_nightly`` (migrations, bootstrap of every
policy key), upstream of every section's assets. Its blocking ledger check is in defs/ledger.py."""

import dagster as dg

from ..core.foundation import db
from ..core.keys import lifecycle
from ..core.ledger import ledger
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
