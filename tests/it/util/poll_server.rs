//! Poll mode: a fake poll server (PROTOCOL.md §2) and the running agent.

use std::io::{self, Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, mpsc};
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde_json::{Value, json};

use super::{
    BIN, COUNTER, DEADLINE, Spawned, drained, eventually, hmac_sha256, kill_marked, marked_processes,
    wait_exit,
};

/// One request the fake poll server received, recorded once it was read whole
/// (before it is answered), in arrival order.
#[derive(Clone, Debug)]
pub struct PollReq {
    pub at: Instant,
    pub method: String,
    pub path: String,
    pub body: Vec<u8>,
    /// What the server answered.
    pub status: u16,
}

impl PollReq {
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| {
            panic!(
                "{} {}: body is not JSON ({e}): {}",
                self.method,
                self.path,
                String::from_utf8_lossy(&self.body)
            )
        })
    }
    pub fn is_post(&self, path: &str) -> bool {
        self.method == "POST" && self.path == path
    }
    /// `METHOD PATH STATUS body` (body cut at 300 bytes), for failure messages.
    pub fn line(&self) -> String {
        let body = String::from_utf8_lossy(&self.body);
        let cut: String = body.chars().take(300).collect();
        format!("{} {} -> {} {}", self.method, self.path, self.status, cut)
    }
}

/// What the fake poll server knows and how it answers; shared with its threads.
struct PollState {
    token: String,
    /// Instructions handed out on every GET until acked (as a real server would).
    pending: Vec<Value>,
    /// Answer 401 to everything.
    refuse: bool,
    /// Answer 500 to this many acks first.
    fail_acks: usize,
    reqs: Vec<PollReq>,
    /// Requests without the right bearer token, POSTs with a bad signature, ...
    problems: Vec<String>,
}

/// A fake poll-mode server (PROTOCOL.md §2) on 127.0.0.1: a std::net accept
/// thread and a thread per connection (HTTP/1.1 keep-alive, Content-Length
/// bodies). It checks `Authorization: Bearer <token>` on every request and
/// `X-Timestamp` / `X-Signature` on every POST (problems are recorded, see
/// `assert_clean`), hands out the pending instructions on
/// `GET /api/agent/instructions` (204 when there are none) until they are acked,
/// and records everything.
///
/// Not tiny_http: a "down" server must refuse new connections *and* drop the
/// agent's kept-alive ones (tiny_http keeps serving those into a queue nobody
/// reads once it is dropped, so the agent's next request on them would hang
/// until its client timeout), and tiny_http cannot send `Connection: close`.
pub struct PollServer {
    pub port: u16,
    state: Arc<Mutex<PollState>>,
    stop: Arc<std::sync::atomic::AtomicBool>,
    conns: Arc<Mutex<Vec<TcpStream>>>,
    live: Arc<std::sync::atomic::AtomicUsize>,
    accept: Option<thread::JoinHandle<()>>,
}

impl PollServer {
    pub fn start(token: &str) -> PollServer {
        let state = Arc::new(Mutex::new(PollState {
            token: token.to_string(),
            pending: Vec::new(),
            refuse: false,
            fail_acks: 0,
            reqs: Vec::new(),
            problems: Vec::new(),
        }));
        let mut s = PollServer {
            port: 0,
            state,
            stop: Arc::default(),
            conns: Arc::default(),
            live: Arc::default(),
            accept: None,
        };
        s.up();
        s
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Listens (again) on `self.port` (0 the first time: an ephemeral port).
    pub fn up(&mut self) {
        assert!(self.accept.is_none(), "the poll server is already up");
        let started = Instant::now();
        let listener = loop {
            match std::net::TcpListener::bind(("127.0.0.1", self.port)) {
                Ok(l) => break l,
                Err(e) if started.elapsed() > DEADLINE => panic!("poll server on port {}: {e}", self.port),
                Err(_) => thread::sleep(Duration::from_millis(20)),
            }
        };
        self.port = listener.local_addr().unwrap().port();
        listener.set_nonblocking(true).unwrap();
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        self.stop = stop.clone();
        let (state, conns, live) = (self.state.clone(), self.conns.clone(), self.live.clone());
        self.accept = Some(thread::spawn(move || {
            while !stop.load(Ordering::SeqCst) {
                match listener.accept() {
                    Ok((sock, _)) => {
                        let _ = sock.set_nonblocking(false);
                        if let Ok(c) = sock.try_clone() {
                            conns.lock().unwrap().push(c);
                        }
                        let (state, stop, live) = (state.clone(), stop.clone(), live.clone());
                        live.fetch_add(1, Ordering::SeqCst);
                        thread::spawn(move || {
                            poll_conn(sock, &state, &stop);
                            live.fetch_sub(1, Ordering::SeqCst);
                        });
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                        thread::sleep(Duration::from_millis(2))
                    }
                    Err(_) => thread::sleep(Duration::from_millis(20)),
                }
            }
            // the listener is closed here: new connections are refused
        }));
    }

    /// Goes down: stops listening (connections are refused), lets a request
    /// being answered finish, then closes every open connection.
    pub fn down(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.accept.take() {
            let _ = t.join();
        }
        let start = Instant::now();
        while self.live.load(Ordering::SeqCst) > 0 && start.elapsed() < Duration::from_secs(2) {
            thread::sleep(Duration::from_millis(5));
        }
        for c in self.conns.lock().unwrap().drain(..) {
            let _ = c.shutdown(std::net::Shutdown::Both);
        }
    }

    /// Makes an instruction available (handed out until acked).
    pub fn push(&self, instruction: Value) {
        self.state.lock().unwrap().pending.push(instruction);
    }

    /// Makes several instructions available at once (one poll answer).
    pub fn push_all(&self, instructions: impl IntoIterator<Item = Value>) {
        self.state.lock().unwrap().pending.extend(instructions);
    }

    pub fn set_refuse(&self, refuse: bool) {
        self.state.lock().unwrap().refuse = refuse;
    }

    /// Answer 500 to the next `n` acks (the instructions stay pending).
    pub fn fail_acks(&self, n: usize) {
        self.state.lock().unwrap().fail_acks = n;
    }

    pub fn requests(&self) -> Vec<PollReq> {
        self.state.lock().unwrap().reqs.clone()
    }

    pub fn problems(&self) -> Vec<String> {
        self.state.lock().unwrap().problems.clone()
    }

    /// Every request was authorized and every POST correctly signed.
    pub fn assert_clean(&self) {
        let p = self.problems();
        assert!(p.is_empty(), "the fake server saw {} bad request(s):\n{}", p.len(), p.join("\n"));
    }

    /// The last `n` requests, one per line.
    pub fn dump(&self, n: usize) -> String {
        let r = self.requests();
        let from = r.len().saturating_sub(n);
        r[from..].iter().map(PollReq::line).collect::<Vec<_>>().join("\n")
    }

    /// The POSTs to `path`, answered 2xx, in arrival order.
    pub fn delivered(&self, path: &str) -> Vec<PollReq> {
        self.requests().into_iter().filter(|r| r.is_post(path) && (200..300).contains(&r.status)).collect()
    }

    /// (index in `requests()`, event body) of the delivered events of `session`.
    pub fn events_at(&self, session: &str) -> Vec<(usize, Value)> {
        self.requests()
            .iter()
            .enumerate()
            .filter(|(_, r)| r.is_post("/api/agent/events") && r.status == 200)
            .map(|(i, r)| (i, r.json()))
            .filter(|(_, v)| v["sessionId"] == session)
            .collect()
    }

    pub fn events(&self, session: &str) -> Vec<Value> {
        self.events_at(session).into_iter().map(|(_, v)| v).collect()
    }

    /// The names of the delivered events of `session`, in order.
    pub fn event_names(&self, session: &str) -> Vec<String> {
        self.events(session).iter().map(|v| v["event"].as_str().unwrap_or("?").to_string()).collect()
    }

    /// The delivered output posts of `session`, in arrival order.
    pub fn output_posts(&self, session: &str) -> Vec<PollReq> {
        self.delivered("/api/agent/output").into_iter().filter(|r| r.json()["sessionId"] == session).collect()
    }

    /// The chunks of `session`'s delivered output posts, in arrival order.
    pub fn chunks(&self, session: &str) -> Vec<Value> {
        self.output_posts(session)
            .iter()
            .flat_map(|r| r.json()["chunks"].as_array().cloned().unwrap_or_default())
            .collect()
    }

    /// The data of `session`'s chunks of `stream` ("stdout" / "stderr"), in arrival order.
    pub fn text(&self, session: &str, stream: &str) -> String {
        self.chunks(session)
            .iter()
            .filter(|c| c["stream"] == stream)
            .map(|c| c["data"].as_str().unwrap_or_else(|| panic!("chunk without data: {c}")).to_string())
            .collect()
    }

    /// (index in `requests()`, status, ids) of every ack received.
    pub fn acks(&self) -> Vec<(usize, u16, Vec<String>)> {
        self.requests()
            .iter()
            .enumerate()
            .filter(|(_, r)| r.is_post("/api/agent/instructions/ack"))
            .map(|(i, r)| {
                let ids = r.json()["ids"]
                    .as_array()
                    .map(|a| a.iter().filter_map(|v| v.as_str().map(str::to_string)).collect())
                    .unwrap_or_default();
                (i, r.status, ids)
            })
            .collect()
    }

    pub fn statuses(&self) -> Vec<(Instant, Value)> {
        self.delivered("/api/agent/status").iter().map(|r| (r.at, r.json())).collect()
    }

    pub fn errors(&self) -> Vec<Value> {
        self.delivered("/api/agent/errors").iter().map(PollReq::json).collect()
    }

    /// Waits (at most `within`) for `cond` on the requests; panics with the last ones.
    pub fn wait_for(&self, what: &str, within: Duration, mut cond: impl FnMut(&PollServer) -> bool) {
        if !eventually(within, || cond(self)) {
            panic!("fake poll server: no {what} within {within:?}; last requests:\n{}", self.dump(40));
        }
    }

    /// Waits for `session`'s event `name`; returns its body.
    pub fn wait_event(&self, session: &str, name: &str, within: Duration) -> Value {
        let mut found = None;
        self.wait_for(&format!("event {name} of {session}"), within, |s| {
            found = s.events(session).into_iter().find(|v| v["event"] == name);
            found.is_some()
        });
        found.unwrap()
    }
}

impl Drop for PollServer {
    fn drop(&mut self) {
        self.down();
    }
}

fn find_crlf2(buf: &[u8]) -> Option<usize> {
    buf.windows(4).position(|w| w == b"\r\n\r\n")
}

/// One connection of the fake poll server: requests until EOF or stop.
fn poll_conn(mut sock: TcpStream, state: &Mutex<PollState>, stop: &std::sync::atomic::AtomicBool) {
    let _ = sock.set_read_timeout(Some(Duration::from_millis(20)));
    let mut buf: Vec<u8> = Vec::new();
    let mut chunk = vec![0u8; 64 << 10];
    // Reads more into `buf`; false at EOF, error or stop.
    let mut fill = |sock: &mut TcpStream, buf: &mut Vec<u8>| -> bool {
        loop {
            if stop.load(Ordering::SeqCst) {
                return false;
            }
            match sock.read(&mut chunk) {
                Ok(0) => return false,
                Ok(n) => {
                    buf.extend_from_slice(&chunk[..n]);
                    return true;
                }
                Err(e) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut) => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => return false,
            }
        }
    };
    loop {
        let head_end = loop {
            if let Some(i) = find_crlf2(&buf) {
                break i;
            }
            if buf.len() > (1 << 20) || !fill(&mut sock, &mut buf) {
                return;
            }
        };
        let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
        let mut lines = head.split("\r\n");
        let mut first = lines.next().unwrap_or("").split(' ');
        let method = first.next().unwrap_or("").to_string();
        let path = first.next().unwrap_or("").to_string();
        let headers: Vec<(String, String)> = lines
            .filter_map(|l| l.split_once(':'))
            .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
            .collect();
        let get =
            |name: &str| headers.iter().find(|(k, _)| k.eq_ignore_ascii_case(name)).map(|(_, v)| v.clone());
        if get("transfer-encoding").is_some() {
            state
                .lock()
                .unwrap()
                .problems
                .push(format!("{method} {path}: Transfer-Encoding not supported here"));
            return;
        }
        let len: usize = get("content-length").and_then(|v| v.parse().ok()).unwrap_or(0);
        while buf.len() < head_end + 4 + len {
            if !fill(&mut sock, &mut buf) {
                return;
            }
        }
        let body = buf[head_end + 4..head_end + 4 + len].to_vec();
        buf.drain(..head_end + 4 + len);
        let close = get("connection").is_some_and(|v| v.eq_ignore_ascii_case("close"));
        let (status, answer) = poll_answer(state, method, path, headers, body);
        let reason = match status {
            200 => "OK",
            204 => "No Content",
            401 => "Unauthorized",
            404 => "Not Found",
            _ => "Error",
        };
        let mut out = format!("HTTP/1.1 {status} {reason}\r\n");
        if status != 204 {
            out.push_str(&format!("Content-Type: application/json\r\nContent-Length: {}\r\n", answer.len()));
        }
        out.push_str("\r\n");
        out.push_str(&answer);
        if sock.write_all(out.as_bytes()).is_err() || close {
            return;
        }
    }
}

/// Checks and records one request; (status, body) to answer.
fn poll_answer(
    state: &Mutex<PollState>,
    method: String,
    path: String,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
) -> (u16, String) {
    let mut st = state.lock().unwrap();
    let get = |name: &str| headers.iter().find(|(k, _)| k.eq_ignore_ascii_case(name)).map(|(_, v)| v.clone());
    let what = format!("{method} {path}");
    let bearer = format!("Bearer {}", st.token);
    if get("authorization").as_deref() != Some(bearer.as_str()) {
        let shown = if get("authorization").is_some() { "a wrong Authorization" } else { "no Authorization" };
        st.problems.push(format!("{what}: {shown} header"));
    }
    if method == "POST" {
        match (get("x-timestamp"), get("x-signature")) {
            (Some(ts), Some(sig)) => {
                let mut msg = ts.clone().into_bytes();
                msg.push(b'.');
                msg.extend_from_slice(&body);
                if sig != hmac_sha256(&st.token, &msg) {
                    st.problems.push(format!("{what}: bad X-Signature {sig} (X-Timestamp {ts})"));
                }
                let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_millis() as i128;
                match ts.parse::<i128>() {
                    Ok(t) if (now - t).abs() <= 120_000 => {}
                    _ => st.problems.push(format!("{what}: X-Timestamp {ts:?} is not the current unix ms")),
                }
            }
            (ts, sig) => {
                st.problems.push(format!("{what}: X-Timestamp {ts:?} / X-Signature {sig:?} missing"))
            }
        }
        if get("content-type").as_deref() != Some("application/json") {
            st.problems.push(format!("{what}: Content-Type {:?}", get("content-type")));
        }
        if serde_json::from_slice::<Value>(&body).is_err() {
            st.problems.push(format!("{what}: body is not JSON: {}", String::from_utf8_lossy(&body)));
        }
    }
    let (status, answer) = if st.refuse {
        (401, r#"{"error":"unauthorized"}"#.to_string())
    } else {
        match (method.as_str(), path.as_str()) {
            ("GET", "/api/agent/instructions") if st.pending.is_empty() => (204, String::new()),
            ("GET", "/api/agent/instructions") => {
                let list = json!({ "instructions": st.pending }).to_string();
                // one without an id can never be acked: hand it out once
                st.pending.retain(|i| i.get("id").is_some());
                (200, list)
            }
            ("POST", "/api/agent/instructions/ack") if st.fail_acks > 0 => {
                st.fail_acks -= 1;
                (500, r#"{"error":"try again"}"#.to_string())
            }
            ("POST", "/api/agent/instructions/ack") => {
                let ids: Vec<Value> = serde_json::from_slice::<Value>(&body)
                    .ok()
                    .and_then(|v| v["ids"].as_array().cloned())
                    .unwrap_or_default();
                st.pending.retain(|i| !ids.contains(&i["id"]));
                (200, r#"{"ok":true}"#.to_string())
            }
            (
                "POST",
                "/api/agent/output" | "/api/agent/events" | "/api/agent/status" | "/api/agent/errors",
            ) => (200, r#"{"ok":true}"#.to_string()),
            _ => {
                st.problems.push(format!("{what}: unexpected request"));
                (404, r#"{"error":"not found"}"#.to_string())
            }
        }
    };
    st.reqs.push(PollReq { at: Instant::now(), method, path, body, status });
    (status, answer)
}

/// Variables that configure poll mode: removed from what the agent inherits,
/// so that only what a test sets counts.
pub const POLL_VARS: &[&str] = &[
    "SERVER_URL",
    "AGENT_TOKEN",
    "POLL_INTERVAL",
    "OUTPUT_FLUSH_INTERVAL",
    "MAX_CONCURRENT_SESSIONS",
    "STATUS_INTERVAL",
    "AION_SESSION_COMMAND",
    "AION_STATE_DIR",
    "DELIVERY_SECONDS",
    "STATE_DIRECTORY",
];

/// `aion-connector poll ARGS` in `cwd` with a clean poll environment plus `env`
/// (XDG_STATE_HOME = cwd/state).
pub fn spawn_poll(args: &[&str], cwd: &Path, env: &[(&str, &str)]) -> Spawned {
    spawn_poll_marked(&[], args, cwd, env).0
}

/// `spawn_poll`, plus the `AION_POLL_TEST_MARK=<unique>` variable its sessions
/// inherit, by which `PollAgent`'s drop finds what is left of them. A
/// non-empty `wrapper` (a program and its arguments, which must exec the
/// command it is given, as `prlimit ... --` does) runs the binary.
fn spawn_poll_marked(wrapper: &[&str], args: &[&str], cwd: &Path, env: &[(&str, &str)]) -> (Spawned, String) {
    let mut cmd = match wrapper {
        [] => Command::new(BIN),
        [program, rest @ ..] => {
            let mut cmd = Command::new(program);
            cmd.args(rest).arg(BIN);
            cmd
        }
    };
    cmd.arg("poll")
        .args(args)
        .current_dir(cwd)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    for v in POLL_VARS {
        cmd.env_remove(v);
    }
    let mark = format!("{}#{}", cwd.display(), COUNTER.fetch_add(1, Ordering::SeqCst));
    cmd.env("XDG_STATE_HOME", cwd.join("state")).env("AION_POLL_TEST_MARK", &mark);
    for (k, v) in env {
        cmd.env(k, v);
    }
    let mut child = cmd.spawn().expect("spawn aion-connector poll");
    let stdout = Arc::new(Mutex::new(String::new()));
    let stderr = Arc::new(Mutex::new(String::new()));
    let (tx, first_line) = mpsc::channel();
    for (pipe, buf, tx) in [
        (child.stdout.take().map(|p| Box::new(p) as Box<dyn Read + Send>), stdout.clone(), Some(tx)),
        (child.stderr.take().map(|p| Box::new(p) as Box<dyn Read + Send>), stderr.clone(), None),
    ] {
        let (mut pipe, mut tx) = (pipe.unwrap(), tx);
        thread::spawn(move || {
            let mut chunk = [0u8; 8192];
            loop {
                match pipe.read(&mut chunk) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => {
                        let mut b = buf.lock().unwrap();
                        b.push_str(&String::from_utf8_lossy(&chunk[..n]));
                        if let Some(i) = b.find('\n')
                            && let Some(tx) = tx.take()
                        {
                            let _ = tx.send(b[..=i].to_string());
                        }
                    }
                }
            }
        });
    }
    (Spawned { child, first_line, stdout, stderr }, mark)
}

/// Runs `aion-connector poll ARGS` to completion (like `run`, poll environment
/// as in `spawn_poll`): (exit code, stdout, stderr).
pub fn run_poll(args: &[&str], cwd: &Path, env: &[(&str, &str)]) -> (i32, String, String) {
    let mut sp = spawn_poll(args, cwd, env);
    let Some(st) = wait_exit(&mut sp.child, DEADLINE) else {
        let _ = sp.child.kill();
        let _ = sp.child.wait();
        panic!(
            "`aion-connector poll {}` did not exit; stderr:\n{}",
            args.join(" "),
            sp.stderr.lock().unwrap()
        );
    };
    (st.code().unwrap_or(-1), drained(&sp.stdout), drained(&sp.stderr))
}

/// A running `aion-connector poll`. On drop: SIGTERM (SIGKILL after 3 s), then
/// SIGKILL to any session process still carrying the test's mark.
pub struct PollAgent {
    pub child: Child,
    pub stderr: Arc<Mutex<String>>,
    mark: String,
}

impl PollAgent {
    pub fn start(args: &[&str], cwd: &Path, env: &[(&str, &str)]) -> PollAgent {
        PollAgent::start_under(&[], args, cwd, env)
    }

    /// `start`, the binary run by `wrapper` (a program and its arguments that
    /// execs the command it is given, e.g. `["prlimit", "--nofile=64:64", "--"]`).
    pub fn start_under(wrapper: &[&str], args: &[&str], cwd: &Path, env: &[(&str, &str)]) -> PollAgent {
        let (sp, mark) = spawn_poll_marked(wrapper, args, cwd, env);
        PollAgent { child: sp.child, stderr: sp.stderr, mark: format!("AION_POLL_TEST_MARK={mark}") }
    }

    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    pub fn stderr(&self) -> String {
        self.stderr.lock().unwrap().clone()
    }

    /// Polls stderr until `pred` holds (panics after `within`).
    pub fn wait_stderr(&self, what: &str, within: Duration, pred: impl Fn(&str) -> bool) -> String {
        let mut last = String::new();
        if eventually(within, || {
            last = self.stderr();
            pred(&last)
        }) {
            return last;
        }
        panic!("agent stderr never showed {what} within {within:?}; stderr:\n{last}");
    }

    /// Sends `sig` and waits (up to `within`) for the exit.
    pub fn signal_and_wait(&mut self, sig: nix::sys::signal::Signal, within: Duration) -> ExitStatus {
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.pid()), sig).unwrap();
        match wait_exit(&mut self.child, within) {
            Some(st) => {
                let start = Instant::now();
                while Arc::strong_count(&self.stderr) > 1 && start.elapsed() < Duration::from_secs(2) {
                    thread::sleep(Duration::from_millis(5));
                }
                st
            }
            None => panic!("agent did not exit within {within:?} after {sig:?}; stderr:\n{}", self.stderr()),
        }
    }

    /// Live processes started by this agent's sessions (they carry the mark).
    pub fn leftovers(&self) -> Vec<i32> {
        marked_processes(&self.mark)
    }
}

impl Drop for PollAgent {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(self.pid()),
                nix::sys::signal::Signal::SIGTERM,
            );
            if wait_exit(&mut self.child, Duration::from_secs(3)).is_none() {
                let _ = self.child.kill();
                let _ = self.child.wait();
            }
        }
        kill_marked(&self.mark);
    }
}

/// Checks a session's delivered record: chunk seq 0..N-1 in arrival order
/// without gaps or repeats, `started` first (before any output), exactly one
/// closing event, last (after all output). Returns (event names, chunks).
pub fn check_poll_session(server: &PollServer, session: &str) -> (Vec<String>, Vec<Value>) {
    let reqs = server.requests();
    let mine: Vec<(usize, &PollReq)> = reqs
        .iter()
        .enumerate()
        .filter(|(_, r)| {
            (r.is_post("/api/agent/events") || r.is_post("/api/agent/output"))
                && r.status == 200
                && r.json()["sessionId"] == session
        })
        .collect();
    let mut names = Vec::new();
    let mut chunks = Vec::new();
    let closing = ["exited", "terminated", "rejected", "failed"];
    for (n, (_, r)) in mine.iter().enumerate() {
        let v = r.json();
        if r.path == "/api/agent/events" {
            let name = v["event"].as_str().unwrap_or("?").to_string();
            if name == "started" {
                assert_eq!(n, 0, "{session}: started is not the first post:\n{}", server.dump(30));
                assert!(v["pid"].as_i64().is_some_and(|p| p > 0), "{session}: started without a pid: {v}");
            }
            if closing.contains(&name.as_str()) {
                assert_eq!(n + 1, mine.len(), "{session}: {name} is not the last post:\n{}", server.dump(30));
            }
            names.push(name);
        } else {
            let list = v["chunks"].as_array().unwrap_or_else(|| panic!("output without chunks: {v}"));
            assert!(!list.is_empty(), "{session}: an output post without chunks");
            for c in list {
                assert!(c["stream"] == "stdout" || c["stream"] == "stderr", "chunk stream: {c}");
                assert!(c["data"].is_string() && c["ts"].is_u64(), "chunk fields: {c}");
                chunks.push(c.clone());
            }
        }
    }
    let seqs: Vec<u64> = chunks.iter().map(|c| c["seq"].as_u64().expect("chunk seq")).collect();
    let want: Vec<u64> = (0..seqs.len() as u64).collect();
    if seqs != want {
        let mut sorted = seqs.clone();
        sorted.sort_unstable();
        let dups = sorted.windows(2).filter(|w| w[0] == w[1]).count();
        let max = sorted.last().copied().unwrap_or(0);
        panic!(
            "{session}: chunk seqs are not 0..{} in order ({} chunks, {dups} repeated, max seq {max}); first bad at {:?}",
            seqs.len(),
            seqs.len(),
            seqs.iter().zip(&want).position(|(a, b)| a != b)
        );
    }
    assert_eq!(
        names.iter().filter(|n| closing.contains(&n.as_str())).count(),
        1,
        "{session}: not exactly one closing event: {names:?}"
    );
    (names, chunks)
}
