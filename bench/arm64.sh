#!/usr/bin/env bash
# bench/arm64.sh: figures of the static aarch64 binary: its size, and the
# smoke test (.ci/smoke.py: --version, start, ping, terminal echo, streamed
# invoke, SIGTERM) under qemu-aarch64 — total time and start → `listening on`,
# median and max over the runs. See bench/README.md.
#
# Usage: bench/arm64.sh          (from anywhere)
# Env:   BENCH_BIN=path          skip the build, measure this aarch64 binary
#        BENCH_RUNS=5            smoke runs (1-50)
#        PYTHON=python3
#
# Needs gcc-aarch64-linux-gnu and qemu-user (Debian) and the
# aarch64-unknown-linux-musl Rust target for the build. Only 127.0.0.1 is
# contacted; each smoke run stops what it started.
set -euo pipefail

# shellcheck source=bench/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
TARGET=aarch64-unknown-linux-musl # read by build_connector
BUILD_FALLBACK=no                 # a host build is no aarch64 binary
RUNS=$(setting BENCH_RUNS 5 1 50)
command -v qemu-aarch64 >/dev/null || die "qemu-aarch64 not found (apt-get install qemu-user)"
need file

bench_init arm64
start=$(date +%s)
build_connector
[[ -n ${BENCH_BIN:-} ]] || log "build took $(($(date +%s) - start)) s"
[[ -f $BIN ]] || die "no binary at $BIN"
file "$BIN" | grep -q 'ARM aarch64' || die "$BIN is not an aarch64 binary ($BUILD_KIND)"

for i in $(seq "$RUNS"); do
    out=$("$PY" "$ROOT/.ci/smoke.py" "$BIN" qemu-aarch64) || die "smoke run $i failed: $out"
    total=$(sed -n 's/^smoke: all ok in \([0-9.]*\) s$/\1/p' <<<"$out")
    listen=$(sed -n 's/^smoke: ok   start, listening on .* (\([0-9.]*\) s)$/\1/p' <<<"$out")
    echo "$total $listen" >>"$TMP/times"
    log "run $i: smoke $total s, start -> listening $listen s"
done

stats() { # column -> "median / max"
    sort -n -k"$1" "$TMP/times" | awk -v c="$1" '{ v[NR] = $c } END {
        m = (NR % 2) ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2
        printf "%.2f s median, %.2f s max", m, v[NR] }'
}

printf '%-44s %s\n' "build" "$BUILD_KIND"
printf '%-44s %s\n' "aarch64 static binary (stripped)" "$(wc -c <"$BIN") bytes ($(awk -v b="$(wc -c <"$BIN")" 'BEGIN{printf "%.2f MB", b/1e6}'))"
printf '%-44s %s\n' "smoke test under qemu-aarch64 ($RUNS runs)" "$(stats 1)"
printf '%-44s %s\n' "  of which start -> listening on" "$(stats 2)"
printf '%-44s %s\n' "qemu" "$(qemu-aarch64 --version | head -n1)"
printf '%-44s %s\n' "load average at the end" "$(cut -d' ' -f1-3 /proc/loadavg)"
