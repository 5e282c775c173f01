"""Pictures and tables for Dagster metadata (item 2 of issue 8): key age against cadence,
the backup timeline, DEK counts per key version, the backup list, drill history and open
follow-ups. Pure presentation over core results (inventory rows, backup/drill dicts,
DEK counts) — never key material.

The pictures are Unicode bar/timeline charts inside fenced Markdown blocks: they render
in the Dagster UI's Markdown viewer and in a terminal without a plotting dependency.
"""


from datetime import datetime, timedelta
from typing import Iterable, Sequence

import dagster as dg

from .metadata import markdown_table

BAR_WIDTH = 30


def _bar(fraction: float, width: int = BAR_WIDTH) -> str:
    fraction = max(0.0, fraction)
    filled = min(width, int(round(fraction * width)))
    bar = "█" * filled + "░" * (width - filled)
    return bar + ("▶" if fraction > 1 else "│")


def key_age_chart(rows: Iterable, cadence_days: dict[str, int | None]) -> str:
    """Active key versions: age as a share of the policy cadence (▶ = past due)."""
    active = [r for r in rows if r.state == "active"]
    if not active:
        return "no active key versions"
    name_w = max(len(f"{r.key} v{r.version}") for r in active)
    lines = []
    for r in sorted(active, key=lambda r: r.key):
        label = f"{r.key} v{r.version}".ljust(name_w)
        age = r.age_days or 0.0
        if r.expires_at is not None and r.due_at is not None and r.activated_at is not None:
            span = max((r.due_at - r.activated_at).total_seconds() / 86400, 1e-9)
            limit = f"expires {r.due_at:%Y-%m-%d}"
        else:
            span = cadence_days.get(r.key_class) or 0
            limit = f"{span} d" if span else "no cadence"
        if not span:
            lines.append(f"{label}  {'·' * BAR_WIDTH}   {age:6.1f} d  ({limit})")
            continue
        mark = "  OVERDUE" if r.overdue else ""
        lines.append(f"{label}  {_bar(age / span)} {age:6.1f} / {limit}{mark}")
    return "```\n" + "\n".join(lines) + "\n```"


def key_age_table(rows: Iterable, cadence_days: dict[str, int | None]) -> dg.TableMetadataValue:
    active = [r for r in rows if r.state == "active"]
    schema = dg.TableSchema(columns=[
        dg.TableColumn("key", "string"), dg.TableColumn("version", "int"), dg.TableColumn("age_days", "float"),
        dg.TableColumn("cadence_days", "int"), dg.TableColumn("used_pct", "float"), dg.TableColumn("due_at", "string"),
        dg.TableColumn("overdue", "bool")])
    records = []
    for r in active:
        cadence = cadence_days.get(r.key_class) or 0
        records.append(dg.TableRecord({
            "key": r.key, "version": r.version, "age_days": float(r.age_days or 0.0), "cadence_days": int(cadence),
            "used_pct": round(100.0 * (r.age_days or 0.0) / cadence, 1) if cadence else 0.0,
            "due_at": r.due_at.isoformat() if r.due_at else "", "overdue": bool(r.overdue)}))
    return dg.MetadataValue.table(records=records, schema=schema)


def dek_counts_table(counts: Sequence) -> dg.TableMetadataValue:
    """DEK counts per key version (envelope.inventory_counts rows)."""
    schema = dg.TableSchema(columns=[
        dg.TableColumn("key", "string"), dg.TableColumn("version", "int"), dg.TableColumn("state", "string"),
        dg.TableColumn("live_deks", "int"), dg.TableColumn("shredded_deks", "int")])
    return dg.MetadataValue.table(records=[dg.TableRecord({
        "key": c.key, "version": int(c.version), "state": c.state, "live_deks": int(c.deks),
        "shredded_deks": int(c.shredded)}) for c in counts], schema=schema)


def backups_table(rows: Sequence[dict]) -> dg.TableMetadataValue:
    """The backup list (backup.list_backups) with GFS class and lock."""
    schema = dg.TableSchema(columns=[
        dg.TableColumn("archive_id", "string"), dg.TableColumn("gfs_class", "string"),
        dg.TableColumn("state", "string"), dg.TableColumn("created_at", "string"),
        dg.TableColumn("age_days", "float"), dg.TableColumn("locked", "bool"),
        dg.TableColumn("retain_until", "string"), dg.TableColumn("verified", "bool"),
        dg.TableColumn("backup_key_version", "int"), dg.TableColumn("successor_of", "string")])
    return dg.MetadataValue.table(records=[dg.TableRecord({
        "archive_id": r["archive_id"], "gfs_class": r["gfs_class"], "state": r["state"],
        "created_at": r["created_at"].isoformat(), "age_days": float(r["age_days"]), "locked": bool(r["locked"]),
        "retain_until": r["retain_until"].isoformat(), "verified": bool(r["verified"]),
        "backup_key_version": int(r["backup_key_version"] or 0), "successor_of": r["successor_of"] or ""})
        for r in rows], schema=schema)


def backup_timeline(rows: Sequence[dict], now: datetime, days: int = 91) -> str:
    """One cell per day, oldest left: W weekly, N nightly, x incomplete, · none; lock shown below."""
    start = (now - timedelta(days=days - 1)).date()
    by_day: dict = {}
    for r in rows:
        d = r["created_at"].date()
        if d < start:
            continue
        mark = "x" if r["state"] == "incomplete" else ("W" if r["gfs_class"] == "weekly" else "N")
        if by_day.get(d) not in ("W", "N"):
            by_day[d] = mark
    cells = "".join(by_day.get(start + timedelta(days=i), "·") for i in range(days))
    locked = {r["created_at"].date() for r in rows if r["locked"]}
    lock_line = "".join("^" if (start + timedelta(days=i)) in locked else " " for i in range(days))
    weeks = "".join("|" if (start + timedelta(days=i)).weekday() == 0 else " " for i in range(days))
    return ("```\n"
            f"{start:%Y-%m-%d} → {now:%Y-%m-%d}  (W weekly · N nightly · x incomplete · · none; "
            f"^ lock in force; | Monday)\n"
            f"{weeks}\n{cells}\n{lock_line}\n"
            f"{sum(c in 'WN' for c in cells)} archive day(s), {cells.count('W')} weekly, "
            f"{sum(1 for r in rows if r['locked'])} archive(s) locked\n```")


def drill_history_md(drills: Sequence[dict], limit: int = 24) -> str:
    if not drills:
        return "no drills yet"
    return markdown_table(
        ["date", "outcome", "archive", "restore (s)", "participants", "findings", "follow-ups open"],
        [[d["date"], "**FAILED**" if d["outcome"] != "passed" else "passed", d["archive_id"] or "-",
          d["restore_seconds"] if d["restore_seconds"] is not None else "-", ", ".join(d["participants"]),
          len(d["findings"]), sum(f["status"] == "open" for f in d["followups"])] for d in drills[:limit]])


def open_followups_md(drills: Sequence[dict], now: datetime) -> str:
    rows = [(d["date"], f) for d in drills for f in d["followups"] if f["status"] == "open"]
    if not rows:
        return "no open follow-ups"
    return markdown_table(
        ["id", "drill", "action", "owner", "due", "status"],
        [[f["id"], date, f["title"], f["owner"], f"{f['due_at']:%Y-%m-%d}",
          "**OVERDUE**" if f["due_at"] < now else "open"] for date, f in rows])
