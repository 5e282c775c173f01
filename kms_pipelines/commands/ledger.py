"""`kms` commands for core/ledger: regulatory proof tokens (RPT) and ledger checkpoints.

    kms rpt issue --subject S --claims JSON        issue one token, print it
    kms rpt verify-chain [--last N] [--workers W] [--json]
    kms ledger checkpoint [--json]                  sign and write a checkpoint (WORM)
    kms ledger verify-checkpoints [--rpt-signatures] [--json]

Exit codes: 0 ok, 1 a failed check or refused operation (one line naming the first bad
item), 2 usage errors.
"""

import json

import click


def register(cli) -> None:
    """Attach this area's commands to the top-level `kms` group."""
    from ..cli import emit_json, finish_verification, get_context

    @cli.group("rpt")
    def rpt_group():
        """Regulatory proof tokens (P1): issue and verifyChain."""

    @rpt_group.command("issue")
    @click.option("--subject", required=True, help="What the token attests about (e.g. an issuer or deal id).")
    @click.option("--claims", default="{}", show_default=True, help="Claims as a JSON object.")
    @click.option("--json", "as_json", is_flag=True)
    @click.pass_context
    def rpt_issue(ctx, subject, claims, as_json):
        """Issue one RPT signed by the active root version; prints the compact JWS."""
        from ..core.ledger import rpt

        try:
            parsed = json.loads(claims)
        except ValueError as exc:
            raise click.BadParameter(f"not JSON: {exc}", param_hint="--claims") from None
        if not isinstance(parsed, dict):
            raise click.BadParameter("must be a JSON object", param_hint="--claims")
        token = rpt.issue(get_context(ctx), subject, parsed)
        if as_json:
            header, payload, _ = rpt.decode(token)
            emit_json(
                {
                    "token": token,
                    "seq": payload["seq"],
                    "kid": header["kid"],
                    "iat": payload["iat"],
                    "prev": payload["prev"],
                    "hash": rpt.token_hash(token),
                }
            )
        else:
            click.echo(token)

    @rpt_group.command("verify-chain")
    @click.option("--last", type=click.IntRange(min=1), default=None, help="Verify only the newest N tokens.")
    @click.option(
        "--workers",
        type=click.IntRange(min=1, max=64),
        default=1,
        show_default=True,
        help="Processes to verify partitions in parallel.",
    )
    @click.option("--json", "as_json", is_flag=True)
    @click.pass_context
    def rpt_verify_chain(ctx, last, workers, as_json):
        """verifyChain: links, signatures, signing windows; exit 1 naming the first bad token."""
        from ..core.ledger import rpt_verify

        result = rpt_verify.verify_chain(get_context(ctx), last=last, workers=workers)
        where = f" (head matches {result.checked_against})" if result.checked_against else ""
        finish_verification(
            ctx,
            result,
            as_json,
            lambda: (
                f"RPT chain intact: {result.count} token(s) verified, seq {result.first_seq}..{result.head_seq}, "
                f"head {result.head_hash[:16]}…{where}"
            ),
            lambda: f"RPT chain BROKEN at seq {result.first_bad_seq}: {result.problem}",
        )

    ledger = cli.commands["ledger"]

    @ledger.command("checkpoint")
    @click.option("--json", "as_json", is_flag=True)
    @click.pass_context
    def ledger_checkpoint(ctx, as_json):
        """Verify, then sign (size, head hash, time) with the root key into WORM storage."""
        from ..core.ledger import checkpoints

        cp = checkpoints.write_checkpoint(get_context(ctx))
        if as_json:
            emit_json(cp)
        else:
            click.echo(
                f"checkpoint {cp['url']}: ledger {cp['ledger_size']} entries, {cp['rpt_size']} RPTs, "
                f"signed by {cp['kid'].split(':')[0]}, retained until {cp['retain_until']}"
            )

    @ledger.command("verify-checkpoints")
    @click.option("--rpt-signatures", is_flag=True, help="Also verify every RPT signature (slower).")
    @click.option("--json", "as_json", is_flag=True)
    @click.pass_context
    def ledger_verify_checkpoints(ctx, rpt_signatures, as_json):
        """Check the live ledger and RPT chain against every signed checkpoint; exit 1 on a mismatch."""
        from ..core.ledger import checkpoints

        result = checkpoints.verify(get_context(ctx), rpt_signatures=rpt_signatures)
        finish_verification(
            ctx,
            result,
            as_json,
            lambda: (
                f"ledger matches {result.checkpoints} checkpoint(s): {result.ledger_size} "
                f"entries, {result.rpt_size} RPTs"
            ),
            lambda: f"CHECKPOINT MISMATCH ({result.area}): {result.problem}",
        )
