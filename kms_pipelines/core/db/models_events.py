"""SQLAlchemy models for events (see core/events*.py)."""

from .models import Base  # noqa: F401
