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

phase_setup() {
  ensure_venv
  export KMS_HOME="${KMS_HOME:-$REPO_ROOT/.kms}"
  export DAGSTER_HOME="${DAGSTER_HOME:-$KMS_HOME/dagster}"
  ensure_dev_instance "$DAGSTER_HOME"
}

phase_state() {
  log "kms init (KMS_HOME=$KMS_HOME)"
  kms init
  # Break-glass escrow needs its custodians enrolled before the first package can be sealed.
  # In the demo their age identities are kept under $KMS_HOME/custodians (each custodian
  # keeps their own in production).
  mkdir -p "$KMS_HOME/custodians"
  for custodian in $(python -c "from kms_pipelines.core.policy import load_policy
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
  for shard in $(python -c "from kms_pipelines.core.policy import load_policy
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
The KMS console (FIDO2 key + TOTP sign-in; README "The KMS console"): KMS_HOME=$KMS_HOME $VENV/bin/kms console serve --origin http://localhost:8443 --port 8443
MSG
  if grep -q "FAIL" <<<"$overall"; then
    die "demo finished in $((SECONDS - START)) s, but the compliance report FAILS (above); nothing the demo does should cause that"
  fi
  log "demo finished in $((SECONDS - START)) s: every job succeeded and the compliance report does not fail"
}

phase_setup
phase_state
phase_jobs
phase_summary
