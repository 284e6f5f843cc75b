#!/usr/bin/env bash
# bench/ops.sh: figures of running the connector like a service: a GET /metrics
# scrape, a `status` round trip (on the socket, and the whole `aion-connector
# status` command), a SIGHUP reload, the `runs` action, with BENCH_PROJECTS
# projects served, BENCH_TERMINALS terminals open and the run history filled
# first with BENCH_HISTORY runs of the fake acpx (bench/fake-acpx) spread over
# BENCH_HISTORY_PROJECTS projects (the history keeps 20 per project).
# See bench/README.md for what each figure means.
#
# Usage: bench/ops.sh             (from anywhere; about 20 s after the build)
# Env:   BENCH_BIN=path           skip the build, measure this binary
#        BENCH_PROJECTS=100       projects in the config
#        BENCH_TERMINALS=20       terminals open while measuring
#        BENCH_HISTORY=100        runs in the history before measuring
#        BENCH_HISTORY_PROJECTS=5 projects they are spread over (at most BENCH_PROJECTS)
#        BENCH_RUNS_CALLS=1000    `runs` actions timed (on p0, one keep-alive connection)
#        BENCH_SCRAPES=2000       /metrics scrapes over one keep-alive connection
#        BENCH_STATUS=2000        status round trips on one socket connection
#        BENCH_COMMANDS=50        `aion-connector status --json` runs
#        BENCH_RELOADS=50         SIGHUPs
#        PYTHON=python3
#
# Only 127.0.0.1 is contacted. Every process started here is stopped on exit.
set -euo pipefail

# shellcheck source=bench/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
PROJECTS=$(setting BENCH_PROJECTS 100 1 2000)
TERMINALS=$(setting BENCH_TERMINALS 20 0 200)
SCRAPES=$(setting BENCH_SCRAPES 2000 1 100000)
STATUS=$(setting BENCH_STATUS 2000 1 100000)
COMMANDS=$(setting BENCH_COMMANDS 50 1 1000)
RELOADS=$(setting BENCH_RELOADS 50 1 1000)
HISTORY=$(setting BENCH_HISTORY 100 0 10000)
HISTORY_PROJECTS=$(setting BENCH_HISTORY_PROJECTS $((PROJECTS < 5 ? PROJECTS : 5)) 1 "$PROJECTS")
RUNS_CALLS=$(setting BENCH_RUNS_CALLS 1000 1 100000)
HELPER="$HERE/opsbench.py"
FAKE="$HERE/fake-acpx"
[[ -x $FAKE ]] || usage "$FAKE is not executable"

bench_init ops
need_py
bench_binary

# ---------------------------------------------------------------- config, connector
TOKEN=$(new_token)
METRICS_TOKEN=$(new_token)
CONFIG="$TMP/aion.config.json"
{
    printf '{"port":0,"host":"127.0.0.1","metricsToken":"%s","limits":{"terminalsPerProject":%d},"projects":{' \
        "$METRICS_TOKEN" "$((TERMINALS + 1))"
    for ((i = 0; i < PROJECTS; i++)); do
        mkdir -p "$TMP/ws/p$i"
        if (( i == 0 )); then t=$TOKEN; else t=$(new_token); fi
        agents='{}'
        if (( i < HISTORY_PROJECTS )); then
            agents='{"fake":{}}'
            printf '%s\n' "$t" >>"$TMP/history-tokens"
        fi
        printf '%s"p%d":{"token":"%s","dir":"%s","agents":%s}' "$([[ $i == 0 ]] || echo ,)" "$i" "$t" \
            "$TMP/ws/p$i" "$agents"
    done
    printf '}}\n'
} >"$CONFIG"
chmod 600 "$CONFIG"
mkdir -p "$TMP/bin"
ln -s "$FAKE" "$TMP/bin/acpx"
start_connector ops "$CONFIG" PATH="$TMP/bin:$PATH" AION_BENCH_PY="$PYBIN"
SOCKET="$TMP/state-ops/aion-connector/mcp.sock"
[[ -S $SOCKET ]] || die "no socket at $SOCKET"
for ((i = 0; i < TERMINALS; i++)); do
    "$PY" - "$SRV_ADDR" "$TOKEN" <<'PY' || die "terminal.spawn failed"
import http.client, json, sys
host, port = sys.argv[1].rsplit(":", 1)
c = http.client.HTTPConnection(host, int(port), timeout=10)
c.request("POST", "/", json.dumps({"token": sys.argv[2], "action": "terminal.spawn", "payload": {}}))
r = c.getresponse()
sys.exit(0 if r.status == 200 else 1)
PY
done

# ---------------------------------------------------------------- run history
if (( HISTORY > 0 )); then
    log "$HISTORY runs into the history ($HISTORY_PROJECTS projects)"
    HELPER_TIMEOUT=$((HISTORY * 10 + 60)) helper fill fill "$SRV_ADDR" "$TMP/history-tokens" "$HISTORY"
    expect "$TMP/fill.kv" fill_failed 0 "history fill"
fi
KEPT=$(find "$TMP/state-ops/aion-connector/runs" -name '*.jsonl' 2>/dev/null | wc -l)

# ---------------------------------------------------------------- measurements
log "$SCRAPES scrapes of /metrics"
helper scrape scrape "$SRV_ADDR" "$METRICS_TOKEN" "$SCRAPES"
log "$STATUS status round trips on the socket"
helper status status "$SOCKET" "$STATUS"
log "$RUNS_CALLS runs actions"
helper runs runs "$SRV_ADDR" "$TOKEN" "$RUNS_CALLS"

log "$COMMANDS runs of aion-connector status --json"
cmd_us=()
for ((i = 0; i < COMMANDS; i++)); do
    t0=$(now_us)
    XDG_STATE_HOME="$TMP/state-ops" "$BIN" status "$CONFIG" --json >"$TMP/status.json" || die "status failed"
    cmd_us+=($(( $(now_us) - t0 )))
done
CMD_P50=$(median -l "${cmd_us[@]}")

log "$RELOADS reloads"
reloads_logged() { (( $(grep -c 'reloaded ' "$TMP/ops.err" || true) >= $1 )); }
hup_us=()
for ((i = 1; i <= RELOADS; i++)); do
    t0=$(now_us)
    kill -HUP "$SRV_PID"
    until reloads_logged "$i"; do
        (( $(now_us) - t0 < 10000000 )) || die "reload $i not logged within 10 s"
        sleep 0.002
    done
    hup_us+=($(( $(now_us) - t0 )))
done
HUP_P50=$(median -l "${hup_us[@]}")
mapfile -t reload_ms < <(grep -o 'reloaded .* ms=[0-9.]*' "$TMP/ops.err" | sed 's/.*ms=//')
RELOAD_MS=$(median -l "${reload_ms[@]}")
RSS=$(rss_kb "$SRV_PID")
log_warns "$TMP/ops.err" connector

# ---------------------------------------------------------------- summary
table_start "aion-connector ops figures ($VERSION, $PROJECTS projects, $TERMINALS terminals, $KEPT runs in the history)"
row "history fill ($HISTORY runs, $HISTORY_PROJECTS projects)" "$(kv "$TMP/fill.kv" fill_s) s, $(kv "$TMP/fill.kv" fill_failed) failed"
row "GET /metrics (keep-alive), p50 / p99" "$(kv "$TMP/scrape.kv" scrape_p50_us) / $(kv "$TMP/scrape.kv" scrape_p99_us) us, $(kv "$TMP/scrape.kv" scrape_bytes) bytes"
row "status on the socket, p50 / p99" "$(kv "$TMP/status.kv" status_p50_us) / $(kv "$TMP/status.kv" status_p99_us) us, $(kv "$TMP/status.kv" status_bytes) bytes"
row "aion-connector status --json (exec), p50" "${CMD_P50} us"
row "runs action (p0: $(kv "$TMP/runs.kv" runs_finished) finished), p50 / p99" "$(kv "$TMP/runs.kv" runs_p50_us) / $(kv "$TMP/runs.kv" runs_p99_us) us, $(kv "$TMP/runs.kv" runs_bytes) bytes"
row "SIGHUP -> 'reloaded' logged, p50" "${HUP_P50} us (the connector's own ms=: ${RELOAD_MS})"
row "connector RSS after" "$(mib "$RSS")"
table_end
