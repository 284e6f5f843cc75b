//! Terminals: a shell on a PTY per terminal, reached over the WebSocket
//! (`GET /ws?token=…`) or the HTTP `terminal.*` actions. A WebSocket terminal
//! opened with `?session=ID` outlives a dropped socket for a while and a later
//! connect with the same ID (and a token of the same project) reattaches,
//! first replaying the last 64 KiB; without `session` it ends with its socket.
//!
//! The shell is a [`crate::process::pty::Pty`], which knows nothing of
//! sockets; this module is the one place that joins a PTY to a WebSocket
//! ([`crate::net::ws`]) or to the HTTP actions.
//!
//! The PTY's master is non-blocking and has one reader at a time, named in
//! the terminal's state and reading with that state locked, so output is
//! never read twice, lost, or reordered between readers: the pump of the
//! attached socket, else the `terminals` thread.
//!
//! Threads, all named:
//! - per attached socket, the pump ([`pump`]): the HTTP connection thread
//!   that took the upgrade serves the PTY and the socket over `poll`; ends
//!   with the socket;
//! - per terminal `term-wait-N`: reaps the shell, ends what it left, tells
//!   the pump; ends with the shell;
//! - `terminals`, one per connector, started with the first terminal: reads
//!   the PTYs of the terminals without a socket (HTTP ones, detached
//!   sessions) into their buffers, writes HTTP input the PTY could not take
//!   at once, and once a second ends detached, idle and exited terminals;
//!   runs until the process exits.

mod pump;

use crate::config::{Limits, LiveLimits};
use crate::logging::{info, warn};
use crate::net::ws::{Link, Socket};
use crate::process;
use crate::process::pty::{Pty, Spawn};
use crate::project::ProjectState;
use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use nix::sys::signal::Signal;
use std::collections::{HashMap, VecDeque};
use std::fs::File;
use std::io::{ErrorKind, Read, Write};
use std::os::fd::{AsFd, BorrowedFd};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

const REPLAY_BYTES: usize = 64 << 10;
const HTTP_BUFFER_BYTES: usize = 1 << 20;
const HTTP_KEEP_AFTER_EXIT: Duration = Duration::from_secs(30);
const HANGUP_GRACE: Duration = Duration::from_secs(2);
/// HTTP input the shell has not read yet, past which `terminal.input` is
/// refused as busy.
const HTTP_INPUT_BYTES: usize = 64 << 10;
/// What the `terminals` thread reads from one PTY in a turn.
const KEEPER_TURN_BYTES: usize = 64 << 10;
/// Appended to an HTTP terminal's output when its shell exits.
const EXITED_MARKER: &[u8] = b"\r\n[process exited]";

/// Bytes kept, oldest dropped first, with a count of what was dropped.
struct Ring {
    bytes: VecDeque<u8>,
    cap: usize,
    dropped: u64,
}

impl Ring {
    fn push(&mut self, data: &[u8]) {
        let skipped = data.len().saturating_sub(self.cap);
        let data = &data[skipped..];
        let over = (self.bytes.len() + data.len()).saturating_sub(self.cap);
        self.bytes.drain(..over);
        self.dropped += (skipped + over) as u64;
        self.bytes.extend(data);
    }
}

/// A wake-up for a thread that polls: [`Wake::wake`] makes [`Wake::fd`]
/// readable until [`Wake::clear`].
struct Wake {
    tx: UnixStream,
    rx: UnixStream,
}

impl Wake {
    fn new() -> std::io::Result<Wake> {
        let (tx, rx) = UnixStream::pair()?;
        tx.set_nonblocking(true)?;
        rx.set_nonblocking(true)?;
        Ok(Wake { tx, rx })
    }

    fn wake(&self) {
        let _ = (&self.tx).write(&[1]); // full: it is readable already
    }

    fn fd(&self) -> BorrowedFd<'_> {
        self.rx.as_fd()
    }

    fn clear(&self) {
        let mut buf = [0u8; 64];
        while matches!((&self.rx).read(&mut buf), Ok(n) if n > 0) {}
    }
}

struct State {
    ring: Ring,
    /// The pump of the socket attached now (the master's reader), with its
    /// attach number and its wake-up.
    attached: Option<(u64, Arc<Wake>)>,
    exit_code: Option<i32>,
    exited_at: Option<Instant>,
    /// The PTY's output has ended (every holder of its terminal is gone).
    reader_done: bool,
    last_activity: Instant,
    detached_at: Option<Instant>,
    hangup_at: Option<Instant>,
    /// `terminal.close` was called: the terminal is no longer found, while
    /// its shell is still being hung up.
    closed: bool,
    /// A UTF-8 sequence split across two `terminal.output` drains.
    carry: Vec<u8>,
    /// HTTP input the PTY has not taken yet (the `terminals` thread writes it).
    pending: Vec<u8>,
}

pub struct Term {
    id: String,
    project: String,
    /// The client-chosen ID that lets a WebSocket reattach.
    session: Option<String>,
    http: bool,
    started: Instant,
    pty: Pty,
    /// The PTY's master, non-blocking; read only by the reader named in the
    /// state, with the state locked.
    master: File,
    /// The `terminals` thread's wake-up (HTTP input left to write).
    keeper: Arc<Wake>,
    state: Mutex<State>,
    changed: Condvar,
}

impl Term {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn marker(&self) -> String {
        format!("AION_TERMINAL_ID={}", self.id)
    }

    pub fn id(&self) -> &str {
        &self.id
    }

    /// Input from a request, which must be answered: what the PTY does not
    /// take at once waits (the `terminals` thread writes it), and input is
    /// refused when the shell has not read what it was already sent.
    pub fn try_input(&self, bytes: &[u8]) -> Result<(), InputRefused> {
        let mut st = self.lock();
        if st.exit_code.is_some() || st.closed {
            return Err(InputRefused::Closed);
        }
        if st.pending.len() >= HTTP_INPUT_BYTES {
            return Err(InputRefused::Busy);
        }
        st.last_activity = Instant::now();
        st.pending.extend_from_slice(bytes);
        self.write_pending(&mut st);
        if !st.pending.is_empty() {
            self.keeper.wake();
        }
        Ok(())
    }

    /// Writes what the PTY takes of the waiting HTTP input.
    fn write_pending(&self, st: &mut State) {
        while !st.pending.is_empty() {
            match (&self.master).write(&st.pending) {
                Ok(0) => return,
                Ok(n) => {
                    st.pending.drain(..n);
                }
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) if e.kind() == ErrorKind::WouldBlock => return,
                Err(_) => st.pending.clear(),
            }
        }
    }

    /// Reads what the PTY has ready, up to `cap` bytes, onto `out` and into
    /// the ring. Only the master's reader calls it, with the state locked.
    /// True at the end of the output (`reader_done` is then set; the caller
    /// notifies `changed` once the lock is released).
    ///
    /// The reads happen under the lock on purpose: the master is
    /// non-blocking, so the lock is held for the copies of at most `cap`
    /// bytes (microseconds), and a socket that takes the terminal over
    /// (its snapshot of the ring is taken under the same lock) can then
    /// never miss a chunk that the previous reader had read but not yet
    /// put into the ring.
    fn read_ready(&self, st: &mut State, out: &mut Vec<u8>, cap: usize) -> bool {
        let start = out.len();
        let mut eof = false;
        while out.len() < start + cap {
            let len = out.len();
            out.resize((len + (16 << 10)).min(start + cap), 0);
            match (&self.master).read(&mut out[len..]) {
                Ok(n) if n > 0 => out.truncate(len + n),
                Err(e) if e.kind() == ErrorKind::Interrupted => out.truncate(len),
                Err(e) if e.kind() == ErrorKind::WouldBlock => {
                    out.truncate(len);
                    break;
                }
                _ => {
                    // EOF, or EIO once every holder of the slave is gone
                    out.truncate(len);
                    eof = true;
                    break;
                }
            }
        }
        if out.len() > start {
            st.ring.push(&out[start..]);
            st.last_activity = Instant::now();
        }
        if eof {
            st.reader_done = true;
        }
        eof
    }

    pub fn resize(&self, cols: u16, rows: u16) -> std::io::Result<()> {
        self.pty.resize(cols, rows)
    }

    pub fn alive(&self) -> bool {
        self.lock().exit_code.is_none()
    }

    /// SIGHUP to the shell's process group; the reaper sends SIGKILL after a grace.
    fn hang_up(&self) {
        let mut st = self.lock();
        if st.exit_code.is_none() && st.hangup_at.is_none() {
            st.hangup_at = Some(Instant::now());
            drop(st);
            self.pty.group.signal(Signal::SIGHUP);
        }
    }
}

/// One terminal as `status` shows it.
#[derive(Clone, Debug)]
pub struct TermSnapshot {
    pub id: String,
    pub project: String,
    /// The WebSocket session it was opened under (None: an HTTP terminal or none given).
    pub session: Option<String>,
    /// `http` (terminal.spawn) or `ws`.
    pub kind: &'static str,
    pub alive: bool,
    /// A WebSocket is attached now.
    pub attached: bool,
    pub age: Duration,
}

pub enum Refused {
    TooMany,
    Spawn(String),
}

pub enum InputRefused {
    /// The shell has not read the input it was sent.
    Busy,
    Closed,
}

pub struct Terminals {
    limits: Arc<LiveLimits>,
    all: Mutex<HashMap<String, Arc<Term>>>,
    next: AtomicU64,
    attaches: AtomicU64,
    /// Wakes the `terminals` thread (a terminal opened, detached, or has
    /// HTTP input waiting).
    keeper: Arc<Wake>,
    /// Opens one at a time, so the limit check and the insert are one step.
    /// True once the `terminals` thread runs: it starts with the first
    /// terminal (an idle connector without terminals has no thread waking up
    /// every second).
    opening: Mutex<bool>,
}

impl Terminals {
    pub fn new(limits: Arc<LiveLimits>) -> std::io::Result<Arc<Terminals>> {
        Ok(Arc::new(Terminals {
            limits,
            all: Mutex::new(HashMap::new()),
            next: AtomicU64::new(0),
            attaches: AtomicU64::new(0),
            keeper: Arc::new(Wake::new()?),
            opening: Mutex::new(false),
        }))
    }

    fn all(&self) -> MutexGuard<'_, HashMap<String, Arc<Term>>> {
        self.all.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A live WebSocket terminal of `project` opened under `session` (not
    /// one being hung up).
    pub fn find_session(&self, project: &str, session: &str) -> Option<Arc<Term>> {
        self.all()
            .values()
            .find(|t| {
                t.project == project && t.session.as_deref() == Some(session) && {
                    let st = t.lock();
                    st.exit_code.is_none() && st.hangup_at.is_none()
                }
            })
            .cloned()
    }

    /// An HTTP terminal of `project` by its id: a live one, or one whose
    /// shell exited less than 30 s ago (its last output can still be read);
    /// never one that `terminal.close` ended.
    pub fn find_http(&self, project: &str, id: &str) -> Option<Arc<Term>> {
        self.all().get(id).filter(|t| t.http && t.project == project && !t.lock().closed).cloned()
    }

    /// Every terminal not yet forgotten, by project then age (the registry
    /// lock is held to copy the list, each terminal's lock for its figures).
    pub fn snapshot(&self) -> Vec<TermSnapshot> {
        let all: Vec<Arc<Term>> = self.all().values().cloned().collect();
        let mut list: Vec<TermSnapshot> = all
            .iter()
            .filter_map(|t| {
                let st = t.lock();
                (!st.closed).then(|| TermSnapshot {
                    id: t.id.clone(),
                    project: t.project.clone(),
                    session: t.session.clone(),
                    kind: if t.http { "http" } else { "ws" },
                    alive: st.exit_code.is_none(),
                    attached: st.attached.is_some(),
                    age: t.started.elapsed(),
                })
            })
            .collect();
        list.sort_by(|a, b| (&a.project, b.age).cmp(&(&b.project, a.age)));
        list
    }

    /// Whether `project` may open one more terminal.
    pub fn room(&self, project: &str) -> bool {
        self.all().values().filter(|t| t.project == project && t.alive()).count()
            < self.limits.get().terminals_per_project
    }

    /// Starts a shell on a new PTY in the project dir.
    pub fn open(
        self: &Arc<Self>,
        project: &ProjectState,
        session: Option<&str>,
        http: bool,
        cols: u16,
        rows: u16,
    ) -> Result<Arc<Term>, Refused> {
        let mut keeper_running = self.opening.lock().unwrap_or_else(|p| p.into_inner());
        if !self.room(&project.config.id) {
            return Err(Refused::TooMany);
        }
        if !*keeper_running {
            // Without that thread nothing would read detached terminals or
            // end idle ones: no terminal opens until it runs.
            let keeper = Arc::clone(self);
            std::thread::Builder::new()
                .name("terminals".into())
                .stack_size(128 << 10)
                .spawn(move || keeper.keep_forever())
                .map_err(|e| Refused::Spawn(format!("cannot start the terminals thread: {e}")))?;
            *keeper_running = true;
        }
        let n = self.next.fetch_add(1, Ordering::Relaxed);
        let id = format!("t{}-{n}-{:x}", std::process::id(), crate::nonce::nonce());
        let shell =
            std::env::var("SHELL").ok().filter(|s| s.starts_with('/')).unwrap_or_else(|| "/bin/sh".into());
        let env = shell_env(&id);
        let args = vec!["-l".to_string()];
        let spec = Spawn { program: &shell, args: &args, cwd: &project.root, env: &env, cols, rows };
        let pty = Pty::spawn(&spec).map_err(|e| Refused::Spawn(format!("cannot start {shell}: {e}")))?;
        let master = match pty.clone_master().and_then(|m| set_nonblocking(&m).map(|()| m)) {
            Ok(m) => m,
            Err(e) => {
                pty.group.signal(Signal::SIGKILL);
                return Err(Refused::Spawn(e.to_string()));
            }
        };
        let cap = if http { HTTP_BUFFER_BYTES } else { REPLAY_BYTES };
        let term = Arc::new(Term {
            id: id.clone(),
            project: project.config.id.clone(),
            session: session.map(str::to_string),
            http,
            started: Instant::now(),
            pty,
            master,
            keeper: Arc::clone(&self.keeper),
            state: Mutex::new(State {
                ring: Ring { bytes: VecDeque::new(), cap, dropped: 0 },
                attached: None,
                exit_code: None,
                exited_at: None,
                reader_done: false,
                last_activity: Instant::now(),
                detached_at: None,
                hangup_at: None,
                closed: false,
                carry: Vec::new(),
                pending: Vec::new(),
            }),
            changed: Condvar::new(),
        });
        let t = Arc::clone(&term);
        let spawned_waiter = std::thread::Builder::new()
            .name(format!("term-wait-{n}"))
            .stack_size(64 << 10)
            .spawn(move || wait_shell(&t));
        if spawned_waiter.is_err() {
            term.pty.group.signal(Signal::SIGKILL);
            return Err(Refused::Spawn("cannot start the terminal's thread".into()));
        }
        info!(
            "terminal {id} project={} opened ({}, pid {})",
            project.config.id,
            if http { "http" } else { "websocket" },
            term.pty.group.pid()
        );
        self.all().insert(id, Arc::clone(&term));
        self.keeper.wake();
        Ok(term)
    }

    /// Ends an HTTP terminal (`terminal.close`): it is gone for every later
    /// call at once; its shell is hung up (SIGHUP, SIGKILL after a grace) and
    /// reaped in the background.
    pub fn close(&self, term: &Term) {
        term.lock().closed = true;
        term.hang_up();
    }

    /// Shutdown: every shell gets SIGHUP (the reaper follows up with SIGKILL).
    pub fn close_all(&self) {
        let terms: Vec<Arc<Term>> = self.all().values().cloned().collect();
        for t in terms {
            t.hang_up();
        }
    }

    /// At the end of shutdown: what ignored the SIGHUP of `close_all` is
    /// killed, with everything it started, so no shell outlives the connector.
    pub fn finish(&self) {
        let deadline = Instant::now() + HANGUP_GRACE;
        let terms: Vec<Arc<Term>> = self.all().values().cloned().collect();
        while terms.iter().any(|t| t.alive()) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        for t in terms.iter().filter(|t| t.alive()) {
            t.pty.group.signal(Signal::SIGKILL);
            process::supervise::sweep(&t.marker(), Duration::ZERO);
        }
    }

    /// `terminal.output`: what was buffered since the last call.
    pub fn drain(&self, term: &Term) -> (String, bool, u64) {
        let mut st = term.lock();
        st.last_activity = Instant::now();
        let bytes: Vec<u8> = st.ring.bytes.drain(..).collect();
        let dropped = std::mem::take(&mut st.ring.dropped);
        let mut carry = std::mem::take(&mut st.carry);
        let text = crate::text::utf8_chunk(&mut carry, &bytes);
        st.carry = carry;
        (text, st.exit_code.is_none(), dropped)
    }

    /// Serves an upgraded connection on `term` until the socket or the shell
    /// ends (on the connection's own thread): answers the 101, then pumps.
    /// Output goes as text frames unless `text` is false.
    pub fn serve_socket<L: Link>(
        &self,
        term: Arc<Term>,
        link: L,
        key: &str,
        text: bool,
        protocol: Option<&str>,
    ) {
        let Ok(sock) = Socket::accept(link, key, text, protocol) else {
            return;
        };
        pump::run(self, &term, sock, self.limits.get().ws_ping);
    }

    /// The `terminals` thread: reads the PTYs that no socket reads, writes
    /// waiting HTTP input, and once a second does the reaper's rounds.
    fn keep_forever(&self) {
        let mut next_round = Instant::now() + Duration::from_secs(1);
        let mut buf: Vec<u8> = Vec::with_capacity(KEEPER_TURN_BYTES);
        loop {
            // Cleared before looking, so a wake-up sent meanwhile is not lost.
            self.keeper.clear();
            let terms: Vec<Arc<Term>> = self.all().values().cloned().collect();
            let mut watched: Vec<(&Arc<Term>, PollFlags)> = Vec::new();
            for t in &terms {
                let st = t.lock();
                let mut want = PollFlags::empty();
                if st.attached.is_none() && !st.reader_done {
                    want |= PollFlags::POLLIN;
                }
                if !st.pending.is_empty() {
                    want |= PollFlags::POLLOUT;
                }
                if !want.is_empty() {
                    watched.push((t, want));
                }
            }
            let mut fds: Vec<PollFd<'_>> =
                watched.iter().map(|(t, want)| PollFd::new(t.master.as_fd(), *want)).collect();
            fds.push(PollFd::new(self.keeper.fd(), PollFlags::POLLIN));
            let left = next_round.saturating_duration_since(Instant::now());
            let ms =
                PollTimeout::try_from(left.as_millis().clamp(1, 1000) as i32).unwrap_or(PollTimeout::MAX);
            if let Err(e) = poll(&mut fds, ms)
                && e != nix::errno::Errno::EINTR
            {
                warn!("terminals: poll: {e}");
                std::thread::sleep(Duration::from_millis(100));
            }
            let ready: Vec<PollFlags> =
                fds.iter().take(watched.len()).map(|fd| fd.revents().unwrap_or(PollFlags::empty())).collect();
            drop(fds);
            for ((t, _), got) in watched.iter().zip(ready) {
                if got.is_empty() {
                    continue;
                }
                let mut st = t.lock();
                if !st.pending.is_empty() {
                    t.write_pending(&mut st);
                }
                // A socket may have attached since the poll: then it reads.
                if st.attached.is_none() && !st.reader_done {
                    buf.clear();
                    let eof = t.read_ready(&mut st, &mut buf, KEEPER_TURN_BYTES);
                    drop(st);
                    if eof {
                        t.changed.notify_all();
                    }
                }
            }
            if Instant::now() >= next_round {
                self.reap(Instant::now());
                next_round = Instant::now() + Duration::from_secs(1);
            }
        }
    }

    /// SIGKILL what ignored SIGHUP, end detached and idle terminals, forget
    /// exited ones.
    fn reap(&self, now: Instant) {
        let terms: Vec<Arc<Term>> = self.all().values().cloned().collect();
        let limits = self.limits.get();
        let mut forget = Vec::new();
        for t in terms {
            let verdict = verdict(&t.lock(), t.http, &limits, now);
            match verdict {
                Verdict::Keep => {}
                Verdict::Forget => forget.push(t.id.clone()),
                Verdict::Kill => t.pty.group.signal(Signal::SIGKILL),
                Verdict::HangUp(why) => {
                    info!("terminal {} project={}: {why} too long, hanging up", t.id, t.project);
                    t.hang_up();
                }
            }
        }
        let mut all = self.all();
        for id in forget {
            all.remove(&id);
        }
    }
}

/// What the reaper does with a terminal at `now`.
#[derive(Debug, PartialEq)]
enum Verdict {
    Keep,
    /// Exited (and, for an HTTP terminal not closed, 30 s ago): drop it.
    Forget,
    /// Hung up a grace ago and still there.
    Kill,
    /// Detached or idle too long.
    HangUp(&'static str),
}

fn verdict(st: &State, http: bool, limits: &Limits, now: Instant) -> Verdict {
    let keep_exited = if http && !st.closed { HTTP_KEEP_AFTER_EXIT } else { Duration::ZERO };
    if st.exited_at.is_some_and(|at| now - at >= keep_exited) && st.attached.is_none() {
        return Verdict::Forget;
    }
    if st.exit_code.is_some() {
        return Verdict::Keep;
    }
    if st.hangup_at.is_some_and(|at| now - at >= HANGUP_GRACE) {
        return Verdict::Kill;
    }
    if st.hangup_at.is_some() {
        return Verdict::Keep;
    }
    if st.detached_at.is_some_and(|at| now - at >= limits.terminal_detach) {
        return Verdict::HangUp("detached");
    }
    if now - st.last_activity >= limits.terminal_idle {
        return Verdict::HangUp("idle");
    }
    Verdict::Keep
}

/// The waiter thread: reaps the shell (that child only), ends what it left
/// behind, lets the last output be read, then marks the terminal exited and
/// wakes its pump, which closes the socket with 1000.
fn wait_shell(term: &Term) {
    let code = match term.pty.group.wait() {
        Ok(status) => status
            .code()
            .unwrap_or_else(|| 128 + std::os::unix::process::ExitStatusExt::signal(&status).unwrap_or(0)),
        Err(e) => {
            warn!("terminal {}: cannot wait for its shell: {e}", term.id);
            -1
        }
    };
    process::supervise::sweep(&term.marker(), HANGUP_GRACE);
    let mut st = term.lock();
    let deadline = Instant::now() + Duration::from_secs(2);
    while !st.reader_done && Instant::now() < deadline {
        st = term
            .changed
            .wait_timeout(st, Duration::from_millis(100))
            .map(|(g, _)| g)
            .unwrap_or_else(|p| p.into_inner().0);
    }
    if term.http {
        // The original's last words of an HTTP terminal, read by `terminal.output`.
        st.ring.push(EXITED_MARKER);
    }
    st.exit_code = Some(code);
    st.exited_at = Some(Instant::now());
    st.pending.clear();
    let pump = st.attached.as_ref().map(|(_, wake)| Arc::clone(wake));
    drop(st);
    info!("terminal {} project={}: shell exited ({code})", term.id, term.project);
    if let Some(wake) = pump {
        wake.wake();
    }
}

/// Whether a client frame (text or binary, as the original does not tell
/// them apart) is a resize message `{"type":"resize","cols":C,"rows":R}`: it
/// starts with `{`, parses as JSON and says `"type":"resize"`. None: it is
/// keystrokes. Some(Err): a resize message whose sizes are not integers
/// 1-10000, refused, and never typed into the shell (where the original
/// typed such a message when a size was 0 or missing).
fn parse_resize(bytes: &[u8]) -> Option<Result<(u16, u16), &'static str>> {
    if bytes.first() != Some(&b'{') || !bytes.windows(6).any(|w| w == b"resize") {
        return None;
    }
    let v: serde_json::Value = serde_json::from_slice(bytes).ok()?;
    if v.get("type")?.as_str()? != "resize" {
        return None;
    }
    let dim = |k: &str| {
        let n = v.get(k)?;
        let whole =
            n.as_u64().or_else(|| n.as_f64().filter(|f| f.fract() == 0.0 && *f >= 1.0).map(|f| f as u64));
        whole.filter(|n| (1..=10_000).contains(n)).map(|n| n as u16)
    };
    Some(match (dim("cols"), dim("rows")) {
        (Some(cols), Some(rows)) => Ok((cols, rows)),
        _ => Err("cols and rows must be integers 1-10000"),
    })
}

fn set_nonblocking(file: &File) -> std::io::Result<()> {
    use nix::fcntl::{FcntlArg, OFlag, fcntl};
    let flags = OFlag::from_bits_truncate(fcntl(file, FcntlArg::F_GETFL)?);
    fcntl(file, FcntlArg::F_SETFL(flags | OFlag::O_NONBLOCK))?;
    Ok(())
}

/// The connector's environment for the shell, without the connector's own
/// secrets (poll mode's token) and internal variables, with TERM set and the
/// terminal's marker, by which what it leaves behind is found at the end.
fn shell_env(id: &str) -> Vec<(String, String)> {
    let mut env: Vec<(String, String)> = std::env::vars()
        .filter(|(k, _)| k != "AGENT_TOKEN" && !k.starts_with("AION_") && k != "TERM")
        .collect();
    env.push(("TERM".into(), "xterm-256color".into()));
    env.push(("COLORTERM".into(), "truecolor".into()));
    env.push(("AION_TERMINAL_ID".into(), id.into()));
    if let Some(mark) = crate::process::instance::mark() {
        env.push((crate::process::instance::VAR.into(), mark.into()));
    }
    env
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ring_keeps_the_newest_and_counts_the_rest() {
        let mut r = Ring { bytes: VecDeque::new(), cap: 4, dropped: 0 };
        r.push(b"abc");
        r.push(b"def");
        assert_eq!(r.bytes.iter().copied().collect::<Vec<_>>(), b"cdef");
        assert_eq!(r.dropped, 2);
        r.push(b"0123456789");
        assert_eq!(r.bytes.iter().copied().collect::<Vec<_>>(), b"6789");
        assert_eq!(r.dropped, 12);
    }

    #[test]
    fn resize_messages() {
        let parse = |s: &str| parse_resize(s.as_bytes());
        assert_eq!(parse(r#"{"type":"resize","cols":120,"rows":40}"#), Some(Ok((120, 40))));
        assert_eq!(parse(r#"{"rows":1,"cols":10000,"type":"resize"}"#), Some(Ok((10000, 1))));
        assert_eq!(parse(r#"{"type":"resize","cols":80.0,"rows":24}"#), Some(Ok((80, 24))));
        // resize messages with bad sizes: refused, not keystrokes
        for bad in [
            r#"{"type":"resize","cols":0,"rows":40}"#,
            r#"{"type":"resize","cols":10001,"rows":40}"#,
            r#"{"type":"resize","cols":-3,"rows":40}"#,
            r#"{"type":"resize","cols":80.5,"rows":40}"#,
            r#"{"type":"resize","cols":"80","rows":40}"#,
            r#"{"type":"resize","cols":80}"#,
            r#"{"type":"resize"}"#,
        ] {
            assert!(matches!(parse(bad), Some(Err(_))), "{bad}");
        }
        // keystrokes: not JSON, not a resize, or not starting with `{`
        for keys in [
            "ls\r",
            r#"{"type":"resize""#,
            r#"{"type":"other","cols":1,"rows":1}"#,
            r#" {"type":"resize","cols":1,"rows":1}"#,
            r#"["resize"]"#,
        ] {
            assert_eq!(parse(keys), None, "{keys}");
        }
    }

    fn state(now: Instant) -> State {
        State {
            ring: Ring { bytes: VecDeque::new(), cap: 16, dropped: 0 },
            attached: None,
            exit_code: None,
            exited_at: None,
            reader_done: false,
            last_activity: now,
            detached_at: None,
            hangup_at: None,
            closed: false,
            carry: Vec::new(),
            pending: Vec::new(),
        }
    }

    #[test]
    fn an_exited_http_terminal_is_kept_30_s_then_forgotten() {
        let limits = Limits::default();
        let t0 = Instant::now();
        let mut st = state(t0);
        st.exit_code = Some(0);
        st.exited_at = Some(t0);
        let at = |s: u64| t0 + Duration::from_secs(s);
        assert_eq!(verdict(&st, true, &limits, at(0)), Verdict::Keep);
        assert_eq!(verdict(&st, true, &limits, at(29)), Verdict::Keep);
        assert_eq!(verdict(&st, true, &limits, at(30)), Verdict::Forget);
        // a WebSocket terminal, or a closed HTTP one, goes at once
        assert_eq!(verdict(&st, false, &limits, at(0)), Verdict::Forget);
        st.closed = true;
        assert_eq!(verdict(&st, true, &limits, at(0)), Verdict::Forget);
    }

    #[test]
    fn the_reaper_hangs_up_detached_and_idle_terminals_and_kills_after_the_grace() {
        let limits = Limits::default();
        let t0 = Instant::now();
        let mut st = state(t0);
        assert_eq!(verdict(&st, false, &limits, t0 + limits.terminal_idle / 2), Verdict::Keep);
        assert_eq!(verdict(&st, false, &limits, t0 + limits.terminal_idle), Verdict::HangUp("idle"));
        st.detached_at = Some(t0);
        assert_eq!(verdict(&st, false, &limits, t0 + limits.terminal_detach), Verdict::HangUp("detached"));
        st.hangup_at = Some(t0);
        assert_eq!(verdict(&st, false, &limits, t0 + HANGUP_GRACE / 2), Verdict::Keep);
        assert_eq!(verdict(&st, false, &limits, t0 + HANGUP_GRACE), Verdict::Kill);
    }
}
