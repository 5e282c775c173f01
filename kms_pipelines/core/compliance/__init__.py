"""The clause-by-clause compliance report (docs/policy.md): every clause P1-B4 evaluated.

model (Finding, Clause, Row, Report), one evaluator module per section: purposes (P1-P4),
rotation (R1-R4), retention (T1-T4), access (A1-A4), backup (B1-B4); report (CLAUSES,
evaluate, build_report), render (render_markdown, render_html); evidence (evidence bundles,
P1/T3), quality (Great Expectations suites over the inventories).
"""

from .access import A1_ROLES, A2_MAX_TOKEN_MINUTES, PROBE_CLIENT, eval_a1, eval_a2, eval_a3, eval_a4
from .backup import eval_b1, eval_b2, eval_b3, eval_b4
from .model import FAIL, PASS, SECTIONS, STATUSES, UNKNOWN, WARN, Clause, Finding, Report, Row, checks_summary
from .purposes import eval_p1, eval_p2, eval_p3, eval_p4
from .render import BADGE, TEMPLATE, render, render_html, render_markdown
from .report import CLAUSES, Evidence, build_report, clause, evaluate
from .retention import eval_t1, eval_t2, eval_t3, eval_t4
from .rotation import eval_r1, eval_r2, eval_r3, eval_r4, lifecycle_class

__all__ = [
    "PASS",
    "FAIL",
    "WARN",
    "UNKNOWN",
    "STATUSES",
    "SECTIONS",
    "Finding",
    "Clause",
    "Row",
    "Report",
    "checks_summary",
    "eval_p1",
    "eval_p2",
    "eval_p3",
    "eval_p4",
    "eval_r1",
    "eval_r2",
    "eval_r3",
    "lifecycle_class",
    "eval_r4",
    "eval_t1",
    "eval_t2",
    "eval_t3",
    "eval_t4",
    "PROBE_CLIENT",
    "A1_ROLES",
    "A2_MAX_TOKEN_MINUTES",
    "eval_a1",
    "eval_a2",
    "eval_a3",
    "eval_a4",
    "eval_b1",
    "eval_b2",
    "eval_b3",
    "eval_b4",
    "CLAUSES",
    "clause",
    "evaluate",
    "Evidence",
    "build_report",
    "TEMPLATE",
    "BADGE",
    "render_markdown",
    "render_html",
    "render",
]
