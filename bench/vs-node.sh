#!/usr/bin/env bash
# bench/vs-node.sh: figure 4 of push.sh (ping over keep-alive, wrk -t2 -c16)
# side by side: our binary and the Node original it replaces (HeapVoid/
# aion-connector, dist/cli.js), same config, same token, same wrk run, each
# server's log going to a file. A third column, the floor, is bench/floor.c
# (built with the system's cc when there is one): a fixed answer from one
# epoll thread, no parsing, no log. What wrk measures against it is this
# machine's share, not a server's. Then each server gets pings at fixed rates
# (bench/rate.c, open loop: a platform's pace, not wrk's saturation), timed
# from when each was due. See bench/README.md.
#
# Usage: ORIG_CLI=/path/to/dist/cli.js bench/vs-node.sh   (about 50 s after the build)
# Env:   ORIG_CLI=path            the original's dist/cli.js, its node_modules (ws,
#                                 node-pty) beside it; unset: our column only
#        NODE=node                the Node.js that runs it
#        BENCH_BIN=path           skip the build, measure this binary
#        BENCH_DURATION=10        wrk seconds per run
#        BENCH_ROUNDS=2           runs per server, alternating ours / Node
#        PYTHON=python3
#        CC=cc                    builds the floor and the fixed-rate client;
#                                 missing: neither is measured
#        BENCH_RATES="2000 10000 20000"  fixed rates (pings/s), each for
#                                 BENCH_RATE_SECONDS=6, 16 connections, ROUNDS times
#
# The original is only run from where it is: never copy it into this repository.
# Only 127.0.0.1 is ever contacted. Every server started here is stopped on exit.
set -euo pipefail

# shellcheck source=bench/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
DURATION=$(setting BENCH_DURATION 10 1 60)
ROUNDS=$(setting BENCH_ROUNDS 2 1 10)
RATE_SECONDS=$(setting BENCH_RATE_SECONDS 6 1 60)
RATES=${BENCH_RATES-2000 10000 20000}
for rate in $RATES; do
    [[ $rate =~ ^[1-9][0-9]{0,5}$ ]] || { echo "BENCH_RATES: $rate is not a rate of 1-999999 pings/s" >&2; exit 2; }
done
HELPER="$HERE/pushbench.py"
bench_init vs-node

# ---------------------------------------------------------------- 0. tools, the original
need_py
want_wrk || die "wrk is missing and could not be installed: apt-get install -y wrk (as root)"
find_original

# ---------------------------------------------------------------- 1. build, configs
bench_binary
TOKEN=$(new_token)
AGENTS='{"claude":{"description":"Claude Code"}}'
write_config "$TMP/ours.json" "$AGENTS"
# The original takes port 0 for its default, 7777: it gets a free port of its own.
if [[ -n $ORIG ]]; then
    CONFIG_PORT=$("$PY" "$HELPER" freeport)
    write_config "$TMP/node.json" "$AGENTS"
    unset CONFIG_PORT
fi

# ---------------------------------------------------------------- 2. servers
LOAD_START=$(cut -d' ' -f1-3 /proc/loadavg)
KEYS=(ours)
start_connector ours "$TMP/ours.json"
declare -A ADDR PID IDLE
ADDR[ours]=$SRV_ADDR
PID[ours]=$SRV_PID
if [[ -n $ORIG ]]; then
    KEYS+=(node)
    # It prints "[aion-connector] listening on HOST:PORT" once it is bound.
    start_server node env "$MARK" "$NODE" "$ORIG" "$TMP/node.json"
    ADDR[node]=$SRV_ADDR
    PID[node]=$SRV_PID
fi
# build NAME: bench/NAME.c to $TMP/NAME; false (and why in BUILD_SKIP) if it cannot be
build() {
    BUILD_SKIP=""
    if ! command -v "${CC:-cc}" >/dev/null; then
        BUILD_SKIP="skipped: no C compiler (${CC:-cc}; set CC)"
    elif ! "${CC:-cc}" -O2 -o "$TMP/$1" "$HERE/$1.c" 2>"$TMP/$1-cc.err"; then
        BUILD_SKIP="skipped: bench/$1.c did not build ($(head -n 1 "$TMP/$1-cc.err"))"
    fi
    [[ -z $BUILD_SKIP ]]
}
FLOOR_SKIP=""
RATE_SKIP=""
build rate || RATE_SKIP=$BUILD_SKIP
[[ -n $RATES ]] || RATE_SKIP="skipped: BENCH_RATES is empty"
[[ -z $RATE_SKIP ]] || note "fixed rates $RATE_SKIP"
if ! build floor; then
    FLOOR_SKIP=$BUILD_SKIP
else
    KEYS+=(floor)
    start_server floor env "$MARK" "$TMP/floor"
    ADDR[floor]=$SRV_ADDR
    PID[floor]=$SRV_PID
fi
[[ -z $FLOOR_SKIP ]] || note "floor $FLOOR_SKIP"
for k in "${KEYS[@]}"; do
    "$PY" "$HELPER" ping "${ADDR[$k]}" "$TOKEN" 1 >"$TMP/$k-ping.kv"
    [[ $(kv "$TMP/$k-ping.kv" ping_statuses) == 200x1 ]] \
        || die "$k: a ping answered $(kv "$TMP/$k-ping.kv" ping_statuses), expected 200x1"
    IDLE[$k]=$(rss_kb "${PID[$k]}")
    log "$k: 1 s of wrk to warm up"
    wrk_ping "$k-warmup" "${ADDR[$k]}" "$TOKEN" 1
done

# ---------------------------------------------------------------- 3. alternating runs
# measure KEY ROUND: one wrk run; a line "rps p50 p99 load1 peak_rss requests" in $TMP/KEY.runs.
measure() {
    local k=$1 r=$2 load f
    load=$(cut -d' ' -f1 /proc/loadavg)
    log "$k, run $r/$ROUNDS: wrk -t2 -c16 -d${DURATION}s --latency (load average $load)"
    wrk_ping "$k-$r" "${ADDR[$k]}" "$TOKEN" "$DURATION" "${PID[$k]}"
    f=$TMP/$k-$r.kv
    alive "${PID[$k]}" || die "$k died during run $r: $(tail -n 3 "$TMP/$k.err" | tr '\n' ' ')"
    printf '%s %s %s %s %s %s\n' "$(kv "$f" wrk_rps)" "$(kv "$f" wrk_p50_ms)" "$(kv "$f" wrk_p99_ms)" \
        "$load" "$LOAD_PEAK" "$(kv "$f" wrk_requests)" >>"$TMP/$k.runs"
}
for ((r = 1; r <= ROUNDS; r++)); do
    for k in "${KEYS[@]}"; do measure "$k" "$r"; done
done

# ---------------------------------------------------------------- 4. fixed rates
# at_rate KEY RATE ROUND: one run of bench/rate.c; a line "achieved p50 p99 p99.9
# load1" in $TMP/KEY-rate-RATE.runs.
at_rate() {
    local k=$1 rate=$2 r=$3 load f=$TMP/$1-rate-$2-$3.kv
    load=$(cut -d' ' -f1 /proc/loadavg)
    log "$k, fixed rate $rate/s, run $r/$ROUNDS: ${RATE_SECONDS}s over 16 connections (load average $load)"
    AION_TOKEN=$TOKEN timeout $((RATE_SECONDS + 20)) "$TMP/rate" "${ADDR[$k]}" "$rate" "$RATE_SECONDS" 16 \
        >"$f" 2>"$TMP/$k-rate.err" || note "$k at $rate/s: not every ping was answered"
    [[ ! -s $TMP/$k-rate.err ]] || note "$k at $rate/s: $(head -n 1 "$TMP/$k-rate.err")"
    alive "${PID[$k]}" || die "$k died at $rate pings/s: $(tail -n 3 "$TMP/$k.err" | tr '\n' ' ')"
    [[ $(kv "$f" rate_non200) == 0 ]] || note "$k at $rate/s: $(kv "$f" rate_non200) answers were not 200"
    printf '%s %s %s %s %s\n' "$(kv "$f" rate_achieved)" "$(kv "$f" rate_p50_ms)" "$(kv "$f" rate_p99_ms)" \
        "$(kv "$f" rate_p999_ms)" "$load" >>"$TMP/$k-rate-$rate.runs"
}
if [[ -z $RATE_SKIP ]]; then
    for ((r = 1; r <= ROUNDS; r++)); do
        for rate in $RATES; do
            for k in "${KEYS[@]}"; do at_rate "$k" "$rate" "$r"; done
        done
    done
fi
LOAD_END=$(cut -d' ' -f1-3 /proc/loadavg)

declare -A STOP_AS
for k in "${KEYS[@]}"; do
    stop_server "${PID[$k]}" "$k"
    STOP_AS[$k]=$STOPPED
    log_warns "$TMP/$k.err" "$k"
done

# ---------------------------------------------------------------- summary
med() { # med KEY COLUMN: median of that column of $TMP/KEY.runs (req/s whole, ms to 3 places; "-": none)
    local values
    mapfile -t values < <(cut -d' ' -f"$2" "$TMP/$1.runs")
    median -f "$([[ $2 == 1 ]] && echo %.0f || echo %.3f)" "${values[@]}"
}
each() { # each KEY: "rps / p99 ms (load)" of every run
    awk '{printf "%s%s / %s ms (load %s)", (NR > 1 ? "; " : ""), $1, $3, $4}' "$TMP/$1.runs"
}
ratios() { # ratios A B: A's median req/s and p99 over B's
    echo "$(ratio "$(med "$1" 1)" "$(med "$2" 1)") x the req/s, $(ratio "$(med "$1" 3)" "$(med "$2" 3)") x the p99"
}
peak() { sort -g "$TMP/$1.runs" -k5 | tail -n 1 | cut -d' ' -f5; }
column() { # column KEY LABEL
    local k=$1 reqs
    reqs=$(( $(awk '{s+=$6} END{print s}' "$TMP/$k.runs") + $(kv "$TMP/$k-warmup.kv" wrk_requests) ))
    row "$2" "$(med "$k" 1) req/s, p50 $(med "$k" 2) ms, p99 $(med "$k" 3) ms (median of $ROUNDS)"
    row "   each run: req/s / p99 (load average)" "$(each "$k")"
    row "   RSS idle / peak under load" "${IDLE[$k]} kB / $(peak "$k") kB ($(mib "$(peak "$k")"))"
    row "   log lines (stdout+stderr) / SIGTERM" "$(cat "$TMP/$k.out" "$TMP/$k.err" | grep -c . || true) for $reqs requests (warm-up included); ${STOP_AS[$k]}"
}
table_start "aion-connector vs the Node original: ping over keep-alive  ($(date -u +%Y-%m-%dT%H:%M:%SZ), $(nproc) cores, ${VERSION:-version unknown})"
row "Node original" "${ORIG:-$ORIG_SKIP}${ORIG:+ ($NODE $NODE_VERSION)}"
row "load average 1/5/15 min, start / end" "$LOAD_START / $LOAD_END"
column ours "ours (wrk -t2 -c16 ${DURATION}s, ping)"
if [[ -n $ORIG ]]; then
    column node "Node original (same wrk run)"
    row "ours / Node original" "$(ratios ours node)"
fi
if [[ -z $FLOOR_SKIP ]]; then
    column floor "floor: bench/floor.c (same wrk run)"
    row "ours / floor" "$(ratios ours floor)"
    if [[ -n $ORIG ]]; then row "Node original / floor" "$(ratios node floor)"; fi
else
    row "floor" "$FLOOR_SKIP"
fi
rule
echo
echo "the same servers at fixed rates: bench/rate.c, 16 connections, ${RATE_SECONDS}s a run, timed from when each ping was due"
rule
if [[ -n $RATE_SKIP ]]; then
    row "fixed rates" "$RATE_SKIP"
fi
for rate in $RATES; do
    [[ -z $RATE_SKIP ]] || break
    for k in "${KEYS[@]}"; do
        row "$rate/s: $k" "p50 $(med "$k-rate-$rate" 2) ms, p99 $(med "$k-rate-$rate" 3) ms, p99.9 $(med "$k-rate-$rate" 4) ms; sent $(med "$k-rate-$rate" 1)/s"
        row "   each run: p99 (load average)" "$(awk '{printf "%s%s ms (load %s)", (NR > 1 ? "; " : ""), $3, $5}' "$TMP/$k-rate-$rate.runs")"
    done
    if [[ -n $ORIG ]]; then
        row "$rate/s: ours / Node original" "$(ratio "$(med "ours-rate-$rate" 3)" "$(med "node-rate-$rate" 3)") x the p99"
    fi
done
table_end
