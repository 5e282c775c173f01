"""Build a KmsContext from KMS_* environment variables: every boundary, the audited keystore (A3) and the workload identity (A2)."""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from ..access.audited_keystore import AuditedKeyStore
from ..access.tokens import WorkloadIdentity
from ..foundation import db
from ..foundation.clock import Clock, SystemClock
from ..foundation.context import KmsContext, kms_home
from ..foundation.keystore import keystore_from_env
from ..foundation.objectstore import objectstore_from_url
from ..foundation.policy import load_policy
from ..foundation.transports import notifier_from_env
from ..foundation.worker import is_worker, require_worker_env
from . import guards  # noqa: F401  (registers every destroy/revoke guard before a context exists)


def context_from_env(
    env: Mapping[str, str] | None = None, *, clock: Clock | None = None, read_only: bool = False
) -> KmsContext:
    """Build every boundary from ``KMS_*`` environment variables (README, "Configuration").
    ``read_only``: the database refuses every write (for ``kms --at``)."""
    env = os.environ if env is None else env
    home = kms_home(env)
    worker = is_worker(env)
    if worker:
        require_worker_env(env, home)  # before anything is opened or created on this host
    home.mkdir(parents=True, exist_ok=True)
    policy = load_policy(env.get("KMS_POLICY"))
    engine = db.make_engine(
        db.database_url_from_env(home, env), retry_budget=policy.faults.database.budget(), read_only=read_only
    )
    objects = objectstore_from_url(
        env.get("KMS_OBJECT_STORE") or str(home / "objects"),
        endpoint_url=env.get("KMS_S3_ENDPOINT_URL"),
        retry_budget=policy.faults.object_store.budget(),
    )
    notifier = notifier_from_env(home, env, retry=policy.faults.notifications)
    return KmsContext(
        engine=engine,
        keystore=audited_keystore(keystore_from_env(home, env), env),
        policy=policy,
        clock=clock or SystemClock(),
        objects=objects,
        notifier=notifier,
        home=home,
        role="worker" if worker else "control",
        read_only=read_only,
    )


def audited_keystore(keystore: Any, env: Mapping[str, str] | None = None) -> Any:
    """Wrap a backend so every operation is audited (A3); with ``KMS_WORKLOAD_PRINCIPAL``
    set, every operation also runs under that principal's short-lived token (A2)."""
    env = os.environ if env is None else env
    credentials = None
    if env.get("KMS_WORKLOAD_PRINCIPAL"):
        credentials = WorkloadIdentity(env["KMS_WORKLOAD_PRINCIPAL"])
    return AuditedKeyStore(keystore, credentials=credentials)
