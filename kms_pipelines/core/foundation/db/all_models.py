"""Import every model module so ``Base.metadata`` is complete (Alembic, tests)."""

from . import models_rotation, models_rpt, models_vault  # noqa: F401
from .models import Base  # noqa: F401
