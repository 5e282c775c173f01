#!/usr/bin/env bash
# Nightly backup (B1): stream the KMS database + artifacts/kms into an encrypted,
# Object-Lock'ed archive with a root-signed manifest, then apply GFS retention.
# Thin wrapper over `kms backup create` / `kms backup prune`; configure with KMS_* env.
set -euo pipefail
REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
KMS="${KMS_BIN:-$REPO_ROOT/.venv/bin/kms}"
"$KMS" backup create "$@"
"$KMS" backup prune
