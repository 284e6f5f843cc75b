//! Orderly shutdown, and reloads. SIGINT and SIGTERM are blocked in every
//! thread and taken by one signal thread with `sigwait`, which sets the
//! shutdown flag and wakes the accept loop through a socket pair. A second
//! SIGINT exits at once. With [`install_with_reload`], SIGHUP is taken too:
//! each one is a message on [`Shutdown::reloads`] (its receiver: push mode's
//! `reload` thread); without, SIGHUP keeps its default action.
//!
//! Threads: `signals`, started by [`install`] / [`install_with_reload`]
//! (owner: the mode's main thread, which never joins it). It loops on
//! `sigwait` for the life of the process and ends with it — or ends the
//! process itself, at once, on a second SIGINT.

use crate::logging::{info, warn};
use nix::sys::signal::{SigSet, Signal};
use std::io::Write;
use std::os::unix::net::UnixStream;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

pub struct Shutdown {
    flag: AtomicBool,
    wake_tx: UnixStream,
    /// Readable once shutdown has begun; the accept loop polls it beside the listener.
    pub wake_rx: UnixStream,
    /// One `()` per SIGHUP (never sent without [`install_with_reload`]).
    pub reloads: crossbeam_channel::Receiver<()>,
}

impl Shutdown {
    pub fn requested(&self) -> bool {
        self.flag.load(Ordering::SeqCst)
    }

    /// Sleeps up to `d`; true as soon as shutdown has begun.
    pub fn wait(&self, d: std::time::Duration) -> bool {
        use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
        use std::os::fd::AsFd;
        let deadline = std::time::Instant::now() + d;
        while !self.requested() {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            if left.is_zero() {
                return false;
            }
            let ms = PollTimeout::try_from(left.as_millis().min(60_000) as i32).unwrap_or(PollTimeout::MAX);
            let mut fds = [PollFd::new(self.wake_rx.as_fd(), PollFlags::POLLIN)];
            let _ = poll(&mut fds, ms);
        }
        true
    }

    pub fn trigger(&self) {
        self.flag.store(true, Ordering::SeqCst);
        let _ = (&self.wake_tx).write(&[1]);
    }
}

/// Blocks the signals in the calling thread (call it before any other thread
/// starts, so all inherit the mask) and starts the signal thread. Children
/// would inherit the mask too: `proc::Group` and the PTY empty it in each.
pub fn install() -> std::io::Result<Arc<Shutdown>> {
    start(false)
}

/// [`install`], and SIGHUP asks for a reload on [`Shutdown::reloads`].
pub fn install_with_reload() -> std::io::Result<Arc<Shutdown>> {
    start(true)
}

fn start(reload: bool) -> std::io::Result<Arc<Shutdown>> {
    let (wake_tx, wake_rx) = UnixStream::pair()?;
    wake_tx.set_nonblocking(true)?;
    // Reloads asked while one is under way fold into one more.
    let (reload_tx, reloads) = crossbeam_channel::bounded(1);
    let shutdown = Arc::new(Shutdown { flag: AtomicBool::new(false), wake_tx, wake_rx, reloads });
    let mut set = SigSet::empty();
    set.add(Signal::SIGINT);
    set.add(Signal::SIGTERM);
    if reload {
        set.add(Signal::SIGHUP);
    }
    set.thread_block().map_err(std::io::Error::from)?;
    let s = Arc::clone(&shutdown);
    std::thread::Builder::new().name("signals".into()).stack_size(64 << 10).spawn(move || {
        loop {
            let Ok(sig) = set.wait() else { continue };
            if sig == Signal::SIGHUP {
                if !s.requested() {
                    info!("SIGHUP: reloading the config");
                    let _ = reload_tx.try_send(());
                }
                continue;
            }
            if s.requested() {
                // A second Ctrl-C means "now"; a repeated SIGTERM (some
                // supervisors signal the whole group) changes nothing.
                if sig == Signal::SIGINT {
                    warn!("second {sig}: exiting now");
                    crate::logging::finish();
                    std::process::exit(130);
                }
                continue;
            }
            info!("{sig}: shutting down");
            s.trigger();
        }
    })?;
    Ok(shutdown)
}
