"""Database triggers that make a table append-only (UPDATE and DELETE refused) on
SQLite and PostgreSQL. Migrations call these; tests drop and re-create them to play
a database admin who bypasses them."""

from __future__ import annotations

from sqlalchemy.engine import Connection

PG_FUNCTION = """
CREATE OR REPLACE FUNCTION kms_refuse_change() RETURNS trigger AS $$
BEGIN
  RAISE EXCEPTION 'table %% is append-only: %% refused', TG_TABLE_NAME, TG_OP;
END;
$$ LANGUAGE plpgsql
"""


def create_append_only_triggers(conn: Connection, table: str) -> None:
    if conn.dialect.name == "postgresql":
        conn.exec_driver_sql(PG_FUNCTION)
        conn.exec_driver_sql(
            f"CREATE TRIGGER {table}_append_only BEFORE UPDATE OR DELETE ON {table} "
            f"FOR EACH ROW EXECUTE FUNCTION kms_refuse_change()")
        conn.exec_driver_sql(
            f"CREATE TRIGGER {table}_no_truncate BEFORE TRUNCATE ON {table} "
            f"FOR EACH STATEMENT EXECUTE FUNCTION kms_refuse_change()")
    else:
        for op in ("UPDATE", "DELETE"):
            conn.exec_driver_sql(
                f"CREATE TRIGGER {table}_no_{op.lower()} BEFORE {op} ON {table} "
                f"BEGIN SELECT RAISE(ABORT, 'table {table} is append-only: {op} refused'); END")


def drop_append_only_triggers(conn: Connection, table: str) -> None:
    if conn.dialect.name == "postgresql":
        conn.exec_driver_sql(f"DROP TRIGGER IF EXISTS {table}_append_only ON {table}")
        conn.exec_driver_sql(f"DROP TRIGGER IF EXISTS {table}_no_truncate ON {table}")
    else:
        for op in ("update", "delete"):
            conn.exec_driver_sql(f"DROP TRIGGER IF EXISTS {table}_no_{op}")
