//! Push mode's local socket, wired: `<stateDir>/mcp.sock` ([`crate::net::local`]
//! frames it) answers the agents' `aion-connector mcp` servers. Each request
//! is checked (its project exists, its key is that project's MCP key) and
//! handed to the background processes or to the runs (`display`), and gets
//! one log line, never a key, token or command.
//!
//! One op needs no project key: `{"op":"status"}` (what `aion-connector
//! status` sends) answers [`Parts::status`]. Being able to connect is its
//! authentication: the socket is mode 0600 in the connector's own state dir,
//! so only the connector's user (and root) reach it.
//!
//! Threads: those of [`crate::net::local`]; the handler runs on the
//! connection's thread.

use crate::background::{Background, Refused};
use crate::delivery::client::is_http_url;
use crate::error::Error;
use crate::logging::info;
use crate::net::local::{self, Op, Request, refusal};
use crate::project::{ProjectSet, ProjectState};
use crate::runs::Runs;
use crate::serve::status::Parts;
use serde_json::{Value, json};
use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

struct Local {
    projects: Arc<ProjectSet>,
    background: Arc<Background>,
    runs: Arc<Runs>,
    parts: Arc<Parts>,
}

/// Binds `<state>/mcp.sock` ([`local::SOCKET_FILE`]) and serves it until the server is stopped.
pub fn start(state: &Path, parts: Arc<Parts>) -> Result<local::Server, Error> {
    // Absolute: the MCP servers find it from the project dir.
    let path = state.canonicalize().unwrap_or_else(|_| state.to_path_buf()).join(local::SOCKET_FILE);
    let fail = |source| Error::StateDir { path: path.clone(), source };
    let listener = local::bind(&path).map_err(fail)?;
    let me = Local {
        projects: Arc::clone(&parts.projects),
        background: Arc::clone(&parts.background),
        runs: Arc::clone(&parts.runs),
        parts,
    };
    local::serve(listener, &path, Arc::new(move |line: &[u8]| me.handle(line))).map_err(fail)
}

impl Local {
    fn handle(&self, line: &[u8]) -> Value {
        let t0 = Instant::now();
        if let Ok(local::Unkeyed::Status {}) = serde_json::from_slice(line) {
            let answer = self.parts.status();
            info!("local status ms={:.2}", t0.elapsed().as_secs_f64() * 1e3);
            return answer;
        }
        let req: Request = match serde_json::from_slice(line) {
            Ok(r) => r,
            Err(e) => {
                info!("local: bad request ({:?})", e.classify());
                return refusal("bad_request", &format!("bad request: {e}"));
            }
        };
        let op = req.op.name();
        let projects = self.projects.current();
        // The current version of the project, or (its key being the one a
        // reload rotated away) the current one all the same: an agent of a
        // run started before the rotation keeps its tools.
        let retired = self.projects.retired(&req.project).filter(|p| p.mcp_key_matches(&req.key));
        let current = projects.iter().find(|p| p.config.id == req.project);
        let project = match current {
            Some(p) if p.mcp_key_matches(&req.key) => Some(p),
            _ => retired.as_ref().map(|r| current.unwrap_or(r)),
        };
        let Some(project) = project else {
            info!("local {op} project={} refused: unknown project or wrong key", req.project);
            return refusal("auth", "unknown project or wrong key (AION_PROJECT, AION_MCP_KEY)");
        };
        let answer = self.dispatch(project, req.op);
        info!(
            "local {op} project={} ok={} ms={:.2}",
            project.config.id,
            answer["ok"] == true,
            t0.elapsed().as_secs_f64() * 1e3
        );
        answer
    }

    fn dispatch(&self, project: &ProjectState, op: Op) -> Value {
        let id = project.config.id.as_str();
        let one = |r: Result<_, Refused>| match r {
            Ok(snapshot) => json!({"ok": true, "process": snapshot}),
            Err(why) => refused(&why),
        };
        match op {
            Op::BgStart { command, cwd } => {
                if command.trim().is_empty() {
                    return refusal("bad_request", "command is required");
                }
                one(self.background.start(project, &command, cwd.as_deref()))
            }
            Op::BgCheck { pid } => one(self.background.check(id, pid)),
            Op::BgStop { pid } => one(self.background.stop(id, pid)),
            Op::BgList {} => json!({"ok": true, "processes": self.background.list(id)}),
            Op::Display { session, callback, token, url } => {
                if callback.is_empty() {
                    return refusal("no_callback", "no callback URL (AION_CALLBACK is empty)");
                }
                if !is_http_url(&callback) {
                    return refusal(
                        "bad_request",
                        "the callback (AION_CALLBACK) must be an http:// or https:// URL with a host",
                    );
                }
                match self.runs.display(project, &session, &callback, &token, &url) {
                    Ok(()) => json!({"ok": true}),
                    Err(why) => refusal("display", &why),
                }
            }
        }
    }
}

fn refused(why: &Refused) -> Value {
    let kind = match why {
        Refused::Cap(_) => "cap",
        Refused::Cwd(_) => "cwd",
        Refused::Spawn(_) => "spawn",
        Refused::NotFound => "not_found",
        Refused::ShuttingDown => "shutting_down",
    };
    refusal(kind, &why.to_string())
}
