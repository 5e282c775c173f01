"""The composition root of core: one object carrying every injectable boundary
(database, keystore, object store, notifier, clock, policy). Dagster resources, the CLI
and tests each build one; core functions take it instead of reaching for globals."""

from __future__ import annotations

import os
from collections.abc import Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session

from .clock import Clock, SystemClock
from .policy import Policy, load_policy


def kms_home(env: Mapping[str, str] | None = None) -> Path:
    env = os.environ if env is None else env
    return Path(env.get("KMS_HOME") or Path.cwd() / ".kms").resolve()


@dataclass
class KmsContext:
    engine: Engine
    keystore: Any  # keystore.KeyStore
    policy: Policy
    clock: Clock = field(default_factory=SystemClock)
    objects: Any = None  # objectstore.ObjectStore
    notifier: Any = None  # notify.Notifier
    home: Path = field(default_factory=kms_home)
    actor: str = "system"
    role: str = "control"  # "worker" (KMS_ROLE): never generates keys, see core/foundation/worker.py
    read_only: bool = False  # `kms --at`: the database refuses writes; audit goes to the wall clock
    detection: Any = None  # audit.DetectionPreview: anomaly detection run in memory (`kms report --at`)

    def __post_init__(self) -> None:
        # An audited keystore (core/access/audited_keystore.py) is re-bound to every context copy
        # (as_actor, a per-run clock) so its audit events carry this context's actor and time.
        bind = getattr(self.keystore, "bind_context", None)
        if bind is not None:
            self.keystore = bind(self)

    @contextmanager
    def transaction(self) -> Iterator[Session]:
        """A session whose work commits together or not at all."""
        with Session(self.engine, expire_on_commit=False) as session, session.begin():
            yield session

    def now(self):
        return self.clock.now()

    def as_actor(self, actor: str) -> KmsContext:
        from dataclasses import replace

        return replace(self, actor=actor)


def context_from_env(
    env: Mapping[str, str] | None = None, *, clock: Clock | None = None, read_only: bool = False
) -> KmsContext:
    """Build every boundary from ``KMS_*`` environment variables (README, "Configuration").
    ``read_only``: the database refuses every write (for ``kms --at``)."""
    from . import db
    from .keystore import keystore_from_env
    from .worker import is_worker, require_worker_env

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
    from .objectstore import objectstore_from_url
    from .transports import notifier_from_env

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
    from ..access.audited_keystore import AuditedKeyStore

    env = os.environ if env is None else env
    credentials = None
    if env.get("KMS_WORKLOAD_PRINCIPAL"):
        from ..access.principals import WorkloadIdentity

        credentials = WorkloadIdentity(env["KMS_WORKLOAD_PRINCIPAL"])
    return AuditedKeyStore(keystore, credentials=credentials)
