#!/usr/bin/env bash
# tests/browser/run.sh: end-to-end test of the WebSocket terminal in a real
# browser. xterm.js in Debian's headless Chromium, driven by playwright-core,
# connects to a connector's /ws, types `echo hi-$((40+2))` + Enter and waits for
# `hi-42` on the terminal screen (the page does `term.write(e.data)`, as a page
# written for the original: text frames), then checks that the resize message reached
# the PTY (`stty size` answers `30 100`) and that UTF-8 output shows whole
# (`été-42`). Screenshot: $AION_BROWSER_DIR/terminal.png.
#
# Usage: tests/browser/run.sh        (about 10 s once installed)
# Env:   AION_BROWSER_DIR=dir        npm cache and output (default target/browser-e2e)
#        AION_BIN=path               the connector to test (default: the newest of the
#                                    musl release, release and debug builds; built if none)
#        XTERM_VERSION, PLAYWRIGHT_VERSION   npm versions (defaults below)
#
# Installs what is missing, idempotently: Debian's chromium (apt-get, needs root)
# and @xterm/xterm + playwright-core (npm, into AION_BROWSER_DIR). No browser is
# downloaded by Playwright. Only 127.0.0.1 is used; every process started here
# is stopped on exit. Exit 0 on success, 1 on a failed check, 2 when what the
# test needs is missing and cannot be installed here (not root, no npm, no
# network): cargo test then reports the test as skipped, with the reason.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)
TARGET_DIR=${CARGO_TARGET_DIR:-$ROOT/target}
OUT=${AION_BROWSER_DIR:-$TARGET_DIR/browser-e2e}
XTERM_VERSION=${XTERM_VERSION:-6.0.0}
PLAYWRIGHT_VERSION=${PLAYWRIGHT_VERSION:-1.65.1}
CHROMIUM=/usr/bin/chromium
PY=${PYTHON:-python3}

log() { printf '[browser-e2e] %s\n' "$*" >&2; }
# What the test needs cannot be had here: exit 2 (the Rust test skips).
setup_fail() { log "SETUP ERROR: $*"; exit 2; }
fail() { log "FAIL: $*"; exit 1; }

TMP=$(mktemp -d "${TMPDIR:-/tmp}/aion-browser.XXXXXX")
PIDS=()

alive() {
    local state
    [[ -r /proc/$1/stat ]] || return 1
    read -r _ _ state _ <"/proc/$1/stat" 2>/dev/null || return 1
    [[ $state != Z ]]
}

cleanup() {
    local pid i
    for pid in "${PIDS[@]}"; do
        alive "$pid" && kill -TERM "$pid" 2>/dev/null
    done
    for pid in "${PIDS[@]}"; do
        for ((i = 0; i < 60; i++)); do
            alive "$pid" || break
            sleep 0.05
        done
        alive "$pid" && kill -KILL "$pid" 2>/dev/null
        wait "$pid" 2>/dev/null || true
    done
    # A Chromium left behind by a killed driver: found by its profile dir, which only this run uses.
    local p cmd
    for p in /proc/[0-9]*; do
        cmd=$(tr '\0' ' ' 2>/dev/null <"$p/cmdline") || continue
        if [[ $cmd == *"--user-data-dir=$TMP/profile"* ]]; then
            kill -KILL "${p#/proc/}" 2>/dev/null || true
        fi
    done
    rm -rf "$TMP"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# ---------------------------------------------------------------- tools
command -v "$PY" >/dev/null || setup_fail "$PY not found"
command -v node >/dev/null || setup_fail "node not found (apt-get install -y nodejs npm)"
command -v npm >/dev/null || setup_fail "npm not found (apt-get install -y npm)"

if [[ ! -x $CHROMIUM ]]; then
    (( EUID == 0 )) || setup_fail "$CHROMIUM is missing and only root can install it (this is uid $EUID):" \
        "as root, apt-get install -y --no-install-recommends chromium"
    log "installing Debian chromium (apt-get)"
    export DEBIAN_FRONTEND=noninteractive
    timeout 600 apt-get update >"$TMP/apt.log" 2>&1 || { tail -n 5 "$TMP/apt.log" >&2; setup_fail "apt-get update failed"; }
    timeout 900 apt-get install -y --no-install-recommends chromium >>"$TMP/apt.log" 2>&1 \
        || { tail -n 10 "$TMP/apt.log" >&2; setup_fail "apt-get install chromium failed"; }
    [[ -x $CHROMIUM ]] || setup_fail "chromium installed but $CHROMIUM is missing"
fi
log "$("$CHROMIUM" --version 2>/dev/null || echo 'chromium: version unknown')"

# npm_has NAME VERSION: NAME@VERSION is in $OUT/node_modules.
npm_has() {
    local pj="$OUT/node_modules/$1/package.json"
    [[ -f $pj ]] && [[ $(node -p "require(process.argv[1]).version" "$pj" 2>/dev/null) == "$2" ]]
}
mkdir -p "$OUT"
if ! npm_has @xterm/xterm "$XTERM_VERSION" || ! npm_has playwright-core "$PLAYWRIGHT_VERSION"; then
    # Offline, npm install retries for many minutes: ask the registry once first.
    npm ping --fetch-retries=0 --fetch-timeout=15000 >/dev/null 2>&1 \
        || setup_fail "the npm registry ($(npm config get registry 2>/dev/null)) cannot be reached (offline?)" \
            "and @xterm/xterm@$XTERM_VERSION + playwright-core@$PLAYWRIGHT_VERSION are not in $OUT"
    log "npm install @xterm/xterm@$XTERM_VERSION playwright-core@$PLAYWRIGHT_VERSION into $OUT"
    [[ -f $OUT/package.json ]] || printf '{"name":"aion-browser-e2e","private":true}\n' >"$OUT/package.json"
    (cd "$OUT" && timeout 600 npm install --no-audit --no-fund --loglevel=error \
        "@xterm/xterm@$XTERM_VERSION" "playwright-core@$PLAYWRIGHT_VERSION") >"$TMP/npm.log" 2>&1 \
        || { tail -n 15 "$TMP/npm.log" >&2; setup_fail "npm install failed"; }
    if ! npm_has @xterm/xterm "$XTERM_VERSION" || ! npm_has playwright-core "$PLAYWRIGHT_VERSION"; then
        setup_fail "npm install did not leave the wanted versions in $OUT/node_modules"
    fi
fi
XTERM_LIB="$OUT/node_modules/@xterm/xterm"
[[ -f $XTERM_LIB/lib/xterm.js && -f $XTERM_LIB/css/xterm.css ]] \
    || setup_fail "$XTERM_LIB has no lib/xterm.js or css/xterm.css"

# ---------------------------------------------------------------- binary
BIN=${AION_BIN:-}
if [[ -z $BIN ]]; then
    for c in "$TARGET_DIR/x86_64-unknown-linux-musl/release/aion-connector" \
        "$TARGET_DIR/release/aion-connector" "$TARGET_DIR/debug/aion-connector"; do
        [[ -x $c ]] || continue
        if [[ -z $BIN || $c -nt $BIN ]]; then BIN=$c; fi
    done
fi
if [[ -z $BIN ]]; then
    log "no built connector: cargo build --release"
    (cd "$ROOT" && timeout 900 cargo build --release) >"$TMP/build.log" 2>&1 \
        || { tail -n 20 "$TMP/build.log" >&2; fail "cargo build --release failed"; }
    BIN="$TARGET_DIR/release/aion-connector"
fi
[[ -x $BIN ]] || fail "$BIN is not executable"
log "connector: $BIN"

# ---------------------------------------------------------------- connector
TOKEN=$(od -An -N32 -tx1 /dev/urandom | tr -d ' \n')
mkdir -p "$TMP/ws" "$TMP/web" "$TMP/profile"
cat >"$TMP/config.json" <<JSON
{"port":0,"host":"127.0.0.1","stateDir":"$TMP/state","projects":{"e2e":{"token":"$TOKEN","dir":"$TMP/ws","agents":{"claude":{"description":"Claude Code"}}}}}
JSON
chmod 600 "$TMP/config.json"

# first_line FILE PID PATTERN: waits (5 s at most) for FILE's first line while PID lives.
first_line() {
    local i line=""
    for ((i = 0; i < 100; i++)); do
        if [[ -s $1 ]]; then
            IFS= read -r line <"$1" || true
            # shellcheck disable=SC2053 # $3 is a glob pattern
            [[ $line == $3 ]] && break
        fi
        alive "$2" || break
        sleep 0.05
    done
    printf '%s' "$line"
}

(cd "$TMP" && SHELL=/bin/sh exec "$BIN" "$TMP/config.json") >"$TMP/connector.out" 2>"$TMP/connector.err" &
SRV_PID=$!
PIDS+=("$SRV_PID")
line=$(first_line "$TMP/connector.out" "$SRV_PID" 'listening on *')
if [[ $line != "listening on 127.0.0.1:"* ]]; then
    tail -n 5 "$TMP/connector.err" >&2 || true
    fail "connector did not print 'listening on 127.0.0.1:PORT' (got '$line')"
fi
WS_PORT=${line##*:}

# ---------------------------------------------------------------- static page
cp "$HERE/index.html" "$TMP/web/index.html"
cp "$XTERM_LIB/lib/xterm.js" "$XTERM_LIB/css/xterm.css" "$TMP/web/"
"$PY" -u -m http.server 0 --bind 127.0.0.1 --directory "$TMP/web" >"$TMP/web.out" 2>"$TMP/web.err" &
WEB_PID=$!
PIDS+=("$WEB_PID")
line=$(first_line "$TMP/web.out" "$WEB_PID" 'Serving HTTP on 127.0.0.1 port *')
[[ $line =~ port\ ([0-9]+) ]] || { cat "$TMP/web.err" >&2; setup_fail "static server did not start (got '$line')"; }
WEB_PORT=${BASH_REMATCH[1]}
log "connector on 127.0.0.1:$WS_PORT, page on 127.0.0.1:$WEB_PORT"

# ---------------------------------------------------------------- browser
rm -f "$OUT/terminal.png"
E2E_MODULES="$OUT/node_modules" E2E_URL="http://127.0.0.1:$WEB_PORT/index.html" E2E_WS_PORT=$WS_PORT \
    AION_TOKEN=$TOKEN E2E_PROFILE="$TMP/profile" E2E_SHOT="$OUT/terminal.png" E2E_CHROMIUM=$CHROMIUM \
    timeout 120 node "$HERE/e2e.js" >"$TMP/e2e.out" 2>"$TMP/e2e.err" &
NODE_PID=$!
PIDS+=("$NODE_PID")
CODE=0
wait "$NODE_PID" || CODE=$?
cat "$TMP/e2e.out" >&2
if (( CODE != 0 )); then
    cat "$TMP/e2e.err" >&2
    log "connector log (last 10 lines):"
    tail -n 10 "$TMP/connector.err" >&2 || true
    [[ -f $OUT/terminal.png ]] && log "screenshot of the failure: $OUT/terminal.png"
    (( CODE == 124 )) && fail "the browser driver timed out (120 s)"
    fail "the browser did not see the shell's answers (driver exit $CODE)"
fi
[[ -s $OUT/terminal.png ]] || fail "no screenshot at $OUT/terminal.png"
alive "$SRV_PID" || fail "the connector died during the test"
if grep -qE '\[(WARN|ERROR)\]' "$TMP/connector.err"; then
    log "connector WARN/ERROR lines:"
    grep -E '\[(WARN|ERROR)\]' "$TMP/connector.err" | head -n 5 >&2
fi
log "PASS: typed 'echo hi-\$((40+2))' in xterm.js, the terminal shows hi-42; stty size after resize: 30 100; UTF-8 été-42"
log "screenshot: $OUT/terminal.png"
