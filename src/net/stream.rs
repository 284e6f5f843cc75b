//! One accepted connection, plain TCP or TLS ([`crate::net::tls`]): what the
//! HTTP loop reads and writes, and what a WebSocket upgrade hands to the
//! terminal as its [`Link`].

use crate::net::ws::Link;
use std::io::{self, Read, Write};
use std::net::TcpStream;
use std::os::fd::{AsFd, BorrowedFd};

pub enum Stream {
    Plain(TcpStream),
    #[cfg(not(target_os = "macos"))]
    Tls(Box<crate::net::tls::TlsStream>),
}

impl Stream {
    /// The TCP socket under it (timeouts, peeking, the fd).
    pub fn tcp(&self) -> &TcpStream {
        match self {
            Stream::Plain(s) => s,
            #[cfg(not(target_os = "macos"))]
            Stream::Tls(t) => t.sock(),
        }
    }

    /// Stops sending (over TLS a close_notify first).
    pub fn shutdown_write(&mut self) {
        #[cfg(not(target_os = "macos"))]
        if let Stream::Tls(t) = self {
            t.close();
        }
        let _ = self.tcp().shutdown(std::net::Shutdown::Write);
    }
}

impl Read for Stream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Stream::Plain(s) => s.read(buf),
            #[cfg(not(target_os = "macos"))]
            Stream::Tls(t) => t.read(buf),
        }
    }
}

impl Write for Stream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Stream::Plain(s) => s.write(buf),
            #[cfg(not(target_os = "macos"))]
            Stream::Tls(t) => t.write(buf),
        }
    }
    fn flush(&mut self) -> io::Result<()> {
        match self {
            Stream::Plain(s) => s.flush(),
            #[cfg(not(target_os = "macos"))]
            Stream::Tls(t) => t.flush(),
        }
    }
}

impl Link for Stream {
    fn fd(&self) -> BorrowedFd<'_> {
        self.tcp().as_fd()
    }
    fn buffered(&self) -> bool {
        match self {
            Stream::Plain(_) => false,
            #[cfg(not(target_os = "macos"))]
            Stream::Tls(t) => t.pending(),
        }
    }
    fn set_nonblocking(&self) -> io::Result<()> {
        self.tcp().set_nonblocking(true)
    }
    fn shutdown(&self) {
        // `&self`: no close_notify (that needs the session); the WebSocket
        // close frame has said goodbye already.
        let _ = self.tcp().shutdown(std::net::Shutdown::Both);
    }
}
