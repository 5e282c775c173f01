"""The compliance report as Markdown and as HTML (assets/templates/compliance_report.html)."""

from __future__ import annotations

import html
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .model import FAIL, PASS, UNKNOWN, WARN, Report, Row, _iso, checks_summary

TEMPLATE = Path(__file__).resolve().parents[3] / "assets" / "templates" / "compliance_report.html"


# ---- rendering ----------------------------------------------------------------------

BADGE = {PASS: "🟢 PASS", FAIL: "🔴 FAIL", WARN: "🟠 WARN", UNKNOWN: "⚪ UNKNOWN"}


def _md_cell(value: Any) -> str:
    return str(value).replace("|", "\\|").replace("\n", " ")


def _check_md(ch: dict, run_url: Callable[[str], str] | None) -> str:
    if ch.get("passed") is None:
        return f"`{ch.get('check')}`: never run"
    run = ch.get("run_id") or ""
    link = f"[{run[:8]}]({run_url(run) if run_url else '/runs/' + run})" if run else "-"
    return (
        f"`{ch['check']}`: {'✅ passed' if ch['passed'] else '❌ FAILED'} in run {link} at {ch.get('at', '')}".strip()
    )


def render_markdown(report: Report, *, run_url: Callable[[str], str] | None = None) -> str:
    """A narrow summary table (one row per clause), then one section per clause with its
    control, evidence and checks. The evidence and check columns of a single wide table ran
    past the right edge of Dagster's Markdown dialog; list items wrap instead."""
    c = report.counts()
    lines = [
        "# KMS policy compliance report",
        "",
        f"**Overall: {BADGE[report.overall]}** — {c[PASS]} pass, {c[FAIL]} fail, {c[WARN]} warn, "
        f"{c[UNKNOWN]} unknown · generated {_iso(report.generated_at)}",
        "",
    ]
    if report.failing:
        lines += ["**Failing clauses:** " + ", ".join(f"{r.clause}" for r in report.failing), ""]
    has_checks = any(r.checks for r in report.rows)
    header = ["clause", "status", "policy (short)"] + (["checks"] if has_checks else [])
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in report.rows:
        cells = [f"**{r.clause}**", BADGE[r.status], r.text] + ([checks_summary(r.checks)] if has_checks else [])
        lines.append("| " + " | ".join(_md_cell(x) for x in cells) + " |")
    lines += ["", "## Evidence by clause", ""]
    for r in report.rows:
        lines += [
            f"### {r.clause} · {BADGE[r.status]}",
            "",
            f"{_md_cell(r.text)}",
            "",
            f"- **Control:** {_md_cell(r.control)}",
            f"- **Evidence:** {_md_cell(r.evidence)}",
        ]
        if r.checks:
            lines.append("- **Checks:**")
            lines += [f"  - {_check_md(ch, run_url)}" for ch in r.checks]
        lines.append("")
    return "\n".join(lines)


def _row_html(r: Row) -> str:
    esc = html.escape
    checks = (
        "<br>".join(
            esc(
                f"{ch.get('check')}: "
                + (
                    "never run"
                    if ch.get("passed") is None
                    else ("passed" if ch["passed"] else "FAILED") + f" run {ch.get('run_id', '')[:8]} "
                    f"{ch.get('at', '')}"
                )
            )
            for ch in r.checks
        )
        or "-"
    )
    return (
        f'<tr class="{esc(r.status)}" data-clause="{esc(r.clause)}"><td class="id">{esc(r.clause)}</td>'
        f'<td class="status">{esc(r.status.upper())}</td><td>{esc(r.text)}</td><td>{esc(r.control)}</td>'
        f"<td>{esc(r.evidence)}</td><td>{checks}</td></tr>"
    )


def render_html(report: Report, template: str | Path | None = None) -> str:
    """The report as a standalone HTML page (red rows for failing clauses)."""
    text = Path(template or TEMPLATE).read_text(encoding="utf-8")
    c = report.counts()
    values = {
        "title": "KMS policy compliance report",
        "generated_at": html.escape(_iso(report.generated_at)),
        "overall": html.escape(report.overall),
        "overall_label": html.escape(report.overall.upper()),
        "summary": html.escape(f"{c[PASS]} pass, {c[FAIL]} fail, {c[WARN]} warn, {c[UNKNOWN]} unknown"),
        "failing": html.escape(", ".join(r.clause for r in report.failing) or "none"),
        "rows": "\n".join(_row_html(r) for r in report.rows),
    }
    for name, value in values.items():
        text = text.replace("{{" + name + "}}", value)
    return text


def render(report: Report, fmt: str) -> str:
    if fmt == "md":
        return render_markdown(report)
    if fmt == "html":
        return render_html(report)
    if fmt == "json":
        return report.to_json() + "\n"
    raise ValueError(f"unknown report format {fmt!r} (md, html, json)")
