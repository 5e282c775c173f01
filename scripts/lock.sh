#!/usr/bin/env bash
# Regenerate the hash-locked requirement files from pyproject.toml, for CPython 3.11 on Linux x86_64:
#   requirements.txt       the package's own dependencies (./scripts/demo.sh, ./scripts/ui.sh)
#   requirements-test.txt  plus the [test] extra: pytest, ruff, mypy... (./scripts/test.sh, CI)
# scripts/lib/env.sh installs exactly these pins with `pip install --require-hashes`, so a fresh
# machine gets what CI tested.
#
#   ./scripts/lock.sh                          after editing pyproject.toml: keeps every pin that
#                                              still satisfies it, resolves only what changed
#   ./scripts/lock.sh --upgrade-package NAME   move one package to its newest allowed release
#   ./scripts/lock.sh --upgrade                move everything (then run the whole suite)
#
# The resolver is uv's `pip compile` (pip-tools' file format; much faster), pinned and installed
# into a cache directory outside the repository. It asks PyPI only, never a local mirror, so the
# hashes are the ones a fresh machine will be served.
set -euo pipefail
source "$(dirname "$0")/lib/env.sh"
cd "$REPO_ROOT"

UV_VERSION=0.13.9
tools="${XDG_CACHE_HOME:-$HOME/.cache}/kms-pipelines/uv-$UV_VERSION"
if [ ! -x "$tools/bin/uv" ]; then
  log "installing uv $UV_VERSION into $tools"
  "$PYTHON" -m venv "$tools" || die "python3 -m venv failed"
  "$tools/bin/pip" install -q "uv==$UV_VERSION" || die "pip install uv==$UV_VERSION failed"
fi

compile() { # output extra-args...
  local out="$1"; shift
  log "resolving $out"
  "$tools/bin/uv" pip compile pyproject.toml "$@" --output-file "$out" \
    --python-version 3.11 --python-platform x86_64-manylinux_2_28 --generate-hashes \
    --index-url https://pypi.org/simple --no-config --quiet \
    --custom-compile-command "./scripts/lock.sh" || die "uv pip compile failed for $out"
}

compile requirements-test.txt --extra test "$@"
# The runtime set takes its versions from the test set, so the demo runs what the tests ran.
compile requirements.txt --constraint requirements-test.txt
log "done: review with git diff requirements*.txt"
