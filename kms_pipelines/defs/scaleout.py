"""The rewrap sweep as one run fanned out over celery workers: ``dek_rewrap_fanout_job``.

``dek_rewrap_sweep_job`` launches one run per shard (fan-out by the run launcher). This
job is the other shape: one run whose ``policy.envelope.fanout_steps`` steps each sweep
every shard, starting at a different one, with leases (core/envelope/leases.py) deciding who
rewraps which range. So many shards run in one worker process (one step start-up per
worker slot, not per shard), a fast step takes ranges a slow one has not reached, and a
step lost with its worker is redelivered (celery late acks) and takes its ranges over
when their leases expire. The last step checks that nothing is left (R3, T2).
"""

import os
import socket

import dagster as dg

from ..core.envelope import data_keys as envelope
from ..core.envelope import leases
from ..core.foundation.policy import load_policy
from ..scaleout import executors
from .failures import one_line_failures, run_retry_policy
from .resources import KmsResource

_ENVELOPE = load_policy().envelope


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
