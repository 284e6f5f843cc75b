//! Shared helpers for the integration tests: a guard around the real binary, a
//! temporary directory guard, a tiny hand-written HTTP/1.1 client and a few
//! process helpers (std, serde_json, nix). The fakes of the other ends live in
//! their own modules: the callback platform (`platform`), the poll-mode server
//! and agent (`poll_server`), the Aion lease server (`lease_server`) and the
//! WebSocket terminal client (`ws`).

mod git_http;
pub mod lease_server;
mod platform;
mod poll_server;
mod ws;

pub use git_http::*;
pub use platform::*;
pub use poll_server::*;
pub use ws::*;

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

// ---------------------------------------------------------------- skipping

/// With `AION_TEST_REQUIRE_ALL=1` (as CI sets it) a test that cannot run here
/// fails instead of skipping.
pub const REQUIRE_ALL: &str = "AION_TEST_REQUIRE_ALL";

/// For a test whose tools cannot be had here (a browser only root can
/// install, no npm, no network, ...): says that it is skipped and why, on the
/// process's own stderr, which libtest does not capture, so that the line
/// shows in plain `cargo test` output. The test returns after it. Under
/// `AION_TEST_REQUIRE_ALL=1` it panics instead: there, a skip is a failure.
pub fn skip(test: &str, why: &str) {
    let why = why.trim_end();
    if std::env::var(REQUIRE_ALL).is_ok_and(|v| v == "1") {
        panic!("{test} cannot run here ({REQUIRE_ALL}=1 makes that a failure): {why}");
    }
    let msg = format!("\nSKIPPED {test}: {why}\n(set {REQUIRE_ALL}=1 to make a skip fail)\n\n");
    let _ = io::stderr().write_all(msg.as_bytes());
}

// ---------------------------------------------------------------- TempDir

pub(crate) static COUNTER: AtomicU64 = AtomicU64::new(0);

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

/// A fresh repository at `path` (created if missing) with `files` (and
/// whatever is already there) committed as `init` on `main`.
pub fn repo_with(path: &Path, files: &[(&str, &str)]) {
    std::fs::create_dir_all(path).unwrap();
    git(path, &["init", "-q"]);
    for (name, content) in files {
        write(path.join(name), content);
    }
    git(path, &["add", "-A"]);
    git(path, &["commit", "-qm", "init"]);
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
pub fn poll<T>(what: &str, f: impl FnMut() -> Option<T>) -> T {
    poll_within(DEADLINE, what, f)
}

/// `poll` with its own deadline.
pub fn poll_within<T>(within: Duration, what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let start = Instant::now();
    loop {
        if let Some(v) = f() {
            return v;
        }
        if start.elapsed() > within {
            panic!("timed out after {within:?} waiting for {what}");
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

/// `PID: N` in a text (as the MCP tools `run_background` and co. print it).
pub fn pid_of(text: &str) -> i32 {
    text.lines()
        .find_map(|l| l.strip_prefix("PID: "))
        .and_then(|p| p.trim().parse().ok())
        .unwrap_or_else(|| panic!("no PID in {text:?}"))
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

/// SIGKILL to every live process with `NAME=value` (`marker`) in its
/// environment: what a test's children left behind.
pub fn kill_marked(marker: &str) {
    for pid in marked_processes(marker) {
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGKILL);
    }
}

/// The connector-instance mark a process carries (`AION_CONNECTOR=…`, the
/// whole `NAME=value` entry, as `marked_processes` takes it), if any.
pub fn instance_mark(pid: i32) -> Option<String> {
    let env = std::fs::read(format!("/proc/{pid}/environ")).ok()?;
    env.split(|&b| b == 0)
        .find(|var| var.starts_with(b"AION_CONNECTOR="))
        .map(|var| String::from_utf8_lossy(var).into_owned())
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

/// `sha256=<hex HMAC-SHA256(key, body)>`.
pub fn hmac_sha256(key: &str, body: &[u8]) -> String {
    use hmac::{Hmac, KeyInit, Mac};
    let mut mac = <Hmac<sha2::Sha256> as KeyInit>::new_from_slice(key.as_bytes()).unwrap();
    mac.update(body);
    let hex: String = mac.finalize().into_bytes().iter().map(|b| format!("{b:02x}")).collect();
    format!("sha256={hex}")
}
