"""The domain errors that the CLI and Dagster layer report as one clean line."""

from __future__ import annotations

from sqlalchemy.exc import OperationalError

from ..foundation.db import DatabaseError
from ..foundation.keystore import KeyStoreError
from ..foundation.policy import PolicyError
from ..foundation.retry import DependencyUnavailable, classify
from ..foundation.state import StateMissing
from ..keys.lifecycle import LifecycleError


def known_errors() -> tuple[type[BaseException], ...]:
    errors: list[type[BaseException]] = [
        DatabaseError,
        KeyStoreError,
        LifecycleError,
        PolicyError,
        DependencyUnavailable,
        StateMissing,
    ]
    for module, name in (
        ("kms_pipelines.core.foundation.objectstore", "ObjectStoreError"),
        ("kms_pipelines.core.access.principals", "AccessDenied"),
        ("kms_pipelines.core.envelope.data_keys", "EnvelopeError"),
        ("kms_pipelines.core.ledger.rpt", "RptError"),
        ("kms_pipelines.core.backup.backups", "BackupError"),
        ("kms_pipelines.core.response.escrow", "EscrowError"),
        ("kms_pipelines.core.response.events", "EventError"),
        ("kms_pipelines.core.keys.vault", "VaultError"),
        ("kms_pipelines.core.foundation.worker", "WorkerConfigError"),
        ("kms_pipelines.core.foundation.limits", "InputError"),
        ("kms_pipelines.core.ledger.ledger", "ChainOrderError"),
        ("kms_pipelines.core.ledger.audit", "AuditError"),
        ("kms_pipelines.core.runtime.simulate", "LiveStateError"),
    ):
        try:
            mod = __import__(module, fromlist=[name])
            errors.append(getattr(mod, name))
        except (ImportError, AttributeError):
            continue
    return tuple(errors)


def fault_line(exc: BaseException, command: str | None = None) -> str | None:
    """One line for a transient dependency fault that escaped every retried unit (a call
    path with no retry of its own), else None. Every command is safe to re-run after a
    fault: state changes commit whole or not at all (docs/architecture.md)."""
    fault = classify(exc)
    if fault is None:
        return None
    rerun = f": {command}" if command else ""
    return f"{fault.phrase()}; nothing was left half-done, re-run is safe{rerun}"


def connect_failure_line(exc: BaseException) -> str | None:
    """One line for a database connection that was refused for good (no such database or
    role, authentication): SQLAlchemy raises those with no statement, and the server's
    message carries no data."""
    if isinstance(exc, OperationalError) and exc.statement is None and exc.orig is not None:
        text = str(exc.orig).strip().splitlines()[0] if str(exc.orig).strip() else type(exc.orig).__name__
        return f"cannot connect to the KMS database: {text}"
    return None
