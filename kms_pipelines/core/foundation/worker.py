"""Preflight for a process that runs KMS work on a host of its own (a celery worker, a
Kubernetes run pod): ``KMS_ROLE=worker``.

Such a process shares nothing on disk with the control host or the other workers, so any
setting that only works on one host is refused before anything is opened, and nothing
(master key, signing key, key files, object store directory) is ever generated on it. The
refusal is one line naming every missing piece, so an operator fixes them in one pass.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

from .keystore import KeyStoreError, _master_key_value
from .keystore.software import key_file_problems, load_master_key
from .transports import NotifyConfigError, notifier_from_env


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
        problems.append(
            "KMS_OBJECT_STORE is "
            + (
                f"{store.split('://')[0]}:// (one host's disk)"
                if "://" in store
                else "a local path"
                if store
                else "not set (default: a local directory)"
            )
            + ", workers need s3://bucket/prefix"
        )
    kind = env.get("KMS_KEYSTORE", "software").strip() or "software"
    if kind == "software":
        problems += _software_keystore_problems(env, home)
    elif kind == "pkcs11":
        missing = [v for v in ("KMS_PKCS11_LIB", "KMS_PKCS11_TOKEN", "KMS_PKCS11_PIN") if not env.get(v)]
        if missing:
            problems.append(f"KMS_KEYSTORE=pkcs11 needs {', '.join(missing)}")
    problems += _notification_problems(env)
    return problems


def _software_keystore_problems(env: Mapping[str, str], home: Path | None) -> list[str]:
    """The sealed key files live on each host's disk: every worker needs the same files (a mounted
    secret) and the shared master key must open each one, or a step fails mid-shard with KeyNotFound."""
    problems, master = [], None
    if not (env.get("KMS_MASTER_KEY") or env.get("KMS_MASTER_KEY_FILE")):
        problems.append(
            "software keystore without a shared master key (set KMS_MASTER_KEY or "
            "KMS_MASTER_KEY_FILE from a secret, or use KMS_KEYSTORE=pkcs11)"
        )
    else:
        try:
            value = _master_key_value(env)
            if not value:  # an empty value would make load_master_key generate a host-local key
                raise KeyStoreError(f"KMS_MASTER_KEY_FILE {env.get('KMS_MASTER_KEY_FILE')} is empty")
            master = load_master_key(Path("/nonexistent"), value)  # a given value never touches the home
        except KeyStoreError as exc:
            problems.append(str(exc))
    keys = (home or Path(env.get("KMS_HOME") or Path.cwd() / ".kms")) / "artifacts" / "kms" / "keys"
    mount = (
        "mount them from a secret on every worker, or use KMS_KEYSTORE=pkcs11 with a network HSM, "
        "as a worker never generates keys"
    )
    if not keys.is_dir() or not os.access(keys, os.R_OK | os.X_OK) or not any(keys.glob("*.key")):
        unreadable = keys.is_dir() and not os.access(keys, os.R_OK | os.X_OK)
        problems.append(
            f"software keystore has no {'readable ' if unreadable else ''}sealed key files at {keys} ({mount})"
        )
    elif master is not None:
        bad = key_file_problems(keys, master)
        if bad:
            more = f" and {len(bad) - 3} more" if len(bad) > 3 else ""
            problems.append(
                f"{len(bad)} sealed key file(s) at {keys} do not open: {', '.join(bad[:3])}{more} "
                f"(mount the files and the master key from the same control host)"
            )
    return problems


def _notification_problems(env: Mapping[str, str]) -> list[str]:
    """With neither SMTP nor Slack, notifications go only to ``$KMS_HOME/outbox.jsonl``: on a worker
    that file is on a host nobody reads, so compliance notices would be written and never seen."""
    if not (env.get("KMS_SMTP_HOST", "").strip() or env.get("KMS_SLACK_WEBHOOK_URL", "").strip()):
        return [
            "neither KMS_SMTP_HOST nor KMS_SLACK_WEBHOOK_URL is set (notifications would go only to "
            "this host's outbox.jsonl, which nobody reads)"
        ]
    try:
        notifier_from_env(Path("/nonexistent"), env)  # validates the settings; opens and creates nothing
    except NotifyConfigError as exc:
        return [str(exc)]
    return []


def require_worker_env(env: Mapping[str, str] | None = None, home: Path | None = None) -> None:
    """Raise WorkerConfigError (one line) if this worker's configuration only works on one host."""
    problems = worker_problems(env, home)
    if problems:
        raise WorkerConfigError("this worker cannot run on a host of its own: " + "; ".join(problems))
