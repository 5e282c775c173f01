"""SQLAlchemy models for rpt (see core/rpt*.py)."""

from .models import Base  # noqa: F401
