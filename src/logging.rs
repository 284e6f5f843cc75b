//! Log lines on stderr, `2026-11-21T06:00:00.123Z [INFO] message`. stdout is kept
//! for the one machine-read line (`listening on ADDR`). Nothing here ever sees a
//! token: callers log project ids, actions and statuses only.
//!
//! - **One line is one line.** Every message is formatted through an escaping
//!   writer: control characters (and U+2028/U+2029) in anything interpolated,
//!   a session id, a server's message, a header, show as `\n`, `\t`,
//!   `\u0000`, so no value can end a line early and forge another. There is no
//!   way to log unescaped text.
//! - **Off the hot path.** A logging call formats its message (into a recycled
//!   buffer) and hands it to a bounded queue without waiting. The `log-writer`
//!   thread takes what is queued, stamps and frames the lines and writes them
//!   in one `write` per batch, at most one batch per [`GATHER`] while busy. When the queue is full (stderr is a slow pipe)
//!   the line is dropped and counted, and the next line written says how many
//!   were dropped: nothing is lost silently, and no request ever waits for
//!   the log.
//! - **Repeated warnings are rate-limited.** Of identical WARN/ERROR lines, the
//!   first [`BURST`] in a [`WINDOW`] are written; the rest are counted and one
//!   line at the end of the window says how many were suppressed.
//! - **Noisy kinds of lines are sampled.** A line that strangers can cause at
//!   will with ever different text (a failed TLS handshake, per peer) goes
//!   through a [`Sampled`]: one such line per period, the next one saying how
//!   many were left out.
//! - **journald.** When stderr is the journal (`JOURNAL_STREAM` names stderr's
//!   device and inode) each line starts with its priority, `<3>` `<4>` `<6>`.
//! - **Flushed on exit.** [`finish`] (called before the process exits) waits for
//!   the queue to be written, as long as the output keeps taking bytes (up to
//!   10 s), and makes later lines synchronous; a panic flushes what it can
//!   before the panic message.
//!
//! Threads: `log-writer`, owned by this module, started with the first line;
//! it ends with the process (its queue is flushed by [`finish`] before that).
//! If it cannot be started, lines are written synchronously.

use crossbeam_channel::{Receiver, Sender, TrySendError};
use std::collections::HashMap;
use std::fmt::{self, Write as _};
use std::io::Write;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub enum Level {
    Info,
    Warn,
    Error,
}

impl Level {
    fn tag(self) -> &'static str {
        match self {
            Level::Info => "INFO",
            Level::Warn => "WARN",
            Level::Error => "ERROR",
        }
    }

    /// syslog priority for journald: err, warning, info.
    fn priority(self) -> &'static str {
        match self {
            Level::Info => "<6>",
            Level::Warn => "<4>",
            Level::Error => "<3>",
        }
    }
}

/// Lines the queue holds while the writer is busy; past that they are counted and dropped.
const QUEUE: usize = 8192;
/// Lines written in one batch (one `write`) at most.
const BATCH: usize = 1024;
/// Identical WARN/ERROR lines written per window; the rest are counted.
pub const BURST: u32 = 5;
pub const WINDOW: Duration = Duration::from_secs(10);
/// Distinct lines the rate limiter tracks at once; past that, new ones pass.
const TRACKED: usize = 4096;
/// After a write, the writer sleeps this long before it looks at the queue again.
const GATHER: Duration = Duration::from_millis(5);
/// At exit the queue is written out as long as the output keeps taking bytes:
/// the wait ends when it took nothing for [`STALL`], or after [`FLUSH_CAP`].
const STALL: Duration = Duration::from_secs(1);
const FLUSH_CAP: Duration = Duration::from_secs(10);
/// The writer writes at most this much per `write`, so progress shows.
const CHUNK: usize = 16 << 10;

/// Messages to the `log-writer` thread.
enum ToWriter {
    Line(Line),
    /// Answer once everything queued before this is written.
    Flush(Sender<()>),
    /// A sampled kind has lines left out: the writer, perhaps waiting
    /// without a timeout, is to report them when their period is over.
    Sampled,
}

struct Line {
    level: Level,
    at: SystemTime,
    /// The message, already escaped.
    text: String,
}

struct Logger {
    tx: Sender<ToWriter>,
    /// Message buffers handed back by the writer for reuse.
    free: Receiver<String>,
    /// Lines dropped because the queue was full, not yet reported.
    dropped: AtomicU64,
    /// Set by [`finish`]: from then on lines are written synchronously.
    direct: AtomicBool,
    /// Bytes the writer has written so far (progress, seen by [`finish`]).
    written: AtomicU64,
    journal: bool,
    writer: std::thread::ThreadId,
}

static LOGGER: OnceLock<Option<Logger>> = OnceLock::new();

fn logger() -> Option<&'static Logger> {
    LOGGER.get_or_init(start).as_ref()
}

fn start() -> Option<Logger> {
    let journal = stderr_is_journal();
    let (tx, rx) = crossbeam_channel::bounded(QUEUE);
    let (free_tx, free) = crossbeam_channel::bounded(QUEUE);
    let spawned =
        std::thread::Builder::new().name("log-writer".into()).stack_size(128 << 10).spawn(move || {
            // Signals belong to the signal thread, whatever thread logged first.
            let _ = nix::sys::signal::SigSet::all().thread_block();
            writer(&rx, &free_tx, journal)
        });
    let handle = match spawned {
        Ok(h) => h,
        Err(e) => {
            let mut out = Vec::new();
            let msg = format!("cannot start the log writer ({e}); logging synchronously");
            frame(&mut out, journal, Level::Warn, SystemTime::now(), &msg);
            let _ = std::io::stderr().lock().write_all(&out);
            return None;
        }
    };
    let writer = handle.thread().id();
    let previous = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        if std::thread::current().id() != writer {
            flush(Duration::from_millis(500));
        }
        previous(info);
    }));
    Some(Logger {
        tx,
        free,
        dropped: AtomicU64::new(0),
        direct: AtomicBool::new(false),
        written: AtomicU64::new(0),
        journal,
        writer,
    })
}

/// One line of a kind per period at most (a `static` per kind): the lines in
/// between are counted, and the next line written says how many. When no
/// next line comes, the `log-writer` thread writes the count once the period
/// is over (`"<what>: N more line(s) in the last P s, not shown"`), so a flood
/// that stops is not left uncounted.
pub struct Sampled {
    what: &'static str,
    period: u64,
    /// Seconds since the epoch when the last line was let through (0: never).
    last: AtomicU64,
    skipped: AtomicU64,
    /// In [`SAMPLED`], for the writer to report a count that no line took.
    listed: AtomicBool,
}

/// Kinds with lines left out, for the `log-writer` thread to report.
static SAMPLED: Mutex<Vec<&'static Sampled>> = Mutex::new(Vec::new());

fn sampled() -> std::sync::MutexGuard<'static, Vec<&'static Sampled>> {
    SAMPLED.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn epoch_secs() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

impl Sampled {
    /// `what` names the kind in the writer's count line (e.g. "tls: failed handshakes").
    pub const fn new(what: &'static str, period: Duration) -> Sampled {
        Sampled {
            what,
            period: period.as_secs(),
            last: AtomicU64::new(0),
            skipped: AtomicU64::new(0),
            listed: AtomicBool::new(false),
        }
    }

    /// Whether a line may be written now: `Some(lines left out since the
    /// last one)`, or None (counted).
    pub fn admit(&'static self) -> Option<u64> {
        let admitted = self.admit_at(epoch_secs());
        if admitted.is_none() && !self.listed.swap(true, Ordering::AcqRel) {
            sampled().push(self);
            if let Some(logger) = logger() {
                // Full: lines are queued, so the writer is awake anyway.
                let _ = logger.tx.try_send(ToWriter::Sampled);
            }
        }
        admitted
    }

    fn admit_at(&self, now: u64) -> Option<u64> {
        let last = self.last.load(Ordering::Relaxed);
        let due = last == 0 || now >= last.saturating_add(self.period);
        if due && self.last.compare_exchange(last, now.max(1), Ordering::Relaxed, Ordering::Relaxed).is_ok() {
            Some(self.skipped.swap(0, Ordering::Relaxed))
        } else {
            self.skipped.fetch_add(1, Ordering::Relaxed);
            None
        }
    }

    /// The count line when the period is over and lines were left out
    /// (called by the writer); the kind then leaves the list.
    fn overdue(&self, now: u64) -> Option<Option<String>> {
        let last = self.last.load(Ordering::Relaxed);
        if now < last.saturating_add(self.period) {
            return None; // not yet: a line may still come and take the count
        }
        self.listed.store(false, Ordering::Release);
        let n = self.skipped.swap(0, Ordering::Relaxed);
        // The period restarts, so that the count line is the period's one line.
        self.last.store(now.max(1), Ordering::Relaxed);
        Some(
            (n > 0)
                .then(|| format!("{}: {n} more line(s) in the last {} s, not shown", self.what, self.period)),
        )
    }
}

/// Writes the count of every sampled kind whose period is over.
fn report_sampled(out: &mut Vec<u8>, journal: bool) {
    let now = epoch_secs();
    let mut lines = Vec::new();
    sampled().retain(|kind| match kind.overdue(now) {
        None => true,
        Some(line) => {
            lines.extend(line);
            false
        }
    });
    for line in lines {
        frame(out, journal, Level::Info, SystemTime::now(), &line);
    }
}

/// Logs one line (use the `info!`, `warn!`, `error!` macros). Never blocks on
/// the log output, except after [`finish`] or when the writer thread is missing.
pub fn write(level: Level, args: fmt::Arguments<'_>) {
    let Some(logger) = logger() else {
        return write_direct(level, args, stderr_is_journal());
    };
    if logger.direct.load(Ordering::Acquire) {
        return write_direct(level, args, logger.journal);
    }
    let mut text = logger.free.try_recv().unwrap_or_else(|_| String::with_capacity(160));
    let _ = Escaper(&mut text).write_fmt(args);
    match logger.tx.try_send(ToWriter::Line(Line { level, at: SystemTime::now(), text })) {
        Ok(()) => {}
        Err(TrySendError::Full(_)) => {
            logger.dropped.fetch_add(1, Ordering::Relaxed);
        }
        Err(TrySendError::Disconnected(_)) => write_direct(level, args, logger.journal),
    }
}

fn write_direct(level: Level, args: fmt::Arguments<'_>, journal: bool) {
    let mut text = String::with_capacity(160);
    let _ = Escaper(&mut text).write_fmt(args);
    let mut out = Vec::with_capacity(text.len() + 40);
    frame(&mut out, journal, level, SystemTime::now(), &text);
    let _ = std::io::stderr().lock().write_all(&out);
}

/// Waits (up to `within`) until every line logged before this call is written.
pub fn flush(within: Duration) {
    let Some(Some(logger)) = LOGGER.get() else { return };
    if logger.direct.load(Ordering::Acquire) || std::thread::current().id() == logger.writer {
        return;
    }
    let deadline = Instant::now() + within;
    let (ack_tx, ack_rx) = crossbeam_channel::bounded(1);
    if logger.tx.send_deadline(ToWriter::Flush(ack_tx), deadline).is_ok() {
        let _ = ack_rx.recv_deadline(deadline);
    }
}

/// Before the process exits: writes what is queued (waiting as long as the
/// output keeps taking bytes, up to [`FLUSH_CAP`]), then makes every later line
/// synchronous, so that nothing logged from here on can be lost. An output
/// that takes nothing for [`STALL`] loses what is still queued.
pub fn finish() {
    let Some(Some(logger)) = LOGGER.get() else { return };
    if logger.direct.load(Ordering::Acquire) || std::thread::current().id() == logger.writer {
        return;
    }
    let cap = Instant::now() + FLUSH_CAP;
    let mut seen = logger.written.load(Ordering::Relaxed);
    // Whether to keep waiting: the output took bytes since the last look.
    let mut moving = || {
        let now = logger.written.load(Ordering::Relaxed);
        let moved = now != seen;
        seen = now;
        moved && Instant::now() < cap
    };
    for _ in 0..2 {
        // Twice: a line queued between the first flush and the switch to
        // direct writes is waited for too.
        let (ack_tx, ack_rx) = crossbeam_channel::bounded(1);
        let mut msg = ToWriter::Flush(ack_tx);
        let queued = loop {
            match logger.tx.send_timeout(msg, STALL) {
                Ok(()) => break true,
                Err(crossbeam_channel::SendTimeoutError::Timeout(m)) if moving() => msg = m,
                Err(_) => break false,
            }
        };
        if queued {
            while let Err(crossbeam_channel::RecvTimeoutError::Timeout) = ack_rx.recv_timeout(STALL) {
                if !moving() {
                    break;
                }
            }
        }
        logger.direct.store(true, Ordering::Release);
    }
}

/// The `log-writer` thread: batches, stamps, rate-limits and writes.
fn writer(rx: &Receiver<ToWriter>, free: &Sender<String>, journal: bool) {
    let logger = || LOGGER.get().and_then(Option::as_ref);
    let mut out: Vec<u8> = Vec::with_capacity(64 << 10);
    let mut limiter = Limiter::default();
    let mut acks: Vec<Sender<()>> = Vec::new();
    let stderr = std::io::stderr();
    loop {
        let first = if limiter.is_empty() && sampled().is_empty() {
            rx.recv().ok()
        } else {
            match rx.recv_timeout(Duration::from_secs(1)) {
                Ok(m) => Some(m),
                Err(crossbeam_channel::RecvTimeoutError::Timeout) => None,
                Err(crossbeam_channel::RecvTimeoutError::Disconnected) => return,
            }
        };
        let dropped = logger().map_or(0, |l| l.dropped.swap(0, Ordering::Relaxed));
        if dropped > 0 {
            let msg = format!(
                "log: {dropped} line(s) dropped: the log output could not keep up (the queue holds {QUEUE})"
            );
            frame(&mut out, journal, Level::Warn, SystemTime::now(), &msg);
        }
        let mut handle = |m: ToWriter, out: &mut Vec<u8>| match m {
            ToWriter::Line(line) => {
                if limiter.admit(&line) {
                    frame(out, journal, line.level, line.at, &line.text);
                }
                let mut text = line.text;
                if text.capacity() <= 1024 {
                    text.clear();
                    let _ = free.try_send(text);
                }
            }
            ToWriter::Flush(ack) => acks.push(ack),
            ToWriter::Sampled => {} // the loop now waits with a timeout
        };
        if let Some(m) = first {
            handle(m, &mut out);
            for m in rx.try_iter().take(BATCH) {
                handle(m, &mut out);
            }
        }
        limiter.expire(Instant::now(), &mut out, journal);
        report_sampled(&mut out, journal);
        let wrote = !out.is_empty();
        if wrote {
            let mut err = stderr.lock();
            for chunk in out.chunks(CHUNK) {
                if err.write_all(chunk).is_err() {
                    break;
                }
                if let Some(l) = logger() {
                    l.written.fetch_add(chunk.len() as u64, Ordering::Relaxed);
                }
            }
            drop(err);
            if out.capacity() > 1 << 20 {
                out = Vec::with_capacity(64 << 10);
            }
            out.clear();
        }
        for ack in acks.drain(..) {
            let _ = ack.send(());
        }
        if wrote {
            // Let lines gather: a busy log becomes few large writes, and a
            // logging thread rarely has to wake this one.
            std::thread::sleep(GATHER);
        }
    }
}

/// Identical WARN/ERROR lines: [`BURST`] per [`WINDOW`], the rest counted.
#[derive(Default)]
struct Limiter {
    seen: HashMap<String, Repeats>,
}

struct Repeats {
    level: Level,
    since: Instant,
    shown: u32,
    suppressed: u64,
}

impl Limiter {
    fn is_empty(&self) -> bool {
        self.seen.is_empty()
    }

    /// Whether to write this line now.
    fn admit(&mut self, line: &Line) -> bool {
        if line.level == Level::Info {
            return true;
        }
        if let Some(r) = self.seen.get_mut(line.text.as_str()) {
            if r.shown < BURST {
                r.shown += 1;
                return true;
            }
            r.suppressed += 1;
            return false;
        }
        if self.seen.len() < TRACKED {
            let r = Repeats { level: line.level, since: Instant::now(), shown: 1, suppressed: 0 };
            self.seen.insert(line.text.clone(), r);
        }
        true
    }

    /// Ends the windows that are over, saying how many lines each suppressed.
    fn expire(&mut self, now: Instant, out: &mut Vec<u8>, journal: bool) {
        self.seen.retain(|text, r| {
            if now.duration_since(r.since) < WINDOW {
                return true;
            }
            if r.suppressed > 0 {
                let msg = format!(
                    "{text} [repeated {} more time(s) in {} s, not shown]",
                    r.suppressed,
                    WINDOW.as_secs()
                );
                frame(out, journal, r.level, SystemTime::now(), &msg);
            }
            false
        });
    }
}

/// One framed line: `[<N>]TIMESTAMP [LEVEL] text\n`.
fn frame(out: &mut Vec<u8>, journal: bool, level: Level, at: SystemTime, text: &str) {
    if journal {
        out.extend_from_slice(level.priority().as_bytes());
    }
    write_timestamp(out, at);
    out.extend_from_slice(b" [");
    out.extend_from_slice(level.tag().as_bytes());
    out.extend_from_slice(b"] ");
    out.extend_from_slice(text.as_bytes());
    out.push(b'\n');
}

/// stderr is the journal when `JOURNAL_STREAM` (`DEV:INODE`, set by systemd
/// for a unit whose output goes to the journal) names stderr itself.
fn stderr_is_journal() -> bool {
    let Some(value) = std::env::var_os("JOURNAL_STREAM") else { return false };
    let Some((dev, ino)) = value.to_str().and_then(|v| v.split_once(':')) else { return false };
    let Ok(st) = nix::sys::stat::fstat(std::io::stderr()) else { return false };
    dev.parse() == Ok(st.st_dev) && ino.parse() == Ok(st.st_ino)
}

/// A formatter sink that escapes what could break a line: C0 and C1 control
/// characters, DEL, U+2028 and U+2029. `\n`, `\r`, `\t` keep their short
/// forms; the others show as `\u00XX`.
pub struct Escaper<'a>(pub &'a mut String);

impl fmt::Write for Escaper<'_> {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        let clean = |c: char| !(c.is_control() || c == '\u{2028}' || c == '\u{2029}');
        if s.bytes().all(|b| (0x20..0x7f).contains(&b)) || s.chars().all(clean) {
            self.0.push_str(s);
            return Ok(());
        }
        for c in s.chars() {
            match c {
                '\n' => self.0.push_str("\\n"),
                '\r' => self.0.push_str("\\r"),
                '\t' => self.0.push_str("\\t"),
                c if !clean(c) => {
                    let _ = write!(self.0, "\\u{:04x}", c as u32);
                }
                c => self.0.push(c),
            }
        }
        Ok(())
    }
}

macro_rules! log_info { ($($t:tt)*) => { $crate::logging::write($crate::logging::Level::Info, format_args!($($t)*)) } }
macro_rules! log_warn { ($($t:tt)*) => { $crate::logging::write($crate::logging::Level::Warn, format_args!($($t)*)) } }
macro_rules! log_error { ($($t:tt)*) => { $crate::logging::write($crate::logging::Level::Error, format_args!($($t)*)) } }
pub(crate) use {log_error as error, log_info as info, log_warn as warn};

/// RFC 3339 UTC with milliseconds, without a date crate.
#[cfg(test)]
fn timestamp(t: SystemTime) -> String {
    let mut out = Vec::with_capacity(24);
    write_timestamp(&mut out, t);
    String::from_utf8(out).unwrap_or_default()
}

/// [`timestamp`] appended to `out` (civil-from-days).
fn write_timestamp(out: &mut Vec<u8>, t: SystemTime) {
    let d = t.duration_since(UNIX_EPOCH).unwrap_or_default();
    let secs = d.as_secs() as i64;
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    let digits = |out: &mut Vec<u8>, n: i64, width: u32| {
        for i in (0..width).rev() {
            out.push(b'0' + (n / 10_i64.pow(i) % 10) as u8);
        }
    };
    digits(out, year, 4);
    out.push(b'-');
    digits(out, month, 2);
    out.push(b'-');
    digits(out, day, 2);
    out.push(b'T');
    digits(out, rem / 3600, 2);
    out.push(b':');
    digits(out, rem % 3600 / 60, 2);
    out.push(b':');
    digits(out, rem % 60, 2);
    out.push(b'.');
    digits(out, i64::from(d.subsec_millis()), 3);
    out.push(b'Z');
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_sampled_kind_writes_one_line_a_period_and_counts_the_rest() {
        let kind = Sampled::new("k", Duration::from_secs(10));
        assert_eq!(kind.admit_at(100), Some(0));
        assert_eq!((0..199).filter_map(|_| kind.admit_at(105)).count(), 0);
        assert_eq!(kind.admit_at(109), None);
        assert_eq!(kind.admit_at(110), Some(200));
        assert_eq!(kind.admit_at(111), None);
        assert_eq!(kind.admit_at(125), Some(1));
    }

    #[test]
    fn a_count_no_line_took_is_written_when_the_period_is_over() {
        let kind = Sampled::new("tls: failed handshakes", Duration::from_secs(10));
        assert_eq!(kind.admit_at(100), Some(0));
        assert_eq!((0..5).filter_map(|_| kind.admit_at(101)).count(), 0);
        assert_eq!(kind.overdue(109), None, "the period is not over: a line may still take the count");
        assert_eq!(
            kind.overdue(110),
            Some(Some("tls: failed handshakes: 5 more line(s) in the last 10 s, not shown".to_string()))
        );
        // The count line was the period's line; nothing is counted twice.
        assert_eq!(kind.admit_at(111), None);
        assert_eq!(kind.admit_at(120), Some(1));
        assert_eq!(kind.overdue(130), Some(None));
    }

    #[test]
    fn timestamps_are_utc_calendar_dates() {
        let at = |s| timestamp(UNIX_EPOCH + Duration::from_millis(s));
        assert_eq!(at(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(at(951_782_400_000), "2000-02-29T00:00:00.000Z");
        assert_eq!(at(1_795_320_000_123), "2026-11-22T04:00:00.123Z");
    }

    #[test]
    fn interpolated_values_cannot_break_a_line() {
        let mut s = String::new();
        let id = "s1\n2026-01-01T00:00:00.000Z [ERROR] FORGED\r\u{0}\u{1b}[31m\u{85}\u{2028}é\tx";
        let _ = write!(Escaper(&mut s), "session {id} ended");
        assert_eq!(
            s,
            "session s1\\n2026-01-01T00:00:00.000Z [ERROR] FORGED\\r\\u0000\\u001b[31m\\u0085\\u2028é\\tx ended"
        );
        assert!(!s.contains('\n'));
        let mut plain = String::new();
        let _ = Escaper(&mut plain).write_str("plain text, ü");
        assert_eq!(plain, "plain text, ü");
    }

    fn line(level: Level, text: &str) -> Line {
        Line { level, at: SystemTime::now(), text: text.into() }
    }

    #[test]
    fn repeated_warnings_are_counted_not_written() {
        let mut l = Limiter::default();
        let shown = (0..100).filter(|_| l.admit(&line(Level::Warn, "same"))).count();
        assert_eq!(shown, BURST as usize);
        assert!(l.admit(&line(Level::Warn, "other")));
        assert_eq!((0..50).filter(|_| l.admit(&line(Level::Info, "same"))).count(), 50);
        let mut out = Vec::new();
        l.expire(Instant::now(), &mut out, false);
        assert!(out.is_empty(), "the window is not over yet");
        l.expire(Instant::now() + WINDOW, &mut out, true);
        let text = String::from_utf8(out).unwrap();
        assert_eq!(text.lines().count(), 1, "{text}");
        assert!(text.starts_with("<4>"), "{text}");
        assert!(text.contains("[WARN] same [repeated 95 more time(s) in 10 s, not shown]"), "{text}");
        assert!(l.is_empty());
    }
}
