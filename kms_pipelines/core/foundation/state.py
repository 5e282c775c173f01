"""Is there KMS state here? Commands that read or change existing state ask first, so a
command run before ``kms init`` (or from the wrong directory) names the fix in one line
instead of failing deep inside SQLAlchemy, and never creates a database or a master key
as a side effect of a read."""

from __future__ import annotations

import contextlib
import os
import sqlite3
from collections.abc import Mapping
from pathlib import Path

from sqlalchemy.engine import make_url
from sqlalchemy.exc import OperationalError

from . import db
from .context import kms_home
from .db.engine import redacted


class StateMissing(RuntimeError):
    """No initialised KMS state where the environment points; the message names the fix."""


FIX = "run `kms init` to create it, or set KMS_HOME to your state directory"


def require_initialized(env: Mapping[str, str] | None = None) -> None:
    """Raise StateMissing unless the KMS database has been migrated and, for the software
    keystore, its master key exists. Creates nothing."""
    env = os.environ if env is None else env
    home = kms_home(env)
    url = db.database_url_from_env(home, env)
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite" and parsed.database not in (None, "", ":memory:"):
        # Connecting through the engine would create the file (and switch it to WAL), so
        # look before connecting, and then only read-only.
        path = Path(parsed.database)
        if not path.is_file():
            raise StateMissing(f"no KMS state in {home} (no database {path}): {FIX}")
        try:
            with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True)) as conn:
                initialised = conn.execute("SELECT 1 FROM sqlite_master WHERE name = 'alembic_version'").fetchone()
                if initialised:
                    initialised = conn.execute("SELECT version_num FROM alembic_version").fetchone()
        except sqlite3.DatabaseError as exc:
            raise StateMissing(f"{path} is not a KMS database ({exc}): {FIX}") from None
    else:
        engine = db.make_engine(url)
        try:
            initialised = db.current_revision(engine)
        except OperationalError:
            # Unreachable or refusing: not a question of missing state. The command itself meets
            # the same fault and reports it the way every command does (retries, one line).
            return
        finally:
            engine.dispose()
    if not initialised:
        raise StateMissing(f"the KMS database {redacted(url)} is not initialised: {FIX}")
    if (
        env.get("KMS_KEYSTORE", "software") == "software"
        and not env.get("KMS_MASTER_KEY")
        and not (home / "master.key").is_file()
    ):
        raise StateMissing(f"no master key in {home} (master.key) and KMS_MASTER_KEY is unset: {FIX}")
