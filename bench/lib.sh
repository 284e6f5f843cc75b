# shellcheck shell=bash
# Shared by the bench scripts (sourced): logging and process helpers.
# shellcheck disable=SC2034 # STOP_CODE, STOP_MS, BIN, BUILD_KIND are read by the callers
# The caller defines the array NOTES before sourcing.

log() { printf '[bench] %s\n' "$*" >&2; }
note() { NOTES+=("$*"); log "NOTE: $*"; }
die() { log "FATAL: $*"; exit 1; }

# alive PID: the process exists and is not a zombie (kill -0 is true for zombies).
alive() {
    local state
    [[ -r /proc/$1/stat ]] || return 1
    read -r _ _ state _ <"/proc/$1/stat" 2>/dev/null || return 1
    [[ $state != Z ]]
}

# stop PID [SECONDS]: SIGTERM, up to SECONDS (default 5), then SIGKILL;
# sets STOP_CODE and STOP_MS.
stop() {
    local pid=$1 wait_s=${2:-5} i t0 t1
    STOP_CODE=-
    STOP_MS=-
    t0=$(date +%s%N)
    kill -TERM "$pid" 2>/dev/null || true
    for ((i = 0; i < wait_s * 20; i++)); do
        alive "$pid" || break
        sleep 0.05
    done
    if alive "$pid"; then
        kill -KILL "$pid" 2>/dev/null || true
        note "pid $pid ignored SIGTERM for $wait_s s, killed"
    fi
    STOP_CODE=0
    wait "$pid" 2>/dev/null || STOP_CODE=$?
    t1=$(date +%s%N)
    STOP_MS=$(( (t1 - t0) / 1000000 ))
}

# build_connector: sets BIN and BUILD_KIND. BENCH_BIN if given, else the
# static musl release build (the target added if missing), else the host
# release build with a note. Needs ROOT, TARGET and TMP.
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
    note "musl build failed: FALLBACK to the host release build (not a static binary)"
    log "cargo build --release"
    if ! (cd "$ROOT" && timeout 900 cargo build --release) >"$TMP/build.log" 2>&1; then
        tail -n 20 "$TMP/build.log" >&2
        die "host release build failed too"
    fi
    BIN="$ROOT/target/release/aion-connector"
    BUILD_KIND="host release (FALLBACK, musl build failed)"
}

# stop_pids: SIGTERM to every pid in PIDS, up to 5 s for them to go, then SIGKILL.
stop_pids() {
    local pid i
    for pid in "${PIDS[@]}"; do
        if alive "$pid"; then
            kill -TERM "$pid" 2>/dev/null || true
        fi
    done
    for pid in "${PIDS[@]}"; do
        for ((i = 0; i < 100; i++)); do
            alive "$pid" || break
            sleep 0.05
        done
        if alive "$pid"; then
            kill -KILL "$pid" 2>/dev/null || true
        fi
    done
}

# marked: pids of processes whose environment carries $MARK (NAME=value).
marked() {
    local env pid
    for env in /proc/[0-9]*/environ; do
        pid=${env#/proc/}
        pid=${pid%/environ}
        if { tr '\0' '\n' <"$env"; } 2>/dev/null | grep -qxF -- "$MARK"; then
            printf '%s\n' "$pid"
        fi
    done
}

kv() { # kv FILE KEY -> value of KEY=value in FILE, or "-"
    local line
    line=$(grep -m1 "^$2=" "$1" 2>/dev/null || true)
    if [[ -n $line ]]; then printf '%s' "${line#*=}"; else printf -- '-'; fi
}
rss_kb() { awk '/^VmRSS:/{print $2}' "/proc/$1/status" 2>/dev/null || echo 0; }
hwm_kb() { awk '/^VmHWM:/{print $2}' "/proc/$1/status" 2>/dev/null || echo 0; }
threads() { awk '/^Threads:/{print $2}' "/proc/$1/status" 2>/dev/null || echo 0; }
mib() { awk -v k="$1" 'BEGIN{ if (k ~ /^[0-9]+$/) printf "%.1f MiB", k/1024; else printf "-" }'; }
mb() { awk -v b="$1" 'BEGIN{ if (b ~ /^[0-9]+$/) printf "%.1f MB", b/1e6; else printf "-" }'; }
