"""`kms archive list|verify|retrieve|purge`: the archive vault of retired root/service keys (T1)."""

from __future__ import annotations

import click


def register(cli) -> None:
    """Attach this area's commands to the top-level `kms` group."""
    from ..cli import EXIT_FAILED, emit_json, get_context

    @cli.group()
    def archive():
        """Archive copies of retired root/service keys under Object Lock; forensic retrieval under dual control (T1)."""

    def _copies(ctx, verify: bool, as_json: bool) -> list:
        from ..core.keys import vault

        rows = vault.copies(get_context(ctx), verify=verify)
        if as_json:
            emit_json([r.to_dict() for r in rows])
            return rows
        if not rows:
            click.echo("the vault holds no archive copies yet (none retired since the vault existed)")
        for r in rows:
            state = "ok" if r.status == "archived" and not r.problems else ("BROKEN" if r.problems else r.status)
            lock = f"locked until {r.retain_until:%Y-%m-%d %H:%M} UTC" if r.retain_until else ""
            click.echo(f"{r.key} v{r.version}  {r.status:<12} {state:<7} {lock}  {r.object_key or r.reason or ''}")
            for p in r.problems:
                click.echo(f"  problem: {p}", err=True)
        return rows

    @archive.command("list")
    @click.option("--json", "as_json", is_flag=True)
    @click.pass_context
    def archive_list(ctx, as_json):
        """Every archive copy with its lock, each verified (manifest signature, hash, lock)."""
        if any(r.problems for r in _copies(ctx, True, as_json)):
            ctx.exit(EXIT_FAILED)

    @archive.command("verify")
    @click.option("--json", "as_json", is_flag=True)
    @click.pass_context
    def archive_verify(ctx, as_json):
        """Verify every copy's root-signed manifest entry, bytes against the hash, and Object Lock; exit 1 if any fails."""
        rows = _copies(ctx, True, as_json)
        broken = [r for r in rows if r.problems]
        if not as_json:
            checked = sum(r.status == "archived" for r in rows)
            line = f"{checked} archive cop{'y' if checked == 1 else 'ies'} checked, {len(broken)} broken"
            click.echo(line, err=bool(broken))
        if broken:
            ctx.exit(EXIT_FAILED)

    @archive.command("retrieve")
    @click.argument("key")
    @click.argument("version", type=click.IntRange(min=1))
    @click.option("--ticket", required=True, help="Change ticket the approvals are bound to.")
    @click.option("--requested-by", "requested_by", required=True, help="Requesting principal.")
    @click.option("--totp", required=True, help="The requester's current TOTP code.")
    @click.option("--json", "as_json", is_flag=True)
    @click.pass_context
    def archive_retrieve(ctx, key, version, ticket, requested_by, totp, as_json):
        """Import archived KEY VERSION into the forensic keystore (decrypt/verify only, erased after the
        policy TTL). Runs only once two principals other than the requester have approved
        `--operation archive-retrieve --target KEY#vVERSION` for this ticket (`kms approve`)."""
        from ..core.access import principals as access
        from ..core.keys import forensic

        kms = get_context(ctx)
        access.prove_principal(kms, requested_by, totp)  # the requester proves the claimed name
        r = forensic.retrieve(kms.as_actor(requested_by), key, version, ticket=ticket, requested_by=requested_by)
        if as_json:
            emit_json(r.to_dict())
            return
        click.echo(
            f"retrieved {r.key} v{r.version} into the forensic keystore as {', '.join(r.refs)} (ticket "
            f"{r.ticket}, requested by {r.requester}, approved by {', '.join(r.approvers)}); decrypt/verify "
            f"only, erased at {r.expires_at:%Y-%m-%d %H:%M} UTC"
        )
        for f in r.notification_failures:
            click.echo(f"warning: compliance notification failed: {f}", err=True)

    @archive.command("purge")
    @click.pass_context
    def archive_purge(ctx):
        """Erase forensic material whose TTL has passed (the nightly run does this too)."""
        from ..core.keys import forensic

        erased = forensic.purge_expired(get_context(ctx))
        click.echo(f"erased {len(erased)} forensic key(s)" + (f": {', '.join(erased)}" if erased else ""))
