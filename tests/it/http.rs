//! The HTTP server under attack and on a bad day: strict framing (request
//! smuggling), per-peer and total caps, the head timeout for connections
//! without an authenticated request, many idle and slowloris connections,
//! the open-file limit, and a log that cannot be forged, flooded or blocked.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Shutdown, SocketAddrV4, TcpStream};
use std::os::fd::AsRawFd;
use std::process::{Child, Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use crate::util::*;
use serde_json::{Value, json};

const TOKEN: &str = "tok-http-SECRET-0042";

fn start(tmp: &TempDir, limits: Value) -> Server {
    let dir = tmp.join("p");
    std::fs::create_dir_all(&dir).unwrap();
    let cfg =
        config(json!({"p": {"token": TOKEN, "dir": dir.to_str().unwrap()}}), Some(json!({"limits": limits})));
    Server::start(tmp.path(), &cfg)
}

fn ping_body() -> String {
    request_body(TOKEN, "ping", json!({}))
}

/// A keep-alive connection that made an authenticated ping.
fn trusted(addr: &str) -> BufReader<TcpStream> {
    let mut s = connect(addr);
    s.write_all(&post_request(addr, &ping_body(), false)).unwrap();
    let mut r = BufReader::new(s);
    let resp = read_response(&mut r).unwrap();
    assert_eq!(resp.status, 200, "{}", resp.text());
    r
}

/// Another ping on a kept connection.
fn ping_again(r: &mut BufReader<TcpStream>, addr: &str) -> u16 {
    r.get_mut().write_all(&post_request(addr, &ping_body(), false)).unwrap();
    read_response(r).unwrap().status
}

/// True once the server has closed `s` (end of stream or reset), false if it
/// sent something else; panics if nothing happens within DEADLINE.
fn closed_by_server(s: &mut TcpStream) -> bool {
    s.set_read_timeout(Some(DEADLINE)).unwrap();
    let mut rest = Vec::new();
    match s.read_to_end(&mut rest) {
        Ok(_) => rest.is_empty(),
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => true,
        Err(e) => panic!("the server neither closed nor answered within {DEADLINE:?}: {e}"),
    }
}

/// A TCP connection to `addr` from the local address `src` (all of 127/8 is
/// loopback on Linux, so 127.0.0.2 is another peer of the same machine).
fn connect_from(src: &str, addr: &str) -> TcpStream {
    use nix::sys::socket::{AddressFamily, SockFlag, SockType, SockaddrIn, bind, connect, socket};
    let fd = socket(AddressFamily::Inet, SockType::Stream, SockFlag::SOCK_CLOEXEC, None).unwrap();
    let from: SocketAddrV4 = format!("{src}:0").parse().unwrap();
    bind(fd.as_raw_fd(), &SockaddrIn::from(from)).unwrap();
    let to: SocketAddrV4 = addr.parse().unwrap();
    connect(fd.as_raw_fd(), &SockaddrIn::from(to)).unwrap();
    let s = TcpStream::from(fd);
    s.set_read_timeout(Some(DEADLINE)).unwrap();
    s.set_write_timeout(Some(DEADLINE)).unwrap();
    s
}

/// Lets this test process open `n` more descriptors (or skips with false).
fn room_for_fds(n: u64) -> bool {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE).unwrap();
    if soft < n + 256 && hard > soft {
        let _ = setrlimit(Resource::RLIMIT_NOFILE, hard, hard);
    }
    getrlimit(Resource::RLIMIT_NOFILE).unwrap().0 >= n + 256
}

// ------------------------------------------------------------ framing

#[test]
fn framing_faults_are_400_and_close_the_connection() {
    let tmp = TempDir::new("framing");
    let srv = start(&tmp, json!({}));
    let ping = ping_body();
    let smuggled = String::from_utf8(post_request(&srv.addr, &ping, false)).unwrap();
    let cases: Vec<(&str, String)> = vec![
        (
            "two Content-Length",
            format!(
                "POST / HTTP/1.1\r\nContent-Length: {n}\r\nContent-Length: 0\r\n\r\n{ping}",
                n = ping.len()
            ),
        ),
        (
            "two equal Content-Length",
            format!(
                "POST / HTTP/1.1\r\nContent-Length: {n}\r\nContent-Length: {n}\r\n\r\n{ping}",
                n = ping.len()
            ),
        ),
        (
            "a signed Content-Length",
            format!("POST / HTTP/1.1\r\nContent-Length: +{}\r\n\r\n{ping}", ping.len()),
        ),
        ("a Content-Length list", format!("POST / HTTP/1.1\r\nContent-Length: 3, 3\r\n\r\nabc{smuggled}")),
        (
            "chunked then identity",
            format!(
                "POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: identity\r\n\r\n{:x}\r\n{ping}\r\n0\r\n\r\n",
                ping.len()
            ),
        ),
        (
            "Transfer-Encoding beside Content-Length",
            format!(
                "POST / HTTP/1.1\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n{smuggled}"
            ),
        ),
        (
            "a coding before chunked",
            format!("POST / HTTP/1.1\r\nTransfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n{smuggled}"),
        ),
        (
            "chunked not last",
            format!("POST / HTTP/1.1\r\nTransfer-Encoding: chunked, identity\r\n\r\n0\r\n\r\n{smuggled}"),
        ),
        (
            "a signed chunk size",
            "POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n+3\r\nabc\r\n0\r\n\r\n".to_string(),
        ),
        ("chunked in HTTP/1.0", "POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n".to_string()),
    ];
    for (what, request) in &cases {
        let mut s = connect(&srv.addr);
        s.write_all(request.as_bytes()).unwrap();
        let mut r = BufReader::new(s.try_clone().unwrap());
        let resp = read_response(&mut r).unwrap_or_else(|e| panic!("{what}: no answer: {e}"));
        assert_eq!(resp.status, 400, "{what}: {}", resp.head);
        assert_eq!(resp.text(), r#"{"error":"bad request"}"#, "{what}");
        assert!(resp.head.contains("Connection: close"), "{what}: {}", resp.head);
        // Nothing after it: no smuggled request was answered, the connection is closed.
        let mut rest = Vec::new();
        match r.read_to_end(&mut rest) {
            Ok(_) => {
                assert!(rest.is_empty(), "{what}: more after the 400: {:?}", String::from_utf8_lossy(&rest))
            }
            Err(e) => assert_eq!(e.kind(), std::io::ErrorKind::ConnectionReset, "{what}: {e}"),
        }
    }
    // A single plain Content-Length and a single chunked still work.
    let (status, _) = srv.post(&ping);
    assert_eq!(status, 200);
    let chunked = format!(
        "POST / HTTP/1.1\r\nTransfer-Encoding: Chunked\r\nConnection: close\r\n\r\n{:x}\r\n{ping}\r\n0\r\n\r\n",
        ping.len()
    );
    assert_eq!(raw(&srv.addr, chunked.as_bytes()).unwrap().status, 200);
}

// ------------------------------------------------------------ the log

/// No line of `log` was made by a client: the forged text only ever appears
/// escaped, inside a line the connector wrote.
fn assert_not_forged(log: &str) {
    for line in log.lines() {
        assert!(!line.starts_with("2001-01-01"), "a forged line:\n{log}");
        assert!(!line.starts_with("[ERROR] FORGED"), "a forged line:\n{log}");
        if line.contains("FORGED") {
            assert!(line.contains("\\n"), "the newline was not escaped: {line}");
        }
    }
}

#[test]
fn log_lines_cannot_be_forged_by_a_poll_server() {
    let server = PollServer::start(TOKEN);
    let dir = TempDir::new("forge-poll");
    let url = server.url();
    let state = dir.join("state");
    let env = [
        ("SERVER_URL", url.as_str()),
        ("AGENT_TOKEN", TOKEN),
        ("POLL_INTERVAL", "100"),
        ("OUTPUT_FLUSH_INTERVAL", "200"),
        ("STATUS_INTERVAL", "60000"),
        ("AION_SESSION_COMMAND", r#"["sh","-c"]"#),
        ("AION_STATE_DIR", state.to_str().unwrap()),
    ];
    let agent = PollAgent::start(&[], dir.path(), &env);
    let forged = "x\n2001-01-01T00:00:00.000Z [ERROR] FORGED\r\n[ERROR] FORGED\u{0}";
    server.push(json!({"id": "f1", "type": "start_session", "sessionId": forged, "args": ["echo hi"]}));
    server.push(json!({"id": "f2", "type": forged, "sessionId": "s2"}));
    server.push(json!({"id": "f3", "type": "command", "sessionId": forged, "input": "x"}));
    let log = agent.wait_stderr("the forged session's lines", DEADLINE, |s| {
        s.lines().filter(|l| l.contains("FORGED")).count() >= 3
    });
    assert_not_forged(&log);
    assert!(log.contains("\\u0000"), "{log}");
}

#[test]
fn log_lines_cannot_be_forged_by_a_request() {
    let tmp = TempDir::new("forge-push");
    let srv = start(&tmp, json!({}));
    let forged = "ping\n2001-01-01T00:00:00.000Z [ERROR] FORGED";
    srv.post(&request_body(TOKEN, forged, json!({})));
    srv.post(&request_body(TOKEN, "invoke", json!({"agent": "x", "prompt": "p", "session": forged})));
    // A header with a bare CR and a control character: the request is refused,
    // its text is not logged.
    let bad = b"POST / HTTP/1.1\r\nX-Id: a\rb\x01[ERROR] FORGED\r\nContent-Length: 0\r\n\r\n";
    assert_eq!(raw(&srv.addr, bad).unwrap().status, 400);
    let log =
        srv.wait_stderr("3 answers logged", |s| s.lines().filter(|l| l.contains("status=")).count() >= 3);
    assert_not_forged(&log);
}

/// A server with stderr piped and not read until the caller says so.
struct Held {
    child: Child,
    addr: String,
    stderr: std::process::ChildStderr,
}

fn start_held(tmp: &TempDir, env: &[(&str, &str)], stderr: Stdio) -> (Child, String) {
    let dir = tmp.join("p");
    std::fs::create_dir_all(&dir).unwrap();
    // Floods of wrong tokens make log lines here: no failed-token limit (429).
    let limits = json!({"limits": {"failedTokensPerMinute": 0}});
    let cfg = config(json!({"p": {"token": TOKEN, "dir": dir.to_str().unwrap()}}), Some(limits));
    let path = tmp.join("aion.config.json");
    std::fs::write(&path, cfg).unwrap();
    let mut cmd = Command::new(BIN);
    cmd.arg(&path).current_dir(tmp.path()).stdin(Stdio::null()).stdout(Stdio::piped()).stderr(stderr);
    cmd.env("XDG_STATE_HOME", tmp.join("state")).env_remove("STATE_DIRECTORY").env_remove("JOURNAL_STREAM");
    for (k, v) in env {
        cmd.env(k, v);
    }
    let mut child = cmd.spawn().unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap()).read_line(&mut line).unwrap();
    let addr =
        line.trim_end().strip_prefix("listening on ").unwrap_or_else(|| panic!("{line:?}")).to_string();
    (child, addr)
}

fn held(tmp: &TempDir) -> Held {
    let (mut child, addr) = start_held(tmp, &[], Stdio::piped());
    let stderr = child.stderr.take().unwrap();
    Held { child, addr, stderr }
}

#[test]
fn a_blocked_log_never_holds_up_requests_and_drops_are_counted() {
    let tmp = TempDir::new("logflood");
    let mut srv = held(&tmp);
    // Nobody reads stderr: the pipe fills after some hundred lines, then the
    // queue. Each of these answers is one log line.
    const N: usize = 20_000;
    let bad = request_body("wrong-token", "ping", json!({}));
    let s = connect(&srv.addr);
    let mut w = s.try_clone().unwrap();
    let addr = srv.addr.clone();
    let writer = thread::spawn(move || {
        let one = post_request(&addr, &bad, false);
        let batch: Vec<u8> = one.iter().copied().cycle().take(one.len() * 100).collect();
        for _ in 0..N / 100 {
            w.write_all(&batch).unwrap();
        }
    });
    let mut r = BufReader::new(s);
    for i in 0..N {
        let resp = read_response(&mut r).unwrap_or_else(|e| panic!("answer {i} of {N}: {e}"));
        assert_eq!(resp.status, 403);
    }
    writer.join().unwrap();
    // A fresh ping is answered while the log is still blocked.
    let started = Instant::now();
    let (status, _) = post(&srv.addr, &ping_body());
    assert_eq!(status, 200);
    assert!(started.elapsed() < DEADLINE);
    // Now read the log; stop the server; the log ends with its last line.
    let mut log = String::new();
    let reader = thread::spawn(move || {
        let _ = srv.stderr.read_to_string(&mut log);
        log
    });
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(srv.child.id() as i32), nix::sys::signal::SIGTERM)
        .unwrap();
    let status = wait_exit(&mut srv.child, DEADLINE).expect("exit after SIGTERM");
    assert!(status.success(), "{status:?}");
    let log = reader.join().unwrap();
    let written = log.lines().filter(|l| l.contains("status=403")).count();
    let dropped: usize = log
        .lines()
        .filter_map(|l| l.split("[WARN] log: ").nth(1))
        .filter_map(|rest| rest.split(' ').next()?.parse::<usize>().ok())
        .sum();
    assert!(dropped > 0, "nothing was dropped: the test did not fill the log queue");
    assert!(written + dropped >= N, "{written} written + {dropped} dropped < {N}: lines lost silently");
    assert!(written + dropped <= N + 3, "{written} written + {dropped} dropped");
    assert!(log.trim_end().ends_with("[INFO] stopped"), "the last lines were lost:\n{}", tail(&log));
}

fn tail(log: &str) -> String {
    let lines: Vec<&str> = log.lines().collect();
    lines[lines.len().saturating_sub(5)..].join("\n")
}

#[test]
fn lines_carry_journald_priorities_when_stderr_is_the_journal() {
    use std::os::unix::fs::MetadataExt;
    let tmp = TempDir::new("journal");
    let path = tmp.join("stderr.log");
    let file = std::fs::File::create(&path).unwrap();
    let meta = file.metadata().unwrap();
    let stream = format!("{}:{}", meta.dev(), meta.ino());
    let (mut child, addr) = start_held(&tmp, &[("JOURNAL_STREAM", &stream)], Stdio::from(file));
    post(&addr, &request_body("wrong", "ping", json!({})));
    post(&addr, &ping_body());
    assert_eq!(raw(&addr, b"BAD\r\n\r\n").unwrap().status, 400);
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(child.id() as i32), nix::sys::signal::SIGTERM).unwrap();
    wait_exit(&mut child, DEADLINE).expect("exit after SIGTERM");
    let log = std::fs::read_to_string(&path).unwrap();
    assert!(
        log.lines().any(|l| l.starts_with("<6>") && l.contains("[INFO] ") && l.contains("status=200")),
        "{log}"
    );
    assert!(
        log.lines().any(|l| l.starts_with("<6>") && l.contains("[INFO] failed token from 127.0.0.1 ")),
        "{log}"
    );
    assert!(log.lines().any(|l| l.starts_with("<4>") && l.contains("[WARN] http status=400")), "{log}");
    assert!(log.lines().all(|l| l.starts_with('<')), "{log}");
    // Another file: plain lines.
    let other = tmp.join("other.log");
    let (mut child, _) =
        start_held(&tmp, &[("JOURNAL_STREAM", &stream)], Stdio::from(std::fs::File::create(&other).unwrap()));
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(child.id() as i32), nix::sys::signal::SIGTERM).unwrap();
    wait_exit(&mut child, DEADLINE).expect("exit after SIGTERM");
    let log = std::fs::read_to_string(&other).unwrap();
    assert!(log.lines().count() >= 2 && log.lines().all(|l| l.starts_with("20")), "{log}");
}

#[test]
fn repeated_warnings_are_rate_limited_and_counted() {
    let tmp = TempDir::new("ratelimit");
    let srv = start(&tmp, json!({}));
    for _ in 0..20 {
        assert_eq!(raw(&srv.addr, b"NOT HTTP\r\n\r\n").unwrap().status, 400);
    }
    let what = "http status=400 peer=127.0.0.1 (bad request)";
    // The window is 10 s: its end says how many were not shown.
    let mut log = String::new();
    let seen = eventually(Duration::from_secs(30), || {
        log = srv.stderr();
        log.contains("[repeated 15 more time(s) in 10 s, not shown]")
    });
    assert!(seen, "no count of the suppressed lines:\n{log}");
    let shown = log.lines().filter(|l| l.ends_with(what)).count();
    assert_eq!(shown, 5, "{log}");
}

// ------------------------------------------------------------ connections

#[test]
fn one_peer_cannot_hold_more_than_its_share() {
    let tmp = TempDir::new("perpeer");
    let srv = start(&tmp, json!({"connectionsPerPeer": 3, "loopbackExempt": false}));
    let held: Vec<TcpStream> = (0..3).map(|_| connect_from("127.0.0.1", &srv.addr)).collect();
    let mut extra = connect_from("127.0.0.1", &srv.addr);
    let resp = read_response(&mut BufReader::new(extra.try_clone().unwrap())).unwrap();
    assert_eq!(resp.status, 429, "{}", resp.head);
    assert_eq!(resp.text(), r#"{"error":"too many connections from this address"}"#);
    assert!(closed_by_server(&mut extra));
    // Another address is another peer.
    let mut other = connect_from("127.0.0.2", &srv.addr);
    other.write_all(&post_request(&srv.addr, &ping_body(), true)).unwrap();
    assert_eq!(read_response(&mut BufReader::new(other)).unwrap().status, 200);
    // A place given back is usable again.
    drop(held);
    poll("a ping from 127.0.0.1 after its connections closed", || {
        let mut s = connect_from("127.0.0.1", &srv.addr);
        s.write_all(&post_request(&srv.addr, &ping_body(), true)).ok()?;
        (read_response(&mut BufReader::new(s)).ok()?.status == 200).then_some(())
    });
    srv.wait_stderr("the per-peer refusal", |s| {
        s.contains("127.0.0.1 holds 3 connections (limits.connectionsPerPeer)")
    });

    // Loopback is exempt by default (a reverse proxy on the same machine).
    let tmp = TempDir::new("perpeer-lo");
    let srv = start(&tmp, json!({"connectionsPerPeer": 3}));
    let _held: Vec<TcpStream> = (0..6).map(|_| connect(&srv.addr)).collect();
    let (status, _) = srv.post(&ping_body());
    assert_eq!(status, 200);
}

#[test]
fn connections_without_an_authenticated_request_get_the_head_timeout() {
    let tmp = TempDir::new("headtimeout");
    let srv = start(&tmp, json!({"headSeconds": 1, "idleSeconds": 60, "requestSeconds": 60}));
    let mut kept = trusted(&srv.addr);
    let mut silent = connect(&srv.addr);
    // Slowloris: a header byte every 100 ms, never done.
    let mut slow = connect(&srv.addr);
    slow.write_all(b"POST / HTTP/1.1\r\nX-Slow: ").unwrap();
    let mut dripper = slow.try_clone().unwrap();
    let dripping = thread::spawn(move || {
        let until = Instant::now() + DEADLINE;
        while Instant::now() < until && dripper.write_all(b"a").is_ok() {
            thread::sleep(Duration::from_millis(100));
        }
    });
    let resp = read_response(&mut BufReader::new(slow.try_clone().unwrap())).unwrap();
    assert_eq!(resp.status, 408, "{}", resp.head);
    assert_eq!(resp.text(), r#"{"error":"request timeout"}"#);
    let _ = slow.shutdown(Shutdown::Both);
    dripping.join().unwrap();
    assert!(closed_by_server(&mut silent), "the silent connection got an answer");
    // A refused request does not earn the idle timeout either.
    let mut refused = connect(&srv.addr);
    refused.write_all(&post_request(&srv.addr, &request_body("nope", "ping", json!({})), false)).unwrap();
    let mut r = BufReader::new(refused.try_clone().unwrap());
    assert_eq!(read_response(&mut r).unwrap().status, 403);
    let mut rest = Vec::new();
    assert_eq!(r.read_to_end(&mut rest).unwrap_or(0), 0, "{rest:?}");
    // The authenticated connection, as old as the silent one, still serves.
    assert_eq!(ping_again(&mut kept, &srv.addr), 200);
}

#[test]
fn silent_connections_give_way_at_the_cap() {
    let tmp = TempDir::new("giveway");
    let srv = start(&tmp, json!({"connections": 5}));
    let mut kept = trusted(&srv.addr);
    let mut silent: Vec<TcpStream> = (0..4).map(|_| connect(&srv.addr)).collect();
    // Full: the next connection takes the oldest silent one's place.
    let (status, _) = srv.post(&ping_body());
    assert_eq!(status, 200);
    assert!(closed_by_server(&mut silent[0]), "the oldest silent connection was answered");
    assert_eq!(ping_again(&mut kept, &srv.addr), 200);
}

#[test]
fn ping_answers_while_thousands_of_connections_idle_or_drip() {
    const IDLE: usize = 2000;
    const SLOW: usize = 300;
    if !room_for_fds((IDLE + SLOW) as u64) {
        skip("ping_answers_while_thousands_of_connections_idle_or_drip", "the open-file limit is too low");
        return;
    }
    let tmp = TempDir::new("manyconns");
    let srv = start(&tmp, json!({}));
    let idle: Vec<TcpStream> = (0..IDLE).map(|_| connect(&srv.addr)).collect();
    let mut slow: Vec<TcpStream> = (0..SLOW).map(|_| connect(&srv.addr)).collect();
    for s in &mut slow {
        s.write_all(b"POST / HTTP/1.1\r\nX-Slow: ").unwrap();
    }
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let dripping = {
        let stop = stop.clone();
        thread::spawn(move || {
            let until = Instant::now() + Duration::from_secs(60);
            while !stop.load(std::sync::atomic::Ordering::SeqCst) && Instant::now() < until {
                for s in &mut slow {
                    let _ = s.write_all(b"a");
                }
                thread::sleep(Duration::from_millis(200));
            }
        })
    };
    for _ in 0..10 {
        let started = Instant::now();
        let (status, body) = srv.post(&ping_body());
        let took = started.elapsed();
        assert_eq!(status, 200, "{body}");
        assert!(
            took < Duration::from_secs(5),
            "a ping took {took:?} beside {IDLE} idle and {SLOW} slow connections"
        );
    }
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    dripping.join().unwrap();
    // They were held, not turned away.
    let threads = std::fs::read_to_string(format!("/proc/{}/status", srv.pid())).unwrap();
    let threads = threads.lines().find(|l| l.starts_with("Threads:")).unwrap().to_string();
    assert!(srv.stderr().lines().all(|l| !l.contains("too many connections")), "{}", srv.stderr());
    drop(idle);
    eprintln!("{IDLE} idle + {SLOW} slow connections: {threads}");
}

#[test]
fn an_open_file_limit_below_the_cap_lowers_the_cap_with_a_warning() {
    if Command::new("prlimit").arg("--version").output().is_err() {
        skip("an_open_file_limit_below_the_cap_lowers_the_cap_with_a_warning", "no prlimit");
        return;
    }
    let tmp = TempDir::new("nofile");
    let dir = tmp.join("p");
    std::fs::create_dir_all(&dir).unwrap();
    let cfg = config(
        json!({"p": {"token": TOKEN, "dir": dir.to_str().unwrap()}}),
        Some(json!({"limits": {"connections": 256}})),
    );
    let path = tmp.join("aion.config.json");
    std::fs::write(&path, cfg).unwrap();
    let mut cmd = Command::new("prlimit");
    cmd.args(["--nofile=64:64", "--", BIN, path.to_str().unwrap()]);
    cmd.current_dir(tmp.path()).stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped());
    cmd.env("XDG_STATE_HOME", tmp.join("state")).env_remove("STATE_DIRECTORY");
    let mut child = cmd.spawn().unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap()).read_line(&mut line).unwrap();
    let addr =
        line.trim_end().strip_prefix("listening on ").unwrap_or_else(|| panic!("{line:?}")).to_string();
    let mut err = BufReader::new(child.stderr.take().unwrap());
    let warning = "[WARN] limits.connections is 256 but the open-file limit (nofile) is 64: serving at most 32 connections";
    let mut seen = String::new();
    while !seen.contains(" project(s) from ") && !seen.contains(warning) {
        let mut line = String::new();
        if err.read_line(&mut line).unwrap() == 0 {
            break;
        }
        seen.push_str(&line);
    }
    assert!(seen.contains(warning), "{seen}");
    thread::spawn(move || {
        let mut sink = String::new();
        let _ = err.read_to_string(&mut sink);
    });
    // The lowered cap is the one enforced: 32 served, the 33rd refused with a 503.
    let kept: Vec<BufReader<TcpStream>> = (0..32).map(|_| trusted(&addr)).collect();
    let mut extra = connect(&addr);
    extra.write_all(&post_request(&addr, &ping_body(), true)).unwrap();
    let resp = read_response(&mut BufReader::new(extra)).unwrap();
    assert_eq!(resp.status, 503, "{}", resp.head);
    assert_eq!(resp.text(), r#"{"error":"too many connections"}"#);
    drop(kept);
    let _ = child.kill();
    let _ = child.wait();
}
