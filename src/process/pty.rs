//! The PTY: a shell on a new pseudo-terminal (forkpty), written to, resized,
//! signalled and waited for, and nothing more: it knows nothing of sockets.
//! Every `unsafe` of the crate is in this file and in `group.rs` (the one other
//! piece of code that runs between a fork and an exec,
//! [`super::group::unblock_signals_in_child`]).
//!
//! forkpty pitfalls measured on this code's targets: argv and envp are built
//! before the fork, and the child does only async-signal-safe calls before
//! exec or `_exit`; the signal mask and the dispositions the connector changed
//! (SIGPIPE ignored, SIGINT/SIGTERM blocked) are reset, or `yes | head`
//! misbehaves in the shell; under musl the master is not close-on-exec, so it
//! is set here and the child closes every descriptor above stderr.

use super::group::Group;
use nix::libc;
use nix::pty::{ForkptyResult, Winsize, forkpty};
use std::ffi::{CString, c_char};
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::Path;

/// What to run on the terminal.
pub struct Spawn<'a> {
    pub program: &'a str,
    pub args: &'a [String],
    pub cwd: &'a Path,
    pub env: &'a [(String, String)],
    pub cols: u16,
    pub rows: u16,
}

pub struct Pty {
    master: File,
    /// The shell, leader of its own session and process group.
    pub group: Group,
}

/// The child's whole world, allocated before the fork.
struct Prepared {
    program: CString,
    argv: Vec<CString>,
    argv_ptrs: Vec<*const c_char>,
    envp: Vec<CString>,
    envp_ptrs: Vec<*const c_char>,
    cwd: CString,
}

fn cstring(s: &str) -> io::Result<CString> {
    CString::new(s)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "NUL byte in a terminal argument"))
}

impl Pty {
    pub fn spawn(spec: &Spawn<'_>) -> io::Result<Pty> {
        let mut p = Prepared {
            program: cstring(spec.program)?,
            argv: std::iter::once(spec.program)
                .chain(spec.args.iter().map(String::as_str))
                .map(cstring)
                .collect::<io::Result<_>>()?,
            argv_ptrs: Vec::new(),
            envp: spec.env.iter().map(|(k, v)| cstring(&format!("{k}={v}"))).collect::<io::Result<_>>()?,
            envp_ptrs: Vec::new(),
            cwd: cstring(&spec.cwd.to_string_lossy())?,
        };
        p.argv_ptrs = p.argv.iter().map(|c| c.as_ptr()).chain(std::iter::once(std::ptr::null())).collect();
        p.envp_ptrs = p.envp.iter().map(|c| c.as_ptr()).chain(std::iter::once(std::ptr::null())).collect();
        let size = winsize(spec.cols, spec.rows);
        // SAFETY: forkpty forks a multithreaded process; the child branch below
        // runs only async-signal-safe libc calls on memory prepared above, then
        // execs or `_exit`s, never returning into Rust code that could allocate
        // or take a lock.
        match unsafe { forkpty(&size, None) }.map_err(io::Error::from)? {
            ForkptyResult::Child => {
                // SAFETY: see above; `exec_child` never returns.
                unsafe { exec_child(&p) }
            }
            ForkptyResult::Parent { child, master } => {
                set_cloexec(&master)?;
                Ok(Pty { master: File::from(master), group: Group::adopt(child.as_raw()) })
            }
        }
    }

    /// Another handle on the master: one for the thread that reads output,
    /// one for the thread that writes input.
    pub fn clone_master(&self) -> io::Result<File> {
        self.master.try_clone()
    }

    /// TIOCSWINSZ on the master; the kernel sends SIGWINCH to the foreground group.
    pub fn resize(&self, cols: u16, rows: u16) -> io::Result<()> {
        let size = winsize(cols, rows);
        // SAFETY: TIOCSWINSZ reads one `winsize` through the pointer, which
        // points to a live, initialized value for the duration of the call.
        let rc = unsafe { libc::ioctl(self.master.as_raw_fd(), libc::TIOCSWINSZ, &size as *const Winsize) };
        if rc == 0 { Ok(()) } else { Err(io::Error::last_os_error()) }
    }
}

fn winsize(cols: u16, rows: u16) -> Winsize {
    Winsize { ws_row: rows.max(1), ws_col: cols.max(1), ws_xpixel: 0, ws_ypixel: 0 }
}

fn set_cloexec(fd: &OwnedFd) -> io::Result<()> {
    use nix::fcntl::{FcntlArg, FdFlag, fcntl};
    fcntl(fd, FcntlArg::F_SETFD(FdFlag::FD_CLOEXEC)).map(|_| ()).map_err(io::Error::from)
}

/// The child side of the fork.
///
/// # Safety
/// Call only in the child of a fork, with `p` built before the fork.
unsafe fn exec_child(p: &Prepared) -> ! {
    // SAFETY (whole block): every call is async-signal-safe (POSIX 2017,
    // 2.4.3) and touches only stack values or memory prepared before the fork.
    unsafe {
        let mut empty: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut empty);
        libc::sigprocmask(libc::SIG_SETMASK, &empty, std::ptr::null_mut());
        for sig in [libc::SIGPIPE, libc::SIGINT, libc::SIGTERM, libc::SIGHUP, libc::SIGQUIT, libc::SIGCHLD] {
            libc::signal(sig, libc::SIG_DFL);
        }
        close_inherited();
        libc::chdir(p.cwd.as_ptr());
        libc::execve(p.program.as_ptr(), p.argv_ptrs.as_ptr(), p.envp_ptrs.as_ptr());
        let msg = b"aion-connector: cannot start the shell\r\n";
        libc::write(2, msg.as_ptr().cast(), msg.len());
        libc::_exit(127)
    }
}

/// Closes every descriptor above stderr (other terminals' masters, sockets).
///
/// # Safety
/// Only in the forked child, before exec.
unsafe fn close_inherited() {
    #[cfg(any(target_os = "linux", target_os = "android"))]
    // SAFETY: close_range is a plain syscall on integers.
    if unsafe { libc::syscall(libc::SYS_close_range, 3u32, u32::MAX, 0u32) } == 0 {
        return;
    }
    // SAFETY: getdtablesize and close are async-signal-safe calls on integers.
    unsafe {
        let max = libc::getdtablesize().clamp(3, 65_536);
        for fd in 3..max {
            libc::close(fd);
        }
    }
}
