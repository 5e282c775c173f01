"""The Celery app a KMS worker runs (``kms worker start``; ``celery -A`` target).

dagster-celery's own ``dagster_celery.app`` reads its settings from a module on the path;
this one is built from the environment (KMS_CELERY_*) with the settings in
celery_settings, and registers the same task names, so ``celery_executor`` and
``CeleryRunLauncher`` configured with the same broker reach it.
"""

from __future__ import annotations

from dagster_celery.make_app import make_app
from dagster_celery.tasks import create_execute_job_task, create_resume_job_task, create_task

from .celery_settings import backend_url, broker_url, settings

app = make_app(app_args={"broker": broker_url(), "backend": backend_url()})
app.conf.update(settings())

execute_plan = create_task(app)
# A whole run (CeleryRunLauncher) is not redeliverable like a step: requeued after its pool process
# was killed, the task finds the run already STARTED, Dagster skips it, the task "succeeds", and the
# daemon's health check then reports a healthy worker for a run nobody executes, so it hangs until
# max_runtime_seconds (measured: tests/test_celery_scaleout.py, run monitoring). Without requeue the
# lost task is recorded as FAILURE, run monitoring fails the run and run retries launch a new one.
execute_job = create_execute_job_task(app, reject_on_worker_lost=False)  # type: ignore[arg-type]  # dagster_celery annotates **task_kwargs as dict; celery takes a bool
resume_job = create_resume_job_task(app, reject_on_worker_lost=False)  # type: ignore[arg-type]  # same
