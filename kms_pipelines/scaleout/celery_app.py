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
execute_job = create_execute_job_task(app)
resume_job = create_resume_job_task(app)
