"""Preflight for a process that runs KMS work on a host of its own (a celery worker, a
Kubernetes run pod): ``KMS_ROLE=worker``.

Such a process shares nothing on disk with the control host or the other workers, so any
setting that only works on one host is refused before anything is opened, and nothing
(master key, signing key, key files, object store directory) is ever generated on it. The
refusal is one line naming every missing piece, so an operator fixes them in one pass.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Mapping


class WorkerConfigError(ValueError):
    """This worker's configuration only works on one host; the message names what is missing."""


def is_worker(env: Mapping[str, str] | None = None) -> bool:
    env = os.environ if env is None else env
    return env.get("KMS_ROLE", "").strip().lower() == "worker"


def worker_problems(env: Mapping[str, str] | None = None, home: Path | None = None) -> list[str]:
    """What keeps this environment from running on a host of its own (empty: nothing)."""
    env = os.environ if env is None else env
    problems = []
    url = env.get("KMS_DATABASE_URL", "").strip()
    if not url:
        problems.append("KMS_DATABASE_URL is not set (workers need the shared PostgreSQL database)")
    elif not url.startswith(("postgresql", "postgres")):
        scheme = url.split(":", 1)[0]
        problems.append(f"KMS_DATABASE_URL is {scheme} (a file on one host), workers need PostgreSQL")
    store = env.get("KMS_OBJECT_STORE", "").strip()
    if not store.startswith("s3://"):
        problems.append("KMS_OBJECT_STORE is " + (f"{store.split('://')[0]}:// (one host's disk)" if "://" in store
                                                  else "a local path" if store else "not set (default: a local "
                                                  "directory)") + ", workers need s3://bucket/prefix")
    kind = env.get("KMS_KEYSTORE", "software").strip() or "software"
    if kind == "software":
        if not (env.get("KMS_MASTER_KEY") or env.get("KMS_MASTER_KEY_FILE")):
            problems.append("software keystore without a shared master key (set KMS_MASTER_KEY or "
                            "KMS_MASTER_KEY_FILE from a secret, or use KMS_KEYSTORE=pkcs11)")
        keys = (home or Path(env.get("KMS_HOME") or Path.cwd() / ".kms")) / "artifacts" / "kms" / "keys"
        if not keys.is_dir() or not any(keys.glob("*.key")):
            problems.append(f"software keystore has no sealed key files at {keys} (mount them from a secret, "
                            f"or use KMS_KEYSTORE=pkcs11 with a network HSM), as a worker never generates keys")
    elif kind == "pkcs11":
        missing = [v for v in ("KMS_PKCS11_LIB", "KMS_PKCS11_TOKEN", "KMS_PKCS11_PIN") if not env.get(v)]
        if missing:
            problems.append(f"KMS_KEYSTORE=pkcs11 needs {', '.join(missing)}")
    return problems


def require_worker_env(env: Mapping[str, str] | None = None, home: Path | None = None) -> None:
    """Raise WorkerConfigError (one line) if this worker's configuration only works on one host."""
    problems = worker_problems(env, home)
    if problems:
        raise WorkerConfigError("this worker cannot run on a host of its own: " + "; ".join(problems))
