"""Cross-checks between independent records (DESIGN §10: "controls cross-check
independent records").

* ``replay``: replaying the ledger reproduces ``key_versions`` exactly -- the set of
  versions, each version's state, and the time of each transition (activated, rotated,
  revoked, destroyed). A row edited by hand, a version created or a state changed with no
  ledger entry, or ledger rows cut off the tail all disagree with the state table.
* ``ledger_vs_audit``: every ledger entry has its ``ledger.transition`` audit event
  (written in the same transaction, so they commit together) and every such event has its
  ledger entry; every version that became active from pending has the audited ``generate``
  (or ``import``) of its key material, so a key made outside the audited keystore shows.

Both stream in seq order and keep per-version state only, so memory grows with the number
of key versions, not with the ledger.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from datetime import datetime

from sqlalchemy import select

from ..foundation.clock import utc
from ..foundation.db.models import ACTIVE, DESTROYED, PENDING, REVOKED, ROTATED, STATES, Key, KeyVersion, LedgerEntry
from ..foundation.db.models_access import AuditEvent
from ..ledger import audit

TRANSITION_OP = "ledger.transition"
STAMP = {ACTIVE: "activated_at", ROTATED: "rotated_at", REVOKED: "revoked_at", DESTROYED: "destroyed_at"}
_MAX_PROBLEMS = 20


@dataclass
class CrossCheck:
    ok: bool
    problems: list[str] = field(default_factory=list)
    versions: int = 0
    entries: int = 0
    audit_events: int = 0
    sources: list[str] = field(default_factory=list)  # the independent records read

    @property
    def problem(self) -> str | None:
        return self.problems[0] if self.problems else None

    def to_dict(self) -> dict:
        return {**asdict(self), "problem": self.problem}


def _same_time(a: datetime | None, b: datetime | None) -> bool:
    if a is None or b is None:
        return a is None and b is None
    return abs((utc(a) - utc(b)).total_seconds()) < 1e-3


def replay(conn) -> CrossCheck:
    """Replay the ledger and compare the result with ``key_versions``."""
    res = CrossCheck(True, sources=["ledger_entries", "key_versions"])
    replayed: dict[tuple[str, int], dict] = {}
    for seq, at, key, version, from_state, to_state in conn.execution_options(
        stream_results=True, yield_per=5000
    ).execute(
        select(
            LedgerEntry.seq,
            LedgerEntry.at,
            LedgerEntry.key_name,
            LedgerEntry.key_version,
            LedgerEntry.from_state,
            LedgerEntry.to_state,
        ).order_by(LedgerEntry.seq)
    ):
        res.entries += 1
        if version is None:
            continue
        v = replayed.setdefault((key, version), {"state": PENDING, "first_seq": seq})
        if (from_state or PENDING) != v["state"]:
            res.problems.append(
                f"ledger seq {seq}: {key} v{version} moves from {from_state} but the replay has it {v['state']}"
            )
        if to_state not in STATES:
            continue  # a record about the version (the vault's archived / archive-deleted), not a state change
        v["state"], v["seq"] = to_state, seq
        if to_state in STAMP:
            v[STAMP[to_state]] = at
    rows = conn.execute(
        select(
            Key.name,
            KeyVersion.version,
            KeyVersion.state,
            KeyVersion.activated_at,
            KeyVersion.rotated_at,
            KeyVersion.revoked_at,
            KeyVersion.destroyed_at,
        )
        .join(Key, Key.id == KeyVersion.key_id)
        .order_by(Key.name, KeyVersion.version)
    ).all()
    seen = set()
    for name, version, state, *stamps in rows:
        res.versions += 1
        seen.add((name, version))
        got = replayed.get((name, version))
        if got is None:
            if state != PENDING or any(stamps):
                res.problems.append(
                    f"key_versions: {name} v{version} is {state} but no ledger entry created it "
                    f"(state changed outside the ledger, or ledger entries deleted)"
                )
            continue
        if got["state"] != state:
            res.problems.append(
                f"key_versions: {name} v{version} is {state} but the ledger (seq {got['seq']}) leaves "
                f"it {got['state']} (state edited outside the ledger, or ledger entries deleted)"
            )
            continue
        for column, stamp in zip(STAMP.values(), stamps, strict=True):
            if not _same_time(got.get(column), stamp):
                res.problems.append(
                    f"key_versions: {name} v{version} {column} is "
                    f"{utc(stamp).isoformat() if stamp else 'empty'} but the ledger says "
                    f"{utc(got[column]).isoformat() if got.get(column) else 'never'}"
                )
    for (name, version), v in replayed.items():
        if (name, version) not in seen:
            res.problems.append(
                f"ledger seq {v['first_seq']}: {name} v{version} has ledger entries but no "
                f"key_versions row (deleted outside the ledger)"
            )
    res.ok = not res.problems
    del res.problems[_MAX_PROBLEMS:]
    return res


def ledger_vs_audit(conn) -> CrossCheck:
    """Each ledger entry ↔ its ``ledger.transition`` audit event; each new version ↔ the
    audited generation of its key material. Call ``audit.flush`` first."""
    res = CrossCheck(True, sources=["ledger_entries", "audit_events"])
    events: dict[int, tuple] = {}
    material: set[str] = set()
    for operation, target, outcome, detail in conn.execution_options(stream_results=True, yield_per=5000).execute(
        select(AuditEvent.operation, AuditEvent.target, AuditEvent.outcome, AuditEvent.detail).where(
            AuditEvent.operation.in_((TRANSITION_OP, "generate", "import"))
        )
    ):
        res.audit_events += 1
        if operation != TRANSITION_OP:
            if outcome == "ok" and target:
                material.add(target)
            continue
        try:
            d = json.loads(detail or "{}")
            events[int(d["seq"])] = (target, d.get("to"))
        except (ValueError, KeyError, TypeError):
            res.problems.append(f"audit event {TRANSITION_OP} on {target} names no ledger seq")
    refs = {
        (name, version): (wrap_ref, sign_ref)
        for name, version, wrap_ref, sign_ref in conn.execute(
            select(Key.name, KeyVersion.version, KeyVersion.wrap_ref, KeyVersion.sign_ref).join(
                Key, Key.id == KeyVersion.key_id
            )
        )
    }
    for seq, key, version, from_state, to_state in conn.execution_options(stream_results=True, yield_per=5000).execute(
        select(
            LedgerEntry.seq, LedgerEntry.key_name, LedgerEntry.key_version, LedgerEntry.from_state, LedgerEntry.to_state
        ).order_by(LedgerEntry.seq)
    ):
        res.entries += 1
        if to_state not in STATES:
            continue  # not a state change: the vault audits those records as its own operations
        ev = events.pop(seq, None)
        target = f"{key}#v{version}"
        if ev is None:
            res.problems.append(
                f"ledger seq {seq} ({target} → {to_state}) has no audit event: the ledger moved without the audit log"
            )
        elif ev != (target, to_state):
            res.problems.append(
                f"ledger seq {seq} ({target} → {to_state}) differs from its audit event ({ev[0]} → {ev[1]})"
            )
        if to_state == ACTIVE and from_state in (None, PENDING):
            made = [r for r in refs.get((key, version), ()) if r]
            unaudited = [r for r in made if r not in material]
            if unaudited:
                res.problems.append(
                    f"ledger seq {seq}: {target} became active but the generation of its key "
                    f"material ({', '.join(unaudited)}) is not in the audit log (made through an "
                    f"unaudited keystore)"
                )
    for seq, (target, to_state) in sorted(events.items()):
        res.problems.append(
            f"audit event {TRANSITION_OP} for ledger seq {seq} ({target} → {to_state}) has no "
            f"ledger entry (ledger entries deleted)"
        )
    res.ok = not res.problems
    del res.problems[_MAX_PROBLEMS:]
    return res


def verify(ctx) -> CrossCheck:
    """Both cross-checks over the live database (the audit writer flushed first)."""
    audit.flush(ctx)
    with ctx.engine.connect() as conn:
        a, b = replay(conn), ledger_vs_audit(conn)
    return CrossCheck(
        a.ok and b.ok,
        a.problems + b.problems,
        a.versions,
        a.entries,
        b.audit_events,
        sorted(set(a.sources + b.sources)),
    )
