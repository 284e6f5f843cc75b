//! Agent runs (issue 3): `invoke` / `stop` against the real binary, with a
//! fake `acpx` (tests/fixtures/fake-acpx) first on PATH and a fake platform
//! (tiny_http) recording the signed callback posts.

use crate::util::*;
use serde_json::{Value, json};
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// The project's token: the signing key of every post. Never logged.
const TOKEN: &str = "proj-token-3c9e1f5a7b2d4e6f8091a2b3c4d5e6f7";
/// The invoke payload's token: echoed in every body. Never logged.
const INVOKE_TOKEN: &str = "invoke-token-9f8e7d6c5b4a39281706";

/// One connector serving project "p" (dir `proj`) with the fake acpx first on PATH.
struct Rig {
    dir: TempDir,
    proj: PathBuf,
    log: PathBuf,
    cfg: PathBuf,
    env: Vec<(String, String)>,
    server: Server,
}

impl Rig {
    fn new(tag: &str, agents: Value, limits: Value) -> Rig {
        Rig::with(tag, agents, limits, &[])
    }

    /// `env` is added to the connector's environment (PATH: the fake first, unless given).
    fn with(tag: &str, agents: Value, limits: Value, env: &[(&str, &str)]) -> Rig {
        let dir = TempDir::new(tag);
        let proj = dir.join("proj");
        std::fs::create_dir_all(&proj).unwrap();
        let bin = fake_acpx_bin(dir.path());
        let log = dir.join("acpx.log");
        let cfg = dir.join("aion.config.json");
        let config = json!({
            "port": 0,
            "host": "127.0.0.1",
            "limits": limits,
            "projects": {"p": {"token": TOKEN, "dir": proj, "agents": agents, "allowFileUrls": true}}
        });
        std::fs::write(&cfg, config.to_string()).unwrap();
        let mut all = vec![
            ("PATH".to_string(), path_with(&bin)),
            ("FAKE_ACPX_LOG".to_string(), log.display().to_string()),
        ];
        for (k, v) in env {
            all.retain(|(x, _)| x != k);
            all.push((k.to_string(), v.to_string()));
        }
        let server = spawn_server(dir.path(), &cfg, &all);
        Rig { dir, proj, log, cfg, env: all, server }
    }

    /// A new connector process on the same config, state dir and environment.
    fn restart(&mut self) {
        self.server = spawn_server(self.dir.path(), &self.cfg, &self.env);
    }

    fn invoke(&self, payload: Value) -> (u16, Value) {
        self.server.call(TOKEN, "invoke", payload)
    }

    /// invoke, expecting {"ok":true,"sessionId":S}.
    fn start(&self, payload: Value) {
        let session = payload["session"].as_str().unwrap_or("default").to_string();
        let (status, body) = self.invoke(payload);
        assert_eq!((status, &body), (200, &json!({"ok": true, "sessionId": session})), "invoke");
    }

    fn calls(&self) -> Vec<AcpxCall> {
        acpx_calls(&self.log)
    }

    /// The main command's log entry (the last call whose prompt is `prompt`).
    fn main_call(&self, prompt: &str) -> AcpxCall {
        poll("the fake acpx to log its main command", || {
            self.calls().into_iter().rev().find(|c| c.argv.last().map(String::as_str) == Some(prompt))
        })
    }

    fn outbox(&self) -> PathBuf {
        self.dir.join("state/aion-connector/outbox")
    }

    /// Whether a stream's `.pos` file records a delivered post (its second
    /// 8-byte word, the seq after the last delivered one, is not 0).
    fn delivered_seqs(&self) -> bool {
        std::fs::read_dir(self.outbox()).into_iter().flatten().filter_map(Result::ok).any(|e| {
            e.file_name().to_string_lossy().ends_with(".pos")
                && std::fs::read(e.path())
                    .is_ok_and(|b| b.len() == 16 && u64::from_le_bytes(b[8..].try_into().unwrap()) > 0)
        })
    }

    fn spool_files(&self) -> Vec<String> {
        std::fs::read_dir(self.outbox())
            .map(|d| {
                d.filter_map(Result::ok)
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .filter(|n| n != ".lock") // the spool directory's lock, not a post
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Neither token is in the connector's stderr.
    fn assert_no_tokens(&self) {
        let err = self.server.stderr();
        assert!(!err.contains(TOKEN), "the project token is in stderr:\n{err}");
        assert!(!err.contains(INVOKE_TOKEN), "the invoke token is in stderr:\n{err}");
    }

    fn assert_log_mentions(&self, what: &str) {
        self.wait_log(what);
    }

    fn wait_log(&self, what: &str) -> String {
        self.server.wait_stderr(what, |s| s.contains(what))
    }
}

impl Drop for Rig {
    fn drop(&mut self) {
        let _ = self.server.child.kill();
        let _ = self.server.child.wait();
        // Whatever the fake acpx left (a killed connector leaves its runs behind).
        kill_marked(&format!("FAKE_ACPX_LOG={}", self.log.display()));
    }
}

fn spawn_server(dir: &Path, cfg: &Path, env: &[(String, String)]) -> Server {
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    Server::start_args(&[cfg.to_str().unwrap()], dir, &env)
}

fn fake() -> Value {
    json!({"fake": {"description": "Fake"}})
}

fn strings(v: &[&str]) -> Vec<String> {
    v.iter().map(|s| s.to_string()).collect()
}

fn keys(v: &Value) -> BTreeSet<String> {
    v.as_object().unwrap().keys().cloned().collect()
}

fn key_set(k: &[&str]) -> BTreeSet<String> {
    k.iter().map(|s| s.to_string()).collect()
}

/// The run's process group (and the child the fake logged) is gone within `within`.
fn assert_group_gone(rig: &Rig, call: &AcpxCall, within: Duration) {
    let gone = eventually(within, || group_members(call.pgid).is_empty() && !alive(call.pid));
    assert!(gone, "process group {} still has {:?}", call.pgid, group_members(call.pgid));
    if let Ok(child) = std::fs::read_to_string(format!("{}.child", rig.log.display())) {
        let child: i32 = child.trim().parse().unwrap();
        assert!(eventually(within, || !alive(child)), "the agent's child {child} survived");
    }
}

fn the_error(bodies: &[Value]) -> String {
    let last = bodies.last().unwrap();
    assert_eq!(keys(last), key_set(&["sessionId", "seq", "error", "token"]), "error body {last}");
    last["error"].as_str().unwrap().to_string()
}

#[test]
fn invoke_answers_at_once_and_checks_its_payload() {
    let rig = Rig::new("inv", fake(), json!({"stopGraceSeconds": 1}));
    let platform = Platform::start();
    let body = |payload: Value| rig.server.post(&request_body(TOKEN, "invoke", payload));

    let t = Instant::now();
    let answer =
        body(json!({"agent": "fake", "prompt": "sleep", "session": "s1", "callback": platform.url()}));
    assert_eq!(answer, (200, r#"{"ok":true,"sessionId":"s1"}"#.to_string()));
    assert!(t.elapsed() < Duration::from_secs(2), "invoke waited for the run: {:?}", t.elapsed());

    // Default session.
    let (status, v) = rig.invoke(json!({"agent": "fake", "prompt": "hello"}));
    assert_eq!((status, v), (200, json!({"ok": true, "sessionId": "default"})));

    let unknown = (400, r#"{"error":"unknown agent"}"#.to_string());
    assert_eq!(body(json!({"agent": "nope", "prompt": "x"})), unknown);
    assert_eq!(body(json!({"prompt": "x"})), unknown);
    let empty = (400, r#"{"error":"empty prompt"}"#.to_string());
    assert_eq!(body(json!({"agent": "fake", "prompt": ""})), empty);
    assert_eq!(body(json!({"agent": "fake", "prompt": " \n\t  "})), empty);
    assert_eq!(body(json!({"agent": "fake"})), empty);
    for bad in [
        json!({"agent": "fake", "prompt": "x", "session": "-rf"}),
        json!({"agent": "fake", "prompt": "x", "session": ""}),
        json!({"agent": "fake", "prompt": "x", "session": "s".repeat(201)}),
        json!({"agent": "fake", "prompt": "x", "callback": "ftp://example.invalid/"}),
        json!({"agent": "fake", "prompt": "x", "callback": "not a url"}),
        json!({"agent": "fake", "prompt": 5}),
        json!({"agent": "fake", "prompt": "x", "repos": [{"name": "up", "url": "https://h/.hidden.git"}]}),
        json!({"agent": "fake", "prompt": "x", "repos": [{"name": "r", "url": "-upload-pack=x"}]}),
        json!({"agent": "fake", "prompt": "x", "repos": "r"}),
        json!({"agent": "fake", "prompt": "x", "system": 1}),
        json!({"agent": "fake", "prompt": "x", "memory": ["m"]}),
        json!({"agent": "fake", "prompt": "x", "instructions": {}}),
        json!({"agent": "fake", "prompt": "x", "history": "h"}),
        json!({"agent": "fake", "prompt": "x", "history": [{"text": "ok"}, "not an object"]}),
        json!({"agent": "fake", "prompt": "x", "system": "s".repeat(140_000)}),
    ] {
        let (status, v) = rig.invoke(bad.clone());
        assert_eq!((status, v["error"].as_str()), (400, Some("bad payload")), "{bad} → {v}");
    }
    // The problem is named.
    let (_, v) = rig.invoke(json!({"agent": "fake", "prompt": "x", "history": [{"text": "ok"}, 5]}));
    assert_eq!(v["detail"], "payload.history[1] must be an object");
    let (_, v) = rig.invoke(json!({"agent": "fake", "prompt": "x", "system": 1}));
    assert_eq!(v["detail"], "payload.system must be a string");

    let (status, v) = rig.server.call(TOKEN, "stop", json!({"session": "s1"}));
    assert_eq!((status, v), (200, json!({"ok": true, "stopping": true})));
    let bodies = check_run(&platform.wait_closed("s1"), TOKEN);
    assert_eq!(the_error(&bodies), "stopped");
    let (status, v) = rig.server.call(TOKEN, "stop", json!({"session": "s1"}));
    assert_eq!((status, v), (200, json!({"ok": true, "stopping": false})));
    rig.assert_no_tokens();
}

/// A callback whose port is out of range is refused before anything runs,
/// with an error that says why (it could never be delivered to).
#[test]
fn a_callback_with_a_port_out_of_range_is_a_400() {
    let rig = Rig::new("cbport", fake(), json!({}));
    for url in ["http://127.0.0.1:99999/x", "http://127.0.0.1:0/x", "https://h:65536/"] {
        let (status, v) =
            rig.invoke(json!({"agent": "fake", "prompt": "x", "session": "p", "callback": url}));
        assert_eq!((status, v["error"].as_str()), (400, Some("bad payload")), "{url} → {v}");
        assert_eq!(
            v["detail"], "payload.callback must be an http:// or https:// URL with a host and a port 1-65535",
            "{url} → {v}"
        );
    }
    let (status, v) = rig.server.call(TOKEN, "stop", json!({"session": "p"}));
    assert_eq!((status, v), (200, json!({"ok": true, "stopping": false})), "a run was started");
    rig.assert_no_tokens();
}

#[test]
fn session_mode_argv_is_ensure_then_the_prompt_as_one_argument() {
    let rig = Rig::new("argv", fake(), json!({}));
    let platform = Platform::start();
    let prompt = r#"--help "double" 'single' $(touch pwned) `touch pwned2`; a  b > out"#;
    rig.start(json!({
        "agent": "fake", "prompt": prompt, "session": "sess-A", "model": "m-1",
        "callback": format!("{}/", platform.url()), "token": INVOKE_TOKEN,
    }));
    // The fake echoes the prompt as plain text: part of the summary, never posted.
    let bodies = check_run(&platform.wait_closed("sess-A"), TOKEN);
    assert_eq!(
        bodies,
        [json!({"sessionId": "sess-A", "summary": prompt, "changed": [], "token": INVOKE_TOKEN, "seq": 0})]
    );
    let calls = rig.calls();
    assert_eq!(calls.len(), 2, "{calls:?}");
    let dir = rig.proj.to_str().unwrap();
    assert_eq!(calls[0].argv, strings(&["--cwd", dir, "fake", "sessions", "ensure", "--name", "sess-A"]));
    assert_eq!(
        calls[1].argv,
        strings(&[
            "--cwd",
            dir,
            "--format",
            "json",
            "--approve-all",
            "--ttl",
            "10",
            "--model",
            "m-1",
            "fake",
            "-s",
            "sess-A",
            "--",
            prompt
        ])
    );
    assert!(!calls[0].run_id.is_empty(), "AION_RUN_ID not set");
    assert_eq!(calls[0].run_id, calls[1].run_id);
    assert!(calls[0].start_ns <= calls[1].start_ns);
    for c in &calls {
        assert_eq!(Path::new(&c.cwd), rig.proj, "cwd");
        assert_eq!(c.pgid, c.pid, "not the leader of its own process group: {c:?}");
        assert_ne!(c.pgid, nix::unistd::getpgrp().as_raw());
    }
    assert!(!rig.proj.join("pwned").exists() && !rig.proj.join("pwned2").exists(), "a shell ran the prompt");
    assert!(!rig.proj.join("out").exists());
    // A second run of the session gets a new run id.
    rig.start(json!({"agent": "fake", "prompt": "again", "session": "sess-A", "callback": platform.url()}));
    poll("the second run to close", || platform.delivered().iter().filter(|p| p.closes()).nth(1).map(|_| ()));
    let again = rig.main_call("again");
    assert_ne!(again.run_id, calls[1].run_id);
    assert_eq!(
        again.argv,
        strings(&[
            "--cwd",
            dir,
            "--format",
            "json",
            "--approve-all",
            "--ttl",
            "10",
            "fake",
            "-s",
            "sess-A",
            "--",
            "again"
        ])
    );
    rig.assert_no_tokens();
}

#[test]
fn exec_mode_and_command_templates_build_their_own_argv() {
    let agents = json!({
        "ex": {"mode": "exec", "env": {"FAKE_ACPX_PROBE": "from the agent env"}},
        "tpl": {"command": ["acpx", "custom", "{agent}", "s={session}", "m={model}", "<{prompt}>"]},
        "abs": {"command": [Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/fake-acpx"), "{prompt}"]},
    });
    let rig = Rig::new("exec", agents, json!({}));
    let platform = Platform::start();
    let prompt = "-- one 'argument' \"only\"";
    rig.start(
        json!({"agent": "ex", "prompt": prompt, "session": "e", "model": "mx", "callback": platform.url()}),
    );
    rig.start(
        json!({"agent": "tpl", "prompt": prompt, "session": "t", "model": "my", "callback": platform.url()}),
    );
    rig.start(json!({"agent": "abs", "prompt": "plain", "session": "a", "callback": platform.url()}));
    let e = check_run(&platform.wait_closed("e"), TOKEN);
    let t = check_run(&platform.wait_closed("t"), TOKEN);
    let a = check_run(&platform.wait_closed("a"), TOKEN);
    assert_eq!(e.last().unwrap()["summary"], prompt);
    assert_eq!(e.len(), 1, "acpx's plain text was posted: {e:?}");
    // A `command` agent's stdout lines are posted as they are.
    assert_eq!(t.len(), 2, "{t:?}");
    assert_eq!(t[0]["text"], format!("<{prompt}>"));
    assert_eq!(t.last().unwrap()["summary"], format!("<{prompt}>"));
    assert_eq!(a[0]["text"], "plain");
    assert_eq!(a.last().unwrap()["summary"], "plain");
    let calls = rig.calls();
    assert_eq!(calls.len(), 3, "exec and templates run no `sessions ensure`: {calls:?}");
    let ex = rig.main_call(prompt);
    let dir = rig.proj.to_str().unwrap();
    assert_eq!(
        ex.argv,
        strings(&[
            "--cwd",
            dir,
            "--format",
            "json",
            "--approve-all",
            "--model",
            "mx",
            "ex",
            "exec",
            "--",
            prompt
        ])
    );
    assert_eq!(ex.probe, "from the agent env");
    let tpl = rig.main_call(&format!("<{prompt}>"));
    assert_eq!(tpl.argv, strings(&["custom", "tpl", "s=t", "m=my", &format!("<{prompt}>")]));
    assert_eq!(tpl.probe, "", "the env of another agent leaked");
    assert_eq!(rig.main_call("plain").argv, strings(&["plain"]));
    for c in &calls {
        assert_eq!(c.pgid, c.pid);
        assert!(!c.run_id.is_empty());
    }
    rig.assert_no_tokens();
}

#[test]
fn a_prompt_is_not_templated_again() {
    // The prompt is data: placeholders inside it stay as they are.
    let agents = json!({"tpl": {"command": ["acpx", "{session}", "{prompt}"]}});
    let rig = Rig::new("tpl2", agents, json!({}));
    let platform = Platform::start();
    let prompt = "say {session} and {model} and {agent} and {prompt}";
    rig.start(json!({"agent": "tpl", "prompt": prompt, "session": "S", "callback": platform.url()}));
    check_run(&platform.wait_closed("S"), TOKEN);
    let calls = rig.calls();
    assert_eq!(calls.len(), 1);
    assert_eq!(calls[0].argv, strings(&["S", prompt]), "placeholders inside the prompt were substituted");
}

#[test]
fn ten_thousand_chunks_arrive_in_order_signed_and_complete_with_the_summary() {
    let rig = Rig::new("lines", fake(), json!({}));
    let platform = Platform::start();
    let t = Instant::now();
    rig.start(json!({"agent": "fake", "prompt": "lines 10000", "session": "big", "callback": platform.url(), "token": INVOKE_TOKEN}));
    let posts = platform.wait_closed_within("big", Duration::from_secs(60));
    let elapsed = t.elapsed();
    assert_eq!(platform.posts().len(), posts.len(), "a post was repeated or refused");
    let bodies = check_run(&posts, TOKEN);
    assert_eq!(bodies.len(), 10_001);
    let stream = key_set(&["sessionId", "seq", "text", "token"]);
    let mut summary = String::new();
    for (i, b) in bodies[..10_000].iter().enumerate() {
        assert_eq!(keys(b), stream);
        assert_eq!(posts[i].path, "/internal/agent-stream");
        assert_eq!(b["sessionId"], "big");
        assert_eq!(b["token"], INVOKE_TOKEN);
        assert_eq!(b["text"], format!("l{i} "), "seq {i}");
        summary.push_str(&format!("l{i} "));
    }
    let complete = &bodies[10_000];
    assert_eq!(posts[10_000].path, "/internal/agent-complete");
    assert_eq!(keys(complete), key_set(&["sessionId", "seq", "summary", "changed", "token"]));
    assert_eq!(complete["summary"].as_str().unwrap(), summary);
    assert_eq!(complete["changed"], json!([]));
    assert_eq!(complete["token"], INVOKE_TOKEN);
    eprintln!("10,000 lines delivered in {elapsed:?}");
    assert!(eventually(Duration::from_secs(5), || rig.spool_files().is_empty()), "{:?}", rig.spool_files());
    rig.assert_no_tokens();
}

#[test]
fn a_crash_is_exactly_one_error_with_the_head_of_stderr() {
    let rig = Rig::new("crash", fake(), json!({}));
    let platform = Platform::start();
    rig.start(json!({"agent": "fake", "prompt": "crash", "session": "c", "callback": platform.url(), "token": INVOKE_TOKEN}));
    let bodies = check_run(&platform.wait_closed("c"), TOKEN);
    assert_eq!(bodies.len(), 1, "{bodies:?}");
    // The Node connector's error: the first 500 characters of acpx's stderr.
    assert_eq!(the_error(&bodies), "starting\nboom: agent died\n");
    assert_eq!(bodies[0]["token"], INVOKE_TOKEN);
    // The outbox is done with the run (its stream files go once the closing
    // post is delivered): whatever else it had to post has been posted.
    assert!(eventually(DEADLINE, || rig.spool_files().is_empty()), "{:?}", rig.spool_files());
    assert_eq!(rig.calls().len(), 2, "exit 3 is not retried: {:?}", rig.calls());
    assert_eq!(platform.posts().len(), 1, "more than one post: {:?}", platform.posts());
    rig.assert_no_tokens();
}

#[test]
fn a_failed_sessions_ensure_is_logged_and_the_run_goes_on() {
    let rig = Rig::with("ensure", fake(), json!({}), &[("FAKE_ACPX_ENSURE_FAIL", "1")]);
    let platform = Platform::start();
    rig.start(json!({"agent": "fake", "prompt": "hello", "session": "s", "callback": platform.url()}));
    let bodies = check_run(&platform.wait_closed("s"), TOKEN);
    assert_eq!(bodies.len(), 1);
    assert_eq!(bodies[0]["summary"], "hello");
    rig.wait_log("ensure session: ensure failed");
    let calls = rig.calls();
    assert_eq!(calls.len(), 2, "{calls:?}");
    assert_eq!(calls[0].argv[3], "sessions");
}

#[test]
fn acpx_missing_from_path_is_an_error_event() {
    let empty = TempDir::new("nobin");
    let path = empty.path().display().to_string();
    let rig = Rig::with("noacpx", fake(), json!({}), &[("PATH", &path)]);
    let platform = Platform::start();
    rig.start(json!({"agent": "fake", "prompt": "hello", "session": "s", "callback": platform.url()}));
    let bodies = check_run(&platform.wait_closed("s"), TOKEN);
    assert_eq!(bodies.len(), 1);
    let error = the_error(&bodies);
    assert!(error.contains("acpx not found on PATH"), "{error}");
}

#[test]
fn a_busy_session_is_409_and_the_project_cap_is_429() {
    let rig = Rig::new("busy", fake(), json!({"runsPerProject": 2, "stopGraceSeconds": 1}));
    let platform = Platform::start();
    let sleep =
        |s: &str| json!({"agent": "fake", "prompt": "sleep", "session": s, "callback": platform.url()});
    rig.start(sleep("s1"));
    let (status, body) = rig.server.post(&request_body(TOKEN, "invoke", sleep("s1")));
    assert_eq!((status, body.as_str()), (409, r#"{"error":"session busy"}"#));
    rig.start(sleep("s2"));
    let (status, body) = rig.server.post(&request_body(TOKEN, "invoke", sleep("s3")));
    assert_eq!((status, body.as_str()), (429, r#"{"error":"too many runs"}"#));
    // Busy wins over the cap for a running session.
    let (status, _) = rig.invoke(sleep("s2"));
    assert_eq!(status, 409);
    for s in ["s1", "s2"] {
        assert_eq!(
            rig.server.call(TOKEN, "stop", json!({"session": s})).1,
            json!({"ok": true, "stopping": true})
        );
    }
    for s in ["s1", "s2"] {
        assert_eq!(the_error(&check_run(&platform.wait_closed(s), TOKEN)), "stopped");
    }
    // Free again once they ended.
    let (status, _) = poll("the cap to free up", || {
        let (status, v) =
            rig.invoke(json!({"agent": "fake", "prompt": "hi", "session": "s3", "callback": platform.url()}));
        (status == 200).then_some((status, v))
    });
    assert_eq!(status, 200);
    check_run(&platform.wait_closed("s3"), TOKEN);
}

#[test]
fn stop_cancels_through_acpx_then_ends_the_whole_group() {
    let rig = Rig::new("stop", fake(), json!({"stopGraceSeconds": 1}));
    let platform = Platform::start();
    rig.start(json!({"agent": "fake", "prompt": "sleep", "session": "st", "callback": platform.url(), "token": INVOKE_TOKEN}));
    poll("the first output", || platform.delivered().first().map(|_| ()));
    let call = rig.main_call("sleep");
    assert!(alive(call.pid));
    let t = Instant::now();
    let (status, v) = rig.server.call(TOKEN, "stop", json!({"session": "st"}));
    assert_eq!((status, v), (200, json!({"ok": true, "stopping": true})));
    let bodies = check_run(&platform.wait_closed_within("st", Duration::from_secs(20)), TOKEN);
    let took = t.elapsed();
    assert_eq!(bodies.len(), 2);
    assert_eq!(bodies[0]["text"], "sleeping");
    assert_eq!(the_error(&bodies), "stopped");
    assert_eq!(bodies[1]["token"], INVOKE_TOKEN);
    // (1 s measured: the grace; without the stop the run would last 30 s)
    assert!(took < Duration::from_secs(15), "stop took {took:?} with stopGraceSeconds 1");
    assert!(Path::new(&format!("{}.cancel", rig.log.display())).exists(), "acpx cancel did not run");
    let cancel =
        rig.calls().into_iter().find(|c| c.argv.get(3).map(String::as_str) == Some("cancel")).unwrap();
    assert_eq!(cancel.argv, strings(&["--cwd", rig.proj.to_str().unwrap(), "fake", "cancel", "-s", "st"]));
    assert_eq!(cancel.run_id, call.run_id);
    assert_group_gone(&rig, &call, Duration::from_secs(3));
    assert!(marked_processes(&format!("AION_RUN_ID={}", call.run_id)).is_empty());
    rig.assert_no_tokens();
}

#[test]
fn a_timeout_ends_the_run_and_its_group() {
    let rig = Rig::new("timeout", json!({"fake": {"timeout": 1}}), json!({"stopGraceSeconds": 1}));
    let platform = Platform::start();
    let t = Instant::now();
    rig.start(json!({"agent": "fake", "prompt": "sleep", "session": "to", "callback": platform.url()}));
    let bodies = check_run(&platform.wait_closed_within("to", Duration::from_secs(25)), TOKEN);
    assert_eq!(the_error(&bodies), "timed out after 1s");
    // (2 s measured: timeout and grace; without them the run would last 30 s)
    assert!(t.elapsed() < Duration::from_secs(25), "took {:?}", t.elapsed());
    let call = rig.main_call("sleep");
    assert_group_gone(&rig, &call, Duration::from_secs(3));
}

#[test]
fn what_a_run_leaves_behind_is_swept() {
    let rig = Rig::new("orphan", fake(), json!({}));
    let platform = Platform::start();
    rig.start(json!({"agent": "fake", "prompt": "orphan", "session": "o", "callback": platform.url()}));
    let bodies = check_run(&platform.wait_closed("o"), TOKEN);
    assert_eq!(bodies.last().unwrap()["summary"], "left an orphan behind");
    let orphan: i32 =
        std::fs::read_to_string(format!("{}.orphan", rig.log.display())).unwrap().trim().parse().unwrap();
    let call = rig.main_call("orphan");
    assert!(
        eventually(Duration::from_secs(3), || !alive(orphan)),
        "the setsid'd grandchild {orphan} (AION_RUN_ID={}) survived the run",
        call.run_id
    );
}

#[test]
fn output_over_the_cap_ends_in_one_marker_line_then_complete() {
    let rig = Rig::new("cap", fake(), json!({"runOutputBytes": 1024}));
    let platform = Platform::start();
    rig.start(json!({"agent": "fake", "prompt": "big", "session": "b", "callback": platform.url()}));
    let bodies = check_run(&platform.wait_closed_within("b", Duration::from_secs(20)), TOKEN);
    let (last, outputs) = bodies.split_last().unwrap();
    assert!(last["summary"].is_string(), "not complete: {last}");
    let (marker, lines) = outputs.split_last().unwrap();
    let marker = marker["text"].as_str().unwrap();
    assert!(marker.starts_with("[aion-connector] output limit of 1024 bytes reached"), "{marker}");
    assert!(!lines.is_empty());
    let bytes: usize = lines.iter().map(|b| b["text"].as_str().unwrap().len() + 1).sum();
    assert!(bytes <= 1024, "{bytes} bytes of output passed a 1024 cap");
    for (i, b) in lines.iter().enumerate() {
        assert!(b["text"].as_str().unwrap().starts_with(&format!("big line {i:06} ")));
    }
    assert!(bytes + 108 > 1024, "stopped early: {bytes} bytes");
}

#[test]
fn changed_lists_the_working_tree_and_the_commits_of_the_run() {
    let rig = Rig::new("changed", fake(), json!({}));
    let platform = Platform::start();
    let p = &rig.proj;
    repo_with(p, &[("a.txt", "a.txt\n"), ("b.txt", "b.txt\n"), ("d.txt", "d.txt\n")]);
    write(p.join("a.txt"), "modified\n");
    git(p, &["mv", "b.txt", "b2.txt"]);
    std::fs::remove_file(p.join("d.txt")).unwrap();
    write(p.join("u dir/u.txt"), "untracked\n");
    rig.start(json!({"agent": "fake", "prompt": "commit c.txt", "session": "g", "callback": platform.url()}));
    let bodies = check_run(&platform.wait_closed("g"), TOKEN);
    let last = bodies.last().unwrap();
    assert_eq!(last["summary"], "committed c.txt", "{last}");
    let changed: Vec<(String, String)> = last["changed"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| {
            assert_eq!(keys(c), key_set(&["status", "path"]));
            (c["status"].as_str().unwrap().to_string(), c["path"].as_str().unwrap().to_string())
        })
        .collect();
    let set: BTreeSet<(String, String)> = changed.iter().cloned().collect();
    assert_eq!(set.len(), changed.len(), "a path is listed twice: {changed:?}");
    let want: BTreeSet<(String, String)> =
        [("M", "a.txt"), ("R", "b2.txt"), ("D", "d.txt"), ("??", "u dir/u.txt"), ("A", "c.txt")]
            .iter()
            .map(|(s, p)| (s.to_string(), p.to_string()))
            .collect();
    assert_eq!(set, want);
    assert_eq!(git(p, &["log", "-1", "--format=%s"]), "x", "the fake did not commit");
    // The .acpxrc.json written before the run is excluded from git, once.
    assert!(p.join(".acpxrc.json").exists());
    assert!(!git(p, &["status", "--porcelain"]).contains("acpxrc"));
    rig.start(json!({"agent": "fake", "prompt": "hi", "session": "g2", "callback": platform.url()}));
    check_run(&platform.wait_closed("g2"), TOKEN);
    let exclude = std::fs::read_to_string(p.join(".git/info/exclude")).unwrap();
    assert_eq!(exclude.lines().filter(|l| *l == "/.acpxrc.json*").count(), 1, "{exclude}");
}

#[test]
fn payload_repos_are_synced_first_the_agent_runs_in_the_project_dir_and_changed_covers_them() {
    let rig = Rig::new("repos", fake(), json!({}));
    let platform = Platform::start();
    // The project dir is a repository of its own, with an untracked file.
    let p = &rig.proj;
    git(p, &["init", "-q"]);
    write(p.join("top.txt"), "top\n");
    // Cloned into the url's last segment: `…/w` → `proj/w`.
    let origin = rig.dir.join("w");
    repo_with(&origin, &[("README", "hi\n")]);
    let url = format!("file://{}", origin.display());
    rig.start(json!({
        "agent": "fake", "prompt": "commit w/c.txt", "session": "r", "callback": platform.url(),
        "repos": [{"name": "w", "url": url}],
    }));
    let bodies = check_run(&platform.wait_closed("r"), TOKEN);
    let last = bodies.last().unwrap();
    assert_eq!(last["summary"], "committed w/c.txt");
    // The project's own changes (not the nested clone as a whole, not
    // .acpxrc.json), then the clone's, paths from the project dir.
    assert_eq!(
        last["changed"],
        json!([{"status": "??", "path": "top.txt"}, {"status": "A", "path": "w/c.txt"}]),
        "{last}"
    );
    let call = rig.main_call("commit w/c.txt");
    assert_eq!(Path::new(&call.cwd), rig.proj, "the agent runs in the project dir");
    assert!(rig.proj.join("w/c.txt").exists() && rig.proj.join("w/README").exists());
    // A run that only writes in the clone: an untracked file there.
    rig.start(json!({
        "agent": "fake", "prompt": "write w/new.txt", "session": "r2", "callback": platform.url(),
        "repos": [{"name": "w", "url": url}],
    }));
    let bodies = check_run(&platform.wait_closed("r2"), TOKEN);
    assert_eq!(
        bodies.last().unwrap()["changed"],
        json!([{"status": "??", "path": "top.txt"}, {"status": "??", "path": "w/new.txt"}])
    );
}

#[test]
fn a_failed_repos_sync_is_an_error_event() {
    let rig = Rig::new("badrepo", fake(), json!({}));
    let platform = Platform::start();
    let missing = rig.dir.join("no-such-repo");
    rig.start(json!({
        "agent": "fake", "prompt": "hello", "session": "x", "callback": platform.url(),
        "repos": [{"name": "w", "url": format!("file://{}", missing.display())}],
    }));
    let bodies = check_run(&platform.wait_closed("x"), TOKEN);
    assert_eq!(bodies.len(), 1);
    let error = the_error(&bodies);
    assert!(error.starts_with("repos.sync failed: w: "), "{error}");
    assert!(rig.calls().is_empty(), "acpx ran after a failed sync");
}

#[test]
fn a_clone_left_with_the_agents_edits_is_used_as_it_is_by_the_next_turns() {
    let rig = Rig::new("dirtyrepo", fake(), json!({}));
    let platform = Platform::start();
    let origin = rig.dir.join("w");
    repo_with(&origin, &[("README", "hi\n")]);
    let url = format!("file://{}", origin.display());
    let turn = |session: &str, prompt: &str| {
        rig.start(json!({
            "agent": "fake", "prompt": prompt, "session": session, "callback": platform.url(),
            "token": INVOKE_TOKEN, "repos": [{"name": "w", "url": url}],
        }));
        let bodies = check_run(&platform.wait_closed(session), TOKEN);
        let last = bodies.last().unwrap().clone();
        assert!(last.get("error").is_none(), "{session}: {last}");
        last
    };
    // Turn 1 clones, and the agent leaves a tracked file modified.
    let last = turn("t1", "write w/README");
    assert_eq!(last["changed"], json!([{"status": "M", "path": "w/README"}]), "{last}");
    // Turn 2: a dirty clone already at origin's head; the agent adds an untracked file.
    let last = turn("t2", "write w/new.txt");
    assert_eq!(last["summary"], "wrote w/new.txt", "{last}");
    // Turn 3: origin moved on, so a fast-forward would be needed over the
    // edits: the clone is left as it is, one WARN line, and the agent runs.
    write(origin.join("README"), "v2\n");
    git(&origin, &["commit", "-qam", "v2"]);
    let last = turn("t3", "write w/third.txt");
    assert_eq!(last["summary"], "wrote w/third.txt", "{last}");
    assert_eq!(std::fs::read_to_string(rig.proj.join("w/README")).unwrap(), "written by fake acpx\n");
    assert!(rig.proj.join("w/new.txt").exists() && rig.proj.join("w/third.txt").exists());
    let log = rig.wait_log("repo w not updated");
    let warn: Vec<&str> = log.lines().filter(|l| l.contains("repo w not updated")).collect();
    assert_eq!(warn.len(), 1, "{log}");
    assert!(warn[0].contains("WARN") && warn[0].contains("local changes (README)"), "{}", warn[0]);
    rig.assert_no_tokens();
}

#[test]
fn a_callback_down_for_a_while_loses_and_repeats_nothing() {
    let rig = Rig::new("down", fake(), json!({}));
    let port = free_port();
    rig.start(json!({"agent": "fake", "prompt": "lines 20", "session": "d", "callback": format!("http://127.0.0.1:{port}"), "token": INVOKE_TOKEN}));
    rig.wait_log("ended: complete");
    // The outage itself (not a synchronisation): the platform stays down 3 s
    // more, through several retries (250 ms, 500 ms, 1 s, ... apart).
    std::thread::sleep(Duration::from_secs(3));
    let platform = Platform::start_on(port);
    let posts = platform.wait_closed_within("d", Duration::from_secs(60));
    let bodies = check_run(&posts, TOKEN);
    assert_eq!(bodies.len(), 21);
    assert_eq!(platform.posts().len(), 21, "a post was repeated");
    assert_eq!(bodies[20]["summary"], (0..20).map(|i| format!("l{i} ")).collect::<String>());
    assert!(eventually(Duration::from_secs(5), || rig.spool_files().is_empty()), "{:?}", rig.spool_files());
    rig.assert_no_tokens();
}

#[test]
fn a_503_is_retried() {
    let rig = Rig::new("503", fake(), json!({}));
    let platform = Platform::start_with(0, 3, None);
    rig.start(json!({"agent": "fake", "prompt": "lines 5", "session": "r", "callback": platform.url()}));
    let posts = platform.wait_closed("r");
    let bodies = check_run(&posts, TOKEN);
    assert_eq!(bodies.len(), 6);
    let all = platform.posts();
    assert_eq!(all.len(), 9);
    for p in &all[..3] {
        assert_eq!((p.status, p.seq()), (503, 0), "the failed post was not the one retried");
        assert_eq!(p.signature.as_deref(), Some(hmac_sha256(TOKEN, &p.body).as_str()));
    }
}

#[test]
fn a_400_skips_that_post_only() {
    let rig = Rig::new("400", fake(), json!({}));
    let platform = Platform::start_with(0, 0, Some(2));
    rig.start(json!({"agent": "fake", "prompt": "lines 5", "session": "r", "callback": platform.url()}));
    let delivered = platform.wait_closed("r");
    let seqs: Vec<u64> = delivered.iter().map(Post::seq).collect();
    assert_eq!(seqs, [0, 1, 3, 4, 5]);
    assert!(delivered.last().unwrap().closes());
    for p in &delivered {
        assert_eq!(p.signature.as_deref(), Some(hmac_sha256(TOKEN, &p.body).as_str()));
    }
    let refused: Vec<Post> = platform.posts().into_iter().filter(|p| p.status == 400).collect();
    assert_eq!(refused.len(), 1, "a 400 was retried");
    assert_eq!(refused[0].seq(), 2);
}

#[test]
fn spooled_posts_are_delivered_after_a_restart() {
    let mut rig = Rig::new("restart", fake(), json!({"shutdownSeconds": 1}));
    let port = free_port();
    rig.start(json!({"agent": "fake", "prompt": "lines 3", "session": "rs", "callback": format!("http://127.0.0.1:{port}"), "token": INVOKE_TOKEN}));
    rig.wait_log("ended: complete");
    let status = rig.server.signal_and_wait(nix::sys::signal::Signal::SIGTERM, Duration::from_secs(10));
    assert_eq!(status.code(), Some(0), "stderr:\n{}", rig.server.stderr());
    rig.assert_no_tokens();
    assert!(rig.spool_files().iter().any(|f| f.ends_with(".q")), "nothing spooled: {:?}", rig.spool_files());
    let platform = Platform::start_on(port);
    rig.restart();
    let posts = platform.wait_closed("rs");
    let bodies = check_run(&posts, TOKEN);
    assert_eq!(bodies.len(), 4);
    assert_eq!(platform.posts().len(), 4, "a post was repeated");
    assert_eq!(bodies[3]["summary"], "l0 l1 l2 ");
    assert_eq!(bodies[3]["token"], INVOKE_TOKEN);
    assert!(eventually(Duration::from_secs(5), || rig.spool_files().is_empty()), "{:?}", rig.spool_files());
    rig.assert_no_tokens();
}

#[test]
fn a_run_cut_by_a_crash_of_the_connector_is_closed_on_restart() {
    let mut rig = Rig::new("kill9", fake(), json!({}));
    let platform = Platform::start();
    rig.start(json!({"agent": "fake", "prompt": "sleep", "session": "k", "callback": platform.url(), "token": INVOKE_TOKEN}));
    poll("the first output", || platform.delivered().first().map(|_| ()));
    // Its position is written after the answer: wait for the `.pos` file to
    // record it, or the restarted connector would rightly post it again.
    poll("the first output's position in the outbox", || rig.delivered_seqs().then_some(()));
    rig.server.child.kill().unwrap();
    rig.server.child.wait().unwrap();
    let call = rig.main_call("sleep");
    // The agent outlives the killed connector (nothing could end it) …
    let agent = nix::unistd::Pid::from_raw(call.pid);
    assert!(nix::sys::signal::kill(agent, None).is_ok(), "the agent died with the connector");
    rig.restart();
    // … until the connector starts again on the same state dir.
    let connector = rig.server.child.id() as i32;
    let left = || {
        marked_processes(&format!("FAKE_ACPX_LOG={}", rig.log.display()))
            .into_iter()
            .filter(|pid| *pid != connector)
            .collect::<Vec<_>>()
    };
    assert!(eventually(Duration::from_secs(10), || left().is_empty()), "still alive: {:?}", left());
    let posts = platform.wait_closed("k");
    let bodies = check_run(&posts, TOKEN);
    assert_eq!(bodies.len(), 2, "{bodies:?}");
    assert_eq!(bodies[0]["text"], "sleeping");
    assert_eq!(
        bodies[1],
        json!({"sessionId": "k", "seq": 1, "error": "the connector restarted", "token": INVOKE_TOKEN})
    );
    rig.assert_log_mentions("left running by a previous connector");
    assert_eq!(posts[1].path, "/internal/agent-error");
    assert!(eventually(Duration::from_secs(5), || rig.spool_files().is_empty()), "{:?}", rig.spool_files());
    rig.assert_no_tokens();
}

#[test]
fn stream_true_answers_ndjson_live() {
    let rig = Rig::new("ndjson", fake(), json!({}));
    let body = request_body(
        TOKEN,
        "invoke",
        json!({"agent": "fake", "prompt": "lines 3", "session": "n", "stream": true, "token": INVOKE_TOKEN}),
    );
    let resp = raw(&rig.server.addr, &post_request(&rig.server.addr, &body, true)).unwrap();
    assert_eq!(resp.status, 200);
    assert_eq!(resp.header("content-type"), Some("application/x-ndjson"));
    assert!(resp.header("transfer-encoding").is_some_and(|v| v.contains("chunked")), "{}", resp.head);
    let text = resp.text();
    let lines: Vec<Value> = text.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(lines.len(), 4, "{text}");
    for (i, l) in lines.iter().enumerate() {
        assert_eq!(l["seq"].as_u64(), Some(i as u64));
        assert_eq!(l["sessionId"], "n");
        assert_eq!(l["token"], INVOKE_TOKEN);
        assert_eq!(l["type"], if i < 3 { "output" } else { "complete" }, "{l}");
    }
    assert_eq!(
        text.lines().next().unwrap(),
        format!(r#"{{"type":"output","sessionId":"n","text":"l0 ","token":"{INVOKE_TOKEN}","seq":0}}"#)
    );
    assert_eq!(lines[3]["summary"], "l0 l1 l2 ");
    // A failing run's stream ends with its error.
    let body = request_body(
        TOKEN,
        "invoke",
        json!({"agent": "fake", "prompt": "crash", "session": "n2", "stream": true}),
    );
    let resp = raw(&rig.server.addr, &post_request(&rig.server.addr, &body, true)).unwrap();
    let last: Value = serde_json::from_str(resp.text().lines().last().unwrap()).unwrap();
    assert_eq!(last["type"], "error");
    assert!(last["error"].as_str().unwrap().contains("boom: agent died"));
    rig.assert_no_tokens();
}

#[test]
fn sigterm_stops_runs_and_delivers_their_error_before_exit() {
    let mut rig = Rig::new("sigterm", fake(), json!({"stopGraceSeconds": 1, "shutdownSeconds": 5}));
    let platform = Platform::start();
    rig.start(json!({"agent": "fake", "prompt": "sleep", "session": "t", "callback": platform.url(), "token": INVOKE_TOKEN}));
    poll("the first output", || platform.delivered().first().map(|_| ()));
    let call = rig.main_call("sleep");
    let status = rig.server.signal_and_wait(nix::sys::signal::Signal::SIGTERM, Duration::from_secs(10));
    assert_eq!(status.code(), Some(0));
    let mine: Vec<Post> = platform.delivered();
    let bodies = check_run(&mine, TOKEN);
    assert_eq!(the_error(&bodies), "Connector shutting down");
    assert_group_gone(&rig, &call, Duration::from_secs(3));
    assert!(rig.spool_files().is_empty(), "{:?}", rig.spool_files());
    rig.assert_no_tokens();
}

#[test]
fn a_detached_grandchild_holding_stdout_does_not_hang_the_run() {
    // Like acpx's queue owner if it kept the pipe: setsid'd, stdout inherited.
    let agents = json!({"hold": {
        "command": ["sh", "-c", "setsid sleep 300 & echo $! > \"$FAKE_ACPX_LOG.holder\"; echo started", "{prompt}"],
        "timeout": 2,
    }});
    let rig = Rig::new("holder", agents, json!({"stopGraceSeconds": 1}));
    let platform = Platform::start();
    let t = Instant::now();
    rig.start(json!({"agent": "hold", "prompt": "x", "session": "h", "callback": platform.url()}));
    let bodies = check_run(&platform.wait_closed_within("h", Duration::from_secs(15)), TOKEN);
    assert!(t.elapsed() < Duration::from_secs(8), "the run took {:?}", t.elapsed());
    assert_eq!(bodies[0]["text"], "started");
    let holder: i32 =
        std::fs::read_to_string(format!("{}.holder", rig.log.display())).unwrap().trim().parse().unwrap();
    assert!(eventually(Duration::from_secs(3), || !alive(holder)), "the grandchild {holder} survived");
}

#[test]
fn a_process_that_dropped_the_marker_does_not_hold_the_run() {
    // `env -i` drops AION_RUN_ID, so the sweep cannot find the holder of the
    // stdout pipe; the run still ends a moment after the agent itself.
    let agents =
        json!({"hold": {"command": ["sh", "-c", "env -i setsid sleep 40 & sleep 0.3; echo hi", "{prompt}"]}});
    let rig = Rig::new("holder", agents, json!({}));
    let platform = Platform::start();
    let started = Instant::now();
    rig.start(json!({"agent": "hold", "prompt": "p", "session": "h", "callback": platform.url()}));
    let posts = check_run(&platform.wait_closed_within("h", Duration::from_secs(35)), TOKEN);
    let took = started.elapsed();
    // (2.4 s measured; held by the escaped sleep it would take 40 s)
    assert!(took < Duration::from_secs(30), "the run took {took:?}: held by the escaped sleep");
    assert_eq!(posts.last().unwrap()["summary"], "hi");
    // The session is free again.
    rig.start(json!({"agent": "hold", "prompt": "p", "session": "h", "callback": platform.url()}));
    let _ = std::process::Command::new("pkill").args(["-f", "^sleep 40$"]).status();
}

/// The kinds of a run's posts, by path, in order.
fn kinds(posts: &[Post]) -> Vec<String> {
    posts.iter().map(|p| p.path.trim_start_matches("/internal/agent-").to_string()).collect()
}

#[test]
fn only_message_text_is_posted_and_complete_comes_at_end_turn_while_acpx_lingers() {
    // The fake prints a turn of every kind of line, the end_turn result, a
    // late chunk, then lingers, deaf to SIGTERM: only the run ends it.
    let rig = Rig::new("acp", fake(), json!({"stopGraceSeconds": 2}));
    let platform = Platform::start();
    rig.start(json!({"agent": "fake", "prompt": "acp", "session": "a", "callback": platform.url(), "token": INVOKE_TOKEN}));
    let posts = platform.wait_closed("a");
    let linger: i32 = poll("the fake's pid", || {
        std::fs::read_to_string(format!("{}.linger", rig.log.display())).ok()?.trim().parse().ok()
    });
    assert!(alive(linger), "acpx was ended before complete was received");
    let bodies = check_run(&posts, TOKEN);
    assert_eq!(kinds(&posts), ["stream", "stream", "stream", "complete"]);
    let texts: Vec<&str> = bodies[..3].iter().map(|b| b["text"].as_str().unwrap()).collect();
    assert_eq!(texts, ["Hello, ", "world", "!"]);
    assert_eq!(
        bodies[3],
        json!({"sessionId": "a", "summary": "Hello, plain lineworld!", "changed": [], "token": INVOKE_TOKEN, "seq": 3})
    );
    // Then the group is ended (TERM is ignored: KILL after the grace) and swept.
    let call = rig.main_call("acp");
    assert_group_gone(&rig, &call, Duration::from_secs(15));
    rig.wait_log("run a project=p ended: complete");
    assert_eq!(platform.posts().len(), 4, "a post after complete: {:?}", kinds(&platform.posts()));
    assert!(marked_processes(&format!("AION_RUN_ID={}", call.run_id)).is_empty());
    // The session is free again at once.
    rig.start(json!({"agent": "fake", "prompt": "lines 1", "session": "a", "callback": platform.url()}));
    poll("the second run to close", || platform.delivered().iter().filter(|p| p.closes()).nth(1).map(|_| ()));
    rig.assert_no_tokens();
}

#[test]
fn a_session_closed_but_still_ending_its_agent_takes_the_next_invoke() {
    // complete is out while acpx lingers: the next prompt of the session is
    // accepted (not 409) and starts once the last run's processes are gone.
    let rig = Rig::new("next", fake(), json!({"stopGraceSeconds": 2}));
    let platform = Platform::start();
    rig.start(json!({"agent": "fake", "prompt": "acp", "session": "s", "callback": platform.url()}));
    platform.wait_closed("s");
    let first = rig.main_call("acp");
    rig.start(json!({"agent": "fake", "prompt": "lines 2", "session": "s", "callback": platform.url()}));
    let (status, body) = rig.server.post(&request_body(
        TOKEN,
        "invoke",
        json!({"agent": "fake", "prompt": "x", "session": "s"}),
    ));
    assert_eq!(
        (status, body.as_str()),
        (409, r#"{"error":"session busy"}"#),
        "the second run is not closed yet"
    );
    poll("the second run to close", || platform.delivered().iter().filter(|p| p.closes()).nth(1).map(|_| ()));
    let second = rig.main_call("lines 2");
    assert!(second.start_ns > first.start_ns);
    assert!(group_members(first.pgid).is_empty(), "the second run started before the first was cleaned up");
}

#[test]
fn events_true_posts_every_other_acp_update_in_seq_order_and_streams_them() {
    let dir = TempDir::new("events");
    let proj = dir.join("proj");
    std::fs::create_dir_all(&proj).unwrap();
    let bin = fake_acpx_bin(dir.path());
    let log = dir.join("acpx.log");
    let cfg = dir.join("aion.config.json");
    let config = json!({
        "port": 0, "host": "127.0.0.1", "limits": {"stopGraceSeconds": 1},
        "projects": {
            "p": {"token": TOKEN, "dir": proj, "agents": fake(), "events": true},
            "q": {"token": "other-token-5b7e1c", "dir": dir.join("q"), "agents": fake()},
        }
    });
    std::fs::write(&cfg, config.to_string()).unwrap();
    let env =
        [("PATH".to_string(), path_with(&bin)), ("FAKE_ACPX_LOG".to_string(), log.display().to_string())];
    let server = spawn_server(dir.path(), &cfg, &env);
    let platform = Platform::start();
    let call = |token: &str, session: &str| {
        let payload = json!({"agent": "fake", "prompt": "acp", "session": session, "callback": platform.url(), "token": INVOKE_TOKEN});
        assert_eq!(server.call(token, "invoke", payload).0, 200);
    };
    call(TOKEN, "e");
    let posts = platform.wait_closed("e");
    let bodies = check_run(&posts, TOKEN);
    assert_eq!(
        kinds(&posts),
        ["stream", "event", "event", "event", "event", "stream", "event", "stream", "complete"]
    );
    let events: Vec<Value> = bodies.iter().filter(|b| b.get("event").is_some()).cloned().collect();
    for e in &events {
        assert_eq!(keys(e), key_set(&["sessionId", "event", "token", "seq"]), "{e}");
        assert_eq!((&e["sessionId"], &e["token"]), (&json!("e"), &json!(INVOKE_TOKEN)));
    }
    let updates: Vec<Value> = events.iter().map(|e| e["event"].clone()).collect();
    assert_eq!(
        updates,
        [
            json!({"sessionUpdate": "agent_thought_chunk", "content": {"type": "text", "text": "hmm"}}),
            json!({"sessionUpdate": "tool_call", "toolCallId": "t1", "title": "Read a.txt", "kind": "read", "status": "pending"}),
            json!({"method": "session/request_permission", "params": {"sessionId": "fake", "toolCall": {"toolCallId": "t1"}, "options": [{"optionId": "a", "name": "Allow", "kind": "allow_once"}]}}),
            json!({"sessionUpdate": "tool_call_update", "toolCallId": "t1", "status": "completed"}),
            json!({"sessionUpdate": "plan", "entries": [{"content": "x", "priority": "high", "status": "pending"}]}),
        ]
    );
    assert_eq!(bodies.last().unwrap()["summary"], "Hello, plain lineworld!");
    // Key order as the other bodies: sessionId, event, token, seq.
    let first_event = String::from_utf8(posts[1].body.clone()).unwrap();
    assert!(
        first_event.starts_with(r#"{"sessionId":"e","event":{"#)
            && first_event.ends_with(&format!(r#","token":"{INVOKE_TOKEN}","seq":1}}"#)),
        "{first_event}"
    );
    // Another project without the switch posts no events.
    call("other-token-5b7e1c", "q1");
    let posts = platform.wait_closed("q1");
    assert_eq!(kinds(&posts), ["stream", "stream", "stream", "complete"]);
    // The live answer carries them as "type":"event" lines, in seq order.
    let body = request_body(
        TOKEN,
        "invoke",
        json!({"agent": "fake", "prompt": "acp", "session": "live", "stream": true}),
    );
    let resp = raw(&server.addr, &post_request(&server.addr, &body, true)).unwrap();
    let lines: Vec<Value> = resp.text().lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    let types: Vec<&str> = lines.iter().map(|l| l["type"].as_str().unwrap()).collect();
    assert_eq!(
        types,
        ["output", "event", "event", "event", "event", "output", "event", "output", "complete"]
    );
    for (i, l) in lines.iter().enumerate() {
        assert_eq!(l["seq"].as_u64(), Some(i as u64));
    }
    assert_eq!(lines[2]["event"]["sessionUpdate"], "tool_call");
    kill_marked(&format!("FAKE_ACPX_LOG={}", log.display()));
}

#[test]
fn retries_after_exit_5_a_needed_reconnect_or_an_empty_turn_at_most_twice() {
    let rig = Rig::new("retry", fake(), json!({}));
    let platform = Platform::start();
    let counter = PathBuf::from(format!("{}.n", rig.log.display()));
    let prompt_calls = |prompt: &str| rig.calls().iter().filter(|c| c.argv.last().unwrap() == prompt).count();
    let run = |prompt: &str, session: &str| {
        let _ = std::fs::remove_file(&counter);
        rig.start(json!({"agent": "fake", "prompt": prompt, "session": session, "callback": platform.url(), "token": INVOKE_TOKEN}));
        check_run(&platform.wait_closed(session), TOKEN)
    };
    // Exit 5 once: the second attempt answers.
    let b = run("flaky 1 exit5", "x1");
    assert_eq!(b.len(), 2, "{b:?}");
    assert_eq!((&b[0]["text"], &b[1]["summary"]), (&json!("ok after 1"), &json!("ok after 1")));
    assert_eq!(prompt_calls("flaky 1 exit5"), 2);
    // `needs reconnect` twice: what the failed attempts said stays posted; one seq over all.
    let b = run("flaky 2 reconnect", "x2");
    let texts: Vec<&str> = b[..3].iter().map(|v| v["text"].as_str().unwrap()).collect();
    assert_eq!(texts, ["partial 1", "partial 2", "ok after 2"]);
    assert_eq!(b[3]["summary"], "ok after 2", "the summary is the last attempt's");
    assert_eq!(prompt_calls("flaky 2 reconnect"), 3);
    // An empty turn once.
    let b = run("flaky 1 empty", "x3");
    assert_eq!(b.last().unwrap()["summary"], "ok after 1");
    // Empty every time: three attempts, then the Node connector's error.
    let b = run("flaky 9 empty", "x4");
    assert_eq!(b.len(), 1);
    assert_eq!(the_error(&b), "Agent returned an empty response after 3 attempt(s)");
    assert_eq!(prompt_calls("flaky 9 empty"), 3);
    // Exit 5 every time: the last attempt's stderr.
    let b = run("flaky 9 exit5", "x5");
    assert_eq!(the_error(&b), "[acpx] queue owner gone (attempt 3)\n");
    assert_eq!(prompt_calls("flaky 9 exit5"), 3);
    // `sessions ensure` ran once per invoke, never per attempt.
    let ensures =
        rig.calls().iter().filter(|c| c.argv.get(3).map(String::as_str) == Some("sessions")).count();
    assert_eq!(ensures, 5);
    rig.assert_no_tokens();
}

#[test]
fn the_prompt_is_composed_byte_for_byte_as_the_node_connector() {
    let rig = Rig::new("compose", fake(), json!({}));
    let platform = Platform::start();
    rig.start(json!({
        "agent": "fake", "prompt": "do it", "session": "c", "callback": platform.url(),
        "system": "SYS", "memory": "MEM", "instructions": "INS",
        "history": [
            {"role": "assistant", "text": "a1"},
            {"source": "human", "text": "h1"},
            {"text": "u1"},
            {"role": "", "source": 5, "text": "e1", "extra": true},
            {"role": "r"},
        ],
    }));
    check_run(&platform.wait_closed("c"), TOKEN);
    let sent = std::fs::read(format!("{}.prompt", rig.log.display())).unwrap();
    assert_eq!(
        String::from_utf8(sent).unwrap(),
        "<system>\nSYS\n</system>\n\n<project-notes>\nMEM\n</project-notes>\n\n\
         <chat-instructions>\nINS\n</chat-instructions>\n\n<recent-messages>\nassistant: a1\n\
         human: h1\nuser: u1\nuser: e1\nr: \n</recent-messages>\n\ndo it"
    );
    // Empty parts are left out; without any, the prompt alone.
    rig.start(json!({"agent": "fake", "prompt": "just this", "session": "c2", "callback": platform.url(), "system": "", "history": []}));
    check_run(&platform.wait_closed("c2"), TOKEN);
    assert_eq!(std::fs::read_to_string(format!("{}.prompt", rig.log.display())).unwrap(), "just this");
}

#[test]
fn acpxrc_json_registers_the_aion_mcp_server_merged_and_is_never_served() {
    let rig = Rig::new("acpxrc", fake(), json!({}));
    let platform = Platform::start();
    let file = rig.proj.join(".acpxrc.json");
    write(
        &file,
        r#"{"defaultAgent":"x","mcpServers":[{"name":"other","command":"o","args":["-v"],"env":[]},{"name":"aion","command":"stale"}],"zeta":{"b":1,"a":2}}"#,
    );
    rig.start(json!({"agent": "fake", "prompt": "hi", "session": "m", "callback": platform.url(), "token": INVOKE_TOKEN}));
    check_run(&platform.wait_closed("m"), TOKEN);
    let text = std::fs::read_to_string(&file).unwrap();
    let exe = std::fs::canonicalize(BIN).unwrap();
    let socket = rig.dir.join("state/aion-connector/mcp.sock");
    let want = json!({
        "defaultAgent": "x",
        "mcpServers": [
            {"name": "other", "command": "o", "args": ["-v"], "env": []},
            {"name": "aion", "command": exe, "args": ["mcp"], "env": [
                {"name": "AION_CALLBACK", "value": platform.url()},
                {"name": "AION_TOKEN", "value": INVOKE_TOKEN},
                {"name": "AION_SESSION_ID", "value": "m"},
                {"name": "AION_PROJECT", "value": "p"},
                {"name": "AION_CONNECTOR_SOCKET", "value": socket},
                {"name": "AION_MCP_KEY", "value": hmac_sha256(TOKEN, b"aion-mcp")},
            ]},
        ],
        "zeta": {"b": 1, "a": 2},
    });
    assert_eq!(serde_json::from_str::<Value>(&text).unwrap(), want);
    // Keys keep their order; 2-space indent, no final newline (as the Node connector).
    assert!(text.starts_with("{\n  \"defaultAgent\": \"x\",\n  \"mcpServers\": [\n"), "{text}");
    assert!(text.ends_with("\"zeta\": {\n    \"b\": 1,\n    \"a\": 2\n  }\n}"), "{text}");
    assert!(text.contains("\"name\": \"aion\",\n      \"command\": "), "{text}");
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(std::fs::metadata(&file).unwrap().permissions().mode() & 0o777, 0o600);
    assert!(!text.contains(TOKEN), "the project token is in .acpxrc.json");
    // Never served, never listed.
    assert_eq!(rig.server.call(TOKEN, "repos.sync", json!({"repos": [{"name": "."}]})).0, 200);
    let (status, v) = rig.server.call(TOKEN, "files.read", json!({"path": ".acpxrc.json"}));
    assert_eq!((status / 100, v["error"].as_str()), (4, Some("denied")), "{v}");
    let (_, tree) = rig.server.call(TOKEN, "files.tree", json!({}));
    assert!(!tree.to_string().contains("acpxrc"), "{tree}");
    // A file that is not JSON is left as it is; the run goes on.
    write(&file, "{ not json");
    rig.start(json!({"agent": "fake", "prompt": "hi", "session": "m2", "callback": platform.url()}));
    check_run(&platform.wait_closed("m2"), TOKEN);
    assert_eq!(std::fs::read_to_string(&file).unwrap(), "{ not json");
    rig.wait_log(".acpxrc.json is not valid JSON");
    // Created when missing.
    std::fs::remove_file(&file).unwrap();
    rig.start(json!({"agent": "fake", "prompt": "hi", "session": "m3", "callback": platform.url()}));
    check_run(&platform.wait_closed("m3"), TOKEN);
    let v: Value = serde_json::from_str(&std::fs::read_to_string(&file).unwrap()).unwrap();
    assert_eq!(v["mcpServers"][0]["env"][0], json!({"name": "AION_CALLBACK", "value": platform.url()}));
    assert_eq!(v["mcpServers"][0]["env"][1], json!({"name": "AION_TOKEN", "value": ""}));
    let leftovers: Vec<String> = std::fs::read_dir(&rig.proj)
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter(|n| n.starts_with(".acpxrc.json."))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
    rig.assert_no_tokens();
}

#[test]
fn silence_after_some_text_ends_the_turn_and_a_blank_one_is_retried() {
    let rig = Rig::new("idle", fake(), json!({"turnIdleSeconds": 1, "stopGraceSeconds": 1}));
    let platform = Platform::start();
    let t = Instant::now();
    rig.start(json!({"agent": "fake", "prompt": "idle waiting", "session": "i", "callback": platform.url()}));
    let bodies = check_run(&platform.wait_closed("i"), TOKEN);
    assert!(t.elapsed() >= Duration::from_secs(1), "complete before the idle time: {:?}", t.elapsed());
    assert_eq!(bodies.len(), 2);
    assert_eq!((&bodies[0]["text"], &bodies[1]["summary"]), (&json!("waiting"), &json!("waiting")));
    let call = rig.main_call("idle waiting");
    assert_group_gone(&rig, &call, Duration::from_secs(10));
    rig.wait_log("run i: idle 1s: the turn is taken as over");
    // Only whitespace: an empty turn, retried, then the empty-response error.
    rig.start(json!({"agent": "fake", "prompt": "idle  ", "session": "j", "callback": platform.url()}));
    let bodies = check_run(&platform.wait_closed_within("j", Duration::from_secs(30)), TOKEN);
    assert_eq!(the_error(&bodies), "Agent returned an empty response after 3 attempt(s)");
    assert_eq!(rig.calls().iter().filter(|c| c.argv.last().unwrap() == "idle  ").count(), 3);
}

#[test]
fn a_silent_tool_call_holds_the_idle_rule_until_it_completes() {
    let rig = Rig::new("toolidle", fake(), json!({"turnIdleSeconds": 1, "stopGraceSeconds": 1}));
    let platform = Platform::start();
    // The tool call is silent for 3 s, three times the idle time.
    rig.start(json!({"agent": "fake", "prompt": "tool 3", "session": "b", "callback": platform.url()}));
    let bodies = check_run(&platform.wait_closed_within("b", Duration::from_secs(30)), TOKEN);
    let last = bodies.last().unwrap();
    assert_eq!(last["summary"], "working built", "the turn was taken as over inside the tool call: {last}");
    // Silence after the tool call completed still ends the turn and the group.
    rig.wait_log("run b: idle 1s: the turn is taken as over");
    assert_group_gone(&rig, &rig.main_call("tool 3"), Duration::from_secs(10));
}

/// `aion-connector mcp` started as acpx starts it for the agent: with the
/// command, args and env of the `aion` entry of the project's .acpxrc.json.
fn mcp_from_acpxrc(
    proj: &Path,
) -> (std::process::Child, std::process::ChildStdin, std::sync::mpsc::Receiver<Value>) {
    use std::io::BufRead;
    let rc: Value =
        serde_json::from_str(&std::fs::read_to_string(proj.join(".acpxrc.json")).unwrap()).unwrap();
    let aion = rc["mcpServers"].as_array().unwrap().iter().find(|s| s["name"] == "aion").unwrap().clone();
    let mut cmd = std::process::Command::new(aion["command"].as_str().unwrap());
    cmd.args(aion["args"].as_array().unwrap().iter().map(|a| a.as_str().unwrap()));
    for e in aion["env"].as_array().unwrap() {
        cmd.env(e["name"].as_str().unwrap(), e["value"].as_str().unwrap());
    }
    cmd.current_dir(proj).stdin(std::process::Stdio::piped()).stdout(std::process::Stdio::piped());
    let mut child = cmd.stderr(std::process::Stdio::null()).spawn().unwrap();
    let stdin = child.stdin.take().unwrap();
    let out = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(out).lines().map_while(Result::ok) {
            if tx.send(serde_json::from_str::<Value>(&line).unwrap()).is_err() {
                break;
            }
        }
    });
    (child, stdin, rx)
}

fn mcp_call(
    stdin: &mut std::process::ChildStdin,
    rx: &std::sync::mpsc::Receiver<Value>,
    id: u64,
    method: &str,
    params: Value,
) -> Value {
    use std::io::Write;
    let line = json!({"jsonrpc": "2.0", "id": id, "method": method, "params": params}).to_string();
    writeln!(stdin, "{line}").unwrap();
    rx.recv_timeout(DEADLINE).unwrap_or_else(|e| panic!("no answer to {method}: {e}"))
}

#[test]
fn a_display_post_of_the_runs_mcp_server_takes_its_place_in_the_runs_sequence() {
    let rig = Rig::new("display", fake(), json!({"stopGraceSeconds": 1}));
    let platform = Platform::start();
    rig.start(json!({"agent": "fake", "prompt": "sleep", "session": "d", "callback": platform.url(), "token": INVOKE_TOKEN}));
    poll("the first output", || platform.delivered().first().map(|_| ()));
    let (mut child, mut stdin, rx) = mcp_from_acpxrc(&rig.proj);
    let init = mcp_call(
        &mut stdin,
        &rx,
        1,
        "initialize",
        json!({"protocolVersion": "2024-11-05", "capabilities": {}, "clientInfo": {"name": "t", "version": "1"}}),
    );
    assert_eq!(init["result"]["serverInfo"]["name"], "aion", "{init}");
    let set = mcp_call(
        &mut stdin,
        &rx,
        2,
        "tools/call",
        json!({"name": "display_set", "arguments": {"url": "https://preview.example/"}}),
    );
    assert_eq!(set["result"]["content"][0]["text"], "Display set to: https://preview.example/", "{set}");
    assert_eq!(rig.server.call(TOKEN, "stop", json!({"session": "d"})).0, 200);
    let posts = platform.wait_closed("d");
    let bodies = check_run(&posts, TOKEN);
    assert_eq!(kinds(&posts), ["stream", "display", "error"]);
    assert_eq!(
        bodies[1],
        json!({"url": "https://preview.example/", "token": INVOKE_TOKEN, "sessionId": "d", "seq": 1})
    );
    let raw = String::from_utf8(posts[1].body.clone()).unwrap();
    assert!(raw.starts_with(r#"{"url":"https://preview.example/","token":"#), "{raw}");
    // The run is over: a post of its own, after the run's.
    rig.wait_log("run d project=p ended");
    let clear = mcp_call(&mut stdin, &rx, 3, "tools/call", json!({"name": "display_clear", "arguments": {}}));
    assert_eq!(clear["result"]["content"][0]["text"], "Display cleared", "{clear}");
    let all = poll("the clear", || {
        let d = platform.delivered();
        (d.len() == 4).then_some(d)
    });
    assert_eq!(all[3].path, "/internal/agent-display");
    assert_eq!(all[3].json(), json!({"url": "", "token": INVOKE_TOKEN, "sessionId": "d"}));
    assert_eq!(all[3].signature.as_deref(), Some(hmac_sha256(TOKEN, &all[3].body).as_str()));
    drop(stdin);
    let _ = child.kill();
    let _ = child.wait();
    rig.assert_no_tokens();
}

#[test]
fn a_background_process_started_by_a_run_outlives_it_until_stopped() {
    let rig = Rig::new("bgrun", fake(), json!({"stopGraceSeconds": 1}));
    let platform = Platform::start();
    rig.start(json!({"agent": "fake", "prompt": "until go", "session": "g", "callback": platform.url()}));
    poll("the first output", || platform.delivered().first().map(|_| ()));
    let (mut child, mut stdin, rx) = mcp_from_acpxrc(&rig.proj);
    let init = json!({"protocolVersion": "2024-11-05", "capabilities": {}, "clientInfo": {"name": "t", "version": "1"}});
    mcp_call(&mut stdin, &rx, 1, "initialize", init);
    let started = mcp_call(
        &mut stdin,
        &rx,
        2,
        "tools/call",
        json!({"name": "run_background", "arguments": {"command": "sleep 300"}}),
    );
    let text = started["result"]["content"][0]["text"].as_str().unwrap_or_else(|| panic!("{started}"));
    let pid = pid_of(text);
    assert!(alive(pid), "{text}");
    // The turn ends, the run closes with complete and its group is ended.
    write(rig.proj.join("go"), "");
    let bodies = check_run(&platform.wait_closed("g"), TOKEN);
    assert_eq!(bodies.last().unwrap()["summary"], "waiting for gosaw go");
    assert_group_gone(&rig, &rig.main_call("until go"), Duration::from_secs(10));
    rig.wait_log("run g project=p ended");
    // The background process is the connector's, not the run's: still there.
    assert!(alive(pid), "the run's end took its background process {pid}");
    let check = mcp_call(
        &mut stdin,
        &rx,
        3,
        "tools/call",
        json!({"name": "check_background", "arguments": {"pid": pid}}),
    );
    let status = check["result"]["content"][0]["text"].as_str().unwrap_or_default();
    assert!(status.contains("Status: running"), "{check}");
    let stop = mcp_call(
        &mut stdin,
        &rx,
        4,
        "tools/call",
        json!({"name": "stop_background", "arguments": {"pid": pid}}),
    );
    assert_eq!(stop["result"]["content"][0]["text"], format!("Process {pid} stopped."), "{stop}");
    assert!(
        eventually(Duration::from_secs(10), || !alive(pid) && group_members(pid).is_empty()),
        "{pid} survived"
    );
    drop(stdin);
    let _ = child.kill();
    let _ = child.wait();
}
