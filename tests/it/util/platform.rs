//! Agent runs: a fake platform (the callback server) recording the signed
//! posts, the checks every run's posts must pass, and the fake acpx's log.

use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use serde_json::Value;

use super::{DEADLINE, hmac_sha256};

/// The fake platform's record of one POST it received.
#[derive(Clone, Debug)]
pub struct Post {
    pub path: String,
    pub signature: Option<String>,
    pub content_type: Option<String>,
    pub body: Vec<u8>,
    /// What the platform answered.
    pub status: u16,
}

impl Post {
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| {
            panic!("post body is not JSON ({e}): {}", String::from_utf8_lossy(&self.body))
        })
    }
    pub fn seq(&self) -> u64 {
        self.json()["seq"].as_u64().unwrap_or_else(|| panic!("post without seq: {:?}", self.json()))
    }
    pub fn closes(&self) -> bool {
        self.path.ends_with("/internal/agent-complete") || self.path.ends_with("/internal/agent-error")
    }
}

/// How the fake platform answers; shared with its thread.
#[derive(Default)]
struct PlatformRules {
    /// Answer 503 to this many requests first.
    fail_first: usize,
    /// Answer 400 to every post whose body has this seq.
    reject_seq: Option<u64>,
}

/// A fake platform (callback server) on 127.0.0.1, tiny_http in a thread,
/// recording every POST (path, X-Aion-Signature, Content-Type, body, answer).
pub struct Platform {
    pub port: u16,
    posts: Arc<Mutex<Vec<Post>>>,
    stop: Arc<std::sync::atomic::AtomicBool>,
    thread: Option<thread::JoinHandle<()>>,
}

impl Platform {
    /// On an ephemeral port.
    pub fn start() -> Platform {
        Platform::start_on(0)
    }

    /// On `port` (0: ephemeral); retries a moment if the port is still busy.
    pub fn start_on(port: u16) -> Platform {
        Platform::start_with(port, 0, None)
    }

    /// Answers 503 to the first `fail_first` requests and 400 to posts with `reject_seq`.
    pub fn start_with(port: u16, fail_first: usize, reject_seq: Option<u64>) -> Platform {
        let started = Instant::now();
        let server = loop {
            match tiny_http::Server::http(("127.0.0.1", port)) {
                Ok(s) => break s,
                Err(e) if started.elapsed() > DEADLINE => panic!("fake platform on port {port}: {e}"),
                Err(_) => thread::sleep(Duration::from_millis(50)),
            }
        };
        let port = server.server_addr().to_ip().expect("an IP listener").port();
        let posts: Arc<Mutex<Vec<Post>>> = Arc::default();
        let rules = Arc::new(Mutex::new(PlatformRules { fail_first, reject_seq }));
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let thread = {
            let (posts, rules, stop) = (posts.clone(), rules.clone(), stop.clone());
            thread::spawn(move || {
                while !stop.load(Ordering::SeqCst) {
                    let mut req = match server.recv_timeout(Duration::from_millis(50)) {
                        Ok(Some(r)) => r,
                        Ok(None) => continue,
                        Err(_) => break,
                    };
                    let header = |name: &'static str| {
                        req.headers()
                            .iter()
                            .find(|h| h.field.equiv(name))
                            .map(|h| h.value.as_str().to_string())
                    };
                    let is_post = req.method() == &tiny_http::Method::Post;
                    let signature = header("X-Aion-Signature");
                    let content_type = header("Content-Type");
                    let path = req.url().to_string();
                    let mut body = Vec::new();
                    let _ = req.as_reader().read_to_end(&mut body);
                    let status = {
                        let mut r = rules.lock().unwrap();
                        let seq = serde_json::from_slice::<Value>(&body).ok().and_then(|v| v["seq"].as_u64());
                        if r.fail_first > 0 {
                            r.fail_first -= 1;
                            503
                        } else if !is_post {
                            405
                        } else if r.reject_seq.is_some() && seq == r.reject_seq {
                            400
                        } else {
                            200
                        }
                    };
                    posts.lock().unwrap().push(Post { path, signature, content_type, body, status });
                    let _ = req.respond(tiny_http::Response::from_string("{}").with_status_code(status));
                }
            })
        };
        Platform { port, posts, stop, thread: Some(thread) }
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Every request received, in arrival order.
    pub fn posts(&self) -> Vec<Post> {
        self.posts.lock().unwrap().clone()
    }

    /// The posts answered 200, in arrival order.
    pub fn delivered(&self) -> Vec<Post> {
        self.posts().into_iter().filter(|p| p.status == 200).collect()
    }

    /// The delivered posts of `session`, once its closing post is delivered
    /// (panics after `within`).
    pub fn wait_closed_within(&self, session: &str, within: Duration) -> Vec<Post> {
        let start = Instant::now();
        loop {
            let mine: Vec<Post> =
                self.delivered().into_iter().filter(|p| p.json()["sessionId"] == session).collect();
            if mine.iter().any(Post::closes) {
                return mine;
            }
            if start.elapsed() > within {
                let got: Vec<String> = self
                    .posts()
                    .iter()
                    .map(|p| format!("{} {}", p.status, String::from_utf8_lossy(&p.body)))
                    .collect();
                panic!("session {session}: no closing post within {within:?}; received:\n{}", got.join("\n"));
            }
            thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn wait_closed(&self, session: &str) -> Vec<Post> {
        self.wait_closed_within(session, DEADLINE)
    }

    fn shutdown(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for Platform {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// A port on 127.0.0.1 that was free a moment ago (for a platform that is "down" first).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// Checks what every post of a run must be: signed with `key`, JSON, at the
/// path of its kind, seq 0.. without gaps or repeats, exactly one closing post,
/// last. Returns the bodies.
pub fn check_run(posts: &[Post], key: &str) -> Vec<Value> {
    let mut bodies = Vec::new();
    for (i, p) in posts.iter().enumerate() {
        assert_eq!(p.signature.as_deref(), Some(hmac_sha256(key, &p.body).as_str()), "signature of post {i}");
        assert_eq!(p.content_type.as_deref(), Some("application/json"), "content type of post {i}");
        let v = p.json();
        assert_eq!(v["seq"].as_u64(), Some(i as u64), "post {i} out of order: {v}");
        let kind = p.path.rsplit('/').next().unwrap();
        assert!(
            ["agent-stream", "agent-event", "agent-display", "agent-complete", "agent-error"].contains(&kind)
                && p.path.ends_with(&format!("/internal/{kind}")),
            "path {}",
            p.path
        );
        assert_eq!(p.closes(), i + 1 == posts.len(), "post {i} ({}) closes out of place", p.path);
        bodies.push(v);
    }
    assert!(posts.last().is_some_and(Post::closes), "the run was not closed");
    bodies
}

/// A temp bin dir holding the fake acpx (as `acpx`).
pub fn fake_acpx_bin(dir: &Path) -> PathBuf {
    let bin = dir.join("bin");
    std::fs::create_dir_all(&bin).unwrap();
    let fake = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/fake-acpx");
    std::os::unix::fs::symlink(&fake, bin.join("acpx")).unwrap();
    bin
}

/// `first:$PATH`.
pub fn path_with(first: &Path) -> String {
    let rest = std::env::var("PATH").unwrap_or_default();
    format!("{}:{rest}", first.display())
}

/// One invocation of the fake acpx, from its log.
#[derive(Clone, Debug)]
pub struct AcpxCall {
    pub pid: i32,
    pub pgid: i32,
    pub start_ns: u128,
    pub run_id: String,
    pub cwd: String,
    pub probe: String,
    pub argv: Vec<String>,
}

/// The fake acpx's log (empty if it does not exist yet).
pub fn acpx_calls(log: &Path) -> Vec<AcpxCall> {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    text.lines()
        .filter(|l| !l.is_empty())
        .map(|l| {
            let f: Vec<&str> = l.splitn(7, '\x1e').collect();
            assert_eq!(f.len(), 7, "bad fake acpx log line {l:?}");
            AcpxCall {
                pid: f[0].parse().unwrap(),
                pgid: f[1].parse().unwrap(),
                start_ns: f[2].parse().unwrap(),
                run_id: f[3].to_string(),
                cwd: f[4].to_string(),
                probe: f[5].to_string(),
                argv: f[6].split('\x1f').map(str::to_string).collect(),
            }
        })
        .collect()
}
