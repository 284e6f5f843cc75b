//! The one outbound HTTP client: callbacks to the platform (and, in poll mode,
//! the server it polls). ureq with keep-alive, bounded timeouts and a bounded
//! read of each answer; TLS through rustls on Linux, the system's on macOS.
//! Redirects are not followed: a signed post goes where it was addressed.

use std::io::Read;
use std::time::Duration;

pub struct Client {
    agent: ureq::Agent,
}

/// What came back from one request.
pub enum Answer {
    /// The status and `Retry-After` in seconds if given.
    Status { status: u16, retry_after: Option<Duration> },
    /// No HTTP answer: connection refused, timeout, TLS failure, …
    Failed(String),
}

impl Client {
    pub fn new(timeout: Duration) -> Client {
        let config = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .max_redirects(0)
            .timeout_connect(Some(Duration::from_secs(10).min(timeout)))
            .timeout_global(Some(timeout))
            .max_idle_connections_per_host(4)
            .user_agent(concat!("aion-connector/", env!("CARGO_PKG_VERSION")))
            .build();
        Client { agent: config.into() }
    }

    pub fn post(&self, url: &str, headers: &[(String, String)], body: &[u8]) -> Answer {
        let mut req = self.agent.post(url).header("Content-Type", "application/json");
        for (k, v) in headers {
            req = req.header(k, v);
        }
        finish(req.send(body))
    }
}

fn finish(result: Result<ureq::http::Response<ureq::Body>, ureq::Error>) -> Answer {
    match result {
        Ok(mut resp) => {
            let status = resp.status().as_u16();
            let retry_after = resp
                .headers()
                .get("retry-after")
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.trim().parse::<u64>().ok())
                .map(Duration::from_secs);
            // Reading the answer to its end (up to 1 MiB) lets the connection be reused.
            let _ = std::io::copy(&mut resp.body_mut().as_reader().take(1 << 20), &mut std::io::sink());
            Answer::Status { status, retry_after }
        }
        Err(e) => Answer::Failed(e.to_string()),
    }
}
