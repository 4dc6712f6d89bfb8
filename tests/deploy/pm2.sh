#!/usr/bin/env bash
# The pm2 ecosystem file (deploy/pm2/ecosystem.config.js) under a real pm2:
#   1. the hub starts and is `online`;
#   2. a daemon killed with SIGKILL is restarted (new pid, restart count up);
#   3. a configuration error (exit 78) is not restarted: the process stays
#      down (pid 0), its restart count stops, and `pm2 ls` shows it as
#      "waiting restart" (pm2's label for an app it will not restart on its
#      own; the ecosystem file's comments say so);
#   4. pm2's log holds one timestamp per line (the daemon's), no colour codes.
# pm2 comes from the npm registry into a temporary prefix, with a private
# PM2_HOME; everything is on loopback and removed at the end.
#
# Usage: MUSTER_HUB_BIN=target/debug/muster-hub tests/deploy/pm2.sh
set -euo pipefail

HERE=$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")" && pwd -P)
REPO=$(cd -- "$HERE/../.." && pwd -P)
HUB_BIN=${MUSTER_HUB_BIN:-$REPO/target/debug/muster-hub}
[[ -x "$HUB_BIN" ]] || { echo "pm2.sh: no muster-hub binary at $HUB_BIN (build it, or set MUSTER_HUB_BIN)" >&2; exit 1; }
command -v npm >/dev/null 2>&1 || { echo "pm2.sh: npm is missing (install Debian's nodejs and npm)" >&2; exit 1; }

WORK=$(mktemp -d -t muster-pm2-XXXXXX)
export PM2_HOME=$WORK/pm2home
PM2=$WORK/npm/node_modules/.bin/pm2
cleanup() {
    [[ -x "$PM2" ]] && timeout 30 "$PM2" kill >/dev/null 2>&1 || true
    rm -rf -- "$WORK"
}
trap cleanup EXIT

say() { printf 'pm2.sh: %s\n' "$*"; }
fail() { printf 'pm2.sh: FAILED: %s\n' "$*" >&2; exit 1; }

say "installing pm2 from npm into $WORK/npm"
timeout 300 npm install --no-audit --no-fund --loglevel=error --prefix "$WORK/npm" pm2@6 >/dev/null \
    || fail "npm install pm2"

# The hub's state, on a free loopback port (UDP).
port=$(python3 -c 'import socket; s=socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
"$HUB_BIN" init --data-dir "$WORK/hub" --listen "127.0.0.1:$port" >/dev/null 2>&1 || fail "muster-hub init"
export MUSTER_HUB_BIN=$HUB_BIN MUSTER_HUB_DIR=$WORK/hub

# name pid status restarts, of the muster-hub app.
state() {
    "$PM2" jlist 2>/dev/null | python3 -c '
import json, sys
for a in json.load(sys.stdin):
    if a["name"] == "muster-hub":
        e = a["pm2_env"]
        print(a["pid"], e["status"].replace(" ", "_"), e["restart_time"])'
}
# Waits up to $1 s until `state` matches the regex $2; prints the last state.
wait_state() {
    local deadline=$((SECONDS + $1)) s=""
    while ((SECONDS < deadline)); do
        s=$(state)
        if [[ "$s" =~ $2 ]]; then
            echo "$s"
            return 0
        fi
        sleep 0.2
    done
    fail "pm2 state '$s' never matched '$2' within $1 s"
}

timeout 60 "$PM2" start "$REPO/deploy/pm2/ecosystem.config.js" --only muster-hub >/dev/null \
    || fail "pm2 start"
read -r pid _ restarts < <(wait_state 30 '^[1-9][0-9]* online ')
say "1. online as pid $pid (restarts $restarts)"

kill -9 "$pid"
read -r pid2 _ restarts2 < <(wait_state 30 "^[1-9][0-9]* online [1-9]")
[[ "$pid2" != "$pid" ]] || fail "the same pid after SIGKILL"
say "2. SIGKILL: restarted as pid $pid2 (restarts $restarts2)"

# A configuration error: an unknown key. The running hub is killed so that
# the next start reads the file and exits 78.
printf '\nbogus_key_for_the_test = 1\n' >>"$WORK/hub/hub.toml"
kill -9 "$pid2"
read -r pid3 status3 restarts3 < <(wait_state 30 '^0 waiting_restart ')
grep -q 'unknown key' "$PM2_HOME/logs/muster-hub-error.log" \
    || fail "the configuration error is not in pm2's log"
# It must stay down: the same restart count and no pid a few seconds later
# (the restart delay is 200 ms, so a restart would have happened by then).
sleep 3
read -r pid4 status4 restarts4 < <(state)
[[ "$pid4" == 0 && "$restarts4" == "$restarts3" ]] \
    || fail "after exit 78 pm2 restarted it: pid $pid4, restarts $restarts3 -> $restarts4"
say "3. exit 78: left down (pid $pid3, '$status3', restarts stay $restarts4)"

# One timestamp per line, the daemon's own, and no colour codes.
line=$(grep -m1 'hub listening' "$PM2_HOME/logs/muster-hub-error.log" || true)
[[ -n "$line" ]] || fail "no 'hub listening' line in pm2's log"
if [[ "$line" == *$'\e'* ]]; then fail "colour codes in pm2's log: $line"; fi
stamps=$(grep -oE '[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9:]{8}' <<<"$line" | wc -l)
((stamps == 1)) || fail "$stamps timestamps on one log line: $line"
say "4. log lines: one timestamp, no colour: $line"
say "all checks passed"
