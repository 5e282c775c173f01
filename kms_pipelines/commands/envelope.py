"""`kms envelope …` (encrypt, decrypt, sweep, inventory, check) and `kms export …`
(create, due, expire). Thin wrappers over core.envelope.data_keys / core.envelope.export_keys."""

from collections.abc import Callable
from dataclasses import asdict

import click


def _ctx(ctx):
    from ..cli import get_context

    return get_context(ctx)


def _emit(obj):
    from ..cli import emit_json

    emit_json(obj)


def _fail(ctx):
    from ..cli import EXIT_FAILED

    ctx.exit(EXIT_FAILED)


def register(cli) -> None:
    """Attach this area's commands to the top-level `kms` group."""
    cli.add_command(envelope)
    cli.add_command(export)


@click.group()
def envelope():
    """Envelope encryption: one DEK per object, DEK inventory, rewrap sweep."""


@envelope.command("encrypt")
@click.argument("key")
@click.argument("object_id")
@click.option("--in", "infile", type=click.File("rb"), default="-", show_default=True, help="Plaintext file.")
@click.option("--out", "outfile", type=click.File("wb"), default="-", show_default=True, help="Blob file.")
@click.option("--aad", default="", help="Extra associated data (text) the blob is bound to.")
@click.option("--replace", is_flag=True, help="Re-encrypt an object that already has a DEK.")
@click.pass_context
def encrypt_cmd(ctx, key, object_id, infile, outfile, aad, replace):
    """Encrypt stdin/--in for OBJECT_ID under data key KEY (e.g. data:postgres)."""
    from ..core.envelope import data_keys as env

    blob = env.encrypt(_ctx(ctx), key, object_id, infile.read(), aad.encode(), replace=replace)
    outfile.write(blob)


@envelope.command("decrypt")
@click.option("--in", "infile", type=click.File("rb"), default="-", show_default=True, help="Blob file.")
@click.option("--out", "outfile", type=click.File("wb"), default="-", show_default=True, help="Plaintext file.")
@click.option("--aad", default="", help="The associated data given at encryption.")
@click.option("--object-id", default=None, help="Refuse unless the blob belongs to this object.")
@click.pass_context
def decrypt_cmd(ctx, infile, outfile, aad, object_id):
    """Decrypt an envelope blob (exit 1 if it is shredded, tampered or revoked)."""
    from ..core.envelope import data_keys as env

    outfile.write(env.decrypt(_ctx(ctx), infile.read(), aad.encode(), object_id=object_id))


@envelope.command("sweep")
@click.option("--key", "key_name", default=None, help="Only this data key (default: every data key).")
@click.option("--shard", type=int, default=None, help="Only this shard (0-based) of --shards.")
@click.option("--shards", type=int, default=1, show_default=True)
@click.option(
    "--batch-size",
    type=int,
    default=None,
    help="DEKs per batch, constant (default: policy envelope.batch_size, then sized to "
    "envelope.batch_target_commit_ms).",
)
@click.option("--progress", "show_progress", is_flag=True, help="One line per committed batch on stderr.")
@click.option(
    "--lease",
    "leased",
    is_flag=True,
    help="Sweep range by range under PostgreSQL leases, so several workers can share a shard.",
)
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def sweep_cmd(ctx, key_name, shard, shards, batch_size, show_progress, leased, as_json):
    """Rewrap every DEK on a rotated/revoked version onto the active one. Exit 1 if any remain."""
    from ..core.envelope import data_keys as env

    kms = _ctx(ctx)
    if shard is not None and not 0 <= shard < shards:
        raise click.BadParameter(f"--shard must be in 0..{shards - 1}", param_hint="--shard")

    def progress(p):
        click.echo(
            f"batch {p.batch}: {p.key} v{p.from_version}->v{p.to_version} moved {p.moved} "
            f"(total {p.total_moved}, {p.seconds:.1f}s)",
            err=True,
        )

    sizing = {"batch_size": batch_size} if batch_size is not None else env.policy_batching(kms)
    # Both sweeps take these arguments and return a SweepResult; the leased one takes each range under a lease.
    run_sweep: Callable[..., env.SweepResult]
    if leased:
        from ..core.envelope.leases import leased_sweep as run_sweep
    else:
        run_sweep = env.sweep
    result = run_sweep(
        kms, key_name, shard=shard, shards=shards, **sizing, progress=progress if show_progress else None
    )
    if as_json:
        _emit(result.to_dict())
    else:
        click.echo(
            f"moved {result.moved} DEK(s) in {result.batches} batch(es) ({result.rate:.0f}/s); "
            f"{result.remaining} remaining on retired/revoked versions, {result.failed} failed"
        )
    if result.remaining:
        if not as_json:
            click.echo(f"kms: error: {result.remaining} DEK(s) remain on retired or revoked versions", err=True)
        _fail(ctx)


@envelope.command("inventory")
@click.option("--key", "key_name", default=None)
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def inventory_cmd(ctx, key_name, as_json):
    """DEK counts per key version (live and shredded)."""
    from ..core.envelope import data_keys as env

    rows = env.inventory_counts(_ctx(ctx), key_name)
    if as_json:
        _emit([asdict(r) for r in rows])
        return
    click.echo(f"{'KEY':34} {'VER':>3} {'STATE':9} {'DEKS':>9} {'SHREDDED':>9}")
    for r in rows:
        click.echo(f"{r.key:34} {r.version:>3} {r.state:9} {r.deks:>9} {r.shredded:>9}")


@envelope.command("check")
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def check_cmd(ctx, as_json):
    """Exit 1 if any live DEK is left under a rotated, revoked or destroyed version."""
    from ..core.envelope import data_keys as env

    rows = env.stranded(_ctx(ctx))
    if as_json:
        _emit({"ok": not rows, "stranded": [asdict(r) for r in rows]})
    elif rows:
        for r in rows:
            click.echo(f"{r.deks} DEK(s) on {r.key} v{r.version} ({r.state})", err=True)
    else:
        click.echo("no DEKs on retired or revoked versions")
    if rows:
        _fail(ctx)


@click.group()
def export():
    """Temporary export keys: created with an expiry, crypto-shredded at expiry (R3)."""


@export.command("create")
@click.argument("export_id")
@click.option(
    "--ttl-days",
    type=click.IntRange(min=1),
    default=None,
    help="Days until expiry (default: policy key_classes.export.default_ttl_days).",
)
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def export_create(ctx, export_id, ttl_days, as_json):
    """Create the key export:EXPORT_ID (idempotent)."""
    from ..core.envelope import export_keys

    info = export_keys.create(_ctx(ctx), export_id, ttl_days)
    if as_json:
        _emit(asdict(info))
    else:
        click.echo(f"{info.key} {'created' if info.created else 'exists'}; expires {info.expires_at.isoformat()}")


@export.command("due")
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def export_due(ctx, as_json):
    """Expired export keys that still need rotating, destroying or shredding."""
    from ..core.envelope import export_keys

    rows = export_keys.due(_ctx(ctx))
    if as_json:
        _emit([asdict(r) for r in rows])
        return
    for r in rows:
        click.echo(
            f"{r.key} expired {r.expired_at.isoformat()}: rotate={r.rotate_needed} "
            f"destroy={r.versions_to_destroy} unshredded={r.unshredded_deks}"
        )
    if not rows:
        click.echo("no expired export keys pending")


@export.command("expire")
@click.option("--key", "key_name", default=None, help="Only this export key.")
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def export_expire(ctx, key_name, as_json):
    """Rotate and destroy expired export keys now (crypto-shredding). Exit 1 if a guard refused."""
    from ..core.envelope import export_keys

    results = export_keys.expire_due(_ctx(ctx), key_name)
    if as_json:
        _emit([asdict(r) for r in results])
    else:
        for r in results:
            click.echo(
                f"{r.key}: rotated_to={r.rotated_to} destroyed={r.destroyed} shredded_deks={r.shredded_deks}"
                + (f" REFUSED {r.refused}" if r.refused else "")
            )
        if not results:
            click.echo("no expired export keys pending")
    if any(r.refused for r in results):
        _fail(ctx)
