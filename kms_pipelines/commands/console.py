"""`kms console serve|registration-link|status` (issue 13: the browser door, clause A2)."""

import click


def register(cli) -> None:
    from ..cli import emit_json, get_context

    @cli.group()
    def console():
        """The KMS console: FIDO2 security key + TOTP sign-in, approvals and reviews, the Dagster UI."""

    @console.command("serve")
    @click.option(
        "--origin",
        envvar="KMS_CONSOLE_ORIGIN",
        required=True,
        help="Exact origin browsers use, e.g. https://kms.example.com (WebAuthn RP id = its host). "
        "[env KMS_CONSOLE_ORIGIN]",
    )
    @click.option("--host", default="127.0.0.1", show_default=True, help="Interface to listen on.")
    @click.option("--port", default=8443, show_default=True, type=int)
    @click.option(
        "--dagster-url",
        envvar="KMS_CONSOLE_DAGSTER_URL",
        default=None,
        help="dagster-webserver on loopback, started with --path-prefix /dagster, e.g. "
        "http://127.0.0.1:3000 [env KMS_CONSOLE_DAGSTER_URL]",
    )
    @click.option("--ssl-certfile", type=click.Path(exists=True, dir_okay=False), default=None)
    @click.option("--ssl-keyfile", type=click.Path(exists=True, dir_okay=False), default=None)
    @click.pass_context
    def serve(ctx, origin, host, port, dagster_url, ssl_certfile, ssl_keyfile):
        """Serve the console (uvicorn). Put TLS here or on a proxy in front: the session cookie is Secure."""
        import uvicorn

        from ..console.app import ConsoleConfig, create_app

        try:
            app = create_app(ConsoleConfig(get_context(ctx), origin, dagster_url))
        except ValueError as exc:
            raise click.BadParameter(str(exc), param_hint="--origin/--dagster-url") from None
        click.echo(
            f"KMS console for {origin} on {host}:{port}" + (f", Dagster UI from {dagster_url}" if dagster_url else "")
        )
        uvicorn.run(
            app,
            host=host,
            port=port,
            ssl_certfile=ssl_certfile,
            ssl_keyfile=ssl_keyfile,
            proxy_headers=False,
            server_header=False,
            log_level="info",
            access_log=False,
        )  # paths carry one-time registration tokens: never logged

    @console.command("registration-link")
    @click.argument("principal")
    @click.option("--ticket", required=True, help="Change ticket the approvals are bound to.")
    @click.option(
        "--requested-by",
        "requested_by",
        required=True,
        help="Principal holding 'console-registration' who hands the link over.",
    )
    @click.option("--totp", required=True, help="The requester's current TOTP code.")
    @click.option(
        "--origin", envvar="KMS_CONSOLE_ORIGIN", required=True, help="The console's origin [env KMS_CONSOLE_ORIGIN]."
    )
    @click.pass_context
    def registration_link(ctx, principal, ticket, requested_by, totp, origin):
        """Issue PRINCIPAL's one-time security-key registration link (dual control: the first call
        records the request; after two `kms approve --operation console-registration --target PRINCIPAL`
        by other principals, the second call prints the link once)."""
        from ..core.access import console_auth, webauthn

        try:
            rp = webauthn.RelyingParty(origin)
        except ValueError as exc:
            raise click.BadParameter(str(exc), param_hint="--origin") from None
        from ..core.access import principals as access

        kms = get_context(ctx)
        access.prove_principal(kms, requested_by, totp)  # the requester proves the claimed name
        link = console_auth.issue_registration_link(kms, principal, ticket=ticket, requested_by=requested_by)
        click.echo(
            f"registration link for {link.principal} (approved by {', '.join(link.approvers)}), valid until "
            f"{link.expires_at.isoformat()}; shown once:"
        )
        click.echo(link.url(rp.origin))

    @console.command("register")
    @click.argument("link")
    @click.option("--totp", required=True, help="Your current TOTP code.")
    @click.option(
        "--software-key",
        "software_key",
        type=click.Path(dir_okay=False),
        default=None,
        help="Create a software FIDO2 authenticator in this (new) file instead of using a plugged-in "
        "security key (demo and tests; refused unless console.allow_software_authenticators).",
    )
    @click.pass_context
    def register_key(ctx, link, totp, software_key):
        """Register your security key through LINK, the one-time registration link an admin issued
        under dual control (`kms console registration-link`), from the terminal instead of the
        browser: the key is registered for the link's origin and then approves in the console and
        with `kms approve`."""
        from urllib.parse import urlparse

        from ..core.access import console_auth, webauthn
        from ..fido2_client import authenticator
        from .access import _ask_pin

        u = urlparse(link)
        token = u.path.rsplit("/register/", 1)[-1] if "/register/" in u.path else ""
        if not token:
            raise click.BadParameter(
                "expected https://HOST/register/TOKEN, as `kms console registration-link` printed it", param_hint="LINK"
            )
        try:
            rp = webauthn.RelyingParty(f"{u.scheme}://{u.netloc}")
        except ValueError as exc:
            raise click.BadParameter(str(exc), param_hint="LINK") from None
        kms = get_context(ctx)
        handle, options = console_auth.begin_registration(kms, rp, token)
        key = authenticator(
            rp.origin,
            software_key,
            create=bool(software_key),
            **({} if software_key else {"prompt": lambda m: click.echo(m, err=True), "ask_pin": _ask_pin}),
        )
        name = console_auth.complete_registration(
            kms, rp, token, handle=handle, response=key.create(options), totp=totp
        )
        click.echo(f"security key registered for {name} at {rp.origin}")

    @console.command("status")
    @click.option("--json", "as_json", is_flag=True)
    @click.pass_context
    def status(ctx, as_json):
        """Which principals with a role lack a console factor (FIDO2 key, TOTP); exit 1 if any."""
        from ..core.access import console_auth

        gaps = console_auth.missing_console_factors(get_context(ctx))
        if as_json:
            emit_json({"missing": gaps})
        else:
            for name, missing in sorted(gaps.items()):
                click.echo(f"{name}: missing {', '.join(missing)}")
            click.echo(
                f"{len(gaps)} principal(s) cannot sign in to the console"
                if gaps
                else "every principal with a role has a FIDO2 key and TOTP"
            )
        if gaps:
            ctx.exit(1)
