#!/usr/bin/env bash
# bench/mcp.sh: figures of `aion-connector mcp`, the agents' MCP server:
# exec -> `initialize` answered, a tool call's round trip through the
# connector's local socket, the memory of one mcp process.
# See bench/README.md for what each figure means.
#
# Usage: bench/mcp.sh             (from anywhere; about 10 s after the build)
# Env:   BENCH_BIN=path           skip the build, measure this binary
#        BENCH_STARTS=200         mcp processes started (figure 1)
#        BENCH_CALLS=1000         tool calls in one mcp process (figure 2)
#        PYTHON=python3
#
# Nothing is contacted over the network (the connector listens on 127.0.0.1,
# the MCP servers talk to it on a Unix socket). Every process started here is
# stopped on exit.
set -euo pipefail

# shellcheck source=bench/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
STARTS=$(setting BENCH_STARTS 200 1 2000)
CALLS=$(setting BENCH_CALLS 1000 1 100000)
HELPER="$HERE/mcpbench.py"

bench_init mcp

command -v "$PY" >/dev/null || die "$PY not found"

# ---------------------------------------------------------------- build
BUILD_KIND=""
build_connector
VERSION=$("$BIN" --version 2>/dev/null | head -n1 || true)

# ---------------------------------------------------------------- connector
TOKEN=$(od -An -N32 -tx1 /dev/urandom | tr -d ' \n')
mkdir -p "$TMP/ws" "$TMP/state"
CONFIG="$TMP/aion.config.json"
cat >"$CONFIG" <<EOF
{"port":0,"host":"127.0.0.1","stateDir":"$TMP/state","projects":{"bench":{"token":"$TOKEN","dir":"$TMP/ws"}}}
EOF
chmod 600 "$CONFIG"
(cd "$TMP" && exec "$BIN" "$CONFIG") >"$TMP/srv.out" 2>"$TMP/srv.err" &
SRV_PID=$!
PIDS+=("$SRV_PID")
line=""
for ((i = 0; i < 100; i++)); do
    if [[ -s $TMP/srv.out ]]; then
        IFS= read -r line <"$TMP/srv.out"
        break
    fi
    alive "$SRV_PID" || break
    sleep 0.05
done
[[ $line == "listening on "* ]] || { tail -n 5 "$TMP/srv.err" >&2; die "the connector did not start"; }
SOCKET="$TMP/state/mcp.sock"
[[ -S $SOCKET ]] || die "no socket at $SOCKET"
KEY=$("$PY" "$HELPER" key "$TOKEN")

# ---------------------------------------------------------------- 1. starts
log "exec 'aion-connector mcp' -> initialize answered, $STARTS runs"
"$PY" "$HELPER" starts "$BIN" "$SOCKET" bench "$KEY" "$STARTS" >"$TMP/starts.kv" 2>"$TMP/starts.err" || true
[[ -s $TMP/starts.err ]] && note "starts: $(head -n 3 "$TMP/starts.err" | tr '\n' ' ')"
[[ $(kv "$TMP/starts.kv" starts_failures) == 0 ]] || note "starts: $(kv "$TMP/starts.kv" starts_failures) failed runs"

# ---------------------------------------------------------------- 2. calls
log "tools/call round trips through the socket, $CALLS calls"
"$PY" "$HELPER" calls "$BIN" "$SOCKET" bench "$KEY" "$CALLS" >"$TMP/calls.kv" 2>"$TMP/calls.err" || true
[[ -s $TMP/calls.err ]] && note "calls: $(head -n 3 "$TMP/calls.err" | tr '\n' ' ')"
[[ $(kv "$TMP/calls.kv" calls_unexpected) == 0 ]] || note "calls: $(kv "$TMP/calls.kv" calls_unexpected) unexpected answers"
SRV_RSS=$(rss_kb "$SRV_PID")
SRV_THREADS=$(threads "$SRV_PID")

stop "$SRV_PID"
[[ $STOP_CODE == 0 ]] || note "connector: SIGTERM gave exit code $STOP_CODE"
log_warns "$TMP/srv.err" connector

# ---------------------------------------------------------------- summary
s=$TMP/starts.kv
c=$TMP/calls.kv
table_start "aion-connector mcp bench  ($(date -u +%Y-%m-%dT%H:%M:%SZ), $(nproc) cores, ${VERSION:-version unknown})"
row "1. exec 'mcp' -> initialize answered" "p50 $(kv "$s" starts_p50_ms) ms, p99 $(kv "$s" starts_p99_ms) ms (min $(kv "$s" starts_min_ms), max $(kv "$s" starts_max_ms); n=$(kv "$s" starts_runs), failed $(kv "$s" starts_failures))"
row "   peak RSS of one mcp process" "$(kv "$s" starts_hwm_kb) kB ($(mib "$(kv "$s" starts_hwm_kb)"))"
row "2. tools/call round trip (socket)" "p50 $(kv "$c" calls_p50_ms) ms, p99 $(kv "$c" calls_p99_ms) ms (min $(kv "$c" calls_min_ms), max $(kv "$c" calls_max_ms); n=$(kv "$c" calls_count))"
row "   connector after the calls" "$SRV_RSS kB ($(mib "$SRV_RSS")), $SRV_THREADS threads"
table_end
