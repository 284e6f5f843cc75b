//! Child processes that cannot outlive their owner. Every child is the leader
//! of its own process group; when it ends (or is killed) whatever is left of
//! the group is killed before the leader is reaped, so the group id cannot have
//! been reused in between. `run` is the bounded "run a command, collect its
//! output" used for git; agent runs build on [`Group`] and [`sweep`].

use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use std::io::{self, Read};
use std::os::fd::AsFd;
use std::os::unix::process::CommandExt;
use std::process::{ChildStderr, ChildStdout, Command, ExitStatus, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// A spawned child leading its own process group. It can be shared: one
/// thread waits while another signals. Dropping it kills the group.
pub struct Group {
    /// None for a child forked elsewhere (the PTY) and adopted by pid.
    child: Mutex<Option<std::process::Child>>,
    pid: i32,
    /// Set once the leader is reaped; signals stop then (the id may be reused).
    status: Mutex<Option<ExitStatus>>,
}

impl Group {
    pub fn spawn(cmd: &mut Command) -> io::Result<Group> {
        crate::pty::unblock_signals_in_child(cmd);
        let child = cmd.process_group(0).spawn()?;
        let pid = child.id() as i32;
        Ok(Group { child: Mutex::new(Some(child)), pid, status: Mutex::new(None) })
    }

    /// Takes charge of a child this process forked itself, which leads its
    /// own process group (a PTY's shell, after setsid).
    pub fn adopt(pid: i32) -> Group {
        Group { child: Mutex::new(None), pid, status: Mutex::new(None) }
    }

    pub fn pid(&self) -> i32 {
        self.pid
    }

    pub fn take_stdout(&self) -> Option<ChildStdout> {
        lock(&self.child).as_mut()?.stdout.take()
    }

    pub fn take_stdin(&self) -> Option<std::process::ChildStdin> {
        lock(&self.child).as_mut()?.stdin.take()
    }

    pub fn take_stderr(&self) -> Option<ChildStderr> {
        lock(&self.child).as_mut()?.stderr.take()
    }

    /// Sends `sig` to the whole group (nothing once the leader is reaped).
    pub fn signal(&self, sig: Signal) {
        let status = lock(&self.status);
        if status.is_none() {
            let _ = killpg(Pid::from_raw(self.pid), sig);
        }
    }

    /// Once the leader has exited: kill what is left of its group, then reap it.
    fn reap(&self) -> io::Result<ExitStatus> {
        let mut status = lock(&self.status);
        if let Some(s) = *status {
            return Ok(s);
        }
        let _ = killpg(Pid::from_raw(self.pid), Signal::SIGKILL);
        let s = match lock(&self.child).as_mut() {
            Some(child) => child.wait()?,
            None => raw_wait(self.pid, false)?.expect("a blocking wait returns a status"),
        };
        *status = Some(s);
        Ok(s)
    }

    /// Waits for the leader to exit, however long it takes.
    pub fn wait(&self) -> io::Result<ExitStatus> {
        #[cfg(any(target_os = "linux", target_os = "android"))]
        {
            use nix::sys::wait::{Id, WaitPidFlag, waitid};
            let flags = WaitPidFlag::WEXITED | WaitPidFlag::WNOWAIT;
            loop {
                match waitid(Id::Pid(Pid::from_raw(self.pid)), flags) {
                    Err(nix::errno::Errno::EINTR) => continue,
                    Err(nix::errno::Errno::ECHILD) if lock(&self.status).is_some() => break,
                    Err(e) => return Err(e.into()),
                    Ok(_) => break,
                }
            }
            self.reap()
        }
        #[cfg(not(any(target_os = "linux", target_os = "android")))]
        loop {
            if let Some(s) = self.wait_until(Instant::now() + Duration::from_millis(50))? {
                return Ok(s);
            }
        }
    }

    /// Waits until the leader exits or `deadline` passes (None: still running).
    pub fn wait_until(&self, deadline: Instant) -> io::Result<Option<ExitStatus>> {
        let mut nap = Duration::from_micros(200);
        loop {
            if let Some(status) = *lock(&self.status) {
                return Ok(Some(status));
            }
            if self.leader_exited()? {
                return self.reap().map(Some);
            }
            let now = Instant::now();
            if now >= deadline {
                return Ok(None);
            }
            std::thread::sleep(nap.min(deadline - now));
            nap = (nap * 2).min(Duration::from_millis(20));
        }
    }

    /// Whether the leader has exited, without reaping it where the OS allows.
    #[cfg(any(target_os = "linux", target_os = "android"))]
    fn leader_exited(&self) -> io::Result<bool> {
        use nix::sys::wait::{Id, WaitPidFlag, WaitStatus, waitid};
        let flags = WaitPidFlag::WEXITED | WaitPidFlag::WNOHANG | WaitPidFlag::WNOWAIT;
        match waitid(Id::Pid(Pid::from_raw(self.pid)), flags) {
            Ok(WaitStatus::StillAlive) => Ok(false),
            Ok(_) => Ok(true),
            Err(e) => Err(e.into()),
        }
    }

    /// Elsewhere (macOS) the leader is reaped here, so the group kill that
    /// follows races with pid reuse for a few microseconds.
    #[cfg(not(any(target_os = "linux", target_os = "android")))]
    fn leader_exited(&self) -> io::Result<bool> {
        let reaped = match lock(&self.child).as_mut() {
            Some(child) => child.try_wait()?,
            None => raw_wait(self.pid, true)?,
        };
        match reaped {
            Some(s) => {
                let _ = killpg(Pid::from_raw(self.pid), Signal::SIGKILL);
                *lock(&self.status) = Some(s);
                Ok(true)
            }
            None => Ok(false),
        }
    }
}

impl Drop for Group {
    fn drop(&mut self) {
        if lock(&self.status).is_none() {
            self.signal(Signal::SIGKILL);
            let _ = self.reap();
        }
    }
}

/// waitpid on exactly this pid (never -1: other owners' children stay theirs).
fn raw_wait(pid: i32, nohang: bool) -> io::Result<Option<ExitStatus>> {
    use nix::sys::wait::{WaitPidFlag, WaitStatus, waitpid};
    use std::os::unix::process::ExitStatusExt;
    let flags = nohang.then_some(WaitPidFlag::WNOHANG);
    loop {
        return match waitpid(Pid::from_raw(pid), flags) {
            Err(nix::errno::Errno::EINTR) => continue,
            Err(e) => Err(e.into()),
            Ok(WaitStatus::Exited(_, code)) => Ok(Some(ExitStatus::from_raw((code & 0xff) << 8))),
            Ok(WaitStatus::Signaled(_, sig, _)) => Ok(Some(ExitStatus::from_raw(sig as i32))),
            Ok(_) => Ok(None),
        };
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// A pipe from a child that can be given up on: once `stop` is set, a read
/// that finds nothing returns end of file instead of waiting. A process that
/// left the group without the run's marker may hold the pipe open forever;
/// the owner sets `stop` a moment after the child itself is gone.
pub struct Stoppable<R> {
    pub pipe: R,
    pub stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl<R: Read + AsFd> Read for Stoppable<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
        loop {
            let mut fds = [PollFd::new(self.pipe.as_fd(), PollFlags::POLLIN)];
            match poll(&mut fds, PollTimeout::from(100u8)) {
                Ok(0) | Err(nix::errno::Errno::EINTR) => {
                    if self.stop.load(std::sync::atomic::Ordering::SeqCst) {
                        return Ok(0);
                    }
                }
                Ok(_) => return self.pipe.read(buf),
                Err(e) => return Err(e.into()),
            }
        }
    }
}

/// After the child is gone, lets its readers drain for up to `grace`, then
/// tells them to stop waiting.
pub fn release_readers(stop: &std::sync::atomic::AtomicBool, done: impl Fn() -> bool, grace: Duration) {
    let deadline = Instant::now() + grace;
    while !done() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
}

/// Kills every process that carries `marker` (`NAME=value`) in its
/// environment: descendants that left the group with setsid, such as acpx's
/// queue owner. Linux only (it reads /proc); elsewhere it finds nothing.
pub fn sweep(marker: &str, grace: Duration) -> usize {
    let found = marked(marker);
    for pid in &found {
        let _ = nix::sys::signal::kill(Pid::from_raw(*pid), Signal::SIGTERM);
    }
    let deadline = Instant::now() + grace;
    let mut left = found.clone();
    while !left.is_empty() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
        left.retain(|pid| alive(*pid));
    }
    for pid in left {
        let _ = nix::sys::signal::kill(Pid::from_raw(pid), Signal::SIGKILL);
    }
    found.len()
}

#[cfg(target_os = "linux")]
fn marked(marker: &str) -> Vec<i32> {
    let me = std::process::id() as i32;
    let Ok(entries) = std::fs::read_dir("/proc") else { return Vec::new() };
    entries
        .filter_map(Result::ok)
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter(|&pid| pid != me)
        .filter(|pid| {
            std::fs::read(format!("/proc/{pid}/environ"))
                .is_ok_and(|env| env.split(|&b| b == 0).any(|var| var == marker.as_bytes()))
        })
        .collect()
}

#[cfg(not(target_os = "linux"))]
fn marked(_marker: &str) -> Vec<i32> {
    Vec::new()
}

/// Alive and not a zombie.
fn alive(pid: i32) -> bool {
    #[cfg(target_os = "linux")]
    {
        std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .is_ok_and(|s| s.rsplit_once(") ").is_some_and(|(_, rest)| !rest.starts_with('Z')))
    }
    #[cfg(not(target_os = "linux"))]
    {
        nix::sys::signal::kill(Pid::from_raw(pid), None).is_ok()
    }
}

/// What a bounded run produced.
pub struct Output {
    /// None when the run was killed for its timeout.
    pub status: Option<ExitStatus>,
    pub stdout: Vec<u8>,
    /// stdout went past the cap; the rest was read and dropped.
    pub truncated: bool,
    /// The first 64 KiB of stderr.
    pub stderr: Vec<u8>,
}

impl Output {
    pub fn success(&self) -> bool {
        self.status.is_some_and(|s| s.success())
    }
}

const STDERR_CAP: usize = 64 << 10;

/// The last `n` non-empty lines of a child's output, trimmed, joined by `sep`:
/// what an error message quotes of a failed command's stderr.
pub fn last_lines(output: &[u8], n: usize, sep: &str) -> String {
    let text = String::from_utf8_lossy(output);
    let lines: Vec<&str> = text.lines().map(str::trim).filter(|l| !l.is_empty()).collect();
    lines[lines.len().saturating_sub(n)..].join(sep)
}

/// Runs `cmd` with stdin from /dev/null, collecting up to `cap` bytes of stdout,
/// and kills its whole group if it is not done within `timeout`.
pub fn run(cmd: &mut Command, timeout: Duration, cap: usize) -> io::Result<Output> {
    let deadline = Instant::now() + timeout;
    cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped());
    let group = Group::spawn(cmd)?;
    let mut stdout = group.take_stdout().expect("stdout is piped");
    let mut stderr = group.take_stderr().expect("stderr is piped");
    let mut out = Output { status: None, stdout: Vec::new(), truncated: false, stderr: Vec::new() };
    let (mut out_open, mut err_open) = (true, true);
    let mut chunk = vec![0u8; 64 << 10];
    while out_open || err_open {
        let left = deadline.saturating_duration_since(Instant::now());
        let ms = u16::try_from(left.as_millis()).unwrap_or(u16::MAX);
        if left.is_zero() {
            group.signal(Signal::SIGKILL);
            return Ok(out);
        }
        let (ready_out, ready_err) = {
            use nix::poll::{PollFd, PollFlags, poll};
            // Only the pipes still open: a closed one polls as ready forever.
            let mut fds = Vec::with_capacity(2);
            if out_open {
                fds.push(PollFd::new(stdout.as_fd(), PollFlags::POLLIN));
            }
            if err_open {
                fds.push(PollFd::new(stderr.as_fd(), PollFlags::POLLIN));
            }
            match poll(&mut fds, ms) {
                Ok(_) | Err(nix::errno::Errno::EINTR) => {}
                Err(e) => return Err(e.into()),
            }
            let ready: Vec<bool> = fds.iter().map(|fd| fd.revents().is_some_and(|r| !r.is_empty())).collect();
            match (out_open, err_open) {
                (true, true) => (ready[0], ready[1]),
                (true, false) => (ready[0], false),
                (false, true) => (false, ready[0]),
                (false, false) => (false, false),
            }
        };
        if ready_out {
            let n = stdout.read(&mut chunk)?;
            out_open = n > 0;
            let room = cap.saturating_sub(out.stdout.len());
            out.truncated |= n > room;
            out.stdout.extend_from_slice(&chunk[..n.min(room)]);
        }
        if ready_err {
            let n = stderr.read(&mut chunk)?;
            err_open = n > 0;
            let room = STDERR_CAP.saturating_sub(out.stderr.len());
            out.stderr.extend_from_slice(&chunk[..n.min(room)]);
        }
    }
    out.status = group.wait_until(deadline)?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn collects_output_and_status() {
        let out = run(
            Command::new("sh").args(["-c", "echo hi; echo oops >&2; exit 3"]),
            Duration::from_secs(5),
            1024,
        )
        .unwrap();
        assert_eq!(out.stdout, b"hi\n");
        assert_eq!(out.stderr, b"oops\n");
        assert_eq!(out.status.unwrap().code(), Some(3));
    }

    #[test]
    fn caps_stdout_and_reads_to_the_end() {
        let out =
            run(Command::new("sh").args(["-c", "head -c 100000 /dev/zero"]), Duration::from_secs(5), 10)
                .unwrap();
        assert_eq!(out.stdout.len(), 10);
        assert!(out.truncated && out.success());
    }

    #[test]
    #[cfg(target_os = "linux")]
    fn a_timeout_kills_the_whole_group() {
        let dir = std::env::temp_dir().join(format!("aion-proc-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let pidfile = dir.join("pid");
        // The grandchild keeps the pipes open and would outlive a plain kill of sh.
        let script = format!("sleep 30 & echo $! > {}; wait", pidfile.display());
        let t = Instant::now();
        let out = run(Command::new("sh").args(["-c", &script]), Duration::from_millis(300), 1024).unwrap();
        assert!(out.status.is_none());
        assert!(t.elapsed() < Duration::from_secs(5));
        let pid: i32 = std::fs::read_to_string(&pidfile).unwrap().trim().parse().unwrap();
        let deadline = Instant::now() + Duration::from_secs(2);
        while nix::sys::signal::kill(Pid::from_raw(pid), None).is_ok() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        // The grandchild is a child of init now (or a zombie of sh, reaped by init).
        let alive = std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| !s.contains(") Z "));
        assert!(!alive, "grandchild {pid} survived the timeout");
        let _ = std::fs::remove_dir_all(dir);
    }
}
