"""Evaluators of section B, backup, restore and drills (B1-B4): each reads the live state and returns a Finding."""

from __future__ import annotations

import hashlib

from sqlalchemy import select

from ..backup import archive, drills
from ..backup import backups as backup
from ..foundation.context import KmsContext
from ..foundation.db.models_backup import GOOD_STATUSES, PRUNED, Backup, Drill
from ..foundation.objectstore import ObjectNotFound
from .model import FAIL, Finding, _cadence, _finding, _iso

# ---- B: backup, restore, drills -----------------------------------------------------


def eval_b1(ctx: KmsContext) -> Finding:
    problems, good = [], []
    fresh = backup.freshness(ctx)
    limit = ctx.policy.backup.freshness_hours
    if fresh["archive_id"] is None:
        return Finding(FAIL, "no complete backup exists", {"freshness_hours": limit})
    if not fresh["fresh"]:
        problems.append(f"newest backup {fresh['archive_id']} is {fresh['age_hours']} h old (limit {limit} h)")
    with ctx.transaction() as session:
        row = backup.get_backup(session)
        akey, mkey = row.archive_key, row.manifest_key
    head = ctx.objects.head(akey)
    if not (head.locked_at(ctx.now()) and head.lock_mode == "COMPLIANCE"):
        problems.append(
            f"archive {fresh['archive_id']} is not under a COMPLIANCE retention lock "
            f"(retain until {_iso(head.retain_until)}, mode {head.lock_mode or 'none'})"
        )
    manifest = None
    try:
        manifest = backup.verify_manifest(ctx, ctx.objects.get_bytes(mkey))
    except backup.BackupError as exc:
        problems.append(f"manifest of {fresh['archive_id']} does not verify: {exc}")
    if manifest is not None:
        problems += _b1_archive_bytes(ctx, fresh["archive_id"], akey, manifest)
    if not problems:
        good.append(
            f"newest backup {fresh['archive_id']} is {fresh['age_hours']} h old (≤ {limit} h), signed "
            f"manifest verifies, archive bytes match its sha256 and size, locked until "
            f"{_iso(head.retain_until)}"
        )
    return _finding(
        problems,
        good,
        {
            "archive_id": fresh["archive_id"],
            "age_hours": fresh["age_hours"],
            "records": ["backups catalogue", "signed manifest object", "archive object bytes"],
        },
    )


def _b1_archive_bytes(ctx: KmsContext, archive_id: str, archive_key: str, manifest: dict) -> list[str]:
    """Stream the archive object and compare it with the signed manifest: a manifest that
    verifies says nothing about bytes overwritten underneath it."""
    try:
        with ctx.objects.open(archive_key) as f:
            sha, size = archive.hash_stream(f)
    except ObjectNotFound:
        return [f"archive {archive_id} object is missing from the store ({archive_key})"]
    if size != manifest["archive_size"]:
        return [f"archive {archive_id} is {size} bytes, its signed manifest says {manifest['archive_size']}"]
    if sha != manifest["archive_sha256"]:
        return [f"archive {archive_id} bytes do not match the sha256 in its signed manifest (overwritten or corrupted)"]
    return []


def eval_b2(ctx: KmsContext) -> Finding:
    st = drills.status(ctx)
    days = ctx.policy.drills.cadence_days
    if st["last_drill"] is None:
        return Finding(FAIL, "no restore drill has been run", {"cadence_days": days})
    problems, good = [], []
    if not st["within_cadence"]:
        problems.append(f"last drill {st['last_drill']} is {st['age_days']} days old (cadence {days} d)")
    if st["last_outcome"] != "passed":
        last = drills.list_drills(ctx)[0]
        problems.append(f"last drill {st['last_drill']} {st['last_outcome']}: " + "; ".join(last["findings"][:3]))
    if not problems:
        good.append(
            f"last drill {st['last_drill']} passed ({st['age_days']} d ago, cadence {days} d): restored "
            f"into staging, migrations and verifyChain checked"
        )
    return _finding(
        problems, good, {"last_drill": st["last_drill"], "age_days": st["age_days"], "outcome": st["last_outcome"]}
    )


def eval_b3(ctx: KmsContext) -> Finding:
    problems, good, details = _cadence(ctx, "backup")
    now = ctx.now()
    with ctx.transaction() as session:
        rows = session.scalars(select(Backup).where(Backup.status.in_(GOOD_STATUSES + (PRUNED,)))).all()
        keep = backup.gfs_keep_set(ctx, rows, now)
        kept = [(r.archive_id, r.archive_key, r.status, r.gfs_class) for r in rows if r.id in keep]
    if not rows:
        problems.append("no backups: the GFS set is empty")
    for aid, akey, status, _cls in kept:
        if status == PRUNED:
            problems.append(f"archive {aid} belongs to the GFS set but was pruned")
        elif not ctx.objects.exists(akey):
            problems.append(f"archive {aid} belongs to the GFS set but its object is missing")
    p = ctx.policy.backup
    if rows and not any(pr.startswith("archive") for pr in problems):
        good.append(
            f"GFS set holds: {len(kept)} archive(s) kept (latest {p.keep_nightly} + weekly for "
            f"{p.keep_weekly_days} d), {sum(c == 'weekly' for *_, c in kept)} weekly"
        )
    details["gfs_kept"] = [k[0] for k in kept]
    return _finding(problems, good, details)


def eval_b4(ctx: KmsContext) -> Finding:
    with ctx.transaction() as session:
        last = session.scalars(select(Drill).order_by(Drill.started_at.desc(), Drill.id.desc())).first()
        path, digest, date = (last.report_path, last.report_sha256, last.drill_date) if last else (None, None, None)
    if last is None:
        return Finding(FAIL, "no drill has been documented", {})
    problems, good = [], []
    p = drills.report_file(ctx, path)
    if p is None or not p.exists():
        problems.append(f"drill report of {date} is missing ({path})")
    elif digest and hashlib.sha256(p.read_bytes()).hexdigest() != digest:
        problems.append(f"drill report {p.name} was altered after the drill (sha256 differs)")
    st = drills.status(ctx)
    if st["overdue_followups"]:
        problems.append(
            f"{len(st['overdue_followups'])} follow-up(s) past due "
            f"({ctx.policy.drills.remediation_business_days} business days): "
            + ", ".join(f"#{f['id']} {f['title'][:60]} ({f['owner']})" for f in st["overdue_followups"][:5])
        )
    if not problems and p is not None:  # p is None only with a problem recorded above
        open_ = [f for d in drills.list_drills(ctx) for f in d["followups"] if f["status"] == "open"]
        good.append(f"drill {date} documented ({p.name}); {len(open_)} follow-up(s) open, none past due")
    return _finding(problems, good, {"report": path, "overdue": [f["id"] for f in st["overdue_followups"]]})
