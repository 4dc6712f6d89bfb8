#!/usr/bin/env bash
# Installs (or removes) the muster sidecar on an agent host. See --help.
set -euo pipefail

PROG=install-sidecar.sh
SCRIPT_DIR=$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")" && pwd -P)
# shellcheck source-path=SCRIPTDIR source=lib/common.sh
. "$SCRIPT_DIR/lib/common.sh"

SERVICE=muster-sidecar
umask 022

usage() {
    cat <<EOF
Usage: $PROG --token-file FILE [options]
       ... | $PROG --token - [options]
       $PROG --uninstall [--purge] [--root DIR] [--supervisor S]

Installs the muster sidecar on this host:
  1. the binary, to ROOT/usr/local/bin/muster-sidecar;
  2. the system user muster-sidecar (home /var/lib/muster-sidecar);
  3. the state directory ROOT/var/lib/muster-sidecar (owner muster-sidecar, 0750);
  4. enrollment with the hub using the one-time join token (skipped when this
     host is already enrolled: a second run never enrolls again and never
     rewrites sidecar.toml or the key);
  5. the supervisor: the systemd unit (enabled and started), or the pm2
     command to run, or nothing;
  6. a final 'muster-sidecar doctor'.
Safe to run again, e.g. to upgrade the binary (running agents survive the
sidecar's restart).

Options:
  --token-file FILE     a file whose first line is the join token from
                        'muster-hub token create' on the hub (keep it 0600);
                        needed only for the first enrollment
  --token -             read the join token from stdin instead
  --token TOKEN         the join token itself; works, but every user can see
                        it in 'ps' while this script runs: prefer the above
                        The token reaches 'muster-sidecar enroll' through a
                        pipe, never on its command line.
  --name NAME           agent name to enroll as (default: the host name)
  --capability C        a capability of this host (repeatable), e.g. rust
  --supervisor S        systemd (default), pm2 or none
  --root DIR            install into DIR instead of / (for testing or image
                        building): no user is created, nothing is started,
                        the commands that would be run are printed
  --binary PATH         the muster-sidecar binary to install (default:
                        target/release/muster-sidecar of this checkout)
  --uninstall           remove the binary and the unit (or pm2 file); the
                        state directory (identity, queue) is kept
  --purge               with --uninstall: also delete the state directory
                        and the user (this host must be enrolled again)
  -h, --help            this text

Exit status: 0 ok, 1 failure, 2 usage error.
EOF
}

TOKEN=""
TOKEN_ARG=""
TOKEN_FILE=""
NAME=""
CAPS=()
SUPERVISOR=systemd
ROOT=/
BINARY=""
UNINSTALL=0
PURGE=0

need_value() { [[ $# -ge 2 && -n "$2" ]] || usage_error "$1 needs a value"; }

while [[ $# -gt 0 ]]; do
    case "$1" in
    --token) need_value "$@"; TOKEN_ARG=$2; shift 2 ;;
    --token=*) TOKEN_ARG=${1#*=}; shift ;;
    --token-file) need_value "$@"; TOKEN_FILE=$2; shift 2 ;;
    --token-file=*) TOKEN_FILE=${1#*=}; shift ;;
    --name) need_value "$@"; NAME=$2; shift 2 ;;
    --name=*) NAME=${1#*=}; shift ;;
    --capability) need_value "$@"; CAPS+=("$2"); shift 2 ;;
    --capability=*) CAPS+=("${1#*=}"); shift ;;
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
[[ -z "$TOKEN_ARG" || -z "$TOKEN_FILE" ]] || usage_error "give the join token once: --token-file FILE or --token -, not both"
if [[ -n "$TOKEN_ARG" && "$TOKEN_ARG" != "-" ]]; then
    warn "--token TOKEN puts the token on this script's command line, where 'ps' shows it; next time use --token-file FILE or --token -"
fi

# read_token: sets TOKEN from --token-file, stdin (--token -) or --token; the
# first line, trimmed. Only called when enrolling, so a second run reads nothing.
read_token() {
    local line=""
    if [[ -n "$TOKEN_FILE" ]]; then
        [[ -r "$TOKEN_FILE" ]] || die "--token-file $TOKEN_FILE: cannot read it"
        IFS= read -r line <"$TOKEN_FILE" || [[ -n "$line" ]] || die "--token-file $TOKEN_FILE: empty"
    elif [[ "$TOKEN_ARG" == "-" ]]; then
        IFS= read -r line || [[ -n "$line" ]] || die "--token -: nothing on stdin"
    else
        line=$TOKEN_ARG
    fi
    # Trim surrounding whitespace (a trailing CR from a file edited elsewhere too).
    line="${line#"${line%%[![:space:]]*}"}"
    line="${line%"${line##*[![:space:]]}"}"
    TOKEN=$line
}

# The binary first (install only), so a missing build fails before anything
# is created.
SRC_BIN=""
if [[ $UNINSTALL -eq 0 ]]; then
    SRC_BIN=$(find_binary "$SERVICE" "$BINARY")
fi
setup_root

BIN_DEST="$R/usr/local/bin/$SERVICE"
STATE="$R/var/lib/$SERVICE"
STATE_LIVE="/var/lib/$SERVICE" # the path inside the installed system
UNIT_SRC="$SCRIPT_DIR/../systemd/$SERVICE.service"
UNIT_DEST="$R/etc/systemd/system/$SERVICE.service"

# ---------------------------------------------------------------- uninstall
uninstall() {
    say "uninstalling $SERVICE from $ROOT"
    if [[ -e "$UNIT_DEST" ]]; then
        if live_root && systemd_running; then
            run systemctl disable --now "$SERVICE.service" ||
                warn "could not stop/disable $SERVICE.service"
            say "note: agent runs started by the sidecar keep running (KillMode=process); stop them with: systemctl kill --kill-who=all $SERVICE.service"
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
        say "if pm2 supervises the sidecar, remove it there (as the user running pm2): pm2 delete $SERVICE && pm2 save"
    fi
    remove_file "$BIN_DEST"
    remove_pm2_ecosystem_if_unused
    if [[ $PURGE -eq 1 ]]; then
        if [[ -d "$STATE" ]]; then
            rm -rf -- "$STATE"
            say "removed $STATE (this host's identity and queue)"
        fi
        remove_user "$SERVICE"
        prune_empty_dirs "$R/usr/local/bin" "$R/etc/systemd/system" "$R/var/lib"
        say "purged; to use this host again, enroll it with a new join token"
    else
        prune_empty_dirs "$R/usr/local/bin" "$R/etc/systemd/system"
        if [[ -d "$STATE" ]]; then
            say "kept $STATE (identity, queue, config); add --purge to delete it"
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

# 3. state directory
mkdir -p -- "$(dirname -- "$STATE")"
if [[ ! -d "$STATE" ]]; then
    mkdir -m 0750 -- "$STATE"
    say "created $STATE"
fi
chmod 0750 -- "$STATE"
if live_root; then
    own "$SERVICE" "$STATE"
else
    would_run chown "$SERVICE:$SERVICE" "$STATE_LIVE"
fi

# 4. enrollment (once)
if [[ -e "$STATE/sidecar.crt" ]]; then
    say "already enrolled ($STATE/sidecar.crt exists): skipping enrollment, keeping sidecar.toml and the key"
    [[ -z "$TOKEN_ARG$TOKEN_FILE" ]] || say "the join token given was not used (it stays valid until it expires)"
else
    [[ -n "$TOKEN_ARG$TOKEN_FILE" ]] || die "this host is not enrolled yet: pass --token-file FILE or --token - (create a token on the hub with 'muster-hub token create')"
    read_token
    [[ -n "$TOKEN" ]] || die "the join token is empty"
    # The token goes through a pipe: never on enroll's command line, where 'ps' would show it.
    args=(enroll --token - --data-dir "$STATE")
    [[ -z "$NAME" ]] || args+=(--name "$NAME")
    for c in ${CAPS[@]+"${CAPS[@]}"}; do
        args+=(--capability "$c")
    done
    printf '+ <token> | %s\n' "$(quote_cmd "$BIN_DEST" "${args[@]}")"
    # printf is a shell builtin, so the token appears in no process's argv.
    if ! printf '%s\n' "$TOKEN" | as_user "$SERVICE" "$BIN_DEST" "${args[@]}"; then
        die "enrollment failed (see the message above). Check that the hub is reachable from here over UDP and that the token is fresh and unused (create a new one with 'muster-hub token create')."
    fi
    [[ -e "$STATE/sidecar.crt" ]] || die "enroll reported success but $STATE/sidecar.crt is missing"
    say "enrolled"
fi
# Key and directory modes, whatever wrote them.
[[ ! -e "$STATE/sidecar.key" ]] || chmod 0600 -- "$STATE/sidecar.key"
chmod 0750 -- "$STATE"
if live_root; then
    # Everything under the state directory belongs to the service user (no -R:
    # only the files enrollment writes, not the agents' work trees).
    for f in "$STATE" "$STATE"/sidecar.* "$STATE"/ca.crt; do
        [[ ! -e "$f" ]] || own "$SERVICE" "$f"
    done
fi

# 5. supervisor
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
            say "restarting to pick up the new version (running agents are not stopped)"
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
        envs="MUSTER_SIDECAR_BIN=$(printf '%q' "$BIN_DEST") MUSTER_SIDECAR_DIR=$(printf '%q' "$STATE") "
    fi
    say "start the sidecar under pm2 (as the user the agents should run as, here $SERVICE):"
    printf '    sudo -u %s -H env %spm2 start %q --only %s && sudo -u %s -H pm2 save\n' \
        "$SERVICE" "$envs" "$eco" "$SERVICE" "$SERVICE"
    printf '    # and once, to start pm2 at boot: pm2 startup systemd -u %s --hp %s\n' "$SERVICE" "$STATE_LIVE"
    ;;
none)
    say "no supervisor: run the sidecar yourself with"
    printf '    %s run --data-dir %q\n' "$(printf '%q' "$BIN_DEST")" "$STATE"
    ;;
esac

# 6. doctor
if ! live_root; then
    say "skipping doctor: --root $ROOT is not the live system and no daemon runs from it."
    say "after starting it there, check it with: muster-sidecar doctor --data-dir $STATE_LIVE"
    exit 0
fi
printf '+ %s\n' "$(quote_cmd "$BIN_DEST" doctor --data-dir "$STATE")"
if as_user "$SERVICE" "$BIN_DEST" doctor --data-dir "$STATE"; then
    say "done: $SERVICE is installed and healthy"
elif [[ $STARTED -eq 1 ]]; then
    die "doctor found problems (above). See 'systemctl status $SERVICE' and 'journalctl -u $SERVICE -e'."
else
    warn "doctor found problems (above); some are expected until the sidecar is started"
fi
