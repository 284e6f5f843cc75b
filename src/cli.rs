//! The command line: `aion-connector [CONFIG]` serves push mode (the Node
//! original's CLI), `check [CONFIG]` validates a config. Later subcommands
//! (`poll`, `lease`) slot in beside `check`.

use crate::channel::{self, App};
use crate::config;
use crate::error::Error;
use crate::logging::{info, warn};
use crate::outbox::Outbox;
use crate::runs::{self, Runs};
use crate::terminal::Terminals;
use crate::{http, shutdown, starter};
use std::ffi::OsString;
use std::io::Write;
use std::net::{TcpListener, ToSocketAddrs};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

const DEFAULT_CONFIG: &str = "aion.config.json";

const HELP: &str = "\
aion-connector — serve AI coding agents from this machine (Channel Protocol v1)

Usage:
  aion-connector [CONFIG]          serve push mode (HTTP on the config's host:port)
  aion-connector check [CONFIG]    validate CONFIG and name every problem
  aion-connector poll [--config FILE]
                                   poll mode: take instructions from a server
  aion-connector lease --app KEY [--app KEY…] [--seconds N] [--socket PATH]
                       [--holder ID] [--name NAME] -- CMD [ARGS…]
                                   hold Aion leases on apps while CMD runs
  aion-connector --help | --version

CONFIG defaults to ./aion.config.json. If it is not given and that file does
not exist, a starter config (fresh token, mode 0600) is written there and
served on 127.0.0.1:7777.

Options:
  -h, --help       print this help and exit
  -V, --version    print the version and exit

Exit status: 0 ok (or stopped by SIGINT/SIGTERM), 1 runtime error,
2 usage or config error. See aion-connector(1).
";

const POLL_HELP: &str = "\
aion-connector poll — run agent sessions for a server that cannot reach this machine

Usage:
  aion-connector poll [--config FILE]

Options:
  -c, --config FILE   JSON config (default ./config.json; optional if the
                      environment has SERVER_URL and AGENT_TOKEN)
  -h, --help          print this help and exit
  -V, --version       print the version and exit

Settings (file key / environment variable, the environment wins):
  serverUrl / SERVER_URL                          required
  agentToken / AGENT_TOKEN                        required
  pollInterval / POLL_INTERVAL                    ms, default 5000
  outputFlushInterval / OUTPUT_FLUSH_INTERVAL     ms, default 1000
  maxConcurrentSessions / MAX_CONCURRENT_SESSIONS default 5
  statusInterval / STATUS_INTERVAL                ms, default 30000
  sessionCommand / AION_SESSION_COMMAND           argv as a JSON array, default
      [\"claude\",\"-p\",\"--input-format\",\"stream-json\",\"--output-format\",\"stream-json\",\"--verbose\"]
  stateDir / AION_STATE_DIR                       undelivered output waits here
  deliverySeconds / DELIVERY_SECONDS              retry window, default 86400

See aion-connector(1), POLL MODE.
";

pub fn run(args: Vec<OsString>) -> Result<i32, Error> {
    let args: Vec<String> = args
        .into_iter()
        .map(|a| a.into_string().map_err(|a| Error::Usage(format!("argument {a:?} is not UTF-8"))))
        .collect::<Result<_, _>>()?;
    let words: Vec<&str> = args.iter().map(String::as_str).collect();
    match words.as_slice() {
        ["-h" | "--help" | "help", ..] => {
            print!("{HELP}");
            Ok(0)
        }
        ["-V" | "--version", ..] => {
            println!("aion-connector {}", channel::VERSION);
            Ok(0)
        }
        ["check"] => check(Path::new(DEFAULT_CONFIG)),
        ["check", path] if !path.starts_with('-') => check(Path::new(path)),
        ["check", ..] => Err(Error::Usage("usage: aion-connector check [CONFIG]".into())),
        ["poll", rest @ ..] => poll(rest),
        ["lease", rest @ ..] => crate::wrap::run(rest),
        [] => serve(None),
        [path] if !path.starts_with('-') => serve(Some(PathBuf::from(path))),
        [flag] => Err(Error::Usage(format!("unknown option {flag}"))),
        _ => Err(Error::Usage("too many arguments".into())),
    }
}

fn poll(args: &[&str]) -> Result<i32, Error> {
    let mut config: Option<PathBuf> = None;
    let mut rest = args.iter();
    while let Some(arg) = rest.next() {
        match *arg {
            "-h" | "--help" => {
                print!("{POLL_HELP}");
                return Ok(0);
            }
            "-V" | "--version" => {
                println!("aion-connector {}", channel::VERSION);
                return Ok(0);
            }
            "-c" | "--config" => match rest.next() {
                Some(path) => config = Some(PathBuf::from(path)),
                None => return Err(Error::Usage("--config needs a FILE".into())),
            },
            other => match other.strip_prefix("--config=") {
                Some(path) => config = Some(PathBuf::from(path)),
                None => return Err(Error::Usage(format!("poll: unknown argument {other}"))),
            },
        }
    }
    let shutdown = shutdown::install().map_err(|source| Error::Io { what: "signal setup", source })?;
    let config = crate::poll::load_config(config.as_deref(), &|k| std::env::var(k).ok())?;
    crate::poll::run(config, shutdown)
}

fn check(path: &Path) -> Result<i32, Error> {
    let (config, warnings) = config::load(path)?;
    for w in &warnings {
        eprintln!("warning: {}: {w}", path.display());
    }
    let path_var = std::env::var_os("PATH").unwrap_or_default();
    let mut uses_acpx = false;
    for p in &config.projects {
        for a in &p.agents {
            let at = format!("projects.{}.agents.{}", p.id, a.name);
            match &a.command {
                Some(argv) if !argv[0].contains('/') && !starter::on_path(&path_var, &argv[0]) => {
                    eprintln!("note: {at}.command: `{}` is not on PATH", argv[0]);
                }
                Some(_) => {}
                None => {
                    uses_acpx = true;
                    if !starter::on_path(&path_var, &a.name) {
                        eprintln!(
                            "note: {at}: `{}` is not on PATH (acpx may still find its ACP adapter)",
                            a.name
                        );
                    }
                }
            }
        }
    }
    if uses_acpx {
        match tool_version("acpx") {
            Some(v) => eprintln!("note: acpx {v}"),
            None => eprintln!(
                "note: acpx is not on PATH: invoke will fail (npm install -g acpx; it needs Node.js 22+)"
            ),
        }
        match tool_version("node") {
            Some(v) if node_major(&v).is_some_and(|m| m < 22) => {
                eprintln!("note: node {v} is older than the Node.js 22 that acpx 0.19 needs")
            }
            Some(_) => {}
            None => eprintln!("note: node is not on PATH: acpx needs Node.js 22+"),
        }
    }
    println!("ok: {}: {} project(s)", path.display(), config.projects.len());
    Ok(0)
}

fn serve(explicit: Option<PathBuf>) -> Result<i32, Error> {
    // First, before any other thread exists: every thread inherits the mask.
    let shutdown = shutdown::install().map_err(|source| Error::Io { what: "signal setup", source })?;
    raise_fd_limit();
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
    let roots = channel::prepare_roots(&config)?;
    let state = runs::state_dir(config.state_dir.as_deref());
    std::fs::create_dir_all(&state).map_err(|source| Error::StateDir { path: state.clone(), source })?;
    // The connector's own files are never served, whatever project dir holds them.
    let own_files: Vec<PathBuf> =
        [path.as_path(), state.as_path()].iter().filter_map(|p| p.canonicalize().ok()).collect();
    let projects = channel::projects(&mut config, roots, &own_files);
    let signer = Arc::new(channel::ProjectKeys(projects.clone()));
    let outbox = Outbox::open(&state.join("outbox"), signer, config.limits.delivery)
        .map_err(|source| Error::StateDir { path: state.clone(), source })?;
    let addr = format!("{}:{}", config.host, config.port);
    let bind_err = |source| Error::Bind { addr: addr.clone(), source };
    let addrs: Vec<_> = (config.host.as_str(), config.port).to_socket_addrs().map_err(bind_err)?.collect();
    let listener = TcpListener::bind(addrs.as_slice()).map_err(bind_err)?;
    let local = listener.local_addr().map_err(bind_err)?;
    let limits = config.limits.clone();
    let count = projects.len();
    let leases = projects
        .iter()
        .any(|p| p.config.agents.iter().any(|a| !a.lease_apps.is_empty()))
        .then(|| crate::lease::Leases::start((&config.lease).into()));
    let runs = Runs::new(Arc::clone(&outbox), limits.clone(), leases.clone());
    let terminals = Terminals::new(limits.clone());
    let app = Arc::new(App::new(projects, limits.clone(), Arc::clone(&runs), Arc::clone(&terminals)));
    {
        let mut out = std::io::stdout().lock();
        let _ = writeln!(out, "listening on {local}");
        let _ = out.flush();
    }
    info!("aion-connector {} serving {count} project(s) from {}", channel::VERSION, path.display());
    let deadline = std::cell::Cell::new(None);
    http::serve(listener, limits.clone(), Arc::clone(&shutdown), app, || {
        deadline.set(Some(Instant::now() + limits.shutdown));
        runs.stop_all();
        terminals.close_all();
    })
    .map_err(|source| Error::Io { what: "serving", source })?;
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

/// `TOOL --version`'s first line (bounded: 10 s), or None if it cannot run.
fn tool_version(tool: &str) -> Option<String> {
    let mut cmd = std::process::Command::new(tool);
    cmd.arg("--version");
    let out = crate::proc::run(&mut cmd, Duration::from_secs(10), 4096).ok().filter(|o| o.success())?;
    Some(String::from_utf8_lossy(&out.stdout).lines().next()?.trim().to_string())
}

fn node_major(version: &str) -> Option<u32> {
    version.trim_start_matches('v').split('.').next()?.parse().ok()
}

/// Each connection and each git run holds descriptors: lift the soft limit
/// to the hard one (capped) so the connection cap, not EMFILE, is what binds.
fn raise_fd_limit() {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    if let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE) {
        let want = hard.min(65_536);
        if want > soft {
            let _ = setrlimit(Resource::RLIMIT_NOFILE, want, hard);
        }
    }
}
