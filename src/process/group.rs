//! A child leading its own process group, which cannot outlive its owner:
//! when the leader ends (or is killed) whatever is left of the group is killed
//! before the leader is reaped, so the group id cannot have been reused in
//! between. Every child of the connector starts here (or, for the PTY's
//! shell, is adopted here).

use nix::libc;
use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use std::io;
use std::os::unix::process::CommandExt;
use std::process::{ChildStderr, ChildStdout, Command, ExitStatus};
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
        unblock_signals_in_child(cmd);
        if let Some(mark) = super::instance::mark() {
            cmd.env(super::instance::VAR, mark);
        }
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

/// Children of `std::process::Command` inherit the signal mask (measured
/// with Rust 1.95: a blocked SIGTERM stays blocked in the child), and the
/// connector blocks SIGINT and SIGTERM in every thread for its signal thread.
/// A child that cannot receive SIGTERM ignores `stop`, so every child starts
/// with an empty mask.
pub fn unblock_signals_in_child(cmd: &mut std::process::Command) {
    use std::os::unix::process::CommandExt;
    // SAFETY: the closure runs in the forked child before exec; it calls only
    // sigemptyset, pthread_sigmask and signal(SIG_DFL), which are
    // async-signal-safe, on values on its own stack, and allocates nothing.
    unsafe {
        cmd.pre_exec(|| {
            let mut empty: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut empty);
            libc::pthread_sigmask(libc::SIG_SETMASK, &empty, std::ptr::null_mut());
            for sig in STOP_SIGNALS {
                libc::signal(sig, libc::SIG_DFL);
            }
            Ok(())
        });
    }
}

/// The signals that stop a child, which it must not inherit as ignored: a
/// connector started in the background by a non-interactive shell has
/// SIGINT and SIGQUIT ignored (POSIX), and `nohup` ignores SIGHUP.
const STOP_SIGNALS: [libc::c_int; 4] = [libc::SIGINT, libc::SIGTERM, libc::SIGHUP, libc::SIGQUIT];

/// Sets the stop signals back to their default action in this process, so
/// that a thread waiting for them (with them blocked) receives them even if
/// they were inherited as ignored. For the `lease` wrapper, which forwards
/// them to its command.
pub fn default_stop_signals() {
    for sig in STOP_SIGNALS {
        // SAFETY: SIG_DFL installs no handler, so no code of ours can run
        // in signal context; the call only changes the disposition.
        unsafe {
            libc::signal(sig, libc::SIG_DFL);
        }
    }
}
