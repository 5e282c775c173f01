"""Input limits shared by every entry point (CLI verbs, Dagster Launchpad config, core API).

Checked before anything reaches the database, so SQLite (which stores any length) and
PostgreSQL (which raises on an over-long VARCHAR) refuse the same inputs with the same
one-line message. The limits are documented in docs/input-limits.md.
"""

from __future__ import annotations

import re
import unicodedata

# Principal names: a letter or digit, then letters, digits and . _ @ - (at most 64).
PRINCIPAL_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@-]{0,63}")
MAX_TICKET = 200  # change ticket (approval_requests.ticket, approvals.ticket: VARCHAR(200))
MAX_TARGET = 300  # approval target (key, key#vN, package id, principal request)
MAX_TEXT = 2000  # free text: notes, reasons, event detail


class InputError(ValueError):
    """An input outside its documented limits; nothing was changed."""


def principal_name(value: str | None, field: str = "principal") -> str:
    if not isinstance(value, str) or not PRINCIPAL_NAME.fullmatch(value):
        raise InputError(
            f"invalid {field} name {_show(value)}: names match {PRINCIPAL_NAME.pattern} "
            "(letters, digits, . _ @ -, at most 64 characters)"
        )
    return value


def text(value: str | None, field: str, max_length: int = MAX_TEXT, *, required: bool = True) -> str | None:
    """Free text of at most ``max_length`` characters with no control characters."""
    if value is None or (isinstance(value, str) and not value.strip()):
        if required:
            raise InputError(f"{field} is required")
        return None
    if not isinstance(value, str):
        raise InputError(f"{field} must be text")
    if len(value) > max_length:
        raise InputError(f"{field} is {len(value)} characters long; the limit is {max_length}")
    if any(unicodedata.category(ch) in ("Cc", "Cf") for ch in value):
        raise InputError(f"{field} contains control or format characters (e.g. ANSI escapes); refused")
    return value


def ticket(value: str | None) -> str:
    checked = text(value, "change ticket", MAX_TICKET)
    if checked is None:  # required=True refuses a missing value first; this names it all the same
        raise InputError("change ticket is required")
    return checked


def target(value: str | None) -> str:
    checked = text(value, "target", MAX_TARGET)
    if checked is None:  # required=True refuses a missing value first; this names it all the same
        raise InputError("target is required")
    return checked


def _show(value: object) -> str:
    """A refused value, quoted safely (escapes visible, long values cut)."""
    shown = repr(value)
    return shown if len(shown) <= 80 else shown[:77] + "..."
