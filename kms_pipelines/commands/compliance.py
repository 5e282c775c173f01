"""`kms` commands for core/compliance: the clause-by-clause compliance report, for compliance
officers who work outside the Dagster UI (same content as the ``policy_compliance_report`` asset),
and the evidence bundles auditors verify offline.

    kms report [--format md|html|json] [--out FILE] [--clause ID ...] [--dagster-evidence]
    kms evidence export --out FILE [--json]
    kms evidence verify FILE [--trust FINGERPRINT ...] [--json]   offline: no DB, no keystore

Exit codes: 0 every clause passes (or only warns) / the bundle verifies, 1 a clause fails or
a failed check or refused operation (one line naming the first bad item), 2 usage errors.
"""

import click


def register(cli) -> None:
    from ..cli import EXIT_FAILED, emit_json, finish_verification, get_context

    @cli.command("report")
    @click.option("--format", "fmt", type=click.Choice(["md", "html", "json"]), default="md", show_default=True)
    @click.option(
        "--out",
        type=click.Path(dir_okay=False, writable=True),
        default=None,
        help="Write the report to FILE instead of printing it.",
    )
    @click.option(
        "--clause",
        "clauses",
        multiple=True,
        metavar="ID",
        help="Only these clause ids (repeatable), e.g. --clause T3 --clause B1.",
    )
    @click.option(
        "--dagster-evidence",
        is_flag=True,
        help="Also show each clause's latest asset-check run from the Dagster instance ($DAGSTER_HOME).",
    )
    @click.pass_context
    def report(ctx, fmt, out, clauses, dagster_evidence):
        """Run anomaly detection, then evaluate every policy clause (P1–B4, docs/policy.md) against the
        live state; exit 1 if any fails. Under --at the detection is not stored (read-only)."""
        from dataclasses import replace

        from ..core import compliance
        from ..core.access import anomalies
        from ..core.foundation import retry

        known = {c.id for c in compliance.CLAUSES}
        unknown = sorted({c.upper() for c in clauses} - known)
        if unknown:
            raise click.BadParameter(
                f"unknown clause id(s) {', '.join(unknown)} (known: {', '.join(sorted(known))})", param_hint="--clause"
            )
        evidence = None
        if dagster_evidence:
            import dagster as dg

            from ..defs.compliance import check_evidence

            instance = dg.DagsterInstance.get()
            evidence = lambda c: check_evidence(instance, c)  # noqa: E731
        kms = get_context(ctx)
        # A3 judges the anomalies: detect first, over every event since the last run. Under
        # --at nothing may be written (no anomaly row, no cursor event at a chosen time): the
        # detection runs in memory and A3 judges its findings as unreviewed.
        if kms.read_only:
            preview = retry.db_call(kms, lambda: anomalies.preview_anomalies(kms), what="running anomaly detection")
            kms = replace(kms, detection=preview)
        else:
            retry.db_call(kms, lambda: anomalies.refresh_anomalies(kms), what="running anomaly detection")
        result = compliance.build_report(kms, evidence=evidence, only=[c.upper() for c in clauses] or None)
        text = compliance.render(result, fmt)
        if out:
            with open(out, "w", encoding="utf-8") as f:
                f.write(text)
            click.echo(
                f"wrote {fmt} report to {out}: overall {result.overall}"
                + (f", failing {', '.join(r.clause for r in result.failing)}" if result.failing else "")
            )
        else:
            click.echo(text, nl=False)
        if result.failing:
            if out or fmt != "json":
                click.echo(
                    f"kms: {len(result.failing)} clause(s) fail: {', '.join(r.clause for r in result.failing)}",
                    err=True,
                )
            ctx.exit(EXIT_FAILED)

    @cli.group("evidence")
    def evidence_group():
        """Self-contained evidence bundles for auditors (ledger, checkpoints, keys, RPTs)."""

    @evidence_group.command("export")
    @click.option("--out", "out", required=True, type=click.Path(dir_okay=False, writable=True))
    @click.option("--json", "as_json", is_flag=True)
    @click.pass_context
    def evidence_export(ctx, out, as_json):
        """Write the evidence bundle to FILE (sealed by the root key when the live state verifies)."""
        from ..core.compliance import evidence

        report = evidence.export(get_context(ctx), out)
        if as_json:
            emit_json(report.to_dict())
        else:
            click.echo(
                f"wrote {report.path}: {report.ledger_entries} ledger entries, {report.rpts} RPTs, "
                f"{report.checkpoints} checkpoints, {report.root_keys} root keys, {report.manifests} manifests"
                + (", sealed" if report.sealed else ", NOT sealed")
            )
        if not report.live_ok:
            click.echo(
                f"kms: error: the live state failed verification, bundle left unsealed: {report.problem}", err=True
            )
            ctx.exit(EXIT_FAILED)

    @evidence_group.command("verify")
    @click.argument("bundle", type=click.Path(dir_okay=False))
    @click.option(
        "--trust",
        "trusted",
        multiple=True,
        metavar="FINGERPRINT",
        help="A root fingerprint obtained out of band (SHA256:…). Every signing key must be this root "
        "or reached from it by old-signs-new root manifests. Without it the bundle is only "
        "checked for self-consistency.",
    )
    @click.option("--json", "as_json", is_flag=True)
    @click.pass_context
    def evidence_verify(ctx, bundle, trusted, as_json):
        """Verify a bundle offline: needs no database, keystore or object store."""
        from ..core.compliance import evidence

        result = evidence.verify_bundle(bundle, trusted_fingerprints=list(trusted))
        finish_verification(
            ctx,
            result,
            as_json,
            lambda: (
                f"evidence verifies: {result.ledger_entries} ledger entries, {result.rpts} "
                f"RPTs, {result.checkpoints} checkpoints, {len(result.root_keys)} root keys, "
                f"sealed; "
                + (
                    "anchored to the pinned root " + ", ".join(result.anchors)
                    if result.anchored
                    else "NOT anchored to a pinned root (self-consistent only; pass --trust FINGERPRINT)"
                )
            ),
            lambda: f"evidence FAILS ({result.area}): {result.problem}",
        )
