//! TLS on the port (`"tls"` in the config): a rustls client that pins the
//! fingerprint the connector prints, through ping, files.read, an NDJSON
//! stream, the HTTP terminal, every other action, and the WebSocket terminal
//! over `wss://` (flow control with a reader that stops, as `ws://`); the
//! self-signed pair kept across restarts; cert files rotated on SIGHUP with a
//! connection open; plain HTTP and garbage on the TLS port.

use crate::util::*;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{ClientConfig, ClientConnection, DigitallySignedStruct, SignatureScheme, StreamOwned};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use std::io::{BufReader, Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

const TOKEN: &str = "tls-token-5b1c9e2f7a3d4e6f8091a2b3c4d5e6f7";

// ------------------------------------------------------------ the client

/// Accepts exactly the certificate whose SHA-256 is `fingerprint`.
#[derive(Debug)]
struct Pinned {
    fingerprint: String,
    provider: Arc<rustls::crypto::CryptoProvider>,
}

fn fingerprint_of(der: &[u8]) -> String {
    let hex: String = Sha256::digest(der).iter().map(|b| format!("{b:02x}")).collect();
    format!("sha256:{hex}")
}

impl ServerCertVerifier for Pinned {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        if fingerprint_of(end_entity) == self.fingerprint {
            Ok(ServerCertVerified::assertion())
        } else {
            Err(rustls::Error::General("fingerprint mismatch".into()))
        }
    }
    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }
    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider.signature_verification_algorithms.supported_schemes()
    }
}

type Tls = StreamOwned<ClientConnection, TcpStream>;

fn client_config(fingerprint: &str) -> Arc<ClientConfig> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let verifier = Arc::new(Pinned { fingerprint: fingerprint.to_string(), provider: Arc::clone(&provider) });
    let config = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_no_client_auth();
    Arc::new(config)
}

/// A TLS connection to `addr` that trusts only `fingerprint`, handshake done.
fn try_tls(addr: &str, fingerprint: &str) -> std::io::Result<Tls> {
    let sock = connect(addr);
    let name = ServerName::try_from("localhost").unwrap();
    let conn = ClientConnection::new(client_config(fingerprint), name).unwrap();
    let mut tls = StreamOwned::new(conn, sock);
    while tls.conn.is_handshaking() {
        tls.conn.complete_io(&mut tls.sock)?;
    }
    Ok(tls)
}

fn tls(addr: &str, fingerprint: &str) -> BufReader<Tls> {
    BufReader::new(try_tls(addr, fingerprint).unwrap_or_else(|e| panic!("TLS to {addr}: {e}")))
}

/// One POSTed action on an open (keep-alive) connection.
fn call_on(conn: &mut BufReader<Tls>, action: &str, payload: Value) -> (u16, Value) {
    let body = request_body(TOKEN, action, payload);
    conn.get_mut().write_all(&post_request("x", &body, false)).unwrap();
    let resp = read_response(conn).unwrap_or_else(|e| panic!("{action} over TLS: {e}"));
    (resp.status, resp.json())
}

fn call_tls(addr: &str, fingerprint: &str, action: &str, payload: Value) -> (u16, Value) {
    call_on(&mut tls(addr, fingerprint), action, payload)
}

fn assert_ping(got: (u16, Value)) {
    assert_eq!(got.0, 200, "{}", got.1);
    assert_eq!(got.1["ok"], true, "{}", got.1);
}

// ------------------------------------------------------------ the server

/// A project dir with a file, the fake acpx on PATH, a plain shell for terminals.
struct Rig {
    dir: TempDir,
    cfg: std::path::PathBuf,
    env: Vec<(String, String)>,
}

impl Rig {
    fn new(tag: &str, tls: Value) -> Rig {
        let dir = TempDir::new(tag);
        let proj = dir.join("proj");
        write(proj.join("hello.txt"), "hello over tls\n");
        let home = dir.join("home");
        write(home.join(".shrc"), "PS1='$ '\n");
        let bin = fake_acpx_bin(dir.path());
        let cfg = dir.join("aion.config.json");
        let config = json!({
            "port": 0, "host": "127.0.0.1", "tls": tls,
            "projects": {"p": {"token": TOKEN, "dir": proj, "agents": {"fake": {"description": "Fake"}}}}
        });
        std::fs::write(&cfg, config.to_string()).unwrap();
        let env = vec![
            ("PATH".into(), path_with(&bin)),
            ("FAKE_ACPX_LOG".into(), dir.join("acpx.log").display().to_string()),
            ("SHELL".into(), "/bin/sh".into()),
            ("HOME".into(), home.display().to_string()),
            ("ENV".into(), home.join(".shrc").display().to_string()),
        ];
        Rig { dir, cfg, env }
    }

    fn env(&self) -> Vec<(&str, &str)> {
        self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect()
    }

    /// Serves; returns the server and the fingerprint it printed after the
    /// `listening on` line.
    fn start(&self) -> (Server, String) {
        let srv = Server::start_args(&[self.cfg.to_str().unwrap()], self.dir.path(), &self.env());
        let fp = poll("the tls fingerprint line", || {
            let out = srv.stdout();
            let mut lines = out.lines();
            assert!(lines.next().is_some_and(|l| l.starts_with("listening on ")), "{out}");
            lines
                .next()
                .map(|l| l.strip_prefix("tls fingerprint ").unwrap_or_else(|| panic!("{out}")).to_string())
        });
        assert!(
            fp.len() == 71 && fp[7..].chars().all(|c| c.is_ascii_hexdigit() && !c.is_ascii_uppercase()),
            "{fp}"
        );
        (srv, fp)
    }

    /// `status --json`'s `tls.fingerprint` and `status`'s text.
    fn status(&self) -> (String, String) {
        let cfg = self.cfg.to_str().unwrap();
        let (code, out, err) = run(&["status", cfg, "--json"], self.dir.path(), &self.env());
        assert_eq!(code, 0, "{err}");
        let v: Value = serde_json::from_str(out.trim()).unwrap();
        let fp = v["tls"]["fingerprint"].as_str().unwrap_or_else(|| panic!("no tls.fingerprint: {v}"));
        let (code, text, err) = run(&["status", cfg], self.dir.path(), &self.env());
        assert_eq!(code, 0, "{err}");
        (fp.to_string(), text)
    }

    fn fingerprint_command(&self) -> (i32, String, String) {
        run(&["fingerprint", self.cfg.to_str().unwrap()], self.dir.path(), &self.env())
    }
}

// ------------------------------------------------------------ wss

/// A WebSocket client over TLS; collects what the terminal prints.
struct Wss {
    ws: tungstenite::WebSocket<Tls>,
    out: String,
}

impl Wss {
    fn connect(addr: &str, fingerprint: &str, target: &str) -> Wss {
        let stream = try_tls(addr, fingerprint).unwrap();
        let (ws, resp) = tungstenite::client(format!("wss://{addr}{target}").as_str(), stream).unwrap();
        assert_eq!(resp.status().as_u16(), 101);
        Wss { ws, out: String::new() }
    }

    fn send(&mut self, text: &str) {
        self.ws.send(tungstenite::Message::text(text)).unwrap();
    }

    /// Reads until `pat` has been printed; the output after it.
    fn expect(&mut self, pat: &str) -> String {
        self.expect_by(pat, DEADLINE)
    }

    /// [`Wss::expect`] within `within`; output before a match that cannot be
    /// part of it is dropped as it comes (a flood's backlog is not kept).
    fn expect_by(&mut self, pat: &str, within: Duration) -> String {
        let deadline = Instant::now() + within;
        loop {
            if let Some(at) = self.out.find(pat) {
                let rest = self.out[at + pat.len()..].to_string();
                self.out = rest.clone();
                return rest;
            }
            assert!(Instant::now() < deadline, "no {pat:?} in {:.2000?}", self.out);
            let mut keep = self.out.len().saturating_sub(pat.len());
            while !self.out.is_char_boundary(keep) {
                keep -= 1;
            }
            self.out.drain(..keep);
            self.read_some();
        }
    }

    /// One read (up to 200 ms) into `out`.
    fn read_some(&mut self) {
        self.ws.get_ref().sock.set_read_timeout(Some(Duration::from_millis(200))).unwrap();
        match self.ws.read() {
            Ok(tungstenite::Message::Text(t)) => self.out.push_str(&t),
            Ok(tungstenite::Message::Binary(b)) => self.out.push_str(&String::from_utf8_lossy(&b)),
            Ok(_) => {}
            Err(tungstenite::Error::Io(e))
                if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {}
            Err(e) => panic!("wss read: {e} (so far {:?})", self.out),
        }
    }

    /// Echoes `expr` behind a marker its typed echo cannot match.
    fn ask(&mut self, n: u32, expr: &str) -> String {
        self.send(&format!("echo Q{n}-$((40+2))={expr}\r"));
        self.expect(&format!("Q{n}-42="));
        // The value may come in several frames: up to its line's end.
        let deadline = Instant::now() + DEADLINE;
        let mut value = String::new();
        loop {
            if let Some(end) = self.out.find('\n') {
                value.push_str(&self.out[..end]);
                self.out.drain(..end);
                return value.trim().to_string();
            }
            value.push_str(&std::mem::take(&mut self.out));
            assert!(Instant::now() < deadline, "no line end after {value:?}");
            self.read_some();
        }
    }
}

impl Terminal for Wss {
    fn send_text(&mut self, s: &str) {
        self.send(s)
    }
    fn send_binary(&mut self, b: &[u8]) {
        self.ws.send(tungstenite::Message::binary(b.to_vec())).unwrap();
    }
    fn expect_within(&mut self, pat: &str, within: Duration) {
        self.expect_by(pat, within);
    }
}

// ------------------------------------------------------------ tests

#[test]
fn self_signed_serves_everything_over_tls_and_keeps_its_fingerprint() {
    let rig = Rig::new("tls-self", json!({"selfSigned": true}));
    let (srv, fp) = rig.start();
    let addr = srv.addr.clone();

    // The pair: in <stateDir>/tls, owner-only.
    use std::os::unix::fs::PermissionsExt;
    let tls_dir = rig.dir.join("state/aion-connector/tls");
    let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&tls_dir), 0o700);
    assert_eq!(mode(&tls_dir.join("cert.pem")), 0o600);
    assert_eq!(mode(&tls_dir.join("key.pem")), 0o600);

    // ping and files.read on one keep-alive connection.
    let mut conn = tls(&addr, &fp);
    assert_ping(call_on(&mut conn, "ping", json!({})));
    let (status, v) = call_on(&mut conn, "repos.sync", json!({"repos": [{"name": "."}]}));
    assert_eq!(status, 200, "{v}");
    let (status, v) = call_on(&mut conn, "files.read", json!({"path": "hello.txt"}));
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["content"], "hello over tls\n", "{v}");
    assert_ping(call_on(&mut conn, "ping", json!({})));

    // An NDJSON stream (invoke stream:true with the fake acpx).
    let body = request_body(
        TOKEN,
        "invoke",
        json!({"agent": "fake", "prompt": "lines 3", "session": "n", "stream": true}),
    );
    conn.get_mut().write_all(&post_request("x", &body, false)).unwrap();
    let resp = read_response(&mut conn).unwrap();
    assert_eq!(resp.status, 200);
    assert_eq!(resp.header("content-type"), Some("application/x-ndjson"));
    let lines: Vec<Value> = resp.text().lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(lines.len(), 4, "{}", resp.text());
    assert_eq!(lines[3]["type"], "complete");
    assert_ping(call_on(&mut conn, "ping", json!({})));

    // The HTTP terminal.
    let (status, v) = call_on(&mut conn, "terminal.spawn", json!({}));
    assert_eq!(status, 200, "{v}");
    let id = v["sessionId"].as_str().unwrap().to_string();
    let (status, _) =
        call_on(&mut conn, "terminal.input", json!({"sessionId": id, "data": "echo T-$((6*7))\r"}));
    assert_eq!(status, 200);
    let mut seen = String::new();
    poll("terminal.output over TLS", || {
        let (_, v) = call_on(&mut conn, "terminal.output", json!({"sessionId": id}));
        seen.push_str(v["data"].as_str().unwrap_or(""));
        seen.contains("T-42").then_some(())
    });
    let (status, _) = call_on(&mut conn, "terminal.close", json!({"sessionId": id}));
    assert_eq!(status, 200);

    // The WebSocket terminal over wss://: echo, resize.
    let mut ws = Wss::connect(&addr, &fp, &format!("/ws?token={TOKEN}"));
    assert_eq!(ws.ask(1, "$((2+3))"), "5");
    ws.send(r#"{"type":"resize","cols":123,"rows":45}"#);
    assert_eq!(ws.ask(2, "$(stty size)"), "45 123");
    // A long line both ways.
    let long = "x".repeat(3000);
    assert_eq!(ws.ask(3, &long), long);
    drop(ws);

    // Plain HTTP on the TLS port: a plain 400 saying so, then close.
    let resp = raw(&addr, &post_request(&addr, &request_body(TOKEN, "ping", json!({})), false)).unwrap();
    assert_eq!(resp.status, 400, "{}", resp.head);
    assert!(resp.text().contains("https://"), "{}", resp.text());
    // Garbage that starts like a handshake: the connection closes, the server is fine.
    garbage_handshake(&addr);
    srv.wait_stderr("one line on the failed handshake", |e| {
        e.contains("tls: handshake with 127.0.0.1 failed")
    });
    // A client that pins another certificate is refused.
    assert!(try_tls(&addr, &format!("sha256:{}", "0".repeat(64))).is_err());
    assert_ping(call_tls(&addr, &fp, "ping", json!({})));
    assert_ping(call_on(&mut conn, "ping", json!({})));

    // `fingerprint CONFIG` says the same; a restart serves the same pair.
    let (code, out, err) = rig.fingerprint_command();
    assert_eq!((code, out.trim()), (0, format!("tls fingerprint {fp}").as_str()), "{err}");
    drop(conn);
    drop(srv);
    let (srv, again) = rig.start();
    assert_eq!(again, fp);
    assert_ping(call_tls(&srv.addr, &fp, "ping", json!({})));
}

/// A key and a certificate for localhost, as PEM (rcgen, as a user's CA would).
fn pair() -> (String, String) {
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let params = rcgen::CertificateParams::new(vec!["localhost".to_string()]).unwrap();
    let cert = params.self_signed(&key).unwrap();
    (cert.pem(), key.serialize_pem())
}

fn pem_fingerprint(pem: &str) -> String {
    use rustls::pki_types::pem::PemObject;
    fingerprint_of(&CertificateDer::from_pem_slice(pem.as_bytes()).unwrap())
}

#[test]
fn cert_files_are_rotated_on_sighup_without_dropping_connections() {
    let rig = Rig::new("tls-files", json!({"certFile": "c.pem", "keyFile": "k.pem"}));
    let (cert1, key1) = pair();
    write(rig.dir.join("c.pem"), &cert1);
    write(rig.dir.join("k.pem"), &key1);
    let (srv, fp) = rig.start();
    assert_eq!(fp, pem_fingerprint(&cert1));
    let mut open = tls(&srv.addr, &fp);
    assert_ping(call_on(&mut open, "ping", json!({})));
    // `status` shows the fingerprint served (JSON and text).
    let (status_fp, text) = rig.status();
    assert_eq!(status_fp, fp);
    assert!(text.contains(&format!("tls on, certificate fingerprint {fp}")), "{text}");

    // certbot renews: new files, then SIGHUP.
    let (cert2, key2) = pair();
    write(rig.dir.join("k.pem"), &key2);
    write(rig.dir.join("c.pem"), &cert2);
    let fp2 = pem_fingerprint(&cert2);
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(srv.pid() as i32), nix::sys::signal::Signal::SIGHUP)
        .unwrap();
    srv.wait_stderr("the reload", |e| e.contains(&format!("TLS certificate reloaded, fingerprint {fp2}")));
    // The open connection goes on; a new one sees the new certificate only.
    assert_ping(call_on(&mut open, "ping", json!({})));
    assert_ping(call_tls(&srv.addr, &fp2, "ping", json!({})));
    assert!(try_tls(&srv.addr, &fp).is_err(), "a new connection still got the old certificate");
    let (code, out, _) = rig.fingerprint_command();
    assert_eq!((code, out.trim()), (0, format!("tls fingerprint {fp2}").as_str()));
    assert_eq!(rig.status().0, fp2, "status shows the reloaded certificate");

    // A broken renewal (key of another cert) keeps the served pair.
    write(rig.dir.join("k.pem"), &key1);
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(srv.pid() as i32), nix::sys::signal::Signal::SIGHUP)
        .unwrap();
    srv.wait_stderr("the refused reload", |e| e.contains("not reloaded"));
    assert_ping(call_tls(&srv.addr, &fp2, "ping", json!({})));
    assert_ping(call_on(&mut open, "ping", json!({})));
}

#[test]
fn bad_tls_files_are_config_errors_named_by_path() {
    let rig = Rig::new("tls-bad", json!({"certFile": "c.pem", "keyFile": "k.pem"}));
    let cfg = rig.cfg.to_str().unwrap();
    let (code, _, err) = run(&[cfg], rig.dir.path(), &rig.env());
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("tls: ") && err.contains("c.pem"), "{err}");
    let (cert1, _) = pair();
    let (_, key2) = pair();
    write(rig.dir.join("c.pem"), &cert1);
    write(rig.dir.join("k.pem"), &key2);
    let (code, _, err) = run(&[cfg], rig.dir.path(), &rig.env());
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("the key does not match the certificate"), "{err}");
}

#[test]
fn wss_carries_a_flood_and_reattaches() {
    let rig = Rig::new("tls-wss", json!({"selfSigned": true}));
    let (srv, fp) = rig.start();
    let target = format!("/ws?token={TOKEN}&session=keep");
    let mut ws = Wss::connect(&srv.addr, &fp, &target);
    assert_eq!(ws.ask(1, "$((1+1))"), "2");
    // 4 MB of output through the non-blocking TLS writes, the reader late at
    // first, then draining: every byte arrives (memory while a reader stops:
    // `wss_a_client_that_stops_reading_keeps_server_memory_bounded`).
    ws.send("head -c 4000000 /dev/zero | tr '\\0' y; echo; echo F''LOOD-DONE\r");
    std::thread::sleep(Duration::from_millis(300));
    let deadline = Instant::now() + DEADLINE * 3;
    ws.ws.get_ref().sock.set_read_timeout(Some(Duration::from_millis(200))).unwrap();
    let mut ys = 0usize;
    let mut tail = String::new();
    while !tail.contains("FLOOD-DONE") {
        assert!(Instant::now() < deadline, "flood not done: {ys} y's so far");
        match ws.ws.read() {
            Ok(tungstenite::Message::Text(t)) => {
                ys += t.bytes().filter(|b| *b == b'y').count();
                tail = format!("{}{}", &tail[tail.len().saturating_sub(32)..], t);
            }
            Ok(_) => {}
            Err(tungstenite::Error::Io(e))
                if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {}
            Err(e) => panic!("wss read during the flood: {e}"),
        }
    }
    assert!(ys >= 4_000_000, "{ys} y's of 4000000");
    ws.out.clear();
    assert_eq!(ws.ask(2, "$((2+2))"), "4");
    // Reattach: a new wss connection to the same session finds the same shell.
    ws.send("X=kept\r");
    assert_eq!(ws.ask(3, "$X"), "kept");
    drop(ws);
    let mut again = Wss::connect(&srv.addr, &fp, &target);
    assert_eq!(again.ask(4, "$X"), "kept");
}

#[test]
fn wss_a_client_that_stops_reading_keeps_server_memory_bounded() {
    let rig = Rig::new("tls-wss-flow", json!({"selfSigned": true}));
    let (srv, fp) = rig.start();
    let mut ws = Wss::connect(&srv.addr, &fp, &format!("/ws?token={TOKEN}"));
    let ping = || assert_ping(call_tls(&srv.addr, &fp, "ping", json!({})));
    let before = assert_unread_flood_keeps_memory_bounded(&srv, &mut ws, ping);
    assert_eq!(ws.ask(1, "$((3+4))"), "7");
    drop(ws);
    ping();
    assert!(srv.rss_kb() <= before + 4096, "RSS {} kB after, {before} kB before", srv.rss_kb());
}

#[test]
fn every_other_action_works_over_tls() {
    let rig = Rig::new("tls-actions", json!({"selfSigned": true}));
    let proj = rig.dir.join("proj");
    repo_with(&proj, &[]);
    write(proj.join("hello.txt"), "changed over tls\n");
    let (srv, fp) = rig.start();
    let addr = srv.addr.clone();
    let mut conn = tls(&addr, &fp);
    let (status, v) = call_on(&mut conn, "repos.sync", json!({"repos": [{"name": "."}]}));
    assert_eq!(status, 200, "{v}");
    // A finished run for `runs` and `runs.output`, a waiting one to stop.
    let body = request_body(
        TOKEN,
        "invoke",
        json!({"agent": "fake", "prompt": "lines 2", "session": "done", "stream": true}),
    );
    conn.get_mut().write_all(&post_request("x", &body, false)).unwrap();
    let resp = read_response(&mut conn).unwrap();
    assert!(resp.text().contains(r#""type":"complete""#), "{}", resp.text());
    let mut waiting = tls(&addr, &fp);
    let body = request_body(
        TOKEN,
        "invoke",
        json!({"agent": "fake", "prompt": "idle waiting", "session": "w", "stream": true}),
    );
    waiting.get_mut().write_all(&post_request("x", &body, false)).unwrap();
    poll("the waiting run to be listed", || {
        let (_, v) = call_on(&mut conn, "runs", json!({}));
        v["active"].as_array().is_some_and(|a| a.iter().any(|r| r["session"] == "w")).then_some(())
    });

    type Check = fn(&Value);
    let actions: [(&str, Value, Check); 7] = [
        ("files.tree", json!({}), |v| {
            assert!(tree_paths(&v["tree"]).contains(&"hello.txt".to_string()), "{v}")
        }),
        ("git.status", json!({}), |v| {
            assert!(
                v.as_array().unwrap().iter().any(|e| e["path"] == "hello.txt" && e["status"] == "M"),
                "{v}"
            )
        }),
        ("git.diff", json!({}), |v| {
            assert!(v["diff"].as_str().unwrap().contains("+changed over tls"), "{v}")
        }),
        ("workspaces", json!({}), |v| assert_eq!(v["list"].as_array().map(Vec::len), Some(1), "{v}")),
        ("runs.output", json!({"session": "done"}), |v| {
            assert_eq!(v["posts"].as_array().unwrap().last().unwrap()["type"], "complete", "{v}")
        }),
        ("runs", json!({}), |v| {
            assert!(v["finished"].as_array().unwrap().iter().any(|r| r["session"] == "done"), "{v}")
        }),
        ("stop", json!({"session": "w"}), |v| assert_eq!(v["stopping"], true, "{v}")),
    ];
    for (action, payload, check) in actions {
        let (status, v) = call_on(&mut conn, action, payload);
        assert_eq!(status, 200, "{action} over TLS: {v}");
        check(&v);
    }
    // The stopped run's stream ends with its error.
    let resp = read_response(&mut waiting).unwrap();
    let last: Value = serde_json::from_str(resp.text().lines().last().unwrap()).unwrap();
    assert_eq!(
        (last["type"].as_str(), last["error"].as_str()),
        (Some("error"), Some("stopped")),
        "{}",
        resp.text()
    );
    assert_ping(call_on(&mut conn, "ping", json!({})));
}

#[test]
fn fingerprint_first_on_a_fresh_state_dir_makes_the_pair_the_server_then_serves() {
    let rig = Rig::new("tls-fp-first", json!({"selfSigned": true}));
    let tls_dir = rig.dir.join("state/aion-connector/tls");
    assert!(!tls_dir.exists());
    let (code, out, err) = rig.fingerprint_command();
    assert_eq!(code, 0, "{err}");
    let printed = out.trim().strip_prefix("tls fingerprint ").unwrap_or_else(|| panic!("{out}")).to_string();
    assert!(tls_dir.join("cert.pem").exists() && tls_dir.join("key.pem").exists());
    // Asked again, the same pair.
    assert_eq!(rig.fingerprint_command().1, out);
    let (srv, served) = rig.start();
    assert_eq!(served, printed);
    assert_ping(call_tls(&srv.addr, &printed, "ping", json!({})));
}

/// Sends bytes that begin like a handshake and are not one; waits for the close.
fn garbage_handshake(addr: &str) {
    let mut s = connect(addr);
    s.write_all(&[0x16, 0x03, 0x01, 0x00, 0x05, 1, 2, 3, 4, 5, 6, 7, 8, 9]).unwrap();
    let mut sink = Vec::new();
    let _ = s.read_to_end(&mut sink); // EOF or reset, within the read timeout
}

#[test]
fn a_flood_of_garbage_handshakes_is_logged_in_a_few_lines() {
    let rig = Rig::new("tls-garbage", json!({"selfSigned": true}));
    let (srv, fp) = rig.start();
    let lines = |e: &str| e.lines().filter(|l| l.contains("tls: handshake with 127.0.0.1 failed")).count();
    for _ in 0..200 {
        garbage_handshake(&srv.addr);
    }
    assert_ping(call_tls(&srv.addr, &fp, "ping", json!({})));
    let err = srv.wait_stderr("the first failed handshake's line", |e| lines(e) >= 1);
    assert!(lines(&err) <= 3, "{} lines for 200 failed handshakes:\n{err}", lines(&err));
    // After the period, those left out are counted: by the next failure's
    // line, or by the log writer's count line, whichever comes first (time
    // passing is the test: one more garbage handshake every 500 ms).
    let count = |l: &str| {
        let n = match l.split_once("tls: failed handshakes: ") {
            Some((_, n)) => n,
            None => l.split_once("failed: ")?.1.split_once("(and ")?.1,
        };
        n.split(' ').next()?.parse::<u64>().ok()
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    let skipped = loop {
        assert!(Instant::now() < deadline, "no line with the count:\n{}", srv.stderr());
        garbage_handshake(&srv.addr);
        if let Some(n) = srv.stderr().lines().find_map(count) {
            break n;
        }
        std::thread::sleep(Duration::from_millis(500));
    };
    assert!(skipped >= 199, "{skipped} left out of 200");
    // A flood that stops: its count comes from the log writer once the
    // period is over, without another failure to carry it.
    for _ in 0..20 {
        garbage_handshake(&srv.addr);
    }
    let before = srv.stderr().lines().count();
    // The period restarted with the last count: its end is up to 10 s away.
    let mut err = String::new();
    let seen = eventually(Duration::from_secs(30), || {
        err = srv.stderr();
        err.lines()
            .skip(before)
            .any(|l| l.contains("tls: failed handshakes: ") && l.contains(" more line(s) in the last 10 s"))
    });
    assert!(seen, "no count of the flood that stopped:\n{err}");
    // Each of the 20 has its own line, or is counted in a later one.
    let tail: Vec<&str> = err.lines().skip(before).collect();
    let lines = tail.iter().filter(|l| l.contains("tls: handshake with 127.0.0.1 failed")).count() as u64;
    let counted: u64 = tail.iter().filter_map(|l| count(l)).sum();
    assert!(lines + counted >= 20, "{lines} lines + {counted} counted of the last 20:\n{err}");
    assert_ping(call_tls(&srv.addr, &fp, "ping", json!({})));
}
