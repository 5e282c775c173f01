"""Responses to events (core/response) in Dagster; this module only wires core to Dagster.

Security events (R2): the ``compromise_response`` job and the sensor that launches it
exactly once per reported event, the ``security_events`` asset and its SLA check. Logic:
core/response/events.py and core/response/compromise.py.

Break-glass escrow (P4, R4): the nightly asset that rotates break-glass when due and seals it
M-of-N, and the checks that the current package is in order and that superseded packages were
confirmed destroyed. Logic: core/response/escrow.py."""

import dagster as dg

from ..core.foundation.policy import load_policy
from ..scaleout import executors
from .failures import one_line_failures
from .foundation import NIGHTLY
from .metadata import markdown_table, shorten
from .resources import KmsResource

EVENT_TAG = "kms/security-event"
TRIGGER_TAG = "kms/trigger"
SEAL_TAG = "kms/sensor-seal"  # compromise.seal_for_sensor: what a Launchpad user cannot write
OP_NAME = "respond_to_security_event"


def run_key_for(event_id: str) -> str:
    return f"security-event-{event_id}"


class CompromiseResponseConfig(dg.Config):
    """Launch for an existing event (``event_id``), or report one by hand (``key`` + ``type``).
    A manual launch (not from the sensor) needs ``ticket``, ``requested_by`` and the
    requester's ``requester_totp`` code: dual approval
    is consumed for (revoke|rotate, key, ticket) before anything changes."""

    event_id: str | None = None
    key: str | None = None
    type: str | None = None  # compromise | ci-secret-exposure | tenant-rotation
    ticket: str | None = None
    requested_by: str | None = None
    requester_totp: str | None = None  # the requester's current TOTP code (manual launches)
    source: str = "dagster-ui"
    detail: str = ""


def failed_ancestor(instance: dg.DagsterInstance, run: dg.DagsterRun, holder: str | None) -> str | None:
    """``holder`` (the run that claimed the event) when this run retries or re-executes it and it
    ended without success, else None. Read from the Dagster instance, not from tags: parent and
    root run ids are set by Dagster when it retries or re-executes a run, never by the Launchpad.
    A retry may only finish what the sensor's own run had already been authorised to answer."""
    if holder is None or holder not in (run.parent_run_id, run.root_run_id):
        return None
    prior = instance.get_run_by_id(holder)
    if prior is None or prior.status not in (dg.DagsterRunStatus.FAILURE, dg.DagsterRunStatus.CANCELED):
        return None
    return holder


def _failed_ancestor(context: dg.OpExecutionContext, ctx, event_id: str) -> str | None:
    from ..core.response import events

    return failed_ancestor(context.instance, context.dagster_run, events.get(ctx, event_id).response_run_id)


@dg.op(name=OP_NAME, description="Rotate, revoke (compromise), rewrap DEKs, re-issue credentials, notify, resolve.")
def respond_to_security_event(
    context: dg.OpExecutionContext, config: CompromiseResponseConfig, kms: KmsResource
) -> dg.Output:
    from ..core.response import compromise

    ctx = kms.context()
    tags = context.run.tags
    # Tags are free text in the Launchpad: a run that claims the sensor's tags must prove them
    # (seal + one-time claim of the new event) before it may skip dual approval.
    from_sensor = tags.get(TRIGGER_TAG) == "sensor" or EVENT_TAG in tags
    with one_line_failures():
        approvers: list = []
        event_id = config.event_id
        if from_sensor:
            if not event_id or tags.get(EVENT_TAG) != event_id:
                raise dg.Failure(f"run tags name security event {tags.get(EVENT_TAG)!r} but config names {event_id!r}")
            compromise.claim_for_sensor(
                ctx,
                event_id,
                tags.get(SEAL_TAG),
                context.run_id,
                takeover_from=_failed_ancestor(context, ctx, event_id),
            )
        if not from_sensor:
            actor_ctx = ctx.as_actor(config.requested_by or "dagster-ui")
            if event_id:
                approvers = compromise.authorize_existing(
                    actor_ctx,
                    event_id,
                    ticket=config.ticket or "",
                    requested_by=config.requested_by or "",
                    totp=config.requester_totp,
                )
            else:
                if not config.key or not config.type:
                    raise dg.Failure("config needs event_id, or key + type (+ ticket, requested_by)")
                info, approvers = compromise.report_manual(
                    actor_ctx,
                    key=config.key,
                    type=config.type,
                    ticket=config.ticket or "",
                    requested_by=config.requested_by or "",
                    totp=config.requester_totp,
                    source=config.source,
                    detail=config.detail,
                )
                event_id = info.id
        assert event_id is not None  # a sensor launch carries its event_id; a manual one has it or reported it
        result = compromise.respond(
            ctx.as_actor("dagster:compromise_response" if from_sensor else (config.requested_by or "dagster-ui")),
            event_id,
            approvers=approvers,
            ticket=config.ticket,
            run_id=context.run_id,
        )
    for step in result.steps:
        context.log.info(step)
    from ..core.ledger import checkpoints

    cp = checkpoints.checkpoint_if_changed(ctx)  # the response's state changes end under a WORM checkpoint
    return dg.Output(
        result.event_id,
        metadata={
            "checkpoint": cp["key"] if cp else "unchanged",
            "event_id": result.event_id,
            "key": result.key,
            "type": result.type,
            "compromised_version": result.compromised_version,
            "new_version": result.new_version or 0,
            "revoked": result.revoked,
            "deks_moved": result.deks_moved,
            "credentials_reissued": result.credentials_reissued if result.credentials_reissued is not None else -1,
            "notified": result.notified,
            "approvers": dg.MetadataValue.json(result.approvers),
            "already_resolved": result.already_resolved,
            "steps": dg.MetadataValue.md("\n".join(f"- {s}" for s in result.steps)),
        },
    )


@dg.job(
    name="compromise_response",
    tags={"kms/clause": "R2"},
    description="R2: respond to a compromise / CI-secret exposure / tenant rotation at once.",
)
def compromise_response():
    respond_to_security_event()


@dg.sensor(
    name="security_event_sensor",
    job=compromise_response,
    minimum_interval_seconds=load_policy().events.sensor_interval_seconds,
    default_status=dg.DefaultSensorStatus.RUNNING,
    description="Launches compromise_response once per new security event (cursor = event seq).",
)
def security_event_sensor(context: dg.SensorEvaluationContext, kms: KmsResource):
    from ..core.response import compromise, events

    cursor = int(context.cursor or 0)
    ctx = kms.context()
    seen = events.list_events(ctx, after_seq=cursor, limit=500)
    requests = []
    for e in seen:
        if e.status != "new" or _already_launched(context, e.id):
            continue
        requests.append(
            dg.RunRequest(
                run_key=run_key_for(e.id),
                run_config={"ops": {OP_NAME: {"config": {"event_id": e.id}}}},
                tags={
                    EVENT_TAG: e.id,
                    TRIGGER_TAG: "sensor",
                    SEAL_TAG: compromise.seal_for_sensor(ctx, e.id),
                    "kms/key": e.key,
                    "kms/event-type": e.type,
                },
            )
        )
    new_cursor = str(max([cursor] + [e.seq for e in seen]))
    if not requests:
        return dg.SensorResult(
            skip_reason=dg.SkipReason(f"no new security events after seq {cursor}"), cursor=new_cursor
        )
    return dg.SensorResult(run_requests=requests, cursor=new_cursor)


def _already_launched(context, event_id: str) -> bool:
    """Run keys dedupe in the daemon; this also holds when the sensor is evaluated directly."""
    try:
        instance = context.instance
    except Exception:  # noqa: BLE001 -- no instance (bare test context)
        return False
    runs = instance.get_runs(filters=dg.RunsFilter(tags={"dagster/run_key": run_key_for(event_id)}), limit=1)
    return bool(runs)


@dg.asset(
    group_name="events",
    deps=["kms_state"],
    kinds={"sql"},
    tags={"kms_nightly": ""},
    description="Security events (R2) and how each was answered.",
)
def security_events(kms: KmsResource) -> dg.MaterializeResult:
    from ..core.response import events
    from .metadata import markdown_table

    rows = events.list_events(kms.context())
    return dg.MaterializeResult(
        metadata={
            "events": len(rows),
            "open": sum(r.status != "resolved" for r in rows),
            "summary": dg.MetadataValue.md(
                markdown_table(
                    ["id", "type", "key", "version", "status", "reported", "run"],
                    [
                        [
                            r.id[:12],
                            r.type,
                            r.key,
                            r.key_version,
                            r.status,
                            f"{r.reported_at:%Y-%m-%d %H:%M}",
                            r.response_run_id or "-",
                        ]
                        for r in rows[-100:]
                    ],
                )
            ),
        }
    )


@dg.asset_check(asset=security_events, description="R2: every security event answered within the policy SLA.")
def security_events_answered(kms: KmsResource) -> dg.AssetCheckResult:
    from ..core.response import compromise

    ctx = kms.context()
    late = compromise.response_overdue(ctx, ctx.policy.events.response_sla_hours)
    return dg.AssetCheckResult(
        passed=not late,
        metadata={
            "unanswered": dg.MetadataValue.json(
                [
                    {
                        "id": e.id,
                        "type": e.type,
                        "key": e.key,
                        "status": e.status,
                        "reported_at": e.reported_at.isoformat(),
                    }
                    for e in late
                ]
            )
        },
    )


key_state_refresh = dg.define_asset_job(
    "key_state_refresh",
    selection=["key_inventory", "security_events", "policy_compliance_report"],
    executor_def=executors.for_job(("in_process",)),  # three quick reads: never worth a worker round trip
    description="Re-read key states, security events and the compliance report, so the UI shows a revoked or "
    "rotated version as it is right after a compromise response instead of at the next nightly run.",
)


@dg.run_status_sensor(
    run_status=dg.DagsterRunStatus.SUCCESS,
    monitored_jobs=[compromise_response],
    request_job=key_state_refresh,
    default_status=dg.DefaultSensorStatus.RUNNING,
    description="After every successful compromise_response, refreshes key_inventory, "
    "security_events and the compliance report.",
)
def refresh_after_compromise_response(context: dg.RunStatusSensorContext):
    return dg.RunRequest(run_key=f"refresh-after-{context.dagster_run.run_id}")


# ---------------------------------------------------------------- break-glass escrow (P4, R4)


@dg.asset(
    group_name="escrow",
    tags=NIGHTLY,
    deps=["kms_state"],
    kinds={"python"},
    description="R4/P4: break-glass rotated every 30 days (even unused) and sealed as an M-of-N package.",
)
def break_glass_escrow(context: dg.AssetExecutionContext, kms: KmsResource) -> dg.MaterializeResult:
    from ..core.response import escrow

    ctx = kms.context()
    summary = escrow.nightly_escrow(ctx)
    if summary.get("problem"):
        context.log.warning(summary["problem"])
    st = escrow.status(ctx)
    cur = st["current"]
    return dg.MaterializeResult(
        metadata={
            "rotated": bool(summary.get("rotated")),
            "sealed_now": bool(summary.get("sealed")),
            "current_package": cur["package_id"] if cur else "none",
            "key_version": cur["key_version"] if cur else 0,
            "threshold": f"{cur['threshold']} of {len(cur['custodians'])}" if cur else "-",
            "problem": summary.get("problem") or "none",
            "packages": dg.MetadataValue.md(
                markdown_table(
                    ["package", "version", "created", "superseded", "confirmed destroyed by", "erased"],
                    [
                        [
                            p["package_id"],
                            p["key_version"],
                            f"{p['created_at']:%Y-%m-%d}",
                            f"{p['superseded_at']:%Y-%m-%d}" if p["superseded_at"] else "current",
                            ", ".join(sorted(p["confirmations"])) or "-",
                            "yes" if p["erased_at"] else "",
                        ]
                        for p in st["packages"][-20:]
                    ],
                )
            ),
            "custodians": dg.MetadataValue.md(
                markdown_table(
                    ["custodian", "enrolled", "recipient"],
                    # the age recipient shortened (full: `kms escrow custodian list`), so the table fits the metadata column
                    [
                        [c["name"], "yes" if c["enrolled"] else "**NO**", shorten(c["recipient"], 16) or "-"]
                        for c in st["custodians"]
                    ],
                )
            ),
        }
    )


@dg.asset_check(
    asset=break_glass_escrow,
    blocking=True,
    description="P4: the active break-glass version is sealed in a current, stored, in-cadence package.",
)
def escrow_current(kms: KmsResource) -> dg.AssetCheckResult:
    from ..core.response import escrow

    problems = escrow.current_problems(kms.context())
    return dg.AssetCheckResult(passed=not problems, metadata={"problems": dg.MetadataValue.json(problems)})


@dg.asset_check(
    asset=break_glass_escrow,
    description="R4: every custodian confirmed each superseded package destroyed within the window.",
)
def escrow_destruction_confirmed(kms: KmsResource) -> dg.AssetCheckResult:
    from ..core.response import escrow

    ctx = kms.context()
    overdue = escrow.destruction_overdue(ctx)
    return dg.AssetCheckResult(
        passed=not overdue,
        metadata={
            "window_days": escrow.escrow_policy(ctx).destruction_confirm_days,
            "overdue": dg.MetadataValue.json(overdue),
        },
    )
