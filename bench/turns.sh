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

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$HERE/.." && pwd)
TARGET=x86_64-unknown-linux-musl
LINES=${BENCH_LINES:-10000}
REPEAT=${BENCH_REPEAT:-3}
ET_RUNS=${BENCH_ENDTURN_RUNS:-20}
LINGER=${BENCH_LINGER_MS:-1000}
PY=${PYTHON:-python3}
HELPER="$HERE/runsbench.py"
FAKE="$HERE/fake-acpx"

for v in LINES REPEAT ET_RUNS LINGER; do
    if ! [[ ${!v} =~ ^[0-9]+$ ]]; then
        echo "turns.sh: $v must be a non-negative integer" >&2
        exit 2
    fi
done
(( LINES >= 1 && LINES <= 1000000 )) || { echo "turns.sh: BENCH_LINES must be 1-1000000" >&2; exit 2; }
(( REPEAT >= 1 && REPEAT <= 20 )) || { echo "turns.sh: BENCH_REPEAT must be 1-20" >&2; exit 2; }
(( ET_RUNS >= 1 && ET_RUNS <= 200 )) || { echo "turns.sh: BENCH_ENDTURN_RUNS must be 1-200" >&2; exit 2; }
(( LINGER <= 10000 )) || { echo "turns.sh: BENCH_LINGER_MS is capped at 10000" >&2; exit 2; }
[[ -x $FAKE ]] || { echo "turns.sh: $FAKE is not executable" >&2; exit 2; }

TMP=$(mktemp -d "${TMPDIR:-/tmp}/aion-turns.XXXXXX")
MARK="AION_BENCH_MARK=$TMP"
PIDS=()
NOTES=()

# shellcheck source=bench/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

cleanup() {
    local pid
    stop_pids
    for pid in $(marked); do
        kill -KILL "$pid" 2>/dev/null || true
    done
    rm -rf "$TMP"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

command -v "$PY" >/dev/null || die "$PY not found"
"$PY" -c 'import sys; sys.exit(sys.version_info < (3, 11))' || die "$PY is older than 3.11"
PYBIN=$("$PY" -c 'import sys; print(sys.executable)')

# ---------------------------------------------------------------- builds
build_connector
cp "$BIN" "$TMP/ours"
OURS_KIND=$BUILD_KIND
if [[ -n ${BENCH_BASE_BIN:-} ]]; then
    [[ -x $BENCH_BASE_BIN ]] || die "BENCH_BASE_BIN=$BENCH_BASE_BIN is not executable"
    cp "$BENCH_BASE_BIN" "$TMP/base"
    BASE_DESC="given (BENCH_BASE_BIN)"
else
    BASE=${BENCH_BASE:-$(git -C "$ROOT" merge-base HEAD main)}
    BASE_SHORT=$(git -C "$ROOT" rev-parse --short "$BASE")
    mkdir -p "$TMP/base-src"
    git -C "$ROOT" archive "$BASE" | tar -x -C "$TMP/base-src"
    log "cargo build --release --target $TARGET of $BASE_SHORT (target/bench-base)"
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
mkdir -p "$TMP/bin" "$TMP/ws"
ln -s "$FAKE" "$TMP/bin/acpx"
TOKEN=$(od -An -N32 -tx1 /dev/urandom | tr -d ' \n')
export AION_TOKEN=$TOKEN  # for the helper only; never in argv

# start_server BINARY NAME: a server with its own config and stateDir; sets SRV_PID, SRV_ADDR.
start_server() {
    local bin=$1 name=$2 i line=""
    cat >"$TMP/$name.json" <<EOF
{"port":0,"host":"127.0.0.1","stateDir":"$TMP/$name-state","limits":{"shutdownSeconds":3,"stopGraceSeconds":1,"runsPerProject":200},"projects":{"bench":{"token":"$TOKEN","dir":"$TMP/ws","agents":{"pi":{"description":"Pi"}}}}}
EOF
    chmod 600 "$TMP/$name.json"
    (cd "$TMP" && exec env PATH="$TMP/bin:$PATH" "$MARK" AION_BENCH_STARTS="$TMP/$name.starts" \
        AION_BENCH_PY="$PYBIN" AION_TOKEN= "$bin" "$TMP/$name.json") >"$TMP/$name.out" 2>"$TMP/$name.err" &
    SRV_PID=$!
    PIDS+=("$SRV_PID")
    for ((i = 0; i < 100; i++)); do
        if [[ -s $TMP/$name.out ]]; then
            IFS= read -r line <"$TMP/$name.out" || true
            [[ $line == *:* ]] && break
        fi
        alive "$SRV_PID" || break
        sleep 0.05
    done
    [[ $line == "listening on 127.0.0.1:"* ]] || die "server $name did not print 'listening on 127.0.0.1:PORT' ('$line')"
    SRV_ADDR=${line#listening on }
}

# helper NAME ARGS...: the Python helper, output in $TMP/NAME.kv.
helper() {
    local name=$1 code=0
    shift
    "$PY" "$HELPER" "$@" >"$TMP/$name.kv" 2>"$TMP/$name.herr" &
    local hp=$!
    PIDS+=("$hp")
    wait "$hp" || code=$?
    (( code == 0 )) || note "helper $name exited with code $code: $(tail -n 3 "$TMP/$name.herr" | tr '\n' ' ')"
}

median() { tr ' ' '\n' | grep -E '^[0-9.]+$' | sort -g | awk '{a[NR]=$1} END{ if (NR) print a[int((NR+1)/2)]; else print "-" }'; }

declare -A TOTAL RATE RSS
for who in ours base; do
    TOTAL[$who]=""
    RATE[$who]=""
    RSS[$who]=""
    # Chunks, the end_turn line (posted raw by the base), complete.
    want=$((LINES + 1))
    [[ $who == base ]] && want=$((LINES + 2))
    for ((r = 1; r <= REPEAT; r++)); do
        log "1. $who: $LINES chunks, server $r/$REPEAT"
        start_server "$TMP/$who" "$who-b$r"
        pid=$SRV_PID
        helper "$who-b$r" burst "$SRV_ADDR" "$pid" "$LINES"
        f="$TMP/$who-b$r.kv"
        [[ $(kv "$f" burst_completed) == yes ]] || note "$who run $r did not complete"
        [[ $(kv "$f" burst_final_kind) == complete ]] || note "$who run $r ended with $(kv "$f" burst_final_kind)"
        [[ $(kv "$f" burst_posts) == "$want" ]] || note "$who run $r: $(kv "$f" burst_posts) posts, expected $want"
        [[ $(kv "$f" burst_seq_in_order) == yes ]] || note "$who run $r: seq out of order"
        TOTAL[$who]+="$(kv "$f" burst_total_s) "
        RATE[$who]+="$(kv "$f" burst_posts_per_s) "
        RSS[$who]+="$(kv "$f" burst_rss_peak_kb) "
        stop "$pid" 10
    done
    log "2. $who: end_turn -> complete, $ET_RUNS runs, acpx lingering $LINGER ms"
    start_server "$TMP/$who" "$who-e"
    pid=$SRV_PID
    helper "$who-e" endturn "$SRV_ADDR" "$ET_RUNS" "$TMP/$who-e.starts" "$LINGER"
    [[ $(kv "$TMP/$who-e.kv" endturn_failures) == none ]] || note "$who end_turn: failures $(kv "$TMP/$who-e.kv" endturn_failures)"
    stop "$pid" 10
done

left=$(marked | wc -l)
(( left == 0 )) || note "$left fake acpx processes still alive after the runs"

# ---------------------------------------------------------------- table
row() { printf '%-40s %s\n' "$1" "$2"; }
echo
echo "aion-connector turns bench ($(uname -m), $(nproc) cores); ours: $OURS_KIND; base: $BASE_DESC"
printf '%s\n' "--------------------------------------------------------------------------------------------"
for who in ours base; do
    row "1. $LINES chunks, invoke -> complete ($who)" \
        "median $(median <<<"${TOTAL[$who]}") s, $(median <<<"${RATE[$who]}") posts/s, peak RSS $(median <<<"${RSS[$who]}") kB (runs: ${TOTAL[$who]% }s; RSS ${RSS[$who]% })"
done
for who in ours base; do
    e="$TMP/$who-e.kv"
    row "2. end_turn -> complete ($who)" \
        "p50 $(kv "$e" endturn_p50_ms) ms, p99 $(kv "$e" endturn_p99_ms) ms, max $(kv "$e" endturn_max_ms) ms ($(kv "$e" endturn_measured)/$ET_RUNS runs, acpx lingering $LINGER ms)"
done
printf '%s\n' "--------------------------------------------------------------------------------------------"
if (( ${#NOTES[@]} )); then
    echo "problems / notes:"
    printf '  - %s\n' "${NOTES[@]}"
else
    echo "problems / notes: none"
fi
