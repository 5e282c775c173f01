"""Pictures and tables for Dagster metadata (item 2 of issue 8): key age against cadence,
the backup timeline, DEK counts per key version, the backup list, drill history and open
follow-ups. Pure presentation over core results (inventory rows, backup/drill dicts,
DEK counts) — never key material.

The pictures are Unicode bar/timeline charts inside fenced Markdown blocks: they render
in the Dagster UI's Markdown viewer and in a terminal without a plotting dependency.
"""

from collections.abc import Iterable, Sequence
from datetime import datetime, timedelta

import dagster as dg

from .metadata import markdown_table

# Charts are fenced (monospace) blocks in the metadata column of an asset page, about 52
# characters wide at a 1600 px window (tests/test_ui_browser.py measures it): a code block
# never wraps, so each line stays under that.
BAR_WIDTH = 20


def _bar(fraction: float, width: int = BAR_WIDTH) -> str:
    fraction = max(0.0, fraction)
    filled = min(width, int(round(fraction * width)))
    bar = "█" * filled + "░" * (width - filled)
    return bar + ("▶" if fraction > 1 else "│")


def key_age_chart(rows: Iterable, cadence_days: dict[str, int | None]) -> str:
    """Active key versions: age as a share of the policy cadence (▶ = past due). The key's name is
    on its own line, so a long name cannot push the bar out of the column."""
    active = [r for r in rows if r.state == "active"]
    if not active:
        return "no active key versions"
    lines = []
    for r in sorted(active, key=lambda r: r.key):
        age = r.age_days or 0.0
        if r.expires_at is not None and r.due_at is not None and r.activated_at is not None:
            span = max((r.due_at - r.activated_at).total_seconds() / 86400, 1e-9)
            limit = f"exp. {r.due_at:%Y-%m-%d}"
        else:
            span = cadence_days.get(r.key_class) or 0
            limit = f"{span} d" if span else "no cadence"
        lines.append(f"{r.key} v{r.version}" + ("  OVERDUE" if span and r.overdue else ""))
        if not span:
            lines.append(f"  {'·' * BAR_WIDTH}  {age:6.1f} d ({limit})")
            continue
        lines.append(f"  {_bar(age / span)} {age:6.1f} / {limit}")
    return "```\n" + "\n".join(lines) + "\n```"


def _day(value: datetime | None) -> str:
    return f"{value:%Y-%m-%d}" if value else ""


def key_age_table(rows: Iterable, cadence_days: dict[str, int | None]) -> dg.TableMetadataValue:
    """Active versions' age against cadence. Columns are kept few and short so the table fits the
    metadata column of an asset page at a 1600 px window (tests/test_ui_browser.py measures it);
    the share of the cadence used is the chart beside it."""
    active = [r for r in rows if r.state == "active"]
    schema = dg.TableSchema(
        columns=[
            dg.TableColumn("key", "string"),
            dg.TableColumn("v", "int", description="key version"),
            dg.TableColumn("age_d", "float", description="age in days"),
            dg.TableColumn("cadence_d", "int", description="policy rotation cadence in days (0: none)"),
            dg.TableColumn("due", "string", description="rotation due date (UTC); 🔴 marks a version past it"),
        ]
    )
    records = []
    for r in active:
        cadence = cadence_days.get(r.key_class) or 0
        records.append(
            dg.TableRecord(
                {
                    "key": r.key,
                    "v": r.version,
                    "age_d": round(float(r.age_days or 0.0), 1),
                    "cadence_d": int(cadence),
                    "due": ("🔴 " if r.overdue else "") + _day(r.due_at),
                }
            )
        )
    return dg.MetadataValue.table(records=records, schema=schema)


def dek_counts_table(counts: Sequence) -> dg.TableMetadataValue:
    """DEK counts per key version (envelope.inventory_counts rows)."""
    schema = dg.TableSchema(
        columns=[
            dg.TableColumn("key", "string"),
            dg.TableColumn("v", "int", description="key version"),
            dg.TableColumn("state", "string", description="state of that key version"),
            dg.TableColumn("live", "int", description="live DEKs wrapped under the version"),
            dg.TableColumn("shredded", "int", description="DEKs shredded (their data is unreadable)"),
        ]
    )
    return dg.MetadataValue.table(
        records=[
            dg.TableRecord(
                {"key": c.key, "v": int(c.version), "state": c.state, "live": int(c.deks), "shredded": int(c.shredded)}
            )
            for c in counts
        ],
        schema=schema,
    )


# A mark per backup state, so the narrow table reads at a glance.
_BACKUP_STATE = {"verified": "✅ verified", "complete": "🟠 unverified", "incomplete": "❌ incomplete"}


def backups_table(rows: Sequence[dict]) -> dg.TableMetadataValue:
    """The backup list (backup.list_backups): id, GFS class, state and lock, narrow enough for the
    metadata column at a 1600 px window. The archive id starts with its creation time (UTC), so
    it also tells the age; the backup key version, successor and retention time of each archive are in backup_retention's
    ``archives`` list (backup_details_md) and ``kms backup list``."""
    schema = dg.TableSchema(
        columns=[
            dg.TableColumn(
                "archive",
                "string",
                description="archive id: creation time (UTC) and a random suffix; scripts/restore.sh takes it",
            ),
            dg.TableColumn("class", "string", description="GFS class: nightly or weekly"),
            dg.TableColumn(
                "state", "string", description="✅ verified (manifest + sha256 re-read), 🟠 unverified, ❌ incomplete"
            ),
            dg.TableColumn("locked_until", "string", description="Object Lock retain-until date (UTC), or lapsed"),
        ]
    )
    return dg.MetadataValue.table(
        records=[
            dg.TableRecord(
                {
                    "archive": r["archive_id"],
                    "class": r["gfs_class"],
                    "state": _BACKUP_STATE.get(r["state"], r["state"]),
                    "locked_until": _day(r["retain_until"]) if r["locked"] else "lapsed",
                }
            )
            for r in rows
        ],
        schema=schema,
    )


def backup_details_md(rows: Sequence[dict]) -> str:
    """Everything about each archive that the narrow table leaves out, one list item per archive
    (a list wraps where a table would scroll)."""
    if not rows:
        return "no archives"
    return "\n".join(
        f"- **{r['archive_id']}** · {r['gfs_class']} · {r['state']} · created {r['created_at']:%Y-%m-%d %H:%M} UTC"
        f" · retain until {r['retain_until']:%Y-%m-%d %H:%M} UTC{'' if r['locked'] else ' (lapsed)'}"
        f" · backup key v{r['backup_key_version'] or '?'}"
        + (f" · successor of {r['successor_of']}" if r.get("successor_of") else "")
        for r in rows
    )


def backup_timeline(rows: Sequence[dict], now: datetime, days: int = 91) -> str:
    """A calendar of the last ``days`` days, one line per week (Monday first): W weekly, N nightly,
    x incomplete, · none; lower case once the archive's Object Lock has lapsed. A week per line
    keeps three months narrow enough for the metadata column."""
    start = (now - timedelta(days=days - 1)).date()
    end = now.date()
    by_day: dict = {}
    for r in rows:
        d = r["created_at"].date()
        if d < start:
            continue
        mark = "x" if r["state"] == "incomplete" else ("W" if r["gfs_class"] == "weekly" else "N")
        if mark != "x" and not r["locked"]:
            mark = mark.lower()
        if by_day.get(d, "x") in ("x", "·") or mark.isupper():
            by_day[d] = mark
    lines = [
        f"{start:%Y-%m-%d} → {end:%Y-%m-%d}",
        "W weekly · N nightly · x incomplete · · none",
        "lower case: lock lapsed",
        "",
        "week of     M T W T F S S",
    ]
    monday = start - timedelta(days=start.weekday())
    while monday <= end:
        cells = []
        for i in range(7):
            d = monday + timedelta(days=i)
            cells.append(" " if d < start or d > end else by_day.get(d, "·"))
        lines.append(f"{monday:%Y-%m-%d}  {' '.join(cells)}")
        monday += timedelta(days=7)
    marks = "".join(by_day.values())
    lines.append(
        f"{sum(c in 'WNwn' for c in marks)} archive day(s), {sum(c in 'Ww' for c in marks)} weekly, "
        f"{sum(1 for r in rows if r['locked'])} archive(s) locked"
    )
    return "```\n" + "\n".join(lines) + "\n```"


def drill_history_md(drills: Sequence[dict], limit: int = 24) -> str:
    """The latest drills, newest first. Participants and the archive restored are in each drill's
    own report (restore_drill_report, `kms drill list`): here only what fits the metadata column."""
    if not drills:
        return "no drills yet"
    return markdown_table(
        ["date", "outcome", "restore (s)", "findings", "open f/u"],
        [
            [
                d["date"],
                "❌ **FAILED**" if d["outcome"] != "passed" else "✅ passed",
                d["restore_seconds"] if d["restore_seconds"] is not None else "-",
                len(d["findings"]),
                sum(f["status"] == "open" for f in d["followups"]),
            ]
            for d in drills[:limit]
        ],
    )


def open_followups_md(drills: Sequence[dict], now: datetime) -> str:
    rows = [(d["date"], f) for d in drills for f in d["followups"] if f["status"] == "open"]
    if not rows:
        return "no open follow-ups"
    return markdown_table(
        ["id", "drill", "action", "owner", "due", "status"],
        [
            [
                f["id"],
                date,
                f["title"],
                f["owner"],
                f"{f['due_at']:%Y-%m-%d}",
                "🔴 **OVERDUE**" if f["due_at"] < now else "open",
            ]
            for date, f in rows
        ],
    )
