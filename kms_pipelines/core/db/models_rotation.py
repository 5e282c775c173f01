"""SQLAlchemy models for rotation (see core/rotation*.py)."""

from .models import Base  # noqa: F401
