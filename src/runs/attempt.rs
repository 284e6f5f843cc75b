//! One attempt of a run: the agent's process in its own group, its output
//! fed line by line to the run thread, the idle rule (30 s by default, not
//! while a tool call is open), and its end:
//! when the turn is over (end_turn, or idle after some text) the process gets
//! a moment to exit by itself and is then ended; a stop, the run's timeout or
//! shutdown ends it at once; once the leader is gone whatever carries the
//! run's marker is swept and the pipes are drained (briefly) and released.
//!
//! Threads of an attempt (scoped: all joined before [`run`] returns), named
//! after the run id:
//! - `run-out-ID` reads stdout into [`Feed::Line`]s; ends at end of file, when
//!   released, or when the run thread stops listening;
//! - `run-err-ID` reads stderr into [`Feed::Stderr`] chunks; ends likewise;
//! - `run-wait-ID` waits for the leader and sends [`Feed::Exited`];
//! - `run-ctl-ID` owns nothing but a clone of the run's control receiver and
//!   the attempt's [`Ending`] receiver: it ends the group on a stop, the
//!   timeout or shutdown, or after the turn is over; returns once the leader
//!   has exited.

use super::Control;
use crate::logging::{error, info};
use crate::process::group::Group;
use crate::process::supervise::{self, Child, DRAIN_AFTER_EXIT};
use crossbeam_channel::{Receiver, RecvTimeoutError, Sender};
use std::io::{BufRead, BufReader, Read};
use std::process::{Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

/// How long acpx may linger after its turn is over before its group is ended.
pub const LINGER: Duration = Duration::from_secs(1);
/// The longest stdout line read in one piece.
const LINE_MAX: usize = 1 << 20;
/// How much of stderr is kept for an error message.
const STDERR_HEAD: usize = 8 << 10;
/// What acpx says on stderr when its session must be reconnected.
const RECONNECT: &[u8] = b"needs reconnect";

/// What the readers and the waiter tell the run thread (which owns the receiver).
enum Feed {
    Line(Vec<u8>),
    OutEnd,
    Stderr(Vec<u8>),
    ErrEnd,
    Exited(std::io::Result<ExitStatus>),
}

/// What the run thread tells the attempt's control thread (which owns the receiver).
enum Ending {
    /// The turn is over: let the process linger a moment, then end it.
    TurnOver,
    /// The leader has exited: nothing left to end.
    Exited,
}

/// Why an attempt was cut short.
#[derive(Clone, Copy, Debug)]
pub enum Cut {
    Stopped,
    Shutdown,
    TimedOut(Duration),
}

/// How the run reads the agent's output.
pub trait Reader {
    /// One stdout line (without its line end); true: the turn is over.
    fn line(&mut self, line: &[u8]) -> bool;
    /// Whether some text came, no tool call is under way and the turn is not
    /// over (the idle rule is armed).
    fn idle_armed(&self) -> bool;
    /// The idle rule fired: the turn is over.
    fn idle(&mut self);
}

pub struct Setup<'a> {
    pub cmd: Command,
    pub id: &'a str,
    pub session: &'a str,
    /// `project=P agent=A`, for the log.
    pub label: &'a str,
    pub control: &'a Receiver<Control>,
    /// When the run as a whole times out, and its timeout.
    pub deadline: Instant,
    pub timeout: Duration,
    /// Silence (no stdout, no stderr) after some text that ends a turn.
    pub idle: Duration,
    /// The polite first step of a stop (`acpx cancel`).
    pub cancel: Option<Command>,
    pub grace: Duration,
}

pub struct Outcome {
    /// How the leader ended (Err: it could not be started or waited for).
    pub status: std::io::Result<ExitStatus>,
    pub cut: Option<Cut>,
    /// The turn was taken as over (end_turn or idle).
    pub turn_over: bool,
    /// The first bytes of stderr.
    pub stderr: Vec<u8>,
    /// stderr said `needs reconnect`.
    pub reconnect: bool,
    pub spawned: bool,
}

impl Outcome {
    fn not_started(e: std::io::Error) -> Outcome {
        Outcome {
            status: Err(e),
            cut: None,
            turn_over: false,
            stderr: Vec::new(),
            reconnect: false,
            spawned: false,
        }
    }
}

/// The first bytes of stderr, and whether it said `needs reconnect` anywhere.
#[derive(Default)]
struct Stderr {
    head: Vec<u8>,
    carry: Vec<u8>,
    reconnect: bool,
}

impl Stderr {
    fn push(&mut self, chunk: &[u8]) {
        let room = STDERR_HEAD.saturating_sub(self.head.len());
        self.head.extend_from_slice(&chunk[..chunk.len().min(room)]);
        if !self.reconnect {
            self.carry.extend_from_slice(chunk);
            self.reconnect = self.carry.windows(RECONNECT.len()).any(|w| w == RECONNECT);
            let keep = RECONNECT.len() - 1;
            if self.carry.len() > keep {
                self.carry.drain(..self.carry.len() - keep);
            }
        }
    }
}

/// Runs one attempt to its end.
pub fn run(mut setup: Setup<'_>, reader: &mut dyn Reader) -> Outcome {
    setup.cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
    let child = match Child::spawn(&mut setup.cmd, "AION_RUN_ID", setup.id) {
        Ok(c) => c,
        Err(e) => return Outcome::not_started(e),
    };
    let (id, session) = (setup.id, setup.session);
    info!("run {session} {} started (pid {})", setup.label, child.pid());
    let (feed_tx, feed_rx) = crossbeam_channel::bounded::<Feed>(128);
    let (end_tx, end_rx) = crossbeam_channel::unbounded::<Ending>();
    let mut stderr = Stderr::default();
    let mut turn_over = false;
    let mut exited: Option<std::io::Result<ExitStatus>> = None;
    let cut = std::thread::scope(|scope| {
        let group: &Group = &child.group;
        let control = setup.control.clone();
        let (deadline, timeout, grace, cancel) =
            (setup.deadline, setup.timeout, setup.grace, setup.cancel.take());
        let controller = std::thread::Builder::new()
            .name(format!("run-ctl-{id}"))
            .stack_size(128 << 10)
            .spawn_scoped(scope, move || {
                controls(&control, &end_rx, group, deadline, timeout, cancel, grace)
            });
        if let Err(e) = &controller {
            // Without a controller neither stop nor the timeout can end the
            // agent: refuse to run it unsupervised.
            error!("run {session}: cannot start its control thread: {e}");
            group.signal(nix::sys::signal::Signal::SIGKILL);
        }
        let mut started = 0;
        if let Some(out) = child.stdout() {
            let tx = feed_tx.clone();
            let spawned = std::thread::Builder::new()
                .name(format!("run-out-{id}"))
                .stack_size(256 << 10)
                .spawn_scoped(scope, move || read_lines(out, &tx));
            started += usize::from(spawned.is_ok());
        }
        if let Some(err) = child.stderr() {
            let tx = feed_tx.clone();
            let spawned = std::thread::Builder::new()
                .name(format!("run-err-{id}"))
                .stack_size(128 << 10)
                .spawn_scoped(scope, move || read_chunks(err, &tx));
            started += usize::from(spawned.is_ok());
        }
        let (out_err, wait_tx, leader) = (started == 2, feed_tx.clone(), &child);
        let waiter = std::thread::Builder::new()
            .name(format!("run-wait-{id}"))
            .stack_size(64 << 10)
            .spawn_scoped(scope, move || {
                let _ = wait_tx.send(Feed::Exited(leader.wait()));
            });
        drop(feed_tx);
        let (mut out_open, mut err_open) = (out_err, out_err);
        if !out_err || waiter.is_err() {
            error!("run {session}: cannot start the threads that read and wait for the agent");
            group.signal(nix::sys::signal::Signal::SIGKILL);
            (out_open, err_open) = (false, false);
            if waiter.is_err() {
                exited = Some(child.wait());
            }
        }
        let mut drain_until = exited.is_some().then(|| Instant::now() + DRAIN_AFTER_EXIT);
        let (mut last_activity, idle) = (Instant::now(), setup.idle);
        loop {
            let now = Instant::now();
            if let Some(until) = drain_until
                && ((!out_open && !err_open) || now >= until)
            {
                break;
            }
            let wait = match drain_until {
                Some(until) => until - now,
                None if !turn_over && reader.idle_armed() => {
                    (last_activity + idle).saturating_duration_since(now)
                }
                None => Duration::from_secs(3600),
            };
            match feed_rx.recv_timeout(wait) {
                Ok(Feed::Line(line)) => {
                    last_activity = Instant::now();
                    if !turn_over && reader.line(&line) {
                        turn_over = true;
                        let _ = end_tx.send(Ending::TurnOver);
                    }
                }
                Ok(Feed::Stderr(chunk)) => {
                    last_activity = Instant::now();
                    stderr.push(&chunk);
                }
                Ok(Feed::OutEnd) => out_open = false,
                Ok(Feed::ErrEnd) => err_open = false,
                Ok(Feed::Exited(status)) => {
                    exited = Some(status);
                    let _ = end_tx.send(Ending::Exited);
                    // Whatever left the group (acpx's queue owner) goes now;
                    // what it and the agent wrote is still read.
                    let swept = child.sweep();
                    if swept > 0 {
                        info!("run {session}: ended {swept} process(es) it left behind");
                    }
                    drain_until = Some(Instant::now() + DRAIN_AFTER_EXIT);
                }
                Err(RecvTimeoutError::Timeout) => {
                    if drain_until.is_none()
                        && !turn_over
                        && reader.idle_armed()
                        && last_activity.elapsed() >= idle
                    {
                        info!("run {session}: idle {}s: the turn is taken as over", idle.as_secs());
                        reader.idle();
                        turn_over = true;
                        let _ = end_tx.send(Ending::TurnOver);
                    }
                }
                Err(RecvTimeoutError::Disconnected) => break,
            }
        }
        // A process that dropped the marker may still hold the pipes: it does
        // not hold the run.
        child.release_readers();
        drop(feed_rx);
        let _ = end_tx.send(Ending::Exited);
        controller.ok().and_then(|h| h.join().ok()).flatten()
    });
    let status = exited.unwrap_or_else(|| Err(std::io::Error::other("the agent was not waited for")));
    Outcome { status, cut, turn_over, reconnect: stderr.reconnect, stderr: stderr.head, spawned: true }
}

/// The control of one attempt; the cut it made, if any.
fn controls(
    control: &Receiver<Control>,
    ending: &Receiver<Ending>,
    group: &Group,
    deadline: Instant,
    timeout: Duration,
    cancel: Option<Command>,
    grace: Duration,
) -> Option<Cut> {
    let never = crossbeam_channel::never();
    let mut control = control;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        crossbeam_channel::select! {
            recv(control) -> msg => {
                let cut = match msg {
                    Ok(Control::Stop) => Cut::Stopped,
                    Ok(Control::Shutdown) => Cut::Shutdown,
                    Err(_) => {
                        control = &never;
                        continue;
                    }
                };
                supervise::terminate(group, cancel, grace);
                return Some(cut);
            }
            recv(ending) -> msg => {
                if let Ok(Ending::TurnOver) = msg
                    && let Ok(None) = group.wait_until(Instant::now() + LINGER)
                {
                    supervise::terminate(group, None, grace);
                }
                return None;
            }
            default(left) => {
                supervise::terminate(group, cancel, grace);
                return Some(Cut::TimedOut(timeout));
            }
        }
    }
}

/// stdout, line by line (a longer line comes in pieces), to the run thread.
fn read_lines(out: impl Read, tx: &Sender<Feed>) {
    let mut reader = BufReader::with_capacity(64 << 10, out);
    loop {
        let mut line = Vec::new();
        match read_line(&mut reader, &mut line, LINE_MAX) {
            Ok(0) | Err(_) => break,
            Ok(_) => {}
        }
        while line.last().is_some_and(|b| *b == b'\n' || *b == b'\r') {
            line.pop();
        }
        if tx.send(Feed::Line(line)).is_err() {
            return;
        }
    }
    let _ = tx.send(Feed::OutEnd);
}

/// stderr, as it comes, to the run thread.
fn read_chunks(mut err: impl Read, tx: &Sender<Feed>) {
    let mut chunk = [0u8; 8192];
    while let Ok(n) = err.read(&mut chunk) {
        if n == 0 || tx.send(Feed::Stderr(chunk[..n].to_vec())).is_err() {
            break;
        }
    }
    let _ = tx.send(Feed::ErrEnd);
}

/// One line, at most `max` bytes (a longer one comes in pieces).
fn read_line(reader: &mut impl BufRead, line: &mut Vec<u8>, max: usize) -> std::io::Result<usize> {
    loop {
        let buf = reader.fill_buf()?;
        if buf.is_empty() {
            return Ok(line.len());
        }
        let room = max - line.len();
        let window = &buf[..buf.len().min(room)];
        if let Some(i) = window.iter().position(|&b| b == b'\n') {
            line.extend_from_slice(&window[..=i]);
            reader.consume(i + 1);
            return Ok(line.len());
        }
        let n = window.len();
        line.extend_from_slice(window);
        reader.consume(n);
        if line.len() >= max {
            return Ok(line.len());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn long_lines_come_in_pieces() {
        let data = format!("{}\nshort\n", "x".repeat(10));
        let mut r = BufReader::with_capacity(4, data.as_bytes());
        let mut line = Vec::new();
        let mut got = Vec::new();
        loop {
            line.clear();
            if read_line(&mut r, &mut line, 6).unwrap() == 0 {
                break;
            }
            got.push(String::from_utf8(line.clone()).unwrap());
        }
        assert_eq!(got, ["xxxxxx", "xxxx\n", "short\n"]);
    }

    #[test]
    fn stderr_keeps_its_head_and_finds_reconnect_across_chunks() {
        let mut s = Stderr::default();
        s.push(b"error: session needs rec");
        assert!(!s.reconnect);
        s.push(b"onnect\n");
        assert!(s.reconnect);
        assert_eq!(s.head, b"error: session needs reconnect\n");
        let mut big = Stderr::default();
        big.push(&vec![b'x'; STDERR_HEAD + 10]);
        assert_eq!(big.head.len(), STDERR_HEAD);
    }
}
