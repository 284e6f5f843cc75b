//! Shared helpers for the integration tests: a guard around the real binary, a
//! temporary directory guard, a tiny hand-written HTTP/1.1 client and a few
//! process helpers. std only (plus the crate's own serde_json / nix).
#![allow(dead_code)]

pub mod lease_server;

use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde_json::{Value, json};

pub const BIN: &str = env!("CARGO_BIN_EXE_aion-connector");
/// Generous upper bound for anything that should happen "soon".
pub const DEADLINE: Duration = Duration::from_secs(10);

// ---------------------------------------------------------------- TempDir

static COUNTER: AtomicU64 = AtomicU64::new(0);

/// A unique directory under the system temp dir, removed on drop.
/// The path is canonical (no symlinks), so it can be compared with what the
/// server answers.
pub struct TempDir {
    path: PathBuf,
}

impl TempDir {
    pub fn new(tag: &str) -> TempDir {
        let nanos = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().subsec_nanos();
        let n = COUNTER.fetch_add(1, Ordering::SeqCst);
        let path =
            std::env::temp_dir().join(format!("aion-test-{}-{}-{}-{}", tag, std::process::id(), n, nanos));
        std::fs::create_dir_all(&path).unwrap();
        let path = std::fs::canonicalize(&path).unwrap();
        TempDir { path }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn join<P: AsRef<Path>>(&self, p: P) -> PathBuf {
        self.path.join(p)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.path);
    }
}

/// Write `content` to `path`, creating parent directories.
pub fn write(path: impl AsRef<Path>, content: impl AsRef<[u8]>) {
    let path = path.as_ref();
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).unwrap();
    }
    std::fs::write(path, content).unwrap();
}

// ---------------------------------------------------------------- config

/// `{"port":0,"host":"127.0.0.1","projects":<projects>}` plus optional extra
/// top-level members (e.g. `"limits"`).
pub fn config(projects: Value, extra: Option<Value>) -> String {
    let mut cfg = json!({"port": 0, "host": "127.0.0.1", "projects": projects});
    if let Some(Value::Object(m)) = extra {
        for (k, v) in m {
            cfg[k] = v;
        }
    }
    cfg.to_string()
}

/// A config with a single project.
pub fn one_project(id: &str, token: &str, dir: &Path) -> String {
    config(json!({ id: {"token": token, "dir": dir.to_str().unwrap()} }), None)
}

// ---------------------------------------------------------------- Server

/// The real binary, serving. Killed on drop; stderr is drained into a buffer.
pub struct Server {
    pub child: Child,
    pub addr: String,
    pub stderr: Arc<Mutex<String>>,
    pub stdout: Arc<Mutex<String>>,
}

/// Spawn the binary with `args` in `cwd`, stdout/stderr piped and drained by
/// threads. Returns the child, the first stdout line receiver and the buffers.
pub struct Spawned {
    pub child: Child,
    pub first_line: mpsc::Receiver<String>,
    pub stdout: Arc<Mutex<String>>,
    pub stderr: Arc<Mutex<String>>,
}

pub fn spawn(args: &[&str], cwd: &Path, env: &[(&str, &str)]) -> Spawned {
    let mut cmd = Command::new(BIN);
    cmd.args(args).current_dir(cwd).stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped());
    // The outbox spool (state dir) stays inside the test's own directory.
    cmd.env("XDG_STATE_HOME", cwd.join("state")).env_remove("STATE_DIRECTORY");
    for (k, v) in env {
        cmd.env(k, v);
    }
    let mut child = cmd.spawn().expect("spawn aion-connector");
    let stderr = Arc::new(Mutex::new(String::new()));
    let stdout = Arc::new(Mutex::new(String::new()));
    {
        let mut err = child.stderr.take().unwrap();
        let buf = stderr.clone();
        thread::spawn(move || {
            let mut chunk = [0u8; 8192];
            loop {
                match err.read(&mut chunk) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => buf.lock().unwrap().push_str(&String::from_utf8_lossy(&chunk[..n])),
                }
            }
        });
    }
    let (tx, rx) = mpsc::channel();
    {
        let out = child.stdout.take().unwrap();
        let buf = stdout.clone();
        thread::spawn(move || {
            let mut r = BufReader::new(out);
            let mut first = true;
            loop {
                let mut line = String::new();
                match r.read_line(&mut line) {
                    Ok(0) | Err(_) => break,
                    Ok(_) => {
                        buf.lock().unwrap().push_str(&line);
                        if first {
                            first = false;
                            let _ = tx.send(line);
                        }
                    }
                }
            }
        });
    }
    Spawned { child, first_line: rx, stdout, stderr }
}

impl Server {
    /// Write `cfg` to `dir/aion.config.json` and serve it from `dir`.
    pub fn start(dir: &Path, cfg: &str) -> Server {
        let path = dir.join("aion.config.json");
        std::fs::write(&path, cfg).unwrap();
        Server::start_args(&[path.to_str().unwrap()], dir, &[])
    }

    pub fn start_args(args: &[&str], cwd: &Path, env: &[(&str, &str)]) -> Server {
        let Spawned { mut child, first_line, stdout, stderr } = spawn(args, cwd, env);
        let line = match first_line.recv_timeout(DEADLINE) {
            Ok(l) => l,
            Err(_) => {
                let _ = child.kill();
                let status = child.wait();
                // give the drain thread a moment to collect the last bytes
                thread::sleep(Duration::from_millis(50));
                panic!(
                    "server did not print `listening on`: status {:?}\nstderr:\n{}",
                    status,
                    stderr.lock().unwrap()
                );
            }
        };
        let line = line.trim_end();
        let addr = line
            .strip_prefix("listening on ")
            .unwrap_or_else(|| panic!("first stdout line is {line:?}"))
            .to_string();
        Server { child, addr, stderr, stdout }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn stderr(&self) -> String {
        self.stderr.lock().unwrap().clone()
    }

    pub fn stdout(&self) -> String {
        self.stdout.lock().unwrap().clone()
    }

    /// Poll stderr until `pred` holds (or panic after DEADLINE).
    pub fn wait_stderr(&self, what: &str, pred: impl Fn(&str) -> bool) -> String {
        let start = Instant::now();
        loop {
            let s = self.stderr();
            if pred(&s) {
                return s;
            }
            if start.elapsed() > DEADLINE {
                panic!("stderr never showed {what}; stderr:\n{s}");
            }
            thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn rss_kb(&self) -> u64 {
        rss_kb(self.pid())
    }

    /// POST a raw body; (status, body).
    pub fn post(&self, body: &str) -> (u16, String) {
        post(&self.addr, body)
    }

    /// POST `{"v":1,"action","token","payload"}` and parse the answer as JSON.
    pub fn call(&self, token: &str, action: &str, payload: Value) -> (u16, Value) {
        call(&self.addr, token, action, payload)
    }

    /// Send a signal and wait (up to `within`) for the exit.
    pub fn signal_and_wait(&mut self, sig: nix::sys::signal::Signal, within: Duration) -> ExitStatus {
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.pid() as i32), sig).unwrap();
        wait_exit(&mut self.child, within).unwrap_or_else(|| {
            panic!("server did not exit within {within:?} after {sig:?}; stderr:\n{}", self.stderr())
        })
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Poll `try_wait` until the child exits or `within` elapses.
pub fn wait_exit(child: &mut Child, within: Duration) -> Option<ExitStatus> {
    let start = Instant::now();
    loop {
        if let Some(st) = child.try_wait().unwrap() {
            return Some(st);
        }
        if start.elapsed() > within {
            return None;
        }
        thread::sleep(Duration::from_millis(10));
    }
}

/// Run the binary to completion (killed after DEADLINE): (exit code, stdout, stderr).
pub fn run(args: &[&str], cwd: &Path, env: &[(&str, &str)]) -> (i32, String, String) {
    let mut sp = spawn(args, cwd, env);
    let st = wait_exit(&mut sp.child, DEADLINE);
    if st.is_none() {
        let _ = sp.child.kill();
        let _ = sp.child.wait();
        panic!("`aion-connector {}` did not exit; stderr:\n{}", args.join(" "), sp.stderr.lock().unwrap());
    }
    // the pipes are closed once the child is gone; let the drains finish
    let out = drained(&sp.stdout);
    let err = drained(&sp.stderr);
    (st.unwrap().code().unwrap_or(-1), out, err)
}

/// Read a drained buffer after the writer exited: wait (briefly) until the
/// drain thread, which holds the only other reference, has finished.
pub fn drained(buf: &Arc<Mutex<String>>) -> String {
    let start = Instant::now();
    while Arc::strong_count(buf) > 1 && start.elapsed() < Duration::from_secs(2) {
        thread::sleep(Duration::from_millis(5));
    }
    buf.lock().unwrap().clone()
}

// ---------------------------------------------------------------- HTTP client

#[derive(Debug)]
pub struct Response {
    pub status: u16,
    /// Status line and header lines, as received (without the final CRLF).
    pub head: String,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Response {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(k, _)| k.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
    }
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("answer is not JSON ({e}): {:?}", self.text()))
    }
}

pub fn connect(addr: &str) -> TcpStream {
    let s = TcpStream::connect(addr).unwrap_or_else(|e| panic!("connect {addr}: {e}"));
    s.set_read_timeout(Some(DEADLINE)).unwrap();
    s.set_write_timeout(Some(DEADLINE)).unwrap();
    s
}

fn read_line_crlf(r: &mut impl BufRead) -> io::Result<String> {
    let mut line = Vec::new();
    let n = r.read_until(b'\n', &mut line)?;
    if n == 0 {
        return Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            "connection closed before a complete response",
        ));
    }
    while line.last() == Some(&b'\n') || line.last() == Some(&b'\r') {
        line.pop();
    }
    Ok(String::from_utf8_lossy(&line).into_owned())
}

/// Read the status line and headers (a 1xx interim answer is returned as is).
pub fn read_head(r: &mut impl BufRead) -> io::Result<Response> {
    let status_line = read_line_crlf(r)?;
    let mut parts = status_line.splitn(3, ' ');
    let version = parts.next().unwrap_or("");
    if !version.starts_with("HTTP/1.") {
        return Err(io::Error::new(io::ErrorKind::InvalidData, format!("bad status line {status_line:?}")));
    }
    let status: u16 = parts
        .next()
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, status_line.clone()))?;
    let mut head = status_line.clone();
    let mut headers = Vec::new();
    loop {
        let line = read_line_crlf(r)?;
        if line.is_empty() {
            break;
        }
        head.push_str("\r\n");
        head.push_str(&line);
        if let Some((k, v)) = line.split_once(':') {
            headers.push((k.trim().to_string(), v.trim().to_string()));
        }
    }
    Ok(Response { status, head, headers, body: Vec::new() })
}

/// Read one complete response (head and body: Content-Length, chunked, or
/// until EOF).
pub fn read_response(r: &mut impl BufRead) -> io::Result<Response> {
    let mut resp = read_head(r)?;
    if (100..200).contains(&resp.status) {
        return Ok(resp);
    }
    let chunked =
        resp.header("transfer-encoding").is_some_and(|v| v.to_ascii_lowercase().contains("chunked"));
    if chunked {
        loop {
            let size_line = read_line_crlf(r)?;
            let size_hex = size_line.split(';').next().unwrap().trim();
            let size = usize::from_str_radix(size_hex, 16)
                .map_err(|_| io::Error::new(io::ErrorKind::InvalidData, size_line.clone()))?;
            if size == 0 {
                // trailers
                while !read_line_crlf(r)?.is_empty() {}
                break;
            }
            let mut chunk = vec![0u8; size];
            r.read_exact(&mut chunk)?;
            resp.body.extend_from_slice(&chunk);
            read_line_crlf(r)?;
        }
    } else if let Some(len) = resp.header("content-length") {
        let len: usize =
            len.parse().map_err(|_| io::Error::new(io::ErrorKind::InvalidData, "bad content-length"))?;
        let mut body = vec![0u8; len];
        r.read_exact(&mut body)?;
        resp.body = body;
    } else {
        r.read_to_end(&mut resp.body)?;
    }
    Ok(resp)
}

/// A complete POST request (keep-alive unless `close`).
pub fn post_request(addr: &str, body: &str, close: bool) -> Vec<u8> {
    format!(
        "POST / HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n{}\r\n{body}",
        body.len(),
        if close { "Connection: close\r\n" } else { "" }
    )
    .into_bytes()
}

/// Write raw bytes on a fresh connection and read one response.
pub fn raw(addr: &str, bytes: &[u8]) -> io::Result<Response> {
    let mut s = connect(addr);
    s.write_all(bytes)?;
    let mut r = BufReader::new(s);
    read_response(&mut r)
}

/// POST `body` to `/` on a fresh connection (Connection: close).
pub fn post(addr: &str, body: &str) -> (u16, String) {
    let resp = raw(addr, &post_request(addr, body, true)).unwrap_or_else(|e| panic!("POST {body:.200}: {e}"));
    (resp.status, resp.text())
}

pub fn request_body(token: &str, action: &str, payload: Value) -> String {
    json!({"v": 1, "action": action, "token": token, "payload": payload}).to_string()
}

pub fn call(addr: &str, token: &str, action: &str, payload: Value) -> (u16, Value) {
    let (status, body) = post(addr, &request_body(token, action, payload));
    let v = serde_json::from_str(&body)
        .unwrap_or_else(|e| panic!("{action}: answer is not JSON ({e}): {body:?}"));
    (status, v)
}

// ---------------------------------------------------------------- processes

/// Run real git in `dir` with a fixed identity and default branch; panics
/// with stderr on failure; returns trimmed stdout.
pub fn git(dir: &Path, args: &[&str]) -> String {
    let out = Command::new("git")
        .args([
            "-c",
            "user.name=t",
            "-c",
            "user.email=t@t",
            "-c",
            "init.defaultBranch=main",
            "-c",
            "commit.gpgsign=false",
        ])
        .args(args)
        .current_dir(dir)
        .env("GIT_TERMINAL_PROMPT", "0")
        .stdin(Stdio::null())
        .output()
        .expect("run git");
    if !out.status.success() {
        panic!(
            "git {} in {} failed: {}\n{}",
            args.join(" "),
            dir.display(),
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// VmRSS of a process in kB.
pub fn rss_kb(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS in /proc/PID/status")
}

/// Poll `f` until it returns Some, or panic with `what` after DEADLINE.
pub fn poll<T>(what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let start = Instant::now();
    loop {
        if let Some(v) = f() {
            return v;
        }
        if start.elapsed() > DEADLINE {
            panic!("timed out waiting for {what}");
        }
        thread::sleep(Duration::from_millis(20));
    }
}

/// All `path` values of a files.tree answer, depth first.
pub fn tree_paths(tree: &Value) -> Vec<String> {
    let mut out = Vec::new();
    fn walk(nodes: &Value, out: &mut Vec<String>) {
        for n in nodes.as_array().expect("tree is an array") {
            out.push(n["path"].as_str().expect("node path").to_string());
            if n["type"] == "dir" {
                walk(&n["children"], out);
            }
        }
    }
    walk(tree, &mut out);
    out
}

// ---------------------------------------------------------------- agent runs

/// The fake platform's record of one POST it received.
#[derive(Clone, Debug)]
pub struct Post {
    pub path: String,
    pub signature: Option<String>,
    pub content_type: Option<String>,
    pub body: Vec<u8>,
    /// What the platform answered.
    pub status: u16,
}

impl Post {
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| {
            panic!("post body is not JSON ({e}): {}", String::from_utf8_lossy(&self.body))
        })
    }
    pub fn seq(&self) -> u64 {
        self.json()["seq"].as_u64().unwrap_or_else(|| panic!("post without seq: {:?}", self.json()))
    }
    pub fn closes(&self) -> bool {
        self.path.ends_with("/internal/agent-complete") || self.path.ends_with("/internal/agent-error")
    }
}

/// How the fake platform answers; shared with its thread.
#[derive(Default)]
struct PlatformRules {
    /// Answer 503 to this many requests first.
    fail_first: usize,
    /// Answer 400 to every post whose body has this seq.
    reject_seq: Option<u64>,
}

/// A fake platform (callback server) on 127.0.0.1, tiny_http in a thread,
/// recording every POST (path, X-Aion-Signature, Content-Type, body, answer).
pub struct Platform {
    pub port: u16,
    posts: Arc<Mutex<Vec<Post>>>,
    rules: Arc<Mutex<PlatformRules>>,
    stop: Arc<std::sync::atomic::AtomicBool>,
    thread: Option<thread::JoinHandle<()>>,
}

impl Platform {
    /// On an ephemeral port.
    pub fn start() -> Platform {
        Platform::start_on(0)
    }

    /// On `port` (0: ephemeral); retries a moment if the port is still busy.
    pub fn start_on(port: u16) -> Platform {
        Platform::start_with(port, 0, None)
    }

    /// Answers 503 to the first `fail_first` requests and 400 to posts with `reject_seq`.
    pub fn start_with(port: u16, fail_first: usize, reject_seq: Option<u64>) -> Platform {
        let started = Instant::now();
        let server = loop {
            match tiny_http::Server::http(("127.0.0.1", port)) {
                Ok(s) => break s,
                Err(e) if started.elapsed() > DEADLINE => panic!("fake platform on port {port}: {e}"),
                Err(_) => thread::sleep(Duration::from_millis(50)),
            }
        };
        let port = server.server_addr().to_ip().expect("an IP listener").port();
        let posts: Arc<Mutex<Vec<Post>>> = Arc::default();
        let rules = Arc::new(Mutex::new(PlatformRules { fail_first, reject_seq }));
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let thread = {
            let (posts, rules, stop) = (posts.clone(), rules.clone(), stop.clone());
            thread::spawn(move || {
                while !stop.load(Ordering::SeqCst) {
                    let mut req = match server.recv_timeout(Duration::from_millis(50)) {
                        Ok(Some(r)) => r,
                        Ok(None) => continue,
                        Err(_) => break,
                    };
                    let header = |name: &'static str| {
                        req.headers()
                            .iter()
                            .find(|h| h.field.equiv(name))
                            .map(|h| h.value.as_str().to_string())
                    };
                    let is_post = req.method() == &tiny_http::Method::Post;
                    let signature = header("X-Aion-Signature");
                    let content_type = header("Content-Type");
                    let path = req.url().to_string();
                    let mut body = Vec::new();
                    let _ = req.as_reader().read_to_end(&mut body);
                    let status = {
                        let mut r = rules.lock().unwrap();
                        let seq = serde_json::from_slice::<Value>(&body).ok().and_then(|v| v["seq"].as_u64());
                        if r.fail_first > 0 {
                            r.fail_first -= 1;
                            503
                        } else if !is_post {
                            405
                        } else if r.reject_seq.is_some() && seq == r.reject_seq {
                            400
                        } else {
                            200
                        }
                    };
                    posts.lock().unwrap().push(Post { path, signature, content_type, body, status });
                    let _ = req.respond(tiny_http::Response::from_string("{}").with_status_code(status));
                }
            })
        };
        Platform { port, posts, rules, stop, thread: Some(thread) }
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Every request received, in arrival order.
    pub fn posts(&self) -> Vec<Post> {
        self.posts.lock().unwrap().clone()
    }

    /// The posts answered 200, in arrival order.
    pub fn delivered(&self) -> Vec<Post> {
        self.posts().into_iter().filter(|p| p.status == 200).collect()
    }

    /// The delivered posts of `session`, once its closing post is delivered
    /// (panics after `within`).
    pub fn wait_closed_within(&self, session: &str, within: Duration) -> Vec<Post> {
        let start = Instant::now();
        loop {
            let mine: Vec<Post> =
                self.delivered().into_iter().filter(|p| p.json()["sessionId"] == session).collect();
            if mine.iter().any(Post::closes) {
                return mine;
            }
            if start.elapsed() > within {
                let got: Vec<String> = self
                    .posts()
                    .iter()
                    .map(|p| format!("{} {}", p.status, String::from_utf8_lossy(&p.body)))
                    .collect();
                panic!("session {session}: no closing post within {within:?}; received:\n{}", got.join("\n"));
            }
            thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn wait_closed(&self, session: &str) -> Vec<Post> {
        self.wait_closed_within(session, DEADLINE)
    }

    /// Stops listening (the port is free again once this returns).
    pub fn stop(mut self) {
        self.shutdown();
    }

    fn shutdown(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for Platform {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// A port on 127.0.0.1 that was free a moment ago (for a platform that is "down" first).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// `sha256=<hex HMAC-SHA256(key, body)>`.
pub fn hmac_sha256(key: &str, body: &[u8]) -> String {
    use hmac::{Hmac, KeyInit, Mac};
    let mut mac = <Hmac<sha2::Sha256> as KeyInit>::new_from_slice(key.as_bytes()).unwrap();
    mac.update(body);
    let hex: String = mac.finalize().into_bytes().iter().map(|b| format!("{b:02x}")).collect();
    format!("sha256={hex}")
}

/// Checks what every post of a run must be: signed with `key`, JSON, at the
/// path of its kind, seq 0.. without gaps or repeats, exactly one closing post,
/// last. Returns the bodies.
pub fn check_run(posts: &[Post], key: &str) -> Vec<Value> {
    let mut bodies = Vec::new();
    for (i, p) in posts.iter().enumerate() {
        assert_eq!(p.signature.as_deref(), Some(hmac_sha256(key, &p.body).as_str()), "signature of post {i}");
        assert_eq!(p.content_type.as_deref(), Some("application/json"), "content type of post {i}");
        let v = p.json();
        assert_eq!(v["seq"].as_u64(), Some(i as u64), "post {i} out of order: {v}");
        let kind = p.path.rsplit('/').next().unwrap();
        assert!(
            ["agent-stream", "agent-complete", "agent-error"].contains(&kind)
                && p.path.ends_with(&format!("/internal/{kind}")),
            "path {}",
            p.path
        );
        assert_eq!(p.closes(), i + 1 == posts.len(), "post {i} ({}) closes out of place", p.path);
        bodies.push(v);
    }
    assert!(posts.last().is_some_and(Post::closes), "the run was not closed");
    bodies
}

/// A temp bin dir holding the fake acpx (as `acpx`).
pub fn fake_acpx_bin(dir: &Path) -> PathBuf {
    let bin = dir.join("bin");
    std::fs::create_dir_all(&bin).unwrap();
    let fake = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/fake-acpx");
    std::os::unix::fs::symlink(&fake, bin.join("acpx")).unwrap();
    bin
}

/// `first:$PATH`.
pub fn path_with(first: &Path) -> String {
    let rest = std::env::var("PATH").unwrap_or_default();
    format!("{}:{rest}", first.display())
}

/// One invocation of the fake acpx, from its log.
#[derive(Clone, Debug)]
pub struct AcpxCall {
    pub pid: i32,
    pub pgid: i32,
    pub start_ns: u128,
    pub run_id: String,
    pub cwd: String,
    pub probe: String,
    pub argv: Vec<String>,
}

/// The fake acpx's log (empty if it does not exist yet).
pub fn acpx_calls(log: &Path) -> Vec<AcpxCall> {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    text.lines()
        .filter(|l| !l.is_empty())
        .map(|l| {
            let f: Vec<&str> = l.splitn(7, '\x1e').collect();
            assert_eq!(f.len(), 7, "bad fake acpx log line {l:?}");
            AcpxCall {
                pid: f[0].parse().unwrap(),
                pgid: f[1].parse().unwrap(),
                start_ns: f[2].parse().unwrap(),
                run_id: f[3].to_string(),
                cwd: f[4].to_string(),
                probe: f[5].to_string(),
                argv: f[6].split('\x1f').map(str::to_string).collect(),
            }
        })
        .collect()
}

/// Alive and not a zombie (Linux /proc).
pub fn alive(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .is_ok_and(|s| s.rsplit_once(") ").is_some_and(|(_, rest)| !rest.starts_with('Z')))
}

/// Live (non-zombie) processes of process group `pgid`.
pub fn group_members(pgid: i32) -> Vec<i32> {
    let Ok(entries) = std::fs::read_dir("/proc") else { return Vec::new() };
    entries
        .filter_map(Result::ok)
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| {
                s.rsplit_once(") ").is_some_and(|(_, rest)| {
                    let f: Vec<&str> = rest.split(' ').collect();
                    f.len() > 2 && f[0] != "Z" && f[2].parse::<i32>().ok() == Some(pgid)
                })
            })
        })
        .collect()
}

/// Live processes with `NAME=value` in their environment.
pub fn marked_processes(marker: &str) -> Vec<i32> {
    let me = std::process::id() as i32;
    let Ok(entries) = std::fs::read_dir("/proc") else { return Vec::new() };
    entries
        .filter_map(Result::ok)
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter(|&pid| pid != me && alive(pid))
        .filter(|pid| {
            std::fs::read(format!("/proc/{pid}/environ"))
                .is_ok_and(|env| env.split(|&b| b == 0).any(|var| var == marker.as_bytes()))
        })
        .collect()
}

/// Poll until `cond` holds or `within` passes; whether it held.
pub fn eventually(within: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let start = Instant::now();
    loop {
        if cond() {
            return true;
        }
        if start.elapsed() > within {
            return false;
        }
        thread::sleep(Duration::from_millis(20));
    }
}

// ---------------------------------------------------------------- WebSocket terminal

impl Server {
    /// Like `start`, with extra environment variables for the server (and so
    /// for the shells of its terminals).
    pub fn start_env(dir: &Path, cfg: &str, env: &[(&str, &str)]) -> Server {
        let path = dir.join("aion.config.json");
        std::fs::write(&path, cfg).unwrap();
        Server::start_args(&[path.to_str().unwrap()], dir, env)
    }
}

/// The RFC 6455 sample key.
pub const WS_KEY: &str = "dGhlIHNhbXBsZSBub25jZQ==";

/// A raw `GET target` upgrade request; `headers` ("Name: value" lines)
/// replace the usual Upgrade / Connection / Sec-WebSocket-* headers when given.
pub fn ws_upgrade_request(addr: &str, target: &str, headers: Option<&[&str]>) -> Vec<u8> {
    let default = [
        "Upgrade: websocket".to_string(),
        "Connection: Upgrade".to_string(),
        "Sec-WebSocket-Version: 13".to_string(),
        format!("Sec-WebSocket-Key: {WS_KEY}"),
    ];
    let lines: Vec<String> = match headers {
        Some(h) => h.iter().map(|s| s.to_string()).collect(),
        None => default.to_vec(),
    };
    let mut req = format!("GET {target} HTTP/1.1\r\nHost: {addr}\r\n");
    for l in lines {
        req.push_str(&l);
        req.push_str("\r\n");
    }
    req.push_str("\r\n");
    req.into_bytes()
}

/// A WebSocket client on a terminal: tungstenite over a std TcpStream, with
/// the terminal output received so far (binary and text frames together).
pub struct Ws {
    pub ws: tungstenite::WebSocket<TcpStream>,
    /// Output received (the oldest part may be cut away in a flood, see `pump`).
    pub out: Vec<u8>,
    /// Where the next `expect` starts searching in `out`.
    cursor: usize,
    pub text_frames: usize,
    pub binary_frames: usize,
    /// Data frames received, in order, with their sizes (first few only).
    pub first_frames: Vec<(bool, usize)>,
    /// Pings received from the server (answered by tungstenite).
    pub pings: usize,
    /// The close code received (Some(None): a close frame without a code).
    pub close: Option<Option<u16>>,
    /// The connection ended (EOF or error after or without a close frame).
    pub eof: bool,
}

/// Opens `ws://addr{target}`; Err describes a refused handshake
/// ("HTTP 403 {body}") or another failure.
pub fn ws_try_connect(addr: &str, target: &str) -> Result<Ws, String> {
    let stream = connect(addr);
    let url = format!("ws://{addr}{target}");
    match tungstenite::client(url.as_str(), stream) {
        Ok((ws, resp)) => {
            assert_eq!(resp.status().as_u16(), 101);
            Ok(Ws {
                ws,
                out: Vec::new(),
                cursor: 0,
                text_frames: 0,
                binary_frames: 0,
                first_frames: Vec::new(),
                pings: 0,
                close: None,
                eof: false,
            })
        }
        Err(tungstenite::HandshakeError::Failure(tungstenite::Error::Http(resp))) => {
            let body = resp.body().as_deref().map(String::from_utf8_lossy).unwrap_or_default().into_owned();
            Err(format!("HTTP {} {body}", resp.status().as_u16()))
        }
        Err(e) => Err(format!("handshake failed: {e}")),
    }
}

pub fn ws_connect(addr: &str, target: &str) -> Ws {
    ws_try_connect(addr, target).unwrap_or_else(|e| panic!("websocket {target}: {e}"))
}

/// Keep at most this much output in memory (floods).
const WS_KEEP: usize = 4 << 20;

impl Ws {
    /// Reads one message, waiting at most `wait`; false if nothing came (or
    /// the connection is over).
    pub fn pump(&mut self, wait: Duration) -> bool {
        use tungstenite::{Error, Message};
        if self.eof {
            return false;
        }
        let _ = self.ws.get_mut().set_read_timeout(Some(wait.max(Duration::from_millis(1))));
        match self.ws.read() {
            Ok(Message::Binary(b)) => {
                self.binary_frames += 1;
                self.data(false, &b);
            }
            Ok(Message::Text(t)) => {
                self.text_frames += 1;
                self.data(true, t.as_bytes());
            }
            Ok(Message::Close(frame)) => self.close = Some(frame.map(|f| u16::from(f.code))),
            Ok(Message::Ping(_)) => self.pings += 1,
            Ok(_) => {}
            Err(Error::Io(e)) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut) => {
                return false;
            }
            Err(_) => {
                self.eof = true;
                return false;
            }
        }
        true
    }

    fn data(&mut self, text: bool, bytes: &[u8]) {
        if self.first_frames.len() < 16 {
            self.first_frames.push((text, bytes.len()));
        }
        self.out.extend_from_slice(bytes);
        if self.out.len() > WS_KEEP {
            let cut = self.out.len() - WS_KEEP / 4;
            self.out.drain(..cut);
            self.cursor = self.cursor.saturating_sub(cut);
        }
    }

    /// Where the last `expect` matched (the end of the match) in `out`.
    pub fn cursor(&self) -> usize {
        self.cursor
    }

    /// The output after the cursor, lossily decoded (for messages).
    pub fn pending_text(&self) -> String {
        let tail = &self.out[self.cursor.min(self.out.len())..];
        let tail = &tail[tail.len().saturating_sub(4000)..];
        String::from_utf8_lossy(tail).into_owned()
    }

    /// Reads until `pat` shows up after the cursor (then the cursor moves past
    /// it); panics after `within` with what was received.
    pub fn expect_within(&mut self, pat: &str, within: Duration) {
        if !self.seen_within(pat, within) {
            panic!(
                "websocket output never showed {pat:?} within {within:?} (eof={}, close={:?}); received:\n{}",
                self.eof,
                self.close,
                self.pending_text()
            );
        }
    }

    /// Like `expect_within`, false instead of a panic.
    pub fn seen_within(&mut self, pat: &str, within: Duration) -> bool {
        let start = Instant::now();
        let pat_b = pat.as_bytes();
        let mut from = self.cursor;
        loop {
            let hay = &self.out[from.min(self.out.len())..];
            if let Some(i) = hay.windows(pat_b.len()).position(|w| w == pat_b) {
                self.cursor = from + i + pat_b.len();
                return true;
            }
            from = self.out.len().saturating_sub(pat_b.len()).max(self.cursor);
            let left = within.saturating_sub(start.elapsed());
            if left.is_zero() || self.eof {
                return false;
            }
            let before = self.out.len();
            self.pump(left.min(Duration::from_millis(200)));
            // a flood cut the buffer: keep scanning from its new start
            if self.out.len() < before {
                from = self.cursor;
            }
        }
    }

    pub fn expect(&mut self, pat: &str) {
        self.expect_within(pat, DEADLINE)
    }

    /// Reads until `prefix` and then a line end; the text in between.
    pub fn expect_value(&mut self, prefix: &str) -> String {
        self.expect(prefix);
        let start = self.cursor;
        let end = poll_ws(self, &format!("the end of the line after {prefix:?}"), |w| {
            w.out[start..].iter().position(|&b| b == b'\r' || b == b'\n').map(|i| start + i)
        });
        self.cursor = end;
        String::from_utf8_lossy(&self.out[start..end]).into_owned()
    }

    /// The shell's pid (`$$`), asked with a marker built from `tag`.
    pub fn shell_pid(&mut self, tag: &str) -> i32 {
        self.send_text(&format!("echo {tag}-$((40+2))=$$\r"));
        let v = self.expect_value(&format!("{tag}-42="));
        v.trim().parse().unwrap_or_else(|_| panic!("shell pid {v:?}"))
    }

    pub fn send_text(&mut self, s: &str) {
        self.ws.send(tungstenite::Message::text(s)).expect("send a text frame");
    }

    pub fn send_binary(&mut self, b: &[u8]) {
        self.ws.send(tungstenite::Message::binary(b.to_vec())).expect("send a binary frame");
    }

    /// Reads (discarding nothing) until a close frame or EOF, at most `within`;
    /// then keeps reading briefly so the close reply goes out. The close code
    /// (None if the connection ended without a close frame).
    pub fn wait_close(&mut self, within: Duration) -> Option<u16> {
        let start = Instant::now();
        while self.close.is_none() && !self.eof {
            let left = within.saturating_sub(start.elapsed());
            if left.is_zero() {
                panic!("no close frame or EOF within {within:?}; received:\n{}", self.pending_text());
            }
            self.pump(left.min(Duration::from_millis(200)));
        }
        // Answer the close and wait for the server to end the connection.
        let until = Instant::now() + Duration::from_secs(5);
        while !self.eof && Instant::now() < until {
            self.pump(Duration::from_millis(200));
        }
        self.close.flatten()
    }

    /// A clean close from the client side (close frame, wait for the answer).
    pub fn close_clean(mut self) {
        let _ = self.ws.close(None);
        let until = Instant::now() + Duration::from_secs(5);
        while !self.eof && Instant::now() < until {
            self.pump(Duration::from_millis(200));
        }
    }

    /// Drops the TCP connection without a close frame.
    pub fn drop_tcp(self) {
        let _ = self.ws.get_ref().shutdown(std::net::Shutdown::Both);
    }
}

/// Like `poll`, pumping the socket between attempts.
fn poll_ws<T>(ws: &mut Ws, what: &str, mut f: impl FnMut(&Ws) -> Option<T>) -> T {
    let start = Instant::now();
    loop {
        if let Some(v) = f(ws) {
            return v;
        }
        if start.elapsed() > DEADLINE || ws.eof {
            panic!("timed out waiting for {what}; received:\n{}", ws.pending_text());
        }
        ws.pump(Duration::from_millis(100));
    }
}

/// The fd targets of a process (`/proc/PID/fd`), by fd number.
pub fn fd_targets(pid: i32) -> Vec<(i32, String)> {
    let mut out: Vec<(i32, String)> = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap_or_else(|e| panic!("/proc/{pid}/fd: {e}"))
        .filter_map(Result::ok)
        .filter_map(|e| {
            let fd = e.file_name().to_str()?.parse().ok()?;
            let target = std::fs::read_link(e.path()).ok()?;
            Some((fd, target.to_string_lossy().into_owned()))
        })
        .collect();
    out.sort();
    out
}

/// The parent pid of a live (or zombie) process.
pub fn ppid(pid: i32) -> Option<i32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let (_, rest) = stat.rsplit_once(") ")?;
    rest.split(' ').nth(1)?.parse().ok()
}

// ---------------------------------------------------------------- poll mode

/// One request the fake poll server received, recorded once it was read whole
/// (before it is answered), in arrival order.
#[derive(Clone, Debug)]
pub struct PollReq {
    pub at: Instant,
    pub method: String,
    pub path: String,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
    /// What the server answered.
    pub status: u16,
}

impl PollReq {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(k, _)| k.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
    }
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
    st.reqs.push(PollReq { at: Instant::now(), method, path, headers, body, status });
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
    spawn_poll_marked(args, cwd, env).0
}

/// `spawn_poll`, plus the `AION_POLL_TEST_MARK=<unique>` variable its sessions
/// inherit, by which `PollAgent`'s drop finds what is left of them.
fn spawn_poll_marked(args: &[&str], cwd: &Path, env: &[(&str, &str)]) -> (Spawned, String) {
    let mut cmd = Command::new(BIN);
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
    pub stdout: Arc<Mutex<String>>,
    pub stderr: Arc<Mutex<String>>,
    mark: String,
}

impl PollAgent {
    pub fn start(args: &[&str], cwd: &Path, env: &[(&str, &str)]) -> PollAgent {
        let (sp, mark) = spawn_poll_marked(args, cwd, env);
        PollAgent {
            child: sp.child,
            stdout: sp.stdout,
            stderr: sp.stderr,
            mark: format!("AION_POLL_TEST_MARK={mark}"),
        }
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
        for pid in marked_processes(&self.mark) {
            let _ =
                nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGKILL);
        }
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
