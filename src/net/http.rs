//! The HTTP/1.1 server on the public port: our own `std::net` accept loop on
//! `epoll`, keep-alive and pipelining, `Expect: 100-continue`, Content-Length
//! and chunked request bodies with strict framing (RFC 9112: a duplicate or
//! non-numeric Content-Length, Content-Length beside Transfer-Encoding, or any
//! Transfer-Encoding but a single `chunked` is a 400 and the connection is
//! closed). Requests are parsed with `httparse`. Every request that arrives
//! gets an answer: limits give a JSON error, a panicking handler gives a 500.
//! (tiny_http was measured unfit for a public port; see the README.)
//!
//! Fairness: a connection costs a thread only while it has a request. Until
//! then it waits in the poll thread, which also enforces
//! - the total cap (`limits.connections`, lowered at start to what the
//!   open-file limit allows): at the cap a new connection takes the place of
//!   the oldest one that has not yet made an authenticated request, or gets a
//!   503 when there is none;
//! - the per-peer cap (`limits.connectionsPerPeer`, per IP address; loopback
//!   peers are exempt unless `limits.loopbackExempt` is false): a 429;
//! - the head timeout (`limits.headSeconds`): a connection that has not yet
//!   made an authenticated request must deliver a complete request head that
//!   soon after it connected (or after its last answer); one whose request
//!   proved a project's token keeps the idle timeout (`limits.idleSeconds`)
//!   between requests. A head that has begun must be complete within
//!   `limits.requestSeconds`. A late head gets a 408, a silent connection is
//!   closed.
//!
//! Threads:
//! - the poll thread is the caller of [`serve`] (push mode's main thread). It
//!   accepts, applies the caps and timeouts, reads request heads without
//!   blocking, hands each complete head to a worker, drains connections after
//!   an error answer, and returns at shutdown once the workers are done (or
//!   `limits.shutdownSeconds` is over).
//! - `http-worker` threads serve one connection at a time: the body, the
//!   handler, the answer in one `write`, then the next request if it comes
//!   within [`LINGER`]; after that the connection goes back to the poll thread.
//!   A worker is started when every worker is busy (so at most one per open
//!   connection) and ends after [`WORKER_IDLE`] without work or with the
//!   process. A WebSocket upgrade runs its terminal on the worker.
//!
//! TLS ([`crate::net::tls`], when the config has a `tls` section): each
//! accepted connection gets its rustls session at once; the poll thread
//! checks its first byte (plain HTTP gets a plain 400 saying to use
//! `https://`, then the drain) and drives the handshake with its
//! non-blocking reads, within the same head timeout as a request head.
//! Workers read and write through the session blocking, as over TCP.
//! Decrypted bytes rustls still holds when a connection is parked are not
//! visible to `epoll`: such a connection is read again at once.

#[cfg(not(any(target_os = "linux", target_os = "android")))]
use super::epoll_compat::{Epoll, EpollCreateFlags, EpollEvent, EpollFlags, EpollTimeout};
use crate::config::Limits;
use crate::logging::{error, warn};
use crate::net::stream::Stream;
use crate::net::tls::Tls;
use crate::shutdown::Shutdown;
use crate::text::push_decimal;
use crossbeam_channel::{Receiver, RecvTimeoutError, Sender};
#[cfg(any(target_os = "linux", target_os = "android"))]
use nix::sys::epoll::{Epoll, EpollCreateFlags, EpollEvent, EpollFlags, EpollTimeout};
use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, VecDeque};
use std::io::{self, ErrorKind, Read, Write};
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream};
use std::os::unix::net::UnixStream;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

/// How long a worker waits for the next request on its connection before
/// handing the connection back to the poll thread.
pub const LINGER: Duration = Duration::from_millis(250);
/// After an error answer, what the client still sends is read and dropped this
/// long, so that it sees the answer instead of a reset.
const DRAIN: Duration = Duration::from_secs(2);
/// A worker without a connection this long ends.
const WORKER_IDLE: Duration = Duration::from_secs(60);
const WORKER_STACK: usize = 512 << 10;
/// A worker's buffers larger than this are given back after the request.
const BIG_BUFFER: usize = 64 << 10;
/// Blocking writes of an answer give up after this.
const WRITE_TIMEOUT: Duration = Duration::from_secs(30);

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
    /// The request proved a project's token: its connection keeps the idle
    /// timeout between requests instead of the head timeout.
    pub authenticated: bool,
    /// The body's `Content-Type` (`application/json` but for [`Response::text`]).
    pub content_type: &'static str,
}

pub type Upgrade = Box<dyn FnOnce(Stream) + Send>;

pub const JSON: &str = "application/json";

impl Response {
    pub fn json(status: u16, body: &impl serde::Serialize) -> Response {
        Response {
            status,
            body: serde_json::to_vec(body).expect("answers serialize"),
            lines: None,
            upgrade: None,
            authenticated: false,
            content_type: JSON,
        }
    }

    /// A body of another type than JSON (the Prometheus text of `/metrics`).
    pub fn text(status: u16, content_type: &'static str, body: Vec<u8>) -> Response {
        Response { status, body, lines: None, upgrade: None, authenticated: false, content_type }
    }

    pub fn ndjson(lines: crossbeam_channel::Receiver<Vec<u8>>) -> Response {
        Response {
            status: 200,
            body: Vec::new(),
            lines: Some(lines),
            upgrade: None,
            authenticated: false,
            content_type: JSON,
        }
    }

    pub fn upgrade(take_over: Upgrade) -> Response {
        Response {
            status: 101,
            body: Vec::new(),
            lines: None,
            upgrade: Some(take_over),
            authenticated: false,
            content_type: JSON,
        }
    }

    /// `{"error":REASON}`, as `json!` writes it, without building a map.
    pub fn error(status: u16, reason: &str) -> Response {
        let mut body = Vec::with_capacity(16 + reason.len());
        body.extend_from_slice(b"{\"error\":");
        serde_json::to_writer(&mut body, reason).expect("a string serializes");
        body.push(b'}');
        Response::text(status, JSON, body)
    }
}

pub trait Handler: Send + Sync + 'static {
    fn handle(&self, req: &Request) -> Response;
}

/// A connection and what is known of it; it moves between the poll thread and
/// the workers.
struct Conn {
    stream: Stream,
    /// TLS port, first byte not seen yet: plain HTTP is answered in plain.
    unchecked: bool,
    peer: SocketAddr,
    /// Bytes read but not yet consumed (a pipelined request may follow).
    buf: Vec<u8>,
    /// A request on it proved a token: it keeps the idle timeout.
    trusted: bool,
    /// When it began waiting for its next head: accepted, or last answered.
    since: Instant,
    /// When the first byte of the head now being read arrived.
    head_started: Option<Instant>,
    /// An error answer was sent; what still comes is dropped until the peer
    /// closes or [`DRAIN`] is over.
    closing: bool,
}

/// Messages to the poll thread (the thread in [`serve`]).
enum Back {
    /// Wait for this connection's next request head (or drain it, when closing).
    Park(Conn),
    /// A connection ended: its place and its peer's count are free.
    Closed(IpAddr),
}

/// What the poll thread and the workers share.
struct Shared {
    limits: Limits,
    shutdown: Arc<Shutdown>,
    handler: Arc<dyn Handler>,
    back: Sender<Back>,
    /// Written to after a [`Back::Park`], so the poll thread takes it at once.
    wake: UnixStream,
    jobs: Receiver<Conn>,
    /// Workers waiting for a job and not yet promised one.
    idle_workers: AtomicUsize,
    /// The port's TLS, if it speaks TLS.
    tls: Option<Arc<Tls>>,
}

const LISTENER: u64 = u64::MAX;
const WAKE: u64 = u64::MAX - 1;
const SHUTDOWN: u64 = u64::MAX - 2;

/// Serves until shutdown is requested, then waits (bounded) for open requests.
pub fn serve(
    listener: TcpListener,
    limits: Limits,
    shutdown: Arc<Shutdown>,
    handler: Arc<dyn Handler>,
    tls: Option<Arc<Tls>>,
    on_shutdown: impl FnOnce(),
) -> io::Result<()> {
    listener.set_nonblocking(true)?;
    // The longest accept queue the system allows (net.core.somaxconn): a burst
    // of connections is queued, not dropped into a 1 s SYN retry.
    #[cfg(any(target_os = "linux", target_os = "android"))]
    let backlog = nix::sys::socket::Backlog::MAXALLOWABLE;
    #[cfg(not(any(target_os = "linux", target_os = "android")))]
    let backlog = nix::sys::socket::Backlog::new(1024).unwrap_or(nix::sys::socket::Backlog::MAXCONN);
    let _ = nix::sys::socket::listen(&listener, backlog);
    let (wake, wake_rx) = UnixStream::pair()?;
    wake.set_nonblocking(true)?;
    wake_rx.set_nonblocking(true)?;
    let (back, back_rx) = crossbeam_channel::unbounded();
    let (jobs_tx, jobs) = crossbeam_channel::unbounded();
    let shared = Arc::new(Shared {
        limits,
        shutdown,
        handler,
        back,
        wake,
        jobs,
        idle_workers: AtomicUsize::new(0),
        tls,
    });
    let epoll = Epoll::new(EpollCreateFlags::EPOLL_CLOEXEC).map_err(io::Error::from)?;
    epoll.add(&listener, EpollEvent::new(EpollFlags::EPOLLIN, LISTENER)).map_err(io::Error::from)?;
    epoll.add(&wake_rx, EpollEvent::new(EpollFlags::EPOLLIN, WAKE)).map_err(io::Error::from)?;
    epoll
        .add(&shared.shutdown.wake_rx, EpollEvent::new(EpollFlags::EPOLLIN, SHUTDOWN))
        .map_err(io::Error::from)?;
    let mut poller = Poller {
        shared: Arc::clone(&shared),
        epoll,
        listener: Some(listener),
        resume_accept: None,
        wake_rx,
        back_rx,
        jobs: jobs_tx,
        slots: Vec::new(),
        free: Vec::new(),
        timers: BinaryHeap::new(),
        evictable: VecDeque::new(),
        peers: HashMap::new(),
        open: 0,
        scratch: vec![0; 64 << 10],
        ready: Vec::new(),
    };
    poller.run()?;
    // Stop accepting; long answers (live runs) end when their runs are stopped.
    if let Some(l) = poller.listener.take() {
        let _ = poller.epoll.delete(&l);
    }
    on_shutdown();
    poller.finish();
    Ok(())
}

struct Slot {
    generation: u32,
    conn: Option<Conn>,
    deadline: Instant,
}

/// The poll thread's state; see the module doc.
struct Poller {
    shared: Arc<Shared>,
    epoll: Epoll,
    listener: Option<TcpListener>,
    /// Accepting paused after an accept error (EMFILE): resume then.
    resume_accept: Option<Instant>,
    wake_rx: UnixStream,
    back_rx: Receiver<Back>,
    jobs: Sender<Conn>,
    /// Waiting connections; a token is `generation << 32 | index`.
    slots: Vec<Slot>,
    free: Vec<u32>,
    /// Deadlines, earliest first; an entry whose slot has another deadline (or
    /// another generation) is stale and skipped.
    timers: BinaryHeap<Reverse<(Instant, u64)>>,
    /// Tokens of connections that have made no authenticated request, oldest
    /// first: who gives way at the cap. Stale entries are skipped.
    evictable: VecDeque<u64>,
    /// Open connections per peer address (waiting or with a worker).
    peers: HashMap<IpAddr, u32>,
    /// Open connections (waiting or with a worker).
    open: usize,
    scratch: Vec<u8>,
    /// Tokens to read again without waiting: TLS connections whose session
    /// holds decrypted bytes (which `epoll` cannot see).
    ready: Vec<u64>,
}

impl Poller {
    fn run(&mut self) -> io::Result<()> {
        let mut events = vec![EpollEvent::empty(); 256];
        while !self.shared.shutdown.requested() {
            let timeout = self.timeout();
            let n = match self.epoll.wait(&mut events, timeout) {
                Ok(n) => n,
                Err(nix::errno::Errno::EINTR) => 0,
                Err(e) => return Err(e.into()),
            };
            for ev in &events[..n] {
                match ev.data() {
                    LISTENER => self.accept_all(),
                    WAKE => {
                        let mut sink = [0u8; 256];
                        while matches!((&self.wake_rx).read(&mut sink), Ok(n) if n > 0) {}
                    }
                    SHUTDOWN => {}
                    token => self.on_ready(token),
                }
            }
            self.take_back();
            for token in std::mem::take(&mut self.ready) {
                self.on_ready(token);
            }
            let now = Instant::now();
            self.expire(now);
            if self.resume_accept.is_some_and(|t| t <= now) {
                self.resume_accept = None;
                if let Some(l) = &self.listener {
                    let _ = self.epoll.add(l, EpollEvent::new(EpollFlags::EPOLLIN, LISTENER));
                }
            }
        }
        Ok(())
    }

    /// Until the earliest deadline (at most a minute).
    fn timeout(&mut self) -> EpollTimeout {
        if !self.ready.is_empty() {
            return EpollTimeout::ZERO;
        }
        let mut next = self.resume_accept;
        while let Some(Reverse((at, token))) = self.timers.peek().copied() {
            if self.slot(token).is_some_and(|s| s.deadline == at) {
                next = Some(next.map_or(at, |n| n.min(at)));
                break;
            }
            self.timers.pop();
        }
        let ms = next.map_or(60_000, |t| {
            let left = t.saturating_duration_since(Instant::now());
            // Round up: waking a moment early would only spin.
            (left.as_micros().div_ceil(1000) as u64).min(60_000)
        });
        EpollTimeout::from(ms as u16)
    }

    fn slot(&self, token: u64) -> Option<&Slot> {
        let slot = self.slots.get((token & 0xffff_ffff) as usize)?;
        (u64::from(slot.generation) == token >> 32 && slot.conn.is_some()).then_some(slot)
    }

    fn accept_all(&mut self) {
        for _ in 0..256 {
            let Some(listener) = &self.listener else { return };
            match listener.accept() {
                Ok((stream, peer)) => self.admit(stream, peer),
                Err(e) if e.kind() == ErrorKind::WouldBlock => return,
                Err(e) if matches!(e.kind(), ErrorKind::ConnectionAborted | ErrorKind::Interrupted) => {}
                Err(e) => {
                    // EMFILE and friends: free a place if one can be had, else
                    // pause accepting for a moment; keep serving what is open.
                    warn!("accept: {e}");
                    if !self.evict_one() {
                        if let Some(l) = &self.listener {
                            let _ = self.epoll.delete(l);
                        }
                        self.resume_accept = Some(Instant::now() + Duration::from_millis(50));
                    }
                    return;
                }
            }
        }
    }

    fn admit(&mut self, stream: TcpStream, peer: SocketAddr) {
        let limits = &self.shared.limits;
        let ip = canonical(peer.ip());
        let exempt = limits.loopback_exempt && ip.is_loopback();
        let held = |p: &Poller| p.peers.get(&ip).copied().unwrap_or(0) as usize;
        if !exempt && held(self) >= limits.connections_per_peer {
            self.take_back();
            if held(self) >= self.shared.limits.connections_per_peer {
                warn!(
                    "http: {ip} holds {} connections (limits.connectionsPerPeer); refusing more",
                    self.shared.limits.connections_per_peer
                );
                refuse(&stream, 429, "too many connections from this address");
                return;
            }
        }
        if self.open >= self.shared.limits.connections {
            self.take_back();
            if self.open >= self.shared.limits.connections && !self.evict_one() {
                warn!(
                    "http: {} connections open (limits.connections), all with requests; refusing more",
                    self.open
                );
                refuse(&stream, 503, "too many connections");
                return;
            }
        }
        let ready = stream.set_nonblocking(true).and_then(|()| stream.set_nodelay(true));
        if ready.and_then(|()| stream.set_write_timeout(Some(WRITE_TIMEOUT))).is_err() {
            return;
        }
        let stream = match &self.shared.tls {
            None => Stream::Plain(stream),
            Some(tls) => match Stream::tls(tls, stream) {
                Ok(stream) => stream,
                Err(e) => {
                    error!("tls: cannot start a session: {e}");
                    return;
                }
            },
        };
        self.open += 1;
        crate::metrics::connections(1);
        *self.peers.entry(ip).or_insert(0) += 1;
        let now = Instant::now();
        let conn = Conn {
            unchecked: stream.is_tls(),
            stream,
            peer,
            buf: Vec::new(),
            trusted: false,
            since: now,
            head_started: None,
            closing: false,
        };
        self.register(conn);
    }

    /// Closes the oldest connection that has made no authenticated request.
    fn evict_one(&mut self) -> bool {
        while let Some(token) = self.evictable.pop_front() {
            if self.slot(token).is_some_and(|s| s.conn.as_ref().is_some_and(|c| !c.trusted))
                && let Some(conn) = self.take(token)
            {
                self.close(conn);
                return true;
            }
        }
        false
    }

    fn deadline(&self, conn: &Conn) -> Instant {
        let limits = &self.shared.limits;
        if conn.closing {
            return conn.since + DRAIN;
        }
        let head = conn.head_started.map(|t| t + limits.request);
        if conn.trusted {
            head.unwrap_or(conn.since + limits.idle)
        } else {
            let first = conn.since + limits.head;
            head.map_or(first, |h| h.min(first))
        }
    }

    /// Waits for the connection's next head (or its end, when closing).
    fn register(&mut self, conn: Conn) {
        let index = match self.free.pop() {
            Some(i) => i as usize,
            None => {
                self.slots.push(Slot { generation: 0, conn: None, deadline: Instant::now() });
                self.slots.len() - 1
            }
        };
        let token = u64::from(self.slots[index].generation) << 32 | index as u64;
        if self.epoll.add(&conn.stream, EpollEvent::new(EpollFlags::EPOLLIN, token)).is_err() {
            self.free.push(index as u32);
            self.close(conn);
            return;
        }
        let deadline = self.deadline(&conn);
        if !conn.trusted {
            self.evictable.push_back(token);
            if self.evictable.len() > 2 * self.slots.len() + 1024 {
                let slots = &self.slots;
                self.evictable.retain(|t| {
                    slots.get((t & 0xffff_ffff) as usize).is_some_and(|s| {
                        u64::from(s.generation) == t >> 32 && s.conn.as_ref().is_some_and(|c| !c.trusted)
                    })
                });
            }
        }
        if conn.stream.buffered() {
            self.ready.push(token);
        }
        let slot = &mut self.slots[index];
        slot.conn = Some(conn);
        slot.deadline = deadline;
        self.timers.push(Reverse((deadline, token)));
    }

    /// Takes a waiting connection out of the poll set.
    fn take(&mut self, token: u64) -> Option<Conn> {
        self.slot(token)?;
        let index = (token & 0xffff_ffff) as usize;
        let slot = &mut self.slots[index];
        let conn = slot.conn.take()?;
        slot.generation = slot.generation.wrapping_add(1);
        self.free.push(index as u32);
        let _ = self.epoll.delete(&conn.stream);
        Some(conn)
    }

    fn close(&mut self, conn: Conn) {
        let ip = canonical(conn.peer.ip());
        drop(conn);
        self.closed(ip);
    }

    fn closed(&mut self, ip: IpAddr) {
        self.open = self.open.saturating_sub(1);
        crate::metrics::connections(-1);
        if let Some(n) = self.peers.get_mut(&ip) {
            *n -= 1;
            if *n == 0 {
                self.peers.remove(&ip);
            }
        }
    }

    /// Connections handed back by the workers, and the ends they report.
    fn take_back(&mut self) {
        while let Ok(msg) = self.back_rx.try_recv() {
            match msg {
                Back::Park(conn) if self.listener.is_none() => self.close(conn),
                Back::Park(conn) => self.register(conn),
                Back::Closed(ip) => self.closed(ip),
            }
        }
    }

    fn on_ready(&mut self, token: u64) {
        let Some(slot) = self.slot(token) else { return };
        let index = (token & 0xffff_ffff) as usize;
        let closing = slot.conn.as_ref().is_some_and(|c| c.closing);
        let conn = self.slots[index].conn.as_mut().expect("checked above");
        if conn.unchecked && !closing {
            // A TLS port: a handshake begins with 0x16; anything else is
            // plain HTTP (or noise), answered in plain.
            let mut first = [0u8; 1];
            match conn.stream.tcp().peek(&mut first) {
                Ok(1) if crate::net::stream::is_handshake(first[0]) => conn.unchecked = false,
                Ok(1) => return self.answer_plain(token),
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::Interrupted) => return,
                _ => {
                    let conn = self.take(token).expect("checked above");
                    return self.close(conn);
                }
            }
        }
        let read = conn.stream.read(&mut self.scratch);
        let n = match read {
            Ok(0) => {
                let conn = self.take(token).expect("checked above");
                return self.close(conn);
            }
            Ok(n) => n,
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::Interrupted) => return,
            Err(e) => {
                if conn.stream.handshaking() {
                    crate::net::stream::handshake_failed(conn.peer, &e);
                }
                let conn = self.take(token).expect("checked above");
                return self.close(conn);
            }
        };
        if conn.stream.buffered() {
            self.ready.push(token);
        }
        if closing {
            return;
        }
        let header_bytes = self.shared.limits.header_bytes;
        let new = &self.scratch[..n];
        let conn = self.slots[index].conn.as_mut().expect("checked above");
        let fresh = conn.buf.is_empty();
        conn.buf.extend_from_slice(new);
        // A head can only end, or prove broken, at a line end.
        let verdict = if new.contains(&b'\n') { head_state(&conn.buf, header_bytes) } else { Head::Partial };
        match verdict {
            Head::Complete => {
                let conn = self.take(token).expect("checked above");
                self.dispatch(conn);
            }
            Head::Bad(status, reason) => self.reject(token, status, reason),
            Head::Partial if conn.buf.len() > header_bytes => {
                self.reject(token, 431, "headers too large");
            }
            Head::Partial if fresh => {
                conn.head_started = Some(Instant::now());
                let conn = self.slots[index].conn.as_ref().expect("checked above");
                let deadline = self.deadline(conn);
                self.slots[index].deadline = deadline;
                self.timers.push(Reverse((deadline, token)));
            }
            Head::Partial => {}
        }
    }

    /// Answers with an error (without blocking) and drains the connection.
    fn reject(&mut self, token: u64, status: u16, reason: &'static str) {
        let index = (token & 0xffff_ffff) as usize;
        let Some(conn) = self.slots[index].conn.as_mut() else { return };
        log_reject(conn, status, reason);
        let _ = conn.stream.write_all(&encode_error(status, reason));
        conn.stream.shutdown_write();
        conn.closing = true;
        conn.buf = Vec::new();
        conn.since = Instant::now();
        let deadline = conn.since + DRAIN;
        self.slots[index].deadline = deadline;
        self.timers.push(Reverse((deadline, token)));
    }

    /// Plain HTTP on a TLS port: a plain 400 saying so, then the drain.
    fn answer_plain(&mut self, token: u64) {
        let index = (token & 0xffff_ffff) as usize;
        let Some(conn) = self.slots[index].conn.as_mut() else { return };
        let tcp = conn.stream.tcp();
        let _ = (&mut &*tcp).write_all(&encode_error(400, crate::net::stream::PLAIN_HTTP));
        let _ = tcp.shutdown(std::net::Shutdown::Write);
        conn.closing = true;
        conn.since = Instant::now();
        let deadline = conn.since + DRAIN;
        self.slots[index].deadline = deadline;
        self.timers.push(Reverse((deadline, token)));
    }

    fn expire(&mut self, now: Instant) {
        while let Some(Reverse((at, token))) = self.timers.peek().copied() {
            if at > now {
                return;
            }
            self.timers.pop();
            let Some(slot) = self.slot(token) else { continue };
            if slot.deadline != at {
                continue;
            }
            let conn = slot.conn.as_ref().expect("slot() checks");
            if conn.closing || conn.buf.is_empty() {
                let conn = self.take(token).expect("checked above");
                self.close(conn);
            } else {
                self.reject(token, 408, "request timeout");
            }
        }
    }

    /// Hands a connection with a complete head to an idle worker, or to a new one.
    fn dispatch(&mut self, conn: Conn) {
        let idle = &self.shared.idle_workers;
        if idle.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1)).is_ok() {
            if let Err(e) = self.jobs.send(conn) {
                self.close(e.into_inner());
            }
            return;
        }
        let (tx, rx) = crossbeam_channel::bounded::<Conn>(1);
        let shared = Arc::clone(&self.shared);
        let spawned = std::thread::Builder::new()
            .name("http-worker".into())
            .stack_size(WORKER_STACK)
            .spawn(move || worker(&shared, rx.recv().ok()));
        match spawned {
            Ok(_) => {
                let _ = tx.send(conn);
            }
            Err(e) => {
                error!("cannot start an http worker: {e}");
                refuse(conn.stream.tcp(), 503, "too many connections");
                self.close(conn);
            }
        }
    }

    /// After shutdown: closes the waiting connections, then waits for the
    /// workers' connections until `limits.shutdown` is over.
    fn finish(&mut self) {
        for index in 0..self.slots.len() {
            let token = u64::from(self.slots[index].generation) << 32 | index as u64;
            if let Some(conn) = self.take(token) {
                self.close(conn);
            }
        }
        let deadline = Instant::now() + self.shared.limits.shutdown;
        while self.open > 0 {
            let Some(left) = deadline.checked_duration_since(Instant::now()) else { break };
            match self.back_rx.recv_timeout(left.min(Duration::from_millis(100))) {
                Ok(Back::Park(conn)) => self.close(conn),
                Ok(Back::Closed(ip)) => self.closed(ip),
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => break,
            }
        }
        if self.open > 0 {
            warn!(
                "{} connection(s) still busy after {:?}; leaving them",
                self.open, self.shared.limits.shutdown
            );
        }
    }
}

/// `::ffff:a.b.c.d` is the IPv4 peer a.b.c.d.
fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

enum Head {
    Complete,
    Partial,
    Bad(u16, &'static str),
}

fn head_state(buf: &[u8], header_bytes: usize) -> Head {
    let mut slots = [httparse::EMPTY_HEADER; 64];
    match httparse::Request::new(&mut slots).parse(buf) {
        Ok(httparse::Status::Complete(len)) if len > header_bytes => Head::Bad(431, "headers too large"),
        Ok(httparse::Status::Complete(_)) => Head::Complete,
        Ok(httparse::Status::Partial) => Head::Partial,
        Err(httparse::Error::TooManyHeaders) => Head::Bad(431, "headers too large"),
        Err(_) => Head::Bad(400, "bad request"),
    }
}

fn log_reject(conn: &Conn, status: u16, reason: &str) {
    // A connection that went quiet between requests is no news.
    if status != 408 || !conn.buf.is_empty() {
        warn!("http status={status} peer={} ({reason})", canonical(conn.peer.ip()));
    }
}

/// Over a cap: one error answer written without blocking, then close.
fn refuse(stream: &TcpStream, status: u16, reason: &str) {
    let _ = stream.set_nonblocking(true);
    let _ = (&mut &*stream).write_all(&encode_error(status, reason));
    let _ = stream.shutdown(std::net::Shutdown::Write);
}

/// Why reading a request stopped.
enum Stop {
    /// The peer closed, or the socket failed; nobody is left to answer.
    Gone,
    /// No complete head within [`LINGER`]: back to the poll thread.
    Park,
    /// Answer with this error, then close.
    Reject(u16, &'static str),
}

impl From<io::Error> for Stop {
    fn from(e: io::Error) -> Stop {
        match e.kind() {
            ErrorKind::WouldBlock | ErrorKind::TimedOut => Stop::Reject(408, "request timeout"),
            _ => Stop::Gone,
        }
    }
}

/// A worker's buffers, reused from request to request.
struct Session {
    req: Request,
    /// Header strings kept for the next request.
    spare: Vec<(String, String)>,
    out: Vec<u8>,
    /// The socket's read timeout as last set.
    read_timeout: Option<Duration>,
}

/// An `http-worker` thread: serves the connection it was started with, then
/// whatever the poll thread hands it, until [`WORKER_IDLE`] without work.
fn worker(shared: &Shared, first: Option<Conn>) {
    let mut session = Session {
        req: Request {
            method: String::new(),
            target: String::new(),
            headers: Vec::new(),
            body: Vec::new(),
            peer: SocketAddr::from(([0, 0, 0, 0], 0)),
        },
        spare: Vec::new(),
        out: Vec::with_capacity(1024),
        read_timeout: None,
    };
    let mut next = first;
    loop {
        if let Some(conn) = next.take() {
            session.serve(shared, conn);
        }
        shared.idle_workers.fetch_add(1, Ordering::SeqCst);
        match shared.jobs.recv_timeout(WORKER_IDLE) {
            Ok(conn) => next = Some(conn),
            Err(RecvTimeoutError::Timeout) => {
                let idle = &shared.idle_workers;
                if idle.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1)).is_ok() {
                    return;
                }
                // A job was promised to some idle worker: this one takes it.
                match shared.jobs.recv() {
                    Ok(conn) => next = Some(conn),
                    Err(_) => return,
                }
            }
            Err(RecvTimeoutError::Disconnected) => return,
        }
    }
}

impl Session {
    fn serve(&mut self, shared: &Shared, mut conn: Conn) {
        if conn.stream.tcp().set_nonblocking(false).is_err() {
            return closed(shared, conn);
        }
        self.read_timeout = None;
        self.req.peer = conn.peer;
        loop {
            let keep_alive = match self.read_request(shared, &mut conn) {
                Ok(k) => k,
                Err(Stop::Gone) => return closed(shared, conn),
                Err(Stop::Park) => return park(shared, conn),
                Err(Stop::Reject(status, reason)) => {
                    log_reject(&conn, status, reason);
                    let _ = conn.stream.write_all(&encode_error(status, reason));
                    conn.stream.shutdown_write();
                    conn.closing = true;
                    return park(shared, conn);
                }
            };
            let resp = match catch_unwind(AssertUnwindSafe(|| shared.handler.handle(&self.req))) {
                Ok(resp) => resp,
                Err(_) => {
                    error!("handler panicked on a request from {}", conn.peer);
                    Response::error(500, "internal error")
                }
            };
            conn.trusted |= resp.authenticated;
            if let Some(take_over) = resp.upgrade {
                let ip = canonical(conn.peer.ip());
                let _ = conn.stream.tcp().set_read_timeout(None);
                take_over(conn.stream);
                let _ = shared.back.send(Back::Closed(ip));
                return;
            }
            let keep_alive = keep_alive && !shared.shutdown.requested();
            let written = match resp.lines {
                Some(ref lines) => self.stream_lines(&mut conn.stream, lines),
                None => {
                    encode(&mut self.out, &resp, keep_alive);
                    conn.stream.write_all(&self.out)
                }
            };
            if written.is_err() || !keep_alive {
                conn.stream.shutdown_write();
                return closed(shared, conn);
            }
            conn.since = Instant::now();
            conn.head_started = None;
            // A large request or answer does not stay with the worker.
            if self.req.body.capacity() > BIG_BUFFER {
                self.req.body = Vec::new();
            }
            if self.out.capacity() > BIG_BUFFER {
                self.out = Vec::with_capacity(1024);
            }
            if conn.buf.capacity() > BIG_BUFFER && conn.buf.len() < BIG_BUFFER / 2 {
                conn.buf.shrink_to(BIG_BUFFER / 2);
            }
        }
    }

    fn set_read_timeout(&mut self, stream: &TcpStream, t: Duration) -> io::Result<()> {
        let t = Some(t.max(Duration::from_millis(1)));
        if self.read_timeout != t {
            stream.set_read_timeout(t)?;
            self.read_timeout = t;
        }
        Ok(())
    }

    /// Reads more bytes into the connection's buffer, waiting up to `wait`.
    /// Ok(0) is end of stream.
    fn fill(&mut self, conn: &mut Conn, wait: Duration) -> io::Result<usize> {
        self.set_read_timeout(conn.stream.tcp(), wait)?;
        let mut chunk = [0u8; 8 << 10];
        loop {
            match conn.stream.read(&mut chunk) {
                Ok(n) => {
                    conn.buf.extend_from_slice(&chunk[..n]);
                    return Ok(n);
                }
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            }
        }
    }

    /// Fills until `deadline`; the peer closing first is [`Stop::Gone`].
    fn fill_until(&mut self, conn: &mut Conn, deadline: Instant) -> Result<(), Stop> {
        let left =
            deadline.checked_duration_since(Instant::now()).ok_or(Stop::Reject(408, "request timeout"))?;
        match self.fill(conn, left)? {
            0 => Err(Stop::Gone),
            _ => Ok(()),
        }
    }

    /// The next request into `self.req`; true when the connection may be kept.
    fn read_request(&mut self, shared: &Shared, conn: &mut Conn) -> Result<bool, Stop> {
        let limits = &shared.limits;
        // The head: complete when the poll thread hands a connection over;
        // between keep-alive requests, waited for here for a moment.
        if conn.buf.is_empty() {
            match self.fill(conn, LINGER) {
                Ok(0) => return Err(Stop::Gone),
                Ok(_) => conn.head_started = Some(Instant::now()),
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                    return Err(Stop::Park);
                }
                Err(_) => return Err(Stop::Gone),
            }
        }
        let started = conn.head_started.unwrap_or_else(Instant::now);
        let deadline = started + limits.request;
        let mut slots = [httparse::EMPTY_HEADER; 64];
        let mut parsed = httparse::Request::new(&mut slots);
        let head_len = match parsed.parse(&conn.buf) {
            Ok(httparse::Status::Complete(len)) if len > limits.header_bytes => {
                return Err(Stop::Reject(431, "headers too large"));
            }
            Ok(httparse::Status::Complete(len)) => len,
            Ok(httparse::Status::Partial) if conn.buf.len() > limits.header_bytes => {
                return Err(Stop::Reject(431, "headers too large"));
            }
            // The rest of a slow head is the poll thread's to wait for.
            Ok(httparse::Status::Partial) => return Err(Stop::Park),
            Err(httparse::Error::TooManyHeaders) => return Err(Stop::Reject(431, "headers too large")),
            Err(_) => return Err(Stop::Reject(400, "bad request")),
        };
        let req = &mut self.req;
        req.method.clear();
        req.method.push_str(parsed.method.unwrap_or(""));
        req.target.clear();
        req.target.push_str(parsed.path.unwrap_or("/"));
        self.spare.append(&mut req.headers);
        for h in parsed.headers.iter() {
            let (mut name, mut value) = self.spare.pop().unwrap_or_default();
            name.clear();
            name.push_str(h.name);
            value.clear();
            match std::str::from_utf8(h.value) {
                Ok(v) => value.push_str(v),
                Err(_) => value.push_str(&String::from_utf8_lossy(h.value)),
            }
            req.headers.push((name, value));
        }
        let minor = parsed.version.unwrap_or(1);
        conn.buf.drain(..head_len);
        let framing = framing(&req.headers, minor)?;
        let keep_alive = keep_alive(&req.headers, minor);
        let expects_continue = req.header("expect").is_some_and(|v| v.eq_ignore_ascii_case("100-continue"));
        req.body.clear();
        match framing {
            Framing::Chunked => {
                if expects_continue {
                    conn.stream.write_all(b"HTTP/1.1 100 Continue\r\n\r\n").map_err(|_| Stop::Gone)?;
                }
                self.read_chunked(conn, limits, deadline)?;
            }
            Framing::Length(n) if n > limits.body_bytes as u64 => {
                return Err(Stop::Reject(413, "body too large"));
            }
            Framing::Length(n) => {
                let n = n as usize;
                if expects_continue && conn.buf.len() < n {
                    conn.stream.write_all(b"HTTP/1.1 100 Continue\r\n\r\n").map_err(|_| Stop::Gone)?;
                }
                while conn.buf.len() < n {
                    self.fill_until(conn, deadline)?;
                }
                self.req.body.extend_from_slice(&conn.buf[..n]);
                conn.buf.drain(..n);
            }
            Framing::None => {}
        }
        Ok(keep_alive)
    }

    fn read_chunked(&mut self, conn: &mut Conn, limits: &Limits, deadline: Instant) -> Result<(), Stop> {
        loop {
            let line = self.read_line(conn, deadline)?;
            let size = chunk_size(&line).ok_or(Stop::Reject(400, "bad request"))?;
            if size == 0 {
                // Trailers, up to the empty line (within the header budget).
                let mut trailers = 0;
                loop {
                    let line = self.read_line(conn, deadline)?;
                    if line.is_empty() {
                        return Ok(());
                    }
                    trailers += line.len() + 2;
                    if trailers > limits.header_bytes {
                        return Err(Stop::Reject(431, "headers too large"));
                    }
                }
            }
            if self.req.body.len().saturating_add(size) > limits.body_bytes {
                return Err(Stop::Reject(413, "body too large"));
            }
            while conn.buf.len() < size + 2 {
                self.fill_until(conn, deadline)?;
            }
            if &conn.buf[size..size + 2] != b"\r\n" {
                return Err(Stop::Reject(400, "bad request"));
            }
            self.req.body.extend_from_slice(&conn.buf[..size]);
            conn.buf.drain(..size + 2);
        }
    }

    /// One CRLF-terminated line of the chunked framing (at most 4 KiB).
    fn read_line(&mut self, conn: &mut Conn, deadline: Instant) -> Result<Vec<u8>, Stop> {
        let mut seen = 0;
        loop {
            if let Some(end) = conn.buf[seen..].windows(2).position(|w| w == b"\r\n").map(|p| p + seen) {
                let line = conn.buf[..end].to_vec();
                conn.buf.drain(..end + 2);
                return Ok(line);
            }
            if conn.buf.len() > 4096 {
                return Err(Stop::Reject(400, "bad request"));
            }
            seen = conn.buf.len().saturating_sub(1);
            self.fill_until(conn, deadline)?;
        }
    }

    /// A chunked NDJSON answer, one chunk per line, as the lines come. The
    /// connection stays usable afterwards.
    fn stream_lines(
        &mut self,
        stream: &mut Stream,
        lines: &crossbeam_channel::Receiver<Vec<u8>>,
    ) -> io::Result<()> {
        stream.write_all(
            b"HTTP/1.1 200 OK\r\nContent-Type: application/x-ndjson\r\nTransfer-Encoding: chunked\r\nCache-Control: no-cache\r\n\r\n",
        )?;
        for line in lines {
            self.out.clear();
            let _ = write!(self.out, "{:x}\r\n", line.len());
            self.out.extend_from_slice(&line);
            self.out.extend_from_slice(b"\r\n");
            stream.write_all(&self.out)?;
        }
        stream.write_all(b"0\r\n\r\n")
    }
}

/// Back to the poll thread, to wait for its next head there.
fn park(shared: &Shared, mut conn: Conn) {
    if conn.stream.tcp().set_nonblocking(true).is_err() {
        return closed(shared, conn);
    }
    if conn.buf.is_empty() {
        conn.buf = Vec::new(); // a waiting connection holds no buffer
    }
    if conn.closing {
        conn.since = Instant::now();
    }
    if let Err(e) = shared.back.send(Back::Park(conn)) {
        let Back::Park(conn) = e.into_inner() else { return };
        return closed(shared, conn);
    }
    let _ = (&shared.wake).write(&[1]);
}

/// The connection ends here; its place is free.
fn closed(shared: &Shared, conn: Conn) {
    let ip = canonical(conn.peer.ip());
    drop(conn);
    let _ = shared.back.send(Back::Closed(ip));
}

enum Framing {
    None,
    Length(u64),
    Chunked,
}

/// The body's framing, strictly (RFC 9112 §6): at most one Content-Length of
/// digits only; Transfer-Encoding only as a single `chunked`, never beside a
/// Content-Length, never in HTTP/1.0. Anything else is a 400 (and the
/// connection is closed: its framing cannot be trusted).
fn framing(headers: &[(String, String)], minor: u8) -> Result<Framing, Stop> {
    const BAD: Stop = Stop::Reject(400, "bad request");
    let mut length = None;
    let mut encoding = None;
    for (name, value) in headers {
        if name.eq_ignore_ascii_case("content-length") {
            let digits = value.trim_matches([' ', '\t']);
            let ok = !digits.is_empty() && digits.len() <= 18 && digits.bytes().all(|b| b.is_ascii_digit());
            if !ok || length.is_some() {
                return Err(BAD);
            }
            length = digits.parse::<u64>().ok();
        } else if name.eq_ignore_ascii_case("transfer-encoding") {
            if encoding.is_some() {
                return Err(BAD);
            }
            encoding = Some(value.trim_matches([' ', '\t']));
        }
    }
    match (encoding, length) {
        (None, None) => Ok(Framing::None),
        (None, Some(n)) => Ok(Framing::Length(n)),
        (Some(te), None) if te.eq_ignore_ascii_case("chunked") && minor >= 1 => Ok(Framing::Chunked),
        (Some(_), _) => Err(BAD),
    }
}

/// `chunk-size [ BWS ";" chunk-ext ]`: hex digits only, no sign.
fn chunk_size(line: &[u8]) -> Option<usize> {
    let end = line.iter().position(|&b| b == b';').unwrap_or(line.len());
    let mut size = &line[..end];
    if end < line.len() {
        while let [rest @ .., b' ' | b'\t'] = size {
            size = rest;
        }
    }
    if size.is_empty() || size.len() > 15 || !size.iter().all(u8::is_ascii_hexdigit) {
        return None;
    }
    usize::from_str_radix(std::str::from_utf8(size).ok()?, 16).ok()
}

fn keep_alive(headers: &[(String, String)], minor: u8) -> bool {
    let has = |token: &str| {
        headers
            .iter()
            .filter(|(k, _)| k.eq_ignore_ascii_case("connection"))
            .any(|(_, v)| v.split(',').any(|t| t.trim_matches([' ', '\t']).eq_ignore_ascii_case(token)))
    };
    if minor == 0 { has("keep-alive") } else { !has("close") }
}

/// The status line, headers and body of a JSON answer into `out` (one write).
/// Without `write!`: a copy per piece either way, but no formatting machinery
/// and no growth of `out` on the way (it is reserved for the whole answer).
fn encode(out: &mut Vec<u8>, resp: &Response, keep_alive: bool) {
    out.clear();
    out.reserve(128 + resp.content_type.len() + resp.body.len());
    out.extend_from_slice(b"HTTP/1.1 ");
    push_decimal(out, u64::from(resp.status));
    out.push(b' ');
    out.extend_from_slice(reason(resp.status).as_bytes());
    out.extend_from_slice(b"\r\nContent-Type: ");
    out.extend_from_slice(resp.content_type.as_bytes());
    out.extend_from_slice(b"\r\nContent-Length: ");
    push_decimal(out, resp.body.len() as u64);
    out.extend_from_slice(if keep_alive {
        b"\r\nConnection: keep-alive\r\n\r\n".as_slice()
    } else {
        b"\r\nConnection: close\r\n\r\n".as_slice()
    });
    out.extend_from_slice(&resp.body);
}

fn encode_error(status: u16, reason: &str) -> Vec<u8> {
    let mut out = Vec::with_capacity(160);
    encode(&mut out, &Response::error(status, reason), false);
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

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(list: &[(&str, &str)]) -> Vec<(String, String)> {
        list.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    fn verdict(list: &[(&str, &str)]) -> &'static str {
        match framing(&headers(list), 1) {
            Ok(Framing::None) => "none",
            Ok(Framing::Length(_)) => "length",
            Ok(Framing::Chunked) => "chunked",
            Err(_) => "400",
        }
    }

    #[test]
    fn framing_is_strict() {
        assert_eq!(verdict(&[("Content-Length", "87")]), "length");
        assert_eq!(verdict(&[("transfer-encoding", "Chunked")]), "chunked");
        assert_eq!(verdict(&[]), "none");
        for bad in [
            vec![("Content-Length", "5"), ("Content-Length", "5")],
            vec![("Content-Length", "+87")],
            vec![("Content-Length", "-1")],
            vec![("Content-Length", "8 7")],
            vec![("Content-Length", "5, 5")],
            vec![("Content-Length", "0x10")],
            vec![("Content-Length", "")],
            vec![("Content-Length", "99999999999999999999")],
            vec![("Transfer-Encoding", "chunked"), ("Content-Length", "5")],
            vec![("Transfer-Encoding", "chunked"), ("Transfer-Encoding", "identity")],
            vec![("Transfer-Encoding", "gzip, chunked")],
            vec![("Transfer-Encoding", "chunked, identity")],
            vec![("Transfer-Encoding", "identity")],
        ] {
            assert_eq!(verdict(&bad), "400", "{bad:?}");
        }
        assert!(framing(&headers(&[("Transfer-Encoding", "chunked")]), 0).is_err(), "HTTP/1.0");
    }

    #[test]
    fn chunk_sizes_are_hex_digits_only() {
        assert_eq!(chunk_size(b"1a"), Some(26));
        assert_eq!(chunk_size(b"1A ; ext=1"), Some(26));
        assert_eq!(chunk_size(b"0"), Some(0));
        for bad in [&b"+1a"[..], b"", b" 1", b"1 ", b"-1", b"0x1", b"1g", b"ffffffffffffffff"] {
            assert_eq!(chunk_size(bad), None, "{:?}", String::from_utf8_lossy(bad));
        }
    }
}
