"""`kms events …` and `kms escrow …` (issue 7: R2, R4, P4, A3, A4): core/response's commands."""

import os
from pathlib import Path

import click

from .access import acting_principal


def register(cli) -> None:
    from ..cli import EXIT_FAILED, emit_json, get_context

    # ---------------------------------------------------------------- events
    @cli.group()
    def events():
        """Security events (compromise, CI-secret exposure, tenant rotation) and their response."""

    @events.command("report")
    @click.option(
        "--type", "type_", required=True, type=click.Choice(["compromise", "ci-secret-exposure", "tenant-rotation"])
    )
    @click.option("--key", required=True, help="Affected key, e.g. service:api-gateway.")
    @click.option("--source", required=True, help="Who/what detected it (scanner, CI system, person).")
    @click.option("--detail", default="", help="What happened (never paste the secret itself).")
    @acting_principal("needs 'revoke' for a compromise, 'rotate' otherwise")
    @click.option("--json", "as_json", is_flag=True)
    @click.pass_context
    def events_report(ctx, type_, key, source, detail, principal, totp, as_json):
        """Record a security event; the sensor launches compromise_response for it (no further
        approval), so the reporter proves themself and holds what the response does."""
        from ..core.response import events as ev

        info = ev.report_by(get_context(ctx), type_, key, source, detail, principal=principal, totp=totp)
        if as_json:
            emit_json(info.to_dict())
        elif info.duplicate_of:
            click.echo(f"duplicate of open event {info.id} ({info.type} {info.key} v{info.key_version}, {info.status})")
        else:
            click.echo(f"reported event {info.id}: {info.type} of {info.key} v{info.key_version}")

    @events.command("list")
    @click.option("--status", type=click.Choice(["new", "responding", "resolved"]), default=None)
    @click.option("--key", default=None)
    @click.option("--json", "as_json", is_flag=True)
    @click.pass_context
    def events_list(ctx, status, key, as_json):
        """Security events, oldest first."""
        from ..core.response import events as ev

        rows = ev.list_events(get_context(ctx), status=status, key=key)
        if as_json:
            emit_json([r.to_dict() for r in rows])
            return
        click.echo(f"{'ID':32} {'TYPE':19} {'KEY':30} {'VER':>3} {'STATUS':10} REPORTED")
        for r in rows:
            click.echo(
                f"{r.id:32} {r.type:19} {r.key:30} {r.key_version:>3} {r.status:10} {r.reported_at:%Y-%m-%d %H:%M}"
            )

    @events.command("respond")
    @click.argument("event_id")
    @click.option("--ticket", required=True, help="Change ticket the approvals are bound to.")
    @click.option("--requested-by", required=True, help="Principal launching the response.")
    @click.option("--totp", required=True, help="The requester's current TOTP code.")
    @click.option("--json", "as_json", is_flag=True)
    @click.pass_context
    def events_respond(ctx, event_id, ticket, requested_by, totp, as_json):
        """Run the compromise response by hand (needs dual approval; the sensor needs none)."""
        from ..core.response import compromise

        kms = get_context(ctx).as_actor(requested_by)
        approvers = compromise.authorize_existing(kms, event_id, ticket=ticket, requested_by=requested_by, totp=totp)
        result = compromise.respond(kms, event_id, approvers=approvers, ticket=ticket)
        if as_json:
            emit_json(result.to_dict())
            return
        for step in result.steps:
            click.echo(step)
        if not result.notified and not result.already_resolved:
            click.echo("warning: some notifications failed (see `kms notifications status`)", err=True)

    @events.command("serve")
    @click.option("--host", default="127.0.0.1", show_default=True)
    @click.option("--port", default=8787, show_default=True, type=int)
    @click.pass_context
    def events_serve(ctx, host, port):
        """HTTP intake for CI systems: POST /events with `Authorization: Bearer $KMS_EVENTS_TOKEN`."""
        from ..core.response import events as ev

        server = ev.make_intake_server(get_context(ctx), os.environ.get("KMS_EVENTS_TOKEN", ""), host, port)
        click.echo(f"security-event intake on http://{host}:{server.server_address[1]}/events")
        try:
            server.serve_forever()
        except KeyboardInterrupt:
            pass
        finally:
            server.server_close()

    # ---------------------------------------------------------------- escrow
    @cli.group()
    def escrow():
        """Break-glass escrow: M-of-N sealed packages, rotation, destruction confirmations."""

    @escrow.group("custodian")
    def custodian():
        """Enroll the policy's custodians."""

    @custodian.command("add")
    @click.argument("name")
    @click.option(
        "--out",
        "out",
        type=click.Path(dir_okay=False),
        default=None,
        help="Write a newly generated age identity here (mode 0600) for the custodian to keep.",
    )
    @click.option("--recipient", default=None, help="The custodian's own age1… public key instead.")
    @click.option("--replace", is_flag=True, help="Replace an enrolled custodian's key.")
    @click.option("--ticket", default=None, help="Change ticket the approvals are bound to.")
    @click.option(
        "--requested-by",
        "requested_by",
        default=None,
        help="Requesting principal (holds 'principals'); proven by --totp.",
    )
    @click.option("--totp", default=None, help="The requester's current TOTP code.")
    @click.pass_context
    def custodian_add(ctx, name, out, recipient, replace, ticket, requested_by, totp):
        """Enroll custodian NAME (a generated keypair with --out, or their own --recipient).

        A manual operation like principal enrolment: two other principals holding 'approve' and
        'principals' approve `--operation custodian-add --target NAME=age1…` (NAME=new-keypair with
        --out) first; then the requester runs this with --ticket, --requested-by and --totp. Only
        before the first-run ceremony (`kms init --admin`) are custodians enrolled without it."""
        from ..core.response import escrow as esc

        if bool(out) == bool(recipient):
            raise click.UsageError("give exactly one of --out FILE or --recipient age1…")
        if out and Path(out).exists():
            raise click.UsageError(f"{out} exists; refusing to overwrite an identity file")
        if any((ticket, requested_by, totp)) and not all((ticket, requested_by, totp)):
            raise click.UsageError("--ticket, --requested-by and --totp go together")
        kms = get_context(ctx)
        rcpt, identity = esc.enroll_custodian(
            kms, name, recipient=recipient, replace=replace, ticket=ticket, requested_by=requested_by, totp=totp
        )
        if identity:
            fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as fh:
                fh.write(identity + "\n")
            click.echo(f"enrolled {name} ({rcpt}); identity written to {out} — hand it to the custodian")
        else:
            click.echo(f"enrolled {name} ({rcpt})")

    @custodian.command("list")
    @click.option("--json", "as_json", is_flag=True)
    @click.pass_context
    def custodian_list(ctx, as_json):
        from ..core.response import escrow as esc

        rows = esc.custodians(get_context(ctx))
        if as_json:
            emit_json(rows)
            return
        for r in rows:
            click.echo(f"{r['name']:20} {'enrolled ' + r['recipient'] if r['enrolled'] else 'NOT ENROLLED'}")

    @escrow.command("seal")
    @acting_principal("needs 'break-glass' and 'export'")
    @click.option("--json", "as_json", is_flag=True)
    @click.pass_context
    def escrow_seal(ctx, principal, totp, as_json):
        """Seal the active break-glass version now (supersedes the current package)."""
        from ..core.response import escrow as esc

        info = esc.manual_seal(get_context(ctx), principal=principal, totp=totp)
        if as_json:
            emit_json(info.to_dict())
        else:
            click.echo(
                f"sealed package {info.package_id}: break-glass v{info.key_version}, "
                f"{info.threshold} of {len(info.custodians)}"
            )

    @escrow.command("status")
    @click.option("--json", "as_json", is_flag=True)
    @click.pass_context
    def escrow_status(ctx, as_json):
        """Current package, custodians, overdue destruction confirmations; exit 1 on a problem."""
        from ..core.response import escrow as esc

        st = esc.status(get_context(ctx))
        if as_json:
            emit_json(st)
        else:
            cur = st["current"]
            click.echo(
                f"current package: {cur['package_id']} (v{cur['key_version']}, sealed {cur['created_at']:%Y-%m-%d})"
                if cur
                else "current package: none"
            )
            for p in st["packages"]:
                if p["superseded_at"]:
                    conf = ", ".join(f"{c}{'✓' if c in p['confirmations'] else '✗'}" for c in p["custodians"])
                    click.echo(
                        f"  superseded {p['package_id']} (v{p['key_version']}): {conf}"
                        + ("  [erased]" if p["erased_at"] else "")
                    )
            for o in st["destruction_overdue"]:
                click.echo(
                    f"OVERDUE: {o['package_id']} not confirmed destroyed by {', '.join(o['missing'])} (due {o['due']})",
                    err=True,
                )
            for problem in st["problems"]:
                click.echo(f"PROBLEM: {problem}", err=True)
        if st["destruction_overdue"] or st["problems"]:
            ctx.exit(EXIT_FAILED)

    @escrow.command("confirm-destroyed")
    @click.argument("package_id")
    @click.option("--custodian", required=True)
    @click.option(
        "--identity",
        "identity_file",
        required=True,
        type=click.Path(exists=True, dir_okay=False),
        help="The custodian's age identity file (proves who confirms).",
    )
    @click.pass_context
    def escrow_confirm(ctx, package_id, custodian, identity_file):
        """A custodian confirms their copy of a superseded package is destroyed."""
        from ..core.response import escrow as esc

        info = esc.confirm_destroyed(
            get_context(ctx), package_id, custodian, Path(identity_file).read_text(), actor=custodian
        )
        missing = [c for c in info.custodians if c not in info.confirmations]
        click.echo(
            f"{custodian} confirmed {package_id} destroyed"
            + (f"; waiting for {', '.join(missing)}" if missing else "; all custodians confirmed")
        )

    @escrow.command("unseal")
    @click.argument("package_id")
    @click.option(
        "--share",
        "shares",
        multiple=True,
        metavar="CUSTODIAN=FILE",
        required=True,
        help="A custodian's age identity (or decrypted share) file; repeat for M custodians.",
    )
    @click.option("--ticket", required=True)
    @click.option("--requester", required=True)
    @click.option("--totp", required=True, help="The requester's current TOTP code.")
    @click.option(
        "--out",
        "out",
        type=click.Path(dir_okay=False),
        default=None,
        help="Also write the recovered key here (mode 0600).",
    )
    @click.pass_context
    def escrow_unseal(ctx, package_id, shares, ticket, requester, totp, out):
        """Break glass: M shares + dual approval; then rotate and re-seal at once."""
        from ..core.response import escrow as esc

        given = {}
        for item in shares:
            name, sep, path = item.partition("=")
            if not sep or not name or not path:
                raise click.UsageError(f"--share takes CUSTODIAN=FILE, got {item!r}")
            try:
                given[name] = Path(path).read_text()
            except OSError as exc:
                raise click.UsageError(f"cannot read share file for {name}: {exc.strerror}") from exc
        from ..core.access import principals as access

        kms = get_context(ctx)
        access.prove_principal(kms, requester, totp)
        r = esc.unseal(kms.as_actor(requester), package_id, given, ticket=ticket, requester=requester, out_path=out)
        click.echo(
            f"unsealed {r.package_id} (break-glass v{r.key_version}) with shares of {', '.join(r.custodians)}; "
            f"approved by {', '.join(r.approvers)}"
        )
        click.echo(f"break-glass rotated to v{r.rotated_to}; new package {r.new_package or 'NOT SEALED'}")
