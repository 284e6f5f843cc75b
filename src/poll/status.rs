//! Poll mode's local socket: `<stateDir>/poll.sock`
//! ([`local::POLL_SOCKET_FILE`], framed by [`crate::net::local`], mode 0600)
//! answers `{"op":"status"}` for `aion-connector status`, like push mode's
//! `mcp.sock`; being able to connect is the authentication. Nothing else is
//! served there (the sessions have no MCP tools).
//!
//! Threads: those of [`crate::net::local`]; the handler runs on the
//! connection's thread and takes each part's snapshot under that part's lock.

use super::Runtime;
use crate::delivery::outbox::{origin, origin_label};
use crate::delivery::report::secs;
use crate::logging::info;
use crate::net::local::{self, Unkeyed, refusal};
use serde_json::{Value, json};
use std::io;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Instant;

/// Binds `<state>/poll.sock` and serves it until the server is stopped.
pub(super) fn start(state: &Path, rt: Arc<Runtime>) -> io::Result<local::Server> {
    let path = state.join(local::POLL_SOCKET_FILE);
    let fail = |e: io::Error| io::Error::new(e.kind(), format!("{}: {e}", path.display()));
    let listener = local::bind(&path).map_err(fail)?;
    local::serve(listener, &path, Arc::new(move |line: &[u8]| handle(&rt, line))).map_err(fail)
}

fn handle(rt: &Runtime, line: &[u8]) -> Value {
    let t0 = Instant::now();
    match serde_json::from_slice::<Unkeyed>(line) {
        Ok(Unkeyed::Status {}) => {
            let answer = rt.status();
            info!("local status ms={:.2}", t0.elapsed().as_secs_f64() * 1e3);
            answer
        }
        Err(e) => {
            info!("local: bad request ({:?})", e.classify());
            refusal("bad_request", &format!("poll mode answers only {{\"op\":\"status\"}} here: {e}"))
        }
    }
}

impl Runtime {
    /// The `status` answer: `{"ok":true,"mode":"poll","version","pid",
    /// "uptimeSeconds","server","stateDir","maxConcurrentSessions",
    /// "sessions":[…],"outbox":{…},"lease":…}`. A session is listed until its
    /// closing event is queued; what it has not delivered by then stays in
    /// the outbox's backlog.
    pub(super) fn status(&self) -> Value {
        let mut sessions: Vec<Value> = self
            .sessions()
            .iter()
            .map(|(id, s)| {
                let posts = s.posts.load(Ordering::SeqCst);
                let pending = self.outbox.backlog(&s.stream);
                json!({
                    "id": id,
                    "state": if s.terminating.load(Ordering::SeqCst) { "terminating" } else { "running" },
                    "pid": s.pid,
                    "ageSeconds": secs(s.since.elapsed()),
                    "posts": posts,
                    "delivered": posts.saturating_sub(pending),
                    "pending": pending,
                })
            })
            .collect();
        sessions.sort_by(|a, b| a["id"].as_str().cmp(&b["id"].as_str()));
        json!({
            "ok": true,
            "mode": "poll",
            "version": crate::version::VERSION,
            "pid": std::process::id(),
            "uptimeSeconds": self.started.elapsed().as_secs(),
            "server": origin_label(&origin(&self.config.server_url)),
            "stateDir": self.state.display().to_string(),
            "maxConcurrentSessions": self.config.max_sessions,
            "sessions": sessions,
            "outbox": crate::delivery::report::outbox(&self.outbox),
            "lease": self.leases.as_ref().map(|l| l.snapshot().json()),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_server_is_shown_as_its_origin_only() {
        let shown = |url: &str| origin_label(&origin(url)).to_string();
        assert_eq!(shown("https://agent:s3cret@Example.COM/base/path?t=1"), "https://example.com:443");
        assert_eq!(shown("http://127.0.0.1:8080"), "http://127.0.0.1:8080");
        assert_eq!(shown("http://[::1]:9/x"), "http://[::1]:9");
        assert!(!shown("http://u:p@h:99999/x").contains("p@"));
    }
}
