"""The Celery settings every KMS worker and every celery executor use (README, "Scale-out").

Measured on a worker killed with ``kill -9`` mid-shard: with Celery's defaults the task
is acknowledged on receipt and dies with the worker, and the run hangs until stopped by
hand. With late acks and requeue on worker loss the message is only acknowledged once the
step finished, so the broker redelivers it to another worker once the visibility timeout
passes; the sweep's leases (core/envelope/leases.py) make that redelivery safe even while the first
worker might still be alive.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

QUEUE = "dagster"  # dagster-celery's queue name; workers and executors must agree
DEFAULT_VISIBILITY_TIMEOUT = 60  # seconds; shorter than a shard, so a lost shard is redelivered soon


def _int(env: Mapping[str, str], name: str, default: int) -> int:
    raw = env.get(name, "").strip()
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ValueError(f"{name} must be a whole number of seconds, got {raw!r}") from None
    if value <= 0:
        raise ValueError(f"{name} must be positive, got {value}")
    return value


def broker_url(env: Mapping[str, str] | None = None) -> str:
    env = os.environ if env is None else env
    url = env.get("KMS_CELERY_BROKER", "").strip()
    if not url:
        raise ValueError("KMS_CELERY_BROKER is not set (e.g. redis://redis:6379/0)")
    return url


def backend_url(env: Mapping[str, str] | None = None) -> str:
    env = os.environ if env is None else env
    return env.get("KMS_CELERY_BACKEND", "").strip() or broker_url(env)


def settings(env: Mapping[str, str] | None = None) -> dict:
    """Celery "config_source": identical for the workers and the executor that submits to them."""
    env = os.environ if env is None else env
    visibility = _int(env, "KMS_CELERY_VISIBILITY_TIMEOUT", DEFAULT_VISIBILITY_TIMEOUT)
    return {
        "task_acks_late": True,  # acknowledge after the step, not on receipt
        "task_reject_on_worker_lost": True,  # a killed worker process requeues its task
        "worker_prefetch_multiplier": 1,  # a worker reserves one step at a time: no shard stuck behind another
        "broker_transport_options": {"visibility_timeout": visibility},
        "result_backend_transport_options": {"visibility_timeout": visibility},
        "broker_connection_retry_on_startup": True,
        "task_default_queue": QUEUE,
        "worker_hijack_root_logger": False,
    }
