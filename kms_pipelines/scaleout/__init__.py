"""Scale-out plumbing (issue 15): the celery settings and app the workers run, the executor
chosen by ``KMS_EXECUTOR``. Knows Dagster and Celery; holds no KMS logic."""
