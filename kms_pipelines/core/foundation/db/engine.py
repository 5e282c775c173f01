"""Engine factory for the KMS state database (SQLite embedded default, PostgreSQL in production)."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlalchemy import create_engine, event, text
from sqlalchemy.engine import Connection, Engine, make_url
from sqlalchemy.exc import ArgumentError, OperationalError

from .. import retry

if TYPE_CHECKING:
    from ..retry import Budget


class DatabaseError(RuntimeError):
    """The KMS database is unreachable or misconfigured; the message says which."""


def normalize_url(url: str) -> str:
    """Accept ``postgres://`` / ``postgresql://`` and pin the psycopg 3 driver."""
    if url.startswith("postgres://"):
        url = "postgresql://" + url[len("postgres://") :]
    if url.startswith("postgresql://"):
        url = "postgresql+psycopg://" + url[len("postgresql://") :]
    return url


def default_url(home: Path) -> str:
    return f"sqlite:///{home / 'kms.db'}"


def database_url_from_env(home: Path, env: Mapping[str, str] | None = None) -> str:
    env = os.environ if env is None else env
    return normalize_url(env.get("KMS_DATABASE_URL") or default_url(home))


def redacted(url: str) -> str:
    try:
        return make_url(url).render_as_string(hide_password=True)
    except ArgumentError:
        return "<unparseable database URL>"


def make_engine(url: str, *, pool_size: int = 5, retry_budget: Budget | None = None, read_only: bool = False) -> Engine:
    """``retry_budget`` (a core.foundation.retry.Budget, from ``policy.faults.database``) bounds how long a
    new PostgreSQL connection is waited for during a restart or failover. ``read_only``: every
    connection refuses writes (``kms --at``): SQLite's query_only pragma with deferred
    transactions, PostgreSQL's read-only default transaction mode."""
    url = normalize_url(url)
    try:
        parsed = make_url(url)
    except ArgumentError:
        raise DatabaseError(f"KMS_DATABASE_URL is not a database URL: {url!r}") from None
    if parsed.get_backend_name() == "sqlite":
        if parsed.database and parsed.database != ":memory:":
            Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(url, connect_args={"timeout": 30})

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_conn: Any, _record: object) -> None:
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA foreign_keys=ON")
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA busy_timeout=30000")
            if read_only:
                cur.execute("PRAGMA query_only=ON")
            cur.close()
            # pysqlite's own transaction handling defers BEGIN; take it over so that
            # "BEGIN IMMEDIATE" serialises writers the way row locks do on PostgreSQL.
            dbapi_conn.isolation_level = None

        @event.listens_for(engine, "begin")
        def _sqlite_begin(conn: Connection) -> None:
            conn.exec_driver_sql("BEGIN" if read_only else "BEGIN IMMEDIATE")

        return engine
    if parsed.get_backend_name() != "postgresql":
        raise DatabaseError(f"unsupported database {parsed.get_backend_name()!r}: use sqlite or postgresql")
    # pool_pre_ping: a pooled connection killed by a restart is noticed at checkout and
    # replaced, so the next batch/transaction runs on a fresh one.
    connect_args: dict[str, Any] = {"connect_timeout": 10}
    if read_only:
        connect_args["options"] = "-c default_transaction_read_only=on"
    engine = create_engine(url, pool_size=pool_size, pool_pre_ping=True, connect_args=connect_args)
    _heal_connects(engine, retry_budget)
    return engine


def _heal_connects(engine: Engine, budget: Budget | None) -> None:
    """Once an engine has connected, new connections wait out a restarting server (refused,
    "the database system is starting up") within the budget, so a transaction that begins
    mid-failover starts late instead of failing; transactions cut mid-flight are retried by
    their callers. The very first connection is not retried: at start-up an unreachable
    database is far more often a wrong URL than a failover, and says so at once."""
    if budget is not None:
        retry.set_engine_budget(engine, budget)
    state = {"connected": False}

    @event.listens_for(engine, "do_connect")
    def _connect(dialect: Any, _record: object, cargs: list[Any], cparams: dict[str, Any]) -> Any:
        def connect() -> Any:
            return dialect.loaded_dbapi.connect(*cargs, **cparams)

        if not state["connected"]:
            conn = connect()
            state["connected"] = True
            return conn
        return retry.call(connect, budget=retry.engine_budget(engine), what="a reconnect to the KMS database")


def check_reachable(engine: Engine) -> None:
    try:
        with engine.connect() as conn:
            conn.execute(text("SELECT 1"))
    except OperationalError as exc:
        reason = str(exc.orig).strip().splitlines()[0] if exc.orig else str(exc).splitlines()[0]
        raise DatabaseError(f"KMS database {redacted(str(engine.url))} is unreachable: {reason}") from None
