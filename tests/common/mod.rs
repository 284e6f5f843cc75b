//! Shared helpers for the integration tests: a guard around the real binary, a
//! temporary directory guard, a tiny hand-written HTTP/1.1 client and a few
//! process helpers. std only (plus the crate's own serde_json / nix).
#![allow(dead_code)]

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
