"""`kms principals …`, `kms approve`, `kms keys rotate --manual`, `kms token …`, `kms audit …`
(issue 3: A1–A4) and `kms notifications status` (A4: delivery evidence). Thin wrappers over
core.access.principals / core.ledger.audit / core.access.notifications."""

import inspect

import click


def acting_principal(needs: str):
    """--as and --totp: the human performing the command, proven by their current TOTP code
    (``access.prove_principal``); ``needs`` says which permission the command requires."""

    def decorate(f):
        f = click.option("--totp", required=True, help="The principal's current TOTP code.")(f)
        return click.option("--as", "principal", required=True, help=f"Acting principal ({needs}), proven by --totp.")(
            f
        )

    return decorate


def requester_options(f):
    """--ticket, --requested-by and --totp: a human requester proves the claimed name."""
    f = click.option("--totp", required=True, help="The requester's current TOTP code.")(f)
    f = click.option("--requested-by", "requested_by", required=True, help="Requesting principal.")(f)
    return click.option("--ticket", required=True, help="Change ticket the approvals are bound to.")(f)


software_key_option = click.option(
    "--software-key",
    "software_key",
    type=click.Path(dir_okay=False),
    default=None,
    help="Use the software FIDO2 authenticator in this file instead of a plugged-in security key (demo and "
    "tests: refused unless the policy sets console.allow_software_authenticators).",
)


def _ask_pin() -> str:
    return click.prompt("Security key PIN", hide_input=True, err=True)


def register(cli) -> None:
    from ..cli import EXIT_FAILED, emit_json, finish_verification, get_context

    # ------------------------------------------------------------ principals
    @cli.group()
    def principals():
        """Human and workload principals, their roles and TOTP enrolment (A1, A2)."""

    roles_option = click.option(
        "--role",
        "roles",
        multiple=True,
        type=click.Choice(["sre_oncall", "security_engineering", "compliance_officer"]),
        help="Role of a human principal (repeatable).",
    )

    @principals.command("add")
    @click.argument("name")
    @roles_option
    @click.option("--workload", is_flag=True, help="Register a workload principal declared in the policy.")
    @requester_options
    @click.pass_context
    def principals_add(ctx, name, roles, workload, ticket, requested_by, totp):
        """Enrol NAME (a manual operation: two other principals holding 'approve' and 'principals'
        approve `--operation principal-add --target NAME=ROLE,...` first). For a human, prints
        the TOTP provisioning URI once: scan it now."""
        from ..core.access import enrolment

        kms = get_context(ctx)
        e = enrolment.enroll_principal(
            kms,
            name,
            roles,
            kind="workload" if workload else "human",
            requested_by=requested_by,
            totp=totp,
            ticket=ticket,
        )
        click.echo(f"enrolled {e.kind} principal {e.name}" + (f" with roles {', '.join(e.roles)}" if e.roles else ""))
        if e.provisioning_uri:
            # The only time the secret is shown: to this terminal, never to a log or the database.
            click.echo("TOTP provisioning URI (shown once; add it to the principal's authenticator):")
            click.echo(e.provisioning_uri)
            click.echo(
                f"next: {e.name} registers a security key (approvals need it): `kms console registration-link "
                f"{e.name} ...` under dual control, then `kms console register LINK` or the link in a browser"
            )

    @principals.command("roles")
    @click.argument("name")
    @roles_option
    @requester_options
    @click.pass_context
    def principals_roles(ctx, name, roles, ticket, requested_by, totp):
        """Replace NAME's roles (manual operation principal-roles, target NAME=ROLE,...)."""
        from ..core.access import enrolment

        approvers = enrolment.change_roles(
            get_context(ctx), name, roles, requested_by=requested_by, totp=totp, ticket=ticket
        )
        click.echo(
            f"{name} now holds {', '.join(sorted(set(roles)))} (approved by {', '.join(approvers)}); "
            "it approves again after the cooling-off"
        )

    @principals.command("remove")
    @click.argument("name")
    @requester_options
    @click.pass_context
    def principals_remove(ctx, name, ticket, requested_by, totp):
        """Disable NAME (manual operation principal-remove, target NAME)."""
        from ..core.access import enrolment

        approvers = enrolment.remove_principal(
            get_context(ctx), name, requested_by=requested_by, totp=totp, ticket=ticket
        )
        click.echo(f"removed {name} (approved by {', '.join(approvers)})")

    @principals.command("list")
    @click.option("--json", "as_json", is_flag=True)
    @click.pass_context
    def principals_list(ctx, as_json):
        """Every principal with its roles and permissions."""
        from ..core.access import principals as access

        rows = access.list_principals(get_context(ctx))
        if as_json:
            emit_json(rows)
            return
        for r in rows:
            click.echo(f"{r['name']:32} {r['kind']:8} {','.join(r['roles']) or '-':40} {','.join(r['permissions'])}")

    # ------------------------------------------------------------ approvals
    @cli.command("approve")
    @click.option("--ticket", required=True, help="Change ticket the approval is bound to.")
    @click.option(
        "--operation",
        required=True,
        type=click.Choice(
            [
                "rotate",
                "revoke",
                "destroy",
                "break-glass",
                "export",
                "console-registration",
                "archive-retrieve",
                "principal-add",
                "principal-roles",
                "principal-remove",
                "custodian-add",
            ]
        ),
    )
    @click.option(
        "--target",
        default=None,
        help="An existing key, key#vN or escrow package id, or an open request's target (NAME=ROLE,... for "
        "principal-add/-roles, NAME for principal-remove, CUSTODIAN=age1… or CUSTODIAN=new-keypair "
        "for custodian-add). Default: the one open request for "
        "ticket+operation.",
    )
    @click.option("--as", "approver", required=True, help="Approving principal.")
    @click.option("--totp", required=True, help="Current TOTP code of the approving principal.")
    @software_key_option
    @click.option("--json", "as_json", is_flag=True)
    @click.pass_context
    def approve(ctx, ticket, operation, target, approver, totp, software_key, as_json):
        """Record a dual-control approval (A4), proven by both of the approver's factors: their
        security key signs a challenge bound to exactly (operation, target, ticket) -- touch it
        when asked -- and their TOTP code."""
        from ..core.access import console_auth
        from ..core.access import principals as access
        from ..fido2_client import authenticator

        kms = get_context(ctx)
        challenge = console_auth.begin_approval(kms, approver, operation=operation, ticket=ticket, target=target)
        key = authenticator(
            challenge.origin,
            software_key,
            prompt=lambda m: click.echo(m, err=True),
            ask_pin=_ask_pin,  # asked only by a hardware key; a software authenticator ignores it
        )
        info = access.approve(
            kms,
            approver,
            ticket=ticket,
            operation=operation,
            totp=totp,
            target=challenge.target,
            assertion={"handle": challenge.handle, "credential": key.get(challenge.options)},
        )
        if as_json:
            emit_json(info.__dict__)
        else:
            click.echo(
                f"approval {info.id} by {info.approver}: {info.operation} of {info.target} under "
                f"{info.ticket} ({info.have}/{info.required}), expires {info.expires_at.isoformat()}"
            )

    # ------------------------------------------------ keys rotate --manual
    keys_group = cli.commands["keys"]
    plain_rotate = keys_group.commands["rotate"]

    @click.pass_context
    def rotate(ctx, manual, ticket, requested_by, totp, **kwargs):
        from ..core.keys.lifecycle import EMERGENCY_REASONS

        if not manual:
            if kwargs.get("reason") in EMERGENCY_REASONS:
                # R2: no approvals, but the human who rotates proves who they are
                from ..core.access import principals as access
                from ..core.keys import rotation

                kms = get_context(ctx)
                rotation.check_immediate(kms, kwargs["key"], kwargs["reason"])
                if not requested_by or not totp or ticket:
                    raise click.UsageError(
                        f"--reason {kwargs['reason']} needs --requested-by and --totp (and takes no --ticket)"
                    )
                access.prove_principal(kms, requested_by, totp)
                access.require_permission(kms, requested_by, "rotate", target=kwargs["key"])
                return ctx.invoke(plain_rotate.callback, **{**kwargs, "actor": requested_by})
            if ticket or requested_by or totp:
                raise click.UsageError("--ticket/--requested-by/--totp go with --manual (or an R2 --reason)")
            return ctx.invoke(plain_rotate.callback, **kwargs)
        if not ticket or not requested_by or not totp:
            raise click.UsageError("--manual needs --ticket, --requested-by and --totp")
        if kwargs.get("if_due") or kwargs.get("reason"):
            raise click.UsageError("--manual excludes --if-due and --reason")
        from dataclasses import asdict

        from ..core.access import principals as access
        from ..core.keys import manual as manual_mod

        o = manual_mod.manual_rotate(
            get_context(ctx), kwargs["key"], ticket=ticket, requested_by=requested_by, totp=totp
        )
        r = o.result
        if kwargs.get("as_json"):
            emit_json(
                {
                    **asdict(r),
                    "approvers": o.approvers,
                    "ticket": o.ticket,
                    "requester": o.requester,
                    "notification_failures": o.notification_failures,
                }
            )
            return
        click.echo(
            f"rotated {r.key}: v{r.old_version} -> v{r.new_version} (manual, ticket {o.ticket}, requested by "
            f"{o.requester}, approved by {', '.join(o.approvers)})"
        )
        for f in o.notification_failures:
            click.echo(f"warning: compliance notification failed: {f}", err=True)

    manual_rotate_cmd = click.Command(
        "rotate",
        callback=rotate,
        help=inspect.cleandoc(plain_rotate.help or "")
        + "\n\nWith --manual the rotation is a dual-controlled manual operation (A4): it runs only once two "
        "distinct principals other than the requester have approved it for this ticket (`kms approve`).",
        params=list(plain_rotate.params)
        + [
            click.Option(["--manual"], is_flag=True, help="Manual rotation under dual control."),
            click.Option(["--ticket"], default=None, help="Change ticket (with --manual)."),
            click.Option(
                ["--requested-by", "requested_by"],
                default=None,
                help="Requesting principal (with --manual or an R2 --reason).",
            ),
            click.Option(["--totp"], default=None, help="The requester's current TOTP code (with --requested-by)."),
        ],
    )
    keys_group.add_command(manual_rotate_cmd, "rotate")

    # ------------------------------------------------------------ tokens
    @cli.group()
    def token():
        """Short-lived workload tokens (A2)."""

    @token.command("issue")
    @click.argument("workload")
    @click.option("--ttl-minutes", type=float, default=None, help="Lifetime (default and maximum: the policy cap).")
    @acting_principal("holds every operation the workload is declared with")
    @click.pass_context
    def token_issue(ctx, workload, ttl_minutes, principal, totp):
        """Print a signed token for workload WORKLOAD (a bearer credential: handle it as a secret).
        The issuer proves themself by TOTP; the token's subject is the workload."""
        from ..core.access import tokens

        click.echo(
            tokens.issue_token_by(get_context(ctx), workload, issued_by=principal, totp=totp, ttl_minutes=ttl_minutes)
        )

    @token.command("verify")
    @click.argument("token_text", metavar="TOKEN")
    @click.pass_context
    def token_verify(ctx, token_text):
        """Exit 0 if TOKEN is a valid, unexpired workload token."""
        from ..core.access import tokens

        c = tokens.verify_workload_token(get_context(ctx), token_text)
        click.echo(f"valid token for {c.sub}, expires at {c.exp} (jti {c.jti})")

    # ------------------------------------------------------------ audit
    @cli.group()
    def audit():
        """The hash-chained audit log of every KMS operation and its anomalies (A3)."""

    @audit.command("verify")
    @click.option("--json", "as_json", is_flag=True)
    @click.pass_context
    def audit_verify(ctx, as_json):
        """Recompute the audit chain; exit 1 naming the first bad seq."""
        from ..core.ledger import audit as audit_mod

        result = audit_mod.verify(get_context(ctx))
        finish_verification(
            ctx,
            result,
            as_json,
            lambda: f"audit log intact: {result.count} events, head {result.head_hash[:16]}…",
            lambda: f"audit log BROKEN at seq {result.first_bad_seq}: {result.problem}",
        )

    @audit.command("spool")
    @click.option("--json", "as_json", is_flag=True)
    @click.pass_context
    def audit_spool(ctx, as_json):
        """Audit events waiting in the local spool for the database; exit 1 if any.

        Reads only files under KMS_HOME, so it answers while the database is down."""
        from dataclasses import asdict

        from ..core.foundation import db
        from ..core.foundation.context import kms_home
        from ..core.ledger import audit as audit_mod

        home = kms_home()
        status = audit_mod.spool_status(db.make_engine(db.database_url_from_env(home)), home)
        if as_json:
            emit_json({**asdict(status), "ok": status.ok})
        elif status.ok:
            click.echo(f"audit spool empty ({status.path})")
        for problem in [] if as_json else status.problems():
            click.echo(f"AUDIT SPOOL: {problem}", err=True)
        if not status.ok:
            ctx.exit(EXIT_FAILED)

    @click.option("--limit", default=50, show_default=True)
    @click.option("--actor", default=None)
    @click.option("--json", "as_json", is_flag=True)
    @click.pass_context
    def audit_events(ctx, limit, actor, as_json):
        """The newest audit events."""
        from ..core.ledger import audit as audit_mod

        rows = [
            {
                "seq": e.seq,
                "at": e.at,
                "actor": e.actor,
                "operation": e.operation,
                "target": e.target,
                "outcome": e.outcome,
                "detail": e.detail,
            }
            for e in audit_mod.events(get_context(ctx), limit=limit, actor=actor)
        ]
        if as_json:
            emit_json(rows)
            return
        for r in rows:
            click.echo(
                f"{r['seq']:>7} {r['at']:%Y-%m-%d %H:%M:%S} {r['actor']:28} {r['operation']:16} "
                f"{(r['target'] or '-'):40} {r['outcome']}"
            )

    @audit.command("anomalies")
    @click.option("--refresh/--no-refresh", default=True, show_default=True, help="Run detection first.")
    @click.option("--json", "as_json", is_flag=True)
    @click.pass_context
    def audit_anomalies(ctx, refresh, as_json):
        """Detected anomalies; exit 1 while high-severity ones are unreviewed."""
        from ..core.access import anomalies

        kms = get_context(ctx)
        if refresh:
            anomalies.refresh_anomalies(kms)
        rows = [_anomaly_dict(a) for a in anomalies.list_anomalies(kms)]
        pending = anomalies.unreviewed(kms)
        if as_json:
            emit_json({"anomalies": rows, "unreviewed_high": [a.id for a in pending]})
        else:
            for r in rows:
                click.echo(
                    f"{r['id']:>5} {r['severity']:6} {r['kind']:26} {(r['principal'] or '-'):28} "
                    f"{r['count']:>6} {'reviewed by ' + r['reviewed_by'] if r['reviewed_by'] else 'UNREVIEWED'}"
                )
            click.echo(f"{len(pending)} unreviewed anomalies that need review")
        if pending:
            ctx.exit(EXIT_FAILED)

    @audit.command("review")
    @click.argument("anomaly_id", type=int)
    @click.option(
        "--as",
        "principal",
        required=True,
        help="Reviewing principal (needs 'review'; not the anomaly's own principal).",
    )
    @click.option("--totp", required=True, help="The reviewer's current TOTP code.")
    @click.option("--note", default=None)
    @click.pass_context
    def audit_review(ctx, anomaly_id, principal, totp, note):
        """Mark anomaly ANOMALY_ID reviewed, proven by the reviewer's TOTP code."""
        from ..core.access import anomalies

        row = anomalies.review(get_context(ctx), anomaly_id, principal, note, totp=totp)
        click.echo(f"anomaly {row.id} ({row.kind}, {row.severity}) reviewed by {row.reviewed_by}")

    # ---------------------------------------------------------------- notifications
    @cli.group()
    def notifications():
        """Policy notifications (A4): delivery evidence."""

    @notifications.command("status")
    @click.option("--json", "as_json", is_flag=True)
    @click.pass_context
    def notifications_status(ctx, as_json):
        """Exit 1 when a delivery in the policy window failed without a later success."""
        from dataclasses import asdict

        from ..core.access import notifications as nt

        st = nt.delivery_status(get_context(ctx))
        if as_json:
            emit_json(asdict(st))
        else:
            click.echo(f"last {st.window_hours} h: {st.delivered} delivered, {st.failed} failed")
            for u in st.unresolved:
                click.echo(
                    f"UNDELIVERED: {u['kind']} {u['ref'] or ''} via {u['channel']} {u['target']}: {u['error']}",
                    err=True,
                )
        if not st.ok:
            ctx.exit(EXIT_FAILED)


def _anomaly_dict(a) -> dict:
    return {
        "id": a.id,
        "kind": a.kind,
        "severity": a.severity,
        "principal": a.principal,
        "window_start": a.window_start,
        "window_end": a.window_end,
        "count": a.count,
        "detail": a.detail,
        "reviewed_by": a.reviewed_by,
        "reviewed_at": a.reviewed_at,
    }
