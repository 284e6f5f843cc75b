#!/usr/bin/env bash
# bench/http.sh: the HTTP server's figures with logging on: ping over keep-alive
# (wrk -t2 -c16, bench/ping.lua) with the log going to a file and to a pipe
# read by a slow reader, beside the Node original when ORIG_CLI names it; ping
# while thousands of idle and slowloris connections are held; ping during a
# flood of bad requests, and what the log says of it. See bench/README.md.
#
# Usage: bench/http.sh                 (about 2 min after the build)
# Env:   BENCH_BIN=path                skip the build, measure this binary
#        BENCH_DURATION=10             wrk seconds per run (at most 60)
#        BENCH_ROUNDS=2                ping runs per server, alternating ours / Node
#        BENCH_IDLE_CONNS=2000         idle connections held during the attack
#        BENCH_SLOW_CONNS=300          slowloris connections held during the attack
#        BENCH_ATTACK_SECONDS=20       how long the attack lasts
#        BENCH_FLOOD=50000             bad requests in the flood
#        ORIG_CLI=path                 the Node original's dist/cli.js (node_modules
#                                      beside it); unset: our figures only
#        NODE=node, PYTHON=python3
#
# Only 127.0.0.1 is ever contacted. Every process started here is stopped on exit.
set -euo pipefail

# shellcheck source=bench/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
NODE=${NODE:-node}
HELPER="$HERE/httpbench.py"
DURATION=$(setting BENCH_DURATION 10 1 60)
ROUNDS=$(setting BENCH_ROUNDS 2 1)
IDLE=$(setting BENCH_IDLE_CONNS 2000 1)
SLOW=$(setting BENCH_SLOW_CONNS 300 1)
ATTACK=$(setting BENCH_ATTACK_SECONDS 20 1 120)
FLOOD=$(setting BENCH_FLOOD 50000 1)

bench_init http

need "$PY"
want_wrk || die "wrk could not be installed"
bench_binary
LOAD_START=$(cut -d' ' -f1-3 /proc/loadavg)

TOKEN=$(new_token)
mkdir -p "$TMP/ws"
# config FILE PORT [LIMITS]: one project "bench"; the same file serves the Node
# original. LIMITS, a JSON object, is the config's "limits".
config() {
    cat >"$1" <<EOF
{"port":$2,"host":"127.0.0.1",${3:+\"limits\":$3,}"projects":{"bench":{"token":"$TOKEN","dir":"$TMP/ws","agents":{"claude":{"description":"Claude Code"}}}}}
EOF
    chmod 600 "$1"
}
config "$TMP/aion.json" 0
# The flood's wrong tokens come from 127.0.0.1, as its pings do: with the
# failed-token limit on, the pings too would get 429 after the first 100.
config "$TMP/flood.json" 0 '{"failedTokensExemptLoopback":true}'

# wait_listening NAME: waits up to 10 s for "listening on 127.0.0.1:PORT" anywhere
# in $TMP/NAME.out (the Node original's line too); sets SRV_ADDR.
wait_listening() {
    local i line=""
    for ((i = 0; i < 200; i++)); do
        line=$(grep -m1 -o 'listening on 127\.0\.0\.1:[0-9]*' "$TMP/$1.out" 2>/dev/null || true)
        [[ -n $line ]] && break
        alive "$SRV_PID" || break
        sleep 0.05
    done
    [[ -n $line ]] || { tail -n 5 "$TMP/$1.err" >&2 || true; die "server $1 did not print 'listening on ADDR'"; }
    SRV_ADDR=${line#listening on }
}

# start_ours NAME file|pipe: our server, its log into $TMP/NAME.err directly or
# through a pipe read by the slow reader; sets SRV_PID, SRV_ADDR.
start_ours() { # start_ours NAME file|pipe [CONFIG]
    local name=$1 env=(env XDG_STATE_HOME="$TMP/state-$1" AION_BENCH_MARK="$TMP") cfg=${3:-$TMP/aion.json}
    if [[ $2 == pipe ]]; then
        (cd "$TMP" && exec "${env[@]}" "$BIN" "$cfg" 2> >(exec "$PY" "$HELPER" slowread "$TMP/$name.err")) \
            >"$TMP/$name.out" &
    else
        (cd "$TMP" && exec "${env[@]}" "$BIN" "$cfg") >"$TMP/$name.out" 2>"$TMP/$name.err" &
    fi
    SRV_PID=$!
    PIDS+=("$SRV_PID")
    wait_listening "$name"
}

start_node() {
    local port
    port=$(free_port)
    config "$TMP/node.json" "$port"
    (cd "$TMP" && exec "$NODE" "$ORIG_CLI" "$TMP/node.json") >"$TMP/$1.out" 2>"$TMP/$1.err" &
    SRV_PID=$!
    PIDS+=("$SRV_PID")
    wait_listening "$1"
}

cpu_ticks() { awk '{print $14, $15}' "/proc/$1/stat"; }

# wrk_run NAME: wrk against $SRV_ADDR; $TMP/NAME.kv gets wrk's figures, the
# server's CPU per request (user, system) and its peak RSS.
wrk_run() {
    local name=$1 u0 s0 u1 s1 hz reqs
    read -r u0 s0 < <(cpu_ticks "$SRV_PID")
    AION_TOKEN=$TOKEN timeout $((DURATION + 20)) \
        wrk -t2 -c16 -d"${DURATION}s" --latency -s "$HERE/ping.lua" "http://$SRV_ADDR/" >"$TMP/$name.txt" 2>&1 \
        || note "wrk $name failed: $(tail -n 2 "$TMP/$name.txt" | tr '\n' ' ')"
    read -r u1 s1 < <(cpu_ticks "$SRV_PID")
    "$PY" "$HERE/pushbench.py" wrk "$TMP/$name.txt" >"$TMP/$name.kv"
    hz=$(getconf CLK_TCK)
    reqs=$(kv "$TMP/$name.kv" wrk_requests)
    if [[ $reqs =~ ^[0-9]+$ ]] && (( reqs > 0 )); then
        awk -v u=$((u1 - u0)) -v s=$((s1 - s0)) -v r="$reqs" -v hz="$hz" \
            'BEGIN{printf "cpu_user_us=%.1f\ncpu_sys_us=%.1f\n", u*1e6/hz/r, s*1e6/hz/r}' >>"$TMP/$name.kv"
    fi
    echo "hwm_kb=$(hwm_kb "$SRV_PID")" >>"$TMP/$name.kv"
    [[ $(kv "$TMP/$name.kv" wrk_non2xx) == 0 ]] || note "wrk $name: $(kv "$TMP/$name.kv" wrk_non2xx) non-2xx answers"
}

figures() { # figures NAME -> "N req/s, p50 X ms, p99 Y ms, CPU U+S us/req"
    local f=$TMP/$1.kv
    printf '%s req/s, p50 %s ms, p99 %s ms; CPU %s+%s us/req (user+sys)' "$(kv "$f" wrk_rps)" \
        "$(kv "$f" wrk_p50_ms)" "$(kv "$f" wrk_p99_ms)" "$(kv "$f" cpu_user_us)" "$(kv "$f" cpu_sys_us)"
}

# ---------------------------------------------------------------- 1. ping, log to a file (and Node)
NODE_OK=no
if [[ -n ${ORIG_CLI:-} ]]; then
    if [[ ! -f $ORIG_CLI ]]; then
        note "ORIG_CLI=$ORIG_CLI is not a file: Node skipped"
    elif [[ $(realpath "$ORIG_CLI") == "$ROOT"/* ]]; then
        die "ORIG_CLI is inside this repository: keep the original outside it"
    elif command -v "$NODE" >/dev/null; then
        NODE_OK=yes
    else
        note "$NODE not found: Node skipped"
    fi
fi
for ((r = 1; r <= ROUNDS; r++)); do
    log "round $r: ours, log to a file"
    start_ours "ours$r" file
    wrk_run "ours$r"
    stop "$SRV_PID"
    [[ $STOP_CODE == 0 ]] || note "ours$r: SIGTERM gave exit code $STOP_CODE"
    tail -n 1 "$TMP/ours$r.err" | grep -q '\[INFO\] stopped' || note "ours$r: the log does not end with 'stopped'"
    if [[ $NODE_OK == yes ]]; then
        log "round $r: the Node original"
        start_node "node$r"
        wrk_run "node$r"
        stop "$SRV_PID"
    fi
done

# ---------------------------------------------------------------- 2. ping, log to a slow pipe
log "ours, log to a pipe read at about 200 KB/s"
start_ours pipe pipe
wrk_run pipe
stop "$SRV_PID" 15 # it writes out its queue first, at the reader's pace
sleep 1 # the slow reader writes out what it still holds
"$PY" "$HELPER" loglines "$TMP/pipe.err" >"$TMP/pipe-log.kv"

# ---------------------------------------------------------------- 3. attack: idle + slowloris
log "ours, $IDLE idle + $SLOW slowloris connections for $ATTACK s, pings timed meanwhile"
start_ours attack file
"$PY" "$HELPER" attack "$SRV_ADDR" "$TOKEN" "$SRV_PID" "$IDLE" "$SLOW" "$ATTACK" >"$TMP/attack.kv" 2>"$TMP/attack.herr" &
APID=$!
PIDS+=("$APID")
sleep $(( ATTACK / 4 + 1 ))
DURATION_SAVED=$DURATION
DURATION=$(( ATTACK / 2 ))
wrk_run attack-wrk
DURATION=$DURATION_SAVED
wait "$APID" || note "attack helper failed: $(head -n 3 "$TMP/attack.herr" | tr '\n' ' ')"
stop "$SRV_PID"

# ---------------------------------------------------------------- 4. flood of bad requests
log "ours, $FLOOD bad requests, log to the slow pipe, a ping every 5 ms timed meanwhile"
start_ours flood pipe "$TMP/flood.json"
"$PY" "$HELPER" flood "$SRV_ADDR" "$TOKEN" "$FLOOD" >"$TMP/flood.kv" 2>"$TMP/flood.herr" \
    || note "flood helper failed: $(head -n 3 "$TMP/flood.herr" | tr '\n' ' ')"
[[ $(kv "$TMP/flood.kv" flood_errors) == none ]] || note "flood: $(kv "$TMP/flood.kv" flood_errors)"
stop "$SRV_PID" 15
sleep 1
"$PY" "$HELPER" loglines "$TMP/flood.err" >"$TMP/flood-log.kv"
LOGGED=$(( $(kv "$TMP/flood-log.kv" log_answer_lines) + $(kv "$TMP/flood-log.kv" log_dropped) ))
(( LOGGED >= FLOOD )) || note "flood: $LOGGED answer lines written or counted as dropped, fewer than $FLOOD requests"

# ---------------------------------------------------------------- summary
a=$TMP/attack.kv
f=$TMP/flood.kv
table_start "aion-connector HTTP bench ($(date -u +%Y-%m-%dT%H:%M:%SZ), $(nproc) cores, load average $LOAD_START at the start, $(cut -d' ' -f1-3 /proc/loadavg) at the end)"
row "binary" "$VERSION"
for ((r = 1; r <= ROUNDS; r++)); do
    row "$r. ours, ping, log to a file" "$(figures "ours$r"), RSS peak $(kv "$TMP/ours$r.kv" hwm_kb) kB"
    if [[ $NODE_OK == yes ]]; then
        row "$r. Node original, same run" "$(figures "node$r"), RSS peak $(kv "$TMP/node$r.kv" hwm_kb) kB"
    fi
done
row "ours, ping, log to a slow pipe" "$(figures pipe)"
row "   log lines written / counted as dropped" "$(kv "$TMP/pipe-log.kv" log_answer_lines) / $(kv "$TMP/pipe-log.kv" log_dropped)"
row "attack: $IDLE idle + $SLOW slowloris" "fresh pings p50 $(kv "$a" attack_p50_ms) ms, p99 $(kv "$a" attack_p99_ms) ms, max $(kv "$a" attack_max_ms) ms; $(kv "$a" attack_pings) answered, $(kv "$a" attack_fails) failed"
row "   wrk ping meanwhile" "$(figures attack-wrk)"
row "   server RSS / threads (peak)" "$(kv "$a" attack_rss_peak_kb) kB / $(kv "$a" attack_threads_peak); connections reopened by the attacker: $(kv "$a" attack_reopened)"
row "flood: $FLOOD bad requests" "$(kv "$f" flood_rps) req/s; a ping meanwhile: p50 $(kv "$f" flood_ping_p50_ms) ms, p99 $(kv "$f" flood_ping_p99_ms) ms, max $(kv "$f" flood_ping_max_ms) ms ($(kv "$f" flood_pings) pings)"
row "   log lines written / counted as dropped" "$(kv "$TMP/flood-log.kv" log_answer_lines) / $(kv "$TMP/flood-log.kv" log_dropped)"
table_end
