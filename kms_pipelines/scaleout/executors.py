"""The executor jobs run with, chosen by ``KMS_EXECUTOR`` (in_process | multiprocess | celery).

Each job declares which executors it supports (``for_job``); a job asked to run on one it
does not support runs on the first one it lists instead.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
from collections.abc import Mapping

import dagster as dg

from .celery_settings import settings

log = logging.getLogger(__name__)

EXECUTORS = ("in_process", "multiprocess", "celery")
ALL = EXECUTORS


def configured(env: Mapping[str, str] | None = None) -> str:
    env = os.environ if env is None else env
    name = env.get("KMS_EXECUTOR", "").strip().lower() or "multiprocess"
    if name not in EXECUTORS:
        raise ValueError(f"KMS_EXECUTOR must be one of {', '.join(EXECUTORS)}, got {name!r}")
    if name == "multiprocess" and multiprocessing.current_process().daemon:
        # Inside a Celery prefork child (CeleryRunLauncher) a process may not start children
        # ("daemonic processes are not allowed to have children"): run the steps here.
        return "in_process"
    return name


def executor_def(name: str) -> dg.ExecutorDefinition:
    if name == "in_process":
        return dg.in_process_executor
    if name == "multiprocess":
        return dg.multiprocess_executor
    try:
        from dagster_celery import celery_executor
    except ImportError:
        raise ValueError("KMS_EXECUTOR=celery needs the celery extra: pip install 'kms_pipelines[celery]'") from None
    return celery_executor.configured(
        {
            "broker": {"env": "KMS_CELERY_BROKER"},
            # Env sources: the URLs (which may hold a password) stay out of the run config the UI shows.
            "backend": {"env": "KMS_CELERY_BACKEND" if os.environ.get("KMS_CELERY_BACKEND") else "KMS_CELERY_BROKER"},
            "config_source": settings(),
            "retries": {"enabled": {}},
        },
        name="celery",
    )


def for_job(supports: tuple[str, ...] = ALL, env: Mapping[str, str] | None = None) -> dg.ExecutorDefinition:
    """The executor for a job that supports ``supports`` (in order of preference for fallback)."""
    name = configured(env)
    if name not in supports:
        log.debug("KMS_EXECUTOR=%s is not supported by this job; using %s", name, supports[0])
        name = supports[0]
    return executor_def(name)
