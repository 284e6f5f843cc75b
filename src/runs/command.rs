//! The commands of a run: acpx in a persistent session (the Node connector's
//! way: `sessions ensure`, then the prompt), one-shot `acpx exec`, or the
//! agent's own argv template. No shell ever sees the prompt.

use crate::config::Agent;
use std::path::Path;
use std::process::{Command, Stdio};

/// How a run reads its agent.
#[derive(Clone, Copy, PartialEq, Debug)]
pub enum Mode {
    /// acpx with a named session (the default).
    Session,
    /// `acpx … exec`: one-shot.
    Exec,
    /// The agent's own `command`: raw stdout lines.
    Template,
}

impl Mode {
    pub fn of(agent: &Agent) -> Mode {
        if agent.command.is_some() {
            Mode::Template
        } else if agent.exec {
            Mode::Exec
        } else {
            Mode::Session
        }
    }

    /// acpx's JSON is read (message text, end of turn, retries).
    pub fn acpx(self) -> bool {
        self != Mode::Template
    }
}

pub struct Plan {
    /// `acpx --cwd DIR AGENT sessions ensure --name SESSION`, run once first.
    pub ensure: Option<Vec<String>>,
    /// The agent's command (run again on a retry).
    pub argv: Vec<String>,
    /// `acpx --cwd DIR AGENT cancel -s SESSION`: the polite first step of a stop.
    pub cancel: Option<Vec<String>>,
}

/// What a run executes. `prompt` is the composed prompt; `--` keeps one that
/// starts with `-` from being read as an option.
pub fn plan(agent: &Agent, dir: &Path, session: &str, model: Option<&str>, prompt: &str) -> Plan {
    let strings = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    if let Some(template) = &agent.command {
        let vars = [
            ("prompt", prompt),
            ("session", session),
            ("model", model.unwrap_or("")),
            ("agent", agent.name.as_str()),
        ];
        let argv = template.iter().map(|t| fill(t, &vars)).collect();
        return Plan { ensure: None, argv, cancel: None };
    }
    let dir = dir.to_string_lossy();
    let mut argv = strings(&["acpx", "--cwd", &dir, "--format", "json", agent.permissions.flag()]);
    if agent.exec {
        if let Some(m) = model {
            argv.extend(strings(&["--model", m]));
        }
        argv.extend(strings(&[&agent.name, "exec", "--", prompt]));
        return Plan { ensure: None, argv, cancel: None };
    }
    argv.extend(strings(&["--ttl", "10"]));
    if let Some(m) = model {
        argv.extend(strings(&["--model", m]));
    }
    argv.extend(strings(&[&agent.name, "-s", session, "--", prompt]));
    Plan {
        ensure: Some(strings(&["acpx", "--cwd", &dir, &agent.name, "sessions", "ensure", "--name", session])),
        argv,
        cancel: Some(strings(&["acpx", "--cwd", &dir, &agent.name, "cancel", "-s", session])),
    }
}

/// Replaces `{name}` placeholders in one pass: text that comes in through a
/// value (a prompt mentioning `{session}`) is never expanded again.
pub fn fill(template: &str, vars: &[(&str, &str)]) -> String {
    let mut out = String::with_capacity(template.len());
    let mut rest = template;
    while let Some(open) = rest.find('{') {
        out.push_str(&rest[..open]);
        let after = &rest[open + 1..];
        let hit = after
            .find('}')
            .and_then(|close| vars.iter().find(|(k, _)| *k == &after[..close]).map(|(_, v)| (close, *v)));
        match hit {
            Some((close, value)) => {
                out.push_str(value);
                rest = &after[close + 1..];
            }
            None => {
                out.push('{');
                rest = after;
            }
        }
    }
    out.push_str(rest);
    out
}

/// A process of the run: in `cwd`, the agent's env added, stdin from
/// /dev/null, marked with the run id so that nothing it leaves survives it.
pub fn command(argv: &[String], agent: &Agent, cwd: &Path, id: &str) -> Command {
    let mut cmd = Command::new(&argv[0]);
    cmd.args(&argv[1..]).current_dir(cwd).stdin(Stdio::null()).env("AION_RUN_ID", id);
    for (k, v) in &agent.env {
        cmd.env(k, v);
    }
    cmd
}

pub fn spawn_error(program: &str, e: &std::io::Error) -> String {
    if e.kind() == std::io::ErrorKind::NotFound {
        if program == "acpx" {
            "acpx not found on PATH (npm install -g acpx; it needs Node.js 22 or later)".into()
        } else {
            format!("{program} not found on PATH")
        }
    } else {
        format!("cannot start {program}: {e}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn agent(exec: bool, command: Option<Vec<String>>) -> Agent {
        Agent {
            name: "pi".into(),
            description: String::new(),
            command,
            exec,
            timeout: None,
            env: vec![],
            lease_apps: vec![],
            permissions: crate::config::Permissions::default(),
        }
    }

    #[test]
    fn templates_fill_in_one_pass() {
        let vars = [("prompt", "say {session} {x}"), ("session", "S")];
        assert_eq!(fill("-p={prompt}|{session}|{other}|{", &vars), "-p=say {session} {x}|S|{other}|{");
    }

    #[test]
    fn session_mode_is_the_node_connectors_argv_with_a_double_dash() {
        let p = plan(&agent(false, None), Path::new("/p d"), "s1", Some("m"), "--help; rm -rf /");
        assert_eq!(p.ensure.unwrap(), ["acpx", "--cwd", "/p d", "pi", "sessions", "ensure", "--name", "s1"]);
        assert_eq!(
            p.argv,
            [
                "acpx",
                "--cwd",
                "/p d",
                "--format",
                "json",
                "--approve-all",
                "--ttl",
                "10",
                "--model",
                "m",
                "pi",
                "-s",
                "s1",
                "--",
                "--help; rm -rf /"
            ]
        );
        assert_eq!(p.cancel.unwrap(), ["acpx", "--cwd", "/p d", "pi", "cancel", "-s", "s1"]);
        let e = plan(&agent(true, None), Path::new("/p"), "s1", None, "x");
        assert_eq!(
            e.argv,
            ["acpx", "--cwd", "/p", "--format", "json", "--approve-all", "pi", "exec", "--", "x"]
        );
        assert!(e.ensure.is_none() && e.cancel.is_none());
        let t =
            plan(&agent(false, Some(vec!["run".into(), "{prompt}".into()])), Path::new("/p"), "s", None, "x");
        assert_eq!(t.argv, ["run", "x"]);
        assert_eq!(Mode::of(&agent(false, Some(vec![]))), Mode::Template);
    }
}
