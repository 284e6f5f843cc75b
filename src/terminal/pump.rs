//! The pump: one thread serves a terminal's PTY and its WebSocket over
//! `poll`. It reads the PTY only when the socket has taken the last frame,
//! so a client that stops reading stops the reading (flow control by
//! construction); what the PTY has ready is coalesced into one frame of up
//! to 8 KiB; keystrokes go straight to the PTY, and while the PTY has not
//! taken them all the socket is not read. It pings the client every
//! interval and drops one silent for two intervals and 5 s.
//!
//! The thread is the HTTP connection thread that took the upgrade; it ends
//! with the socket, and the PTY goes back to the `terminals` thread.

use super::{Term, Terminals, Wake};
use crate::logging::{info, warn};
use crate::net::ws::{Got, In, Link, Socket};
use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use std::io::{ErrorKind, Write};
use std::os::fd::AsFd;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

/// The most PTY output put in one frame. A Linux PTY hands out at most 4 KiB
/// a read, so this is one or two reads. Measured with `cat` of 50 MB
/// (bench/vs-node-terminal.sh and an asyncio `websockets` client): 4–8 KiB
/// frames gave that client 68 MB/s, 16 KiB 54, 64 KiB 46 (it waits while a
/// big frame is gathered instead of decoding the last one), and made no
/// difference to a fast client (54–56 MB/s, bare PTY 64).
const FRAME_BYTES: usize = 8 << 10;
/// How long the client has to answer a close frame.
const CLOSE_GRACE: Duration = Duration::from_secs(3);

/// Serves `term` on `sock` until the socket or the shell ends. The socket
/// first gets what the terminal's ring holds: for a reattach the last
/// 64 KiB, for a new terminal what its shell printed before (its prompt).
pub(super) fn run<L: Link>(terms: &Terminals, term: &Arc<Term>, sock: Socket<L>, ping: Duration) {
    let wake = match Wake::new() {
        Ok(w) => Arc::new(w),
        Err(e) => {
            warn!("terminal {} project={}: cannot serve a socket: {e}", term.id, term.project);
            sock.shutdown();
            if term.session.is_none() {
                term.hang_up();
            }
            return;
        }
    };
    let attach = terms.attaches.fetch_add(1, Ordering::Relaxed);
    let snapshot = {
        let mut st = term.lock();
        if let Some((_, previous)) = st.attached.replace((attach, Arc::clone(&wake))) {
            // Another socket had it: that one closes (4000), this one takes over.
            previous.wake();
        }
        st.detached_at = None;
        st.last_activity = Instant::now();
        st.ring.bytes.iter().copied().collect::<Vec<u8>>()
    };
    let mut pump =
        Pump { term, sock, wake: &wake, attach, keys: Vec::new(), more_msgs: false, pty_open: true };
    if snapshot.is_empty() || pump.sock.output(snapshot).is_ok() {
        pump.serve(ping);
    }
    pump.sock.shutdown();
    // The socket is done: the PTY goes back to the terminals thread.
    let mut st = term.lock();
    if owns(&st, attach) {
        st.attached = None;
        st.detached_at = Some(Instant::now());
        drop(st);
        terms.keeper.wake();
    } else {
        drop(st);
    }
    if term.session.is_none() {
        term.hang_up(); // the original's behaviour: the shell ends with its socket
    }
}

struct Pump<'a, L: Link> {
    term: &'a Term,
    sock: Socket<L>,
    wake: &'a Wake,
    attach: u64,
    /// Keystrokes the PTY has not taken yet; the socket is not read meanwhile.
    keys: Vec<u8>,
    /// Reading stopped for keystrokes, with messages perhaps already
    /// received whole (poll would not show them).
    more_msgs: bool,
    /// The PTY has not reached its end.
    pty_open: bool,
}

/// Whether the socket with attach number `attach` is the terminal's.
fn owns(st: &super::State, attach: u64) -> bool {
    st.attached.as_ref().is_some_and(|(n, _)| *n == attach)
}

impl<L: Link> Pump<'_, L> {
    fn serve(&mut self, ping: Duration) {
        let silence = ping * 2 + Duration::from_secs(5);
        let mut next_ping = Instant::now() + ping;
        // When the close frame went out; from then on only its answer is awaited.
        let mut closing: Option<Instant> = None;
        // Readiness from the last poll; everything is tried once at the start.
        let (mut sock_in, mut pty_in, mut pty_out) = (true, true, false);
        loop {
            if closing.is_none() {
                let (mine, exited) = {
                    let st = self.term.lock();
                    (owns(&st, self.attach), st.exit_code.is_some())
                };
                let code = if !mine {
                    Some(4000)
                } else if exited && !self.sock.wants_write() {
                    Some(1000) // after the last output: the shell's waiter saw it read
                } else {
                    None
                };
                if let Some(code) = code {
                    if self.sock.close(code).is_err() {
                        return;
                    }
                    closing = Some(Instant::now());
                    self.keys.clear();
                }
            }
            if (sock_in || self.more_msgs || self.sock.buffered()) && !self.read_socket(closing.is_some()) {
                return;
            }
            if pty_out && !self.keys.is_empty() {
                self.write_keys();
            }
            if pty_in && self.pty_open && closing.is_none() && !self.sock.wants_write() && !self.read_pty() {
                return;
            }
            let now = Instant::now();
            if let Some(at) = closing {
                if now >= at + CLOSE_GRACE {
                    return;
                }
            } else if now >= next_ping {
                if self.sock.ping().is_err() {
                    return;
                }
                next_ping = now + ping;
            }
            // While keystrokes wait for the PTY the socket is not read, so
            // its silence says nothing then.
            let silent_at = self.keys.is_empty().then(|| self.sock.heard() + silence);
            if silent_at.is_some_and(|at| now >= at) {
                return; // the client said nothing, not even a pong
            }
            let deadline = match closing {
                Some(at) => at + CLOSE_GRACE,
                None => silent_at.map_or(next_ping, |at| at.min(next_ping)),
            };
            // Poll for what is wanted now.
            let mut want_sock = PollFlags::empty();
            if self.keys.is_empty() {
                want_sock |= PollFlags::POLLIN;
            }
            if self.sock.wants_write() {
                want_sock |= PollFlags::POLLOUT;
            }
            let mut want_pty = PollFlags::empty();
            if self.pty_open && closing.is_none() && !self.sock.wants_write() {
                want_pty |= PollFlags::POLLIN;
            }
            if !self.keys.is_empty() {
                want_pty |= PollFlags::POLLOUT;
            }
            let timeout = if self.sock.buffered() || (self.more_msgs && self.keys.is_empty()) {
                PollTimeout::ZERO
            } else {
                let ms = deadline.saturating_duration_since(now).as_millis().clamp(1, 60_000) as i32;
                PollTimeout::try_from(ms).unwrap_or(PollTimeout::MAX)
            };
            // A master at its end (or not wanted) is left out: it would
            // report POLLHUP on every call.
            let mut fds =
                vec![PollFd::new(self.wake.fd(), PollFlags::POLLIN), PollFd::new(self.sock.fd(), want_sock)];
            if !want_pty.is_empty() {
                fds.push(PollFd::new(self.term.master.as_fd(), want_pty));
            }
            match poll(&mut fds, timeout) {
                Ok(_) | Err(nix::errno::Errno::EINTR) => {}
                Err(_) => return,
            }
            let got = |i: usize| fds.get(i).and_then(PollFd::revents).unwrap_or(PollFlags::empty());
            let (w, s, p) = (got(0), got(1), got(2));
            let gone = PollFlags::POLLHUP | PollFlags::POLLERR;
            if s.intersects(gone) && !self.keys.is_empty() {
                return; // the client is gone and the PTY is not even taking its keystrokes
            }
            sock_in = s.intersects(PollFlags::POLLIN | gone);
            if s.intersects(PollFlags::POLLOUT | gone) && self.sock.flush().is_err() {
                return;
            }
            pty_in = p.intersects(PollFlags::POLLIN | gone);
            pty_out = p.intersects(PollFlags::POLLOUT | gone);
            if !w.is_empty() {
                self.wake.clear();
            }
        }
    }

    /// Client messages, until none is left or keystrokes wait for the PTY.
    /// False when the connection is over.
    fn read_socket(&mut self, closing: bool) -> bool {
        self.more_msgs = false;
        while self.keys.is_empty() {
            let bytes = match self.sock.read() {
                Got::Message(In::Binary(bytes)) => bytes,
                Got::Message(In::Text(text)) => text.into_bytes(),
                Got::Nothing => return true,
                Got::Gone => return false,
            };
            if closing {
                continue; // typed after the close: dropped
            }
            match super::parse_resize(&bytes) {
                None => {
                    self.term.lock().last_activity = Instant::now();
                    self.keys = bytes;
                    self.write_keys();
                }
                Some(Ok((cols, rows))) => {
                    if self.term.resize(cols, rows).is_err() {
                        return false;
                    }
                }
                Some(Err(why)) => {
                    info!("terminal {} project={}: resize refused ({why})", self.term.id, self.term.project);
                }
            }
        }
        self.more_msgs = true;
        true
    }

    /// Writes what the PTY takes of the waiting keystrokes.
    fn write_keys(&mut self) {
        while !self.keys.is_empty() {
            match (&self.term.master).write(&self.keys) {
                Ok(0) => return,
                Ok(n) => {
                    self.keys.drain(..n);
                }
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) if e.kind() == ErrorKind::WouldBlock => return,
                Err(_) => self.keys.clear(), // the PTY is gone; the shell's exit closes the socket
            }
        }
    }

    /// What the PTY has ready, up to one frame, to the ring and the socket.
    /// False when the connection is over.
    fn read_pty(&mut self) -> bool {
        let mut batch = Vec::new();
        let eof = {
            let mut st = self.term.lock();
            if !owns(&st, self.attach) {
                return true; // taken over: the close follows
            }
            self.term.read_ready(&mut st, &mut batch, FRAME_BYTES)
        };
        if eof {
            self.pty_open = false;
            self.term.changed.notify_all();
        }
        batch.is_empty() || self.sock.output(batch).is_ok()
    }
}
