#!/usr/bin/env bash
# The Dagster UI over the demo's state: KMS_HOME=./.kms, DAGSTER_HOME=./.kms/dagster, the
# code location from pyproject.toml (the same one workspace.yaml names). Extra arguments go
# to `dg dev` (e.g. --port 3001).
set -euo pipefail
source "$(dirname "$0")/lib/env.sh"
cd "$REPO_ROOT"
ensure_venv
export KMS_HOME="${KMS_HOME:-$REPO_ROOT/.kms}"
export DAGSTER_HOME="${DAGSTER_HOME:-$KMS_HOME/dagster}"
[ -f "$KMS_HOME/kms.db" ] || [ -n "${KMS_DATABASE_URL:-}" ] || die "no KMS state in $KMS_HOME: run ./scripts/demo.sh first (or set KMS_HOME)"
ensure_dev_instance "$DAGSTER_HOME"
# the demo's policy (software security keys allowed), when the demo wrote one
[ -n "${KMS_POLICY:-}" ] || [ ! -f "$KMS_HOME/policy.yaml" ] || export KMS_POLICY="$KMS_HOME/policy.yaml"
log "Dagster UI on http://127.0.0.1:${PORT:-3000} (KMS_HOME=$KMS_HOME, DAGSTER_HOME=$DAGSTER_HOME); Ctrl-C stops it"
exec "$VENV/bin/dg" dev --host 127.0.0.1 --port "${PORT:-3000}" "$@"
