//! WebSocket framing for the terminal, the only file that uses tungstenite.
//! After the HTTP loop hands over an upgrade request's connection, a
//! [`Socket`] answers the 101 and from then on is driven by one thread (the
//! terminal's pump) over a non-blocking [`Link`]: it says which readiness to
//! poll for, reads client messages until the link has nothing more, and
//! queues output frames, of which at most one waits for the link at a time.
//! Pongs and the close reply are queued by tungstenite itself and written by
//! the next read or flush.

use std::io::{self, Read, Write};
use std::net::TcpStream;
use std::os::fd::{AsFd, BorrowedFd};
use std::time::Instant;
use tungstenite::protocol::{CloseFrame, Role, WebSocket, WebSocketConfig, frame::coding::CloseCode};
use tungstenite::{Error as WsError, Message};

/// The byte stream under a WebSocket, non-blocking: a TCP connection today;
/// a TLS session over one would implement this too.
pub trait Link: Read + Write + Send {
    /// The descriptor whose readiness is polled.
    fn fd(&self) -> BorrowedFd<'_>;
    /// Bytes received and decoded but not read yet, which polling the
    /// descriptor would not show (TLS keeps whole records).
    fn buffered(&self) -> bool {
        false
    }
    /// Makes reads and writes return `WouldBlock` instead of waiting.
    fn set_nonblocking(&self) -> io::Result<()>;
    /// Ends the connection both ways.
    fn shutdown(&self);
}

impl Link for TcpStream {
    fn fd(&self) -> BorrowedFd<'_> {
        self.as_fd()
    }
    fn set_nonblocking(&self) -> io::Result<()> {
        TcpStream::set_nonblocking(self, true)
    }
    fn shutdown(&self) {
        let _ = TcpStream::shutdown(self, std::net::Shutdown::Both);
    }
}

/// What the client sent.
pub enum In {
    Binary(Vec<u8>),
    Text(String),
}

/// What reading found.
pub enum Got {
    Message(In),
    /// Nothing more for now.
    Nothing,
    /// The connection is over (closed, broken, or a protocol error).
    Gone,
}

/// Small buffers: terminal traffic is keystrokes one way and screen updates
/// the other (tungstenite defaults: 128 KiB read buffer, 64 MiB messages).
fn config() -> WebSocketConfig {
    WebSocketConfig::default()
        .read_buffer_size(4 << 10)
        .write_buffer_size(0)
        .max_write_buffer_size(1 << 20)
        .max_message_size(Some(1 << 20))
        .max_frame_size(Some(1 << 20))
}

/// The `Sec-WebSocket-Accept` for a client key.
pub fn accept_key(key: &str) -> String {
    tungstenite::handshake::derive_accept_key(key.trim().as_bytes())
}

/// The server side of one terminal WebSocket.
pub struct Socket<L: Link> {
    ws: WebSocket<L>,
    text: bool,
    /// The start of a UTF-8 sequence split across two PTY reads (text frames).
    carry: Vec<u8>,
    /// No output sent yet: a replay may begin inside a character.
    first: bool,
    /// Frames wait in tungstenite's buffer for the link to take them.
    unflushed: bool,
    /// When the client last sent anything (a pong included).
    heard: Instant,
}

impl<L: Link> Socket<L> {
    /// Answers the upgrade (`key` is the client's `Sec-WebSocket-Key`); the
    /// link is non-blocking from then on. Output goes as text frames, or as
    /// binary ones when `text` is false. `protocol`, one the client offered,
    /// is echoed in `Sec-WebSocket-Protocol` (RFC 6455 §4.2.2).
    pub fn accept(mut link: L, key: &str, text: bool, protocol: Option<&str>) -> io::Result<Socket<L>> {
        let protocol = protocol.map(|p| format!("Sec-WebSocket-Protocol: {p}\r\n")).unwrap_or_default();
        let head = format!(
            "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: {}\r\n{protocol}\r\n",
            accept_key(key)
        );
        link.write_all(head.as_bytes())?;
        link.set_nonblocking()?;
        Ok(Socket {
            ws: WebSocket::from_raw_socket(link, Role::Server, Some(config())),
            text,
            carry: Vec::new(),
            first: true,
            unflushed: false,
            heard: Instant::now(),
        })
    }

    pub fn fd(&self) -> BorrowedFd<'_> {
        self.ws.get_ref().fd()
    }

    /// Output (or a pong, or a close) waits for the link to be writable.
    pub fn wants_write(&self) -> bool {
        self.unflushed
    }

    /// Received bytes wait in the link (poll would not show them).
    pub fn buffered(&self) -> bool {
        self.ws.get_ref().buffered()
    }

    /// When the client last sent anything, a pong included.
    pub fn heard(&self) -> Instant {
        self.heard
    }

    /// The next client message, if one has arrived whole.
    pub fn read(&mut self) -> Got {
        loop {
            let msg = match self.ws.read() {
                Ok(msg) => msg,
                Err(WsError::Io(e)) if e.kind() == io::ErrorKind::WouldBlock => return Got::Nothing,
                Err(_) => return Got::Gone,
            };
            self.heard = Instant::now();
            match msg {
                Message::Binary(b) => return Got::Message(In::Binary(b.to_vec())),
                Message::Text(t) => return Got::Message(In::Text(t.to_string())),
                Message::Close(_) => {
                    // tungstenite queued the reply: out it goes, if the link takes it.
                    let _ = self.ws.flush();
                    return Got::Gone;
                }
                Message::Ping(_) => self.unflushed = true, // the pong is queued
                Message::Pong(_) | Message::Frame(_) => {}
            }
        }
    }

    /// Queues PTY output as one frame and writes what the link takes.
    pub fn output(&mut self, bytes: Vec<u8>) -> io::Result<()> {
        let first = std::mem::replace(&mut self.first, false);
        let msg = if self.text {
            // A replay cut from a ring may start with the tail of a
            // character: that tail is dropped, not sent as U+FFFD.
            let start =
                if first { bytes.iter().take(3).take_while(|b| *b & 0xC0 == 0x80).count() } else { 0 };
            let text = match (start, self.carry.is_empty()) {
                // The usual case, whole characters only: no copy.
                (0, true) => String::from_utf8(bytes)
                    .unwrap_or_else(|e| crate::text::utf8_chunk(&mut self.carry, e.as_bytes())),
                _ => crate::text::utf8_chunk(&mut self.carry, &bytes[start..]),
            };
            if text.is_empty() {
                return Ok(()); // all of it waits in the carry
            }
            Message::text(text)
        } else {
            Message::binary(bytes)
        };
        self.send(msg)
    }

    pub fn ping(&mut self) -> io::Result<()> {
        self.send(Message::Ping(Vec::new().into()))
    }

    /// Queues a close frame with `code`; the connection is over once the
    /// client answers (or a deadline of the caller's runs out).
    pub fn close(&mut self, code: u16) -> io::Result<()> {
        let frame = CloseFrame { code: CloseCode::from(code), reason: "".into() };
        match self.ws.close(Some(frame)) {
            Ok(()) => {
                self.unflushed = false;
                Ok(())
            }
            Err(e) => self.settle(e),
        }
    }

    /// Writes what waits; Ok also while the link is still full.
    pub fn flush(&mut self) -> io::Result<()> {
        match self.ws.flush() {
            Ok(()) => {
                self.unflushed = false;
                Ok(())
            }
            Err(e) => self.settle(e),
        }
    }

    fn send(&mut self, msg: Message) -> io::Result<()> {
        match self.ws.send(msg) {
            Ok(()) => {
                self.unflushed = false;
                Ok(())
            }
            Err(e) => self.settle(e),
        }
    }

    /// A write that did not finish: WouldBlock leaves the frames queued;
    /// anything else ends the connection.
    fn settle(&mut self, e: WsError) -> io::Result<()> {
        match e {
            WsError::Io(e) if e.kind() == io::ErrorKind::WouldBlock => {
                self.unflushed = true;
                Ok(())
            }
            WsError::Io(e) => Err(e),
            other => Err(io::Error::other(other.to_string())),
        }
    }

    /// Ends the connection for both sides at once.
    pub fn shutdown(&self) {
        self.ws.get_ref().shutdown();
    }
}
