#!/usr/bin/env bash
# Run the whole test suite on a fresh machine: installs SoftHSM2 and PostgreSQL when
# missing, creates .venv, makes sure PostgreSQL answers, runs pytest. Extra arguments
# go to pytest (e.g. ./scripts/test.sh -k ledger).
set -euo pipefail
source "$(dirname "$0")/lib/env.sh"
cd "$REPO_ROOT"

ensure_system_packages
ensure_venv test
ensure_postgres

mkdir -p test-artifacts
log "pytest (PostgreSQL: ${KMS_TEST_DATABASE_URL%%\?*})"
set +e
"$VENV/bin/python" -m pytest -p no:cacheprovider --junitxml=test-artifacts/junit.xml "$@"
status=$?
set -e
if [ "$status" = 5 ]; then echo "error: pytest collected no tests" >&2; exit 1; fi
exit "$status"
