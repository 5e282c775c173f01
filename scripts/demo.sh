#!/usr/bin/env bash
# Run the main job, kms_nightly, on the embedded defaults under ./.kms: SQLite KMS
# database, SQLite Dagster instance, local object store, software keystore, outbox
# notifications. The first run bootstraps every policy key; running it again is safe.
set -euo pipefail
source "$(dirname "$0")/lib/env.sh"
cd "$REPO_ROOT"

ensure_venv

export KMS_HOME="${KMS_HOME:-$REPO_ROOT/.kms}"
export DAGSTER_HOME="${DAGSTER_HOME:-$KMS_HOME/dagster}"
mkdir -p "$DAGSTER_HOME"
# An instance with only telemetry set keeps Dagster's SQLite storage under DAGSTER_HOME.
[ -f "$DAGSTER_HOME/dagster.yaml" ] || printf 'telemetry:\n  enabled: false\n' > "$DAGSTER_HOME/dagster.yaml"

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
log "launching kms_nightly (full log: $KMS_HOME/last-run.log)"
set +e
# In-process execution: one process for the whole run, which is quicker on a laptop than a
# subprocess per step (production keeps Dagster's multiprocess default).
dg launch --job kms_nightly --config-json '{"execution": {"config": {"in_process": {}}}}' \
  >"$KMS_HOME/last-run.log" 2>&1
status=$?
set -e
# One line per materialization, check and step outcome, so the run reads at a glance.
grep -aE " - (ASSET_MATERIALIZATION|ASSET_CHECK_EVALUATION|STEP_FAILURE|RUN_SUCCESS|RUN_FAILURE) - " \
  "$KMS_HOME/last-run.log" | sed -E 's/^.* - ([A-Z_]+) - (.*)$/  \1 \2/' | cut -c1-150 || true
if [ "$status" != 0 ] || ! grep -q "RUN_SUCCESS" "$KMS_HOME/last-run.log"; then
  tail -n 40 "$KMS_HOME/last-run.log" >&2
  die "kms_nightly failed (exit $status); see $KMS_HOME/last-run.log"
fi
log "nightly backup (scripts/backup.sh) and a restore drill"
./scripts/backup.sh
kms drill run >/dev/null && echo "drill report: $(ls -t "$KMS_HOME"/runbook/drills/*.md | head -n 1)"

log "state after the run"
kms keys list
kms ledger verify
# The compliance report exits 1 when a clause fails; the demo shows it either way.
kms report --format html --out "$KMS_HOME/compliance-report.html" >/dev/null || true
kms report --format md | sed -n 3p || true
echo "full compliance report: $KMS_HOME/compliance-report.html"
cat <<MSG

Done. To browse this state in the Dagster UI:
  KMS_HOME=$KMS_HOME DAGSTER_HOME=$DAGSTER_HOME $VENV/bin/dg dev --host 127.0.0.1 --port 3000
then open http://127.0.0.1:3000 (Runs shows the kms_nightly run that just finished).
The KMS console (FIDO2 key + TOTP sign-in; README "The KMS console"): KMS_HOME=$KMS_HOME $VENV/bin/kms console serve --origin http://localhost:8443 --port 8443
MSG
