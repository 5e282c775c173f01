"""When a retired root or service version may be destroyed (clause T1): the retention window.

The lowest piece of the retention rules, so both the archive vault (``vault``: an archive
copy is locked until the window ends) and the retention guard and nightly destroy
(``retention``, which calls ``vault`` when a version goes) read it without importing each
other.
"""

from __future__ import annotations

from datetime import datetime, timedelta

from ..foundation.clock import utc
from ..foundation.context import KmsContext
from ..foundation.db.models import Key, KeyVersion

RETAINED_CLASSES = ("root", "service")


def retention_days(ctx: KmsContext, key_class: str) -> int | None:
    if key_class not in RETAINED_CLASSES:
        return None
    return ctx.policy.key_class(key_class).retention_days or ctx.policy.retention.expired_root_service_days


def retired_at(v: KeyVersion) -> datetime | None:
    stamps = [utc(t) for t in (v.rotated_at, v.revoked_at) if t is not None]
    return min(stamps) if stamps else None


def destroy_allowed_from(ctx: KmsContext, key: Key, v: KeyVersion) -> datetime | None:
    days = retention_days(ctx, key.key_class)
    start = retired_at(v)
    if days is None or start is None:
        return None
    return start + timedelta(days=days)
