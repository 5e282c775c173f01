"""The refusal of the access area (clauses A1-A3): ``AccessDenied``.

It sits at the bottom of core/access so the audited keystore wrapper can name it (to audit a
denial) without importing ``principals``, which builds the wrapper.
"""

from __future__ import annotations


class AccessDenied(ValueError):
    """A refused operation; the message names what is missing. Nothing was changed."""

    def __init__(self, message: str, *, reason: str = "permission", principal: str | None = None):
        super().__init__(message)
        self.reason = reason
        self.principal = principal
