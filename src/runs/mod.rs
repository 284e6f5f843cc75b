//! Agent runs: `invoke` starts one, `stop` ends it. A run syncs the payload's
//! repositories (a clone that exists but cannot be updated is logged and used
//! as it is; only a failed clone fails the run), composes the prompt ([`prompt`]), registers the connector's
//! MCP server in the project's `.acpxrc.json` ([`acpxrc`]), ensures the acpx
//! session, and runs the agent in the project dir through acpx (or the
//! agent's own argv template, [`command`]) in its own process group, with no
//! shell. acpx's JSON is read as the Node connector v0.3.3 reads it ([`acp`]):
//! each piece of message text is one `output` post, the end of the turn
//! closes the run with `complete` at once, an empty turn or a session that
//! needs reconnecting is retried (twice at most). Every post is numbered by
//! one `seq` and goes, in order, to the callback through the outbox or to a
//! live NDJSON answer ([`events`]); exactly one `complete` or `error` closes
//! the run, last.
//!
//! Each attempt is a [`crate::process::supervise::Child`] marked
//! `AION_RUN_ID`: when it ends, every process carrying the marker is swept,
//! so acpx's detached queue owner does not outlive it ([`attempt`]).
//!
//! Threads: `run-ID`, the run thread (one per run; it syncs, writes the
//! config, runs the attempts one after the other and reads their output,
//! then closes the run; it ends with the run), plus the threads of the
//! attempt under way, which it joins ([`attempt`]).

mod acp;
mod acpxrc;
mod attempt;
mod command;
mod events;
mod history;
pub mod prompt;

use crate::config::{Agent, LiveLimits};
use crate::delivery::outbox::{Fallback, Outbox, Record};
use crate::lease::Leases;
use crate::logging::{error, info, warn};
use crate::process::{self as proc, supervise};
use crate::project::ProjectState;
use crate::workspace::git::{self, Change, RepoSpec};
use acp::{Line, Summary};
use attempt::{Cut, Outcome};
use command::Mode;
use crossbeam_channel::{Receiver, Sender};
use events::{Events, Kind, Sink};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// Attempts after the first: an empty turn or `needs reconnect` is retried this often.
const RETRIES: u32 = 2;

/// A validated `invoke`.
pub struct Invoke {
    pub agent: String,
    /// The user's prompt as sent; the agent gets it composed with `context`.
    pub prompt: String,
    pub context: prompt::Context,
    pub session: String,
    pub model: Option<String>,
    /// Base URL of the platform's callbacks.
    pub callback: Option<String>,
    /// Echoed in every post ("" if the invoke had none).
    pub token: String,
    pub repos: Vec<RepoSpec>,
}

/// One run as `status` shows it.
#[derive(Clone, Debug)]
pub struct RunSnapshot {
    pub project: String,
    pub session: String,
    pub agent: String,
    /// `running`, or `closing` once its last post is made (its processes are ending).
    pub state: &'static str,
    pub age: Duration,
    /// Posts made so far.
    pub posts: u64,
    /// Posts not yet delivered to the callback (None: not delivered by callback).
    pub pending: Option<u64>,
}

/// Where a run's posts go.
pub enum Delivery {
    Callback,
    /// The live NDJSON answer; the connection thread owns the receiver.
    Live(Sender<Vec<u8>>),
    /// Nobody asked: the run is only logged.
    Nowhere,
}

pub enum Refused {
    Busy,
    TooMany,
    ShuttingDown,
}

/// Messages to a run (the control thread of its attempt under way owns a
/// clone of the receiver; between attempts the run thread looks).
enum Control {
    Stop,
    Shutdown,
}

/// A run in the registry.
struct Active {
    id: String,
    control: Sender<Control>,
    events: Arc<Mutex<Events>>,
    agent: String,
    started: Instant,
    /// Disconnected when the run thread ends: a next run of the session,
    /// started once this one is closed, waits for its cleanup.
    done: Receiver<()>,
}

pub struct Runs {
    outbox: Arc<Outbox>,
    limits: Arc<LiveLimits>,
    /// Aion leases for agents with `leaseApps` (None: no agent has any).
    leases: Option<Leases>,
    /// Running runs by (project id, session).
    active: Mutex<HashMap<(String, String), Active>>,
    /// Set (under the `active` lock) when shutdown begins: no new run starts.
    closing: AtomicBool,
    next: AtomicU64,
    /// The connector's own binary, the `aion` MCP server's command (None: unknown).
    exe: Option<PathBuf>,
    /// `<stateDir>/mcp.sock`, where the MCP servers reach the connector.
    socket: PathBuf,
    /// `<stateDir>/runs`, the run history ([`history`]).
    history: PathBuf,
    /// The last display post of each (project id, session): the outbox
    /// stream it went into, while it may still be undelivered. The inner lock
    /// is held while a post of that session is queued, so they go one after
    /// the other.
    displays: Mutex<HashMap<(String, String), LastDisplay>>,
}

/// The outbox stream id of a session's last display post.
type LastDisplay = Arc<Mutex<Option<String>>>;

/// How long a display post waits for the session's previous one to be delivered.
const DISPLAY_WAIT: Duration = Duration::from_secs(5);

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Runs {
    /// `state_dir` must be absolute: it is written into `.acpxrc.json`.
    pub fn new(
        outbox: Arc<Outbox>,
        limits: Arc<LiveLimits>,
        leases: Option<Leases>,
        state_dir: &Path,
    ) -> Arc<Runs> {
        let exe = std::env::current_exe().and_then(|p| p.canonicalize());
        if let Err(e) = &exe {
            warn!("cannot tell the path of this binary ({e}): agents run without the aion MCP server");
        }
        let history = state_dir.join("runs");
        let closed = history::close_interrupted(&history);
        if closed > 0 {
            info!("run history: {closed} run(s) cut by the previous connector closed as interrupted");
        }
        Arc::new(Runs {
            outbox,
            limits,
            leases,
            active: Mutex::new(HashMap::new()),
            closing: AtomicBool::new(false),
            next: AtomicU64::new(0),
            exe: exe.ok(),
            socket: state_dir.join("mcp.sock"),
            history,
            displays: Mutex::new(HashMap::new()),
        })
    }

    fn active(&self) -> MutexGuard<'_, HashMap<(String, String), Active>> {
        lock(&self.active)
    }

    /// Registers and starts a run; refused while its session runs (a run
    /// already closed but still cleaning up is waited for instead) or the
    /// project is at its cap.
    pub fn start(
        self: &Arc<Self>,
        project: Arc<ProjectState>,
        invoke: Invoke,
        delivery: Delivery,
    ) -> Result<(), Refused> {
        let key = (project.config.id.clone(), invoke.session.clone());
        let millis = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default().as_millis();
        let id = format!("{millis}-{}-{}", std::process::id(), self.next.fetch_add(1, Ordering::Relaxed));
        let (control_tx, control_rx) = crossbeam_channel::unbounded();
        let (done_tx, done_rx) = crossbeam_channel::bounded::<()>(0);
        let mut active = self.active();
        if self.closing.load(Ordering::SeqCst) {
            return Err(Refused::ShuttingDown);
        }
        let previous = match active.get(&key) {
            Some(run) if !lock(&run.events).closed() => return Err(Refused::Busy),
            Some(_) => active.remove(&key),
            None => None,
        };
        if previous.is_none()
            && active.keys().filter(|(p, _)| *p == key.0).count() >= self.limits.get().runs_per_project
        {
            return Err(Refused::TooMany);
        }
        let events = Arc::new(Mutex::new(self.sink(&project, &id, &invoke, delivery)));
        let wait_for = previous.as_ref().map(|p| p.done.clone());
        active.insert(
            key.clone(),
            Active {
                id: id.clone(),
                control: control_tx,
                events: Arc::clone(&events),
                agent: invoke.agent.clone(),
                started: Instant::now(),
                done: done_rx,
            },
        );
        let runs = Arc::clone(self);
        let (run_id, run_key) = (id.clone(), key.clone());
        let spawned =
            std::thread::Builder::new().name(format!("run-{id}")).stack_size(512 << 10).spawn(move || {
                let _done = done_tx;
                if let Some(previous) = wait_for {
                    // The session's last run is closed but still ending its processes.
                    let _ = previous.recv();
                }
                let started = Instant::now();
                let session = invoke.session.clone();
                let mut run =
                    Run { runs: &runs, project: &project, id: &run_id, invoke, events: &events, lines: 0 };
                let outcome = run.go(&control_rx);
                let lines = run.lines;
                let recorder = lock(&events).take_history();
                if let Some(r) = recorder {
                    r.finish(&outcome);
                }
                crate::metrics::run_finished(&outcome);
                {
                    let mut active = runs.active();
                    if active.get(&run_key).is_some_and(|a| a.id == run_id) {
                        active.remove(&run_key);
                    }
                }
                info!(
                    "run {session} project={} ended: {outcome} after {:.1}s, {lines} line(s)",
                    project.config.id,
                    started.elapsed().as_secs_f64(),
                );
            });
        if let Err(e) = spawned {
            error!("cannot start a run thread: {e}");
            active.remove(&key);
            if let Some(previous) = previous {
                active.insert(key, previous);
            }
            return Err(Refused::TooMany);
        }
        crate::metrics::run_started();
        Ok(())
    }

    /// The run's posts: its outbox stream (closed with an `error` if the
    /// connector dies first), its live answer, or nowhere.
    fn sink(&self, project: &ProjectState, id: &str, invoke: &Invoke, delivery: Delivery) -> Events {
        let base = invoke.callback.as_deref().unwrap_or("").trim_end_matches('/').to_string();
        let key = project.config.id.as_str();
        let sink = match delivery {
            Delivery::Live(tx) => Sink::Live(tx),
            Delivery::Nowhere => Sink::Nowhere,
            Delivery::Callback => {
                let mut body = serde_json::Map::new();
                body.insert("sessionId".into(), invoke.session.clone().into());
                body.insert("error".into(), "the connector restarted".into());
                body.insert("token".into(), invoke.token.clone().into());
                let fallback =
                    Fallback { url: format!("{base}/internal/agent-error"), key: key.to_string(), body };
                Sink::Outbox(self.outbox.stream(id, &fallback))
            }
        };
        let mut events =
            Events::new(sink, &invoke.session, &invoke.token, key, &base).redacting(secrets(project, invoke));
        events.record(history::Recorder::start(&self.history, key, id, &invoke.session, &invoke.agent));
        events
    }

    /// The project's last finished runs, newest first ([`history::finished`]).
    pub fn finished(&self, project: &str) -> Vec<serde_json::Value> {
        history::finished(&self.history, project)
    }

    /// A page of the posts of the newest run of `session` from seq `from` on
    /// ([`history::output`]); None when no run of it is kept.
    pub fn output(&self, project: &str, session: &str, from: u64) -> Option<serde_json::Value> {
        history::output(&self.history, project, session, from)
    }

    /// The runs in the registry now, by project then session. The registry
    /// lock is held only to copy; each run's events lock only for its figures.
    pub fn snapshot(&self) -> Vec<RunSnapshot> {
        let runs: Vec<_> = self
            .active()
            .iter()
            .map(|((project, session), a)| {
                (
                    project.clone(),
                    session.clone(),
                    a.id.clone(),
                    a.agent.clone(),
                    a.started,
                    Arc::clone(&a.events),
                )
            })
            .collect();
        let mut list: Vec<RunSnapshot> = runs
            .into_iter()
            .map(|(project, session, id, agent, started, events)| {
                let (posts, closed, callback) = {
                    let e = lock(&events);
                    (e.posts(), e.closed(), e.to_outbox())
                };
                let pending = if callback { Some(self.outbox.backlog(&id)) } else { None };
                RunSnapshot {
                    project,
                    session,
                    agent,
                    state: if closed { "closing" } else { "running" },
                    age: started.elapsed(),
                    posts,
                    pending,
                }
            })
            .collect();
        list.sort_by(|a, b| (&a.project, &a.session).cmp(&(&b.project, &b.session)));
        list
    }

    /// Asks a session's run to stop; false when none is running.
    pub fn stop(&self, project: &str, session: &str) -> bool {
        let tx = self.active().get(&(project.to_string(), session.to_string())).map(|a| a.control.clone());
        tx.is_some_and(|tx| tx.send(Control::Stop).is_ok())
    }

    /// Shutdown: every run is stopped (each still posts its closing event).
    pub fn stop_all(&self) {
        let senders: Vec<Sender<Control>> = {
            let active = self.active();
            self.closing.store(true, Ordering::SeqCst);
            active.values().map(|a| a.control.clone()).collect()
        };
        for tx in senders {
            let _ = tx.send(Control::Shutdown);
        }
    }

    /// `display_set` / `display_clear` of an agent's MCP server (`url` empty to
    /// clear): `{"url","token","sessionId","seq"}` POSTed to
    /// `{callback}/internal/agent-display`. While a run of that session is
    /// open and posts to that callback (or to a live answer), the post takes
    /// the run's next `seq` in its ordered stream; otherwise it is a stream of
    /// its own (`{"url","token","sessionId"}`, as the Node connector's) through
    /// the signed, retried outbox. The posts of a
    /// session arrive in order: one that leaves the stream of the previous
    /// one is queued only once that stream is delivered, which it waits for
    /// up to five seconds; past that it is refused (the platform is not
    /// taking posts).
    pub fn display(
        &self,
        project: &ProjectState,
        session: &str,
        callback: &str,
        token: &str,
        url: &str,
    ) -> Result<(), String> {
        let key = project.config.id.clone();
        let last = {
            let mut displays = lock(&self.displays);
            if displays.len() > 256 {
                displays.retain(|_, last| {
                    last.try_lock().map_or(true, |id| id.as_deref().is_some_and(|id| self.outbox.pending(id)))
                });
            }
            Arc::clone(displays.entry((key.clone(), session.to_string())).or_default())
        };
        let mut last = lock(&last);
        let run = self
            .active()
            .get(&(key.clone(), session.to_string()))
            .map(|a| (a.id.clone(), Arc::clone(&a.events)));
        let wait_for_previous = |previous: &str| {
            let deadline = Instant::now() + DISPLAY_WAIT;
            while self.outbox.pending(previous) {
                if Instant::now() >= deadline {
                    return Err(
                        "the previous display post is not delivered yet (is the platform up?)".to_string()
                    );
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            Ok(())
        };
        if let Some(previous) = last.as_deref()
            && run.as_ref().is_none_or(|(id, _)| id != previous)
        {
            wait_for_previous(previous)?;
        }
        if let Some((id, events)) = run {
            {
                let mut events = lock(&events);
                if events.takes_display(callback) {
                    events.emit(Kind::Display { url, token });
                    *last = Some(id);
                    return Ok(());
                }
            }
            if last.as_deref() == Some(id.as_str()) {
                // The run closed since its last display: its stream goes first.
                wait_for_previous(&id)?;
            }
        }
        let base = callback.trim_end_matches('/');
        if base.is_empty() {
            return Err("no callback to post to".into());
        }
        let target = format!("{base}/internal/agent-display");
        let id = format!("display-{}-{:x}", std::process::id(), crate::nonce::nonce());
        let mut body = serde_json::Map::new();
        body.insert("url".into(), url.into());
        body.insert("token".into(), token.into());
        body.insert("sessionId".into(), session.into());
        let fallback = Fallback { url: target.clone(), key: key.clone(), body };
        let record =
            Record { url: target, key, seq: 0, last: true, body: events::display_body(url, token, session) };
        self.outbox.stream(&id, &fallback).push(&record);
        *last = Some(id);
        Ok(())
    }

    /// Waits (bounded) until no run is left.
    pub fn wait_idle(&self, deadline: Instant) -> usize {
        while !self.active().is_empty() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        self.active().len()
    }
}

/// A repository whose changes a run reports: the project dir itself, or a
/// mapped repository inside it (`prefix` = its path from the project dir, with `/`).
struct Repo {
    dir: PathBuf,
    prefix: String,
}

/// The project dir if it is a repository, then every mapped repository inside it.
fn repos(project: &ProjectState) -> Vec<Repo> {
    let root = project.root.as_path();
    let mut repos = Vec::new();
    if root.join(".git").exists() {
        repos.push(Repo { dir: root.to_path_buf(), prefix: String::new() });
    }
    for (_, path) in project.workspaces() {
        let Ok(real) = path.canonicalize() else { continue };
        let Ok(rel) = real.strip_prefix(root) else { continue };
        if rel.as_os_str().is_empty() || !real.join(".git").exists() || repos.iter().any(|r| r.dir == real) {
            continue;
        }
        let prefix = format!("{}/", rel.to_string_lossy());
        repos.push(Repo { dir: real, prefix });
    }
    repos
}

/// What a run changed, paths from the project dir: each repository's working
/// tree (untracked files included, renames under their new path) plus the
/// files of commits made since `heads` (each repository's HEAD at the start).
fn changes(project: &ProjectState, heads: &[(PathBuf, Option<String>)], timeout: Duration) -> Vec<Change> {
    let repos = repos(project);
    let nested: Vec<&str> = repos.iter().map(|r| r.prefix.as_str()).filter(|p| !p.is_empty()).collect();
    let mut out = Vec::new();
    for repo in &repos {
        let mut changed = git::status(&repo.dir, timeout).unwrap_or_default();
        let start = heads.iter().find(|(d, _)| *d == repo.dir).and_then(|(_, h)| h.as_deref());
        if let Some(start) = start
            && let Some(now) = git::head(&repo.dir, timeout)
            && now != start
        {
            for c in git::committed(&repo.dir, start, &now, timeout) {
                if !changed.iter().any(|x| x.path == c.path) {
                    changed.push(c);
                }
            }
        }
        for c in changed {
            if repo.prefix.is_empty() {
                // The project's own: not its nested repositories (listed on
                // their own), not the connector's .acpxrc.json.
                let nested_here =
                    nested.iter().any(|n| c.path == n.trim_end_matches('/') || c.path.starts_with(n));
                if nested_here || c.path == acpxrc::FILE || c.path.starts_with(".acpxrc.json.") {
                    continue;
                }
            }
            out.push(Change { status: c.status, path: format!("{}{}", repo.prefix, c.path) });
        }
    }
    out
}

/// Where each repository's HEAD is, at the start of a run.
fn heads(project: &ProjectState, timeout: Duration) -> Vec<(PathBuf, Option<String>)> {
    repos(project).into_iter().map(|r| (git::head(&r.dir, timeout), r.dir)).map(|(h, d)| (d, h)).collect()
}

/// Reads the output of a run's attempts: acpx's JSON (message text, events,
/// the end of the turn) or a `command` agent's raw lines.
struct TurnReader<'a> {
    events: &'a Mutex<Events>,
    mode: Mode,
    /// The project posts its ACP updates.
    post_events: bool,
    /// This attempt's summary (acpx: message text and non-JSON lines).
    summary: Summary,
    /// A `command` agent's non-JSON lines, for its summary.
    plain: String,
    /// The run's `complete` went out.
    completed: bool,
    /// Bytes posted so far, the cap, and whether it was reached.
    sent: u64,
    cap: u64,
    capped: bool,
    lines: u64,
    session: &'a str,
    changes: &'a dyn Fn() -> Vec<Change>,
    /// This attempt's tool calls under way (the idle rule waits for them).
    tools: acp::OpenTools,
}

impl TurnReader<'_> {
    fn reset(&mut self) {
        self.summary = Summary::default();
        self.plain.clear();
        self.tools.clear();
    }

    /// Posts within the run's output cap; past it, one marker and nothing more.
    fn post(&mut self, kind: Kind<'_>, size: usize) {
        if self.capped {
            return;
        }
        self.sent += size as u64 + 1;
        let mut events = lock(self.events);
        if self.sent > self.cap {
            self.capped = true;
            warn!("run {}: output limit of {} bytes reached", self.session, self.cap);
            events.output(&format!(
                "[aion-connector] output limit of {} bytes reached; the rest of this run's output is dropped",
                self.cap
            ));
            return;
        }
        events.emit(kind);
    }

    /// The turn is over: `complete` now, unless it was empty (then retried).
    fn turn_over(&mut self) {
        if !self.summary.blank() {
            let changed = (self.changes)();
            lock(self.events).complete(&self.summary.text, &changed);
            self.completed = true;
        }
    }

    /// A `command` agent's summary: its message text if it spoke ACP, else its lines.
    fn raw_summary(&self) -> &str {
        if self.summary.text.is_empty() { self.plain.trim_end() } else { &self.summary.text }
    }
}

impl attempt::Reader for TurnReader<'_> {
    fn line(&mut self, bytes: &[u8]) -> bool {
        self.lines += 1;
        let line = String::from_utf8_lossy(bytes);
        if self.mode == Mode::Template {
            match acp::classify(&line) {
                Line::Text(t) => self.summary.push(&t),
                Line::Plain if self.plain.len() < acp::SUMMARY_CAP => {
                    self.plain.push_str(&line);
                    self.plain.push('\n');
                }
                _ => {}
            }
            self.post(Kind::Output(&line), line.len());
            return false;
        }
        if line.trim().is_empty() {
            return false;
        }
        match acp::classify(&line) {
            Line::Text(t) => {
                self.summary.push(&t);
                if !t.is_empty() {
                    self.post(Kind::Output(&t), t.len());
                }
                false
            }
            Line::EndTurn => {
                self.turn_over();
                true
            }
            Line::Event(event) => {
                self.tools.see(&event);
                if self.post_events {
                    let size = serde_json::to_string(&event).map_or(0, |s| s.len());
                    self.post(Kind::Event(&event), size);
                }
                false
            }
            Line::Other => false,
            Line::Plain => {
                self.summary.push(&line);
                false
            }
        }
    }

    fn idle_armed(&self) -> bool {
        self.mode.acpx() && !self.summary.text.is_empty() && !self.tools.any()
    }

    fn idle(&mut self) {
        self.turn_over();
    }
}

struct Run<'a> {
    runs: &'a Runs,
    project: &'a ProjectState,
    id: &'a str,
    invoke: Invoke,
    events: &'a Mutex<Events>,
    lines: u64,
}

impl Run<'_> {
    fn error(&self, msg: &str) -> String {
        let mut events = lock(self.events);
        events.error(msg);
        // The log line is redacted as the post is (the message may be the agent's stderr).
        format!("error ({})", events.redact(msg))
    }

    /// The whole run; returns what its log line says.
    fn go(&mut self, control: &Receiver<Control>) -> String {
        let limits = self.runs.limits.get();
        let root = self.project.root.clone();
        let session = self.invoke.session.clone();
        if let Some(msg) = stopped_early(control) {
            return self.error(msg);
        }
        if !self.invoke.repos.is_empty() {
            let results = self.project.sync_all(&self.invoke.repos, limits.git);
            // A clone that exists but could not be updated (the agent's own
            // uncommitted edits, say) is used as it is; only a missing one fails the run.
            for kept in results.iter().filter(|r| !r.ok && r.existed) {
                let why = kept.error.as_deref().unwrap_or("failed");
                let why = lock(self.events).redact(why).into_owned();
                warn!("run {session}: repo {} not updated, the agent works on it as it is: {why}", kept.name);
            }
            if let Some(failed) = results.iter().find(|r| !r.ok && !r.existed) {
                let why = failed.error.as_deref().unwrap_or("failed");
                return self.error(&format!("repos.sync failed: {}: {why}", failed.name));
            }
        }
        let Some(agent) = self.project.config.agents.iter().find(|a| a.name == self.invoke.agent) else {
            return self.error("unknown agent");
        };
        let mode = Mode::of(agent);
        let prompt = prompt::compose(&self.invoke.context, &self.invoke.prompt);
        let plan = command::plan(agent, &root, &session, self.invoke.model.as_deref(), &prompt);
        let heads = heads(self.project, limits.git);
        if mode.acpx() {
            self.write_acpxrc(&root);
        }
        let marker = format!("AION_RUN_ID={}", self.id);
        if let Some(ensure) = &plan.ensure {
            self.ensure(ensure, agent, &root);
        }
        if let Some(msg) = stopped_early(control) {
            supervise::sweep(&marker, Duration::from_secs(2));
            return self.error(msg);
        }
        // The agent's desktop apps stay leased until this run is over.
        let _leases = self.runs.leases.as_ref().map(|l| l.hold(&agent.lease_apps));
        let timeout = agent.timeout.unwrap_or(limits.run);
        let deadline = Instant::now() + timeout;
        let git_timeout = limits.git;
        let project = self.project;
        let changed = || changes(project, &heads, git_timeout);
        let mut reader = TurnReader {
            events: self.events,
            mode,
            post_events: self.project.config.events,
            summary: Summary::default(),
            plain: String::new(),
            completed: false,
            sent: 0,
            cap: limits.run_output_bytes,
            capped: false,
            lines: 0,
            session: &session,
            changes: &changed,
            tools: acp::OpenTools::default(),
        };
        let program = plan.argv[0].clone();
        let label = format!("project={} agent={}", self.project.config.id, agent.name);
        let mut attempts = 0;
        let outcome = loop {
            attempts += 1;
            reader.reset();
            let setup = attempt::Setup {
                cmd: command::command(&plan.argv, agent, &root, self.id),
                id: self.id,
                session: &session,
                label: &label,
                control,
                deadline,
                timeout,
                idle: limits.turn_idle,
                cancel: plan.cancel.as_ref().map(|c| command::command(c, agent, &root, self.id)),
                grace: limits.stop_grace,
            };
            let outcome = attempt::run(setup, &mut reader);
            if reader.completed || !outcome.spawned || outcome.cut.is_some() || !mode.acpx() {
                break outcome;
            }
            let code = outcome.status.as_ref().ok().and_then(std::process::ExitStatus::code);
            let reconnect = !outcome.turn_over && (code == Some(5) || (code != Some(0) && outcome.reconnect));
            let empty = outcome.turn_over;
            if (reconnect || empty) && attempts <= RETRIES {
                let why = if reconnect {
                    format!("reconnect needed (exit {code:?})")
                } else {
                    "empty response".into()
                };
                info!("run {session}: {why}, retry {attempts}/{RETRIES}");
                if let Some(msg) = stopped_early(control) {
                    self.lines = reader.lines;
                    return self.error(msg);
                }
                continue;
            }
            break outcome;
        };
        self.lines = reader.lines;
        if reader.completed {
            if let Some(cut) = outcome.cut {
                info!("run {session}: {} after its turn was over", cut_message(cut));
            }
            return "complete".into();
        }
        let Outcome { status, cut, turn_over, stderr, spawned, .. } = outcome;
        if !spawned {
            let e = status.err().unwrap_or_else(|| std::io::Error::other("not started"));
            return self.error(&command::spawn_error(&program, &e));
        }
        if let Some(cut) = cut {
            return self.error(&cut_message(cut));
        }
        if mode.acpx() && turn_over {
            return self.error(&format!("Agent returned an empty response after {attempts} attempt(s)"));
        }
        match &status {
            Ok(s) if s.success() => {
                let summary =
                    if mode.acpx() { reader.summary.text.clone() } else { reader.raw_summary().to_string() };
                let changed = changed();
                lock(self.events).complete(&summary, &changed);
                format!("complete ({} changed)", changed.len())
            }
            _ => self.error(&failure(&stderr, &status, &program)),
        }
    }

    /// Registers the `aion` MCP server in the project's `.acpxrc.json`.
    fn write_acpxrc(&self, root: &Path) {
        let Some(exe) = &self.runs.exe else { return };
        let key = self.project.mcp_key();
        let mcp = acpxrc::Mcp {
            command: exe,
            callback: self.invoke.callback.as_deref().unwrap_or(""),
            token: &self.invoke.token,
            session: &self.invoke.session,
            project: &self.project.config.id,
            socket: &self.runs.socket,
            key: &key,
        };
        if let Err(e) = acpxrc::write(root, &mcp, self.runs.limits.get().git) {
            warn!("run {}: {e}", self.invoke.session);
        }
    }

    /// `acpx --cwd DIR AGENT sessions ensure --name S`, bounded, its own
    /// group; a failure is logged and the run goes on (as the Node connector).
    fn ensure(&self, argv: &[String], agent: &Agent, cwd: &Path) {
        let mut cmd = command::command(argv, agent, cwd, self.id);
        let session = &self.invoke.session;
        match proc::run(&mut cmd, Duration::from_secs(120), 64 << 10) {
            Err(e) => warn!("run {session}: ensure session: {}", command::spawn_error(&argv[0], &e)),
            Ok(out) if out.success() => {}
            Ok(out) if out.status.is_none() => warn!("run {session}: ensure session: timed out"),
            Ok(out) => {
                let text = String::from_utf8_lossy(&out.stderr);
                let text = lock(self.events).redact(&text).into_owned();
                warn!(
                    "run {session}: ensure session: {}",
                    text.chars().take(200).collect::<String>().trim_end()
                );
            }
        }
    }
}

fn cut_message(cut: Cut) -> String {
    match cut {
        Cut::Stopped => "stopped".into(),
        Cut::Shutdown => "Connector shutting down".into(),
        Cut::TimedOut(t) => format!("timed out after {}s", t.as_secs()),
    }
}

/// A stop or shutdown that arrived before an attempt started.
fn stopped_early(control: &Receiver<Control>) -> Option<&'static str> {
    match control.try_recv() {
        Ok(Control::Stop) => Some("stopped"),
        Ok(Control::Shutdown) => Some("Connector shutting down"),
        _ => None,
    }
}

/// What a run keeps out of its posts and log lines: the values of its
/// agent's `env` and the tokens of its repos (a url's credentials included:
/// `user:password` whole and the password alone, as a token `oauth2:glpat-…`).
fn secrets(project: &ProjectState, invoke: &Invoke) -> Vec<String> {
    let agent = project.config.agents.iter().find(|a| a.name == invoke.agent);
    let env = agent.into_iter().flat_map(|a| a.env.iter().map(|(_, v)| v.as_str()));
    let repos = invoke.repos.iter().filter_map(|r| r.token.as_deref());
    let passwords = repos.clone().filter_map(|t| t.split_once(':').map(|(_, password)| password));
    crate::text::secrets(env.chain(repos).chain(passwords))
}

/// A failed agent's error: the first 500 characters of its stderr, as the
/// Node connector sends; how it ended when it said nothing.
fn failure(stderr: &[u8], status: &std::io::Result<std::process::ExitStatus>, program: &str) -> String {
    let text = String::from_utf8_lossy(stderr);
    if !text.trim().is_empty() {
        return text.chars().take(500).collect();
    }
    match status {
        Ok(s) => match (s.code(), std::os::unix::process::ExitStatusExt::signal(s)) {
            (Some(code), _) => format!("{program} exited with code {code}"),
            (None, Some(sig)) => format!("{program} was killed by signal {sig}"),
            _ => format!("{program} failed"),
        },
        Err(e) => format!("cannot wait for {program}: {e}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::process::ExitStatusExt;

    struct NoKeys;
    impl crate::delivery::outbox::Signer for NoKeys {
        fn headers(&self, _: &str, _: &str, _: &[u8]) -> Option<Vec<(String, String)>> {
            Some(Vec::new())
        }
    }

    #[test]
    fn a_display_post_joins_its_open_run_else_goes_on_its_own() {
        let dir = std::env::temp_dir().join(format!(
            "aion-display-{}-{:x}",
            std::process::id(),
            crate::nonce::nonce()
        ));
        let root = dir.join("p");
        std::fs::create_dir_all(&root).unwrap();
        let root = root.canonicalize().unwrap();
        let text = serde_json::json!({"projects": {"p": {"token": "t", "dir": root, "agents": {
            "say": {"command": ["sh", "-c", "echo hi; exec sleep 30", "{prompt}"]}
        }}}})
        .to_string();
        let (mut config, _) = crate::config::parse(&text, &dir).unwrap();
        let projects = crate::project::projects(&mut config, vec![root.clone()], &[], &dir);
        let outbox = Outbox::open(&dir.join("outbox"), Arc::new(NoKeys), Duration::from_secs(60)).unwrap();
        let limits = crate::config::Limits {
            stop_grace: Duration::from_millis(100),
            ..crate::config::Limits::default()
        };
        let runs = Runs::new(outbox, LiveLimits::new(limits), None, &dir);
        let (tx, rx) = crossbeam_channel::unbounded();
        let invoke = Invoke {
            agent: "say".into(),
            prompt: "x".into(),
            context: prompt::Context::default(),
            session: "s".into(),
            model: None,
            callback: None,
            token: "it".into(),
            repos: vec![],
        };
        let p = &projects[0];
        assert!(runs.start(Arc::clone(p), invoke, Delivery::Live(tx)).is_ok());
        let line = |rx: &Receiver<Vec<u8>>| {
            let l = rx.recv_timeout(Duration::from_secs(10)).expect("a stream line");
            serde_json::from_slice::<serde_json::Value>(&l).unwrap()
        };
        assert_eq!(line(&rx)["text"], "hi");
        // The run is open: the display post takes its next seq in its stream.
        assert_eq!(runs.display(p, "s", "", "mcp-token", "https://example.com/x"), Ok(()));
        assert_eq!(
            line(&rx),
            serde_json::json!({"type": "display", "url": "https://example.com/x", "token": "mcp-token", "sessionId": "s", "seq": 1})
        );
        assert!(runs.stop("p", "s"));
        let closing = line(&rx);
        assert_eq!((closing["type"].as_str(), closing["seq"].as_u64()), (Some("error"), Some(2)));
        // Closed: no callback to post to, nothing queued; with one, a stream of its own.
        runs.wait_idle(Instant::now() + Duration::from_secs(10));
        assert!(runs.display(p, "s", "", "mcp-token", "").is_err());
        assert_eq!(runs.display(p, "s", "http://127.0.0.1:9/cb/", "mcp-token", ""), Ok(()));
        let spooled: Vec<String> = std::fs::read_dir(dir.join("outbox"))
            .unwrap()
            .filter_map(|e| e.ok()?.file_name().into_string().ok())
            .filter(|n| n.starts_with("display-") && n.ends_with(".q"))
            .collect();
        assert_eq!(spooled.len(), 1);
        let record: Record = serde_json::from_str(
            std::fs::read_to_string(dir.join("outbox").join(&spooled[0])).unwrap().trim(),
        )
        .unwrap();
        assert_eq!(record.url, "http://127.0.0.1:9/cb/internal/agent-display");
        assert_eq!(record.body, r#"{"url":"","token":"mcp-token","sessionId":"s"}"#);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_failure_is_the_head_of_stderr_or_how_it_ended() {
        let exit3 = Ok(std::process::ExitStatus::from_raw(3 << 8));
        assert_eq!(failure(b"boom\n", &exit3, "acpx"), "boom\n");
        assert_eq!(failure("é".repeat(600).as_bytes(), &exit3, "acpx"), "é".repeat(500));
        assert_eq!(failure(b" \n", &exit3, "acpx"), "acpx exited with code 3");
        let killed = Ok(std::process::ExitStatus::from_raw(9));
        assert_eq!(failure(b"", &killed, "acpx"), "acpx was killed by signal 9");
    }
}
