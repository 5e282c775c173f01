"""`kms` commands for core/keys: rotation (issue 4b): partners, dependents, manifests,
retention, and the dual-controlled `keys destroy` / `keys revoke`; and `kms archive
list|verify|retrieve|purge`, the archive vault of retired root/service keys (T1)."""

from __future__ import annotations

import click

from .access import acting_principal


def register(cli) -> None:
    """Attach this area's commands to the top-level `kms` group."""
    from ..cli import EXIT_FAILED, emit_json, get_context

    # ------------------------------------------------------------------ partners
    @cli.group()
    def partners():
        """Integration partners notified of root rotations (R1)."""

    @partners.command("ack")
    @click.argument("partner")
    @click.option("--version", "version", type=int, required=True, help="Root version acknowledged.")
    @acting_principal("who records the acknowledgement")
    @click.option("--json", "as_json", is_flag=True)
    @click.pass_context
    def partners_ack(ctx, partner, version, principal, totp, as_json):
        """Record PARTNER's acknowledgement of root VERSION (R1 evidence), by a proven principal."""
        from ..core.access import principals as access
        from ..core.keys import rotation

        kms = get_context(ctx)
        access.prove_principal(kms, principal, totp)
        a = rotation.ack(kms.as_actor(principal), partner, version, actor=principal)
        if as_json:
            emit_json(a.__dict__)
        elif a.new:
            click.echo(f"{partner} acknowledged root v{version} at {a.acked_at.isoformat()}")
        else:
            click.echo(f"{partner} had already acknowledged root v{version} at {a.acked_at.isoformat()}")

    @partners.command("status")
    @click.option("--version", "version", type=int, default=None)
    @click.option("--json", "as_json", is_flag=True)
    @click.pass_context
    def partners_status(ctx, version, as_json):
        """Notice and acknowledgement of every partner per root rotation; exit 1 if one is overdue."""
        from ..core.keys import rotation

        kms = get_context(ctx)
        rows = rotation.partner_status(kms, version)
        if as_json:
            emit_json([r.to_dict() for r in rows])
        else:
            click.echo(f"{'ROOT':>5} {'PARTNER':20} {'DEADLINE':20} {'NOTIFIED':20} {'ACKED':20} STATUS")
            for r in rows:
                click.echo(
                    f"{'v' + str(r.version):>5} {r.partner:20} {r.deadline:%Y-%m-%d %H:%M}     "
                    f"{(r.notified_at.strftime('%Y-%m-%d %H:%M') if r.notified_at else '-'):20} "
                    f"{(r.acked_at.strftime('%Y-%m-%d %H:%M') if r.acked_at else '-'):20} {r.status}"
                )
        if any(r.status == "OVERDUE" for r in rows):
            ctx.exit(EXIT_FAILED)

    @partners.command("notify")
    @click.pass_context
    def partners_notify(ctx):
        """Deliver pending partner notices now (the nightly run does this too)."""
        from ..core.keys import rotation

        sent = rotation.notify_partners(get_context(ctx))
        click.echo(f"notified {len(sent)}" + (f": {', '.join(sent)}" if sent else ""))

    # ---------------------------------------------------------------- dependents
    @cli.group()
    def dependents():
        """Dependent services confirm new key material before the old is revoked (T4)."""

    @dependents.command("confirm")
    @click.argument("key")
    @click.option("--version", "version", type=int, required=True)
    @click.option("--service", required=True, help="The dependent service confirming.")
    @acting_principal("who records the service's confirmation")
    @click.option("--json", "as_json", is_flag=True)
    @click.pass_context
    def dependents_confirm(ctx, key, version, service, principal, totp, as_json):
        """SERVICE confirms it uses KEY VERSION (T4: revocation waits for it), recorded by a proven principal."""
        from ..core.access import principals as access
        from ..core.keys import dependents as dep

        kms = get_context(ctx)
        access.prove_principal(kms, principal, totp)
        c = dep.confirm(kms.as_actor(principal), key, version, service, actor=principal)
        if as_json:
            emit_json(c.__dict__)
        else:
            click.echo(f"{service} {'confirmed' if c.new else 'had already confirmed'} {key} v{version}")

    @dependents.command("status")
    @click.argument("key", required=False)
    @click.option("--json", "as_json", is_flag=True)
    @click.pass_context
    def dependents_status(ctx, key, as_json):
        """Confirmations recorded per key version."""
        from ..core.keys import dependents as dep

        rows = dep.status(get_context(ctx), key)
        if as_json:
            emit_json(rows)
            return
        for r in rows:
            click.echo(
                f"{r['key']:34} v{r['version']:<4} {r['service']:24} {r['confirmed_at']:%Y-%m-%d %H:%M} {r['actor']}"
            )

    # ----------------------------------------------------------------- manifests
    @cli.group()
    def manifest():
        """Root public-key manifests (R1)."""

    @manifest.command("list")
    @click.option("--json", "as_json", is_flag=True)
    @click.pass_context
    def manifest_list(ctx, as_json):
        from ..core.keys import manifest as mf

        rows = mf.manifests(get_context(ctx))
        if as_json:
            emit_json([r.to_dict() for r in rows])
            return
        for r in rows:
            click.echo(f"{r.kid:10} {r.fingerprint}  {r.url}")

    @manifest.command("verify")
    @click.pass_context
    def manifest_verify(ctx):
        """Verify the published manifest chain offline (public keys only); exit 1 if broken."""
        from ..core.keys import manifest as mf

        result = mf.verify_chain(get_context(ctx))
        if result.ok:
            click.echo(f"manifest chain intact: {result.count} root version(s)")
        else:
            click.echo(f"manifest chain BROKEN at v{result.first_bad_version}: {result.problem}", err=True)
            ctx.exit(EXIT_FAILED)

    # ------------------------------------------------------- retention / retire
    @cli.group()
    def retention():
        """Retention of retired root/service versions (T1)."""

    @retention.command("due")
    @click.option("--json", "as_json", is_flag=True)
    @click.pass_context
    def retention_due(ctx, as_json):
        """Versions whose retention has ended, with the ticket to approve their destruction under."""
        from ..core.keys import retention as ret

        rows = ret.due_for_destruction(get_context(ctx))
        if as_json:
            emit_json([r.to_dict() for r in rows])
            return
        if not rows:
            click.echo("nothing due for destruction")
        for r in rows:
            click.echo(f"{r.target:40} allowed since {r.allowed_from:%Y-%m-%d %H:%M}  ticket {r.ticket}")

    keys_group = cli.commands["keys"]

    @keys_group.command("destroy")
    @click.argument("key")
    @click.option("--version", "version", type=int, required=True)
    @click.option(
        "--ticket",
        default=None,
        help="Change ticket the approvals are bound to (default: the retirement ticket retire-<key>-v<N>).",
    )
    @click.option("--requested-by", "requested_by", required=True, help="Requesting principal.")
    @click.option("--totp", required=True, help="The requester's current TOTP code.")
    @click.option("--reason", default="retention ended (T1)", show_default=True)
    @click.pass_context
    def keys_destroy(ctx, key, version, ticket, requested_by, totp, reason):
        """Destroy KEY VERSION: every guard must agree (the refusal names the guard), then two
        approvals for (destroy, KEY#vN, ticket) are consumed with the destruction."""
        from ..core.keys import retention as ret

        kms = get_context(ctx)
        _require(kms, requested_by, totp, "destroy", f"{key}#v{version}")
        approvers = ret.destroy_version(kms, key, version, ticket=ticket, requester=requested_by, reason=reason)
        click.echo(f"destroyed {key} v{version} (approved by {', '.join(approvers)})")

    @keys_group.command("revoke")
    @click.argument("key")
    @click.option("--version", "version", type=int, required=True)
    @click.option("--ticket", required=True, help="Change ticket the approvals are bound to.")
    @click.option("--requested-by", "requested_by", required=True, help="Requesting principal.")
    @click.option("--totp", required=True, help="The requester's current TOTP code.")
    @click.option("--reason", default="retired", show_default=True)
    @click.pass_context
    def keys_revoke(ctx, key, version, ticket, requested_by, totp, reason):
        """Revoke KEY VERSION (it stops verifying and decrypting). Dependents must have confirmed
        a newer version (T4); two approvals for (revoke, KEY#vN, ticket) are consumed."""
        from ..core.keys import lifecycle

        kms = get_context(ctx)
        target = f"{key}#v{version}"
        _require(kms, requested_by, totp, "revoke", target)

        def authorize(session):
            from ..core.access import principals as access

            return access.consume_approvals(
                session, kms, operation="revoke", target=target, ticket=ticket, requester=requested_by
            )

        lifecycle.revoke(kms, key, version, actor=requested_by, reason=reason, ticket=ticket, authorize=authorize)
        click.echo(f"revoked {key} v{version}")

    _register_archive(cli)


def _require(kms, principal: str, totp: str, operation: str, target: str) -> None:
    """The requester proves the claimed name (TOTP), then must hold the permission."""
    from ..core.access import principals as access
    from ..core.foundation import limits

    limits.text(target, "target", limits.MAX_TARGET)
    access.prove_principal(kms, principal, totp)
    access.require_permission(kms, principal, operation, target=target)


def _register_archive(cli) -> None:
    """`kms archive …`: the archive vault of retired root/service keys (T1)."""
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
