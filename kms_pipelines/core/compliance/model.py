"""The clause-by-clause compliance report (clauses in docs/policy.md): one row per policy clause id,
the control that enforces it, the evidence read from the live state, and a status.

Each clause has an evaluator ``fn(ctx) -> Finding`` that checks the live state through
the areas' own core APIs (ledger, rpt, checkpoints, rotation, envelope, escrow, access,
audit, backup, drills …). Status is one of ``pass`` | ``fail`` | ``warn`` | ``unknown``:

* ``fail``: the evidence shows the clause broken (rendered red);
* ``warn``: nothing broken, but something needs a human look (e.g. no approver enrolled);
* ``unknown``: reserved for evaluations that cannot run at all (never used to hide a
  failure: an evaluator that raises yields ``fail`` naming the error class and message).

Evaluators read; the few that exercise an API (P2: credential, app-secret and audit
signature round trips; P3: a DEK round trip inside the keystore; A2: a workload token)
persist nothing but the audit events every keystore operation leaves, and P2's probe
credential (client ``kms-compliance-probe``, one row per service version, replaced on
every report).

No key material, wrapped keys or plaintext ever enters a Finding: evidence carries
versions, counts, ids, hashes and times.

``build_report(ctx)`` → ``Report``; ``render_markdown`` / ``render_html`` (template in
``assets/templates/compliance_report.html``) / ``Report.to_json`` give the same content.
Callers with more evidence (the Dagster asset: latest asset-check evaluations) pass an
``evidence`` callback; core never imports Dagster.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime

from ..foundation.clock import utc
from ..foundation.context import KmsContext
from ..keys import lifecycle

PASS, FAIL, WARN, UNKNOWN = "pass", "fail", "warn", "unknown"
STATUSES = (PASS, FAIL, WARN, UNKNOWN)
SECTIONS = {
    "P": "Key purposes and scope",
    "R": "Rotation cadence",
    "T": "Retention and retirement",
    "A": "Access controls",
    "B": "Backup, restore and drills",
}
_MAX_EVIDENCE = 600


@dataclass
class Finding:
    status: str
    evidence: str
    details: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.status not in STATUSES:
            raise ValueError(f"unknown finding status {self.status!r}")


@dataclass(frozen=True)
class Clause:
    id: str
    text: str
    control: str
    evaluate: Callable[[KmsContext], Finding]
    # Dagster asset checks that evidence this clause, as "asset/check" (defs/compliance.py
    # looks up their latest evaluation); plain strings so core stays free of Dagster.
    checks: tuple[str, ...] = ()

    @property
    def section(self) -> str:
        return self.id[0]


@dataclass
class Row:
    clause: str
    section: str
    text: str
    control: str
    status: str
    evidence: str
    details: dict = field(default_factory=dict)
    checks: list[dict] = field(default_factory=list)  # latest Dagster check evaluations, if known
    seconds: float = 0.0

    @property
    def red(self) -> bool:
        return self.status == FAIL


@dataclass
class Report:
    rows: list[Row]
    generated_at: datetime
    overall: str

    @property
    def failing(self) -> list[Row]:
        return [r for r in self.rows if r.status == FAIL]

    def counts(self) -> dict[str, int]:
        return {s: sum(r.status == s for r in self.rows) for s in STATUSES}

    def row(self, clause_id: str) -> Row:
        for r in self.rows:
            if r.clause == clause_id:
                return r
        raise KeyError(clause_id)

    def to_dict(self) -> dict:
        return {
            "generated_at": self.generated_at.isoformat(),
            "overall": self.overall,
            "counts": self.counts(),
            "failing": [r.clause for r in self.failing],
            "rows": [{**asdict(r), "red": r.red} for r in self.rows],
        }

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent, sort_keys=True, default=_json_default)


def _json_default(value):
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, (set, frozenset, tuple)):
        return sorted(value) if isinstance(value, (set, frozenset)) else list(value)
    return str(value)


def _overall(rows: Sequence[Row]) -> str:
    if any(r.status == FAIL for r in rows):
        return FAIL
    if any(r.status in (WARN, UNKNOWN) for r in rows):
        return WARN
    return PASS


def _join(parts: Iterable[str]) -> str:
    return "; ".join(p for p in parts if p)


def _finding(
    problems: list[str], good: list[str], details: dict | None = None, warnings: list[str] | None = None
) -> Finding:
    warnings = warnings or []
    if problems:
        return Finding(FAIL, _join(problems + warnings), details or {})
    if warnings:
        return Finding(WARN, _join(warnings + good), details or {})
    return Finding(PASS, _join(good), details or {})


def _iso(at: datetime | None) -> str:
    return utc(at).strftime("%Y-%m-%d %H:%M UTC") if at else "-"


# ---- shared facts ------------------------------------------------------------------


def _inventory(ctx: KmsContext, key_class: str | None = None):
    return [r for r in lifecycle.inventory(ctx) if key_class is None or r.key_class == key_class]


def _cadence(ctx: KmsContext, key_class: str) -> tuple[list[str], list[str], dict]:
    """(problems, good, details) for the active versions of a key class against its cadence."""
    rows = [r for r in _inventory(ctx, key_class) if r.state == "active"]
    days = ctx.policy.key_class(key_class).rotation_days
    problems = [
        f"{r.key} v{r.version} is {r.age_days:.1f} days old, past its due date {_iso(r.due_at)}"
        for r in rows
        if r.overdue
    ]
    if not rows:
        problems.append(f"no active {key_class} key version")
    good = []
    if rows and not problems:
        oldest = max(rows, key=lambda r: r.age_days or 0)
        good.append(
            f"{len(rows)} {key_class} key(s) within {days} d (oldest {oldest.key} v{oldest.version}, "
            f"{oldest.age_days:.1f} d)"
        )
    details = {
        "keys": [
            {
                "key": r.key,
                "version": r.version,
                "age_days": r.age_days,
                "due_at": r.due_at.isoformat() if r.due_at else None,
                "overdue": r.overdue,
            }
            for r in rows
        ]
    }
    return problems, good, details


_FACTOR_NAMES = {
    "fido2-hardware": "a hardware FIDO2 key (its keys are software authenticators, which the policy "
    "does not allow: console.allow_software_authenticators)"
}


def checks_summary(checks: list[dict]) -> str:
    """A clause's asset checks in a few characters: ✅ all passed, ❌ N failed, ⚪ some never ran."""
    if not checks:
        return "–"
    passed = sum(c.get("passed") is True for c in checks)
    failed = sum(c.get("passed") is False for c in checks)
    if failed:
        return f"❌ {failed}/{len(checks)} failed"
    return f"{'✅' if passed == len(checks) else '⚪'} {passed}/{len(checks)}"
