# shellcheck shell=bash
# Shared by the bench scripts, sourced right after `set -euo pipefail`: settings,
# logging, one cleanup trap for every process and file a bench starts, the build,
# starting a server and reading its address, waiting with a deadline, the Python
# helper runs, the /proc readings and the summary table.
# shellcheck disable=SC2034 # most variables set here are read by the callers

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd) # bench/
ROOT=$(cd "$HERE/.." && pwd)
TARGET=x86_64-unknown-linux-musl
PY=${PYTHON:-python3}
ME=$(basename "$0")
TMP=""          # bench_init: the run's mktemp -d directory, removed on exit
MARK=""         # bench_init: AION_BENCH_MARK=$TMP, for processes to be found by their environment
PIDS=()         # stopped on exit (SIGTERM, 5 s, SIGKILL)
SRV_PIDS=()     # connectors started: the shells of their terminals are killed on exit
NOTES=()        # problems seen, listed under the table
TOKEN=""        # the project token of write_config (new_token)
HELPER=""       # the bench's Python helper
HELPER_ENV=()   # NAME=value added to the helper's environment
HELPER_TIMEOUT=1800
HELPER_STDERR=note # note: helper stderr is a problem; log: it is progress, shown in the log
CLEANUP_HOOKS=() # commands bench_cleanup runs after stopping every process, before removing $TMP
ROW_W=44        # width of the first column of the table

log() { printf '[bench] %s\n' "$*" >&2; }
note() { NOTES+=("$*"); log "NOTE: $*"; }
die() { log "FATAL: $*"; exit 1; }
usage() { echo "$ME: $*" >&2; exit 2; }

# VAR=$(setting ENV DEFAULT MIN [MAX]): $ENV (DEFAULT when unset), which must be
# an integer from MIN to MAX (no upper limit without MAX); anything else exits 2
# (set -e ends the script on the failed assignment).
setting() {
    local env=$1 val=${!1:-$2} min=$3 max=${4:-} ok=no
    if [[ $val =~ ^[0-9]{1,9}$ ]] && (( 10#$val >= min )); then
        if [[ -z $max ]] || (( 10#$val <= max )); then ok=yes; fi
    fi
    if [[ $ok == no ]]; then
        if [[ -n $max ]]; then
            usage "$env must be an integer from $min to $max"
        elif (( min == 1 )); then
            usage "$env must be a positive integer"
        else
            usage "$env must be an integer of at least $min"
        fi
    fi
    printf '%d' "$((10#$val))"
}

# bench_init NAME: the temp dir $TMP (aion-NAME.XXXXXX), $MARK, and the trap
# that stops everything this bench starts, on any exit (Ctrl-C included); a
# bench with more to undo adds a function to CLEANUP_HOOKS.
bench_init() {
    TMP=$(mktemp -d "${TMPDIR:-/tmp}/aion-$1.XXXXXX")
    MARK="AION_BENCH_MARK=$TMP"
    trap bench_cleanup EXIT
    trap 'exit 130' INT TERM
}

# find_original: the Node original from $ORIG_CLI (never inside this repository).
# Sets ORIG (its dist/cli.js, "" when it cannot be run), ORIG_SKIP (why not),
# NODE and NODE_VERSION.
find_original() {
    ORIG="" ORIG_SKIP="" NODE=${NODE:-node} NODE_VERSION=""
    if [[ -z ${ORIG_CLI:-} ]]; then
        ORIG_SKIP="skipped: ORIG_CLI is unset (ORIG_CLI=/path/to/dist/cli.js of the original)"
    elif [[ ! -f $ORIG_CLI ]]; then
        die "ORIG_CLI=$ORIG_CLI is not a file"
    elif [[ $(realpath "$ORIG_CLI") == "$ROOT"/* ]]; then
        die "ORIG_CLI=$ORIG_CLI is inside this repository: keep the original outside it"
    elif ! command -v "$NODE" >/dev/null; then
        ORIG_SKIP="skipped: $NODE not found (set NODE)"
    else
        ORIG=$(realpath "$ORIG_CLI")
        NODE_VERSION=$("$NODE" --version)
    fi
    [[ -n $ORIG ]] || note "Node original $ORIG_SKIP"
}

bench_cleanup() {
    local pid hook
    stop_pids
    for pid in $(leftovers); do
        kill -KILL "$pid" 2>/dev/null || true
    done
    for hook in "${CLEANUP_HOOKS[@]}"; do
        "$hook" || true
    done
    if [[ -n $TMP ]]; then rm -rf "$TMP"; fi
}

# ---------------------------------------------------------------- waiting, processes

now_us() { local t=${EPOCHREALTIME//[!0-9]/}; printf '%s' "$((10#$t))"; }

# wait_for SECONDS PID CMD...: run CMD every 50 ms until it succeeds (0). Gives up
# (1) after SECONDS, or as soon as PID (- for none) is gone, after one last try.
wait_for() {
    local end=$(( $(now_us) + $1 * 1000000 )) pid=$2
    shift 2
    until "$@"; do
        if [[ $pid != - ]] && ! alive "$pid"; then
            "$@"
            return
        fi
        (( $(now_us) < end )) || return 1
        sleep 0.05
    done
}

# alive PID: the process exists and is not a zombie (kill -0 is true for zombies).
alive() {
    local state
    [[ -r /proc/$1/stat ]] || return 1
    read -r _ _ state _ <"/proc/$1/stat" 2>/dev/null || return 1
    [[ $state != Z ]]
}
gone() { ! alive "$1"; }
none_alive() {
    local pid
    for pid in "$@"; do
        if alive "$pid"; then return 1; fi
    done
}

# forget PID: drop PID from PIDS once it has been waited for (its number may be reused).
forget() {
    local i
    for i in "${!PIDS[@]}"; do
        if [[ ${PIDS[i]} == "$1" ]]; then unset 'PIDS[i]'; fi
    done
}

# stop PID [SECONDS]: SIGTERM, up to SECONDS (default 5), then SIGKILL;
# sets STOP_CODE and STOP_MS.
stop() {
    local pid=$1 wait_s=${2:-5} t0
    STOP_CODE=-
    STOP_MS=-
    t0=$(now_us)
    kill -TERM "$pid" 2>/dev/null || true
    if ! wait_for "$wait_s" - gone "$pid"; then
        kill -KILL "$pid" 2>/dev/null || true
        note "pid $pid ignored SIGTERM for $wait_s s, killed"
    fi
    STOP_CODE=0
    wait "$pid" 2>/dev/null || STOP_CODE=$?
    forget "$pid"
    STOP_MS=$(( ($(now_us) - t0) / 1000 ))
}

# stop_server PID LABEL [SECONDS]: stop, and a note unless it exited 0; sets
# STOPPED ("exit CODE in MS ms").
stop_server() {
    stop "$1" "${3:-5}"
    STOPPED="exit $STOP_CODE in ${STOP_MS} ms"
    [[ $STOP_CODE == 0 ]] || note "$2: SIGTERM gave exit code $STOP_CODE"
}

# stop_pids: SIGTERM to every pid in PIDS, up to 5 s for them all to go, then SIGKILL.
stop_pids() {
    local pid
    (( ${#PIDS[@]} )) || return 0
    for pid in "${PIDS[@]}"; do
        if alive "$pid"; then kill -TERM "$pid" 2>/dev/null || true; fi
    done
    wait_for 5 - none_alive "${PIDS[@]}" && return 0
    for pid in "${PIDS[@]}"; do
        if alive "$pid"; then kill -KILL "$pid" 2>/dev/null || true; fi
    done
}

# env_pids LINE...: pids of processes (this shell aside) whose environment has one
# of the lines LINE (NAME=value); a LINE ending in '*' stands for every line that
# starts with the rest.
env_pids() {
    local env pid line want
    local -a lines
    for env in /proc/[0-9]*/environ; do
        pid=${env#/proc/}
        pid=${pid%/environ}
        [[ $pid != "$$" && $pid != "$BASHPID" ]] || continue
        lines=()
        { mapfile -d '' -t lines <"$env"; } 2>/dev/null || continue
        for line in "${lines[@]}"; do
            for want in "$@"; do
                if [[ $want == *'*' ]]; then
                    [[ $line == "${want%'*'}"* ]] || continue
                else
                    [[ $line == "$want" ]] || continue
                fi
                printf '%s\n' "$pid"
                continue 3
            done
        done
    done
}

# marked: processes whose environment carries $MARK (the agents, sessions and
# helpers a bench hands it to, and their children).
marked() { env_pids "$MARK"; }

# shells_of PID: processes that carry a terminal id of connector PID
# (AION_TERMINAL_ID=t<pid>-…): the shells of its terminals and their children,
# which get no AION_ variable, $MARK included.
shells_of() { env_pids "AION_TERMINAL_ID=t$1-*"; }

leftovers() {
    local want=() pid
    [[ -n $MARK ]] && want+=("$MARK")
    for pid in "${SRV_PIDS[@]}"; do
        want+=("AION_TERMINAL_ID=t$pid-*")
    done
    (( ${#want[@]} )) || return 0
    env_pids "${want[@]}"
}

# ---------------------------------------------------------------- tools, build

# need_py: $PY is there and at least Python 3.11 (what the helpers are written
# for); PYBIN is the interpreter itself (not a pyenv shim).
need_py() {
    command -v "$PY" >/dev/null || die "$PY not found"
    "$PY" -c 'import sys; sys.exit(sys.version_info < (3, 11))' || die "$PY is older than 3.11"
    PYBIN=$("$PY" -c 'import sys; print(sys.executable)')
}

need() {
    local c
    for c in "$@"; do command -v "$c" >/dev/null || die "$c not found"; done
}

# want_wrk: wrk is on PATH, installed with apt-get if it was missing; false if it can't be had.
want_wrk() {
    command -v wrk >/dev/null && return 0
    log "wrk missing: apt-get install -y wrk"
    timeout 300 apt-get install -y wrk >"$TMP/apt.log" 2>&1 || tail -n 3 "$TMP/apt.log" >&2
    command -v wrk >/dev/null
}

# build_connector: sets BIN and BUILD_KIND. BENCH_BIN if given, else the
# static musl release build (the target added if missing), else the host
# release build with a note (BUILD_FALLBACK=no: no fallback, the failure ends the bench).
build_connector() {
    if [[ -n ${BENCH_BIN:-} ]]; then
        BIN=$BENCH_BIN
        BUILD_KIND="given (BENCH_BIN)"
        [[ -x $BIN ]] || die "BENCH_BIN=$BIN is not executable"
        return
    fi
    if ! rustup target list --installed 2>/dev/null | grep -qx "$TARGET"; then
        log "rustup target add $TARGET"
        timeout 600 rustup target add "$TARGET" >&2 || log "rustup target add failed"
    fi
    log "cargo build --release --target $TARGET"
    if (cd "$ROOT" && timeout 900 cargo build --release --target "$TARGET") >"$TMP/build.log" 2>&1; then
        BIN="$ROOT/target/$TARGET/release/aion-connector"
        BUILD_KIND="musl static ($TARGET)"
        return
    fi
    tail -n 8 "$TMP/build.log" >&2
    [[ ${BUILD_FALLBACK:-yes} == yes ]] || die "cargo build --release --target $TARGET failed"
    note "musl build failed: FALLBACK to the host release build (not a static binary)"
    log "cargo build --release"
    if ! (cd "$ROOT" && timeout 900 cargo build --release) >"$TMP/build.log" 2>&1; then
        tail -n 20 "$TMP/build.log" >&2
        die "host release build failed too"
    fi
    BIN="$ROOT/target/release/aion-connector"
    BUILD_KIND="host release (FALLBACK, musl build failed)"
}

# build_debug: sets DEBUG_BIN and DEBUG_KIND: BENCH_DEBUG_BIN if given, else the
# host debug build (`cargo build`; for the debug-only test seams such as
# AION_LEASE_TIME_SCALE). A failed build ends the bench.
build_debug() {
    if [[ -n ${BENCH_DEBUG_BIN:-} ]]; then
        DEBUG_BIN=$BENCH_DEBUG_BIN
        DEBUG_KIND="given (BENCH_DEBUG_BIN)"
        [[ -x $DEBUG_BIN ]] || die "BENCH_DEBUG_BIN=$DEBUG_BIN is not executable"
        return
    fi
    log "cargo build (debug)"
    (cd "$ROOT" && timeout 900 cargo build) >"$TMP/debug-build.log" 2>&1 \
        || die "cargo build failed: $(tail -n 3 "$TMP/debug-build.log" | tr '\n' ' ')"
    DEBUG_BIN="$ROOT/target/debug/aion-connector"
    DEBUG_KIND="host debug"
}

# bench_binary: build_connector, then BIN is a copy in $TMP (a rebuild during the
# run changes nothing) and BIN_BUILT the original; sets VERSION.
# bench_binary debug: the same for build_debug: DEBUG_BIN is a copy in $TMP and
# DEBUG_BIN_BUILT the original; BIN and VERSION are left alone.
# shellcheck disable=SC2120 # the argument is optional
bench_binary() {
    if [[ ${1:-} == debug ]]; then
        build_debug
        DEBUG_BIN_BUILT=$DEBUG_BIN
        DEBUG_BIN="$TMP/aion-connector-debug"
        cp "$DEBUG_BIN_BUILT" "$DEBUG_BIN"
        return
    fi
    build_connector
    BIN_BUILT=$BIN
    BIN="$TMP/aion-connector"
    cp "$BIN_BUILT" "$BIN"
    VERSION=$("$BIN" --version 2>/dev/null | head -n1 || true)
}

# ---------------------------------------------------------------- configs, servers

new_token() { od -An -N32 -tx1 /dev/urandom | tr -d ' \n'; }

# free_port: a 127.0.0.1 TCP port free at the time of asking.
free_port() { "$PY" "$HERE/pushbench.py" freeport; }

# write_config FILE AGENTS_JSON [MEMBERS]: one project "bench" with $TOKEN, dir
# $TMP/ws and these agents, on 127.0.0.1 port $CONFIG_PORT (default 0: any free
# port); MEMBERS (e.g. "limits":{…}) go into the top level. Mode 600.
write_config() {
    mkdir -p "$TMP/ws"
    cat >"$1" <<EOF
{"port":${CONFIG_PORT:-0},"host":"127.0.0.1",${3:+$3,}"projects":{"bench":{"token":"$TOKEN","dir":"$TMP/ws","agents":$2}}}
EOF
    chmod 600 "$1"
}

# listening FILE: true once FILE has a whole line with "listening on ADDR"; sets
# SRV_ADDR, LISTEN_LINE (that line) and LISTEN_AT (its number).
listening() {
    local line n=0
    while IFS= read -r line; do # a last line without its newline is not read
        n=$((n + 1))
        if [[ $line == *"listening on "* ]]; then
            SRV_ADDR=${line##*listening on }
            LISTEN_LINE=$line
            LISTEN_AT=$n
            return 0
        fi
    done <"$1"
    return 1
}

# start_server NAME CMD...: start CMD in $TMP (stdout and stderr in $TMP/NAME.out
# and $TMP/NAME.err) and wait up to 10 s for its "listening on 127.0.0.1:PORT"
# line; sets SRV_PID and SRV_ADDR.
start_server() {
    local name=$1 first=""
    shift
    (cd "$TMP" && exec "$@") >"$TMP/$name.out" 2>"$TMP/$name.err" &
    SRV_PID=$!
    PIDS+=("$SRV_PID")
    if ! wait_for 10 "$SRV_PID" listening "$TMP/$name.out"; then
        IFS= read -r first <"$TMP/$name.out" || true
        tail -n 5 "$TMP/$name.err" >&2 || true
        die "server $name did not print 'listening on ADDR' (first line: '${first}')"
    fi
    [[ $SRV_ADDR == 127.0.0.1:* ]] || die "server $name listens on $SRV_ADDR, expected 127.0.0.1:PORT"
}

# start_connector NAME CONFIG [NAME=value...]: start_server with $BIN CONFIG, its
# own state dir $TMP/state-NAME (a spool directory takes one connector; a bench
# whose connectors take over one another's state sets CONNECTOR_STATE to the dir
# they share), $MARK and the given variables in its environment; "listening on
# ADDR" must be its first line.
start_connector() {
    local name=$1 config=$2
    shift 2
    start_server "$name" env XDG_STATE_HOME="${CONNECTOR_STATE:-$TMP/state-$name}" "$MARK" "$@" "$BIN" "$config"
    SRV_PIDS+=("$SRV_PID")
    if (( LISTEN_AT != 1 )) || [[ $LISTEN_LINE != "listening on "* ]]; then
        die "server $name printed '$LISTEN_LINE' as line $LISTEN_AT, expected 'listening on ADDR' first"
    fi
}

# ---------------------------------------------------------------- helpers, checks

# helper NAME [VAR=value...] ARGS...: "$PY" "$HELPER" ARGS, with HELPER_ENV and
# the given variables in its environment, in the background (a signal reaches the
# trap at once, and cleanup stops it), for at most HELPER_TIMEOUT s; stdout in
# $TMP/NAME.kv, stderr in $TMP/NAME.herr. A non-zero exit is a note; so is stderr
# output, unless HELPER_STDERR=log (progress: then it is shown in the log).
helper() {
    local name=$1 code=0 pid env=("${HELPER_ENV[@]}")
    shift
    while [[ ${1:-} =~ ^[A-Za-z_][A-Za-z0-9_]*= ]]; do
        env+=("$1")
        shift
    done
    timeout "$HELPER_TIMEOUT" env "${env[@]}" "$PY" "$HELPER" "$@" >"$TMP/$name.kv" 2>"$TMP/$name.herr" &
    pid=$!
    PIDS+=("$pid")
    wait "$pid" || code=$?
    forget "$pid"
    if [[ $HELPER_STDERR == log && -s $TMP/$name.herr ]]; then
        sed 's/^/    /' "$TMP/$name.herr" >&2
    fi
    if (( code != 0 )); then
        note "helper $name exited with code $code: $(tail -n 3 "$TMP/$name.herr" | tr '\n' ' ')"
    elif [[ $HELPER_STDERR == note && -s $TMP/$name.herr ]]; then
        note "helper $name said: $(head -n 3 "$TMP/$name.herr" | tr '\n' ' ')"
    fi
}

kv() { # kv FILE KEY -> value of KEY=value in FILE, or "-"
    local line
    line=$(grep -m1 "^$2=" "$1" 2>/dev/null || true)
    if [[ -n $line ]]; then printf '%s' "${line#*=}"; else printf -- '-'; fi
}

# expect FILE KEY VALUE LABEL: note when KEY in FILE is not VALUE.
expect() {
    local got
    got=$(kv "$1" "$2")
    [[ $got == "$3" ]] || note "$4: $2=$got (expected $3)"
}

# log_warns FILE LABEL [ALLOWED_REGEX]: counts the [WARN]/[ERROR] lines of a log
# into WARNS (WARNS_OK of them match ALLOWED_REGEX) and notes the others.
log_warns() {
    local f=$1 extra=""
    WARNS=$(grep -cE '\[(WARN|ERROR)\]' "$f" || true)
    WARNS_OK=0
    if [[ -n ${3:-} ]]; then
        WARNS_OK=$(grep -E '\[(WARN|ERROR)\]' "$f" | grep -cE "$3" || true)
        extra="unexpected "
    fi
    if (( WARNS > WARNS_OK )); then
        note "$2: $((WARNS - WARNS_OK)) ${extra}WARN/ERROR log lines, e.g.: $(grep -E '\[(WARN|ERROR)\]' "$f" | { if [[ -n ${3:-} ]]; then grep -vE "$3"; else cat; fi; } | head -n 1)"
    fi
}

# wrk_ping NAME ADDR TOKEN SECONDS [PID]: pings over keep-alive, wrk -t2 -c16 for
# SECONDS (bench/ping.lua); the report in $TMP/NAME.txt, its figures in
# $TMP/NAME.kv (wrk_rps, wrk_p50_ms, wrk_p99_ms, wrk_requests, wrk_non2xx,
# wrk_socket_errors), wrk's exit code in WRK_CODE; a failed run, non-2xx answers
# and socket errors are notes. With PID, its VmRSS is sampled every 100 ms
# meanwhile, the peak in LOAD_PEAK (kB).
wrk_ping() {
    local name=$1 addr=$2 token=$3 secs=$4 watch=${5:--} pid r
    LOAD_PEAK=0
    WRK_CODE=0
    AION_TOKEN=$token timeout $((secs + 20)) \
        wrk -t2 -c16 -d"${secs}s" --latency -s "$HERE/ping.lua" "http://$addr/" >"$TMP/$name.txt" 2>&1 &
    pid=$!
    PIDS+=("$pid")
    while alive "$pid"; do
        if [[ $watch != - ]]; then
            r=$(rss_kb "$watch")
            if (( r > LOAD_PEAK )); then LOAD_PEAK=$r; fi
        fi
        sleep 0.1
    done
    wait "$pid" || WRK_CODE=$?
    forget "$pid"
    "$PY" "$HERE/pushbench.py" wrk "$TMP/$name.txt" >"$TMP/$name.kv"
    (( WRK_CODE == 0 )) || note "wrk $name exited with code $WRK_CODE"
    [[ $(kv "$TMP/$name.kv" wrk_non2xx) == 0 ]] \
        || note "wrk $name: $(kv "$TMP/$name.kv" wrk_non2xx) non-2xx/3xx responses"
    [[ $(kv "$TMP/$name.kv" wrk_socket_errors) == none ]] \
        || note "wrk $name: socket errors $(kv "$TMP/$name.kv" wrk_socket_errors)"
}

# ---------------------------------------------------------------- /proc, units, table

status_kb() { awk -v k="$2:" '$1 == k {print $2}' "/proc/$1/status" 2>/dev/null || echo 0; }
rss_kb() { status_kb "$1" VmRSS; }
hwm_kb() { status_kb "$1" VmHWM; }
threads() { status_kb "$1" Threads; }
mib() { awk -v k="$1" 'BEGIN{ if (k ~ /^[0-9]+$/) printf "%.1f MiB", k/1024; else printf "-" }'; }
mb() { awk -v b="$1" 'BEGIN{ if (b ~ /^[0-9]+$/) printf "%.1f MB", b/1e6; else printf "-" }'; }

# numbers VALUE...: the VALUEs that are decimal numbers (1, -2, 0.5, .5), one a
# line; "-", "" and anything else (a missing kv) is left out.
numbers() {
    local v
    for v in "$@"; do
        if [[ $v =~ ^-?([0-9]+[.]?[0-9]*|[.][0-9]+)$ ]]; then printf '%s\n' "$v"; fi
    done
}

# median [-l] [-f FORMAT] VALUE...: the median of the VALUEs that are numbers,
# "-" when none is. An even count gives the mean of the two middle values, or
# with -l the lower of them (then the median is always one of the values). The
# value is printed as given (a mean with awk's %.6g) unless FORMAT (an awk
# printf format, e.g. %.3g) is given.
median() {
    local low=0 fmt=""
    while (( $# )); do
        case $1 in
            -l) low=1; shift ;;
            -f) fmt=$2; shift 2 ;;
            *) break ;;
        esac
    done
    numbers "$@" | sort -g | awk -v low="$low" -v fmt="$fmt" '{ v[NR] = $1 } END {
        if (!NR) { print "-"; exit }
        m = (NR % 2 || low) ? v[int((NR + 1) / 2)] : (v[NR / 2] + v[NR / 2 + 1]) / 2
        if (fmt != "") printf fmt "\n", m; else print m }'
}

# maximum VALUE...: the largest of the VALUEs that are numbers, as given; "-" when none is.
maximum() { numbers "$@" | sort -g | awk '{ m = $1 } END { if (NR) print m; else print "-" }'; }

# ratio A B [FORMAT]: A/B (awk printf FORMAT, default %.2f); "-" unless both are
# positive numbers.
ratio() {
    if [[ $(numbers "$1" "$2" | wc -l) == 2 ]]; then
        awk -v a="$1" -v b="$2" -v f="${3:-%.2f}" 'BEGIN { if (a + 0 > 0 && b + 0 > 0) printf f "\n", a / b; else print "-" }'
    else
        echo -
    fi
}

row() { printf '%-*s %s\n' "$ROW_W" "$1" "$2"; }
rule() { printf '%s\n' "--------------------------------------------------------------------------------------------"; }

# table_start TITLE: the head of the summary table, with the build row.
table_start() {
    echo
    echo "$1"
    rule
    row "build" "$BUILD_KIND"
}

# table_end: the closing rule and the notes.
table_end() {
    rule
    if (( ${#NOTES[@]} )); then
        echo "problems / notes:"
        printf '  - %s\n' "${NOTES[@]}"
    else
        echo "problems / notes: none"
    fi
}
