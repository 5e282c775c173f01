"""SQLAlchemy models for backup (see core/backup*.py)."""

from .models import Base  # noqa: F401
