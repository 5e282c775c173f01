#!/usr/bin/env bash
# Measure the numbers the README quotes and record them in docs/measurements.json:
#   test_count            tests pytest collects
#   demo_seconds          ./scripts/demo.sh on scratch state (a temporary KMS_HOME), venv ready
#   suite_seconds/_passed only with --suite: the whole test suite (20+ minutes on 2 cores)
# Each run updates only what it measured, with the date and machine it ran on.
set -euo pipefail
source "$(dirname "$0")/lib/env.sh"
cd "$REPO_ROOT"
ensure_venv test

record() { # key=value ...
  "$VENV/bin/python" - "$REPO_ROOT/docs/measurements.json" "$@" <<'PY'
import json, os, platform, sys, time
path, pairs = sys.argv[1], sys.argv[2:]
data = json.load(open(path)) if os.path.exists(path) else {}
for pair in pairs:
    key, value = pair.split("=", 1)
    data[key] = json.loads(value)
    data[key + "_measured"] = {"at": time.strftime("%Y-%m-%dT%H:%MZ", time.gmtime()),
                               "cpus": os.cpu_count(), "python": platform.python_version(),
                               "load_avg": round(os.getloadavg()[0], 2)}
json.dump(data, open(path, "w"), indent=2, sort_keys=True)
open(path, "a").write("\n")
PY
}

log "counting tests"
count="$("$VENV/bin/python" -m pytest -p no:cacheprovider -p no:randomly --collect-only -q 2>/dev/null \
  | sed -nE 's/^([0-9]+) tests? collected.*/\1/p' | tail -n1)"
[ -n "$count" ] || die "pytest --collect-only reported no count"
record "test_count=$count"
log "$count tests"

log "timing ./scripts/demo.sh on scratch state"
scratch="$(mktemp -d)"
trap 'rm -rf "$scratch"' EXIT
t0=$SECONDS
KMS_HOME="$scratch/.kms" ./scripts/demo.sh >"$scratch/demo.log" 2>&1 || { tail -n 20 "$scratch/demo.log" >&2; die "demo failed"; }
record "demo_seconds=$((SECONDS - t0))"
log "demo: $((SECONDS - t0)) s"

if [ "${1:-}" = "--suite" ]; then
  ensure_system_packages
  ensure_postgres
  log "timing the whole test suite"
  t0=$SECONDS
  set +e
  "$VENV/bin/python" -m pytest -p no:cacheprovider -q >"$scratch/suite.log" 2>&1
  status=$?
  set -e
  passed="$(sed -nE 's/.* ([0-9]+) passed.*/\1/p' "$scratch/suite.log" | tail -n1)"
  record "suite_seconds=$((SECONDS - t0))" "suite_passed=${passed:-0}" "suite_exit=$status"
  log "suite: $((SECONDS - t0)) s, ${passed:-0} passed (exit $status)"
fi
log "recorded in docs/measurements.json"
