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
            f"FOR EACH ROW EXECUTE FUNCTION kms_refuse_change()"
        )
        conn.exec_driver_sql(
            f"CREATE TRIGGER {table}_no_truncate BEFORE TRUNCATE ON {table} "
            f"FOR EACH STATEMENT EXECUTE FUNCTION kms_refuse_change()"
        )
    else:
        for op in ("UPDATE", "DELETE"):
            conn.exec_driver_sql(
                f"CREATE TRIGGER {table}_no_{op.lower()} BEFORE {op} ON {table} "
                f"BEGIN SELECT RAISE(ABORT, 'table {table} is append-only: {op} refused'); END"
            )


def drop_append_only_triggers(conn: Connection, table: str) -> None:
    if conn.dialect.name == "postgresql":
        conn.exec_driver_sql(f"DROP TRIGGER IF EXISTS {table}_append_only ON {table}")
        conn.exec_driver_sql(f"DROP TRIGGER IF EXISTS {table}_no_truncate ON {table}")
    else:
        for op in ("update", "delete"):
            conn.exec_driver_sql(f"DROP TRIGGER IF EXISTS {table}_no_{op}")


# A hash chain's time only moves forward: the database refuses a row older than the newest
# one, so an INSERT that bypasses core (direct SQL, an old client) cannot backdate an entry.
def create_time_order_trigger(conn: Connection, table: str, column: str) -> None:
    if conn.dialect.name == "postgresql":
        # one function per table with static SQL, so the plan is cached across a bulk COPY
        conn.exec_driver_sql(f"""
CREATE OR REPLACE FUNCTION kms_time_order_{table}() RETURNS trigger AS $$
BEGIN
  IF NEW.{column} < (SELECT {column} FROM {table} ORDER BY seq DESC LIMIT 1) THEN
    RAISE EXCEPTION 'table {table} refuses an entry at %% older than the previous entry', NEW.{column};
  END IF;
  RETURN NEW;
END;
$$ LANGUAGE plpgsql""")
        conn.exec_driver_sql(
            f"CREATE TRIGGER {table}_time_order BEFORE INSERT ON {table} "
            f"FOR EACH ROW EXECUTE FUNCTION kms_time_order_{table}()"
        )
    else:
        conn.exec_driver_sql(
            f"CREATE TRIGGER {table}_time_order BEFORE INSERT ON {table} "
            f"WHEN NEW.{column} < (SELECT {column} FROM {table} ORDER BY seq DESC LIMIT 1) "
            f"BEGIN SELECT RAISE(ABORT, 'table {table} refuses an entry older than the previous entry'); END"
        )


def drop_time_order_trigger(conn: Connection, table: str) -> None:
    if conn.dialect.name == "postgresql":
        conn.exec_driver_sql(f"DROP TRIGGER IF EXISTS {table}_time_order ON {table}")
        conn.exec_driver_sql(f"DROP FUNCTION IF EXISTS kms_time_order_{table}()")
    else:
        conn.exec_driver_sql(f"DROP TRIGGER IF EXISTS {table}_time_order")
