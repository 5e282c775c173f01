"""Load and validate ``assets/policy.yaml``: the KMS policy as code.

Every number the rest of the package uses (cadences, retention, roles, GFS counts,
drill cadence, remediation SLA, token TTL) is read from here. Validation errors name
the offending field, e.g. ``policy.yaml: key_classes.root.rotation_days: Input should
be greater than 0``.
"""

from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Literal, Self

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from .retry import Budget

if TYPE_CHECKING:
    from .retry import Budget

CLAUSE_IDS = (
    "P1",
    "P2",
    "P3",
    "P4",
    "R1",
    "R2",
    "R3",
    "R4",
    "T1",
    "T2",
    "T3",
    "T4",
    "A1",
    "A2",
    "A3",
    "A4",
    "B1",
    "B2",
    "B3",
    "B4",
)
ALGORITHMS = ("aes256", "ed25519")
ROLES = ("sre_oncall", "security_engineering", "compliance_officer")
OPERATIONS = (
    "rotate",
    "revoke",
    "destroy",
    "decrypt",
    "export",
    "break-glass",
    "approve",
    "read",
    "encrypt",
    "sign",
    "console-registration",
    "archive-retrieve",
    "review",
    "principals",
)
CONSOLE_PAGES = ("approvals", "principals", "anomalies", "followups", "report", "keys", "dagster")
DEFAULT_POLICY_PATH = Path(__file__).resolve().parents[3] / "assets" / "policy.yaml"


class PolicyError(ValueError):
    """The policy file is missing or invalid; the message names the field."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Escrow(_Strict):
    threshold: int = Field(ge=1)
    custodians: list[str] = Field(min_length=1)
    destruction_confirm_days: int = Field(gt=0)

    @model_validator(mode="after")
    def _threshold_fits(self) -> Self:
        if self.threshold > len(self.custodians):
            raise ValueError(f"threshold {self.threshold} exceeds the {len(self.custodians)} custodians")
        if len(set(self.custodians)) != len(self.custodians):
            raise ValueError("custodians must be distinct")
        return self


class KeyClass(_Strict):
    clauses: list[str] = Field(min_length=1)
    algorithms: list[Literal["aes256", "ed25519"]] = Field(min_length=1)
    rotation_days: int | None = Field(default=None, gt=0)
    retention_days: int | None = Field(default=None, gt=0)
    retention: Literal["until-rekeyed"] | None = None
    names: list[str] | None = None
    publish_fingerprints: bool = False
    partner_notice_hours: int | None = Field(default=None, gt=0)
    rotate_immediately_on: list[Literal["compromise", "tenant-rotation", "ci-secret-exposure"]] = []
    rotate_at_expiry: bool = False
    default_ttl_days: int | None = Field(default=None, gt=0)
    escrow: Escrow | None = None

    @model_validator(mode="after")
    def _known_clauses(self) -> Self:
        unknown = [c for c in self.clauses if c not in CLAUSE_IDS]
        if unknown:
            raise ValueError(f"unknown clause ids {unknown}")
        return self


class KeyClasses(_Strict):
    root: KeyClass
    service: KeyClass
    data: KeyClass
    export: KeyClass
    backup: KeyClass
    break_glass: KeyClass = Field(alias="break-glass")
    archive: KeyClass | None = None  # T1: the archive KEK of the vault (core/keys/vault.py)

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


class Retention(_Strict):
    expired_root_service_days: int = Field(gt=0)
    archive_dual_control: bool
    destroy_requires_dual_approval: bool


class Vault(_Strict):
    """The archive vault of retired root/service keys (T1, core/keys/vault.py)."""

    prefix: str = Field(default="vault/", pattern=r"^[a-z0-9][a-z0-9_/-]*/$")
    forensic_ttl_hours: int = Field(default=24, gt=0)  # a forensic import erases itself after this


class Partner(_Strict):
    name: str
    email: str = Field(pattern=r"^[^@\s]+@[^@\s]+$")


class Access(_Strict):
    roles: list[str]
    workload_token_ttl_minutes: int = Field(gt=0, le=15)
    totp_window_steps: int = Field(ge=0, le=2)
    approvals_required: int = Field(ge=2)
    approval_ttl_minutes: int = Field(gt=0)
    permissions: dict[str, list[str]]
    # A4: operations that run only with dual-control approvals.
    manual_operations: list[str] = Field(min_length=1)
    totp_interval_seconds: int = Field(default=30, gt=0)
    cooling_off_hours: float = Field(default=24, ge=0)
    totp_max_failures: int = Field(default=5, gt=0)  # wrong codes in a row before the lockout
    totp_lockout_minutes: int = Field(default=15, gt=0)
    # A2: workload principal -> the operations it may perform programmatically.
    workload_principals: dict[str, list[str]] = {}
    workload_token_refresh_seconds: int = Field(default=60, ge=0)
    # A1: the KMS's own automated processes that act under a fixed name (nightly jobs, the
    # init ceremony, the Dagster code location). Any other audit actor must be an enrolled
    # principal or a declared workload.
    service_actors: list[str] = []

    @model_validator(mode="after")
    def _workloads_and_manual_ops(self) -> Self:
        for name, ops in self.workload_principals.items():
            if not name.startswith("workload:"):
                raise ValueError(f"workload_principals.{name}: workload principals are named workload:<name>")
            bad = [
                op
                for op in ops
                if op not in OPERATIONS or op in ("approve", "console-registration", "review", "principals")
            ]
            if bad:
                raise ValueError(f"workload_principals.{name}: unknown or non-delegable operations {bad}")
        bad = [op for op in self.manual_operations if op not in OPERATIONS]
        if bad:
            raise ValueError(f"manual_operations: unknown operations {bad}")
        wild = [a for a in self.service_actors if "*" in a[:-1] or (a.endswith("*") and not a[:-1].endswith(":"))]
        if wild or any(not a.strip() for a in self.service_actors):
            raise ValueError(f"service_actors: names, or families written <prefix>:* only (got {wild or 'empty'})")
        if self.workload_token_refresh_seconds >= self.workload_token_ttl_minutes * 60:
            raise ValueError("workload_token_refresh_seconds must be shorter than the token TTL")
        return self

    @model_validator(mode="after")
    def _roles_and_ops(self) -> Self:
        if sorted(self.roles) != sorted(ROLES):
            raise ValueError(f"roles must be exactly {list(ROLES)} (clause A1)")
        missing = [op for op in OPERATIONS if op not in self.permissions]
        if missing:
            raise ValueError(f"permissions missing operations {missing}")
        for op, roles in self.permissions.items():
            if op not in OPERATIONS:
                raise ValueError(f"permissions.{op}: unknown operation")
            bad = [r for r in roles if r not in self.roles]
            if bad:
                raise ValueError(f"permissions.{op}: unknown roles {bad}")
        return self


class Notifications(_Strict):
    compliance_emails: list[str] = Field(min_length=1)
    security_emails: list[str] = Field(min_length=1)
    slack_channels: list[str] = []
    delivery_window_hours: int = Field(default=24, gt=0)  # events area: "notifications delivered" check window


class Events(_Strict):
    """Security events (R2) and their intake (events area)."""

    sensor_interval_seconds: int = Field(default=30, gt=0)
    intake_max_body_bytes: int = Field(default=16384, gt=0)
    duplicate_window_hours: int = Field(default=24, gt=0)  # an open event of the same key+type is a duplicate
    response_sla_hours: int = Field(default=4, gt=0)  # "security events answered" check


class Backup(_Strict):
    nightly_cron: str
    keep_nightly: int = Field(gt=0)
    keep_weekly_days: int = Field(gt=0)
    weekly_on: Literal["monday", "tuesday", "wednesday", "thursday", "friday", "saturday", "sunday"]
    freshness_hours: int = Field(gt=0)
    include_paths: list[str]
    compression_level: int = Field(default=3, ge=1, le=22)
    stale_upload_hours: int = Field(default=6, gt=0)


class Drills(_Strict):
    cadence_days: int = Field(gt=0)
    cron: str
    remediation_business_days: int = Field(gt=0)
    recent_rpts_to_verify: int = Field(gt=0)
    on_call: list[str] = Field(default_factory=list)
    followup_owner: str = "security-engineering"


class Audit(_Strict):
    anomaly_window_hours: int = Field(gt=0)
    baseline_days: int = Field(gt=0)
    rate_spike_factor: float = Field(gt=1)
    decrypt_burst_per_hour: int = Field(gt=0)
    failure_burst_per_hour: int = Field(gt=0)
    rate_spike_min_events: int = Field(default=50, gt=0)
    review_severities: list[Literal["low", "medium", "high"]] = ["high"]


class Envelope(_Strict):
    """Envelope encryption (P3, R3): the DEK rewrap sweep and export-key expiry."""

    shards: int = Field(default=8, ge=1, le=1024)  # sweep partitions (Dagster fans them out)
    batch_size: int = Field(default=1000, ge=1, le=100_000)  # DEKs per rewrap call and per commit (the first)
    batch_target_commit_ms: int = Field(default=250, ge=0, le=60_000)  # later batches sized to this; 0 = constant
    batch_size_max: int = Field(default=20_000, ge=1, le=100_000)  # bounds memory whatever the table size
    sweep_cron: str = "30 2 * * *"  # after kms_nightly's rotations at 02:00
    export_expiry_check_seconds: int = Field(default=60, gt=0)  # export-expiry sensor interval
    # Scale-out (core/envelope/leases.py): each shard is swept as this many leased ranges, and a lease
    # not renewed within lease_seconds (a dead worker) is taken over by another worker.
    lease_ranges_per_shard: int = Field(default=4, ge=1, le=64)
    lease_seconds: int = Field(default=60, ge=5, le=3600)
    fanout_steps: int = Field(default=4, ge=1, le=256)  # steps of dek_rewrap_fanout_job (one per worker slot)


class Rpt(_Strict):
    """Regulatory proof tokens (P1): limits on what one token may carry (rpt area)."""

    subject_max_length: int = Field(default=200, gt=0)
    max_claims_bytes: int = Field(default=16384, gt=0)
    issue_retries: int = Field(default=20, gt=0)
    verify_batch_size: int = Field(default=5000, gt=0)


class Ledger(_Strict):
    """Ledger verification (T3): PostgreSQL splits long chains over processes."""

    verify_workers: int = Field(default=2, ge=1, le=64)
    verify_min_entries_per_worker: int = Field(default=10_000, gt=0)  # shorter ranges: one pass is faster


class Checkpoints(_Strict):
    """Signed ledger checkpoints in WORM object storage (T3, rpt area)."""

    retain_days: int = Field(default=2555, gt=0)
    prefix: str = Field(default="checkpoints/ledger/", pattern=r"^[a-z0-9][a-z0-9_/-]*/$")


class Console(_Strict):
    """The browser console (``kms console``, A2): session lifetimes and who sees which page."""

    session_idle_minutes: int = Field(default=15, gt=0, le=60)
    session_absolute_hours: int = Field(default=8, gt=0, le=24)
    registration_link_hours: int = Field(default=24, gt=0, le=168)
    ceremony_seconds: int = Field(default=120, ge=30, le=600)
    # A2: a security key counts as hardware only when its attestation chains to one of these
    # PEM CA files (the vendors' attestation roots); any other is a software authenticator,
    # refused at sign-in and approval and named by A2 unless allowed here (demo, tests).
    attestation_ca_files: list[str] = []
    allow_software_authenticators: bool = False
    # page -> the roles that may open it; every other signed-in role gets 403.
    pages: dict[str, list[str]] = {
        "approvals": list(ROLES),
        "principals": ["security_engineering"],
        "anomalies": ["security_engineering", "compliance_officer"],
        "followups": ["sre_oncall", "compliance_officer"],
        "report": ["security_engineering", "compliance_officer"],
        "keys": list(ROLES),
        "dagster": ["sre_oncall", "security_engineering"],
    }

    @model_validator(mode="after")
    def _known_pages(self) -> Self:
        for page, roles in self.pages.items():
            if page not in CONSOLE_PAGES:
                raise ValueError(f"pages.{page}: unknown page (known: {list(CONSOLE_PAGES)})")
            bad = [r for r in roles if r not in ROLES]
            if bad:
                raise ValueError(f"pages.{page}: unknown roles {bad}")
        missing = [p for p in CONSOLE_PAGES if p not in self.pages]
        if missing:
            raise ValueError(f"pages missing {missing}")
        return self


class FaultBudget(_Strict):
    """How long one unit of work rides out a failing dependency (operator choices)."""

    attempts: int = Field(default=6, ge=1, le=100)  # tries in all, the first included
    max_seconds: float = Field(default=60.0, ge=0, le=3600)  # no new attempt after this long
    first_wait_seconds: float = Field(default=0.5, ge=0, le=600)  # doubles per retry, plus jitter
    max_wait_seconds: float = Field(default=10.0, ge=0, le=600)  # cap on one wait

    def budget(self) -> Budget:
        return Budget(self.attempts, self.max_seconds, self.first_wait_seconds, self.max_wait_seconds)


class RunRetries(_Strict):
    """Dagster re-runs of a safe-to-repeat asset whose in-process budget ran out."""

    max_retries: int = Field(default=2, ge=0, le=10)
    delay_seconds: int = Field(default=120, ge=0, le=86_400)


class Faults(_Strict):
    """Bounded retries per dependency (core/foundation/retry.py; README "Faults")."""

    database: FaultBudget = FaultBudget(attempts=10)
    object_store: FaultBudget = FaultBudget(attempts=8)
    notifications: FaultBudget = FaultBudget(attempts=4, first_wait_seconds=1.0, max_wait_seconds=30.0)
    hsm: FaultBudget = FaultBudget(attempts=3, max_seconds=30.0)
    dagster: RunRetries = RunRetries()


class Policy(_Strict):
    version: Literal[1]
    key_classes: KeyClasses
    retention: Retention
    dependents: dict[str, list[str]]
    partners: list[Partner]
    access: Access
    notifications: Notifications
    backup: Backup
    drills: Drills
    audit: Audit
    envelope: Envelope = Envelope()
    events: Events = Events()
    rpt: Rpt = Rpt()
    ledger: Ledger = Ledger()
    checkpoints: Checkpoints = Checkpoints()
    console: Console = Console()
    faults: Faults = Faults()
    vault: Vault = Vault()

    def key_class(self, name: str) -> KeyClass:
        """Policy block for a key class (``root``, ``service``, ``break-glass`` …)."""
        attr = name.replace("-", "_")
        if not hasattr(self.key_classes, attr):
            raise PolicyError(f"unknown key class {name!r}")
        block: KeyClass = getattr(self.key_classes, attr)
        return block

    def bootstrap_key_names(self) -> list[str]:
        """Every key the policy requires to exist (export keys are created on demand)."""
        kc = self.key_classes
        return (
            ["root"]
            + [f"service:{n}" for n in kc.service.names or []]
            + [f"data:{n}" for n in kc.data.names or []]
            + ["backup", "break-glass"]
            + (["archive"] if kc.archive is not None else [])
        )


def _format_error(source: str, exc: ValidationError) -> str:
    parts = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"]) or "(top level)"
        parts.append(f"{loc}: {err['msg']}")
    return f"{source}: " + "; ".join(parts)


def parse_policy(text: str, source: str = "policy.yaml") -> Policy:
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise PolicyError(f"{source}: not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise PolicyError(f"{source}: expected a mapping at the top level")
    try:
        return Policy.model_validate(data)
    except ValidationError as exc:
        raise PolicyError(_format_error(source, exc)) from None


def load_policy(path: str | os.PathLike[str] | None = None) -> Policy:
    """Load the policy from ``path``, ``$KMS_POLICY`` or the packaged ``assets/policy.yaml``."""
    path = Path(path or os.environ.get("KMS_POLICY") or DEFAULT_POLICY_PATH)
    return _load_cached(str(path.resolve()), path.stat().st_mtime_ns if path.exists() else 0)


@lru_cache(maxsize=8)
def _load_cached(path: str, _mtime: int) -> Policy:
    try:
        text = Path(path).read_text()
    except FileNotFoundError:
        raise PolicyError(f"policy file {path} not found (set KMS_POLICY)") from None
    return parse_policy(text, source=path)
