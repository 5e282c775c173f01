#!/usr/bin/env bash
# Run the whole test suite on a fresh machine: installs SoftHSM2 and PostgreSQL when
# missing, creates .venv from the hash-locked requirements-test.txt, runs ruff and mypy,
# makes sure PostgreSQL answers, runs pytest. Extra arguments
# go to pytest (e.g. ./scripts/test.sh -k ledger).
set -euo pipefail
source "$(dirname "$0")/lib/env.sh"
cd "$REPO_ROOT"

ensure_system_packages
ensure_venv test

# Static checks before the suite, with the venv's pinned ruff and mypy (settings in pyproject.toml).
# Seconds, not minutes: ruff well under one; mypy about 40 s of CPU cold, a few with .mypy_cache.
t0=$SECONDS
log "ruff check, ruff format --check"
"$VENV/bin/ruff" check --quiet . \
  || die "ruff check failed: fix the lines above (\`ruff check --fix\` repairs those marked [*])"
"$VENV/bin/ruff" format --check --quiet . \
  || die "ruff format --check failed: run .venv/bin/ruff format . and commit the result"
log "mypy kms_pipelines ($((SECONDS - t0))s so far)"
"$VENV/bin/mypy" || die "mypy failed: fix the type errors above"
log "static checks passed in $((SECONDS - t0))s"

ensure_postgres

# The layering of kms_pipelines/core/ (.importlinter, docs/architecture.md): a new import from a
# lower layer into a higher one, a new cycle in core/ledger or core/backup, or a new import between
# defs/ and commands/ fails here.
log "lint-imports"
"$VENV/bin/lint-imports" --no-cache

mkdir -p test-artifacts
log "pytest (PostgreSQL: ${KMS_TEST_DATABASE_URL%%\?*})"
set +e
"$VENV/bin/python" -m pytest -p no:cacheprovider --junitxml=test-artifacts/junit.xml "$@"
status=$?
set -e
if [ "$status" = 5 ]; then echo "error: pytest collected no tests" >&2; exit 1; fi
exit "$status"
