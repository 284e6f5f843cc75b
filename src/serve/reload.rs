//! SIGHUP: the config file is read again and its projects (tokens, dirs,
//! agents, sensitive files), `metricsToken` and the limits of runs,
//! terminals, background processes and git are served from then on,
//! without dropping a connection, a run or a terminal. A project unchanged
//! keeps its state; a changed one (a rotated token) is served anew while the
//! runs it started go on with the version they began with; a removed one is
//! no longer served, its runs end normally (their posts still signed) and
//! its terminals live until closed or idle. A file with problems changes
//! nothing: each problem is logged by its JSON path, as `check` names it.
//! `host`, `port`, `stateDir`, the `lease` section and the [`Limits::fixed`]
//! ones take effect at the next start (a reload that changes them says so).
//!
//! [`Limits::fixed`]: crate::config::Limits::fixed
//!
//! Threads: `reload` (started by [`start`], owned by push mode's wiring,
//! which joins it after the accept loop ends) receives [`Shutdown::reloads`]
//! and ends once shutdown has begun.

use crate::config::{self, LiveLimits};
use crate::error::Error;
use crate::logging::{info, warn};
use crate::project::{self, ProjectState};
use crate::serve::status::Parts;
use crate::shutdown::Shutdown;
use crossbeam_channel::RecvTimeoutError;
use std::path::PathBuf;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// What a reload compares with and builds from.
pub struct Reloader {
    pub path: PathBuf,
    pub state: PathBuf,
    pub own_files: Vec<PathBuf>,
    pub host: String,
    pub port: u16,
    /// The limits served (the fixed ones are compared, the others swapped).
    pub limits: Arc<LiveLimits>,
    pub parts: Arc<Parts>,
}

/// Starts the `reload` thread.
pub fn start(reloader: Reloader, shutdown: Arc<Shutdown>) -> std::io::Result<JoinHandle<()>> {
    std::thread::Builder::new().name("reload".into()).stack_size(256 << 10).spawn(move || {
        while !shutdown.requested() {
            match shutdown.reloads.recv_timeout(Duration::from_millis(250)) {
                Ok(()) => {
                    let ok = reloader.reload();
                    crate::metrics::reload(ok);
                }
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => return,
            }
        }
    })
}

impl Reloader {
    /// Reads the config again and serves it; false (nothing changed) if it has problems.
    pub fn reload(&self) -> bool {
        let t0 = Instant::now();
        let shown = self.path.display();
        let refuse = |why: &str| warn!("reload refused, the config served is unchanged: {why}");
        let (mut config, warnings) = match config::load(&self.path) {
            Ok(loaded) => loaded,
            Err(Error::Config { problems, .. }) => {
                for p in &problems {
                    refuse(&format!("{shown}: {p}"));
                }
                return false;
            }
            Err(e) => {
                refuse(&e.to_string());
                return false;
            }
        };
        for w in warnings {
            warn!("config: {w}");
        }
        let roots = match project::prepare_roots(&config) {
            Ok(roots) => roots,
            Err(e) => {
                refuse(&e.to_string());
                return false;
            }
        };
        let later = |what: &str| warn!("reload: {what} changed; it takes effect at the next start");
        if config.host != self.host || config.port != self.port {
            later("host or port");
        }
        let state = config::state_dir(config.state_dir.as_deref());
        if state.canonicalize().unwrap_or(state) != self.state {
            later("stateDir");
        }
        if config.limits.fixed() != self.limits.get().fixed() {
            later(
                "limits.bodyBytes, headerBytes, connections, idleSeconds, requestSeconds, shutdownSeconds or deliverySeconds",
            );
        }
        let wants_leases = config.projects.iter().any(|p| p.agents.iter().any(|a| !a.lease_apps.is_empty()));
        if wants_leases && self.parts.leases.is_none() {
            later("leaseApps (no agent had any at start: the lease client is not running)");
        }
        let metrics_token = config.metrics_token.as_ref().map(|t| super::digest(&t.0));
        let fresh = project::projects(&mut config, roots, &self.own_files, &self.state);
        let old = self.parts.projects.current();
        let (mut added, mut changed) = (Vec::new(), Vec::new());
        let next: Vec<Arc<ProjectState>> = fresh
            .into_iter()
            .map(|f| match old.iter().find(|o| o.config.id == f.config.id) {
                Some(o) if same(o, &f) => Arc::clone(o),
                Some(_) => {
                    changed.push(f.config.id.clone());
                    f
                }
                None => {
                    added.push(f.config.id.clone());
                    f
                }
            })
            .collect();
        let removed: Vec<String> = old
            .iter()
            .filter(|o| !next.iter().any(|n| n.config.id == o.config.id))
            .map(|o| o.config.id.clone())
            .collect();
        let count = next.len();
        self.parts.projects.replace(next);
        self.parts.background.set_per_project(config.limits.background_per_project);
        self.limits.set(config.limits);
        *self.parts.metrics_token.lock().unwrap_or_else(|e| e.into_inner()) = metrics_token;
        let list = |v: &[String]| if v.is_empty() { "-".to_string() } else { v.join(",") };
        info!(
            "reloaded {shown}: {count} project(s), added={} removed={} changed={} ms={:.2}",
            list(&added),
            list(&removed),
            list(&changed),
            t0.elapsed().as_secs_f64() * 1e3
        );
        true
    }
}

/// The same project, config and token alike (its `Debug` hides the token).
fn same(a: &ProjectState, b: &ProjectState) -> bool {
    a.root == b.root
        && a.config.token.0 == b.config.token.0
        && format!("{:?}", a.config) == format!("{:?}", b.config)
}
