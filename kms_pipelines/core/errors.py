"""The domain errors that the CLI and Dagster layer report as one clean line."""

from __future__ import annotations


def known_errors() -> tuple[type[BaseException], ...]:
    from .db import DatabaseError
    from .keystore import KeyStoreError
    from .lifecycle import LifecycleError
    from .policy import PolicyError

    errors: list[type[BaseException]] = [DatabaseError, KeyStoreError, LifecycleError, PolicyError]
    for module, name in (("objectstore", "ObjectStoreError"), ("access", "AccessDenied"),
                         ("envelope", "EnvelopeError"), ("rpt", "RptError"), ("backup", "BackupError"),
                         ("escrow", "EscrowError"), ("events", "EventError")):
        try:
            mod = __import__(f"kms_pipelines.core.{module}", fromlist=[name])
            errors.append(getattr(mod, name))
        except (ImportError, AttributeError):
            continue
    return tuple(errors)
