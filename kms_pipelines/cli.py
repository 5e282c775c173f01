"""The ``kms`` command: what operators and scripts/ use. Every UI action has a command.

Exit codes: 0 success, 1 a failed check or refused operation, 2 a usage error.
Errors are one line on stderr naming the problem; tracebacks only with ``KMS_DEBUG=1``.
"""

from __future__ import annotations

import json
import os
import sys
from contextlib import contextmanager
from datetime import datetime

import click

from .core.foundation.clock import FixedClock, parse_time

EXIT_FAILED, EXIT_USAGE = 1, 2


def _json_default(value):
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, bytes):
        return value.hex()
    raise TypeError(type(value).__name__)


def emit_json(obj) -> None:
    click.echo(json.dumps(obj, indent=2, default=_json_default, sort_keys=True))


def finish_verification(ctx: click.Context, result, as_json: bool, ok_line, failure_line) -> None:
    """The common tail of every verifier command: JSON, or one line saying intact (stdout)
    or broken (stderr), and exit 1 when broken. The line builders are called lazily so each
    only reads fields that its outcome fills in."""
    if as_json:
        emit_json(result.to_dict())
    elif result.ok:
        click.echo(ok_line())
    else:
        click.echo(failure_line(), err=True)
    if not result.ok:
        ctx.exit(EXIT_FAILED)


@contextmanager
def heartbeat(label: str, every: float = 10.0):
    """For commands that can run for minutes (backup, restore, drill): a line on stderr every
    ``every`` seconds while the work runs, so a user can tell it is alive. Quick commands
    (and quick refusals) print nothing extra."""
    import threading
    import time

    stop, started = threading.Event(), time.monotonic()

    def tick():
        while not stop.wait(every):
            click.echo(f"{label}: still running ({time.monotonic() - started:.0f} s)", err=True)

    thread = threading.Thread(target=tick, name=f"heartbeat-{label}", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


# The only commands `--at` may drive: they read state and change nothing. Every other
# command changes state, and the clock is not an input for changes (it runs on the wall
# clock); under --at the database connection is also read-only, so a read that tried to
# write would fail rather than record a chosen time.
READ_ONLY_COMMANDS = frozenset(
    {
        "keys list",
        "ledger verify",
        "ledger verify-checkpoints",
        "audit verify",
        "audit events",
        "principals list",
        "token verify",
        "report",
        "rpt verify-chain",
        "manifest list",
        "manifest verify",
        "retention due",
        "partners status",
        "dependents status",
        "envelope inventory",
        "export due",
        "backup list",
        "drill list",
        "events list",
        "escrow custodian list",
        "escrow status",
        "notifications status",
        "evidence verify",
        "simulate",
    }
)


class ClockRefused(ValueError):
    """--at given to a command that changes state."""


def _subcommand_path(ctx: click.Context) -> str:
    return " ".join(ctx.command_path.split()[1:])


class KmsGroup(click.Group):
    """Turns domain errors into one-line messages and exit codes."""

    def invoke(self, ctx):
        from .core.runtime.errors import connect_failure_line, fault_line, known_errors

        command = _command_line([*getattr(ctx, "_protected_args", []), *ctx.args])
        refusals: tuple[type[BaseException], ...] = (*known_errors(), ClockRefused)
        failed = True
        try:
            result = super().invoke(ctx)
            failed = False
            return result
        except refusals as exc:
            if os.environ.get("KMS_DEBUG"):
                raise
            click.echo(f"kms: error: {exc}", err=True)
            ctx.exit(EXIT_FAILED)
        except Exception as exc:
            from sqlalchemy.exc import DBAPIError

            if isinstance(exc, DBAPIError) and (ctx.obj or {}).get("at") and not os.environ.get("KMS_DEBUG"):
                click.echo("kms: error: --at is read-only: this command tried to change state", err=True)
                ctx.exit(EXIT_FAILED)
            # A database/S3/SMTP/HSM fault that no retried unit caught (core/foundation/retry.py):
            # still one line and exit 1, never a traceback.
            line = fault_line(exc, command) or connect_failure_line(exc)
            if line is None or os.environ.get("KMS_DEBUG"):
                raise
            click.echo(f"kms: error: {line}", err=True)
            ctx.exit(EXIT_FAILED)
        finally:
            _finish_command(ctx, failed=failed)


def _finish_command(ctx: click.Context, *, failed: bool) -> None:
    """Make the command's audit events durable, and end every command that moved the ledger
    or the RPT chain with a signed checkpoint in WORM storage (T3), so a later cut of the
    tail is caught; commands that changed nothing write none. After a failed command this
    is best effort and silent: the command's own one-line error (or traceback) stands."""
    obj = ctx.obj or {}
    kms, before = obj.get("kms"), obj.get("heads")
    if kms is None:
        return
    from .core.ledger import audit, checkpoints

    try:
        audit.flush(kms)
        if before is not None and kms.objects is not None:
            checkpoints.checkpoint_if_changed(kms, before)
    except Exception as exc:  # noqa: BLE001 - reported below only when the command itself succeeded
        if failed or os.environ.get("KMS_DEBUG"):
            if failed:
                return
            raise
        click.echo(
            f"kms: error: the state changed but no checkpoint could be signed: "
            f"{type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}",
            err=True,
        )
        ctx.exit(EXIT_FAILED)


def _command_line(args: list[str]) -> str:
    """``kms <group> <command>`` of this invocation, for the "re-run is safe" hint (only the
    leading command words: option values may be secrets or tickets)."""
    words = []
    for arg in args[:2]:
        if arg.startswith("-"):
            break
        words.append(arg)
    return " ".join(["kms", *words])


def get_context(ctx: click.Context, *, create: bool = False):
    """Build the KmsContext lazily, once per command. Only ``create=True`` (``kms init``)
    may bring state into being; every other command first checks that it exists. ``--at``
    only for read-only commands."""
    obj = ctx.ensure_object(dict)
    if "kms" not in obj:
        from .core.foundation.worker import is_worker, require_worker_env
        from .core.runtime.wiring import context_from_env

        if is_worker():
            require_worker_env()  # a worker's missing pieces first: they are why its state looks absent
        at = obj.get("at")
        if at:
            current = click.get_current_context()
            path = _subcommand_path(current)
            read_only = path in READ_ONLY_COMMANDS or (path == "audit anomalies" and not current.params["refresh"])
            if not read_only:
                raise ClockRefused(
                    f"--at is refused for `kms {path}`: it changes state, and changes run on the "
                    "wall clock (--at serves read-only commands: reports, verify, list)"
                )
        if not create:
            from .core.foundation.state import require_initialized

            require_initialized()

        obj["kms"] = context_from_env(clock=FixedClock(parse_time(at)) if at else None, read_only=bool(at))
        obj["heads"] = _heads(obj["kms"])
    return obj["kms"]


def _heads(kms):
    """The ledger and RPT heads before the command (None: no schema yet, e.g. before init)."""
    from sqlalchemy.exc import SQLAlchemyError

    from .core.ledger import checkpoints

    try:
        return checkpoints.heads(kms)
    except SQLAlchemyError:
        return (0, None, 0, None)


def _parse_at(_ctx, _param, value):
    if value is None:
        return None
    try:
        parse_time(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None
    return value


@click.group(cls=KmsGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--at",
    metavar="TIME",
    callback=_parse_at,
    help="Evaluate as if the time were TIME (ISO-8601), for read-only commands only (reports, "
    "verify, list); refused by commands that change state.",
)
@click.pass_context
def cli(ctx, at):
    """Run the KMS policy: keys, ledger, envelopes, backups, drills."""
    ctx.ensure_object(dict)["at"] = at


def _admin(value: str) -> tuple[str, list[str]]:
    name, _, roles = value.partition("=")
    return name, [r for r in roles.split(",") if r] or ["security_engineering"]


@cli.command()
@click.option(
    "--admin",
    "admins",
    multiple=True,
    metavar="NAME[=ROLE,...]",
    help="First-run ceremony: enrol this principal (repeatable; default role security_engineering). "
    "Only while no human principal exists; at least approvals_required + 1 of them must hold "
    "'principals' (security_engineering).",
)
@click.option(
    "--console-origin",
    envvar="KMS_CONSOLE_ORIGIN",
    default=None,
    help="With --admin: the console's origin (e.g. https://kms.example.com), the relying party each "
    "admin's security key is registered for [env KMS_CONSOLE_ORIGIN].",
)
@click.option(
    "--software-keys",
    "software_keys",
    type=click.Path(file_okay=False),
    default=None,
    help="With --admin: create a software FIDO2 authenticator per admin in this directory "
    "(NAME.fido2.json) instead of asking each admin to touch their security key (demo and tests: "
    "refused at approval unless the policy sets console.allow_software_authenticators).",
)
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.pass_context
def init(ctx, admins, console_origin, software_keys, as_json):
    """Run database migrations and bootstrap one active version of every policy key; with
    --admin, enrol the first principals, register a FIDO2 security key for each (every approval
    needs the key and a TOTP code), and print each one's TOTP provisioning URI once."""
    from .core.foundation import db
    from .core.keys import lifecycle

    if admins and not console_origin:  # before anything is created
        raise click.UsageError(
            "--admin needs --console-origin (or KMS_CONSOLE_ORIGIN): each admin registers "
            "a security key for the console's origin"
        )
    kms = get_context(ctx, create=True)
    db.upgrade(kms.engine)
    results = lifecycle.bootstrap(kms)
    created = [r.key for r in results if r.rotated]
    enrolled = []
    if admins:
        from .core.access import enrolment

        parsed = dict(_admin(a) for a in admins)
        if len(parsed) != len(admins):
            raise click.UsageError("--admin names must be distinct")
        enrolled = enrolment.init_principals(
            kms, parsed, keys=(console_origin, _ceremony_keys(console_origin, software_keys))
        )
    if as_json:
        emit_json(
            {
                "revision": db.current_revision(kms.engine),
                "created": created,
                "existing": [r.key for r in results if not r.rotated],
                "enrolled": [
                    {"name": e.name, "roles": e.roles, "provisioning_uri": e.provisioning_uri} for e in enrolled
                ],
            }
        )
        return
    click.echo(f"database at revision {db.current_revision(kms.engine)}")
    click.echo(f"created {len(created)} key(s)" + (f": {', '.join(created)}" if created else "; all keys exist"))
    if enrolled:
        # The only time the secrets are shown: to this terminal, never to a log or the database.
        click.echo("TOTP provisioning URIs (shown once; each goes to that principal's authenticator):")
        for e in enrolled:
            click.echo(f"{e.name} {e.provisioning_uri}")


def _ceremony_keys(origin: str, software_keys: str | None):
    """make_credential(name, options) for the first-run ceremony: each admin's security key in
    turn (or a new software authenticator file per admin)."""
    from pathlib import Path

    from .commands.access import _ask_pin
    from .fido2_client import authenticator

    def make(name: str, options: dict) -> dict:
        if software_keys:
            return authenticator(origin, Path(software_keys) / f"{name}.fido2.json", create=True).create(options)
        click.echo(f"{name}: plug in your security key (only yours) and press Enter", err=True)
        click.prompt("", default="", show_default=False, prompt_suffix="", err=True)
        return authenticator(origin, prompt=lambda m: click.echo(m, err=True), ask_pin=_ask_pin).create(options)

    return make


@cli.group()
def keys():
    """List and rotate keys."""


@keys.command("list")
@click.option("--json", "as_json", is_flag=True)
@click.option("--all", "show_all", is_flag=True, help="Include destroyed versions.")
@click.pass_context
def keys_list(ctx, as_json, show_all):
    """Every key version with its state, age, rotation due date and full public-key
    fingerprint (what `kms evidence verify --trust` takes)."""
    from dataclasses import asdict

    from .core.keys import lifecycle

    rows = [r for r in lifecycle.inventory(get_context(ctx)) if show_all or r.state != "destroyed"]
    if as_json:
        emit_json([asdict(r) for r in rows])
        return
    click.echo(f"{'KEY':34} {'VER':>3} {'STATE':9} {'AGE(d)':>7} {'DUE':20} FINGERPRINT")
    for r in rows:
        due = r.due_at.strftime("%Y-%m-%d %H:%M") + ("  OVERDUE" if r.overdue else "") if r.due_at else "-"
        age = f"{r.age_days:.1f}" if r.age_days is not None else "-"
        click.echo(f"{r.key:34} {r.version:>3} {r.state:9} {age:>7} {due:20} {r.fingerprint or '-'}")


@keys.command("rotate")
@click.argument("key")
@click.option(
    "--reason",
    default=None,
    type=click.Choice(["manual", "cadence", "compromise", "tenant-rotation", "ci-exposure"]),
    help="compromise|tenant-rotation|ci-exposure (R2) rotate a service key at once, without "
    "approvals; cadence is --if-due; manual needs --manual (dual control).",
)
@click.option("--if-due", is_flag=True, help="Rotate only when the policy cadence says it is due (reason cadence).")
@click.option(
    "--actor",
    default="kms-reconcile",
    show_default=True,
    help="Service actor recorded for an --if-due rotation (one of access.service_actors): the "
    "policy cadence decides, not a person.",
)
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def keys_rotate(ctx, key, reason, if_due, actor, as_json):
    """Rotate KEY: on the cadence (--if-due), a service key at once (R2 --reason), or any key
    under dual control (--manual)."""
    from dataclasses import asdict

    from .core.keys import rotation
    from .core.keys.lifecycle import validate_key_name

    kms = get_context(ctx)
    validate_key_name(kms, key)
    if reason == "cadence":
        if_due, reason = True, None
    elif if_due and reason:
        raise click.UsageError("--if-due and --reason exclude each other")
    if not if_due and reason in (None, "manual"):
        from .core.access.principals import AccessDenied

        # Policy A4: a manual rotation runs only under dual control (--manual).
        raise AccessDenied(
            f"a manual rotation of {key} needs dual approval (policy A4): two other principals run "
            f"`kms approve --ticket T --operation rotate --target {key} --as NAME --totp CODE`, then "
            f"`kms keys rotate {key} --manual --ticket T --requested-by YOU --totp CODE`; --if-due rotates on the "
            f"policy cadence, --reason compromise|tenant-rotation|ci-exposure rotates a service key at once (R2)",
            reason="approval",
        )
    from .core.access import principals as access
    from .core.foundation import limits

    limits.text(actor, "--actor", 200)
    if if_due and not access.is_service_actor(kms, actor):  # (an R2 rotation arrives with its proven requester)
        # a person's name here would be claimed, not proven: people use --manual or --requested-by
        raise access.AccessDenied(
            f"--actor {actor!r} is not a service actor (access.service_actors); a person "
            f"rotates with --requested-by NAME --totp CODE (R2) or --manual",
            reason="invalid",
        )
    # Through core.keys.rotation so a root rotation publishes its manifest and notifies partners,
    # and a service rotation re-issues credentials (R1, R2).
    if if_due:
        result = rotation.rotate_key(kms, key, actor=actor, reason="cadence", only_if_due=True)
    else:
        result = rotation.rotate_now(kms, key, actor=actor, reason=reason)
    if as_json:
        emit_json(asdict(result))
    elif result.rotated:
        click.echo(f"rotated {key}: v{result.old_version} -> v{result.new_version}")
    else:
        click.echo(f"{key} not rotated: {result.reason}")


@cli.group()
def ledger():
    """The hash-chained key-state ledger."""


@ledger.command("verify")
@click.option(
    "--workers",
    type=click.IntRange(min=1, max=64),
    default=None,
    help="Seq ranges verified in parallel on PostgreSQL, threads on the C kernel (default: policy ledger.verify_workers).",
)
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def ledger_verify(ctx, workers, as_json):
    """Recompute the ledger chain, then replay it against key_versions and the audit log;
    exit 1 naming the first bad seq or the first disagreement."""
    from .core.access import crosscheck
    from .core.ledger import ledger as ledger_mod

    kms = get_context(ctx)
    if workers is None:
        result = ledger_mod.verify_with_policy(kms)
    else:
        result = ledger_mod.verify(kms.engine, workers=workers, min_entries_per_worker=1)
    cross = crosscheck.verify(kms) if result.ok else None
    if as_json:
        emit_json(
            {
                **result.to_dict(),
                "crosscheck": cross.to_dict() if cross else None,
                "ok": result.ok and cross is not None and cross.ok,
            }
        )
    elif not result.ok or cross is None:  # cross is None exactly when the chain is broken
        click.echo(f"ledger BROKEN at seq {result.first_bad_seq}: {result.problem}", err=True)
    elif not cross.ok:
        click.echo(
            f"ledger DISAGREES with {' / '.join(cross.sources)}: {cross.problem}"
            + (f" (+{len(cross.problems) - 1} more)" if len(cross.problems) > 1 else ""),
            err=True,
        )
    else:
        click.echo(
            f"ledger intact: {result.count} entries, head {result.head_hash[:16]}…; replay matches "
            f"{cross.versions} key version(s) and {cross.audit_events} audit event(s) "
            f"(verifier: {result.verifier})"
        )
    if not (result.ok and cross is not None and cross.ok):
        ctx.exit(EXIT_FAILED)


def _register_areas() -> None:
    from .commands import register_all

    register_all(cli)


_register_areas()


def main(argv=None) -> None:
    try:
        cli.main(args=argv, prog_name="kms", standalone_mode=True)
    except SystemExit as exc:
        raise SystemExit(exc.code) from None


if __name__ == "__main__":  # pragma: no cover
    main(sys.argv[1:])
