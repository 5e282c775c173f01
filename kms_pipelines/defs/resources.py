"""Dagster resources: one per I/O boundary, each swappable, composed into ``KmsResource``.

Defaults come from the ``KMS_*`` environment (README, "Configuration"), so the same
code location runs the embedded defaults on a laptop and PostgreSQL + HSM + S3 in
production. Tests build these resources with other values instead of monkeypatching.
"""

import os
import threading
from pathlib import Path

import dagster as dg
from pydantic import Field

from ..core.foundation.context import KmsContext, kms_home
from ..core.runtime import guards  # noqa: F401  (registers every destroy/revoke guard)

_CACHE: dict[tuple, KmsContext] = {}
_CACHE_LOCK = threading.Lock()


def _env(name: str) -> str | None:
    return os.environ.get(name) or None


class DatabaseResource(dg.ConfigurableResource):
    """The KMS state database (SQLite file by default, PostgreSQL in production)."""

    url: str | None = Field(
        default_factory=lambda: _env("KMS_DATABASE_URL"),
        description="SQLAlchemy URL; default sqlite:///$KMS_HOME/kms.db",
    )

    def resolved_url(self, home: Path) -> str:
        from ..core.foundation import db

        return db.normalize_url(self.url or db.default_url(home))


class KeyStoreResource(dg.ConfigurableResource):
    """Key material: software (files sealed under the master key) or pkcs11 (an HSM)."""

    kind: str = Field(default_factory=lambda: _env("KMS_KEYSTORE") or "software")
    pkcs11_lib: str | None = Field(default_factory=lambda: _env("KMS_PKCS11_LIB"))
    pkcs11_token: str | None = Field(default_factory=lambda: _env("KMS_PKCS11_TOKEN"))
    # The PIN and master key are read from the environment at use, never stored in run config.

    def env(self) -> dict:
        env = dict(os.environ)
        env["KMS_KEYSTORE"] = self.kind
        for var, value in (("KMS_PKCS11_LIB", self.pkcs11_lib), ("KMS_PKCS11_TOKEN", self.pkcs11_token)):
            if value:
                env[var] = value
        return env


class ObjectStoreResource(dg.ConfigurableResource):
    """Evidence and archives: a local directory (file:///path) or S3 with Object Lock (s3://bucket/prefix)."""

    url: str | None = Field(default_factory=lambda: _env("KMS_OBJECT_STORE"))
    endpoint_url: str | None = Field(default_factory=lambda: _env("KMS_S3_ENDPOINT_URL"))


class ClockResource(dg.ConfigurableResource):
    """The wall clock; a fixed time (Launchpad run config or KMS_FIXED_TIME) is refused."""

    # Dagster runs change state, and the clock is not an input for changes. Replays of past
    # days use `kms --at` (read-only) or `kms simulate` (scratch state).

    fixed_time: str | None = Field(default=None, description="Refused if set: runs use the wall clock.")

    def clock(self):
        from ..core.foundation.clock import SystemClock

        if self.fixed_time or os.environ.get("KMS_FIXED_TIME"):
            raise dg.Failure(
                "a fixed time (KMS_FIXED_TIME or clock.fixed_time) is refused: Dagster runs change "
                "state and run on the wall clock (use `kms --at` for read-only reports or "
                "`kms simulate` on scratch state)"
            )
        return SystemClock()


class KmsResource(dg.ConfigurableResource):
    """Everything the KMS code needs (database, keystore, objects, notifier, clock, policy), built once per process."""

    home: str = Field(default_factory=lambda: str(kms_home()))
    policy_path: str | None = Field(default_factory=lambda: _env("KMS_POLICY"))
    database: DatabaseResource
    keystore: KeyStoreResource
    objects: ObjectStoreResource
    clock: ClockResource
    workload_principal: str = Field(
        default_factory=lambda: _env("KMS_WORKLOAD_PRINCIPAL") or "workload:dagster",
        description="Workload identity (A2): every keystore operation runs under its token of <= 15 min, "
        "re-issued before expiry.",
    )

    def _cache_key(self) -> tuple:
        return (
            os.getpid(),
            self.home,
            self.policy_path,
            self.database.url,
            self.keystore.kind,
            self.workload_principal,
            self.keystore.pkcs11_lib,
            self.keystore.pkcs11_token,
            self.objects.url,
            self.objects.endpoint_url,
        )

    def context(self) -> KmsContext:
        from dataclasses import replace

        key = self._cache_key()
        with _CACHE_LOCK:
            base = _CACHE.get(key)
            if base is None:
                base = _CACHE[key] = self._build()
        # The clock is cheap and may differ per run (a test's fixed clock), so it is not cached.
        return replace(base, clock=self.clock.clock())

    def _build(self) -> KmsContext:
        from ..core.access.audited_keystore import AuditedKeyStore
        from ..core.access.tokens import WorkloadIdentity
        from ..core.foundation import db
        from ..core.foundation.keystore import keystore_from_env
        from ..core.foundation.objectstore import objectstore_from_url
        from ..core.foundation.policy import load_policy
        from ..core.foundation.transports import notifier_from_env
        from ..core.foundation.worker import is_worker, require_worker_env

        home = Path(self.home)
        worker = is_worker()
        if worker:  # a run or step on a host of its own: refuse before anything is created here
            require_worker_env(
                {
                    **self.keystore.env(),
                    "KMS_DATABASE_URL": self.database.url or "",
                    "KMS_OBJECT_STORE": self.objects.url or "",
                },
                home,
            )
        home.mkdir(parents=True, exist_ok=True)
        env = self.keystore.env()
        policy = load_policy(self.policy_path)
        return KmsContext(
            engine=db.make_engine(self.database.resolved_url(home), retry_budget=policy.faults.database.budget()),
            # Audited (A3), and every operation checks this run's workload token (A2).
            keystore=AuditedKeyStore(
                keystore_from_env(home, env), credentials=WorkloadIdentity(self.workload_principal)
            ),
            policy=policy,
            objects=objectstore_from_url(
                self.objects.url or str(home / "objects"),
                endpoint_url=self.objects.endpoint_url,
                retry_budget=policy.faults.object_store.budget(),
            ),
            notifier=notifier_from_env(home, env, retry=policy.faults.notifications),
            home=home,
            actor="dagster",
            role="worker" if worker else "control",
        )


def default_resources() -> dict:
    database, keystore, objects, clock = DatabaseResource(), KeyStoreResource(), ObjectStoreResource(), ClockResource()
    return {
        "database": database,
        "keystore": keystore,
        "objects": objects,
        "clock": clock,
        "kms": KmsResource(database=database, keystore=keystore, objects=objects, clock=clock),
    }


defs = dg.Definitions(resources=default_resources())
