#!/usr/bin/env bash
# `A && pass ... || fail ...` is used as if-then-else on purpose: pass only
# echoes, so fail runs exactly when A is false.
# shellcheck disable=SC2015
# End-to-end test of deploy/install-hub.sh and deploy/install-sidecar.sh in a
# temporary --root, against a real hub on loopback.
#
#   MUSTER_HUB_BIN=target/release/muster-hub \
#   MUSTER_SIDECAR_BIN=target/release/muster-sidecar \
#   tests/deploy/install_twice.sh
#
# Without both variables it prints "SKIPPED: ..." and exits 0 (in CI, CI=true,
# it fails instead, as it does when a tool it needs is missing). KEEP_TMP=1 keeps
# the temporary directory for inspection.
#
# What it checks:
#   hub script   - run twice into a --root: identical tree (paths, types,
#                  modes, owners, sha256 of every file but the redb database),
#                  hub.toml/CA untouched ("already initialised" on the second
#                  run), key files 0600, data dir 0750; --supervisor systemd
#                  installs the unit unchanged, mode 0644.
#   the hub      - `serve` from that data dir on 127.0.0.1:<free UDP port>
#                  answers `token create`.
#   sidecar      - without --token on a fresh root: exit 1 with a message;
#                  with a token, twice (--supervisor none, the same, now used,
#                  token, first from a 0600 --token-file, then on stdin with
#                  --token -, never on a command line):
#                  identical tree, sidecar.toml/sidecar.crt/key
#                  unchanged, output says enrollment was skipped, the hub
#                  lists the agent at most once; key 0600, state dir 0750;
#                  twice more with --supervisor systemd: the unit is
#                  installed (0644, same as systemd/), still no enrollment.
#   uninstall    - removes binary and unit, keeps the state (same
#                  sidecar.toml); reinstall without a token works (already
#                  enrolled); --uninstall --purge leaves no file behind.
#   shutdown     - the hub exits 0 on SIGTERM within 30 s.
# Everything is bounded by `timeout`; the hub is killed on exit (trap).
set -euo pipefail

# Outside CI a test that cannot run says SKIPPED and passes; in CI it fails.
skip() {
    if [[ "${CI:-}" == "true" ]]; then
        echo "FAIL (CI=true, cannot skip): $*"
        exit 1
    fi
    echo "SKIPPED: $*"
    exit 0
}

if [[ -z "${MUSTER_HUB_BIN:-}" || -z "${MUSTER_SIDECAR_BIN:-}" ]]; then
    skip "set MUSTER_HUB_BIN and MUSTER_SIDECAR_BIN to the built binaries (e.g. target/release/muster-hub and target/release/muster-sidecar) to run the install-script test."
fi

HERE=$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")" && pwd -P)
REPO=$(cd -- "$HERE/../.." && pwd -P)
HUB=$(realpath -- "$MUSTER_HUB_BIN")
SIDECAR=$(realpath -- "$MUSTER_SIDECAR_BIN")
INSTALL_HUB="$REPO/deploy/install-hub.sh"
INSTALL_SIDECAR="$REPO/deploy/install-sidecar.sh"
STEP_TIMEOUT=120

for b in "$HUB" "$SIDECAR"; do
    [[ -x "$b" ]] || {
        echo "FAIL: $b is not an executable file"
        exit 1
    }
done

TMP=$(mktemp -d "${TMPDIR:-/tmp}/muster-install-test.XXXXXX")
HUB_PID=""
cleanup() {
    local rc=$?
    if [[ -n "$HUB_PID" ]] && kill -0 "$HUB_PID" 2>/dev/null; then
        kill -TERM "$HUB_PID" 2>/dev/null || true
        for _ in $(seq 50); do
            kill -0 "$HUB_PID" 2>/dev/null || break
            sleep 0.2
        done
        kill -KILL "$HUB_PID" 2>/dev/null || true
        wait "$HUB_PID" 2>/dev/null || true
    fi
    if [[ "${KEEP_TMP:-0}" == 1 || $rc -ne 0 ]]; then
        echo "(kept $TMP)"
    else
        rm -rf -- "$TMP"
    fi
}
trap cleanup EXIT
# The hub must not talk to a supervisor of the caller's.
unset NOTIFY_SOCKET WATCHDOG_USEC WATCHDOG_PID LISTEN_FDS LISTEN_PID

FAILED=0
fail() {
    echo "FAIL: $*"
    FAILED=1
}
pass() { echo "ok: $*"; }
die() {
    echo "FAIL: $*"
    exit 1
}

# step NAME OUTFILE CMD...: runs a bounded command, keeps its output; returns
# its exit status.
step() {
    local name=$1 out=$2
    shift 2
    echo "--- $name"
    local rc=0
    timeout "$STEP_TIMEOUT" "$@" >"$out" 2>&1 || rc=$?
    sed 's/^/    | /' "$out"
    [[ $rc -ne 124 ]] || echo "    (timed out after ${STEP_TIMEOUT}s)"
    return $rc
}

# snapshot DIR: every path with type, mode and owner, then the sha256 of
# every regular file except redb databases (which change on open).
snapshot() {
    (
        cd -- "$1"
        find . -mindepth 1 -printf '%y %m %u:%g %p\n' | LC_ALL=C sort
        find . -type f ! -name '*.redb' -print0 | LC_ALL=C sort -z | xargs -0 -r sha256sum
    )
}

same_tree() { # NAME SNAP_A SNAP_B
    if diff -u "$2" "$3" >"$TMP/diff.txt"; then
        pass "$1: identical tree ($(grep -c . "$2") lines of paths, modes and checksums)"
    else
        fail "$1: trees differ:"
        sed 's/^/    /' "$TMP/diff.txt"
    fi
}

mode_is() { # PATH MODE
    local m
    m=$(stat -c '%a' -- "$1" 2>/dev/null || echo missing)
    if [[ "$m" == "$2" ]]; then
        pass "$1 has mode $2"
    else
        fail "$1 has mode $m, expected $2"
    fi
}

sum() { sha256sum -- "$1" | cut -d' ' -f1; }

free_udp_port() {
    if command -v python3 >/dev/null 2>&1; then
        python3 -c 'import socket
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("127.0.0.1", 0))
print(s.getsockname()[1])'
    else
        echo $((20000 + RANDOM % 40000))
    fi
}

# ============================================================== hub install
HUBROOT="$TMP/hubroot"
HUBDIR="$HUBROOT/var/lib/muster-hub"
PORT=$(free_udp_port)
echo "hub: 127.0.0.1:$PORT (UDP), root $HUBROOT"
hub_args() { # SUPERVISOR
    HUB_ARGS=(--root "$HUBROOT" --supervisor "$1" --binary "$HUB" --listen "127.0.0.1:$PORT" --san 127.0.0.1)
}
hub_args none

step "install-hub.sh (1st run)" "$TMP/hub1.out" "$INSTALL_HUB" "${HUB_ARGS[@]}" ||
    die "install-hub.sh failed on the first run"
[[ -f "$HUBDIR/hub.toml" ]] || die "no $HUBDIR/hub.toml after install-hub.sh"
snapshot "$HUBROOT" >"$TMP/hub1.snap"
toml_sum=$(sum "$HUBDIR/hub.toml")
ca_sum=$(sum "$HUBDIR/ca.crt")

step "install-hub.sh (2nd run)" "$TMP/hub2.out" "$INSTALL_HUB" "${HUB_ARGS[@]}" ||
    die "install-hub.sh failed on the second run"
snapshot "$HUBROOT" >"$TMP/hub2.snap"
same_tree "install-hub.sh twice" "$TMP/hub1.snap" "$TMP/hub2.snap"
[[ "$(sum "$HUBDIR/hub.toml")" == "$toml_sum" ]] && pass "hub.toml not clobbered" || fail "hub.toml changed on the second run"
[[ "$(sum "$HUBDIR/ca.crt")" == "$ca_sum" ]] && pass "CA not re-created" || fail "ca.crt changed on the second run"
grep -q 'already initialised' "$TMP/hub2.out" && pass "second hub run says it kept the data dir" ||
    fail "second install-hub.sh run does not say 'already initialised'"
mode_is "$HUBDIR" 750
for k in ca.key server.key admin.key; do mode_is "$HUBDIR/$k" 600; done
mode_is "$HUBROOT/usr/local/bin/muster-hub" 755
grep -q 'skipping doctor' "$TMP/hub2.out" && pass "doctor skipped with a note under --root" ||
    fail "install-hub.sh under --root does not say it skipped doctor"

hub_args systemd
step "install-hub.sh --supervisor systemd" "$TMP/hub3.out" "$INSTALL_HUB" "${HUB_ARGS[@]}" ||
    die "install-hub.sh --supervisor systemd failed"
if cmp -s "$REPO/systemd/muster-hub.service" "$HUBROOT/etc/systemd/system/muster-hub.service"; then
    pass "hub unit installed unchanged"
    mode_is "$HUBROOT/etc/systemd/system/muster-hub.service" 644
else
    fail "hub unit missing or different in $HUBROOT/etc/systemd/system"
fi
grep -q 'systemctl daemon-reload && systemctl enable --now muster-hub.service' "$TMP/hub3.out" &&
    pass "prints the systemctl commands instead of running them" ||
    fail "install-hub.sh --root --supervisor systemd does not print the systemctl commands"

# ================================================================= the hub
echo "--- starting the hub"
timeout -s TERM 900 "$HUB" serve --data-dir "$HUBDIR" >"$TMP/hub.log" 2>&1 &
HUB_PID=$!
TOKEN=""
for _ in $(seq 60); do
    kill -0 "$HUB_PID" 2>/dev/null || {
        sed 's/^/    hub| /' "$TMP/hub.log"
        die "the hub exited while starting"
    }
    if TOKEN=$(timeout 10 "$HUB" token create --data-dir "$HUBDIR" --role agent --ttl 10m 2>>"$TMP/token.err"); then
        [[ -n "$TOKEN" ]] && break
    fi
    sleep 0.5
done
if [[ -z "$TOKEN" ]]; then
    sed 's/^/    token| /' "$TMP/token.err"
    sed 's/^/    hub| /' "$TMP/hub.log"
    die "no join token from the hub within 30 s"
fi
[[ $(printf '%s\n' "$TOKEN" | wc -l) -eq 1 ]] || fail "token create printed more than the token on stdout"
pass "hub serves; got a join token"

# ============================================================ sidecar install
SROOT="$TMP/sidecarroot"
SDIR="$SROOT/var/lib/muster-sidecar"
NAME=deploy-test-$$
side_args() { # SUPERVISOR
    SIDE_ARGS=(--root "$SROOT" --supervisor "$1" --binary "$SIDECAR" --name "$NAME" --capability rust --capability review)
}
side_args none

# No token, not enrolled: a clear failure, exit 1.
rc=0
step "install-sidecar.sh without --token (must fail)" "$TMP/notoken.out" \
    "$INSTALL_SIDECAR" --root "$TMP/notoken" --supervisor none --binary "$SIDECAR" || rc=$?
if [[ $rc -eq 1 ]] && grep -q -- '--token' "$TMP/notoken.out"; then
    pass "without a token: exit 1 and says to pass --token"
else
    fail "without a token: exit $rc (expected 1 with a message naming --token)"
fi

# The token travels in a 0600 file (1st run) or on stdin (2nd run), never on a command line.
TOKEN_FILE="$TMP/join-token"
(umask 077 && printf '%s\n' "$TOKEN" >"$TOKEN_FILE")
mode_is "$TOKEN_FILE" 600
step "install-sidecar.sh (1st run, --token-file)" "$TMP/side1.out" "$INSTALL_SIDECAR" --token-file "$TOKEN_FILE" "${SIDE_ARGS[@]}" ||
    die "install-sidecar.sh failed on the first run"
[[ -f "$SDIR/sidecar.crt" ]] || die "not enrolled: no $SDIR/sidecar.crt"
if grep -qF -- "$TOKEN" "$TMP/side1.out"; then fail "the join token appears in the script's output"; else pass "the token is not echoed"; fi
snapshot "$SROOT" >"$TMP/side1.snap"
cfg_sum=$(sum "$SDIR/sidecar.toml")
crt_sum=$(sum "$SDIR/sidecar.crt")

step "install-sidecar.sh (2nd run, same token on stdin)" "$TMP/side2.out" "$INSTALL_SIDECAR" --token - "${SIDE_ARGS[@]}" <"$TOKEN_FILE" ||
    die "install-sidecar.sh failed on the second run"
snapshot "$SROOT" >"$TMP/side2.snap"
same_tree "install-sidecar.sh twice" "$TMP/side1.snap" "$TMP/side2.snap"
[[ "$(sum "$SDIR/sidecar.toml")" == "$cfg_sum" ]] && pass "sidecar.toml not clobbered" || fail "sidecar.toml changed on the second run"
[[ "$(sum "$SDIR/sidecar.crt")" == "$crt_sum" ]] && pass "certificate unchanged (no second enrollment)" || fail "sidecar.crt changed: enrolled again"
grep -q 'skipping enrollment' "$TMP/side2.out" && pass "second run says it skipped enrollment" ||
    fail "second install-sidecar.sh run does not say 'skipping enrollment'"
mode_is "$SDIR" 750
mode_is "$SDIR/sidecar.key" 600
mode_is "$SROOT/usr/local/bin/muster-sidecar" 755
grep -q 'skipping doctor' "$TMP/side2.out" && pass "doctor skipped with a note under --root" ||
    fail "install-sidecar.sh under --root does not say it skipped doctor"
grep -q 'would run' "$TMP/side1.out" && pass "records the useradd/chown it would run" ||
    fail "install-sidecar.sh under --root does not record the user creation it skipped"

# The hub's view: the agent is known at most once.
if timeout 20 "$HUB" agents --data-dir "$HUBDIR" --json >"$TMP/agents.json" 2>"$TMP/agents.err"; then
    n=$(python3 - "$TMP/agents.json" "$NAME" <<'EOF'
import json, sys
doc = json.load(open(sys.argv[1]))
agents = doc.get("agents", []) if isinstance(doc, dict) else doc
print(sum(1 for a in agents if isinstance(a, dict) and a.get("name") == sys.argv[2]))
EOF
    ) || n=error
    case "$n" in
    1) pass "the hub lists $NAME once" ;;
    0) echo "note: the hub does not list $NAME (enrolled agents may appear only after their first connection); relying on the certificate and output checks above" ;;
    *) fail "the hub lists $NAME $n times: $(cat "$TMP/agents.json")" ;;
    esac
else
    fail "muster-hub agents --data-dir $HUBDIR --json failed: $(cat "$TMP/agents.err")"
fi

# With the systemd supervisor (not started: --root), twice.
side_args systemd
SYS_ARGS=("${SIDE_ARGS[@]}")
side_args none
step "install-sidecar.sh --supervisor systemd (1st)" "$TMP/side3.out" "$INSTALL_SIDECAR" "${SYS_ARGS[@]}" ||
    die "install-sidecar.sh --supervisor systemd failed"
snapshot "$SROOT" >"$TMP/side3.snap"
step "install-sidecar.sh --supervisor systemd (2nd)" "$TMP/side4.out" "$INSTALL_SIDECAR" "${SYS_ARGS[@]}" ||
    die "install-sidecar.sh --supervisor systemd failed on the second run"
snapshot "$SROOT" >"$TMP/side4.snap"
same_tree "install-sidecar.sh --supervisor systemd twice" "$TMP/side3.snap" "$TMP/side4.snap"
UNIT="$SROOT/etc/systemd/system/muster-sidecar.service"
if cmp -s "$REPO/systemd/muster-sidecar.service" "$UNIT"; then
    pass "sidecar unit installed unchanged"
    mode_is "$UNIT" 644
else
    fail "sidecar unit missing or different: $UNIT"
fi
[[ "$(sum "$SDIR/sidecar.crt")" == "$crt_sum" ]] && pass "still enrolled once" || fail "sidecar.crt changed"

# ================================================================ uninstall
step "install-sidecar.sh --uninstall" "$TMP/un1.out" "$INSTALL_SIDECAR" --uninstall --root "$SROOT" ||
    fail "--uninstall failed"
[[ ! -e "$SROOT/usr/local/bin/muster-sidecar" ]] && pass "--uninstall removed the binary" || fail "--uninstall left the binary"
[[ ! -e "$UNIT" ]] && pass "--uninstall removed the unit" || fail "--uninstall left the unit"
if [[ -f "$SDIR/sidecar.toml" && "$(sum "$SDIR/sidecar.toml")" == "$cfg_sum" && -f "$SDIR/sidecar.key" && -f "$SDIR/sidecar.crt" ]]; then
    pass "--uninstall kept the state directory (config, key, certificate)"
else
    fail "--uninstall did not keep the state directory intact"
fi

step "install-sidecar.sh after --uninstall, no token" "$TMP/re.out" "$INSTALL_SIDECAR" "${SIDE_ARGS[@]}" &&
    grep -q 'skipping enrollment' "$TMP/re.out" &&
    pass "reinstall over kept state needs no token and does not enroll" ||
    fail "reinstall over kept state failed or enrolled again"

step "install-sidecar.sh --uninstall --purge" "$TMP/un2.out" "$INSTALL_SIDECAR" --uninstall --purge --root "$SROOT" ||
    fail "--uninstall --purge failed"
left=$(find "$SROOT" -mindepth 1 2>/dev/null | head -n 20 || true)
if [[ -z "$left" ]]; then
    pass "--uninstall --purge left nothing under the root"
else
    fail "--uninstall --purge left: $left"
fi

# ================================================================= shutdown
echo "--- SIGTERM to the hub"
kill -TERM "$HUB_PID"
rc=""
for _ in $(seq 150); do
    if ! kill -0 "$HUB_PID" 2>/dev/null; then
        rc=0
        wait "$HUB_PID" || rc=$?
        break
    fi
    sleep 0.2
done
if [[ -z "$rc" ]]; then
    fail "the hub did not exit within 30 s of SIGTERM"
elif [[ "$rc" -eq 0 ]]; then
    pass "the hub exited 0 on SIGTERM"
else
    fail "the hub exited $rc on SIGTERM (expected 0)"
    tail -n 20 "$TMP/hub.log" | sed 's/^/    hub| /'
fi
HUB_PID=""

step "install-hub.sh --uninstall --purge" "$TMP/hubun.out" "$INSTALL_HUB" --uninstall --purge --root "$HUBROOT" ||
    fail "install-hub.sh --uninstall --purge failed"
left=$(find "$HUBROOT" -mindepth 1 2>/dev/null | head -n 20 || true)
[[ -z "$left" ]] && pass "hub purge left nothing under the root" || fail "hub purge left: $left"

if [[ $FAILED -ne 0 ]]; then
    echo "install_twice: FAILED"
    exit 1
fi
echo "install_twice: all checks passed"
