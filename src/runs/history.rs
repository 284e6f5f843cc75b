//! Run history: each run's posts, as the lines of a live NDJSON answer but
//! without any token, in `<stateDir>/runs/<project>/<run id>.jsonl` after a
//! header line (`{"run","session","agent","startedMs"}`) and before a footer
//! (`{"endedMs","outcome"}`); `<project>` is a hash of the project id. Each
//! project keeps its last [`KEEP`] finished runs, each file up to
//! [`MAX_BYTES`] (past it the posts are no longer kept and the footer says
//! `"truncated":true`). The `runs` and `runs.output` actions read it.
//!
//! A run cut by a crash, a kill or a power cut leaves a file without a
//! footer. At start (the state dir's lock held, before any run begins)
//! [`close_interrupted`] gives each such file the footer
//! `{"endedMs","outcome":"interrupted"}` (`endedMs`: the file's last write) —
//! the history's word for the run the outbox's resume closes with the
//! `error` post "the connector restarted" — and prunes each project dir, so
//! these runs are listed, read to their end and dropped like any other.
//!
//! No thread of its own: the run thread writes (through [`super::events`])
//! and prunes, request threads read.

use crate::logging::warn;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

/// Finished runs kept per project.
pub const KEEP: usize = 20;
/// Bytes of posts kept per run.
pub const MAX_BYTES: u64 = 4 << 20;
/// Posts one `runs.output` answer carries at most (and about this many bytes).
pub const PAGE_POSTS: usize = 1000;
pub const PAGE_BYTES: usize = 1 << 20;

fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default().as_millis() as u64
}

/// The project's history dir under `root` (`<stateDir>/runs`).
pub fn project_dir(root: &Path, project: &str) -> PathBuf {
    let digest = Sha256::digest(project.as_bytes());
    root.join(digest[..12].iter().map(|b| format!("{b:02x}")).collect::<String>())
}

/// Writes one run's file.
pub struct Recorder {
    file: Option<File>,
    path: PathBuf,
    bytes: u64,
    truncated: bool,
}

impl Recorder {
    /// Creates the run's file with its header; on failure the run is not kept (one warning).
    pub fn start(root: &Path, project: &str, id: &str, session: &str, agent: &str) -> Recorder {
        let dir = project_dir(root, project);
        let path = dir.join(format!("{id}.jsonl"));
        let opened = std::fs::create_dir_all(&dir).and_then(|()| {
            let mut f = OpenOptions::new().create_new(true).append(true).mode(0o600).open(&path)?;
            let head = json!({"run": id, "session": session, "agent": agent, "startedMs": now_ms()});
            f.write_all(format!("{head}\n").as_bytes())?;
            Ok(f)
        });
        let file = match opened {
            Ok(f) => Some(f),
            Err(e) => {
                warn!("run history: cannot create {}: {e}; this run is not kept", path.display());
                None
            }
        };
        Recorder { file, path, bytes: 0, truncated: false }
    }

    /// One post's line (without its newline).
    pub fn post(&mut self, line: &[u8]) {
        let Some(f) = &mut self.file else { return };
        if self.bytes + line.len() as u64 > MAX_BYTES {
            self.truncated = true;
            return;
        }
        let mut buf = Vec::with_capacity(line.len() + 1);
        buf.extend_from_slice(line);
        buf.push(b'\n');
        if let Err(e) = f.write_all(&buf) {
            warn!("run history: cannot write {}: {e}; the rest of this run is not kept", self.path.display());
            self.file = None;
            return;
        }
        self.bytes += buf.len() as u64;
    }

    /// Writes the footer and prunes the project's oldest finished runs.
    pub fn finish(mut self, outcome: &str) {
        let Some(mut f) = self.file.take() else { return };
        let mut foot = json!({"endedMs": now_ms(), "outcome": outcome});
        if self.truncated {
            foot["truncated"] = true.into();
        }
        if let Err(e) = f.write_all(format!("{foot}\n").as_bytes()) {
            warn!("run history: cannot write {}: {e}", self.path.display());
        }
        drop(f);
        if let Some(dir) = self.path.parent() {
            prune(dir);
        }
    }
}

/// The outcome of a run its connector did not live to finish.
pub const INTERRUPTED: &str = "interrupted";

/// Closes every run file under `root` (`<stateDir>/runs`) left without a
/// footer by a connector that died, as [`INTERRUPTED`], then prunes each
/// project dir where it closed one (the others were pruned when their last
/// run finished). Only while no run of this connector is going. Returns how
/// many it closed.
pub fn close_interrupted(root: &Path) -> usize {
    let mut closed = 0;
    for dir in std::fs::read_dir(root).into_iter().flatten().filter_map(Result::ok).map(|e| e.path()) {
        if !dir.is_dir() {
            continue;
        }
        let before = closed;
        for (_, path) in runs_in(&dir) {
            let Some(end) = footer(&path) else { continue };
            if end.foot.is_some() {
                continue;
            }
            match close(&path, end.cut) {
                Ok(()) => closed += 1,
                Err(e) => warn!("run history: cannot close {}: {e}", path.display()),
            }
        }
        if closed > before {
            prune(&dir);
        }
    }
    closed
}

/// Appends the [`INTERRUPTED`] footer (after a newline if the last line was
/// `cut`, as [`footer`] found it).
fn close(path: &Path, cut: bool) -> std::io::Result<()> {
    let ended = std::fs::metadata(path)?
        .modified()
        .ok()
        .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
        .map_or_else(now_ms, |d| d.as_millis() as u64);
    let foot = json!({"endedMs": ended, "outcome": INTERRUPTED});
    let mut f = OpenOptions::new().append(true).open(path)?;
    f.write_all(format!("{}{foot}\n", if cut { "\n" } else { "" }).as_bytes())
}

/// The run files of a dir, oldest first (ids begin with their start in ms).
fn runs_in(dir: &Path) -> Vec<(u128, PathBuf)> {
    let mut list: Vec<(u128, PathBuf)> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .filter_map(Result::ok)
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            let id = name.strip_suffix(".jsonl")?;
            let ms = id.split('-').next()?.parse::<u128>().ok()?;
            Some((ms, e.path()))
        })
        .collect();
    list.sort();
    list
}

/// A run file read: its header, footer (None while it runs) and post count.
struct Read {
    head: Value,
    foot: Option<Value>,
    posts: u64,
}

fn read(path: &Path) -> Option<Read> {
    let mut lines = BufReader::new(File::open(path).ok()?).lines();
    let head: Value = serde_json::from_str(&lines.next()?.ok()?).ok()?;
    let (mut posts, mut last) = (0u64, None);
    for line in lines.map_while(Result::ok) {
        posts += 1;
        last = Some(line);
    }
    let foot =
        last.and_then(|l| serde_json::from_str::<Value>(&l).ok()).filter(|v| v.get("endedMs").is_some());
    if foot.is_some() {
        posts -= 1;
    }
    Some(Read { head, foot, posts })
}

/// Bytes of a run file's end read at first to find its last line: a footer
/// is about 60 bytes, unless its outcome carries an error message.
const TAIL: u64 = 1 << 10;

/// What the end of a run file says: its footer (None while it runs) and
/// whether its last line was cut (no newline after it).
struct End {
    foot: Option<Value>,
    cut: bool,
}

/// As [`read`] finds the footer, without reading the posts: None when the
/// header line does not parse, else the last line after the header, read
/// from the end ([`TAIL`] bytes, twice as many while the last line begins
/// before them).
fn footer(path: &Path) -> Option<End> {
    use std::io::{Read as _, Seek, SeekFrom};
    let mut f = File::open(path).ok()?;
    let mut head = String::new();
    BufReader::with_capacity(TAIL as usize, &f).read_line(&mut head).ok()?;
    serde_json::from_str::<Value>(&head).ok()?;
    let len = f.metadata().ok()?.len();
    let mut want = TAIL;
    loop {
        let start = len.saturating_sub(want);
        f.seek(SeekFrom::Start(start)).ok()?;
        let mut tail = Vec::with_capacity((len - start) as usize);
        (&f).take(len - start).read_to_end(&mut tail).ok()?;
        let body = tail.strip_suffix(b"\n").unwrap_or(&tail);
        let last = match body.iter().rposition(|&b| b == b'\n') {
            Some(i) => Some(&body[i + 1..]),
            // The header is the only line.
            None if start == 0 => None,
            None => {
                want *= 2;
                continue;
            }
        };
        let foot =
            last.and_then(|l| serde_json::from_slice::<Value>(l).ok()).filter(|v| v.get("endedMs").is_some());
        return Some(End { foot, cut: tail.last().is_some_and(|&b| b != b'\n') });
    }
}

/// Keeps the newest [`KEEP`] finished runs of a project dir.
fn prune(dir: &Path) {
    let finished: Vec<PathBuf> = runs_in(dir)
        .into_iter()
        .map(|(_, p)| p)
        .filter(|p| footer(p).is_some_and(|end| end.foot.is_some()))
        .collect();
    if finished.len() > KEEP {
        for p in &finished[..finished.len() - KEEP] {
            let _ = std::fs::remove_file(p);
        }
    }
}

/// The project's finished runs, newest first:
/// `{"run","session","agent","startedMs","endedMs","outcome","posts"}`.
pub fn finished(root: &Path, project: &str) -> Vec<Value> {
    let mut out: Vec<Value> = runs_in(&project_dir(root, project))
        .into_iter()
        .filter_map(|(_, p)| read(&p))
        .filter_map(|r| {
            let foot = r.foot?;
            let mut v = r.head;
            v["endedMs"] = foot["endedMs"].clone();
            v["outcome"] = foot["outcome"].clone();
            v["posts"] = r.posts.into();
            if foot.get("truncated").is_some() {
                v["truncated"] = true.into();
            }
            Some(v)
        })
        .collect();
    out.reverse();
    out
}

/// The posts of the newest run of `session` from seq `from` on, a page at a
/// time: `{"run","done","posts":[…],"next"}` (`next`: the seq to ask for
/// next). None: no run of that session is kept.
pub fn output(root: &Path, project: &str, session: &str, from: u64) -> Option<Value> {
    let runs = runs_in(&project_dir(root, project));
    let (path, head) = runs.iter().rev().find_map(|(_, p)| {
        let mut line = String::new();
        BufReader::new(File::open(p).ok()?).read_line(&mut line).ok()?;
        let head: Value = serde_json::from_str(&line).ok()?;
        (head["session"] == session).then(|| (p.clone(), head))
    })?;
    let mut lines = BufReader::new(File::open(&path).ok()?).lines();
    lines.next();
    let (mut posts, mut bytes, mut next, mut done) = (Vec::new(), 0usize, from, false);
    for line in lines.map_while(Result::ok) {
        let Ok(v) = serde_json::from_str::<Value>(&line) else { continue };
        if v.get("endedMs").is_some() {
            done = true;
            break;
        }
        let Some(seq) = v["seq"].as_u64() else { continue };
        if seq < from {
            continue;
        }
        if posts.len() >= PAGE_POSTS || bytes + line.len() > PAGE_BYTES {
            break;
        }
        bytes += line.len();
        next = seq + 1;
        posts.push(v);
    }
    Some(json!({"run": head["run"], "done": done, "posts": posts, "next": next}))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_run_is_kept_with_its_posts_and_the_oldest_are_pruned() {
        let root = std::env::temp_dir().join(format!("aion-history-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        for i in 0..(KEEP + 3) {
            let mut r = Recorder::start(&root, "p", &format!("{}-1-{i}", 1000 + i), &format!("s{i}"), "a");
            r.post(br#"{"type":"output","sessionId":"s","text":"a","seq":0}"#);
            r.post(br#"{"type":"complete","sessionId":"s","summary":"a","changed":[],"seq":1}"#);
            r.finish("complete");
        }
        let list = finished(&root, "p");
        assert_eq!(list.len(), KEEP);
        assert_eq!(list[0]["session"], "s22");
        assert_eq!(list[0]["posts"], 2);
        assert!(output(&root, "p", "s0", 0).is_none(), "pruned");
        let page = output(&root, "p", "s22", 1).unwrap();
        assert_eq!(page["done"], true);
        assert_eq!(page["next"], 2);
        assert_eq!(page["posts"].as_array().unwrap().len(), 1);
        let _ = std::fs::remove_dir_all(&root);
    }

    #[test]
    fn runs_cut_by_a_dead_connector_are_closed_as_interrupted_and_pruned() {
        let root = std::env::temp_dir().join(format!("aion-history-cut-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        for i in 0..(KEEP + 2) {
            let mut r = Recorder::start(&root, "p", &format!("{}-1-{i}", 1000 + i), &format!("s{i}"), "a");
            r.post(br#"{"type":"output","sessionId":"s","text":"a","seq":0}"#);
            // Dropped without a footer, as by a kill; the last one mid-line.
            if i == KEEP + 1 {
                r.post(br#"{"type":"output","sessionId":"s","te"#);
                let mut f = OpenOptions::new().write(true).open(&r.path).unwrap();
                let len = f.metadata().unwrap().len();
                f.set_len(len - 1).unwrap();
                f.flush().unwrap();
            }
        }
        assert!(finished(&root, "p").is_empty());
        assert_eq!(close_interrupted(&root), KEEP + 2);
        let list = finished(&root, "p");
        assert_eq!(list.len(), KEEP, "pruned to KEEP");
        assert_eq!(list[0]["outcome"], INTERRUPTED);
        let page = output(&root, "p", "s21", 0).unwrap();
        assert_eq!(page["done"], true);
        assert_eq!(page["posts"].as_array().unwrap().len(), 1, "{page}");
        assert_eq!(close_interrupted(&root), 0, "closed once");
        let _ = std::fs::remove_dir_all(&root);
    }

    #[test]
    fn a_footer_longer_than_the_tail_read_first_is_still_found() {
        let root = std::env::temp_dir().join(format!("aion-history-long-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        let mut r = Recorder::start(&root, "p", "1000-1-0", "s0", "a");
        r.post(br#"{"type":"output","sessionId":"s","text":"a","seq":0}"#);
        let outcome = format!("error ({})", "x".repeat(3 * TAIL as usize));
        r.finish(&outcome);
        assert_eq!(close_interrupted(&root), 0, "already closed");
        let list = finished(&root, "p");
        assert_eq!(list.len(), 1);
        assert_eq!(list[0]["outcome"], outcome.as_str());
        assert_eq!(list[0]["posts"], 1);
        let _ = std::fs::remove_dir_all(&root);
    }
}
