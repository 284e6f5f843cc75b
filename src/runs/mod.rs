//! Agent runs: `invoke` starts one, `stop` ends it. A run syncs the payload's
//! repositories, runs the agent through acpx (or the agent's own argv
//! template) in its own process group with stdin from /dev/null and no shell,
//! turns each line of its output into an `output` event, and closes with
//! exactly one `complete` or `error`. Events go, in order and numbered by
//! `seq`, to the callback through the [`Outbox`], or to a live NDJSON answer.
//!
//! The agent is a [`supervise::Child`] marked `AION_RUN_ID`: when the run
//! ends, every process carrying the marker is swept, so acpx's detached queue
//! owner does not outlive it.
//!
//! Threads of a run, all named after its id and all joined by the run thread:
//! - `run-ID`: the run thread; syncs repos, spawns the agent, waits for it,
//!   owns the run's events after the pump is done and posts the closing one;
//!   ends with the run;
//! - `run-out-ID` (scoped): reads stdout line by line into output events;
//!   ends at EOF or when released after the agent is gone;
//! - `run-err-ID`: keeps the tail of stderr; ends at EOF or when released;
//! - `run-ctl-ID`: owns the receiver of the run's [`Control`] channel; ends
//!   the process group on stop, timeout or shutdown, or returns when told
//!   the agent exited.

use crate::config::{Agent, Limits};
use crate::delivery::outbox::{Fallback, Outbox, Record, Stream};
use crate::lease::Leases;
use crate::logging::{error, info, warn};
use crate::process::{
    self as proc,
    supervise::{self, Child},
};
use crate::project::ProjectState;
use crate::workspace::git::{self, Change, RepoSpec};
use crossbeam_channel::{Receiver, Sender};
use serde::Serialize;
use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// A validated `invoke`.
pub struct Invoke {
    pub agent: String,
    pub prompt: String,
    pub session: String,
    pub model: Option<String>,
    /// Base URL of the platform's callbacks.
    pub callback: Option<String>,
    /// Echoed in every event body ("" if the invoke had none).
    pub token: String,
    pub repos: Vec<RepoSpec>,
}

/// Where a run's events go.
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

/// Messages to a run's control thread (which owns the receiver).
enum Control {
    Stop,
    Shutdown,
    /// The process has exited; the control thread can end.
    Exited,
}

/// Why a run ended before its agent was done.
#[derive(Clone, Copy)]
enum Cut {
    Stopped,
    Shutdown,
    TimedOut(Duration),
}

pub struct Runs {
    outbox: Arc<Outbox>,
    limits: Limits,
    /// Aion leases for agents with `leaseApps` (None: no agent has any).
    leases: Option<Leases>,
    /// Running runs by (project id, session), with their control senders.
    active: Mutex<HashMap<(String, String), Sender<Control>>>,
    /// Set (under the `active` lock) when shutdown begins: no new run starts.
    closing: std::sync::atomic::AtomicBool,
    next: AtomicU64,
    /// The last display post of each (project id, session): its outbox stream
    /// id, while it may still be undelivered. The inner lock is held while a
    /// post of that session is queued, so they go one after the other.
    displays: Mutex<HashMap<(String, String), LastDisplay>>,
}

/// The outbox stream id of a session's last display post.
type LastDisplay = Arc<Mutex<Option<String>>>;

/// How long a display post waits for the session's previous one to be delivered.
const DISPLAY_WAIT: Duration = Duration::from_secs(5);

impl Runs {
    pub fn new(outbox: Arc<Outbox>, limits: Limits, leases: Option<Leases>) -> Arc<Runs> {
        Arc::new(Runs {
            outbox,
            limits,
            leases,
            active: Mutex::new(HashMap::new()),
            closing: std::sync::atomic::AtomicBool::new(false),
            next: AtomicU64::new(0),
            displays: Mutex::new(HashMap::new()),
        })
    }

    fn active(&self) -> std::sync::MutexGuard<'_, HashMap<(String, String), Sender<Control>>> {
        self.active.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Registers and starts a run; refused while its session runs or the
    /// project is at its cap.
    pub fn start(
        self: &Arc<Self>,
        project: Arc<ProjectState>,
        invoke: Invoke,
        delivery: Delivery,
    ) -> Result<(), Refused> {
        let key = (project.config.id.clone(), invoke.session.clone());
        let (tx, rx) = crossbeam_channel::unbounded();
        {
            let mut active = self.active();
            if self.closing.load(Ordering::SeqCst) {
                return Err(Refused::ShuttingDown);
            }
            if active.contains_key(&key) {
                return Err(Refused::Busy);
            }
            if active.keys().filter(|(p, _)| *p == key.0).count() >= self.limits.runs_per_project {
                return Err(Refused::TooMany);
            }
            active.insert(key.clone(), tx.clone());
        }
        let millis = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default().as_millis();
        let id = format!("{millis}-{}-{}", std::process::id(), self.next.fetch_add(1, Ordering::Relaxed));
        let runs = Arc::clone(self);
        let run_key = key.clone();
        let spawned =
            std::thread::Builder::new().name(format!("run-{id}")).stack_size(512 << 10).spawn(move || {
                let started = Instant::now();
                let session = invoke.session.clone();
                let mut run = Run::new(&runs, &project, &id, invoke, delivery);
                let outcome = run.go(rx, tx);
                runs.active().remove(&run_key);
                info!(
                    "run {session} project={} ended: {outcome} after {:.1}s, {} line(s)",
                    project.config.id,
                    started.elapsed().as_secs_f64(),
                    run.lines
                );
            });
        if let Err(e) = spawned {
            error!("cannot start a run thread: {e}");
            self.active().remove(&key);
            return Err(Refused::TooMany);
        }
        Ok(())
    }

    /// Asks a session's run to stop; false when none is running.
    pub fn stop(&self, project: &str, session: &str) -> bool {
        let tx = self.active().get(&(project.to_string(), session.to_string())).cloned();
        tx.is_some_and(|tx| tx.send(Control::Stop).is_ok())
    }

    /// Shutdown: every run is stopped (each still posts its closing event).
    pub fn stop_all(&self) {
        let senders: Vec<Sender<Control>> = {
            let active = self.active();
            self.closing.store(true, Ordering::SeqCst);
            active.values().cloned().collect()
        };
        for tx in senders {
            let _ = tx.send(Control::Shutdown);
        }
    }

    /// `display_set` / `display_clear` of an agent's MCP server (`url` empty to
    /// clear): `{"url","token","sessionId"}` POSTed to
    /// `{callback}/internal/agent-display` through the signed, retried outbox.
    /// The posts of a session arrive in order: one is queued only once the
    /// previous one is delivered, which it waits for up to five seconds;
    /// past that it is refused (the platform is not taking posts).
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
            let mut displays = self.displays.lock().unwrap_or_else(|p| p.into_inner());
            if displays.len() > 256 {
                displays.retain(|_, last| {
                    last.try_lock().map_or(true, |id| id.as_deref().is_some_and(|id| self.outbox.pending(id)))
                });
            }
            Arc::clone(displays.entry((key.clone(), session.to_string())).or_default())
        };
        let mut last = last.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(previous) = last.as_deref() {
            let deadline = Instant::now() + DISPLAY_WAIT;
            while self.outbox.pending(previous) {
                if Instant::now() >= deadline {
                    return Err("the previous display post is not delivered yet (is the platform up?)".into());
                }
                std::thread::sleep(Duration::from_millis(10));
            }
        }
        let base = callback.trim_end_matches('/');
        let mut body = serde_json::Map::new();
        body.insert("url".into(), url.into());
        body.insert("token".into(), token.into());
        body.insert("sessionId".into(), session.into());
        let target = format!("{base}/internal/agent-display");
        let id = format!("display-{}-{:x}", std::process::id(), crate::nonce::nonce());
        let fallback = Fallback { url: target.clone(), key: key.clone(), body: body.clone() };
        let record = Record {
            url: target,
            key,
            seq: 0,
            last: true,
            body: serde_json::Value::Object(body).to_string(),
        };
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

/// A run's events, numbered, to wherever they go.
struct Events {
    sink: Sink,
    seq: u64,
    session: String,
    token: String,
    key: String,
    base: String,
}

enum Sink {
    Outbox(Stream),
    Live(Sender<Vec<u8>>),
    Nowhere,
}

#[derive(Serialize)]
struct Event<'a> {
    #[serde(rename = "type", skip_serializing_if = "Option::is_none")]
    kind: Option<&'static str>,
    #[serde(rename = "sessionId")]
    session_id: &'a str,
    seq: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    text: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    summary: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    changed: Option<&'a [Change]>,
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<&'a str>,
    token: &'a str,
}

impl Events {
    fn emit(&mut self, kind: &'static str, path: &str, mut event: Event<'_>) {
        let last = kind != "output";
        event.seq = self.seq;
        self.seq += 1;
        match &mut self.sink {
            Sink::Outbox(stream) => {
                let body = serde_json::to_string(&event).expect("events serialize");
                let record = Record {
                    url: format!("{}{path}", self.base),
                    key: self.key.clone(),
                    seq: event.seq,
                    last,
                    body,
                };
                stream.push(&record);
            }
            Sink::Live(tx) => {
                event.kind = Some(kind);
                let mut line = serde_json::to_vec(&event).expect("events serialize");
                line.push(b'\n');
                if tx.send(line).is_err() {
                    // The client went away; the run goes on, unwatched.
                    self.sink = Sink::Nowhere;
                }
            }
            Sink::Nowhere => {}
        }
    }

    fn blank(&self) -> Event<'static> {
        Event {
            kind: None,
            session_id: "",
            seq: 0,
            text: None,
            summary: None,
            changed: None,
            error: None,
            token: "",
        }
    }

    fn output(&mut self, text: &str) {
        let (session, token) = (self.session.clone(), self.token.clone());
        let ev = Event { session_id: &session, text: Some(text), token: &token, ..self.blank() };
        self.emit("output", "/internal/agent-stream", ev);
    }

    fn complete(&mut self, summary: &str, changed: &[Change]) {
        let (session, token) = (self.session.clone(), self.token.clone());
        let ev = Event {
            session_id: &session,
            summary: Some(summary),
            changed: Some(changed),
            token: &token,
            ..self.blank()
        };
        self.emit("complete", "/internal/agent-complete", ev);
    }

    fn error(&mut self, message: &str) {
        let (session, token) = (self.session.clone(), self.token.clone());
        let ev = Event { session_id: &session, error: Some(message), token: &token, ..self.blank() };
        self.emit("error", "/internal/agent-error", ev);
    }
}

/// What the agent's output says: its message text and whether the prompt turn finished.
#[derive(Default)]
struct Transcript {
    summary: String,
    /// Output that was not JSON (a non-ACP command), for the summary.
    plain: String,
    saw_json: bool,
    stop_reason: Option<String>,
}

const SUMMARY_CAP: usize = 1 << 20;

impl Transcript {
    fn feed(&mut self, line: &str) {
        match serde_json::from_str::<serde_json::Value>(line) {
            Ok(serde_json::Value::Object(m)) => {
                self.saw_json = true;
                if let Some(text) = message_text(&m)
                    && self.summary.len() < SUMMARY_CAP
                {
                    self.summary.push_str(text);
                }
                if let Some(reason) =
                    m.get("result").and_then(|r| r.get("stopReason")).and_then(|r| r.as_str())
                {
                    self.stop_reason = Some(reason.to_string());
                }
            }
            _ => {
                if self.plain.len() < SUMMARY_CAP {
                    self.plain.push_str(line);
                    self.plain.push('\n');
                }
            }
        }
    }

    fn summary(&self) -> &str {
        if self.summary.is_empty() && !self.saw_json { self.plain.trim_end() } else { &self.summary }
    }
}

/// The text of an agent message in the shapes acpx and the original knew:
/// an ACP `session/update` with `agent_message_chunk`, a bare update, and
/// `{"type":"text"|"message"|"agent_message"|"assistant","text"|"content":…}`.
fn message_text(m: &serde_json::Map<String, serde_json::Value>) -> Option<&str> {
    let update = m.get("params").and_then(|p| p.get("update")).and_then(|u| u.as_object()).unwrap_or(m);
    if update.get("sessionUpdate").and_then(|s| s.as_str()) == Some("agent_message_chunk") {
        let content = update.get("content")?;
        return content
            .get("text")
            .and_then(|t| t.as_str())
            .filter(|_| content.get("type").and_then(|t| t.as_str()).is_none_or(|t| t == "text"));
    }
    let kind = m.get("type").and_then(|t| t.as_str())?;
    if ["text", "message", "agent_message", "assistant"].contains(&kind) {
        return m.get("text").or_else(|| m.get("content")).and_then(|t| t.as_str());
    }
    None
}

struct Run<'a> {
    runs: &'a Runs,
    project: &'a ProjectState,
    id: String,
    invoke: Invoke,
    events: Events,
    lines: u64,
}

impl<'a> Run<'a> {
    fn new(
        runs: &'a Runs,
        project: &'a ProjectState,
        id: &str,
        invoke: Invoke,
        delivery: Delivery,
    ) -> Run<'a> {
        let base = invoke.callback.as_deref().unwrap_or("").trim_end_matches('/').to_string();
        let key = project.config.id.clone();
        let sink = match delivery {
            Delivery::Live(tx) => Sink::Live(tx),
            Delivery::Nowhere => Sink::Nowhere,
            Delivery::Callback => {
                let mut body = serde_json::Map::new();
                body.insert("sessionId".into(), invoke.session.clone().into());
                body.insert("error".into(), "the connector restarted".into());
                body.insert("token".into(), invoke.token.clone().into());
                let fallback =
                    Fallback { url: format!("{base}/internal/agent-error"), key: key.clone(), body };
                Sink::Outbox(runs.outbox.stream(id, &fallback))
            }
        };
        let events =
            Events { sink, seq: 0, session: invoke.session.clone(), token: invoke.token.clone(), key, base };
        Run { runs, project, id: id.to_string(), invoke, events, lines: 0 }
    }

    /// The whole run; returns what its log line says.
    fn go(&mut self, control: Receiver<Control>, control_tx: Sender<Control>) -> String {
        let limits = &self.runs.limits;
        let mut cwd = self.project.root.clone();
        if !self.invoke.repos.is_empty() {
            let results = self.project.sync_all(&self.invoke.repos, limits.git);
            if let Some(failed) = results.iter().find(|r| !r.ok) {
                let msg = format!(
                    "repos.sync failed: {}: {}",
                    failed.name,
                    failed.error.as_deref().unwrap_or("failed")
                );
                self.events.error(&msg);
                return format!("error ({msg})");
            }
            cwd = self.project.root.join(&self.invoke.repos[0].dir);
        }
        let Some(agent) = self.project.config.agents.iter().find(|a| a.name == self.invoke.agent) else {
            self.events.error("unknown agent");
            return "error (unknown agent)".into();
        };
        let head_at_start = git::head(&cwd, limits.git);
        let marker = format!("AION_RUN_ID={}", self.id);
        let (ensure, argv) = commands(agent, &self.invoke);
        if let Some(msg) = stopped_early(&control) {
            self.events.error(msg);
            return format!("error ({msg})");
        }
        if let Some(ensure) = ensure
            && let Err(msg) = self.prepare(&ensure, agent, &cwd)
        {
            supervise::sweep(&marker, Duration::from_secs(2));
            self.events.error(&msg);
            return format!("error ({msg})");
        }
        // A stop or shutdown that came during the sync or the ensure: no agent.
        if let Some(msg) = stopped_early(&control) {
            supervise::sweep(&marker, Duration::from_secs(2));
            self.events.error(msg);
            return format!("error ({msg})");
        }
        // The agent's desktop apps stay leased until this run is over.
        let _leases = self.runs.leases.as_ref().map(|l| l.hold(&agent.lease_apps));
        let mut cmd = command(&argv, agent, &cwd, &self.id);
        cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
        let child = match Child::spawn(&mut cmd, "AION_RUN_ID", &self.id) {
            Ok(c) => c,
            Err(e) => {
                let msg = spawn_error(&argv[0], &e);
                self.events.error(&msg);
                return format!("error ({msg})");
            }
        };
        info!(
            "run {} project={} agent={} started (pid {})",
            self.invoke.session,
            self.project.config.id,
            agent.name,
            child.pid()
        );
        let timeout = agent.timeout.unwrap_or(limits.run);
        let cut: Arc<Mutex<Option<Cut>>> = Arc::new(Mutex::new(None));
        let controller = {
            let (group, cut, grace) = (Arc::clone(&child.group), Arc::clone(&cut), limits.stop_grace);
            let cancel = (!agent.exec && agent.command.is_none())
                .then(|| command(&acpx_cancel(agent, &self.invoke.session), agent, &cwd, &self.id));
            std::thread::Builder::new().name(format!("run-ctl-{}", self.id)).stack_size(128 << 10).spawn(
                move || {
                    let why = match control.recv_timeout(timeout) {
                        Ok(Control::Exited) | Err(crossbeam_channel::RecvTimeoutError::Disconnected) => {
                            return;
                        }
                        Ok(Control::Stop) => Cut::Stopped,
                        Ok(Control::Shutdown) => Cut::Shutdown,
                        Err(crossbeam_channel::RecvTimeoutError::Timeout) => Cut::TimedOut(timeout),
                    };
                    *cut.lock().unwrap_or_else(|p| p.into_inner()) = Some(why);
                    supervise::terminate(&group, cancel, grace);
                },
            )
        };
        if let Err(e) = &controller {
            // Without a controller neither stop nor the timeout can end the
            // agent: refuse to run it unsupervised.
            error!("run {}: cannot start its control thread: {e}", self.invoke.session);
            child.group.signal(nix::sys::signal::Signal::SIGKILL);
        }
        let stderr = child.stderr().and_then(|pipe| {
            let spawned = std::thread::Builder::new()
                .name(format!("run-err-{}", self.id))
                .stack_size(128 << 10)
                .spawn(move || tail(pipe, 8 << 10));
            spawned.inspect_err(|e| error!("run: cannot start its stderr reader: {e}")).ok()
        });
        let mut transcript = Transcript::default();
        let cap = limits.run_output_bytes;
        let (events, lines, session) = (&mut self.events, &mut self.lines, self.invoke.session.as_str());
        let (id, child) = (&self.id, &child);
        let status = std::thread::scope(|scope| {
            // The pump reads stdout on its own thread: a process that escaped the
            // group (a detached daemon) may hold the pipe open after the agent
            // exits, and only the sweep below ends it.
            let mut pump_thread = None;
            if let Some(out) = child.stdout() {
                let transcript = &mut transcript;
                match std::thread::Builder::new()
                    .name(format!("run-out-{id}"))
                    .stack_size(256 << 10)
                    .spawn_scoped(scope, move || pump(out, events, transcript, lines, cap, session))
                {
                    Ok(handle) => pump_thread = Some(handle),
                    Err(e) => {
                        error!("run {session}: cannot start its output thread: {e}");
                        child.group.signal(nix::sys::signal::Signal::SIGKILL);
                    }
                }
            }
            let status = child.wait();
            let _ = control_tx.send(Control::Exited);
            if let Ok(handle) = controller {
                let _ = handle.join();
            }
            // Whatever still holds the pipes (it dropped the marker) does not
            // hold the run: what it wrote so far is read, then no more.
            let swept = child.finish(|| pump_thread.as_ref().is_none_or(|h| h.is_finished()));
            if swept > 0 {
                info!("run {session}: ended {swept} process(es) it left behind");
            }
            status
        });
        let stderr_tail = stderr.and_then(|h| h.join().ok()).unwrap_or_default();
        let cut = *cut.lock().unwrap_or_else(|p| p.into_inner());
        self.finish(cut, status, &transcript, &stderr_tail, &cwd, head_at_start.as_deref(), &argv[0])
    }

    /// `acpx <agent> sessions ensure --name S`: bounded, its own group.
    fn prepare(&self, argv: &[String], agent: &Agent, cwd: &Path) -> Result<(), String> {
        let mut cmd = command(argv, agent, cwd, &self.id);
        match proc::run(&mut cmd, Duration::from_secs(120), 64 << 10) {
            Err(e) => Err(spawn_error(&argv[0], &e)),
            Ok(out) if out.success() => Ok(()),
            Ok(out) if out.status.is_none() => Err("acpx sessions ensure timed out".into()),
            Ok(out) => Err(format!("acpx sessions ensure failed: {}", last_words(&out.stderr))),
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn finish(
        &mut self,
        cut: Option<Cut>,
        status: std::io::Result<std::process::ExitStatus>,
        transcript: &Transcript,
        stderr_tail: &[u8],
        cwd: &Path,
        head_at_start: Option<&str>,
        program: &str,
    ) -> String {
        let msg = match cut {
            Some(Cut::Stopped) => Some("stopped".to_string()),
            Some(Cut::Shutdown) => Some("the connector is shutting down".to_string()),
            Some(Cut::TimedOut(t)) => Some(format!("timed out after {}s", t.as_secs())),
            None => match &status {
                Ok(s) if s.success() || transcript.stop_reason.is_some() => None,
                Ok(s) => {
                    let how = match (s.code(), std::os::unix::process::ExitStatusExt::signal(s)) {
                        (Some(code), _) => format!("exited with code {code}"),
                        (None, Some(sig)) => format!("was killed by signal {sig}"),
                        _ => "failed".to_string(),
                    };
                    let words = last_words(stderr_tail);
                    Some(if words.is_empty() {
                        format!("{program} {how}")
                    } else {
                        format!("{program} {how}: {words}")
                    })
                }
                Err(e) => Some(format!("cannot wait for {program}: {e}")),
            },
        };
        if let Some(msg) = msg {
            self.events.error(&msg);
            return format!("error ({msg})");
        }
        let changed = changes(cwd, head_at_start, self.runs.limits.git);
        self.events.complete(transcript.summary(), &changed);
        format!("complete ({} changed)", changed.len())
    }
}

/// Reads the agent's stdout line by line into events, up to the output cap.
fn pump(
    out: supervise::Stoppable<std::process::ChildStdout>,
    events: &mut Events,
    transcript: &mut Transcript,
    lines: &mut u64,
    cap: u64,
    session: &str,
) {
    let mut reader = BufReader::with_capacity(64 << 10, out);
    let mut line = Vec::new();
    let mut sent: u64 = 0;
    let mut capped = false;
    loop {
        line.clear();
        match read_line(&mut reader, &mut line, 1 << 20) {
            Ok(0) | Err(_) => break,
            Ok(_) => {}
        }
        while line.last().is_some_and(|b| *b == b'\n' || *b == b'\r') {
            line.pop();
        }
        let text = String::from_utf8_lossy(&line);
        transcript.feed(&text);
        *lines += 1;
        if capped {
            continue;
        }
        sent += line.len() as u64 + 1;
        if sent > cap {
            capped = true;
            warn!("run {session}: output limit of {cap} bytes reached");
            events.output(&format!(
                "[aion-connector] output limit of {cap} bytes reached; the rest of this run's output is dropped"
            ));
            continue;
        }
        events.output(&text);
    }
}

/// A stop or shutdown that arrived before the agent started.
fn stopped_early(control: &Receiver<Control>) -> Option<&'static str> {
    match control.try_recv() {
        Ok(Control::Stop) => Some("stopped"),
        Ok(Control::Shutdown) => Some("the connector is shutting down"),
        _ => None,
    }
}

/// One line, at most `max` bytes (a longer one comes in pieces).
fn read_line(reader: &mut impl BufRead, line: &mut Vec<u8>, max: usize) -> std::io::Result<usize> {
    loop {
        let buf = reader.fill_buf()?;
        if buf.is_empty() {
            return Ok(line.len());
        }
        let room = max - line.len();
        let window = &buf[..buf.len().min(room)];
        if let Some(i) = window.iter().position(|&b| b == b'\n') {
            line.extend_from_slice(&window[..=i]);
            reader.consume(i + 1);
            return Ok(line.len());
        }
        let n = window.len();
        line.extend_from_slice(window);
        reader.consume(n);
        if line.len() >= max {
            return Ok(line.len());
        }
    }
}

/// The last `cap` bytes a pipe gave.
fn tail(mut pipe: impl Read, cap: usize) -> Vec<u8> {
    let mut kept = Vec::new();
    let mut chunk = [0u8; 8192];
    while let Ok(n) = pipe.read(&mut chunk) {
        if n == 0 {
            break;
        }
        kept.extend_from_slice(&chunk[..n]);
        if kept.len() > 2 * cap {
            kept.drain(..kept.len() - cap);
        }
    }
    if kept.len() > cap {
        kept.drain(..kept.len() - cap);
    }
    kept
}

/// The last few non-empty lines of stderr, as one line.
fn last_words(stderr: &[u8]) -> String {
    let words = proc::last_lines(stderr, 5, " | ");
    let start = words.len().saturating_sub(2000);
    words[words.ceil_char_boundary(start)..].to_string()
}

fn spawn_error(program: &str, e: &std::io::Error) -> String {
    if e.kind() == std::io::ErrorKind::NotFound {
        if program == "acpx" {
            "acpx not found on PATH (npm install -g acpx; it needs Node.js 22 or later)".into()
        } else {
            format!("{program} not found on PATH")
        }
    } else {
        format!("cannot start {program}: {e}")
    }
}

/// The command of a run: the agent's own argv template, one-shot `acpx exec`,
/// or (the original's default) a persistent acpx session, first ensured.
fn commands(agent: &Agent, inv: &Invoke) -> (Option<Vec<String>>, Vec<String>) {
    if let Some(template) = &agent.command {
        let vars = [
            ("prompt", inv.prompt.as_str()),
            ("session", inv.session.as_str()),
            ("model", inv.model.as_deref().unwrap_or("")),
            ("agent", agent.name.as_str()),
        ];
        return (None, template.iter().map(|t| fill(t, &vars)).collect());
    }
    let mut argv: Vec<String> = ["acpx", "--format", "json", "--approve-all"].map(String::from).to_vec();
    if let Some(model) = &inv.model {
        argv.extend(["--model".into(), model.clone()]);
    }
    argv.push(agent.name.clone());
    if agent.exec {
        argv.extend(["exec".into(), "--".into(), inv.prompt.clone()]);
        return (None, argv);
    }
    argv.extend(["-s".into(), inv.session.clone(), "--".into(), inv.prompt.clone()]);
    let ensure =
        ["acpx", &agent.name, "sessions", "ensure", "--name", &inv.session].map(String::from).to_vec();
    (Some(ensure), argv)
}

/// Replaces `{name}` placeholders in one pass: text that comes in through a
/// value (a prompt mentioning `{session}`) is never expanded again.
fn fill(template: &str, vars: &[(&str, &str)]) -> String {
    let mut out = String::with_capacity(template.len());
    let mut rest = template;
    while let Some(open) = rest.find('{') {
        out.push_str(&rest[..open]);
        let after = &rest[open + 1..];
        let hit = after
            .find('}')
            .and_then(|close| vars.iter().find(|(k, _)| *k == &after[..close]).map(|(_, v)| (close, *v)));
        match hit {
            Some((close, value)) => {
                out.push_str(value);
                rest = &after[close + 1..];
            }
            None => {
                out.push('{');
                rest = after;
            }
        }
    }
    out.push_str(rest);
    out
}

fn acpx_cancel(agent: &Agent, session: &str) -> Vec<String> {
    ["acpx", &agent.name, "cancel", "-s", session].map(String::from).to_vec()
}

/// A process of the run: in `cwd`, the agent's env added, stdin from
/// /dev/null, marked with the run id so that nothing it leaves survives it.
fn command(argv: &[String], agent: &Agent, cwd: &Path, id: &str) -> Command {
    let mut cmd = Command::new(&argv[0]);
    cmd.args(&argv[1..]).current_dir(cwd).stdin(Stdio::null()).env("AION_RUN_ID", id);
    for (k, v) in &agent.env {
        cmd.env(k, v);
    }
    cmd
}

/// What the run changed: the working tree's changes (untracked included,
/// renames under their new path) plus files of commits made during the run.
fn changes(cwd: &Path, head_at_start: Option<&str>, timeout: Duration) -> Vec<Change> {
    let mut changed = git::status(cwd, timeout).unwrap_or_default();
    if let Some(start) = head_at_start
        && let Some(now) = git::head(cwd, timeout)
        && now != start
    {
        for c in git::committed(cwd, start, &now, timeout) {
            if !changed.iter().any(|x| x.path == c.path) {
                changed.push(c);
            }
        }
    }
    changed
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn summary_joins_agent_message_chunks_and_sees_the_result() {
        let mut t = Transcript::default();
        for line in [
            r#"{"jsonrpc":"2.0","method":"session/update","params":{"sessionId":"s","update":{"sessionUpdate":"agent_message_chunk","content":{"type":"text","text":"Hello, "}}}}"#,
            r#"{"jsonrpc":"2.0","method":"session/update","params":{"sessionId":"s","update":{"sessionUpdate":"tool_call","title":"x"}}}"#,
            r#"{"sessionUpdate":"agent_message_chunk","content":{"type":"text","text":"world"}}"#,
            r#"{"type":"text","text":"!"}"#,
            r#"{"jsonrpc":"2.0","id":2,"result":{"stopReason":"end_turn"}}"#,
        ] {
            t.feed(line);
        }
        assert_eq!(t.summary(), "Hello, world!");
        assert_eq!(t.stop_reason.as_deref(), Some("end_turn"));
        let mut plain = Transcript::default();
        plain.feed("just text");
        assert_eq!(plain.summary(), "just text");
    }

    #[test]
    fn long_lines_come_in_pieces() {
        let data = format!("{}\nshort\n", "x".repeat(10));
        let mut r = BufReader::with_capacity(4, data.as_bytes());
        let mut line = Vec::new();
        let mut got = Vec::new();
        loop {
            line.clear();
            if read_line(&mut r, &mut line, 6).unwrap() == 0 {
                break;
            }
            got.push(String::from_utf8(line.clone()).unwrap());
        }
        assert_eq!(got, ["xxxxxx", "xxxx\n", "short\n"]);
    }

    #[test]
    fn templates_fill_in_one_pass() {
        let vars = [("prompt", "say {session} {x}"), ("session", "S")];
        assert_eq!(fill("-p={prompt}|{session}|{other}|{", &vars), "-p=say {session} {x}|S|{other}|{");
    }

    #[test]
    fn the_prompt_is_one_argument_after_a_double_dash() {
        let agent = Agent {
            name: "pi".into(),
            description: String::new(),
            command: None,
            exec: false,
            timeout: None,
            env: vec![],
            lease_apps: vec![],
        };
        let inv = Invoke {
            agent: "pi".into(),
            prompt: "--help; rm -rf /".into(),
            session: "s1".into(),
            model: Some("m".into()),
            callback: None,
            token: String::new(),
            repos: vec![],
        };
        let (ensure, argv) = commands(&agent, &inv);
        assert_eq!(ensure.unwrap(), ["acpx", "pi", "sessions", "ensure", "--name", "s1"]);
        assert_eq!(
            argv,
            [
                "acpx",
                "--format",
                "json",
                "--approve-all",
                "--model",
                "m",
                "pi",
                "-s",
                "s1",
                "--",
                "--help; rm -rf /"
            ]
        );
    }
}
