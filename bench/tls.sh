#!/usr/bin/env bash
# bench/tls.sh: TLS figures for aion-connector: handshake time, ping req/s and
# p99 over TLS keep-alive against plain HTTP (wrk), `cat` of a file over wss://
# against ws:// and a bare PTY, idle RSS with TLS on, and the binary size.
#
# Usage: bench/tls.sh               (from anywhere; about a minute after the build)
# Env:   BENCH_BIN=path             skip the build, measure this binary
#        BENCH_DURATION=10          wrk seconds per run
#        BENCH_HANDSHAKES=200       TLS handshakes timed
#        BENCH_FILE_MB=50           size of the file that is cat'ed (MB)
#        BENCH_TP_RUNS=3            cat runs (each: bare PTY, ws://, wss://)
#        PYTHON=python3
#
# Only 127.0.0.1 is ever contacted. Every process started here is stopped on exit.
set -euo pipefail

# shellcheck source=bench/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
DURATION=$(setting BENCH_DURATION 10 1 600)
HANDSHAKES=$(setting BENCH_HANDSHAKES 200 1 10000)
FILE_MB=$(setting BENCH_FILE_MB 50 1 1000)
TP_RUNS=$(setting BENCH_TP_RUNS 3 1 10)
HELPER="$HERE/tlsbench.py"
HELPER_TIMEOUT=600
HELPER_STDERR=log
bench_init tlsbench

need_py
need cat sh
want_wrk || note "wrk could not be installed; req/s figures skipped"
bench_binary

TOKEN=$(new_token)
export AION_TOKEN=$TOKEN # for wrk and the helper only
PLAIN_CFG="$TMP/plain.json"
TLS_CFG="$TMP/tls.json"
write_config "$PLAIN_CFG" '{}'
write_config "$TLS_CFG" '{}' '"tls":{"selfSigned":true}'

start_connector plain "$PLAIN_CFG" SHELL=/bin/sh
P_PID=$SRV_PID P_ADDR=$SRV_ADDR
start_connector tls "$TLS_CFG" SHELL=/bin/sh
T_PID=$SRV_PID T_ADDR=$SRV_ADDR
wait_for 5 "$T_PID" grep -q '^tls fingerprint ' "$TMP/tls.out" || die "no 'tls fingerprint' line"
FP=$(sed -n 's/^tls fingerprint //p' "$TMP/tls.out")
[[ $FP =~ ^sha256:[0-9a-f]{64}$ ]] || die "bad fingerprint line: $FP"
export AION_FINGERPRINT=$FP
sleep 0.5
P_RSS0=$(rss_kb "$P_PID")
T_RSS0=$(rss_kb "$T_PID")

log "$HANDSHAKES TLS handshakes"
helper hs handshake "$T_ADDR" "$HANDSHAKES"

# wrk_run NAME URL: wrk with ping.lua; fills $TMP/NAME.kv (pushbench's parser).
wrk_run() {
    local name=$1 url=$2 code=0
    timeout $((DURATION + 20)) wrk -t2 -c16 -d"${DURATION}s" --latency -s "$HERE/ping.lua" "$url" \
        >"$TMP/$name.txt" 2>&1 || code=$?
    (( code == 0 )) || note "wrk $name exited with code $code"
    "$PY" "$HERE/pushbench.py" wrk "$TMP/$name.txt" >"$TMP/$name.kv"
}
if command -v wrk >/dev/null; then
    log "wrk -t2 -c16 -d${DURATION}s: plain, then TLS (keep-alive)"
    wrk_run wrk_plain "http://$P_ADDR/"
    wrk_run wrk_tls "https://$T_ADDR/"
fi
T_RSS_LOAD=$(hwm_kb "$T_PID")

log "writing a ${FILE_MB} MB test file"
HELPER="$HERE/termbench.py" helper mkfile mkfile "$TMP/big.txt" "$FILE_MB"
log "cat of $FILE_MB MB: bare PTY, ws://, wss:// ($TP_RUNS runs)"
helper cat cat "$P_ADDR" "$P_PID" "$T_ADDR" "$T_PID" "$TMP/big.txt" "$TP_RUNS"

stop_server "$P_PID" "plain server"
stop_server "$T_PID" "TLS server"
log_warns "$TMP/tls.err" "TLS server"

SIZE=$(stat -c %s "$BIN")
h=$TMP/hs.kv c=$TMP/cat.kv wp=$TMP/wrk_plain.kv wt=$TMP/wrk_tls.kv
table_start "aion-connector TLS ($VERSION)"
row "binary size (stripped)" "$(mb "$SIZE") ($SIZE bytes)"
row "TLS handshake ($(kv "$h" hs_version), median / p99)" "$(kv "$h" hs_ms) / $(kv "$h" hs_p99_ms) ms (TCP connect $(kv "$h" hs_tcp_ms) ms)"
if [[ -f $wp ]]; then
    row "ping keep-alive, plain (req/s, p99)" "$(kv "$wp" wrk_rps), $(kv "$wp" wrk_p99_ms) ms"
    row "ping keep-alive, TLS (req/s, p99)" "$(kv "$wt" wrk_rps), $(kv "$wt" wrk_p99_ms) ms"
fi
row "cat $FILE_MB MB: bare PTY" "$(kv "$c" cat_bare_mbs) MB/s"
row "cat $FILE_MB MB: ws://" "$(kv "$c" cat_ws_mbs) MB/s (server CPU $(kv "$c" cat_ws_server_cpu_s) s)"
row "cat $FILE_MB MB: wss://" "$(kv "$c" cat_wss_mbs) MB/s (server CPU $(kv "$c" cat_wss_server_cpu_s) s)"
row "idle RSS, plain / TLS" "$(mib "$P_RSS0") / $(mib "$T_RSS0")"
row "TLS peak RSS (after wrk)" "$(mib "$T_RSS_LOAD")"
table_end
