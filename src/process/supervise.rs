//! Supervision of a child that runs for a while (an agent run, a poll
//! session, a background process): spawned in its own process group with a
//! marker in its environment, its pipes readable until the owner gives up on
//! them, ended TERM → grace → KILL, and, once the leader is gone, every
//! process still carrying the marker swept (descendants that left the group
//! with setsid, such as acpx's queue owner).
//!
//! Threads: none of its own. The owner reads the pipes and waits on threads
//! it names and joins; [`Child::finish`] tells its readers to stop waiting.

use super::group::Group;
use super::run;
use nix::sys::signal::Signal;
use nix::unistd::Pid;
use std::io::{self, Read};
use std::os::fd::AsFd;
use std::process::{ChildStderr, ChildStdin, ChildStdout, Command, ExitStatus};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

/// How long readers may drain after the child is gone, and how long swept
/// processes get between SIGTERM and SIGKILL.
const DRAIN: Duration = Duration::from_secs(2);

/// A supervised child: its group, its marker and its readers' stop flag.
pub struct Child {
    pub group: Arc<Group>,
    marker: String,
    stop_reading: Arc<AtomicBool>,
}

impl Child {
    /// Spawns `cmd` leading its own group, with `name=value` added to its
    /// environment as the marker that [`sweep`] looks for.
    pub fn spawn(cmd: &mut Command, name: &str, value: &str) -> io::Result<Child> {
        cmd.env(name, value);
        let group = Group::spawn(cmd)?;
        Ok(Child {
            group: Arc::new(group),
            marker: format!("{name}={value}"),
            stop_reading: Arc::new(AtomicBool::new(false)),
        })
    }

    pub fn pid(&self) -> i32 {
        self.group.pid()
    }

    pub fn stdout(&self) -> Option<Stoppable<ChildStdout>> {
        self.group.take_stdout().map(|pipe| Stoppable { pipe, stop: Arc::clone(&self.stop_reading) })
    }

    pub fn stderr(&self) -> Option<Stoppable<ChildStderr>> {
        self.group.take_stderr().map(|pipe| Stoppable { pipe, stop: Arc::clone(&self.stop_reading) })
    }

    /// Any other pipe from the child (such as one pipe given as both stdout
    /// and stderr), given up on together with the child's own.
    pub fn stoppable<R>(&self, pipe: R) -> Stoppable<R> {
        Stoppable { pipe, stop: Arc::clone(&self.stop_reading) }
    }

    pub fn stdin(&self) -> Option<ChildStdin> {
        self.group.take_stdin()
    }

    /// Waits for the leader to exit, however long it takes.
    pub fn wait(&self) -> io::Result<ExitStatus> {
        self.group.wait()
    }

    /// Once the leader is gone: sweeps whatever carries the marker, lets the
    /// readers drain until `drained` (at most two seconds), then tells them to
    /// stop waiting. Returns how many processes were swept.
    pub fn finish(&self, drained: impl Fn() -> bool) -> usize {
        let swept = self.sweep();
        release_readers(&self.stop_reading, drained, DRAIN);
        swept
    }

    /// [`sweep`] of this child's marker; how many processes it ended.
    pub fn sweep(&self) -> usize {
        sweep(&self.marker, DRAIN)
    }

    /// Tells the readers of its pipes to stop waiting (for an owner that
    /// drains them itself, for at most [`DRAIN`] after the leader is gone).
    pub fn release_readers(&self) {
        self.stop_reading.store(true, Ordering::SeqCst);
    }
}

/// How long an owner lets the readers drain after the leader is gone.
pub const DRAIN_AFTER_EXIT: Duration = DRAIN;

/// Ends a group: `first` (a polite request such as `acpx cancel`, bounded by
/// the grace) if given, then SIGTERM, then SIGKILL once `grace` has passed
/// (at least half a second after the SIGTERM).
pub fn terminate(group: &Group, first: Option<Command>, grace: Duration) {
    let deadline = Instant::now() + grace;
    if let Some(mut cmd) = first {
        let _ = run::run(&mut cmd, grace, 4096);
        if let Ok(Some(_)) = group.wait_until(deadline) {
            return;
        }
    }
    group.signal(Signal::SIGTERM);
    if let Ok(Some(_)) = group.wait_until(deadline.max(Instant::now() + Duration::from_millis(500))) {
        return;
    }
    group.signal(Signal::SIGKILL);
}

/// A pipe from a child that can be given up on: once `stop` is set, a read
/// that finds nothing returns end of file instead of waiting. A process that
/// left the group without the run's marker may hold the pipe open forever;
/// the owner sets `stop` a moment after the child itself is gone.
pub struct Stoppable<R> {
    pub pipe: R,
    pub stop: Arc<AtomicBool>,
}

impl<R: Read + AsFd> Read for Stoppable<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
        loop {
            let mut fds = [PollFd::new(self.pipe.as_fd(), PollFlags::POLLIN)];
            match poll(&mut fds, PollTimeout::from(100u8)) {
                Ok(0) | Err(nix::errno::Errno::EINTR) => {
                    if self.stop.load(Ordering::SeqCst) {
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
fn release_readers(stop: &AtomicBool, done: impl Fn() -> bool, grace: Duration) {
    let deadline = Instant::now() + grace;
    while !done() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
    stop.store(true, Ordering::SeqCst);
}

/// Kills every process that carries `marker` (`NAME=value`) in its
/// environment: descendants that left the group with setsid, such as acpx's
/// queue owner. Linux only (it reads /proc); elsewhere it finds nothing.
pub fn sweep(marker: &str, grace: Duration) -> usize {
    end_all(marked(|var| var == marker.as_bytes()), grace)
}

/// SIGTERM to each of `pids`, SIGKILL to those still alive after `grace`.
pub fn end_all(pids: Vec<i32>, grace: Duration) -> usize {
    for pid in &pids {
        let _ = nix::sys::signal::kill(Pid::from_raw(*pid), Signal::SIGTERM);
    }
    let deadline = Instant::now() + grace;
    let mut left = pids.clone();
    while !left.is_empty() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
        left.retain(|pid| alive(*pid));
    }
    for pid in left {
        let _ = nix::sys::signal::kill(Pid::from_raw(pid), Signal::SIGKILL);
    }
    pids.len()
}

/// Every other process with an environment variable (`NAME=value` bytes)
/// that `wanted` accepts. Linux only (it reads /proc); elsewhere none.
#[cfg(target_os = "linux")]
pub fn marked(wanted: impl Fn(&[u8]) -> bool) -> Vec<i32> {
    let me = std::process::id() as i32;
    let Ok(entries) = std::fs::read_dir("/proc") else { return Vec::new() };
    entries
        .filter_map(Result::ok)
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter(|&pid| pid != me)
        .filter(|pid| {
            std::fs::read(format!("/proc/{pid}/environ")).is_ok_and(|env| env.split(|&b| b == 0).any(&wanted))
        })
        .collect()
}

#[cfg(not(target_os = "linux"))]
pub fn marked(_wanted: impl Fn(&[u8]) -> bool) -> Vec<i32> {
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
