//! `aion-connector mcp` over stdio (JSON-RPC lines), against a real connector
//! reached on its local socket `<stateDir>/mcp.sock`, with the environment the
//! `.acpxrc.json` entry gives it; `display_*` reach a fake platform (tiny_http).

use crate::util::*;
use serde_json::{Value, json};
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc;

/// The project's token: the MCP key is derived from it. Never logged.
const TOKEN: &str = "mcp-proj-token-5b7c9d1e3f5a7b9c1d3e";
const OTHER: &str = "mcp-other-token-2a4c6e8f0b1d3f5a7c9e";
/// The run's callback token (AION_TOKEN). Never logged.
const CB_TOKEN: &str = "callback-token-8e6c4a2f0d9b7a5c";

/// What `.acpxrc.json` gives the MCP server: HMAC-SHA256(token, "aion-mcp").
fn mcp_key(token: &str) -> String {
    hmac_sha256(token, b"aion-mcp")
}

/// A connector serving project "p" (dir `proj`) and "q" (dir `other`), state
/// in `state`. Background processes it reports are killed on drop, whatever
/// the test did (the connector itself is SIGKILLed by `Server`'s drop).
struct Rig {
    dir: TempDir,
    proj: PathBuf,
    state: PathBuf,
    server: Server,
    pids: std::cell::RefCell<Vec<i32>>,
}

impl Rig {
    fn new(tag: &str, limits: Value) -> Rig {
        let dir = TempDir::new(tag);
        let proj = dir.join("proj");
        std::fs::create_dir_all(&proj).unwrap();
        let state = dir.join("state");
        let server = Server::start(dir.path(), &rig_config(&dir, &limits));
        Rig { proj, state, server, dir, pids: Default::default() }
    }

    fn socket(&self) -> PathBuf {
        self.state.join("mcp.sock")
    }

    /// An MCP server for project `project` presenting `key`, plus `extra` env.
    fn mcp(&self, project: &str, key: &str, extra: &[(&str, &str)]) -> Mcp {
        let socket = self.socket();
        let mut env = vec![
            ("AION_CONNECTOR_SOCKET", socket.to_str().unwrap()),
            ("AION_PROJECT", project),
            ("AION_MCP_KEY", key),
        ];
        env.extend_from_slice(extra);
        Mcp::start(&self.proj, &env)
    }

    fn p(&self) -> Mcp {
        self.mcp("p", &mcp_key(TOKEN), &[])
    }

    /// `run_background` that must keep running: its pid (remembered for cleanup).
    fn started(&self, mcp: &mut Mcp, command: &str) -> i32 {
        let (text, err) = mcp.tool("run_background", json!({ "command": command }));
        assert!(!err, "run_background {command:?}: {text}");
        let pid = pid_of(&text);
        self.pids.borrow_mut().push(pid);
        pid
    }
}

impl Drop for Rig {
    fn drop(&mut self) {
        for &pid in self.pids.borrow().iter() {
            let _ =
                nix::sys::signal::killpg(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGKILL);
        }
    }
}

fn rig_config(dir: &TempDir, limits: &Value) -> String {
    let other = dir.join("other");
    std::fs::create_dir_all(&other).unwrap();
    config(
        json!({
            "p": {"token": TOKEN, "dir": dir.join("proj").to_str().unwrap()},
            "q": {"token": OTHER, "dir": other.to_str().unwrap()},
        }),
        Some(json!({"stateDir": dir.join("state").to_str().unwrap(), "limits": limits})),
    )
}

/// `aion-connector mcp` with stdin and stdout piped; answers read by a thread.
struct Mcp {
    child: Child,
    stdin: Option<ChildStdin>,
    lines: mpsc::Receiver<Value>,
    next: u64,
}

impl Mcp {
    fn start(cwd: &Path, env: &[(&str, &str)]) -> Mcp {
        let mut cmd = Command::new(BIN);
        cmd.arg("mcp").current_dir(cwd).stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::null());
        for k in [
            "AION_CONNECTOR_SOCKET",
            "AION_PROJECT",
            "AION_MCP_KEY",
            "AION_CALLBACK",
            "AION_TOKEN",
            "AION_SESSION_ID",
        ] {
            cmd.env_remove(k);
        }
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().expect("spawn aion-connector mcp");
        let stdin = child.stdin.take();
        let out = child.stdout.take().unwrap();
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines() {
                let Ok(line) = line else { break };
                let v: Value =
                    serde_json::from_str(&line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
                if tx.send(v).is_err() {
                    break;
                }
            }
        });
        Mcp { child, stdin, lines, next: 0 }
    }

    fn send(&mut self, line: &str) {
        let stdin = self.stdin.as_mut().expect("stdin open");
        stdin.write_all(line.as_bytes()).unwrap();
        stdin.write_all(b"\n").unwrap();
        stdin.flush().unwrap();
    }

    /// The next answer line (panics after DEADLINE).
    fn answer(&self) -> Value {
        self.lines.recv_timeout(DEADLINE).expect("an answer line within the deadline")
    }

    /// Sends a request with a fresh id; the next answer must be its own.
    fn request(&mut self, method: &str, params: Value) -> Value {
        self.next += 1;
        let id = self.next;
        self.send(&json!({"jsonrpc": "2.0", "id": id, "method": method, "params": params}).to_string());
        let a = self.answer();
        assert_eq!(a["jsonrpc"], "2.0");
        assert_eq!(a["id"], id, "answer to another request: {a}");
        a
    }

    /// A tool's (text, isError).
    fn tool(&mut self, name: &str, arguments: Value) -> (String, bool) {
        let a = self.request("tools/call", json!({"name": name, "arguments": arguments}));
        let r = &a["result"];
        assert!(a.get("error").is_none(), "tools/call {name}: {a}");
        assert_eq!(r["content"][0]["type"], "text", "{a}");
        (r["content"][0]["text"].as_str().unwrap().to_string(), r["isError"] == true)
    }

    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Mcp {
    fn drop(&mut self) {
        self.kill();
    }
}

/// (ppid, pgid) from /proc/PID/stat.
fn parent_and_group(pid: i32) -> (i32, i32) {
    stat(pid).unwrap_or_else(|| panic!("process {pid} is gone"))
}

fn stat(pid: i32) -> Option<(i32, i32)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let f: Vec<&str> = stat.rsplit_once(") ")?.1.split(' ').collect();
    Some((f.get(1)?.parse().ok()?, f.get(2)?.parse().ok()?))
}

fn environ(pid: i32) -> Vec<String> {
    let env = std::fs::read(format!("/proc/{pid}/environ")).unwrap_or_default();
    env.split(|&b| b == 0).map(|v| String::from_utf8_lossy(v).into_owned()).collect()
}

#[test]
fn initialize_tools_list_notifications_and_errors() {
    let dir = TempDir::new("mcp-proto");
    let mut mcp = Mcp::start(dir.path(), &[]);
    let a = mcp.request("initialize", json!({"protocolVersion": "2025-06-18", "capabilities": {}}));
    let r = &a["result"];
    assert_eq!(r["protocolVersion"], "2024-11-05");
    assert!(r["capabilities"]["tools"].is_object(), "{a}");
    assert_eq!(r["serverInfo"]["name"], "aion");

    // A notification gets no answer: the next line is the ping's.
    mcp.send(r#"{"jsonrpc":"2.0","method":"notifications/initialized"}"#);
    mcp.send(r#"{"jsonrpc":"2.0","method":"no/such/notification"}"#);
    mcp.send("");
    let a = mcp.request("ping", Value::Null);
    assert_eq!(a["result"], json!({}));

    let a = mcp.request("tools/list", json!({}));
    let tools = a["result"]["tools"].as_array().unwrap();
    let names: Vec<&str> = tools.iter().map(|t| t["name"].as_str().unwrap()).collect();
    assert_eq!(
        names,
        ["run_background", "check_background", "stop_background", "display_set", "display_clear"]
    );
    let schema = |i: usize| &tools[i]["inputSchema"];
    assert_eq!(schema(0)["required"], json!(["command"]));
    assert_eq!(schema(0)["properties"]["cwd"]["type"], "string");
    assert_eq!(schema(1)["properties"]["pid"]["type"], "number");
    assert_eq!(schema(2)["required"], json!(["pid"]));
    assert_eq!(schema(3)["required"], json!(["url"]));
    assert_eq!(schema(4), &json!({"type": "object", "properties": {}}));
    assert!(
        tools[0]["description"]
            .as_str()
            .unwrap()
            .starts_with("Start a long-running process in the background")
    );

    let a = mcp.request("resources/list", json!({}));
    assert_eq!(a["error"], json!({"code": -32601, "message": "Method not found: resources/list"}));
    let a = mcp.request("tools/call", json!({"name": "rm_rf", "arguments": {}}));
    assert_eq!(a["error"], json!({"code": -32601, "message": "Unknown tool: rm_rf"}));
    let a = mcp.request("tools/call", Value::Null);
    assert_eq!(a["error"]["code"], -32602);
    mcp.send("{not json");
    let a = mcp.answer();
    assert_eq!((a["id"].clone(), a["error"]["code"].clone()), (Value::Null, json!(-32700)));

    // Without the connector's environment the tools say what is missing.
    let (text, err) = mcp.tool("run_background", json!({"command": "true"}));
    assert!(err && text.contains("AION_CONNECTOR_SOCKET"), "{text}");
    let (text, err) = mcp.tool("display_set", json!({"url": "https://x.example/"}));
    assert!(err, "{text}");
    assert_eq!(text, "Failed to set display: no callback URL (AION_CALLBACK is empty)");
    let (text, err) = mcp.tool("run_background", json!({}));
    assert_eq!((text.as_str(), err), ("Error: command is required", true));

    // End of input: it exits 0.
    drop(mcp.stdin.take());
    let status = wait_exit(&mut mcp.child, DEADLINE).expect("mcp exits at end of input");
    assert_eq!(status.code(), Some(0));
}

#[test]
fn a_background_process_outlives_the_mcp_server_and_stop_ends_it() {
    let rig = Rig::new("mcp-bg", json!({}));
    let mut mcp = rig.p();
    mcp.request("initialize", json!({}));

    // While run_background watches its process, other requests are answered.
    let command = "echo ready; echo oops >&2; exec sleep 300";
    mcp.send(
        &json!({"jsonrpc": "2.0", "id": "bg", "method": "tools/call",
                "params": {"name": "run_background", "arguments": {"command": command}}})
        .to_string(),
    );
    mcp.send(r#"{"jsonrpc":"2.0","id":"ping","method":"ping"}"#);
    let first = mcp.answer();
    assert_eq!(first["id"], "ping", "the ping waited for run_background: {first}");
    let a = mcp.answer();
    assert_eq!(a["id"], "bg");
    let text = a["result"]["content"][0]["text"].as_str().unwrap();
    assert!(a["result"]["isError"] != true, "{a}");
    let pid = pid_of(text);
    rig.pids.borrow_mut().push(pid);
    assert!(
        text.starts_with(&format!("Process running in background.\nPID: {pid}\nCommand: {command}")),
        "{text}"
    );

    // The connector's child, leading its own group, marked as a background
    // process (not as a run).
    assert!(alive(pid));
    assert_eq!(parent_and_group(pid), (rig.server.pid() as i32, pid));
    let env = environ(pid);
    assert!(env.iter().any(|v| v.starts_with("AION_BG_ID=")), "{env:?}");
    assert!(!env.iter().any(|v| v.starts_with("AION_RUN_ID=") || v.starts_with("AION_MCP_KEY=")), "{env:?}");

    // The MCP server goes (as acpx's tree is swept at the end of a run): the
    // process stays.
    mcp.kill();
    assert!(alive(pid), "the background process died with the MCP server");

    let mut mcp = rig.p();
    let out = poll("both output lines", || {
        let (text, err) = mcp.tool("check_background", json!({ "pid": pid }));
        assert!(!err, "{text}");
        text.ends_with("ready\noops").then_some(text)
    });
    assert_eq!(
        out,
        format!("PID: {pid}\nStatus: running\nCommand: {command}\n\nRecent output:\nready\noops")
    );

    let (text, err) = mcp.tool("stop_background", json!({ "pid": pid }));
    assert_eq!((text, err), (format!("Process {pid} stopped."), false));
    assert!(eventually(DEADLINE, || group_members(pid).is_empty()), "the group outlived stop_background");
    let (text, err) = mcp.tool("check_background", json!({ "pid": pid }));
    assert_eq!((text, err), (format!("No background process with PID {pid}"), true));
    let (text, err) = mcp.tool("stop_background", json!({ "pid": pid }));
    assert_eq!((text, err), (format!("No background process with PID {pid}"), true));
    let (text, err) = mcp.tool("check_background", json!({ "pid": "12" }));
    assert!(err && text.starts_with("Error: pid is required"), "{text}");
}

#[test]
fn a_process_that_ends_at_once_is_reported_with_its_output() {
    let rig = Rig::new("mcp-once", json!({}));
    let mut mcp = rig.p();
    let (text, err) = mcp.tool("run_background", json!({"command": "echo bad; exit 3"}));
    assert_eq!(
        text,
        "Process exited immediately with code 3.\nCommand: echo bad; exit 3\n\nOutput:\nbad\n\n\
         The process did not stay running. Check the command and try again."
    );
    assert!(err);
    let (text, err) = mcp.tool("run_background", json!({"command": "true"}));
    assert_eq!(
        text,
        "Process exited immediately with code 0.\nCommand: true\n\n\
         The process did not stay running. Check the command and try again."
    );
    assert!(!err);
}

#[test]
fn sigterm_to_the_connector_ends_its_background_processes() {
    let mut rig = Rig::new("mcp-term", json!({}));
    let mut mcp = rig.p();
    let one = rig.started(&mut mcp, "exec sleep 300");
    // A shell with a child of its own: the whole group goes.
    let two = rig.started(&mut mcp, "sleep 301; echo never");
    assert!(eventually(DEADLINE, || group_members(two).len() == 2), "{:?}", group_members(two));
    let status = rig.server.signal_and_wait(nix::sys::signal::Signal::SIGTERM, DEADLINE);
    assert_eq!(status.code(), Some(0), "{}", rig.server.stderr());
    assert!(
        group_members(one).is_empty() && group_members(two).is_empty(),
        "background processes outlived the connector"
    );
    assert!(!rig.socket().exists(), "the socket file was left behind");
    let (text, err) = mcp.tool("check_background", json!({ "pid": one }));
    assert!(err && text.contains("cannot reach aion-connector"), "{text}");
}

#[test]
fn the_cap_holds_per_project() {
    let rig = Rig::new("mcp-cap", json!({"backgroundPerProject": 2}));
    let mut p = rig.p();
    let first = rig.started(&mut p, "exec sleep 300");
    rig.started(&mut p, "exec sleep 300");
    let (text, err) = p.tool("run_background", json!({"command": "exec sleep 300"}));
    assert!(err, "{text}");
    assert!(text.contains("already runs 2 background processes (limits.backgroundPerProject)"), "{text}");
    // Another project has a cap of its own.
    let mut q = rig.mcp("q", &mcp_key(OTHER), &[]);
    rig.started(&mut q, "exec sleep 300");
    // A stopped one makes room.
    let (text, err) = p.tool("stop_background", json!({ "pid": first }));
    assert!(!err, "{text}");
    rig.started(&mut p, "exec sleep 300");
}

#[test]
fn a_process_of_another_project_cannot_be_seen_or_stopped() {
    let rig = Rig::new("mcp-other", json!({}));
    let mut q = rig.mcp("q", &mcp_key(OTHER), &[]);
    let pid = rig.started(&mut q, "exec sleep 300");
    let mut p = rig.p();
    let (text, err) = p.tool("check_background", json!({ "pid": pid }));
    assert_eq!((text, err), (format!("No background process with PID {pid}"), true));
    let (text, err) = p.tool("stop_background", json!({ "pid": pid }));
    assert!(err, "{text}");
    assert!(alive(pid));
}

#[test]
fn a_cwd_resolves_inside_the_project_only() {
    let rig = Rig::new("mcp-cwd", json!({}));
    std::fs::create_dir_all(rig.proj.join("sub/deeper")).unwrap();
    std::os::unix::fs::symlink(rig.dir.path(), rig.proj.join("out")).unwrap();
    let mut mcp = rig.p();
    let (text, err) =
        mcp.tool("run_background", json!({"command": "pwd; exec sleep 300", "cwd": "sub/deeper"}));
    assert!(!err, "{text}");
    let pid = pid_of(&text);
    rig.pids.borrow_mut().push(pid);
    let want = rig.proj.join("sub/deeper");
    poll("pwd's line", || {
        let (text, _) = mcp.tool("check_background", json!({ "pid": pid }));
        text.ends_with(&format!("Recent output:\n{}", want.display())).then_some(())
    });
    // The absolute form of the same dir is fine too.
    let (text, err) =
        mcp.tool("run_background", json!({"command": "exec sleep 300", "cwd": want.to_str().unwrap()}));
    assert!(!err, "{text}");
    rig.pids.borrow_mut().push(pid_of(&text));
    for (cwd, why) in [
        ("/", "is outside the project directory"),
        ("..", "is outside the project directory"),
        ("out", "is outside the project directory"),
        ("missing", "No such file or directory"),
    ] {
        let (text, err) = mcp.tool("run_background", json!({"command": "exec sleep 300", "cwd": cwd}));
        assert!(err && text.starts_with("Error: cwd ") && text.contains(why), "cwd {cwd}: {text}");
    }
}

#[test]
fn a_wrong_key_or_project_is_refused() {
    let rig = Rig::new("mcp-key", json!({}));
    let wrong = [
        ("p", mcp_key(OTHER)),
        ("p", "sha256=00".to_string()),
        ("p", String::new()),
        ("nope", mcp_key(TOKEN)),
        ("q", mcp_key(TOKEN)),
    ];
    for (project, key) in &wrong {
        let mut mcp = rig.mcp(project, key, &[]);
        let (text, err) = mcp.tool("run_background", json!({"command": "exec sleep 300"}));
        assert!(err, "{project}: {text}");
        assert!(text.contains("not connected") || text.contains("wrong key"), "{project}: {text}");
    }
    assert_eq!(
        children_of(rig.server.pid() as i32),
        Vec::<i32>::new(),
        "a refused request started something"
    );

    // The socket itself: mode 0600, one JSON answer per line, bad lines refused.
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(rig.socket()).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600);
    let s = UnixStream::connect(rig.socket()).unwrap();
    s.set_read_timeout(Some(DEADLINE)).unwrap();
    let mut r = BufReader::new(&s);
    let mut ask = |line: &str| {
        (&s).write_all(format!("{line}\n").as_bytes()).unwrap();
        let mut a = String::new();
        r.read_line(&mut a).unwrap();
        serde_json::from_str::<Value>(&a).unwrap()
    };
    assert_eq!(ask("{nope")["kind"], "bad_request");
    let a = ask(&json!({"op": "bg.list", "project": "p", "key": mcp_key(OTHER)}).to_string());
    assert_eq!((a["ok"].clone(), a["kind"].clone()), (json!(false), json!("auth")));
    let a = ask(&json!({"op": "bg.list", "project": "p", "key": mcp_key(TOKEN)}).to_string());
    assert_eq!(a, json!({"ok": true, "processes": []}));
    let log = rig.server.stderr();
    for secret in [TOKEN, OTHER, &mcp_key(TOKEN), &mcp_key(OTHER)] {
        assert!(!log.contains(secret), "a secret reached the log:\n{log}");
    }
}

/// Live child processes of `pid`.
fn children_of(pid: i32) -> Vec<i32> {
    let entries = std::fs::read_dir("/proc").unwrap();
    entries
        .filter_map(Result::ok)
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter(|&child| alive(child) && stat(child).is_some_and(|(ppid, _)| ppid == pid))
        .collect()
}

#[test]
fn display_set_and_clear_arrive_signed_in_order() {
    let rig = Rig::new("mcp-display", json!({}));
    // The first post is answered 503 twice: the clear waits for it to go through.
    let platform = Platform::start_with(0, 2, None);
    let callback = platform.url();
    let mut mcp = rig.mcp(
        "p",
        &mcp_key(TOKEN),
        &[("AION_CALLBACK", &callback), ("AION_TOKEN", CB_TOKEN), ("AION_SESSION_ID", "s-7")],
    );
    let (text, err) = mcp.tool("display_set", json!({"url": "https://preview.example/app?x=1"}));
    assert_eq!((text.as_str(), err), ("Display set to: https://preview.example/app?x=1", false));
    let (text, err) = mcp.tool("display_clear", json!({}));
    assert_eq!((text.as_str(), err), ("Display cleared", false));
    assert!(!platform.delivered().is_empty(), "the clear was queued before the set was delivered");
    let posts = poll("two display posts", || {
        let d = platform.delivered();
        (d.len() >= 2).then_some(d)
    });
    assert_eq!(posts.len(), 2);
    let bodies: Vec<Value> = posts.iter().map(Post::json).collect();
    assert_eq!(
        bodies,
        [
            json!({"url": "https://preview.example/app?x=1", "token": CB_TOKEN, "sessionId": "s-7"}),
            json!({"url": "", "token": CB_TOKEN, "sessionId": "s-7"}),
        ]
    );
    for p in &posts {
        assert_eq!(p.path, "/internal/agent-display");
        assert_eq!(p.signature.as_deref(), Some(hmac_sha256(TOKEN, &p.body).as_str()));
        assert!(p.content_type.as_deref().is_some_and(|c| c.starts_with("application/json")));
    }
    // A callback that is no URL is refused, nothing is posted.
    let mut bad =
        rig.mcp("p", &mcp_key(TOKEN), &[("AION_CALLBACK", "file:///etc"), ("AION_SESSION_ID", "s-7")]);
    let (text, err) = bad.tool("display_clear", json!({}));
    assert!(err && text.starts_with("Failed to clear display: the callback (AION_CALLBACK)"), "{text}");
    assert_eq!(platform.posts().len(), 4, "two 503s, then the two posts");

    // A platform that takes nothing: the first post is queued (and retried),
    // the next one of the session is refused rather than sent out of order.
    let down = format!("http://127.0.0.1:{}", free_port());
    let mut mcp = rig.mcp("p", &mcp_key(TOKEN), &[("AION_CALLBACK", &down), ("AION_SESSION_ID", "s-8")]);
    let (text, err) = mcp.tool("display_set", json!({"url": "https://a.example/"}));
    assert!(!err, "{text}");
    let (text, err) = mcp.tool("display_clear", json!({}));
    assert!(
        err && text.starts_with("Failed to clear display: the previous display post is not delivered yet"),
        "{text}"
    );
    let log = rig.server.stderr();
    assert!(!log.contains(CB_TOKEN) && !log.contains(TOKEN), "a secret reached the log:\n{log}");
}

#[test]
fn one_connector_per_socket_and_a_killed_ones_leftovers_are_swept() {
    let mut rig = Rig::new("mcp-stale", json!({}));
    let cfg_path = rig.dir.join("aion.config.json");
    let cfg = cfg_path.to_str().unwrap().to_string();
    // A second connector on the same state dir does not start.
    let (code, _, err) = run(&[&cfg], rig.dir.path(), &[]);
    assert_ne!(code, 0, "a second connector started on the same state dir");
    assert!(!err.is_empty());
    let mut mcp = rig.p();
    let pid = rig.started(&mut mcp, "exec sleep 300");

    // Killed without a chance to clean up: the socket file and the process stay.
    rig.server.child.kill().unwrap();
    rig.server.child.wait().unwrap();
    assert!(rig.socket().exists() && alive(pid));

    // The next connector on this state dir replaces the stale socket and ends
    // what the killed one left running.
    let next = Server::start_args(&[&cfg], rig.dir.path(), &[]);
    assert!(eventually(DEADLINE, || !alive(pid)), "a leftover background process survived the restart");
    let mut mcp = rig.p();
    let fresh = rig.started(&mut mcp, "exec sleep 300");
    assert_eq!(parent_and_group(fresh).0, next.pid() as i32);
}
