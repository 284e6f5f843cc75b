//! Poll mode's settings: the ClaudiOS config file (`--config FILE`, default
//! `./config.json`, optional) and environment variables, which win; plus our
//! additions (session command, state dir, delivery window, leases).

use crate::error::Error;
use crate::logging::warn;
use serde_json::{Map, Value, json};
use std::path::{Path, PathBuf};
use std::time::Duration;

const DEFAULT_COMMAND: &[&str] =
    &["claude", "-p", "--input-format", "stream-json", "--output-format", "stream-json", "--verbose"];

/// Poll mode's settings: the ClaudiOS file and variables, plus ours.
#[derive(Debug)]
pub struct PollConfig {
    pub server_url: String,
    pub agent_token: crate::config::Secret,
    pub poll_interval: Duration,
    pub flush_interval: Duration,
    pub max_sessions: usize,
    pub status_interval: Duration,
    pub session_command: Vec<String>,
    pub state_dir: Option<PathBuf>,
    pub delivery: Duration,
    /// Aion app keys leased while any session runs (`leaseApps`).
    pub lease_apps: Vec<String>,
    pub lease: crate::config::LeaseSettings,
}

/// Reads `--config FILE` (default ./config.json, optional) and the
/// environment, which wins. Every problem is reported at once.
pub fn load(file: Option<&Path>, env: &dyn Fn(&str) -> Option<String>) -> Result<PollConfig, Error> {
    let (path, doc, mut problems) = read_doc(file)?;
    let known = [
        "serverUrl",
        "agentToken",
        "pollInterval",
        "outputFlushInterval",
        "maxConcurrentSessions",
        "statusInterval",
        "sessionCommand",
        "stateDir",
        "deliverySeconds",
        "leaseApps",
        "lease",
    ];
    for k in doc.keys().filter(|k| !known.contains(&k.as_str())) {
        warn!("config: unknown key {k} (ignored)");
    }
    // One setting: the variable if set, else the file's key.
    let type_problems = std::cell::RefCell::new(Vec::new());
    let text = |key: &str, var: &str| -> Option<(String, String)> {
        if let Some(v) = env(var).filter(|v| !v.is_empty()) {
            return Some((v, format!("${var}")));
        }
        match doc.get(key) {
            None | Some(Value::Null) => None,
            Some(Value::String(s)) => Some((s.clone(), key.to_string())),
            Some(Value::Number(n)) => Some((n.to_string(), key.to_string())),
            Some(_) => {
                type_problems.borrow_mut().push(format!("{key}: expected a string or number"));
                None
            }
        }
    };
    let server_url = text("serverUrl", "SERVER_URL");
    let agent_token = text("agentToken", "AGENT_TOKEN");
    let numbers = [
        ("pollInterval", "POLL_INTERVAL", 5000u64, 10u64, 3_600_000u64),
        ("outputFlushInterval", "OUTPUT_FLUSH_INTERVAL", 1000, 1, 600_000),
        ("maxConcurrentSessions", "MAX_CONCURRENT_SESSIONS", 5, 1, 10_000),
        ("statusInterval", "STATUS_INTERVAL", 30_000, 100, 86_400_000),
        ("deliverySeconds", "DELIVERY_SECONDS", 86_400, 1, 30 * 86_400),
    ];
    let mut values = Vec::new();
    for (key, var, default, min, max) in numbers {
        let v = match text(key, var) {
            None => default,
            Some((raw, from)) => match raw.trim().parse::<u64>() {
                Ok(n) if (min..=max).contains(&n) => n,
                _ => {
                    problems.push(format!("{from}: expected a whole number {min}-{max}, found {raw:?}"));
                    default
                }
            },
        };
        values.push(v);
    }
    let state_dir = text("stateDir", "AION_STATE_DIR").map(|(d, _)| PathBuf::from(d));
    let session_command = match env("AION_SESSION_COMMAND").filter(|v| !v.is_empty()) {
        Some(raw) => match serde_json::from_str::<Vec<String>>(&raw) {
            Ok(argv) if !argv.is_empty() && !argv[0].is_empty() => argv,
            _ => {
                problems.push(
                    "$AION_SESSION_COMMAND: expected a JSON array of strings, e.g. [\"claude\",\"-p\"]"
                        .into(),
                );
                Vec::new()
            }
        },
        None => match doc.get("sessionCommand") {
            None | Some(Value::Null) => DEFAULT_COMMAND.iter().map(|s| s.to_string()).collect(),
            Some(v) => match serde_json::from_value::<Vec<String>>(v.clone()) {
                Ok(argv) if !argv.is_empty() && !argv[0].is_empty() => argv,
                _ => {
                    problems.push("sessionCommand: expected a non-empty array of strings".into());
                    Vec::new()
                }
            },
        },
    };
    match &server_url {
        None => problems.push("serverUrl (or $SERVER_URL) is required".into()),
        Some((u, from)) if !(u.starts_with("http://") || u.starts_with("https://")) => {
            problems.push(format!("{from}: expected an http:// or https:// URL"))
        }
        _ => {}
    }
    if agent_token.as_ref().is_none_or(|(t, _)| t.trim().is_empty()) {
        problems.push("agentToken (or $AGENT_TOKEN) is required".into());
    }
    let lease_apps: Vec<String> = match doc.get("leaseApps") {
        None | Some(Value::Null) => Vec::new(),
        Some(v) => serde_json::from_value(v.clone()).unwrap_or_else(|_| {
            problems.push("leaseApps: expected an array of app keys, e.g. [\"com.google.Chrome\"]".into());
            Vec::new()
        }),
    };
    let mut lease = crate::config::LeaseSettings::default();
    if let Some(v) = doc.get("lease").filter(|v| !v.is_null()) {
        let cwd =
            std::env::current_dir().map_err(|source| Error::Io { what: "current directory", source })?;
        let (settings, lease_problems, warnings) = crate::config::lease_section(v, &cwd);
        for w in warnings {
            warn!("config: {w}");
        }
        problems.extend(lease_problems);
        lease = settings;
    }
    problems.extend(type_problems.into_inner());
    if !problems.is_empty() {
        return Err(Error::Config { path, problems });
    }
    Ok(PollConfig {
        server_url: server_url.map(|(u, _)| u.trim_end_matches('/').to_string()).unwrap_or_default(),
        agent_token: crate::config::Secret(
            agent_token.map(|(t, _)| t.trim().to_string()).unwrap_or_default(),
        ),
        poll_interval: Duration::from_millis(values[0]),
        flush_interval: Duration::from_millis(values[1]),
        max_sessions: values[2] as usize,
        status_interval: Duration::from_millis(values[3]),
        delivery: Duration::from_secs(values[4]),
        lease_apps,
        lease,
        session_command,
        state_dir,
    })
}

/// Where poll mode with these settings keeps its state (and its socket):
/// `$AION_STATE_DIR`, else the file's `stateDir`, else the default. For
/// `aion-connector status`; nothing else of the settings is checked.
pub fn state_dir(file: Option<&Path>, env: &dyn Fn(&str) -> Option<String>) -> Result<PathBuf, Error> {
    if let Some(dir) = env("AION_STATE_DIR").filter(|v| !v.is_empty()) {
        return Ok(PathBuf::from(dir));
    }
    let (path, doc, problems) = read_doc(file)?;
    if !problems.is_empty() {
        return Err(Error::Config { path, problems });
    }
    let configured = doc.get("stateDir").and_then(Value::as_str).map(PathBuf::from);
    Ok(crate::config::state_dir(configured.as_deref()))
}

/// The config file's path, its object (empty when there is none to read)
/// and the problems of its syntax.
type Doc = (PathBuf, Map<String, Value>, Vec<String>);

/// The config file (`file`, else an optional ./config.json) as a JSON object.
fn read_doc(file: Option<&Path>) -> Result<Doc, Error> {
    let (path, explicit) = match file {
        Some(p) => (p.to_path_buf(), true),
        None => (PathBuf::from("config.json"), false),
    };
    let mut problems = Vec::new();
    let doc: Value = match std::fs::read_to_string(&path) {
        Ok(text) => serde_json::from_str(&text).unwrap_or_else(|e| {
            problems.push(format!("invalid JSON: {e}"));
            Value::Null
        }),
        Err(e) if !explicit && e.kind() == std::io::ErrorKind::NotFound => json!({}),
        Err(source) => return Err(Error::ConfigRead { path, source }),
    };
    let doc = match doc {
        Value::Object(m) => m,
        Value::Null => Default::default(),
        _ => {
            problems.push("expected a JSON object".into());
            Default::default()
        }
    };
    Ok((path, doc, problems))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env_of(vars: &'static [(&'static str, &'static str)]) -> impl Fn(&str) -> Option<String> {
        move |k| vars.iter().find(|(n, _)| *n == k).map(|(_, v)| v.to_string())
    }

    #[test]
    fn environment_wins_over_the_file() {
        let dir = std::env::temp_dir().join(format!("aion-pollcfg-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("config.json");
        std::fs::write(&file, r#"{"serverUrl":"http://file","agentToken":"f","pollInterval":100}"#).unwrap();
        let c = load(Some(&file), &env_of(&[("POLL_INTERVAL", "250"), ("AGENT_TOKEN", "e")])).unwrap();
        assert_eq!(c.server_url, "http://file");
        assert_eq!(c.agent_token.0, "e");
        assert_eq!(c.poll_interval, Duration::from_millis(250));
        assert_eq!(c.session_command[0], "claude");
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn missing_and_bad_values_are_named() {
        let err = load(None, &env_of(&[("POLL_INTERVAL", "soon")])).unwrap_err().to_string();
        assert!(err.contains("serverUrl (or $SERVER_URL) is required"), "{err}");
        assert!(err.contains("agentToken (or $AGENT_TOKEN) is required"), "{err}");
        assert!(err.contains("$POLL_INTERVAL: expected a whole number"), "{err}");
    }
}
