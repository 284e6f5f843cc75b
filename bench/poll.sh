#!/usr/bin/env bash
# bench/poll.sh: poll-mode figures for aion-connector (idle CPU, instruction ->
# session delay, output throughput, memory with busy sessions).
# See bench/README.md for what each figure means.
#
# Usage: bench/poll.sh            (from anywhere; about 1.5-2 min after the build)
# Env:   BENCH_BIN=path           skip the build, measure this binary
#        BENCH_IDLE_SECONDS=60    idle measurement window (figure a)
#        BENCH_IDLE_POLL_MS=5000  pollInterval while idle
#        BENCH_DELAY_RUNS=20      instructions timed (figure b)
#        BENCH_DELAY_POLL_MS=500  pollInterval for figure b
#        BENCH_THROUGHPUT_MB=50   output of the throughput session (figure c)
#        BENCH_BUSY_SESSIONS=5    busy sessions (figure d)
#        BENCH_BUSY_SECONDS=10    how long each busy session prints
#        BENCH_BUSY_KBPS=1000     kB/s each busy session prints
#        PYTHON=python3
#
# Only 127.0.0.1 is ever contacted. Every process started here is stopped on exit.
set -euo pipefail

# shellcheck source=bench/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
IDLE_SECONDS=$(setting BENCH_IDLE_SECONDS 60 1 600)
IDLE_POLL_MS=$(setting BENCH_IDLE_POLL_MS 5000 10)
DELAY_RUNS=$(setting BENCH_DELAY_RUNS 20 1 200)
DELAY_POLL_MS=$(setting BENCH_DELAY_POLL_MS 500 10 10000)
THROUGHPUT_MB=$(setting BENCH_THROUGHPUT_MB 50 1 500)
BUSY_SESSIONS=$(setting BENCH_BUSY_SESSIONS 5 1 50)
BUSY_SECONDS=$(setting BENCH_BUSY_SECONDS 10 1 120)
BUSY_KBPS=$(setting BENCH_BUSY_KBPS 1000 1 20000)
HELPER="$HERE/pollbench.py"
bench_init poll
# The helper starts the agents; they and every session they start inherit $MARK,
# and cleanup finds them by it.
mkdir -p "$TMP/idle" "$TMP/delay" "$TMP/throughput" "$TMP/busy"

# common_checks FILE PREFIX LABEL LOG: exit code, log, signatures of one agent run.
common_checks() {
    expect "$1" "$2_exit" 0 "$3: agent exit code after SIGTERM"
    expect "$1" "$2_bad_requests" 0 "$3: badly authorized or signed requests"
    expect "$1" "$2_token_in_log" 0 "$3: the token appears in the agent's log"
    expect "$1" "$2_errors_posted" 0 "$3: errors posted to /api/agent/errors"
    local w
    w=$(kv "$1" "$2_warn_lines")
    if [[ $w != 0 ]]; then
        note "$3: $w WARN/ERROR log lines, e.g.: $(grep -hE '\[(WARN|ERROR)\]' "$4" 2>/dev/null | head -n 1)"
    fi
}

# ---------------------------------------------------------------- 0. tools
need_py
TOKEN=$(new_token)
HELPER_ENV=("$MARK" "AION_TOKEN=$TOKEN")

# ---------------------------------------------------------------- 1. build
bench_binary

# ---------------------------------------------------------------- a. idle CPU
log "a. idle agent, pollInterval $IDLE_POLL_MS ms, for $IDLE_SECONDS s"
helper idle idle "$BIN" "$TMP/idle" "$IDLE_SECONDS" "$IDLE_POLL_MS"
A=$TMP/idle.kv
common_checks "$A" idle "a. idle" "$TMP/idle/idle.err"
IDLE_H=$(kv "$A" idle_cpu_per_hour_s)
SCHED_H=$(kv "$A" idle_sched_per_hour_s)
if [[ $SCHED_H =~ ^[0-9.]+$ ]] && awk -v h="$SCHED_H" 'BEGIN{exit !(h >= 1)}'; then
    note "a. idle: $SCHED_H s CPU per hour (schedstat), aim < 1 s"
fi
if [[ $IDLE_H =~ ^[0-9.]+$ ]] && awk -v h="$IDLE_H" 'BEGIN{exit !(h >= 1)}'; then
    note "a. idle: $IDLE_H s CPU per hour (utime+stime ticks), aim < 1 s"
fi

# ---------------------------------------------------------------- b. delay
log "b. $DELAY_RUNS instructions, pollInterval $DELAY_POLL_MS ms: available -> session running"
helper delay delay "$BIN" "$TMP/delay" "$DELAY_RUNS" "$DELAY_POLL_MS"
D=$TMP/delay.kv
common_checks "$D" delay "b. delay" "$TMP/delay/delay.err"
expect "$D" delay_lost 0 "b. delay: instructions whose session never ran"
OVER=$(kv "$D" delay_over_limit)
[[ $OVER == 0 ]] || note "b. delay: $OVER of $(kv "$D" delay_runs) above pollInterval + 50 ms = $((DELAY_POLL_MS + 50)) ms (max $(kv "$D" delay_max_ms) ms; the poll pause alone may be up to 1.1 x pollInterval)"

# ---------------------------------------------------------------- c. throughput
log "c. one session printing $THROUGHPUT_MB MB of base64"
helper throughput throughput "$BIN" "$TMP/throughput" "$THROUGHPUT_MB"
T=$TMP/throughput.kv
common_checks "$T" tp "c. throughput" "$TMP/throughput/throughput.err"
expect "$T" tp_completed 1 "c. throughput: session end"
expect "$T" tp_sha_ok 1 "c. throughput: delivered stdout identical to what was printed"
expect "$T" tp_seq_gaps 0 "c. throughput"
expect "$T" tp_seq_repeats 0 "c. throughput"
expect "$T" tp_events "started,exited" "c. throughput"

# ---------------------------------------------------------------- d. busy sessions
log "d. $BUSY_SESSIONS sessions printing $BUSY_KBPS kB/s each for $BUSY_SECONDS s"
helper busy busy "$BIN" "$TMP/busy" "$BUSY_SESSIONS" "$BUSY_SECONDS" "$BUSY_KBPS"
U=$TMP/busy.kv
common_checks "$U" busy "d. busy" "$TMP/busy/busy.err"
expect "$U" busy_sessions_bad 0 "d. busy: sessions with lost, repeated or wrong output"
expect "$U" busy_spool_after_files 0 "d. busy: spool files left after every session was delivered"

left=$(marked | wc -l)
(( left == 0 )) || note "$left agent / session processes still alive after the runs"

# ---------------------------------------------------------------- table
table_start "aion-connector poll-mode bench ($VERSION, $(uname -m), $(nproc) cores)"
row "a. idle CPU, poll every $IDLE_POLL_MS ms" "$(kv "$A" idle_cpu_per_hour_s) s/hour (utime+stime: $(kv "$A" idle_cpu_ms) ms in $(kv "$A" idle_seconds) s, 10 ms ticks)"
row "   same, from schedstat (ns)" "$(kv "$A" idle_sched_per_hour_s) s/hour ($(kv "$A" idle_sched_ms) ms in $(kv "$A" idle_seconds) s; $(kv "$A" idle_cpu_per_poll_ms) ms per request)"
row "   requests in the window" "$(kv "$A" idle_polls) polls (gap min / median / max $(kv "$A" idle_poll_gap_min_ms) / $(kv "$A" idle_poll_gap_median_ms) / $(kv "$A" idle_poll_gap_max_ms) ms), $(kv "$A" idle_status_posts) status posts"
row "   idle RSS / threads" "$(kv "$A" idle_rss_kb) kB ($(mib "$(kv "$A" idle_rss_kb)")), $(kv "$A" idle_threads) threads"
row "b. available -> session running" "median $(kv "$D" delay_median_ms) ms, p90 $(kv "$D" delay_p90_ms) ms, max $(kv "$D" delay_max_ms) ms, min $(kv "$D" delay_min_ms) ms (n=$(kv "$D" delay_runs))"
row "   limit pollInterval + 50 ms" "$((DELAY_POLL_MS + 50)) ms: $(kv "$D" delay_over_limit) over"
row "   available -> handed out (poll wait)" "median $(kv "$D" delay_wait_median_ms) ms, max $(kv "$D" delay_wait_max_ms) ms (poll gaps $(kv "$D" delay_poll_gap_min_ms)-$(kv "$D" delay_poll_gap_max_ms) ms)"
row "   handed out -> running (agent)" "median $(kv "$D" delay_start_median_ms) ms, max $(kv "$D" delay_start_max_ms) ms (ack arrives $(kv "$D" delay_ack_median_ms) ms after the GET answer)"
row "c. throughput, $THROUGHPUT_MB MB stdout" "$(kv "$T" tp_mb_per_s) MB/s ($(kv "$T" tp_bytes) bytes in $(kv "$T" tp_seconds) s, started -> exited received)"
row "   posts / seq / content" "$(kv "$T" tp_posts) posts of ~$(kv "$T" tp_avg_post_kb) KiB, $(kv "$T" tp_chunks) chunks, gaps $(kv "$T" tp_seq_gaps), repeats $(kv "$T" tp_seq_repeats), sha256 match $(kv "$T" tp_sha_ok)"
row "   agent CPU / fake server CPU" "$(kv "$T" tp_cpu_ms) ms / $(kv "$T" tp_server_cpu_ms) ms"
row "   agent RSS" "peak $(kv "$T" tp_rss_peak_kb) kB ($(mib "$(kv "$T" tp_rss_peak_kb)")), VmHWM $(kv "$T" tp_hwm_kb) kB, $(kv "$T" tp_threads_peak) threads peak"
row "d. $BUSY_SESSIONS busy sessions x $BUSY_KBPS kB/s, ${BUSY_SECONDS} s" "RSS peak $(kv "$U" busy_rss_peak_kb) kB ($(mib "$(kv "$U" busy_rss_peak_kb)")), median $(kv "$U" busy_rss_median_kb) kB, VmHWM $(kv "$U" busy_hwm_kb) kB"
row "   before / after" "$(kv "$U" busy_rss_before_kb) kB, $(kv "$U" busy_threads_before) threads / $(kv "$U" busy_rss_after_kb) kB; $(kv "$U" busy_threads_peak) threads peak"
row "   spool on disk / undelivered, peak" "$(mb "$(kv "$U" busy_spool_peak_bytes)") / $(mb "$(kv "$U" busy_backlog_peak_bytes)") (100 ms samples)"
row "   agent CPU / delivered" "$(kv "$U" busy_cpu_ms) ms / $(kv "$U" busy_bytes) bytes in $(kv "$U" busy_seconds) s, $(kv "$U" busy_sessions_intact) of $BUSY_SESSIONS sessions intact"
row "shutdown (SIGTERM -> exit) a / b / c / d" "$(kv "$A" idle_exit) in $(kv "$A" idle_stop_ms) ms / $(kv "$D" delay_exit) in $(kv "$D" delay_stop_ms) ms / $(kv "$T" tp_exit) in $(kv "$T" tp_stop_ms) ms / $(kv "$U" busy_exit) in $(kv "$U" busy_stop_ms) ms"
table_end
