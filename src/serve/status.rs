//! What the running connector reports about itself: the `status` op of the
//! local socket (`aion-connector status` asks it) and the figures of
//! `GET /metrics` (the counters of [`crate::metrics`] plus the gauges read here). [`Parts`] holds the domain objects; each report takes
//! their snapshots (plain structs, copied under each module's own lock) and
//! builds the answer with no lock held.

use crate::background::Background;
use crate::delivery::outbox::{OriginCounts, OriginStats, Outbox, origin_label};
use crate::delivery::report::secs;
use crate::lease::Leases;
use crate::project::ProjectSet;
use crate::runs::Runs;
use crate::terminal::Terminals;
use serde_json::{Value, json};
use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Instant;

/// The push-mode connector's parts, as the reports see them.
pub struct Parts {
    pub started: Instant,
    pub listen: String,
    pub state: PathBuf,
    pub projects: Arc<ProjectSet>,
    pub runs: Arc<Runs>,
    pub terminals: Arc<Terminals>,
    pub background: Arc<Background>,
    pub outbox: Arc<Outbox>,
    pub leases: Option<Leases>,
    /// The port's TLS when on (its fingerprint follows a reload of the files).
    pub tls: Option<Arc<crate::net::tls::Tls>>,
    /// SHA-256 of the config's `metricsToken` (swapped by a reload).
    pub metrics_token: Mutex<Option<[u8; 32]>>,
}

impl Parts {
    /// Whether `token` may read `/metrics`: any project's token, or `metricsToken`.
    pub fn metrics_allowed(&self, token: &str) -> bool {
        use sha2::{Digest, Sha256};
        let digest: [u8; 32] = Sha256::digest(token.as_bytes()).into();
        let mut ok = false;
        for p in self.projects.current().iter() {
            ok |= p.token_matches(&digest);
        }
        let own = *self.metrics_token.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(want) = own {
            let diff = want.iter().zip(&digest).fold(0u8, |acc, (a, b)| acc | (a ^ b));
            ok |= std::hint::black_box(diff) == 0;
        }
        ok
    }

    /// `GET /metrics`: the Prometheus text format (0.0.4).
    pub fn metrics(&self) -> String {
        use crate::metrics::{gauge, label};
        use std::fmt::Write as _;
        let runs = self.runs.snapshot();
        let terms = self.terminals.snapshot();
        let procs = self.background.all();
        let origins = self.outbox.origins();
        let mut out = String::with_capacity(8 << 10);
        out.push_str("# HELP aion_connector_build_info The connector's version.\n");
        out.push_str("# TYPE aion_connector_build_info gauge\n");
        let _ =
            writeln!(out, "aion_connector_build_info{{version=\"{}\"}} 1", label(crate::version::VERSION));
        gauge(
            &mut out,
            "aion_connector_uptime_seconds",
            "Seconds since the connector started.",
            self.started.elapsed().as_secs(),
        );
        crate::metrics::render(&mut out);
        gauge(
            &mut out,
            "aion_connector_runs_active",
            "Agent runs under way (closing ones included).",
            runs.len(),
        );
        gauge(
            &mut out,
            "aion_connector_terminals",
            "Terminals open (shells alive).",
            terms.iter().filter(|t| t.alive).count(),
        );
        gauge(
            &mut out,
            "aion_connector_background_processes",
            "Background processes of the agents still running.",
            procs.iter().filter(|(_, s)| matches!(s.status, crate::background::Status::Running)).count(),
        );
        let counts = self.outbox.origin_counts();
        type Pick = fn(&OriginCounts) -> u64;
        let per_origin: [(&str, &str, Pick); 3] = [
            (
                "aion_connector_posts_delivered_total",
                "Callback posts delivered (or skipped for good), by callback origin.",
                |c| c.delivered,
            ),
            (
                "aion_connector_posts_retried_total",
                "Callback posts that failed and are tried again, by callback origin.",
                |c| c.retried,
            ),
            (
                "aion_connector_posts_dropped_total",
                "Callback posts given up after the delivery window, by callback origin.",
                |c| c.dropped,
            ),
        ];
        for (name, help, pick) in per_origin {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} counter");
            for (origin, c) in &counts {
                let _ = writeln!(out, "{name}{{origin=\"{}\"}} {}", label(origin), pick(c));
            }
        }
        // The backlog by origin, the labels as above (origins() reports
        // what the status shows; the label drops anything past the port).
        type Gauge = fn(&OriginStats) -> u64;
        let backlog: [(&str, &str, Gauge); 3] = [
            ("aion_connector_posts_pending", "Callback posts not yet delivered, by callback origin.", |o| {
                o.records
            }),
            ("aion_connector_spool_bytes", "Bytes of undelivered posts on disk, by callback origin.", |o| {
                o.bytes
            }),
            ("aion_connector_origin_down", "Whether a callback origin answers nothing now.", |o| {
                u64::from(o.down_for.is_some())
            }),
        ];
        // Origins that share a label (`other`) are summed; down if any is.
        let mut by_label: BTreeMap<&str, [u64; 3]> = BTreeMap::new();
        for o in &origins {
            let g = by_label.entry(origin_label(&o.origin)).or_default();
            for (i, (_, _, pick)) in backlog.iter().enumerate() {
                g[i] += pick(o);
            }
        }
        for (i, (name, help, _)) in backlog.iter().enumerate() {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} gauge");
            for (key, g) in &by_label {
                let v = if *name == "aion_connector_origin_down" { g[i].min(1) } else { g[i] };
                let _ = writeln!(out, "{name}{{origin=\"{}\"}} {v}", label(key));
            }
        }
        out.push_str(
            "# HELP aion_connector_lease_link The link to Aion's lease socket (1 on the current state).\n",
        );
        out.push_str("# TYPE aion_connector_lease_link gauge\n");
        let link = self.leases.as_ref().map_or("none", |l| l.snapshot().link);
        for state in ["none", "starting", "up", "down"] {
            let _ =
                writeln!(out, "aion_connector_lease_link{{state=\"{state}\"}} {}", u8::from(state == link));
        }
        out
    }

    /// The `status` answer: `{"ok":true,"version",…,"projects":[…],"outbox":{…},"lease":…}`.
    pub fn status(&self) -> Value {
        let runs = self.runs.snapshot();
        let terms = self.terminals.snapshot();
        let procs = self.background.all();
        let served: Vec<String> = self.projects.current().iter().map(|p| p.config.id.clone()).collect();
        // Projects served, then any that a reload removed while their work goes on.
        let mut ids = served.clone();
        let extra: BTreeSet<&String> = runs
            .iter()
            .map(|r| &r.project)
            .chain(terms.iter().map(|t| &t.project))
            .chain(procs.iter().map(|(p, _)| p))
            .filter(|p| !served.contains(p))
            .collect();
        ids.extend(extra.into_iter().cloned());
        let projects: Vec<Value> = ids
            .iter()
            .map(|id| {
                let runs: Vec<Value> = runs
                    .iter()
                    .filter(|r| &r.project == id)
                    .map(|r| {
                        json!({
                            "session": r.session,
                            "agent": r.agent,
                            "state": r.state,
                            "ageSeconds": secs(r.age),
                            "posts": r.posts,
                            "pending": r.pending,
                        })
                    })
                    .collect();
                let terminals: Vec<Value> = terms
                    .iter()
                    .filter(|t| &t.project == id)
                    .map(|t| {
                        json!({
                            "id": t.id,
                            "session": t.session,
                            "kind": t.kind,
                            "alive": t.alive,
                            "attached": t.attached,
                            "ageSeconds": secs(t.age),
                        })
                    })
                    .collect();
                let background: Vec<Value> = procs
                    .iter()
                    .filter(|(p, _)| p == id)
                    .map(|(_, s)| {
                        json!({"pid": s.pid, "command": s.command, "cwd": s.cwd, "started": s.started, "status": s.status})
                    })
                    .collect();
                json!({
                    "id": id,
                    "served": served.contains(id),
                    "runs": runs,
                    "terminals": terminals,
                    "background": background,
                })
            })
            .collect();
        json!({
            "ok": true,
            "mode": "push",
            "version": crate::version::VERSION,
            "pid": std::process::id(),
            "uptimeSeconds": self.started.elapsed().as_secs(),
            "listen": self.listen,
            "tls": self.tls.as_ref().map(|t| json!({"fingerprint": t.fingerprint()})),
            "stateDir": self.state.display().to_string(),
            "projects": projects,
            "outbox": crate::delivery::report::outbox(&self.outbox),
            "lease": self.leases.as_ref().map(|l| l.snapshot().json()),
        })
    }
}
