"""`kms` commands for core/runtime: `kms simulate` (a year of policy in a minute, on scratch state)
and `kms worker check|start`, a celery worker on a host of its own (README, "Scale-out")."""

from __future__ import annotations

import os

import click


def register(cli) -> None:
    """Attach this area's commands to the top-level `kms` group."""
    from ..cli import emit_json

    # ------------------------------------------------------------------ simulate
    @cli.command("simulate")
    @click.option("--days", type=click.IntRange(0, 3660), required=True, help="Simulated nights to run.")
    @click.option("--from", "start", default=None, metavar="DATE", help="Day 0 (ISO date; default today, UTC).")
    @click.option(
        "--home",
        default=None,
        type=click.Path(file_okay=False),
        help="Keep the scratch state here (default: a temporary directory, removed afterwards).",
    )
    @click.option("--steps", default=None, help="Comma-separated nightly steps to run (default: all).")
    @click.option("--no-actors", is_flag=True, help="No simulated dependents, partners or approvers.")
    @click.option("--json", "as_json", is_flag=True)
    def simulate_cmd(days, start, home, steps, no_actors, as_json):
        """Advance a simulated clock DAYS nights over scratch state, running the nightly
        policy each day, and print the timeline (rotations, notices, destructions)."""
        from ..core.foundation.clock import parse_time
        from ..core.runtime import simulate

        try:
            start_day = parse_time(start).date() if start else None
        except ValueError as exc:
            raise click.BadParameter(str(exc), param_hint="--from") from None
        wanted = [s.strip() for s in steps.split(",") if s.strip()] if steps else None
        if wanted:
            from ..core.runtime import nightly

            known = {s.name for s in nightly.steps()}
            unknown = [s for s in wanted if s not in known]
            if unknown:
                raise click.BadParameter(f"unknown step(s) {unknown}; known: {sorted(known)}", param_hint="--steps")
        import time
        from collections import Counter

        started = last = time.monotonic()

        def progress(day, _ctx, _night):
            # A year takes minutes: say where it is at least every 10 s (stderr, so --json stays clean).
            nonlocal last
            now = time.monotonic()
            if now - last >= 10 or day == days:
                click.echo(f"simulate: day {day} of {days} ({now - started:.0f} s)", err=True)
                last = now

        result = simulate.simulate(days, start_day, home=home, steps=wanted, actors=not no_actors, on_day=progress)
        if as_json:
            emit_json(result.to_dict())
        else:
            click.echo(simulate.format_timeline(result))
            if home:
                click.echo(f"state kept in {result.home}")
        kinds = Counter(e.kind for e in result.events)
        click.echo(
            f"simulated {days} day(s) in {time.monotonic() - started:.0f} s: "
            + ", ".join(f"{n} {k}" for k, n in sorted(kinds.items()))
            if kinds
            else f"simulated {days} day(s) in {time.monotonic() - started:.0f} s: nothing happened",
            err=True,
        )

    # ------------------------------------------------------------------ worker
    @cli.group()
    def worker():
        """Scale-out workers (KMS_ROLE=worker): preflight and the celery worker."""

    @worker.command("check")
    def check_cmd():
        """Exit 1 with one line if this host's configuration only works on one host."""
        from ..core.foundation.worker import require_worker_env

        require_worker_env()
        click.echo("worker configuration shares nothing on disk: ok")

    @worker.command("start")
    @click.option(
        "--concurrency",
        type=int,
        default=1,
        show_default=True,
        help="Worker processes; each runs many steps (shards) without restarting.",
    )
    @click.option("--name", default=None, help="Celery node name (default: kms@<host>).")
    @click.option("--pool", type=click.Choice(["prefork", "solo", "threads"]), default="prefork", show_default=True)
    def start_cmd(concurrency, name, pool):
        """Check the configuration, then run a celery worker on the dagster queue."""
        from ..core.foundation.worker import require_worker_env
        from ..scaleout.celery_settings import QUEUE, broker_url

        os.environ["KMS_ROLE"] = "worker"  # steps run here build their context as a worker
        require_worker_env()
        broker_url()  # one line if the broker is not configured
        from ..scaleout.celery_app import app

        app.worker_main(
            [
                "worker",
                "--loglevel=INFO",
                "-Q",
                QUEUE,
                f"--concurrency={concurrency}",
                f"--pool={pool}",
                "-n",
                name or "kms@%h",
                "--prefetch-multiplier=1",
                "--without-gossip",
                "--without-mingle",
            ]
        )
