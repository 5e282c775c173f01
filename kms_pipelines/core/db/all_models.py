"""Import every model module so ``Base.metadata`` is complete (Alembic, tests)."""

from . import models, models_access, models_backup, models_console, models_envelope, models_events, models_rotation, models_rpt, models_vault  # noqa: F401
from .models import Base  # noqa: F401
