"""Overdue partner acknowledgements (R1) and drill follow-ups (B4): asks rotation and drills, and notifies through core/access/notifications."""

from __future__ import annotations

import importlib

from ..access.notifications import notify_policy_event
from ..backup import drills
from ..foundation import nightly_steps
from ..foundation.context import KmsContext
from ..keys import rotation

# ---- overdue partner acknowledgements and drill follow-ups ---------------------------


# (kind, module, candidate function names): each function(ctx) returns the overdue items as
# dicts/objects with an id/ref, a description and a due time. The first two candidates are
# adapters over the colleagues' real APIs (rotation.check_partners, drills.status).
def _rotation_overdue(ctx: KmsContext) -> list[dict]:
    return [
        {
            "id": f"{r.partner}@root-v{r.version}",
            "due_at": r.deadline,
            "description": f"partner {r.partner} has not acknowledged root v{r.version} "
            f"(notified {r.notified_at or 'not yet'})",
        }
        for r in rotation.check_partners(ctx).overdue
    ]


def _drills_overdue(ctx: KmsContext) -> list[dict]:
    return [
        {
            "id": f"followup-{f['id']}",
            "due_at": f["due_at"],
            "description": f"drill follow-up '{f['title']}' (owner {f['owner']}) is not closed",
        }
        for f in drills.status(ctx).get("overdue_followups", [])
    ]


OVERDUE_SOURCES = (
    (
        "partner_ack_overdue",
        "kms_pipelines.core.keys.rotation",
        ("overdue_acknowledgements", "overdue_partner_acks", "check_partners"),
    ),
    (
        "drill_followup_overdue",
        "kms_pipelines.core.backup.drills",
        ("overdue_followups", "overdue_follow_ups", "status"),
    ),
)
_ADAPTERS = {"check_partners": _rotation_overdue, "status": _drills_overdue}


def _item_field(item, *names, default=None):
    for n in names:
        if isinstance(item, dict) and item.get(n) is not None:
            return item[n]
        if not isinstance(item, dict) and getattr(item, n, None) is not None:
            return getattr(item, n)
    return default


def notify_overdue(ctx: KmsContext) -> dict:
    """Notify about overdue partner acknowledgements (R1) and drill follow-ups (B4), asking
    the rotation and drills modules; a module or function that does not exist is skipped
    and named in the summary."""
    summary: dict = {}
    for kind, module_name, candidates in OVERDUE_SOURCES:
        try:
            module = importlib.import_module(module_name)
        except ImportError:
            summary[kind] = {"skipped": f"{module_name} not available"}
            continue
        name = next((c for c in candidates if callable(getattr(module, c, None))), None)
        fn = _ADAPTERS.get(name, getattr(module, name, None)) if name else None
        if fn is None:
            summary[kind] = {"skipped": f"{module_name} has none of {list(candidates)}"}
            continue
        items = list(fn(ctx) or [])
        sent = failed = 0
        for item in items:
            ref = str(_item_field(item, "id", "ref", "partner", "followup_id", default="?"))
            what = _item_field(item, "description", "summary", "title", default=str(item))
            due = _item_field(item, "due_at", "deadline", default="")
            label = "Partner acknowledgement overdue" if kind == "partner_ack_overdue" else "Drill follow-up overdue"
            outcome = notify_policy_event(
                ctx,
                kind,
                f"{label}: {ref}",
                f"{label}.\nitem: {ref}\n{what}\n" + (f"due: {due}\n" if due else ""),
                ref=f"{kind}:{ref}",
            )
            sent += outcome.ok
            failed += not outcome.ok
        summary[kind] = {"overdue": len(items), "notified": sent, "failed": failed}
    return summary


@nightly_steps.nightly_step("overdue_notifications", order=75)
def _nightly_overdue(ctx: KmsContext) -> dict:
    return notify_overdue(ctx)
