//! WebSocket framing for the terminal, the only file that uses tungstenite.
//! The HTTP loop hands over the raw `TcpStream` of an upgrade request; after
//! the 101 one thread reads frames and another writes them, each with its own
//! tungstenite state on a clone of the socket. Frames tungstenite wants to
//! send while reading (pong, close reply) are not written by the reading side:
//! they go, encoded, to the writing thread, so frames never interleave.

use crossbeam_channel::Sender;
use std::io::{self, Read, Write};
use std::net::TcpStream;
use std::time::Duration;
use tungstenite::protocol::{CloseFrame, Role, WebSocket, WebSocketConfig, frame::coding::CloseCode};
use tungstenite::{Error as WsError, Message};

/// What the writing thread is asked to send. Its channel's receiver is owned
/// by the writing thread of one connection.
pub enum Out {
    /// Terminal output.
    Data(Vec<u8>),
    /// Frames already encoded by the reading side (pongs, the close reply).
    Frames(Vec<u8>),
    /// Close the connection with this code.
    Close(u16),
}

/// What the client sent.
pub enum In {
    Binary(Vec<u8>),
    Text(String),
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

struct ReadHalf {
    stream: TcpStream,
    to_writer: Sender<Out>,
}

impl Read for ReadHalf {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.stream.read(buf)
    }
}

impl Write for ReadHalf {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.to_writer.send(Out::Frames(buf.to_vec())).map_err(|_| io::ErrorKind::BrokenPipe)?;
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

struct WriteHalf(TcpStream);

impl Read for WriteHalf {
    fn read(&mut self, _: &mut [u8]) -> io::Result<usize> {
        Err(io::ErrorKind::WouldBlock.into())
    }
}

impl Write for WriteHalf {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.write(buf)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.0.flush()
    }
}

pub struct Reader {
    ws: WebSocket<ReadHalf>,
}

pub struct Writer {
    ws: WebSocket<WriteHalf>,
    stream: TcpStream,
    text: bool,
    /// The start of a UTF-8 sequence split across two PTY reads (text frames).
    carry: Vec<u8>,
    /// No data sent yet: a replay may begin inside a character.
    first: bool,
}

/// Splits an upgraded connection; `idle` bounds how long the reader waits
/// for any frame (the writer pings more often than that).
pub fn split(
    stream: TcpStream,
    to_writer: Sender<Out>,
    text: bool,
    idle: Duration,
) -> io::Result<(Reader, Writer)> {
    stream.set_read_timeout(Some(idle))?;
    stream.set_write_timeout(Some(Duration::from_secs(30)))?;
    let write_side = stream.try_clone()?;
    let raw = stream.try_clone()?;
    let reader = ReadHalf { stream, to_writer };
    Ok((
        Reader { ws: WebSocket::from_raw_socket(reader, Role::Server, Some(config())) },
        Writer {
            ws: WebSocket::from_raw_socket(WriteHalf(write_side), Role::Server, Some(config())),
            stream: raw,
            text,
            carry: Vec::new(),
            first: true,
        },
    ))
}

impl Reader {
    /// The next data message; None when the connection is over (closed,
    /// broken, or silent for longer than `idle`).
    pub fn next(&mut self) -> Option<In> {
        loop {
            match self.ws.read() {
                Ok(Message::Binary(b)) => return Some(In::Binary(b.to_vec())),
                Ok(Message::Text(t)) => return Some(In::Text(t.to_string())),
                Ok(Message::Close(_)) => {
                    // tungstenite queued the close reply; push it to the writer.
                    let _ = self.ws.flush();
                    return None;
                }
                Ok(_) => continue, // ping (answered through the writer), pong
                Err(WsError::ConnectionClosed | WsError::AlreadyClosed) => return None,
                Err(_) => return None,
            }
        }
    }
}

impl Writer {
    pub fn send(&mut self, out: Out) -> io::Result<()> {
        match out {
            Out::Data(bytes) => {
                let first = std::mem::replace(&mut self.first, false);
                let msg = if self.text {
                    // A replay cut from a ring may start with the tail of a
                    // character: that tail is dropped, not sent as U+FFFD.
                    let start = if first {
                        bytes.iter().take(3).take_while(|b| *b & 0xC0 == 0x80).count()
                    } else {
                        0
                    };
                    let text = crate::text::utf8_chunk(&mut self.carry, &bytes[start..]);
                    if text.is_empty() {
                        return Ok(()); // all of it waits in the carry
                    }
                    Message::text(text)
                } else {
                    Message::binary(bytes)
                };
                self.ws.send(msg).map_err(to_io)
            }
            Out::Frames(raw) => self.stream.write_all(&raw),
            Out::Close(code) => {
                let frame = CloseFrame { code: CloseCode::from(code), reason: "".into() };
                let _ = self.ws.close(Some(frame));
                self.ws.flush().map_err(to_io)
            }
        }
    }

    pub fn ping(&mut self) -> io::Result<()> {
        self.ws.send(Message::Ping(Vec::new().into())).map_err(to_io)
    }

    /// Ends the connection for both sides at once.
    pub fn shutdown(&self) {
        let _ = self.stream.shutdown(std::net::Shutdown::Both);
    }
}

fn to_io(e: WsError) -> io::Error {
    match e {
        WsError::Io(e) => e,
        other => io::Error::other(other.to_string()),
    }
}
