"""SQLAlchemy models for access (see core/access*.py)."""

from .models import Base  # noqa: F401
