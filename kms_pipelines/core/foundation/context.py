"""The composition root of core: one object carrying every injectable boundary
(database, keystore, object store, notifier, clock, policy). Dagster resources, the CLI
and tests each build one; core functions take it instead of reaching for globals."""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from datetime import datetime
from pathlib import Path
from typing import Any

from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session

from .clock import Clock, SystemClock
from .policy import Policy


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

    def now(self) -> datetime:
        return self.clock.now()

    def as_actor(self, actor: str) -> KmsContext:
        return replace(self, actor=actor)
