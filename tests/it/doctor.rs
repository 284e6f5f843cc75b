//! `aion-connector doctor`: the real binary against a setup that passes, then
//! each FAIL provoked in turn (a config problem, the port taken by another
//! program, an unwritable state dir, an unreachable spooled callback, acpx
//! missing, node missing or old, a host not on this machine, an expired
//! certificate, the unit's user missing or not owning the config).

use crate::util::*;
use serde_json::json;
use std::io::{Read, Write};
use std::net::TcpListener;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::Duration;

const TOKEN: &str = "doctor-test-token-0123456789abcdef0123456789abcdef";

/// A machine that passes: `acpx`, `node` (22) and the agent `pi` on PATH,
/// a free port, a state dir, no unit.
struct Setup {
    tmp: TempDir,
    bin: PathBuf,
    port: u16,
}

impl Setup {
    fn new(tag: &str) -> Setup {
        let tmp = TempDir::new(tag);
        let bin = tmp.join("bin");
        script(&bin.join("acpx"), "echo 0.19.1");
        script(&bin.join("node"), "echo v22.11.0");
        script(&bin.join("pi"), "exit 0");
        let port = free_port();
        let setup = Setup { tmp, bin, port };
        setup.write_config(json!({"pi": {"description": "Pi"}}), json!({}));
        setup
    }

    fn config_path(&self) -> String {
        self.tmp.join("aion.config.json").to_str().unwrap().to_string()
    }

    /// Writes the config (mode 0600) with these agents and extra top-level keys.
    fn write_config(&self, agents: serde_json::Value, extra: serde_json::Value) {
        let mut cfg = json!({
            "host": "127.0.0.1",
            "port": self.port,
            "stateDir": "./state",
            "projects": {"p": {"token": TOKEN, "dir": "./work", "agents": agents}}
        });
        for (k, v) in extra.as_object().unwrap() {
            cfg[k] = v.clone();
        }
        let path = self.config_path();
        std::fs::write(&path, cfg.to_string()).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
    }

    /// `doctor --unit <none> CONFIG` with PATH = our bin dir + the system's.
    fn doctor(&self) -> (i32, String) {
        self.doctor_with(&self.config_path())
    }

    fn doctor_with(&self, config: &str) -> (i32, String) {
        self.doctor_on_path(config, &format!("{}:/usr/bin:/bin", self.bin.display()))
    }

    /// The same with this PATH.
    fn doctor_on_path(&self, config: &str, path: &str) -> (i32, String) {
        let unit = self.tmp.join("no.service");
        let args = ["doctor", "--unit", unit.to_str().unwrap(), config];
        let runtime = self.tmp.join("run");
        let (code, out, err) =
            run(&args, self.tmp.path(), &[("PATH", path), ("XDG_RUNTIME_DIR", runtime.to_str().unwrap())]);
        assert!(!err.contains("panicked"), "{err}");
        assert!(!out.contains(TOKEN), "the token was printed:\n{out}");
        (code, out)
    }
}

fn script(path: &Path, body: &str) {
    write(path, format!("#!/bin/sh\n{body}\n"));
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755)).unwrap();
}

/// The report's lines about `topic` with this level.
fn lines<'a>(out: &'a str, level: &str, topic: &str) -> Vec<&'a str> {
    out.lines()
        .filter(|l| {
            let mut w = l.split_whitespace();
            w.next() == Some(level) && w.next() == Some(topic)
        })
        .collect()
}

fn has(out: &str, level: &str, topic: &str, text: &str) -> bool {
    lines(out, level, topic).iter().any(|l| l.contains(text))
}

#[test]
fn a_good_setup_passes_with_every_line_ok_or_skip() {
    let s = Setup::new("doc-ok");
    let (code, out) = s.doctor();
    assert_eq!(code, 0, "{out}");
    for topic in ["version", "config", "port", "agent", "acpx", "node", "state", "callbacks"] {
        assert!(!lines(&out, "OK", topic).is_empty(), "no OK {topic} line:\n{out}");
    }
    assert!(has(&out, "OK", "acpx", "acpx 0.19.1"), "{out}");
    assert!(has(&out, "OK", "port", "is free"), "{out}");
    assert!(has(&out, "SKIP", "tls", "not configured"), "{out}");
    assert!(has(&out, "SKIP", "unit", "no systemd unit"), "{out}");
    assert!(out.lines().all(|l| !l.starts_with("FAIL") && !l.starts_with("WARN")), "{out}");
    assert!(out.trim_end().ends_with("doctor: 0 FAIL, 0 WARN"), "{out}");
    let help = run(&["--help"], s.tmp.path(), &[]).1;
    assert!(help.contains("aion-connector doctor"), "{help}");
    let (code, help, _) = run(&["doctor", "--help"], s.tmp.path(), &[]);
    assert_eq!(code, 0);
    assert!(help.contains("--unit FILE"), "{help}");
    assert_eq!(run(&["doctor", "--bogus"], s.tmp.path(), &[]).0, 2);
}

#[test]
fn a_config_problem_fails_and_a_readable_config_warns() {
    let s = Setup::new("doc-config");
    let path = s.config_path();
    std::fs::write(&path, r#"{"port":"x","projects":{"p":{"dir":"./w"}}}"#).unwrap();
    let (code, out) = s.doctor();
    assert_eq!(code, 1, "{out}");
    assert!(has(&out, "FAIL", "config", "projects.p.token: missing — fix: edit"), "{out}");
    assert!(has(&out, "FAIL", "config", "port: expected an integer"), "{out}");
    assert!(has(&out, "SKIP", "port", "needs a valid config"), "{out}");

    s.write_config(json!({"pi": {}}), json!({"colour": 1}));
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
    let (code, out) = s.doctor();
    assert_eq!(code, 0, "a WARN is not a FAIL:\n{out}");
    assert!(has(&out, "WARN", "config", &format!("fix: chmod 600 {path}")), "{out}");
    assert!(has(&out, "WARN", "config", "unknown key colour"), "{out}");

    let missing = s.tmp.join("nope.json");
    let (code, out) = s.doctor_with(missing.to_str().unwrap());
    assert_eq!(code, 1, "{out}");
    assert!(has(&out, "FAIL", "config", "cannot read"), "{out}");
}

#[test]
fn a_port_taken_by_another_program_fails_and_never_gets_the_token() {
    let s = Setup::new("doc-port");
    let listener = TcpListener::bind(("127.0.0.1", s.port)).unwrap();
    let seen = Arc::new(Mutex::new(Vec::<u8>::new()));
    let record = Arc::clone(&seen);
    // Another program: answers every request 404, records what it is sent.
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut conn) = conn else { break };
            conn.set_read_timeout(Some(Duration::from_millis(500))).unwrap();
            let mut buf = [0u8; 4096];
            let mut request = Vec::new();
            while !request.windows(4).any(|w| w == b"\r\n\r\n") {
                match conn.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => request.extend_from_slice(&buf[..n]),
                }
            }
            record.lock().unwrap().extend_from_slice(&request);
            let _ =
                conn.write_all(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n");
        }
    });
    let (code, out) = s.doctor();
    assert_eq!(code, 1, "{out}");
    assert!(
        has(&out, "FAIL", "port", "is taken by another program (not an aion-connector) — fix: stop it"),
        "{out}"
    );
    let sent = String::from_utf8_lossy(&seen.lock().unwrap()).to_string();
    assert!(sent.contains("GET /healthz"), "{sent}");
    assert!(!sent.contains(TOKEN), "the token went to another program: {sent}");
}

#[test]
fn a_port_served_by_our_connector_is_ok_unless_it_refuses_the_token() {
    let s = Setup::new("doc-ours");
    let dir = s.tmp.join("served");
    std::fs::create_dir_all(&dir).unwrap();
    let cfg = json!({"host": "127.0.0.1", "port": s.port,
        "projects": {"p": {"token": TOKEN, "dir": dir.join("w").to_str().unwrap()}}});
    let _server = Server::start(&dir, &cfg.to_string());
    let (code, out) = s.doctor();
    assert_eq!(code, 0, "{out}");
    assert!(has(&out, "OK", "port", "is served by aion-connector 0.1.0"), "{out}");
    assert!(has(&out, "OK", "port", "takes this config's token"), "{out}");

    let other = s.tmp.join("other.json");
    let mut cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(s.config_path()).unwrap()).unwrap();
    cfg["projects"]["p"]["token"] = json!("another-token-0123456789abcdef0123456789abcdef");
    std::fs::write(&other, cfg.to_string()).unwrap();
    std::fs::set_permissions(&other, std::fs::Permissions::from_mode(0o600)).unwrap();
    let (code, out) = s.doctor_with(other.to_str().unwrap());
    assert_eq!(code, 1, "{out}");
    assert!(has(&out, "FAIL", "port", "an aion-connector that refuses the token of projects.p"), "{out}");
}

#[test]
fn an_unwritable_state_dir_fails() {
    let s = Setup::new("doc-state");
    std::fs::write(s.tmp.join("afile"), "x").unwrap();
    s.write_config(json!({"pi": {}}), json!({"stateDir": "./afile/state"}));
    let (code, out) = s.doctor();
    assert_eq!(code, 1, "{out}");
    assert!(has(&out, "FAIL", "state", "cannot be created:"), "{out}");
    assert!(has(&out, "FAIL", "state", "afile is not a directory"), "{out}");

    s.write_config(json!({"pi": {}}), json!({"stateDir": "./afile"}));
    let (code, out) = s.doctor();
    assert_eq!(code, 1, "{out}");
    assert!(has(&out, "FAIL", "state", "is not a directory"), "{out}");
}

/// A read-only and a full file system as the state dir: tmpfs mounts in a
/// private mount namespace (`unshare -m`), so nothing leaks to the host.
/// Root's writes ignore modes, not these.
#[test]
fn a_read_only_or_full_state_dir_fails() {
    let s = Setup::new("doc-mount");
    let state = s.tmp.join("state");
    std::fs::create_dir_all(&state).unwrap();
    let probe = Command::new("unshare").args(["-m", "true"]).status();
    if !probe.is_ok_and(|st| st.success()) {
        skip(
            "a_read_only_or_full_state_dir_fails",
            "`unshare -m` does not work here (needs root, mount namespaces)",
        );
        return;
    }
    let path = format!("{}:/usr/bin:/bin", s.bin.display());
    let cases = [
        ("mount -t tmpfs -o ro,size=64k tmpfs \"$1\"", "Read-only file system", "read-only file system"),
        (
            "mount -t tmpfs -o size=64k tmpfs \"$1\" && { dd if=/dev/zero of=\"$1/fill\" bs=4k 2>/dev/null || true; }",
            "No space left on device",
            "its file system is full",
        ),
    ];
    for (mount, error, fix) in cases {
        let out = Command::new("unshare")
            .args([
                "-m",
                "sh",
                "-c",
                &format!("{mount} && exec \"$2\" doctor --unit /nonexistent \"$3\""),
                "sh",
            ])
            .args([state.to_str().unwrap(), BIN, &s.config_path()])
            .current_dir(s.tmp.path())
            .env("PATH", &path)
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        assert_eq!(out.status.code(), Some(1), "{mount}: {text}\n{}", String::from_utf8_lossy(&out.stderr));
        assert!(has(&text, "FAIL", "state", error), "{text}");
        assert!(has(&text, "FAIL", "state", fix), "{text}");
    }
}

/// Writes a spool stream by hand, in outbox.rs's format: `<id>.q` JSON lines,
/// `<id>.pos` the delivered offset (u64 LE) and the next seq (u64 LE).
fn spool(dir: &Path, id: &str, urls: &[&str], delivered: usize) {
    let mut text = String::new();
    let mut pos = 0;
    for (i, url) in urls.iter().enumerate() {
        let line = json!({"url": url, "key": "p", "seq": i, "final": i + 1 == urls.len(), "body": "{}"});
        text.push_str(&format!("{line}\n"));
        if i < delivered {
            pos = text.len();
        }
    }
    write(dir.join(format!("{id}.q")), &text);
    let mut b = (pos as u64).to_le_bytes().to_vec();
    b.extend_from_slice(&(delivered as u64).to_le_bytes());
    write(dir.join(format!("{id}.pos")), b);
}

#[test]
fn an_unreachable_pending_callback_fails_and_delivered_posts_do_not_count() {
    let s = Setup::new("doc-callback");
    let outbox = s.tmp.join("state/outbox");
    let platform = TcpListener::bind("127.0.0.1:0").unwrap();
    let up = platform.local_addr().unwrap().port();
    let down = free_port();
    // Delivered to a platform that is gone now, then one post still waiting for a live one.
    spool(
        &outbox,
        "run-a",
        &[
            &format!("http://127.0.0.1:{down}/internal/agent-stream"),
            &format!("http://127.0.0.1:{up}/internal/agent-complete"),
        ],
        1,
    );
    let (code, out) = s.doctor();
    assert_eq!(code, 0, "{out}");
    assert!(
        has(&out, "OK", "callbacks", &format!("127.0.0.1:{up} reachable (1 post(s) of 1 run(s)")),
        "{out}"
    );
    assert!(!out.contains(&format!(":{down}")), "a delivered post counted:\n{out}");

    spool(
        &outbox,
        "run-b",
        &[
            &format!("http://user:secret@127.0.0.1:{down}/internal/agent-stream"),
            &format!("http://127.0.0.1:{down}/internal/agent-complete"),
        ],
        0,
    );
    let (code, out) = s.doctor();
    assert_eq!(code, 1, "{out}");
    assert!(has(&out, "FAIL", "callbacks", &format!("127.0.0.1:{down} unreachable")), "{out}");
    assert!(
        has(&out, "FAIL", "callbacks", "2 post(s) of 1 run(s) waiting for http://***@127.0.0.1"),
        "{out}"
    );
    assert!(!out.contains("secret"), "{out}");
    drop(platform);
}

#[test]
fn acpx_missing_or_an_old_node_fails() {
    let s = Setup::new("doc-tools");
    std::fs::remove_file(s.bin.join("acpx")).unwrap();
    let (code, out) = s.doctor();
    assert_eq!(code, 1, "{out}");
    assert!(
        has(&out, "FAIL", "acpx", "acpx is not on PATH: invoke will fail — fix: npm install -g acpx"),
        "{out}"
    );

    script(&s.bin.join("acpx"), "echo 0.19.1");
    script(&s.bin.join("node"), "echo v20.1.0");
    std::fs::remove_file(s.bin.join("pi")).unwrap();
    let (code, out) = s.doctor();
    assert_eq!(code, 1, "{out}");
    assert!(has(&out, "FAIL", "node", "node v20.1.0 is older than the Node.js 22"), "{out}");
    assert!(has(&out, "WARN", "agent", "projects.p.agents.pi: `pi` is not on PATH"), "{out}");

    // Agents with their own command need neither acpx nor node.
    s.write_config(json!({"mine": {"command": ["my-cli", "{prompt}"]}}), json!({}));
    script(&s.bin.join("my-cli"), "exit 0");
    std::fs::remove_file(s.bin.join("node")).unwrap();
    let (code, out) = s.doctor();
    assert_eq!(code, 0, "{out}");
    assert!(has(&out, "SKIP", "acpx", "no agent runs through acpx"), "{out}");
}

/// acpx there but no node at all on PATH (the machine's own node is in
/// /usr/bin, so PATH is our bin dir alone).
#[test]
fn node_missing_from_path_fails() {
    let s = Setup::new("doc-nonode");
    std::fs::remove_file(s.bin.join("node")).unwrap();
    let (code, out) = s.doctor_on_path(&s.config_path(), s.bin.to_str().unwrap());
    assert_eq!(code, 1, "{out}");
    assert!(has(&out, "OK", "acpx", "acpx 0.19.1"), "{out}");
    assert!(
        has(
            &out,
            "FAIL",
            "node",
            "node is not on PATH: acpx needs Node.js 22+ — fix: install Node.js 22 or later"
        ),
        "{out}"
    );
}

/// A host that is not an address of this machine (192.0.2.1, TEST-NET-1).
#[test]
fn a_host_not_on_this_machine_fails() {
    let s = Setup::new("doc-host");
    s.write_config(json!({"pi": {}}), json!({"host": "192.0.2.1"}));
    let (code, out) = s.doctor();
    assert_eq!(code, 1, "{out}");
    assert!(
        has(
            &out,
            "FAIL",
            "port",
            "192.0.2.1 is not an address of this machine — fix: set \"host\" to 127.0.0.1"
        ),
        "{out}"
    );
}

#[test]
fn the_units_user_must_exist_and_own_the_config_and_state_dir() {
    let s = Setup::new("doc-unit");
    let unit = s.tmp.join("aion-connector.service");
    let config = s.config_path();
    let unit_text = |user: &str| {
        format!(
            "[Unit]\nDescription=x\n[Service]\nExecStart=/usr/local/bin/aion-connector {config}\nUser={user}\n"
        )
    };
    let doctor = |args: &[&str]| {
        let mut all = vec!["doctor", "--unit", unit.to_str().unwrap()];
        all.extend_from_slice(args);
        let path = format!("{}:/usr/bin:/bin", s.bin.display());
        let (code, out, _) = run(&all, s.tmp.path(), &[("PATH", &path)]);
        (code, out)
    };
    std::fs::write(&unit, unit_text("no-such-user-aion")).unwrap();
    let (code, out) = doctor(&[&config]);
    assert_eq!(code, 1, "{out}");
    assert!(has(&out, "FAIL", "unit", "User=no-such-user-aion does not exist — fix: create it"), "{out}");

    // `nobody` exists; the config (written by this test) is not its own.
    let me = nix::unistd::getuid();
    if !me.is_root() || nix::unistd::User::from_name("nobody").ok().flatten().is_none() {
        skip(
            "the_units_user_must_exist_and_own_the_config_and_state_dir",
            "the ownership part needs root and a user `nobody`",
        );
        return;
    }
    std::fs::write(&unit, unit_text("nobody")).unwrap();
    std::fs::create_dir_all(s.tmp.join("state")).unwrap();
    // Without CONFIG and without ./aion.config.json, the unit's config is checked.
    std::fs::rename(&config, s.tmp.join("served.json")).unwrap();
    let served = s.tmp.join("served.json");
    std::fs::write(&unit, unit_text("nobody").replace(&config, served.to_str().unwrap())).unwrap();
    let (code, out) = doctor(&[]);
    assert_eq!(code, 1, "{out}");
    assert!(has(&out, "OK", "config", "(ExecStart= of"), "{out}");
    assert!(has(&out, "OK", "unit", "runs as nobody"), "{out}");
    assert!(
        has(&out, "FAIL", "unit", &format!("{} is owned by uid 0, not nobody", served.display())),
        "{out}"
    );
    assert!(has(&out, "FAIL", "unit", &format!("fix: chown nobody: {}", served.display())), "{out}");
    assert!(
        has(&out, "FAIL", "unit", "state is owned by uid 0, not nobody: the service cannot write it"),
        "{out}"
    );

    let nobody = nix::unistd::User::from_name("nobody").unwrap().unwrap();
    nix::unistd::chown(&served, Some(nobody.uid), None).unwrap();
    nix::unistd::chown(&s.tmp.join("state"), Some(nobody.uid), None).unwrap();
    let (_, out) = doctor(&[]);
    assert!(has(&out, "OK", "unit", "nobody owns"), "{out}");
    assert!(lines(&out, "FAIL", "unit").is_empty(), "{out}");

    std::fs::write(&unit, unit_text("root").replace(&config, served.to_str().unwrap())).unwrap();
    let (_, out) = doctor(&[served.to_str().unwrap()]);
    assert!(has(&out, "WARN", "unit", "runs the connector as root"), "{out}");
    // Checking another config than the unit's says so.
    let nope = s.tmp.join("nope.json");
    let (_, out) = doctor(&[nope.to_str().unwrap()]);
    assert!(has(&out, "WARN", "config", "the unit"), "{out}");
}

#[test]
fn the_lease_socket_and_a_tls_section_are_reported() {
    let s = Setup::new("doc-lease");
    let sock = s.tmp.join("aion.sock");
    s.write_config(
        json!({"pi": {}}),
        json!({"lease": {"socket": sock.to_str().unwrap()}, "tls": {"selfSigned": true}}),
    );
    let (code, out) = s.doctor();
    assert_eq!(code, 0, "a lease socket is not required:\n{out}");
    assert!(has(&out, "WARN", "lease", "cannot connect to the Aion socket"), "{out}");
    assert!(has(&out, "OK", "tls", "self-signed: generated into"), "{out}");
    let _listener = std::os::unix::net::UnixListener::bind(&sock).unwrap();
    let (_, out) = s.doctor();
    assert!(has(&out, "OK", "lease", "accepts connections"), "{out}");
}

/// The cert and key files: unreadable, mismatched, expiring soon, fine.
#[cfg(not(target_os = "macos"))]
#[test]
fn tls_files_are_checked() {
    let s = Setup::new("doc-tls");
    s.write_config(json!({"pi": {}}), json!({"tls": {"certFile": "c.pem", "keyFile": "k.pem"}}));
    let (code, out) = s.doctor();
    assert_eq!(code, 1, "{out}");
    assert!(has(&out, "FAIL", "tls", "c.pem"), "{out}");
    // Valid from 30 days ago until `days` from now (negative: expired).
    let pair = |days: i64| {
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let mut params = rcgen::CertificateParams::new(vec!["localhost".to_string()]).unwrap();
        let now = std::time::SystemTime::now();
        let day = std::time::Duration::from_secs(86_400);
        params.not_before = (now - day * 30).into();
        params.not_after =
            if days >= 0 { now + day * days as u32 } else { now - day * days.unsigned_abs() as u32 }.into();
        (params.self_signed(&key).unwrap().pem(), key.serialize_pem())
    };
    let (cert, key) = pair(400);
    let (_, other_key) = pair(400);
    std::fs::write(s.tmp.join("c.pem"), &cert).unwrap();
    std::fs::write(s.tmp.join("k.pem"), &other_key).unwrap();
    let (_, out) = s.doctor();
    assert!(has(&out, "FAIL", "tls", "the key does not match the certificate"), "{out}");
    std::fs::write(s.tmp.join("k.pem"), &key).unwrap();
    let (_, out) = s.doctor();
    assert!(has(&out, "OK", "tls", "key matches, valid for "), "{out}");
    let (cert, key) = pair(5);
    std::fs::write(s.tmp.join("c.pem"), &cert).unwrap();
    std::fs::write(s.tmp.join("k.pem"), &key).unwrap();
    let (_, out) = s.doctor();
    assert!(has(&out, "WARN", "tls", "expires in "), "{out}");
    // Already expired (3 days ago, the hour it was made aside).
    let (cert, key) = pair(-3);
    std::fs::write(s.tmp.join("c.pem"), &cert).unwrap();
    std::fs::write(s.tmp.join("k.pem"), &key).unwrap();
    let (code, out) = s.doctor();
    assert_eq!(code, 1, "{out}");
    assert!(has(&out, "FAIL", "tls", "c.pem expired 3 day(s) ago — fix: renew it (certbot renew)"), "{out}");
}
