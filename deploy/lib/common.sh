# shellcheck shell=bash
# Helpers shared by deploy/install-hub.sh and deploy/install-sidecar.sh.
# Sourced, not executed. Expects `set -euo pipefail` in the caller and these
# variables set before use: PROG (script name), ROOT (absolute, "/" for the
# live system), R (ROOT without the trailing slash: "" for "/").

# --- messages -----------------------------------------------------------------

say() { printf '%s: %s\n' "$PROG" "$*"; }
warn() { printf '%s: warning: %s\n' "$PROG" "$*" >&2; }
die() {
    printf '%s: error: %s\n' "$PROG" "$*" >&2
    exit 1
}
usage_error() {
    printf '%s: %s\n' "$PROG" "$*" >&2
    printf "Run '%s --help' for the options.\n" "$PROG" >&2
    exit 2
}

# Prints a command the way a shell would read it back.
quote_cmd() {
    local out="" a
    for a in "$@"; do
        out+="${out:+ }$(printf '%q' "$a")"
    done
    printf '%s' "$out"
}

# Runs a command after echoing it.
run() {
    printf '+ %s\n' "$(quote_cmd "$@")"
    "$@"
}

# Records a command that would be run on a live system but is not run here.
would_run() {
    printf '%s: would run (not on --root %s): %s\n' "$PROG" "$ROOT" "$(quote_cmd "$@")"
}

# --- environment ------------------------------------------------------------------

live_root() { [[ "$ROOT" == / ]]; }

# systemd is PID 1 and systemctl exists.
systemd_running() {
    [[ -d /run/systemd/system ]] && command -v systemctl >/dev/null 2>&1
}

# Makes ROOT absolute and canonical and sets R. Creates a non-/ root.
setup_root() {
    [[ "$ROOT" == /* ]] || usage_error "--root must be an absolute path, got '$ROOT'"
    if [[ "$ROOT" != / ]]; then
        mkdir -p -- "$ROOT"
        ROOT=$(cd -- "$ROOT" && pwd -P)
    fi
    if [[ "$ROOT" == / ]]; then
        R=""
        [[ ${EUID:-$(id -u)} -eq 0 ]] ||
            die "installing into the live system needs root: run it with sudo, or try it out with --root DIR"
    else
        R="$ROOT"
    fi
}

# --- files ----------------------------------------------------------------------

# install_file SRC DEST MODE: copies SRC to DEST with MODE when the content
# differs (atomically: a temp file in the same directory, then rename, so a
# running binary is replaced safely). Sets CHANGED=1 when it wrote.
install_file() {
    local src=$1 dest=$2 mode=$3 tmp
    mkdir -p -- "$(dirname -- "$dest")"
    if [[ -f "$dest" ]] && cmp -s -- "$src" "$dest"; then
        chmod "$mode" -- "$dest"
        say "$dest is up to date"
        return 0
    fi
    tmp="$(dirname -- "$dest")/.$(basename -- "$dest").new.$$"
    cp -- "$src" "$tmp"
    chmod "$mode" -- "$tmp"
    mv -f -- "$tmp" "$dest"
    # shellcheck disable=SC2034 # read by the calling script
    CHANGED=1
    say "installed $dest"
}

# remove_file PATH: removes a file we installed, saying so.
remove_file() {
    if [[ -e "$1" || -L "$1" ]]; then
        rm -f -- "$1"
        say "removed $1"
    fi
}

# prune_empty_dirs DIR...: on a non-/ root only, removes DIR and its empty
# parents up to (not including) ROOT, so that a purge leaves no empty skeleton.
prune_empty_dirs() {
    live_root && return 0
    local d
    for d in "$@"; do
        while [[ "$d" == "$ROOT"/* && -d "$d" ]]; do
            rmdir -- "$d" 2>/dev/null || break
            d=$(dirname -- "$d")
        done
    done
}

# --- users -----------------------------------------------------------------------

# ensure_user NAME HOME: a system user and group NAME with HOME and no login.
ensure_user() {
    local name=$1 home=$2 nologin=/usr/sbin/nologin
    [[ -x $nologin ]] || nologin=/sbin/nologin
    [[ -x $nologin ]] || nologin=/bin/false
    if ! live_root; then
        would_run useradd --system --user-group --home-dir "$home" --no-create-home \
            --shell "$nologin" "$name"
        return 0
    fi
    if getent passwd "$name" >/dev/null; then
        say "user $name exists"
        return 0
    fi
    command -v useradd >/dev/null 2>&1 || die "useradd not found: create a system user '$name' (home $home) by hand and run again"
    run useradd --system --user-group --home-dir "$home" --no-create-home --shell "$nologin" "$name"
}

# remove_user NAME (purge only).
remove_user() {
    local name=$1
    if ! live_root; then
        would_run userdel "$name"
        return 0
    fi
    if getent passwd "$name" >/dev/null; then
        run userdel "$name" || warn "could not remove user $name (processes still running as it?)"
    fi
}

# as_user NAME CMD...: on the live system as root, runs CMD as NAME (so files
# it creates belong to the service user, and the daemons' "key owned by me"
# checks hold); otherwise (a --root trial) runs it as the caller.
as_user() {
    local name=$1
    shift
    if live_root && [[ ${EUID:-$(id -u)} -eq 0 ]]; then
        # From / so that a working directory the user cannot enter (/root)
        # does not matter.
        if command -v runuser >/dev/null 2>&1; then
            (cd / && runuser -u "$name" -- "$@")
        else
            (cd / && setpriv --reuid="$name" --regid="$name" --init-groups -- "$@")
        fi
    else
        "$@"
    fi
}

# own NAME PATH...: chown to the service user on the live system; on a --root
# trial the files stay the caller's (the user does not exist there).
own() {
    local name=$1
    shift
    if live_root; then
        chown "$name:$name" -- "$@"
    fi
}

# --- binaries --------------------------------------------------------------------

# find_binary NAME GIVEN: prints the binary to install: GIVEN (--binary) or the
# repository's target/release/NAME. Fails with how to build it.
find_binary() {
    local name=$1 given=$2 repo candidate
    if [[ -n "$given" ]]; then
        [[ -f "$given" && -x "$given" ]] || die "--binary $given is not an executable file"
        printf '%s\n' "$given"
        return 0
    fi
    repo=$(cd -- "$SCRIPT_DIR/.." && pwd -P)
    candidate="$repo/target/release/$name"
    if [[ -f "$candidate" && -x "$candidate" ]]; then
        printf '%s\n' "$candidate"
        return 0
    fi
    die "no $name binary at $candidate. Build it first:
    (cd $repo && cargo build --release -p $name)
or pass the path of a built binary with --binary PATH."
}

# --- pm2 ----------------------------------------------------------------------------

PM2_SHARE_REL=/usr/local/share/muster
PM2_ECOSYSTEM_NAME=ecosystem.config.js

install_pm2_ecosystem() {
    local src="$SCRIPT_DIR/pm2/$PM2_ECOSYSTEM_NAME"
    [[ -f "$src" ]] || die "missing $src (run the script from a muster checkout)"
    install_file "$src" "$R$PM2_SHARE_REL/$PM2_ECOSYSTEM_NAME" 0644
}

# Removes the shared ecosystem file once neither daemon is installed.
remove_pm2_ecosystem_if_unused() {
    if [[ ! -e "$R/usr/local/bin/muster-hub" && ! -e "$R/usr/local/bin/muster-sidecar" ]]; then
        remove_file "$R$PM2_SHARE_REL/$PM2_ECOSYSTEM_NAME"
        prune_empty_dirs "$R$PM2_SHARE_REL"
    fi
}
