# Shared set-up for scripts/*.sh: system packages, the virtual environment, PostgreSQL.
# Sourced, not run. Every step is idempotent and prints what it does.

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
VENV="${KMS_VENV:-$REPO_ROOT/.venv}"
PYTHON="${PYTHON:-python3}"

log() { printf '==> %s\n' "$*" >&2; }
die() { printf 'error: %s\n' "$*" >&2; exit 1; }

as_root() {
  if [ "$(id -u)" = 0 ]; then "$@"; elif command -v sudo >/dev/null; then sudo "$@"; else
    die "need root to run: $* (install it by hand or run as root)"; fi
}

APT_UPDATED=0
apt_install() {
  command -v apt-get >/dev/null || die "missing system packages ($*) and no apt-get to install them"
  if [ "$APT_UPDATED" = 0 ]; then
    log "apt-get update"; as_root apt-get update -qq >/dev/null || die "apt-get update failed"; APT_UPDATED=1
  fi
  log "apt-get install $*"
  DEBIAN_FRONTEND=noninteractive as_root apt-get install -y -qq "$@" >/dev/null || die "apt-get install $* failed"
}

ensure_system_packages() {
  local missing=()
  [ -e /usr/lib/softhsm/libsofthsm2.so ] && command -v softhsm2-util >/dev/null || missing+=(softhsm2)
  command -v zstd >/dev/null || missing+=(zstd)
  command -v pg_dump >/dev/null || missing+=(postgresql-client)
  # The celery scale-out tests start their own Redis broker if none answers on 6379.
  command -v redis-server >/dev/null || missing+=(redis-server)
  # The browser test drives Debian's Chromium through Playwright (its own browser downloads
  # are never used); the emoji font renders the compliance report's status marks.
  command -v chromium >/dev/null || missing+=(chromium)
  [ -e /usr/share/fonts/truetype/noto/NotoColorEmoji.ttf ] || missing+=(fonts-noto-color-emoji)
  # pip install compiles the ledger verifier's C kernel (setup.py, cffi), which needs a C
  # compiler and the Python and OpenSSL headers (without them the install still succeeds,
  # with a warning, and `kms ledger verify` runs its slower pure-Python path).
  command -v gcc >/dev/null || missing+=(gcc)
  [ -e /usr/include/openssl/sha.h ] || missing+=(libssl-dev)
  "$PYTHON" -c 'import os, sys, sysconfig; sys.exit(not os.path.exists(os.path.join(sysconfig.get_paths()["include"], "Python.h")))' \
    2>/dev/null || missing+=(python3-dev)
  [ ${#missing[@]} -eq 0 ] || apt_install "${missing[@]}"
}

# pip is silent for minutes on a fresh machine; print a line per phase and a running count.
pip_with_progress() {
  local t0=$SECONDS
  "$VENV/bin/pip" install --progress-bar off "$@" 2>&1 | awk '
    /^Collecting / { n++; if (n % 20 == 1) { printf "    resolving: %d packages so far (%s)\n", n, $2; fflush() } }
    /^Installing collected packages/ { if (n) printf "    installing %d packages (the longest step: 1-3 min on a fresh machine)...\n", n
                                       else printf "    installing...\n"; fflush() }
    /^(ERROR|error):/ { print; fflush() }'
  local status="${PIPESTATUS[0]}"
  [ "$status" = 0 ] && printf '    installed in %ds\n' "$((SECONDS - t0))"
  return "$status"
}

ensure_venv() {
  # KMS_SKIP_INSTALL=1: the caller manages the environment (the browser test runs the demo
  # from an already-installed venv, possibly one made for another checkout).
  if [ -n "${KMS_SKIP_INSTALL:-}" ]; then
    [ -x "$VENV/bin/python" ] || die "KMS_SKIP_INSTALL is set but $VENV/bin/python does not exist"
    export PATH="$VENV/bin:$PATH"
    return
  fi
  if [ ! -x "$VENV/bin/python" ]; then
    log "creating virtual environment $VENV"
    "$PYTHON" -m venv "$VENV" || die "python3 -m venv failed (apt-get install python3-venv?)"
    log "upgrading pip"
    "$VENV/bin/pip" install -q --upgrade pip >/dev/null
  fi
  # Exactly the versions CI tested: requirements*.txt, hash-locked by ./scripts/lock.sh from
  # pyproject.toml. Reinstall only when pyproject.toml or a lock file changed.
  local lock="$REPO_ROOT/requirements${1:+-$1}.txt"
  [ -f "$lock" ] || die "missing $lock (regenerate it with ./scripts/lock.sh)"
  local stamp="$VENV/.kms-installed" want have hash
  hash="$(cat "$REPO_ROOT/pyproject.toml" "$REPO_ROOT"/requirements*.txt | sha256sum | cut -d' ' -f1)"
  want="$hash-${1:-base}"
  have="$(cat "$stamp" 2>/dev/null || true)"
  # An install with the test extras also satisfies a plain one (demo after test.sh).
  if [ "$have" != "$want" ] && ! { [ -z "${1:-}" ] && [ "$have" = "$hash-test" ]; }; then
    log "installing the locked dependencies ($(basename "$lock")) into $VENV"
    pip_with_progress --require-hashes -r "$lock" || die "pip install -r $lock failed"
    log "installing kms_pipelines (editable, dependencies already locked)"
    pip_with_progress --no-deps -e "$REPO_ROOT" || die "pip install -e $REPO_ROOT failed"
    # --no-deps trusts the lock: a dependency added to pyproject.toml without ./scripts/lock.sh
    # would be missing, so say so now rather than as an ImportError mid-suite.
    "$VENV/bin/pip" check >/dev/null 2>&1 || die "$(basename "$lock") is older than pyproject.toml \
($("$VENV/bin/pip" check 2>/dev/null | head -n1 | sed 's/\.$//')): run ./scripts/lock.sh and commit the lock files"
    echo "$want" > "$stamp"
  fi
  export PATH="$VENV/bin:$PATH"
}

# The development Dagster instance (demo, UI, `dg`): SQLite storage under DAGSTER_HOME, runs
# launched at once (no queue, so a run needs no daemon), no telemetry. Production uses
# deploy/dagster.yaml instead.
ensure_dev_instance() {
  local home="$1"
  mkdir -p "$home"
  [ -f "$home/dagster.yaml" ] && grep -q DefaultRunCoordinator "$home/dagster.yaml" && return
  cat > "$home/dagster.yaml" <<'YAML'
telemetry:
  enabled: false
run_coordinator:
  module: dagster._core.run_coordinator
  class: DefaultRunCoordinator
YAML
}

pg_answers() { # host port
  "$VENV/bin/python" - "$1" "$2" <<'PY' 2>/dev/null
import socket, sys
s = socket.socket(); s.settimeout(2)
sys.exit(0 if s.connect_ex((sys.argv[1], int(sys.argv[2]))) == 0 else 1)
PY
}

# Make sure a PostgreSQL server answers for the tests: KMS_TEST_DATABASE_URL if set,
# else 127.0.0.1:5432 (starting the Debian cluster, or a throwaway one, as `postgres`).
ensure_postgres() {
  if [ -n "${KMS_TEST_DATABASE_URL:-}" ]; then log "using KMS_TEST_DATABASE_URL"; return; fi
  export KMS_TEST_DATABASE_URL="postgresql://postgres@127.0.0.1:5432/postgres"
  if pg_answers 127.0.0.1 5432; then return; fi
  if ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1; then apt_install postgresql; fi
  local ver; ver="$(ls /usr/lib/postgresql | sort -V | tail -n1)"
  if command -v pg_ctlcluster >/dev/null && [ -d "/etc/postgresql/$ver/main" ]; then
    log "starting PostgreSQL $ver cluster main"
    as_root pg_ctlcluster --skip-systemctl-redirect "$ver" main start || true
  fi
  if ! pg_answers 127.0.0.1 5432; then
    # PostgreSQL refuses to run as root: a throwaway cluster owned by `postgres`, trust auth on loopback.
    local dir=/tmp/kms-test-pg
    log "starting a throwaway PostgreSQL $ver in $dir"
    as_root mkdir -p "$dir" && as_root chown postgres "$dir"
    if [ ! -f "$dir/PG_VERSION" ]; then
      as_root su postgres -c "/usr/lib/postgresql/$ver/bin/initdb -D $dir -A trust -U postgres" >/dev/null \
        || die "initdb failed"
    fi
    as_root su postgres -c "/usr/lib/postgresql/$ver/bin/pg_ctl -D $dir -l $dir/server.log -w \
        -o '-p 5432 -c listen_addresses=127.0.0.1 -k /tmp' start" >/dev/null || die "pg_ctl start failed (see $dir/server.log)"
  fi
  for _ in $(seq 1 30); do pg_answers 127.0.0.1 5432 && return; sleep 1; done
  die "PostgreSQL does not answer on 127.0.0.1:5432"
}
