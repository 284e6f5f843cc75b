//! What the running connector reports about itself: the `status` op of the
//! local socket (`aion-connector status` asks it) and the figures of
//! `GET /metrics`. [`Parts`] holds the domain objects; each report takes
//! their snapshots (plain structs, copied under each module's own lock) and
//! builds the answer with no lock held.

use crate::background::Background;
use crate::delivery::outbox::Outbox;
use crate::lease::Leases;
use crate::project::ProjectSet;
use crate::runs::Runs;
use crate::terminal::Terminals;
use serde_json::{Value, json};
use std::collections::BTreeSet;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

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
}

fn secs(d: Duration) -> f64 {
    (d.as_secs_f64() * 10.0).round() / 10.0
}

impl Parts {
    /// The `status` answer: `{"ok":true,"version",…,"projects":[…],"outbox":{…},"lease":…}`.
    pub fn status(&self) -> Value {
        let runs = self.runs.snapshot();
        let terms = self.terminals.snapshot();
        let procs = self.background.all();
        let stats = self.outbox.stats();
        let origins = self.outbox.origins();
        let lease = self.leases.as_ref().map(Leases::snapshot);
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
        let origins: Vec<Value> = origins
            .iter()
            .map(|o| {
                json!({
                    "origin": o.origin,
                    "streams": o.streams,
                    "records": o.records,
                    "bytes": o.bytes,
                    "oldestPendingSeconds": o.oldest_failing.map(secs),
                    "lastError": o.last_error,
                    "downSeconds": o.down_for.map(secs),
                })
            })
            .collect();
        json!({
            "ok": true,
            "version": crate::version::VERSION,
            "pid": std::process::id(),
            "uptimeSeconds": self.started.elapsed().as_secs(),
            "listen": self.listen,
            "stateDir": self.state.display().to_string(),
            "projects": projects,
            "outbox": {
                "streams": stats.streams,
                "delivered": stats.delivered,
                "retried": stats.retried,
                "dropped": stats.dropped,
                "spooledRecords": stats.spooled_records,
                "spooledBytes": stats.spooled_bytes,
                "memoryRecords": stats.memory_records,
                "diskError": stats.disk_error,
                "origins": origins,
            },
            "lease": lease.map(|l| json!({
                "link": l.link,
                "apps": l.apps.iter().map(|a| json!({"app": a.app, "users": a.users, "granted": a.granted})).collect::<Vec<_>>(),
            })),
        })
    }
}
