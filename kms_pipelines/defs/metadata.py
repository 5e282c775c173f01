"""Helpers that turn core results into Dagster metadata. Nothing here may receive key
material: callers pass inventory rows, counts and hashes only."""

from collections.abc import Iterable, Sequence

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


def shorten(value: str | None, keep: int = 12) -> str:
    """A long unbreakable token (hash, fingerprint, age recipient) cut to ``keep`` characters and an
    ellipsis, so a table cell stays narrow; the ellipsis says it is not the whole value."""
    if not value:
        return ""
    return value if len(value) <= keep + 1 else value[:keep] + "…"


def short_fingerprint(fingerprint: str | None) -> str:
    """``SHA256:<64 hex>`` as its first 8 hex digits and an ellipsis: enough to tell versions apart
    in a narrow table. The full value is in ``kms keys list`` and, for the current root, in keys_root's
    ``full_values``."""
    return shorten((fingerprint or "").removeprefix("SHA256:"), 8)


def short_hash(value: str | None) -> str:
    """A 64-hex digest (or ``SHA256:<hex>``) as its first 16 hex digits and an ellipsis: about 445 px
    are left for a value at a 1600 px window and a whole digest does not wrap. The full value is in
    the same materialization's ``full_values``."""
    value = value or ""
    prefix = "SHA256:" if value.startswith("SHA256:") else ""
    return prefix + shorten(value.removeprefix(prefix), 16)


def short_kid(kid: str | None) -> str:
    """``root#v3:SHA256:<64 hex>`` as ``root#v3:SHA256:<16 hex>…``."""
    name, sep, fingerprint = (kid or "").partition(":")
    return name + sep + short_hash(fingerprint) if sep else short_hash(name)


def short_path(path: str, parts: int = 2) -> str:
    """A path or URL as its last ``parts`` components after an ellipsis (the archive or object name)."""
    pieces = path.rstrip("/").split("/")
    return path if len(pieces) <= parts + 1 else "…/" + "/".join(pieces[-parts:])


# Dagster 1.13 draws Markdown of fewer than 1000 characters inline in the metadata column, where a
# 64-hex digest or a long path cannot wrap and widens the panel; from 1000 characters on it shows
# "[Show Markdown]", a dialog about 1280 px wide with a copy button (checked in Chromium by
# tests/test_ui_browser.py).
_DIALOG_MARKDOWN_CHARS = 1000


def full_values_md(rows: Iterable[tuple[str, str, str]]) -> dg.MarkdownMetadataValue:
    """The full values behind the shortened entries of one materialization, as a table
    (entry, full value, what it is for) opened by "[Show Markdown]": each value in code so it is
    selected and copied whole. Trailing newlines bring a short table to the dialog threshold;
    Markdown ignores them."""
    text = "\n".join(
        [
            "Full values of the entries shortened in the metadata column (select a value to copy it; "
            "the dialog's copy button copies this whole text).",
            "",
            markdown_table(["entry", "full value", "use"], [[name, f"`{value}`", use] for name, value, use in rows]),
        ]
    )
    return dg.MetadataValue.md(text.ljust(_DIALOG_MARKDOWN_CHARS, "\n"))


def inventory_table(rows) -> dg.TableMetadataValue:
    """Every key version, narrow enough for the metadata column at a 1600 px window
    (tests/test_ui_browser.py measures it): an overdue version is marked in its state. The ages of
    the active versions are the ``age_vs_cadence`` chart beside it."""
    schema = dg.TableSchema(
        columns=[
            dg.TableColumn("key", "string"),
            dg.TableColumn("v", "int", description="key version"),
            dg.TableColumn(
                "state", "string", description="lifecycle state; 🔴 overdue: active past its rotation due date"
            ),
            dg.TableColumn("due", "string", description="rotation due date (UTC) of an active version"),
            dg.TableColumn(
                "fingerprint",
                "string",
                description="SHA256 of the public key, first 8 hex digits (full: `kms keys list`)",
            ),
        ]
    )
    return dg.MetadataValue.table(
        records=[
            dg.TableRecord(
                {
                    "key": r.key,
                    "v": r.version,
                    "state": f"{r.state} 🔴 overdue" if r.overdue else r.state,
                    "due": f"{r.due_at:%Y-%m-%d}" if r.due_at and r.state == "active" else "",
                    "fingerprint": short_fingerprint(r.fingerprint),
                }
            )
            for r in rows
        ],
        schema=schema,
    )
