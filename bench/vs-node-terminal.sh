#!/usr/bin/env bash
# bench/vs-node-terminal.sh: the terminal figures of issue 12 side by side, our
# binary and the Node original (HeapVoid/aion-connector v0.3.3, dist/cli.js),
# same machine, same clients, interleaved rounds, each server's log to a file:
#   - `cat` of a file over /ws with the Python `websockets` library's clients
#     (sync and asyncio; text frames decoded, as a browser does) and with
#     termbench's fast client,
#     each next to a bare PTY read of the same file in the same round;
#   - keystroke echo round trip (cooked: `cat` in the shell, the tty echoes),
#     with both clients.
# Both servers start their terminals' shell from SHELL=/bin/sh.
#
# Usage: ORIG_CLI=/path/to/dist/cli.js bench/vs-node-terminal.sh   (2-4 minutes)
# Env:   ORIG_CLI=path          the original's dist/cli.js, ws and node-pty beside it;
#                               unset: our column only
#        NODE=node              the Node.js that runs it
#        BENCH_BIN=path         skip the build, measure this binary
#        BENCH_FILE_MB=50       size of the file that is cat'ed (MB)
#        BENCH_ROUNDS=3         rounds, each: ours then Node, every measurement
#        BENCH_KEYS=500         keystrokes per echo measurement
#        WS_PYTHON=path         a python3 with `websockets` (default: PYTHON if it has
#                               it, else a venv made once under ~/.cache/aion-bench)
#        PYTHON=python3
#
# The original is only run from where it is: never copy it into this repository.
# Only 127.0.0.1 is ever contacted. Every server started here is stopped on exit.
set -euo pipefail

# shellcheck source=bench/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
FILE_MB=$(setting BENCH_FILE_MB 50 1 1000)
ROUNDS=$(setting BENCH_ROUNDS 3 1 10)
KEYS=$(setting BENCH_KEYS 500 1 5000)
HELPER="$HERE/termbench.py"
HELPER_TIMEOUT=300
HELPER_STDERR=log
ROW_W=46
bench_init vs-node-terminal

# ---------------------------------------------------------------- 0. tools, the original
need_py
need cat stty sh
find_original

# A python with the `websockets` package: WS_PYTHON, PYTHON, or a venv of our own.
ws_python() {
    local venv=${XDG_CACHE_HOME:-$HOME/.cache}/aion-bench/venv
    if [[ -n ${WS_PYTHON:-} ]]; then
        printf '%s' "$WS_PYTHON"
    elif "$PY" -c 'import websockets.sync.client' 2>/dev/null; then
        printf '%s' "$PY"
    else
        if [[ ! -x $venv/bin/python ]] || ! "$venv/bin/python" -c 'import websockets.sync.client' 2>/dev/null; then
            log "making a venv with the websockets package in $venv"
            "$PY" -m venv "$venv" >&2 && "$venv/bin/pip" install -q 'websockets>=13' >&2 || return 1
        fi
        printf '%s' "$venv/bin/python"
    fi
}
WSPY=$(ws_python) || WSPY=""
if [[ -n $WSPY ]] && "$WSPY" -c 'import websockets.sync.client' 2>/dev/null; then
    WS_VERSION=$("$WSPY" -c 'import websockets; print(websockets.__version__)')
else
    WSPY=""
    note "no python with the websockets package (pip install websockets, or set WS_PYTHON): its rows are left out"
fi

# ---------------------------------------------------------------- 1. build, configs, servers
bench_binary
TOKEN=$(new_token)
export AION_TOKEN=$TOKEN # for the helper only
AGENTS='{"claude":{"description":"Claude Code"}}'
write_config "$TMP/ours.json" "$AGENTS"
log "writing a ${FILE_MB} MB test file"
helper mkfile mkfile "$TMP/big.txt" "$FILE_MB"
[[ $(kv "$TMP/mkfile.kv" file_bytes) == "$((FILE_MB * 1000000))" ]] || die "could not write the test file"

LOAD_START=$(cut -d' ' -f1-3 /proc/loadavg)
KEYS_=(ours)
declare -A ADDR PID
start_connector ours "$TMP/ours.json" SHELL=/bin/sh
ADDR[ours]=$SRV_ADDR
PID[ours]=$SRV_PID
if [[ -n $ORIG ]]; then
    KEYS_+=(node)
    CONFIG_PORT=$(free_port) # the original takes 0 for 7777
    write_config "$TMP/node.json" "$AGENTS"
    unset CONFIG_PORT
    start_server node env "$MARK" SHELL=/bin/sh "$NODE" "$ORIG" "$TMP/node.json"
    ADDR[node]=$SRV_ADDR
    PID[node]=$SRV_PID
fi

# ---------------------------------------------------------------- 2. interleaved rounds
for ((r = 1; r <= ROUNDS; r++)); do
    for k in "${KEYS_[@]}"; do
        log "round $r/$ROUNDS, $k (load average $(cut -d' ' -f1 /proc/loadavg))"
        helper "$k-tp-$r" throughput "${ADDR[$k]}" "${PID[$k]}" "$TMP/big.txt" 1
        helper "$k-echo-$r" echo "${ADDR[$k]}" "$KEYS"
        if [[ -n $WSPY ]]; then
            PY=$WSPY helper "$k-lib-$r" libcat "${ADDR[$k]}" "$TMP/big.txt" 1
            PY=$WSPY helper "$k-aio-$r" aiocat "${ADDR[$k]}" "$TMP/big.txt" 1
            PY=$WSPY helper "$k-libecho-$r" libecho "${ADDR[$k]}" "$KEYS"
        fi
        alive "${PID[$k]}" || die "$k died in round $r: $(tail -n 3 "$TMP/$k.err" | tr '\n' ' ')"
    done
done
LOAD_END=$(cut -d' ' -f1-3 /proc/loadavg)
for k in "${KEYS_[@]}"; do
    stop_server "${PID[$k]}" "$k"
    log_warns "$TMP/$k.err" "$k"
done

# ---------------------------------------------------------------- summary
# all KIND KEY NAME: the values of NAME in every round's $TMP/KEY-KIND-R.kv
all() {
    local r
    for ((r = 1; r <= ROUNDS; r++)); do kv "$TMP/$2-$1-$r.kv" "$3"; echo; done
}
# med KIND KEY NAME: their median (lib.sh, to 3 digits); runs KIND KEY NAME: them, space-separated
med() {
    local -a v
    mapfile -t v < <(all "$@")
    median -f %.3g "${v[@]}"
}
runs() { all "$@" | paste -sd' '; }
table_start "aion-connector vs the Node original: the /ws terminal  ($(date -u +%Y-%m-%dT%H:%M:%SZ), $(nproc) cores, ${VERSION:-version unknown})"
row "Node original" "${ORIG:-$ORIG_SKIP}${ORIG:+ ($NODE $NODE_VERSION)}"
row "websockets client" "${WSPY:+websockets $WS_VERSION ($WSPY)}"
row "load average 1/5/15 min, start / end" "$LOAD_START / $LOAD_END"
for k in "${KEYS_[@]}"; do
    row "$k: cat ${FILE_MB} MB, websockets client" "$(med lib "$k" lib_mbs) MB/s (rounds: $(runs lib "$k" lib_mbs))"
    row "   websockets asyncio client" "$(med aio "$k" aio_mbs) MB/s (rounds: $(runs aio "$k" aio_mbs))"
    row "   fast client (termbench)" "$(med tp "$k" tp_ws_mbs) MB/s (rounds: $(runs tp "$k" tp_ws_mbs)); bare PTY $(med tp "$k" tp_bare_mbs) MB/s; /ws : bare $(med tp "$k" tp_ratio) (rounds: $(runs tp "$k" tp_ratio))"
    row "   server CPU s per cat (fast client)" "$(med tp "$k" tp_ws_server_cpu_s); frames $(med tp "$k" tp_ws_frames)"
    row "   echo p50 / p99, websockets client" "$(med libecho "$k" libecho_p50_ms) / $(med libecho "$k" libecho_p99_ms) ms (p99 rounds: $(runs libecho "$k" libecho_p99_ms))"
    row "   echo p50 / p99, fast client" "$(med echo "$k" echo_tty_p50_ms) / $(med echo "$k" echo_tty_p99_ms) ms (p99 rounds: $(runs echo "$k" echo_tty_p99_ms)); bare PTY p99 $(med echo "$k" echo_bare_tty_p99_ms) ms"
done
if [[ -n $ORIG ]]; then
    row "ours / Node: cat, websockets client" "$(ratio "$(med lib ours lib_mbs)" "$(med lib node lib_mbs)") x the MB/s  (goal >= 1.5)"
    row "ours / Node: cat, websockets asyncio" "$(ratio "$(med aio ours aio_mbs)" "$(med aio node aio_mbs)") x the MB/s  (goal >= 1.5)"
    row "ours / Node: cat, fast client" "$(ratio "$(med tp ours tp_ws_mbs)" "$(med tp node tp_ws_mbs)") x the MB/s"
    row "ours / Node: echo p99, websockets client" "$(ratio "$(med libecho ours libecho_p99_ms)" "$(med libecho node libecho_p99_ms)") x  (goal <= 0.5)"
    row "ours / Node: echo p99, fast client" "$(ratio "$(med echo ours echo_tty_p99_ms)" "$(med echo node echo_tty_p99_ms)") x  (goal <= 0.5)"
fi
table_end
