"""`kms worker check|start`: a celery worker on a host of its own (README, "Scale-out")."""

from __future__ import annotations

import os

import click


def register(cli) -> None:
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
