"""Evaluators of section T, retention and retirement (T1-T4): each reads the live state and returns a Finding."""

from __future__ import annotations

import json

from sqlalchemy import select

from ..access import crosscheck
from ..envelope import data_keys as envelope
from ..foundation.clock import utc
from ..foundation.context import KmsContext
from ..foundation.db.models import DESTROYED, REVOKED, ROTATED, Key, KeyVersion, LedgerEntry
from ..keys import dependents, lifecycle, retention, vault
from ..ledger import checkpoints, ledger
from .model import Finding, _finding, _iso, _join

# ---- T: retention and retirement ----------------------------------------------------


def _ledger_for(session, key_name: str, version: int, to_state: str):
    return session.scalars(
        select(LedgerEntry)
        .where(LedgerEntry.key_name == key_name, LedgerEntry.key_version == version, LedgerEntry.to_state == to_state)
        .order_by(LedgerEntry.seq)
    ).first()


def eval_t1(ctx: KmsContext) -> Finding:
    problems, good = [], []
    guards = lifecycle.destroy_guards()
    if "retention" not in guards:
        problems.append("the retention destroy guard is not registered")
    if not ctx.policy.retention.destroy_requires_dual_approval:
        problems.append("the policy file does not require dual control for destruction")
    need = ctx.policy.access.approvals_required
    retained = destroyed = 0
    with ctx.transaction() as session:
        keys = session.scalars(select(Key).where(Key.key_class.in_(retention.RETAINED_CLASSES))).all()
        for key in keys:
            for v in key.versions:
                allowed = retention.destroy_allowed_from(ctx, key, v)
                if v.state in (ROTATED, REVOKED):
                    retained += 1
                    refs = [r for r in (v.wrap_ref, v.sign_ref) if r]
                    missing = [r for r in refs if not ctx.keystore.exists(r)]
                    if missing and (allowed is None or ctx.now() < allowed):
                        problems.append(f"{key.name} v{v.version} is within its retention but its material is gone")
                elif v.state == DESTROYED:
                    destroyed += 1
                    # no destruction time cannot prove the retention was kept: a finding, not a crash
                    if allowed is None or v.destroyed_at is None or utc(v.destroyed_at) < allowed:
                        problems.append(
                            f"{key.name} v{v.version} destroyed {_iso(v.destroyed_at)}, before its "
                            f"retention ended ({_iso(allowed) if allowed else 'never retired'})"
                        )
                    entry = _ledger_for(session, key.name, v.version, DESTROYED)
                    approvers = json.loads(entry.approvers) if entry is not None else []
                    if len(approvers) < need:
                        problems.append(
                            f"{key.name} v{v.version} destroyed with {len(approvers)} approver(s) "
                            f"(dual control needs {need})"
                        )
    if not problems:
        good.append(
            f"{retained} retired root/service version(s) retained with material; {destroyed} destroyed "
            f"after {retention.retention_days(ctx, 'root')} d under dual approval"
        )
    archive_problems, archive_good, warnings, archive_details = _t1_archive(ctx)
    return _finding(
        problems + archive_problems,
        good + archive_good,
        {"retained": retained, "destroyed": destroyed, **archive_details},
        warnings,
    )


def _t1_archive(ctx: KmsContext):
    """T1's second sentence, judged from the vault's copies and retrievals (core/keys/vault.py)."""
    if ctx.objects is None:
        return ["no object store configured: the archive vault cannot be checked"], [], [], {}
    return vault.t1_findings(ctx)


def eval_t2(ctx: KmsContext) -> Finding:
    """Destroyed versions hold no live DEK and no material (key_versions, deks, keystore);
    every version that still has live DEKs still has its key material (deks, keystore)."""

    problems, good = [], []
    if "deks" not in lifecycle.destroy_guards():
        problems.append("the deks destroy guard is not registered")
    with ctx.transaction() as session:
        rows = session.execute(
            select(Key.name, Key.key_class, KeyVersion.version, KeyVersion.wrap_ref)
            .join(KeyVersion)
            .where(KeyVersion.state == DESTROYED, Key.key_class.in_(("data", "export", "backup")))
        ).all()
        for name, _cls, version, _ref in rows:
            n = envelope.deks_on(session, name, version)
            if n:
                problems.append(f"{name} v{version} was destroyed while {n} live DEK(s) were wrapped under it")
    for name, _cls, version, ref in rows:
        if ref and ctx.keystore.exists(ref):
            problems.append(f"{name} v{version} is destroyed but its key material was not erased")
    live, lost = _t2_material_under_live_deks(ctx)
    problems += lost
    if not problems:
        good.append(
            f"{len(rows)} destroyed data/export/backup version(s), none with live DEKs, material erased; "
            f"{live} version(s) with live DEKs all hold their key material"
        )
    return _finding(
        problems,
        good,
        {
            "destroyed": len(rows),
            "versions_with_live_deks": live,
            "records": ["key_versions", "deks", "keystore objects"],
        },
    )


def _t2_material_under_live_deks(ctx: KmsContext) -> tuple[int, list[str]]:
    """Ciphertext is only retained if its key is: a version with live DEKs whose wrapping
    material is gone from the keystore (erased out of band) has made that data unreadable."""

    counts = [c for c in envelope.inventory_counts(ctx) if c.deks]
    with ctx.transaction() as session:
        refs = {
            (k, v): ref
            for k, v, ref in session.execute(select(Key.name, KeyVersion.version, KeyVersion.wrap_ref).join(KeyVersion))
        }
    lost = []
    for c in counts:
        ref = refs.get((c.key, c.version))
        if not ref or not ctx.keystore.exists(ref):
            lost.append(
                f"{c.key} v{c.version} ({c.state}) still wraps {c.deks} live DEK(s) but its key material "
                f"is gone from the keystore"
            )
    return len(counts), lost[:10]


def eval_t3(ctx: KmsContext) -> Finding:
    """Ledger chain, signed WORM checkpoints, and the ledger replayed against key_versions."""
    problems, good = [], []
    result = ledger.verify_with_policy(ctx)
    if result.ok:
        good.append(f"ledger chain verifies ({result.count} entries, head {result.head_hash[:12]}…)")
    else:
        problems.append(f"ledger chain broken at seq {result.first_bad_seq}: {result.problem}")
    audit_result = checkpoints.verify(ctx)
    if not audit_result.ok:
        problems.append(f"ledger/RPTs differ from the signed checkpoints ({audit_result.area}): {audit_result.problem}")
    elif not audit_result.checkpoints:
        problems.append("no signed ledger checkpoint in WORM storage yet")
    else:
        good.append(f"matches {audit_result.checkpoints} signed checkpoint(s), latest {audit_result.latest_checkpoint}")
    with ctx.engine.connect() as conn:
        replay = crosscheck.replay(conn)
    if replay.ok:
        good.append(f"ledger replay reproduces key_versions ({replay.versions} version(s): states and times)")
    else:
        problems.append("ledger replay disagrees with key_versions: " + _join(replay.problems[:3]))
    return _finding(
        problems,
        good,
        {
            "entries": result.count,
            "checkpoints": audit_result.checkpoints,
            "first_bad_seq": result.first_bad_seq or audit_result.first_bad_seq,
            "replay_problems": replay.problems,
            "records": ["ledger_entries", "checkpoint objects (WORM)", "key_versions"],
        },
    )


def eval_t4(ctx: KmsContext) -> Finding:

    problems, good = [], []
    guards = lifecycle.destroy_guards()
    for name in ("dependents", "restore_points"):
        if name not in guards:
            problems.append(f"the {name} destroy guard is not registered")
    checked = 0
    with ctx.transaction() as session:
        for key in session.scalars(select(Key)).all():
            for v in key.versions:
                if v.state == REVOKED:
                    entry = _ledger_for(session, key.name, v.version, REVOKED)
                    emergency = entry is not None and (entry.event_id or (entry.reason or "").startswith("compromise"))
                    missing = [] if emergency else dependents.unconfirmed(session, ctx, key, v)
                    checked += 1
                    if missing:
                        problems.append(
                            f"{key.name} v{v.version} revoked before {', '.join(missing)} confirmed a newer version"
                        )
                elif v.state == DESTROYED:
                    checked += 1
                    for gname in ("dependents", "restore_points"):
                        guard = guards.get(gname)
                        why = guard(session, ctx, key, v) if guard else None
                        if why:
                            problems.append(f"{key.name} v{v.version} destroyed although: {why}")
    if not problems:
        good.append(f"{checked} revoked/destroyed version(s): dependents confirmed, restore points re-keyed")
    return _finding(problems, good, {"checked": checked})
