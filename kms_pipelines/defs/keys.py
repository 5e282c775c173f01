"""Per-class key assets (R1-R3, B3), the root manifest, partner-notice check and key
retirement, and the key inventory with its cadence check (R1-R4). Asset bodies only call
``core.keys.lifecycle`` / ``core.keys.rotation`` / ``core.keys.retention``."""

import dagster as dg

from ..core.keys import forensic, lifecycle, manifest, retention, rotation, vault
from ..core.ledger import checkpoints
from .foundation import NIGHTLY, kms_state
from .metadata import full_values_md, inventory_table, markdown_table, short_fingerprint, short_hash, short_path
from .resources import KmsResource


def _rotation_metadata(results) -> dict:
    rotated = [r for r in results if r.rotated]
    return {
        "rotated": dg.MetadataValue.json([f"{r.key} v{r.old_version}->v{r.new_version}" for r in rotated]),
        "rotated_count": len(rotated),
        "checked": len(results),
        "summary": dg.MetadataValue.md(
            markdown_table(
                ["key", "rotated", "versions", "reason"],
                [
                    [
                        r.key,
                        "yes" if r.rotated else "no",
                        f"v{r.old_version} → v{r.new_version}" if r.rotated else "-",
                        r.reason,
                    ]
                    for r in results
                ],
            )
        ),
    }


def _class_asset(key_class: str, description: str):
    @dg.asset(
        name=f"keys_{key_class.replace('-', '_')}",
        group_name="keys",
        tags=NIGHTLY,
        deps=["kms_state"],
        kinds={"sql"},
        description=description,
    )
    def _asset(context: dg.AssetExecutionContext, kms: KmsResource) -> dg.MaterializeResult:
        results = rotation.reconcile(kms.context(), key_class, actor="dagster:reconcile")
        for r in results:
            if r.rotated:
                context.log.info(f"rotated {r.key}: v{r.old_version} -> v{r.new_version}")
        return dg.MaterializeResult(metadata=_rotation_metadata(results))

    return _asset


keys_service = _class_asset("service", "Service keys rotated every 60 days (R2); rotation re-issues API credentials.")
keys_data = _class_asset(
    "data", "Data keys rotated every 180 days (R3); the DEK sweep moves ciphertext off old versions."
)
keys_backup = _class_asset("backup", "The rotating object-storage key of backup archives (B3).")
keys_archive = _class_asset(
    "archive",
    "The archive KEK of the vault (T1), rotated on its policy cadence; "
    "it only wraps archive copies of retired root/service keys.",
)


@dg.asset(
    group_name="keys",
    tags=NIGHTLY,
    deps=["kms_state"],
    kinds={"sql", "s3"},
    description="Root key rotated every 90 days (R1): publishes the public-key manifest signed by the "
    "previous root and notifies the policy's partners. The full root fingerprint "
    "(for `kms evidence verify --trust`) is in full_values ([Show Markdown]) and in "
    "`kms keys list`.",
)
def keys_root(context: dg.AssetExecutionContext, kms: KmsResource) -> dg.MaterializeResult:
    ctx = kms.context()
    results = rotation.reconcile(ctx, "root", actor="dagster:reconcile")
    meta = _rotation_metadata(results)
    latest = manifest.latest(ctx)
    rows = manifest.manifests(ctx)
    if latest is not None:
        # Shortened so the panel fits a 1600 px window; full values (the fingerprint an operator pins
        # with `kms evidence verify --trust`) in full_values, and in `kms keys list`.
        meta.update(
            {
                "manifest_kid": latest.kid,
                "manifest_fingerprint": short_hash(latest.fingerprint),
                "manifest_url": short_path(latest.url),
                "manifest_sha256": short_hash(latest.sha256),
                "previous_fingerprint": short_hash(latest.previous_fingerprint) or "none",
                "full_values": full_values_md(
                    [
                        (
                            "manifest_fingerprint",
                            latest.fingerprint,
                            "the current root's fingerprint: `kms evidence verify FILE --trust` and `kms restore --trust` take it "
                            "(also printed by `kms keys list`)",
                        ),
                        ("manifest_url", latest.url, "the signed public-key manifest"),
                        ("manifest_sha256", latest.sha256, "SHA-256 of the manifest object"),
                        (
                            "previous_fingerprint",
                            latest.previous_fingerprint or "none",
                            "the root that signed this manifest",
                        ),
                    ]
                ),
            }
        )
    # Narrow for the metadata column: fingerprints shortened (the latest in full above, every one
    # in `kms manifest list`), the object key is manifests/root/v<N>.json.
    meta["manifests"] = dg.MetadataValue.md(
        markdown_table(
            ["kid", "fingerprint", "signed by"],
            [
                [
                    m.kid,
                    short_fingerprint(m.fingerprint),
                    f"previous root {short_fingerprint(m.previous_fingerprint)}"
                    if m.previous_fingerprint
                    else "first root",
                ]
                for m in rows
            ],
        )
    )
    partners = rotation.partner_status(ctx, latest.version if latest else None)
    meta["partners"] = dg.MetadataValue.md(
        markdown_table(
            ["partner", "root", "deadline", "notified", "acked", "status"],
            [
                [
                    p.partner,
                    f"v{p.version}",
                    f"{p.deadline:%Y-%m-%d %H:%M}",
                    f"{p.notified_at:%Y-%m-%d %H:%M}" if p.notified_at else "-",
                    f"{p.acked_at:%Y-%m-%d %H:%M}" if p.acked_at else "-",
                    p.status,
                ]
                for p in partners
            ],
        )
    )
    return dg.MaterializeResult(metadata=meta)


@dg.asset_check(
    asset=keys_root,
    description="Partners notified within 24 h of every root rotation (R1). "
    "Fails while a notice is undelivered past its deadline; "
    "acknowledgements are shown, not required.",
)
def partners_notified_within_24h(kms: KmsResource) -> dg.AssetCheckResult:
    check = rotation.check_partners(kms.context())
    return dg.AssetCheckResult(
        passed=check.ok,
        metadata={
            "overdue": dg.MetadataValue.json(
                [f"{r.partner}@v{r.version} (deadline {r.deadline.isoformat()})" for r in check.overdue]
            ),
            "notified_late": dg.MetadataValue.json([f"{r.partner}@v{r.version}" for r in check.late]),
            "awaiting_ack": dg.MetadataValue.json([f"{r.partner}@v{r.version}" for r in check.unacked]),
            "notices": len(check.rows),
        },
    )


@dg.asset_check(
    asset=keys_root,
    blocking=True,
    description="The published root manifests verify offline: fingerprints match keys and each "
    "new root is signed by the previous one.",
)
def root_manifest_chain_verifies(kms: KmsResource) -> dg.AssetCheckResult:
    result = manifest.verify_chain(kms.context())
    return dg.AssetCheckResult(
        passed=result.ok,
        metadata={
            "manifests": result.count,
            "problem": result.problem or "none",
            "first_bad_version": result.first_bad_version or 0,
        },
    )


@dg.asset(
    group_name="keys",
    tags=NIGHTLY,
    deps=[keys_root, keys_service],
    kinds={"sql"},
    description="Retirement (T1, T4): root/service versions kept 365 days verify-only, then destroyed "
    "under dual approval; lists what is due and what awaits approval.",
)
def key_retirement(kms: KmsResource) -> dg.MaterializeResult:
    ctx = kms.context()
    s = retention.retire_expired(ctx)
    cp = checkpoints.checkpoint_if_changed(ctx) if s.destroyed else None  # destroys after the nightly checkpoint
    return dg.MaterializeResult(
        metadata={
            "checkpoint": cp["key"] if cp else "unchanged",
            "due": len(s.due),
            "destroyed": dg.MetadataValue.json([d["target"] for d in s.destroyed]),
            "awaiting_approval": dg.MetadataValue.md(
                markdown_table(
                    ["target", "ticket", "missing"],
                    [[d["target"], d["ticket"], d["missing"][:200]] for d in s.awaiting_approval],
                )
            ),
            "refused": dg.MetadataValue.md(
                markdown_table(
                    ["target", "guard", "reason"], [[d["target"], d["guard"], d["reason"]] for d in s.refused]
                )
            ),
        }
    )


@dg.asset(
    group_name="keys",
    tags=NIGHTLY,
    deps=[keys_root, keys_service, keys_archive],
    kinds={"sql", "s3"},
    description="Archive vault (T1): every retired root/service version has an archive copy wrapped under "
    "the archive KEK, under Object Lock until retirement + 365 days, with a root-signed manifest "
    "entry; forensic material past its TTL is erased.",
)
def key_vault(kms: KmsResource) -> dg.MaterializeResult:
    ctx = kms.context()
    made = vault.archive_pending(ctx)
    erased = forensic.purge_expired(ctx)
    rows = vault.copies(ctx)
    return dg.MaterializeResult(
        metadata={
            "archived_now": dg.MetadataValue.json([vault.target_for(c.key, c.version) for c in made]),
            "forensic_erased": len(erased),
            "copies": dg.MetadataValue.md(
                markdown_table(
                    ["key", "status", "locked until", "problems"],
                    [
                        [
                            vault.target_for(c.key, c.version),
                            c.status,
                            c.retain_until.isoformat() if c.retain_until else "-",
                            "; ".join(c.problems) or "none",
                        ]
                        for c in rows
                    ],
                )
            ),
        }
    )


@dg.asset_check(
    asset=key_vault,
    description="Every archive copy verifies: root-signed manifest entry, bytes "
    "against the recorded SHA-256, Object Lock until the end of retention.",
)
def archive_copies_verify(kms: KmsResource) -> dg.AssetCheckResult:
    rows = vault.copies(kms.context())
    broken = [p for c in rows for p in c.problems]
    return dg.AssetCheckResult(
        passed=not broken,
        metadata={"copies": sum(c.status == "archived" for c in rows), "problems": dg.MetadataValue.json(broken[:50])},
    )


# ---------------------------------------------------------------- the key inventory (R1-R4)


@dg.asset(
    group_name="keys",
    tags=NIGHTLY,
    deps=[kms_state],
    kinds={"sql"},
    description="Every key version with its state, age and rotation due date from the policy.",
)
def key_inventory(kms: KmsResource) -> dg.MaterializeResult:
    rows = lifecycle.inventory(kms.context())
    live = [r for r in rows if r.state != "destroyed"]
    return dg.MaterializeResult(
        metadata={
            "versions": len(rows),
            "active": sum(r.state == "active" for r in rows),
            "overdue": sum(r.overdue for r in rows),
            "inventory": inventory_table(live),
            # issue 8 item 2: the active versions' age against their class cadence, as a bar chart
            "age_vs_cadence": dg.MetadataValue.md(_age_chart(kms, rows)),
        }
    )


def _age_chart(kms: KmsResource, rows) -> str:
    from .charts import key_age_chart

    policy = kms.context().policy
    return key_age_chart(
        rows,
        {
            c: policy.key_class(c).rotation_days
            for c in ("root", "service", "data", "backup", "break-glass", "export", "archive")
        },
    )


@dg.asset_check(asset=key_inventory, description="Keys within cadence (R1–R4): no active version past its due date.")
def keys_within_cadence(kms: KmsResource) -> dg.AssetCheckResult:
    # An overdue row always has its due date (lifecycle.inventory: overdue = due_at and now >= due_at).
    overdue = [(r, r.due_at) for r in lifecycle.inventory(kms.context()) if r.overdue and r.due_at is not None]
    return dg.AssetCheckResult(
        passed=not overdue,
        metadata={
            "overdue": dg.MetadataValue.json(
                [{"key": r.key, "version": r.version, "due_at": due.isoformat()} for r, due in overdue]
            )
        },
    )
