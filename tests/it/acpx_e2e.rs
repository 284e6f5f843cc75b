//! End to end with the real acpx 0.19.1 (on Node 22) driving the mock ACP
//! agent tests/fixtures/mock-acp-agent.js. acpx and Node come from
//! tests/fixtures/install-acpx.sh (npm), cached in target/acpx-e2e (or
//! $AION_E2E_DIR); the test installs them when they are missing. When that
//! cannot be done (no npm, no network, not Linux x86_64) the test is skipped
//! with the installer's reason (a failure under AION_TEST_REQUIRE_ALL=1).

use crate::util::*;
use serde_json::{Value, json};
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

const TOKEN: &str = "e2e-project-token-41f0c2d9a8b7";
const INVOKE_TOKEN: &str = "e2e-invoke-token-77aa";

/// Node's and acpx's bin dirs, installing them first if needed; None (the
/// test is skipped) when the installer cannot get them.
fn acpx_bins() -> Option<(PathBuf, PathBuf)> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let script = root.join("tests/fixtures/install-acpx.sh");
    let mut cmd = Command::new("sh");
    cmd.arg(&script).current_dir(root);
    if std::env::var_os("AION_E2E_DIR").is_none() {
        cmd.env("AION_E2E_DIR", root.join("target/acpx-e2e"));
    }
    let out = cmd.output().expect("run tests/fixtures/install-acpx.sh");
    if !out.status.success() {
        let why = format!(
            "tests/fixtures/install-acpx.sh could not install acpx 0.19.1 and Node.js 22 ({}):\n{}\n\
             It needs npm and the npm registry: install Node.js with npm (Debian/Ubuntu: \
             `apt-get install -y npm`; macOS: `brew install node`), or put an installed copy in \
             target/acpx-e2e (or $AION_E2E_DIR), then run the test again.",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim_end()
        );
        skip("acpx_e2e::real_acpx_runs_the_mock_agent_continues_its_session_and_cancels", &why);
        return None;
    }
    let stdout = String::from_utf8(out.stdout).unwrap();
    let mut lines = stdout.lines().map(PathBuf::from);
    let (node, acpx) = (lines.next().unwrap(), lines.next().unwrap());
    assert!(node.join("node").exists() && acpx.join("acpx").exists(), "{stdout}");
    Some((node, acpx))
}

/// The AION_RUN_ID of every live process started with HOME=`home` (ours).
fn run_ids_under(home: &Path) -> BTreeSet<String> {
    let want = format!("HOME={}", home.display());
    let mut ids = BTreeSet::new();
    for entry in std::fs::read_dir("/proc").unwrap().filter_map(Result::ok) {
        let Some(pid) = entry.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else { continue };
        if !alive(pid) {
            continue;
        }
        let Ok(env) = std::fs::read(format!("/proc/{pid}/environ")) else { continue };
        let vars: Vec<&[u8]> = env.split(|&b| b == 0).collect();
        if !vars.contains(&want.as_bytes()) {
            continue;
        }
        for v in vars {
            if let Some(id) = v.strip_prefix(b"AION_RUN_ID=") {
                ids.insert(String::from_utf8_lossy(id).into_owned());
            }
        }
    }
    ids
}

/// The message text a run posted, piece by piece.
fn outputs(bodies: &[Value]) -> Vec<String> {
    bodies[..bodies.len() - 1]
        .iter()
        .map(|b| b["text"].as_str().unwrap_or_else(|| panic!("not an output: {b}")).to_string())
        .collect()
}

/// The requests the mock agent received so far (MOCK_ACP_RECORD).
fn received(record: &Path) -> Vec<Value> {
    let text = std::fs::read_to_string(record).unwrap_or_default();
    text.lines().map(|l| serde_json::from_str(l).unwrap()).collect()
}

/// The ACP session id of the last session/prompt request.
fn acp_session(requests: &[Value]) -> String {
    let prompt =
        requests.iter().rev().find(|l| l["method"] == "session/prompt").expect("a session/prompt request");
    prompt["params"]["sessionId"].as_str().unwrap().to_string()
}

#[test]
fn real_acpx_runs_the_mock_agent_continues_its_session_and_cancels() {
    let t0 = Instant::now();
    let Some((node_bin, acpx_bin)) = acpx_bins() else { return };
    let dir = TempDir::new("acpx-e2e");
    let home = dir.join("home");
    let agent = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/mock-acp-agent.js");
    write(
        home.join(".acpx/config.json"),
        json!({"agents": {"mock": {"command": format!("node {}", agent.display())}}}).to_string(),
    );
    let proj = dir.join("proj");
    std::fs::create_dir_all(&proj).unwrap();
    let cfg = dir.join("aion.config.json");
    let config = json!({
        "port": 0, "host": "127.0.0.1",
        "limits": {"stopGraceSeconds": 120},
        "projects": {"p": {"token": TOKEN, "dir": proj, "agents": {"mock": {"description": "Mock ACP agent"}}}}
    });
    std::fs::write(&cfg, config.to_string()).unwrap();
    let path = format!(
        "{}:{}:{}",
        node_bin.display(),
        acpx_bin.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let home_s = home.display().to_string();
    let record = dir.join("agent-requests.jsonl");
    let record_s = record.display().to_string();
    let server = Server::start_args(
        &[cfg.to_str().unwrap()],
        dir.path(),
        &[("PATH", &path), ("HOME", &home_s), ("MOCK_ACP_RECORD", &record_s)],
    );
    let platform = Platform::start();
    let invoke = |prompt: &str| {
        let payload = json!({"agent": "mock", "prompt": prompt, "session": "e2e", "callback": platform.url(), "token": INVOKE_TOKEN});
        let (status, v) = server.call(TOKEN, "invoke", payload);
        assert_eq!((status, v), (200, json!({"ok": true, "sessionId": "e2e"})));
    };
    let closed = |n: usize| {
        // The delivered posts of the n-th run (0-based) of the session, once closed.
        let posts = poll_within(Duration::from_secs(150), "the run to close", || {
            let all = platform.delivered();
            let ends: Vec<usize> =
                all.iter().enumerate().filter(|(_, p)| p.closes()).map(|(i, _)| i).collect();
            let end = *ends.get(n)?;
            let start = if n == 0 { 0 } else { ends[n - 1] + 1 };
            Some(all[start..=end].to_vec())
        });
        check_run(&posts, TOKEN)
    };

    // 1. A first prompt: one post per piece of the agent's message text; the
    // summary is the message.
    let prompt = r#"hello "e2e" $(touch pwned) --flag"#;
    invoke(prompt);
    let first = closed(0);
    let last = first.last().unwrap();
    assert_eq!(outputs(&first), ["echo: ", prompt], "{first:?}");
    assert_eq!(last["summary"], format!("echo: {prompt}"), "{first:?}");
    assert_eq!(last["changed"], json!([]));
    assert_eq!(last["token"], INVOKE_TOKEN);
    let requests = received(&record);
    let session = acp_session(&requests);
    assert!(!proj.join("pwned").exists());
    // acpx read the .acpxrc.json the run wrote: the agent was given the aion MCP server.
    let opened = requests
        .iter()
        .rev()
        .find(|r| r["method"] == "session/new" || r["method"] == "session/load")
        .expect("a session/new or session/load request");
    let servers = opened["params"]["mcpServers"].as_array().expect("mcpServers");
    let aion = servers.iter().find(|s| s["name"] == "aion").unwrap_or_else(|| panic!("{servers:?}"));
    assert_eq!(aion["command"], std::fs::canonicalize(BIN).unwrap().to_str().unwrap());
    assert_eq!(aion["args"], json!(["mcp"]));
    let env: Vec<(String, String)> = aion["env"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| (e["name"].as_str().unwrap().to_string(), e["value"].as_str().unwrap().to_string()))
        .collect();
    assert_eq!(
        env[..3],
        [
            ("AION_CALLBACK".to_string(), platform.url()),
            ("AION_TOKEN".to_string(), INVOKE_TOKEN.to_string()),
            ("AION_SESSION_ID".to_string(), "e2e".to_string()),
        ]
    );
    eprintln!("first run closed after {:?}", t0.elapsed());

    // 2. The same session continues: acpx loads the ACP session it created.
    invoke("second");
    let second = closed(1);
    assert_eq!(outputs(&second), ["echo: ", "second"]);
    assert_eq!(second.last().unwrap()["summary"], "echo: second");
    let requests = received(&record);
    assert_eq!(acp_session(&requests), session, "the second run did not continue ACP session {session}");
    eprintln!("second run closed after {:?}", t0.elapsed());

    // 3. A slow prompt, stopped: acpx cancel ends the turn at once.
    invoke("slow please");
    poll_within(Duration::from_secs(30), "the first tick", || {
        platform
            .delivered()
            .iter()
            .any(|p| p.json()["text"].as_str().is_some_and(|t| t.contains("tick 0")))
            .then_some(())
    });
    let ids = run_ids_under(&home);
    assert!(!ids.is_empty(), "no process of the run carries AION_RUN_ID");
    let stopped_at = Instant::now();
    let (status, v) = server.call(TOKEN, "stop", json!({"session": "e2e"}));
    assert_eq!((status, v), (200, json!({"ok": true, "stopping": true})));
    let third = closed(2);
    let took = stopped_at.elapsed();
    assert_eq!(third.last().unwrap()["error"], "stopped");
    let ticks = outputs(&third).iter().filter(|t| t.starts_with("tick ")).count();
    // The agent got a session/cancel mid-turn (after tick 0, before its 50th
    // tick): acpx cancel reached it.
    let requests = received(&record);
    assert!(
        requests.iter().any(|r| r["method"] == "session/cancel"),
        "the turn was not cancelled ({ticks} ticks streamed): {requests:?}"
    );
    assert!(ticks < 50, "the turn was not cancelled: all {ticks} ticks streamed");
    // (2-4 s measured, 7.5 s on a crowded machine: acpx's start and the
    // cancel; the grace would be 120 s)
    assert!(
        took < Duration::from_secs(80),
        "stop took {took:?}: acpx cancel did not end the run (stopGraceSeconds is 120)"
    );
    for id in &ids {
        let marker = format!("AION_RUN_ID={id}");
        assert!(
            eventually(Duration::from_secs(3), || marked_processes(&marker).is_empty()),
            "processes of run {id} survived: {:?}",
            marked_processes(&marker)
        );
    }
    assert!(run_ids_under(&home).is_empty(), "left behind: {:?}", run_ids_under(&home));
    let err = server.stderr();
    assert!(!err.contains(TOKEN) && !err.contains(INVOKE_TOKEN), "a token is in stderr:\n{err}");
    eprintln!("e2e done after {:?}; stop took {took:?} ({ticks} ticks)", t0.elapsed());
    drop(server);
    // Hygiene: nothing of ours may outlive the test.
    kill_marked(&format!("HOME={}", home.display()));
}
