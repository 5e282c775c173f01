#!/usr/bin/env bash
# Restore drill helper (B2): scripts/restore.sh ARCHIVE --target URL_OF_A_NEW_DATABASE [--trust FILE]
# Verifies the manifest signature and archive hash first, refuses anything altered,
# then restores, migrates, verifies the ledger and recent RPTs and decrypts canaries.
# Thin wrapper over `kms restore`.
set -euo pipefail
REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
KMS="${KMS_BIN:-$REPO_ROOT/.venv/bin/kms}"
[ $# -ge 1 ] || { echo "usage: $0 ARCHIVE --target URL [--trust FILE]   (ARCHIVE: a .tar.zst.age file, an archive id or an object key)" >&2; exit 2; }
exec "$KMS" restore "$@"
