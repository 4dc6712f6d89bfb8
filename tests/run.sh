#!/usr/bin/env bash
# The test command (README, "Run the tests"): installs the tools the tests
# need when they are missing, then runs every test of the workspace.
#
#   strace                 tests/tests/durability.rs (flushes seen from outside)
#   prlimit (util-linux)   tests/tests/supervision.rs (a store that fails)
#   systemd-analyze        tests/deploy/verify_units.sh (run by .ci/run)
#   libfaketime            tests/tests/features.rs (a hub clock stepped back)
#   git                    tests/tests/workspaces.rs, sidecar workspace tests, the demo
#   tmux                   tests/tests/workspaces.rs (the tmux wake example)
#   chromium, chromedriver tests/tests/dashboard.rs (the dashboard in a headless browser)
#   postgresql             the store tests on PostgreSQL (hub unit tests, tests/tests/postgres.rs)
#
# A private PostgreSQL cluster is started in a temporary directory on a free
# loopback port for the run (MUSTER_TEST_PG_URL names it; each test creates
# and drops its own database), and stopped and removed on exit.
#
# With CI=true a test whose tool is missing fails instead of printing SKIPPED.
# Extra arguments go to `cargo test` (e.g. `bash tests/run.sh -p muster-tests --test storm`).
set -euo pipefail
cd "$(dirname "$0")/.."

missing=()
command -v strace >/dev/null 2>&1 || missing+=(strace)
command -v prlimit >/dev/null 2>&1 || missing+=(util-linux)
command -v systemd-analyze >/dev/null 2>&1 || missing+=(systemd)
compgen -G "/usr/lib/*/faketime/libfaketime.so.1" >/dev/null || missing+=(faketime)
command -v git >/dev/null 2>&1 || missing+=(git)
command -v tmux >/dev/null 2>&1 || missing+=(tmux)
command -v chromium >/dev/null 2>&1 || missing+=(chromium)
command -v chromedriver >/dev/null 2>&1 || missing+=(chromium-driver)
pg_bin() { compgen -G "/usr/lib/postgresql/*/bin/initdb" | sort -V | tail -1 | xargs -r dirname; }
[ -n "$(pg_bin)" ] || missing+=(postgresql)
if ((${#missing[@]})); then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "tests/run.sh: installing ${missing[*]}" >&2
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null) \
      || echo "tests/run.sh: could not install ${missing[*]}; the tests that need them will fail under CI=true, or say SKIPPED" >&2
  else
    echo "tests/run.sh: missing ${missing[*]} (install them as root with apt-get); the tests that need them will say SKIPPED, or fail under CI=true" >&2
  fi
fi

# The private cluster: initdb refuses to run as root, so as root it runs as
# the postgres user (which the Debian package creates) on a directory it owns.
pg_dir=""
stop_pg() {
  if [ -n "$pg_dir" ]; then
    if [ "$(id -u)" = 0 ]; then
      runuser -u postgres -- "$(pg_bin)/pg_ctl" -D "$pg_dir/data" -m fast -w stop >/dev/null 2>&1 || true
    else
      "$(pg_bin)/pg_ctl" -D "$pg_dir/data" -m fast -w stop >/dev/null 2>&1 || true
    fi
    rm -rf "$pg_dir"
  fi
}
start_pg() {
  local bin port as=()
  bin="$(pg_bin)"
  [ -n "$bin" ] || return 1
  pg_dir="$(mktemp -d /tmp/muster-pg.XXXXXX)"
  mkdir "$pg_dir/data" "$pg_dir/sock"
  if [ "$(id -u)" = 0 ]; then
    id postgres >/dev/null 2>&1 || return 1
    chown -R postgres: "$pg_dir"
    as=(runuser -u postgres --)
  fi
  # A port nothing listens on (a connect to it is refused).
  for _ in 1 2 3 4 5 6 7 8 9 10; do
    port=$((20000 + RANDOM % 20000))
    (: </dev/tcp/127.0.0.1/"$port") 2>/dev/null || break
  done
  "${as[@]}" "$bin/initdb" -D "$pg_dir/data" -U postgres --auth=trust -E UTF8 --locale=C.UTF-8 >"$pg_dir/initdb.log" 2>&1 || return 1
  "${as[@]}" "$bin/pg_ctl" -D "$pg_dir/data" -l "$pg_dir/sock/log" -w -t 60 \
    -o "-p $port -k $pg_dir/sock -c listen_addresses=127.0.0.1 -c max_connections=300" start >/dev/null || return 1
  export MUSTER_TEST_PG_URL="postgres://postgres@127.0.0.1:$port/postgres"
}
trap stop_pg EXIT
if ! start_pg; then
  echo "tests/run.sh: could not start a PostgreSQL cluster (log in ${pg_dir:-nowhere}); the PostgreSQL tests will say SKIPPED, or fail under CI=true" >&2
  unset MUSTER_TEST_PG_URL
fi

status=0
if (($#)); then
  cargo test "$@" || status=$?
else
  cargo test --workspace || status=$?
fi
exit "$status"
