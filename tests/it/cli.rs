//! The command line: version, help, check, the embedded default config,
//! exit codes and signals.

use std::io::{BufReader, Read, Write};
use std::net::TcpListener;
use std::os::unix::fs::PermissionsExt;
use std::time::{Duration, Instant};

use crate::util::*;
use nix::sys::signal::Signal;
use serde_json::{Value, json};

fn words(s: &str) -> Vec<String> {
    s.split(|c: char| !c.is_ascii_alphanumeric())
        .filter(|w| !w.is_empty())
        .map(|w| w.to_ascii_lowercase())
        .collect()
}

#[test]
fn version() {
    let tmp = TempDir::new("version");
    for flag in ["--version", "-V"] {
        let (code, out, err) = run(&[flag], tmp.path(), &[]);
        assert_eq!(code, 0, "{flag}: {err}");
        assert_eq!(out.trim_end(), "aion-connector 0.1.0", "{flag}");
    }
}

#[test]
fn help() {
    let tmp = TempDir::new("help");
    for flag in ["--help", "-h", "help"] {
        let (code, out, err) = run(&[flag], tmp.path(), &[]);
        assert_eq!(code, 0, "{flag}: {err}");
        let w = words(&out);
        assert!(w.contains(&"check".to_string()), "{flag}: {out}");
        for sub in ["poll", "lease", "app", "config"] {
            assert!(w.contains(&sub.to_string()), "{flag}: help does not mention {sub}: {out}");
        }
        assert!(!tmp.join("aion.config.json").exists(), "{flag} wrote a config");
    }
}

fn write_cfg(tmp: &TempDir, name: &str, content: &str) -> String {
    let p = tmp.join(name);
    std::fs::write(&p, content).unwrap();
    p.to_str().unwrap().to_string()
}

#[test]
fn check_good_config() {
    let tmp = TempDir::new("checkok");
    let cfg = config(
        json!({
            "a": {"token":"t-a","dir":"./a","agents":{"pi":{"description":"Pi"}}},
            "b": {"token":"t-b","dir":tmp.join("b").to_str().unwrap(),"sensitive":["*.db"],"allowFileUrls":true}
        }),
        Some(json!({"limits":{"bodyBytes":1000,"connections":3}})),
    );
    let path = write_cfg(&tmp, "good.json", &cfg);
    let (code, out, err) = run(&["check", &path], tmp.path(), &[]);
    assert_eq!(code, 0, "stdout: {out}\nstderr: {err}");
    let all = format!("{out}{err}");
    assert!(all.contains("ok: "), "{all}");
    assert!(all.contains("2 project(s)"), "{all}");
    assert!(!all.contains("t-a") && !all.contains("t-b"), "token printed: {all}");
    assert!(!all.contains("WARN"), "{all}");
}

#[test]
fn check_node_original_config_unchanged() {
    let tmp = TempDir::new("checknode");
    let path = write_cfg(
        &tmp,
        "aion.config.json",
        r#"{
  "port": 7777,
  "projects": {
    "YOUR_PROJECT_ID": {
      "token": "your-secret-token",
      "dir": "./projects/my-project",
      "agents": {
        "pi": { "description": "Pi Assistant" },
        "claude": { "description": "Claude Code" }
      }
    }
  }
}"#,
    );
    let (code, out, err) = run(&["check", &path], tmp.path(), &[]);
    assert_eq!(code, 0, "stdout: {out}\nstderr: {err}");
    assert!(format!("{out}{err}").contains("1 project(s)"));
}

#[test]
fn check_broken_config_names_every_problem() {
    let tmp = TempDir::new("checkbad");
    let path = write_cfg(
        &tmp,
        "bad.json",
        r#"{"port":"7777","host":"127.0.0.1","projects":{
            "a":{"dir":"./a"},
            "b":{"token":"dup-SECRET-tok","dir":"./b"},
            "c":{"token":"dup-SECRET-tok","dir":"./c","agents":[]},
            "d":{"token":"t-d","agents":{"pi":"Pi"}}
        }}"#,
    );
    let (code, out, err) = run(&["check", &path], tmp.path(), &[]);
    assert_eq!(code, 2, "stdout: {out}\nstderr: {err}");
    let lines: Vec<&str> = err.lines().collect();
    let expect = [
        ("port: ", "expected an integer"),
        ("projects.a.token: ", "missing"),
        ("projects.c.token: ", "same token as projects.b"),
        ("projects.c.agents: ", "expected an object"),
        ("projects.d.dir: ", "missing"),
        ("projects.d.agents.pi: ", "expected an object"),
    ];
    for (jpath, msg) in expect {
        let line = lines
            .iter()
            .find(|l| l.contains(&format!(" {jpath}")) || l.starts_with(jpath))
            .unwrap_or_else(|| panic!("no line for {jpath}:\n{err}"));
        assert!(line.contains(msg), "{jpath}: {line}");
        assert!(line.contains(&path), "config path not named: {line}");
    }
    assert!(!err.contains("dup-SECRET-tok"), "token in stderr:\n{err}");
    assert!(!out.contains("ok:"), "{out}");

    // serving the same file fails the same way, before listening
    let (code, out, err2) = run(&[&path], tmp.path(), &[]);
    assert_eq!(code, 2, "{err2}");
    assert!(!out.contains("listening"), "{out}");
    assert!(err2.contains("projects.a.token"), "{err2}");
}

#[test]
fn check_invalid_json() {
    let tmp = TempDir::new("checkjson");
    let path = write_cfg(&tmp, "broken.json", "{\"port\": 1,\n  \"projects\": }\n");
    let (code, _out, err) = run(&["check", &path], tmp.path(), &[]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains(&path), "{err}");
    assert!(err.contains("line 2") || err.contains(":2:"), "no line:column in {err}");
}

#[test]
fn check_unknown_key_is_a_warning() {
    let tmp = TempDir::new("checkwarn");
    let cfg = config(json!({"a": {"token":"t-a","dir":"./a","foo":1}}), Some(json!({"colour":"blue"})));
    let path = write_cfg(&tmp, "warn.json", &cfg);
    let (code, out, err) = run(&["check", &path], tmp.path(), &[]);
    assert_eq!(code, 0, "stdout: {out}\nstderr: {err}");
    let all = format!("{out}{err}");
    assert!(all.contains("unknown key projects.a.foo"), "{all}");
    assert!(all.contains("unknown key colour"), "{all}");
    assert!(all.to_ascii_lowercase().contains("warn"), "{all}");
    assert!(all.contains("1 project(s)"), "{all}");

    // serving: the same warnings as [WARN] log lines, and it serves
    let srv = Server::start_args(&[&path], tmp.path(), &[]);
    let err = srv.wait_stderr("the unknown-key warnings", |s| s.contains("unknown key colour"));
    let line = err.lines().find(|l| l.contains("unknown key projects.a.foo")).expect(&err);
    assert!(line.contains("[WARN]"), "{err}");
}

#[test]
fn explicit_missing_config_is_exit_2() {
    let tmp = TempDir::new("missing");
    let (code, out, err) = run(&["check", "nope.json"], tmp.path(), &[]);
    assert_eq!(code, 2, "{out}{err}");
    assert!(err.contains("nope.json"), "{err}");
    let (code, out, err) = run(&["nope.json"], tmp.path(), &[]);
    assert_eq!(code, 2, "{out}{err}");
    assert!(!out.contains("listening"));
    assert!(!tmp.join("nope.json").exists(), "the missing config was created");
    assert!(!tmp.join("aion.config.json").exists());
}

#[test]
fn cannot_bind_is_exit_1() {
    let tmp = TempDir::new("bindfail");
    let busy = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = busy.local_addr().unwrap().port();
    let cfg = json!({"port": port, "host": "127.0.0.1",
        "projects": {"a": {"token":"t","dir":"./a"}}})
    .to_string();
    let path = write_cfg(&tmp, "c.json", &cfg);
    let (code, out, err) = run(&[&path], tmp.path(), &[]);
    assert_eq!(code, 1, "stdout: {out}\nstderr: {err}");
    assert!(!out.contains("listening"), "{out}");
    drop(busy);
}

#[test]
fn a_second_connector_on_the_same_state_dir_is_refused() {
    let tmp = TempDir::new("statelock");
    let cfg = json!({"port": 0, "host": "127.0.0.1", "stateDir": "./state",
        "projects": {"a": {"token":"t","dir":"./a"}}})
    .to_string();
    let first = Server::start(tmp.path(), &cfg);
    let path = tmp.join("aion.config.json");
    let (code, out, err) = run(&[path.to_str().unwrap()], tmp.path(), &[]);
    assert_eq!(code, 1, "stdout: {out}\nstderr: {err}");
    assert!(err.contains("in use by another aion-connector"), "{err}");
    assert!(!out.contains("listening"), "{out}");
    drop(first);
}

#[test]
fn default_config_path_in_cwd_is_used() {
    let tmp = TempDir::new("cwdcfg");
    let cfg = one_project("p", "t-cwd", &tmp.join("p"));
    std::fs::write(tmp.join("aion.config.json"), &cfg).unwrap();
    let srv = Server::start_args(&[], tmp.path(), &[]);
    let (status, v) = srv.call("t-cwd", "ping", json!({}));
    assert_eq!(status, 200, "{v}");
    // the project dir is created if missing
    assert!(tmp.join("p").is_dir());
    // and the existing file is not rewritten
    assert_eq!(std::fs::read_to_string(tmp.join("aion.config.json")).unwrap(), cfg);
}

#[test]
fn embedded_default_config() {
    let tmp = TempDir::new("embedded");
    let cwd = tmp.join("cwd");
    let bin = tmp.join("bin");
    std::fs::create_dir_all(&cwd).unwrap();
    std::fs::create_dir_all(&bin).unwrap();
    let claude = bin.join("claude");
    std::fs::write(&claude, "#!/bin/sh\nexit 0\n").unwrap();
    std::fs::set_permissions(&claude, std::fs::Permissions::from_mode(0o755)).unwrap();
    // not executable: must not count
    std::fs::write(bin.join("codex"), "not a program").unwrap();
    std::fs::set_permissions(bin.join("codex"), std::fs::Permissions::from_mode(0o644)).unwrap();

    let mut sp = spawn(&[], &cwd, &[("PATH", bin.to_str().unwrap())]);
    // either it listens on 7777, or it exits (7777 busy)
    let start = Instant::now();
    let line = loop {
        if let Ok(l) = sp.first_line.try_recv() {
            break Some(l);
        }
        if sp.child.try_wait().unwrap().is_some() {
            break None;
        }
        assert!(start.elapsed() < DEADLINE, "neither listening nor exited");
        std::thread::sleep(Duration::from_millis(10));
    };

    let cfg_path = cwd.join("aion.config.json");
    let meta = std::fs::metadata(&cfg_path).expect("aion.config.json written");
    assert_eq!(meta.permissions().mode() & 0o777, 0o600);
    let cfg: Value = serde_json::from_str(&std::fs::read_to_string(&cfg_path).unwrap())
        .expect("the written config is JSON");
    assert_eq!(cfg["host"], "127.0.0.1", "{cfg}");
    assert_eq!(cfg["port"], 7777, "{cfg}");
    let projects = cfg["projects"].as_object().unwrap();
    assert_eq!(projects.len(), 1, "{cfg}");
    let p = &cfg["projects"]["default"];
    assert_eq!(p["dir"], "./workspace", "{cfg}");
    let token = p["token"].as_str().unwrap().to_string();
    assert_eq!(token.len(), 64, "{token}");
    assert!(token.chars().all(|c| c.is_ascii_hexdigit()), "{token}");
    let agents: Vec<&String> = p["agents"].as_object().unwrap().keys().collect();
    assert_eq!(agents, ["claude"], "{cfg}");

    match line {
        Some(line) => {
            assert_eq!(line.trim_end(), "listening on 127.0.0.1:7777");
            let (status, v) = call("127.0.0.1:7777", &token, "agents", json!({}));
            assert_eq!(status, 200, "{v}");
            assert_eq!(v["agents"][0]["name"], "claude", "{v}");
            assert_eq!(v["agents"].as_array().unwrap().len(), 1, "{v}");
            assert!(cwd.join("workspace").is_dir(), "./workspace not created");
            nix::sys::signal::kill(nix::unistd::Pid::from_raw(sp.child.id() as i32), Signal::SIGTERM)
                .unwrap();
            let st = wait_exit(&mut sp.child, DEADLINE).expect("exit after SIGTERM");
            assert_eq!(st.code(), Some(0));
        }
        None => {
            // only acceptable when 7777 really is taken
            let _ = sp.child.wait();
            assert!(
                TcpListener::bind("127.0.0.1:7777").is_err(),
                "exited although 7777 is free; stderr:\n{}",
                drained(&sp.stderr)
            );
            assert_eq!(sp.child.wait().unwrap().code(), Some(1));
        }
    }
    let out = drained(&sp.stdout);
    let err = drained(&sp.stderr);
    assert!(!out.contains(&token), "token on stdout");
    assert!(!err.contains(&token), "token on stderr:\n{err}");
    assert!(err.contains("aion.config.json"), "config path not logged:\n{err}");
}

fn start_for_signals(tmp: &TempDir) -> Server {
    let cfg = config(
        json!({"a": {"token":"tok-SIGNAL-9","dir":tmp.join("a").to_str().unwrap()}}),
        Some(json!({"limits":{"shutdownSeconds":30,"idleSeconds":60}})),
    );
    Server::start(tmp.path(), &cfg)
}

fn signal_test(sig: Signal) {
    let tmp = TempDir::new("signal");
    let mut srv = start_for_signals(&tmp);
    // an idle keep-alive connection must not hold up the shutdown
    let mut idle = connect(&srv.addr);
    idle.write_all(&post_request(&srv.addr, &request_body("tok-SIGNAL-9", "ping", json!({})), false))
        .unwrap();
    let mut r = BufReader::new(idle.try_clone().unwrap());
    let resp = read_response(&mut r).unwrap();
    assert_eq!(resp.status, 200);

    let st = srv.signal_and_wait(sig, Duration::from_secs(8));
    assert_eq!(st.code(), Some(0), "exit status {st:?}");
    let err = drained(&srv.stderr);
    assert!(err.contains("shutting down"), "{err}");
    assert!(err.contains("stopped"), "{err}");
    assert!(!err.contains("tok-SIGNAL-9"), "{err}");
    // the idle connection was closed by the server
    let mut rest = Vec::new();
    let n = r.read_to_end(&mut rest).unwrap_or(0);
    assert_eq!(n, 0, "{rest:?}");
}

#[test]
fn sigterm_exits_0_and_logs_stopped() {
    signal_test(Signal::SIGTERM);
}

#[test]
fn sigint_exits_0_and_logs_stopped() {
    signal_test(Signal::SIGINT);
}

#[test]
fn check_warns_about_a_readable_config_and_short_tokens() {
    use std::os::unix::fs::PermissionsExt;
    let tmp = TempDir::new("checkadvice");
    let long = "0123456789abcdef0123456789abcdef";
    let cfg = config(
        json!({
            "short": {"token": "guessable", "dir": "./s"},
            "long": {"token": long, "dir": "./l"}
        }),
        None,
    );
    let path = write_cfg(&tmp, "aion.config.json", &cfg);
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
    let (code, out, err) = run(&["check", &path], tmp.path(), &[]);
    assert_eq!(code, 0, "warnings are not errors: {out}{err}");
    assert!(err.contains("readable by others (mode 644)") && err.contains("chmod 600"), "{err}");
    assert!(err.contains("projects.short.token is shorter than 32 characters"), "{err}");
    assert!(!err.contains("projects.long.token"), "{err}");
    assert!(!err.contains("guessable") && !err.contains(long), "a token printed: {err}");
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
    let (_, _, err) = run(&["check", &path], tmp.path(), &[]);
    assert!(!err.contains("readable by"), "{err}");
}
