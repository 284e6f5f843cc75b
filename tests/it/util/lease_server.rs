//! A reference Aion lease server for the tests, written from Aion's developer
//! guide (seed 002) and PROTOCOL.md §3: NDJSON over a Unix stream socket, one
//! thread per connection.
//!
//! It enforces the handshake (`session.hello` first, else `session.error`
//! `invalid_handshake` and close; `protocolVersion` 1, else
//! `unsupported_protocol_version` and close), one holder per connection
//! (`lease.*` with another holderId → `lease.result` `holder_mismatch`), lease
//! bounds 60–1800 s (else `invalid_payload`) and known app keys (else
//! `unknown_app`); it can be told to answer a given code (`not_entitled`,
//! `lease_conflict`, …) for an app. It keeps the active leases with their
//! expiry (on its own clock, which can run `scale` times faster, like the
//! client's `AION_LEASE_TIME_SCALE`), pushes `lease.can_close.request` and
//! times the reply, records every message both ways, and can drop its
//! connections and refuse new ones (socket file removed) for a while.
//!
//! What a well-behaved client should never do (a renewal after the lease
//! expired, a renewal of a lease it does not hold, unexpected keys, a reply to
//! an unknown close check, …) is noted in `violations()`; the server keeps
//! going (it grants) so that one slip does not hide the next.

use serde_json::{Value, json};
use std::collections::{BTreeSet, HashMap, HashSet};
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, mpsc};
use std::thread;
use std::time::{Duration, Instant};

/// The guide's close-check timeout.
pub const CLOSE_CHECK_TIMEOUT: Duration = Duration::from_secs(3);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Dir {
    /// Client → server.
    In,
    /// Server → client.
    Out,
}

/// One message on the wire, as recorded.
#[derive(Clone, Debug)]
pub struct Rec {
    pub at: Instant,
    /// Connection number (1, 2, … in accept order).
    pub conn: u64,
    pub dir: Dir,
    /// The message (a line that is not JSON: `{"_raw": line}`).
    pub msg: Value,
    /// For received messages: whether each of `Rules::probes` existed when it arrived.
    pub probes: Vec<bool>,
}

impl Rec {
    pub fn action(&self) -> &str {
        self.msg["action"].as_str().unwrap_or("")
    }
    pub fn app(&self) -> &str {
        self.msg["appKey"].as_str().unwrap_or("")
    }
    pub fn request_id(&self) -> &str {
        self.msg["requestId"].as_str().unwrap_or("")
    }
    pub fn keys(&self) -> BTreeSet<String> {
        self.msg.as_object().map(|m| m.keys().cloned().collect()).unwrap_or_default()
    }
}

/// How the server behaves; change it with `LeaseServer::rules()`.
pub struct Rules {
    /// App keys Aion knows; None: every key is known.
    pub known_apps: Option<HashSet<String>>,
    /// Forced `lease.result` code for begin/renew of an app (e.g. `not_entitled`).
    pub codes: HashMap<String, String>,
    /// Answer every hello with `unsupported_protocol_version`.
    pub refuse_version: bool,
    /// The lease clock runs this many times faster (expiry = leaseSeconds / scale).
    pub scale: f64,
    /// Files whose existence is noted with every received message.
    pub probes: Vec<PathBuf>,
    /// A slow Aion: wait this long before answering a lease request (the
    /// connection's later messages wait too).
    pub answer_delay: Duration,
}

impl Default for Rules {
    fn default() -> Self {
        Rules {
            known_apps: None,
            codes: HashMap::new(),
            refuse_version: false,
            scale: 1.0,
            probes: Vec::new(),
            answer_delay: Duration::ZERO,
        }
    }
}

/// An active lease.
#[derive(Clone, Debug)]
pub struct Lease {
    pub holder: String,
    pub expires: Instant,
}

struct Conn {
    stream: UnixStream,
    holder: Option<String>,
}

struct State {
    path: PathBuf,
    rules: Mutex<Rules>,
    log: Mutex<Vec<Rec>>,
    conns: Mutex<HashMap<u64, Conn>>,
    leases: Mutex<HashMap<String, Lease>>,
    violations: Mutex<Vec<String>>,
    /// Close checks waiting for their reply: requestId → (reply, when it came).
    pending: Mutex<HashMap<String, mpsc::Sender<(Value, Instant)>>>,
    refuse_until: Mutex<Option<Instant>>,
    listening: AtomicBool,
    stop: AtomicBool,
    next_conn: AtomicU64,
    next_close: AtomicU64,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// The server; stopped (socket removed, connections closed) on drop.
pub struct LeaseServer {
    st: Arc<State>,
    accept: Option<thread::JoinHandle<()>>,
}

impl LeaseServer {
    /// Listens on `path` with the default rules (every app known, real-time clock).
    pub fn start(path: &Path) -> LeaseServer {
        LeaseServer::start_with(path, |_| {})
    }

    /// Listens on `path` after `setup` adjusted the rules.
    pub fn start_with(path: &Path, setup: impl FnOnce(&mut Rules)) -> LeaseServer {
        let mut rules = Rules::default();
        setup(&mut rules);
        let st = Arc::new(State {
            path: path.to_path_buf(),
            rules: Mutex::new(rules),
            log: Mutex::new(Vec::new()),
            conns: Mutex::new(HashMap::new()),
            leases: Mutex::new(HashMap::new()),
            violations: Mutex::new(Vec::new()),
            pending: Mutex::new(HashMap::new()),
            refuse_until: Mutex::new(None),
            listening: AtomicBool::new(false),
            stop: AtomicBool::new(false),
            next_conn: AtomicU64::new(0),
            next_close: AtomicU64::new(0),
        });
        let listener = bind(path);
        st.listening.store(true, Ordering::SeqCst);
        let accept = {
            let st = Arc::clone(&st);
            thread::spawn(move || accept_loop(st, listener))
        };
        LeaseServer { st, accept: Some(accept) }
    }

    pub fn path(&self) -> &Path {
        &self.st.path
    }

    pub fn path_str(&self) -> &str {
        self.st.path.to_str().expect("a UTF-8 socket path")
    }

    /// The rules, to change them while serving.
    pub fn rules(&self) -> MutexGuard<'_, Rules> {
        lock(&self.st.rules)
    }

    /// Every message so far, both ways, in order.
    pub fn messages(&self) -> Vec<Rec> {
        lock(&self.st.log).clone()
    }

    /// Messages the client sent with this action.
    pub fn received(&self, action: &str) -> Vec<Rec> {
        self.messages().into_iter().filter(|r| r.dir == Dir::In && r.action() == action).collect()
    }

    /// Messages the client sent with this action for this app.
    pub fn received_for(&self, action: &str, app: &str) -> Vec<Rec> {
        self.received(action).into_iter().filter(|r| r.app() == app).collect()
    }

    /// Messages the server sent with this action.
    pub fn sent(&self, action: &str) -> Vec<Rec> {
        self.messages().into_iter().filter(|r| r.dir == Dir::Out && r.action() == action).collect()
    }

    /// The `lease.result` the server sent for a request id.
    pub fn result_for(&self, request_id: &str) -> Option<Rec> {
        self.sent("lease.result").into_iter().find(|r| r.request_id() == request_id)
    }

    /// The active leases (expired ones included until replaced or ended).
    pub fn leases(&self) -> HashMap<String, Lease> {
        lock(&self.st.leases).clone()
    }

    pub fn violations(&self) -> Vec<String> {
        lock(&self.st.violations).clone()
    }

    /// Connections accepted so far.
    pub fn connections_seen(&self) -> u64 {
        self.st.next_conn.load(Ordering::SeqCst)
    }

    /// Connections open now (one is closed once its end has been read).
    pub fn live_connections(&self) -> usize {
        lock(&self.st.conns).len()
    }

    /// The whole log, one line per message, for failure messages.
    pub fn dump(&self) -> String {
        let log = self.messages();
        let t0 = log.first().map(|r| r.at);
        let mut out: Vec<String> = log
            .iter()
            .map(|r| {
                let ms = t0.map(|t| r.at.duration_since(t).as_secs_f64() * 1000.0).unwrap_or(0.0);
                let arrow = if r.dir == Dir::In { "->" } else { "<-" };
                format!("{ms:9.1} ms  conn {} {arrow} {} {:?}", r.conn, r.msg, r.probes)
            })
            .collect();
        let v = self.violations();
        if !v.is_empty() {
            out.push(format!("violations: {v:?}"));
        }
        out.join("\n")
    }

    /// Polls the log until `f` finds something (panics with the log after `within`).
    pub fn wait_for<T>(&self, what: &str, within: Duration, mut f: impl FnMut(&[Rec]) -> Option<T>) -> T {
        let start = Instant::now();
        loop {
            if let Some(v) = f(&self.messages()) {
                return v;
            }
            if start.elapsed() > within {
                panic!("lease server: timed out after {within:?} waiting for {what}; log:\n{}", self.dump());
            }
            thread::sleep(Duration::from_millis(2));
        }
    }

    /// Waits for a received message with `action` for `app` after `skip` of them.
    pub fn wait_received(&self, action: &str, app: &str, nth: usize, within: Duration) -> Rec {
        self.wait_for(&format!("{action} #{nth} for {app}"), within, |log| {
            log.iter()
                .filter(|r| r.dir == Dir::In && r.action() == action && r.app() == app)
                .nth(nth)
                .cloned()
        })
    }

    /// Pushes a `lease.can_close.request` for `app` to the newest ready
    /// connection and waits (up to 2 × the 3 s timeout, so that a slow reply
    /// is measured rather than lost) for the reply: (reply, request → reply time).
    pub fn can_close(&self, app: &str) -> Result<(Value, Duration), String> {
        let (conn, holder) = {
            let conns = lock(&self.st.conns);
            conns
                .iter()
                .filter_map(|(id, c)| c.holder.clone().map(|h| (*id, h)))
                .max_by_key(|(id, _)| *id)
                .ok_or("no ready connection")?
        };
        let id = format!("close_{}", self.st.next_close.fetch_add(1, Ordering::SeqCst) + 1);
        let (tx, rx) = mpsc::channel();
        lock(&self.st.pending).insert(id.clone(), tx);
        let msg =
            json!({"action": "lease.can_close.request", "requestId": id, "holderId": holder, "appKey": app});
        let sent_at = Instant::now();
        if !self.st.send(conn, &msg) {
            lock(&self.st.pending).remove(&id);
            return Err(format!("could not write to connection {conn}"));
        }
        match rx.recv_timeout(CLOSE_CHECK_TIMEOUT * 2) {
            Ok((reply, at)) => Ok((reply, at.duration_since(sent_at))),
            Err(_) => {
                lock(&self.st.pending).remove(&id);
                Err(format!("no lease.can_close.reply to {id} within {:?}", CLOSE_CHECK_TIMEOUT * 2))
            }
        }
    }

    /// Closes every open connection (the client sees EOF).
    pub fn drop_connections(&self) {
        for (_, c) in lock(&self.st.conns).drain() {
            let _ = c.stream.shutdown(std::net::Shutdown::Both);
        }
    }

    /// Stops listening (socket file removed, so connecting fails) for `d`;
    /// returns once the socket is gone.
    pub fn refuse_for(&self, d: Duration) {
        *lock(&self.st.refuse_until) = Some(Instant::now() + d);
        let start = Instant::now();
        while self.st.listening.load(Ordering::SeqCst) && start.elapsed() < Duration::from_secs(5) {
            thread::sleep(Duration::from_millis(1));
        }
    }
}

impl Drop for LeaseServer {
    fn drop(&mut self) {
        self.st.stop.store(true, Ordering::SeqCst);
        self.drop_connections();
        if let Some(t) = self.accept.take() {
            let _ = t.join();
        }
        let _ = std::fs::remove_file(&self.st.path);
    }
}

fn bind(path: &Path) -> UnixListener {
    let _ = std::fs::remove_file(path);
    let l = UnixListener::bind(path).unwrap_or_else(|e| panic!("lease server: bind {}: {e}", path.display()));
    l.set_nonblocking(true).expect("nonblocking listener");
    l
}

fn accept_loop(st: Arc<State>, listener: UnixListener) {
    let mut listener = Some(listener);
    while !st.stop.load(Ordering::SeqCst) {
        let refusing = lock(&st.refuse_until).is_some_and(|t| Instant::now() < t);
        if refusing {
            if listener.take().is_some() {
                let _ = std::fs::remove_file(&st.path);
                st.listening.store(false, Ordering::SeqCst);
            }
            thread::sleep(Duration::from_millis(1));
            continue;
        }
        let l = listener.get_or_insert_with(|| {
            let l = bind(&st.path);
            st.listening.store(true, Ordering::SeqCst);
            l
        });
        match l.accept() {
            Ok((stream, _)) => {
                let _ = stream.set_nonblocking(false);
                let id = st.next_conn.fetch_add(1, Ordering::SeqCst) + 1;
                let Ok(writer) = stream.try_clone() else { continue };
                lock(&st.conns).insert(id, Conn { stream: writer, holder: None });
                let st = Arc::clone(&st);
                thread::spawn(move || serve_conn(st, id, stream));
            }
            Err(ref e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                thread::sleep(Duration::from_millis(1))
            }
            Err(_) => thread::sleep(Duration::from_millis(5)),
        }
    }
    st.listening.store(false, Ordering::SeqCst);
}

impl State {
    fn record(&self, conn: u64, dir: Dir, msg: Value) {
        let probes = if dir == Dir::In {
            lock(&self.rules).probes.iter().map(|p| p.exists()).collect()
        } else {
            Vec::new()
        };
        lock(&self.log).push(Rec { at: Instant::now(), conn, dir, msg, probes });
    }

    fn violation(&self, conn: u64, what: String) {
        lock(&self.violations).push(format!("conn {conn}: {what}"));
    }

    /// Writes one line (recorded first, so the log order is the wire order).
    fn send(&self, conn: u64, msg: &Value) -> bool {
        let mut line = msg.to_string().into_bytes();
        line.push(b'\n');
        let mut conns = lock(&self.conns);
        let Some(c) = conns.get_mut(&conn) else { return false };
        self.record(conn, Dir::Out, msg.clone());
        c.stream.write_all(&line).is_ok()
    }

    fn close(&self, conn: u64) {
        if let Some(c) = lock(&self.conns).remove(&conn) {
            let _ = c.stream.shutdown(std::net::Shutdown::Both);
        }
    }

    fn result(&self, conn: u64, request_id: &Value, code: &str, app: Option<&str>, secs: Option<u64>) {
        let mut msg = json!({"action": "lease.result", "requestId": request_id, "code": code});
        if let Some(app) = app {
            msg["appKey"] = app.into();
        }
        if let Some(s) = secs {
            msg["leaseSeconds"] = s.into();
        }
        self.send(conn, &msg);
    }
}

fn keys_of(msg: &Value) -> BTreeSet<String> {
    msg.as_object().map(|m| m.keys().cloned().collect()).unwrap_or_default()
}

fn serve_conn(st: Arc<State>, conn: u64, stream: UnixStream) {
    let reader = BufReader::new(stream);
    let mut holder: Option<String> = None;
    for line in reader.split(b'\n') {
        let Ok(line) = line else { break };
        let text = String::from_utf8_lossy(&line).into_owned();
        let parsed: Option<Value> = serde_json::from_str(&text).ok().filter(Value::is_object);
        let msg = parsed.clone().unwrap_or_else(|| json!({"_raw": text}));
        st.record(conn, Dir::In, msg.clone());
        let action = msg["action"].as_str().unwrap_or("").to_string();
        let Some(holder_id) = holder.clone() else {
            // The handshake.
            if parsed.is_none() || action != "session.hello" {
                st.send(
                    conn,
                    &json!({"action": "session.error", "code": "invalid_handshake",
                    "message": "session.hello must come first"}),
                );
                st.close(conn);
                return;
            }
            if msg["protocolVersion"] != json!(1) || lock(&st.rules).refuse_version {
                st.send(
                    conn,
                    &json!({"action": "session.error", "code": "unsupported_protocol_version",
                    "message": "this Aion speaks protocol version 2"}),
                );
                st.close(conn);
                return;
            }
            let h = msg["holderId"].as_str().unwrap_or("");
            if h.is_empty() || !msg["clientName"].is_string() || !msg["pid"].is_u64() {
                st.send(
                    conn,
                    &json!({"action": "session.error", "code": "invalid_handshake",
                    "message": "holderId, clientName and pid are required"}),
                );
                st.close(conn);
                return;
            }
            let want: BTreeSet<String> = ["action", "protocolVersion", "holderId", "clientName", "pid"]
                .iter()
                .map(|s| s.to_string())
                .collect();
            if keys_of(&msg) != want {
                st.violation(conn, format!("hello keys {:?}", keys_of(&msg)));
            }
            holder = Some(h.to_string());
            if let Some(c) = lock(&st.conns).get_mut(&conn) {
                c.holder = Some(h.to_string());
            }
            st.send(conn, &json!({"action": "session.ready", "protocolVersion": 1, "holderId": h}));
            continue;
        };
        match action.as_str() {
            "lease.begin" | "lease.renew" | "lease.end" => {
                lease_request(&st, conn, &holder_id, &action, &msg)
            }
            "lease.can_close.reply" => close_reply(&st, conn, &holder_id, &msg),
            "session.hello" => st.violation(conn, "a second session.hello on a ready connection".into()),
            _ => {
                st.violation(conn, format!("unknown action {action:?}"));
                st.result(conn, &msg["requestId"], "unknown_action", None, None);
            }
        }
    }
    lock(&st.conns).remove(&conn);
}

fn lease_request(st: &State, conn: u64, holder: &str, action: &str, msg: &Value) {
    let delay = lock(&st.rules).answer_delay;
    if !delay.is_zero() {
        thread::sleep(delay);
    }
    let rid = &msg["requestId"];
    let app = msg["appKey"].as_str().unwrap_or("");
    let ending = action == "lease.end";
    let mut want: BTreeSet<String> =
        ["action", "requestId", "holderId", "appKey"].iter().map(|s| s.to_string()).collect();
    if !ending {
        want.insert("leaseSeconds".into());
    }
    if keys_of(msg) != want {
        st.violation(conn, format!("{action} keys {:?}, expected {want:?}", keys_of(msg)));
    }
    if rid.as_str().is_none_or(str::is_empty) || app.is_empty() {
        return st.result(conn, rid, "invalid_payload", None, None);
    }
    if msg["holderId"].as_str() != Some(holder) {
        return st.result(conn, rid, "holder_mismatch", Some(app), None);
    }
    let secs = msg["leaseSeconds"].as_u64();
    if !ending && !secs.is_some_and(|s| (60..=1800).contains(&s)) {
        return st.result(conn, rid, "invalid_payload", Some(app), None);
    }
    let (known, forced, scale) = {
        let r = lock(&st.rules);
        (r.known_apps.as_ref().is_none_or(|k| k.contains(app)), r.codes.get(app).cloned(), r.scale)
    };
    if !known {
        return st.result(conn, rid, "unknown_app", Some(app), None);
    }
    if !ending && let Some(code) = forced {
        return st.result(conn, rid, &code, Some(app), None);
    }
    let now = Instant::now();
    let mut leases = lock(&st.leases);
    if ending {
        match leases.get(app) {
            Some(l) if l.holder != holder => {
                drop(leases);
                return st.result(conn, rid, "holder_mismatch", Some(app), None);
            }
            Some(_) => {
                leases.remove(app);
            }
            None => st.violation(conn, format!("lease.end for {app}, which it does not hold")),
        }
        drop(leases);
        return st.result(conn, rid, "accepted", Some(app), None);
    }
    let secs = secs.expect("checked");
    match leases.get(app) {
        Some(l) if l.holder != holder && now < l.expires => {
            drop(leases);
            return st.result(conn, rid, "lease_conflict", Some(app), None);
        }
        Some(l) if action == "lease.renew" && l.holder == holder && now > l.expires => {
            let late = now.duration_since(l.expires);
            st.violation(conn, format!("lease.renew for {app} came {late:?} after the lease expired"));
        }
        None if action == "lease.renew" => {
            st.violation(conn, format!("lease.renew for {app}, which it does not hold"));
        }
        _ => {}
    }
    let expires = now + Duration::from_secs(secs).div_f64(scale);
    leases.insert(app.to_string(), Lease { holder: holder.to_string(), expires });
    drop(leases);
    st.result(conn, rid, "accepted", Some(app), Some(secs));
}

fn close_reply(st: &State, conn: u64, holder: &str, msg: &Value) {
    let at = Instant::now();
    let rid = msg["requestId"].as_str().unwrap_or("");
    let Some(tx) = lock(&st.pending).remove(rid) else {
        st.violation(conn, format!("lease.can_close.reply to an unknown request {rid:?}"));
        return;
    };
    if msg["holderId"].as_str() != Some(holder) {
        st.violation(
            conn,
            format!("lease.can_close.reply with holderId {} on {holder}'s connection", msg["holderId"]),
        );
    }
    let _ = tx.send((msg.clone(), at));
}
