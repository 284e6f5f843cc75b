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

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$HERE/.." && pwd)
TARGET=aarch64-unknown-linux-musl
RUNS=${BENCH_RUNS:-5}
PY=${PYTHON:-python3}

if ! [[ $RUNS =~ ^[0-9]+$ ]] || ((RUNS < 1 || RUNS > 50)); then
    echo "arm64.sh: BENCH_RUNS must be an integer from 1 to 50" >&2
    exit 2
fi
command -v qemu-aarch64 >/dev/null || { echo "arm64.sh: qemu-aarch64 not found (apt-get install qemu-user)" >&2; exit 1; }

if [[ -n ${BENCH_BIN:-} ]]; then
    BIN=$BENCH_BIN
else
    echo "[bench] cargo build --release --target $TARGET" >&2
    start=$(date +%s)
    (cd "$ROOT" && cargo build --release --target "$TARGET" >&2)
    echo "[bench] build took $(($(date +%s) - start)) s" >&2
    BIN=$ROOT/target/$TARGET/release/aion-connector
fi
[[ -f $BIN ]] || { echo "arm64.sh: no binary at $BIN" >&2; exit 1; }
file "$BIN" | grep -q 'ARM aarch64' || { echo "arm64.sh: $BIN is not an aarch64 binary" >&2; exit 1; }

TMP=$(mktemp -d "${TMPDIR:-/tmp}/aion-arm64.XXXXXX")
trap 'rm -rf "$TMP"' EXIT
for i in $(seq "$RUNS"); do
    out=$("$PY" "$ROOT/.ci/smoke.py" "$BIN" qemu-aarch64) || { echo "$out" >&2; exit 1; }
    total=$(sed -n 's/^smoke: all ok in \([0-9.]*\) s$/\1/p' <<<"$out")
    listen=$(sed -n 's/^smoke: ok   start, listening on .* (\([0-9.]*\) s)$/\1/p' <<<"$out")
    echo "$total $listen" >>"$TMP/times"
    echo "[bench] run $i: smoke $total s, start -> listening $listen s" >&2
done

stats() { # column -> "median / max"
    sort -n -k"$1" "$TMP/times" | awk -v c="$1" '{ v[NR] = $c } END {
        m = (NR % 2) ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2
        printf "%.2f s median, %.2f s max", m, v[NR] }'
}

printf '%-44s %s\n' "aarch64 static binary (stripped)" "$(wc -c <"$BIN") bytes ($(awk -v b="$(wc -c <"$BIN")" 'BEGIN{printf "%.2f MB", b/1e6}'))"
printf '%-44s %s\n' "smoke test under qemu-aarch64 ($RUNS runs)" "$(stats 1)"
printf '%-44s %s\n' "  of which start -> listening on" "$(stats 2)"
printf '%-44s %s\n' "qemu" "$(qemu-aarch64 --version | head -n1)"
printf '%-44s %s\n' "load average at the end" "$(cut -d' ' -f1-3 /proc/loadavg)"
