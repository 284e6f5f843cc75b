//! The checks that go over a socket: the port (free, or ours), the origins of
//! spooled callback posts, the Aion lease socket. Each connect and read has a
//! short timeout.

use super::Finding;
use crate::config::Config;
use crate::delivery::{client, outbox};
use crate::text::redact_userinfo;
use std::io::{self, Read, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::path::Path;
use std::time::Duration;

const CONNECT: Duration = Duration::from_secs(3);
const ANSWER: Duration = Duration::from_secs(5);

/// The config's host:port: free (a bind succeeds), or taken by an
/// aion-connector that accepts this config's first token.
pub fn port(config: &Config) -> Finding {
    let addr = format!("{}:{}", config.host, config.port);
    if config.port == 0 {
        return Finding::skip("port", format!("{addr}: port 0, the system picks a free port at each start"));
    }
    let addrs: Vec<SocketAddr> = match (config.host.as_str(), config.port).to_socket_addrs() {
        Ok(a) => a.collect(),
        Err(e) => {
            return Finding::fail(
                "port",
                format!("cannot resolve host {:?}: {e}", config.host),
                "set \"host\" to an address of this machine: 127.0.0.1 (local only) or 0.0.0.0 (all)",
            );
        }
    };
    match TcpListener::bind(addrs.as_slice()) {
        Ok(_) => Finding::ok("port", format!("{addr} is free")),
        Err(e) if e.kind() == io::ErrorKind::AddrInUse => who_answers(&addr, &addrs, config),
        Err(e) if e.kind() == io::ErrorKind::PermissionDenied => Finding::fail(
            "port",
            format!("cannot bind {addr}: {e}"),
            "use a \"port\" of 1024 or more (or give the binary CAP_NET_BIND_SERVICE)",
        ),
        Err(e) if e.kind() == io::ErrorKind::AddrNotAvailable => Finding::fail(
            "port",
            format!("cannot bind {addr}: {} is not an address of this machine", config.host),
            "set \"host\" to 127.0.0.1 (local only), 0.0.0.0 (all) or an address `ip addr` lists",
        ),
        Err(e) => Finding::fail("port", format!("cannot bind {addr}: {e}"), "see the message"),
    }
}

/// The port is taken: by an aion-connector serving this config (OK), or by
/// something else. The token goes only to what answers `/healthz` like us.
fn who_answers(addr: &str, addrs: &[SocketAddr], config: &Config) -> Finding {
    let taken = |what: String| {
        Finding::fail(
            "port",
            format!("{addr} is taken by {what}"),
            format!(
                "stop it (`ss -ltnp 'sport = :{}'` names it), or set another \"port\" in the config",
                config.port
            ),
        )
    };
    let Some(stream) = addrs.iter().find_map(|a| TcpStream::connect_timeout(&reachable(*a), CONNECT).ok())
    else {
        return taken("a program that does not accept connections".into());
    };
    let health = exchange(stream, "GET", "/healthz", "");
    let ours = matches!(&health, Ok((200, v)) if v.get("ok") == Some(&serde_json::Value::Bool(true)));
    if !ours {
        return taken("another program (not an aion-connector)".into());
    }
    let Some(project) = config.projects.first() else { return taken("an aion-connector".into()) };
    let body = serde_json::json!({ "v": 1, "action": "ping", "token": project.token.0 }).to_string();
    let pong = addrs
        .iter()
        .find_map(|a| TcpStream::connect_timeout(&reachable(*a), CONNECT).ok())
        .map(|s| exchange(s, "POST", "/", &body));
    match pong {
        Some(Ok((200, v))) if v.get("v") == Some(&serde_json::json!(1)) => Finding::ok(
            "port",
            format!(
                "{addr} is served by aion-connector {} (up {} s), which takes this config's token",
                v.get("version").and_then(|v| v.as_str()).unwrap_or("?"),
                v.get("uptime").and_then(|v| v.as_u64()).unwrap_or(0)
            ),
        ),
        Some(Ok((403, _))) => taken(format!(
            "an aion-connector that refuses the token of projects.{} (another config)",
            project.id
        )),
        _ => taken("a program that answers /healthz but not the ping".into()),
    }
}

/// Where to connect for a listening address: the loopback for a wildcard.
fn reachable(a: SocketAddr) -> SocketAddr {
    match a.ip() {
        IpAddr::V4(ip) if ip.is_unspecified() => SocketAddr::new(Ipv4Addr::LOCALHOST.into(), a.port()),
        IpAddr::V6(ip) if ip.is_unspecified() => SocketAddr::new(Ipv6Addr::LOCALHOST.into(), a.port()),
        _ => a,
    }
}

/// One HTTP/1.1 request with `Connection: close`; the status and the JSON body.
fn exchange(
    mut stream: TcpStream,
    method: &str,
    path: &str,
    body: &str,
) -> io::Result<(u16, serde_json::Value)> {
    stream.set_read_timeout(Some(ANSWER))?;
    stream.set_write_timeout(Some(ANSWER))?;
    let host = stream.peer_addr()?;
    // One write: the request goes out whole, in one segment.
    let request = format!(
        "{method} {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(request.as_bytes())?;
    let mut answer = Vec::new();
    stream.take(64 << 10).read_to_end(&mut answer)?;
    let text = String::from_utf8_lossy(&answer);
    let bad = || io::Error::new(io::ErrorKind::InvalidData, "not an HTTP answer");
    let (head, body) = text.split_once("\r\n\r\n").ok_or_else(bad)?;
    let status = head.split(' ').nth(1).and_then(|s| s.parse().ok()).ok_or_else(bad)?;
    Ok((status, serde_json::from_str(body).unwrap_or(serde_json::Value::Null)))
}

/// Each distinct origin of the posts waiting in the spool: a TCP connect.
pub fn callbacks(spool: &Path) -> Vec<Finding> {
    if !spool.is_dir() {
        return vec![Finding::ok("callbacks", format!("no spool at {}: nothing waiting", spool.display()))];
    }
    let streams = match outbox::undelivered(spool) {
        Ok(s) => s,
        Err(e) => {
            return vec![Finding::warn(
                "callbacks",
                format!("cannot read the spool {}: {e}", spool.display()),
                "run doctor as the user the connector runs as, or as root",
            )];
        }
    };
    // origin → (posts, streams, a URL to show)
    let mut origins: Vec<((String, u16), usize, usize, String)> = Vec::new();
    let mut out = Vec::new();
    for (id, urls) in &streams {
        let mut counted: Vec<(String, u16)> = Vec::new();
        for url in urls {
            let Some(origin) = client::http_origin(url) else {
                out.push(Finding::warn(
                    "callbacks",
                    format!("stream {id} has a post to a URL that is not http(s): {}", redact_userinfo(url)),
                    "none needed: it is skipped",
                ));
                continue;
            };
            let new_stream = !counted.contains(&origin);
            if new_stream {
                counted.push(origin.clone());
            }
            match origins.iter_mut().find(|(o, ..)| *o == origin) {
                Some((_, posts, n, _)) => {
                    *posts += 1;
                    *n += usize::from(new_stream);
                }
                None => origins.push((origin, 1, 1, redact_userinfo(url))),
            }
        }
    }
    if origins.is_empty() && out.is_empty() {
        out.push(Finding::ok("callbacks", format!("nothing waiting in {}", spool.display())));
    }
    for ((host, port), posts, n, url) in origins {
        let what = format!("{posts} post(s) of {n} run(s) waiting for {url}");
        let shown = if host.contains(':') { format!("[{host}]:{port}") } else { format!("{host}:{port}") };
        out.push(match connect_any(&host, port) {
            Ok(()) => Finding::ok("callbacks", format!("{shown} reachable ({what})")),
            Err(e) => Finding::fail(
                "callbacks",
                format!("{shown} unreachable: {e} ({what})"),
                "the platform must be up and reachable from here; posts are retried for \
                 limits.deliverySeconds, then dropped",
            ),
        });
    }
    out
}

fn connect_any(host: &str, port: u16) -> io::Result<()> {
    let mut last = io::Error::new(io::ErrorKind::NotFound, "the name has no address");
    for addr in (host, port).to_socket_addrs()? {
        match TcpStream::connect_timeout(&addr, CONNECT) {
            Ok(_) => return Ok(()),
            Err(e) => last = e,
        }
    }
    Err(last)
}

/// The Aion lease socket: `lease.socket`, else the default when it exists
/// (or when an agent has `leaseApps`).
pub fn lease(config: Option<&Config>) -> Finding {
    let configured = config.and_then(|c| c.lease.socket.clone());
    let wanted =
        config.is_some_and(|c| c.projects.iter().any(|p| p.agents.iter().any(|a| !a.lease_apps.is_empty())));
    let explicit = configured.is_some();
    let socket = configured.unwrap_or_else(crate::lease::default_socket);
    if !explicit && !wanted && !socket.exists() {
        return Finding::skip(
            "lease",
            format!("no lease.socket configured, no Aion socket at {}", socket.display()),
        );
    }
    match std::os::unix::net::UnixStream::connect(&socket) {
        Ok(_) => Finding::ok("lease", format!("Aion's socket {} accepts connections", socket.display())),
        Err(e) => Finding::warn(
            "lease",
            format!("cannot connect to the Aion socket {}: {e}", socket.display()),
            "start Aion (AI protection) as this user, or fix lease.socket; runs go on without leases",
        ),
    }
}
