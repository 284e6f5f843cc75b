//! The bounded "run a command, collect its output" used for git, acpx's
//! housekeeping commands and tool versions: its own process group, killed
//! whole at the deadline.

use super::group::Group;
use nix::sys::signal::Signal;
use std::io::{self, Read};
use std::os::fd::AsFd;
use std::process::{Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

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
    use nix::unistd::Pid;

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
