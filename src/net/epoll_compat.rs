//! `epoll` where the system has none (macOS): the calls the HTTP server's
//! poll thread makes — add, delete, a level-triggered wait for readability —
//! over poll(2). Each registered descriptor is duplicated, so that the set
//! can be polled without borrowing the caller's objects; the poll thread is
//! the only user (the lock is never contended). On Linux `nix::sys::epoll`
//! is used instead.

use nix::poll::{PollFd, PollFlags, PollTimeout};
use std::collections::BTreeMap;
use std::os::fd::{AsFd, AsRawFd, OwnedFd, RawFd};
use std::sync::Mutex;

pub struct EpollCreateFlags;

impl EpollCreateFlags {
    pub const EPOLL_CLOEXEC: EpollCreateFlags = EpollCreateFlags;
}

/// Only readability is ever asked for.
#[derive(Clone, Copy)]
pub struct EpollFlags;

impl EpollFlags {
    pub const EPOLLIN: EpollFlags = EpollFlags;
}

#[derive(Clone, Copy)]
pub struct EpollEvent {
    data: u64,
}

impl EpollEvent {
    pub fn new(_flags: EpollFlags, data: u64) -> EpollEvent {
        EpollEvent { data }
    }

    pub fn empty() -> EpollEvent {
        EpollEvent { data: 0 }
    }

    pub fn data(&self) -> u64 {
        self.data
    }
}

#[derive(Clone, Copy)]
pub struct EpollTimeout(PollTimeout);

impl EpollTimeout {
    pub const ZERO: EpollTimeout = EpollTimeout(PollTimeout::ZERO);
}

impl From<u16> for EpollTimeout {
    fn from(ms: u16) -> EpollTimeout {
        EpollTimeout(PollTimeout::from(ms))
    }
}

/// The registered descriptors by their number: a duplicate and the token.
pub struct Epoll {
    fds: Mutex<BTreeMap<RawFd, (OwnedFd, u64)>>,
}

impl Epoll {
    pub fn new(_flags: EpollCreateFlags) -> nix::Result<Epoll> {
        Ok(Epoll { fds: Mutex::new(BTreeMap::new()) })
    }

    fn set(&self) -> std::sync::MutexGuard<'_, BTreeMap<RawFd, (OwnedFd, u64)>> {
        self.fds.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn add<F: AsFd>(&self, fd: F, event: EpollEvent) -> nix::Result<()> {
        let copy = fd.as_fd().try_clone_to_owned().map_err(|e| {
            nix::errno::Errno::from_raw(e.raw_os_error().unwrap_or(nix::errno::Errno::EBADF as i32))
        })?;
        self.set().insert(fd.as_fd().as_raw_fd(), (copy, event.data));
        Ok(())
    }

    pub fn delete<F: AsFd>(&self, fd: F) -> nix::Result<()> {
        self.set().remove(&fd.as_fd().as_raw_fd());
        Ok(())
    }

    pub fn wait(&self, events: &mut [EpollEvent], timeout: EpollTimeout) -> nix::Result<usize> {
        let set = self.set();
        let mut polled: Vec<PollFd<'_>> =
            set.values().map(|(fd, _)| PollFd::new(fd.as_fd(), PollFlags::POLLIN)).collect();
        nix::poll::poll(&mut polled, timeout.0)?;
        let mut n = 0;
        for (p, (_, data)) in polled.iter().zip(set.values()) {
            if n == events.len() {
                break;
            }
            if p.revents().is_some_and(|r| !r.is_empty()) {
                events[n] = EpollEvent { data: *data };
                n += 1;
            }
        }
        Ok(n)
    }
}
