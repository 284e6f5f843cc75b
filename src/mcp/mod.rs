//! `aion-connector mcp`: the MCP server an agent gets through `.acpxrc.json`
//! (the Node original shipped it as a separate script). MCP over stdio:
//! newline-delimited JSON-RPC 2.0 on stdin, one answer line per request on
//! stdout. It knows `initialize`, `ping`, `tools/list` and `tools/call`, with
//! the original's five tools: `run_background`, `check_background`,
//! `stop_background`, `display_set`, `display_clear` (their names,
//! descriptions, input schemas and answer texts are the original's).
//!
//! It holds nothing itself: each tool call is one request to the connector
//! that started the run, on its local socket (`AION_CONNECTOR_SOCKET`, see
//! [`crate::net::local`]), for the project `AION_PROJECT` with its key
//! `AION_MCP_KEY`. The background processes are the connector's, so they
//! outlive this process and the agent's turn, and end with the connector.
//! `display_*` send the run's `AION_SESSION_ID`, `AION_CALLBACK` and
//! `AION_TOKEN` along.
//!
//! Threads: the main thread reads stdin and answers everything but
//! `tools/call`; each tool call runs on a short-lived `mcp-call-N` thread
//! (at most [`MAX_CALLS`] at once; past that, on the main thread), so a
//! `run_background` watching its process does not hold up other answers.
//! All answers go through one lock on stdout. At end of input the main
//! thread joins the calls still running and exits.

use crate::background::{Snapshot, Status};
use crate::error::Error;
use crate::net::local::{self, Op, Request};
use serde_json::{Value, json};
use std::io::{BufRead, Read, Write};
use std::path::PathBuf;
use std::sync::Mutex;
use std::time::Duration;

/// The protocol version answered to every `initialize`.
pub const PROTOCOL_VERSION: &str = "2024-11-05";
/// Tool calls running at once on their own threads.
const MAX_CALLS: usize = 16;
/// The longest message read; a longer line is a parse error.
const MAX_MESSAGE: usize = 4 << 20;
/// How long a tool call waits for the connector (a stop may take the
/// connector's `stopGraceSeconds`, at most 600 s).
const CALL_TIMEOUT: Duration = Duration::from_secs(630);

/// The tools, in the original's order and words.
const TOOLS: &str = r#"{"tools":[
{"name":"run_background","description":"Start a long-running process in the background (e.g. dev servers, watchers, builds). Returns immediately with a PID. The process keeps running after the tool returns. Use check_background to see its output later, and stop_background to stop it.","inputSchema":{"type":"object","properties":{"command":{"type":"string","description":"Shell command to run (e.g. \"bun dev\", \"npm start\", \"python -m http.server 8080\")"},"cwd":{"type":"string","description":"Working directory (optional, defaults to project root)"}},"required":["command"]}},
{"name":"check_background","description":"Check status and recent output of a background process started with run_background.","inputSchema":{"type":"object","properties":{"pid":{"type":"number","description":"Process ID returned by run_background"}},"required":["pid"]}},
{"name":"stop_background","description":"Stop a background process started with run_background.","inputSchema":{"type":"object","properties":{"pid":{"type":"number","description":"Process ID returned by run_background"}},"required":["pid"]}},
{"name":"display_set","description":"Show a URL in the team display panel. The display panel is an iframe visible to all team members in the server UI. Use it to share live previews, dashboards, documentation, or any web content. The URL must be accessible from team members' browsers (not localhost on the server).","inputSchema":{"type":"object","properties":{"url":{"type":"string","description":"The URL to display"}},"required":["url"]}},
{"name":"display_clear","description":"Clear the team display panel, removing the currently shown content.","inputSchema":{"type":"object","properties":{}}}
]}"#;

const TOOL_NAMES: [&str; 5] =
    ["run_background", "check_background", "stop_background", "display_set", "display_clear"];

/// What the process was started with (the `.acpxrc.json` entry's env).
struct Env {
    socket: Option<PathBuf>,
    project: String,
    key: String,
    session: String,
    callback: String,
    token: String,
}

impl Env {
    fn read() -> Env {
        let var = |k: &str| std::env::var(k).unwrap_or_default();
        Env {
            socket: std::env::var_os("AION_CONNECTOR_SOCKET").filter(|s| !s.is_empty()).map(PathBuf::from),
            project: var("AION_PROJECT"),
            key: var("AION_MCP_KEY"),
            session: var("AION_SESSION_ID"),
            callback: var("AION_CALLBACK"),
            token: var("AION_TOKEN"),
        }
    }
}

/// Serves stdin until it ends.
pub fn run() -> Result<i32, Error> {
    let env = Env::read();
    let out = Mutex::new(std::io::stdout());
    let stdin = std::io::stdin();
    let mut input = stdin.lock();
    std::thread::scope(|scope| {
        let mut calls: Vec<std::thread::ScopedJoinHandle<'_, ()>> = Vec::new();
        let mut next = 0u64;
        loop {
            let line = match read_message(&mut input) {
                Ok(Some(line)) => line,
                Ok(None) => break,
                Err(_) => {
                    if !send(&out, &error_reply(&Value::Null, -32700, "Parse error: message too long")) {
                        break;
                    }
                    continue;
                }
            };
            let answer = match parse(&line) {
                Parsed::Skip => continue,
                Parsed::Answer(a) => a,
                Parsed::Call { id, name, args } => {
                    calls.retain(|c| !c.is_finished());
                    let (env, out, answer_to) = (&env, &out, id.clone());
                    let work = move || {
                        let result = call_tool(env, &name, &args);
                        send(out, &reply(&id, &result.to_string()));
                    };
                    if calls.len() >= MAX_CALLS {
                        work();
                        continue;
                    }
                    next += 1;
                    let spawned = std::thread::Builder::new()
                        .name(format!("mcp-call-{next}"))
                        .stack_size(256 << 10)
                        .spawn_scoped(scope, work);
                    match spawned {
                        Ok(handle) => {
                            calls.push(handle);
                            continue;
                        }
                        Err(e) => {
                            eprintln!("aion-connector mcp: cannot start a thread for a tool call: {e}");
                            error_reply(
                                &answer_to,
                                -32603,
                                "Internal error: cannot start a thread for the call",
                            )
                        }
                    }
                }
            };
            if !send(&out, &answer) {
                break;
            }
        }
        for c in calls {
            let _ = c.join();
        }
    });
    Ok(0)
}

/// One line (without `\n`); None at end of input; an error for a line over
/// [`MAX_MESSAGE`] (the rest of it is skipped).
fn read_message(input: &mut impl BufRead) -> std::io::Result<Option<Vec<u8>>> {
    let mut line = Vec::new();
    let n = input.by_ref().take(MAX_MESSAGE as u64 + 1).read_until(b'\n', &mut line)?;
    if n == 0 {
        return Ok(None);
    }
    if line.last() == Some(&b'\n') {
        line.pop();
        return Ok(Some(line));
    }
    if line.len() <= MAX_MESSAGE {
        return Ok(Some(line));
    }
    // Skip to the end of the over-long line.
    let mut rest = Vec::new();
    loop {
        rest.clear();
        let n = input.by_ref().take(64 << 10).read_until(b'\n', &mut rest)?;
        if n == 0 || rest.last() == Some(&b'\n') {
            break;
        }
    }
    Err(std::io::Error::new(std::io::ErrorKind::InvalidData, "message too long"))
}

/// Writes one answer line; false once stdout is gone.
fn send(out: &Mutex<std::io::Stdout>, line: &str) -> bool {
    let mut out = out.lock().unwrap_or_else(|p| p.into_inner());
    let mut bytes = Vec::with_capacity(line.len() + 1);
    bytes.extend_from_slice(line.as_bytes());
    bytes.push(b'\n');
    out.write_all(&bytes).and_then(|()| out.flush()).is_ok()
}

/// What a message asks for.
enum Parsed {
    /// A notification, a blank line or a response: nothing to answer.
    Skip,
    Answer(String),
    Call {
        id: Value,
        name: String,
        args: Value,
    },
}

fn parse(line: &[u8]) -> Parsed {
    if line.iter().all(u8::is_ascii_whitespace) {
        return Parsed::Skip;
    }
    let msg: Value = match serde_json::from_slice(line) {
        Ok(v) => v,
        Err(_) => return Parsed::Answer(error_reply(&Value::Null, -32700, "Parse error")),
    };
    let Some(obj) = msg.as_object() else {
        return Parsed::Answer(error_reply(&Value::Null, -32600, "Invalid Request"));
    };
    let id = obj.get("id");
    if id.is_some_and(|id| !(id.is_string() || id.is_number() || id.is_null())) {
        return Parsed::Answer(error_reply(&Value::Null, -32600, "Invalid Request: bad id"));
    }
    let Some(method) = obj.get("method").and_then(Value::as_str) else {
        // A response to a request we never sent, or garbage without an id.
        return match id {
            Some(id) if !obj.contains_key("result") && !obj.contains_key("error") => {
                Parsed::Answer(error_reply(id, -32600, "Invalid Request: no method"))
            }
            _ => Parsed::Skip,
        };
    };
    // Notifications (no id) are never answered.
    let Some(id) = id else { return Parsed::Skip };
    match method {
        "initialize" => {
            let result = json!({
                "protocolVersion": PROTOCOL_VERSION,
                "capabilities": {"tools": {}},
                "serverInfo": {"name": "aion", "version": crate::version::VERSION},
            });
            Parsed::Answer(reply(id, &result.to_string()))
        }
        "ping" => Parsed::Answer(reply(id, "{}")),
        "tools/list" => Parsed::Answer(reply(id, &compact(TOOLS))),
        "tools/call" => {
            let params = obj.get("params").and_then(Value::as_object);
            let Some(name) = params.and_then(|p| p.get("name")).and_then(Value::as_str) else {
                return Parsed::Answer(error_reply(
                    id,
                    -32602,
                    "Invalid params: tools/call needs params.name",
                ));
            };
            if !TOOL_NAMES.contains(&name) {
                return Parsed::Answer(error_reply(id, -32601, &format!("Unknown tool: {name}")));
            }
            let args = params.and_then(|p| p.get("arguments")).cloned().unwrap_or(Value::Null);
            Parsed::Call { id: id.clone(), name: name.to_string(), args }
        }
        _ => Parsed::Answer(error_reply(id, -32601, &format!("Method not found: {method}"))),
    }
}

/// The tool list without the line breaks it is written with.
fn compact(json: &str) -> String {
    json.replace('\n', "")
}

/// `{"jsonrpc":"2.0","id":ID,"result":RESULT}` (RESULT is JSON text).
fn reply(id: &Value, result: &str) -> String {
    format!(r#"{{"jsonrpc":"2.0","id":{id},"result":{result}}}"#)
}

fn error_reply(id: &Value, code: i32, message: &str) -> String {
    format!(r#"{{"jsonrpc":"2.0","id":{id},"error":{}}}"#, json!({"code": code, "message": message}))
}

/// A tool's result: one text, and whether it is an error.
fn text(text: &str, is_error: bool) -> Value {
    json!({"content": [{"type": "text", "text": text}], "isError": is_error})
}

fn call_tool(env: &Env, name: &str, args: &Value) -> Value {
    let empty = serde_json::Map::new();
    let args = match args {
        Value::Object(m) => m,
        Value::Null => &empty,
        _ => return text("Error: arguments must be an object", true),
    };
    match name {
        "run_background" => {
            let command = match args.get("command") {
                Some(Value::String(c)) if !c.is_empty() => c.clone(),
                _ => return text("Error: command is required", true),
            };
            let cwd = match args.get("cwd") {
                None | Some(Value::Null) => None,
                Some(Value::String(c)) => Some(c.clone()),
                Some(_) => return text("Error: cwd must be a string", true),
            };
            let cmd = command.clone();
            ask(env, Op::BgStart { command, cwd }, |a| started(&cmd, &process(a)?))
        }
        "check_background" | "stop_background" => {
            let Some(pid) = pid(args.get("pid")) else {
                return text("Error: pid is required (the number run_background answered)", true);
            };
            if name == "check_background" {
                ask(env, Op::BgCheck { pid }, |a| Some(text(&checked(&process(a)?), false)))
            } else {
                ask(env, Op::BgStop { pid }, |_| Some(text(&format!("Process {pid} stopped."), false)))
            }
        }
        "display_set" | "display_clear" => {
            let (url, done, failed) = if name == "display_set" {
                let Some(url) = args.get("url").and_then(Value::as_str) else {
                    return text("Error: url is required", true);
                };
                (url.to_string(), format!("Display set to: {url}"), "Failed to set display")
            } else {
                (String::new(), "Display cleared".to_string(), "Failed to clear display")
            };
            if env.callback.is_empty() {
                return text(&format!("{failed}: no callback URL (AION_CALLBACK is empty)"), true);
            }
            let op = Op::Display {
                session: env.session.clone(),
                callback: env.callback.clone(),
                token: env.token.clone(),
                url,
            };
            match forward(env, op) {
                Ok(_) => text(&done, false),
                Err(why) => text(&format!("{failed}: {why}"), true),
            }
        }
        _ => text(&format!("Error: unknown tool {name}"), true),
    }
}

/// A pid as the original takes it: a number (an integral float too).
fn pid(v: Option<&Value>) -> Option<i64> {
    let v = v?;
    v.as_i64().or_else(|| v.as_f64().filter(|f| f.fract() == 0.0 && f.abs() < 1e15).map(|f| f as i64))
}

/// Sends `op` and turns the answer into the tool's result with `ok`; a
/// refusal becomes `Error: …` (`No background process with PID N` for an
/// unknown pid).
fn ask(env: &Env, op: Op, ok: impl FnOnce(&Value) -> Option<Value>) -> Value {
    let pid = match &op {
        Op::BgCheck { pid } | Op::BgStop { pid } => Some(*pid),
        _ => None,
    };
    match forward(env, op) {
        Ok(answer) => {
            ok(&answer).unwrap_or_else(|| text("Error: the connector's answer is not understood", true))
        }
        Err(Forward::Refused(kind, _)) if kind == "not_found" && pid.is_some() => {
            text(&format!("No background process with PID {}", pid.unwrap_or_default()), true)
        }
        Err(why) => text(&format!("Error: {why}"), true),
    }
}

/// Why a request to the connector did not succeed.
enum Forward {
    /// The process was not started the way the connector starts it.
    NotConnected,
    Unreachable(PathBuf, std::io::Error),
    /// The connector said no: (kind, message).
    Refused(String, String),
}

impl std::fmt::Display for Forward {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Forward::NotConnected => f.write_str(
                "not connected to aion-connector (AION_CONNECTOR_SOCKET, AION_PROJECT and AION_MCP_KEY are not set; \
                 the connector sets them in .acpxrc.json before each run)",
            ),
            Forward::Unreachable(path, e) => {
                write!(f, "cannot reach aion-connector at {}: {e} (is it still running?)", path.display())
            }
            Forward::Refused(_, message) => f.write_str(message),
        }
    }
}

fn forward(env: &Env, op: Op) -> Result<Value, Forward> {
    let Some(socket) = env.socket.as_ref().filter(|_| !env.project.is_empty() && !env.key.is_empty()) else {
        return Err(Forward::NotConnected);
    };
    let req = Request { project: env.project.clone(), key: env.key.clone(), op };
    let answer =
        local::call(socket, &req, CALL_TIMEOUT).map_err(|e| Forward::Unreachable(socket.clone(), e))?;
    if answer["ok"] == true {
        return Ok(answer);
    }
    let field = |k: &str| answer[k].as_str().unwrap_or_default().to_string();
    Err(Forward::Refused(field("kind"), field("error")))
}

fn process(answer: &Value) -> Option<Snapshot> {
    serde_json::from_value(answer.get("process")?.clone()).ok()
}

/// `run_background`'s answer: running, or how it ended within its first
/// half second (an error unless it exited 0).
fn started(command: &str, p: &Snapshot) -> Option<Value> {
    let lines = p.lines.join("\n");
    Some(match p.status {
        Status::Running => {
            let mut t = format!("Process running in background.\nPID: {}\nCommand: {command}", p.pid);
            if !lines.is_empty() {
                t.push_str(&format!("\n\nInitial output:\n{lines}"));
            }
            text(&t, false)
        }
        Status::Exited { .. } | Status::Killed { .. } => {
            let how = match p.status {
                Status::Exited { code } => format!("with code {code}"),
                Status::Killed { signal } => format!("by signal {signal}"),
                Status::Running => unreachable!("handled above"),
            };
            let mut t = format!("Process exited immediately {how}.\nCommand: {command}");
            if !lines.is_empty() {
                t.push_str(&format!("\n\nOutput:\n{lines}"));
            }
            t.push_str("\n\nThe process did not stay running. Check the command and try again.");
            text(&t, p.status != Status::Exited { code: 0 })
        }
    })
}

/// `check_background`'s answer.
fn checked(p: &Snapshot) -> String {
    let status = match p.status {
        Status::Running => "running".to_string(),
        Status::Exited { code } => format!("exited (code {code})"),
        Status::Killed { signal } => format!("killed (signal {signal})"),
    };
    let lines = if p.lines.is_empty() { "(no output yet)".to_string() } else { p.lines.join("\n") };
    format!("PID: {}\nStatus: {status}\nCommand: {}\n\nRecent output:\n{lines}", p.pid, p.command)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn answer(line: &str) -> Value {
        match parse(line.as_bytes()) {
            Parsed::Answer(a) => serde_json::from_str(&a).unwrap(),
            _ => panic!("{line} got no answer"),
        }
    }

    #[test]
    fn the_tool_list_is_json_with_the_five_tools_in_order() {
        let v: Value = serde_json::from_str(TOOLS).unwrap();
        let names: Vec<&str> =
            v["tools"].as_array().unwrap().iter().map(|t| t["name"].as_str().unwrap()).collect();
        assert_eq!(names, TOOL_NAMES);
        assert!(compact(TOOLS).find('\n').is_none());
    }

    #[test]
    fn requests_notifications_and_errors() {
        let a = answer(r#"{"jsonrpc":"2.0","id":0,"method":"initialize","params":{}}"#);
        assert_eq!(a["id"], 0);
        assert_eq!(a["result"]["protocolVersion"], PROTOCOL_VERSION);
        assert!(matches!(parse(br#"{"jsonrpc":"2.0","method":"notifications/initialized"}"#), Parsed::Skip));
        assert!(matches!(parse(br#"{"jsonrpc":"2.0","method":"no/such"}"#), Parsed::Skip));
        assert!(matches!(parse(b"   "), Parsed::Skip));
        assert_eq!(answer(r#"{"jsonrpc":"2.0","id":"x","method":"no/such"}"#)["error"]["code"], -32601);
        assert_eq!(answer("{nope")["error"]["code"], -32700);
        assert_eq!(answer("{nope")["id"], Value::Null);
        assert_eq!(answer("[1]")["error"]["code"], -32600);
        assert_eq!(answer(r#"{"jsonrpc":"2.0","id":3,"method":"tools/call"}"#)["error"]["code"], -32602);
        let a = answer(r#"{"jsonrpc":"2.0","id":3,"method":"tools/call","params":{"name":"rm"}}"#);
        assert_eq!(a["error"]["message"], "Unknown tool: rm");
    }

    #[test]
    fn answer_texts_are_the_originals() {
        let p = Snapshot {
            pid: 7,
            command: "echo bad; exit 3".into(),
            cwd: "/p".into(),
            started: 0,
            status: Status::Exited { code: 3 },
            lines: vec!["bad".into()],
        };
        let r = started(&p.command, &p).unwrap();
        assert_eq!(
            r["content"][0]["text"],
            "Process exited immediately with code 3.\nCommand: echo bad; exit 3\n\nOutput:\nbad\n\nThe process did not stay running. Check the command and try again."
        );
        assert_eq!(r["isError"], true);
        let p = Snapshot { status: Status::Running, lines: vec!["one".into(), "two".into()], ..p };
        assert_eq!(
            started("c", &p).unwrap()["content"][0]["text"],
            "Process running in background.\nPID: 7\nCommand: c\n\nInitial output:\none\ntwo"
        );
        let p = Snapshot { lines: vec![], ..p };
        assert_eq!(
            checked(&p),
            "PID: 7\nStatus: running\nCommand: echo bad; exit 3\n\nRecent output:\n(no output yet)"
        );
    }

    #[test]
    fn without_a_connector_the_tools_say_so() {
        let env = Env {
            socket: None,
            project: String::new(),
            key: String::new(),
            session: "s".into(),
            callback: String::new(),
            token: String::new(),
        };
        let r = call_tool(&env, "run_background", &json!({"command": "true"}));
        assert_eq!(r["isError"], true);
        assert!(r["content"][0]["text"].as_str().unwrap().contains("not connected to aion-connector"));
        let r = call_tool(&env, "display_clear", &Value::Null);
        assert_eq!(
            r["content"][0]["text"],
            "Failed to clear display: no callback URL (AION_CALLBACK is empty)"
        );
        assert_eq!(
            call_tool(&env, "run_background", &json!({}))["content"][0]["text"],
            "Error: command is required"
        );
    }
}
