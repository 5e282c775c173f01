"""Great Expectations over the key and DEK inventory frames, as an asset check on
``key_inventory``. The suites live in ``core.compliance.quality`` (GE is imported lazily there)."""

import dagster as dg

from ..core.compliance import quality
from .metadata import markdown_table
from .resources import KmsResource


@dg.asset_check(
    asset="key_inventory",
    blocking=True,
    description="Great Expectations: inventory types, unique key versions, allowed states, exactly one "
    "active version per key; DEK inventory ids unique and on existing versions.",
)
def inventory_frames_valid(kms: KmsResource) -> dg.AssetCheckResult:
    results = quality.validate(kms.context())
    return dg.AssetCheckResult(
        passed=all(r.success for r in results),
        metadata={
            "suites": dg.MetadataValue.md(
                markdown_table(
                    ["suite", "rows", "success", "failed expectations"],
                    [[r.name, r.rows, "yes" if r.success else "**no**", ", ".join(r.failed) or "-"] for r in results],
                )
            ),
            "failed": dg.MetadataValue.json({r.name: r.failed for r in results if not r.success}),
        },
    )
