//! The one outbound HTTP client: callbacks to the platform (and, in poll mode,
//! the server it polls). ureq with keep-alive, bounded timeouts and a bounded
//! read of each answer; TLS through rustls on Linux, the system's on macOS.
//! Redirects are not followed: a signed post goes where it was addressed.

use std::collections::HashMap;
use std::io::Read;
use std::net::{IpAddr, SocketAddr};
use std::sync::Mutex;
use std::time::{Duration, Instant};
use ureq::unversioned::resolver::{DefaultResolver, ResolvedSocketAddrs, Resolver};
use ureq::unversioned::transport::{DefaultConnector, NextTimeout};

/// `http[s]://host[:port][/…]` with a host and, if given, a port 1-65535; no
/// whitespace or control characters anywhere.
pub fn is_http_url(url: &str) -> bool {
    let lower = url.to_ascii_lowercase();
    let Some(rest) = lower.strip_prefix("http://").or_else(|| lower.strip_prefix("https://")) else {
        return false;
    };
    if url.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return false;
    }
    let authority = &rest[..rest.find(['/', '?', '#']).unwrap_or(rest.len())];
    let host_port = authority.rsplit_once('@').map_or(authority, |(_, hp)| hp);
    let (host, port) = match host_port.strip_prefix('[') {
        // [v6]:port
        Some(v6) => match v6.split_once(']') {
            Some((h, p)) => (h, p.strip_prefix(':')),
            None => return false,
        },
        None => match host_port.rsplit_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (host_port, None),
        },
    };
    !host.is_empty() && port.is_none_or(|p| p.parse::<u16>().is_ok_and(|n| n > 0))
}

pub struct Client {
    agent: ureq::Agent,
}

/// What came back from one request.
pub enum Answer {
    /// The status, `Retry-After` in seconds if given, and up to 1 MiB of body.
    Status { status: u16, retry_after: Option<Duration>, body: Vec<u8> },
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
        let agent = ureq::Agent::with_parts(config, DefaultConnector::new(), CachingResolver::default());
        Client { agent }
    }

    pub fn post(&self, url: &str, headers: &[(String, String)], body: &[u8]) -> Answer {
        let mut req = self.agent.post(url).header("Content-Type", "application/json");
        for (k, v) in headers {
            req = req.header(k, v);
        }
        finish(req.send(body))
    }

    pub fn get(&self, url: &str, headers: &[(String, String)]) -> Answer {
        let mut req = self.agent.get(url);
        for (k, v) in headers {
            req = req.header(k, v);
        }
        finish(req.call())
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
            let mut body = Vec::new();
            let _ = resp.body_mut().as_reader().take(1 << 20).read_to_end(&mut body);
            Answer::Status { status, retry_after, body }
        }
        Err(e) => Answer::Failed(e.to_string()),
    }
}

/// ureq looks a host up before every request, on a thread of its own when a
/// timeout is set: one thread per post, measured as most of a post's CPU.
/// IP literals need no lookup; names are looked up once a minute.
#[derive(Debug, Default)]
struct CachingResolver {
    inner: DefaultResolver,
    cache: Mutex<HashMap<String, (Instant, ResolvedSocketAddrs)>>,
}

const RESOLVE_TTL: Duration = Duration::from_secs(60);

impl Resolver for CachingResolver {
    fn resolve(
        &self,
        uri: &ureq::http::Uri,
        config: &ureq::config::Config,
        timeout: NextTimeout,
    ) -> Result<ResolvedSocketAddrs, ureq::Error> {
        let host = uri.host().unwrap_or("").trim_start_matches('[').trim_end_matches(']');
        let port = uri.port_u16().unwrap_or(if uri.scheme_str() == Some("https") { 443 } else { 80 });
        if let Ok(ip) = host.parse::<IpAddr>() {
            let mut addrs = self.empty();
            addrs.push(SocketAddr::new(ip, port));
            return Ok(addrs);
        }
        let key = format!("{host}:{port}");
        let cached = self.cache.lock().unwrap_or_else(|p| p.into_inner()).get(&key).cloned();
        if let Some((_, addrs)) = cached.filter(|(at, _)| at.elapsed() < RESOLVE_TTL) {
            return Ok(addrs);
        }
        let addrs = self.inner.resolve(uri, config, timeout)?;
        self.cache.lock().unwrap_or_else(|p| p.into_inner()).insert(key, (Instant::now(), addrs.clone()));
        Ok(addrs)
    }
}
