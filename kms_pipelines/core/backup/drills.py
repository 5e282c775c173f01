"""Monthly restore drills (B2) and their documentation (B4).

``run_drill`` restores the newest good archive into a new staging database
(``kms_drill_<date>_<rand>`` on the server of ``KMS_DRILL_STAGING_URL`` or of the live
KMS database; a temp SQLite file for an embedded KMS), runs every restore check, times
it, and writes the drill report: Markdown in ``<KMS_HOME>/runbook/drills/<date>.md``
plus ``drills`` / ``drill_followups`` rows. Every failed check becomes a finding with a
follow-up owned by the policy's ``drills.followup_owner`` and due
``drills.remediation_business_days`` business days out. ``close_followup`` closes one.
"""

from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass, field
from datetime import datetime, timedelta
from pathlib import Path

from sqlalchemy import select

from ..access.principals import list_principals
from ..foundation.clock import utc
from ..foundation.context import KmsContext
from ..foundation.db.models_backup import Drill, DrillFollowup
from ..keys.forensic import drill_check
from . import restore as restore_mod
from .backups import BackupError, get_backup

PASSED, FAILED = "passed", "failed"


def add_business_days(start: datetime, days: int) -> datetime:
    """``days`` working days (Mon–Fri) after ``start``, same time of day."""
    at, left = start, days
    while left > 0:
        at += timedelta(days=1)
        if at.weekday() < 5:
            left -= 1
    return at


@dataclass
class DrillReport:
    drill_id: int
    date: str
    participants: list[str]
    outcome: str
    archive_id: str | None
    restore_seconds: float | None
    findings: list[str]
    followups: list[dict]
    checks: list[dict]
    report_path: str
    markdown: str = field(repr=False, default="")

    def as_dict(self) -> dict:
        return asdict(self)


def render_markdown(
    *,
    date: str,
    participants: list[str],
    outcome: str,
    archive_id: str | None,
    target: str,
    restore_seconds: float | None,
    total_seconds: float | None,
    checks: list[dict],
    findings: list[str],
    followups: list[dict],
    forensic: dict | None = None,
    period: str | None = None,
) -> str:
    # A drill for another month (a re-run of an old partition) says so; one in its own month is titled by its date.
    late = period and not date.startswith(period)
    title = f"Restore drill for {period} (performed {date})" if late else f"Restore drill {date}"
    lines = [
        f"# {title}",
        "",
        f"- **Date:** {date}",
        f"- **Participants:** {', '.join(participants) if participants else '(none recorded)'}",
        f"- **Outcome:** {outcome.upper()}",
        f"- **Archive:** {archive_id or '(none)'}",
        f"- **Staging target:** {target}",
        f"- **Time to restore:** {restore_seconds if restore_seconds is not None else '-'} s"
        + (f" (all checks: {total_seconds} s)" if total_seconds is not None else ""),
    ]
    if forensic is not None:
        lines.append(f"- **Forensic retrieval (T1):** {forensic['status'].upper()}: {forensic['detail']}")
    lines += ["", "## Checks", "", "| check | result | detail |", "|---|---|---|"]
    for c in checks:
        lines.append(f"| {c['name']} | {c['status']} | {str(c.get('detail') or '').replace('|', '/')} |")
    lines += ["", "## Findings", ""]
    lines += [f"- {f}" for f in findings] or ["- None: every check passed."]
    lines += ["", "## Follow-ups", "", "| id | action | owner | due | status |", "|---|---|---|---|---|"]
    for f in followups:
        lines.append(
            f"| {f['id']} | {f['title'].replace('|', '/')} | {f['owner']} | {f['due_at'][:10]} | {f['status']} |"
        )
    if not followups:
        lines.append("| - | none | - | - | - |")
    return "\n".join(lines) + "\n"


DRILL_ROLES = ("sre_oncall", "security_engineering")


def default_participants(ctx: KmsContext) -> list[str]:
    """The people who would run a drill: enrolled, enabled humans holding an on-call or
    security role. Before anyone is enrolled, the policy's on-call list (rotations, not
    names) stands in, marked as such so the report does not pass it off as attendance."""
    people = [
        p["name"]
        for p in list_principals(ctx)
        if p["kind"] == "human" and not p["disabled"] and set(p["roles"]) & set(DRILL_ROLES)
    ]
    return people or [f"{r} (rotation)" for r in ctx.policy.drills.on_call]


def run_drill(
    ctx: KmsContext,
    *,
    target_url: str | None = None,
    participants: list[str] | None = None,
    staging_url: str | None = None,
    extra_followups: list[dict] | None = None,
    archive: str | None = None,
    forensic_requester: str = "workload:dagster",
    period: str | None = None,
) -> DrillReport:
    """Restore the newest good archive into staging, check it, and document the drill.
    The drill also retrieves the oldest archived root version from the vault under dual
    control (ticket ``forensic.drill_ticket``) and verifies the oldest RPTs it signed (T1).
    ``period`` names what the drill is for (the Dagster partition, e.g. ``2026-10``) when
    that differs from the day it is performed."""
    if ctx.role == "worker":  # the report below is a file on this host: on a worker, nobody would find it
        raise BackupError(
            "a drill writes its runbook report under KMS_HOME on the host that runs it: "
            "run restore_drill on the control host, not on a worker (KMS_ROLE=worker)"
        )
    started = ctx.now()
    date = started.strftime("%Y-%m-%d")
    participants = list(participants or default_participants(ctx))
    checks: list[dict] = []
    findings: list[str] = []
    archive_id, restore_seconds, total_seconds, target_label = None, None, None, "(not created)"
    try:
        with ctx.transaction() as session:
            archive_id = get_backup(session, archive).archive_id
        if target_url:
            rep = restore_mod.restore(ctx, archive_id, target_url)
            target_label = rep.target
        else:
            with restore_mod.staging_target(ctx, staging_url, label="drill") as (url, home):
                rep = restore_mod.restore(ctx, archive_id, url, target_home=home)
                target_label = rep.target
        restore_seconds, total_seconds = rep.restore_seconds, rep.seconds
        checks = [asdict(c) for c in rep.checks]
        findings = [f"check {c.name} failed: {c.detail}" for c in rep.failed()]
    except BackupError as exc:
        checks.append({"name": "restore", "status": FAILED, "detail": str(exc)})
        findings.append(f"restore refused or failed: {exc}")
    forensic = None
    if ctx.objects is not None:
        forensic = drill_check(ctx, requested_by=forensic_requester)
        checks.append(forensic)
        if forensic["status"] != PASSED:
            findings.append(f"check {forensic['name']} failed: {forensic['detail']}")
    outcome = PASSED if not findings else FAILED
    due = add_business_days(started, ctx.policy.drills.remediation_business_days)
    wanted = [{"title": f"Remediate: {f}", "owner": ctx.policy.drills.followup_owner} for f in findings]
    wanted += [
        {"title": f["title"], "owner": f.get("owner") or ctx.policy.drills.followup_owner}
        for f in (extra_followups or [])
    ]

    runbook = ctx.home / "runbook" / "drills"
    runbook.mkdir(parents=True, exist_ok=True)
    path, n = runbook / f"{date}.md", 2
    while path.exists():
        path, n = runbook / f"{date}-{n}.md", n + 1

    with ctx.transaction() as session:
        drill = Drill(
            drill_date=date,
            started_at=started,
            finished_at=ctx.now(),
            archive_id=archive_id,
            outcome=outcome,
            restore_seconds=restore_seconds,
            participants=participants,
            findings=findings,
            report_path=path.relative_to(ctx.home).as_posix(),
        )
        session.add(drill)
        session.flush()
        fus = []
        for w in wanted:
            fu = DrillFollowup(drill_id=drill.id, title=w["title"], owner=w["owner"], due_at=due, status="open")
            session.add(fu)
            session.flush()
            fus.append({"id": fu.id, "title": fu.title, "owner": fu.owner, "due_at": due.isoformat(), "status": "open"})
        md = render_markdown(
            date=date,
            participants=participants,
            outcome=outcome,
            archive_id=archive_id,
            target=target_label,
            restore_seconds=restore_seconds,
            total_seconds=total_seconds,
            checks=checks,
            findings=findings,
            followups=fus,
            forensic=forensic,
            period=period,
        )
        drill.report_sha256 = hashlib.sha256(md.encode()).hexdigest()
        drill_id = drill.id
    tmp = path.with_suffix(".md.tmp")
    tmp.write_text(md)
    tmp.replace(path)
    return DrillReport(
        drill_id, date, participants, outcome, archive_id, restore_seconds, findings, fus, checks, str(path), md
    )


RUNBOOK_DIR = ("runbook", "drills")


def report_file(ctx: KmsContext, stored: str | None) -> Path | None:
    """Where a drill report lives. Paths are stored relative to KMS_HOME so a moved home
    keeps its reports; rows written before that hold absolute paths, which are re-anchored
    under the current home by their ``runbook/drills/…`` tail."""
    if not stored:
        return None
    p = Path(stored)
    if not p.is_absolute():
        return ctx.home / p
    parts = p.parts
    for i in range(len(parts) - 1, 0, -1):
        if parts[i - 1 : i + 1] == RUNBOOK_DIR:
            moved = ctx.home.joinpath(*parts[i - 1 :])
            return moved if moved.exists() or not p.exists() else p
    return p


def close_followup(ctx: KmsContext, followup_id: int, *, actor: str | None = None, resolution: str) -> dict:
    if not resolution or not resolution.strip():
        raise BackupError("closing a follow-up needs a resolution note")
    with ctx.transaction() as session:
        fu = session.get(DrillFollowup, followup_id, with_for_update=True)
        if fu is None:
            raise BackupError(f"no drill follow-up {followup_id}")
        if fu.status == "closed":
            raise BackupError(f"follow-up {followup_id} is already closed (by {fu.closed_by})")
        fu.status, fu.closed_at, fu.closed_by, fu.resolution = "closed", ctx.now(), actor or ctx.actor, resolution
        return {
            "id": fu.id,
            "title": fu.title,
            "owner": fu.owner,
            "closed_at": fu.closed_at,
            "closed_by": fu.closed_by,
            "late": utc(fu.closed_at) > utc(fu.due_at),
        }


def list_drills(ctx: KmsContext) -> list[dict]:
    with ctx.transaction() as session:
        drills = session.scalars(select(Drill).order_by(Drill.started_at.desc(), Drill.id.desc())).all()
        fus = session.scalars(select(DrillFollowup).order_by(DrillFollowup.id)).all()
        out = []
        for d in drills:
            out.append(
                {
                    "id": d.id,
                    "date": d.drill_date,
                    "outcome": d.outcome,
                    "archive_id": d.archive_id,
                    "restore_seconds": d.restore_seconds,
                    "participants": d.participants,
                    "findings": d.findings,
                    "report_path": str(report_file(ctx, d.report_path)),
                    "followups": [
                        {"id": f.id, "title": f.title, "owner": f.owner, "due_at": utc(f.due_at), "status": f.status}
                        for f in fus
                        if f.drill_id == d.id
                    ],
                }
            )
        return out


def status(ctx: KmsContext) -> dict:
    """The two B4 controls: last drill within ``cadence_days``; no follow-up past due."""
    now = ctx.now()
    with ctx.transaction() as session:
        last = session.scalars(select(Drill).order_by(Drill.started_at.desc())).first()
        overdue = session.scalars(
            select(DrillFollowup).where(DrillFollowup.status == "open", DrillFollowup.due_at < now)
        ).all()
        age = round((now - utc(last.started_at)).total_seconds() / 86400, 2) if last else None
        return {
            "last_drill": last.drill_date if last else None,
            "last_outcome": last.outcome if last else None,
            "age_days": age,
            "within_cadence": age is not None and age <= ctx.policy.drills.cadence_days,
            "overdue_followups": [
                {"id": f.id, "title": f.title, "owner": f.owner, "due_at": utc(f.due_at)} for f in overdue
            ],
        }
