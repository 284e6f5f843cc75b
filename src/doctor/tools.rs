//! The programs a config needs on PATH: acpx and Node.js 22+ when an agent
//! runs through acpx, each agent's CLI (or its `command`), and git. One place
//! for `doctor` and `check` (which prints what is not OK as notes).

use super::Finding;
use crate::config::{Config, starter};
use std::ffi::OsStr;
use std::os::unix::fs::PermissionsExt;
use std::time::Duration;

/// acpx 0.19 needs this Node.js major version or later.
const NODE_MAJOR: u32 = 22;

/// One finding per program, each program once.
pub fn findings(config: &Config, path_var: &OsStr) -> Vec<Finding> {
    let mut out = Vec::new();
    let mut uses_acpx = false;
    let mut seen: Vec<&str> = Vec::new();
    for p in &config.projects {
        for a in &p.agents {
            let at = format!("projects.{}.agents.{}", p.id, a.name);
            match &a.command {
                Some(argv) => {
                    let program = argv[0].as_str();
                    if seen.contains(&program) {
                        continue;
                    }
                    seen.push(program);
                    if program.contains('/') {
                        // A relative one runs from the project dir.
                        let path = p.dir.join(program);
                        let runnable =
                            path.metadata().is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0);
                        out.push(if runnable {
                            Finding::ok("agent", format!("{at}.command: {program}"))
                        } else {
                            Finding::warn(
                                "agent",
                                format!("{at}.command: {program} is not an executable file"),
                                format!("install it there, or chmod +x {program}"),
                            )
                        });
                    } else if starter::on_path(path_var, program) {
                        out.push(Finding::ok("agent", format!("{at}.command: {program} on PATH")));
                    } else {
                        out.push(Finding::warn(
                            "agent",
                            format!("{at}.command: `{program}` is not on PATH"),
                            format!("install {program} for the connector's user, or give its full path"),
                        ));
                    }
                }
                None => {
                    uses_acpx = true;
                    if seen.contains(&a.name.as_str()) {
                        continue;
                    }
                    seen.push(&a.name);
                    if starter::on_path(path_var, &a.name) {
                        out.push(Finding::ok("agent", format!("{at}: {} on PATH", a.name)));
                    } else {
                        out.push(Finding::warn(
                            "agent",
                            format!(
                                "{at}: `{}` is not on PATH (acpx may still find its ACP adapter)",
                                a.name
                            ),
                            format!("install the {} CLI for the connector's user and log it in", a.name),
                        ));
                    }
                }
            }
        }
    }
    if uses_acpx {
        out.push(match tool_version("acpx") {
            Some(v) => Finding::ok("acpx", format!("acpx {v}")),
            None => Finding::fail(
                "acpx",
                "acpx is not on PATH: invoke will fail",
                "npm install -g acpx (it needs Node.js 22+)",
            ),
        });
        out.push(match tool_version("node") {
            Some(v) if node_major(&v).is_some_and(|m| m < NODE_MAJOR) => Finding::fail(
                "node",
                format!("node {v} is older than the Node.js {NODE_MAJOR} that acpx 0.19 needs"),
                format!("install Node.js {NODE_MAJOR} or later"),
            ),
            Some(v) => Finding::ok("node", format!("node {v}")),
            None => Finding::fail(
                "node",
                format!("node is not on PATH: acpx needs Node.js {NODE_MAJOR}+"),
                format!("install Node.js {NODE_MAJOR} or later"),
            ),
        });
    } else {
        out.push(Finding::skip("acpx", "no agent runs through acpx (every agent has a command)"));
    }
    out.push(if starter::on_path(path_var, "git") {
        Finding::ok("git", "git on PATH")
    } else {
        Finding::warn("git", "git is not on PATH: the git actions and repos.sync fail", "install git")
    });
    out
}

/// `TOOL --version`'s first line (bounded: 10 s), or None if it cannot run.
fn tool_version(tool: &str) -> Option<String> {
    let mut cmd = std::process::Command::new(tool);
    cmd.arg("--version");
    let out = crate::process::run(&mut cmd, Duration::from_secs(10), 4096).ok().filter(|o| o.success())?;
    Some(String::from_utf8_lossy(&out.stdout).lines().next()?.trim().to_string())
}

fn node_major(version: &str) -> Option<u32> {
    version.trim_start_matches('v').split('.').next()?.parse().ok()
}

#[cfg(test)]
mod tests {
    #[test]
    fn node_versions() {
        assert_eq!(super::node_major("v22.3.0"), Some(22));
        assert_eq!(super::node_major("20.1"), Some(20));
        assert_eq!(super::node_major("x"), None);
    }
}
