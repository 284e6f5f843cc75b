//! One accepted connection, plain TCP or TLS ([`crate::net::tls`]): what the
//! HTTP loop reads and writes, and what a WebSocket upgrade hands to the
//! terminal as its [`Link`].

use crate::net::tls::Tls;
use crate::net::ws::Link;
use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::fd::{AsFd, BorrowedFd};

/// The reason of the 400 that plain HTTP on a TLS port gets.
pub const PLAIN_HTTP: &str = "this port speaks TLS: use https://";

/// Whether a connection's first byte can begin a TLS handshake (a
/// handshake record).
pub fn is_handshake(first: u8) -> bool {
    first == 0x16
}

/// How often a failed handshake is logged at most (there is no debug
/// level): a scanner can fail handshakes all day.
pub const HANDSHAKE_LOG_PERIOD: std::time::Duration = crate::logging::WINDOW;

/// One info line per [`HANDSHAKE_LOG_PERIOD`] at most, with the number of
/// failures left out since the last one.
pub fn handshake_failed(peer: SocketAddr, e: &io::Error) {
    static KIND: crate::logging::Sampled =
        crate::logging::Sampled::new("tls: failed handshakes", HANDSHAKE_LOG_PERIOD);
    if let Some(skipped) = KIND.admit() {
        let more = if skipped > 0 {
            format!(" (and {skipped} more since the last such line)")
        } else {
            String::new()
        };
        crate::logging::info!("tls: handshake with {} failed: {e}{more}", peer.ip());
    }
}

pub enum Stream {
    Plain(TcpStream),
    #[cfg(not(target_os = "macos"))]
    Tls(Box<crate::net::tls::TlsStream>),
}

impl Stream {
    /// A server TLS session over `tcp`, with `tls`'s current certificate.
    #[cfg(not(target_os = "macos"))]
    pub fn tls(tls: &Tls, tcp: TcpStream) -> io::Result<Stream> {
        Ok(Stream::Tls(Box::new(crate::net::tls::TlsStream::new(tls.session()?, tcp))))
    }

    #[cfg(target_os = "macos")]
    pub fn tls(tls: &Tls, _: TcpStream) -> io::Result<Stream> {
        match *tls {}
    }

    pub fn is_tls(&self) -> bool {
        !matches!(self, Stream::Plain(_))
    }

    /// The TLS handshake has not finished.
    pub fn handshaking(&self) -> bool {
        match self {
            Stream::Plain(_) => false,
            #[cfg(not(target_os = "macos"))]
            Stream::Tls(t) => t.is_handshaking(),
        }
    }

    /// Decrypted bytes wait in the TLS session (`poll` cannot show them).
    pub fn buffered(&self) -> bool {
        match self {
            Stream::Plain(_) => false,
            #[cfg(not(target_os = "macos"))]
            Stream::Tls(t) => t.pending(),
        }
    }

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
        Stream::buffered(self)
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

impl AsFd for Stream {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.tcp().as_fd()
    }
}
