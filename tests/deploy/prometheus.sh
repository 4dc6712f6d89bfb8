#!/usr/bin/env bash
# Both daemons' /metrics under real Prometheus tools (Debian's `prometheus`
# package): `promtool check metrics` passes on each endpoint, and a real
# Prometheus scrapes both (`up` = 1 for each, `muster_build_info` from each).
# A hub and an enrolled sidecar run from the given binaries in a temporary
# directory, everything on loopback; all of it is removed at the end.
#
# Usage: MUSTER_HUB_BIN=... MUSTER_SIDECAR_BIN=... tests/deploy/prometheus.sh
set -euo pipefail

say() { printf 'prometheus.sh: %s\n' "$*"; }
fail() { printf 'prometheus.sh: FAILED: %s\n' "$*" >&2; exit 1; }
HUB=${MUSTER_HUB_BIN:?set MUSTER_HUB_BIN}
SC=${MUSTER_SIDECAR_BIN:?set MUSTER_SIDECAR_BIN}
for tool in promtool prometheus curl python3; do
    command -v "$tool" >/dev/null 2>&1 || fail "$tool is missing (Debian's prometheus and curl packages; .ci/run installs them)"
done

WORK=$(mktemp -d -t muster-prom-XXXXXX)
PIDS=()
cleanup() {
    for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
    rm -rf -- "$WORK"
}
trap cleanup EXIT

free_port() { # $1: tcp or udp
    python3 -c "import socket,sys; s=socket.socket(socket.AF_INET, socket.SOCK_DGRAM if sys.argv[1]=='udp' else socket.SOCK_STREAM); s.bind(('127.0.0.1', 0)); print(s.getsockname()[1])" "$1"
}
# wait_for SECONDS WHAT CMD...: runs CMD until it succeeds.
wait_for() {
    local deadline=$((SECONDS + $1)) what=$2
    shift 2
    until "$@" >/dev/null 2>&1; do
        ((SECONDS < deadline)) || fail "$what did not happen within the deadline"
        sleep 0.2
    done
}

quic=$(free_port udp)
hub_http=$(free_port tcp)
sc_http=$(free_port tcp)
prom=$(free_port tcp)

"$HUB" init --data-dir "$WORK/hub" --listen "127.0.0.1:$quic" >/dev/null 2>&1 || fail "muster-hub init"
sed -i "s|^http_listen = .*|http_listen = \"127.0.0.1:$hub_http\"|" "$WORK/hub/hub.toml"
"$HUB" serve --data-dir "$WORK/hub" >"$WORK/hub.log" 2>&1 &
PIDS+=($!)
wait_for 30 "the hub answering" "$HUB" stats --data-dir "$WORK/hub"
token=$("$HUB" token create --data-dir "$WORK/hub" 2>/dev/null)
printf '%s\n' "$token" | "$SC" enroll --token - --data-dir "$WORK/sc" --name prom-test >/dev/null 2>&1 \
    || fail "muster-sidecar enroll"
sed -i "s|^http_listen = .*|http_listen = \"127.0.0.1:$sc_http\"|" "$WORK/sc/sidecar.toml"
grep -q "^http_listen = \"127.0.0.1:$sc_http\"" "$WORK/sc/sidecar.toml" || fail "no http_listen key in sidecar.toml"
"$SC" run --data-dir "$WORK/sc" >"$WORK/sc.log" 2>&1 &
PIDS+=($!)
online() { "$HUB" agents --json --data-dir "$WORK/hub" | grep -q '"state":"online"'; }
wait_for 30 "the sidecar coming online" online

for target in "hub 127.0.0.1:$hub_http" "sidecar 127.0.0.1:$sc_http"; do
    set -- $target
    curl -fsS "http://$2/metrics" >"$WORK/$1.metrics" || fail "GET $2/metrics"
    if ! out=$(promtool check metrics <"$WORK/$1.metrics" 2>&1); then
        fail "promtool check metrics on the $1's /metrics: $out"
    fi
    say "promtool check metrics: the $1's /metrics passes"
done

cat >"$WORK/prometheus.yml" <<EOF
global:
  scrape_interval: 1s
scrape_configs:
  - job_name: muster-hub
    static_configs: [{targets: ["127.0.0.1:$hub_http"]}]
  - job_name: muster-sidecar
    static_configs: [{targets: ["127.0.0.1:$sc_http"]}]
EOF
promtool check config "$WORK/prometheus.yml" >/dev/null || fail "promtool check config"
prometheus --config.file="$WORK/prometheus.yml" --storage.tsdb.path="$WORK/tsdb" \
    --web.listen-address="127.0.0.1:$prom" >"$WORK/prometheus.log" 2>&1 &
PIDS+=($!)
query() { curl -fsS "http://127.0.0.1:$prom/api/v1/query" --data-urlencode "query=$1"; }
# Both targets up, and each one's build_info scraped.
both_up() {
    query 'sum(up{job=~"muster-.*"})' | python3 -c 'import json,sys; r=json.load(sys.stdin)["data"]["result"]; sys.exit(0 if r and float(r[0]["value"][1]) == 2 else 1)'
}
wait_for 60 "Prometheus scraping both targets (up = 1 each)" both_up
built() {
    query 'count(muster_build_info) + count(muster_sidecar_build_info)' | python3 -c 'import json,sys; r=json.load(sys.stdin)["data"]["result"]; sys.exit(0 if r and float(r[0]["value"][1]) == 2 else 1)'
}
wait_for 30 "build_info from both targets" built
say "a real Prometheus scrapes both: up = 1 for each, build_info from each"
say "all checks passed"
