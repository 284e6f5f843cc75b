//! The lease client for Aion's AI protection (seed 002, PROTOCOL.md §3): a
//! blocking client on a same-user Unix socket that holds leases on desktop
//! apps while agents drive them, so Aion does not auto-close them.
//!
//! Threads: the lease thread owns the connection's life (connect, hello,
//! begin/renew/end, reconnect) and the receiver of the [`Ctl`] channel; a
//! reader thread owns the socket's read side and answers
//! `lease.can_close.request` itself, at once, whatever the lease thread is
//! doing. Writes go through one mutex, a line at a time.
//!
//! A test seam: debug builds (what `cargo test` runs) read
//! `AION_LEASE_TIME_SCALE`, which makes the client's own clock run N times
//! faster; the lease lengths it sends stay within 60–1800 s. Release builds,
//! the ones users run, ignore the variable.

pub mod wrap;

use crate::logging::{error, info, warn};
use crossbeam_channel::{Receiver, RecvTimeoutError, Sender};
use serde_json::{Value, json};
use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

pub const MIN_SECONDS: u32 = 60;
pub const MAX_SECONDS: u32 = 1800;
const HANDSHAKE: Duration = Duration::from_secs(5);
/// A connection that lived this long resets the reconnect backoff.
const STABLE: Duration = Duration::from_secs(30);

#[derive(Clone, Debug)]
pub struct LeaseConfig {
    pub socket: PathBuf,
    pub holder: String,
    pub client_name: String,
    /// Clamped to 60–1800.
    pub seconds: u32,
}

impl LeaseConfig {
    pub fn new(
        socket: Option<PathBuf>,
        holder: Option<String>,
        client_name: Option<String>,
        seconds: Option<u32>,
    ) -> Self {
        LeaseConfig {
            socket: socket.unwrap_or_else(default_socket),
            holder: holder.unwrap_or_else(|| format!("aion-connector.{}", host_name())),
            client_name: client_name.unwrap_or_else(|| "aion-connector".into()),
            seconds: seconds.unwrap_or(300).clamp(MIN_SECONDS, MAX_SECONDS),
        }
    }
}

impl From<&crate::config::LeaseSettings> for LeaseConfig {
    /// The config file's `lease` section.
    fn from(s: &crate::config::LeaseSettings) -> Self {
        LeaseConfig::new(s.socket.clone(), s.holder.clone(), s.client_name.clone(), s.seconds)
    }
}

/// §3: `~/Library/Application Support/Aion/ipc/ai-protection.sock` on macOS,
/// `$XDG_RUNTIME_DIR/aion/ai-protection.sock` elsewhere.
pub fn default_socket() -> PathBuf {
    let home = std::env::var_os("HOME").map(PathBuf::from).unwrap_or_default();
    if cfg!(target_os = "macos") {
        return home.join("Library/Application Support/Aion/ipc/ai-protection.sock");
    }
    let runtime = std::env::var_os("XDG_RUNTIME_DIR")
        .filter(|d| !d.is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(format!("/run/user/{}", nix::unistd::getuid())));
    runtime.join("aion/ai-protection.sock")
}

pub fn host_name() -> String {
    nix::unistd::gethostname().ok().and_then(|h| h.into_string().ok()).unwrap_or_else(|| "localhost".into())
}

/// Messages to the lease thread, which owns the receiver.
enum Ctl {
    /// The set of apps wanted changed.
    Changed,
    /// A message from Aion, passed on by the reader thread.
    /// (connection number, message)
    Line(u64, Value),
    /// The reader saw the connection end.
    /// That connection ended.
    Disconnected(u64),
    /// End every lease and stop.
    Stop,
}

/// One app's lease as the client sees it.
#[derive(Default)]
struct App {
    /// Runs (or commands) using the app now.
    users: usize,
    /// When Aion last accepted a begin or renew.
    granted_at: Option<Instant>,
    /// A request on its way: (request id, action).
    pending: Option<(String, &'static str)>,
    /// No new begin before this (after a refusal: no hot retry).
    quiet_until: Option<Instant>,
}

/// How far the lease thread got with the socket.
#[derive(Clone, Copy, PartialEq)]
enum Link {
    /// No attempt finished yet.
    Starting,
    Up,
    /// Missing socket, refused hello, lost connection: no leases now.
    Down,
}

struct Inner {
    config: LeaseConfig,
    scale: f64,
    apps: Mutex<HashMap<String, App>>,
    /// Notified (with `apps` locked) when a lease is granted or refused, or the link changes.
    settled: std::sync::Condvar,
    link: Mutex<Link>,
    writer: Mutex<Option<UnixStream>>,
    ctl: Sender<Ctl>,
    next: AtomicU64,
}

/// The client. Cloning shares it.
#[derive(Clone)]
pub struct Leases {
    inner: Arc<Inner>,
    /// Disconnected once the lease thread has ended.
    done: Receiver<()>,
}

/// The lease client's state ([`Leases::snapshot`]).
#[derive(Clone, Debug)]
pub struct LeaseSnapshot {
    /// `starting`, `up` (connected to Aion) or `down`.
    pub link: &'static str,
    pub apps: Vec<LeaseApp>,
}

impl LeaseSnapshot {
    /// `{"link","apps":[{"app","users","granted"}]}`, as `status` shows it.
    pub fn json(&self) -> serde_json::Value {
        let apps: Vec<serde_json::Value> = self
            .apps
            .iter()
            .map(|a| serde_json::json!({"app": a.app, "users": a.users, "granted": a.granted}))
            .collect();
        serde_json::json!({"link": self.link, "apps": apps})
    }
}

/// One app leased now: how many runs use it, and whether Aion granted it.
#[derive(Clone, Debug)]
pub struct LeaseApp {
    pub app: String,
    pub users: usize,
    pub granted: bool,
}

/// Holds one app's lease while alive.
pub struct Guard {
    inner: Arc<Inner>,
    app: String,
}

impl Drop for Guard {
    fn drop(&mut self) {
        let mut apps = self.inner.apps();
        if let Some(a) = apps.get_mut(&self.app) {
            a.users = a.users.saturating_sub(1);
        }
        drop(apps);
        let _ = self.inner.ctl.send(Ctl::Changed);
    }
}

/// How [`Leases::wait_granted`] ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Waited {
    /// Every held app is granted.
    Granted,
    /// Each is granted or refused, or there is no Aion to ask.
    Settled,
    /// Some are still unanswered at the deadline.
    TimedOut,
}

impl Leases {
    pub fn start(config: LeaseConfig) -> Leases {
        // The test seam of the module doc, not a user setting (so not in the
        // man page): the lease timers run in minutes, and the tests that
        // check their order would otherwise take that long. Debug builds
        // only, so no release binary's timing can be changed from outside.
        let scale = if cfg!(debug_assertions) {
            std::env::var("AION_LEASE_TIME_SCALE")
                .ok()
                .and_then(|s| s.parse::<f64>().ok())
                .filter(|s| *s >= 1.0)
                .unwrap_or(1.0)
        } else {
            1.0
        };
        let (tx, rx) = crossbeam_channel::unbounded();
        let inner = Arc::new(Inner {
            config,
            scale,
            apps: Mutex::new(HashMap::new()),
            settled: std::sync::Condvar::new(),
            link: Mutex::new(Link::Starting),
            writer: Mutex::new(None),
            ctl: tx,
            next: AtomicU64::new(0),
        });
        let worker = Arc::clone(&inner);
        let (done_tx, done) = crossbeam_channel::bounded::<()>(0);
        let spawned =
            std::thread::Builder::new().name("lease".into()).stack_size(256 << 10).spawn(move || {
                worker.run(&rx);
                worker.set_link(Link::Down);
                drop(done_tx);
            });
        if let Err(e) = spawned {
            // Work goes on without leases, as when Aion is not running.
            error!("cannot start the lease thread: {e}; carrying on without leases");
            inner.set_link(Link::Down);
        }
        Leases { inner, done }
    }

    /// Leases `apps` until the guards are dropped.
    pub fn hold(&self, apps: &[String]) -> Vec<Guard> {
        let mut guards = Vec::new();
        {
            let mut table = self.inner.apps();
            for app in apps {
                table.entry(app.clone()).or_default().users += 1;
                guards.push(Guard { inner: Arc::clone(&self.inner), app: app.clone() });
            }
        }
        let _ = self.inner.ctl.send(Ctl::Changed);
        guards
    }

    /// Waits up to `d` until every held app is granted or refused, or it is
    /// clear there is no Aion to ask.
    pub fn wait_granted(&self, d: Duration) -> Waited {
        let deadline = Instant::now() + d;
        let mut apps = self.inner.apps();
        loop {
            let held = || apps.values().filter(|a| a.users > 0);
            if held().all(|a| a.granted_at.is_some()) {
                return Waited::Granted;
            }
            let settled = held().all(|a| a.granted_at.is_some() || a.quiet_until.is_some());
            if settled || *self.inner.link() == Link::Down {
                return Waited::Settled;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Waited::TimedOut;
            }
            apps = self
                .inner
                .settled
                .wait_timeout(apps, left)
                .map(|(g, _)| g)
                .unwrap_or_else(|p| p.into_inner().0);
        }
    }

    /// The link to Aion and the apps held now, for `status`.
    pub fn snapshot(&self) -> LeaseSnapshot {
        let link = match *self.inner.link() {
            Link::Starting => "starting",
            Link::Up => "up",
            Link::Down => "down",
        };
        let mut apps: Vec<LeaseApp> = self
            .inner
            .apps()
            .iter()
            .filter(|(_, a)| a.users > 0)
            .map(|(name, a)| LeaseApp { app: name.clone(), users: a.users, granted: a.granted_at.is_some() })
            .collect();
        apps.sort_by(|a, b| a.app.cmp(&b.app));
        LeaseSnapshot { link, apps }
    }

    /// Ends every lease (waiting up to `d` for Aion's answers) and stops.
    pub fn stop(&self, d: Duration) {
        let _ = self.inner.ctl.send(Ctl::Stop);
        let _ = self.done.recv_timeout(d);
    }
}

impl Inner {
    fn apps(&self) -> MutexGuard<'_, HashMap<String, App>> {
        self.apps.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn link(&self) -> MutexGuard<'_, Link> {
        self.link.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn set_link(&self, link: Link) {
        *self.link() = link;
        let _apps = self.apps();
        self.settled.notify_all();
    }

    fn writer(&self) -> MutexGuard<'_, Option<UnixStream>> {
        self.writer.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Real time for `d` of the client's clock (faster under the test scale).
    fn scaled(&self, d: Duration) -> Duration {
        d.div_f64(self.scale)
    }

    /// One message, one line; false when there is no connection.
    fn send(&self, msg: &Value) -> bool {
        let mut line = serde_json::to_vec(msg).expect("JSON");
        line.push(b'\n');
        let mut w = self.writer();
        let ok = w.as_mut().is_some_and(|s| s.write_all(&line).is_ok());
        if !ok {
            *w = None;
        }
        ok
    }

    fn request(&self, action: &'static str, app: &str) -> Option<String> {
        let id = format!("req_{}_{}", std::process::id(), self.next.fetch_add(1, Ordering::Relaxed));
        let mut msg = json!({
            "action": action, "requestId": id, "holderId": self.config.holder, "appKey": app,
        });
        if action != "lease.end" {
            msg["leaseSeconds"] = self.config.seconds.into();
        }
        self.send(&msg).then_some(id)
    }

    /// The lease thread.
    fn run(self: &Arc<Self>, rx: &Receiver<Ctl>) {
        let mut backoff = Duration::from_secs(1);
        let mut said_missing = false;
        // Connections that Aion drops soon after `ready`: the backoff keeps
        // growing and only the first of a streak is logged.
        let mut flapping = false;
        loop {
            let pause = match self.connect() {
                Ok(stream) => {
                    said_missing = false;
                    if !flapping {
                        info!("lease: connected to Aion as {}", self.config.holder);
                    }
                    let since = Instant::now();
                    self.set_link(Link::Up);
                    let served = self.serve(stream, rx, !flapping);
                    self.set_link(Link::Down);
                    if since.elapsed() >= self.scaled(STABLE) {
                        backoff = Duration::from_secs(1);
                        flapping = false;
                    } else if !flapping {
                        warn!(
                            "lease: Aion keeps dropping the connection; retrying with a growing pause, quietly"
                        );
                        flapping = true;
                    }
                    match served {
                        Served::Stopped => return,
                        Served::Lost => backoff,
                        Served::Refused(pause) => pause,
                    }
                }
                Err(Connect::Refused(why, pause)) => {
                    self.set_link(Link::Down);
                    error!("lease: {why}; trying again in {pause:?}");
                    pause
                }
                Err(Connect::Missing(why)) => {
                    self.set_link(Link::Down);
                    if !said_missing {
                        warn!(
                            "lease: no Aion socket at {} ({why}); carrying on without leases",
                            self.config.socket.display()
                        );
                        said_missing = true;
                    }
                    Duration::from_secs(30)
                }
                Err(Connect::Failed(why)) => {
                    self.set_link(Link::Down);
                    warn!("lease: {why}; retrying in {backoff:?}");
                    backoff
                }
            };
            backoff = (backoff * 2).min(Duration::from_secs(60));
            // Wait, but stop at once when asked; changes wait for the connection.
            let until = Instant::now() + self.scaled(pause);
            loop {
                match rx.recv_timeout(until.saturating_duration_since(Instant::now())) {
                    Ok(Ctl::Stop) | Err(RecvTimeoutError::Disconnected) => return,
                    Ok(_) => continue,
                    Err(RecvTimeoutError::Timeout) => break,
                }
            }
        }
    }

    /// Connects and says hello; Ok once `session.ready` came back.
    fn connect(&self) -> Result<UnixStream, Connect> {
        let stream = UnixStream::connect(&self.config.socket).map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused => {
                Connect::Missing(e.to_string())
            }
            _ => Connect::Failed(format!("cannot connect to {}: {e}", self.config.socket.display())),
        })?;
        *self.writer() = stream.try_clone().ok();
        let hello = json!({
            "action": "session.hello", "protocolVersion": 1, "holderId": self.config.holder,
            "clientName": self.config.client_name, "pid": std::process::id(),
        });
        if !self.send(&hello) {
            return Err(Connect::Failed("the socket closed during the hello".into()));
        }
        let _ = stream.set_read_timeout(Some(HANDSHAKE));
        let mut line = String::new();
        let mut reader = BufReader::new(&stream);
        match reader.read_line(&mut line) {
            Ok(n) if n > 0 => {}
            _ => {
                *self.writer() = None;
                return Err(Connect::Failed("no session.ready from Aion within 5 s".into()));
            }
        }
        let msg: Value = serde_json::from_str(&line).unwrap_or(Value::Null);
        match msg.get("action").and_then(Value::as_str) {
            Some("session.ready") => {
                let _ = stream.set_read_timeout(None);
                Ok(stream)
            }
            Some("session.error") => {
                *self.writer() = None;
                let code = msg.get("code").and_then(Value::as_str).unwrap_or("?");
                let detail = msg.get("message").and_then(Value::as_str).unwrap_or("");
                Err(Connect::Refused(session_error(code, detail), refusal_pause(code)))
            }
            _ => {
                *self.writer() = None;
                Err(Connect::Failed("Aion answered the hello with something other than session.ready".into()))
            }
        }
    }

    /// A live connection: begins what is wanted, renews at half the lease,
    /// ends what is no longer used; returns when it is lost or stopped.
    /// `loud`: log the loss (not while Aion keeps dropping connections).
    fn serve(self: &Arc<Self>, stream: UnixStream, rx: &Receiver<Ctl>, loud: bool) -> Served {
        let served = self.serve_connection(&stream, rx, loud);
        // Whatever ended it, this connection is over: its reader sees EOF.
        *self.writer() = None;
        let _ = stream.shutdown(std::net::Shutdown::Both);
        served
    }

    fn serve_connection(self: &Arc<Self>, stream: &UnixStream, rx: &Receiver<Ctl>, loud: bool) -> Served {
        // A write to an Aion that stopped reading fails after a while instead
        // of holding the apps table (close checks answer from it).
        let _ = stream.set_write_timeout(Some(Duration::from_secs(2)));
        if let Some(w) = self.writer().as_ref() {
            let _ = w.set_write_timeout(Some(Duration::from_secs(2)));
        }
        let generation = self.next.fetch_add(1, Ordering::Relaxed);
        let reader = match stream.try_clone() {
            Ok(read_side) => {
                let inner = Arc::clone(self);
                std::thread::Builder::new()
                    .name("lease-reader".into())
                    .stack_size(128 << 10)
                    .spawn(move || inner.read_messages(read_side, generation))
            }
            Err(e) => Err(e),
        };
        if reader.is_err() {
            return Served::Lost;
        }
        let mut refused: Option<Duration> = None;
        loop {
            if let Some(pause) = refused {
                *self.writer() = None;
                return Served::Refused(pause);
            }
            let next = self.reconcile();
            match rx.recv_timeout(next) {
                Ok(Ctl::Changed) | Err(RecvTimeoutError::Timeout) => {}
                Ok(Ctl::Line(g, msg)) if g == generation => refused = self.on_message(&msg),
                Ok(Ctl::Disconnected(g)) if g == generation => {
                    if loud {
                        warn!("lease: the connection to Aion was lost; reconnecting");
                    }
                    self.forget_grants();
                    return Served::Lost;
                }
                Ok(Ctl::Stop) | Err(RecvTimeoutError::Disconnected) => {
                    self.end_all(rx);
                    return Served::Stopped;
                }
                Ok(Ctl::Line(..) | Ctl::Disconnected(_)) => {} // from an earlier connection
            }
        }
    }

    /// Sends what the table calls for now; returns how long until the next renewal.
    fn reconcile(&self) -> Duration {
        let now = Instant::now();
        let half = self.scaled(Duration::from_secs(u64::from(self.config.seconds) / 2));
        let mut next = Duration::from_secs(3600);
        let mut apps = self.apps();
        let mut sends: Vec<(String, &'static str)> = Vec::new();
        for (key, a) in apps.iter_mut() {
            if a.pending.is_some() {
                continue;
            }
            match (a.users > 0, a.granted_at) {
                (true, None) if a.quiet_until.is_none_or(|q| now >= q) => {
                    sends.push((key.clone(), "lease.begin"))
                }
                (true, None) => next = next.min(a.quiet_until.unwrap_or(now).saturating_duration_since(now)),
                (true, Some(at)) if now >= at + half => sends.push((key.clone(), "lease.renew")),
                (true, Some(at)) => next = next.min((at + half).saturating_duration_since(now)),
                (false, Some(_)) => sends.push((key.clone(), "lease.end")),
                (false, None) => {}
            }
        }
        for (key, action) in sends {
            match self.request(action, &key) {
                Some(id) => {
                    let a = apps.get_mut(&key).expect("present");
                    if action == "lease.end" {
                        a.granted_at = None;
                    }
                    a.pending = Some((id, action));
                }
                None => next = Duration::from_millis(10),
            }
        }
        apps.retain(|_, a| a.users > 0 || a.granted_at.is_some() || a.pending.is_some());
        next.max(Duration::from_millis(1))
    }

    /// A message from Aion; Some(pause) when the session must be dropped.
    fn on_message(&self, msg: &Value) -> Option<Duration> {
        let action = msg.get("action").and_then(Value::as_str).unwrap_or("");
        if action == "session.error" {
            let code = msg.get("code").and_then(Value::as_str).unwrap_or("?");
            error!(
                "lease: {}",
                session_error(code, msg.get("message").and_then(Value::as_str).unwrap_or(""))
            );
            return Some(if code == "unsupported_protocol_version" {
                Duration::from_secs(600)
            } else {
                Duration::from_secs(30)
            });
        }
        if action != "lease.result" {
            return None;
        }
        let id = msg.get("requestId").and_then(Value::as_str).unwrap_or("");
        let code = msg.get("code").and_then(Value::as_str).unwrap_or("");
        let mut apps = self.apps();
        let (key, a) = apps.iter_mut().find(|(_, a)| a.pending.as_ref().is_some_and(|(p, _)| p == id))?;
        let (_, request) = a.pending.take().expect("matched");
        self.settled.notify_all();
        let now = Instant::now();
        let quiet = |d: Duration| Some(now + self.scaled(d));
        match code {
            "accepted" => {
                if request != "lease.end" {
                    if a.granted_at.is_none() {
                        info!("lease: holding {key} ({} s, renewed at half)", self.config.seconds);
                    }
                    a.granted_at = Some(now);
                }
            }
            "unknown_app" => {
                warn!("lease: Aion does not know the app {key}; not retrying for 10 minutes");
                (a.granted_at, a.quiet_until) = (None, quiet(Duration::from_secs(600)));
            }
            "not_entitled" => {
                warn!(
                    "lease: this Aion is not entitled to AI protection for {key}; not retrying for 10 minutes"
                );
                (a.granted_at, a.quiet_until) = (None, quiet(Duration::from_secs(600)));
            }
            "lease_conflict" => {
                warn!("lease: another holder has {key}; trying again in {} s", self.config.seconds / 2);
                (a.granted_at, a.quiet_until) =
                    (None, quiet(Duration::from_secs(u64::from(self.config.seconds / 2))));
            }
            "request_expired" => {
                warn!("lease: Aion says the {request} for {key} expired; sending it again shortly");
                a.quiet_until = quiet(Duration::from_secs(1));
                if request == "lease.renew" {
                    a.granted_at =
                        Some(now - self.scaled(Duration::from_secs(u64::from(self.config.seconds))));
                }
            }
            "holder_mismatch" => {
                error!("lease: Aion says holder {} does not own {key}; reconnecting", self.config.holder);
                a.granted_at = None;
                return Some(Duration::from_secs(5));
            }
            other => {
                error!("lease: {request} for {key} answered {other}; not retrying for 10 minutes");
                (a.granted_at, a.quiet_until) = (None, quiet(Duration::from_secs(600)));
            }
        }
        None
    }

    /// The reader thread: answers close checks itself, passes the rest on.
    fn read_messages(self: Arc<Self>, stream: UnixStream, generation: u64) {
        let reader = BufReader::new(stream);
        for line in reader.lines() {
            let Ok(line) = line else { break };
            let Ok(msg) = serde_json::from_str::<Value>(&line) else {
                warn!("lease: a line from Aion is not JSON; ignored");
                continue;
            };
            if msg.get("action").and_then(Value::as_str) == Some("lease.can_close.request") {
                self.answer_close_check(&msg);
            } else if self.ctl.send(Ctl::Line(generation, msg)).is_err() {
                return;
            }
        }
        let _ = self.ctl.send(Ctl::Disconnected(generation));
    }

    /// `extend_lease` while a run uses the app, else `allow_close`.
    fn answer_close_check(&self, msg: &Value) {
        let app = msg.get("appKey").and_then(Value::as_str).unwrap_or("");
        let in_use = self.apps().get(app).is_some_and(|a| a.users > 0);
        let mut reply = json!({
            "action": "lease.can_close.reply",
            "requestId": msg.get("requestId").cloned().unwrap_or(Value::Null),
            "holderId": self.config.holder,
            "appKey": app,
            "result": if in_use { "extend_lease" } else { "allow_close" },
        });
        if in_use {
            reply["leaseSeconds"] = self.config.seconds.into();
        }
        self.send(&reply);
    }

    fn forget_grants(&self) {
        for a in self.apps().values_mut() {
            a.granted_at = None;
            a.pending = None;
        }
    }

    /// Stop: `lease.end` for every granted app, waiting briefly for answers.
    fn end_all(&self, rx: &Receiver<Ctl>) {
        for a in self.apps().values_mut() {
            a.users = 0;
        }
        self.reconcile();
        // A begin still on its way may be granted now: that one needs its end too.
        let deadline = Instant::now() + Duration::from_millis(500);
        while self.apps().values().any(|a| a.pending.is_some() || a.granted_at.is_some()) {
            match rx.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
                Ok(Ctl::Line(_, msg)) => {
                    self.on_message(&msg);
                    self.reconcile();
                }
                Ok(Ctl::Disconnected(_)) | Err(_) => break,
                Ok(_) => {}
            }
        }
        if let Some(s) = self.writer().take() {
            let _ = s.shutdown(std::net::Shutdown::Both);
        }
    }
}

enum Connect {
    Missing(String),
    Failed(String),
    /// Aion answered the hello with session.error: wait this long.
    Refused(String, Duration),
}

/// After a session.error: a version Aion does not speak will not change soon.
fn refusal_pause(code: &str) -> Duration {
    if code == "unsupported_protocol_version" { Duration::from_secs(600) } else { Duration::from_secs(30) }
}

enum Served {
    Stopped,
    Lost,
    Refused(Duration),
}

fn session_error(code: &str, detail: &str) -> String {
    let what = match code {
        "unsupported_protocol_version" => {
            "Aion does not speak lease protocol version 1 (update the connector or Aion)"
        }
        "invalid_handshake" => "Aion refused the hello as invalid",
        "holder_id_mismatch" => "Aion says the holder id does not match this connection",
        "unauthenticated" => "Aion refused the connection (not the same user?)",
        _ => "Aion refused the session",
    };
    if detail.is_empty() { format!("{what} [{code}]") } else { format!("{what} [{code}]: {detail}") }
}
