//! `aion-connector status [CONFIG] [--json]`: asks the connector serving
//! CONFIG's state dir for its state (the `status` op,
//! [`crate::net::local::Unkeyed`]) and prints it, as text or as the JSON
//! answer. Exit 0; 3 when no connector answers there.
//!
//! Push mode answers on `<stateDir>/mcp.sock`, poll mode on
//! `<stateDir>/poll.sock`; both are asked, push first. CONFIG is a push
//! config (it has `projects`) or poll mode's file (`poll --config FILE`; its
//! `stateDir`, `$AION_STATE_DIR` winning). Without CONFIG, the state dirs of
//! `./aion.config.json` (or the default) and of poll mode's defaults
//! (`$AION_STATE_DIR`, `./config.json`) are asked, in that order.

use crate::config::{self, DEFAULT_CONFIG};
use crate::error::Error;
use crate::net::local::{self, Unkeyed};
use crate::poll;
use serde_json::Value;
use std::fmt::Write as _;
use std::io::ErrorKind;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// The exit status when no connector runs on the state dir.
pub const NOT_RUNNING: i32 = 3;

pub fn run(args: &[&str]) -> Result<i32, Error> {
    let mut json = false;
    let mut path: Option<&str> = None;
    for arg in args {
        match *arg {
            "--json" => json = true,
            "-h" | "--help" => {
                println!("usage: aion-connector status [CONFIG] [--json]");
                return Ok(0);
            }
            a if a.starts_with('-') => return Err(Error::Usage(format!("status: unknown option {a}"))),
            a if path.is_none() => path = Some(a),
            _ => return Err(Error::Usage("usage: aion-connector status [CONFIG] [--json]".into())),
        }
    }
    let env = |k: &str| std::env::var(k).ok();
    let mut dirs = Vec::new();
    match path {
        Some(p) if !is_push_config(Path::new(p)) => {
            dirs.push(poll::config::state_dir(Some(Path::new(p)), &env)?)
        }
        Some(p) => dirs.push(push_state_dir(Path::new(p))?),
        None => {
            let default = Path::new(DEFAULT_CONFIG);
            dirs.push(if default.exists() { push_state_dir(default)? } else { config::state_dir(None) });
            // Poll mode's defaults; a ./config.json that is not poll mode's is no error here.
            if let Ok(dir) = poll::config::state_dir(None, &env)
                && !dirs.contains(&dir)
            {
                dirs.push(dir);
            }
        }
    }
    let mut answer = None;
    let mut tried = Vec::new();
    'ask: for dir in &dirs {
        for file in [local::SOCKET_FILE, local::POLL_SOCKET_FILE] {
            let socket = dir.join(file);
            match local::call(&socket, &Unkeyed::Status {}, Duration::from_secs(10)) {
                Ok(a) => {
                    answer = Some(a);
                    break 'ask;
                }
                Err(e) if matches!(e.kind(), ErrorKind::NotFound | ErrorKind::ConnectionRefused) => {
                    tried.push(format!("{} ({e})", socket.display()));
                }
                Err(e) => return Err(Error::Io { what: "asking the connector", source: e }),
            }
        }
    }
    let Some(answer) = answer else {
        let dirs: Vec<String> = dirs.iter().map(|d| d.display().to_string()).collect();
        eprintln!(
            "aion-connector status: no connector running on {} (tried {})",
            dirs.join(" or "),
            tried.join(", ")
        );
        return Ok(NOT_RUNNING);
    };
    if answer["ok"] != true {
        let why = answer["error"].as_str().unwrap_or("no reason given");
        return Err(Error::Io {
            what: "asking the connector",
            source: std::io::Error::other(why.to_string()),
        });
    }
    if json {
        println!("{answer}");
    } else {
        print!("{}", text(&answer));
    }
    Ok(0)
}

/// Whether `path` is a push config (a JSON object with `projects`, or not a
/// JSON object at all: push's loader then names the problem) rather than
/// poll mode's file.
fn is_push_config(path: &Path) -> bool {
    let Ok(text) = std::fs::read_to_string(path) else { return true };
    match serde_json::from_str::<Value>(&text) {
        Ok(Value::Object(doc)) => doc.contains_key("projects"),
        _ => true,
    }
}

/// The state dir a push connector with this config serves.
fn push_state_dir(path: &Path) -> Result<PathBuf, Error> {
    let (config, _) = config::load(path)?;
    Ok(config::state_dir(config.state_dir.as_deref()))
}

/// `3725` → `1h02m`, `75` → `1m15s`, `9.5` → `9s`.
fn age(v: &Value) -> String {
    let s = v.as_f64().unwrap_or(0.0) as u64;
    match s {
        0..60 => format!("{s}s"),
        60..3600 => format!("{}m{:02}s", s / 60, s % 60),
        _ => format!("{}h{:02}m", s / 3600, s % 3600 / 60),
    }
}

fn str_of(v: &Value) -> &str {
    v.as_str().unwrap_or("-")
}

/// The answer as lines for a person.
fn text(a: &Value) -> String {
    let mut out = String::new();
    if a["mode"] == "poll" {
        poll_text(a, &mut out);
    } else {
        push_text(a, &mut out);
    }
    backlog_text(a, &mut out);
    out
}

/// Poll mode's part: the server and the sessions.
fn poll_text(a: &Value, out: &mut String) {
    let _ = writeln!(
        out,
        "aion-connector {} poll mode (pid {}) up {}, polling {}",
        str_of(&a["version"]),
        a["pid"],
        age(&a["uptimeSeconds"]),
        str_of(&a["server"])
    );
    let _ = writeln!(out, "state dir {}", str_of(&a["stateDir"]));
    let sessions = a["sessions"].as_array().cloned().unwrap_or_default();
    let _ = writeln!(
        out,
        "
sessions: {} of at most {}",
        sessions.len(),
        a["maxConcurrentSessions"]
    );
    for s in &sessions {
        let _ = writeln!(
            out,
            "  session {} pid {} {} {}, {} post(s), {} delivered, {} pending",
            str_of(&s["id"]),
            s["pid"],
            str_of(&s["state"]),
            age(&s["ageSeconds"]),
            s["posts"],
            s["delivered"],
            s["pending"]
        );
    }
}

/// Push mode's part: the listener and each project's work.
fn push_text(a: &Value, out: &mut String) {
    let _ = writeln!(
        out,
        "aion-connector {} (pid {}) up {}, listening on {}",
        str_of(&a["version"]),
        a["pid"],
        age(&a["uptimeSeconds"]),
        str_of(&a["listen"])
    );
    if let Some(fp) = a["tls"]["fingerprint"].as_str() {
        let _ = writeln!(out, "tls on, certificate fingerprint {fp}");
    }
    let _ = writeln!(out, "state dir {}", str_of(&a["stateDir"]));
    for p in a["projects"].as_array().into_iter().flatten() {
        let gone = if p["served"] == false { " (removed from the config; its work goes on)" } else { "" };
        let _ = writeln!(out, "\nproject {}{gone}", str_of(&p["id"]));
        let list = |k: &str| p[k].as_array().cloned().unwrap_or_default();
        let (runs, terms, procs) = (list("runs"), list("terminals"), list("background"));
        if runs.is_empty() {
            let _ = writeln!(out, "  runs: none");
        }
        for r in &runs {
            let pending = match r["pending"].as_u64() {
                Some(n) => format!(", {n} pending"),
                None => String::new(),
            };
            let _ = writeln!(
                out,
                "  run {} agent={} {} {}, {} post(s){pending}",
                str_of(&r["session"]),
                str_of(&r["agent"]),
                str_of(&r["state"]),
                age(&r["ageSeconds"]),
                r["posts"]
            );
        }
        if terms.is_empty() {
            let _ = writeln!(out, "  terminals: none");
        }
        for t in &terms {
            let mut flags = vec![if t["alive"] == true { "alive" } else { "exited" }];
            if t["attached"] == true {
                flags.push("attached");
            }
            let session = t["session"].as_str().map(|s| format!(" session={s}")).unwrap_or_default();
            let _ = writeln!(
                out,
                "  terminal {} ({}){session} {} {}",
                str_of(&t["id"]),
                str_of(&t["kind"]),
                flags.join(","),
                age(&t["ageSeconds"])
            );
        }
        if procs.is_empty() {
            let _ = writeln!(out, "  background: none");
        }
        for b in &procs {
            let command: String = str_of(&b["command"]).chars().take(60).collect();
            let status = str_of(&b["status"]["state"]);
            let _ = writeln!(out, "  background {} {status}: {command}", b["pid"]);
        }
    }
}

/// Both modes' part: the outbox's backlog and the leases.
fn backlog_text(a: &Value, out: &mut String) {
    let o = &a["outbox"];
    let _ = writeln!(
        out,
        "\noutbox: {} stream(s), {} record(s) pending ({} bytes), {} delivered, {} retried, {} dropped",
        o["streams"], o["spooledRecords"], o["spooledBytes"], o["delivered"], o["retried"], o["dropped"]
    );
    if let Some(e) = o["diskError"].as_str() {
        let _ = writeln!(out, "  disk: {e}");
    }
    for g in o["origins"].as_array().into_iter().flatten() {
        let mut line =
            format!("  {}: {} record(s) in {} stream(s)", str_of(&g["origin"]), g["records"], g["streams"]);
        if !g["oldestPendingSeconds"].is_null() {
            let _ = write!(line, ", failing for {}", age(&g["oldestPendingSeconds"]));
        }
        if !g["downSeconds"].is_null() {
            let _ = write!(line, ", down for {}", age(&g["downSeconds"]));
        }
        if let Some(e) = g["lastError"].as_str() {
            let _ = write!(line, ", last error: {e}");
        }
        let _ = writeln!(out, "{line}");
    }
    match a["lease"].as_object() {
        None => {
            let _ = writeln!(out, "leases: none configured");
        }
        Some(l) => {
            let apps: Vec<String> = l["apps"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|x| {
                    let g = if x["granted"] == true { "granted" } else { "waiting" };
                    format!("{} ({g})", str_of(&x["app"]))
                })
                .collect();
            let held = if apps.is_empty() { "none held".to_string() } else { apps.join(", ") };
            let _ = writeln!(out, "leases: Aion link {}, {held}", str_of(&l["link"]));
        }
    }
}
