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
command -v "$PY" >/dev/null || die "$PY not found"
"$PY" -c 'import sys; sys.exit(sys.version_info < (3, 11))' || die "$PY is older than 3.11"
PYBIN=$("$PY" -c 'import sys; print(sys.executable)')
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
TOKEN=$(od -An -N32 -tx1 /dev/urandom | tr -d ' \n')
export AION_TOKEN=$TOKEN # for the helper only; never in argv

# write_config NAME: $TMP/NAME.json, stateDir $TMP/NAME-state, 16 runs at once.
write_config() {
    mkdir -p "$TMP/$1-state"
    cat >"$TMP/$1.json" <<EOF
{"port":0,"host":"127.0.0.1","stateDir":"$TMP/$1-state","limits":{"runsPerProject":16,"shutdownSeconds":2,"stopGraceSeconds":1},"projects":{"bench":{"token":"$TOKEN","dir":"$TMP/ws","agents":{"pi":{"description":"Pi"}}}}}
EOF
    chmod 600 "$TMP/$1.json"
}

# start_server NAME BIN [NOFILE]: sets SRV_PID and SRV_ADDR.
start_server() {
    local name=$1 bin=$2 nofile=${3:-} i line="" pre=()
    [[ -n $nofile ]] && pre=(prlimit "--nofile=$nofile:$nofile" --)
    (cd "$TMP" && exec env PATH="$TMP/bin:$PATH" "$MARK" AION_BENCH_PY="$PYBIN" AION_TOKEN= \
        "${pre[@]}" "$TMP/$bin" "$TMP/$name.json") >"$TMP/$name.out" 2>"$TMP/$name.err" &
    SRV_PID=$!
    PIDS+=("$SRV_PID")
    for ((i = 0; i < 200; i++)); do
        if [[ -s $TMP/$name.out ]]; then
            IFS= read -r line <"$TMP/$name.out" || true
            [[ $line == *:* ]] && break
        fi
        alive "$SRV_PID" || break
        sleep 0.05
    done
    [[ $line == "listening on "* ]] || { tail -n 5 "$TMP/$name.err" >&2; die "server $name did not start"; }
    SRV_ADDR=${line#listening on }
}

helper() { # helper NAME ARGS...: output in $TMP/NAME.kv
    local name=$1 code=0
    shift
    "$PY" "$HELPER" "$@" >"$TMP/$name.kv" 2>"$TMP/$name.herr" &
    local hp=$!
    PIDS+=("$hp")
    wait "$hp" || code=$?
    (( code == 0 )) || note "helper $name exited with code $code: $(tail -n 3 "$TMP/$name.herr" | tr '\n' ' ')"
}

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
free_port() { "$PY" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

declare -A R # results: R[bin.key]

# ---------------------------------------------------------------- 2. 300 undelivered runs
for b in "${BINS[@]}"; do
    name="idle-$b"
    write_config "$name"
    port=$(free_port)
    log "$b: $RUNS runs against a dead callback (port $port)"
    start_server "$name" "$b"
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
        write_config "$name"
        port=$(free_port)
        log "$b: $RUNS runs against a dead callback, nofile 256"
        start_server "$name" "$b" 256
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
    write_config "$name"
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
    start_server "$name" "$b"
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
    row() { # row LABEL KEY
        printf '%-58s' "$1"
        for b in "${BINS[@]}"; do printf '%-22s' "$(g "$b.$2")"; done
        echo
    }
    row "threads, idle" threads0
    row "descriptors, idle" fds0
    row "threads, $RUNS runs undelivered" threads
    row "descriptors, $RUNS runs undelivered" fds
    row "RSS kB, $RUNS runs undelivered" rss
    row "callback back: ms until all $RUNS closed" deliver_ms
    row "callback back: runs closed" closed
    row "callback back: posts repeated" repeated
    if [[ $HAVE_PRLIMIT == yes ]]; then
        row "nofile 256: runs invoked" fd_invoked
        row "nofile 256: runs ended complete" fd_ended
        row "nofile 256: EMFILE/ENFILE log lines" emfile
        row "nofile 256: runs closed after the callback is back (60 s)" fd_closed
        row "nofile 256: posts repeated" fd_repeated
    fi
    if [[ $HAVE_TMPFS == yes ]]; then
        row "full disk: posts kept in memory" mem_records
        row "full disk: ENOSPC log lines" disk_errors
        row "full disk: ms from space freed to all spooled" spool_ms
        row "full disk: callback back -> first post, ms" full_first_ms
        row "full disk: callback back -> 3 runs closed, ms (30 s max)" full_ms
        row "full disk: runs closed" full_closed
        row "full disk: posts received" full_posts
        row "full disk: posts repeated" full_repeated
    fi
    if ((${#NOTES[@]})); then
        echo
        echo "notes:"
        printf '  - %s\n' "${NOTES[@]}"
    fi
} | tee "$TMP/summary.txt"
