#!/usr/bin/env bash
# bench/runs.sh: agent-run figures for aion-connector (callback throughput,
# line latency, memory through a callback outage, run start-up cost).
# See bench/README.md for what each figure means.
#
# Usage: bench/runs.sh            (from anywhere; about 2.5 min after the build)
# Env:   BENCH_BIN=path           skip the build, measure this binary
#        BENCH_LINES=10000        lines of the burst run (figure 1)
#        BENCH_PACED_LINES=1000   lines of the paced run (figure 2)
#        BENCH_PACED_US=1000      microseconds between paced lines
#        BENCH_STARTUP_RUNS=30    invokes per mode for the start-up figure
#        OUTAGE_SECONDS=60        how long the callback is down (figure 3)
#        OUTAGE_RATE=2000         agent lines per second during the outage
#        PYTHON=python3
#
# Only 127.0.0.1 is ever contacted. Every process started here is stopped on exit.
set -euo pipefail

# shellcheck source=bench/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
LINES=$(setting BENCH_LINES 10000 1 1000000)
PACED_LINES=$(setting BENCH_PACED_LINES 1000 1)
PACED_US=$(setting BENCH_PACED_US 1000 1)
STARTUP_RUNS=$(setting BENCH_STARTUP_RUNS 30 1 200)
OUTAGE_SECONDS=$(setting OUTAGE_SECONDS 60 2 600)
OUTAGE_RATE=$(setting OUTAGE_RATE 2000 1 100000)
(( PACED_LINES * PACED_US <= 60000000 )) || usage "the paced run is capped at 60 s"
HELPER="$HERE/runsbench.py"
FAKE="$HERE/fake-acpx"
[[ -x $FAKE ]] || usage "$FAKE is not executable"
# Every fake acpx (and the emitter it execs) inherits $MARK through the connector,
# so that cleanup can find them by their environment, by pid.
bench_init runs

# ---------------------------------------------------------------- 0. tools
need_py # PYBIN, the interpreter itself, runs the fake agent, whose start-up is in figure 1

# ---------------------------------------------------------------- 1. build
bench_binary

# ---------------------------------------------------------------- config, fake acpx
mkdir -p "$TMP/bin"
ln -s "$FAKE" "$TMP/bin/acpx"
TOKEN=$(new_token)
export AION_TOKEN=$TOKEN  # for the helper only; never in argv

# config NAME AGENT_JSON: $TMP/NAME.json with its own stateDir $TMP/NAME-state.
# shutdownSeconds 3, stopGraceSeconds 1: a connector stopped during the outage (Ctrl-C)
# ends its run (the fake ignores `acpx cancel`) and gives up delivering within the 5 s
# that cleanup waits before SIGKILL.
config() {
    write_config "$TMP/$1.json" "{\"pi\":$2}" \
        "\"stateDir\":\"$TMP/$1-state\",\"limits\":{\"shutdownSeconds\":3,\"stopGraceSeconds\":1}"
}

# serve NAME: start_connector with $TMP/NAME.json, the fake acpx first on PATH.
serve() {
    start_connector "$1" "$TMP/$1.json" PATH="$TMP/bin:$PATH" AION_BENCH_STARTS="$TMP/starts.txt" \
        AION_BENCH_PY="$PYBIN" AION_TOKEN=
}

# log_check NAME LABEL [ALLOWED_WARN_REGEX]: WARN/ERROR lines and run outcomes in a server log.
log_check() {
    local f="$TMP/$1.err" runs errors
    log_warns "$f" "$2" "${3:-}"
    runs=$(grep -c '\] run .* ended: ' "$f" || true)
    errors=$(grep -c '\] run .* ended: error' "$f" || true)
    LOG_SUMMARY="$runs runs ended ($errors with an error), $WARNS WARN/ERROR ($WARNS_OK expected)"
    if (( errors > 0 )); then
        note "$2: $errors runs ended with an error, e.g.: $(grep '\] run .* ended: error' "$f" | head -n 1)"
    fi
}

# check_run FILE PREFIX LABEL LINES: the order/completeness checks of one run.
check_run() {
    local f=$1 p=$2 l=$3 n=$4
    expect "$f" "${p}completed" yes "$l"
    expect "$f" "${p}posts" $((n + 1)) "$l"  # N chunks of text, complete
    expect "$f" "${p}missing_lines" 0 "$l"
    expect "$f" "${p}seq_in_order" yes "$l"
    expect "$f" "${p}seq_dups" 0 "$l"
    expect "$f" "${p}line_misorder" 0 "$l"
    expect "$f" "${p}final_last" yes "$l"
    expect "$f" "${p}finals" 1 "$l"
    expect "$f" "${p}final_kind" complete "$l"
    expect "$f" "${p}bad_signatures" 0 "$l"
    expect "$f" "${p}bad_token_echo" 0 "$l"
    expect "$f" "${p}other_paths" 0 "$l"
}
order_summary() { # order_summary FILE PREFIX
    local f=$1 p=$2
    printf 'posts %s, seq 0..%s in order: %s, complete last: %s (%s), lost lines %s, dups %s, bad sig %s, conns %s' \
        "$(kv "$f" "${p}posts")" "$(( $(kv "$f" "${p}posts") - 1 ))" "$(kv "$f" "${p}seq_in_order")" \
        "$(kv "$f" "${p}final_last")" "$(kv "$f" "${p}final_kind")" "$(kv "$f" "${p}missing_lines")" \
        "$(kv "$f" "${p}seq_dups")" "$(kv "$f" "${p}bad_signatures")" "$(kv "$f" "${p}connections")"
}

# ---------------------------------------------------------------- server A: burst, paced, start-up (session)
config a '{"description":"Pi"}'
config b '{"description":"Pi","mode":"exec"}'
config c '{"description":"Pi"}'

log "server A (session mode)"
serve a
A_PID=$SRV_PID
A_ADDR=$SRV_ADDR
sleep 0.2
IDLE_RSS=$(rss_kb "$A_PID")
IDLE_THREADS=$(threads "$A_PID")

log "1. burst: $LINES lines -> local callback"
helper burst burst "$A_ADDR" "$A_PID" "$LINES"
check_run "$TMP/burst.kv" burst_ "burst" "$LINES"

log "2. paced: $PACED_LINES lines, one every $PACED_US us"
helper paced paced "$A_ADDR" "$A_PID" "$PACED_LINES" "$PACED_US"
check_run "$TMP/paced.kv" paced_ "paced" "$PACED_LINES"

log "4a. start-up, session mode, $STARTUP_RUNS invokes"
helper st_session startup "$A_ADDR" "$STARTUP_RUNS" "$TMP/starts.txt" session
expect "$TMP/st_session.kv" startup_failures none "start-up (session)"
A_RSS_END=$(rss_kb "$A_PID")
A_THREADS_END=$(threads "$A_PID")
stop_server "$A_PID" "server A" 15
A_STOP=$STOPPED
log_check a "server A (burst, paced, start-up)"
A_LOG=$LOG_SUMMARY

# ---------------------------------------------------------------- server B: start-up (exec)
log "4b. start-up, exec mode, $STARTUP_RUNS invokes"
serve b
B_PID=$SRV_PID
helper st_exec startup "$SRV_ADDR" "$STARTUP_RUNS" "$TMP/starts.txt" exec
expect "$TMP/st_exec.kv" startup_failures none "start-up (exec)"
stop_server "$B_PID" "server B" 15
log_check b "server B (exec start-up)"
B_LOG=$LOG_SUMMARY

log "reference: the callback server alone, Python keep-alive client, 10000 posts"
helper reference reference 10000

log "4c. baseline: Python Popen -> fake acpx start, $STARTUP_RUNS runs"
helper spawn spawn "$FAKE" "$STARTUP_RUNS" "$TMP/spawn-starts.txt"

# ---------------------------------------------------------------- server C: outage
log "3. callback down for ${OUTAGE_SECONDS}s, agent printing $OUTAGE_RATE lines/s"
serve c
C_PID=$SRV_PID
helper outage outage "$SRV_ADDR" "$C_PID" "$TMP/c-state" "$OUTAGE_SECONDS" "$OUTAGE_RATE"
O="$TMP/outage.kv"
OUT_LINES=$(kv "$O" outage_lines)
if [[ $OUT_LINES =~ ^[0-9]+$ ]]; then
    check_run "$O" outage_ "outage" "$OUT_LINES"
fi
expect "$O" outage_spool_after_files 0 "outage"
O_MIN=$(kv "$O" outage_rss_min_kb)
O_MAX=$(kv "$O" outage_rss_max_kb)
O_H1=$(kv "$O" outage_rss_max_first_half_kb)
O_H2=$(kv "$O" outage_rss_max_second_half_kb)
if [[ $O_H1 =~ ^[0-9]+$ && $O_H2 =~ ^[0-9]+$ ]] && (( O_H2 > O_H1 + 1024 )); then
    note "outage: RSS grew from max $O_H1 kB (first half) to $O_H2 kB (second half)"
fi
stop_server "$C_PID" "server C" 15
C_STOP=$STOPPED
log_check c "server C (outage)" 'outbox: .*(Connection refused|connect|retrying)'
C_LOG=$LOG_SUMMARY

left=$(marked | wc -l)
(( left == 0 )) || note "$left fake acpx / emitter processes still alive after the runs"

# ---------------------------------------------------------------- table
B="$TMP/burst.kv"
P="$TMP/paced.kv"
S="$TMP/st_session.kv"
E="$TMP/st_exec.kv"
W="$TMP/spawn.kv"
table_start "aion-connector agent-run bench ($VERSION, $(uname -m), $(nproc) cores)"
row "idle RSS (server A, before any run)" "$IDLE_RSS kB ($(mib "$IDLE_RSS")), $IDLE_THREADS threads"
row "1. burst: $LINES lines -> callback" "total $(kv "$B" burst_total_s) s invoke -> complete received, $(kv "$B" burst_posts_per_s) posts/s"
row "   first post / agent print time" "first post $(kv "$B" burst_first_post_ms) ms after invoke; agent printed all lines in $(kv "$B" burst_agent_print_ms) ms; delivery $(kv "$B" burst_delivery_posts_per_s) posts/s"
row "   order" "$(order_summary "$B" burst_)"
row "   connector CPU (user+sys)" "$(kv "$B" burst_cpu_ms) ms for $(kv "$B" burst_posts) posts ($(awk -v c="$(kv "$B" burst_cpu_ms)" -v n="$(kv "$B" burst_posts)" 'BEGIN{ if (n > 0 && c ~ /^[0-9]+$/) printf "%.0f us/post", c * 1000 / n; else printf "-" }'))"
row "   reference: callback server alone" "$(kv "$TMP/reference.kv" ref_posts_per_s) posts/s (Python keep-alive client, one in flight, $(kv "$TMP/reference.kv" ref_errors) errors)"
row "   RSS (20 ms samples)" "before $(kv "$B" burst_rss_before_kb) kB, peak $(kv "$B" burst_rss_peak_kb) kB ($(mib "$(kv "$B" burst_rss_peak_kb)")), VmHWM $(kv "$B" burst_hwm_kb) kB, after $(kv "$B" burst_rss_after_kb) kB, $(kv "$B" burst_threads_peak) threads peak"
row "2. latency line printed -> POST received" ""
row "   burst ($LINES lines, queueing)" "p50 $(kv "$B" burst_lat_p50_ms) ms, p99 $(kv "$B" burst_lat_p99_ms) ms, max $(kv "$B" burst_lat_max_ms) ms"
row "   paced ($PACED_LINES lines, 1 per $PACED_US us)" "p50 $(kv "$P" paced_lat_p50_ms) ms, p99 $(kv "$P" paced_lat_p99_ms) ms, max $(kv "$P" paced_lat_max_ms) ms, min $(kv "$P" paced_lat_min_ms) ms"
row "   paced order" "$(order_summary "$P" paced_)"
row "3. callback down ${OUTAGE_SECONDS} s, $OUTAGE_RATE lines/s" "$(kv "$O" outage_lines) lines; RSS (0.5 s samples, $(kv "$O" outage_rss_samples)) min $O_MIN kB, max $O_MAX kB ($(mib "$O_MAX")); first half max $O_H1, second half max $O_H2 kB"
row "   spool under stateDir/outbox" "$(kv "$O" outage_spool_bytes) bytes ($(mb "$(kv "$O" outage_spool_bytes)")) at the end of the outage, files: $(kv "$O" outage_spool_files); VmHWM $(kv "$O" outage_hwm_kb) kB, $(kv "$O" outage_threads_max) threads max"
row "   callback back up" "first post $(kv "$O" outage_first_post_after_up_s) s after, complete $(kv "$O" outage_final_after_up_s) s after; drain $(kv "$O" outage_drain_s) s at $(kv "$O" outage_drain_posts_per_s) posts/s, CPU $(kv "$O" outage_drain_cpu_ms) ms, RSS max $(kv "$O" outage_drain_rss_max_kb) kB"
row "   order after the outage" "$(order_summary "$O" outage_)"
row "   spool after the drain" "$(kv "$O" outage_spool_after_files) files, $(kv "$O" outage_spool_after_bytes) bytes; RSS after $(kv "$O" outage_rss_after_kb) kB"
row "4. invoke -> acpx main exec start" "($STARTUP_RUNS runs each; median / p90 / max ms)"
row "   session mode (ensure first)" "$(kv "$S" startup_main_median_ms) / $(kv "$S" startup_main_p90_ms) / $(kv "$S" startup_main_max_ms)"
row "     invoke -> ensure exec start" "$(kv "$S" startup_ensure_median_ms) / $(kv "$S" startup_ensure_p90_ms) / $(kv "$S" startup_ensure_max_ms)"
row "     ensure start -> main start" "$(kv "$S" startup_ensure_to_main_median_ms) / $(kv "$S" startup_ensure_to_main_p90_ms) / $(kv "$S" startup_ensure_to_main_max_ms)"
row "   exec mode (no ensure)" "$(kv "$E" startup_main_median_ms) / $(kv "$E" startup_main_p90_ms) / $(kv "$E" startup_main_max_ms)"
row "   invoke answer (session / exec)" "$(kv "$S" startup_answer_median_ms) / $(kv "$E" startup_answer_median_ms) ms median"
row "   invoke -> complete received (s / e)" "$(kv "$S" startup_complete_median_ms) / $(kv "$E" startup_complete_median_ms) ms median"
row "   baseline: Python Popen -> fake start" "$(kv "$W" spawn_main_median_ms) / $(kv "$W" spawn_main_p90_ms) / $(kv "$W" spawn_main_max_ms)"
row "   failures (session / exec)" "$(kv "$S" startup_failures) / $(kv "$E" startup_failures)"
row "server logs A / B / C" "$A_LOG / $B_LOG / $C_LOG"
row "shutdown A / C" "$A_STOP / $C_STOP; RSS at the end of A: $A_RSS_END kB, $A_THREADS_END threads"
table_end
