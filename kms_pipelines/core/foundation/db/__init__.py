"""KMS state database: engine factory, models, Alembic migrations."""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy.engine import Engine

from . import lengths  # noqa: F401,E402 - the VARCHAR length rule, for every session
from .engine import DatabaseError, check_reachable, database_url_from_env, default_url, make_engine, normalize_url

__all__ = [
    "DatabaseError",
    "alembic_config",
    "check_reachable",
    "current_revision",
    "database_url_from_env",
    "default_url",
    "head_revision",
    "make_engine",
    "normalize_url",
    "upgrade",
]

MIGRATIONS = Path(__file__).parent / "migrations"


def alembic_config(engine: Engine) -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    cfg.set_main_option("sqlalchemy.url", engine.url.render_as_string(hide_password=False).replace("%", "%%"))
    return cfg


def upgrade(engine: Engine, revision: str = "head") -> None:
    """Run the Alembic migrations up to ``revision`` (idempotent)."""
    check_reachable(engine)
    cfg = alembic_config(engine)
    with engine.begin() as conn:
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, revision)


def current_revision(engine: Engine) -> str | None:
    with engine.connect() as conn:
        return MigrationContext.configure(conn).get_current_revision()


def head_revision(engine: Engine) -> str:
    head = ScriptDirectory.from_config(alembic_config(engine)).get_current_head()
    if head is None:
        raise DatabaseError(f"no Alembic migrations found in {MIGRATIONS}")
    return head
