//! A git smart-HTTP server for the tests: tiny_http in front of the real
//! `git http-backend` (CGI), serving the bare repositories under one root
//! to a client that sends the expected HTTP Basic credentials (401 with a
//! challenge otherwise). It records each request's line and whether its
//! credentials were right. One thread, ended when the server is dropped.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::Duration;

pub struct GitHttp {
    pub addr: String,
    /// `METHOD URL -> STATUS` of each request.
    pub seen: Arc<Mutex<Vec<String>>>,
    stop: Arc<AtomicBool>,
    thread: Option<thread::JoinHandle<()>>,
}

impl GitHttp {
    /// Serves the repositories under `root` to `user:password` only.
    pub fn start(root: &Path, user: &str, password: &str) -> GitHttp {
        let server = tiny_http::Server::http("127.0.0.1:0").expect("a git HTTP server");
        let addr = server.server_addr().to_ip().expect("an IP listener").to_string();
        let want = format!("Basic {}", base64(format!("{user}:{password}").as_bytes()));
        let (seen, stop) = (Arc::new(Mutex::new(Vec::new())), Arc::new(AtomicBool::new(false)));
        let (seen2, stop2, root) = (seen.clone(), stop.clone(), root.to_path_buf());
        let thread = thread::spawn(move || {
            while !stop2.load(Ordering::SeqCst) {
                let req = match server.recv_timeout(Duration::from_millis(50)) {
                    Ok(Some(r)) => r,
                    Ok(None) => continue,
                    Err(_) => break,
                };
                let line = format!("{} {}", req.method(), req.url());
                let status = serve(req, &root, &want);
                seen2.lock().unwrap().push(format!("{line} -> {status}"));
            }
        });
        GitHttp { addr, seen, stop, thread: Some(thread) }
    }
}

impl Drop for GitHttp {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn serve(mut req: tiny_http::Request, root: &PathBuf, want: &str) -> u16 {
    let header = |name: &'static str| {
        req.headers().iter().find(|h| h.field.equiv(name)).map(|h| h.value.as_str().to_string())
    };
    if header("Authorization").as_deref() != Some(want) {
        let challenge = tiny_http::Header::from_bytes("WWW-Authenticate", r#"Basic realm="git""#).unwrap();
        let _ =
            req.respond(tiny_http::Response::from_string("").with_status_code(401).with_header(challenge));
        return 401;
    }
    let (path, query) = req.url().split_once('?').unwrap_or((req.url(), ""));
    let mut cmd = Command::new("git");
    cmd.arg("http-backend")
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .env("GIT_PROJECT_ROOT", root)
        .env("GIT_HTTP_EXPORT_ALL", "1")
        .env("REQUEST_METHOD", req.method().as_str())
        .env("PATH_INFO", path)
        .env("QUERY_STRING", query)
        .env("REMOTE_USER", "git")
        .env("REMOTE_ADDR", "127.0.0.1")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null());
    for (var, name) in [
        ("CONTENT_TYPE", "Content-Type"),
        ("HTTP_CONTENT_ENCODING", "Content-Encoding"),
        ("GIT_PROTOCOL", "Git-Protocol"),
    ] {
        if let Some(v) = header(name) {
            cmd.env(var, v);
        }
    }
    let mut body = Vec::new();
    let _ = req.as_reader().read_to_end(&mut body);
    let mut child = cmd.spawn().expect("git http-backend");
    let mut stdin = child.stdin.take().unwrap();
    let writer = thread::spawn(move || {
        let _ = stdin.write_all(&body);
    });
    let out = child.wait_with_output().expect("git http-backend output");
    let _ = writer.join();
    // CGI: headers, a blank line, the body
    let split = out.stdout.windows(4).position(|w| w == b"\r\n\r\n").map(|i| (i, 4));
    let split = split.or_else(|| out.stdout.windows(2).position(|w| w == b"\n\n").map(|i| (i, 2)));
    let Some((end, sep)) = split else {
        let _ = req.respond(tiny_http::Response::from_string("bad CGI output").with_status_code(500));
        return 500;
    };
    let head = String::from_utf8_lossy(&out.stdout[..end]).into_owned();
    let mut status = 200u16;
    let mut headers = Vec::new();
    for l in head.lines() {
        let Some((k, v)) = l.split_once(':') else { continue };
        if k.eq_ignore_ascii_case("Status") {
            status = v.trim().split(' ').next().and_then(|s| s.parse().ok()).unwrap_or(500);
        } else if let Ok(h) = tiny_http::Header::from_bytes(k.trim().as_bytes(), v.trim().as_bytes()) {
            headers.push(h);
        }
    }
    let data = out.stdout[end + sep..].to_vec();
    let mut resp = tiny_http::Response::from_data(data).with_status_code(status);
    for h in headers {
        resp.add_header(h);
    }
    let _ = req.respond(resp);
    status
}

fn base64(bytes: &[u8]) -> String {
    const ABC: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for chunk in bytes.chunks(3) {
        let b = [chunk[0], *chunk.get(1).unwrap_or(&0), *chunk.get(2).unwrap_or(&0)];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(ABC[(n >> (18 - 6 * i)) as usize & 63] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}
