//! Ordered, signed, at-least-once delivery of posts to a platform, surviving
//! outages and restarts. One design for push-mode runs and poll-mode sessions.
//!
//! A *stream* (one run) is an append-only spool file, `<id>.q`, one JSON record
//! per line, and a delivery thread that reads it from the offset kept in
//! `<id>.pos` and posts one record at a time, in order. The file is the queue:
//! memory stays flat however long the platform is down, and what was not
//! delivered is still there after a restart, when [`Outbox::open`] resumes it.
//! A stream whose writer died before its final post (a crash) is closed on
//! resume with the fallback post kept in `<id>.close`. Once everything
//! written so far is delivered and the file has grown past 1 MiB, it is
//! emptied, so a long stream takes only what is not yet delivered on disk.
//!
//! Failures (no connection, timeout, 408, 429, 5xx) are retried with
//! exponential backoff (250 ms doubling to 10 s) and jitter for `window`; another status is logged and
//! that post skipped. Posts are signed when sent, by the [`Signer`], so a
//! timestamped signature is fresh after an outage and no key is written to disk.

use super::client::{Answer, Client};
use crate::logging::{error, info, warn};
use serde::{Deserialize, Serialize};
use std::fs::{File, OpenOptions};
use std::io::{self, BufRead, BufReader, Seek, SeekFrom, Write};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

/// A spool file this large, fully delivered, is emptied.
const COMPACT_AT: u64 = 1 << 20;

/// Headers for a post, computed when it is sent. None: the key is gone (a
/// project removed from the config since the post was queued); it is skipped.
pub trait Signer: Send + Sync {
    fn headers(&self, key: &str, url: &str, body: &[u8]) -> Option<Vec<(String, String)>>;
}

/// One post as spooled.
#[derive(Serialize, Deserialize, Clone)]
pub struct Record {
    pub url: String,
    /// Names the signing key (a project id); never the key itself.
    pub key: String,
    pub seq: u64,
    /// The closing post of its stream.
    #[serde(rename = "final")]
    pub last: bool,
    /// The exact body bytes that are signed and sent.
    pub body: String,
}

/// What closes a stream whose writer vanished: its `body` is a JSON object
/// that gets `"seq"` added.
#[derive(Serialize, Deserialize)]
pub struct Fallback {
    pub url: String,
    pub key: String,
    pub body: serde_json::Map<String, serde_json::Value>,
}

pub struct Outbox {
    /// Held for the life of the process: one connector per spool directory,
    /// or a live stream of another would look like a crashed one.
    _lock: nix::fcntl::Flock<File>,
    dir: PathBuf,
    client: Client,
    signer: Arc<dyn Signer>,
    window: Duration,
    /// Delivery threads still running.
    active: AtomicUsize,
    /// Set at shutdown: retries stop at this instant, leaving the spool for the next start.
    deadline: Mutex<Option<Instant>>,
}

/// The writing end of a stream, owned by the run that produces its posts.
pub struct Stream {
    file: File,
    state: Arc<StreamState>,
}

/// Shared by a stream's writer and its delivery thread.
struct StreamState {
    /// Bytes appended so far, and whether the writer is done.
    progress: Mutex<(u64, bool)>,
    more: Condvar,
}

impl Outbox {
    /// Opens (creating, mode 0700) the spool directory and resumes every
    /// stream left there by an earlier process.
    pub fn open(dir: &Path, signer: Arc<dyn Signer>, window: Duration) -> io::Result<Arc<Outbox>> {
        std::fs::create_dir_all(dir)?;
        std::fs::set_permissions(dir, std::os::unix::fs::PermissionsExt::from_mode(0o700))?;
        let lock_file = private_file(&dir.join(".lock"), false)?;
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
        let outbox = Arc::new(Outbox {
            _lock: lock,
            dir: dir.to_path_buf(),
            client: Client::new(Duration::from_secs(15)),
            signer,
            window,
            active: AtomicUsize::new(0),
            deadline: Mutex::new(None),
        });
        let mut leftovers: Vec<String> = std::fs::read_dir(dir)?
            .filter_map(Result::ok)
            .filter_map(|e| e.file_name().into_string().ok()?.strip_suffix(".q").map(str::to_string))
            .collect();
        leftovers.sort();
        for id in leftovers {
            match outbox.resume(&id) {
                Ok(n) => info!("outbox: resuming {id} ({n} post(s) spooled)"),
                Err(e) => error!("outbox: cannot resume {id}: {e}"),
            }
        }
        Ok(outbox)
    }

    fn path(&self, id: &str, ext: &str) -> PathBuf {
        self.dir.join(format!("{id}.{ext}"))
    }

    /// Starts a stream: its spool file, its fallback close, its delivery thread.
    pub fn stream(self: &Arc<Self>, id: &str, fallback: &Fallback) -> io::Result<Stream> {
        let mut close = private_file(&self.path(id, "close"), true)?;
        close.write_all(&serde_json::to_vec(fallback)?)?;
        let file = private_file(&self.path(id, "q"), true)?;
        let state = Arc::new(StreamState { progress: Mutex::new((0, false)), more: Condvar::new() });
        self.spawn(id.to_string(), Arc::clone(&state))?;
        Ok(Stream { file, state })
    }

    /// Whether stream `id` still has posts to deliver (its spool file is
    /// removed once the stream is done, delivered or given up on).
    pub fn pending(&self, id: &str) -> bool {
        self.path(id, "q").exists()
    }

    /// Re-delivers a spooled stream, first closing it if its writer never did.
    fn resume(self: &Arc<Self>, id: &str) -> io::Result<usize> {
        let q = self.path(id, "q");
        let records = read_records(&q)?;
        let count = records.len();
        let mut file = OpenOptions::new().append(true).open(&q)?;
        if !records.last().is_some_and(|r| r.last) {
            // The writer died mid-stream (a crash): close the stream for it.
            let fallback: Option<Fallback> =
                std::fs::read(self.path(id, "close")).ok().and_then(|b| serde_json::from_slice(&b).ok());
            if let Some(mut f) = fallback {
                let delivered = read_pos(&self.path(id, "pos")).1;
                let seq = records.last().map_or(delivered, |r| r.seq + 1);
                f.body.insert("seq".into(), seq.into());
                let body = serde_json::to_string(&f.body)?;
                append(&mut file, &Record { url: f.url, key: f.key, seq, last: true, body })?;
            }
        }
        let len = file.metadata()?.len();
        let state = Arc::new(StreamState { progress: Mutex::new((len, true)), more: Condvar::new() });
        self.spawn(id.to_string(), state)?;
        Ok(count)
    }

    fn spawn(self: &Arc<Self>, id: String, state: Arc<StreamState>) -> io::Result<()> {
        let outbox = Arc::clone(self);
        self.active.fetch_add(1, Ordering::SeqCst);
        let spawned =
            std::thread::Builder::new().name(format!("outbox-{id}")).stack_size(256 << 10).spawn(move || {
                if let Err(e) = outbox.deliver_stream(&id, &state) {
                    error!("outbox: stream {id}: {e}");
                }
                outbox.active.fetch_sub(1, Ordering::SeqCst);
            });
        if spawned.is_err() {
            self.active.fetch_sub(1, Ordering::SeqCst);
        }
        spawned.map(|_| ())
    }

    /// At shutdown: lets delivery go on until `deadline`, then returns; what is
    /// left stays spooled for the next start.
    pub fn drain(&self, deadline: Instant) {
        *self.deadline.lock().unwrap_or_else(|p| p.into_inner()) = Some(deadline);
        while self.active.load(Ordering::SeqCst) > 0 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        let left = self.active.load(Ordering::SeqCst);
        if left > 0 {
            warn!(
                "outbox: {left} stream(s) not fully delivered; kept in {} for the next start",
                self.dir.display()
            );
        }
    }

    fn stopping(&self) -> bool {
        self.deadline.lock().unwrap_or_else(|p| p.into_inner()).is_some_and(|d| Instant::now() >= d)
    }

    /// The delivery thread of one stream.
    fn deliver_stream(&self, id: &str, state: &StreamState) -> io::Result<()> {
        let q = self.path(id, "q");
        let (mut pos, _) = read_pos(&self.path(id, "pos"));
        let pos_file = private_file(&self.path(id, "pos"), false)?;
        let mut reader = BufReader::new(File::open(&q)?);
        reader.seek(SeekFrom::Start(pos))?;
        let mut line = Vec::new();
        loop {
            // Wait until a whole record is there (or the stream is over).
            let n = reader.read_until(b'\n', &mut line)?;
            if !line.ends_with(b"\n") {
                let guard = state.progress.lock().unwrap_or_else(|p| p.into_inner());
                let (written, done) = *guard;
                if written > pos + line.len() as u64 || n > 0 {
                    continue;
                }
                if done {
                    break; // the writer ended without a final post: nothing more will come
                }
                let _unused = state.more.wait_timeout(guard, Duration::from_secs(1));
                continue;
            }
            let record: Record = match serde_json::from_slice(&line) {
                Ok(r) => r,
                Err(e) => {
                    error!("outbox: {id}: unreadable record at {pos}: {e}; skipped");
                    pos += line.len() as u64;
                    line.clear();
                    continue;
                }
            };
            match self.deliver(id, &record) {
                Delivery::Done => {}
                Delivery::Interrupted => return Ok(()), // shutdown: resume next start
                Delivery::GaveUp => {
                    error!(
                        "outbox: {id}: no delivery to {} for {:?}; dropping the rest of this stream",
                        crate::text::redact_userinfo(&record.url),
                        self.window
                    );
                    break;
                }
            }
            pos += line.len() as u64;
            line.clear();
            let next_seq = record.seq + 1;
            if pos >= COMPACT_AT && !record.last {
                // Everything written so far delivered? Then start the file over.
                let mut progress = state.progress.lock().unwrap_or_else(|p| p.into_inner());
                if progress.0 == pos {
                    // .pos first: a crash in between re-sends, never loses.
                    write_pos(&pos_file, 0, next_seq)?;
                    OpenOptions::new().write(true).open(&q)?.set_len(0)?;
                    progress.0 = 0;
                    pos = 0;
                    reader.seek(SeekFrom::Start(0))?;
                }
            }
            write_pos(&pos_file, pos, next_seq)?;
            if record.last {
                break;
            }
        }
        for ext in ["q", "pos", "close"] {
            let _ = std::fs::remove_file(self.path(id, ext));
        }
        Ok(())
    }

    /// Posts one record until it is accepted, refused for good, or the window closes.
    fn deliver(&self, id: &str, record: &Record) -> Delivery {
        let started = Instant::now();
        let mut backoff = Duration::from_millis(250);
        let mut failures = 0u32;
        loop {
            let Some(headers) = self.signer.headers(&record.key, &record.url, record.body.as_bytes()) else {
                warn!(
                    "outbox: {id}: seq {} has no signing key ({}) any more; skipped",
                    record.seq, record.key
                );
                return Delivery::Done;
            };
            let wait = match self.client.post(&record.url, &headers, record.body.as_bytes()) {
                Answer::Status { status, .. } if (200..300).contains(&status) => {
                    if failures > 0 {
                        info!("outbox: {id}: delivered again after {failures} failed attempt(s)");
                    }
                    return Delivery::Done;
                }
                Answer::Status { status, retry_after, .. }
                    if status == 408 || status == 429 || status >= 500 =>
                {
                    if failures == 0 {
                        warn!("outbox: {id}: callback answered {status}; retrying");
                    }
                    retry_after.map(|r| r.min(Duration::from_secs(300)))
                }
                Answer::Status { status, .. } => {
                    warn!("outbox: {id}: callback refused seq {} with {status}; skipped", record.seq);
                    return Delivery::Done;
                }
                Answer::Failed(e) => {
                    if failures == 0 {
                        warn!("outbox: {id}: {}; retrying", crate::text::redact_userinfo(&e));
                    }
                    None
                }
            };
            failures += 1;
            if started.elapsed() >= self.window {
                return Delivery::GaveUp;
            }
            let pause = wait.unwrap_or_else(|| crate::nonce::jitter(backoff, 0.25));
            backoff = (backoff * 2).min(Duration::from_secs(10));
            let until = Instant::now() + pause;
            while Instant::now() < until {
                if self.stopping() {
                    return Delivery::Interrupted;
                }
                std::thread::sleep((until - Instant::now()).min(Duration::from_millis(100)));
            }
            if self.stopping() {
                return Delivery::Interrupted;
            }
        }
    }
}

/// What a spool directory holds undelivered, read without taking it over
/// (`aion-connector doctor` reads the spool of a running connector): per
/// stream id, the URL of each post past its delivered offset (`<id>.pos`),
/// plus its fallback close (`<id>.close`) when the stream has no final post
/// yet. Streams come sorted by id; an unreadable file is an error.
pub fn undelivered(dir: &Path) -> io::Result<Vec<(String, Vec<String>)>> {
    let mut ids: Vec<String> = std::fs::read_dir(dir)?
        .filter_map(Result::ok)
        .filter_map(|e| e.file_name().into_string().ok()?.strip_suffix(".q").map(str::to_string))
        .collect();
    ids.sort();
    let mut out = Vec::new();
    for id in ids {
        let q = dir.join(format!("{id}.q"));
        let (pos, _) = read_pos(&dir.join(format!("{id}.pos")));
        let mut reader = BufReader::new(File::open(&q)?);
        reader.seek(SeekFrom::Start(pos))?;
        let mut urls = Vec::new();
        let mut last = false;
        for line in reader.split(b'\n') {
            if let Ok(record) = serde_json::from_slice::<Record>(&line?) {
                last = record.last;
                urls.push(record.url);
            }
        }
        if !last
            && let Ok(bytes) = std::fs::read(dir.join(format!("{id}.close")))
            && let Ok(fallback) = serde_json::from_slice::<Fallback>(&bytes)
        {
            urls.push(fallback.url);
        }
        if !urls.is_empty() {
            out.push((id, urls));
        }
    }
    Ok(out)
}

enum Delivery {
    Done,
    GaveUp,
    Interrupted,
}

impl Stream {
    /// Appends one post; its delivery thread picks it up at once.
    pub fn push(&mut self, record: &Record) -> io::Result<()> {
        // The append happens under the lock (a local write, no network) so the
        // delivery thread cannot empty the file between the write and the count.
        let mut progress = self.state.progress.lock().unwrap_or_else(|p| p.into_inner());
        let written = append(&mut self.file, record)?;
        progress.0 += written;
        progress.1 |= record.last;
        self.state.more.notify_one();
        Ok(())
    }
}

impl Drop for Stream {
    fn drop(&mut self) {
        let mut progress = self.state.progress.lock().unwrap_or_else(|p| p.into_inner());
        progress.1 = true;
        self.state.more.notify_one();
    }
}

/// One record, one line, one write: the reader never sees half of it twice.
fn append(file: &mut File, record: &Record) -> io::Result<u64> {
    let mut line = serde_json::to_vec(record)?;
    line.push(b'\n');
    file.write_all(&line)?;
    Ok(line.len() as u64)
}

/// `<id>.pos`: the offset of the next record to deliver, and the seq after
/// the last one delivered (what a fallback gets once the file was emptied).
fn read_pos(path: &Path) -> (u64, u64) {
    let mut b = [0u8; 16];
    match File::open(path).and_then(|f| f.read_exact_at(&mut b, 0)) {
        Ok(()) => (
            u64::from_le_bytes(b[..8].try_into().expect("8 bytes")),
            u64::from_le_bytes(b[8..].try_into().expect("8 bytes")),
        ),
        Err(_) => {
            let mut short = [0u8; 8];
            let pos = File::open(path)
                .and_then(|f| f.read_exact_at(&mut short, 0))
                .map_or(0, |_| u64::from_le_bytes(short));
            (pos, 0)
        }
    }
}

fn write_pos(file: &File, pos: u64, next_seq: u64) -> io::Result<()> {
    let mut b = [0u8; 16];
    b[..8].copy_from_slice(&pos.to_le_bytes());
    b[8..].copy_from_slice(&next_seq.to_le_bytes());
    file.write_all_at(&b, 0)
}

fn read_records(path: &Path) -> io::Result<Vec<Record>> {
    let reader = BufReader::new(File::open(path)?);
    Ok(reader.split(b'\n').filter_map(Result::ok).filter_map(|l| serde_json::from_slice(&l).ok()).collect())
}

fn private_file(path: &Path, append: bool) -> io::Result<File> {
    OpenOptions::new().create(true).read(true).write(!append).append(append).mode(0o600).open(path)
}
