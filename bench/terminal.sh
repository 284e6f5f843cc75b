#!/usr/bin/env bash
# bench/terminal.sh: WebSocket terminal figures for aion-connector (throughput
# of `cat` through /ws against a bare PTY, keystroke echo round trip, memory per
# idle terminal). See bench/README.md for what each figure means.
#
# Usage: bench/terminal.sh          (from anywhere; about 40-60 s after the build)
# Env:   BENCH_BIN=path             skip the build, measure this binary
#        BENCH_FILE_MB=100          size of the file that is cat'ed (MB, 10^6 bytes)
#        BENCH_TP_RUNS=5            throughput runs (each: bare PTY, then /ws)
#        BENCH_KEYS=500             keystrokes per echo measurement
#        BENCH_TERMINALS=100        idle terminals opened at once
#        BENCH_IDLE_ROUNDS=2        open/close rounds of the idle terminals
#        PYTHON=python3
#
# Only 127.0.0.1 is ever contacted. Every process started here (connectors and
# the shells they start) is stopped on exit.
set -euo pipefail

# shellcheck source=bench/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
FILE_MB=$(setting BENCH_FILE_MB 100 1 1000)
TP_RUNS=$(setting BENCH_TP_RUNS 5 1 10)
KEYS=$(setting BENCH_KEYS 500 1 5000)
TERMINALS=$(setting BENCH_TERMINALS 100 2 190)
ROUNDS=$(setting BENCH_IDLE_ROUNDS 2 1 5)
HELPER="$HERE/termbench.py"
HELPER_TIMEOUT=300
HELPER_STDERR=log # termbench reports each run on stderr
ROW_W=42
bench_init termbench

# ---------------------------------------------------------------- 0. tools
need_py
need cat stty sh

# ---------------------------------------------------------------- 1. build
bench_binary

# ---------------------------------------------------------------- config
TOKEN=$(new_token)
export AION_TOKEN=$TOKEN # for the helper only; the connector drops AION_* from shells
CONFIG="$TMP/aion.config.json"
write_config "$CONFIG" '{"claude":{"description":"Claude Code"}}' '"limits":{"terminalsPerProject":200}'

# finish_server NAME PID LABEL: SIGTERM, exit code, shells left, WARN/ERROR lines; sets SUMMARY.
finish_server() {
    local name=$1 pid=$2 label=$3 left opened
    stop_server "$pid" "$label"
    left=$(shells_of "$pid" | wc -l)
    (( left == 0 )) || note "$label: $left shell processes still alive after the connector exited"
    opened=$(grep -c 'opened (websocket' "$TMP/$name.err" || true)
    log_warns "$TMP/$name.err" "$label"
    SUMMARY="$opened terminals opened, $WARNS WARN/ERROR lines; SIGTERM: $STOPPED, shells left: $left"
}

# ---------------------------------------------------------------- 2. throughput
log "writing a ${FILE_MB} MB test file"
helper mkfile mkfile "$TMP/big.txt" "$FILE_MB"
[[ $(kv "$TMP/mkfile.kv" file_bytes) == "$((FILE_MB * 1000000))" ]] || die "could not write the test file"

start_connector a "$CONFIG" SHELL=/bin/sh
A_PID=$SRV_PID
A_ADDR=$SRV_ADDR
A_RSS0=$(status_kb "$A_PID" VmRSS)
log "throughput: cat of $FILE_MB MB, $TP_RUNS runs each over /ws and on a bare PTY (server A)"
helper tp throughput "$A_ADDR" "$A_PID" "$TMP/big.txt" "$TP_RUNS"
A_RSS_TP=$(status_kb "$A_PID" VmRSS)
A_HWM_TP=$(status_kb "$A_PID" VmHWM)
t=$TMP/tp.kv
WANT=$((FILE_MB * 1000000 + FILE_MB * 10000)) # every \n becomes \r\n on the way out
got=$(kv "$t" tp_bare_bytes)
[[ $got == - || $got == "$WANT" ]] || note "throughput: bare PTY gave $got bytes, expected $WANT (file + one \\r per line)"
# Over /ws the count also has the command's echo, the end marker and the prompt.
got=$(kv "$t" tp_ws_bytes)
if [[ $got =~ ^[0-9]+$ ]] && (( got < WANT || got > WANT + 300 )); then
    note "throughput: /ws gave $got bytes, expected $WANT plus < 300 (echo, marker, prompt)"
fi
ratio=$(kv "$t" tp_ratio)
if [[ $ratio != - ]] && awk -v r="$ratio" 'BEGIN{exit !(r < 0.8)}'; then
    note "throughput over /ws is $ratio of a bare PTY (aim: >= 0.8)"
fi

# ---------------------------------------------------------------- 3. echo
log "keystroke echo: $KEYS keys, cooked (tty echo) and raw (cat echoes), over /ws and on a bare PTY"
helper echo echo "$A_ADDR" "$KEYS"
sleep 0.5
A_RSS_END=$(status_kb "$A_PID" VmRSS)
finish_server a "$A_PID" "server A"
A_LOG=$SUMMARY

# ---------------------------------------------------------------- 4. idle terminals
log "$TERMINALS idle terminals, $ROUNDS rounds (server B)"
start_connector b "$CONFIG" SHELL=/bin/sh
B_PID=$SRV_PID
helper idle idle "$SRV_ADDR" "$B_PID" "$TERMINALS" "$ROUNDS"
d=$TMP/idle.kv
for ((r = 1; r <= ROUNDS; r++)); do
    [[ $(kv "$d" "idle_r${r}_shells") == "$TERMINALS" ]] \
        || note "idle round $r: $(kv "$d" "idle_r${r}_shells") shells under the connector, expected $TERMINALS"
    [[ $(kv "$d" "idle_r${r}_echoed") == "$TERMINALS" ]] \
        || note "idle round $r: only $(kv "$d" "idle_r${r}_echoed")/$TERMINALS terminals echoed a key"
    [[ $(kv "$d" "idle_r${r}_shells_left") == 0 ]] \
        || note "idle round $r: $(kv "$d" "idle_r${r}_shells_left") shells still alive 6 s after their sockets closed"
done
per=$(kv "$d" idle_r1_per_term_kb)
if [[ $per != - ]] && awk -v p="$per" 'BEGIN{exit !(p > 150)}'; then
    note "connector RSS per idle terminal is $per kB (aim: <= 150 kB)"
fi
if (( ROUNDS >= 2 )); then
    a1=$(kv "$d" idle_r1_rss_after_kb)
    aN=$(kv "$d" "idle_r${ROUNDS}_rss_after_kb")
    if [[ $a1 =~ ^[0-9]+$ && $aN =~ ^[0-9]+$ ]] && (( aN - a1 > 1024 )); then
        note "idle: RSS after closing grew from $a1 kB (round 1) to $aN kB (round $ROUNDS)"
    fi
fi
finish_server b "$B_PID" "server B"
B_LOG=$SUMMARY

# ---------------------------------------------------------------- summary
e=$TMP/echo.kv
table_start "aion-connector terminal bench  ($(date -u +%Y-%m-%dT%H:%M:%SZ), $(nproc) cores, ${VERSION:-version unknown})"
row "1. cat ${FILE_MB} MB over /ws" "$(kv "$t" tp_ws_mbs) MB/s (median of $(kv "$t" tp_runs): $(kv "$t" tp_ws_all)), $(kv "$t" tp_ws_wall_s) s, $(kv "$t" tp_ws_bytes) bytes"
row "   bare PTY (pty.fork + cat, same file)" "$(kv "$t" tp_bare_mbs) MB/s (runs: $(kv "$t" tp_bare_all)), $(kv "$t" tp_bare_wall_s) s, $(kv "$t" tp_bare_bytes) bytes"
row "   ratio /ws : bare" "$(kv "$t" tp_ratio)  (aim >= 0.8)"
row "   CPU s per run over /ws" "connector $(kv "$t" tp_ws_server_cpu_s), client $(kv "$t" tp_ws_client_cpu_s), cat $(kv "$t" tp_ws_cat_cpu_s)"
row "   CPU s per run on bare PTY" "client $(kv "$t" tp_bare_client_cpu_s), cat $(kv "$t" tp_bare_cat_cpu_s)"
row "   reads / frames per run" "bare PTY $(kv "$t" tp_bare_reads) reads of the master; /ws $(kv "$t" tp_ws_frames) frames in $(kv "$t" tp_ws_recvs) recvs"
row "   connector RSS" "fresh $A_RSS0 kB, after the runs $A_RSS_TP kB, VmHWM $A_HWM_TP kB ($(mib "$A_HWM_TP"))"
row "2. echo, cooked (tty line discipline)" "p50 $(kv "$e" echo_tty_p50_ms) ms, p99 $(kv "$e" echo_tty_p99_ms) ms, max $(kv "$e" echo_tty_max_ms) ms (n=$(kv "$e" echo_tty_n))"
row "   bare PTY, same" "p50 $(kv "$e" echo_bare_tty_p50_ms) ms, p99 $(kv "$e" echo_bare_tty_p99_ms) ms, max $(kv "$e" echo_bare_tty_max_ms) ms"
row "   echo, raw (stty raw -echo; cat)" "p50 $(kv "$e" echo_proc_p50_ms) ms, p99 $(kv "$e" echo_proc_p99_ms) ms, max $(kv "$e" echo_proc_max_ms) ms (n=$(kv "$e" echo_proc_n))"
row "   bare PTY, same" "p50 $(kv "$e" echo_bare_proc_p50_ms) ms, p99 $(kv "$e" echo_bare_proc_p99_ms) ms, max $(kv "$e" echo_bare_proc_max_ms) ms"
row "   server A RSS at the end / log" "$A_RSS_END kB; $A_LOG"
row "3. connector RSS, no terminal" "$(kv "$d" idle_rss0_kb) kB, $(kv "$d" idle_threads0) threads"
for ((r = 1; r <= ROUNDS; r++)); do
    p=idle_r$r
    row "   round $r: 1 terminal" "$(kv "$d" "${p}_rss1_kb") kB, $(kv "$d" "${p}_threads1") threads"
    row "   round $r: $TERMINALS terminals" "$(kv "$d" "${p}_rssN_kb") kB ($(mib "$(kv "$d" "${p}_rssN_kb")")), $(kv "$d" "${p}_threadsN") threads; $(kv "$d" "${p}_echoed")/$TERMINALS echo a key"
    tpt=$(awk -v a="$(kv "$d" "${p}_threads1")" -v b="$(kv "$d" "${p}_threadsN")" -v n="$TERMINALS" \
        'BEGIN{ if (a ~ /^[0-9]+$/ && b ~ /^[0-9]+$/) printf "%.2f", (b - a) / (n - 1); else print "-" }')
    row "   round $r: per idle terminal" "$(kv "$d" "${p}_per_term_kb") kB, $tpt threads  (aim <= 150 kB)"
    row "   round $r: the $(kv "$d" "${p}_shells") shells themselves" "VmRSS sum $(kv "$d" "${p}_shell_rss_kb") kB, Pss sum $(kv "$d" "${p}_shell_pss_kb") kB"
    row "   round $r: after closing all" "$(kv "$d" "${p}_rss_after_kb") kB, $(kv "$d" "${p}_threads_after") threads, shells left $(kv "$d" "${p}_shells_left")"
done
row "   VmHWM of server B" "$(kv "$d" idle_hwm_kb) kB"
row "   server B log / shutdown" "$B_LOG"
table_end
