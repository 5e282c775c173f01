"""`kms backup create|list|prune|verify|rekey|trust-export`, `kms restore`, `kms drill run|close-followup|list`."""

import json

import click

from .access import acting_principal


def _ctx(ctx):
    from ..cli import get_context

    return get_context(ctx)


def _fail(ctx, message: str):
    click.echo(f"kms: error: {message}", err=True)
    ctx.exit(1)


def register(cli) -> None:
    """Attach this area's commands to the top-level `kms` group."""
    from ..cli import emit_json, heartbeat

    @cli.group()
    def backup():
        """Encrypted, locked archives of the KMS database and artifacts/kms (B1, B3)."""

    @backup.command("create")
    @click.option(
        "--class",
        "gfs_class",
        type=click.Choice(["nightly", "weekly"]),
        default=None,
        help="GFS class (default: weekly on the policy's weekly_on day, else nightly).",
    )
    @click.option(
        "--verify/--no-verify",
        default=True,
        show_default=True,
        help="Re-read the whole archive against its signed manifest afterwards.",
    )
    @click.option("--json", "as_json", is_flag=True)
    @click.pass_context
    def backup_create(ctx, gfs_class, verify, as_json):
        """Stream a backup to the object store under Object Lock."""
        from ..core.backup import backups as b

        kms = _ctx(ctx)
        with heartbeat("backup"):
            info = b.create(kms, gfs_class=gfs_class)
            out = info.as_dict()
            if verify:
                out["verified"] = b.verify_archive(kms, info.archive_id)["manifest_verifies"]
        if as_json:
            emit_json(out)
        else:
            click.echo(
                f"backup {info.archive_id} ({info.gfs_class}) {info.size} bytes sha256 {info.sha256} "
                f"locked until {info.retain_until:%Y-%m-%d %H:%M} UTC" + (" - verified" if out.get("verified") else "")
            )

    @backup.command("list")
    @click.option("--all", "show_all", is_flag=True, help="Include pruned archives.")
    @click.option("--json", "as_json", is_flag=True)
    @click.pass_context
    def backup_list(ctx, show_all, as_json):
        """Each archive's class, age, lock and whether it was verified."""
        from ..core.backup import backups as b

        rows = b.list_backups(_ctx(ctx), include_pruned=show_all)
        if as_json:
            emit_json(rows)
            return
        click.echo(f"{'ARCHIVE':28} {'CLASS':8} {'STATE':11} {'AGE(d)':>7} {'LOCKED UNTIL':17} {'VERIFIED':8} SIZE")
        for r in rows:
            lock = r["retain_until"].strftime("%Y-%m-%d %H:%M") if r["locked"] else "lapsed"
            click.echo(
                f"{r['archive_id']:28} {r['gfs_class']:8} {r['state']:11} {r['age_days']:>7.1f} {lock:17} "
                f"{'yes' if r['verified'] else 'no':8} {r['size'] if r['size'] is not None else '-'}"
            )

    @backup.command("prune")
    @click.option("--dry-run", is_flag=True)
    @click.option("--json", "as_json", is_flag=True)
    @click.pass_context
    def backup_prune(ctx, dry_run, as_json):
        """Delete archives outside the GFS set once their lock has lapsed."""
        from dataclasses import asdict

        from ..core.backup import backups as b

        result = b.prune(_ctx(ctx), dry_run=dry_run)
        if as_json:
            emit_json(asdict(result))
        else:
            click.echo(
                f"{'would delete' if dry_run else 'deleted'} {len(result.deleted)}, kept {len(result.kept)}"
                + (f", marked {len(result.failed_uploads)} stale upload(s) failed" if result.failed_uploads else "")
            )

    @backup.command("verify")
    @click.argument("archive", required=False)
    @click.option("--json", "as_json", is_flag=True)
    @click.pass_context
    def backup_verify(ctx, archive, as_json):
        """Re-read ARCHIVE (default: newest) against its signed manifest."""
        from ..core.backup import backups as b

        result = b.verify_archive(_ctx(ctx), archive)
        if as_json:
            emit_json(result)
        else:
            click.echo(
                f"{result['archive_id']}: manifest signature and sha256 verify; "
                f"{'locked' if result['locked'] else 'NOT locked'}"
            )

    @backup.command("rekey")
    @click.argument("key")
    @click.argument("version", type=int)
    @click.option("--staging-url", default=None, help="PostgreSQL server for staging (default KMS_DRILL_STAGING_URL).")
    @click.option("--json", "as_json", is_flag=True)
    @click.pass_context
    def backup_rekey(ctx, key, version, staging_url, as_json):
        """Give every retained archive referencing KEY VERSION a re-keyed successor (T4)."""
        from ..core.backup import rekey

        done = rekey.rekey_restore_points(_ctx(ctx), key, version, staging_url=staging_url)
        if as_json:
            emit_json(done)
        else:
            for d in done:
                click.echo(f"{d['predecessor']} -> {d['successor']}")
            click.echo(f"{len(done)} restore point(s) re-keyed")

    @backup.command("trust-export")
    @click.argument("path", type=click.Path(dir_okay=False))
    @click.pass_context
    def backup_trust_export(ctx, path):
        """Write the root public keys an offline restore needs (`kms restore --trust PATH`)."""
        from ..core.backup import backups as b

        with open(path, "w") as f:
            json.dump(b.export_trust(_ctx(ctx)), f, indent=2)
        click.echo(f"wrote {path}")

    @cli.command("restore")
    @click.argument("archive")
    @click.option("--target", "target_url", required=True, help="URL of a NEW, empty database to restore into.")
    @click.option(
        "--target-home",
        default=None,
        type=click.Path(file_okay=False),
        help="Where to unpack artifacts/kms (default: a temp dir).",
    )
    @click.option(
        "--trust",
        default=None,
        metavar="FINGERPRINT|FILE",
        help="Pin the root (offline restore): a SHA256:… fingerprint obtained out of band, or a file "
        "of root public keys (`kms backup trust-export`). The manifest's signer must be pinned or "
        "reached from a pinned root by old-signs-new root manifests. Default: this KMS's root keys.",
    )
    @click.option("--json", "as_json", is_flag=True)
    @click.pass_context
    def restore_cmd(ctx, archive, target_url, target_home, trust, as_json):
        """Verify ARCHIVE (archive file path, id or object key), restore it into --target and check it."""
        from ..core.backup import restore as r

        kms = _ctx(ctx)
        with heartbeat("restore"):
            report = r.restore(kms, archive, target_url, target_home=target_home, trust=trust)
        if as_json:
            emit_json(report.as_dict())
        else:
            for c in report.checks:
                click.echo(f"{c.status:7} {c.name:20} {c.detail}")
            click.echo(f"restore of {report.archive_id} {'passed' if report.ok else 'FAILED'} in {report.seconds}s")
        if not report.ok:
            ctx.exit(1)

    @cli.group()
    def drill():
        """Restore drills and their follow-ups (B2, B4)."""

    @drill.command("run")
    @click.option("--participant", "participants", multiple=True, help="Repeat; default: the policy's on-call list.")
    @click.option("--staging-url", default=None, help="PostgreSQL server for the staging database.")
    @click.option("--followup", "followups", multiple=True, metavar="OWNER:TITLE", help="Extra follow-up (repeat).")
    @click.option("--json", "as_json", is_flag=True)
    @click.pass_context
    def drill_run(ctx, participants, staging_url, followups, as_json):
        """Restore the newest archive into staging, check it and write the drill report."""
        from ..core.backup import drills

        extra = []
        for f in followups:
            owner, sep, title = f.partition(":")
            if not sep or not title.strip():
                raise click.BadParameter("use OWNER:TITLE", param_hint="--followup")
            extra.append({"owner": owner.strip(), "title": title.strip()})
        kms = _ctx(ctx)
        with heartbeat("drill"):
            report = drills.run_drill(
                kms, participants=list(participants) or None, staging_url=staging_url, extra_followups=extra
            )
        if as_json:
            emit_json(report.as_dict())
        else:
            click.echo(report.markdown)
            click.echo(
                f"drill {report.outcome.upper()}: {len(report.followups)} follow-up(s); report written to {report.report_path}"
            )
        if report.outcome != "passed":
            ctx.exit(1)

    @drill.command("close-followup")
    @click.argument("followup_id", type=int)
    @click.option("--resolution", required=True, help="What was done.")
    @acting_principal("who closes it")
    @click.pass_context
    def drill_close(ctx, followup_id, resolution, principal, totp):
        """Close a drill follow-up (B4 evidence), as a proven principal."""
        from ..core.access import principals as access
        from ..core.backup import drills

        kms = _ctx(ctx)
        access.prove_principal(kms, principal, totp)
        out = drills.close_followup(kms.as_actor(principal), followup_id, actor=principal, resolution=resolution)
        click.echo(f"closed follow-up {out['id']}" + (" (after its due date)" if out["late"] else ""))

    @drill.command("list")
    @click.option("--json", "as_json", is_flag=True)
    @click.pass_context
    def drill_list(ctx, as_json):
        """Drills, outcomes and follow-ups; exit 1 if the last drill is too old or a follow-up is overdue."""
        from ..core.backup import drills

        kms = _ctx(ctx)
        rows, st = drills.list_drills(kms), drills.status(kms)
        if as_json:
            emit_json({"drills": rows, "status": st})
        else:
            for d in rows:
                click.echo(
                    f"{d['date']} {d['outcome']:7} archive {d['archive_id'] or '-'} "
                    f"restore {d['restore_seconds'] or '-'}s report {d['report_path']}"
                )
                for f in d["followups"]:
                    click.echo(
                        f"    #{f['id']} [{f['status']}] {f['title']} owner {f['owner']} due {f['due_at']:%Y-%m-%d}"
                    )
            click.echo(f"last drill {st['age_days']} days ago; {len(st['overdue_followups'])} follow-up(s) overdue")
        if not st["within_cadence"] or st["overdue_followups"]:
            ctx.exit(1)
