//! Push mode's wiring: reads the config (writing a starter one on first run),
//! prepares the projects and the state dir, opens the outbox, binds the port,
//! prints `listening on ADDR`, serves Channel Protocol v1 through the router
//! in [`channel`], answers the agents' MCP servers on the local socket
//! `<stateDir>/mcp.sock` ([`local`]), and shuts down in order on
//! SIGINT/SIGTERM: runs stopped (each posts its closing event), terminals
//! hung up, background processes ended, leases ended, the outbox drained
//! until the deadline.
//!
//! Threads: the accept loop runs on the main thread ([`crate::net::http`]
//! names the connection threads, [`crate::net::local`] the local socket's);
//! the domain modules name their own.

mod channel;
mod guard;
mod local;
mod reload;
mod status;

use crate::background::Background;
use crate::config::{self, DEFAULT_CONFIG, starter};
use crate::delivery::outbox::Outbox;
use crate::error::Error;
use crate::lease::Leases;
use crate::logging::{info, warn};
use crate::net::http;
use crate::project;
use crate::runs::Runs;
use crate::shutdown;
use crate::terminal::Terminals;
use crate::version::VERSION;
use channel::App;
use std::io::Write;
use std::net::{TcpListener, ToSocketAddrs};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

pub fn run(explicit: Option<PathBuf>) -> Result<i32, Error> {
    // First, before any other thread exists: every thread inherits the mask.
    let shutdown =
        shutdown::install_with_reload().map_err(|source| Error::Io { what: "signal setup", source })?;
    let raised_fds = crate::fds::raise_limit();
    let path = match explicit {
        Some(path) => path,
        None => {
            let path = PathBuf::from(DEFAULT_CONFIG);
            if !path.exists() {
                let agents = starter::write(&path)?;
                let shown = std::fs::canonicalize(&path).unwrap_or_else(|_| path.clone());
                info!(
                    "no config found: wrote a starter config to {} (mode 0600; the token is in it), agents on PATH: {}",
                    shown.display(),
                    if agents.is_empty() { "none".to_string() } else { agents.join(", ") }
                );
            }
            path
        }
    };
    let (mut config, warnings) = config::load(&path)?;
    for w in warnings {
        warn!("config: {w}");
    }
    for w in config::advice(&path, &config) {
        warn!("config: {w}");
    }
    let roots = project::prepare_roots(&config)?;
    // Absolute: the MCP servers' socket path is written into project dirs.
    let state = state_dir(&config)?;
    let tls = tls(&config, &path, &state)?;
    // The connector's own files are never served, whatever project dir holds them.
    let own_files: Vec<PathBuf> =
        [path.as_path(), state.as_path()].iter().filter_map(|p| p.canonicalize().ok()).collect();
    let projects = project::ProjectSet::new(project::projects(&mut config, roots, &own_files, &state));
    let signer = Arc::new(project::ProjectKeys(Arc::clone(&projects)));
    let spool = state.join("outbox");
    let outbox = Outbox::open(&spool, signer, config.limits.delivery)
        .map_err(|source| Error::StateDir { path: state.clone(), source })?;
    // The spool dir is ours now (the outbox holds its lock): whatever an
    // earlier connector on it left running is ended before work is accepted.
    crate::process::instance::set(&spool);
    let ended = crate::process::instance::end_previous(Duration::from_secs(2));
    if ended > 0 {
        warn!("ended {ended} process(es) left running by a previous connector on this state dir");
    }
    let addr = format!("{}:{}", config.host, config.port);
    let bind_err = |source| Error::Bind { addr: addr.clone(), source };
    let addrs: Vec<_> = (config.host.as_str(), config.port).to_socket_addrs().map_err(bind_err)?.collect();
    let listener = TcpListener::bind(addrs.as_slice()).map_err(bind_err)?;
    let local = listener.local_addr().map_err(bind_err)?;
    config.limits.connections = connection_cap(config.limits.connections, raised_fds);
    terminal_budget(config.limits.terminals_per_project, projects.current().len(), raised_fds);
    let limits = config.limits.clone();
    let count = projects.current().len();
    let leases = projects
        .current()
        .iter()
        .any(|p| p.config.agents.iter().any(|a| !a.lease_apps.is_empty()))
        .then(|| Leases::start((&config.lease).into()));
    let live = config::LiveLimits::new(limits.clone());
    let runs = Runs::new(Arc::clone(&outbox), Arc::clone(&live), leases.clone(), &state);
    let terminals = Terminals::new(Arc::clone(&live))
        .map_err(|source| Error::Io { what: "starting the terminals", source })?;
    let background = Background::new(limits.background_per_project, limits.stop_grace);
    let parts = Arc::new(status::Parts {
        started: Instant::now(),
        listen: local.to_string(),
        state: state.clone(),
        projects: Arc::clone(&projects),
        runs: Arc::clone(&runs),
        terminals: Arc::clone(&terminals),
        background: Arc::clone(&background),
        outbox: Arc::clone(&outbox),
        leases: leases.clone(),
        tls: tls.clone(),
        metrics_token: std::sync::Mutex::new(config.metrics_token.as_ref().map(|t| digest(&t.0))),
    });
    let socket = local::start(&state, Arc::clone(&parts))?;
    let reloader = reload::Reloader {
        path: path.clone(),
        state: state.clone(),
        own_files: own_files.clone(),
        host: config.host.clone(),
        port: config.port,
        limits: Arc::clone(&live),
        parts: Arc::clone(&parts),
        tls: tls.clone().zip(config.tls.clone()),
    };
    let reloads = reload::start(reloader, Arc::clone(&shutdown))
        .map_err(|source| Error::Io { what: "starting the reload thread", source })?;
    let app = Arc::new(
        App::new(projects, Arc::clone(&live), Arc::clone(&runs), Arc::clone(&terminals), Arc::clone(&parts))
            .allowing_origins(config.allowed_origins.clone()),
    );
    {
        let mut out = std::io::stdout().lock();
        let _ = writeln!(out, "listening on {local}");
        if let Some(tls) = &tls {
            let _ = writeln!(out, "tls fingerprint {}", tls.fingerprint());
        }
        let _ = out.flush();
    }
    info!("aion-connector {} serving {count} project(s) from {}", VERSION, path.display());
    let deadline = std::cell::Cell::new(None);
    http::serve(listener, limits.clone(), Arc::clone(&shutdown), app, tls, || {
        deadline.set(Some(Instant::now() + limits.shutdown));
        runs.stop_all();
        terminals.close_all();
        background.close();
    })
    .map_err(|source| Error::Io { what: "serving", source })?;
    socket.stop();
    if reloads.join().is_err() {
        warn!("the reload thread panicked");
    }
    background.finish();
    // Runs post their closing events; the outbox gets the rest of the time.
    let deadline = deadline.get().unwrap_or_else(|| Instant::now() + limits.shutdown);
    let left = runs.wait_idle(deadline.max(Instant::now() + limits.stop_grace + Duration::from_secs(3)));
    if left > 0 {
        warn!("{left} run(s) did not end in time");
    }
    terminals.finish();
    if let Some(l) = &leases {
        l.stop(Duration::from_secs(1));
    }
    outbox.drain(deadline);
    info!("stopped");
    Ok(0)
}

/// The port's TLS, when the config has a `tls` section: the files loaded
/// (the self-signed pair generated into `<state>/tls/` first if missing).
/// A problem is a config error named by its JSON path.
#[cfg(not(target_os = "macos"))]
pub fn tls(
    config: &config::Config,
    config_path: &std::path::Path,
    state: &std::path::Path,
) -> Result<Option<Arc<crate::net::tls::Tls>>, Error> {
    use crate::net::tls::{Source, Tls};
    let source = match &config.tls {
        None => return Ok(None),
        Some(config::TlsSettings::SelfSigned) => Source::SelfSigned { dir: state.join("tls") },
        Some(config::TlsSettings::Files { cert, key }) => {
            Source::Files { cert: cert.clone(), key: key.clone() }
        }
    };
    let path = if matches!(source, Source::SelfSigned { .. }) { "tls.selfSigned" } else { "tls" };
    Tls::load(source, &config.host).map(|t| Some(Arc::new(t))).map_err(|e| Error::Config {
        path: config_path.to_path_buf(),
        problems: vec![format!("{path}: {e}")],
    })
}

#[cfg(target_os = "macos")]
pub fn tls(
    _: &config::Config,
    _: &std::path::Path,
    _: &std::path::Path,
) -> Result<Option<Arc<crate::net::tls::Tls>>, Error> {
    Ok(None)
}

/// The state dir of `config`, created and made absolute.
pub fn state_dir(config: &config::Config) -> Result<PathBuf, Error> {
    let state = config::state_dir(config.state_dir.as_deref());
    std::fs::create_dir_all(&state).map_err(|source| Error::StateDir { path: state.clone(), source })?;
    state.canonicalize().map_err(|source| Error::StateDir { path: state.clone(), source })
}

fn digest(token: &str) -> [u8; 32] {
    use sha2::{Digest, Sha256};
    Sha256::digest(token.as_bytes()).into()
}

/// `limits.connections`, lowered (with a warning) to what the open-file
/// limit leaves after the reserve, so that the 503 at the cap, not EMFILE,
/// is what a client meets.
fn connection_cap(configured: usize, nofile: Option<u64>) -> usize {
    let Some((nofile, fits)) = crate::fds::short(configured, nofile, 1) else { return configured };
    warn!(
        "limits.connections is {configured} but the open-file limit (nofile) is {nofile}: \
         serving at most {fits} connections ({} descriptors kept for git, agents and spool files); \
         raise the limit (ulimit -n, LimitNOFILE=) to serve more",
        crate::fds::reserve(nofile)
    );
    fits
}

/// Descriptors a terminal holds: its PTY master and its WebSocket connection.
const TERMINAL_FDS: u64 = 2;

/// Warns when `limits.terminalsPerProject` × projects, each terminal with
/// its PTY and its connection, would not fit in the open-file limit (the
/// cap is left as configured: few setups open them all). Whether it warned.
fn terminal_budget(per_project: usize, projects: usize, nofile: Option<u64>) -> bool {
    let all = per_project.saturating_mul(projects);
    let Some((nofile, fits)) = crate::fds::short(all, nofile, TERMINAL_FDS) else { return false };
    warn!(
        "limits.terminalsPerProject is {per_project} for {projects} project(s), {all} terminals, but the \
         open-file limit (nofile) is {nofile}: only {fits} fit (each holds a PTY and a connection); \
         opening more fails with \"too many open files\"; raise the limit (ulimit -n, LimitNOFILE=) or lower the cap"
    );
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_connection_cap_leaves_descriptors_in_reserve() {
        assert_eq!(connection_cap(256, Some(64)), 32);
        assert_eq!(connection_cap(4096, Some(1024)), 768);
        assert_eq!(connection_cap(4096, Some(65_536)), 4096);
        assert_eq!(connection_cap(100, Some(1024)), 100);
        assert_eq!(connection_cap(10, Some(8)), 1);
        assert_eq!(connection_cap(4096, None), 4096);
    }

    #[test]
    fn terminals_beyond_the_open_file_limit_warn() {
        assert!(terminal_budget(64, 1, Some(64)));
        assert!(!terminal_budget(16, 1, Some(64)));
        assert!(terminal_budget(64, 20, Some(1024)));
        assert!(!terminal_budget(64, 20, Some(65_536)));
        assert!(!terminal_budget(10_000, 100, None));
    }
}
