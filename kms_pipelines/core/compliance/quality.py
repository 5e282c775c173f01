"""Great Expectations suites over the key inventory and DEK inventory frames (issue 4b, §8).

The frames are plain pandas (``key_inventory_frame`` here, ``envelope.dek_inventory_frame``
from the envelope area); the suites check types, uniqueness, allowed states and that every
key has exactly one active version. Great Expectations costs ~2 s to import, so it is
imported only inside ``validate``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..envelope import data_keys as envelope
from ..foundation.context import KmsContext
from ..foundation.db.models import STATES
from ..keys import lifecycle


def key_inventory_frame(ctx: KmsContext):
    """One row per key version (never key material): key, key_class, version, state, timestamps."""
    import pandas as pd  # lazy import: start-up time (optional/heavy dependency)

    rows = lifecycle.inventory(ctx)
    frame = pd.DataFrame(
        [
            {
                "key": r.key,
                "key_class": r.key_class,
                "version": int(r.version),
                "state": r.state,
                "created_at": r.created_at,
                "activated_at": r.activated_at,
                "fingerprint": r.fingerprint,
            }
            for r in rows
        ],
        columns=["key", "key_class", "version", "state", "created_at", "activated_at", "fingerprint"],
    )
    frame["version"] = frame["version"].astype("int64")
    frame["key_version"] = frame["key"] + "#v" + frame["version"].astype(str)
    return frame


def active_per_key_frame(inventory):
    """key, active_count: over every key that has a non-destroyed version."""
    import pandas as pd  # lazy import: start-up time (optional/heavy dependency)

    live = inventory[inventory["state"] != "destroyed"]
    counts = (
        live.assign(is_active=(live["state"] == "active").astype("int64"))
        .groupby("key", as_index=False)["is_active"]
        .sum()
        .rename(columns={"is_active": "active_count"})
    )
    return pd.DataFrame(counts, columns=["key", "active_count"])


@dataclass
class SuiteResult:
    name: str
    success: bool
    rows: int
    failed: list[str] = field(default_factory=list)  # "expectation(column)" that failed

    def to_dict(self) -> dict:
        return {"name": self.name, "success": self.success, "rows": self.rows, "failed": self.failed}


def _run(gx, gxe, name: str, frame, expectations) -> SuiteResult:
    ctx = gx.get_context(mode="ephemeral")
    batch_def = (
        ctx.data_sources.add_pandas(name=f"kms_{name}")
        .add_dataframe_asset(name=name)
        .add_batch_definition_whole_dataframe("all")
    )
    suite = ctx.suites.add(gx.ExpectationSuite(name=name))
    for e in expectations:
        suite.add_expectation(e)
    result = batch_def.get_batch(batch_parameters={"dataframe": frame}).validate(suite)
    failed = []
    for r in result.results:
        if not r.success:
            cfg = r.expectation_config
            kwargs = cfg.kwargs
            where = kwargs.get("column") or ",".join(kwargs.get("column_list", []) or [])
            failed.append(f"{cfg.type}({where})")
    return SuiteResult(name, bool(result.success), len(frame), failed)


def validate(ctx: KmsContext, *, inventory=None, deks=None) -> list[SuiteResult]:
    """Run the suites; ``inventory``/``deks`` frames default to the live ones."""
    import great_expectations as gx  # lazy import: start-up time (optional/heavy dependency)
    import great_expectations.expectations as gxe

    inventory = key_inventory_frame(ctx) if inventory is None else inventory
    results = [
        _run(
            gx,
            gxe,
            "key_inventory",
            inventory,
            [
                gxe.ExpectTableColumnsToMatchSet(
                    column_set=[
                        "key",
                        "key_class",
                        "version",
                        "state",
                        "created_at",
                        "activated_at",
                        "fingerprint",
                        "key_version",
                    ],
                    exact_match=False,
                ),
                gxe.ExpectColumnValuesToNotBeNull(column="key"),
                gxe.ExpectColumnValuesToBeOfType(column="version", type_="int64"),
                gxe.ExpectColumnValuesToBeBetween(column="version", min_value=1),
                gxe.ExpectColumnValuesToBeInSet(column="state", value_set=list(STATES)),
                gxe.ExpectColumnValuesToBeInSet(
                    column="key_class",
                    value_set=["root", "service", "data", "export", "backup", "break-glass", "archive"],
                ),
                gxe.ExpectColumnValuesToBeUnique(column="key_version"),
                gxe.ExpectCompoundColumnsToBeUnique(column_list=["key", "version"]),
            ],
        ),
        _run(
            gx,
            gxe,
            "active_per_key",
            active_per_key_frame(inventory),
            [
                gxe.ExpectColumnValuesToBeUnique(column="key"),
                gxe.ExpectColumnValuesToBeBetween(column="active_count", min_value=1, max_value=1),
            ],
        ),
    ]
    if deks is None:
        deks = envelope.dek_inventory_frame(ctx)
    if deks is not None:
        if "shredded_at" in deks.columns:  # crypto-shredded export DEKs stay listed on destroyed versions
            deks = deks[deks["shredded_at"].isna()]
        results.append(
            _run(
                gx,
                gxe,
                "dek_inventory",
                deks,
                [
                    gxe.ExpectColumnValuesToNotBeNull(column="dek_id"),
                    gxe.ExpectColumnValuesToBeUnique(column="dek_id"),
                    gxe.ExpectColumnValuesToNotBeNull(column="key_name"),
                    gxe.ExpectColumnValuesToBeBetween(column="key_version", min_value=1),
                    # a DEK may sit on any version that still exists; never on a missing or destroyed one
                    gxe.ExpectColumnValuesToBeInSet(column="version_state", value_set=["active", "rotated", "revoked"]),
                    gxe.ExpectCompoundColumnsToBeUnique(column_list=["key_name", "object_id"]),
                ],
            )
        )
    return results
