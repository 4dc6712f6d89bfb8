#!/usr/bin/env bash
# Installs (or removes) the muster hub. See --help.
set -euo pipefail

PROG=install-hub.sh
SCRIPT_DIR=$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")" && pwd -P)
# shellcheck source-path=SCRIPTDIR source=lib/common.sh
. "$SCRIPT_DIR/lib/common.sh"

SERVICE=muster-hub
umask 022

usage() {
    cat <<EOF
Usage: $PROG [options]
       $PROG --uninstall [--purge] [--root DIR] [--supervisor S]

Installs the muster hub on this host:
  1. the binary, to ROOT/usr/local/bin/muster-hub;
  2. the system user muster-hub (home /var/lib/muster-hub);
  3. the data directory ROOT/var/lib/muster-hub (owner muster-hub, 0750),
     initialised with 'muster-hub init' (CA, server and admin certificates,
     hub.toml, database) only if it does not exist yet: a second run never
     touches the config, the keys or the database;
  4. the supervisor: the systemd unit (enabled and started), or the pm2
     command to run, or nothing;
  5. a final 'muster-hub doctor'.
Safe to run again, e.g. to upgrade the binary.

Options:
  --listen ADDR         QUIC (UDP) listen address for hub.toml, first install
                        only (default 0.0.0.0:7440)
  --san NAME            extra DNS name or IP for the server certificate
                        (repeatable; first install only). Add the name the
                        agent hosts use to reach the hub.
  --advertise HOST:PORT the address join tokens carry, as agent hosts reach
                        the hub (first install only; default: the first
                        --san that is not a loopback name, at the listen port)
  --supervisor S        systemd (default), pm2 or none
  --root DIR            install into DIR instead of / (for testing or image
                        building): no user is created, nothing is started,
                        the commands that would be run are printed
  --binary PATH         the muster-hub binary to install (default:
                        target/release/muster-hub of this checkout)
  --uninstall           remove the binary and the unit (or pm2 file); the
                        data directory (CA, database, config) is kept
  --purge               with --uninstall: also delete the data directory
                        (the CA and every task: all sidecars must re-enroll)
                        and the user
  -h, --help            this text

Exit status: 0 ok, 1 failure, 2 usage error.
EOF
}

LISTEN=""
ADVERTISE=""
SANS=()
SUPERVISOR=systemd
ROOT=/
BINARY=""
UNINSTALL=0
PURGE=0

need_value() { [[ $# -ge 2 && -n "$2" ]] || usage_error "$1 needs a value"; }

while [[ $# -gt 0 ]]; do
    case "$1" in
    --listen) need_value "$@"; LISTEN=$2; shift 2 ;;
    --listen=*) LISTEN=${1#*=}; shift ;;
    --san) need_value "$@"; SANS+=("$2"); shift 2 ;;
    --san=*) SANS+=("${1#*=}"); shift ;;
    --advertise) need_value "$@"; ADVERTISE=$2; shift 2 ;;
    --advertise=*) ADVERTISE=${1#*=}; shift ;;
    --supervisor) need_value "$@"; SUPERVISOR=$2; shift 2 ;;
    --supervisor=*) SUPERVISOR=${1#*=}; shift ;;
    --root) need_value "$@"; ROOT=$2; shift 2 ;;
    --root=*) ROOT=${1#*=}; shift ;;
    --binary) need_value "$@"; BINARY=$2; shift 2 ;;
    --binary=*) BINARY=${1#*=}; shift ;;
    --uninstall) UNINSTALL=1; shift ;;
    --purge) PURGE=1; shift ;;
    -h | --help) usage; exit 0 ;;
    *) usage_error "unknown option '$1'" ;;
    esac
done

case "$SUPERVISOR" in
systemd | pm2 | none) ;;
*) usage_error "--supervisor must be systemd, pm2 or none, got '$SUPERVISOR'" ;;
esac
[[ $PURGE -eq 0 || $UNINSTALL -eq 1 ]] || usage_error "--purge only goes with --uninstall"

# The binary first (install only), so a missing build fails before anything
# is created.
SRC_BIN=""
if [[ $UNINSTALL -eq 0 ]]; then
    SRC_BIN=$(find_binary "$SERVICE" "$BINARY")
fi
setup_root

BIN_DEST="$R/usr/local/bin/$SERVICE"
STATE="$R/var/lib/$SERVICE"
STATE_LIVE="/var/lib/$SERVICE"
UNIT_SRC="$SCRIPT_DIR/../systemd/$SERVICE.service"
UNIT_DEST="$R/etc/systemd/system/$SERVICE.service"
KEYS=(ca.key server.key admin.key)

# ---------------------------------------------------------------- uninstall
uninstall() {
    say "uninstalling $SERVICE from $ROOT"
    if [[ -e "$UNIT_DEST" ]]; then
        if live_root && systemd_running; then
            run systemctl disable --now "$SERVICE.service" ||
                warn "could not stop/disable $SERVICE.service"
        elif live_root; then
            say "systemd is not running: nothing to stop"
        else
            would_run systemctl disable --now "$SERVICE.service"
        fi
        remove_file "$UNIT_DEST"
        if live_root && systemd_running; then
            run systemctl daemon-reload
        fi
    fi
    if [[ -e "$R$PM2_SHARE_REL/$PM2_ECOSYSTEM_NAME" || "$SUPERVISOR" == pm2 ]]; then
        say "if pm2 supervises the hub, remove it there (as the user running pm2): pm2 delete $SERVICE && pm2 save"
    fi
    remove_file "$BIN_DEST"
    remove_pm2_ecosystem_if_unused
    if [[ $PURGE -eq 1 ]]; then
        if [[ -d "$STATE" ]]; then
            rm -rf -- "$STATE"
            say "removed $STATE (the CA, the database and the config)"
        fi
        remove_user "$SERVICE"
        prune_empty_dirs "$R/usr/local/bin" "$R/etc/systemd/system" "$R/var/lib"
        say "purged; every sidecar enrolled with this hub must be enrolled again with a new hub"
    else
        prune_empty_dirs "$R/usr/local/bin" "$R/etc/systemd/system"
        if [[ -d "$STATE" ]]; then
            say "kept $STATE (CA, database, config); add --purge to delete it"
        fi
    fi
}

if [[ $UNINSTALL -eq 1 ]]; then
    uninstall
    exit 0
fi

# ------------------------------------------------------------------ install
say "installing $SERVICE into $ROOT (supervisor: $SUPERVISOR)"

# 1. binary
CHANGED=0
install_file "$SRC_BIN" "$BIN_DEST" 0755
BIN_CHANGED=$CHANGED

# 2. user
ensure_user "$SERVICE" "$STATE_LIVE"

# 3. data directory, initialised once
mkdir -p -- "$(dirname -- "$STATE")"
if [[ -e "$STATE/hub.toml" ]]; then
    say "already initialised ($STATE/hub.toml exists): keeping its config, keys and database"
    if [[ -n "$LISTEN" || -n "$ADVERTISE" || ${#SANS[@]} -gt 0 ]]; then
        warn "--listen/--advertise/--san apply only to a new hub; edit $STATE/hub.toml (listen, advertise) or re-issue the server certificate to change them"
    fi
else
    if [[ -d "$STATE" ]] && [[ -n "$(ls -A -- "$STATE")" ]]; then
        die "$STATE exists but holds no hub.toml; refusing to touch it. Move it away (or run 'muster-hub init --data-dir $STATE --force' yourself) and run this again."
    fi
    [[ -d "$STATE" ]] || mkdir -m 0750 -- "$STATE"
    chmod 0750 -- "$STATE"
    if live_root; then
        own "$SERVICE" "$STATE"
    fi
    args=(init --data-dir "$STATE")
    [[ -z "$LISTEN" ]] || args+=(--listen "$LISTEN")
    [[ -z "$ADVERTISE" ]] || args+=(--advertise "$ADVERTISE")
    for s in ${SANS[@]+"${SANS[@]}"}; do
        args+=(--san "$s")
    done
    printf '+ %s\n' "$(quote_cmd "$BIN_DEST" "${args[@]}")"
    fingerprint=$(as_user "$SERVICE" "$BIN_DEST" "${args[@]}") ||
        die "muster-hub init failed (see the message above)"
    [[ -e "$STATE/hub.toml" ]] || die "init reported success but $STATE/hub.toml is missing"
    say "initialised $STATE; CA fingerprint (SHA-256, pinned by join tokens): $fingerprint"
fi
chmod 0750 -- "$STATE"
for k in "${KEYS[@]}"; do
    [[ ! -e "$STATE/$k" ]] || chmod 0600 -- "$STATE/$k"
done
if live_root; then
    own "$SERVICE" "$STATE"
else
    would_run chown -R "$SERVICE:$SERVICE" "$STATE_LIVE"
fi

# 4. supervisor
STARTED=0
case "$SUPERVISOR" in
systemd)
    [[ -f "$UNIT_SRC" ]] || die "missing $UNIT_SRC (run the script from a muster checkout)"
    CHANGED=0
    install_file "$UNIT_SRC" "$UNIT_DEST" 0644
    UNIT_CHANGED=$CHANGED
    if live_root && systemd_running; then
        was_active=0
        systemctl is-active --quiet "$SERVICE.service" && was_active=1
        run systemctl daemon-reload
        run systemctl enable --now "$SERVICE.service" ||
            die "$SERVICE.service did not start: see 'systemctl status $SERVICE' and 'journalctl -u $SERVICE -e'"
        if [[ $was_active -eq 1 && ($BIN_CHANGED -eq 1 || $UNIT_CHANGED -eq 1) ]]; then
            say "restarting to pick up the new version"
            run systemctl restart "$SERVICE.service" ||
                die "$SERVICE.service did not restart: see 'journalctl -u $SERVICE -e'"
        fi
        STARTED=1
    else
        if live_root; then
            say "systemd is not running on this machine; when it is, run:"
        else
            say "not starting anything under --root $ROOT; on the installed system run:"
        fi
        printf '    systemctl daemon-reload && systemctl enable --now %s.service\n' "$SERVICE"
    fi
    ;;
pm2)
    install_pm2_ecosystem
    eco="$R$PM2_SHARE_REL/$PM2_ECOSYSTEM_NAME"
    envs=""
    if ! live_root; then
        envs="MUSTER_HUB_BIN=$(printf '%q' "$BIN_DEST") MUSTER_HUB_DIR=$(printf '%q' "$STATE") "
    fi
    say "start the hub under pm2 (as $SERVICE):"
    printf '    sudo -u %s -H env %spm2 start %q --only %s && sudo -u %s -H pm2 save\n' \
        "$SERVICE" "$envs" "$eco" "$SERVICE" "$SERVICE"
    printf '    # and once, to start pm2 at boot: pm2 startup systemd -u %s --hp %s\n' "$SERVICE" "$STATE_LIVE"
    ;;
none)
    say "no supervisor: run the hub yourself with"
    printf '    %s serve --data-dir %q\n' "$(printf '%q' "$BIN_DEST")" "$STATE"
    ;;
esac

# 5. doctor
if ! live_root; then
    say "skipping doctor: --root $ROOT is not the live system and no hub runs from it."
    say "after starting it there, check it with: muster-hub doctor --data-dir $STATE_LIVE"
    exit 0
fi
printf '+ %s\n' "$(quote_cmd "$BIN_DEST" doctor --data-dir "$STATE")"
if as_user "$SERVICE" "$BIN_DEST" doctor --data-dir "$STATE"; then
    say "done: $SERVICE is installed and answers"
    say "next: create a join token per agent host with: muster-hub token create --data-dir $STATE"
elif [[ $STARTED -eq 1 ]]; then
    die "doctor found problems (above). See 'systemctl status $SERVICE' and 'journalctl -u $SERVICE -e'."
else
    warn "doctor found problems (above); 'hub' fails until the hub is started"
fi
