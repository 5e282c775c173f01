"""The ledger chain (T3: ``ledger_chain_intact``, blocking, on ``kms_state``), the RPT chain (P1)
and signed ledger checkpoints (T3) in ``kms_nightly``.

Asset bodies only call core (``core/ledger/ledger.py``, ``core/access/crosscheck.py``, ``core/ledger/rpt.py``,
``core/ledger/checkpoints.py``); metadata carries counts, hashes, kids and object keys, never key material."""

import dagster as dg

from ..core.access import crosscheck
from ..core.ledger import checkpoints, ledger, rpt_verify
from .failures import one_line_failures, run_retry_policy
from .foundation import NIGHTLY, kms_state
from .metadata import full_values_md, markdown_table, seq_text, short_hash, short_kid, short_path
from .resources import KmsResource


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
    group_name="evidence",
    tags=NIGHTLY,
    deps=[kms_state],
    kinds={"sql"},
    description="The chain of regulatory proof tokens (P1): count, head and the last verifyChain.",
)
def rpt_chain(kms: KmsResource) -> dg.MaterializeResult:
    ctx = kms.context()
    result = rpt_verify.verify_chain(ctx)
    return dg.MaterializeResult(
        metadata={
            "count": result.head_seq,
            "head_hash": result.head_hash,
            "last_verified": result.head_seq if result.ok else (result.first_bad_seq or 1) - 1,
            "verified_ok": result.ok,
            "checked_against": result.checked_against or "no checkpoint yet",
            "problem": result.problem or "none",
        }
    )


@dg.asset_check(
    asset=rpt_chain,
    blocking=True,
    description="RPT chain verifies (P1, B2): links, signatures, signing windows, head vs checkpoint.",
)
def rpt_chain_verifies(kms: KmsResource) -> dg.AssetCheckResult:
    result = rpt_verify.verify_chain(kms.context())
    return dg.AssetCheckResult(
        passed=result.ok,
        severity=dg.AssetCheckSeverity.ERROR,
        metadata={
            "verified": result.count,
            "head_seq": result.head_seq,
            "head_hash": result.head_hash,
            "first_bad_seq": seq_text(result.first_bad_seq),
            "problem": result.problem or "none",
        },
    )


@dg.asset(
    group_name="evidence",
    tags=NIGHTLY,
    deps=[kms_state, rpt_chain],
    kinds={"s3"},
    description="Daily checkpoint (T3): ledger and RPT heads signed by the root key, written to WORM storage.",
    retry_policy=run_retry_policy(),
)  # a repeat re-verifies and signs anew
def ledger_checkpoint(kms: KmsResource) -> dg.MaterializeResult:
    with one_line_failures("kms ledger checkpoint"):
        cp = checkpoints.write_checkpoint(kms.context())
    # The object, the heads and the kid shortened so the panel fits a 1600 px window; full in full_values.
    return dg.MaterializeResult(
        metadata={
            "object": short_path(cp["url"]),
            "ledger_size": cp["ledger_size"],
            "ledger_head_hash": short_hash(cp["ledger_head_hash"]),
            "rpt_size": cp["rpt_size"],
            "rpt_head_hash": short_hash(cp["rpt_head_hash"]),
            "signed_by": cp["kid"].split(":")[0],
            "kid": short_kid(cp["kid"]),
            "at": cp["at"],
            "full_values": full_values_md(
                [
                    ("object", cp["url"], "the signed checkpoint in WORM storage"),
                    ("ledger_head_hash", cp["ledger_head_hash"], "hash of the ledger's last entry, as signed"),
                    ("rpt_head_hash", cp["rpt_head_hash"], "hash of the last regulatory proof token, as signed"),
                    ("kid", cp["kid"], "the root key version and fingerprint that signed the checkpoint"),
                ]
            ),
            "retain_until": str(cp["retain_until"]),
            "lock_mode": cp["lock_mode"] or "none",
            "summary": dg.MetadataValue.md(
                markdown_table(
                    ["field", "value"],
                    [
                        ["ledger entries", cp["ledger_size"]],
                        ["RPTs", cp["rpt_size"]],
                        ["signed by", cp["kid"].split(":")[0]],
                        ["earlier checkpoints matched", cp["checkpoints_before"]],
                        ["retained until", cp["retain_until"]],
                    ],
                )
            ),
        }
    )


@dg.asset_check(
    asset=ledger_checkpoint,
    blocking=True,
    description="Ledger matches every signed checkpoint (T3): catches a rewrite with a recomputed chain.",
)
def ledger_matches_checkpoints(kms: KmsResource) -> dg.AssetCheckResult:
    result = checkpoints.verify(kms.context())
    return dg.AssetCheckResult(
        passed=result.ok,
        severity=dg.AssetCheckSeverity.ERROR,
        metadata={
            "checkpoints": result.checkpoints,
            "ledger_size": result.ledger_size,
            "rpt_size": result.rpt_size,
            "latest": result.latest_checkpoint or "none",
            "area": result.area or "none",
            "first_bad_seq": seq_text(result.first_bad_seq),
            "problem": result.problem or "none",
        },
    )
