#!/usr/bin/env bash
# bench/lease.sh: lease-client figures for aion-connector (issue 6): how fast
# close checks are answered while renewals flow, and what the `lease` wrapper
# adds to a command's run time. See bench/README.md for what each figure means.
#
# Usage: bench/lease.sh            (from anywhere; about 30 s after the build)
# Env:   BENCH_BIN=path           skip the build, measure this binary
#        BENCH_DEBUG_BIN=path     skip the debug build, use this debug binary for the
#                                 loaded run (it must honour AION_LEASE_TIME_SCALE)
#        BENCH_APPS=50            --app keys of the wrapper under load
#        BENCH_CLOSES=1000        close checks pushed per run
#        BENCH_INTERVAL_MS=2      milliseconds between close checks
#        BENCH_SCALE=1000         AION_LEASE_TIME_SCALE of the loaded run (a debug build:
#                                 release builds ignore it)
#        BENCH_OVERHEAD_RUNS=100  runs per command of the overhead figure
#        PYTHON=python3
#
# Nothing but a Unix socket in a mktemp -d directory is used. Every process
# started here is stopped on exit.
set -euo pipefail

# shellcheck source=bench/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
APPS=$(setting BENCH_APPS 50 1 500)
CLOSES=$(setting BENCH_CLOSES 1000 1)
INTERVAL_MS=$(setting BENCH_INTERVAL_MS 2 1)
SCALE=$(setting BENCH_SCALE 1000 1 10000)
OVERHEAD_RUNS=$(setting BENCH_OVERHEAD_RUNS 100 1 1000)
(( CLOSES * INTERVAL_MS <= 20000 )) || usage "the close-check run is capped at 20 s"
HELPER="$HERE/leasebench.py"
HELPER_TIMEOUT=60
bench_init lease

# ---------------------------------------------------------------- 0. tools
need_py
HYPERFINE=$(command -v hyperfine || true)
[[ -n $HYPERFINE ]] || note "hyperfine not found: the overhead figure uses a Python loop of $OVERHEAD_RUNS runs"
unset AION_LEASE_TIME_SCALE

# ---------------------------------------------------------------- 1. build
bench_binary
# The time scale is a debug-only test seam (src/lease/mod.rs): release builds
# ignore AION_LEASE_TIME_SCALE, so the loaded run uses a debug build (DEBUG_BIN).
bench_binary debug

# ---------------------------------------------------------------- 2. close checks
# closes NAME SCALE BINARY: one wrapper with $APPS apps, $CLOSES close checks.
closes() {
    local name=$1 scale=$2 bin=$3 f="$TMP/$1.kv"
    log "close checks ($name): $APPS apps, $CLOSES checks every $INTERVAL_MS ms, AION_LEASE_TIME_SCALE=$scale"
    helper "$name" closes "$bin" "$TMP/$name.sock" "$APPS" "$CLOSES" "$scale" "$INTERVAL_MS"
    if (( scale > 1 )) && [[ $(kv "$f" renews_during) == 0 ]]; then
        note "$name: no renewals at time scale $scale (is $bin a debug build?)"
    fi
    [[ $(kv "$f" leased_apps) == "$APPS" ]] || note "$name: only $(kv "$f" leased_apps)/$APPS apps were leased"
    [[ $(kv "$f" early_exit) == - ]] || note "$name: the wrapper exited early with $(kv "$f" early_exit)"
    [[ $(kv "$f" closes_replied) == "$CLOSES" ]] \
        || note "$name: $(kv "$f" closes_replied)/$CLOSES close checks answered"
    [[ $(kv "$f" closes_wrong) == 0 ]] \
        || note "$name: $(kv "$f" closes_wrong) wrong replies, e.g. $(kv "$f" first_wrong)"
    [[ $(kv "$f" closes_over_3s) == 0 ]] || note "$name: $(kv "$f" closes_over_3s) replies took 3 s or more"
    [[ $(kv "$f" late_renews) == 0 ]] || note "$name: $(kv "$f" late_renews) renewals came after the lease expired"
    [[ $(kv "$f" srv_violations) == 0 ]] \
        || note "$name: $(kv "$f" srv_violations) protocol violations, e.g. $(kv "$f" srv_first_violation)"
    [[ $(kv "$f" sigterm_exit) == 143 ]] \
        || note "$name: SIGTERM to the wrapper of 'sleep 30' gave exit $(kv "$f" sigterm_exit) (expected 143 at once)"
    [[ $(kv "$f" leases_left) == 0 ]] \
        || note "$name: $(kv "$f" leases_left) leases still held on the server after the wrapper was gone"
    local warn
    warn=$(grep -cE '\[(WARN|ERROR)\]' "$TMP/$name.sock.stderr" 2>/dev/null || true)
    (( ${warn:-0} == 0 )) || note "$name: $warn WARN/ERROR lines from the wrapper, e.g. $(grep -m1 -E '\[(WARN|ERROR)\]' "$TMP/$name.sock.stderr")"
}
closes idle 1 "$BIN"
closes loaded "$SCALE" "$DEBUG_BIN"

# ---------------------------------------------------------------- 3. overhead
log "wrapper overhead: $OVERHEAD_RUNS runs per command"
SOCK="$TMP/overhead.sock"
"$PY" "$HELPER" serve "$SOCK" "$TMP/serve.kv" >"$TMP/serve.out" 2>"$TMP/serve.err" &
SERVE_PID=$!
PIDS+=("$SERVE_PID")
wait_for 5 "$SERVE_PID" test -s "$TMP/serve.out" || die "the lease server did not start: $(head -n 3 "$TMP/serve.err")"
WRAP="$BIN lease --app com.bench.overhead --socket $SOCK -- true"
NOSOCK="$BIN lease --app com.bench.overhead --socket $TMP/absent.sock -- true"
WARMUP=5
if [[ -n $HYPERFINE ]]; then
    OVERHEAD_TOOL="hyperfine -N, $WARMUP warmup + $OVERHEAD_RUNS runs"
    if ! timeout 120 "$HYPERFINE" -N --style none --warmup "$WARMUP" --runs "$OVERHEAD_RUNS" \
        --export-json "$TMP/hf.json" true "$WRAP" "$NOSOCK" >"$TMP/hf.out" 2>&1; then
        note "hyperfine failed: $(tail -n 3 "$TMP/hf.out" | tr '\n' ' ')"
    fi
    "$PY" "$HELPER" hyperfine "$TMP/hf.json" plain wrap nosock >"$TMP/overhead.kv" 2>>"$TMP/serve.err" || true
else
    WARMUP=0
    OVERHEAD_TOOL="Python subprocess loop, $OVERHEAD_RUNS runs"
    {
        "$PY" "$HELPER" loop "$OVERHEAD_RUNS" plain -- true
        # shellcheck disable=SC2086 # the command lines are split on purpose
        "$PY" "$HELPER" loop "$OVERHEAD_RUNS" wrap -- $WRAP
        # shellcheck disable=SC2086
        "$PY" "$HELPER" loop "$OVERHEAD_RUNS" nosock -- $NOSOCK
    } >"$TMP/overhead.kv"
fi
stop "$SERVE_PID"
o=$TMP/overhead.kv
s=$TMP/serve.kv
WRAP_RUNS=$((WARMUP + OVERHEAD_RUNS))
for n in wrap nosock; do
    [[ $(kv "$o" ${n}_nonzero_exits) == 0 ]] || note "overhead: $(kv "$o" ${n}_nonzero_exits) non-zero exits of '$n'"
done
[[ $(kv "$s" begins) == "$WRAP_RUNS" ]] \
    || note "overhead: the server saw $(kv "$s" begins) lease.begin for $WRAP_RUNS wrapper runs (one each expected)"
[[ $(kv "$s" ends) == "$WRAP_RUNS" ]] \
    || note "overhead: the server saw $(kv "$s" ends) lease.end for $WRAP_RUNS wrapper runs (one each expected)"
[[ $(kv "$s" refused) == 0 ]] \
    || note "overhead: $(kv "$s" refused) lease requests refused (lease_conflict: a lease left held by an earlier run)"
[[ $(kv "$s" leases_left) == 0 ]] || note "overhead: $(kv "$s" leases_left) leases left held after the runs"

# ---------------------------------------------------------------- summary
over() { # over NAME: "+X ms" over plain true (medians)
    awk -v a="$(kv "$o" "$1_median_ms")" -v b="$(kv "$o" plain_median_ms)" \
        'BEGIN{ if (a ~ /^[0-9.]+$/ && b ~ /^[0-9.]+$/) printf "+%.2f ms", a-b; else printf "-" }'
}
closerow() {
    local f="$TMP/$1.kv"
    row "$2" "p50 $(kv "$f" p50_ms) ms, p90 $(kv "$f" p90_ms) ms, p99 $(kv "$f" p99_ms) ms, max $(kv "$f" max_ms) ms"
    row "   answered / wrong / >= 3 s" "$(kv "$f" closes_replied)/$(kv "$f" closes_sent) / $(kv "$f" closes_wrong) / $(kv "$f" closes_over_3s)"
    row "   renewals during the checks" "$(kv "$f" renews_during) ($(kv "$f" renews_per_s)/s), late: $(kv "$f" late_renews)"
    row "   wrapper CPU / RSS" "$(kv "$f" wrapper_cpu_pct) % of one core, $(kv "$f" wrapper_rss_kb) kB"
    row "   SIGTERM -> exit / leases left" "exit $(kv "$f" sigterm_exit) in $(kv "$f" sigterm_ms) ms / $(kv "$f" leases_left)"
}
table_start "aion-connector lease bench  ($(date -u +%Y-%m-%dT%H:%M:%SZ), $(nproc) cores, ${VERSION:-version unknown})"
closerow idle "a. close check -> reply, no renewals"
closerow loaded "a. close check -> reply, scale $SCALE (debug build)"
row "   ($APPS apps, $CLOSES checks, 1 in 10 not held)" "every $INTERVAL_MS ms, open loop, timed by a Python server"
row "b. plain 'true'" "median $(kv "$o" plain_median_ms) ms, p90 $(kv "$o" plain_p90_ms) ms"
row "   lease -- true, server answering" "median $(kv "$o" wrap_median_ms) ms, p90 $(kv "$o" wrap_p90_ms) ms ($(over wrap))"
row "   lease -- true, no socket" "median $(kv "$o" nosock_median_ms) ms, p90 $(kv "$o" nosock_p90_ms) ms ($(over nosock))"
row "   server: hellos / granted / refused / ends" "$(kv "$s" hellos) / $(kv "$s" begins) / $(kv "$s" refused) / $(kv "$s" ends) for $WRAP_RUNS runs"
row "   measured with" "$OVERHEAD_TOOL"
table_end
