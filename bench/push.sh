#!/usr/bin/env bash
# bench/push.sh: push-mode figures for aion-connector (size, memory, startup,
# throughput). See bench/README.md for what each figure means.
#
# Usage: bench/push.sh            (from anywhere; about 30-40 s after the build)
# Env:   BENCH_BIN=path           skip the build, measure this binary
#        BENCH_RUNS=50            exec->first-ping runs
#        BENCH_DURATION=10        wrk seconds
#        BENCH_IDLE_CONNS=300     idle keep-alive connections
#        BENCH_REFERENCE=auto     auto: nginx reference run if nginx is found; 0: skip
#        BENCH_NGINX=path         nginx binary for the reference (default: nginx on PATH)
#        PYTHON=python3
#
# Only 127.0.0.1 is ever contacted. Every server started here is stopped on exit.
set -euo pipefail

# shellcheck source=bench/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
RUNS=$(setting BENCH_RUNS 50 1)
DURATION=$(setting BENCH_DURATION 10 1 60)
IDLE_CONNS=$(setting BENCH_IDLE_CONNS 300 1)
REFERENCE=${BENCH_REFERENCE:-auto}
HELPER="$HERE/pushbench.py"
ROW_W=40
bench_init bench

# ---------------------------------------------------------------- 0. tools
need_py
need file
want_wrk || note "wrk could not be installed; throughput figures skipped"

# ---------------------------------------------------------------- 1. build
bench_binary
SIZE_BUILT=$(stat -c %s "$BIN_BUILT")
FILE_BUILT=$(file -b "$BIN_BUILT")
STRIP_NOTE="as built (already stripped)"
if [[ $FILE_BUILT == *"not stripped"* ]]; then
    strip "$BIN"
    STRIP_NOTE="stripped copy; as built: $SIZE_BUILT bytes (Cargo profile does not strip)"
fi
SIZE=$(stat -c %s "$BIN")
FILE_OUT=$(file -b "$BIN")
STATIC=no
if [[ $FILE_OUT == *"statically linked"* || $FILE_OUT == *"static-pie linked"* ]]; then
    STATIC=yes
else
    note "binary is NOT statically linked: $FILE_OUT"
fi

# ---------------------------------------------------------------- config
TOKEN=$(new_token)
CONFIG="$TMP/aion.config.json"
write_config "$CONFIG" '{"claude":{"description":"Claude Code"}}'

# log_check NAME LABEL: count per-request log lines, non-200 ones, WARN/ERROR lines.
log_check() {
    local f="$TMP/$1.err" total non200
    total=$(grep -c 'status=' "$f" || true)
    non200=$(grep 'status=' "$f" | grep -vc 'status=200' || true)
    if (( non200 > 0 )); then
        note "$2: $non200 non-200 request log lines, e.g.: $(grep 'status=' "$f" | grep -v 'status=200' | head -n 1)"
    fi
    log_warns "$f" "$2"
    LOG_SUMMARY="$total request lines, $non200 non-200, $WARNS WARN/ERROR"
}

# ---------------------------------------------------------------- 2. idle RSS
log "idle RSS (server A, one ping)"
start_connector a "$CONFIG"
A_PID=$SRV_PID
A_ADDR=$SRV_ADDR
"$PY" "$HELPER" ping "$A_ADDR" "$TOKEN" 1 >"$TMP/ping.kv"
[[ $(kv "$TMP/ping.kv" ping_statuses) == 200x1 ]] \
    || note "first ping answered $(kv "$TMP/ping.kv" ping_statuses) (expected 200x1)"
sleep 0.2
IDLE_RSS=$(rss_kb "$A_PID")
IDLE_THREADS=$(threads "$A_PID")

# ---------------------------------------------------------------- 3. exec -> first ping
log "exec -> first answered ping, $RUNS runs"
helper startup XDG_STATE_HOME="$TMP/state-startup" startup "$BIN" "$CONFIG" "$RUNS"
(( $(kv "$TMP/startup.kv" startup_failures) == 0 )) 2>/dev/null \
    || note "startup: $(kv "$TMP/startup.kv" startup_failures) failed runs"
(( $(kv "$TMP/startup.kv" startup_non200) == 0 )) 2>/dev/null \
    || note "startup: $(kv "$TMP/startup.kv" startup_non200) non-200 answers"
[[ $(kv "$TMP/startup.kv" sigterm_bad_exit) == none ]] \
    || note "SIGTERM exit codes other than 0 in startup runs: $(kv "$TMP/startup.kv" sigterm_bad_exit)"

# ---------------------------------------------------------------- 4. wrk keep-alive
WRK_DONE=no
LOAD_PEAK=0
LOAD_HWM=0
if command -v wrk >/dev/null; then
    log "wrk -t2 -c16 -d${DURATION}s --latency (ping, keep-alive)"
    wrk_ping wrk "$A_ADDR" "$TOKEN" "$DURATION" "$A_PID"
    LOAD_HWM=$(hwm_kb "$A_PID")
    alive "$A_PID" || note "server A died during the wrk run"
    WRK_DONE=yes
    log "wrk output:"
    sed 's/^/    /' "$TMP/wrk.txt" >&2
fi
AFTER_LOAD_RSS=$(rss_kb "$A_PID")
stop_server "$A_PID" "server A (after load)"
A_STOP=$STOPPED
log_check a "server A (idle + wrk)"
A_LOG=$LOG_SUMMARY

# ---------------------------------------------------------------- 5. idle connections
log "$IDLE_CONNS idle keep-alive connections (server B)"
start_connector b "$CONFIG"
B_PID=$SRV_PID
helper idle idle "$SRV_ADDR" "$TOKEN" "$B_PID" "$IDLE_CONNS"
[[ $(kv "$TMP/idle.kv" idle_conns_answered) == "$IDLE_CONNS" ]] \
    || note "idle: only $(kv "$TMP/idle.kv" idle_conns_answered)/$IDLE_CONNS connections got their ping answered"
[[ $(kv "$TMP/idle.kv" idle_conns_still_open) == "$IDLE_CONNS" ]] \
    || note "idle: $(kv "$TMP/idle.kv" idle_conns_still_open)/$IDLE_CONNS connections still open after the fresh pings"
[[ $(kv "$TMP/idle.kv" idle_errors) == none ]] || note "idle errors: $(kv "$TMP/idle.kv" idle_errors)"
stop_server "$B_PID" "server B"
log_check b "server B (idle connections)"
B_LOG=$LOG_SUMMARY

# ---------------------------------------------------------------- 6. reference (optional)
NGINX=${BENCH_NGINX:-$(command -v nginx || true)}
REF="skipped (no nginx: put it on PATH or set BENCH_NGINX)"
[[ $REFERENCE == 0 ]] && REF="skipped (BENCH_REFERENCE=0)"
if [[ $REFERENCE != 0 && -n $NGINX && -x $NGINX ]] && command -v wrk >/dev/null; then
    log "reference: nginx returning a fixed 200 (2 workers), same wrk run"
    PORT=$(free_port)
    mkdir -p "$TMP/nginx"
    cat >"$TMP/nginx/nginx.conf" <<EOF
daemon off;
worker_processes 2;
pid $TMP/nginx/nginx.pid;
error_log $TMP/nginx/error.log;
events { worker_connections 1024; }
http {
    access_log off;
    client_body_temp_path $TMP/nginx/body;
    proxy_temp_path $TMP/nginx/proxy;
    fastcgi_temp_path $TMP/nginx/fastcgi;
    uwsgi_temp_path $TMP/nginx/uwsgi;
    scgi_temp_path $TMP/nginx/scgi;
    server {
        listen 127.0.0.1:$PORT;
        location / { default_type application/json; return 200 '{"ok":true,"v":1}'; }
    }
}
EOF
    "$NGINX" -p "$TMP/nginx" -c "$TMP/nginx/nginx.conf" >"$TMP/nginx/out" 2>&1 &
    NGX_PID=$!
    PIDS+=("$NGX_PID")
    nginx_up() {
        "$PY" "$HELPER" ping "127.0.0.1:$PORT" x 1 >"$TMP/ngx.kv" 2>/dev/null || true
        [[ $(kv "$TMP/ngx.kv" ping_statuses) == 200x1 ]]
    }
    if wait_for 5 "$NGX_PID" nginx_up; then
        wrk_ping ref "127.0.0.1:$PORT" x "$DURATION"
        REF="$(kv "$TMP/ref.kv" wrk_rps) req/s, p50 $(kv "$TMP/ref.kv" wrk_p50_ms) ms, p99 $(kv "$TMP/ref.kv" wrk_p99_ms) ms"
    else
        REF="skipped (nginx did not start: $(head -n 1 "$TMP/nginx/out" "$TMP/nginx/error.log" 2>/dev/null | tr '\n' ' '))"
    fi
    stop "$NGX_PID"
fi

# ---------------------------------------------------------------- summary
s=$TMP/startup.kv
w=$TMP/wrk.kv
d=$TMP/idle.kv
table_start "aion-connector push bench  ($(date -u +%Y-%m-%dT%H:%M:%SZ), $(nproc) cores, ${VERSION:-version unknown})"
row "1. binary size" "$SIZE bytes ($(awk -v b="$SIZE" 'BEGIN{printf "%.2f MB, %.2f MiB", b/1e6, b/1048576}')), $STRIP_NOTE"
row "   file" "$FILE_OUT"
row "   static" "$STATIC"
row "2. idle RSS after 1 ping" "$IDLE_RSS kB ($(mib "$IDLE_RSS")), $IDLE_THREADS threads"
row "3. exec -> first answered ping" "median $(kv "$s" startup_median_ms) ms, p90 $(kv "$s" startup_p90_ms) ms (min $(kv "$s" startup_min_ms), max $(kv "$s" startup_max_ms); n=$(kv "$s" startup_runs), failed $(kv "$s" startup_failures))"
row "   exec -> 'listening on' line" "median $(kv "$s" startup_line_median_ms) ms"
row "   SIGTERM -> exit (idle server)" "median $(kv "$s" sigterm_median_ms) ms, non-zero exits: $(kv "$s" sigterm_bad_exit)"
if [[ $WRK_DONE == yes ]]; then
    row "4. ping keep-alive (wrk -t2 -c16 ${DURATION}s)" "$(kv "$w" wrk_rps) req/s, p50 $(kv "$w" wrk_p50_ms) ms, p99 $(kv "$w" wrk_p99_ms) ms"
    row "   requests / non-2xx / socket errors" "$(kv "$w" wrk_requests) / $(kv "$w" wrk_non2xx) / $(kv "$w" wrk_socket_errors)"
    row "   RSS under load" "peak sampled VmRSS $LOAD_PEAK kB ($(mib "$LOAD_PEAK")), VmHWM $LOAD_HWM kB ($(mib "$LOAD_HWM"))"
    row "   RSS after load (idle again)" "$AFTER_LOAD_RSS kB ($(mib "$AFTER_LOAD_RSS"))"
else
    row "4. ping keep-alive (wrk)" "skipped (no wrk)"
fi
row "   server A log / shutdown" "$A_LOG; SIGTERM: $A_STOP"
row "5. RSS with $IDLE_CONNS idle conns" "$(kv "$d" idle_rss_kb) kB ($(mib "$(kv "$d" idle_rss_kb)")), $(kv "$d" idle_threads) threads (before: $(kv "$d" idle_rss_before_kb) kB, $(kv "$d" idle_threads_before) threads)"
row "   conns opened / answered / still open" "$(kv "$d" idle_conns_opened) / $(kv "$d" idle_conns_answered) ($(kv "$d" idle_conns_statuses)) / $(kv "$d" idle_conns_still_open)"
row "   fresh ping while they are open" "median $(kv "$d" idle_fresh_ping_median_ms) ms, max $(kv "$d" idle_fresh_ping_max_ms) ms ($(kv "$d" idle_fresh_statuses))"
row "   server B log" "$B_LOG"
row "6. reference (nginx fixed 200, same wrk)" "$REF"
table_end
