"""Re-keyed successors of retained archives (T4): restore into staging, sweep the DEKs off the old version, back up again under the current key."""

from __future__ import annotations

from datetime import timedelta

from sqlalchemy import select

from ..foundation.clock import utc
from ..foundation.context import KmsContext
from ..foundation.db.models_backup import Backup
from . import restore as restore_mod
from .backups import BackupError, BackupSource, _envelope, _unsucceeded_refs, create


def rekey_restore_points(ctx: KmsContext, key_name: str, version: int, *, staging_url: str | None = None) -> list[dict]:
    """Give every retained archive referencing ``key_name`` v``version`` a re-keyed successor:
    restore it into staging, sweep DEKs off the version there (data keys, when the
    envelope module is installed), back the staging copy up under the current backup
    key, and link the two (``successor_of``)."""
    with ctx.transaction() as session:
        ids = _unsucceeded_refs(session, key_name, version)
        preds = {
            r.archive_id: (r.gfs_class, utc(r.retain_until))
            for r in session.scalars(select(Backup).where(Backup.archive_id.in_(ids)))
        }
    done = []
    for aid in ids:
        gfs, retain = preds[aid]
        with restore_mod.staging_target(ctx, staging_url, label="rekey") as (url, home):
            report = restore_mod.restore(ctx, aid, url, target_home=home)
            if not report.ok:
                raise BackupError(f"cannot re-key {aid}: its restore failed ({report.summary()})")
            staged = restore_mod.staging_context(ctx, url, home)
            try:
                swept = None
                env = _envelope()
                if env is not None and key_name.startswith("data:"):
                    swept = env.sweep(staged, key_name)
                source = BackupSource(staged.engine, home, staged.keystore)
                new = create(
                    ctx,
                    gfs_class=gfs,
                    source=source,
                    successor_of=aid,
                    retain_until=max(retain, ctx.now() + timedelta(days=1)),
                )
            finally:
                staged.engine.dispose()
        done.append(
            {
                "predecessor": aid,
                "successor": new.archive_id,
                "swept": getattr(swept, "moved", None) if swept is not None else None,
            }
        )
    return done
