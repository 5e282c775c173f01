"""The clause table (clause id -> text, control, evaluator) and the report built from it."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable

from ..foundation import retry
from ..foundation.context import KmsContext
from .access import eval_a1, eval_a2, eval_a3, eval_a4
from .backup import eval_b1, eval_b2, eval_b3, eval_b4
from .model import _MAX_EVIDENCE, FAIL, Clause, Finding, Report, Row, _overall
from .purposes import eval_p1, eval_p2, eval_p3, eval_p4
from .retention import eval_t1, eval_t2, eval_t3, eval_t4
from .rotation import eval_r1, eval_r2, eval_r3, eval_r4

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
