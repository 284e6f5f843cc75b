//! The HTTP/1.1 server on the public port: our own `std::net` accept loop, one
//! thread per connection up to a cap, read/idle/write timeouts, a cap on the
//! request head and body, keep-alive and pipelining, `Expect: 100-continue`,
//! Content-Length and chunked request bodies. Requests are parsed with
//! `httparse`. Every request that arrives gets an answer: limits give a JSON
//! error, a panicking handler gives a 500. (tiny_http was measured unfit for a
//! public port; see the README.)

use crate::config::Limits;
use crate::logging::{error, warn};
use crate::shutdown::Shutdown;
use nix::poll::{PollFd, PollFlags, PollTimeout};
use std::collections::HashMap;
use std::io::{self, ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::{AsFd, AsRawFd, RawFd};
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// One parsed request with its whole body.
pub struct Request {
    pub method: String,
    pub target: String,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
    pub peer: SocketAddr,
}

impl Request {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(k, _)| k.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
    }
}

/// A JSON answer, or a stream of NDJSON lines sent chunked as they come.
pub struct Response {
    pub status: u16,
    pub body: Vec<u8>,
    /// When set, the answer is `application/x-ndjson`, chunked, one chunk per
    /// line received, ended when the sender is dropped. The connection thread
    /// owns this receiver; if the client goes away it is dropped, which the
    /// sender sees.
    pub lines: Option<crossbeam_channel::Receiver<Vec<u8>>>,
    /// When set, nothing is written: the connection (after its request) is
    /// handed to this, on the connection's thread (the WebSocket terminal).
    pub upgrade: Option<Upgrade>,
}

pub type Upgrade = Box<dyn FnOnce(TcpStream) + Send>;

impl Response {
    pub fn json(status: u16, body: &impl serde::Serialize) -> Response {
        Response {
            status,
            body: serde_json::to_vec(body).expect("answers serialize"),
            lines: None,
            upgrade: None,
        }
    }

    pub fn ndjson(lines: crossbeam_channel::Receiver<Vec<u8>>) -> Response {
        Response { status: 200, body: Vec::new(), lines: Some(lines), upgrade: None }
    }

    pub fn upgrade(take_over: Upgrade) -> Response {
        Response { status: 101, body: Vec::new(), lines: None, upgrade: Some(take_over) }
    }

    /// `{"error":"<reason>"}`, byte for byte.
    pub fn error(status: u16, reason: &str) -> Response {
        Response::json(status, &serde_json::json!({ "error": reason }))
    }
}

pub trait Handler: Send + Sync + 'static {
    fn handle(&self, req: &Request) -> Response;
}

/// Connection bookkeeping shared by the accept loop and the connection threads.
struct Shared {
    limits: Limits,
    shutdown: Arc<Shutdown>,
    handler: Arc<dyn Handler>,
    open: AtomicUsize,
    next_id: AtomicU64,
    /// Connections waiting for the first byte of their next request, by id.
    /// Shutdown cuts their read side so they end at once; a connection
    /// removes itself before it closes, so an fd here is always still its own.
    idle: Mutex<HashMap<u64, RawFd>>,
}

/// Serves until shutdown is requested, then waits (bounded) for open requests.
pub fn serve(
    listener: TcpListener,
    limits: Limits,
    shutdown: Arc<Shutdown>,
    handler: Arc<dyn Handler>,
    on_shutdown: impl FnOnce(),
) -> io::Result<()> {
    listener.set_nonblocking(true)?;
    let shared = Arc::new(Shared {
        limits,
        shutdown,
        handler,
        open: AtomicUsize::new(0),
        next_id: AtomicU64::new(0),
        idle: Mutex::new(HashMap::new()),
    });
    let mut last_accept_error: Option<Instant> = None;
    while !shared.shutdown.requested() {
        let mut fds = [
            PollFd::new(listener.as_fd(), PollFlags::POLLIN),
            PollFd::new(shared.shutdown.wake_rx.as_fd(), PollFlags::POLLIN),
        ];
        match nix::poll::poll(&mut fds, PollTimeout::NONE) {
            Ok(_) | Err(nix::errno::Errno::EINTR) => {}
            Err(e) => return Err(e.into()),
        }
        loop {
            match listener.accept() {
                Ok((stream, peer)) => accept(&shared, stream, peer),
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                Err(e) => {
                    // EMFILE and friends: say so (at most once a second), give the
                    // system a moment, keep serving the connections we have.
                    if last_accept_error.is_none_or(|t| t.elapsed() > Duration::from_secs(1)) {
                        warn!("accept: {e}");
                        last_accept_error = Some(Instant::now());
                    }
                    std::thread::sleep(Duration::from_millis(20));
                    break;
                }
            }
        }
    }
    drop(listener);
    // Long answers (live runs) end when their runs are stopped.
    on_shutdown();
    // Idle keep-alive connections end now; busy ones finish their request.
    for (_, fd) in shared.idle.lock().unwrap_or_else(|p| p.into_inner()).drain() {
        let _ = nix::sys::socket::shutdown(fd, nix::sys::socket::Shutdown::Read);
    }
    let deadline = Instant::now() + shared.limits.shutdown;
    while shared.open.load(Ordering::SeqCst) > 0 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(5));
    }
    let left = shared.open.load(Ordering::SeqCst);
    if left > 0 {
        warn!("{left} connection(s) still busy after {:?}; leaving them", shared.limits.shutdown);
    }
    Ok(())
}

fn accept(shared: &Arc<Shared>, stream: TcpStream, peer: SocketAddr) {
    if shared.open.load(Ordering::SeqCst) >= shared.limits.connections {
        refuse(stream, "too many connections");
        return;
    }
    shared.open.fetch_add(1, Ordering::SeqCst);
    crate::metrics::connections(1);
    let worker = Arc::clone(shared);
    let id = shared.next_id.fetch_add(1, Ordering::Relaxed);
    let spawned =
        std::thread::Builder::new().name(format!("conn-{id}")).stack_size(512 << 10).spawn(move || {
            let _open = OpenGuard(&worker.open);
            let mut conn = Conn { stream, buf: Vec::new(), peer, id, shared: &worker };
            conn.serve();
        });
    if let Err(e) = spawned {
        shared.open.fetch_sub(1, Ordering::SeqCst);
        crate::metrics::connections(-1);
        error!("cannot start a connection thread: {e}");
    }
}

/// Over the cap: one 503 written without blocking, then close.
fn refuse(stream: TcpStream, reason: &str) {
    let _ = stream.set_nonblocking(true);
    let resp = Response::error(503, reason);
    let _ = (&stream).write_all(&encode(&resp, false));
    let _ = stream.shutdown(std::net::Shutdown::Write);
}

struct OpenGuard<'a>(&'a AtomicUsize);

impl Drop for OpenGuard<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
        crate::metrics::connections(-1);
    }
}

/// Why reading a request stopped.
enum Stop {
    /// The peer closed, the idle time ran out, or shutdown came between requests.
    Quiet,
    /// The socket failed mid-request; nobody is left to answer.
    Broken,
    /// Answer with this error, then close.
    Reject(u16, &'static str),
}

impl From<io::Error> for Stop {
    fn from(e: io::Error) -> Stop {
        match e.kind() {
            ErrorKind::WouldBlock | ErrorKind::TimedOut => Stop::Reject(408, "request timeout"),
            _ => Stop::Broken,
        }
    }
}

struct Conn<'a> {
    stream: TcpStream,
    /// Bytes read but not yet consumed (a pipelined request may follow).
    buf: Vec<u8>,
    peer: SocketAddr,
    id: u64,
    shared: &'a Shared,
}

impl Conn<'_> {
    fn serve(&mut self) {
        let _ = self.stream.set_nonblocking(false);
        let _ = self.stream.set_nodelay(true);
        let _ = self.stream.set_write_timeout(Some(Duration::from_secs(30)));
        loop {
            let (req, keep_alive) = match self.read_request() {
                Ok(r) => r,
                Err(Stop::Quiet | Stop::Broken) => return,
                Err(Stop::Reject(status, reason)) => {
                    if status != 408 || !self.buf.is_empty() {
                        warn!("http status={status} peer={} ({reason})", self.peer);
                    }
                    let _ = self.stream.write_all(&encode(&Response::error(status, reason), false));
                    self.linger();
                    return;
                }
            };
            let resp = match catch_unwind(AssertUnwindSafe(|| self.shared.handler.handle(&req))) {
                Ok(resp) => resp,
                Err(_) => {
                    error!("handler panicked on a request from {}", self.peer);
                    Response::error(500, "internal error")
                }
            };
            if let Some(take_over) = resp.upgrade {
                if let Ok(stream) = self.stream.try_clone() {
                    let _ = self.stream.set_read_timeout(None);
                    take_over(stream);
                }
                return;
            }
            let keep_alive = keep_alive && !self.shared.shutdown.requested();
            let written = match resp.lines {
                Some(ref lines) => self.stream_lines(lines),
                None => self.stream.write_all(&encode(&resp, keep_alive)),
            };
            if written.is_err() || !keep_alive {
                let _ = self.stream.shutdown(std::net::Shutdown::Write);
                return;
            }
            if self.buf.is_empty() {
                self.buf = Vec::new(); // an idle connection holds no buffer
            }
        }
    }

    /// A chunked NDJSON answer, one chunk per line, as the lines come. The
    /// connection stays usable afterwards.
    fn stream_lines(&mut self, lines: &crossbeam_channel::Receiver<Vec<u8>>) -> io::Result<()> {
        self.stream.write_all(
            b"HTTP/1.1 200 OK\r\nContent-Type: application/x-ndjson\r\nTransfer-Encoding: chunked\r\nCache-Control: no-cache\r\n\r\n",
        )?;
        for line in lines {
            let mut chunk = Vec::with_capacity(line.len() + 16);
            let _ = write!(chunk, "{:x}\r\n", line.len());
            chunk.extend_from_slice(&line);
            chunk.extend_from_slice(b"\r\n");
            self.stream.write_all(&chunk)?;
        }
        self.stream.write_all(b"0\r\n\r\n")
    }

    /// After an error answer: stop sending, then read and drop what the client is
    /// still sending for a moment, so it sees our answer instead of a reset.
    fn linger(&mut self) {
        let _ = self.stream.shutdown(std::net::Shutdown::Write);
        let deadline = Instant::now() + Duration::from_secs(2);
        let mut sink = [0u8; 16 << 10];
        while let Some(left) = deadline.checked_duration_since(Instant::now()) {
            let _ = self.stream.set_read_timeout(Some(left.max(Duration::from_millis(1))));
            match self.stream.read(&mut sink) {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    }

    /// Reads more bytes into `buf` before `deadline`. Ok(0) is end of stream.
    fn fill(&mut self, deadline: Instant) -> io::Result<usize> {
        let left = deadline.checked_duration_since(Instant::now()).ok_or(ErrorKind::TimedOut)?;
        self.stream.set_read_timeout(Some(left.max(Duration::from_millis(1))))?;
        let mut chunk = [0u8; 8 << 10];
        loop {
            match self.stream.read(&mut chunk) {
                Ok(n) => {
                    self.buf.extend_from_slice(&chunk[..n]);
                    return Ok(n);
                }
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            }
        }
    }

    /// Waits for the first byte of the next request, interruptible by shutdown.
    fn await_request(&mut self) -> Result<Instant, Stop> {
        if !self.buf.is_empty() {
            return Ok(Instant::now());
        }
        let idle = &self.shared.idle;
        idle.lock().unwrap_or_else(|p| p.into_inner()).insert(self.id, self.stream.as_raw_fd());
        let result = if self.shared.shutdown.requested() {
            Err(Stop::Quiet)
        } else {
            match self.fill(Instant::now() + self.shared.limits.idle) {
                Ok(0) | Err(_) => Err(Stop::Quiet),
                Ok(_) => Ok(Instant::now()),
            }
        };
        idle.lock().unwrap_or_else(|p| p.into_inner()).remove(&self.id);
        result
    }

    fn read_request(&mut self) -> Result<(Request, bool), Stop> {
        let started = self.await_request()?;
        let limits = &self.shared.limits;
        let deadline = started + limits.request;
        // The head.
        let (method, target, minor, headers, head_len) = loop {
            let mut slots = [httparse::EMPTY_HEADER; 64];
            let mut parsed = httparse::Request::new(&mut slots);
            match parsed.parse(&self.buf) {
                Ok(httparse::Status::Complete(len)) => {
                    let headers = parsed
                        .headers
                        .iter()
                        .map(|h| (h.name.to_string(), String::from_utf8_lossy(h.value).into_owned()))
                        .collect::<Vec<_>>();
                    let method = parsed.method.unwrap_or("").to_string();
                    let target = parsed.path.unwrap_or("/").to_string();
                    break (method, target, parsed.version.unwrap_or(1), headers, len);
                }
                Ok(httparse::Status::Partial) if self.buf.len() > limits.header_bytes => {
                    return Err(Stop::Reject(431, "headers too large"));
                }
                Ok(httparse::Status::Partial) => {}
                Err(httparse::Error::TooManyHeaders) => return Err(Stop::Reject(431, "headers too large")),
                Err(_) => return Err(Stop::Reject(400, "bad request")),
            }
            if self.fill(deadline)? == 0 {
                return Err(self.cut_short());
            }
        };
        if head_len > limits.header_bytes {
            return Err(Stop::Reject(431, "headers too large"));
        }
        self.buf.drain(..head_len);
        let mut req = Request { method, target, headers, body: Vec::new(), peer: self.peer };
        let connection = req.header("connection").unwrap_or("").to_ascii_lowercase();
        let keep_alive =
            if minor == 0 { connection.contains("keep-alive") } else { !connection.contains("close") };
        // The body.
        let chunked = req.header("transfer-encoding").map(|te| te.to_ascii_lowercase());
        let length = req.header("content-length").map(|v| v.trim().parse::<u64>());
        let expects_continue = req.header("expect").is_some_and(|v| v.eq_ignore_ascii_case("100-continue"));
        match (chunked, length) {
            (Some(_), Some(_)) => return Err(Stop::Reject(400, "bad request")),
            (Some(te), None) if te.trim() == "chunked" => {
                if expects_continue {
                    self.stream.write_all(b"HTTP/1.1 100 Continue\r\n\r\n").map_err(|_| Stop::Broken)?;
                }
                req.body = self.read_chunked(deadline)?;
            }
            (Some(_), None) => return Err(Stop::Reject(400, "bad request")),
            (None, Some(Err(_))) => return Err(Stop::Reject(400, "bad request")),
            (None, Some(Ok(n))) if n > limits.body_bytes as u64 => {
                return Err(Stop::Reject(413, "body too large"));
            }
            (None, Some(Ok(n))) => {
                let n = n as usize;
                if expects_continue && self.buf.len() < n {
                    self.stream.write_all(b"HTTP/1.1 100 Continue\r\n\r\n").map_err(|_| Stop::Broken)?;
                }
                while self.buf.len() < n {
                    if self.fill(deadline)? == 0 {
                        return Err(self.cut_short());
                    }
                }
                req.body = self.buf.drain(..n).collect();
            }
            (None, None) => {}
        }
        Ok((req, keep_alive))
    }

    /// The peer stopped sending mid-request: during shutdown that was us cutting
    /// the read side, so answer that; otherwise the peer is gone.
    fn cut_short(&self) -> Stop {
        if self.shared.shutdown.requested() { Stop::Reject(503, "shutting down") } else { Stop::Broken }
    }

    fn read_chunked(&mut self, deadline: Instant) -> Result<Vec<u8>, Stop> {
        let limit = self.shared.limits.body_bytes;
        let mut body = Vec::new();
        loop {
            let line = self.read_line(deadline)?;
            let size_text = line.split(';').next().unwrap_or("").trim();
            let size = usize::from_str_radix(size_text, 16).map_err(|_| Stop::Reject(400, "bad request"))?;
            if size == 0 {
                // Trailers, up to the empty line.
                while !self.read_line(deadline)?.is_empty() {}
                return Ok(body);
            }
            if body.len().saturating_add(size) > limit {
                return Err(Stop::Reject(413, "body too large"));
            }
            while self.buf.len() < size + 2 {
                if self.fill(deadline)? == 0 {
                    return Err(self.cut_short());
                }
            }
            if &self.buf[size..size + 2] != b"\r\n" {
                return Err(Stop::Reject(400, "bad request"));
            }
            body.extend(self.buf.drain(..size + 2).take(size));
        }
    }

    /// One CRLF-terminated line of the chunked framing (at most 4 KiB).
    fn read_line(&mut self, deadline: Instant) -> Result<String, Stop> {
        loop {
            if let Some(end) = self.buf.windows(2).position(|w| w == b"\r\n") {
                let line = String::from_utf8_lossy(&self.buf[..end]).into_owned();
                self.buf.drain(..end + 2);
                return Ok(line);
            }
            if self.buf.len() > 4096 {
                return Err(Stop::Reject(400, "bad request"));
            }
            if self.fill(deadline)? == 0 {
                return Err(self.cut_short());
            }
        }
    }
}

/// The status line, headers and body of a JSON answer as one buffer (one write).
fn encode(resp: &Response, keep_alive: bool) -> Vec<u8> {
    let mut out = Vec::with_capacity(160 + resp.body.len());
    let _ = write!(
        out,
        "HTTP/1.1 {} {}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: {}\r\n\r\n",
        resp.status,
        reason(resp.status),
        resp.body.len(),
        if keep_alive { "keep-alive" } else { "close" }
    );
    out.extend_from_slice(&resp.body);
    out
}

fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        400 => "Bad Request",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        409 => "Conflict",
        413 => "Payload Too Large",
        422 => "Unprocessable Entity",
        429 => "Too Many Requests",
        431 => "Request Header Fields Too Large",
        500 => "Internal Server Error",
        501 => "Not Implemented",
        503 => "Service Unavailable",
        504 => "Gateway Timeout",
        _ => "Unknown",
    }
}
