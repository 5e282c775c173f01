"""Helpers that turn core results into Dagster metadata. Nothing here may receive key
material: callers pass inventory rows, counts and hashes only."""


from typing import Iterable, Sequence

import dagster as dg


def seq_text(seq: int | None) -> dg.TextMetadataValue:
    """A chain position as text: a number would be plotted over time by the UI, which means
    nothing for "where the chain broke"."""
    return dg.MetadataValue.text(str(seq) if seq else "none")


def markdown_table(header: Sequence[str], rows: Iterable[Sequence]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        lines.append("| " + " | ".join("" if c is None else str(c).replace("|", "\\|") for c in row) + " |")
    return "\n".join(lines)


def inventory_table(rows) -> dg.TableMetadataValue:
    schema = dg.TableSchema(columns=[
        dg.TableColumn("key", "string"), dg.TableColumn("version", "int"), dg.TableColumn("state", "string"),
        dg.TableColumn("age_days", "float"), dg.TableColumn("due_at", "string"),
        dg.TableColumn("overdue", "bool"), dg.TableColumn("fingerprint", "string")])
    return dg.MetadataValue.table(
        records=[dg.TableRecord({"key": r.key, "version": r.version, "state": r.state,
                                 "age_days": float(r.age_days) if r.age_days is not None else None,
                                 "due_at": r.due_at.isoformat() if r.due_at else None,
                                 "overdue": bool(r.overdue), "fingerprint": r.fingerprint})
                 for r in rows],
        schema=schema)
