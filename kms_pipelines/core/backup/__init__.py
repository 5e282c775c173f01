"""Backups and restores: B1 (nightly encrypted backups), B2 (monthly restore drills),
B3 (GFS retention), B4 (drill documentation), T4 (restore points re-keyed before destroy).

archive (tar -> zstd -> age format), manifest_schema (signed manifest fields), backups
(create, verify_archive, prune), restore (restore, staging_target), rekey
(rekey_restore_points), drills (run_drill, status).

Layers inside (lint-imports): drills > rekey > restore > backups > archive | manifest_schema.
"""
