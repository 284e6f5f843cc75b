//! The files of one outbox stream `<id>` in the spool directory, and the
//! record format. No threads; every function opens what it needs and closes
//! it again (the caller may keep an append handle, see [`write_at`]).
//!
//! - `<id>.close`: the [`Fallback`] that closes the stream if its writer
//!   vanishes (a crash);
//! - `<id>.pos`: 16 bytes, the offset in `<id>.q` of the next record to
//!   deliver and the seq after the last one delivered; written in place, so
//!   once created it never needs a new block (a full disk cannot fail it on
//!   tmpfs or ext4);
//! - `<id>.q`: the records, one JSON line each. A record is written at the
//!   length known to hold only whole records and the file is cut back to
//!   that length if the write fails, so a record is on disk whole or not at
//!   all; [`scan`] also drops a torn tail left by a crash.
//!
//! They are created in that order, `.q` last, and removed `.q` first: a `.q`
//! always has its `.close` and `.pos`, and a `.close` or `.pos` without a `.q`
//! is a leftover ([`orphans`]).

use serde::{Deserialize, Serialize};
use std::fs::{File, OpenOptions};
use std::io::{self, BufRead, BufReader, Read, Seek, SeekFrom};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

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
#[derive(Serialize, Deserialize, Clone)]
pub struct Fallback {
    pub url: String,
    pub key: String,
    pub body: serde_json::Map<String, serde_json::Value>,
}

impl Fallback {
    /// The closing record this fallback makes at `seq`.
    pub fn record(&self, seq: u64) -> Record {
        let mut body = self.body.clone();
        body.insert("seq".into(), seq.into());
        let body = serde_json::Value::Object(body).to_string();
        Record { url: self.url.clone(), key: self.key.clone(), seq, last: true, body }
    }
}

/// A record as one line, newline included (JSON escapes every newline inside
/// it, so the last byte is its only `\n`).
pub fn line(record: &Record) -> Vec<u8> {
    let mut line = serde_json::to_vec(record).expect("a record serializes");
    line.push(b'\n');
    line
}

pub fn path(dir: &Path, id: &str, ext: &str) -> PathBuf {
    dir.join(format!("{id}.{ext}"))
}

fn private(path: &Path) -> io::Result<File> {
    OpenOptions::new().create(true).read(true).write(true).truncate(false).mode(0o600).open(path)
}

/// Creates the files of a new stream (`.close`, `.pos` at offset 0 with
/// `next_seq`, an empty `.q`); on failure removes what it made.
pub fn create(dir: &Path, id: &str, fallback: &Fallback, next_seq: u64) -> io::Result<()> {
    let made = (|| {
        let close = private(&path(dir, id, "close"))?;
        close.set_len(0)?;
        close.write_all_at(&serde_json::to_vec(fallback)?, 0)?;
        write_pos(dir, id, 0, next_seq)?;
        let q = private(&path(dir, id, "q"))?;
        q.set_len(0)
    })();
    if made.is_err() {
        remove(dir, id);
    }
    made
}

/// Size of a spare `.close`: a fallback must fit in it to be written there.
pub const SPARE_CLOSE: usize = 4096;

/// Makes spare `N.close` (4 KiB of spaces) and `N.pos` files in `spares`, a
/// directory next to the spool on the same file system, until there are
/// `want`: a stream that begins while the disk is full takes one (a rename
/// and writes in place need no new block) so that it can still be closed
/// after a crash. Stops at the first failure.
pub fn make_spares(spares: &Path, want: usize) -> io::Result<()> {
    // Not create_dir_all: a state dir removed under us is not made again.
    match std::fs::create_dir(spares) {
        Err(e) if e.kind() != io::ErrorKind::AlreadyExists => return Err(e),
        _ => {}
    }
    let have = names(spares)?.iter().filter(|n| n.ends_with(".close")).count();
    for _ in have..want {
        let n = format!("{:x}", crate::nonce::nonce());
        let made = (|| {
            private(&spares.join(format!("{n}.pos")))?.write_all_at(&[0u8; 16], 0)?;
            private(&spares.join(format!("{n}.close")))?.write_all_at(&[b' '; SPARE_CLOSE], 0)
        })();
        if let Err(e) = made {
            let _ = std::fs::remove_file(spares.join(format!("{n}.close")));
            let _ = std::fs::remove_file(spares.join(format!("{n}.pos")));
            return Err(e);
        }
    }
    Ok(())
}

/// Creates a stream's files from a spare (see [`make_spares`]), as
/// [`create`] does; fails if there is none or the fallback does not fit.
pub fn create_from_spare(
    spares: &Path,
    dir: &Path,
    id: &str,
    fallback: &Fallback,
    next_seq: u64,
) -> io::Result<()> {
    let json = serde_json::to_vec(fallback)?;
    if json.len() > SPARE_CLOSE {
        return Err(io::Error::other("the fallback does not fit a spare"));
    }
    let spare = names(spares)?
        .into_iter()
        .find_map(|n| n.strip_suffix(".close").map(String::from))
        .ok_or_else(|| io::Error::other("no spare files left"))?;
    let made = (|| {
        std::fs::rename(spares.join(format!("{spare}.pos")), path(dir, id, "pos"))?;
        std::fs::rename(spares.join(format!("{spare}.close")), path(dir, id, "close"))?;
        // The rest of the spare stays spaces, which JSON ignores.
        private(&path(dir, id, "close"))?.write_all_at(&json, 0)?;
        write_pos(dir, id, 0, next_seq)?;
        private(&path(dir, id, "q")).map(drop)
    })();
    if made.is_err() {
        remove(dir, id);
        let _ = std::fs::remove_file(spares.join(format!("{spare}.pos")));
        let _ = std::fs::remove_file(spares.join(format!("{spare}.close")));
    }
    made
}

/// Removes a stream's files, `.q` first.
pub fn remove(dir: &Path, id: &str) {
    for ext in ["q", "pos", "close"] {
        match std::fs::remove_file(path(dir, id, ext)) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => {
                crate::logging::error!("outbox: cannot remove {id}.{ext}: {e}")
            }
            _ => {}
        }
    }
}

/// The append handle of a stream's `.q` (write only, no `O_APPEND`: records
/// go at an explicit offset).
pub fn open_q(dir: &Path, id: &str) -> io::Result<File> {
    OpenOptions::new().write(true).open(path(dir, id, "q"))
}

/// Writes `line` at `at`, all or nothing: after a failure (ENOSPC, EIO, …)
/// the file is cut back to `at`, and a later write at `at` overwrites any
/// bytes the cut could not remove.
pub fn write_at(file: &File, line: &[u8], at: u64) -> io::Result<()> {
    file.write_all_at(line, at).inspect_err(|_| {
        let _ = file.set_len(at);
    })
}

/// The record line starting at `pos` (at most `end - pos` bytes, whole records only).
pub fn read_at(dir: &Path, id: &str, pos: u64, end: u64) -> io::Result<Vec<u8>> {
    let mut file = File::open(path(dir, id, "q"))?;
    file.seek(SeekFrom::Start(pos))?;
    let mut reader = BufReader::with_capacity(16 << 10, file.take(end.saturating_sub(pos)));
    let mut line = Vec::new();
    reader.read_until(b'\n', &mut line)?;
    if !line.ends_with(b"\n") {
        return Err(io::Error::new(io::ErrorKind::UnexpectedEof, format!("no whole record at {pos}")));
    }
    Ok(line)
}

/// `<id>.pos`: (offset of the next record to deliver, seq after the last
/// delivered); (0, 0) when missing. An 8-byte file (an older spool) has only the offset.
pub fn read_pos(dir: &Path, id: &str) -> (u64, u64) {
    let Ok(bytes) = std::fs::read(path(dir, id, "pos")) else { return (0, 0) };
    let word =
        |i: usize| bytes.get(i..i + 8).map_or(0, |b| u64::from_le_bytes(b.try_into().expect("8 bytes")));
    (word(0), word(8))
}

/// Overwrites `<id>.pos` in place (creating it the first time).
pub fn write_pos(dir: &Path, id: &str, pos: u64, next_seq: u64) -> io::Result<()> {
    let mut b = [0u8; 16];
    b[..8].copy_from_slice(&pos.to_le_bytes());
    b[8..].copy_from_slice(&next_seq.to_le_bytes());
    private(&path(dir, id, "pos"))?.write_all_at(&b, 0)
}

/// What [`scan`] found in a `.q` from an earlier process.
pub struct Scan {
    /// Length of the whole records (the file is cut to it).
    pub len: u64,
    /// Whole records from `pos` on.
    pub records: u64,
    /// The last record, if it could be read.
    pub last: Option<Record>,
}

/// Reads a `.q` once, line by line, and cuts off a torn last line (a record
/// a crash left half written).
pub fn scan(dir: &Path, id: &str, pos: u64) -> io::Result<Scan> {
    let q = path(dir, id, "q");
    let file = OpenOptions::new().read(true).write(true).open(&q)?;
    let size = file.metadata()?.len();
    let mut reader = BufReader::with_capacity(64 << 10, &file);
    let (mut len, mut records, mut last_line) = (0u64, 0u64, Vec::new());
    let mut line = Vec::new();
    loop {
        line.clear();
        let n = reader.read_until(b'\n', &mut line)? as u64;
        if n == 0 || !line.ends_with(b"\n") {
            break;
        }
        if len >= pos {
            records += 1;
        }
        len += n;
        std::mem::swap(&mut last_line, &mut line);
    }
    if len < size {
        crate::logging::warn!("outbox: {id}: a torn record ({} byte(s)) at its end removed", size - len);
        file.set_len(len)?;
    }
    let last = serde_json::from_slice(&last_line).ok();
    Ok(Scan { len, records, last })
}

/// The fallback of a stream, if its `.close` can be read.
pub fn read_fallback(dir: &Path, id: &str) -> Option<Fallback> {
    std::fs::read(path(dir, id, "close")).ok().and_then(|b| serde_json::from_slice(&b).ok())
}

/// Ids of the streams in `dir` (one per `.q`), sorted.
pub fn streams(dir: &Path) -> io::Result<Vec<String>> {
    let mut ids: Vec<String> =
        names(dir)?.iter().filter_map(|n| n.strip_suffix(".q").map(String::from)).collect();
    ids.sort();
    Ok(ids)
}

/// Removes the `.close` and `.pos` files that have no `.q` (a stream that
/// was finished, or never fully created, when a process died); returns how many.
pub fn orphans(dir: &Path) -> io::Result<usize> {
    let names = names(dir)?;
    let mut removed = 0;
    for name in &names {
        let Some(id) = name.strip_suffix(".close").or_else(|| name.strip_suffix(".pos")) else { continue };
        if !names.iter().any(|n| n.strip_suffix(".q") == Some(id)) {
            match std::fs::remove_file(dir.join(name)) {
                Ok(()) => removed += 1,
                Err(e) => crate::logging::error!("outbox: cannot remove the leftover {name}: {e}"),
            }
        }
    }
    Ok(removed)
}

/// What a spool directory holds undelivered, read only (`aion-connector
/// doctor` reads the spool of a running connector and must not cut a torn
/// tail as [`scan`] does): per stream, the URL of each whole record past its
/// delivered offset, plus its fallback's while no closing record is there.
/// Records kept only in memory (a full disk) are not seen. Sorted by id.
pub fn undelivered(dir: &Path) -> io::Result<Vec<(String, Vec<String>)>> {
    let mut out = Vec::new();
    for id in streams(dir)? {
        let (pos, _) = read_pos(dir, &id);
        let file = match File::open(path(dir, &id, "q")) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue, // delivered meanwhile
            Err(e) => return Err(e),
        };
        let mut reader = BufReader::new(file);
        reader.seek(SeekFrom::Start(pos))?;
        let (mut urls, mut closed) = (Vec::new(), false);
        for line in reader.split(b'\n') {
            if let Ok(record) = serde_json::from_slice::<Record>(&line?) {
                closed = record.last;
                urls.push(record.url);
            }
        }
        if !closed && let Some(fallback) = read_fallback(dir, &id) {
            urls.push(fallback.url);
        }
        if !urls.is_empty() {
            out.push((id, urls));
        }
    }
    Ok(out)
}

fn names(dir: &Path) -> io::Result<Vec<String>> {
    Ok(std::fs::read_dir(dir)?
        .filter_map(Result::ok)
        .filter_map(|e| e.file_name().into_string().ok())
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tmp(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("aion-spool-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    fn rec(seq: u64, last: bool) -> Record {
        Record { url: "http://x/a".into(), key: "k".into(), seq, last, body: format!("{{\"seq\":{seq}}}") }
    }

    #[test]
    fn a_torn_tail_is_cut_and_reads_stop_at_whole_records() {
        let dir = tmp("torn");
        let fb = Fallback { url: "http://x/e".into(), key: "k".into(), body: serde_json::Map::new() };
        create(&dir, "s", &fb, 0).unwrap();
        let q = open_q(&dir, "s").unwrap();
        let (a, b) = (line(&rec(0, false)), line(&rec(1, true)));
        write_at(&q, &a, 0).unwrap();
        // half of the second record, as a crash mid-write leaves it
        q.write_all_at(&b[..b.len() / 2], a.len() as u64).unwrap();
        assert!(read_at(&dir, "s", a.len() as u64, a.len() as u64 + b.len() as u64).is_err());
        let scan = scan(&dir, "s", 0).unwrap();
        assert_eq!((scan.len, scan.records), (a.len() as u64, 1));
        assert_eq!(scan.last.map(|r| r.seq), Some(0));
        assert_eq!(std::fs::metadata(path(&dir, "s", "q")).unwrap().len(), a.len() as u64);
        assert_eq!(read_at(&dir, "s", 0, a.len() as u64).unwrap(), a);
        write_pos(&dir, "s", 7, 3).unwrap();
        assert_eq!(read_pos(&dir, "s"), (7, 3));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_spare_becomes_a_stream_that_resumes() {
        let dir = tmp("spare");
        let spares = dir.join("spares");
        make_spares(&spares, 2).unwrap();
        make_spares(&spares, 2).unwrap();
        assert_eq!(names(&spares).unwrap().len(), 4);
        let mut body = serde_json::Map::new();
        body.insert("error".into(), "cut".into());
        let fb = Fallback { url: "http://x/e".into(), key: "k".into(), body };
        create_from_spare(&spares, &dir, "s", &fb, 5).unwrap();
        assert_eq!(names(&spares).unwrap().len(), 2);
        assert_eq!(read_fallback(&dir, "s").unwrap().record(5).body, r#"{"error":"cut","seq":5}"#);
        assert_eq!(read_pos(&dir, "s"), (0, 5));
        assert_eq!(streams(&dir).unwrap(), ["s"]);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn leftovers_without_a_q_are_orphans() {
        let dir = tmp("orphans");
        let fb = Fallback { url: "http://x/e".into(), key: "k".into(), body: serde_json::Map::new() };
        create(&dir, "live", &fb, 0).unwrap();
        create(&dir, "dead", &fb, 0).unwrap();
        std::fs::remove_file(path(&dir, "dead", "q")).unwrap();
        assert_eq!(orphans(&dir).unwrap(), 2);
        assert_eq!(streams(&dir).unwrap(), ["live"]);
        assert!(path(&dir, "live", "close").exists() && path(&dir, "live", "pos").exists());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
