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
if ((${#missing[@]})); then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "tests/run.sh: installing ${missing[*]}" >&2
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null) \
      || echo "tests/run.sh: could not install ${missing[*]}; the tests that need them will fail under CI=true, or say SKIPPED" >&2
  else
    echo "tests/run.sh: missing ${missing[*]} (install them as root with apt-get); the tests that need them will say SKIPPED, or fail under CI=true" >&2
  fi
fi

if (($#)); then
  exec cargo test "$@"
fi
exec cargo test --workspace
