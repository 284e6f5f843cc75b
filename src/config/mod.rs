//! The config file: the Node original's `aion.config.json` (port, host,
//! projects → token, dir, agents → description) read unchanged, plus our
//! additions (`limits`, per-project `sensitive` and `allowFileUrls`).
//!
//! The file is parsed into an order-keeping JSON tree first, so that agents keep
//! the order the user wrote them in, duplicate keys are caught, and every
//! problem can be named by its JSON path (`projects.a.token: missing`). All
//! problems are collected, not just the first.

pub mod starter;

use crate::error::Error;
use serde::de::{self, Deserialize, Deserializer, MapAccess, SeqAccess, Visitor};
use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// The config push mode serves when none is named (written on first run).
pub const DEFAULT_CONFIG: &str = "aion.config.json";

/// A validated config.
#[derive(Debug)]
pub struct Config {
    pub host: String,
    pub port: u16,
    pub limits: Limits,
    pub projects: Vec<Project>,
    /// Where undelivered posts wait (see `outbox`); None: the default chain.
    pub state_dir: Option<PathBuf>,
    /// The `lease` section: how to reach Aion (used when an agent has `leaseApps`).
    pub lease: LeaseSettings,
    /// `allowedOrigins`: the browser origins a WebSocket upgrade may come
    /// from (a request without `Origin` is no browser's); None: any.
    pub allowed_origins: Option<Vec<String>>,
    /// `metricsToken`: a bearer token for `GET /metrics` beside the projects' tokens.
    pub metrics_token: Option<Secret>,
    /// The `tls` section: serve HTTPS (and `wss://`) on the port.
    pub tls: Option<TlsSettings>,
}

/// Where the port's key and certificate come from.
#[derive(Debug, Clone, PartialEq)]
#[cfg_attr(target_os = "macos", allow(dead_code))] // macOS builds refuse the section
pub enum TlsSettings {
    /// `{"certFile": PATH, "keyFile": PATH}`: PEM files, re-read on SIGHUP.
    Files { cert: PathBuf, key: PathBuf },
    /// `{"selfSigned": true}`: a pair generated once into `<stateDir>/tls/`.
    SelfSigned,
}

#[derive(Debug, Default, Clone)]
pub struct LeaseSettings {
    pub socket: Option<PathBuf>,
    pub holder: Option<String>,
    pub client_name: Option<String>,
    pub seconds: Option<u32>,
}

#[derive(Debug, Clone)]
pub struct Limits {
    pub body_bytes: usize,
    pub header_bytes: usize,
    /// Open connections in all (lowered at start to what the open-file limit allows).
    pub connections: usize,
    /// Open connections from one IP address.
    pub connections_per_peer: usize,
    /// Loopback peers (127.0.0.0/8, ::1: a reverse proxy) are not held to
    /// `connections_per_peer`.
    pub loopback_exempt: bool,
    /// A connection that has made no authenticated request must deliver a
    /// complete request head this soon after it connected or was last answered.
    pub head: Duration,
    /// Between requests on a connection whose request proved a token.
    pub idle: Duration,
    pub request: Duration,
    pub git: Duration,
    pub shutdown: Duration,
    /// Concurrent agent runs per project.
    pub runs_per_project: usize,
    /// A run is stopped after this (an agent's `timeout` overrides it).
    pub run: Duration,
    /// Output kept per run; past it a marker line and the rest is dropped.
    pub run_output_bytes: u64,
    /// Silence (no output at all) after some message text that ends a turn.
    pub turn_idle: Duration,
    /// How long an undelivered post is retried before its stream is dropped.
    pub delivery: Duration,
    /// Between SIGTERM and SIGKILL when a run is stopped.
    pub stop_grace: Duration,
    /// Live terminals per project (WebSocket and HTTP together, reattachable
    /// ones waiting for their socket included).
    pub terminals_per_project: usize,
    /// A terminal with no input or output this long is hung up.
    pub terminal_idle: Duration,
    /// A `?session=` terminal without a socket is kept this long for a reattach.
    pub terminal_detach: Duration,
    /// How often an idle WebSocket is pinged; silence for twice that ends it.
    pub ws_ping: Duration,
    /// Background processes (an agent's `run_background`) running per project.
    pub background_per_project: usize,
    /// Wrong tokens from one peer address in a minute before it gets 429
    /// for the rest of that minute; 0: no limit.
    pub failed_tokens_per_minute: u32,
    /// Loopback peers are not counted (off by default: behind a reverse
    /// proxy on this machine every client is loopback).
    pub failed_tokens_exempt_loopback: bool,
}

/// The limits served now, shared by the domain modules; a reload (SIGHUP)
/// swaps them. A reader takes [`LiveLimits::get`] (a clone of an `Arc`) and
/// no lock is held while it is used.
pub struct LiveLimits(std::sync::Mutex<std::sync::Arc<Limits>>);

impl LiveLimits {
    pub fn new(limits: Limits) -> std::sync::Arc<LiveLimits> {
        std::sync::Arc::new(LiveLimits(std::sync::Mutex::new(std::sync::Arc::new(limits))))
    }

    pub fn get(&self) -> std::sync::Arc<Limits> {
        std::sync::Arc::clone(&self.0.lock().unwrap_or_else(|e| e.into_inner()))
    }

    pub fn set(&self, limits: Limits) {
        *self.0.lock().unwrap_or_else(|e| e.into_inner()) = std::sync::Arc::new(limits);
    }
}

impl Limits {
    /// The limits a reload cannot change (the HTTP server's, the shutdown
    /// time, the delivery window): they take effect at the next start.
    pub fn fixed(&self) -> (usize, usize, usize, Duration, Duration, Duration, Duration) {
        (
            self.body_bytes,
            self.header_bytes,
            self.connections,
            self.idle,
            self.request,
            self.shutdown,
            self.delivery,
        )
    }
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            body_bytes: 1 << 20,
            header_bytes: 16 << 10,
            connections: 4096,
            connections_per_peer: 256,
            loopback_exempt: true,
            head: Duration::from_secs(10),
            idle: Duration::from_secs(30),
            request: Duration::from_secs(30),
            git: Duration::from_secs(300),
            shutdown: Duration::from_secs(10),
            runs_per_project: 4,
            run: Duration::from_secs(3600),
            run_output_bytes: 64 << 20,
            turn_idle: Duration::from_secs(30),
            delivery: Duration::from_secs(86_400),
            stop_grace: Duration::from_secs(5),
            terminals_per_project: 64,
            terminal_idle: Duration::from_secs(3600),
            terminal_detach: Duration::from_secs(300),
            ws_ping: Duration::from_secs(30),
            background_per_project: 8,
            failed_tokens_per_minute: 10,
            failed_tokens_exempt_loopback: false,
        }
    }
}

#[derive(Debug)]
pub struct Project {
    pub id: String,
    pub token: Secret,
    /// As written, made absolute against the working directory (the original's rule).
    pub dir: PathBuf,
    pub agents: Vec<Agent>,
    /// Extra deny patterns on top of the built-in sensitive-file list.
    pub sensitive: Vec<String>,
    pub allow_file_urls: bool,
    /// `"events": true`: every ACP update of a run other than message text is
    /// posted too (`agent-event`, `"type":"event"` stream lines).
    pub events: bool,
}

#[derive(Debug)]
pub struct Agent {
    pub name: String,
    pub description: String,
    /// argv template replacing the acpx command; `{prompt}`, `{session}`,
    /// `{model}` and `{agent}` are replaced inside each element.
    pub command: Option<Vec<String>>,
    /// One-shot `acpx … exec` instead of a persistent acpx session.
    pub exec: bool,
    pub timeout: Option<Duration>,
    pub env: Vec<(String, String)>,
    /// Desktop apps (Aion app keys) leased while a run of this agent goes on.
    pub lease_apps: Vec<String>,
    /// What acpx answers when the agent asks for a permission.
    pub permissions: Permissions,
}

/// An agent's `permissions`: passed to acpx as the flag of the same name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Permissions {
    /// `--approve-all`: every request (writes, commands) approved; the original's.
    #[default]
    ApproveAll,
    /// `--approve-reads`: reads and searches approved, anything else denied
    /// (nobody is there to answer acpx's prompt).
    ApproveReads,
    /// `--deny-all`: every request denied.
    DenyAll,
}

impl Permissions {
    /// acpx's flag.
    pub fn flag(self) -> &'static str {
        match self {
            Permissions::ApproveAll => "--approve-all",
            Permissions::ApproveReads => "--approve-reads",
            Permissions::DenyAll => "--deny-all",
        }
    }
}

/// A token. Its `Debug` never shows the value, so it cannot reach a log by accident.
pub struct Secret(pub String);

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(…)")
    }
}

/// Reads and validates `path`; warnings (unknown keys) come back beside the config.
pub fn load(path: &Path) -> Result<(Config, Vec<String>), Error> {
    let text = std::fs::read_to_string(path)
        .map_err(|source| Error::ConfigRead { path: path.to_path_buf(), source })?;
    let cwd = std::env::current_dir().map_err(|source| Error::Io { what: "current directory", source })?;
    parse(&text, &cwd).map_err(|problems| Error::Config { path: path.to_path_buf(), problems })
}

/// Parses config text; relative project dirs are joined to `cwd`.
pub fn parse(text: &str, cwd: &Path) -> Result<(Config, Vec<String>), Vec<String>> {
    let root: Json = serde_json::from_str(text).map_err(|e| vec![format!("invalid JSON: {e}")])?;
    let mut c = Checker::default();
    let config = c.config(&root, cwd);
    match config {
        Some(config) if c.problems.is_empty() => Ok((config, c.warnings)),
        _ => Err(c.problems),
    }
}

/// One thing allowed but unsafe about a config, and what to do about it.
/// Shown as `problem: fix`.
#[derive(Debug)]
pub struct Advice {
    pub problem: String,
    pub fix: String,
}

impl fmt::Display for Advice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.problem, self.fix)
    }
}

/// What is allowed but unsafe about a loaded config, one line each: a file
/// readable by group or others (it holds the tokens), tokens short enough to
/// guess (a token opens a shell on this machine).
pub fn advice(path: &Path, config: &Config) -> Vec<Advice> {
    use std::os::unix::fs::MetadataExt;
    let mut out = Vec::new();
    if let Ok(meta) = std::fs::metadata(path)
        && meta.mode() & 0o077 != 0
    {
        out.push(Advice {
            problem: format!(
                "{} is readable by {} (mode {:o}) and holds the tokens",
                path.display(),
                if meta.mode() & 0o007 != 0 { "others" } else { "its group" },
                meta.mode() & 0o777,
            ),
            fix: format!("chmod 600 {}", path.display()),
        });
    }
    for p in &config.projects {
        if p.token.0.chars().count() < 32 {
            out.push(Advice {
                problem: format!("projects.{}.token is shorter than 32 characters", p.id),
                fix: "a token opens a shell here, make it long and random".into(),
            });
        }
    }
    out
}

/// The `lease` section, one parser for push mode's config and poll mode's
/// file: the same types and ranges, problems named by JSON path, the socket
/// path resolved against `cwd`. Returns the settings, problems and warnings.
pub fn lease_section(v: &serde_json::Value, cwd: &Path) -> (LeaseSettings, Vec<String>, Vec<String>) {
    let mut c = Checker::default();
    let settings = match serde_json::from_value::<Json>(v.clone()) {
        Ok(json) => c.lease(&json, cwd),
        Err(e) => {
            c.problem("lease", e);
            LeaseSettings::default()
        }
    };
    (settings, c.problems, c.warnings)
}

/// Where the state lives: the config's `stateDir`, systemd's
/// `$STATE_DIRECTORY`, `$XDG_STATE_HOME/aion-connector`,
/// `~/.local/state/aion-connector`, else `./.aion-state`.
pub fn state_dir(configured: Option<&Path>) -> PathBuf {
    if let Some(dir) = configured {
        return dir.to_path_buf();
    }
    let env = |k: &str| std::env::var_os(k).filter(|v| !v.is_empty()).map(PathBuf::from);
    if let Some(dir) = env("STATE_DIRECTORY") {
        // systemd may list several, separated by ':'.
        let first = dir.to_string_lossy().split(':').next().unwrap_or_default().to_string();
        return PathBuf::from(first);
    }
    if let Some(dir) = env("XDG_STATE_HOME") {
        return dir.join("aion-connector");
    }
    if let Some(home) = env("HOME") {
        return home.join(".local/state/aion-connector");
    }
    PathBuf::from(".aion-state")
}

#[derive(Default)]
struct Checker {
    problems: Vec<String>,
    warnings: Vec<String>,
}

impl Checker {
    fn problem(&mut self, path: &str, msg: impl fmt::Display) {
        self.problems.push(format!("{path}: {msg}"));
    }

    /// The object at `path`, with unknown keys warned about and duplicates refused.
    fn object<'a>(&mut self, v: &'a Json, path: &str, known: &[&str]) -> Option<&'a [(String, Json)]> {
        let Json::Obj(fields) = v else {
            self.problem(path, format!("expected an object, found {}", v.kind()));
            return None;
        };
        for (i, (k, _)) in fields.iter().enumerate() {
            if fields[..i].iter().any(|(prev, _)| prev == k) {
                self.problem(&join(path, k), "duplicate key");
            } else if !known.is_empty() && !known.contains(&k.as_str()) {
                self.warnings.push(format!("unknown key {} (ignored)", join(path, k)));
            }
        }
        Some(fields)
    }

    fn string(&mut self, v: &Json, path: &str) -> Option<String> {
        match v {
            Json::Str(s) => Some(s.clone()),
            other => {
                self.problem(path, format!("expected a string, found {}", other.kind()));
                None
            }
        }
    }

    fn integer(&mut self, v: &Json, path: &str, min: u64, max: u64) -> Option<u64> {
        match v {
            Json::Num(n) if n.as_u64().is_some_and(|n| (min..=max).contains(&n)) => n.as_u64(),
            other => {
                self.problem(path, format!("expected an integer {min}-{max}, found {}", other.show()));
                None
            }
        }
    }

    fn config(&mut self, root: &Json, cwd: &Path) -> Option<Config> {
        let known = [
            "port",
            "host",
            "projects",
            "limits",
            "stateDir",
            "lease",
            "metricsToken",
            "allowedOrigins",
            "tls",
        ];
        let fields = self.object(root, "", &known)?;
        let mut config = Config {
            host: "0.0.0.0".into(),
            port: 7777,
            limits: Limits::default(),
            projects: Vec::new(),
            state_dir: None,
            lease: LeaseSettings::default(),
            allowed_origins: None,
            metrics_token: None,
            tls: None,
        };
        let mut saw_projects = false;
        for (key, v) in fields {
            match key.as_str() {
                "port" => {
                    if let Some(p) = self.integer(v, "port", 0, 65535) {
                        config.port = p as u16;
                    }
                }
                "host" => match self.string(v, "host") {
                    Some(h) if h.trim().is_empty() => self.problem("host", "must not be empty"),
                    Some(h) => config.host = h,
                    None => {}
                },
                "limits" => self.limits(v, &mut config.limits),
                "allowedOrigins" => config.allowed_origins = self.origins(v),
                "lease" => config.lease = self.lease(v, cwd),
                "tls" => config.tls = self.tls(v, cwd),
                "metricsToken" => match self.string(v, "metricsToken") {
                    Some(t) if t.chars().count() < 16 => {
                        self.problem("metricsToken", "must be at least 16 characters")
                    }
                    t => config.metrics_token = t.map(Secret),
                },
                "stateDir" => match self.string(v, "stateDir") {
                    Some(d) if d.is_empty() => self.problem("stateDir", "must not be empty"),
                    d => config.state_dir = d.map(|d| cwd.join(d)),
                },
                "projects" => {
                    saw_projects = true;
                    config.projects = self.projects(v, cwd);
                }
                _ => {}
            }
        }
        if !saw_projects {
            self.problem("projects", "missing (an object of project id → {token, dir, agents})");
        }
        Some(config)
    }

    fn tls(&mut self, v: &Json, cwd: &Path) -> Option<TlsSettings> {
        if cfg!(target_os = "macos") {
            self.problem("tls", "TLS is not available in macOS builds; put a TLS proxy in front");
            return None;
        }
        let fields = self.object(v, "tls", &["certFile", "keyFile", "selfSigned"])?;
        let get = |k: &str| fields.iter().find(|(key, _)| key == k).map(|(_, v)| v);
        let file = |c: &mut Self, k: &str| match get(k).map(|v| c.string(v, &join("tls", k))) {
            Some(Some(p)) if p.is_empty() => {
                c.problem(&join("tls", k), "must not be empty");
                None
            }
            Some(p) => p.map(|p| cwd.join(p)),
            None => None,
        };
        let cert = file(self, "certFile");
        let key = file(self, "keyFile");
        let self_signed = match get("selfSigned") {
            None => None,
            Some(Json::Bool(b)) => Some(*b),
            Some(other) => {
                self.problem("tls.selfSigned", format!("expected true or false, found {}", other.show()));
                return None;
            }
        };
        let has_files = get("certFile").is_some() || get("keyFile").is_some();
        match (self_signed, has_files) {
            (Some(true), true) => {
                self.problem("tls", "either selfSigned or certFile and keyFile, not both");
                None
            }
            (Some(true), false) => Some(TlsSettings::SelfSigned),
            (_, true) => match (get("certFile"), get("keyFile"), cert, key) {
                (_, _, Some(cert), Some(key)) => Some(TlsSettings::Files { cert, key }),
                (None, ..) => {
                    self.problem("tls.certFile", "missing (the certificate chain, PEM)");
                    None
                }
                (_, None, ..) => {
                    self.problem("tls.keyFile", "missing (the private key, PEM)");
                    None
                }
                _ => None,
            },
            (_, false) => {
                self.problem("tls", "needs certFile and keyFile (PEM files), or \"selfSigned\": true");
                None
            }
        }
    }

    fn limits(&mut self, v: &Json, limits: &mut Limits) {
        let known = [
            "bodyBytes",
            "headerBytes",
            "connections",
            "connectionsPerPeer",
            "loopbackExempt",
            "headSeconds",
            "idleSeconds",
            "requestSeconds",
            "gitSeconds",
            "shutdownSeconds",
            "runsPerProject",
            "runSeconds",
            "runOutputBytes",
            "turnIdleSeconds",
            "deliverySeconds",
            "stopGraceSeconds",
            "terminalsPerProject",
            "terminalIdleSeconds",
            "terminalDetachSeconds",
            "wsPingSeconds",
            "backgroundPerProject",
            "failedTokensPerMinute",
            "failedTokensExemptLoopback",
        ];
        let Some(fields) = self.object(v, "limits", &known) else { return };
        for (key, v) in fields {
            let path = join("limits", key);
            let secs = |n: u64| Duration::from_secs(n);
            match key.as_str() {
                "bodyBytes" => {
                    set(&mut limits.body_bytes, self.integer(v, &path, 1, 1 << 30), |n| n as usize)
                }
                "headerBytes" => {
                    set(&mut limits.header_bytes, self.integer(v, &path, 1024, 1 << 20), |n| n as usize)
                }
                "connections" => {
                    set(&mut limits.connections, self.integer(v, &path, 1, 100_000), |n| n as usize)
                }
                "connectionsPerPeer" => {
                    set(&mut limits.connections_per_peer, self.integer(v, &path, 1, 100_000), |n| n as usize)
                }
                "loopbackExempt" => match v {
                    Json::Bool(b) => limits.loopback_exempt = *b,
                    other => self.problem(&path, format!("expected true or false, found {}", other.kind())),
                },
                "headSeconds" => set(&mut limits.head, self.integer(v, &path, 1, 86_400), secs),
                "idleSeconds" => set(&mut limits.idle, self.integer(v, &path, 1, 86_400), secs),
                "requestSeconds" => set(&mut limits.request, self.integer(v, &path, 1, 86_400), secs),
                "gitSeconds" => set(&mut limits.git, self.integer(v, &path, 1, 86_400), secs),
                "shutdownSeconds" => set(&mut limits.shutdown, self.integer(v, &path, 0, 3_600), secs),
                "runsPerProject" => {
                    set(&mut limits.runs_per_project, self.integer(v, &path, 1, 1_000), |n| n as usize)
                }
                "runSeconds" => set(&mut limits.run, self.integer(v, &path, 1, 7 * 86_400), secs),
                "runOutputBytes" => {
                    set(&mut limits.run_output_bytes, self.integer(v, &path, 1024, 1 << 40), |n| n)
                }
                "turnIdleSeconds" => set(&mut limits.turn_idle, self.integer(v, &path, 1, 86_400), secs),
                "deliverySeconds" => set(&mut limits.delivery, self.integer(v, &path, 1, 30 * 86_400), secs),
                "stopGraceSeconds" => set(&mut limits.stop_grace, self.integer(v, &path, 0, 600), secs),
                "terminalsPerProject" => {
                    set(&mut limits.terminals_per_project, self.integer(v, &path, 1, 10_000), |n| n as usize)
                }
                "terminalIdleSeconds" => {
                    set(&mut limits.terminal_idle, self.integer(v, &path, 1, 30 * 86_400), secs)
                }
                "terminalDetachSeconds" => {
                    set(&mut limits.terminal_detach, self.integer(v, &path, 0, 7 * 86_400), secs)
                }
                "wsPingSeconds" => set(&mut limits.ws_ping, self.integer(v, &path, 1, 3_600), secs),
                "backgroundPerProject" => {
                    set(&mut limits.background_per_project, self.integer(v, &path, 1, 1_000), |n| n as usize)
                }
                "failedTokensPerMinute" => {
                    set(&mut limits.failed_tokens_per_minute, self.integer(v, &path, 0, 1_000_000), |n| {
                        n as u32
                    })
                }
                "failedTokensExemptLoopback" => match v {
                    Json::Bool(b) => limits.failed_tokens_exempt_loopback = *b,
                    other => self.problem(&path, format!("expected true or false, found {}", other.kind())),
                },
                _ => {}
            }
        }
    }

    fn projects(&mut self, v: &Json, cwd: &Path) -> Vec<Project> {
        let Some(fields) = self.object(v, "projects", &[]) else { return Vec::new() };
        let mut projects: Vec<Project> = Vec::new();
        // Tokens seen so far, also of projects that fail for another reason.
        let mut tokens: Vec<(&str, &str)> = Vec::new();
        for (id, v) in fields {
            let path = join("projects", id);
            if id.is_empty() {
                self.problem(&path, "a project id must not be empty");
            }
            if let Json::Obj(f) = v
                && let Some((_, Json::Str(token))) = f.iter().find(|(k, _)| k == "token")
            {
                if let Some((first, _)) = tokens.iter().find(|(_, t)| t == token) {
                    let msg = format!("same token as projects.{first} (tokens must be unique)");
                    self.problem(&join(&path, "token"), msg);
                }
                tokens.push((id, token));
            }
            if let Some(project) = self.project(id, v, &path, cwd) {
                projects.push(project);
            }
        }
        if fields.is_empty() {
            self.problem("projects", "no project configured");
        }
        projects
    }

    fn project(&mut self, id: &str, v: &Json, path: &str, cwd: &Path) -> Option<Project> {
        let known = ["token", "dir", "agents", "sensitive", "allowFileUrls", "events"];
        let fields = self.object(v, path, &known)?;
        let get = |k: &str| fields.iter().find(|(key, _)| key == k).map(|(_, v)| v);
        let (token, dir) = (join(path, "token"), join(path, "dir"));
        let token = match get("token") {
            None => {
                self.problem(&token, "missing");
                None
            }
            Some(v) => match self.string(v, &token) {
                Some(t) if t.is_empty() => {
                    self.problem(&token, "must not be empty");
                    None
                }
                t => t,
            },
        };
        let dir = match get("dir") {
            None => {
                self.problem(&dir, "missing");
                None
            }
            Some(v) => match self.string(v, &dir) {
                Some(d) if d.is_empty() => {
                    self.problem(&dir, "must not be empty");
                    None
                }
                d => d.map(|d| cwd.join(d)),
            },
        };
        let agents = get("agents").map(|v| self.agents(v, &join(path, "agents"))).unwrap_or_default();
        let sensitive =
            get("sensitive").map(|v| self.patterns(v, &join(path, "sensitive"))).unwrap_or_default();
        let mut switch = |k: &str| match get(k) {
            None => false,
            Some(Json::Bool(b)) => *b,
            Some(other) => {
                let msg = format!("expected true or false, found {}", other.kind());
                self.problem(&join(path, k), msg);
                false
            }
        };
        let allow_file_urls = switch("allowFileUrls");
        let events = switch("events");
        Some(Project {
            id: id.to_string(),
            token: Secret(token?),
            dir: dir?,
            agents,
            sensitive,
            allow_file_urls,
            events,
        })
    }

    fn agents(&mut self, v: &Json, path: &str) -> Vec<Agent> {
        let Some(fields) = self.object(v, path, &[]) else { return Vec::new() };
        let mut agents = Vec::new();
        for (name, v) in fields {
            let apath = join(path, name);
            if !valid_agent_name(name) {
                self.problem(
                    &apath,
                    "an agent name is a command name: letters, digits, '.', '_', '-', not starting with '-'",
                );
                continue;
            }
            if let Some(agent) = self.agent(name, v, &apath) {
                agents.push(agent);
            }
        }
        agents
    }

    fn lease(&mut self, v: &Json, cwd: &Path) -> LeaseSettings {
        let mut out = LeaseSettings::default();
        let Some(fields) = self.object(v, "lease", &["socket", "holderId", "clientName", "leaseSeconds"])
        else {
            return out;
        };
        for (key, v) in fields {
            let path = join("lease", key);
            match key.as_str() {
                "socket" => out.socket = self.string(v, &path).map(|s| cwd.join(s)),
                "holderId" => out.holder = self.string(v, &path).filter(|h| !h.is_empty()),
                "clientName" => out.client_name = self.string(v, &path),
                "leaseSeconds" => out.seconds = self.integer(v, &path, 60, 1800).map(|n| n as u32),
                _ => {}
            }
        }
        out
    }

    fn agent(&mut self, name: &str, v: &Json, path: &str) -> Option<Agent> {
        let known = ["description", "command", "mode", "timeout", "env", "leaseApps", "permissions"];
        let fields = self.object(v, path, &known)?;
        let mut agent = Agent {
            name: name.to_string(),
            description: String::new(),
            command: None,
            exec: false,
            timeout: None,
            env: Vec::new(),
            lease_apps: Vec::new(),
            permissions: Permissions::default(),
        };
        for (key, v) in fields {
            let kpath = join(path, key);
            match key.as_str() {
                "description" => agent.description = self.string(v, &kpath).unwrap_or_default(),
                "command" => match v {
                    Json::Arr(items) if !items.is_empty() => {
                        let argv: Vec<String> = items
                            .iter()
                            .enumerate()
                            .filter_map(|(i, item)| self.string(item, &format!("{kpath}[{i}]")))
                            .collect();
                        if argv.first().is_none_or(String::is_empty) {
                            self.problem(&kpath, "the program (first element) must not be empty");
                        }
                        agent.command = Some(argv);
                    }
                    _ => self.problem(&kpath, "expected a non-empty array of strings (an argv template)"),
                },
                "mode" => match self.string(v, &kpath).as_deref() {
                    Some("session") => agent.exec = false,
                    Some("exec") => agent.exec = true,
                    Some(other) => {
                        self.problem(&kpath, format!("expected \"session\" or \"exec\", found {other:?}"))
                    }
                    None => {}
                },
                "permissions" => match self.string(v, &kpath).as_deref() {
                    Some("approve-all") => agent.permissions = Permissions::ApproveAll,
                    Some("approve-reads") => agent.permissions = Permissions::ApproveReads,
                    Some("deny-all") => agent.permissions = Permissions::DenyAll,
                    Some(other) => self.problem(
                        &kpath,
                        format!(
                            "expected \"approve-all\", \"approve-reads\" or \"deny-all\", found {other:?}"
                        ),
                    ),
                    None => {}
                },
                "timeout" => agent.timeout = self.integer(v, &kpath, 1, 7 * 86_400).map(Duration::from_secs),
                "leaseApps" => match v {
                    Json::Arr(items) => {
                        agent.lease_apps = items
                            .iter()
                            .enumerate()
                            .filter_map(|(i, item)| self.string(item, &format!("{kpath}[{i}]")))
                            .filter(|k| !k.is_empty())
                            .collect();
                    }
                    _ => self.problem(&kpath, "expected an array of app keys, e.g. [\"com.google.Chrome\"]"),
                },
                "env" => {
                    if let Some(vars) = self.object(v, &kpath, &[]) {
                        for (k, val) in vars {
                            let vpath = join(&kpath, k);
                            if k.is_empty() || k.contains(['=', '\0']) {
                                self.problem(&vpath, "not a valid environment variable name");
                            } else if let Some(val) = self.string(val, &vpath) {
                                agent.env.push((k.clone(), val));
                            }
                        }
                    }
                }
                _ => {}
            }
        }
        Some(agent)
    }

    /// `allowedOrigins`: `scheme://host[:port]` each, kept lowercase without a
    /// trailing slash (as a browser sends `Origin`).
    fn origins(&mut self, v: &Json) -> Option<Vec<String>> {
        let Json::Arr(items) = v else {
            let msg = format!(
                "expected an array of origins such as \"https://app.example.com\", found {}",
                v.kind()
            );
            self.problem("allowedOrigins", msg);
            return None;
        };
        let mut out = Vec::new();
        for (i, item) in items.iter().enumerate() {
            let ipath = format!("allowedOrigins[{i}]");
            match self.string(item, &ipath) {
                Some(o)
                    if (o.starts_with("http://") || o.starts_with("https://"))
                        && !o.contains(char::is_whitespace) =>
                {
                    out.push(o.trim_end_matches('/').to_ascii_lowercase())
                }
                Some(o) => self.problem(
                    &ipath,
                    format!("expected an origin such as \"https://app.example.com\", found {o:?}"),
                ),
                None => {}
            }
        }
        Some(out)
    }

    fn patterns(&mut self, v: &Json, path: &str) -> Vec<String> {
        let Json::Arr(items) = v else {
            self.problem(path, format!("expected an array of patterns, found {}", v.kind()));
            return Vec::new();
        };
        let mut out = Vec::new();
        for (i, item) in items.iter().enumerate() {
            let ipath = format!("{path}[{i}]");
            match self.string(item, &ipath) {
                Some(p) if p.trim_matches('/').is_empty() => self.problem(&ipath, "empty pattern"),
                Some(p) => out.push(p),
                None => {}
            }
        }
        out
    }
}

fn set<T>(slot: &mut T, value: Option<u64>, f: impl FnOnce(u64) -> T) {
    if let Some(v) = value {
        *slot = f(v);
    }
}

fn join(path: &str, key: &str) -> String {
    if path.is_empty() { key.to_string() } else { format!("{path}.{key}") }
}

pub fn valid_agent_name(name: &str) -> bool {
    !name.is_empty()
        && !name.starts_with('-')
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
}

/// JSON kept in document order (serde_json's map would sort it); written
/// back in that order too (the `.acpxrc.json` a run updates).
#[derive(Debug, PartialEq)]
pub enum Json {
    Null,
    Bool(bool),
    Num(serde_json::Number),
    Str(String),
    Arr(Vec<Json>),
    Obj(Vec<(String, Json)>),
}

impl Json {
    fn kind(&self) -> &'static str {
        match self {
            Json::Null => "null",
            Json::Bool(_) => "a boolean",
            Json::Num(_) => "a number",
            Json::Str(_) => "a string",
            Json::Arr(_) => "an array",
            Json::Obj(_) => "an object",
        }
    }

    /// The value itself for scalars (never used for tokens), the kind otherwise.
    fn show(&self) -> String {
        match self {
            Json::Num(n) => n.to_string(),
            Json::Bool(b) => b.to_string(),
            other => other.kind().to_string(),
        }
    }
}

impl serde::Serialize for Json {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::{SerializeMap, SerializeSeq};
        match self {
            Json::Null => s.serialize_unit(),
            Json::Bool(b) => s.serialize_bool(*b),
            Json::Num(n) => n.serialize(s),
            Json::Str(v) => s.serialize_str(v),
            Json::Arr(items) => {
                let mut seq = s.serialize_seq(Some(items.len()))?;
                for item in items {
                    seq.serialize_element(item)?;
                }
                seq.end()
            }
            Json::Obj(fields) => {
                let mut map = s.serialize_map(Some(fields.len()))?;
                for (k, v) in fields {
                    map.serialize_entry(k, v)?;
                }
                map.end()
            }
        }
    }
}

impl<'de> Deserialize<'de> for Json {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Json;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("JSON")
            }
            fn visit_unit<E>(self) -> Result<Json, E> {
                Ok(Json::Null)
            }
            fn visit_bool<E>(self, b: bool) -> Result<Json, E> {
                Ok(Json::Bool(b))
            }
            fn visit_u64<E>(self, n: u64) -> Result<Json, E> {
                Ok(Json::Num(n.into()))
            }
            fn visit_i64<E>(self, n: i64) -> Result<Json, E> {
                Ok(Json::Num(n.into()))
            }
            fn visit_f64<E: de::Error>(self, n: f64) -> Result<Json, E> {
                serde_json::Number::from_f64(n).map(Json::Num).ok_or_else(|| E::custom("bad number"))
            }
            fn visit_str<E>(self, s: &str) -> Result<Json, E> {
                Ok(Json::Str(s.to_string()))
            }
            fn visit_string<E>(self, s: String) -> Result<Json, E> {
                Ok(Json::Str(s))
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut a: A) -> Result<Json, A::Error> {
                let mut items = Vec::new();
                while let Some(item) = a.next_element()? {
                    items.push(item);
                }
                Ok(Json::Arr(items))
            }
            fn visit_map<A: MapAccess<'de>>(self, mut a: A) -> Result<Json, A::Error> {
                let mut fields = Vec::new();
                while let Some((k, v)) = a.next_entry()? {
                    fields.push((k, v));
                }
                Ok(Json::Obj(fields))
            }
        }
        d.deserialize_any(V)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(text: &str) -> Result<(Config, Vec<String>), Vec<String>> {
        parse(text, Path::new("/srv"))
    }

    #[test]
    fn the_originals_file_is_accepted_and_keeps_agent_order() {
        let (c, warnings) = check(
            r#"{"port":7777,"projects":{"p":{"token":"t","dir":"./projects/p",
               "agents":{"pi":{"description":"Pi"},"claude":{"description":"Claude"}}}}}"#,
        )
        .unwrap();
        assert!(warnings.is_empty());
        assert_eq!(c.host, "0.0.0.0");
        let p = &c.projects[0];
        assert_eq!(p.dir, Path::new("/srv/./projects/p"));
        let names: Vec<_> = p.agents.iter().map(|a| a.name.as_str()).collect();
        assert_eq!(names, ["pi", "claude"]);
    }

    #[test]
    fn the_tls_section() {
        let with = |tls: &str| {
            check(&format!(r#"{{"projects":{{"p":{{"token":"t","dir":"d","agents":{{}}}}}},"tls":{tls}}}"#))
        };
        if cfg!(target_os = "macos") {
            let problems = with(r#"{"selfSigned":true}"#).unwrap_err();
            assert_eq!(problems, ["tls: TLS is not available in macOS builds; put a TLS proxy in front"]);
            return;
        }
        assert_eq!(with(r#"{"selfSigned":true}"#).unwrap().0.tls, Some(TlsSettings::SelfSigned));
        assert_eq!(
            with(r#"{"certFile":"c.pem","keyFile":"/k.pem"}"#).unwrap().0.tls,
            Some(TlsSettings::Files { cert: "/srv/c.pem".into(), key: "/k.pem".into() })
        );
        let cases = [
            (r#"{"certFile":"c.pem"}"#, "tls.keyFile: missing (the private key, PEM)"),
            (r#"{"keyFile":"k.pem"}"#, "tls.certFile: missing (the certificate chain, PEM)"),
            (r#"{"certFile":1,"keyFile":"k"}"#, "tls.certFile: expected a string, found a number"),
            (r#"{"selfSigned":"yes"}"#, "tls.selfSigned: expected true or false, found a string"),
            (r#"{"selfSigned":true,"certFile":"c","keyFile":"k"}"#, "tls: either selfSigned or certFile"),
            (r#"{}"#, "tls: needs certFile and keyFile"),
            (r#"true"#, "tls: expected an object, found"),
        ];
        for (tls, want) in cases {
            let problems = with(tls).unwrap_err();
            assert!(problems.iter().any(|p| p.starts_with(want)), "{tls}: {problems:?}");
        }
    }

    #[test]
    fn every_problem_is_named_by_its_path() {
        let problems = check(
            r#"{"port":"x","projects":{"a":{"dir":"d"},"b":{"token":"t","dir":1,"agents":[]},
               "c":{"token":"t","dir":"d"},"d":{"token":"t","dir":"d","agents":{"x y":{}}}}}"#,
        )
        .unwrap_err();
        let want = [
            "port: expected an integer 0-65535, found a string",
            "projects.a.token: missing",
            "projects.b.dir: expected a string, found a number",
            "projects.b.agents: expected an object, found an array",
            "projects.c.token: same token as projects.",
            "projects.d.agents.x y: an agent name",
        ];
        for w in want {
            assert!(problems.iter().any(|p| p.starts_with(w)), "{w:?} not in {problems:#?}");
        }
    }

    #[test]
    fn unknown_keys_warn_and_duplicates_fail() {
        let (_, warnings) = check(r#"{"projects":{"a":{"token":"t","dir":"d","colour":1}}}"#).unwrap();
        let agent = r#"{"projects":{"a":{"token":"t","dir":"d","agents":{"x":{"command":["my-cli","{prompt}"],
            "mode":"exec","timeout":60,"env":{"K":"v"}}}}}}"#;
        let (c, w) = check(agent).unwrap();
        assert!(w.is_empty(), "{w:?}");
        let a = &c.projects[0].agents[0];
        assert_eq!(a.command.as_deref(), Some(&["my-cli".to_string(), "{prompt}".to_string()][..]));
        assert!(a.exec && a.timeout == Some(Duration::from_secs(60)) && a.env == [("K".into(), "v".into())]);
        let bad = r#"{"projects":{"a":{"token":"t","dir":"d","agents":{"x":{"command":[],"mode":"x"}}}}}"#;
        assert_eq!(check(bad).unwrap_err().len(), 2);
        assert_eq!(warnings, ["unknown key projects.a.colour (ignored)"]);
        let problems =
            check(r#"{"projects":{"a":{"token":"t","dir":"d"},"a":{"token":"u","dir":"d"}}}"#).unwrap_err();
        assert_eq!(problems[0], "projects.a: duplicate key");
    }

    #[test]
    fn secrets_do_not_debug_print() {
        let (c, _) = check(r#"{"projects":{"a":{"token":"hunter2","dir":"d"}}}"#).unwrap();
        assert!(!format!("{c:?}").contains("hunter2"));
    }
}
