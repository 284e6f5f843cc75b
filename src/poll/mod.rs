//! Poll mode (`aion-connector poll`): the ClaudiOS-style agent runtime, for
//! platforms that cannot reach the machine. It polls a server for
//! instructions (`start_session`, `command`, `terminate_session`), runs each
//! session's process in its own process group, and streams its stdout and
//! stderr back in numbered chunks at most every `outputFlushInterval`,
//! through the same [`Outbox`] as push mode: ordered, signed when sent
//! (`X-Timestamp`, `X-Signature`), retried through outages and restarts.
//! The wire API is PROTOCOL.md §2.
//!
//! Settings are read by [`config`]; a session's process is a
//! [`supervise::Child`]. `<stateDir>/poll.sock` answers `aion-connector
//! status` ([`status`]).
//!
//! Threads, all named, each ending by itself:
//! - the poll loop (the main thread), until SIGINT/SIGTERM;
//! - `poll-status`: posts status every `statusInterval` and on each session
//!   change (owns the receiver of `status_now`), until shutdown;
//! - per session: `poll-stream-PID` (owns the receiver of the session's
//!   [`Msg`] channel and its outbox stream; ends after the closing event),
//!   `poll-out-PID` and `poll-err-PID` (pipe readers, end at EOF or when
//!   released after the process is gone), `poll-wait-PID` (reaps, sweeps,
//!   joins the readers, sends [`Msg::Ended`]), `poll-stdin-PID` (writes
//!   commands, ends with the session's input channel), and on terminate
//!   `poll-end-PID` (TERM → grace → KILL, ends when the group is gone);
//! - the outbox's and the lease client's threads (see their modules), and
//!   the local socket's (see [`crate::net::local`]; stopped at the end).

pub mod config;
mod status;

use crate::delivery::client::{Answer, Client};
use crate::delivery::outbox::{Fallback, Outbox, Record, Signer, Stream};
use crate::error::Error;
use crate::logging::{error, info, warn};
use crate::process::Group;
use crate::process::supervise::{self, Child};
use crate::shutdown::Shutdown;
use config::PollConfig;
use crossbeam_channel::{Receiver, RecvTimeoutError, Sender};
use serde::Serialize;
use serde_json::{Value, json};
use std::collections::{HashMap, HashSet, VecDeque};
use std::io::{Read, Write};
use std::path::PathBuf;
use std::process::{ChildStdin, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

const CHUNK_BYTES: usize = 64 << 10;
const POST_BYTES: usize = 512 << 10;
const TERMINATE_GRACE: Duration = Duration::from_secs(5);

/// §2's signature: HMAC-SHA256(token, timestamp + "." + body), made when sent.
/// Only for the configured server: a post spooled for a server the config
/// no longer names (after a change of serverUrl) does not get today's token.
struct PollSigner {
    token: String,
    server_url: String,
}

impl Signer for PollSigner {
    fn headers(&self, _key: &str, url: &str, body: &[u8]) -> Option<Vec<(String, String)>> {
        if !url.is_empty() && !url.starts_with(&format!("{}/", self.server_url)) {
            return None;
        }
        let ts = now_ms().to_string();
        let sig = crate::delivery::signing::sha256_hex(self.token.as_bytes(), &[ts.as_bytes(), b".", body]);
        Some(vec![
            ("Authorization".into(), format!("Bearer {}", self.token)),
            ("X-Timestamp".into(), ts),
            ("X-Signature".into(), sig),
        ])
    }
}

fn now_ms() -> u128 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default().as_millis()
}

/// Messages to a session's streamer thread (which owns the receiver).
enum Msg {
    Output {
        stdout: bool,
        data: Vec<u8>,
        ts: u128,
    },
    /// The process is gone; `terminated` when it was ended by instruction or shutdown.
    Ended {
        code: Option<i32>,
        signal: Option<i32>,
        terminated: bool,
    },
}

struct Session {
    pid: i32,
    started_at: u128,
    since: Instant,
    /// Its outbox stream's id, and the posts queued on it so far (events
    /// and output; its streamer counts them).
    stream: String,
    posts: Arc<AtomicU64>,
    group: Arc<Group>,
    /// Lines for the session's stdin; its writer thread owns the receiver,
    /// so a session that does not read blocks only that thread.
    input: Sender<Vec<u8>>,
    terminating: Arc<AtomicBool>,
    /// The Aion leases held while this session runs.
    _leases: Vec<crate::lease::Guard>,
}

/// At most this many errors are posted for one poll answer; the rest are
/// counted in one summary post.
const ERROR_POSTS_PER_POLL: usize = 10;

/// What one poll answer held that is logged or reported in summary: at most
/// [`ERROR_POSTS_PER_POLL`] errors one by one, plus one post for the
/// instructions without an id and one for the errors beyond the budget.
#[derive(Default)]
struct Tally<'a> {
    repeated: usize,
    repeated_ids: HashSet<&'a str>,
    first_repeated: String,
    without_id: usize,
    reported: usize,
    unreported: usize,
}

/// Descriptors a session holds: its three pipes and its process's handle
/// (4 measured per running session), and its outbox stream's spool files
/// while undelivered.
const SESSION_FDS: u64 = 6;

/// `maxConcurrentSessions`, lowered (with a warning) to what the open-file
/// limit leaves after the reserve, so that a `rejected` at the cap, not
/// EMFILE, is what a session meets.
fn session_cap(configured: usize, nofile: Option<u64>) -> usize {
    let Some((nofile, fits)) = crate::fds::short(configured, nofile, SESSION_FDS) else { return configured };
    warn!(
        "maxConcurrentSessions is {configured} but the open-file limit (nofile) is {nofile}: running at most \
         {fits} sessions ({SESSION_FDS} descriptors each, {} kept for the rest); raise the limit \
         (ulimit -n, LimitNOFILE=) to run more",
        crate::fds::reserve(nofile)
    );
    fits
}

pub struct Runtime {
    config: PollConfig,
    client: Client,
    signer: PollSigner,
    outbox: Arc<Outbox>,
    leases: Option<crate::lease::Leases>,
    shutdown: Arc<Shutdown>,
    sessions: Mutex<HashMap<String, Session>>,
    started: Instant,
    state: PathBuf,
    /// Ids of instructions already taken (the newest 10,000).
    seen: Mutex<(HashSet<String>, VecDeque<String>)>,
    status_now: (Sender<()>, Receiver<()>),
    /// Set while the server refuses the token: status posts pause too.
    refused: AtomicBool,
}

pub fn run(mut config: PollConfig, shutdown: Arc<Shutdown>) -> Result<i32, Error> {
    info!("Agent starting... (aion-connector {} poll mode)", crate::version::VERSION);
    config.max_sessions = session_cap(config.max_sessions, crate::fds::raise_limit());
    let state = crate::config::state_dir(config.state_dir.as_deref());
    let signer =
        Arc::new(PollSigner { token: config.agent_token.0.clone(), server_url: config.server_url.clone() });
    let spool = state.join("poll-outbox");
    let outbox = Outbox::open(&spool, signer, config.delivery)
        .map_err(|source| Error::StateDir { path: state.clone(), source })?;
    // Sessions a killed poll connector on this spool left running end now.
    crate::process::instance::set(&spool);
    let ended = crate::process::instance::end_previous(Duration::from_secs(2));
    if ended > 0 {
        warn!("ended {ended} process(es) left running by a previous connector on this state dir");
    }
    let rt = Arc::new(Runtime {
        client: Client::new(Duration::from_secs(30)),
        signer: PollSigner { token: config.agent_token.0.clone(), server_url: config.server_url.clone() },
        outbox,
        leases: (!config.lease_apps.is_empty()).then(|| crate::lease::Leases::start((&config.lease).into())),
        shutdown,
        sessions: Mutex::new(HashMap::new()),
        started: Instant::now(),
        state: state.clone(),
        seen: Mutex::new((HashSet::new(), VecDeque::new())),
        status_now: crossbeam_channel::bounded(1),
        refused: AtomicBool::new(false),
        config,
    });
    // Without its socket poll mode still works; only `status` cannot reach it.
    let socket = match status::start(&state, Arc::clone(&rt)) {
        Ok(s) => Some(s),
        Err(e) => {
            warn!("cannot serve the status socket ({e}): `aion-connector status` cannot reach this agent");
            None
        }
    };
    info!("Polling server at {}", crate::text::redact_userinfo(&rt.config.server_url));
    let status = {
        let rt = Arc::clone(&rt);
        std::thread::Builder::new()
            .name("poll-status".into())
            .stack_size(256 << 10)
            .spawn(move || rt.report_status())
    };
    if let Err(e) = &status {
        // Sessions still run and report; only the periodic status is missing.
        error!("cannot start the status thread: {e}; no status reports will be sent");
    }
    rt.poll_loop();
    info!("Agent stopping: terminating {} session(s)", rt.sessions().len());
    let deadline = Instant::now() + TERMINATE_GRACE + Duration::from_secs(5);
    rt.terminate_all();
    while !rt.sessions().is_empty() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
    if let Some(l) = &rt.leases {
        l.stop(Duration::from_secs(1));
    }
    rt.outbox.drain(Instant::now() + Duration::from_secs(10));
    if let Some(socket) = socket {
        socket.stop();
    }
    drop(status);
    info!("Agent stopped");
    Ok(0)
}

impl Runtime {
    fn sessions(&self) -> std::sync::MutexGuard<'_, HashMap<String, Session>> {
        self.sessions.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.config.server_url)
    }

    fn signed(&self, body: &[u8]) -> Vec<(String, String)> {
        self.signer.headers("", "", body).unwrap_or_default()
    }

    /// GET instructions every `pollInterval` (±10%); back off while the
    /// server is unreachable or refuses the token, without spinning.
    fn poll_loop(self: &Arc<Self>) {
        let mut backoff = Duration::ZERO;
        let mut said_unauthorized = false;
        let mut said_unreachable = false;
        loop {
            let auth = vec![("Authorization".to_string(), format!("Bearer {}", self.config.agent_token.0))];
            let wait = match self.client.get(&self.url("/api/agent/instructions"), &auth) {
                Answer::Status { status: status @ (200 | 204), body, .. } => {
                    if said_unreachable || said_unauthorized {
                        info!("Server reachable again");
                    }
                    (said_unauthorized, said_unreachable, backoff) = (false, false, Duration::ZERO);
                    self.refused.store(false, Ordering::SeqCst);
                    if status == 200 {
                        self.take(&body);
                    }
                    None
                }
                Answer::Status { status: 401 | 403, .. } => {
                    if !said_unauthorized {
                        error!("The server refused the agent token (401): check agentToken; backing off");
                        said_unauthorized = true;
                    }
                    self.refused.store(true, Ordering::SeqCst);
                    backoff = Duration::from_secs(60);
                    Some(backoff)
                }
                other => {
                    let why = match other {
                        Answer::Status { status, .. } => format!("status {status}"),
                        Answer::Failed(e) => crate::text::redact_userinfo(&e),
                    };
                    backoff = (backoff * 2).clamp(Duration::from_secs(1), Duration::from_secs(60));
                    if !said_unreachable {
                        warn!("Cannot poll the server ({why}); retrying with backoff up to 60 s");
                        said_unreachable = true;
                    }
                    Some(backoff)
                }
            };
            let pause = crate::nonce::jitter(wait.unwrap_or(self.config.poll_interval), 0.1);
            if self.shutdown.wait(pause) {
                return;
            }
        }
    }

    /// Acks the new instructions, then acts on them; one seen before is
    /// acked again but not run again. What one answer holds is logged and
    /// reported in bounds whatever its size: repeated ids and instructions
    /// without an id make one summary line each, and at most
    /// [`ERROR_POSTS_PER_POLL`] errors are posted (then one summary).
    fn take(self: &Arc<Self>, body: &[u8]) {
        let list: Vec<Value> = match serde_json::from_slice::<Value>(body) {
            Ok(Value::Object(m)) => match m.get("instructions") {
                Some(Value::Array(items)) => items.clone(),
                _ => Vec::new(),
            },
            Ok(Value::Array(items)) => items,
            _ => {
                warn!("Instructions answer is not JSON; ignored");
                return;
            }
        };
        if list.is_empty() {
            return;
        }
        let mut unique = HashSet::new();
        let ids: Vec<&str> = list
            .iter()
            .filter_map(|i| i.get("id").and_then(Value::as_str))
            .filter(|id| unique.insert(*id))
            .collect();
        let ack = serde_json::to_vec(&json!({ "ids": ids })).expect("JSON");
        match self.client.post(&self.url("/api/agent/instructions/ack"), &self.signed(&ack), &ack) {
            Answer::Status { status, .. } if (200..300).contains(&status) => {}
            other => {
                let why = match other {
                    Answer::Status { status, .. } => format!("status {status}"),
                    Answer::Failed(e) => e,
                };
                warn!("Cannot ack {} instruction(s) ({why}); they will be taken on a later poll", ids.len());
                return;
            }
        }
        let mut tally = Tally::default();
        for instruction in &list {
            let id = instruction.get("id").and_then(Value::as_str).unwrap_or("");
            if id.is_empty() {
                tally.without_id += 1;
                continue;
            }
            if !self.first_time(id) {
                if tally.repeated == 0 {
                    tally.first_repeated = id.to_string();
                }
                tally.repeated += 1;
                tally.repeated_ids.insert(id);
                continue;
            }
            self.act(id, instruction, &mut tally);
        }
        self.summarize(tally);
    }

    /// The summary lines (and posts) of one poll answer.
    fn summarize(&self, tally: Tally) {
        match (tally.repeated, tally.repeated_ids.len()) {
            (0, _) => {}
            (1, _) => info!("Instruction {} seen before; not run again", tally.first_repeated),
            (n, k) => info!(
                "{n} instructions seen before ({k} distinct id(s), the first {}); not run again",
                tally.first_repeated
            ),
        }
        match tally.without_id {
            0 => {}
            1 => self.report_error("instruction without an id; ignored", None, None),
            n => self.report_error(&format!("{n} instructions without an id; ignored"), None, None),
        }
        if tally.unreported > 0 {
            let msg = format!(
                "{} more error(s) in this poll answer, not reported one by one (at most {ERROR_POSTS_PER_POLL} are)",
                tally.unreported
            );
            self.report_error(&msg, None, None);
        }
    }

    /// `report_error` within the poll answer's budget of error posts.
    fn instruction_error(&self, tally: &mut Tally, message: &str, id: Option<&str>, session: Option<&str>) {
        if tally.reported < ERROR_POSTS_PER_POLL {
            tally.reported += 1;
            self.report_error(message, id, session);
        } else {
            tally.unreported += 1;
        }
    }

    fn first_time(&self, id: &str) -> bool {
        let mut seen = self.seen.lock().unwrap_or_else(|p| p.into_inner());
        if !seen.0.insert(id.to_string()) {
            return false;
        }
        seen.1.push_back(id.to_string());
        if seen.1.len() > 10_000
            && let Some(old) = seen.1.pop_front()
        {
            seen.0.remove(&old);
        }
        true
    }

    fn act(self: &Arc<Self>, id: &str, ins: &Value, tally: &mut Tally) {
        let kind = ins.get("type").and_then(Value::as_str).unwrap_or("");
        let session = ins.get("sessionId").and_then(Value::as_str).unwrap_or("").to_string();
        info!("Received instruction: {kind} ({session})");
        if session.is_empty() {
            self.instruction_error(tally, "instruction without a sessionId", Some(id), None);
            return;
        }
        match kind {
            "start_session" => self.start(&session, ins),
            "command" => {
                let input = ins.get("input").and_then(Value::as_str).unwrap_or("");
                let tx = self.sessions().get(&session).map(|s| s.input.clone());
                let Some(tx) = tx else {
                    self.instruction_error(tally, "no such session", Some(id), Some(&session));
                    return;
                };
                let mut line = input.as_bytes().to_vec();
                if !line.ends_with(b"\n") {
                    line.push(b'\n');
                }
                match tx.try_send(line) {
                    Ok(()) => info!("Command sent to {session}"),
                    Err(crossbeam_channel::TrySendError::Full(_)) => self.instruction_error(
                        tally,
                        "the session is not reading its input; command dropped",
                        Some(id),
                        Some(&session),
                    ),
                    Err(crossbeam_channel::TrySendError::Disconnected(_)) => self.instruction_error(
                        tally,
                        "the session's stdin is closed",
                        Some(id),
                        Some(&session),
                    ),
                }
            }
            "terminate_session" => {
                let found =
                    self.sessions().get(&session).map(|s| (Arc::clone(&s.group), Arc::clone(&s.terminating)));
                match found {
                    Some((group, terminating)) => {
                        terminating.store(true, Ordering::SeqCst);
                        terminate(group);
                    }
                    None => self.instruction_error(tally, "no such session", Some(id), Some(&session)),
                }
            }
            other => self.instruction_error(
                tally,
                &format!("unknown instruction type {other:?}"),
                Some(id),
                Some(&session),
            ),
        }
    }

    /// `start_session`: over the cap → `rejected`; else spawn → `started`.
    fn start(self: &Arc<Self>, session: &str, ins: &Value) {
        let (stream_id, mut stream) = self.stream(session);
        let mut seq_holder = 0u64;
        let busy = self.sessions().contains_key(session);
        if busy || self.sessions().len() >= self.config.max_sessions {
            let why =
                if busy { "a session with this id is running" } else { "maxConcurrentSessions reached" };
            warn!("Session {session} rejected: {why}");
            self.event(
                &mut stream,
                &mut seq_holder,
                session,
                json!({"event":"rejected","message":why}),
                true,
            );
            return;
        }
        let prompt = ins.get("prompt").and_then(Value::as_str);
        let args: Vec<String> = ins
            .get("args")
            .and_then(Value::as_array)
            .map(|a| a.iter().filter_map(|v| v.as_str().map(str::to_string)).collect())
            .unwrap_or_default();
        let cwd = ins.get("cwd").and_then(Value::as_str).map(PathBuf::from);
        if let Some(dir) = cwd.as_ref().filter(|d| !d.is_dir()) {
            let msg = format!("cwd {} does not exist or is not a directory", dir.display());
            warn!("Session {session} failed: {msg}");
            self.event(&mut stream, &mut seq_holder, session, json!({"event":"failed","message":msg}), true);
            return;
        }
        // The prompt goes where the command says: into an argv element that
        // holds {prompt}, else as the first stream-json message on stdin.
        let in_argv = self.config.session_command.iter().any(|a| a.contains("{prompt}"));
        let mut argv: Vec<String> =
            self.config.session_command.iter().map(|a| a.replace("{prompt}", prompt.unwrap_or(""))).collect();
        argv.extend(args);
        let marker = format!("{}-{}", std::process::id(), crate::nonce::nonce());
        let mut cmd = Command::new(&argv[0]);
        cmd.args(&argv[1..])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .env_remove("AGENT_TOKEN");
        if let Some(dir) = &cwd {
            cmd.current_dir(dir);
        }
        let child = match Child::spawn(&mut cmd, "AION_SESSION_ID", &marker) {
            Ok(c) => c,
            Err(e) => {
                let msg = if e.kind() == std::io::ErrorKind::NotFound {
                    format!("{} not found on PATH", argv[0])
                } else {
                    format!("cannot start {}: {e}", argv[0])
                };
                warn!("Session {session} failed: {msg}");
                self.event(
                    &mut stream,
                    &mut seq_holder,
                    session,
                    json!({"event":"failed","message":msg}),
                    true,
                );
                return;
            }
        };
        let group = Arc::clone(&child.group);
        let (input, lines) = crossbeam_channel::bounded::<Vec<u8>>(64);
        if let (Some(p), false) = (prompt, in_argv) {
            let first = json!({"type":"user","message":{"role":"user","content":p}});
            let _ = input.try_send(format!("{first}\n").into_bytes());
        }
        let pid = child.pid();
        if let Some(stdin) = child.stdin() {
            let writer = std::thread::Builder::new()
                .name(format!("poll-stdin-{pid}"))
                .stack_size(64 << 10)
                .spawn(move || write_input(stdin, &lines));
            if let Err(e) = writer {
                // Without a writer the session cannot take commands: end it.
                error!("Session {session}: cannot start its stdin writer: {e}");
                group.signal(nix::sys::signal::Signal::SIGKILL);
            }
        }
        let terminating = Arc::new(AtomicBool::new(false));
        // The `started` event below is the first post.
        let posts = Arc::new(AtomicU64::new(seq_holder + 1));
        self.sessions().insert(
            session.to_string(),
            Session {
                pid,
                started_at: now_ms(),
                since: Instant::now(),
                stream: stream_id,
                posts: Arc::clone(&posts),
                group: Arc::clone(&group),
                input,
                terminating: Arc::clone(&terminating),
                _leases: self.leases.as_ref().map(|l| l.hold(&self.config.lease_apps)).unwrap_or_default(),
            },
        );
        self.event(&mut stream, &mut seq_holder, session, json!({"event":"started","pid":pid}), false);
        info!("Session started: {session} (pid {pid})");
        let _ = self.status_now.0.try_send(());
        let (tx, rx) = crossbeam_channel::bounded::<Msg>(64);
        let readers: Vec<_> = [
            (child.stdout().map(|o| Box::new(o) as Box<dyn Read + Send>), true),
            (child.stderr().map(|e| Box::new(e) as Box<dyn Read + Send>), false),
        ]
        .into_iter()
        .filter_map(|(pipe, stdout)| {
            let (pipe, tx) = (pipe?, tx.clone());
            let name = format!("poll-{}-{pid}", if stdout { "out" } else { "err" });
            match std::thread::Builder::new()
                .name(name)
                .stack_size(128 << 10)
                .spawn(move || read_pipe(pipe, stdout, &tx))
            {
                Ok(handle) => Some(handle),
                Err(e) => {
                    error!("Session {session}: cannot start a pipe reader: {e}");
                    None
                }
            }
        })
        .collect();
        let waiter = {
            let (tx, terminating) = (tx.clone(), Arc::clone(&terminating));
            std::thread::Builder::new().name(format!("poll-wait-{pid}")).stack_size(128 << 10).spawn(
                move || {
                    let status = child.wait();
                    child.finish(|| readers.iter().all(|r| r.is_finished()));
                    for r in readers {
                        let _ = r.join();
                    }
                    let (code, signal) = match status {
                        Ok(s) => (s.code(), std::os::unix::process::ExitStatusExt::signal(&s)),
                        Err(_) => (None, None),
                    };
                    let terminated = terminating.load(Ordering::SeqCst);
                    let _ = tx.send(Msg::Ended { code, signal, terminated });
                },
            )
        };
        drop(tx);
        if let Err(e) = waiter {
            // Nobody would reap it: kill it now; the streamer still closes
            // the session when every sender is gone.
            error!("Session {session}: cannot start its waiter: {e}");
            group.signal(nix::sys::signal::Signal::SIGKILL);
        }
        let rt = Arc::clone(self);
        let session = session.to_string();
        let spawned = std::thread::Builder::new()
            .name(format!("poll-stream-{pid}"))
            .stack_size(256 << 10)
            .spawn(move || rt.stream_output(&session, stream, seq_holder, &posts, &rx));
        if let Err(e) = spawned {
            // No streamer: end the process and forget the session, so that it
            // neither holds a slot nor lingers unreported.
            error!("cannot start a session's output thread: {e}");
            group.signal(nix::sys::signal::Signal::SIGKILL);
            self.sessions().retain(|_, s| s.pid != pid);
        }
    }

    /// A new outbox stream for `session`, and its id.
    fn stream(&self, session: &str) -> (String, Stream) {
        let id = format!("{}-{}-{:x}", now_ms(), std::process::id(), crate::nonce::nonce());
        let mut body = serde_json::Map::new();
        body.insert("sessionId".into(), session.into());
        body.insert("event".into(), "failed".into());
        body.insert("message".into(), "the agent stopped before the session ended".into());
        let fallback = Fallback { url: self.url("/api/agent/events"), key: "agent".into(), body };
        let stream = self.outbox.stream(&id, &fallback);
        (id, stream)
    }

    /// Queues an event (events are posted in order with the output).
    fn event(&self, stream: &mut Stream, seq: &mut u64, session: &str, mut ev: Value, last: bool) {
        ev["sessionId"] = session.into();
        let body = serde_json::to_string(&ev).expect("JSON");
        let record =
            Record { url: self.url("/api/agent/events"), key: "agent".into(), seq: *seq, last, body };
        *seq += 1;
        stream.push(&record);
    }

    /// The streamer: output batched for `outputFlushInterval`, chunks
    /// numbered from 0, then the closing event.
    fn stream_output(
        &self,
        session: &str,
        mut stream: Stream,
        mut record_seq: u64,
        posts: &AtomicU64,
        rx: &Receiver<Msg>,
    ) {
        #[derive(Serialize)]
        struct Chunk {
            seq: u64,
            stream: &'static str,
            data: String,
            ts: u128,
        }
        #[derive(Serialize)]
        struct OutputBody<'a> {
            #[serde(rename = "sessionId")]
            session_id: &'a str,
            chunks: &'a [Chunk],
        }
        let mut chunk_seq = 0u64;
        let mut pending: Vec<Chunk> = Vec::new();
        let mut pending_bytes = 0usize;
        let mut carry: [Vec<u8>; 2] = [Vec::new(), Vec::new()];
        let mut last_flush = Instant::now();
        let flush = |pending: &mut Vec<Chunk>,
                     pending_bytes: &mut usize,
                     record_seq: &mut u64,
                     stream: &mut Stream| {
            if pending.is_empty() {
                return;
            }
            let body =
                serde_json::to_string(&OutputBody { session_id: session, chunks: pending }).expect("JSON");
            let record = Record {
                url: self.url("/api/agent/output"),
                key: "agent".into(),
                seq: *record_seq,
                last: false,
                body,
            };
            *record_seq += 1;
            stream.push(&record);
            posts.store(*record_seq, Ordering::SeqCst);
            pending.clear();
            *pending_bytes = 0;
        };
        let ended = loop {
            let next_flush = last_flush + self.config.flush_interval;
            let msg = if pending.is_empty() {
                rx.recv().map_err(|_| RecvTimeoutError::Disconnected)
            } else {
                rx.recv_timeout(next_flush.saturating_duration_since(Instant::now()))
            };
            match msg {
                Ok(Msg::Output { stdout, data, ts }) => {
                    let text = crate::text::utf8_chunk(&mut carry[usize::from(!stdout)], &data);
                    if text.is_empty() {
                        continue;
                    }
                    if pending.is_empty() && last_flush.elapsed() >= self.config.flush_interval {
                        last_flush = Instant::now() - self.config.flush_interval; // flush this one promptly
                    }
                    let name = if stdout { "stdout" } else { "stderr" };
                    let chunk = Chunk { seq: chunk_seq, stream: name, data: text, ts };
                    // Posts stay under POST_BYTES as sent (escaping included).
                    let size = serde_json::to_string(&chunk).map_or(0, |c| c.len() + 1);
                    if !pending.is_empty() && pending_bytes + size + 64 > POST_BYTES {
                        flush(&mut pending, &mut pending_bytes, &mut record_seq, &mut stream);
                        last_flush = Instant::now();
                    }
                    pending_bytes += size;
                    pending.push(chunk);
                    chunk_seq += 1;
                }
                Ok(Msg::Ended { code, signal, terminated }) => break Some((code, signal, terminated)),
                Err(RecvTimeoutError::Timeout) => {
                    flush(&mut pending, &mut pending_bytes, &mut record_seq, &mut stream);
                    last_flush = Instant::now();
                }
                Err(RecvTimeoutError::Disconnected) => break None,
            }
        };
        // A sequence cut off by the end of the output is still output.
        for (i, name) in [(0, "stdout"), (1, "stderr")] {
            if !carry[i].is_empty() {
                let data = String::from_utf8_lossy(&std::mem::take(&mut carry[i])).into_owned();
                pending.push(Chunk { seq: chunk_seq, stream: name, data, ts: now_ms() });
                chunk_seq += 1;
            }
        }
        flush(&mut pending, &mut pending_bytes, &mut record_seq, &mut stream);
        let event = match ended {
            Some((_, _, true)) => json!({"event":"terminated"}),
            Some((code, signal, false)) => {
                let mut ev = json!({"event":"exited"});
                if let Some(c) = code {
                    ev["exitCode"] = c.into();
                }
                if let Some(s) = signal {
                    ev["signal"] = s.into();
                }
                ev
            }
            None => json!({"event":"failed","message":"lost track of the session process"}),
        };
        info!("Session {}: {session}", event["event"].as_str().unwrap_or("ended"));
        self.event(&mut stream, &mut record_seq, session, event, true);
        self.sessions().remove(session);
        let _ = self.status_now.0.try_send(());
    }

    fn terminate_all(&self) {
        let all: Vec<(Arc<Group>, Arc<AtomicBool>)> =
            self.sessions().values().map(|s| (Arc::clone(&s.group), Arc::clone(&s.terminating))).collect();
        for (group, terminating) in all {
            terminating.store(true, Ordering::SeqCst);
            terminate(group);
        }
    }

    /// Every `statusInterval` and on each session change, until shutdown.
    fn report_status(&self) {
        loop {
            let sessions: Vec<Value> = self
                .sessions()
                .iter()
                .map(|(id, s)| json!({"sessionId": id, "state": "running", "pid": s.pid, "startedAt": s.started_at}))
                .collect();
            let body = serde_json::to_vec(&json!({
                "version": crate::version::VERSION,
                "uptimeSeconds": self.started.elapsed().as_secs(),
                "maxConcurrentSessions": self.config.max_sessions,
                "sessions": sessions,
            }))
            .expect("JSON");
            // While the token is refused, status waits too (the poll loop says why).
            if !self.refused.load(Ordering::SeqCst)
                && let Answer::Status { status: 401 | 403, .. } =
                    self.client.post(&self.url("/api/agent/status"), &self.signed(&body), &body)
            {
                self.refused.store(true, Ordering::SeqCst);
            }
            match self.status_now.1.recv_timeout(self.config.status_interval) {
                Ok(()) | Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => return,
            }
            if self.shutdown.requested() {
                return;
            }
        }
    }

    fn report_error(&self, message: &str, instruction: Option<&str>, session: Option<&str>) {
        warn!("{message}{}", session.map(|s| format!(" ({s})")).unwrap_or_default());
        let mut body = json!({ "message": message });
        if let Some(i) = instruction {
            body["instructionId"] = i.into();
        }
        if let Some(s) = session {
            body["sessionId"] = s.into();
        }
        let body = serde_json::to_vec(&body).expect("JSON");
        let _ = self.client.post(&self.url("/api/agent/errors"), &self.signed(&body), &body);
    }
}

/// SIGTERM to the session's group, SIGKILL after the grace.
/// Ends a session's group (SIGTERM, SIGKILL after the grace) on a thread of
/// its own, which exits when the group is gone; if no thread can be had, the
/// SIGTERM is sent at once and the waiter's reap does the rest.
fn terminate(group: Arc<Group>) {
    let pid = group.pid();
    let ender = Arc::clone(&group);
    let spawned = std::thread::Builder::new()
        .name(format!("poll-end-{pid}"))
        .stack_size(64 << 10)
        .spawn(move || supervise::terminate(&ender, None, TERMINATE_GRACE));
    if let Err(e) = spawned {
        error!("cannot start a thread to end session pid {pid}: {e}; sending SIGTERM now");
        group.signal(nix::sys::signal::Signal::SIGTERM);
    }
}

/// A session's stdin writer: lines in order until the session or its stdin ends.
fn write_input(mut stdin: ChildStdin, lines: &Receiver<Vec<u8>>) {
    for line in lines {
        if stdin.write_all(&line).is_err() {
            return;
        }
    }
}

/// A pipe reader: chunks of at most 64 KiB to the streamer.
fn read_pipe(mut pipe: Box<dyn Read + Send>, stdout: bool, tx: &Sender<Msg>) {
    let mut buf = vec![0u8; CHUNK_BYTES];
    loop {
        match pipe.read(&mut buf) {
            Ok(0) | Err(_) => return,
            Ok(n) => {
                if tx.send(Msg::Output { stdout, data: buf[..n].to_vec(), ts: now_ms() }).is_err() {
                    return;
                }
            }
        }
    }
}
