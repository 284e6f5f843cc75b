//! The connector's counters for `GET /metrics`: plain atomics in fixed
//! tables, so counting takes no lock and no allocation on the request path.
//! The gauges that describe state (runs active, terminals, the outbox's
//! backlog…) are not kept here: the scrape reads them from their owners.
//! A leaf: anything may count, nothing here imports the rest.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering::Relaxed};
use std::time::Duration;

/// The actions counted by name; any other is counted as `other`.
pub const ACTIONS: [&str; 22] = [
    "ping",
    "agents",
    "workspaces",
    "files.tree",
    "files.read",
    "git.status",
    "git.diff",
    "repos.sync",
    "invoke",
    "stop",
    "terminal.spawn",
    "terminal.input",
    "terminal.output",
    "terminal.resize",
    "terminal.close",
    "terminal.ws",
    "healthz",
    "metrics",
    "runs",
    "runs.output",
    "-",
    "other",
];
/// The statuses counted by code; any other is counted as `other`.
const STATUSES: [u16; 16] = [101, 200, 400, 401, 403, 404, 405, 408, 409, 413, 429, 431, 500, 502, 503, 504];
const STATUS_SLOTS: usize = STATUSES.len() + 1;
/// Upper bounds (seconds) of the request duration histogram's buckets; `+Inf` follows.
const BUCKETS: [f64; 12] = [0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0, 5.0, 30.0];
/// How runs end.
pub const OUTCOMES: [&str; 5] = ["complete", "error", "stopped", "timeout", "shutdown"];

#[allow(clippy::declare_interior_mutable_const)]
const ZERO: AtomicU64 = AtomicU64::new(0);
#[allow(clippy::declare_interior_mutable_const)]
const ROW: [AtomicU64; STATUS_SLOTS] = [ZERO; STATUS_SLOTS];

static REQUESTS: [[AtomicU64; STATUS_SLOTS]; ACTIONS.len()] = [ROW; ACTIONS.len()];
static DURATION_BUCKETS: [AtomicU64; BUCKETS.len()] = [ZERO; BUCKETS.len()];
static DURATION_COUNT: AtomicU64 = AtomicU64::new(0);
static DURATION_SUM_NS: AtomicU64 = AtomicU64::new(0);
static CONNECTIONS_OPEN: AtomicI64 = AtomicI64::new(0);
static RUNS_STARTED: AtomicU64 = AtomicU64::new(0);
static RUNS_FINISHED: [AtomicU64; OUTCOMES.len()] = [ZERO; OUTCOMES.len()];
static RELOADS: [AtomicU64; 2] = [ZERO; 2];

/// One answered request: its action (as logged), status and time.
pub fn request(action: &str, status: u16, took: Duration) {
    let a = ACTIONS.iter().position(|x| *x == action).unwrap_or(ACTIONS.len() - 1);
    let s = STATUSES.iter().position(|x| *x == status).unwrap_or(STATUSES.len());
    REQUESTS[a][s].fetch_add(1, Relaxed);
    let secs = took.as_secs_f64();
    if let Some(b) = BUCKETS.iter().position(|le| secs <= *le) {
        DURATION_BUCKETS[b].fetch_add(1, Relaxed);
    }
    DURATION_COUNT.fetch_add(1, Relaxed);
    DURATION_SUM_NS.fetch_add(took.as_nanos().min(u64::MAX as u128) as u64, Relaxed);
}

/// A connection opened (+1) or closed (-1).
pub fn connections(delta: i64) {
    CONNECTIONS_OPEN.fetch_add(delta, Relaxed);
}

pub fn run_started() {
    RUNS_STARTED.fetch_add(1, Relaxed);
}

/// A run ended; `outcome` is its log word (`complete`, `error (stopped)`, …).
pub fn run_finished(outcome: &str) {
    let kind = if outcome.starts_with("complete") {
        0
    } else if outcome.contains("stopped") {
        2
    } else if outcome.contains("timed out") {
        3
    } else if outcome.contains("shutting down") {
        4
    } else {
        1
    };
    RUNS_FINISHED[kind].fetch_add(1, Relaxed);
}

/// A reload (SIGHUP) applied (true) or refused (false).
pub fn reload(ok: bool) {
    RELOADS[usize::from(!ok)].fetch_add(1, Relaxed);
}

/// The counters above in the Prometheus text format (version 0.0.4).
pub fn render(out: &mut String) {
    out.push_str("# HELP aion_connector_requests_total Requests answered, by action and status.\n");
    out.push_str("# TYPE aion_connector_requests_total counter\n");
    for (a, row) in REQUESTS.iter().enumerate() {
        for (s, n) in row.iter().enumerate() {
            let n = n.load(Relaxed);
            if n == 0 {
                continue;
            }
            let status = STATUSES.get(s).map_or("other".to_string(), u16::to_string);
            let _ = writeln!(
                out,
                "aion_connector_requests_total{{action=\"{}\",status=\"{status}\"}} {n}",
                ACTIONS[a]
            );
        }
    }
    out.push_str(
        "# HELP aion_connector_request_duration_seconds Time from a request read to its answer made.\n",
    );
    out.push_str("# TYPE aion_connector_request_duration_seconds histogram\n");
    let mut cumulative = 0;
    for (le, n) in BUCKETS.iter().zip(&DURATION_BUCKETS) {
        cumulative += n.load(Relaxed);
        let _ = writeln!(out, "aion_connector_request_duration_seconds_bucket{{le=\"{le}\"}} {cumulative}");
    }
    let count = DURATION_COUNT.load(Relaxed);
    let _ = writeln!(out, "aion_connector_request_duration_seconds_bucket{{le=\"+Inf\"}} {count}");
    let sum = DURATION_SUM_NS.load(Relaxed) as f64 / 1e9;
    let _ = writeln!(out, "aion_connector_request_duration_seconds_sum {sum}");
    let _ = writeln!(out, "aion_connector_request_duration_seconds_count {count}");
    gauge(out, "aion_connector_connections_open", "HTTP connections open.", CONNECTIONS_OPEN.load(Relaxed));
    counter(out, "aion_connector_runs_started_total", "Agent runs started.", RUNS_STARTED.load(Relaxed));
    out.push_str("# HELP aion_connector_runs_finished_total Agent runs ended, by outcome.\n");
    out.push_str("# TYPE aion_connector_runs_finished_total counter\n");
    for (o, n) in OUTCOMES.iter().zip(&RUNS_FINISHED) {
        let _ = writeln!(out, "aion_connector_runs_finished_total{{outcome=\"{o}\"}} {}", n.load(Relaxed));
    }
    out.push_str("# HELP aion_connector_reloads_total Config reloads (SIGHUP), applied or refused.\n");
    out.push_str("# TYPE aion_connector_reloads_total counter\n");
    for (r, n) in ["ok", "refused"].iter().zip(&RELOADS) {
        let _ = writeln!(out, "aion_connector_reloads_total{{result=\"{r}\"}} {}", n.load(Relaxed));
    }
}

/// `# HELP`, `# TYPE gauge` and one sample.
pub fn gauge(out: &mut String, name: &str, help: &str, value: impl std::fmt::Display) {
    let _ = write!(out, "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {value}\n");
}

/// `# HELP`, `# TYPE counter` and one sample.
pub fn counter(out: &mut String, name: &str, help: &str, value: impl std::fmt::Display) {
    let _ = write!(out, "# HELP {name} {help}\n# TYPE {name} counter\n{name} {value}\n");
}

/// A label value escaped as the text format wants (`\\`, `\"`, `\n`).
pub fn label(value: &str) -> String {
    value.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}

#[cfg(test)]
mod tests {
    #[test]
    fn counts_land_in_their_cells_and_render() {
        super::request("ping", 200, std::time::Duration::from_micros(300));
        super::request("nope", 999, std::time::Duration::from_secs(100));
        let mut out = String::new();
        super::render(&mut out);
        assert!(out.contains("aion_connector_requests_total{action=\"ping\",status=\"200\"}"), "{out}");
        assert!(out.contains("aion_connector_requests_total{action=\"other\",status=\"other\"}"), "{out}");
        assert!(out.contains("aion_connector_request_duration_seconds_bucket{le=\"+Inf\"}"), "{out}");
        assert_eq!(super::label("a\"b\\c\nd"), "a\\\"b\\\\c\\nd");
    }
}
