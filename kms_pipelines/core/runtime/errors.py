"""The domain errors that the CLI and Dagster layer report as one clean line."""

from __future__ import annotations

from sqlalchemy.exc import OperationalError

from ..access.principals import AccessDenied
from ..backup.backups import BackupError
from ..envelope.data_keys import EnvelopeError
from ..foundation.db import DatabaseError
from ..foundation.keystore import KeyStoreError
from ..foundation.limits import InputError
from ..foundation.objectstore import ObjectStoreError
from ..foundation.policy import PolicyError
from ..foundation.retry import DependencyUnavailable, classify
from ..foundation.state import StateMissing
from ..foundation.worker import WorkerConfigError
from ..keys.lifecycle import LifecycleError
from ..keys.vault import VaultError
from ..ledger.audit import AuditError
from ..ledger.ledger import ChainOrderError
from ..ledger.rpt import RptError
from ..response.escrow import EscrowError
from ..response.events import EventError
from .simulate import LiveStateError

# Plain imports, not imports by name that skip what is missing: a renamed or moved error
# class fails here at import, instead of quietly turning its one-line refusal into a traceback.
_KNOWN: tuple[type[BaseException], ...] = (
    DatabaseError,
    KeyStoreError,
    LifecycleError,
    PolicyError,
    DependencyUnavailable,
    StateMissing,
    ObjectStoreError,
    AccessDenied,
    EnvelopeError,
    RptError,
    BackupError,
    EscrowError,
    EventError,
    VaultError,
    WorkerConfigError,
    InputError,
    ChainOrderError,
    AuditError,
    LiveStateError,
)


def known_errors() -> tuple[type[BaseException], ...]:
    """The domain errors a command or an op reports as one line (no traceback, no retry)."""
    return _KNOWN


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
