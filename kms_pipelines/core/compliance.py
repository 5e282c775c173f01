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

import html
import json
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

from sqlalchemy import select

from .foundation.clock import utc
from .foundation.context import KmsContext

PASS, FAIL, WARN, UNKNOWN = "pass", "fail", "warn", "unknown"
STATUSES = (PASS, FAIL, WARN, UNKNOWN)
SECTIONS = {
    "P": "Key purposes and scope",
    "R": "Rotation cadence",
    "T": "Retention and retirement",
    "A": "Access controls",
    "B": "Backup, restore and drills",
}
TEMPLATE = Path(__file__).resolve().parents[2] / "assets" / "templates" / "compliance_report.html"
PROBE_CLIENT = "kms-compliance-probe"
# Clause text fixes these (A1 names the three roles; A2 caps workload identities at 15 min);
# the policy file must agree with them, which is what A1/A2 check.
A1_ROLES = ("sre_oncall", "security_engineering", "compliance_officer")
A2_MAX_TOKEN_MINUTES = 15
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
    from .keys import lifecycle

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


# ---- P: key purposes ---------------------------------------------------------------


def eval_p1(ctx: KmsContext) -> Finding:
    from .foundation.db.models import ACTIVE, Key, KeyVersion
    from .foundation.db.models_rotation import ServiceSeed
    from .keys import manifest
    from .ledger import rpt_verify

    problems, good = [], []
    chain = rpt_verify.verify_chain(ctx)
    if chain.ok:
        good.append(
            f"RPT chain verifies ({chain.head_seq} token(s), head {chain.head_hash[:12]}…"
            + (f", matches {chain.checked_against}" if chain.checked_against else "")
            + ")"
        )
    else:
        problems.append(f"RPT chain broken at seq {chain.first_bad_seq}: {chain.problem}")
    with ctx.transaction() as session:
        root_active = session.scalars(
            select(KeyVersion.version).join(Key).where(Key.name == "root", KeyVersion.state == ACTIVE)
        ).first()
        live_service = set(
            session.execute(
                select(Key.name, KeyVersion.version)
                .join(KeyVersion)
                .where(Key.key_class == "service", KeyVersion.state.in_(("active", "rotated")))
            ).all()
        )
        seeds = session.execute(select(ServiceSeed.key_name, ServiceSeed.key_version, ServiceSeed.root_version)).all()
    stray = [f"{k} v{v} (under root v{rv})" for k, v, rv in seeds if (k, v) in live_service and rv != root_active]
    if stray:
        problems.append(f"service seeds not wrapped under the active root v{root_active}: {', '.join(stray[:5])}")
    else:
        good.append(
            f"{sum((k, v) in live_service for k, v, _ in seeds)} service seed(s) wrapped under root v{root_active}"
        )
    trust = manifest.verify_chain(ctx)
    if trust.ok:
        good.append(f"root manifest chain verifies ({trust.count} manifest(s))")
    else:
        problems.append(f"root manifest chain broken: {trust.problem}")
    return _finding(
        problems,
        good,
        {"rpt_head_seq": chain.head_seq, "rpt_ok": chain.ok, "manifests": trust.count, "seeds": len(seeds)},
    )


def eval_p2(ctx: KmsContext) -> Finding:
    from .keys import service_keys

    problems, good, per = [], [], {}
    for service in ctx.policy.key_class("service").names or []:
        steps = []
        if not ctx.read_only:  # issuing a probe credential writes; an --at evaluation writes nothing
            cred = service_keys.issue_credential(ctx, service, PROBE_CLIENT)
            check = service_keys.verify_credential(ctx, service, cred)
            steps.append(("credential", bool(check), check.problem))
        blob = service_keys.encrypt_secret(ctx, service, "compliance-probe", b"compliance-probe")
        ok = service_keys.decrypt_secret(ctx, service, "compliance-probe", blob) == b"compliance-probe"
        steps.append(("app secret", ok, None if ok else "decrypted value differs"))
        signed = service_keys.sign_audit_event(ctx, service, {"probe": "compliance", "at": ctx.now().isoformat()})
        vcheck = service_keys.verify_audit_event(ctx, signed)
        steps.append(("audit signature", bool(vcheck), vcheck.problem))
        per[service] = {name: ok for name, ok, _ in steps}
        for name, ok, why in steps:
            if not ok:
                problems.append(f"{service}: {name} round trip failed ({why})")
    if not problems:
        probes = (
            "app-secret and audit-signature (credential probe skipped: read-only --at evaluation)"
            if ctx.read_only
            else "credential, app-secret and audit-signature"
        )
        good.append(f"{probes} round trips pass for {len(per)} service(s)")
    return _finding(problems, good, {"services": per})


def eval_p3(ctx: KmsContext) -> Finding:
    from .envelope import data_keys as envelope
    from .keys import lifecycle

    problems, good = [], []
    names = [f"data:{n}" for n in ctx.policy.key_class("data").names or []]
    with ctx.transaction() as session:
        refs = {}
        for name in names:
            v = lifecycle.active_version(lifecycle.get_key(session, name))
            refs[name] = (v.version, v.wrap_ref) if v is not None else (None, None)
    for name, (version, ref) in refs.items():
        if not ref:
            problems.append(f"{name} has no active wrapping version")
            continue
        aad = f"compliance-canary|{name}|v{version}".encode()
        wrapped = ctx.keystore.new_wrapped_dek(ref)
        blob = ctx.keystore.dek_encrypt(ref, wrapped, b"compliance-canary", aad)
        if ctx.keystore.dek_decrypt(ref, wrapped, blob, aad) != b"compliance-canary":
            problems.append(f"{name} v{version}: canary envelope round trip returned other bytes")
    counts = envelope.inventory_counts(ctx)
    orphans = [c for c in counts if c.state == "unknown" and c.deks]
    if orphans:
        problems.append(
            "DEKs wrapped under versions that do not exist: "
            + ", ".join(f"{c.key} v{c.version} ({c.deks})" for c in orphans[:5])
        )
    live = sum(c.deks for c in counts)
    if not problems:
        good.append(
            f"canary envelope round trip passes under {len(refs)} data key(s); DEK inventory: {live} live, "
            f"{sum(c.shredded for c in counts)} shredded, over {len(counts)} key version(s)"
        )
    return _finding(problems, good, {"deks_by_version": [asdict(c) for c in counts]})


def eval_p4(ctx: KmsContext) -> Finding:
    from .response import escrow

    problems = escrow.current_problems(ctx)
    cur = escrow.current_package(ctx)
    good = (
        [
            f"break-glass v{cur.key_version} sealed in package {cur.package_id} "
            f"({cur.threshold} of {len(cur.custodians)}, sealed {_iso(cur.created_at)})"
        ]
        if cur
        else []
    )
    return _finding(list(problems), good, {"package": cur.package_id if cur else None})


# ---- R: rotation --------------------------------------------------------------------


def eval_r1(ctx: KmsContext) -> Finding:
    """Root cadence (key_versions), published manifest (object store), partner notices
    (partner_notices) confirmed by channel deliveries (notification_deliveries)."""
    from .keys import manifest, rotation

    problems, good, details = _cadence(ctx, "root")
    warnings = []
    active = next((k for k in details["keys"]), None)
    latest = manifest.latest(ctx)
    if active is not None:
        if latest is None or latest.version != active["version"]:
            problems.append(
                f"fingerprints of root v{active['version']} are not published "
                f"(latest manifest: {('v' + str(latest.version)) if latest else 'none'})"
            )
        else:
            good.append(f"manifest {latest.kid} published")
    check = rotation.check_partners(ctx)
    if check.overdue:
        problems.append(
            "partners not notified within the deadline: "
            + ", ".join(f"{r.partner}@v{r.version} (due {_iso(r.deadline)})" for r in check.overdue)
        )
    if check.late:
        problems.append("partners notified late: " + ", ".join(f"{r.partner}@v{r.version}" for r in check.late))
    channel_ok, p, w = _r1_channel_deliveries(ctx, check.rows)
    problems += p
    warnings += w
    if check.rows and not check.overdue and not check.late and not p:
        hours = ctx.policy.key_class("root").partner_notice_hours
        good.append(
            f"{channel_ok}/{len(check.rows)} partner notice(s) delivered by email/Slack within {hours} h; "
            f"{len(check.unacked)} awaiting ack"
        )
    details["partner_notices"] = len(check.rows)
    details["channel_deliveries"] = channel_ok
    details["records"] = ["key_versions", "root manifests (object store)", "partner_notices", "notification_deliveries"]
    return _finding(problems, good, details, warnings)


def _r1_channel_deliveries(ctx: KmsContext, rows) -> tuple[int, list[str], list[str]]:
    """A partner notice counts as delivered only through a real channel (email or Slack);
    one that reached only the local outbox is a warning, a notice marked sent with no
    delivery record at all is a failure."""
    from .access import notifications
    from .keys import manifest

    sent = [r for r in rows if r.notified_at is not None]
    refs = {f"{r.partner}:{manifest.kid(r.version)}": r for r in sent}
    found = notifications.deliveries_by_ref(ctx, ("root_rotation_partner_notice",), refs)
    problems, warnings, ok = [], [], 0
    for ref, d in found.items():
        r = refs[ref]
        if not d.recorded:
            problems.append(f"partner notice {r.partner}@v{r.version} is marked sent but no delivery is recorded")
        elif d.delivered:
            ok += 1
        elif d.outbox_only:
            warnings.append(
                f"partner notice {r.partner}@v{r.version} went only to the local outbox (no SMTP or "
                f"Slack configured): not delivered to the partner"
            )
        else:
            problems.append(f"partner notice {r.partner}@v{r.version} failed: {', '.join(d.failed[:2])}")
    return ok, problems[:10], warnings[:10]


def eval_r2(ctx: KmsContext) -> Finding:
    from .response import compromise

    problems, good, details = _cadence(ctx, "service")
    sla = ctx.policy.events.response_sla_hours
    late = compromise.response_overdue(ctx, sla)
    open_ = compromise.open_events(ctx)
    warnings = []
    if late:
        problems.append(
            f"{len(late)} security event(s) unanswered past {sla} h: "
            + ", ".join(f"{e.type} on {e.key} ({e.id[:12]})" for e in late[:5])
        )
    elif open_:
        warnings.append(f"{len(open_)} security event(s) being answered (within the {sla} h SLA)")
    else:
        good.append("no open security events")
    resolved, unlinked = _r2_linked_responses(ctx)
    problems += unlinked
    if resolved and not unlinked:
        good.append(f"{resolved} resolved security event(s), each with its response in the ledger")
    details["open_events"] = [e.id for e in open_]
    details["records"] = ["security_events", "ledger_entries", "notification_deliveries"]
    return _finding(problems, good, details, warnings)


def _r2_linked_responses(ctx: KmsContext) -> tuple[int, list[str]]:
    """A resolved event must show its response in records other than its own status: a
    ledger rotation (or revocation) linked to the event, or of the reported version after it
    was reported; a compromise must leave the reported version revoked or destroyed."""
    from .foundation.db.models import LedgerEntry
    from .foundation.db.models_events import EVENT_RESOLVED, SecurityEvent

    problems, n = [], 0
    with ctx.transaction() as session:
        resolved = session.scalars(
            select(SecurityEvent).where(SecurityEvent.status == EVENT_RESOLVED).order_by(SecurityEvent.seq)
        ).all()
        for ev in resolved:
            n += 1
            linked = session.scalars(select(LedgerEntry.to_state).where(LedgerEntry.event_id == ev.id)).all()
            later = (
                session.execute(
                    select(LedgerEntry.to_state).where(
                        LedgerEntry.key_name == ev.key_name,
                        LedgerEntry.key_version == ev.key_version,
                        LedgerEntry.to_state.in_(("rotated", "revoked", "destroyed")),
                        LedgerEntry.at >= ev.reported_at,
                    )
                )
                .scalars()
                .all()
            )
            ended = set(linked) | set(later)
            if not ev.response or not (linked or later):
                problems.append(
                    f"security event {ev.id[:12]} ({ev.type} on {ev.key_name}) is resolved but no "
                    f"ledger entry shows a response (no rotation or revocation linked to it)"
                )
            elif ev.type == "compromise" and not ({"revoked", "destroyed"} & ended):
                problems.append(
                    f"compromise event {ev.id[:12]} is resolved but {ev.key_name} v{ev.key_version} was never revoked"
                )
    return n, problems[:10]


def eval_r3(ctx: KmsContext) -> Finding:
    from .envelope import data_keys as envelope
    from .envelope import export_keys
    from .foundation.db.models import Key, KeyVersion

    problems, good, details = _cadence(ctx, "data")
    warnings = []
    stranded = envelope.stranded(ctx)
    with ctx.transaction() as session:
        rotated_at = {
            (k, v): utc(t)
            for k, v, t in session.execute(select(Key.name, KeyVersion.version, KeyVersion.rotated_at).join(KeyVersion))
            if t
        }
    grace = timedelta(days=1)  # the sweep runs every night after the rotations
    for s in stranded:
        if lifecycle_class(s.key) == "export":
            continue  # export keys are judged by their expiry below
        since = rotated_at.get((s.key, s.version))
        if s.state == "rotated" and since is not None and ctx.now() - since < grace:
            warnings.append(f"{s.deks} DEK(s) on {s.key} v{s.version} rotated {_iso(since)}, awaiting the sweep")
        else:
            problems.append(f"{s.deks} DEK(s) still wrapped under {s.state} {s.key} v{s.version}")
    due = export_keys.due(ctx)
    if due:
        problems.append(
            "expired export keys still alive: " + ", ".join(f"{d.key} (expired {_iso(d.expired_at)})" for d in due[:5])
        )
    if not stranded and not due:
        good.append("no DEK on a retired version; no expired export key alive")
    details["stranded"] = [asdict(s) for s in stranded]
    details["expired_exports"] = [d.key for d in due]
    return _finding(problems, good, details, warnings)


def lifecycle_class(name: str) -> str:
    return name.split(":", 1)[0]


def eval_r4(ctx: KmsContext) -> Finding:
    from .response import escrow

    problems, good, details = _cadence(ctx, "break-glass")
    overdue = escrow.destruction_overdue(ctx)
    if overdue:
        problems.append(
            "superseded escrow packages not confirmed destroyed: "
            + ", ".join(f"{o['package_id']} (missing {', '.join(o['missing'])})" for o in overdue[:5])
        )
    stale = [p for p in escrow.current_problems(ctx) if "days old" in p or "seals v" in p]
    problems.extend(stale)
    if not overdue:
        superseded = [p for p in escrow.packages(ctx) if p.superseded_at is not None]
        good.append(f"{len(superseded)} superseded package(s), every due destruction confirmed")
    details["destruction_overdue"] = overdue
    return _finding(problems, good, details)


# ---- T: retention and retirement ----------------------------------------------------


def _ledger_for(session, key_name: str, version: int, to_state: str):
    from .foundation.db.models import LedgerEntry

    return session.scalars(
        select(LedgerEntry)
        .where(LedgerEntry.key_name == key_name, LedgerEntry.key_version == version, LedgerEntry.to_state == to_state)
        .order_by(LedgerEntry.seq)
    ).first()


def eval_t1(ctx: KmsContext) -> Finding:
    from .foundation.db.models import DESTROYED, REVOKED, ROTATED, Key
    from .keys import lifecycle, retention

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
                    if allowed is None or utc(v.destroyed_at) < allowed:
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
    from .keys import vault

    if ctx.objects is None:
        return ["no object store configured: the archive vault cannot be checked"], [], [], {}
    return vault.t1_findings(ctx)


def eval_t2(ctx: KmsContext) -> Finding:
    """Destroyed versions hold no live DEK and no material (key_versions, deks, keystore);
    every version that still has live DEKs still has its key material (deks, keystore)."""
    from .envelope import data_keys as envelope
    from .foundation.db.models import DESTROYED, Key, KeyVersion
    from .keys import lifecycle

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
    from .envelope import data_keys as envelope
    from .foundation.db.models import Key, KeyVersion

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
    from .access import crosscheck
    from .ledger import checkpoints, ledger

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
    from .foundation.db.models import DESTROYED, REVOKED, Key
    from .keys import dependents, lifecycle

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


# ---- A: access --------------------------------------------------------------------


def eval_a1(ctx: KmsContext) -> Finding:
    from .access import principals as access

    problems, good = [], []
    pol = ctx.policy.access
    if sorted(pol.roles) != sorted(A1_ROLES):
        problems.append(f"policy roles are {sorted(pol.roles)}, the clause allows exactly {list(A1_ROLES)}")
    stray = {
        op: sorted(set(roles) - set(pol.roles)) for op, roles in pol.permissions.items() if set(roles) - set(pol.roles)
    }
    if stray:
        problems.append(f"permission matrix grants to roles outside the policy: {stray}")
    material = ("decrypt", "encrypt", "sign", "export", "rotate", "destroy", "break-glass")
    missing = [op for op in material if op not in pol.permissions]
    if missing:
        problems.append(f"permission matrix lacks {missing}")
    principals = access.list_principals(ctx)
    for p in principals:
        if p["kind"] == "human" and (not p["roles"] or set(p["roles"]) - set(pol.roles)):
            problems.append(f"principal {p['name']} holds roles {p['roles']} outside the policy")
        if p["kind"] == "workload" and p["name"] not in pol.workload_principals:
            problems.append(f"workload principal {p['name']} is not declared in the policy")
    humans = [p for p in principals if p["kind"] == "human"]
    actors, strangers = _a1_audit_actors(ctx, principals)
    problems += strangers
    if not problems:
        good.append(
            f"roles {sorted(pol.roles)}; matrix of {len(pol.permissions)} permissions; "
            f"{len(humans)} human and {len(pol.workload_principals)} workload principal(s) within it; "
            f"all {actors} audit actor(s) enrolled or declared"
        )
    return _finding(
        problems,
        good,
        {
            "principals": [{k: p[k] for k in ("name", "kind", "roles")} for p in principals],
            "records": ["policy roles", "principals", "audit_events actors"],
        },
    )


def _a1_audit_actors(ctx: KmsContext, principals: list[dict]) -> tuple[int, list[str]]:
    """Who really acted: every actor of a successful operation in the audit log must be an
    enrolled principal, an escrow custodian, a declared workload or one of the KMS's own
    declared service actors -- a name nobody enrolled is access outside the role model."""
    from sqlalchemy import func

    from .foundation.db.models_access import AuditEvent
    from .foundation.db.models_events import EscrowCustodian
    from .ledger import audit

    pol = ctx.policy.access
    audit.flush(ctx)
    with ctx.engine.connect() as conn:
        rows = conn.execute(
            select(AuditEvent.actor, func.count(), func.min(AuditEvent.seq))
            .where(AuditEvent.outcome == "ok")
            .group_by(AuditEvent.actor)
        ).all()
        custodians = set(conn.execute(select(EscrowCustodian.name)).scalars())
    known = (
        {p["name"] for p in principals}
        | set(pol.workload_principals)
        | custodians
        | {a for a in pol.service_actors if not a.endswith("*")}
    )
    families = tuple(a[:-1] for a in pol.service_actors if a.endswith("*"))
    strangers = sorted(
        (seq, actor, n)
        for actor, n, seq in rows
        if actor not in known and not (families and actor.startswith(families))
    )
    return len(rows), [
        f"audit actor {actor!r} is no enrolled principal or declared workload ({n} operation(s), "
        f"first at audit seq {seq})"
        for seq, actor, n in strangers[:5]
    ]


def eval_a2(ctx: KmsContext) -> Finding:
    from .access import principals as access
    from .foundation.db.models_access import AuditEvent

    problems, good, warnings = [], [], []
    cap = ctx.policy.access.workload_token_ttl_minutes
    if cap > A2_MAX_TOKEN_MINUTES:
        problems.append(f"policy token TTL {cap} min exceeds the clause's {A2_MAX_TOKEN_MINUTES} min")
    principal = next(iter(sorted(ctx.policy.access.workload_principals)), None)
    if principal:
        claims = access.verify_workload_token(ctx, access.issue_workload_token(ctx, principal))
        lifetime = (claims.exp - claims.iat) / 60
        if lifetime > cap:
            problems.append(f"a fresh workload token lives {lifetime:g} min (cap {cap})")
        else:
            good.append(f"workload tokens live {lifetime:g} min (cap {cap})")
    since = ctx.now() - timedelta(days=ctx.policy.audit.baseline_days)
    with ctx.engine.connect() as conn:
        issued = (
            conn.execute(
                select(AuditEvent.detail).where(
                    AuditEvent.operation == "token.issue", AuditEvent.outcome == "ok", AuditEvent.at >= since
                )
            )
            .scalars()
            .all()
        )
    too_long = 0
    for detail in issued:
        try:
            if int(json.loads(detail or "{}").get("ttl_seconds", 0)) > cap * 60:
                too_long += 1
        except (ValueError, TypeError, AttributeError):
            continue
    if too_long:
        problems.append(f"{too_long} workload token(s) issued with a lifetime over {cap} min")
    humans = [p for p in access.list_principals(ctx) if p["kind"] == "human" and not p["disabled"]]
    approvers = [p for p in humans if "approve" in p["permissions"]]
    no_totp = [p["name"] for p in approvers if not p["totp_enrolled"]]
    now = ctx.now()
    able = [p for p in approvers if p["totp_enrolled"] and p["approve_after"] is not None and p["approve_after"] <= now]
    need = ctx.policy.access.approvals_required
    if no_totp:
        problems.append(f"approvers without TOTP enrolment: {', '.join(no_totp)}")
    elif len(able) < need or len(humans) < need + 1:
        warnings.append(
            f"cannot approve any manual operation: dual control needs {need} approvers besides a "
            f"requester; {len(able)} principal(s) may approve now (past the cooling-off) of "
            f"{len(humans)} active human principal(s)"
        )
    else:
        good.append(f"{len(able)} approver(s) past the cooling-off, all TOTP-enrolled")
    admins = [p for p in able if "principals" in p["permissions"]]
    if humans and len(admins) < need + 1:
        warnings.append(
            f"no principal can be enrolled, re-roled or removed: that needs {need + 1} principals "
            f"holding 'principals' (a requester and {need} approvers); {len(admins)} can act now"
        )
    good.append(
        f"{len(issued)} token(s) issued in {ctx.policy.audit.baseline_days} d, none over the cap"
        if not too_long
        else ""
    )
    console_problems, console_good = _a2_console_factors(ctx)
    problems += console_problems
    good += console_good
    return _finding(
        problems, good, {"cap_minutes": cap, "tokens_checked": len(issued), "approvers": len(approvers)}, warnings
    )


_FACTOR_NAMES = {
    "fido2-hardware": "a hardware FIDO2 key (its keys are software authenticators, which the policy "
    "does not allow: console.allow_software_authenticators)"
}


def _a2_console_factors(ctx: KmsContext) -> tuple[list[str], list[str]]:
    """A2's console half: every enabled human principal with a role has a registered FIDO2
    security key and a TOTP enrolment (``kms console`` signs in with both)."""
    from .access import console_auth

    gaps = console_auth.missing_console_factors(ctx)
    if gaps:
        return [
            "console principals without both factors: "
            + "; ".join(
                f"{name} lacks {' and '.join(_FACTOR_NAMES.get(f, f) for f in m)}" for name, m in sorted(gaps.items())
            )
        ], []
    return [], ["every console principal with a role has a FIDO2 security key and TOTP"]


def eval_a3(ctx: KmsContext) -> Finding:
    from .access import anomalies
    from .ledger import audit

    problems, good = [], []
    result = audit.verify(ctx)
    if result.ok:
        good.append(f"audit chain verifies ({result.count} events)")
    else:
        problems.append(f"audit chain broken at seq {result.first_bad_seq}: {result.problem}")
    problems += _a3_ledger_matches_audit(ctx, good)
    problems += _a3_audit_matches_checkpoints(ctx, good)
    coverage = anomalies.detection_coverage(ctx)
    if coverage["gap"]:
        problems.append(coverage["gap"])
    else:
        good.append(f"anomaly detection covers every event through {_iso(coverage['through'])}")
    pending = anomalies.unreviewed(ctx)
    # found by a detection run held in memory (kms report --at) and so never reviewed
    unstored = [
        a
        for a in (ctx.detection.new if ctx.detection is not None else [])
        if a.severity in ctx.policy.audit.review_severities
    ]
    names = [f"#{a.id} {a.kind}" for a in pending] + [f"{a.kind} (found by this report, not stored)" for a in unstored]
    if names:
        problems.append(
            f"{len(names)} unreviewed {'/'.join(ctx.policy.audit.review_severities)} anomaly(ies): "
            + ", ".join(names[:5])
        )
    else:
        good.append("no unreviewed high-severity anomaly")
    return _finding(
        problems,
        good,
        {
            "events": result.count,
            "unreviewed": [a.id for a in pending],
            "records": ["audit_events", "ledger_entries", "key_versions", "audit cursor"],
        },
    )


def _a3_audit_matches_checkpoints(ctx: KmsContext, good: list[str]) -> list[str]:
    """The audit log is immutable only if a cut of its tail shows: its head is signed into
    every checkpoint in WORM storage."""
    from .ledger import checkpoints

    if ctx.objects is None:
        return []
    problem = checkpoints.audit_problem(ctx)
    if problem:
        return [problem]
    good.append("audit log holds every event the signed checkpoints recorded")
    return []


def _a3_ledger_matches_audit(ctx: KmsContext, good: list[str]) -> list[str]:
    """Every key-state change is in both the ledger and the audit log, and every new
    version's material was generated through the audited keystore."""
    from .access import crosscheck
    from .ledger import audit

    audit.flush(ctx)
    with ctx.engine.connect() as conn:
        cross = crosscheck.ledger_vs_audit(conn)
    if cross.ok:
        good.append(f"ledger and audit log agree event for event ({cross.entries} ledger entries)")
    return cross.problems[:5]


def _is_manual(ctx: KmsContext, key_name: str, to_state: str, reason: str | None, event_id: str | None) -> bool:
    if reason == "manual":
        return True
    if to_state == "destroyed" and ctx.policy.retention.destroy_requires_dual_approval:
        return lifecycle_class(key_name) != "export"  # export expiry crypto-shreds automatically (R3)
    if to_state == "revoked":
        return not event_id  # sensor-driven compromise response carries its event id
    return False


def eval_a4(ctx: KmsContext) -> Finding:
    """Manual ops: dual approval and a ticket (ledger), a delivered compliance notification
    per ticket (notification_deliveries), state changes only through the ledger (key_versions)."""
    from .access import crosscheck, notifications
    from .foundation.db.models import LedgerEntry

    problems, good, warnings = [], [], []
    need = ctx.policy.access.approvals_required
    manual = bad = 0
    tickets: dict[str, int] = {}
    with ctx.engine.connect() as conn:
        rows = conn.execution_options(stream_results=True, yield_per=5000).execute(
            select(
                LedgerEntry.seq,
                LedgerEntry.key_name,
                LedgerEntry.key_version,
                LedgerEntry.to_state,
                LedgerEntry.reason,
                LedgerEntry.event_id,
                LedgerEntry.approvers,
                LedgerEntry.change_ticket,
            ).order_by(LedgerEntry.seq)
        )
        for seq, key, version, to_state, reason, event_id, approvers, ticket in rows:
            if not _is_manual(ctx, key, to_state, reason, event_id):
                continue
            manual += 1
            if ticket:
                tickets.setdefault(ticket, seq)
            names = json.loads(approvers or "[]")
            if len(set(names)) < need or not ticket:
                bad += 1
                if bad <= 5:
                    problems.append(
                        f"ledger seq {seq} ({key} v{version} → {to_state}) has {len(set(names))} "
                        f"approver(s) and ticket {ticket or 'none'}"
                    )
        replay = crosscheck.replay(conn)
    if bad > 5:
        problems.append(f"… {bad} manual ledger entries without dual approval in all")
    problems += _a4_state_outside_ledger(replay)
    notified, p, w = _a4_notifications(ctx, tickets)
    problems += p
    warnings += w
    st = notifications.delivery_status(ctx)
    if not st.ok:
        problems.append(
            f"{len(st.unresolved)} notification(s) undelivered in {st.window_hours} h: "
            + ", ".join(f"{u['kind']} via {u['channel']}" for u in st.unresolved[:5])
        )
    if not problems:
        good.append(
            f"{manual} manual ledger operation(s), each with ≥{need} approvers and a ticket; "
            f"{notified}/{len(tickets)} ticket(s) notified by email/Slack; "
            f"{st.delivered} notification(s) delivered in {st.window_hours} h, none failed; "
            f"key_versions changed only through the ledger"
        )
    return _finding(
        problems,
        good,
        {
            "manual_ops": manual,
            "without_dual_approval": bad,
            "undelivered": len(st.unresolved),
            "tickets": len(tickets),
            "tickets_notified": notified,
            "records": ["ledger_entries", "notification_deliveries", "key_versions"],
        },
        warnings,
    )


def _a4_state_outside_ledger(replay) -> list[str]:
    """A state change that bypassed the ledger bypassed the approvals too."""
    edits = [p for p in replay.problems if p.startswith("key_versions:")]
    return [f"key state changed with no ledger entry (so no approval): {_join(edits[:3])}"] if edits else []


def _a4_notifications(ctx: KmsContext, tickets: dict[str, int]) -> tuple[int, list[str], list[str]]:
    """(tickets notified, problems, warnings): a manual operation counts as notified only
    when its compliance notification reached a real channel and none of its channels failed."""
    from .access import notifications

    found = notifications.deliveries_by_ref(ctx, notifications.MANUAL_KINDS, tickets)
    problems, warnings, notified = [], [], 0
    for ticket, d in found.items():
        seq = tickets[ticket]
        if not d.recorded:
            problems.append(f"manual operation {ticket} (ledger seq {seq}): no compliance notification recorded")
        elif d.failed:
            problems.append(
                f"manual operation {ticket} (ledger seq {seq}) not notified: "
                f"delivery failed on {', '.join(d.failed[:2])}"
            )
        elif d.outbox_only:
            warnings.append(
                f"manual operation {ticket}: notification written only to the local outbox "
                f"(no SMTP or Slack configured)"
            )
        else:
            notified += 1
    return notified, problems[:10], warnings[:5]


# ---- B: backup, restore, drills -----------------------------------------------------


def eval_b1(ctx: KmsContext) -> Finding:
    from .backup import backups as backup

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
    from .backup import archive
    from .foundation.objectstore import ObjectNotFound

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
    from .backup import drills

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
    from .backup import backups as backup
    from .foundation.db.models_backup import GOOD_STATUSES, PRUNED, Backup

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
    import hashlib

    from .backup import drills
    from .foundation.db.models_backup import Drill

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
    if not problems:
        open_ = [f for d in drills.list_drills(ctx) for f in d["followups"] if f["status"] == "open"]
        good.append(f"drill {date} documented ({p.name}); {len(open_)} follow-up(s) open, none past due")
    return _finding(problems, good, {"report": path, "overdue": [f["id"] for f in st["overdue_followups"]]})


# ---- the catalogue ----------------------------------------------------------------

CLAUSES: tuple[Clause, ...] = (
    Clause(
        "P1",
        "Root key signs RPTs, seeds service keys, anchors the trust chain",
        "RPT issue/verifyChain; service seeds wrapped under root; signed root manifests",
        eval_p1,
        ("rpt_chain/rpt_chain_verifies", "keys_root/root_manifest_chain_verifies"),
    ),
    Clause(
        "P2",
        "Service keys issue API credentials, encrypt app secrets, sign audit events",
        "service key APIs (credential, app-secret, audit-signature round trips)",
        eval_p2,
    ),
    Clause(
        "P3",
        "Data keys encrypt at-rest datasets and sensitive artifacts",
        "envelope encryption (canary round trip) + DEK inventory",
        eval_p3,
        ("key_inventory/inventory_frames_valid",),
    ),
    Clause(
        "P4",
        "Break-glass keys held in escrow",
        "sealed M-of-N escrow package",
        eval_p4,
        ("break_glass_escrow/escrow_current",),
    ),
    Clause(
        "R1",
        "Root every 90 d; publish fingerprints; notify partners within 24 h",
        "root rotation + public-key manifest + partner notice check",
        eval_r1,
        ("key_inventory/keys_within_cadence", "keys_root/partners_notified_within_24h"),
    ),
    Clause(
        "R2",
        "Service keys every 60 d, or at once on compromise / tenant rotation / CI secret exposure",
        "cadence reconcile + security-event sensor and compromise_response",
        eval_r2,
        ("key_inventory/keys_within_cadence", "security_events/security_events_answered"),
    ),
    Clause(
        "R3",
        "Data keys every 180 d via envelope re-encryption; export keys at export expiry",
        "cadence reconcile + DEK rewrap sweep + export-expiry sensor",
        eval_r3,
        ("key_inventory/keys_within_cadence", "dek_rewrap_sweep/no_deks_on_retired_versions"),
    ),
    Clause(
        "R4",
        "Break-glass rotated and resealed every 30 d; old packages destroyed",
        "escrow rotation + destruction confirmations",
        eval_r4,
        ("break_glass_escrow/escrow_current", "break_glass_escrow/escrow_destruction_confirmed"),
    ),
    Clause(
        "T1",
        "Expired root/service keys kept 365 d; archive copies under dual control",
        "retention destroy guard + dual-approved destruction + verified, locked archive copies and "
        "dual-approved retrievals",
        eval_t1,
        ("key_vault/archive_copies_verify",),
    ),
    Clause(
        "T2",
        "Data keys kept until all ciphertext is re-keyed, then shredded",
        "deks destroy guard + keystore erase",
        eval_t2,
        ("dek_rewrap_sweep/no_deks_on_retired_versions",),
    ),
    Clause(
        "T3",
        "Immutable ledger of key states with timestamps, approvers, tickets",
        "hash-chained ledger + signed WORM checkpoints",
        eval_t3,
        ("kms_state/ledger_chain_intact", "ledger_checkpoint/ledger_matches_checkpoints"),
    ),
    Clause(
        "T4",
        "Dependents confirm before revoke; destroy only after restore points are re-encrypted",
        "dependents and restore_points guards",
        eval_t4,
    ),
    Clause(
        "A1",
        "Least privilege: only sre_oncall, security_engineering, compliance_officer",
        "roles + permission matrix from the policy",
        eval_a1,
    ),
    Clause(
        "A2",
        "FIDO2 + TOTP console access; workload identities ≤ 15 min",
        "kms console: FIDO2 key + TOTP per principal with a role; FIDO2 + TOTP on approvals; workload token TTL cap",
        eval_a2,
    ),
    Clause(
        "A3",
        "Every KMS operation logged, immutable, with anomaly detection",
        "hash-chained audit log + anomaly review",
        eval_a3,
        ("audit_anomalies/audit_chain_intact", "audit_anomalies/no_unreviewed_high_anomalies"),
    ),
    Clause(
        "A4",
        "Manual operations: dual authorization, recorded approvals, Slack/email notifications",
        "single-use approvals bound to ticket + notification delivery log",
        eval_a4,
        ("notification_deliveries/notifications_delivered",),
    ),
    Clause(
        "B1",
        "Nightly backup of PostgreSQL + artifacts/kms to tamper-evident storage",
        "nightly backup + signed manifest + Object Lock",
        eval_b1,
        ("nightly_backup/backup_fresh", "nightly_backup/backup_manifest_verifies", "nightly_backup/backup_locked"),
    ),
    Clause(
        "B2",
        "Monthly restore into staging, migrations, verifyChain",
        "restore drill job",
        eval_b2,
        ("restore_drill_report/drill_within_cadence",),
    ),
    Clause(
        "B3",
        "7 nightly + weekly copies for 3 months; archives under a rotating key",
        "GFS retention + backup key cadence",
        eval_b3,
    ),
    Clause(
        "B4",
        "Every drill documented; gaps remediated within 5 business days",
        "drill report + follow-up check",
        eval_b4,
        ("restore_drill_report/drill_followups_on_time",),
    ),
)


def clause(clause_id: str) -> Clause:
    for c in CLAUSES:
        if c.id == clause_id:
            return c
    raise KeyError(f"unknown clause {clause_id!r}")


def evaluate(ctx: KmsContext, c: Clause) -> Finding:
    """Run one evaluator; a crash is a failure naming the error, never a silent pass."""
    from .foundation import retry

    try:
        # Evaluators only read: one is the unit retried after a lost database connection.
        finding = retry.db_call(ctx, lambda: c.evaluate(ctx), what=f"evaluating clause {c.id}", rerun="kms report")
        if not isinstance(finding, Finding):
            raise TypeError(f"evaluator returned {type(finding).__name__}, not Finding")
        return finding
    except retry.DependencyUnavailable:
        raise  # an unreachable database is not a policy failure: the report stops, saying so
    except Exception as exc:  # noqa: BLE001 -- reported as the clause's failure
        message = str(exc).splitlines()[0][:300] if str(exc) else ""
        return Finding(FAIL, f"evaluation failed: {type(exc).__name__}: {message}", {"error": type(exc).__name__})


Evidence = Callable[[Clause], "list[dict]"]


def build_report(ctx: KmsContext, *, evidence: Evidence | None = None, only: Iterable[str] | None = None) -> Report:
    """Evaluate every clause (or ``only`` those ids) against the live state."""
    wanted = set(only) if only else None
    rows = []
    for c in CLAUSES:
        if wanted is not None and c.id not in wanted:
            continue
        started = time.perf_counter()
        f = evaluate(ctx, c)
        evidence_text = f.evidence if len(f.evidence) <= _MAX_EVIDENCE else f.evidence[: _MAX_EVIDENCE - 1] + "…"
        checks: list[dict] = []
        if evidence is not None:
            try:
                checks = list(evidence(c))
            except Exception as exc:  # noqa: BLE001 -- evidence lookup must not hide the row
                checks = [{"check": "(lookup failed)", "passed": None, "error": type(exc).__name__}]
        rows.append(
            Row(
                c.id,
                c.section,
                c.text,
                c.control,
                f.status,
                evidence_text,
                f.details,
                checks,
                round(time.perf_counter() - started, 3),
            )
        )
    return Report(rows, ctx.now(), _overall(rows))


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


def checks_summary(checks: list[dict]) -> str:
    """A clause's asset checks in a few characters: ✅ all passed, ❌ N failed, ⚪ some never ran."""
    if not checks:
        return "–"
    passed = sum(c.get("passed") is True for c in checks)
    failed = sum(c.get("passed") is False for c in checks)
    if failed:
        return f"❌ {failed}/{len(checks)} failed"
    return f"{'✅' if passed == len(checks) else '⚪'} {passed}/{len(checks)}"


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
