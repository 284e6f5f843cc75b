//! The connector's local socket: a Unix socket in the state dir speaking JSON
//! lines. Each request is one line `{"op":…, …}`, each answer one line,
//! `{"ok":true, …}` or `{"ok":false,"error":"…","kind":"…"}`; a connection
//! may carry several requests, answered in order. The `aion-connector mcp`
//! servers of the agents reach the connector here ([`Request`] names their
//! operations); the socket is the connector's, mode 0600, and each request
//! names its project and carries that project's MCP key, but for the
//! [`Unkeyed`] ones (`status`), whose authentication is being able to connect.
//! Poll mode serves [`POLL_SOCKET_FILE`] the same way, for `status` only.
//!
//! Threads: `local-accept` (started by [`serve`], owned by the [`Server`],
//! ends on [`Server::stop`]) accepts; one `local-conn-N` per connection
//! (at most [`MAX_CONNECTIONS`]) reads its lines with an idle timeout, answers
//! through the handler and ends when the peer closes or goes quiet.

use crate::logging::{error, warn};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use std::io::{self, BufRead, BufReader, ErrorKind, Read, Write};
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

/// The socket's file name in the state dir (`AION_CONNECTOR_SOCKET` of the
/// MCP servers is its absolute path).
pub const SOCKET_FILE: &str = "mcp.sock";
/// Poll mode's socket in its state dir: it answers only the [`Unkeyed`] ops
/// (a poll connector and a push one may share the default state dir).
pub const POLL_SOCKET_FILE: &str = "poll.sock";
/// The longest request line; past it the connection gets an error and is closed.
pub const MAX_REQUEST: usize = 64 << 10;
/// The longest answer line a client reads.
pub const MAX_ANSWER: usize = 4 << 20;
/// Connections served at once; past it a connection gets a `busy` answer.
pub const MAX_CONNECTIONS: usize = 64;
/// A connection silent this long between requests is closed.
const IDLE: Duration = Duration::from_secs(30);

/// One request: the project it acts for, that project's MCP key, the operation.
#[derive(Serialize, Deserialize)]
pub struct Request {
    pub project: String,
    pub key: String,
    #[serde(flatten)]
    pub op: Op,
}

/// The operations. Answers carry `process` (one background process) or
/// `processes` (a list) beside `"ok":true`.
#[derive(Serialize, Deserialize)]
#[serde(tag = "op")]
pub enum Op {
    /// Starts `sh -c COMMAND` in the project (or `cwd` inside it); answered
    /// once it has run for half a second, or sooner if it ended.
    #[serde(rename = "bg.start")]
    BgStart {
        command: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        cwd: Option<String>,
    },
    /// Status and recent output of one background process.
    #[serde(rename = "bg.check")]
    BgCheck { pid: i64 },
    /// Ends one (TERM → grace → KILL) and forgets it.
    #[serde(rename = "bg.stop")]
    BgStop { pid: i64 },
    /// The project's background processes.
    #[serde(rename = "bg.list")]
    BgList {},
    /// Shows `url` in the platform's display panel of `session` (`""` clears
    /// it): a signed post to `{callback}/internal/agent-display`.
    #[serde(rename = "display")]
    Display { session: String, callback: String, token: String, url: String },
}

impl Op {
    /// The operation's name, for log lines.
    pub fn name(&self) -> &'static str {
        match self {
            Op::BgStart { .. } => "bg.start",
            Op::BgCheck { .. } => "bg.check",
            Op::BgStop { .. } => "bg.stop",
            Op::BgList {} => "bg.list",
            Op::Display { .. } => "display",
        }
    }
}

/// The operations that carry no project and key: being able to connect to
/// the socket (mode 0600, in the connector's own state dir) is their
/// authentication.
#[derive(Serialize, Deserialize)]
#[serde(tag = "op", deny_unknown_fields)]
pub enum Unkeyed {
    /// The connector's state: runs, terminals, background processes, the
    /// outbox's backlog, leases (`aion-connector status`).
    #[serde(rename = "status")]
    Status {},
}

/// `{"ok":false,"kind":KIND,"error":MESSAGE}`.
pub fn refusal(kind: &str, message: &str) -> Value {
    json!({"ok": false, "kind": kind, "error": message})
}

/// Binds `path`, mode 0600. A stale socket file (nobody answers on it) is
/// replaced; a live one means another connector serves this state dir, and
/// anything else at `path` is left alone: both are errors.
pub fn bind(path: &Path) -> io::Result<UnixListener> {
    match std::fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_socket() => match UnixStream::connect(path) {
            Ok(_) => {
                return Err(io::Error::new(
                    ErrorKind::AddrInUse,
                    "another connector answers on this socket (one connector per state dir)",
                ));
            }
            Err(_) => std::fs::remove_file(path)?,
        },
        Ok(_) => {
            return Err(io::Error::new(ErrorKind::AlreadyExists, "exists and is not a socket; remove it"));
        }
        Err(e) if e.kind() == ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    let listener = UnixListener::bind(path)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    Ok(listener)
}

/// Turns one request line into one answer.
pub type Handler = dyn Fn(&[u8]) -> Value + Send + Sync;

/// The running socket server; [`Server::stop`] ends it.
pub struct Server {
    path: PathBuf,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

/// Serves `listener` (bound at `path`) on a `local-accept` thread.
pub fn serve(listener: UnixListener, path: &Path, handler: Arc<Handler>) -> io::Result<Server> {
    let stop = Arc::new(AtomicBool::new(false));
    let flag = Arc::clone(&stop);
    let thread = std::thread::Builder::new()
        .name("local-accept".into())
        .stack_size(128 << 10)
        .spawn(move || accept_loop(listener, &flag, handler))?;
    Ok(Server { path: path.to_path_buf(), stop, thread: Some(thread) })
}

impl Server {
    /// Stops accepting (connections already open finish their request) and
    /// removes the socket file.
    pub fn stop(mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Wakes the blocking accept; if the connect fails the thread has ended.
        let _ = UnixStream::connect(&self.path);
        if let Some(t) = self.thread.take()
            && t.join().is_err()
        {
            error!("local socket: the accept thread panicked");
        }
        let _ = std::fs::remove_file(&self.path);
    }
}

fn accept_loop(listener: UnixListener, stop: &AtomicBool, handler: Arc<Handler>) {
    let open = Arc::new(AtomicUsize::new(0));
    let next = AtomicU64::new(0);
    loop {
        let stream = match listener.accept() {
            Ok((stream, _)) => stream,
            Err(e) => {
                if stop.load(Ordering::SeqCst) {
                    return;
                }
                warn!("local socket: accept: {e}");
                std::thread::sleep(Duration::from_millis(20));
                continue;
            }
        };
        if stop.load(Ordering::SeqCst) {
            return;
        }
        if open.load(Ordering::SeqCst) >= MAX_CONNECTIONS {
            let _ = stream.set_write_timeout(Some(Duration::from_millis(100)));
            let _ = write_line(&stream, &refusal("busy", "too many connections to the connector's socket"));
            continue;
        }
        open.fetch_add(1, Ordering::SeqCst);
        let id = next.fetch_add(1, Ordering::Relaxed);
        let (count, handler) = (Arc::clone(&open), Arc::clone(&handler));
        let spawned = std::thread::Builder::new()
            .name(format!("local-conn-{id}"))
            .stack_size(256 << 10)
            .spawn(move || {
                serve_connection(stream, &*handler);
                count.fetch_sub(1, Ordering::SeqCst);
            });
        if let Err(e) = spawned {
            open.fetch_sub(1, Ordering::SeqCst);
            error!("local socket: cannot start a connection thread: {e}");
        }
    }
}

fn serve_connection(stream: UnixStream, handler: &Handler) {
    if stream.set_read_timeout(Some(IDLE)).is_err() || stream.set_write_timeout(Some(IDLE)).is_err() {
        return;
    }
    let mut reader = BufReader::new(&stream);
    loop {
        let line = match read_line(&mut reader, MAX_REQUEST) {
            Ok(Some(line)) => line,
            Ok(None) => return,
            Err(e) if e.kind() == ErrorKind::InvalidData => {
                let _ = write_line(&stream, &refusal("bad_request", &e.to_string()));
                return;
            }
            Err(_) => return,
        };
        if line.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        let answer = catch_unwind(AssertUnwindSafe(|| handler(&line))).unwrap_or_else(|_| {
            error!("local socket: a request handler panicked");
            refusal("internal", "internal error")
        });
        if write_line(&stream, &answer).is_err() {
            return;
        }
    }
}

/// One line without its `\n` (None at end of input). A line longer than `max`
/// is an `InvalidData` error.
fn read_line(reader: &mut impl BufRead, max: usize) -> io::Result<Option<Vec<u8>>> {
    let mut line = Vec::new();
    reader.by_ref().take(max as u64 + 1).read_until(b'\n', &mut line)?;
    if line.is_empty() {
        return Ok(None);
    }
    if line.last() == Some(&b'\n') {
        line.pop();
    } else if line.len() > max {
        return Err(io::Error::new(ErrorKind::InvalidData, format!("line over {max} bytes")));
    }
    Ok(Some(line))
}

fn write_line(mut stream: &UnixStream, value: &Value) -> io::Result<()> {
    let mut bytes = serde_json::to_vec(value).map_err(io::Error::other)?;
    bytes.push(b'\n');
    stream.write_all(&bytes)
}

/// A client's round trip: connects to `path`, sends `request`, reads one
/// answer line (waiting up to `timeout` for it).
pub fn call(path: &Path, request: &impl Serialize, timeout: Duration) -> io::Result<Value> {
    let stream = UnixStream::connect(path)?;
    stream.set_write_timeout(Some(Duration::from_secs(10)))?;
    stream.set_read_timeout(Some(timeout))?;
    let mut bytes = serde_json::to_vec(request).map_err(io::Error::other)?;
    bytes.push(b'\n');
    (&stream).write_all(&bytes)?;
    let mut reader = BufReader::new(&stream);
    match read_line(&mut reader, MAX_ANSWER)? {
        Some(line) => serde_json::from_slice(&line).map_err(|e| io::Error::new(ErrorKind::InvalidData, e)),
        None => {
            Err(io::Error::new(ErrorKind::UnexpectedEof, "the connector closed the connection unanswered"))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_are_flat_json_lines_with_the_op_as_a_tag() {
        let r = Request { project: "p".into(), key: "k".into(), op: Op::BgCheck { pid: 42 } };
        let v: Value = serde_json::to_value(&r).unwrap();
        assert_eq!(v, json!({"project": "p", "key": "k", "op": "bg.check", "pid": 42}));
        let back: Request =
            serde_json::from_str(r#"{"op":"bg.start","project":"p","key":"k","command":"ls"}"#).unwrap();
        assert!(matches!(back.op, Op::BgStart { ref command, cwd: None } if command == "ls"));
        assert!(serde_json::from_str::<Request>(r#"{"op":"nope","project":"p","key":"k"}"#).is_err());
    }

    #[test]
    fn a_line_over_the_cap_is_refused() {
        let mut r = BufReader::new(&b"12345\n123456\n1234"[..]);
        assert_eq!(read_line(&mut r, 5).unwrap(), Some(b"12345".to_vec()));
        assert_eq!(read_line(&mut r, 5).unwrap_err().kind(), ErrorKind::InvalidData);
        let mut r = BufReader::new(&b"1234"[..]);
        assert_eq!(read_line(&mut r, 5).unwrap(), Some(b"1234".to_vec()));
        assert_eq!(read_line(&mut r, 5).unwrap(), None);
    }
}
