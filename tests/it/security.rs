//! Secure by default on a public IP: tokens outside URLs (`Authorization:
//! Bearer`, the WebSocket subprotocol), `allowedOrigins`, the failed-token
//! limit, agent `permissions` passed to acpx, and secrets redacted in what
//! a run posts.

use crate::util::*;
use serde_json::{Value, json};
use std::io::{BufReader, Write};
use std::path::{Path, PathBuf};

const TOKEN: &str = "sec-token-7d1e0c9b8a7f6e5d4c3b2a1908f7e6d5";
const WRONG: &str = "wrong-token-0f1e2d3c4b5a69788796a5b4c3d2e1f0";

/// A connector serving project "p" with `extra` top-level config members.
fn serve(tag: &str, extra: Value) -> (TempDir, Server) {
    let dir = TempDir::new(tag);
    let proj = dir.join("proj");
    std::fs::create_dir_all(&proj).unwrap();
    let cfg = config(json!({"p": {"token": TOKEN, "dir": proj}}), Some(extra));
    let server = Server::start(dir.path(), &cfg);
    (dir, server)
}

/// POST `body` with extra header lines; (status, body).
fn post_with(addr: &str, headers: &[&str], body: &str) -> (u16, String) {
    let mut req = format!(
        "POST / HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n",
        body.len()
    );
    for h in headers {
        req.push_str(h);
        req.push_str("\r\n");
    }
    req.push_str("\r\n");
    req.push_str(body);
    let resp = raw(addr, req.as_bytes()).unwrap();
    (resp.status, resp.text())
}

/// A raw upgrade with extra header lines; the answer's head.
fn upgrade(addr: &str, target: &str, extra: &[&str]) -> Response {
    let mut headers = vec![
        "Upgrade: websocket".to_string(),
        "Connection: Upgrade".to_string(),
        "Sec-WebSocket-Version: 13".to_string(),
        format!("Sec-WebSocket-Key: {WS_KEY}"),
    ];
    headers.extend(extra.iter().map(|s| s.to_string()));
    let lines: Vec<&str> = headers.iter().map(String::as_str).collect();
    let mut s = connect(addr);
    s.write_all(&ws_upgrade_request(addr, target, Some(&lines))).unwrap();
    // A 101 comes back as its head (1xx), anything else whole.
    read_response(&mut BufReader::new(s)).unwrap()
}

#[test]
fn bearer_tokens_authenticate_and_must_agree_with_the_body() {
    let (_dir, server) = serve("sec-bearer", json!({}));
    let addr = &server.addr;
    let ping = |token: Option<&str>| {
        let mut body = json!({"v": 1, "action": "ping"});
        if let Some(t) = token {
            body["token"] = t.into();
        }
        body.to_string()
    };
    let bearer = format!("Authorization: Bearer {TOKEN}");
    let (status, body) = post_with(addr, &[&bearer], &ping(None));
    assert_eq!(status, 200, "{body}");
    let lower = format!("authorization: bearer  {TOKEN}");
    assert_eq!(post_with(addr, &[&lower], &ping(None)).0, 200, "the scheme in any case");
    assert_eq!(post_with(addr, &[&bearer], &ping(Some(TOKEN))).0, 200, "both, the same");
    assert_eq!(post_with(addr, &[], &ping(Some(TOKEN))).0, 200, "the body's token alone");
    let (status, body) = post_with(addr, &[&bearer], &ping(Some(WRONG)));
    assert_eq!((status, body.as_str()), (403, r#"{"error":"unauthorized"}"#), "both, differing");
    let wrong = format!("Authorization: Bearer {WRONG}");
    assert_eq!(post_with(addr, &[&wrong], &ping(None)).0, 403);
    assert_eq!(post_with(addr, &["Authorization: Basic dXNlcjpwYXNz"], &ping(None)).0, 403, "another scheme");
    let err = server.stderr();
    assert!(!err.contains(TOKEN) && !err.contains(WRONG), "a token in the log:\n{err}");
}

#[test]
fn the_websocket_takes_its_token_in_the_subprotocol_and_echoes_aion() {
    let (_dir, server) = serve("sec-wsproto", json!({}));
    let addr = &server.addr;
    let both = format!("Sec-WebSocket-Protocol: aion.token.{TOKEN}, aion");
    let head = upgrade(addr, "/ws", &[&both]);
    assert_eq!(head.status, 101);
    assert_eq!(head.header("sec-websocket-protocol"), Some("aion"), "the token is not echoed");
    // Only the token entry: echoed (a browser fails a handshake that picks none).
    let only = format!("Sec-WebSocket-Protocol: aion.token.{TOKEN}");
    let head = upgrade(addr, "/ws", &[&only]);
    assert_eq!(head.status, 101);
    assert_eq!(head.header("sec-websocket-protocol"), Some(format!("aion.token.{TOKEN}").as_str()));
    // The query's token keeps working, with no protocol echoed when none was offered.
    let head = upgrade(addr, &format!("/ws?token={TOKEN}"), &[]);
    assert_eq!(head.status, 101);
    assert_eq!(head.header("sec-websocket-protocol"), None);
    let head = upgrade(addr, &format!("/ws?token={TOKEN}"), &["Sec-WebSocket-Protocol: aion"]);
    assert_eq!((head.status, head.header("sec-websocket-protocol")), (101, Some("aion")));
    // Wrong, or disagreeing with the query: 403 before the upgrade.
    let wrong = format!("Sec-WebSocket-Protocol: aion, aion.token.{WRONG}");
    let resp = upgrade(addr, "/ws", &[&wrong]);
    assert_eq!((resp.status, resp.text().as_str()), (403, r#"{"error":"unauthorized"}"#));
    assert_eq!(upgrade(addr, &format!("/ws?token={TOKEN}"), &[&wrong]).status, 403);
    assert_eq!(upgrade(addr, &format!("/ws?token={WRONG}&session=x"), &[]).status, 403);
    // A real client: tungstenite checks the echoed protocol and the shell answers.
    use tungstenite::client::IntoClientRequest;
    let mut req = format!("ws://{addr}/ws").into_client_request().unwrap();
    req.headers_mut().insert("Sec-WebSocket-Protocol", format!("aion, aion.token.{TOKEN}").parse().unwrap());
    let (mut ws, resp) = tungstenite::client(req, connect(addr)).expect("handshake");
    assert_eq!(resp.headers()["sec-websocket-protocol"], "aion");
    ws.send(tungstenite::Message::text("echo sub$((6*7))proto\n")).unwrap();
    let mut seen = String::new();
    assert!(
        eventually(DEADLINE, || {
            let _ = ws.get_mut().set_read_timeout(Some(std::time::Duration::from_millis(200)));
            if let Ok(m) = ws.read() {
                seen.push_str(&String::from_utf8_lossy(&m.into_data()));
            }
            seen.contains("sub42proto")
        }),
        "the shell never answered: {seen:?}"
    );
    let err = server.stderr();
    assert!(!err.contains(TOKEN) && !err.contains(WRONG), "a token in the log:\n{err}");
}

#[test]
fn allowed_origins_refuse_other_browsers_before_the_upgrade() {
    let (_dir, server) =
        serve("sec-origin", json!({"allowedOrigins": ["https://app.example.com", "http://localhost:3000/"]}));
    let addr = &server.addr;
    let target = format!("/ws?token={TOKEN}");
    let resp = upgrade(addr, &target, &["Origin: https://evil.example.com"]);
    assert_eq!((resp.status, resp.text().as_str()), (403, r#"{"error":"origin not allowed"}"#));
    assert_eq!(upgrade(addr, &target, &["Origin: null"]).status, 403);
    assert_eq!(upgrade(addr, &target, &["Origin: https://APP.example.com"]).status, 101, "case-insensitive");
    assert_eq!(upgrade(addr, &target, &["Origin: http://localhost:3000"]).status, 101);
    assert_eq!(upgrade(addr, &target, &[]).status, 101, "no Origin: no browser");
    // Without the setting, any origin (the original's behaviour).
    let (_dir2, open) = serve("sec-origin-open", json!({}));
    assert_eq!(upgrade(&open.addr, &target, &["Origin: https://evil.example.com"]).status, 101);
    // A bad setting is a problem named by its path.
    let dir = TempDir::new("sec-origin-bad");
    let cfg = config(
        json!({"p": {"token": TOKEN, "dir": dir.path()}}),
        Some(json!({"allowedOrigins": ["app.example.com"]})),
    );
    write(dir.join("aion.config.json"), cfg);
    let (code, _, err) = run(&["aion.config.json"], dir.path(), &[]);
    assert_ne!(code, 0);
    assert!(err.contains("allowedOrigins[0]: expected an origin"), "{err}");
}

#[test]
fn failed_tokens_past_the_limit_get_429_with_one_log_line_each() {
    let (_dir, server) = serve("sec-fail", json!({"limits": {"failedTokensPerMinute": 3}}));
    let addr = &server.addr;
    for _ in 0..3 {
        assert_eq!(server.call(WRONG, "ping", json!({})).0, 403);
    }
    // Past the limit: refused whatever the token, the WebSocket too.
    let (status, body) = server.call(TOKEN, "ping", json!({}));
    assert_eq!((status, body), (429, json!({"error": "too many failed tokens"})));
    assert_eq!(upgrade(addr, &format!("/ws?token={TOKEN}"), &[]).status, 429);
    assert_eq!(get(addr, "/healthz"), 200, "healthz needs no token");
    let err = server.wait_stderr("5 failed token lines", |e| e.matches("failed token from").count() == 5);
    let lines: Vec<&str> = err.lines().filter(|l| l.contains("failed token")).collect();
    for l in &lines {
        assert!(l.contains("[INFO] failed token from 127.0.0.1 action="), "{l}");
    }
    assert_eq!(lines.iter().filter(|l| l.contains(" status=403 ")).count(), 3, "{lines:?}");
    assert_eq!(lines.iter().filter(|l| l.contains(" status=429 ")).count(), 2, "{lines:?}");
    assert!(!err.contains(TOKEN) && !err.contains(WRONG), "a token in the log:\n{err}");

    // Loopback exempt: never 429.
    let (_dir2, exempt) = serve(
        "sec-fail-exempt",
        json!({"limits": {"failedTokensPerMinute": 1, "failedTokensExemptLoopback": true}}),
    );
    for _ in 0..3 {
        assert_eq!(exempt.call(WRONG, "ping", json!({})).0, 403);
    }
    assert_eq!(exempt.call(TOKEN, "ping", json!({})).0, 200);
}

fn get(addr: &str, target: &str) -> u16 {
    let req = format!("GET {target} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    raw(addr, req.as_bytes()).unwrap().status
}

/// A connector whose agents run the fake acpx (logging its argv to `log`).
struct AgentRig {
    _dir: TempDir,
    log: PathBuf,
    server: Server,
}

fn agent_rig(tag: &str, agents: Value) -> AgentRig {
    agent_rig_with(tag, json!({"agents": agents}))
}

/// [`agent_rig`] with project "p"'s members (but `token`, `dir`) from `project`.
fn agent_rig_with(tag: &str, project: Value) -> AgentRig {
    let dir = TempDir::new(tag);
    let proj = dir.join("proj");
    std::fs::create_dir_all(&proj).unwrap();
    let bin = fake_acpx_bin(dir.path());
    let log = dir.join("acpx.log");
    let mut p = json!({"token": TOKEN, "dir": proj});
    p.as_object_mut().unwrap().extend(project.as_object().unwrap().clone());
    let cfg = config(json!({ "p": p }), None);
    let path = dir.join("aion.config.json");
    write(&path, cfg);
    let env = [("PATH", path_with(&bin)), ("FAKE_ACPX_LOG", log.display().to_string())];
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let server = Server::start_args(&[path.to_str().unwrap()], dir.path(), &env);
    AgentRig { _dir: dir, log, server }
}

fn main_argv(log: &Path, prompt: &str) -> Vec<String> {
    poll("the fake acpx to log its command", || {
        acpx_calls(log)
            .into_iter()
            .find(|c| c.argv.last().map(String::as_str) == Some(prompt))
            .map(|c| c.argv)
    })
}

#[test]
fn agent_permissions_reach_acpx_as_its_flag() {
    let rig = agent_rig(
        "sec-perm",
        json!({
            "all": {},
            "reads": {"permissions": "approve-reads"},
            "none": {"permissions": "deny-all", "mode": "exec"},
            "every": {"permissions": "approve-all"},
        }),
    );
    for (agent, flag) in [
        ("all", "--approve-all"),
        ("reads", "--approve-reads"),
        ("none", "--deny-all"),
        ("every", "--approve-all"),
    ] {
        let prompt = format!("hello {agent}");
        let (status, body) =
            rig.server.call(TOKEN, "invoke", json!({"agent": agent, "prompt": prompt, "session": agent}));
        assert_eq!(status, 200, "{body}");
        let argv = main_argv(&rig.log, &prompt);
        let flags: Vec<&String> = argv
            .iter()
            .filter(|a| ["--approve-all", "--approve-reads", "--deny-all"].contains(&a.as_str()))
            .collect();
        assert_eq!(flags, [flag], "{agent}: {argv:?}");
        assert_eq!(argv[..5].iter().filter(|a| *a == flag).count(), 1, "a leading option: {argv:?}");
    }
    // A bad value is a problem named by its JSON path.
    let dir = TempDir::new("sec-perm-bad");
    let cfg = config(
        json!({"p": {"token": TOKEN, "dir": dir.path(), "agents": {"x": {"permissions": "ask"}}}}),
        None,
    );
    write(dir.join("aion.config.json"), cfg);
    let (code, _, err) = run(&["aion.config.json"], dir.path(), &[]);
    assert_ne!(code, 0);
    assert!(
        err.contains(r#"projects.p.agents.x.permissions: expected "approve-all", "approve-reads" or "deny-all", found "ask""#),
        "{err}"
    );
}

#[test]
fn an_agent_env_value_the_agent_prints_arrives_redacted() {
    let rig = agent_rig(
        "sec-redact",
        json!({"leaky": {"env": {"API_KEY": KEY, "SHORT": "abc"}}, "short": {"env": {"SHORT": "abc"}}}),
    );
    let platform = Platform::start();
    let (bodies, all) = invoke_to_close(
        &rig,
        &platform,
        json!({"agent": "leaky", "prompt": "say-env API_KEY", "session": "r1"}),
    );
    assert!(!all.contains(KEY), "the key was posted: {all}");
    let said = "API_KEY=[redacted] again [redacted]";
    assert!(bodies.iter().any(|b| b["text"] == said), "{bodies:?}");
    assert_eq!(bodies.last().unwrap()["summary"], said, "{bodies:?}");
    // Values shorter than 8 characters are left alone (see the README).
    let (status, _) = rig.server.call(
        TOKEN,
        "invoke",
        json!({"agent": "short", "prompt": "say-env SHORT", "session": "r2", "callback": platform.url()}),
    );
    assert_eq!(status, 200);
    let bodies = check_run(&platform.wait_closed("r2"), TOKEN);
    assert_eq!(bodies.last().unwrap()["summary"], "SHORT=abc again abc");
    // The live stream too.
    let (status, text) = rig.server.post(
        &json!({"v": 1, "action": "invoke", "token": TOKEN,
            "payload": {"agent": "leaky", "prompt": "say-env API_KEY", "session": "r3", "stream": true}})
        .to_string(),
    );
    assert_eq!(status, 200);
    assert!(!text.contains(KEY) && text.contains(said), "{text}");
    // A failing agent's stderr: in the error post and the run's log line.
    let (status, _) = rig.server.call(
        TOKEN,
        "invoke",
        json!({"agent": "leaky", "prompt": "say-env-fail API_KEY", "session": "r4", "callback": platform.url()}),
    );
    assert_eq!(status, 200);
    let bodies = check_run(&platform.wait_closed("r4"), TOKEN);
    let error = bodies.last().unwrap()["error"].as_str().unwrap_or_default().to_string();
    assert!(error.contains("leak [redacted]"), "{bodies:?}");
    let err = rig.server.wait_stderr("the r4 run's end", |e| e.contains("run r4 project=p ended"));
    assert!(err.contains("leak [redacted]"), "{err}");
    assert!(!err.contains(KEY), "the key is in the log:\n{err}");
}

const KEY: &str = "sk-test-5f4e3d2c1b0a99887766";

/// The texts of a run's output posts (from their bodies), joined.
fn streamed_text(bodies: &[Value]) -> String {
    bodies.iter().filter_map(|b| b["text"].as_str()).collect()
}

/// Invokes `payload` with `platform` as the callback (answered 200) and waits
/// for the run to close: the bodies of its posts (through `check_run`) and
/// the posts as they were sent, joined.
fn invoke_to_close(rig: &AgentRig, platform: &Platform, mut payload: Value) -> (Vec<Value>, String) {
    let session = payload["session"].as_str().unwrap().to_string();
    payload["callback"] = json!(platform.url());
    let (status, body) = rig.server.call(TOKEN, "invoke", payload);
    assert_eq!(status, 200, "{body}");
    let posts = platform.wait_closed(&session);
    let bodies = check_run(&posts, TOKEN);
    let all: String = posts.iter().map(|p| String::from_utf8_lossy(&p.body).into_owned()).collect();
    (bodies, all)
}

#[test]
fn a_secret_split_across_two_chunks_arrives_redacted() {
    let rig = agent_rig("sec-split", json!({"leaky": {"env": {"API_KEY": KEY}}}));
    let platform = Platform::start();
    // Cut in every third place, each in its own run: the stream never shows it.
    for (n, cut) in [1, 5, 14, KEY.len() - 1].into_iter().enumerate() {
        let session = format!("s{n}");
        let prompt = format!("chunks before {}|{} after|!", &KEY[..cut], &KEY[cut..]);
        let (bodies, all) =
            invoke_to_close(&rig, &platform, json!({"agent": "leaky", "prompt": prompt, "session": session}));
        assert!(!all.contains(&KEY[..cut.max(KEY.len() - cut)]), "a part of the key was posted: {all}");
        assert_eq!(streamed_text(&bodies), "before [redacted] after!", "{bodies:?}");
        assert_eq!(bodies.last().unwrap()["summary"], "before [redacted] after!", "{bodies:?}");
    }
    // Text that cannot begin the key is not held back ("before " is its own
    // post); a piece that could waits for the next ("sk-test-" goes with "!").
    let (status, text) = rig.server.post(
        &json!({"v": 1, "action": "invoke", "token": TOKEN,
            "payload": {"agent": "leaky", "prompt": format!("chunks before |{}|!", &KEY[..8]), "session": "live", "stream": true}})
        .to_string(),
    );
    assert_eq!(status, 200);
    let lines: Vec<Value> = text.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    let outputs: Vec<&str> =
        lines.iter().filter(|l| l["type"] == "output").map(|l| l["text"].as_str().unwrap()).collect();
    assert_eq!(outputs, ["before ".to_string(), format!("{}!", &KEY[..8])], "{text}");
    let seqs: Vec<u64> = lines.iter().map(|l| l["seq"].as_u64().unwrap()).collect();
    assert_eq!(seqs, (0..lines.len() as u64).collect::<Vec<_>>(), "{text}");
    assert_eq!(lines.last().unwrap()["type"], "complete", "{text}");
}

#[test]
fn repo_tokens_and_url_credentials_the_agent_prints_arrive_redacted() {
    let rig = agent_rig_with("sec-repo", json!({"allowFileUrls": true, "agents": {"a": {}}}));
    let upstream = rig._dir.join("upstream");
    repo_with(&upstream, &[("a.txt", "a\n")]);
    let platform = Platform::start();
    const TOK: &str = "ghp_0123456789abcdefGHIJ";
    const PASSWORD: &str = "glpat-9z8y7x6w5v4u";
    let url = format!("file://oauth2:{PASSWORD}@{}", upstream.display());
    let repos = json!([{"name": "mapped", "token": TOK}, {"name": "up", "url": url}]);
    std::fs::create_dir_all(rig._dir.join("proj/mapped")).unwrap();
    let prompt = format!(
        "chunks token {}|{} and password {}|{}.",
        &TOK[..6],
        &TOK[6..],
        &PASSWORD[..3],
        &PASSWORD[3..]
    );
    let (bodies, all) = invoke_to_close(
        &rig,
        &platform,
        json!({"agent": "a", "prompt": prompt, "session": "r1", "repos": repos}),
    );
    assert!(!all.contains(TOK) && !all.contains(PASSWORD), "a credential was posted: {all}");
    let said = "token [redacted] and password [redacted].";
    assert_eq!(streamed_text(&bodies), said, "{bodies:?}");
    assert_eq!(bodies.last().unwrap()["summary"], said, "{bodies:?}");
}

#[test]
fn an_event_carrying_a_secret_arrives_redacted() {
    let rig =
        agent_rig_with("sec-event", json!({"events": true, "agents": {"leaky": {"env": {"API_KEY": KEY}}}}));
    let platform = Platform::start();
    let (bodies, all) = invoke_to_close(
        &rig,
        &platform,
        json!({"agent": "leaky", "prompt": format!("event run with {KEY} now"), "session": "e1"}),
    );
    assert!(!all.contains(KEY), "the key was posted: {all}");
    let event =
        bodies.iter().find(|b| b.get("event").is_some()).unwrap_or_else(|| panic!("no event: {bodies:?}"));
    assert_eq!(event["event"]["title"], "run with [redacted] now", "{event}");
}

#[test]
fn check_dirs_prints_each_project_dir_resolved_as_serving_does() {
    let dir = TempDir::new("sec-dirs");
    let (a, b) = (dir.join("a"), dir.join("state/rel"));
    std::fs::create_dir_all(&a).unwrap();
    std::fs::create_dir_all(&b).unwrap();
    let cfg = config(json!({"p": {"token": TOKEN, "dir": a}, "q": {"token": WRONG, "dir": "rel"}}), None);
    write(dir.join("aion.config.json"), cfg);
    let (code, out, err) =
        run(&["check", "--dirs", dir.join("aion.config.json").to_str().unwrap()], &dir.join("state"), &[]);
    assert_eq!(code, 0, "{err}");
    let mut got: Vec<&str> = out.lines().collect();
    got.sort();
    assert_eq!(got, [a.to_str().unwrap(), b.to_str().unwrap()], "{out}");
    let (code, _, err) = run(&["check", "--dirs", "--nope"], dir.path(), &[]);
    assert_eq!(code, 2, "{err}");
}

#[test]
fn install_sh_names_project_dirs_the_service_cannot_write_and_changes_none() {
    if !std::process::Command::new("id").arg("nobody").output().is_ok_and(|o| o.status.success()) {
        return skip(
            "install_sh_names_project_dirs_the_service_cannot_write_and_changes_none",
            "no user nobody",
        );
    }
    let dir = TempDir::new("sec-install-dirs");
    let state = dir.join("state");
    let outside = dir.join("srv/a b");
    for d in [&state.join("workspace"), &outside] {
        std::fs::create_dir_all(d).unwrap();
    }
    let bin = dir.join("prefix/bin");
    std::fs::create_dir_all(&bin).unwrap();
    std::os::unix::fs::symlink(env!("CARGO_BIN_EXE_aion-connector"), bin.join("aion-connector")).unwrap();
    let cfg = dir.join("aion.config.json");
    write(
        &cfg,
        config(
            json!({"in": {"token": TOKEN, "dir": "workspace"}, "out": {"token": WRONG, "dir": outside},
                   "again": {"token": "again-token-0123456789abcdef0123456789", "dir": outside}}),
            None,
        ),
    );
    let mode =
        |p: &Path| std::fs::metadata(p).map(|m| (std::os::unix::fs::MetadataExt::uid(&m), m.permissions()));
    let before = mode(&outside).unwrap();
    let script = format!(
        ". {}/install.sh; PREFIX={}; CONFIG={}; STATE_DIR={}; SERVICE_USER=nobody; advise_project_dirs",
        env!("CARGO_MANIFEST_DIR"),
        dir.join("prefix").display(),
        cfg.display(),
        state.display()
    );
    let out = std::process::Command::new("sh")
        .args(["-c", &script])
        .env("AION_INSTALL_SOURCE_ONLY", "1")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{text}");
    let shown = outside.display().to_string();
    assert!(text.contains(&format!("ReadWritePaths=\"{shown}\"\n")), "{text}");
    assert!(text.contains("chown -R nobody:") && text.contains(&format!("'{shown}'")), "{text}");
    assert_eq!(text.matches(&format!("  {shown}\n")).count(), 1, "listed once: {text}");
    assert!(!text.contains("workspace"), "a dir in the state dir was named: {text}");
    assert_eq!(mode(&outside).unwrap(), before, "install.sh changed the dir");
}
