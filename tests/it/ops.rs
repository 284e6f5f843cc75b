//! Running it like a service: `aion-connector status` against the real
//! binary (a run of the fake acpx going, a terminal open, posts backed up
//! for a callback that is down), `GET /metrics`, SIGHUP reloads.

use crate::util::*;
use serde_json::{Value, json};
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

#[test]
fn status_shows_runs_terminals_and_the_backlog_as_text_and_json() {
    let dir = TempDir::new("ops-status");
    let proj = dir.join("proj");
    std::fs::create_dir_all(&proj).unwrap();
    let bin = fake_acpx_bin(dir.path());
    let log = dir.join("acpx.log");
    let cfg = config(json!({"p": {"token": TOKEN, "dir": proj, "agents": {"fake": {}}}}), None);
    std::fs::write(dir.join("aion.config.json"), &cfg).unwrap();
    let path = path_with(&bin);
    let server = Server::start_args(
        &[dir.join("aion.config.json").to_str().unwrap()],
        dir.path(),
        &[("PATH", &path), ("FAKE_ACPX_LOG", log.to_str().unwrap())],
    );
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
    drop(server);
    for pid in marked_processes(&format!("FAKE_ACPX_LOG={}", log.display())) {
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGKILL);
    }
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
