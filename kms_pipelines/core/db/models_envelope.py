"""SQLAlchemy models for envelope (see core/envelope*.py)."""

from .models import Base  # noqa: F401
