"""Simulated time: a year of policy in a minute (``kms simulate --days N [--from DATE]``).

``simulate`` builds scratch state — SQLite, software keystore, local object store (its
WORM clock is the simulated clock), outbox notifier — in a temporary ``KMS_HOME`` (or
``home``), bootstraps the policy's keys on day 0 and then, for each simulated day,
sets a ``SimulatedClock`` to that day's nightly time (the policy's ``nightly_cron``,
02:00 UTC) and runs the nightly logic (``nightly.run_nightly``: every registered step in
order — rotations, sweep, escrow, backup, retirement …). The timeline lists each day's
ledger entries (rotations, revocations, destructions) and notable step results.

Simulated actors play the humans around the policy, so retention can be exercised end
to end: dependents confirm the active version of the keys they use the day after it
appears (T4); partners acknowledge root rotations the day after notice; and two
enrolled test approvers approve each retention destruction on the night it becomes
allowed (through the access area's real API, so the dual-approval path is the
production one). A small workload encrypts objects under every data key (envelope) and
issues API credentials, so sweeps and re-issues have something to move.
"""

from __future__ import annotations

import os
import secrets
import shutil
import tempfile
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass, field
from datetime import UTC, date, datetime, time, timedelta
from pathlib import Path
from typing import Any

import pyotp
from sqlalchemy import event, select
from sqlalchemy.orm import selectinload

from ...fido2_client import SoftwareAuthenticator
from ..access import console_auth
from ..access import enrolment as enrolment_mod
from ..access import principals as access
from ..access.audited_keystore import AuditedKeyStore
from ..envelope import data_keys as envelope
from ..foundation import db
from ..foundation.clock import SimulatedClock, utc
from ..foundation.context import KmsContext, kms_home
from ..foundation.db.models import ACTIVE, Key, LedgerEntry
from ..foundation.db.models_rotation import DependentConfirmation
from ..foundation.keystore.software import SoftwareKeyStore
from ..foundation.objectstore.local import LocalObjectStore
from ..foundation.policy import load_policy
from ..foundation.transports import OutboxNotifier
from ..keys import dependents, lifecycle, retention, rotation, service_keys
from . import (
    guards,  # noqa: F401  (every destroy/revoke guard, as the CLI and Dagster load them)
    nightly,
)


@dataclass
class Event:
    day: int
    date: str
    kind: str  # rotated | activated | revoked | destroyed | step | confirm | ack | approve
    key: str | None = None
    version: int | None = None
    detail: str | None = None

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class SimulationResult:
    start: datetime
    days: int
    home: str
    events: list[Event] = field(default_factory=list)
    nights: list[dict] = field(default_factory=list)  # per day: {step: summary}
    kept: bool = False

    def of(self, kind: str, key: str | None = None) -> list[Event]:
        return [e for e in self.events if e.kind == kind and (key is None or e.key == key)]

    def days_of(self, kind: str, key: str) -> list[int]:
        return [e.day for e in self.of(kind, key)]

    def to_dict(self) -> dict:
        return {
            "start": self.start.isoformat(),
            "days": self.days,
            "home": self.home,
            "events": [e.to_dict() for e in self.events],
        }


def nightly_time(ctx_or_policy) -> time:
    """Hour and minute of the policy's nightly cron (``M H * * *``)."""
    policy = getattr(ctx_or_policy, "policy", ctx_or_policy)
    minute, hour = policy.backup.nightly_cron.split()[:2]
    return time(int(hour), int(minute), tzinfo=UTC)


def scratch_context(home: Path, clock: SimulatedClock, policy_path: str | None = None) -> KmsContext:
    home.mkdir(parents=True, exist_ok=True)
    engine = db.make_engine(f"sqlite:///{home / 'kms.db'}")

    @event.listens_for(engine, "connect")
    def _scratch_pragmas(dbapi_conn, _record):  # scratch state: speed over durability
        dbapi_conn.execute("PRAGMA synchronous=OFF")

    db.upgrade(engine)
    keystore = AuditedKeyStore(SoftwareKeyStore(home / "artifacts" / "kms" / "keys", secrets.token_bytes(32)))
    policy = load_policy(policy_path)
    # The simulated approvers hold software security keys (fido2_client.SoftwareAuthenticator):
    # allowed here, on scratch state only, whatever the live policy says.
    policy = policy.model_copy(
        update={"console": policy.console.model_copy(update={"allow_software_authenticators": True})}
    )
    ctx = KmsContext(
        engine=engine,
        keystore=keystore,
        policy=policy,
        clock=clock,
        objects=LocalObjectStore(home / "objects", now=clock.now),
        notifier=OutboxNotifier(home / "outbox.jsonl"),
        home=home,
        actor="simulator",
    )
    return ctx


# ---- the simulated humans -------------------------------------------------------------


class Actors:
    """Dependents, partners and approvers acting on simulated days."""

    APPROVERS = ("sim-approver-a", "sim-approver-b")
    REQUESTER = "sim-requester"  # completes the ceremony's quorum (a requester + the approvers)
    SIM_ORIGIN = "https://kms-simulation.invalid"  # the relying party their software keys registered at

    def __init__(self, ctx: KmsContext, *, confirm: bool = True, ack: bool = True, approve: bool = True):
        if not isinstance(ctx.clock, SimulatedClock):  # the approvers' TOTP steps move the clock
            raise ValueError("simulated actors need a context with a SimulatedClock")
        self.ctx, self.confirm, self.ack, self.approve = ctx, confirm, ack, approve
        self.clock: SimulatedClock = ctx.clock
        self._enrolled = False
        self._totp: dict[str, pyotp.TOTP] = {}
        self._keys: dict[str, SoftwareAuthenticator] = {}

    def enroll(self) -> None:
        """Enrol the simulated approvers and a requester (security engineering, TOTP) in the
        first-run ceremony of the scratch state."""
        if self._enrolled:
            return

        self._totp, self._keys = {}, {}
        names = (*self.APPROVERS, self.REQUESTER)

        def make_credential(name, options):
            self._keys[name] = SoftwareAuthenticator(self.SIM_ORIGIN)
            return self._keys[name].create(options)

        for enrolment in enrolment_mod.init_principals(
            self.ctx,
            {n: ["security_engineering"] for n in names},
            actor="simulator",
            keys=(self.SIM_ORIGIN, make_credential),
        ):
            uri = enrolment.provisioning_uri
            otp = pyotp.parse_uri(uri) if uri else None
            if not isinstance(otp, pyotp.TOTP):  # a fresh enrolment always provisions a TOTP
                raise ValueError(f"enrolment of {enrolment.name} provisioned no TOTP")
            self._totp[enrolment.name] = otp
        self._enrolled = True

    def before_night(self, day: int, run_at: datetime) -> list[Event]:
        """Approve (TOTP-verified, through the access area) every destruction that becomes
        allowed by tonight's run; the approvers act in the half hour before it."""
        if not self.approve:
            return []
        due = retention.due_for_destruction(self.ctx, at=run_at)
        if not due:
            return []
        clock = self.clock
        at = run_at - timedelta(minutes=30)
        clock.set(at)  # time only moves forward: enrolment (on first need) comes before the approvals
        self.enroll()
        events = []
        for d in due:
            for approver in self.APPROVERS:
                at += timedelta(seconds=self.ctx.policy.access.totp_interval_seconds)  # a fresh TOTP step
                clock.set(at)

                ch = console_auth.begin_approval(
                    self.ctx, approver, operation=retention.DESTROY_OPERATION, ticket=d.ticket, target=d.target
                )
                access.approve(
                    self.ctx,
                    ticket=d.ticket,
                    operation=retention.DESTROY_OPERATION,
                    approver=approver,
                    totp=self._totp[approver].at(at),
                    target=d.target,
                    assertion={"handle": ch.handle, "credential": self._keys[approver].get(ch.options)},
                )
            events.append(Event(day, "", "approved", d.key, d.version, f"{' + '.join(self.APPROVERS)} on {d.ticket}"))
        clock.set(run_at)
        return events

    def after_night(self, day: int) -> list[Event]:
        events = []
        if self.confirm:
            with self.ctx.transaction() as session:
                done = set(
                    session.execute(
                        select(
                            DependentConfirmation.key_name,
                            DependentConfirmation.key_version,
                            DependentConfirmation.service,
                        )
                    ).all()
                )
                keys = {k.name: k for k in session.scalars(select(Key).options(selectinload(Key.versions)))}
                todo = []
                for key_name, services in self.ctx.policy.dependents.items():
                    v = lifecycle.active_version(keys[key_name])
                    if v is not None and v.version > 1:
                        todo += [(key_name, v.version, s) for s in services if (key_name, v.version, s) not in done]
            for key_name, version, service in todo:
                c = dependents.confirm(self.ctx, key_name, version, service, actor=f"sim:{service}")
                if c.new:
                    events.append(Event(day, "", "confirm", key_name, version, service))
        if self.ack:
            for row in rotation.partner_status(self.ctx):
                if row.notified_at is not None and row.acked_at is None and row.notified_at < self.ctx.now():
                    rotation.ack(self.ctx, row.partner, row.version, actor=f"sim:{row.partner}")
                    events.append(Event(day, "", "ack", "root", row.version, row.partner))
        return events


# ---- workload ---------------------------------------------------------------------------


def seed_workload(ctx: KmsContext, objects_per_key: int = 5) -> dict:
    """Objects under every data key (if the envelope area is installed) and one API client per service."""
    made = {"objects": 0, "credentials": 0}
    for name in ctx.policy.bootstrap_key_names():
        if lifecycle.key_class_of(name) == "data":
            for i in range(objects_per_key):
                envelope.encrypt(ctx, name, f"sim-object-{i}", f"payload {i}".encode())
                made["objects"] += 1
    for name in ctx.policy.key_class("service").names or []:
        service_keys.issue_credential(ctx, name, f"sim-client-{name}")
        made["credentials"] += 1
    return made


# ---- the loop -----------------------------------------------------------------------------


def _ledger_events(ctx: KmsContext, after_seq: int, day: int) -> tuple[list[Event], int]:
    events = []
    with ctx.engine.connect() as conn:
        rows = conn.execute(
            select(
                LedgerEntry.seq,
                LedgerEntry.key_name,
                LedgerEntry.key_version,
                LedgerEntry.from_state,
                LedgerEntry.to_state,
                LedgerEntry.reason,
                LedgerEntry.approvers,
            )
            .where(LedgerEntry.seq > after_seq)
            .order_by(LedgerEntry.seq)
        ).all()
    for seq, key, version, frm, to, reason, approvers in rows:
        after_seq = seq
        if to == ACTIVE and frm == "pending" and version == 1:
            kind = "created"
        elif to == ACTIVE:
            continue  # the rotated entry of the same rotation says it
        else:
            kind = {"rotated": "rotated", "revoked": "revoked", "destroyed": "destroyed"}.get(to, to)
        detail = reason or ""
        if kind in ("archived", "archive-deleted"):  # the ledger reason names the object; the timeline, the lock
            detail = "locked until " + detail.split("locked until ")[1][:10] if "locked until " in detail else ""
        if approvers and approvers != "[]":
            detail += f" approvers={approvers}"
        events.append(Event(day, "", kind, key, version, detail.strip() or None))
    return events, after_seq


def _step_events(day: int, night: dict) -> list[Event]:
    events = []
    for step, summary in night.items():
        if not isinstance(summary, dict):
            continue
        if step == "retire_expired" and summary.get("awaiting_approval"):
            events.append(
                Event(
                    day,
                    "",
                    "awaiting",
                    None,
                    None,
                    f"due, awaiting dual approval: {', '.join(summary['awaiting_approval'])}",
                )
            )
        if step == "notify_partners" and summary.get("notified"):
            events.append(Event(day, "", "notified", "root", None, ", ".join(summary["notified"])))
        if step == "envelope_sweep" and summary.get("moved"):
            events.append(Event(day, "", "swept", None, None, f"{summary['moved']} DEK(s) rewrapped"))
    return events


class LiveStateError(ValueError):
    """``kms simulate --home`` named a directory that holds live KMS state."""


def refuse_live_home(home: Path, env: Mapping[str, str] | None = None) -> None:
    """Simulated time may only touch scratch state: refuse a directory that is the configured
    KMS home, holds a master key, or whose database is the configured one."""
    env = os.environ if env is None else env
    home = home.resolve()
    live_home = kms_home(env)
    live_db = db.database_url_from_env(live_home, env)
    problem = None
    if home == live_home:
        problem = "it is the configured KMS home (KMS_HOME)"
    elif (home / "master.key").exists():
        problem = "it holds a master key"
    elif live_db == db.normalize_url(db.default_url(home)):
        problem = "its database is the configured KMS database"
    if problem:
        raise LiveStateError(f"kms simulate --home {home} refused: {problem}; simulate on a scratch directory")


def simulate(
    days: int,
    start: date | datetime | None = None,
    *,
    home: str | Path | None = None,
    keep: bool = False,
    actors: bool = True,
    workload: bool = True,
    steps: Iterable[str] | None = None,
    policy_path: str | None = None,
    on_day: Callable[[int, KmsContext, dict], Any] | None = None,
    context: KmsContext | None = None,
) -> SimulationResult:
    """Run ``days`` simulated nights after bootstrapping on ``start`` (day 0).

    ``steps`` limits the nightly run to the named steps (default: all of them, i.e.
    ``nightly.run_nightly``). ``on_day(day, ctx, night)`` is called after each night
    (tests use it to assert invariants day by day). ``context`` runs on an existing
    context with a ``SimulatedClock`` instead of scratch state.
    """
    if days < 0:
        raise ValueError("days must be >= 0")
    if isinstance(start, datetime):
        start_day = utc(start).date()
    else:
        start_day = start or datetime.now(UTC).date()
    scratch = context is None and home is None
    if context is None and home is not None:
        refuse_live_home(Path(home))
    root_dir = Path(tempfile.mkdtemp(prefix="kms-sim-")) if home is None else Path(home)
    try:
        if context is not None:
            ctx = context
            if not isinstance(ctx.clock, SimulatedClock):
                raise ValueError("simulate(context=...) needs a SimulatedClock")
            clock = ctx.clock
        else:
            clock = SimulatedClock(datetime.combine(start_day, nightly_time(_policy(policy_path))))
            ctx = scratch_context(root_dir, clock, policy_path)
        at = nightly_time(ctx)
        clock.set(datetime.combine(start_day, at))
        result = SimulationResult(clock.now(), days, str(root_dir), kept=not scratch or keep)
        lifecycle.bootstrap(ctx, actor="simulator")
        events, seq = _ledger_events(ctx, 0, 0)
        result.events += events
        if workload:
            seed_workload(ctx)
        people = Actors(ctx) if actors else None
        wanted = set(steps) if steps is not None else None
        for day in range(0, days + 1):
            clock.set(datetime.combine(start_day + timedelta(days=day), at))
            today = []
            if people is not None:
                today += people.before_night(day, clock.now())
            if wanted is None:
                night = nightly.run_nightly(ctx)
            else:
                night = {s.name: s.run(ctx) for s in nightly.steps() if s.name in wanted}
            events, seq = _ledger_events(ctx, seq, day)
            today += events + _step_events(day, night)
            if people is not None:
                clock.set(clock.now() + timedelta(hours=1))
                today += people.after_night(day)
                events, seq = _ledger_events(ctx, seq, day)
                today += events
            iso = (start_day + timedelta(days=day)).isoformat()
            for e in today:
                e.date = iso
            result.events += today
            result.nights.append(night)
            if on_day is not None:
                on_day(day, ctx, night)
        if scratch and not keep:
            ctx.engine.dispose()
        return result
    finally:
        if scratch and not keep:
            shutil.rmtree(root_dir, ignore_errors=True)


def _policy(path: str | None):
    return load_policy(path)


def format_timeline(result: SimulationResult, *, kinds: Iterable[str] | None = None) -> str:
    """One line per day that had events: ``day  date  event; event; …``."""
    wanted = set(kinds) if kinds else None
    by_day: dict[int, list[Event]] = {}
    for e in result.events:
        if wanted is None or e.kind in wanted:
            by_day.setdefault(e.day, []).append(e)
    lines = [
        f"simulated {result.days} day(s) from {result.start.date().isoformat()} "
        f"(nightly at {result.start.strftime('%H:%M')} UTC)"
    ]
    for day in sorted(by_day):
        parts = []
        for e in by_day[day]:
            what = e.kind
            if e.key:
                what += f" {e.key}" + (f" v{e.version}" if e.version is not None else "")
            if e.detail and e.kind not in ("rotated", "created"):
                what += f" ({e.detail})"
            elif e.kind == "rotated" and e.detail:
                what += f" [{e.detail}]"
            parts.append(what)
        lines.append(f"day {day:>4}  {by_day[day][0].date}  " + "; ".join(parts))
    return "\n".join(lines)
