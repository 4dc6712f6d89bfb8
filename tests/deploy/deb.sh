#!/usr/bin/env bash
# The Debian packages, installed for real: builds them (deploy/package-deb.sh)
# from the given binaries, `dpkg -i` both, checks what they put where (stripped
# binaries, units pointing at /usr/bin, users, state directories, completions,
# man pages), then runs the hub and a sidecar from the installed binaries as
# their own users on loopback, enrolls the sidecar and sees it online, and
# finally purges both packages and checks that users and state are gone.
#
# Changes the machine (users, /var/lib/muster-*): run it as root on a
# throwaway machine such as CI's, never on a host that runs muster.
#
# Usage: MUSTER_HUB_BIN=... MUSTER_SIDECAR_BIN=... tests/deploy/deb.sh
set -euo pipefail

HERE=$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")" && pwd -P)
REPO=$(cd -- "$HERE/../.." && pwd -P)
say() { printf 'deb.sh: %s\n' "$*"; }
fail() { printf 'deb.sh: FAILED: %s\n' "$*" >&2; exit 1; }

[[ "$(id -u)" == 0 ]] || fail "needs root (it installs packages and creates users)"
if getent passwd muster-hub >/dev/null || [[ -e /var/lib/muster-hub ]]; then
    fail "this machine already has a muster-hub user or /var/lib/muster-hub; refusing to touch it"
fi
HUB_BIN=${MUSTER_HUB_BIN:?set MUSTER_HUB_BIN}
SIDECAR_BIN=${MUSTER_SIDECAR_BIN:?set MUSTER_SIDECAR_BIN}
BINS=$(mktemp -d -t muster-deb-bins-XXXXXX)
OUT=$(mktemp -d -t muster-deb-out-XXXXXX)
HUB_PID="" SC_PID=""
cleanup() {
    [[ -n "$SC_PID" ]] && kill "$SC_PID" 2>/dev/null || true
    [[ -n "$HUB_PID" ]] && kill "$HUB_PID" 2>/dev/null || true
    wait 2>/dev/null || true
    pkill -u muster-sidecar 2>/dev/null || true
    pkill -u muster-hub 2>/dev/null || true
    dpkg --purge muster-sidecar muster-hub >/dev/null 2>&1 || true
    rm -rf -- "$BINS" "$OUT"
}
trap cleanup EXIT
cp "$HUB_BIN" "$BINS/muster-hub"
cp "$SIDECAR_BIN" "$BINS/muster-sidecar"

say "building the packages"
bash "$REPO/deploy/package-deb.sh" --bin-dir "$BINS" --out "$OUT" >/dev/null
hub_deb=$(ls "$OUT"/muster-hub_*.deb)
sc_deb=$(ls "$OUT"/muster-sidecar_*.deb)
say "installing $(basename "$hub_deb") and $(basename "$sc_deb")"
dpkg -i "$hub_deb" "$sc_deb" >/dev/null

for name in muster-hub muster-sidecar; do
    [[ -x /usr/bin/$name ]] || fail "/usr/bin/$name missing"
    if file_out=$(command -v file >/dev/null && file /usr/bin/$name); then
        [[ "$file_out" == *"not stripped"* ]] && fail "/usr/bin/$name is not stripped"
    fi
    readelf -S /usr/bin/$name 2>/dev/null | grep -q '\.symtab' && fail "/usr/bin/$name still has a symbol table"
    grep -q "^ExecStart=/usr/bin/$name " /lib/systemd/system/$name.service || fail "$name.service does not run /usr/bin/$name"
    getent passwd $name >/dev/null || fail "no user $name"
    [[ "$(stat -c '%U %a' /var/lib/$name)" == "$name 750" ]] || fail "/var/lib/$name is not $name's, mode 750"
    [[ -s /usr/share/bash-completion/completions/$name ]] || fail "no bash completion for $name"
    [[ -s /usr/share/zsh/vendor-completions/_$name ]] || fail "no zsh completion for $name"
    [[ -s /usr/share/man/man1/$name.1.gz ]] || fail "no man page for $name"
    say "$name: /usr/bin/$name stripped, unit, user, /var/lib/$name 0750, completions, man pages"
done

# The hub and a sidecar from the installed binaries, as their own users.
port=$(python3 -c 'import socket; s=socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
as() { local u=$1; shift; runuser -u "$u" -- "$@"; }
# A daemon as user $1, exec'd in place (setpriv forks nothing), so $! is its pid.
daemon_as() { local u=$1; shift; exec setpriv --reuid="$u" --regid="$u" --init-groups -- "$@"; }
as muster-hub /usr/bin/muster-hub init --data-dir /var/lib/muster-hub --listen "127.0.0.1:$port" >/dev/null 2>&1 \
    || fail "muster-hub init as muster-hub"
daemon_as muster-hub /usr/bin/muster-hub serve --data-dir /var/lib/muster-hub >/tmp/muster-deb-hub.log 2>&1 &
HUB_PID=$!
deadline=$((SECONDS + 30))
until as muster-hub /usr/bin/muster-hub stats --data-dir /var/lib/muster-hub >/dev/null 2>&1; do
    ((SECONDS < deadline)) || fail "the installed hub did not answer within 30 s: $(tail -5 /tmp/muster-deb-hub.log)"
    sleep 0.2
done
token=$(as muster-hub /usr/bin/muster-hub token create --data-dir /var/lib/muster-hub 2>/dev/null)
printf '%s\n' "$token" | as muster-sidecar /usr/bin/muster-sidecar enroll --token - \
    --data-dir /var/lib/muster-sidecar --name deb-test >/dev/null 2>&1 || fail "enroll as muster-sidecar"
daemon_as muster-sidecar /usr/bin/muster-sidecar run --data-dir /var/lib/muster-sidecar >/tmp/muster-deb-sc.log 2>&1 &
SC_PID=$!
deadline=$((SECONDS + 30))
until as muster-hub /usr/bin/muster-hub agents --json --data-dir /var/lib/muster-hub 2>/dev/null \
    | grep -q '"state":"online"'; do
    ((SECONDS < deadline)) || fail "the sidecar did not come online within 30 s: $(tail -5 /tmp/muster-deb-sc.log)"
    sleep 0.2
done
say "the installed hub runs, and the installed sidecar enrolled and is online"
kill "$SC_PID" "$HUB_PID"
wait "$SC_PID" "$HUB_PID" 2>/dev/null || true
SC_PID="" HUB_PID=""

dpkg --purge muster-sidecar muster-hub >/dev/null
for name in muster-hub muster-sidecar; do
    [[ ! -e /usr/bin/$name ]] || fail "/usr/bin/$name left after purge"
    [[ ! -e /var/lib/$name ]] || fail "/var/lib/$name left after purge"
    getent passwd $name >/dev/null && fail "user $name left after purge"
done
rm -f /tmp/muster-deb-hub.log /tmp/muster-deb-sc.log
say "purged: binaries, state and users are gone"
say "all checks passed"
