#!/usr/bin/env bash
# bench/delivery.sh: delivery under faults (the outbox): what 300 runs left
# undelivered by a dead callback cost (threads, descriptors, memory), whether
# they fit in 256 descriptors, and, with a full disk, how long after space is
# freed the posts kept in memory are spooled and how long the delivery takes
# once the callback is back. Measured for the binary built here ("after")
# and, if given, an older one ("before"). See bench/README.md.
#
# Usage: bench/delivery.sh        (about 2-4 min after the build)
# Env:   BENCH_BIN=path           skip the build, measure this binary
#        BENCH_BEFORE=path        also measure this (older) binary, e.g. main's
#        BENCH_RUNS=300           runs left undelivered
#        PYTHON=python3
#
# The full-disk part mounts a 4 MiB tmpfs (root only; skipped with a note
# otherwise); the 256-descriptor part needs prlimit (util-linux).
# Only 127.0.0.1 is ever contacted. Every process started here is stopped on exit.
set -euo pipefail

# shellcheck source=bench/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
RUNS=$(setting BENCH_RUNS 300 1 2000)
HELPER="$HERE/deliverybench.py"
FAKE="$HERE/fake-acpx"
[[ -x $FAKE ]] || usage "$FAKE is not executable"

bench_init delivery
MOUNTS=()
# The tmpfs mounts of the full-disk part, undone once every process is stopped.
unmount_all() {
    local m
    for m in "${MOUNTS[@]}"; do
        umount -l "$m" 2>/dev/null || true
    done
}
CLEANUP_HOOKS+=(unmount_all)

# ---------------------------------------------------------------- 0. tools
need_py
HAVE_PRLIMIT=no
if command -v prlimit >/dev/null; then HAVE_PRLIMIT=yes; else note "prlimit missing: the 256-descriptor figures are skipped"; fi

# ---------------------------------------------------------------- 1. build
build_connector
cp "$BIN" "$TMP/after"
BINS=(after)
if [[ -n ${BENCH_BEFORE:-} ]]; then
    [[ -x $BENCH_BEFORE ]] || die "BENCH_BEFORE=$BENCH_BEFORE is not executable"
    cp "$BENCH_BEFORE" "$TMP/before"
    BINS=(before after)
fi

mkdir -p "$TMP/bin" "$TMP/ws"
ln -s "$FAKE" "$TMP/bin/acpx"
TOKEN=$(new_token)
export AION_TOKEN=$TOKEN # for the helper only; never in argv

# delivery_config NAME: $TMP/NAME.json, stateDir $TMP/NAME-state, 16 runs at once.
delivery_config() {
    mkdir -p "$TMP/$1-state"
    write_config "$TMP/$1.json" '{"pi":{"description":"Pi"}}' \
        "\"stateDir\":\"$TMP/$1-state\",\"limits\":{\"runsPerProject\":16,\"shutdownSeconds\":2,\"stopGraceSeconds\":1}"
}

# serve NAME BIN [NOFILE]: start_server with $TMP/BIN $TMP/NAME.json (under
# prlimit --nofile=NOFILE when given); sets SRV_PID and SRV_ADDR.
serve() {
    local name=$1 bin=$2 nofile=${3:-} pre=()
    if [[ -n $nofile ]]; then pre=(prlimit "--nofile=$nofile:$nofile" --); fi
    start_server "$name" env PATH="$TMP/bin:$PATH" "$MARK" AION_BENCH_PY="$PYBIN" AION_TOKEN= \
        "${pre[@]}" "$TMP/$bin" "$TMP/$name.json"
}

# lib.sh's helper; the helpers' stderr (in $TMP/NAME.herr) is progress, not a problem
HELPER_STDERR=log

# wait_log NAME REGEX COUNT SECONDS: until the server log has COUNT matching lines.
wait_log() {
    local i n=0
    for ((i = 0; i < $4 * 20; i++)); do
        n=$(grep -cE "$2" "$TMP/$1.err" || true)
        (( n >= $3 )) && return 0
        sleep 0.05
    done
    note "$1: only $n of $3 log lines /$2/ within $4 s"
    return 1
}

fds() { find "/proc/$1/fd" -mindepth 1 -maxdepth 1 2>/dev/null | wc -l; }
emfile() { grep -cE 'os error 2[34]|Too many open files|No file descriptors' "$TMP/$1.err" || true; }

declare -A R # results: R[bin.key]

# ---------------------------------------------------------------- 2. 300 undelivered runs
for b in "${BINS[@]}"; do
    name="idle-$b"
    delivery_config "$name"
    port=$(free_port)
    log "$b: $RUNS runs against a dead callback (port $port)"
    serve "$name" "$b"
    pid=$SRV_PID
    R[$b.threads0]=$(threads "$pid")
    R[$b.fds0]=$(fds "$pid")
    helper "$name-runs" runs "$SRV_ADDR" "$RUNS" idle "lines=2 interval_us=0" "http://127.0.0.1:$port"
    wait_log "$name" '\] run .* ended: ' "$RUNS" 180 || true
    sleep 2 # the streams' first attempts are made; nothing more changes
    R[$b.threads]=$(threads "$pid")
    R[$b.fds]=$(fds "$pid")
    R[$b.rss]=$(rss_kb "$pid")
    log "$b: callback back"
    helper "$name-deliver" deliver "$port" idle "$RUNS" 120
    R[$b.deliver_ms]=$(kv "$TMP/$name-deliver.kv" all_ms)
    R[$b.closed]=$(kv "$TMP/$name-deliver.kv" closed)
    R[$b.repeated]=$(kv "$TMP/$name-deliver.kv" repeated)
    stop "$pid" 10
done

# ---------------------------------------------------------------- 3. the same in 256 descriptors
if [[ $HAVE_PRLIMIT == yes ]]; then
    for b in "${BINS[@]}"; do
        name="fd256-$b"
        delivery_config "$name"
        port=$(free_port)
        log "$b: $RUNS runs against a dead callback, nofile 256"
        serve "$name" "$b" 256
        pid=$SRV_PID
        helper "$name-runs" runs "$SRV_ADDR" "$RUNS" fd "lines=2 interval_us=0" "http://127.0.0.1:$port"
        R[$b.fd_invoked]=$(kv "$TMP/$name-runs.kv" invoked)
        wait_log "$name" '\] run .* ended: ' "$RUNS" 180 || true
        R[$b.fd_ended]=$(grep -c '\] run .* ended: complete' "$TMP/$name.err" || true)
        sleep 2
        helper "$name-deliver" deliver "$port" fd "$RUNS" 60
        R[$b.fd_closed]=$(kv "$TMP/$name-deliver.kv" closed)
        R[$b.fd_repeated]=$(kv "$TMP/$name-deliver.kv" repeated)
        R[$b.emfile]=$(emfile "$name")
        stop "$pid" 10
    done
fi

# ---------------------------------------------------------------- 4. a full disk
HAVE_TMPFS=no
for b in "${BINS[@]}"; do
    name="full-$b"
    delivery_config "$name"
    if ! mount -t tmpfs -o size=4m tmpfs "$TMP/$name-state" 2>/dev/null; then
        note "cannot mount a tmpfs (root only): the full-disk figures are skipped"
        break
    fi
    HAVE_TMPFS=yes
    MOUNTS+=("$TMP/$name-state")
    free=$(df -B1 --output=avail "$TMP/$name-state" | tail -n 1)
    head -c $((free - 256 * 1024)) /dev/zero >"$TMP/$name-state/ballast" 2>/dev/null || true
    port=$(free_port)
    log "$b: 3 runs of 1500 lines, 256 KiB free, callback down"
    serve "$name" "$b"
    pid=$SRV_PID
    helper "$name-runs" runs "$SRV_ADDR" 3 full "lines=1500 interval_us=0" "http://127.0.0.1:$port"
    wait_log "$name" '\] run .* ended: ' 3 60 || true
    status="$TMP/$name-state/outbox.status"
    if [[ $b == after ]]; then
        helper "$name-mem" status "$status" "s['memoryRecords'] > 0" 10
        R[$b.mem_records]=$(kv "$TMP/$name-mem.kv" memoryRecords)
    fi
    R[$b.disk_errors]=$(grep -cE '\[(ERROR|WARN)\].*(No space left|os error 28)' "$TMP/$name.err" || true)
    log "$b: space freed"
    if [[ $b == after ]]; then
        helper "$name-spooled" status "$status" "s['memoryRecords'] == 0 and s['diskError'] is None" 30 \
            "$TMP/$name-state/ballast"
        R[$b.spool_ms]=$(kv "$TMP/$name-spooled.kv" ms)
    else
        rm -f "$TMP/$name-state/ballast"
    fi
    log "$b: callback back"
    helper "$name-deliver" deliver "$port" full 3 30
    R[$b.full_ms]=$(kv "$TMP/$name-deliver.kv" all_ms)
    R[$b.full_first_ms]=$(kv "$TMP/$name-deliver.kv" first_post_ms)
    R[$b.full_closed]=$(kv "$TMP/$name-deliver.kv" closed)
    R[$b.full_posts]=$(kv "$TMP/$name-deliver.kv" posts)
    R[$b.full_repeated]=$(kv "$TMP/$name-deliver.kv" repeated)
    stop "$pid" 10
done

# ---------------------------------------------------------------- 5. summary
g() { printf '%s' "${R[$1]:--}"; }
{
    echo
    echo "delivery under faults: $BUILD_KIND; runs=$RUNS"
    printf '%-58s' "figure"
    for b in "${BINS[@]}"; do printf '%-22s' "$b"; done
    echo
    figure() { # figure LABEL KEY
        printf '%-58s' "$1"
        for b in "${BINS[@]}"; do printf '%-22s' "$(g "$b.$2")"; done
        echo
    }
    figure "threads, idle" threads0
    figure "descriptors, idle" fds0
    figure "threads, $RUNS runs undelivered" threads
    figure "descriptors, $RUNS runs undelivered" fds
    figure "RSS kB, $RUNS runs undelivered" rss
    figure "callback back: ms until all $RUNS closed" deliver_ms
    figure "callback back: runs closed" closed
    figure "callback back: posts repeated" repeated
    if [[ $HAVE_PRLIMIT == yes ]]; then
        figure "nofile 256: runs invoked" fd_invoked
        figure "nofile 256: runs ended complete" fd_ended
        figure "nofile 256: EMFILE/ENFILE log lines" emfile
        figure "nofile 256: runs closed after the callback is back (60 s)" fd_closed
        figure "nofile 256: posts repeated" fd_repeated
    fi
    if [[ $HAVE_TMPFS == yes ]]; then
        figure "full disk: posts kept in memory" mem_records
        figure "full disk: ENOSPC log lines" disk_errors
        figure "full disk: ms from space freed to all spooled" spool_ms
        figure "full disk: callback back -> first post, ms" full_first_ms
        figure "full disk: callback back -> 3 runs closed, ms (30 s max)" full_ms
        figure "full disk: runs closed" full_closed
        figure "full disk: posts received" full_posts
        figure "full disk: posts repeated" full_repeated
    fi
    if ((${#NOTES[@]})); then
        echo
        echo "notes:"
        printf '  - %s\n' "${NOTES[@]}"
    fi
} | tee "$TMP/summary.txt"
