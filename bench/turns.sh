#!/usr/bin/env bash
# bench/turns.sh: what reading acpx as the Node connector does costs and gains,
# this tree against a base commit (default: where this branch left main):
#   1. 10,000 agent_message_chunk lines: invoke -> complete received (total time,
#      posts/s, peak RSS), each binary on a fresh server, BENCH_REPEAT times;
#   2. end_turn written by acpx -> complete received (p50/p99), with a fake acpx
#      that lingers BENCH_LINGER_MS after its turn, as acpx 0.19 does (about 1 s).
# See bench/README.md.
#
# Usage: bench/turns.sh           (from anywhere; two release builds, then about 1.5 min)
# Env:   BENCH_BIN=path           this tree's binary (skip its build)
#        BENCH_BASE_BIN=path      the base binary (skip its build)
#        BENCH_BASE=commit        the base to build (default: git merge-base HEAD main)
#        BENCH_LINES=10000        chunks of figure 1
#        BENCH_REPEAT=3           servers per binary for figure 1
#        BENCH_ENDTURN_RUNS=20    runs per binary for figure 2
#        BENCH_LINGER_MS=1000     how long the fake acpx lingers after its turn
#        PYTHON=python3
#
# Only 127.0.0.1 is ever contacted. Every process started here is stopped on exit.
set -euo pipefail

# shellcheck source=bench/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
LINES=$(setting BENCH_LINES 10000 1 1000000)
REPEAT=$(setting BENCH_REPEAT 3 1 20)
ET_RUNS=$(setting BENCH_ENDTURN_RUNS 20 1 200)
LINGER=$(setting BENCH_LINGER_MS 1000 0 10000)
HELPER="$HERE/runsbench.py"
FAKE="$HERE/fake-acpx"
[[ -x $FAKE ]] || usage "$FAKE is not executable"
bench_init turns
need_py

# ---------------------------------------------------------------- builds
bench_binary
cp "$BIN" "$TMP/ours"
OURS_KIND=$BUILD_KIND
if [[ -n ${BENCH_BASE_BIN:-} ]]; then
    [[ -x $BENCH_BASE_BIN ]] || usage "BENCH_BASE_BIN=$BENCH_BASE_BIN is not executable"
    cp "$BENCH_BASE_BIN" "$TMP/base"
    BASE_DESC="given (BENCH_BASE_BIN)"
else
    BASE=${BENCH_BASE:-$(git -C "$ROOT" merge-base HEAD main)}
    BASE_SHORT=$(git -C "$ROOT" rev-parse --short "$BASE")
    mkdir -p "$TMP/base-src"
    git -C "$ROOT" archive "$BASE" | tar -x -C "$TMP/base-src"
    log "cargo build --release --target $TARGET of $BASE_SHORT (into target/bench-base)"
    if (cd "$TMP/base-src" && CARGO_TARGET_DIR="$ROOT/target/bench-base" timeout 1800 \
        cargo build --release --target "$TARGET") >"$TMP/base-build.log" 2>&1; then
        cp "$ROOT/target/bench-base/$TARGET/release/aion-connector" "$TMP/base"
        BASE_DESC="$BASE_SHORT, musl static"
    else
        tail -n 8 "$TMP/base-build.log" >&2
        note "base: musl build failed, host release build instead"
        (cd "$TMP/base-src" && CARGO_TARGET_DIR="$ROOT/target/bench-base" timeout 1800 \
            cargo build --release) >"$TMP/base-build.log" 2>&1 || die "base build failed"
        cp "$ROOT/target/bench-base/release/aion-connector" "$TMP/base"
        BASE_DESC="$BASE_SHORT, host release (FALLBACK)"
    fi
fi

# ---------------------------------------------------------------- servers
mkdir -p "$TMP/bin"
ln -s "$FAKE" "$TMP/bin/acpx"
TOKEN=$(new_token)
export AION_TOKEN=$TOKEN  # for the helper only; never in argv
# runsPerProject 200: a run already closed may still be ending its lingering acpx.
write_config "$TMP/turns.json" '{"pi":{"description":"Pi"}}' \
    '"limits":{"shutdownSeconds":3,"stopGraceSeconds":1,"runsPerProject":200}'

# serve WHO NAME: start_connector with binary $TMP/WHO, the fake acpx first on PATH.
serve() {
    BIN="$TMP/$1" start_connector "$2" "$TMP/turns.json" PATH="$TMP/bin:$PATH" \
        AION_BENCH_STARTS="$TMP/$2.starts" AION_BENCH_PY="$PYBIN" AION_TOKEN=
}

# med "V1 V2 …": the lower median of the space-separated values (lib.sh median -l)
med() {
    local -a v
    read -ra v <<<"$1"
    median -l "${v[@]}"
}

declare -A TOTAL RATE RSS
for who in ours base; do
    TOTAL[$who]=""
    RATE[$who]=""
    RSS[$who]=""
    # The chunks and complete; the base posted the result line (raw) too.
    nposts=$((LINES + 1))
    [[ $who == base ]] && nposts=$((LINES + 2))
    for ((r = 1; r <= REPEAT; r++)); do
        log "1. $who: $LINES chunks, server $r/$REPEAT"
        serve "$who" "$who-b$r"
        pid=$SRV_PID
        helper "$who-b$r" burst "$SRV_ADDR" "$pid" "$LINES"
        f="$TMP/$who-b$r.kv"
        expect "$f" burst_completed yes "$who run $r"
        expect "$f" burst_final_kind complete "$who run $r"
        expect "$f" burst_posts "$nposts" "$who run $r"
        expect "$f" burst_seq_in_order yes "$who run $r"
        TOTAL[$who]+="$(kv "$f" burst_total_s) "
        RATE[$who]+="$(kv "$f" burst_posts_per_s) "
        RSS[$who]+="$(kv "$f" burst_rss_peak_kb) "
        stop_server "$pid" "$who-b$r" 10
    done
    log "2. $who: end_turn -> complete, $ET_RUNS runs, acpx lingering $LINGER ms"
    serve "$who" "$who-e"
    pid=$SRV_PID
    helper "$who-e" endturn "$SRV_ADDR" "$ET_RUNS" "$TMP/$who-e.starts" "$LINGER"
    expect "$TMP/$who-e.kv" endturn_failures none "$who end_turn"
    stop_server "$pid" "$who-e" 10
done

left=$(marked | wc -l)
(( left == 0 )) || note "$left fake acpx processes still alive after the runs"

# ---------------------------------------------------------------- table
BUILD_KIND="ours: $OURS_KIND; base: $BASE_DESC"
table_start "aion-connector turns bench ($(uname -m), $(nproc) cores)"
for who in ours base; do
    row "1. $LINES chunks, invoke -> complete ($who)" \
        "median $(med "${TOTAL[$who]}") s, $(med "${RATE[$who]}") posts/s, peak RSS $(med "${RSS[$who]}") kB (runs: ${TOTAL[$who]% }s; RSS ${RSS[$who]% })"
done
for who in ours base; do
    e="$TMP/$who-e.kv"
    row "2. end_turn -> complete ($who)" \
        "p50 $(kv "$e" endturn_p50_ms) ms, p99 $(kv "$e" endturn_p99_ms) ms, max $(kv "$e" endturn_max_ms) ms ($(kv "$e" endturn_measured)/$ET_RUNS runs, acpx lingering $LINGER ms)"
done
table_end
