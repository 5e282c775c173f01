#!/usr/bin/env bash
# The demo, on the embedded defaults under ./.kms: SQLite KMS database, local object store,
# software keystore, outbox notifications, and a Dagster instance in ./.kms/dagster.
#
# Every job the UI shows is run ON THAT INSTANCE, through the same code location the UI
# loads (workspace.yaml), so right after the demo the UI lists these runs, can re-execute
# them, shows every asset materialized and every check evaluated, and its compliance report
# agrees with the one printed here. Running the demo again is safe.
#
# Phases are functions so that more set-up (e.g. enrolling principals) slots in as one more.
set -euo pipefail
source "$(dirname "$0")/lib/env.sh"
cd "$REPO_ROOT"
START=$SECONDS
DEMO_CONSOLE_ORIGIN="http://localhost:8443"

phase_setup() {
  ensure_venv
  export KMS_HOME="${KMS_HOME:-$REPO_ROOT/.kms}"
  export DAGSTER_HOME="${DAGSTER_HOME:-$KMS_HOME/dagster}"
  ensure_dev_instance "$DAGSTER_HOME"
  # The demo's policy: the packaged one, but software FIDO2 authenticators allowed (its
  # principals' security keys are files under $KMS_HOME/principals; production's policy
  # refuses such keys and A2 names any principal holding only one).
  mkdir -p "$KMS_HOME"
  sed 's/allow_software_authenticators: false/allow_software_authenticators: true/' \
    "$REPO_ROOT/assets/policy.yaml" >"$KMS_HOME/policy.yaml"
  grep -q "allow_software_authenticators: true" "$KMS_HOME/policy.yaml" || die "demo policy: no software-key switch"
  export KMS_POLICY="${KMS_POLICY:-$KMS_HOME/policy.yaml}"
}

# The first-run ceremony, once: five principals with generated TOTP secrets and software
# security keys kept under $KMS_HOME/principals (each person holds their own in production).
phase_principals() {
  local dir="$KMS_HOME/principals"
  if [ -f "$dir/enrolled.json" ]; then
    log "principals already enrolled ($dir)"
    return
  fi
  mkdir -p "$dir" && chmod 700 "$dir"
  kms init --console-origin "$DEMO_CONSOLE_ORIGIN" --software-keys "$dir" --json \
    --admin alice=security_engineering --admin bob=security_engineering --admin carol=security_engineering \
    --admin dave=sre_oncall --admin erin=compliance_officer >"$dir/enrolled.json.tmp"
  chmod 600 "$dir/enrolled.json.tmp" && mv "$dir/enrolled.json.tmp" "$dir/enrolled.json"
  python - "$dir" <<'PY'
import json, os, sys
d = sys.argv[1]
for e in json.load(open(os.path.join(d, "enrolled.json")))["enrolled"]:
    path = os.path.join(d, e["name"] + ".totp")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.write(fd, (e["provisioning_uri"] + "\n").encode())
    os.close(fd)
PY
  log "enrolled alice, bob, carol, dave, erin: TOTP URIs and software security keys in $dir"
}

phase_state() {
  log "kms init (KMS_HOME=$KMS_HOME)"
  kms init
  # Break-glass escrow needs its custodians enrolled before the first package can be sealed.
  # In the demo their age identities are kept under $KMS_HOME/custodians (each custodian
  # keeps their own in production).
  mkdir -p "$KMS_HOME/custodians"
  for custodian in $(python -c "from kms_pipelines.core.foundation.policy import load_policy
print(' '.join(load_policy().key_class('break-glass').escrow.custodians))"); do
    if [ ! -f "$KMS_HOME/custodians/$custodian.age" ]; then
      kms escrow custodian add "$custodian" --out "$KMS_HOME/custodians/$custodian.age" >/dev/null
      log "enrolled escrow custodian $custodian"
    fi
  done
  # A few envelope-encrypted documents, so the DEK inventory and the rewrap sweep have data.
  mkdir -p "$KMS_HOME/sample"
  for doc in statement-1 statement-2 statement-3; do
    [ -f "$KMS_HOME/sample/$doc.blob" ] && continue
    echo "sample $doc" | kms envelope encrypt data:banking-attachments "$doc" --out "$KMS_HOME/sample/$doc.blob"
  done
  log "3 sample documents encrypted under data:banking-attachments ($KMS_HOME/sample)"
}

run_job() { python "$REPO_ROOT/scripts/lib/run_job.py" "$@"; }

phase_jobs() {
  local yesterday this_month shard
  yesterday="$(date -u -d yesterday +%F)"
  this_month="$(date -u +%Y-%m-01)"
  # The order of a real night: back up, prove the backup restores, sweep DEKs off retired
  # versions, then the main job, whose last asset is the compliance report over all of it.
  run_job backup_nightly --partition "$yesterday"
  run_job restore_drill --partition "$this_month"
  log "dek_rewrap_sweep_job: one run per shard"
  for shard in $(python -c "from kms_pipelines.core.foundation.policy import load_policy
print(' '.join(str(i) for i in range(load_policy().envelope.shards)))"); do
    # The job's own executor (KMS_EXECUTOR, default multiprocess), so a re-execution from the UI
    # validates against the same run config.
    run_job dek_rewrap_sweep_job --partition "$shard" \
      | grep -v '^  ' || return 1
  done
  run_job kms_nightly
}

phase_summary() {
  log "state after the runs"
  kms keys list
  kms ledger verify
  kms report --format html --out "$KMS_HOME/compliance-report.html" >/dev/null || true
  local overall
  overall="$(kms report --format md 2>/dev/null | sed -n 3p || true)"
  echo "$overall"
  echo "full compliance report: $KMS_HOME/compliance-report.html"
  cat <<MSG

To browse this state in the Dagster UI (Runs lists the runs above; each can be re-executed):
  ./scripts/ui.sh        # = KMS_HOME=$KMS_HOME DAGSTER_HOME=$DAGSTER_HOME $VENV/bin/dg dev --host 127.0.0.1 --port 3000
then open http://127.0.0.1:3000.
The KMS console (FIDO2 key + TOTP sign-in; README "The KMS console"): KMS_HOME=$KMS_HOME KMS_POLICY=$KMS_POLICY $VENV/bin/kms console serve --origin $DEMO_CONSOLE_ORIGIN --port 8443
The demo's principals (alice, bob, carol, dave, erin) approve from the CLI with both factors, e.g.
  kms approve --ticket CHG-1 --operation rotate --target root --as bob \
    --totp "\$(python -c 'import pyotp;print(pyotp.parse_uri(open("$KMS_HOME/principals/bob.totp").read()).now())')" \
    --software-key $KMS_HOME/principals/bob.fido2.json
MSG
  if grep -q "FAIL" <<<"$overall"; then
    die "demo finished in $((SECONDS - START)) s, but the compliance report FAILS (above); nothing the demo does should cause that"
  fi
  log "demo finished in $((SECONDS - START)) s: every job succeeded and the compliance report does not fail"
}

phase_setup
phase_state
phase_principals
phase_jobs
phase_summary
