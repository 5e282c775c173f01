"""Envelope encryption in Dagster: the DEK rewrap sweep (partitioned by shard), the DEK
inventory, and the export-key expiry sensor (P3, R3, T2).

The sweep cannot be part of ``kms_nightly``: an asset job runs assets of one partitions
definition only, and ``kms_nightly``'s assets are unpartitioned. So it has its own job,
``dek_rewrap_sweep_job``, and a schedule that launches one run per shard after the
nightly rotations (``policy.envelope.sweep_cron``); with a distributed run launcher the
shards run on separate workers. Each shard's run checks its own range
(``no_deks_on_retired_versions``, blocking). ``dek_rewrap_fanout_job`` is the other shape of
the same sweep: one run whose steps share every shard through leases (celery fan-out).
"""

import os
import socket

import dagster as dg

from ..core.envelope import data_keys as envelope
from ..core.envelope import export_keys, leases
from ..core.foundation.policy import load_policy
from ..scaleout import executors
from .failures import one_line_failures, run_retry_policy
from .foundation import NIGHTLY, kms_state
from .metadata import markdown_table
from .resources import KmsResource

_ENVELOPE = load_policy().envelope
SHARD_KEYS = [str(i) for i in range(_ENVELOPE.shards)]
shard_partitions = dg.StaticPartitionsDefinition(SHARD_KEYS)
CHECK = "no_deks_on_retired_versions"


def _stranded_metadata(rows) -> dict:
    return {
        "stranded_deks": sum(r.deks for r in rows),
        "stranded": dg.MetadataValue.md(
            markdown_table(["key", "version", "state", "DEKs"], [[r.key, r.version, r.state, r.deks] for r in rows])
            if rows
            else "none"
        ),
    }


@dg.asset(
    group_name="envelope",
    partitions_def=shard_partitions,
    deps=[kms_state],
    kinds={"sql"},
    check_specs=[
        dg.AssetCheckSpec(
            CHECK,
            asset="dek_rewrap_sweep",
            blocking=True,
            description="No live DEK of this shard is left under a rotated, revoked or destroyed key version (R3, T2).",
        )
    ],
    description="Rewrap every DEK of this shard still on a rotated/revoked data-key version onto the active "
    "version (inside the HSM under PKCS#11). Resumable: batches commit with compare-and-set.",
    retry_policy=run_retry_policy(),  # a re-run picks up where a lost database left the shard
)
def dek_rewrap_sweep(context: dg.AssetExecutionContext, kms: KmsResource) -> dg.MaterializeResult:
    ctx = kms.context()
    shard, shards = int(context.partition_key), len(SHARD_KEYS)

    def progress(p: envelope.SweepProgress) -> None:
        if p.batch == 1 or p.batch % 20 == 0:
            context.log.info(
                f"shard {shard}: batch {p.batch}, {p.key} v{p.from_version}->v{p.to_version}, "
                f"{p.total_moved} moved so far ({p.seconds:.1f}s)"
            )

    with one_line_failures():
        # Leased range by range: workers on other hosts running the same shard (a retry,
        # a duplicate launch) never rewrap the same DEKs at once (core/envelope/leases.py).
        result = leases.leased_sweep(
            ctx, shard=shard, shards=shards, **envelope.policy_batching(ctx), progress=progress
        )
    context.log.info(
        f"shard {shard}: moved {result.moved} DEK(s) in {result.batches} batch(es), "
        f"{result.rate:.0f}/s; {result.remaining} remaining, {result.failed} failed"
    )
    stranded = envelope.stranded(ctx, shard=shard, shards=shards)
    return dg.MaterializeResult(
        metadata={
            "shard": shard,
            "shards": shards,
            "shard_range": f"[{result.shard_range[0]}, {result.shard_range[1]})",
            "moved": result.moved,
            "remaining": result.remaining,
            "skipped": result.skipped,
            "failed": result.failed,
            "batches": result.batches,
            "seconds": round(result.seconds, 3),
            "rate_per_s": round(result.rate, 1),
            "keystore_backend": ctx.keystore.backend,
            "by_key": dg.MetadataValue.md(
                markdown_table(
                    ["key", "to version", "moved", "skipped", "failed"],
                    [[k, v["to_version"], v["moved"], v["skipped"], v["failed"]] for k, v in result.by_key.items()],
                )
                if result.by_key
                else "nothing to sweep"
            ),
        },
        check_results=[
            dg.AssetCheckResult(
                check_name=CHECK,
                passed=not stranded,
                severity=dg.AssetCheckSeverity.ERROR,
                metadata=_stranded_metadata(stranded),
            )
        ],
    )


dek_rewrap_sweep_job = dg.define_asset_job(
    "dek_rewrap_sweep_job",
    selection=dg.AssetSelection.assets(dek_rewrap_sweep),
    partitions_def=shard_partitions,
    tags={"kms/sweep": "rewrap"},  # dagster.yaml caps concurrent sweep runs on this tag (HSM load)
    executor_def=executors.for_job(executors.ALL),  # leased ranges: safe on any executor, any host
    description="DEK rewrap sweep, one run per shard (R3): fans out across run workers.",
)


@dg.schedule(
    job=dek_rewrap_sweep_job,
    cron_schedule=_ENVELOPE.sweep_cron,
    execution_timezone="UTC",
    default_status=dg.DefaultScheduleStatus.RUNNING,
    description="Every night after the rotations: one sweep run per shard.",
)
def dek_rewrap_sweep_schedule(context: dg.ScheduleEvaluationContext):
    day = context.scheduled_execution_time.strftime("%Y-%m-%dT%H%M")
    return [dg.RunRequest(run_key=f"dek-sweep:{day}:shard-{key}", partition_key=key) for key in SHARD_KEYS]


@dg.asset(
    group_name="envelope",
    tags=NIGHTLY,
    deps=[kms_state],
    kinds={"sql"},
    description="DEK inventory: how many DEKs each key version wraps (live and crypto-shredded). Never wrapped bytes.",
)
def dek_inventory(kms: KmsResource) -> dg.MaterializeResult:
    ctx = kms.context()
    rows = envelope.inventory_counts(ctx)
    stranded = envelope.stranded(ctx)
    return dg.MaterializeResult(
        metadata={
            "live_deks": sum(r.deks for r in rows),
            "shredded_deks": sum(r.shredded for r in rows),
            "inventory": dg.MetadataValue.md(
                markdown_table(
                    ["key", "version", "state", "live DEKs", "shredded"],
                    [[r.key, r.version, r.state, r.deks, r.shredded] for r in rows],
                )
                if rows
                else "no DEKs"
            ),
            "dek_counts": _dek_counts_table(rows),  # issue 8 item 2: the same counts as a sortable table
            # Stranded DEKs are normal between the 02:00 rotations and the sweep; the sweep's check enforces.
            **_stranded_metadata(stranded),
        }
    )


def _dek_counts_table(rows):
    from .charts import dek_counts_table

    return dek_counts_table(rows)


# ---- export keys -------------------------------------------------------------------------


class ExportExpiryConfig(dg.Config):
    key_name: str | None = None  # None: every expired export key


@dg.op(description="Rotate and destroy expired export keys: their objects become unreadable (R3).")
def expire_export_keys(context: dg.OpExecutionContext, config: ExportExpiryConfig, kms: KmsResource) -> dg.Output:
    ctx = kms.context()
    results = export_keys.expire_due(ctx, config.key_name, actor="dagster:export_key_expiry")
    from ..core.ledger import checkpoints

    checkpoints.checkpoint_if_changed(ctx)  # the shredding's state changes end under a WORM checkpoint
    for r in results:
        context.log.info(
            f"{r.key}: expired {r.expired_at.isoformat()}, rotated_to={r.rotated_to}, "
            f"destroyed={r.destroyed}, shredded {r.shredded_deks} DEK(s)"
        )
    refused = {f"{r.key} v{v}": why for r in results for v, why in r.refused.items()}
    metadata: dict[str, dg.MetadataValue | int] = {
        "expired": dg.MetadataValue.json([r.key for r in results]),
        "shredded_deks": sum(r.shredded_deks for r in results),
        "report": dg.MetadataValue.md(
            markdown_table(
                ["export key", "expired at", "rotated to", "destroyed", "shredded DEKs", "refused"],
                [
                    [
                        r.key,
                        r.expired_at.isoformat(),
                        r.rotated_to or "-",
                        r.destroyed,
                        r.shredded_deks,
                        "; ".join(r.refused.values()) or "",
                    ]
                    for r in results
                ],
            )
            if results
            else "nothing due"
        ),
    }
    if refused:
        raise dg.Failure(description=f"export-key destroy refused: {refused}", metadata=metadata)
    return dg.Output(len(results), metadata=metadata)


@dg.job(description="Crypto-shred expired export keys (launched by export_key_expiry_sensor).")
def export_key_expiry_job():
    expire_export_keys()


@dg.sensor(
    job=export_key_expiry_job,
    minimum_interval_seconds=_ENVELOPE.export_expiry_check_seconds,
    default_status=dg.DefaultSensorStatus.RUNNING,
    description="Launches export_key_expiry_job for every export key past its expiry (R3).",
)
def export_key_expiry_sensor(context: dg.SensorEvaluationContext, kms: KmsResource):
    due = export_keys.due(kms.context())
    if not due:
        return dg.SkipReason("no export key past its expiry")
    # The run key names the work still to do, so a state that does not change (e.g. a
    # refusing guard) launches once, and any progress launches the next step once.
    return [
        dg.RunRequest(
            run_key=(
                f"export-expiry:{d.key}:{d.expired_at.isoformat()}:rotate={int(d.rotate_needed)}:"
                f"destroy={','.join(map(str, d.versions_to_destroy))}:unshredded={int(d.unshredded_deks > 0)}"
            ),
            run_config={"ops": {"expire_export_keys": {"config": {"key_name": d.key}}}},
            tags={"kms/export_key": d.key},
        )
        for d in due
    ]


# ---------------------------------------------------------------- the sweep fanned out over celery workers
# The rewrap sweep as one run fanned out over celery workers: ``dek_rewrap_fanout_job``.
#
# ``dek_rewrap_sweep_job`` launches one run per shard (fan-out by the run launcher). This
# job is the other shape: one run whose ``policy.envelope.fanout_steps`` steps each sweep
# every shard, starting at a different one, with leases (core/envelope/leases.py) deciding who
# rewraps which range. So many shards run in one worker process (one step start-up per
# worker slot, not per shard), a fast step takes ranges a slow one has not reached, and a
# step lost with its worker is redelivered (celery late acks) and takes its ranges over
# when their leases expire. The last step checks that nothing is left (R3, T2).


def _sweep_step(index: int, steps: int) -> dg.OpDefinition:
    @dg.op(
        name=f"sweep_slot_{index}",
        out=dg.Out(dg.Nothing),
        retry_policy=run_retry_policy(),
        description=f"Leased sweep of every shard, starting at shard {index * _ENVELOPE.shards // steps}.",
    )
    def sweep_slot(context: dg.OpExecutionContext, kms: KmsResource) -> None:
        ctx = kms.context()
        shards = ctx.policy.envelope.shards
        first = index * shards // steps
        total = envelope.SweepResult()
        with one_line_failures():
            for shard in [(first + i) % shards for i in range(shards)]:
                part = leases.leased_sweep(ctx, shard=shard, shards=shards)
                total.moved += part.moved
                total.skipped += part.skipped
                total.failed += part.failed
                total.batches += part.batches
        worker = f"{socket.gethostname()}:{os.getpid()}"
        context.log.info(f"slot {index} on {worker}: moved {total.moved} DEK(s), skipped {total.skipped}")
        context.add_output_metadata(
            {
                "worker": worker,
                "moved": total.moved,
                "skipped": total.skipped,
                "failed": total.failed,
                "batches": total.batches,
            }
        )

    return sweep_slot


@dg.op(ins={"after": dg.In(dg.Nothing)}, description="Fail if any live DEK is left on a retired or revoked version.")
def check_nothing_stranded(context: dg.OpExecutionContext, kms: KmsResource) -> None:
    stranded = envelope.stranded(kms.context())
    left = sum(r.deks for r in stranded)
    context.add_output_metadata({"stranded_deks": left})
    if left:
        raise dg.Failure(
            description=f"{left} DEK(s) remain on retired or revoked versions after the fan-out sweep",
            allow_retries=False,
        )


@dg.job(
    executor_def=executors.for_job(executors.ALL),
    tags={"kms/sweep": "fanout"},
    description="DEK rewrap sweep as one run whose steps share every shard through leases (celery fan-out).",
)
def dek_rewrap_fanout_job():
    steps = _ENVELOPE.fanout_steps
    check_nothing_stranded(after=[_sweep_step(i, steps)() for i in range(steps)])
