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
//! Threads, all named:
//! - per terminal `term-out-N`: the PTY reader; copies output into the ring
//!   and to the attached socket's writer through a small bounded channel, so
//!   a slow client stops the reading (flow control); ends at the PTY's EOF;
//! - `term-in-N`: writes keystrokes (owns the receiver of the input
//!   channel); ends when the terminal is dropped or the PTY refuses input;
//! - `term-wait-N`: reaps the shell, ends what it left, tells the socket;
//!   ends with the shell;
//! - per attached socket: the frame reader is the HTTP connection's own
//!   thread, `term-ws-out` (scoped) writes frames and pings; both end with
//!   the socket;
//! - `terminal-reaper`, one per connector, started with the first terminal:
//!   ends detached, idle and exited terminals; runs until the process exits.

use crate::config::Limits;
use crate::logging::{info, warn};
use crate::net::ws::{self, In, Out};
use crate::process;
use crate::process::pty::{Pty, Spawn};
use crate::project::ProjectState;
use crossbeam_channel::{RecvTimeoutError, Sender};
use nix::sys::signal::Signal;
use std::collections::{HashMap, VecDeque};
use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

const REPLAY_BYTES: usize = 64 << 10;
const HTTP_BUFFER_BYTES: usize = 1 << 20;
const HTTP_KEEP_AFTER_EXIT: Duration = Duration::from_secs(30);
const HANGUP_GRACE: Duration = Duration::from_secs(2);
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

struct State {
    ring: Ring,
    /// The writer of the socket attached now, with its attach number.
    attached: Option<(u64, Sender<Out>)>,
    exit_code: Option<i32>,
    exited_at: Option<Instant>,
    reader_done: bool,
    last_activity: Instant,
    detached_at: Option<Instant>,
    hangup_at: Option<Instant>,
    /// `terminal.close` was called: the terminal is no longer found, while
    /// its shell is still being hung up.
    closed: bool,
    /// A UTF-8 sequence split across two `terminal.output` drains.
    carry: Vec<u8>,
}

pub struct Term {
    id: String,
    project: String,
    /// The client-chosen ID that lets a WebSocket reattach.
    session: Option<String>,
    http: bool,
    pty: Pty,
    /// Keystrokes for the PTY; the terminal's input thread owns the receiver,
    /// so a shell that does not read blocks that thread, not a request.
    input: Sender<Vec<u8>>,
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

    /// Input from the terminal's own socket: waits while the shell is behind
    /// (the socket's reading pauses with it).
    pub fn input(&self, bytes: &[u8]) -> std::io::Result<()> {
        self.lock().last_activity = Instant::now();
        self.input.send(bytes.to_vec()).map_err(|_| std::io::ErrorKind::BrokenPipe.into())
    }

    /// Input from a request, which must be answered: refused at once when
    /// the shell is not reading what it was already sent.
    pub fn try_input(&self, bytes: &[u8]) -> Result<(), InputRefused> {
        {
            let mut st = self.lock();
            if st.exit_code.is_some() || st.closed {
                return Err(InputRefused::Closed);
            }
            st.last_activity = Instant::now();
        }
        self.input.try_send(bytes.to_vec()).map_err(|e| match e {
            crossbeam_channel::TrySendError::Full(_) => InputRefused::Busy,
            crossbeam_channel::TrySendError::Disconnected(_) => InputRefused::Closed,
        })
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
    limits: Limits,
    all: Mutex<HashMap<String, Arc<Term>>>,
    next: AtomicU64,
    attaches: AtomicU64,
    /// Opens one at a time, so the limit check and the insert are one step.
    /// True once the reaper thread runs: it starts with the first terminal
    /// (an idle connector without terminals has no thread waking up every
    /// second).
    opening: Mutex<bool>,
}

impl Terminals {
    pub fn new(limits: Limits) -> Arc<Terminals> {
        Arc::new(Terminals {
            limits,
            all: Mutex::new(HashMap::new()),
            next: AtomicU64::new(0),
            attaches: AtomicU64::new(0),
            opening: Mutex::new(false),
        })
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

    /// Whether `project` may open one more terminal.
    pub fn room(&self, project: &str) -> bool {
        self.all().values().filter(|t| t.project == project && t.alive()).count()
            < self.limits.terminals_per_project
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
        let mut reaper_running = self.opening.lock().unwrap_or_else(|p| p.into_inner());
        if !self.room(&project.config.id) {
            return Err(Refused::TooMany);
        }
        if !*reaper_running {
            // Without the reaper nothing would end detached or idle terminals:
            // no terminal opens until it runs.
            let reaper = Arc::clone(self);
            std::thread::Builder::new()
                .name("terminal-reaper".into())
                .stack_size(128 << 10)
                .spawn(move || reaper.reap_forever())
                .map_err(|e| Refused::Spawn(format!("cannot start the terminal reaper: {e}")))?;
            *reaper_running = true;
        }
        let n = self.next.fetch_add(1, Ordering::Relaxed);
        let id = format!("t{}-{n}-{:x}", std::process::id(), crate::nonce::nonce());
        let shell =
            std::env::var("SHELL").ok().filter(|s| s.starts_with('/')).unwrap_or_else(|| "/bin/sh".into());
        let env = shell_env(&id);
        let args = vec!["-l".to_string()];
        let spec = Spawn { program: &shell, args: &args, cwd: &project.root, env: &env, cols, rows };
        let pty = Pty::spawn(&spec).map_err(|e| Refused::Spawn(format!("cannot start {shell}: {e}")))?;
        let cap = if http { HTTP_BUFFER_BYTES } else { REPLAY_BYTES };
        let (input, keystrokes) = crossbeam_channel::bounded::<Vec<u8>>(64);
        let term = Arc::new(Term {
            input,
            id: id.clone(),
            project: project.config.id.clone(),
            session: session.map(str::to_string),
            http,
            pty,
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
            }),
            changed: Condvar::new(),
        });
        let reader = term.pty.clone_master().map_err(|e| Refused::Spawn(e.to_string()))?;
        let mut writer = term.pty.clone_master().map_err(|e| Refused::Spawn(e.to_string()))?;
        let spawned_input =
            std::thread::Builder::new().name(format!("term-in-{n}")).stack_size(64 << 10).spawn(move || {
                for bytes in keystrokes {
                    if writer.write_all(&bytes).is_err() {
                        return;
                    }
                }
            });
        let t = Arc::clone(&term);
        let spawned_reader = std::thread::Builder::new()
            .name(format!("term-out-{n}"))
            .stack_size(128 << 10)
            .spawn(move || copy_output(&t, reader));
        let t = Arc::clone(&term);
        let spawned_waiter = std::thread::Builder::new()
            .name(format!("term-wait-{n}"))
            .stack_size(128 << 10)
            .spawn(move || wait_shell(&t));
        if spawned_reader.is_err() || spawned_waiter.is_err() || spawned_input.is_err() {
            term.pty.group.signal(Signal::SIGKILL);
            return Err(Refused::Spawn("cannot start the terminal's threads".into()));
        }
        info!(
            "terminal {id} project={} opened ({}, pid {})",
            project.config.id,
            if http { "http" } else { "websocket" },
            term.pty.group.pid()
        );
        self.all().insert(id, Arc::clone(&term));
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

    /// Serves an upgraded connection on `term` until the socket or the shell ends.
    /// The socket first gets what the ring holds: for a reattach the last
    /// 64 KiB, for a new terminal what its shell printed before the socket
    /// was attached (its first prompt), which would be lost otherwise.
    pub fn serve_socket(&self, term: Arc<Term>, mut stream: TcpStream, key: &str, text: bool) {
        let head = format!(
            "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: {}\r\n\r\n",
            ws::accept_key(key)
        );
        if stream.write_all(head.as_bytes()).is_err() {
            return;
        }
        let ping = self.limits.ws_ping;
        let (tx, rx) = crossbeam_channel::bounded::<Out>(4);
        let Ok((mut reader, mut writer)) =
            ws::split(stream, tx.clone(), text, ping * 2 + Duration::from_secs(5))
        else {
            return;
        };
        let attach = self.attaches.fetch_add(1, Ordering::Relaxed);
        let (snapshot, exited) = {
            let mut st = term.lock();
            if let Some((_, previous)) = st.attached.replace((attach, tx.clone())) {
                // Another socket had it: that one is closed, this one takes over.
                let _ = previous.try_send(Out::Close(4000));
            }
            st.detached_at = None;
            st.last_activity = Instant::now();
            let snapshot: Vec<u8> = st.ring.bytes.iter().copied().collect();
            (snapshot, st.exit_code.is_some())
        };
        if exited {
            let _ = tx.try_send(Out::Close(1000));
        }
        drop(tx);
        let reader_finished = std::sync::atomic::AtomicBool::new(false);
        std::thread::scope(|scope| {
            let writer_thread = std::thread::Builder::new()
                .name("term-ws-out".into())
                .stack_size(128 << 10)
                .spawn_scoped(scope, || {
                    if !snapshot.is_empty() && writer.send(Out::Data(snapshot)).is_err() {
                        writer.shutdown();
                        return;
                    }
                    let mut closed = false;
                    // A ping every interval, busy or not: the reader drops a peer
                    // that has said nothing for two intervals, and a client that
                    // only watches output says nothing but pongs.
                    let mut next_ping = Instant::now() + ping;
                    loop {
                        if Instant::now() >= next_ping {
                            if writer.ping().is_err() {
                                break;
                            }
                            next_ping = Instant::now() + ping;
                        }
                        let out = match rx.recv_timeout(next_ping.saturating_duration_since(Instant::now())) {
                            Ok(out) => out,
                            Err(RecvTimeoutError::Timeout) => continue,
                            Err(RecvTimeoutError::Disconnected) => break,
                        };
                        closed = matches!(out, Out::Close(_));
                        if writer.send(out).is_err() || closed {
                            break;
                        }
                    }
                    if closed {
                        // Give the client a moment to answer the close, then end it.
                        let until = Instant::now() + Duration::from_secs(3);
                        while !reader_finished.load(Ordering::SeqCst) && Instant::now() < until {
                            std::thread::sleep(Duration::from_millis(10));
                        }
                    }
                    writer.shutdown();
                });
            while let Some(msg) = reader.next() {
                let result = match msg {
                    In::Binary(bytes) => client_frame(&term, &bytes),
                    In::Text(text) => client_frame(&term, text.as_bytes()),
                };
                if result.is_err() {
                    break;
                }
            }
            reader_finished.store(true, Ordering::SeqCst);
            // The socket is done: detach so the PTY reader stops feeding it.
            {
                let mut st = term.lock();
                if st.attached.as_ref().is_some_and(|(n, _)| *n == attach) {
                    st.attached = None;
                    st.detached_at = Some(Instant::now());
                }
            }
            drop(reader); // its sender clone: the writer's channel can now close
            if let Ok(handle) = writer_thread {
                let _ = handle.join();
            }
        });
        if term.session.is_none() {
            term.hang_up(); // the original's behaviour: the shell ends with its socket
        }
    }

    /// Once a second: SIGKILL what ignored SIGHUP, end detached and idle
    /// terminals, forget exited ones.
    fn reap_forever(&self) {
        loop {
            std::thread::sleep(Duration::from_secs(1));
            let now = Instant::now();
            let terms: Vec<Arc<Term>> = self.all().values().cloned().collect();
            let mut forget = Vec::new();
            for t in terms {
                let verdict = verdict(&t.lock(), t.http, &self.limits, now);
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

/// The PTY reader thread: output into the ring and to the attached socket.
/// Sending blocks while the socket's writer is behind, and then nothing more
/// is read from the PTY: the shell waits instead of memory growing.
fn copy_output(term: &Term, mut master: std::fs::File) {
    let mut buf = vec![0u8; 16 << 10];
    loop {
        let n = match master.read(&mut buf) {
            Ok(0) | Err(_) => break, // EIO once every holder of the slave is gone
            Ok(n) => n,
        };
        let to = {
            let mut st = term.lock();
            st.ring.push(&buf[..n]);
            st.last_activity = Instant::now();
            st.attached.as_ref().map(|(_, tx)| tx.clone())
        };
        if let Some(tx) = to {
            let _ = tx.send(Out::Data(buf[..n].to_vec()));
        }
    }
    term.lock().reader_done = true;
    term.changed.notify_all();
}

/// The waiter thread: reaps the shell (that child only), ends what it left
/// behind, lets the last output through, then closes the socket with 1000.
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
    let attached = st.attached.take();
    drop(st);
    info!("terminal {} project={}: shell exited ({code})", term.id, term.project);
    if let Some((_, tx)) = attached {
        let _ = tx.send_timeout(Out::Close(1000), Duration::from_secs(5));
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

/// A frame from the terminal's socket: keystrokes, or a resize.
fn client_frame(term: &Term, bytes: &[u8]) -> std::io::Result<()> {
    match parse_resize(bytes) {
        None => term.input(bytes),
        Some(Ok((cols, rows))) => term.resize(cols, rows),
        Some(Err(why)) => {
            info!("terminal {} project={}: resize refused ({why})", term.id, term.project);
            Ok(())
        }
    }
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
