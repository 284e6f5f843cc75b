#!/usr/bin/env bash
# bench/crash.sh: crash -> restart -> the old instance's processes gone. A
# connector runs one agent turn (bench/fake-acpx streaming a line every 100 ms)
# and one terminal whose shell has a `sleep 600 &` job; it is killed with
# SIGKILL and started again on the same state dir. Measured from the kill: the
# restarted connector listening, no process of the old instance left (found by
# the AION_CONNECTOR mark it gave its children, src/process/instance.rs), and
# the run's closing `error` post at the callback. BENCH_ROUNDS rounds, each
# killing the connector the previous one started. See bench/README.md.
#
# Usage: bench/crash.sh           (about 30 s after the build)
# Env:   BENCH_BIN=path           skip the build, measure this binary
#        BENCH_ROUNDS=5           kill -9 / restart rounds (1-50)
#        PYTHON=python3
#
# Only 127.0.0.1 is ever contacted. Every process started here is stopped on exit.
set -euo pipefail

# shellcheck source=bench/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

ROUNDS=$(setting BENCH_ROUNDS 5 1 50)
bench_init crash
need_py
HELPER="$HERE/crashbench.py"
[[ -x $HERE/fake-acpx ]] || die "$HERE/fake-acpx is not executable"
bench_binary

mkdir -p "$TMP/bin" "$TMP/state"
ln -s "$HERE/fake-acpx" "$TMP/bin/acpx"
TOKEN=$(new_token)
HELPER_ENV=(AION_TOKEN="$TOKEN")
write_config "$TMP/crash.json" '{"pi":{"description":"Pi"}}' '"limits":{"shutdownSeconds":2}'
POSTS="$TMP/posts.txt"
: >"$POSTS"

# the callback, for the whole run
env "${HELPER_ENV[@]}" "$PY" "$HELPER" callback 0 "$POSTS" 1800 >"$TMP/callback.kv" 2>"$TMP/callback.herr" &
CB_PID=$!
PIDS+=("$CB_PID")
wait_for 10 "$CB_PID" grep -q '^port=' "$TMP/callback.kv" || die "the callback server did not start"
CALLBACK="http://127.0.0.1:$(kv "$TMP/callback.kv" port)"

# connector NAME: a connector on the shared state dir $TMP/state.
connector() {
    CONNECTOR_STATE="$TMP/state" start_connector "$1" "$TMP/crash.json" PATH="$TMP/bin:$PATH" \
        AION_BENCH_PY="$PYBIN" AION_TOKEN=
}

# instance_of PID: the AION_CONNECTOR=… line of a process's environment.
instance_of() { tr '\0' '\n' <"/proc/$1/environ" 2>/dev/null | grep -m1 '^AION_CONNECTOR=' || true; }
posted() { grep -q " $1 $2 " "$POSTS"; } # posted PATH SESSION
first_output() { grep -q " /internal/agent-stream $1 " "$POSTS"; }

LISTEN=() GONE=() POSTED=() OLDN=() LEFT=() CLOSING=()
connector r0
for ((r = 1; r <= ROUNDS; r++)); do
    session="crash$r"
    log "round $r/$ROUNDS: a run and a terminal, then kill -9"
    helper "invoke$r" invoke "$SRV_ADDR" "$session" "$CALLBACK"
    [[ $(kv "$TMP/invoke$r.kv" status) == 200 ]] || die "invoke $r: $(cat "$TMP/invoke$r.kv")"
    env "${HELPER_ENV[@]}" "$PY" "$HELPER" terminal "$SRV_ADDR" 600 >"$TMP/term$r.kv" 2>"$TMP/term$r.herr" &
    term=$!
    PIDS+=("$term")
    wait_for 10 "$term" grep -q '^bg=' "$TMP/term$r.kv" || die "terminal $r: $(cat "$TMP/term$r.herr")"
    bg=$(kv "$TMP/term$r.kv" bg)
    wait_for 10 - first_output "$session" || die "round $r: no output post from the agent"
    OLD=$(instance_of "$bg")
    [[ -n $OLD ]] || die "round $r: the terminal's job $bg carries no AION_CONNECTOR"
    mapfile -t old < <(env_pids "$OLD")
    OLDN+=("${#old[@]}")

    env "${HELPER_ENV[@]}" "$PY" "$HELPER" watch "$OLD" "$TMP/r$r.out" 30 >"$TMP/watch$r.kv" 2>"$TMP/watch$r.herr" &
    watch=$!
    PIDS+=("$watch")
    sleep 0.2 # the watcher is polling
    kill -KILL "$SRV_PID"
    t0=$(now_us)
    wait "$SRV_PID" 2>/dev/null || true
    forget "$SRV_PID"
    alive "$bg" || note "round $r: the terminal's job died with the connector"
    connector "r$r"
    wait "$watch" 2>/dev/null || note "round $r: the watcher failed: $(tail -n 2 "$TMP/watch$r.herr")"
    forget "$watch"
    for k in listen gone; do
        ns=$(kv "$TMP/watch$r.kv" "${k}_ns")
        if [[ $ns == - ]]; then
            note "round $r: no $k within 30 s"
        elif [[ $k == listen ]]; then
            LISTEN+=("$(( (ns / 1000 - t0) / 1000 ))")
        else
            GONE+=("$(( (ns / 1000 - t0) / 1000 ))")
        fi
    done
    LEFT+=("$(env_pids "$OLD" | wc -l)")
    if wait_for 30 - posted /internal/agent-error "$session"; then
        ns=$(grep -m1 " /internal/agent-error $session " "$POSTS" | cut -d' ' -f1)
        POSTED+=("$(( (ns / 1000 - t0) / 1000 ))")
    else
        note "round $r: no closing post within 30 s"
    fi
    kill -TERM "$term" 2>/dev/null || true
    wait "$term" 2>/dev/null || true
    forget "$term"
done
stop_server "$SRV_PID" "the last connector" 10
sleep 0.5 # a repeated closing post would have come by now
for ((r = 1; r <= ROUNDS; r++)); do
    CLOSING+=("$(grep -cE " /internal/agent-(error|complete) crash$r " "$POSTS" || true)")
done
log_warns "$TMP/r$ROUNDS.err" "the last connector" 'ended [0-9]+ process\(es\) left running by a previous connector'

table_start "crash -> restart -> old processes gone: $ROUNDS rounds (median / max, ms from the kill -9)"
row "connector" "$VERSION"
row "processes of the old instance at the kill" "$(median -l "${OLDN[@]}") / $(maximum "${OLDN[@]}")"
row "restarted connector listening" "$(median -l "${LISTEN[@]}") / $(maximum "${LISTEN[@]}")"
row "no process of the old instance left" "$(median -l "${GONE[@]}") / $(maximum "${GONE[@]}")"
row "closing error post at the callback" "$(median -l "${POSTED[@]}") / $(maximum "${POSTED[@]}")"
row "old processes left after 30 s (max)" "$(maximum "${LEFT[@]}")"
row "closing posts per run (want 1)" "$(printf '%s ' "${CLOSING[@]}")"
table_end
