//! Running it like a service: `aion-connector status` against the real
//! binary (a run of the fake acpx going, a terminal open, posts backed up
//! for a callback that is down), `GET /metrics`, SIGHUP reloads.

use crate::util::*;
use serde_json::{Value, json};
use std::io::Write;
use std::path::Path;

const TOKEN: &str = "ops-token-5b1c9d7e3f2a4b6c8d0e";

/// A callback origin nobody listens on (a port bound, then freed).
fn dead_callback() -> String {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    drop(l);
    format!("http://127.0.0.1:{port}")
}

/// `status` of the connector serving `dir`'s config, with `extra` arguments.
fn status(dir: &Path, extra: &[&str]) -> (i32, String, String) {
    let cfg = dir.join("aion.config.json");
    let mut args = vec!["status", cfg.to_str().unwrap()];
    args.extend_from_slice(extra);
    run(&args, dir, &[])
}

/// Project `p` (token `TOKEN`) in `dir/proj` with the fake acpx as agent
/// `fake`, `extra` at the config's top level: the config file's path and the
/// connector's environment for it (PATH with the fake first, its log, SHELL).
fn fake_project(dir: &TempDir, extra: Option<Value>) -> (std::path::PathBuf, Vec<(&'static str, String)>) {
    let proj = dir.join("proj");
    std::fs::create_dir_all(&proj).unwrap();
    let bin = fake_acpx_bin(dir.path());
    let cfg_path = dir.join("aion.config.json");
    let cfg = config(json!({"p": {"token": TOKEN, "dir": proj, "agents": {"fake": {}}}}), extra);
    std::fs::write(&cfg_path, cfg).unwrap();
    let log = dir.join("acpx.log").to_str().unwrap().to_string();
    (cfg_path, vec![("PATH", path_with(&bin)), ("FAKE_ACPX_LOG", log), ("SHELL", "/bin/sh".to_string())])
}

/// Kills, on drop, what the fake acpx logging to `dir/acpx.log` left running
/// (a run cut with the connector leaves its acpx behind), whether the test
/// passed or not. Made right after `dir`, so that it drops after the server.
struct Leftovers(String);

impl Leftovers {
    fn of(dir: &TempDir) -> Leftovers {
        Leftovers(format!("FAKE_ACPX_LOG={}", dir.join("acpx.log").display()))
    }
}

impl Drop for Leftovers {
    fn drop(&mut self) {
        kill_marked(&self.0);
    }
}

fn env_refs<'a>(env: &'a [(&'static str, String)]) -> Vec<(&'static str, &'a str)> {
    env.iter().map(|(k, v)| (*k, v.as_str())).collect()
}

#[test]
fn status_shows_runs_terminals_and_the_backlog_as_text_and_json() {
    let dir = TempDir::new("ops-status");
    let _leftovers = Leftovers::of(&dir);
    let (cfg_path, env) = fake_project(&dir, None);
    let server = Server::start_args(&[cfg_path.to_str().unwrap()], dir.path(), &env_refs(&env));
    let callback = dead_callback();
    let (code, body) = server.call(
        TOKEN,
        "invoke",
        json!({"agent": "fake", "prompt": "sleep", "session": "s1", "callback": callback}),
    );
    assert_eq!((code, &body["ok"]), (200, &json!(true)), "{body}");
    let (code, term) = server.call(TOKEN, "terminal.spawn", json!({}));
    assert_eq!(code, 200, "{term}");
    let term_id = term["sessionId"].as_str().unwrap().to_string();

    // The run posts "sleeping" and sleeps; the callback is down, so it waits in the outbox.
    let answer = poll("status to show the run and the failing origin", || {
        let (code, out, err) = status(dir.path(), &["--json"]);
        assert_eq!(code, 0, "status --json: {err}");
        let v: Value = serde_json::from_str(out.trim()).expect("status --json prints JSON");
        let origin = v["outbox"]["origins"].as_array().and_then(|o| o.first()).cloned()?;
        let run = v["projects"][0]["runs"].as_array().and_then(|r| r.first()).cloned()?;
        (origin["lastError"].is_string() && run["posts"].as_u64() >= Some(1)).then_some(v)
    });
    assert_eq!(answer["ok"], json!(true));
    assert_eq!(answer["version"], json!(env!("CARGO_PKG_VERSION")));
    assert_eq!(answer["listen"], json!(server.addr));
    assert_eq!(answer["pid"], json!(server.pid()));
    let p = &answer["projects"][0];
    assert_eq!(p["id"], json!("p"));
    let run0 = &p["runs"][0];
    assert_eq!(
        (&run0["session"], &run0["agent"], &run0["state"]),
        (&json!("s1"), &json!("fake"), &json!("running"))
    );
    assert!(run0["pending"].as_u64() >= Some(1), "posts pending for the dead callback: {run0}");
    let terms = p["terminals"].as_array().unwrap();
    assert!(terms.iter().any(|t| t["id"] == json!(term_id) && t["alive"] == json!(true)), "{terms:?}");
    let origin = &answer["outbox"]["origins"][0];
    assert_eq!(origin["origin"], json!(callback));
    assert!(origin["records"].as_u64() >= Some(1), "{origin}");
    assert!(origin["oldestPendingSeconds"].is_number(), "{origin}");
    assert!(answer["lease"].is_null(), "no agent has leaseApps");
    assert!(answer["tls"].is_null(), "no tls section: {}", answer["tls"]);
    let text = answer.to_string();
    assert!(!text.contains(TOKEN), "the token leaked into status");

    let (code, out, err) = status(dir.path(), &[]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains(&format!("listening on {}", server.addr)), "{out}");
    assert!(out.contains("project p"), "{out}");
    assert!(out.contains("run s1 agent=fake running"), "{out}");
    assert!(out.contains(&format!("terminal {term_id} (http)")), "{out}");
    assert!(out.contains(&callback) && out.contains("last error:"), "{out}");
    assert!(out.contains("leases: none configured"), "{out}");
    assert!(!out.contains(TOKEN), "the token leaked into status");

    // The run ends; its fake acpx's leftovers are killed whatever happens.
    let (code, body) = server.call(TOKEN, "stop", json!({"session": "s1"}));
    assert_eq!(code, 200, "{body}");
}

#[test]
fn status_exits_3_when_no_connector_runs_there() {
    let dir = TempDir::new("ops-none");
    std::fs::write(dir.join("aion.config.json"), one_project("p", TOKEN, dir.path())).unwrap();
    let (code, out, err) = status(dir.path(), &[]);
    assert_eq!(code, 3, "stdout {out}\nstderr {err}");
    assert!(err.contains("no connector running"), "{err}");
    assert!(out.is_empty(), "{out}");
    // A stale socket file (its connector killed) is no connector either.
    let server = Server::start(dir.path(), &one_project("p", TOKEN, dir.path()));
    let (code, _, err) = status(dir.path(), &["--json"]);
    assert_eq!(code, 0, "{err}");
    let mut server = server;
    let _ = server.child.kill();
    let _ = server.child.wait();
    let (code, _, err) = status(dir.path(), &["--json"]);
    assert_eq!(code, 3, "{err}");
    let (code, _, err) = run(&["status", "--bogus"], dir.path(), &[]);
    assert_eq!(code, 2, "{err}");
}

/// GET /metrics with an optional `Authorization` header value.
fn scrape(addr: &str, auth: Option<&str>) -> Response {
    let auth = auth.map(|a| format!("Authorization: {a}\r\n")).unwrap_or_default();
    let req = format!("GET /metrics HTTP/1.1\r\nHost: {addr}\r\n{auth}Connection: close\r\n\r\n");
    raw(addr, req.as_bytes()).expect("GET /metrics")
}

/// The samples of a scrape as parsed by the reference parser
/// (prometheus_client's): (name, labels, value). None when it is missing.
fn parse_with_prometheus_client(text: &str) -> Option<Vec<(String, Value, f64)>> {
    const SCRIPT: &str = "import sys, json\n\
        from prometheus_client.parser import text_string_to_metric_families\n\
        out = []\n\
        for fam in text_string_to_metric_families(sys.stdin.read()):\n\
        \x20   for s in fam.samples:\n\
        \x20       out.append([s.name, s.labels, s.value])\n\
        print(json.dumps(out))\n";
    let have = std::process::Command::new("python3")
        .args(["-c", "import prometheus_client"])
        .output()
        .is_ok_and(|o| o.status.success());
    if !have {
        return None;
    }
    let mut child = std::process::Command::new("python3")
        .args(["-c", SCRIPT])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(text.as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "the parser refused the scrape: {}\n{text}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: Vec<(String, Value, f64)> = serde_json::from_slice(&out.stdout).unwrap();
    Some(v)
}

fn sample(samples: &[(String, Value, f64)], name: &str, labels: Value) -> Option<f64> {
    samples.iter().find(|(n, l, _)| n == name && *l == labels).map(|(_, _, v)| *v)
}

#[test]
fn metrics_parse_as_prometheus_text_and_move_with_traffic() {
    let dir = TempDir::new("ops-metrics");
    let _leftovers = Leftovers::of(&dir);
    let metrics_token = "metrics-token-0123456789abcdef";
    let (cfg_path, env) = fake_project(&dir, Some(json!({"metricsToken": metrics_token})));
    let server = Server::start_args(&[cfg_path.to_str().unwrap()], dir.path(), &env_refs(&env));
    assert_eq!(scrape(&server.addr, None).status, 401);
    assert_eq!(scrape(&server.addr, Some("Bearer wrong-token-wrong-token")).status, 403);
    assert_eq!(scrape(&server.addr, Some(&format!("Basic {TOKEN}"))).status, 403);
    let first = scrape(&server.addr, Some(&format!("Bearer {metrics_token}")));
    assert_eq!(first.status, 200, "{}", first.text());
    let Some(before) = parse_with_prometheus_client(&first.text()) else {
        skip(
            "metrics_parse_as_prometheus_text_and_move_with_traffic",
            "python3's prometheus_client is not installed (pip install prometheus_client)",
        );
        return;
    };
    let version = env!("CARGO_PKG_VERSION");
    assert_eq!(sample(&before, "aion_connector_build_info", json!({"version": version})), Some(1.0));
    let pings = |s: &[(String, Value, f64)]| {
        sample(s, "aion_connector_requests_total", json!({"action": "ping", "status": "200"})).unwrap_or(0.0)
    };
    let refused = |s: &[(String, Value, f64)]| {
        sample(s, "aion_connector_requests_total", json!({"action": "-", "status": "403"})).unwrap_or(0.0)
    };
    let count = |s: &[(String, Value, f64)]| {
        sample(s, "aion_connector_request_duration_seconds_count", json!({})).unwrap()
    };
    for _ in 0..5 {
        assert_eq!(server.call(TOKEN, "ping", json!({})).0, 200);
    }
    assert_eq!(server.call("not-a-token", "ping", json!({})).0, 403);
    let (code, term) = server.call(TOKEN, "terminal.spawn", json!({}));
    assert_eq!(code, 200, "{term}");
    // A project's token reads the metrics too.
    let second = scrape(&server.addr, Some(&format!("Bearer {TOKEN}")));
    assert_eq!(second.status, 200);
    let after = parse_with_prometheus_client(&second.text()).unwrap();
    assert_eq!(pings(&after) - pings(&before), 5.0, "{}", second.text());
    assert_eq!(refused(&after) - refused(&before), 1.0, "{}", second.text());
    // 5 pings, 1 refusal, 1 spawn, and the first scrape itself.
    assert_eq!(count(&after) - count(&before), 8.0, "{}", second.text());
    assert_eq!(sample(&after, "aion_connector_terminals", json!({})), Some(1.0));
    assert_eq!(sample(&after, "aion_connector_runs_active", json!({})), Some(0.0));
    assert_eq!(sample(&after, "aion_connector_lease_link", json!({"state": "none"})), Some(1.0));
    assert!(
        sample(&after, "aion_connector_connections_open", json!({})).is_some_and(|n| n >= 1.0),
        "the scrape's own connection is open"
    );
    assert!(!second.text().contains(TOKEN) && !second.text().contains(metrics_token));

    // One invoke to a fake platform: a run finished, its posts delivered to
    // that origin (the label is the origin only: no path, no credentials).
    let platform = Platform::start();
    let origin = platform.url();
    let complete = |s: &[(String, Value, f64)]| {
        sample(s, "aion_connector_runs_finished_total", json!({"outcome": "complete"})).unwrap_or(0.0)
    };
    let delivered_to = |s: &[(String, Value, f64)], origin: &str| {
        sample(s, "aion_connector_posts_delivered_total", json!({"origin": origin})).unwrap_or(0.0)
    };
    let callback =
        format!("http://user:secret-pass@127.0.0.1:{}/some/path", &origin["http://127.0.0.1:".len()..]);
    let (code, body) = server.call(
        TOKEN,
        "invoke",
        json!({"agent": "fake", "prompt": "lines 3", "session": "m1", "callback": callback}),
    );
    assert_eq!(code, 200, "{body}");
    let posts = platform.wait_closed("m1");
    let third = poll("the run and its posts in /metrics", || {
        let text = scrape(&server.addr, Some(&format!("Bearer {metrics_token}"))).text();
        let s = parse_with_prometheus_client(&text).unwrap();
        (complete(&s) - complete(&after) == 1.0 && delivered_to(&s, &origin) == posts.len() as f64)
            .then_some(text)
    });
    assert!(!third.contains("secret-pass") && !third.contains("/some/path"), "{third}");

    // A second one to an origin that is down: its posts wait, pending and spooled.
    let dead = dead_callback();
    let (code, body) = server.call(
        TOKEN,
        "invoke",
        json!({"agent": "fake", "prompt": "lines 2", "session": "m2", "callback": dead}),
    );
    assert_eq!(code, 200, "{body}");
    poll("the dead origin's backlog in /metrics", || {
        let s = parse_with_prometheus_client(
            &scrape(&server.addr, Some(&format!("Bearer {metrics_token}"))).text(),
        )
        .unwrap();
        let pending = sample(&s, "aion_connector_posts_pending", json!({"origin": dead}))?;
        let bytes = sample(&s, "aion_connector_spool_bytes", json!({"origin": dead}))?;
        let retried = sample(&s, "aion_connector_posts_retried_total", json!({"origin": dead}))?;
        (complete(&s) - complete(&after) == 2.0 && pending >= 1.0 && bytes > 0.0 && retried >= 1.0)
            .then_some(())
    });
}

const TOKEN_B: &str = "ops-token-b-7e6d5c4b3a29180716f5";
const TOKEN_C: &str = "ops-token-c-0a1b2c3d4e5f60718293";
const TOKEN_A2: &str = "ops-token-a2-99887766554433221100";

/// SIGHUP, then wait for the log line that says how it went.
fn hup(server: &Server, n: usize, word: &str) -> String {
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(server.pid() as i32), nix::sys::signal::Signal::SIGHUP)
        .unwrap();
    server.wait_stderr(word, |s| s.matches(word).count() >= n)
}

#[test]
fn sighup_reloads_projects_and_tokens_keeping_runs_and_terminals() {
    let dir = TempDir::new("ops-reload");
    let _leftovers = Leftovers::of(&dir);
    let (a, b) = (dir.join("a"), dir.join("b"));
    std::fs::create_dir_all(&a).unwrap();
    std::fs::create_dir_all(&b).unwrap();
    let bin = fake_acpx_bin(dir.path());
    let log = dir.join("acpx.log");
    let cfg_path = dir.join("aion.config.json");
    let write_cfg = |projects: Value, extra| std::fs::write(&cfg_path, config(projects, extra)).unwrap();
    write_cfg(
        json!({
            "a": {"token": TOKEN, "dir": a, "agents": {"fake": {}}},
            "b": {"token": TOKEN_B, "dir": b, "agents": {"fake": {}}},
        }),
        None,
    );
    let path = path_with(&bin);
    let server = Server::start_args(
        &[cfg_path.to_str().unwrap()],
        dir.path(),
        &[("PATH", &path), ("FAKE_ACPX_LOG", log.to_str().unwrap()), ("SHELL", "/bin/sh")],
    );
    let platform = Platform::start();
    // A run in b (which will be removed) and a terminal in a (whose token rotates).
    let (code, body) = server.call(
        TOKEN_B,
        "invoke",
        json!({"agent": "fake", "prompt": "until go", "session": "rb", "callback": platform.url()}),
    );
    assert_eq!(code, 200, "{body}");
    let (code, term) = server.call(TOKEN, "terminal.spawn", json!({}));
    assert_eq!(code, 200, "{term}");
    let term_id = term["sessionId"].as_str().unwrap().to_string();
    poll("the run in b to post its first chunk", || {
        platform.delivered().iter().any(|p| p.json()["sessionId"] == json!("rb")).then_some(())
    });
    let mut conn = connect(&server.addr); // a keep-alive connection that must survive the reload
    conn.write_all(&post_request(&server.addr, &request_body(TOKEN, "ping", json!({})), false)).unwrap();
    let mut reader = std::io::BufReader::new(conn.try_clone().unwrap());
    assert_eq!(read_response(&mut reader).unwrap().status, 200);

    assert_eq!(
        server.call(TOKEN, "terminal.spawn", json!({})).0,
        200,
        "a second terminal, under the default cap"
    );
    // Reload: b removed, c added, a's token rotated, one terminal per project.
    let c = dir.join("c");
    write_cfg(
        json!({
            "a": {"token": TOKEN_A2, "dir": a, "agents": {"fake": {}}},
            "c": {"token": TOKEN_C, "dir": c, "agents": {"fake": {}}},
        }),
        Some(json!({"limits": {"terminalsPerProject": 1}})),
    );
    let log_text = hup(&server, 1, "reloaded ");
    assert!(log_text.contains("added=c removed=b changed=a"), "{log_text}");
    assert_eq!(server.call(TOKEN_C, "ping", json!({})).0, 200, "c is served");
    assert_eq!(server.call(TOKEN_B, "ping", json!({})).0, 403, "b is not");
    assert_eq!(server.call(TOKEN, "ping", json!({})).0, 403, "a's old token is not");
    assert_eq!(server.call(TOKEN_A2, "ping", json!({})).0, 200, "a's new token is");
    assert_eq!(server.call(TOKEN_A2, "terminal.spawn", json!({})).0, 429, "the reloaded terminal cap holds");
    assert_eq!(server.call(TOKEN_C, "terminal.spawn", json!({})).0, 200, "c has room for one");
    // The terminal opened before the rotation answers to the new token. The
    // line is sent again while the shell has not run it: input typed while a
    // shell starts may be flushed when it sets up its terminal.
    let mut seen = String::new();
    let mut sent_at: Option<std::time::Instant> = None;
    poll("the terminal to run the line", || {
        if sent_at.is_none_or(|t| t.elapsed() > std::time::Duration::from_millis(500)) {
            let (code, out) = server.call(
                TOKEN_A2,
                "terminal.input",
                json!({"sessionId": term_id, "data": "echo hi-$((6*7))\n"}),
            );
            assert_eq!(code, 200, "{out}");
            sent_at = Some(std::time::Instant::now());
        }
        let (code, out) = server.call(TOKEN_A2, "terminal.output", json!({"sessionId": term_id}));
        assert_eq!(code, 200, "{out}");
        seen.push_str(out["data"].as_str().unwrap_or(""));
        seen.contains("hi-42").then_some(())
    });
    // The keep-alive connection is still served.
    conn.write_all(&post_request(&server.addr, &request_body(TOKEN_C, "ping", json!({})), false)).unwrap();
    assert_eq!(read_response(&mut reader).unwrap().status, 200);
    // b's run goes on and ends normally, its posts signed with b's token.
    std::fs::write(b.join("go"), "").unwrap();
    let posts = platform.wait_closed("rb");
    let last = posts.last().unwrap();
    assert!(last.path.ends_with("/internal/agent-complete"), "{last:?}");
    for p in &posts {
        assert_eq!(p.signature.as_deref(), Some(hmac_sha256(TOKEN_B, &p.body).as_str()), "{p:?}");
    }

    // A broken file changes nothing and names each problem by its path.
    std::fs::write(&cfg_path, r#"{"port":0,"projects":{"a":{"token":"","dir":"/x"},"d":{"dir":7}}}"#)
        .unwrap();
    let log_text = hup(&server, 1, "reload refused");
    let log_text = server.wait_stderr("every problem", |s| s.contains("projects.d.dir")) + &log_text;
    assert!(log_text.contains("projects.a.token"), "{log_text}");
    assert_eq!(server.call(TOKEN_A2, "ping", json!({})).0, 200, "the old config is served");
    assert_eq!(server.call(TOKEN_C, "ping", json!({})).0, 200, "the old config is served");
    let (code, out) = server.call(TOKEN_A2, "terminal.output", json!({"sessionId": term_id}));
    assert_eq!((code, &out["alive"]), (200, &json!(true)), "{out}");
    assert!(!server.stderr().contains(TOKEN_A2) && !server.stderr().contains(TOKEN_B), "a token in the log");
}

#[test]
fn runs_lists_active_and_finished_runs_and_runs_output_pages_their_posts() {
    let dir = TempDir::new("ops-history");
    let _leftovers = Leftovers::of(&dir);
    let (cfg_path, env) = fake_project(&dir, None);
    let server = Server::start_args(&[cfg_path.to_str().unwrap()], dir.path(), &env_refs(&env));
    let platform = Platform::start();
    let invoke_token = "invoke-token-kept-out-of-the-history";
    let invoke = |session: &str, prompt: &str| {
        let (code, body) = server.call(
            TOKEN,
            "invoke",
            json!({"agent": "fake", "prompt": prompt, "session": session, "callback": platform.url(), "token": invoke_token}),
        );
        assert_eq!(code, 200, "{body}");
    };
    invoke("done", "lines 3");
    let delivered = platform.wait_closed("done");
    invoke("going", "until go");
    poll("the going run to post", || {
        platform.delivered().iter().any(|p| p.json()["sessionId"] == json!("going")).then_some(())
    });

    let (code, list) = server.call(TOKEN, "runs", json!({}));
    assert_eq!(code, 200, "{list}");
    let active = list["active"].as_array().unwrap();
    assert_eq!(active.len(), 1, "{list}");
    assert_eq!((&active[0]["session"], &active[0]["state"]), (&json!("going"), &json!("running")));
    let finished = list["finished"].as_array().unwrap();
    assert_eq!(finished.len(), 1, "{list}");
    assert_eq!(finished[0]["session"], json!("done"));
    assert_eq!(finished[0]["outcome"], json!("complete"));
    assert_eq!(finished[0]["posts"], json!(delivered.len()));

    let (code, page) = server.call(TOKEN, "runs.output", json!({"session": "done"}));
    assert_eq!(code, 200, "{page}");
    let posts = page["posts"].as_array().unwrap();
    assert_eq!(posts.len(), delivered.len(), "{page}");
    assert_eq!(page["done"], json!(true));
    for (i, p) in posts.iter().enumerate() {
        assert_eq!(p["seq"], json!(i), "{page}");
    }
    assert_eq!(posts.last().unwrap()["type"], json!("complete"));
    assert_eq!(posts[0]["text"], delivered[0].json()["text"]);
    assert!(!page.to_string().contains(invoke_token), "a token in the history: {page}");
    let (_, tail) = server.call(TOKEN, "runs.output", json!({"session": "done", "from": 2}));
    assert_eq!(tail["posts"].as_array().unwrap().len(), delivered.len() - 2, "{tail}");
    assert_eq!(tail["next"], json!(delivered.len()));

    let (code, going) = server.call(TOKEN, "runs.output", json!({"session": "going", "from": 0}));
    assert_eq!(code, 200, "{going}");
    assert_eq!(going["done"], json!(false));
    assert_eq!(going["posts"][0]["text"], json!("waiting for go"));
    assert_eq!(server.call(TOKEN, "runs.output", json!({"session": "nope"})).0, 404);
    assert_eq!(server.call(TOKEN, "runs.output", json!({})).0, 400);
    assert_eq!(server.call(TOKEN, "runs.output", json!({"session": "done", "from": -1})).0, 400);

    std::fs::write(dir.join("proj").join("go"), "").unwrap();
    platform.wait_closed("going");
    poll("the going run to be listed as finished", || {
        let (_, list) = server.call(TOKEN, "runs", json!({}));
        (list["finished"].as_array().unwrap().len() == 2 && list["active"].as_array().unwrap().is_empty())
            .then_some(())
    });
}

/// A run going when the connector is ended by `sig` is, after a restart on
/// the same state dir, listed as finished with `outcome` (None: any) and
/// read to its end by `runs.output`.
fn run_history_survives(tag: &str, sig: nix::sys::signal::Signal, outcome: Option<&str>) {
    let dir = TempDir::new(tag);
    let _leftovers = Leftovers::of(&dir);
    let (cfg_path, env) = fake_project(&dir, None);
    let env = env_refs(&env);
    let mut server = Server::start_args(&[cfg_path.to_str().unwrap()], dir.path(), &env);
    let platform = Platform::start();
    let (code, body) = server.call(
        TOKEN,
        "invoke",
        json!({"agent": "fake", "prompt": "until go", "session": "cut", "callback": platform.url()}),
    );
    assert_eq!(code, 200, "{body}");
    poll("the run to post", || {
        platform.delivered().iter().any(|p| p.json()["sessionId"] == json!("cut")).then_some(())
    });
    let (_, going) = server.call(TOKEN, "runs.output", json!({"session": "cut", "from": 0}));
    assert_eq!(going["done"], json!(false), "{going}");
    server.signal_and_wait(sig, std::time::Duration::from_secs(20));
    drop(server);

    let server = Server::start_args(&[cfg_path.to_str().unwrap()], dir.path(), &env);
    let (code, list) = server.call(TOKEN, "runs", json!({}));
    assert_eq!(code, 200, "{list}");
    assert!(list["active"].as_array().unwrap().is_empty(), "{list}");
    let finished = list["finished"].as_array().unwrap();
    assert_eq!(finished.len(), 1, "the cut run is listed as finished: {list}");
    assert_eq!(finished[0]["session"], json!("cut"));
    if let Some(outcome) = outcome {
        assert_eq!(finished[0]["outcome"], json!(outcome), "{list}");
    }
    assert!(finished[0]["endedMs"].as_u64() >= finished[0]["startedMs"].as_u64(), "{list}");
    let (code, page) = server.call(TOKEN, "runs.output", json!({"session": "cut", "from": 0}));
    assert_eq!(code, 200, "{page}");
    assert_eq!(page["done"], json!(true), "{page}");
    let posts = page["posts"].as_array().unwrap();
    assert!(!posts.is_empty(), "{page}");
    assert_eq!(posts[0]["text"], json!("waiting for go"), "{page}");
    assert_eq!(finished[0]["posts"], json!(posts.len()), "{list}");
}

#[test]
fn a_run_cut_by_sigterm_is_listed_finished_and_read_to_its_end_after_a_restart() {
    run_history_survives("ops-history-term", nix::sys::signal::Signal::SIGTERM, None);
}

#[test]
fn a_run_cut_by_sigkill_is_closed_as_interrupted_after_a_restart() {
    run_history_survives("ops-history-kill", nix::sys::signal::Signal::SIGKILL, Some("interrupted"));
}
