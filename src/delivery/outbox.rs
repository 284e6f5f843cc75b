//! Ordered, signed delivery of posts to a platform that survives outages, a
//! full disk, a crash and restarts. One design for push-mode runs and
//! poll-mode sessions.
//!
//! A *stream* (one run, one session) is a sequence of records with one
//! writer, its [`Stream`]. Each record is spooled to disk ([`super::spool`]
//! has the files and their format) and posted in order, one at a time, then
//! its position is recorded. Memory stays flat however long the platform is
//! down, and what was not delivered is still there after a restart, when
//! [`Outbox::open`] resumes it; a stream whose writer died before its closing
//! post (a crash) is closed then with the fallback kept in `<id>.close`
//! since the stream began. Once everything written so far is delivered and
//! the file has grown past 1 MiB it is emptied.
//!
//! **Delivery.** Streams are grouped by the origin (scheme://host:port) of
//! their fallback's URL. A pool of at most [`MAX_WORKERS`] threads
//! (`outbox-deliver`) serves the origins: an origin is served by one worker
//! at a time, one post at a time, its streams taken in turn (one record each,
//! round robin), so every stream is in order and none waits behind a long
//! one; origins also take turns. No descriptor is held for a stream between
//! posts: a worker opens the spool file for the record it posts and closes
//! it. Failures are retried with exponential backoff (250 ms doubling to
//! 10 s, jittered): a post that gets no answer (connection refused, timeout,
//! TLS) marks its whole origin down, and only one post probes it per
//! backoff; an answer of 408, 429 or 5xx backs off that stream alone
//! (`Retry-After` is obeyed up to 5 minutes). A stream that has not moved for
//! `window` is dropped with an error; another status is logged and that post
//! skipped. Posts are signed when sent, by the [`Signer`], so a timestamped
//! signature is fresh after an outage and no key is written to disk.
//!
//! **A full disk.** A record that cannot be written (ENOSPC, EIO, EMFILE…)
//! leaves no trace in the file and is kept in memory instead, behind the
//! stream's earlier ones; the worker delivers from memory what is not on disk,
//! so delivery goes on while the disk is full. The keeper thread writes the
//! records kept in memory to disk as soon as they fit (every 500 ms). While
//! more than [`MEMORY_CAP`] bytes wait in memory, a writer that already has
//! records there waits for room (its agent's output then waits in its pipe);
//! a stream's first record and its closing record never wait. The failure is
//! logged once, then at most once a minute, and shown in the status file.
//!
//! **Exactly once where it can be.** A record whose delivery was confirmed
//! (a 2xx) is never posted again: its position is written, in place, before
//! the next post of its origin starts. At-least-once remains in one window: a
//! crash (kill -9, power loss) between the 2xx and that position write, or
//! between emptying a delivered file's position and the file, posts it again
//! after the restart, since the platform took it but this process could not
//! record that. Records only in memory when the process dies are lost; their
//! stream is closed at the next start with its fallback (a stream that began
//! while the disk was full has its files from a spare set; one that found
//! none left is lost whole: the drain at shutdown logs both).
//!
//! **Files.** `<id>.q`, `<id>.pos`, `<id>.close` per stream in the spool
//! directory (see [`super::spool`]); a stream's files are removed once its
//! closing post is delivered or it is dropped, and leftovers without a `.q`
//! are removed at open. `.lock` keeps a second process off the directory.
//! Next to the directory, `<dir>.status` holds the figures of [`Stats`] as one
//! JSON object, rewritten in place at most every 200 ms, and `<dir>.spare/`
//! 16 sets of stream files made in advance: a stream that begins while the
//! disk is full takes one, so that it can be closed after a crash all the same.
//!
//! **Descriptors.** The outbox holds at most [`Outbox::open`]'s cap of append
//! handles (a sixteenth of the soft `RLIMIT_NOFILE`, 2 to 64; a writer past
//! it opens and closes per record), one spool file per worker while it reads,
//! the status file, and the HTTP client's connections (at most a few idle per
//! origin): the rest of the limit stays for connections, git and agents.
//!
//! Threads: `outbox-deliver` (at most [`MAX_WORKERS`], started when an origin
//! has work and none is free, ending when no stream is left or at the drain's
//! deadline), and `outbox-keeper` (writes the status file and retries the
//! spooling of records kept in memory; ends at [`Outbox::drain`]). All take
//! the scheduler's lock before a stream's, never the other way round.

use super::client::{Answer, Client};
use super::spool;
pub use super::spool::{Fallback, Record, undelivered};
use crate::logging::{error, info, warn};
use std::collections::{HashMap, VecDeque};
use std::fs::File;
use std::io;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// A spool file this large, fully delivered, is emptied.
const COMPACT_AT: u64 = 1 << 20;
/// Bytes of records kept in memory past which writers that already have
/// records there wait.
pub const MEMORY_CAP: u64 = 16 << 20;
/// Delivery threads, whatever the number of origins.
pub const MAX_WORKERS: usize = 4;
/// Spare stream files kept ready (see `spool::make_spares`).
const SPARES: usize = 16;
/// How often records kept in memory are tried on disk again.
const DISK_RETRY: Duration = Duration::from_millis(500);
const FIRST_BACKOFF: Duration = Duration::from_millis(250);
const MAX_BACKOFF: Duration = Duration::from_secs(10);
const STATUS_EVERY: Duration = Duration::from_millis(200);
/// The status file's size: it is rewritten in place, padded with spaces.
const STATUS_BYTES: usize = 1024;
/// A failure that goes on is logged again at most this often.
const LOG_EVERY: Duration = Duration::from_secs(60);

/// Headers for a post, computed when it is sent. None: the key is gone (a
/// project removed from the config since the post was queued); it is skipped.
pub trait Signer: Send + Sync {
    fn headers(&self, key: &str, url: &str, body: &[u8]) -> Option<Vec<(String, String)>>;
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

pub struct Outbox {
    /// Held for the life of the process: one connector per spool directory,
    /// or a live stream of another would look like a crashed one.
    _lock: nix::fcntl::Flock<File>,
    dir: PathBuf,
    status_path: PathBuf,
    /// Spare stream files for streams that begin while the disk is full.
    spares: PathBuf,
    client: Client,
    signer: Arc<dyn Signer>,
    window: Duration,
    sched: Mutex<Sched>,
    /// Workers wait here for an origin to serve.
    work: Condvar,
    /// Writers waiting for memory room wait here (notified as memory frees).
    room: (Mutex<()>, Condvar),
    keeper: (Mutex<Keep>, Condvar),
    disk: Mutex<DiskTrouble>,
    /// Set while the last spool write failed (checked without the lock).
    disk_failing: AtomicBool,
    /// Bytes of records kept in memory, over all streams.
    memory_bytes: AtomicU64,
    /// Append handles kept open, and how many may be.
    open_files: AtomicUsize,
    file_cap: usize,
    /// Streams not finished (what the keeper needs without the scheduler's lock).
    live: AtomicUsize,
    delivered: AtomicU64,
    dropped: AtomicU64,
    /// Posts that failed and are tried again.
    retried: AtomicU64,
    /// The same three counts by callback origin ([`Outbox::origin_counts`]).
    by_origin: Mutex<HashMap<String, OriginCounts>>,
    status_file: Mutex<Option<File>>,
}

/// Posts delivered, retried and dropped for one callback origin since this
/// process started ([`Outbox::origin_counts`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct OriginCounts {
    pub delivered: u64,
    pub retried: u64,
    pub dropped: u64,
}

/// Which of the counts [`Outbox::count`] adds to.
#[derive(Clone, Copy)]
enum Tally {
    Delivered,
    Retried,
    Dropped,
}

/// Origins counted one by one; past them the rest count as `other`.
const COUNTED_ORIGINS: usize = 64;

/// An origin as a metrics label: `scheme://host:port` only — never a path,
/// a query or credentials (an unparsable callback URL counts as `other`).
pub fn origin_label(origin: &str) -> &str {
    let rest = origin.strip_prefix("http://").or_else(|| origin.strip_prefix("https://"));
    match rest {
        Some(r) if !r.is_empty() && !r.contains(['/', '@', '?', '#']) && !r.contains(char::is_whitespace) => {
            origin
        }
        _ => "other",
    }
}

/// The backlog of one callback origin ([`Outbox::origins`]).
#[derive(Debug, Clone, Default)]
pub struct OriginStats {
    /// `scheme://host:port`, without credentials.
    pub origin: String,
    /// Streams with posts still to deliver, their records and bytes.
    pub streams: usize,
    pub records: u64,
    pub bytes: u64,
    /// How long the longest-failing stream has been failing to post its
    /// next record (None: no post is failing).
    pub oldest_failing: Option<Duration>,
    /// Why the last failed post failed, for the longest-failing stream.
    pub last_error: Option<String>,
    /// How long the origin has answered nothing (None: it answers).
    pub down_for: Option<Duration>,
}

/// The figures of an outbox, as in its status file.
#[derive(Debug, Clone, Default)]
pub struct Stats {
    /// Streams not yet fully delivered and closed.
    pub streams: usize,
    /// Origins answering nothing right now.
    pub origins_down: usize,
    pub workers: usize,
    /// Records on disk not yet delivered, and their bytes.
    pub spooled_records: u64,
    pub spooled_bytes: u64,
    /// Records kept in memory because the disk did not take them, and their bytes.
    pub memory_records: u64,
    pub memory_bytes: u64,
    /// Posts confirmed (or skipped for good) since this process started.
    pub delivered: u64,
    /// Records dropped after `window` without delivery.
    pub dropped: u64,
    /// Failed posts to be tried again, since this process started.
    pub retried: u64,
    /// Spool writes that failed since this process started, and the current
    /// failure (None once a write succeeds again).
    pub disk_failures: u64,
    pub disk_error: Option<String>,
    pub open_files: usize,
}

#[derive(Default)]
struct Keep {
    dirty: bool,
    stop: bool,
}

#[derive(Default)]
struct DiskTrouble {
    since: Option<Instant>,
    retry_at: Option<Instant>,
    logged: Option<Instant>,
    failures: u64,
    error: String,
    /// Last time a writer was told to wait for memory room.
    said_full: Option<Instant>,
}

/// Who delivers what; under `Outbox::sched`.
#[derive(Default)]
struct Sched {
    /// Every stream not finished, by id.
    streams: HashMap<String, Arc<Shared>>,
    /// Origins with streams queued, by origin.
    origins: HashMap<String, Origin>,
    /// Origins with a ready stream, no worker and no backoff, in turn order.
    runq: VecDeque<String>,
    workers: usize,
    /// Workers waiting for work, and started but not yet looking for it.
    idle: usize,
    starting: usize,
    /// Set by `drain`: workers stop at this instant.
    deadline: Option<Instant>,
    said_spawn: Option<Instant>,
}

#[derive(Default)]
struct Origin {
    /// Streams with something to do, in turn order.
    ready: VecDeque<Arc<Shared>>,
    /// Streams backing off after a 408/429/5xx, with when to try again.
    delayed: Vec<(Instant, Arc<Shared>)>,
    /// A worker is serving it (it is then neither in `runq` nor idle).
    taken: bool,
    in_runq: bool,
    down: Option<Down>,
}

/// An origin that answered nothing.
struct Down {
    since: Instant,
    retry_at: Instant,
    backoff: Duration,
}

/// One stream, shared by its writer, the workers and the keeper.
struct Shared {
    id: String,
    origin: String,
    /// In its origin's `ready` or `delayed`, or being served: changed only
    /// under the scheduler's lock.
    queued: AtomicBool,
    tail: Mutex<Tail>,
}

/// A stream's state, under its own lock.
struct Tail {
    /// Its files exist; until then (the disk refused them) `fallback` is kept here.
    files: bool,
    fallback: Option<Fallback>,
    /// The append handle, while kept open.
    file: Option<File>,
    /// Length of `.q` in whole records, offset of the next record to deliver, and the seq after the last delivered.
    disk_len: u64,
    pos: u64,
    next_seq: u64,
    /// Records in `.q` from `pos` on.
    disk_records: u64,
    /// Records the disk did not take, in order after those in `.q`.
    mem: VecDeque<Vec<u8>>,
    mem_bytes: u64,
    /// `mem`'s first record is being posted (it is not written to disk meanwhile).
    inflight: bool,
    final_queued: bool,
    final_delivered: bool,
    writer_gone: bool,
    finished: bool,
    failing_since: Option<Instant>,
    failures: u32,
    /// Why the last failed post failed (cleared by a delivery).
    last_error: Option<String>,
    backoff: Duration,
    said_pos: Option<Instant>,
}

impl Tail {
    fn new(fallback: Option<Fallback>) -> Tail {
        Tail {
            files: false,
            fallback,
            file: None,
            disk_len: 0,
            pos: 0,
            next_seq: 0,
            disk_records: 0,
            mem: VecDeque::new(),
            mem_bytes: 0,
            inflight: false,
            final_queued: false,
            final_delivered: false,
            writer_gone: false,
            finished: false,
            failing_since: None,
            failures: 0,
            last_error: None,
            backoff: FIRST_BACKOFF,
            said_pos: None,
        }
    }

    /// Something for a worker to do: a record to post, or the stream to finish.
    fn pending(&self) -> bool {
        !self.finished
            && (self.pos < self.disk_len
                || !self.mem.is_empty()
                || self.final_delivered
                || (self.writer_gone && !self.final_queued))
    }
}

/// The writing end of a stream, owned by the run or session that produces its posts.
pub struct Stream {
    outbox: Arc<Outbox>,
    shared: Arc<Shared>,
    fallback: Fallback,
    /// The seq after the last record pushed (what a fallback gets).
    next_seq: u64,
    closed: bool,
}

/// Where a record being posted came from.
#[derive(Clone, Copy)]
enum From {
    Disk(u64),
    Memory,
}

enum Next {
    Nothing,
    Finish,
    Record(Record, From),
    Unreadable(io::Error),
}

enum Outcome {
    /// Delivered or skipped for good: the stream goes on.
    Sent,
    Idle,
    Finished,
    /// A 408/429/5xx: this stream tries again at that instant (and, with
    /// `Retry-After`, its origin too).
    Retry(Instant, Option<Instant>),
    /// No answer: the origin is down.
    Down(String),
}

impl Outbox {
    /// Opens (creating, mode 0700) the spool directory, removes leftovers and
    /// resumes every stream left there by an earlier process.
    pub fn open(dir: &Path, signer: Arc<dyn Signer>, window: Duration) -> io::Result<Arc<Outbox>> {
        std::fs::create_dir_all(dir)?;
        std::fs::set_permissions(dir, std::os::unix::fs::PermissionsExt::from_mode(0o700))?;
        let lock_file = std::fs::OpenOptions::new()
            .create(true)
            .read(true)
            .write(true)
            .truncate(false)
            .mode(0o600)
            .open(dir.join(".lock"))?;
        let lock = nix::fcntl::Flock::lock(lock_file, nix::fcntl::FlockArg::LockExclusiveNonblock).map_err(
            |(_, e)| {
                if e == nix::errno::Errno::EWOULDBLOCK {
                    io::Error::other(format!(
                        "{} is in use by another aion-connector (give each its own stateDir)",
                        dir.display()
                    ))
                } else {
                    io::Error::from(e)
                }
            },
        )?;
        let soft = nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE)
            .map_or(1024, |(soft, _)| soft);
        let outbox = Arc::new(Outbox {
            _lock: lock,
            dir: dir.to_path_buf(),
            status_path: dir.with_extension("status"),
            spares: dir.with_extension("spare"),
            client: Client::new(Duration::from_secs(15)),
            signer,
            window,
            sched: Mutex::new(Sched::default()),
            work: Condvar::new(),
            room: (Mutex::new(()), Condvar::new()),
            keeper: (Mutex::new(Keep::default()), Condvar::new()),
            disk: Mutex::new(DiskTrouble::default()),
            disk_failing: AtomicBool::new(false),
            memory_bytes: AtomicU64::new(0),
            open_files: AtomicUsize::new(0),
            file_cap: usize::try_from(soft / 16).unwrap_or(64).clamp(2, 64),
            live: AtomicUsize::new(0),
            delivered: AtomicU64::new(0),
            dropped: AtomicU64::new(0),
            retried: AtomicU64::new(0),
            by_origin: Mutex::new(HashMap::new()),
            status_file: Mutex::new(None),
        });
        let orphans = spool::orphans(dir)?;
        if orphans > 0 {
            info!("outbox: removed {orphans} leftover file(s) of finished streams");
        }
        for id in spool::streams(dir)? {
            match outbox.resume(&id) {
                Ok(Some(n)) => info!("outbox: resuming {id} ({n} post(s) spooled)"),
                Ok(None) => {}
                Err(e) => error!("outbox: cannot resume {id}: {e}"),
            }
        }
        if let Err(e) = spool::make_spares(&outbox.spares, SPARES) {
            warn!("outbox: cannot make its spare files in {} ({e})", outbox.spares.display());
        }
        let keeper = Arc::clone(&outbox);
        let spawned =
            std::thread::Builder::new().name("outbox-keeper".into()).stack_size(256 << 10).spawn(move || {
                keeper.keep();
            });
        if let Err(e) = spawned {
            // Delivery goes on; records kept in memory are then retried only
            // by their writers and the workers, and no status file is written.
            error!("outbox: cannot start its keeper thread: {e}; no status file");
        }
        Ok(outbox)
    }

    /// Starts a stream: its files (or, if the disk refuses them, its place in
    /// memory until it takes them). Records come with [`Stream::push`].
    pub fn stream(self: &Arc<Self>, id: &str, fallback: &Fallback) -> Stream {
        let shared = Arc::new(Shared {
            id: id.to_string(),
            origin: origin(&fallback.url),
            queued: AtomicBool::new(false),
            tail: Mutex::new(Tail::new(Some(fallback.clone()))),
        });
        self.flush(id, &mut lock(&shared.tail), false);
        lock(&self.sched).streams.insert(id.to_string(), Arc::clone(&shared));
        self.live.fetch_add(1, Ordering::SeqCst);
        self.note();
        Stream { outbox: Arc::clone(self), shared, fallback: fallback.clone(), next_seq: 0, closed: false }
    }

    /// Whether stream `id` still has posts to deliver (false once it is
    /// done: delivered, or given up on).
    pub fn pending(&self, id: &str) -> bool {
        lock(&self.sched).streams.get(id).is_some_and(|s| !lock(&s.tail).finished)
    }

    /// Records of stream `id` not yet delivered (0 once it is done).
    pub fn backlog(&self, id: &str) -> u64 {
        let stream = lock(&self.sched).streams.get(id).cloned();
        stream.map_or(0, |s| {
            let t = lock(&s.tail);
            if t.finished { 0 } else { t.disk_records + t.mem.len() as u64 }
        })
    }

    /// The backlog per callback origin, by origin: the scheduler's lock is
    /// held to copy the stream list, each stream's lock to read its figures.
    pub fn origins(&self) -> Vec<OriginStats> {
        let (streams, down): (Vec<Arc<Shared>>, HashMap<String, Instant>) = {
            let g = lock(&self.sched);
            let down =
                g.origins.iter().filter_map(|(k, o)| o.down.as_ref().map(|d| (k.clone(), d.since))).collect();
            (g.streams.values().cloned().collect(), down)
        };
        let mut by: std::collections::BTreeMap<String, OriginStats> = std::collections::BTreeMap::new();
        for s in &streams {
            let o = by.entry(s.origin.clone()).or_insert_with(|| OriginStats {
                origin: crate::text::redact_userinfo(&s.origin),
                down_for: down.get(&s.origin).map(Instant::elapsed),
                ..OriginStats::default()
            });
            let t = lock(&s.tail);
            if t.finished {
                continue;
            }
            o.streams += 1;
            o.records += t.disk_records + t.mem.len() as u64;
            o.bytes += t.disk_len - t.pos + t.mem_bytes;
            if let Some(since) = t.failing_since {
                let age = since.elapsed();
                if o.oldest_failing.is_none_or(|old| age > old) {
                    o.oldest_failing = Some(age);
                    if let Some(e) = &t.last_error {
                        o.last_error = Some(e.clone());
                    }
                }
            }
            if o.last_error.is_none() {
                o.last_error.clone_from(&t.last_error);
            }
        }
        by.into_values().collect()
    }

    /// Takes up a stream spooled by an earlier process, closing it first with
    /// its fallback if its writer never did. None: it was already delivered
    /// (its files are removed).
    fn resume(self: &Arc<Self>, id: &str) -> io::Result<Option<u64>> {
        let (mut pos, next_seq) = spool::read_pos(&self.dir, id);
        let mut scan = spool::scan(&self.dir, id, pos)?;
        if pos > scan.len {
            warn!("outbox: {id}: its position is past its records; delivering them all again");
            pos = 0;
            scan = spool::scan(&self.dir, id, 0)?;
        }
        let closed = scan.last.as_ref().is_some_and(|r| r.last);
        // The origin of what it posts (all of a stream's records go to one).
        let first_url = spool::read_at(&self.dir, id, pos, scan.len)
            .ok()
            .and_then(|l| serde_json::from_slice::<Record>(&l).ok())
            .map(|r| r.url)
            .or_else(|| spool::read_fallback(&self.dir, id).map(|f| f.url))
            .unwrap_or_default();
        if closed && scan.records == 0 {
            spool::remove(&self.dir, id);
            return Ok(None);
        }
        let mut t = Tail::new(None);
        (t.files, t.disk_len, t.pos, t.next_seq, t.disk_records) =
            (true, scan.len, pos, next_seq, scan.records);
        t.writer_gone = true;
        t.final_queued = closed;
        if !closed {
            match spool::read_fallback(&self.dir, id) {
                Some(fallback) => {
                    // After the last record spooled, or the last delivered
                    // from memory, whichever is later.
                    let seq = scan.last.as_ref().map_or(0, |r| r.seq + 1).max(next_seq);
                    self.place(id, &mut t, spool::line(&fallback.record(seq)));
                    t.final_queued = true;
                }
                None => error!(
                    "outbox: {id} was cut off and its {id}.close is missing or unreadable: it cannot be closed; delivering what is spooled"
                ),
            }
        }
        self.release_file(&mut t);
        let shared = Arc::new(Shared {
            id: id.to_string(),
            origin: origin(&first_url),
            queued: AtomicBool::new(false),
            tail: Mutex::new(t),
        });
        lock(&self.sched).streams.insert(id.to_string(), Arc::clone(&shared));
        self.live.fetch_add(1, Ordering::SeqCst);
        self.wake(&shared);
        Ok(Some(scan.records))
    }

    /// At shutdown: lets delivery go on until `deadline`, then returns; what
    /// is left stays spooled for the next start.
    pub fn drain(&self, deadline: Instant) {
        lock(&self.sched).deadline = Some(deadline);
        self.work.notify_all();
        while self.live.load(Ordering::SeqCst) > 0 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        // A last try for what waits in memory.
        let streams: Vec<Arc<Shared>> = lock(&self.sched).streams.values().cloned().collect();
        let (mut in_memory, mut memory_only) = (0, 0);
        for s in &streams {
            let mut t = lock(&s.tail);
            if !t.finished && !t.mem.is_empty() {
                self.flush(&s.id, &mut t, true);
                in_memory += t.mem.len();
                memory_only += usize::from(!t.files);
            }
        }
        if in_memory > 0 {
            error!(
                "outbox: {in_memory} post(s) kept in memory could not be spooled ({}) and are lost; their streams are closed at the next start{}",
                lock(&self.disk).error,
                if memory_only > 0 {
                    format!(
                        ", except {memory_only} that never got their files: the platform gets no closing post for those"
                    )
                } else {
                    String::new()
                }
            );
        }
        let left = self.live.load(Ordering::SeqCst);
        if left > 0 {
            warn!(
                "outbox: {left} stream(s) not fully delivered; kept in {} for the next start",
                self.dir.display()
            );
        }
        {
            let mut k = lock(&self.keeper.0);
            k.stop = true;
            self.keeper.1.notify_all();
        }
        self.write_status();
    }

    /// The figures now (a walk over the streams).
    pub fn stats(&self) -> Stats {
        let (streams, origins_down, workers) = {
            let g = lock(&self.sched);
            let down = g.origins.values().filter(|o| o.down.is_some()).count();
            (g.streams.values().cloned().collect::<Vec<_>>(), down, g.workers)
        };
        let mut st = Stats { streams: streams.len(), origins_down, workers, ..Stats::default() };
        for s in &streams {
            let t = lock(&s.tail);
            st.spooled_records += t.disk_records;
            st.spooled_bytes += t.disk_len - t.pos;
            st.memory_records += t.mem.len() as u64;
            st.memory_bytes += t.mem_bytes;
        }
        let d = lock(&self.disk);
        st.disk_failures = d.failures;
        st.disk_error = d.since.map(|_| d.error.clone());
        st.delivered = self.delivered.load(Ordering::SeqCst);
        st.dropped = self.dropped.load(Ordering::SeqCst);
        st.retried = self.retried.load(Ordering::Relaxed);
        st.open_files = self.open_files.load(Ordering::SeqCst);
        st
    }

    // ------------------------------------------------------------ the disk

    /// Moves a stream's records from memory to disk, creating its files
    /// first if need be. True when all its records are on disk. Without
    /// `force`, tries only when the last failure is `DISK_RETRY` old.
    fn flush(&self, id: &str, t: &mut Tail, force: bool) -> bool {
        if t.files && t.mem.is_empty() {
            return true;
        }
        if t.inflight || t.finished || !(force || self.disk_due()) {
            return false;
        }
        if !t.files {
            let fallback = t.fallback.as_ref().expect("a stream without files keeps its fallback");
            if let Err(e) = spool::create(&self.dir, id, fallback, t.next_seq) {
                self.disk_failed(id, "create its files", &e);
                // Files made in advance let it be closed after a crash all the same.
                if spool::create_from_spare(&self.spares, &self.dir, id, fallback, t.next_seq).is_err() {
                    return false;
                }
            }
            (t.files, t.fallback, t.disk_len, t.pos, t.disk_records) = (true, None, 0, 0, 0);
        }
        while let Some(line) = t.mem.pop_front() {
            if let Err(e) = self.append(id, t, &line) {
                t.mem.push_front(line);
                self.disk_failed(id, "write a record", &e);
                return false;
            }
            let n = line.len() as u64;
            t.mem_bytes -= n;
            self.memory_bytes.fetch_sub(n, Ordering::SeqCst);
        }
        self.room.1.notify_all();
        self.disk_ok();
        true
    }

    /// Puts a record after the stream's others: on disk if they all are and
    /// it fits, else in memory. True when on disk.
    fn place(&self, id: &str, t: &mut Tail, line: Vec<u8>) -> bool {
        if self.flush(id, t, false) {
            match self.append(id, t, &line) {
                Ok(()) => {
                    self.disk_ok();
                    return true;
                }
                Err(e) => self.disk_failed(id, "write a record", &e),
            }
        }
        let n = line.len() as u64;
        t.mem.push_back(line);
        t.mem_bytes += n;
        self.memory_bytes.fetch_add(n, Ordering::SeqCst);
        false
    }

    /// Writes one record at the end of the stream's whole records. The
    /// handle is kept for the next record while fewer than `file_cap` are.
    fn append(&self, id: &str, t: &mut Tail, line: &[u8]) -> io::Result<()> {
        let opened_now = t.file.is_none();
        if opened_now {
            t.file = Some(spool::open_q(&self.dir, id)?);
            self.open_files.fetch_add(1, Ordering::SeqCst);
        }
        let written = spool::write_at(t.file.as_ref().expect("opened above"), line, t.disk_len);
        if written.is_ok() {
            t.disk_len += line.len() as u64;
            t.disk_records += 1;
        }
        if opened_now && (t.final_queued || self.open_files.load(Ordering::SeqCst) > self.file_cap) {
            self.release_file(t);
        }
        written
    }

    fn release_file(&self, t: &mut Tail) {
        if t.file.take().is_some() {
            self.open_files.fetch_sub(1, Ordering::SeqCst);
        }
    }

    fn disk_due(&self) -> bool {
        !self.disk_failing.load(Ordering::SeqCst)
            || lock(&self.disk).retry_at.is_none_or(|at| Instant::now() >= at)
    }

    fn disk_failed(&self, id: &str, what: &str, e: &io::Error) {
        let now = Instant::now();
        let memory = self.memory_bytes.load(Ordering::SeqCst);
        let mut d = lock(&self.disk);
        d.failures += 1;
        d.error = e.to_string();
        d.retry_at = Some(now + DISK_RETRY);
        let since = *d.since.get_or_insert(now);
        self.disk_failing.store(true, Ordering::SeqCst);
        if d.logged.is_none() {
            error!(
                "outbox: cannot write the spool in {} ({e}; {id}: {what}): posts are kept in memory (up to {} MiB) and spooled as soon as it fits; delivery goes on; figures in {}",
                self.dir.display(),
                MEMORY_CAP >> 20,
                self.status_path.display()
            );
            d.logged = Some(now);
        } else if d.logged.is_some_and(|at| now - at >= LOG_EVERY) {
            warn!(
                "outbox: the spool is still not writable after {}s ({e}): {} KiB of posts in memory, {} failed write(s)",
                (now - since).as_secs(),
                memory >> 10,
                d.failures
            );
            d.logged = Some(now);
        }
    }

    fn disk_ok(&self) {
        if !self.disk_failing.load(Ordering::SeqCst) {
            return;
        }
        let mut d = lock(&self.disk);
        d.retry_at = None;
        if self.memory_bytes.load(Ordering::SeqCst) == 0
            && let Some(since) = d.since.take()
        {
            self.disk_failing.store(false, Ordering::SeqCst);
            d.logged = None;
            info!(
                "outbox: the spool is writable again after {:.1}s; every post kept in memory is spooled",
                since.elapsed().as_secs_f64()
            );
        }
    }

    // ------------------------------------------------------------ scheduling

    /// Queues a stream that may have something to do and gets a worker for it.
    fn wake(self: &Arc<Self>, s: &Arc<Shared>) {
        let mut g = lock(&self.sched);
        if !s.queued.load(Ordering::SeqCst) {
            s.queued.store(true, Ordering::SeqCst);
            g.origins.entry(s.origin.clone()).or_default().ready.push_back(Arc::clone(s));
            g.runnable(&s.origin, Instant::now());
        }
        self.staff(&mut g);
    }

    /// Starts workers while origins wait and fewer than `MAX_WORKERS` run.
    fn staff(self: &Arc<Self>, g: &mut Sched) {
        while g.runq.len() > g.idle + g.starting && g.workers < MAX_WORKERS {
            let outbox = Arc::clone(self);
            let spawned = std::thread::Builder::new()
                .name("outbox-deliver".into())
                .stack_size(256 << 10)
                .spawn(move || outbox.work());
            match spawned {
                Ok(_) => (g.workers, g.starting) = (g.workers + 1, g.starting + 1),
                Err(e) => {
                    // The keeper tries again within a second.
                    if g.said_spawn.is_none_or(|at| at.elapsed() >= LOG_EVERY) {
                        error!("outbox: cannot start a delivery thread ({e}); {} running", g.workers);
                        g.said_spawn = Some(Instant::now());
                    }
                    break;
                }
            }
        }
        if !g.runq.is_empty() {
            self.work.notify_one();
        }
    }

    /// A worker: serves one origin's next stream, one record, then the next
    /// origin in turn; waits when none is due; ends when no stream is left
    /// or at the drain's deadline.
    fn work(self: &Arc<Self>) {
        let mut exit = WorkerExit { outbox: self, serving: None };
        let mut g = lock(&self.sched);
        g.starting -= 1;
        loop {
            let now = Instant::now();
            if g.deadline.is_some_and(|d| now >= d) {
                break;
            }
            g.promote(now);
            let Some(key) = g.runq.pop_front() else {
                if g.streams.is_empty() {
                    break;
                }
                let mut wait =
                    g.next_due().map_or(Duration::from_secs(30), |at| at.saturating_duration_since(now));
                if let Some(d) = g.deadline {
                    wait = wait.min(d.saturating_duration_since(now));
                }
                g.idle += 1;
                g = self
                    .work
                    .wait_timeout(g, wait.max(Duration::from_millis(1)))
                    .unwrap_or_else(|p| p.into_inner())
                    .0;
                g.idle -= 1;
                continue;
            };
            let Some(o) = g.origins.get_mut(&key) else { continue };
            o.in_runq = false;
            let Some(stream) = o.ready.pop_front() else { continue };
            o.taken = true;
            exit.serving = Some(key.clone());
            drop(g);
            let outcome = self.serve(&stream);
            g = lock(&self.sched);
            exit.serving = None;
            let expired = self.settle(&mut g, &key, stream, outcome);
            if !expired.is_empty() {
                drop(g);
                for s in &expired {
                    self.give_up(s);
                }
                g = lock(&self.sched);
                for s in &expired {
                    g.streams.remove(&s.id);
                }
            }
        }
        drop(g);
        drop(exit);
    }

    /// Files the outcome of one turn: the stream back in line (or not), the
    /// origin's backoff, its turn. Returns the streams that are out of time.
    fn settle(&self, g: &mut Sched, key: &str, stream: Arc<Shared>, outcome: Outcome) -> Vec<Arc<Shared>> {
        let now = Instant::now();
        let mut expired = Vec::new();
        let o = g.origins.entry(key.to_string()).or_default();
        o.taken = false;
        match outcome {
            Outcome::Sent | Outcome::Idle => {
                if matches!(outcome, Outcome::Sent)
                    && let Some(down) = o.down.take()
                {
                    info!(
                        "outbox: {key} answers again after {:.0}s; delivering {} stream(s)",
                        down.since.elapsed().as_secs_f64(),
                        o.ready.len() + 1
                    );
                }
                if lock(&stream.tail).pending() {
                    o.ready.push_back(stream);
                } else {
                    stream.queued.store(false, Ordering::SeqCst);
                }
            }
            Outcome::Finished => {
                g.streams.remove(&stream.id);
            }
            Outcome::Retry(at, origin_at) => {
                o.delayed.push((at, stream));
                if let Some(origin_at) = origin_at {
                    let down =
                        o.down.get_or_insert(Down { since: now, retry_at: now, backoff: FIRST_BACKOFF });
                    down.retry_at = down.retry_at.max(origin_at);
                }
            }
            Outcome::Down(why) => {
                let down = o.down.get_or_insert_with(|| {
                    warn!(
                        "outbox: {key}: {}; retrying with backoff up to {}s",
                        crate::text::redact_userinfo(&why),
                        MAX_BACKOFF.as_secs()
                    );
                    Down { since: now, retry_at: now, backoff: FIRST_BACKOFF }
                });
                down.retry_at = now + crate::nonce::jitter(down.backoff, 0.25);
                down.backoff = (down.backoff * 2).min(MAX_BACKOFF);
                // The next probe is another stream's: one stuck record does not hold the origin.
                o.ready.push_back(stream);
                for s in &o.ready {
                    let mut t = lock(&s.tail);
                    let since = *t.failing_since.get_or_insert(now);
                    if now - since >= self.window {
                        expired.push(Arc::clone(s));
                    }
                }
                o.ready.retain(|s| !expired.iter().any(|e| Arc::ptr_eq(e, s)));
            }
        }
        if g.runnable(key, now) {
            self.work.notify_one();
        }
        if let Some(o) = g.origins.get(key)
            && o.ready.is_empty()
            && o.delayed.is_empty()
            && !o.taken
            && !o.in_runq
        {
            g.origins.remove(key);
        }
        expired
    }

    /// One turn of one stream: its next record posted, or the stream finished.
    fn serve(&self, s: &Shared) -> Outcome {
        let (record, from) = match self.next(s) {
            Next::Nothing => return Outcome::Idle,
            Next::Finish => {
                self.finish(s);
                return Outcome::Finished;
            }
            Next::Unreadable(e) => {
                error!("outbox: {}: cannot read its spool ({e}); trying again", s.id);
                let mut t = lock(&s.tail);
                t.failing_since.get_or_insert_with(Instant::now);
                let wait = crate::nonce::jitter(t.backoff, 0.25);
                t.backoff = (t.backoff * 2).min(MAX_BACKOFF);
                return Outcome::Retry(Instant::now() + wait, None);
            }
            Next::Record(r, from) => (r, from),
        };
        if lock(&s.tail).failing_since.is_some_and(|since| since.elapsed() >= self.window) {
            self.unmark(s, from);
            self.give_up(s);
            return Outcome::Finished;
        }
        let Some(headers) = self.signer.headers(&record.key, &record.url, record.body.as_bytes()) else {
            warn!(
                "outbox: {}: seq {} has no signing key ({}) any more; skipped",
                s.id, record.seq, record.key
            );
            return self.commit(s, &record, from);
        };
        match self.client.post(&record.url, &headers, record.body.as_bytes()) {
            Answer::Status { status, .. } if (200..300).contains(&status) => {
                let failures = {
                    let mut t = lock(&s.tail);
                    t.last_error = None;
                    std::mem::take(&mut t.failures)
                };
                if failures > 0 {
                    info!("outbox: {}: delivered again after {failures} failed attempt(s)", s.id);
                }
                self.commit(s, &record, from)
            }
            Answer::Status { status, retry_after, .. } if status == 408 || status == 429 || status >= 500 => {
                self.unmark(s, from);
                let mut t = lock(&s.tail);
                if t.failures == 0 {
                    warn!("outbox: {}: callback answered {status}; retrying", s.id);
                }
                t.failures += 1;
                t.last_error = Some(format!("answered {status}"));
                self.count(&s.origin, Tally::Retried, 1);
                t.failing_since.get_or_insert_with(Instant::now);
                let retry_after = retry_after.map(|r| r.min(Duration::from_secs(300)));
                let wait = retry_after.unwrap_or_else(|| crate::nonce::jitter(t.backoff, 0.25));
                t.backoff = (t.backoff * 2).min(MAX_BACKOFF);
                let now = Instant::now();
                Outcome::Retry(now + wait, retry_after.map(|r| now + r))
            }
            Answer::Status { status, .. } => {
                warn!("outbox: {}: callback refused seq {} with {status}; skipped", s.id, record.seq);
                self.commit(s, &record, from)
            }
            Answer::Failed(e) => {
                self.unmark(s, from);
                {
                    let mut t = lock(&s.tail);
                    t.failures += 1;
                    t.last_error = Some(crate::text::redact_userinfo(&e).chars().take(200).collect());
                }
                self.count(&s.origin, Tally::Retried, 1);
                Outcome::Down(e)
            }
        }
    }

    /// The stream's next record: from disk while it has undelivered ones,
    /// then from memory (after a try to spool them first).
    fn next(&self, s: &Shared) -> Next {
        let mut t = lock(&s.tail);
        loop {
            if t.finished {
                return Next::Nothing;
            }
            if t.pos < t.disk_len {
                // Read unlocked: records below `disk_len` never change, and
                // only this worker moves `pos` or empties the file.
                let (pos, end) = (t.pos, t.disk_len);
                drop(t);
                let line = match spool::read_at(&self.dir, &s.id, pos, end) {
                    Ok(line) => line,
                    Err(e) => return Next::Unreadable(e),
                };
                match serde_json::from_slice::<Record>(&line) {
                    Ok(r) => return Next::Record(r, From::Disk(line.len() as u64)),
                    Err(e) => {
                        error!("outbox: {}: unreadable record at {pos}: {e}; skipped", s.id);
                        t = lock(&s.tail);
                        t.pos += line.len() as u64;
                        t.disk_records -= 1;
                        self.save_pos(&s.id, &mut t);
                        continue;
                    }
                }
            }
            if !t.mem.is_empty() {
                if self.flush(&s.id, &mut t, false) {
                    continue;
                }
                let record = serde_json::from_slice::<Record>(&t.mem[0]).expect("records in memory are ours");
                t.inflight = true;
                return Next::Record(record, From::Memory);
            }
            if t.final_delivered || (t.writer_gone && !t.final_queued) {
                return Next::Finish;
            }
            return Next::Nothing;
        }
    }

    /// A record in memory that was not delivered may be spooled again.
    fn unmark(&self, s: &Shared, from: From) {
        if let From::Memory = from {
            lock(&s.tail).inflight = false;
        }
    }

    /// A record delivered (or skipped for good): its position recorded, the
    /// file emptied once all of it is delivered and it is large.
    fn commit(&self, s: &Shared, record: &Record, from: From) -> Outcome {
        let mut t = lock(&s.tail);
        match from {
            From::Disk(len) => {
                t.pos += len;
                t.disk_records -= 1;
            }
            From::Memory => {
                let line = t.mem.pop_front().expect("the record posted from memory");
                t.inflight = false;
                t.mem_bytes -= line.len() as u64;
                self.memory_bytes.fetch_sub(line.len() as u64, Ordering::SeqCst);
                self.room.1.notify_all();
            }
        }
        t.next_seq = t.next_seq.max(record.seq + 1);
        (t.failing_since, t.backoff) = (None, FIRST_BACKOFF);
        self.count(&s.origin, Tally::Delivered, 1);
        if t.files && !record.last && t.pos == t.disk_len && t.disk_len >= COMPACT_AT {
            // The position first: a crash in between re-sends, never loses.
            let emptied = spool::write_pos(&self.dir, &s.id, 0, t.next_seq)
                .and_then(|()| spool::open_q(&self.dir, &s.id)?.set_len(0));
            match emptied {
                Ok(()) => (t.pos, t.disk_len) = (0, 0),
                Err(_) => self.save_pos(&s.id, &mut t),
            }
        } else {
            self.save_pos(&s.id, &mut t);
        }
        self.note();
        if record.last {
            t.final_delivered = true;
            drop(t);
            self.finish(s);
            return Outcome::Finished;
        }
        Outcome::Sent
    }

    /// Writes the stream's position (in place: it needs no new block). A
    /// failure is logged; delivery goes on, and a restart would re-send from
    /// the last position written.
    fn save_pos(&self, id: &str, t: &mut Tail) {
        if !t.files {
            return;
        }
        if let Err(e) = spool::write_pos(&self.dir, id, t.pos, t.next_seq)
            && t.said_pos.is_none_or(|at| at.elapsed() >= LOG_EVERY)
        {
            error!("outbox: {id}: cannot record what was delivered ({e}); a restart now would post it again");
            t.said_pos = Some(Instant::now());
        }
    }

    /// Adds `n` to one of the three totals and to the same count of
    /// `origin`, so the counts by origin always sum to the totals (one lock,
    /// held for the addition; a key is allocated only for an origin not
    /// counted before, and once for `other`).
    fn count(&self, origin: &str, tally: Tally, n: u64) {
        let field: fn(&mut OriginCounts) -> &mut u64 = match tally {
            Tally::Delivered => {
                self.delivered.fetch_add(n, Ordering::SeqCst);
                |c| &mut c.delivered
            }
            Tally::Retried => {
                self.retried.fetch_add(n, Ordering::Relaxed);
                |c| &mut c.retried
            }
            Tally::Dropped => {
                self.dropped.fetch_add(n, Ordering::SeqCst);
                |c| &mut c.dropped
            }
        };
        let mut map = lock(&self.by_origin);
        let mut key = origin_label(origin);
        if let Some(c) = map.get_mut(key) {
            *field(c) += n;
            return;
        }
        if map.len() >= COUNTED_ORIGINS {
            if let Some(c) = map.get_mut("other") {
                *field(c) += n;
                return;
            }
            key = "other";
        }
        *field(map.entry(key.to_string()).or_default()) += n;
    }

    /// Posts delivered, retried and dropped since this process started, by
    /// callback origin ([`origin_label`]), sorted.
    pub fn origin_counts(&self) -> Vec<(String, OriginCounts)> {
        let mut list: Vec<_> = lock(&self.by_origin).iter().map(|(k, v)| (k.clone(), *v)).collect();
        list.sort_by(|a, b| a.0.cmp(&b.0));
        list
    }

    /// Out of time: the rest of the stream is dropped.
    fn give_up(&self, s: &Shared) {
        let left = {
            let t = lock(&s.tail);
            t.disk_records + t.mem.len() as u64
        };
        error!(
            "outbox: {}: no delivery to {} for {:?}; dropping the rest of this stream ({left} post(s))",
            s.id, s.origin, self.window
        );
        self.count(&s.origin, Tally::Dropped, left);
        self.finish(s);
    }

    /// The stream is done: its files removed, its memory freed.
    fn finish(&self, s: &Shared) {
        let mut t = lock(&s.tail);
        if t.finished {
            return;
        }
        t.finished = true;
        self.release_file(&mut t);
        self.memory_bytes.fetch_sub(t.mem_bytes, Ordering::SeqCst);
        (t.mem, t.mem_bytes, t.disk_records) = (VecDeque::new(), 0, 0);
        t.pos = t.disk_len;
        if t.files {
            spool::remove(&self.dir, &s.id);
        }
        drop(t);
        self.live.fetch_sub(1, Ordering::SeqCst);
        self.room.1.notify_all();
        self.note();
    }

    fn stopping(&self) -> bool {
        lock(&self.sched).deadline.is_some_and(|d| Instant::now() >= d)
    }

    // ------------------------------------------------------------ the keeper

    /// Something changed: the keeper rewrites the status file.
    fn note(&self) {
        let mut k = lock(&self.keeper.0);
        if !k.dirty {
            k.dirty = true;
            self.keeper.1.notify_one();
        }
    }

    /// The keeper thread: the status file after each change (at most every
    /// 200 ms), records kept in memory spooled as soon as they fit, a worker
    /// started if none could be.
    fn keep(self: &Arc<Self>) {
        loop {
            let stop = {
                let mut k = lock(&self.keeper.0);
                while !k.dirty && !k.stop {
                    let wait = if self.memory_bytes.load(Ordering::SeqCst) > 0 {
                        DISK_RETRY
                    } else if self.live.load(Ordering::SeqCst) > 0 {
                        Duration::from_secs(1)
                    } else {
                        Duration::from_secs(3600)
                    };
                    let (guard, timeout) =
                        self.keeper.1.wait_timeout(k, wait).unwrap_or_else(|p| p.into_inner());
                    k = guard;
                    if timeout.timed_out() {
                        break;
                    }
                }
                k.dirty = false;
                k.stop
            };
            if stop {
                return;
            }
            if self.memory_bytes.load(Ordering::SeqCst) > 0 {
                self.respool();
            }
            if !self.disk_failing.load(Ordering::SeqCst) {
                // (a failure here shows again in the next stream's writes)
                let _ = spool::make_spares(&self.spares, SPARES);
            }
            {
                let mut g = lock(&self.sched);
                if g.workers == 0 && !g.runq.is_empty() {
                    self.staff(&mut g);
                }
            }
            self.write_status();
            std::thread::sleep(STATUS_EVERY);
        }
    }

    /// Tries to spool every stream's records kept in memory (the first
    /// failure ends the pass until the next).
    fn respool(&self) {
        let streams: Vec<Arc<Shared>> = lock(&self.sched).streams.values().cloned().collect();
        let mut force = true;
        for s in streams {
            let mut t = lock(&s.tail);
            if t.mem.is_empty() || t.finished {
                continue;
            }
            if !self.flush(&s.id, &mut t, force) && !t.inflight {
                break;
            }
            force = false;
        }
    }

    /// Rewrites `<dir>.status` in place (created full size once, so that a
    /// full disk cannot fail the rewrite).
    fn write_status(&self) {
        let st = self.stats();
        let now_ms = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default().as_millis() as u64;
        let error: String = st.disk_error.as_deref().unwrap_or("").chars().take(200).collect();
        let mut text = serde_json::json!({
            "pid": std::process::id(),
            "updatedMs": now_ms,
            "streams": st.streams,
            "originsDown": st.origins_down,
            "workers": st.workers,
            "spooledRecords": st.spooled_records,
            "spooledBytes": st.spooled_bytes,
            "memoryRecords": st.memory_records,
            "memoryBytes": st.memory_bytes,
            "memoryCapBytes": MEMORY_CAP,
            "delivered": st.delivered,
            "dropped": st.dropped,
            "diskFailures": st.disk_failures,
            "diskError": if error.is_empty() { serde_json::Value::Null } else { error.into() },
            "openFiles": st.open_files,
        })
        .to_string()
        .into_bytes();
        text.resize(STATUS_BYTES - 1, b' ');
        text.push(b'\n');
        let mut file = lock(&self.status_file);
        if file.is_none() {
            let opened = std::fs::OpenOptions::new()
                .create(true)
                .write(true)
                .truncate(false)
                .mode(0o600)
                .open(&self.status_path);
            *file = opened.ok();
        }
        if let Some(f) = file.as_ref()
            && f.write_all_at(&text, 0).is_err()
        {
            // Created but never filled (the disk was full): try again next time.
            *file = None;
        }
    }

    /// While more than `MEMORY_CAP` waits in memory: waits a moment for
    /// room (logged at most once a minute).
    fn wait_room(&self, id: &str) {
        {
            let mut d = lock(&self.disk);
            if d.said_full.is_none_or(|at| at.elapsed() >= LOG_EVERY) {
                warn!(
                    "outbox: {} MiB of posts wait in memory for the spool; {id} and any other stream with more waits until they are spooled or delivered",
                    MEMORY_CAP >> 20
                );
                d.said_full = Some(Instant::now());
            }
        }
        let g = lock(&self.room.0);
        let _unused = self.room.1.wait_timeout(g, Duration::from_millis(250));
    }
}

/// Decrements the worker count however a worker ends (a panic included),
/// and frees the origin it was serving.
struct WorkerExit<'a> {
    outbox: &'a Arc<Outbox>,
    serving: Option<String>,
}

impl Drop for WorkerExit<'_> {
    fn drop(&mut self) {
        let mut g = lock(&self.outbox.sched);
        g.workers -= 1;
        if let Some(key) = self.serving.take()
            && let Some(o) = g.origins.get_mut(&key)
        {
            o.taken = false;
            g.runnable(&key, Instant::now());
        }
        if !g.runq.is_empty() && g.deadline.is_none() {
            // Someone else carries on (a worker that ended on an empty queue leaves none).
            self.outbox.staff(&mut g);
        }
    }
}

impl Sched {
    /// Puts an origin in the run queue if it has a ready stream, no worker and no backoff.
    fn runnable(&mut self, key: &str, now: Instant) -> bool {
        let Some(o) = self.origins.get_mut(key) else { return false };
        if o.taken || o.in_runq || o.ready.is_empty() || o.down.as_ref().is_some_and(|d| d.retry_at > now) {
            return false;
        }
        o.in_runq = true;
        self.runq.push_back(key.to_string());
        true
    }

    /// Streams and origins whose backoff is over become ready again.
    fn promote(&mut self, now: Instant) {
        let keys: Vec<String> = self
            .origins
            .iter()
            .filter(|(_, o)| {
                o.delayed.iter().any(|(at, _)| *at <= now)
                    || (!o.in_runq && !o.taken && o.down.as_ref().is_some_and(|d| d.retry_at <= now))
            })
            .map(|(k, _)| k.clone())
            .collect();
        for key in keys {
            if let Some(o) = self.origins.get_mut(&key) {
                let (due, later): (Vec<_>, Vec<_>) = o.delayed.drain(..).partition(|(at, _)| *at <= now);
                o.delayed = later;
                o.ready.extend(due.into_iter().map(|(_, s)| s));
            }
            self.runnable(&key, now);
        }
    }

    /// The next instant a backoff ends.
    fn next_due(&self) -> Option<Instant> {
        self.origins
            .values()
            .flat_map(|o| {
                let down = o.down.as_ref().filter(|_| !o.ready.is_empty() && !o.taken).map(|d| d.retry_at);
                o.delayed.iter().map(|(at, _)| *at).chain(down)
            })
            .min()
    }
}

impl Stream {
    /// Appends one post (in seq order; the last one with `last` set). It goes
    /// to disk, or to memory while the disk does not take it; past
    /// [`MEMORY_CAP`] a stream that already has posts in memory waits here
    /// until there is room. A post after the closing one is dropped.
    pub fn push(&mut self, record: &Record) {
        if self.closed {
            warn!("outbox: {}: a post after the closing one (seq {}) dropped", self.shared.id, record.seq);
            return;
        }
        let outbox = &self.outbox;
        let line = spool::line(record);
        loop {
            // (before the stream's lock: the scheduler's comes first)
            let stopping = outbox.stopping();
            let mut t = lock(&self.shared.tail);
            if t.finished {
                // Dropped after `window` without delivery (logged then).
                self.closed |= record.last;
                return;
            }
            let crowded = !record.last
                && !t.mem.is_empty()
                && outbox.memory_bytes.load(Ordering::SeqCst) + line.len() as u64 > MEMORY_CAP
                && !stopping;
            if crowded && !outbox.flush(&self.shared.id, &mut t, false) {
                drop(t);
                outbox.wait_room(&self.shared.id);
                continue;
            }
            outbox.place(&self.shared.id, &mut t, line);
            if record.last {
                t.final_queued = true;
                outbox.release_file(&mut t);
            }
            break;
        }
        self.next_seq = record.seq + 1;
        self.closed = record.last;
        outbox.wake(&self.shared);
        outbox.note();
    }
}

impl Drop for Stream {
    fn drop(&mut self) {
        if !self.closed {
            warn!(
                "outbox: {}: its writer ended without a closing post; closing it with its fallback",
                self.shared.id
            );
            let record = self.fallback.record(self.next_seq);
            self.push(&record);
        }
        let mut t = lock(&self.shared.tail);
        t.writer_gone = true;
        self.outbox.release_file(&mut t);
        drop(t);
        self.outbox.wake(&self.shared);
    }
}

/// `scheme://host:port` of a URL (the default port filled in, userinfo
/// dropped, lowercased): what one worker serves at a time. A URL the client
/// would refuse is its own origin (see [`origin_label`] before showing it).
pub fn origin(url: &str) -> String {
    let scheme =
        if url.get(..8).is_some_and(|p| p.eq_ignore_ascii_case("https://")) { "https" } else { "http" };
    match super::client::http_origin(url) {
        Some((host, port)) if host.contains(':') => format!("{scheme}://[{host}]:{port}"),
        Some((host, port)) => format!("{scheme}://{host}:{port}"),
        None => url.to_ascii_lowercase(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn origins_are_scheme_host_and_port() {
        assert_eq!(origin("http://127.0.0.1:8080/internal/x"), "http://127.0.0.1:8080");
        assert_eq!(origin("https://User:pw@Example.com/a?b"), "https://example.com:443");
        assert_eq!(origin("http://example.com"), "http://example.com:80");
        assert_eq!(origin("http://[::1]:9/x"), "http://[::1]:9");
        assert_eq!(origin("http://[::1]/x"), "http://[::1]:80");
    }

    #[test]
    fn counts_by_origin_sum_to_the_totals_and_past_the_cap_go_to_other() {
        struct NoKeys;
        impl Signer for NoKeys {
            fn headers(&self, _: &str, _: &str, _: &[u8]) -> Option<Vec<(String, String)>> {
                Some(Vec::new())
            }
        }
        let dir = std::env::temp_dir().join(format!(
            "aion-outbox-counts-{}-{:x}",
            std::process::id(),
            crate::nonce::nonce()
        ));
        let outbox = Outbox::open(&dir, Arc::new(NoKeys), Duration::from_secs(60)).unwrap();
        for i in 0..COUNTED_ORIGINS + 10 {
            outbox.count(&format!("http://h{i}:80"), Tally::Delivered, 1);
        }
        outbox.count("http://h0:80", Tally::Retried, 2);
        outbox.count("http://late:80", Tally::Dropped, 3);
        let counts = outbox.origin_counts();
        assert_eq!(counts.len(), COUNTED_ORIGINS + 1);
        let get = |k: &str| counts.iter().find(|(o, _)| o == k).map(|(_, c)| *c);
        assert_eq!(get("other"), Some(OriginCounts { delivered: 10, retried: 0, dropped: 3 }));
        assert_eq!(get("http://h0:80"), Some(OriginCounts { delivered: 1, retried: 2, dropped: 0 }));
        let st = outbox.stats();
        let sum = |f: fn(&OriginCounts) -> u64| counts.iter().map(|(_, c)| f(c)).sum::<u64>();
        assert_eq!(
            (sum(|c| c.delivered), sum(|c| c.retried), sum(|c| c.dropped)),
            (st.delivered, st.retried, st.dropped)
        );
        assert_eq!((st.delivered, st.retried, st.dropped), (COUNTED_ORIGINS as u64 + 10, 2, 3));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
