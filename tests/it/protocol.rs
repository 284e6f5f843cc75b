//! Channel Protocol v1 over raw TCP: error rows byte-exact, answer shapes,
//! HTTP/1.1 behaviour (keep-alive, pipelining, 100-continue, chunked),
//! resource limits and logging.

use std::io::{BufReader, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::thread;
use std::time::{Duration, Instant};

use crate::util::*;
use serde_json::{Value, json};

const TOKEN: &str = "tok-alpha-SECRET-0001";

/// One project "alpha" (token TOKEN) with three agents in a non-sorted order.
fn start_basic(tmp: &TempDir) -> Server {
    start_basic_with(tmp, "")
}

/// Like start_basic, with `extra` top-level members spliced in (`"limits":{..},`).
fn start_basic_with(tmp: &TempDir, extra: &str) -> Server {
    let dir = tmp.join("alpha");
    std::fs::create_dir_all(&dir).unwrap();
    // written by hand: the agents' order matters
    let cfg = format!(
        r#"{{"port":0,"host":"127.0.0.1",{extra}
  "projects":{{"alpha":{{"token":"{TOKEN}","dir":{dir},
    "agents":{{"pi":{{"description":"Pi Assistant"}},"claude":{{"description":"Claude Code"}},"codex":{{}}}}}}}}}}"#,
        dir = Value::from(dir.to_str().unwrap())
    );
    Server::start(tmp.path(), &cfg)
}

fn ping_body() -> String {
    request_body(TOKEN, "ping", json!({}))
}

fn assert_ping(status: u16, body: &str) {
    assert_eq!(status, 200, "ping answer: {body}");
    let v: Value = serde_json::from_str(body).unwrap();
    assert_eq!(v["ok"], true, "{body}");
    assert_eq!(v["v"], 1, "{body}");
}

// ------------------------------------------------------------ error rows

#[test]
fn get_root_is_405_post_only() {
    let tmp = TempDir::new("p405");
    let srv = start_basic(&tmp);
    for req in [
        "GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        "PUT / HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{}",
        "DELETE /anything HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    ] {
        let resp = raw(&srv.addr, req.as_bytes()).unwrap();
        assert_eq!(resp.status, 405, "{req:?}");
        assert_eq!(resp.text(), r#"{"error":"POST only"}"#, "{req:?}");
    }
}

#[test]
fn healthz() {
    let tmp = TempDir::new("health");
    let srv = start_basic(&tmp);
    let resp = raw(&srv.addr, b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").unwrap();
    assert_eq!(resp.status, 200);
    assert_eq!(resp.text(), r#"{"ok":true}"#);
    let ct = resp.header("content-type").unwrap_or("");
    assert!(ct.contains("application/json"), "content-type {ct:?}");
}

#[test]
fn invalid_json_is_400() {
    let tmp = TempDir::new("badjson");
    let srv = start_basic(&tmp);
    for body in ["{not json", "", "[1,2,3]", "\"ping\"", "42", "null"] {
        let (status, text) = srv.post(body);
        assert_eq!(status, 400, "body {body:?}");
        assert_eq!(text, r#"{"error":"invalid json"}"#, "body {body:?}");
    }
}

#[test]
fn version_above_1_is_400_with_min() {
    let tmp = TempDir::new("version");
    let srv = start_basic(&tmp);
    let (status, text) = srv.post(&format!(r#"{{"v":2,"action":"ping","token":"{TOKEN}","payload":{{}}}}"#));
    assert_eq!(status, 400);
    assert_eq!(text, r#"{"error":"version","min":2}"#);
    // the version check comes before the token check
    let (status, text) = srv.post(r#"{"v":2,"action":"ping","token":"nope"}"#);
    assert_eq!(status, 400);
    assert_eq!(text, r#"{"error":"version","min":2}"#);
    // v:1 and an absent v are fine
    let (status, text) = srv.post(&format!(r#"{{"v":1,"action":"ping","token":"{TOKEN}"}}"#));
    assert_ping(status, &text);
    let (status, text) = srv.post(&format!(r#"{{"action":"ping","token":"{TOKEN}"}}"#));
    assert_ping(status, &text);
}

#[test]
fn missing_or_wrong_token_is_403_unauthorized() {
    let tmp = TempDir::new("unauth");
    let srv = start_basic(&tmp);
    for body in [
        r#"{"v":1,"action":"ping","payload":{}}"#.to_string(),
        r#"{"v":1,"action":"ping","token":"","payload":{}}"#.to_string(),
        r#"{"v":1,"action":"ping","token":"wrong-token","payload":{}}"#.to_string(),
        // a prefix of the real token is still wrong
        format!(r#"{{"v":1,"action":"ping","token":"{}"}}"#, &TOKEN[..TOKEN.len() - 1]),
        // unauthorized comes before unknown action
        r#"{"v":1,"action":"frobnicate","token":"wrong-token"}"#.to_string(),
    ] {
        let (status, text) = srv.post(&body);
        assert_eq!(status, 403, "{body}");
        assert_eq!(text, r#"{"error":"unauthorized"}"#, "{body}");
    }
}

#[test]
fn payload_project_mismatch_is_403() {
    let tmp = TempDir::new("mismatch");
    let srv = start_basic(&tmp);
    let (status, text) = srv.post(&request_body(TOKEN, "ping", json!({"project": "beta"})));
    assert_eq!(status, 403);
    assert_eq!(text, r#"{"error":"token/project mismatch"}"#);
    // the token's own project is fine
    let (status, text) = srv.post(&request_body(TOKEN, "ping", json!({"project": "alpha"})));
    assert_ping(status, &text);
}

#[test]
fn unknown_action_is_400() {
    let tmp = TempDir::new("unknown");
    let srv = start_basic(&tmp);
    for action in [json!("frobnicate"), json!(""), Value::Null] {
        let body = json!({"v":1,"action":action,"token":TOKEN,"payload":{}}).to_string();
        let (status, text) = srv.post(&body);
        assert_eq!(status, 400, "{body}");
        assert_eq!(text, r#"{"error":"unknown action"}"#, "{body}");
    }
}

/// Send `head` then `body_len` bytes of body from a writer thread (errors
/// ignored: the server may stop reading), and read one response.
fn send_big(addr: &str, head: String, body: Vec<u8>) -> std::io::Result<Response> {
    let s = connect(addr);
    let mut w = s.try_clone().unwrap();
    let writer = thread::spawn(move || {
        if w.write_all(head.as_bytes()).is_ok() {
            let _ = w.write_all(&body);
        }
    });
    let mut r = BufReader::new(s.try_clone().unwrap());
    let resp = read_response(&mut r);
    let _ = s.shutdown(Shutdown::Both);
    let _ = writer.join();
    resp
}

#[test]
fn body_too_large_is_413_without_memory_growth() {
    let tmp = TempDir::new("toolarge");
    let srv = start_basic(&tmp);
    let (s, t) = srv.post(&ping_body());
    assert_ping(s, &t);
    let before = srv.rss_kb();

    // 2 MiB, Content-Length
    let mut body = br#"{"v":1,"action":"ping","token":"x","pad":""#.to_vec();
    body.resize(2 * 1024 * 1024, b'a');
    let head = format!("POST / HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\n\r\n", body.len());
    let resp = send_big(&srv.addr, head, body.clone()).expect("an answer to a 2 MiB body");
    assert_eq!(resp.status, 413);
    assert_eq!(resp.text(), r#"{"error":"body too large"}"#);

    // 2 MiB, chunked (the server cannot know the size up front)
    let mut chunked = Vec::new();
    for piece in body.chunks(64 * 1024) {
        chunked.extend_from_slice(format!("{:x}\r\n", piece.len()).as_bytes());
        chunked.extend_from_slice(piece);
        chunked.extend_from_slice(b"\r\n");
    }
    chunked.extend_from_slice(b"0\r\n\r\n");
    let head = "POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n".to_string();
    let resp = send_big(&srv.addr, head, chunked).expect("an answer to a 2 MiB chunked body");
    assert_eq!(resp.status, 413);
    assert_eq!(resp.text(), r#"{"error":"body too large"}"#);

    let (s, t) = srv.post(&ping_body());
    assert_ping(s, &t);
    let after = srv.rss_kb();
    assert!(after <= before + 3 * 1024, "RSS grew from {before} kB to {after} kB for refused 2 MiB bodies");
}

#[test]
fn body_too_large_with_expect_gets_413_not_100() {
    let tmp = TempDir::new("expect413");
    let srv = start_basic(&tmp);
    let mut s = connect(&srv.addr);
    s.write_all(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 2097152\r\nExpect: 100-continue\r\n\r\n")
        .unwrap();
    let mut r = BufReader::new(s.try_clone().unwrap());
    let resp = read_response(&mut r).unwrap();
    assert_eq!(resp.status, 413, "{}", resp.head);
    assert_eq!(resp.text(), r#"{"error":"body too large"}"#);
}

#[test]
fn bad_payload_type_is_400_with_detail() {
    let tmp = TempDir::new("badpayload");
    let srv = start_basic(&tmp);
    let (status, v) = srv.call(TOKEN, "files.read", json!({"path": 7}));
    assert_eq!(status, 400, "{v}");
    assert_eq!(v, json!({"error":"bad payload","detail":"payload.path must be a string"}));
}

#[test]
fn terminal_input_and_output_need_a_known_session() {
    let tmp = TempDir::new("nosession");
    let srv = start_basic(&tmp);
    for action in ["terminal.input", "terminal.output"] {
        let (status, text) = srv.post(&request_body(TOKEN, action, json!({"sessionId":"nope","data":"x"})));
        assert_eq!(status, 404, "{action}: {text}");
        assert_eq!(text, r#"{"error":"no session"}"#, "{action}");
    }
    // resizing or closing what is not there is fine, as in the original
    for (action, payload) in [
        ("terminal.resize", json!({"sessionId":"nope","cols":80,"rows":24})),
        ("terminal.close", json!({"sessionId":"nope"})),
    ] {
        let (status, text) = srv.post(&request_body(TOKEN, action, payload));
        assert_eq!((status, text.as_str()), (200, r#"{"ok":true}"#), "{action}");
    }
}

// ------------------------------------------------------------ answers

#[test]
fn ping_shape() {
    let tmp = TempDir::new("ping");
    let srv = start_basic(&tmp);
    let (status, v) = srv.call(TOKEN, "ping", json!({}));
    assert_eq!(status, 200);
    let obj = v.as_object().expect("object");
    let mut keys: Vec<&str> = obj.keys().map(|k| k.as_str()).collect();
    keys.sort();
    assert_eq!(keys, ["ok", "uptime", "v", "version"], "{v}");
    assert_eq!(v["ok"], true);
    assert_eq!(v["v"], 1);
    assert_eq!(v["version"], "0.1.0");
    assert!(v["uptime"].is_u64(), "uptime must be an integer: {v}");
    assert!(v["uptime"].as_u64().unwrap() < 60, "{v}");
}

#[test]
fn agents_in_config_order() {
    let tmp = TempDir::new("agents");
    let srv = start_basic(&tmp);
    let (status, v) = srv.call(TOKEN, "agents", json!({}));
    assert_eq!(status, 200);
    assert_eq!(
        v,
        json!({"agents":[
            {"name":"pi","description":"Pi Assistant"},
            {"name":"claude","description":"Claude Code"},
            {"name":"codex","description":""}
        ]})
    );
}

#[test]
fn projects_are_isolated() {
    let tmp = TempDir::new("isolation");
    let a = tmp.join("a");
    let b = tmp.join("b");
    write(a.join("a.txt"), "from a");
    write(b.join("b.txt"), "from b");
    // a git repository inside project b
    let repo_b = b.join("repo-b");
    std::fs::create_dir_all(&repo_b).unwrap();
    git(&repo_b, &["init", "-q"]);
    write(repo_b.join("inside-b.txt"), "secret of b");
    let cfg = config(
        json!({
            "a": {"token": "tok-A", "dir": a.to_str().unwrap()},
            "b": {"token": "tok-B", "dir": b.to_str().unwrap()}
        }),
        None,
    );
    let srv = Server::start(tmp.path(), &cfg);
    let (status, v) = srv.call("tok-A", "repos.sync", json!({"repos": [{"name": "."}]}));
    assert_eq!(status, 200, "{v}");

    let (status, v) = srv.call("tok-A", "files.tree", json!({}));
    assert_eq!(status, 200, "{v}");
    let paths = tree_paths(&v["tree"]);
    assert!(paths.contains(&"a.txt".to_string()), "{v}");
    assert!(!paths.iter().any(|p| p.contains("b.txt") || p.contains("repo-b")), "{v}");

    let (status, v) = srv.call("tok-A", "workspaces", json!({}));
    assert_eq!(status, 200, "{v}");
    assert_eq!(v, json!({"list": [{"name": ".", "path": a.to_str().unwrap()}]}));

    let (status, v) = srv.call("tok-B", "repos.sync", json!({"repos": [{"name": "repo-b"}]}));
    assert_eq!(status, 200, "{v}");
    let (status, v) = srv.call("tok-B", "workspaces", json!({}));
    assert_eq!(status, 200, "{v}");
    assert_eq!(v, json!({"list":[{"name":"repo-b","path":repo_b.to_str().unwrap()}]}));

    // token A cannot name B's workspace
    let (status, v) = srv.call("tok-A", "files.read", json!({"workspace":"repo-b","path":"inside-b.txt"}));
    assert_eq!(status, 404, "{v}");
    assert_eq!(v, json!({"error":"unknown workspace"}));
    // nor reach B's files by path
    let (status, v) = srv.call("tok-A", "files.read", json!({"path":"../b/b.txt"}));
    assert_eq!(status, 403, "{v}");
    assert_eq!(v, json!({"error":"path traversal"}));
    // nor claim to be B
    let (status, text) =
        srv.post(&request_body("tok-A", "files.read", json!({"project":"b","path":"b.txt"})));
    assert_eq!(status, 403);
    assert_eq!(text, r#"{"error":"token/project mismatch"}"#);

    // and B sees its own files (its default workspace is repo-b)
    let (status, v) = srv.call("tok-B", "files.read", json!({"path":"inside-b.txt"}));
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["content"], "secret of b");
}

// ------------------------------------------------------------ HTTP/1.1

#[test]
fn keep_alive_two_requests_on_one_connection() {
    let tmp = TempDir::new("keepalive");
    let srv = start_basic(&tmp);
    let mut s = connect(&srv.addr);
    let mut r = BufReader::new(s.try_clone().unwrap());

    s.write_all(&post_request(&srv.addr, &ping_body(), false)).unwrap();
    let first = read_response(&mut r).unwrap();
    assert_ping(first.status, &first.text());

    s.write_all(&post_request(&srv.addr, &request_body(TOKEN, "agents", json!({})), false)).unwrap();
    let second = read_response(&mut r).unwrap();
    assert_eq!(second.status, 200);
    assert_eq!(second.json()["agents"][0]["name"], "pi");

    // Connection: close is honoured: answer, then EOF
    s.write_all(&post_request(&srv.addr, &ping_body(), true)).unwrap();
    let third = read_response(&mut r).unwrap();
    assert_ping(third.status, &third.text());
    let mut rest = Vec::new();
    let n = r.read_to_end(&mut rest).unwrap();
    assert_eq!(n, 0, "data after Connection: close: {rest:?}");
}

#[test]
fn pipelined_requests_answered_in_order() {
    let tmp = TempDir::new("pipeline");
    let srv = start_basic(&tmp);
    let mut s = connect(&srv.addr);
    let mut all = post_request(&srv.addr, &request_body(TOKEN, "agents", json!({})), false);
    all.extend(post_request(&srv.addr, &ping_body(), false));
    all.extend(post_request(&srv.addr, r#"{"broken"#, true));
    s.write_all(&all).unwrap();
    let mut r = BufReader::new(s.try_clone().unwrap());
    let a = read_response(&mut r).unwrap();
    assert_eq!(a.status, 200);
    assert!(a.json().get("agents").is_some(), "{}", a.text());
    let b = read_response(&mut r).unwrap();
    assert_ping(b.status, &b.text());
    let c = read_response(&mut r).unwrap();
    assert_eq!(c.status, 400);
    assert_eq!(c.text(), r#"{"error":"invalid json"}"#);
}

#[test]
fn expect_100_continue() {
    let tmp = TempDir::new("expect");
    let srv = start_basic(&tmp);
    let body = ping_body();
    let mut s = connect(&srv.addr);
    s.write_all(
        format!(
            "POST / HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\nExpect: 100-continue\r\n\r\n",
            body.len()
        )
        .as_bytes(),
    )
    .unwrap();
    let mut r = BufReader::new(s.try_clone().unwrap());
    let interim = read_head(&mut r).expect("an interim answer before the body is sent");
    assert!(interim.head.starts_with("HTTP/1.1 100 Continue"), "{:?}", interim.head);
    s.write_all(body.as_bytes()).unwrap();
    let fin = read_response(&mut r).unwrap();
    assert_ping(fin.status, &fin.text());
}

#[test]
fn chunked_request_body() {
    let tmp = TempDir::new("chunked");
    let srv = start_basic(&tmp);
    let body = request_body(TOKEN, "agents", json!({}));
    let (a, b) = body.split_at(10);
    let (b, c) = b.split_at(7);
    let mut req =
        String::from("POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n");
    for piece in [a, b, c] {
        req.push_str(&format!("{:x};ext=1\r\n{piece}\r\n", piece.len()));
    }
    req.push_str("0\r\n\r\n");
    let resp = raw(&srv.addr, req.as_bytes()).unwrap();
    assert_eq!(resp.status, 200, "{}", resp.text());
    assert_eq!(resp.json()["agents"][1]["name"], "claude");
}

#[test]
fn huge_header_line_is_refused_without_memory_growth() {
    let tmp = TempDir::new("bighead");
    let srv = start_basic(&tmp);
    let (s, t) = srv.post(&ping_body());
    assert_ping(s, &t);
    let before = srv.rss_kb();

    let s = connect(&srv.addr);
    s.set_write_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut w = s.try_clone().unwrap();
    let writer = thread::spawn(move || {
        let _ = w.write_all(b"POST / HTTP/1.1\r\nHost: x\r\nX-Big: ");
        let chunk = vec![b'a'; 64 * 1024];
        for _ in 0..1024 {
            if w.write_all(&chunk).is_err() {
                return;
            }
        }
        let _ = w.write_all(b"\r\n\r\n");
    });
    let mut r = BufReader::new(s.try_clone().unwrap());
    match read_response(&mut r) {
        Ok(resp) => {
            assert_eq!(resp.status, 431, "{}", resp.head);
            assert_eq!(resp.text(), r#"{"error":"headers too large"}"#);
        }
        Err(e) => assert!(
            matches!(
                e.kind(),
                std::io::ErrorKind::ConnectionReset
                    | std::io::ErrorKind::ConnectionAborted
                    | std::io::ErrorKind::BrokenPipe
                    | std::io::ErrorKind::UnexpectedEof
            ),
            "neither a 431 nor a reset: {e:?}"
        ),
    }
    let _ = s.shutdown(Shutdown::Both);
    writer.join().unwrap();

    let (st, t) = srv.post(&ping_body());
    assert_ping(st, &t);
    let after = srv.rss_kb();
    assert!(after <= before + 3 * 1024, "RSS grew from {before} kB to {after} kB for a 64 MiB header");
}

#[test]
fn silent_connections_do_not_block_others() {
    let tmp = TempDir::new("silent");
    let srv = start_basic(&tmp);
    let (s, t) = srv.post(&ping_body());
    assert_ping(s, &t);
    let silent: Vec<TcpStream> = (0..300).map(|_| connect(&srv.addr)).collect();
    let start = Instant::now();
    let (s, t) = srv.post(&ping_body());
    let took = start.elapsed();
    assert_ping(s, &t);
    assert!(took < Duration::from_secs(1), "ping took {took:?} with 300 silent connections");
    drop(silent);
}

/// Read whatever the server sends on a fresh, otherwise silent connection;
/// if it sends nothing soon, send a ping and read the answer.
fn answer_of_extra_connection(addr: &str) -> Response {
    let mut s = connect(addr);
    s.set_read_timeout(Some(Duration::from_millis(500))).unwrap();
    let mut first = [0u8; 1];
    let mut prefix = Vec::new();
    match s.read(&mut first) {
        Ok(1) => prefix.push(first[0]),
        Ok(_) => panic!("connection closed without an answer"),
        Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {
            s.write_all(&post_request(addr, &ping_body(), true)).unwrap();
        }
        Err(e) => panic!("extra connection: {e}"),
    }
    s.set_read_timeout(Some(DEADLINE)).unwrap();
    let mut r = BufReader::new(std::io::Cursor::new(prefix).chain(s));
    read_response(&mut r).expect("an answer on the connection over the cap")
}

#[test]
fn connection_cap_answers_503() {
    let tmp = TempDir::new("conncap");
    let srv = start_basic_with(&tmp, r#""limits":{"connections":5},"#);
    // Five connections that made an authenticated request (silent ones
    // would give way to a new connection: see http::silent_connections_give_way_at_the_cap).
    let mut held: Vec<BufReader<TcpStream>> = (0..5)
        .map(|_| {
            let mut s = connect(&srv.addr);
            s.write_all(&post_request(&srv.addr, &ping_body(), false)).unwrap();
            let mut r = BufReader::new(s);
            let resp = read_response(&mut r).unwrap();
            assert_ping(resp.status, &resp.text());
            r
        })
        .collect();
    let resp = answer_of_extra_connection(&srv.addr);
    assert_eq!(resp.status, 503, "{}", resp.head);
    assert_eq!(resp.text(), r#"{"error":"too many connections"}"#);

    // a freed slot is usable again
    drop(held.pop());
    poll("a ping after one connection was closed", || {
        let mut s = connect(&srv.addr);
        s.write_all(&post_request(&srv.addr, &ping_body(), true)).ok()?;
        let resp = read_response(&mut BufReader::new(s)).ok()?;
        (resp.status == 200).then_some(())
    });
    drop(held);
}

#[test]
fn token_never_in_stderr() {
    let tmp = TempDir::new("tokenlog");
    let srv = start_basic(&tmp);
    write(tmp.join("alpha/f.txt"), "x");
    srv.call(TOKEN, "ping", json!({}));
    srv.call(TOKEN, "files.read", json!({"path":"f.txt"}));
    srv.call(TOKEN, "files.read", json!({"path":"../nope"}));
    srv.call(TOKEN, "nope.action", json!({}));
    srv.call(TOKEN, "ping", json!({"project":"other"}));
    srv.post(&request_body("tok-WRONG-zz-987", "ping", json!({})));
    srv.post(r#"{"token":"tok-in-broken-json-555","#);
    let err =
        srv.wait_stderr("7 request log lines", |s| s.lines().filter(|l| l.contains("status=")).count() >= 7);
    for secret in [TOKEN, "tok-WRONG-zz-987", "tok-in-broken-json-555"] {
        assert!(!err.contains(secret), "{secret} in stderr:\n{err}");
    }
    assert!(!srv.stdout().contains(TOKEN));
}

#[test]
fn one_log_line_per_request() {
    let tmp = TempDir::new("reqlog");
    let srv = start_basic(&tmp);
    srv.call(TOKEN, "ping", json!({}));
    srv.call(TOKEN, "agents", json!({}));
    srv.post(&request_body("wrong", "ping", json!({})));
    srv.post("{nope");
    let err =
        srv.wait_stderr("4 request log lines", |s| s.lines().filter(|l| l.contains("status=")).count() >= 4);
    let lines: Vec<&str> = err.lines().filter(|l| l.contains("status=")).collect();
    assert_eq!(lines.len(), 4, "{err}");
    let find = |pred: &dyn Fn(&str) -> bool, what: &str| {
        let n = lines.iter().filter(|l| pred(l)).count();
        assert_eq!(n, 1, "expected one line for {what}:\n{err}");
    };
    find(&|l| l.contains("ping") && l.contains("project=alpha") && l.contains("status=200"), "ping");
    find(&|l| l.contains("agents") && l.contains("project=alpha") && l.contains("status=200"), "agents");
    find(&|l| l.contains("project=-") && l.contains("status=403"), "unauthorized");
    find(&|l| l.contains("status=400"), "invalid json");
    assert!(lines[0].contains("peer=127.0.0.1:"), "{}", lines[0]);
    // stdout carries the `listening on` line and nothing else
    assert_eq!(srv.stdout(), format!("listening on {}\n", srv.addr));
    for l in &lines {
        // A failed token's line is the fail2ban filter's match.
        let level = if l.contains("status=403") { "[INFO] failed token from 127.0.0.1 " } else { "[INFO]" };
        assert!(l.contains(level), "{l}");
    }
}

#[test]
fn http_1_0_closes_after_the_answer() {
    let tmp = TempDir::new("http10");
    let srv = start_basic(&tmp);
    let body = ping_body();
    let mut s = connect(&srv.addr);
    s.write_all(format!("POST / HTTP/1.0\r\nContent-Length: {}\r\n\r\n{body}", body.len()).as_bytes())
        .unwrap();
    let mut r = BufReader::new(s.try_clone().unwrap());
    let resp = read_response(&mut r).unwrap();
    assert_ping(resp.status, &resp.text());
    let mut rest = Vec::new();
    assert_eq!(r.read_to_end(&mut rest).unwrap(), 0, "{rest:?}");
}

#[test]
fn slow_request_gets_408_and_idle_connection_is_closed() {
    let tmp = TempDir::new("timeouts");
    let srv = start_basic_with(&tmp, r#""limits":{"requestSeconds":1,"idleSeconds":1},"#);

    // a head that never completes
    let mut s = connect(&srv.addr);
    s.write_all(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Le").unwrap();
    let resp = read_response(&mut BufReader::new(s.try_clone().unwrap())).unwrap();
    assert_eq!(resp.status, 408, "{}", resp.head);
    assert_eq!(resp.text(), r#"{"error":"request timeout"}"#);

    // a body that never completes
    let mut s = connect(&srv.addr);
    s.write_all(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{\"v\":1").unwrap();
    let resp = read_response(&mut BufReader::new(s.try_clone().unwrap())).unwrap();
    assert_eq!(resp.status, 408, "{}", resp.head);

    // an idle keep-alive connection is closed by the server
    let mut s = connect(&srv.addr);
    s.write_all(&post_request(&srv.addr, &ping_body(), false)).unwrap();
    let mut r = BufReader::new(s.try_clone().unwrap());
    let resp = read_response(&mut r).unwrap();
    assert_ping(resp.status, &resp.text());
    let mut rest = Vec::new();
    let n = r.read_to_end(&mut rest).expect("the server closes the idle connection");
    assert_eq!(n, 0, "{rest:?}");
}
