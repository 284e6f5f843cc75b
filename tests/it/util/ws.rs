//! The WebSocket terminal: raw upgrade requests and a tungstenite client that
//! collects what the terminal prints.

use std::io;
use std::net::TcpStream;
use std::path::Path;
use std::time::{Duration, Instant};

use super::{DEADLINE, Server, connect};

impl Server {
    /// Like `start`, with extra environment variables for the server (and so
    /// for the shells of its terminals).
    pub fn start_env(dir: &Path, cfg: &str, env: &[(&str, &str)]) -> Server {
        let path = dir.join("aion.config.json");
        std::fs::write(&path, cfg).unwrap();
        Server::start_args(&[path.to_str().unwrap()], dir, env)
    }
}

/// The RFC 6455 sample key.
pub const WS_KEY: &str = "dGhlIHNhbXBsZSBub25jZQ==";

/// A raw `GET target` upgrade request; `headers` ("Name: value" lines)
/// replace the usual Upgrade / Connection / Sec-WebSocket-* headers when given.
pub fn ws_upgrade_request(addr: &str, target: &str, headers: Option<&[&str]>) -> Vec<u8> {
    let default = [
        "Upgrade: websocket".to_string(),
        "Connection: Upgrade".to_string(),
        "Sec-WebSocket-Version: 13".to_string(),
        format!("Sec-WebSocket-Key: {WS_KEY}"),
    ];
    let lines: Vec<String> = match headers {
        Some(h) => h.iter().map(|s| s.to_string()).collect(),
        None => default.to_vec(),
    };
    let mut req = format!("GET {target} HTTP/1.1\r\nHost: {addr}\r\n");
    for l in lines {
        req.push_str(&l);
        req.push_str("\r\n");
    }
    req.push_str("\r\n");
    req.into_bytes()
}

/// A WebSocket client on a terminal: tungstenite over a std TcpStream, with
/// the terminal output received so far (binary and text frames together).
pub struct Ws {
    pub ws: tungstenite::WebSocket<TcpStream>,
    /// Output received (the oldest part may be cut away in a flood, see `pump`).
    pub out: Vec<u8>,
    /// Where the next `expect` starts searching in `out`.
    cursor: usize,
    pub text_frames: usize,
    pub binary_frames: usize,
    /// Data frames received, in order, with their sizes (first few only).
    pub first_frames: Vec<(bool, usize)>,
    /// Pings received from the server (answered by tungstenite).
    pub pings: usize,
    /// The close code received (Some(None): a close frame without a code).
    pub close: Option<Option<u16>>,
    /// The connection ended (EOF or error after or without a close frame).
    pub eof: bool,
}

/// Opens `ws://addr{target}`; Err describes a refused handshake
/// ("HTTP 403 {body}") or another failure.
pub fn ws_try_connect(addr: &str, target: &str) -> Result<Ws, String> {
    let stream = connect(addr);
    let url = format!("ws://{addr}{target}");
    match tungstenite::client(url.as_str(), stream) {
        Ok((ws, resp)) => {
            assert_eq!(resp.status().as_u16(), 101);
            Ok(Ws {
                ws,
                out: Vec::new(),
                cursor: 0,
                text_frames: 0,
                binary_frames: 0,
                first_frames: Vec::new(),
                pings: 0,
                close: None,
                eof: false,
            })
        }
        Err(tungstenite::HandshakeError::Failure(tungstenite::Error::Http(resp))) => {
            let body = resp.body().as_deref().map(String::from_utf8_lossy).unwrap_or_default().into_owned();
            Err(format!("HTTP {} {body}", resp.status().as_u16()))
        }
        Err(e) => Err(format!("handshake failed: {e}")),
    }
}

pub fn ws_connect(addr: &str, target: &str) -> Ws {
    ws_try_connect(addr, target).unwrap_or_else(|e| panic!("websocket {target}: {e}"))
}

/// Keep at most this much output in memory (floods).
const WS_KEEP: usize = 4 << 20;

impl Ws {
    /// Reads one message, waiting at most `wait`; false if nothing came (or
    /// the connection is over).
    pub fn pump(&mut self, wait: Duration) -> bool {
        use tungstenite::{Error, Message};
        if self.eof {
            return false;
        }
        let _ = self.ws.get_mut().set_read_timeout(Some(wait.max(Duration::from_millis(1))));
        match self.ws.read() {
            Ok(Message::Binary(b)) => {
                self.binary_frames += 1;
                self.data(false, &b);
            }
            Ok(Message::Text(t)) => {
                self.text_frames += 1;
                self.data(true, t.as_bytes());
            }
            Ok(Message::Close(frame)) => self.close = Some(frame.map(|f| u16::from(f.code))),
            Ok(Message::Ping(_)) => self.pings += 1,
            Ok(_) => {}
            Err(Error::Io(e)) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut) => {
                return false;
            }
            Err(_) => {
                self.eof = true;
                return false;
            }
        }
        true
    }

    fn data(&mut self, text: bool, bytes: &[u8]) {
        if self.first_frames.len() < 16 {
            self.first_frames.push((text, bytes.len()));
        }
        self.out.extend_from_slice(bytes);
        if self.out.len() > WS_KEEP {
            let cut = self.out.len() - WS_KEEP / 4;
            self.out.drain(..cut);
            self.cursor = self.cursor.saturating_sub(cut);
        }
    }

    /// Where the last `expect` matched (the end of the match) in `out`.
    pub fn cursor(&self) -> usize {
        self.cursor
    }

    /// The output after the cursor, lossily decoded (for messages).
    pub fn pending_text(&self) -> String {
        let tail = &self.out[self.cursor.min(self.out.len())..];
        let tail = &tail[tail.len().saturating_sub(4000)..];
        String::from_utf8_lossy(tail).into_owned()
    }

    /// Reads until `pat` shows up after the cursor (then the cursor moves past
    /// it); panics after `within` with what was received.
    pub fn expect_within(&mut self, pat: &str, within: Duration) {
        if !self.seen_within(pat, within) {
            panic!(
                "websocket output never showed {pat:?} within {within:?} (eof={}, close={:?}); received:\n{}",
                self.eof,
                self.close,
                self.pending_text()
            );
        }
    }

    /// Like `expect_within`, false instead of a panic.
    pub fn seen_within(&mut self, pat: &str, within: Duration) -> bool {
        let start = Instant::now();
        let pat_b = pat.as_bytes();
        let mut from = self.cursor;
        loop {
            let hay = &self.out[from.min(self.out.len())..];
            if let Some(i) = hay.windows(pat_b.len()).position(|w| w == pat_b) {
                self.cursor = from + i + pat_b.len();
                return true;
            }
            from = self.out.len().saturating_sub(pat_b.len()).max(self.cursor);
            let left = within.saturating_sub(start.elapsed());
            if left.is_zero() || self.eof {
                return false;
            }
            let before = self.out.len();
            self.pump(left.min(Duration::from_millis(200)));
            // a flood cut the buffer: keep scanning from its new start
            if self.out.len() < before {
                from = self.cursor;
            }
        }
    }

    pub fn expect(&mut self, pat: &str) {
        self.expect_within(pat, DEADLINE)
    }

    /// Reads until `prefix` and then a line end; the text in between.
    pub fn expect_value(&mut self, prefix: &str) -> String {
        self.expect(prefix);
        let start = self.cursor;
        let end = poll_ws(self, &format!("the end of the line after {prefix:?}"), |w| {
            w.out[start..].iter().position(|&b| b == b'\r' || b == b'\n').map(|i| start + i)
        });
        self.cursor = end;
        String::from_utf8_lossy(&self.out[start..end]).into_owned()
    }

    /// The shell's pid (`$$`), asked with a marker built from `tag`.
    pub fn shell_pid(&mut self, tag: &str) -> i32 {
        self.send_text(&format!("echo {tag}-$((40+2))=$$\r"));
        let v = self.expect_value(&format!("{tag}-42="));
        v.trim().parse().unwrap_or_else(|_| panic!("shell pid {v:?}"))
    }

    pub fn send_text(&mut self, s: &str) {
        self.ws.send(tungstenite::Message::text(s)).expect("send a text frame");
    }

    pub fn send_binary(&mut self, b: &[u8]) {
        self.ws.send(tungstenite::Message::binary(b.to_vec())).expect("send a binary frame");
    }

    /// Reads (discarding nothing) until a close frame or EOF, at most `within`;
    /// then keeps reading briefly so the close reply goes out. The close code
    /// (None if the connection ended without a close frame).
    pub fn wait_close(&mut self, within: Duration) -> Option<u16> {
        let start = Instant::now();
        while self.close.is_none() && !self.eof {
            let left = within.saturating_sub(start.elapsed());
            if left.is_zero() {
                panic!("no close frame or EOF within {within:?}; received:\n{}", self.pending_text());
            }
            self.pump(left.min(Duration::from_millis(200)));
        }
        // Answer the close and wait for the server to end the connection.
        let until = Instant::now() + Duration::from_secs(5);
        while !self.eof && Instant::now() < until {
            self.pump(Duration::from_millis(200));
        }
        self.close.flatten()
    }

    /// A clean close from the client side (close frame, wait for the answer).
    pub fn close_clean(mut self) {
        let _ = self.ws.close(None);
        let until = Instant::now() + Duration::from_secs(5);
        while !self.eof && Instant::now() < until {
            self.pump(Duration::from_millis(200));
        }
    }

    /// Drops the TCP connection without a close frame.
    pub fn drop_tcp(self) {
        let _ = self.ws.get_ref().shutdown(std::net::Shutdown::Both);
    }
}

/// Like `poll`, pumping the socket between attempts.
fn poll_ws<T>(ws: &mut Ws, what: &str, mut f: impl FnMut(&Ws) -> Option<T>) -> T {
    let start = Instant::now();
    loop {
        if let Some(v) = f(ws) {
            return v;
        }
        if start.elapsed() > DEADLINE || ws.eof {
            panic!("timed out waiting for {what}; received:\n{}", ws.pending_text());
        }
        ws.pump(Duration::from_millis(100));
    }
}

/// What the flow-control check needs of a terminal client (plain `ws://`
/// [`Ws`] or a `wss://` one).
pub trait Terminal {
    fn send_text(&mut self, s: &str);
    fn send_binary(&mut self, b: &[u8]);
    /// Reads until `pat` shows up; panics after `within`.
    fn expect_within(&mut self, pat: &str, within: Duration);
}

impl Terminal for Ws {
    fn send_text(&mut self, s: &str) {
        Ws::send_text(self, s)
    }
    fn send_binary(&mut self, b: &[u8]) {
        Ws::send_binary(self, b)
    }
    fn expect_within(&mut self, pat: &str, within: Duration) {
        Ws::expect_within(self, pat, within)
    }
}

/// A client that stops reading while its shell floods keeps the server's
/// memory bounded: RSS (sampled every 100 ms for 3 s) stays within 4 MB of
/// where it was after a warm-up, `ping` (another client's request) works
/// meanwhile, and after Ctrl-C the backlog drains and the shell answers.
/// Returns the RSS before the flood, for the caller's check after closing.
pub fn assert_unread_flood_keeps_memory_bounded(
    srv: &Server,
    term: &mut impl Terminal,
    ping: impl Fn(),
) -> u64 {
    // warm up the output path (buffers, allocator) with a small flood
    term.send_text("yes | head -n 300000; echo warm-$((2*3))\r");
    term.expect_within("warm-6", Duration::from_secs(20));
    let before = srv.rss_kb();
    term.send_text("yes\r");
    term.expect_within("y\r\ny\r\ny\r\n", DEADLINE);
    // stop reading for 3 s while the shell floods (time passing is the test:
    // RSS is sampled every 100 ms meanwhile)
    let mut peak = 0;
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(3) {
        peak = peak.max(srv.rss_kb());
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(
        peak <= before + 4096,
        "server RSS grew from {before} kB to {peak} kB while the client was not reading"
    );
    // the server answers others meanwhile
    ping();
    // resume: stop the flood, read the backlog, the shell works
    term.send_binary(b"\x03");
    term.send_text("echo resumed-$((3+4))\r");
    term.expect_within("resumed-7", Duration::from_secs(15));
    before
}
