//! Background processes of a project: what an agent starts with its MCP
//! tool `run_background` (dev servers, watchers) and expects to outlive its
//! turn. They belong to the connector, not to the agent's run: `sh -c CMD`
//! (the agent's own command line, by design the one place a shell sees it)
//! in the project dir or a dir inside it, in its own process group, stdin
//! from /dev/null, stdout and stderr into one pipe of which the last
//! [`LINES`] non-blank lines are kept. At most `limits.backgroundPerProject`
//! run per project; all are ended when the connector shuts down, and an
//! exited one is forgotten after [`KEEP_EXITED`].
//!
//! Each process is a [`supervise::Child`] marked `AION_BG_ID` (its escapees
//! are swept when it ends); like every child it carries the connector's
//! instance mark, so what a killed connector left running is ended by the
//! next one on the same state dir ([`crate::process::instance`]).
//!
//! Threads of a process, named after its pid, both owned by its entry:
//! - `bg-out-PID`: reads the output pipe into the ring; ends at end of file or
//!   when released after the process is gone;
//! - `bg-wait-PID`: waits for the leader, records how it ended, sweeps the
//!   marker, joins the reader; ends then. [`Background::finish`] joins it.

use crate::logging::{error, info, warn};
use crate::process::supervise::{self, Child};
use crate::project::ProjectState;
use nix::sys::signal::Signal;
use serde::{Deserialize, Serialize};
use std::collections::{HashMap, VecDeque};
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// Lines of output kept per process (the original's 50).
pub const LINES: usize = 50;
/// A longer line is cut here.
const LINE_BYTES: usize = 4096;
/// How long `start` watches a new process before answering (the original's 500 ms).
const FIRST_LOOK: Duration = Duration::from_millis(500);
/// An exited process is forgotten this long after it ended.
pub const KEEP_EXITED: Duration = Duration::from_secs(600);

/// How a background process is doing.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
#[serde(tag = "state", rename_all = "lowercase")]
pub enum Status {
    Running,
    Exited { code: i32 },
    Killed { signal: i32 },
}

/// What the local socket answers about one process.
#[derive(Serialize, Deserialize, Clone, Debug)]
pub struct Snapshot {
    pub pid: i32,
    pub command: String,
    pub cwd: String,
    /// Unix time in milliseconds.
    pub started: u64,
    pub status: Status,
    /// The last non-blank lines of stdout and stderr, oldest first.
    pub lines: Vec<String>,
}

/// Why a request was not done.
#[derive(Debug)]
pub enum Refused {
    /// The project already runs this many.
    Cap(usize),
    /// `cwd` does not resolve to a directory inside the project.
    Cwd(String),
    /// `sh` could not be started.
    Spawn(String),
    /// No such process in this project.
    NotFound,
    ShuttingDown,
}

impl std::fmt::Display for Refused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Refused::Cap(n) => write!(
                f,
                "this project already runs {n} background processes (limits.backgroundPerProject): stop one with stop_background first"
            ),
            Refused::Cwd(why) => write!(f, "{why}"),
            Refused::Spawn(why) => write!(f, "cannot start sh: {why}"),
            Refused::NotFound => write!(f, "no such background process"),
            Refused::ShuttingDown => write!(f, "the connector is shutting down"),
        }
    }
}

/// One process and what is known of it.
struct Proc {
    pid: i32,
    project: String,
    command: String,
    cwd: String,
    started: u64,
    child: Child,
    state: Mutex<State>,
    /// Signalled when the process is done (reaped, swept, output drained).
    done: Condvar,
    waiter: Mutex<Option<JoinHandle<()>>>,
}

#[derive(Default)]
struct State {
    status: Option<Status>,
    lines: VecDeque<String>,
    partial: Vec<u8>,
    /// The waiter has finished: nothing will change any more.
    done: bool,
    ended: Option<Instant>,
}

impl State {
    /// Adds output: complete lines go into the ring (blank ones dropped); a
    /// line longer than [`LINE_BYTES`] is cut.
    fn push(&mut self, mut bytes: &[u8]) {
        while let Some(i) = bytes.iter().position(|&b| b == b'\n') {
            self.partial.extend_from_slice(&bytes[..i]);
            self.flush_partial();
            bytes = &bytes[i + 1..];
        }
        self.partial.extend_from_slice(bytes);
        if self.partial.len() >= LINE_BYTES {
            self.flush_partial();
        }
    }

    fn flush_partial(&mut self) {
        let bytes = std::mem::take(&mut self.partial);
        let cut = &bytes[..bytes.len().min(LINE_BYTES)];
        let line = String::from_utf8_lossy(cut);
        let line = line.strip_suffix('\r').unwrap_or(&line);
        if line.trim().is_empty() {
            return;
        }
        if self.lines.len() == LINES {
            self.lines.pop_front();
        }
        self.lines.push_back(line.to_string());
    }

    /// The ring, with a last line still being written (no newline yet).
    fn lines(&self) -> Vec<String> {
        let mut lines: Vec<String> = self.lines.iter().cloned().collect();
        let tail = String::from_utf8_lossy(&self.partial);
        if !tail.trim().is_empty() {
            if lines.len() == LINES {
                lines.remove(0);
            }
            lines.push(tail.into_owned());
        }
        lines
    }
}

impl Proc {
    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn snapshot(&self) -> Snapshot {
        let st = self.state();
        Snapshot {
            pid: self.pid,
            command: self.command.clone(),
            cwd: self.cwd.clone(),
            started: self.started,
            status: st.status.unwrap_or(Status::Running),
            lines: st.lines(),
        }
    }

    fn running(&self) -> bool {
        self.state().status.is_none()
    }

    /// Waits until the process is done or `deadline` passes; true if done.
    fn wait_done(&self, deadline: Instant) -> bool {
        let mut st = self.state();
        while !st.done {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            st = self.done.wait_timeout(st, left).unwrap_or_else(|p| p.into_inner()).0;
        }
        true
    }

    fn join_waiter(&self) {
        let handle = self.waiter.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(h) = handle
            && h.join().is_err()
        {
            error!("background {}: its waiter thread panicked", self.pid);
        }
    }
}

/// The background processes of every project.
pub struct Background {
    per_project: AtomicUsize,
    grace: Duration,
    procs: Mutex<HashMap<i32, Arc<Proc>>>,
    /// Set (under the `procs` lock) when shutdown begins: no new process starts.
    closing: AtomicBool,
    closed_at: Mutex<Option<Instant>>,
    next: AtomicU64,
}

impl Background {
    /// At most `per_project` running per project; `grace` is between SIGTERM
    /// and SIGKILL.
    pub fn new(per_project: usize, grace: Duration) -> Arc<Background> {
        Arc::new(Background {
            per_project: AtomicUsize::new(per_project),
            grace,
            procs: Mutex::new(HashMap::new()),
            closing: AtomicBool::new(false),
            closed_at: Mutex::new(None),
            next: AtomicU64::new(0),
        })
    }

    fn procs(&self) -> MutexGuard<'_, HashMap<i32, Arc<Proc>>> {
        self.procs.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Starts `sh -c command` in `cwd` (relative to the project dir; None or
    /// empty: the project dir) and watches it for half a second. A process
    /// that ended by then is forgotten at once; its snapshot says how it ended.
    pub fn start(
        &self,
        project: &ProjectState,
        command: &str,
        cwd: Option<&str>,
    ) -> Result<Snapshot, Refused> {
        let dir = resolve_cwd(&project.root, cwd)?;
        let proc = {
            let mut procs = self.procs();
            if self.closing.load(Ordering::SeqCst) {
                return Err(Refused::ShuttingDown);
            }
            self.prune(&mut procs);
            let id = &project.config.id;
            let running = procs.values().filter(|p| p.project == *id && p.running()).count();
            let cap = self.per_project.load(Ordering::Relaxed);
            if running >= cap {
                return Err(Refused::Cap(cap));
            }
            let proc = self.spawn(id, command, &dir)?;
            procs.insert(proc.pid, Arc::clone(&proc));
            proc
        };
        info!("background {} started in project {}", proc.pid, proc.project);
        if proc.wait_done(Instant::now() + FIRST_LOOK) {
            self.procs().remove(&proc.pid);
            proc.join_waiter();
        }
        Ok(proc.snapshot())
    }

    fn spawn(&self, project: &str, command: &str, dir: &Path) -> Result<Arc<Proc>, Refused> {
        let marker = format!("{}-{}", std::process::id(), self.next.fetch_add(1, Ordering::Relaxed));
        let (reader, writer) = std::io::pipe().map_err(|e| Refused::Spawn(e.to_string()))?;
        let child = {
            let mut cmd = Command::new("/bin/sh");
            let err_writer = writer.try_clone().map_err(|e| Refused::Spawn(e.to_string()))?;
            cmd.arg("-c")
                .arg(command)
                .current_dir(dir)
                .stdin(Stdio::null())
                .stdout(writer)
                .stderr(err_writer);
            // `cmd` holds the write ends; it is dropped at the end of this
            // block, so the reader sees end of file once the process is gone.
            Child::spawn(&mut cmd, "AION_BG_ID", &marker).map_err(|e| Refused::Spawn(e.to_string()))?
        };
        let started = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default().as_millis() as u64;
        let proc = Arc::new(Proc {
            pid: child.pid(),
            project: project.to_string(),
            command: command.to_string(),
            cwd: dir.display().to_string(),
            started,
            child,
            state: Mutex::new(State::default()),
            done: Condvar::new(),
            waiter: Mutex::new(None),
        });
        let pid = proc.pid;
        let out = proc.child.stoppable(reader);
        let p = Arc::clone(&proc);
        let reader = std::thread::Builder::new()
            .name(format!("bg-out-{pid}"))
            .stack_size(64 << 10)
            .spawn(move || read_output(&p, out));
        let reader = match reader {
            Ok(handle) => Some(handle),
            Err(e) => {
                // Output is lost, but the process is still supervised.
                error!("background {pid}: cannot start its output reader: {e}");
                None
            }
        };
        let p = Arc::clone(&proc);
        let waiter = std::thread::Builder::new()
            .name(format!("bg-wait-{pid}"))
            .stack_size(64 << 10)
            .spawn(move || watch(&p, reader));
        match waiter {
            Ok(handle) => *proc.waiter.lock().unwrap_or_else(|p| p.into_inner()) = Some(handle),
            Err(e) => {
                error!("background {pid}: cannot start its waiter thread: {e}");
                supervise::terminate(&proc.child.group, None, Duration::ZERO);
                return Err(Refused::Spawn(format!("cannot start a thread: {e}")));
            }
        }
        Ok(proc)
    }

    /// Forgets exited processes after [`KEEP_EXITED`], and keeps at most as
    /// many exited ones per project as may run.
    fn prune(&self, procs: &mut HashMap<i32, Arc<Proc>>) {
        let now = Instant::now();
        procs.retain(|_, p| p.state().ended.is_none_or(|t| now.duration_since(t) <= KEEP_EXITED));
        let mut exited: HashMap<&str, Vec<(Instant, i32)>> = HashMap::new();
        for p in procs.values() {
            if let Some(t) = p.state().ended {
                exited.entry(p.project.as_str()).or_default().push((t, p.pid));
            }
        }
        let mut forget = Vec::new();
        let cap = self.per_project.load(Ordering::Relaxed);
        for (_, mut list) in exited {
            if list.len() > cap {
                list.sort();
                forget.extend(list[..list.len() - cap].iter().map(|(_, pid)| *pid));
            }
        }
        for pid in forget {
            procs.remove(&pid);
        }
    }

    fn find(&self, project: &str, pid: i64) -> Result<Arc<Proc>, Refused> {
        let mut procs = self.procs();
        self.prune(&mut procs);
        let pid = i32::try_from(pid).map_err(|_| Refused::NotFound)?;
        procs.get(&pid).filter(|p| p.project == project).cloned().ok_or(Refused::NotFound)
    }

    /// How one of the project's processes is doing.
    pub fn check(&self, project: &str, pid: i64) -> Result<Snapshot, Refused> {
        Ok(self.find(project, pid)?.snapshot())
    }

    /// Ends one of the project's processes (TERM, then KILL after the
    /// grace) and forgets it; the snapshot says how it ended.
    pub fn stop(&self, project: &str, pid: i64) -> Result<Snapshot, Refused> {
        let proc = self.find(project, pid)?;
        if proc.running() {
            supervise::terminate(&proc.child.group, None, self.grace);
        }
        if !proc.wait_done(Instant::now() + Duration::from_secs(10)) {
            warn!("background {}: still draining after it was stopped", proc.pid);
        }
        self.procs().remove(&proc.pid);
        proc.join_waiter();
        info!("background {} stopped in project {}", proc.pid, proc.project);
        Ok(proc.snapshot())
    }

    /// A reload's `limits.backgroundPerProject` (processes over it go on; no new one starts).
    pub fn set_per_project(&self, n: usize) {
        self.per_project.store(n, Ordering::Relaxed);
    }

    /// Every project's processes, as (project, process), by project then age.
    pub fn all(&self) -> Vec<(String, Snapshot)> {
        let procs: Vec<Arc<Proc>> = {
            let mut procs = self.procs();
            self.prune(&mut procs);
            procs.values().cloned().collect()
        };
        let mut list: Vec<(String, Snapshot)> =
            procs.iter().map(|p| (p.project.clone(), p.snapshot())).collect();
        list.sort_by(|a, b| (&a.0, a.1.started, a.1.pid).cmp(&(&b.0, b.1.started, b.1.pid)));
        list
    }

    /// The project's processes, oldest first.
    pub fn list(&self, project: &str) -> Vec<Snapshot> {
        let mut procs = self.procs();
        self.prune(&mut procs);
        let mut list: Vec<Snapshot> =
            procs.values().filter(|p| p.project == project).map(|p| p.snapshot()).collect();
        list.sort_by_key(|s| (s.started, s.pid));
        list
    }

    /// Shutdown begins: no new process starts, every running one gets SIGTERM.
    pub fn close(&self) {
        let procs = self.procs();
        self.closing.store(true, Ordering::SeqCst);
        *self.closed_at.lock().unwrap_or_else(|p| p.into_inner()) = Some(Instant::now());
        for p in procs.values().filter(|p| p.running()) {
            p.child.group.signal(Signal::SIGTERM);
        }
    }

    /// After [`Background::close`]: whatever still runs once the grace has
    /// passed gets SIGKILL; every waiter is joined (each sweeps its marker).
    pub fn finish(&self) {
        self.close_if_open();
        let since = self.closed_at.lock().unwrap_or_else(|p| p.into_inner()).unwrap_or_else(Instant::now);
        let kill_at = since + self.grace;
        let procs: Vec<Arc<Proc>> = self.procs().drain().map(|(_, p)| p).collect();
        for p in &procs {
            if let Ok(None) = p.child.group.wait_until(kill_at) {
                p.child.group.signal(Signal::SIGKILL);
            }
        }
        for p in &procs {
            p.join_waiter();
        }
        if !procs.is_empty() {
            info!("ended {} background process(es)", procs.len());
        }
    }

    fn close_if_open(&self) {
        if !self.closing.load(Ordering::SeqCst) {
            self.close();
        }
    }
}

/// The working directory of a new process: `cwd` resolved against the
/// project dir, symlinks followed, and inside the project dir.
fn resolve_cwd(root: &Path, cwd: Option<&str>) -> Result<PathBuf, Refused> {
    let Some(given) = cwd.filter(|c| !c.is_empty()) else { return Ok(root.to_path_buf()) };
    let real = root.join(given).canonicalize().map_err(|e| Refused::Cwd(format!("cwd {given}: {e}")))?;
    if !real.starts_with(root) {
        return Err(Refused::Cwd(format!("cwd {given} is outside the project directory")));
    }
    if !real.is_dir() {
        return Err(Refused::Cwd(format!("cwd {given} is not a directory")));
    }
    Ok(real)
}

/// `bg-out-PID`: the output pipe into the ring until end of file.
fn read_output(proc: &Proc, mut pipe: impl Read) {
    let mut buf = [0u8; 8192];
    loop {
        match pipe.read(&mut buf) {
            Ok(0) => return,
            Ok(n) => proc.state().push(&buf[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(_) => return,
        }
    }
}

/// `bg-wait-PID`: waits for the leader, records how it ended, sweeps what
/// carries its marker, lets the reader drain, and marks the process done.
fn watch(proc: &Proc, reader: Option<JoinHandle<()>>) {
    use std::os::unix::process::ExitStatusExt;
    let status = match proc.child.wait() {
        Ok(s) => match (s.code(), s.signal()) {
            (Some(code), _) => Status::Exited { code },
            (None, Some(signal)) => Status::Killed { signal },
            (None, None) => Status::Exited { code: -1 },
        },
        Err(e) => {
            error!("background {}: wait: {e}", proc.pid);
            Status::Exited { code: -1 }
        }
    };
    proc.state().status = Some(status);
    let reader_done = || reader.as_ref().is_none_or(JoinHandle::is_finished);
    proc.child.finish(reader_done);
    if let Some(r) = reader
        && r.join().is_err()
    {
        error!("background {}: its output reader panicked", proc.pid);
    }
    let mut st = proc.state();
    if !st.partial.is_empty() {
        st.flush_partial();
    }
    st.done = true;
    st.ended = Some(Instant::now());
    proc.done.notify_all();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_ring_keeps_the_last_non_blank_lines_across_chunks() {
        let mut st = State::default();
        st.push(b"one\n\n   \ntw");
        assert_eq!(st.lines(), ["one", "tw"]);
        st.push(b"o\r\nthree");
        assert_eq!(st.lines(), ["one", "two", "three"]);
        for i in 0..100 {
            st.push(format!("line {i}\n").as_bytes());
        }
        let lines = st.lines();
        assert_eq!(lines.len(), LINES);
        assert_eq!(lines[0], "line 50");
        assert_eq!(lines[LINES - 1], "line 99");
        st.push(&vec![b'x'; 3 * LINE_BYTES]);
        assert!(st.lines().iter().all(|l| l.len() <= LINE_BYTES));
    }

    #[test]
    fn a_cwd_must_resolve_inside_the_root() {
        let tmp = std::env::temp_dir().join(format!("aion-bg-cwd-{}", std::process::id()));
        let root = tmp.join("root");
        std::fs::create_dir_all(root.join("sub")).unwrap();
        let root = root.canonicalize().unwrap();
        let _ = std::os::unix::fs::symlink(&tmp, root.join("out"));
        assert_eq!(resolve_cwd(&root, None).unwrap(), root);
        assert_eq!(resolve_cwd(&root, Some("")).unwrap(), root);
        assert_eq!(resolve_cwd(&root, Some("sub")).unwrap(), root.join("sub"));
        assert_eq!(resolve_cwd(&root, Some(root.join("sub").to_str().unwrap())).unwrap(), root.join("sub"));
        assert!(matches!(resolve_cwd(&root, Some("out")), Err(Refused::Cwd(_))));
        assert!(matches!(resolve_cwd(&root, Some("..")), Err(Refused::Cwd(_))));
        assert!(matches!(resolve_cwd(&root, Some("/")), Err(Refused::Cwd(_))));
        assert!(matches!(resolve_cwd(&root, Some("missing")), Err(Refused::Cwd(_))));
        let _ = std::fs::remove_dir_all(&tmp);
    }
}
