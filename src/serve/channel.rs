//! The router of Channel Protocol v1: the JSON-over-POST actions the platform
//! sends. It checks each request in the contract's order (method, JSON,
//! version, token, project, action) and each payload, answers with the
//! baseline's byte-exact error bodies, hands the work to the domain (project,
//! workspace, runs, terminals), and logs one line per request, never a token
//! (nor a request target, which may hold `?token=`). A wrong or missing token
//! is the line `failed token from IP …` (the fail2ban filter's match), and
//! past `limits.failedTokensPerMinute` of them the peer gets 429 ([`guard`]).
//!
//! A token comes in the body's `token` or `Authorization: Bearer TOKEN` (both
//! given must agree), and for the WebSocket in `?token=` or the
//! `Sec-WebSocket-Protocol` entry `aion.token.TOKEN` (see [`App::websocket`]).
//! Nothing imports it but the push-mode wiring in `serve/mod.rs`.

use super::guard::{Failures, canonical};
use crate::config::LiveLimits;
use crate::delivery::client::is_http_url;
use crate::logging::info;
use crate::net::http::{Handler, Request, Response};
use crate::project::{ProjectSet, ProjectState};
use crate::runs::{Delivery, Invoke, Refused, Runs, prompt};
use crate::serve::status::Parts;
use crate::terminal::{self, Terminals};
use crate::text::PeerText;
use crate::workspace::git::{self, GitError, RepoSpec, SyncResult};
use crate::workspace::{self, Refusal};
use serde_json::{Map, Value, json};
use sha2::{Digest, Sha256};
use std::borrow::Cow;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

/// Repositories one `repos.sync` or `invoke` may name: syncs of a project run
/// one at a time, each repo up to `limits.gitSeconds`.
const MAX_REPOS: usize = 16;

pub struct App {
    projects: Arc<ProjectSet>,
    limits: Arc<LiveLimits>,
    started: Instant,
    runs: Arc<Runs>,
    terminals: Arc<Terminals>,
    parts: Arc<Parts>,
    /// `allowedOrigins` (as at start; a reload does not change it); None: any `Origin`.
    origins: Option<Vec<String>>,
    /// Failed tokens per peer (limits as at start).
    failures: Failures,
}

impl App {
    pub fn new(
        projects: Arc<ProjectSet>,
        limits: Arc<LiveLimits>,
        runs: Arc<Runs>,
        terminals: Arc<Terminals>,
        parts: Arc<Parts>,
    ) -> App {
        let failures = {
            let l = limits.get();
            Failures::new(l.failed_tokens_per_minute, l.failed_tokens_exempt_loopback)
        };
        App { projects, limits, started: Instant::now(), runs, terminals, parts, origins: None, failures }
    }

    /// Browser WebSocket upgrades only from these origins (`allowedOrigins`).
    pub fn allowing_origins(mut self, origins: Option<Vec<String>>) -> App {
        self.origins = origins;
        self
    }

    /// The project of the token the request brings (`None`: none, or a wrong
    /// one), or the refusal of a peer past its failed tokens. A failure is
    /// counted and marked for the log line.
    fn project_of(
        &self,
        req: &Request,
        token: Option<&str>,
        out: &mut Outcome<'_>,
    ) -> Option<Arc<ProjectState>> {
        if self.failures.blocked(canonical(req.peer.ip())) {
            out.failed_token = true;
            out.resp = err(429, "too many failed tokens");
            return None;
        }
        let found = token.and_then(|t| self.authenticate(t));
        if found.is_none() {
            self.failures.failed(canonical(req.peer.ip()));
            out.failed_token = true;
            out.resp = err(403, "unauthorized");
        }
        found
    }

    /// The project whose token this is. Every project's digest is compared in
    /// full, so neither timing nor length tells anything about a token.
    fn authenticate(&self, token: &str) -> Option<Arc<ProjectState>> {
        let digest: [u8; 32] = Sha256::digest(token.as_bytes()).into();
        let mut found = None;
        for p in self.projects.current().iter() {
            if p.token_matches(&digest) {
                found = Some(Arc::clone(p));
            }
        }
        found
    }
}

/// What a request came to, for its log line. Nothing in it is allocated
/// per request: the action is a literal or borrowed from the request body.
struct Outcome<'r> {
    /// `-`, or the action fit for a log line ([`loggable`]); owned only when
    /// the client wrote it with escapes.
    action: Cow<'r, str>,
    /// The project the token proved (`-` in the log line when none).
    project: Option<Arc<ProjectState>>,
    resp: Response,
    /// Refused for its token (403) or for the peer's failed tokens (429).
    failed_token: bool,
}

impl Handler for App {
    fn handle(&self, req: &Request) -> Response {
        let t0 = Instant::now();
        let mut out = self.dispatch(req);
        if out.resp.status == 500 && out.resp.body.is_empty() {
            out.resp = err(500, "internal error");
        }
        let project = out.project.as_ref().map_or("-", |p| p.config.id.as_str());
        // Its connection keeps the idle timeout from now on (see net::http).
        out.resp.authenticated = project != "-" || (out.action == "metrics" && out.resp.status == 200);
        crate::metrics::request(&out.action, out.resp.status, t0.elapsed());
        if out.failed_token {
            // The fail2ban filter in the README matches this line. INFO, as
            // every request line: identical WARN lines are rate-limited.
            info!(
                "failed token from {} action={} project=- status={} ms={:.2} peer={}",
                canonical(req.peer.ip()),
                out.action,
                out.resp.status,
                t0.elapsed().as_secs_f64() * 1e3,
                PeerText(req.peer)
            );
            return out.resp;
        }
        info!(
            "{} project={} status={} ms={:.2} peer={}",
            out.action,
            project,
            out.resp.status,
            t0.elapsed().as_secs_f64() * 1e3,
            PeerText(req.peer)
        );
        out.resp
    }
}

/// What a request is answered if no path of the router set an answer: the
/// 500 `internal error`, made in [`App::handle`] only then (this one costs no
/// allocation per request, where the router sets another).
fn unanswered() -> Response {
    Response::text(500, crate::net::http::JSON, Vec::new())
}

fn err(status: u16, reason: &str) -> Response {
    Response::error(status, reason)
}

/// `{"error","detail"}` in that order (json! would sort the keys).
#[derive(serde::Serialize)]
struct ErrorDetail<'a> {
    error: &'a str,
    detail: String,
}

fn detail(status: u16, reason: &str, detail: impl Into<String>) -> Response {
    let body = ErrorDetail { error: reason, detail: detail.into() };
    Response::json(status, &body)
}

#[derive(serde::Serialize)]
struct Pong {
    ok: bool,
    v: u8,
    version: &'static str,
    uptime: u64,
}

/// The answer to `ping`, as serde_json writes [`Pong`], in one buffer of the
/// right size: serde_json writes it a byte or a few at a time, and the ping is
/// the request a platform sends most.
fn pong(uptime: u64) -> Response {
    static HEAD: std::sync::OnceLock<Vec<u8>> = std::sync::OnceLock::new();
    let head = HEAD.get_or_init(|| {
        let mut head =
            serde_json::to_vec(&Pong { ok: true, v: 1, version: crate::version::VERSION, uptime: 0 })
                .expect("answers serialize");
        // Up to the uptime's digits: `…,"uptime":`.
        head.truncate(head.len() - "0}".len());
        head
    });
    let mut body = Vec::with_capacity(head.len() + 21);
    body.extend_from_slice(head);
    crate::text::push_decimal(&mut body, uptime);
    body.push(b'}');
    Response::text(200, crate::net::http::JSON, body)
}

#[derive(serde::Serialize)]
struct AgentEntry<'a> {
    name: &'a str,
    description: &'a str,
}

fn ok<T: serde::Serialize>(value: &T) -> Response {
    Response::json(200, value)
}

/// An action name fit for a log line (it comes from the client).
fn loggable(action: &str) -> &str {
    let clean =
        action.len() <= 40 && action.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'_');
    if clean && !action.is_empty() { action } else { "?" }
}

impl App {
    fn dispatch<'r>(&self, req: &'r Request) -> Outcome<'r> {
        let mut out =
            Outcome { action: Cow::Borrowed("-"), project: None, resp: unanswered(), failed_token: false };
        let path = req.target.split('?').next().unwrap_or("");
        if req.method == "GET" && path == "/healthz" {
            out.action = Cow::Borrowed("healthz");
            out.resp = Response::json(200, &json!({ "ok": true }));
            return out;
        }
        if req.method == "GET" && path == "/metrics" {
            out.action = Cow::Borrowed("metrics");
            out.resp = self.metrics(req);
            return out;
        }
        if req.method == "GET"
            && req.header("upgrade").is_some_and(|u| u.to_ascii_lowercase().contains("websocket"))
        {
            return self.websocket(req);
        }
        if req.method != "POST" {
            out.resp = err(405, "POST only");
            return out;
        }
        let body: Envelope<'_> = match serde_json::from_slice(&req.body) {
            Ok(body) => body,
            Err(_) => {
                out.resp = err(400, "invalid json");
                return out;
            }
        };
        match &body.v {
            None | Some(Value::Null) => {}
            Some(Value::Number(n)) if n.as_f64().is_some_and(|v| v <= 1.0) => {}
            Some(v) => {
                out.resp = Response::json(400, &json!({ "error": "version", "min": v }));
                return out;
            }
        }
        let token = match (bearer(req), body.token.as_deref()) {
            (Some(a), Some(b)) if a != b => None,
            (a, b) => a.or(b),
        };
        let Some(project) = self.project_of(req, token, &mut out) else {
            return out;
        };
        out.project = Some(Arc::clone(&project));
        let empty = Map::new();
        let payload = match &body.payload {
            None | Some(Value::Null) => &empty,
            Some(Value::Object(m)) => m,
            Some(_) => {
                out.resp = detail(400, "bad payload", "payload must be an object");
                return out;
            }
        };
        if let Some(p) = payload.get("project")
            && p.as_str() != Some(project.config.id.as_str())
        {
            out.resp = err(403, "token/project mismatch");
            return out;
        }
        let action = body.action.as_deref().unwrap_or("");
        out.action = match &body.action {
            Some(Cow::Borrowed(a)) => Cow::Borrowed(loggable(a)),
            _ => Cow::Owned(loggable(action).to_string()),
        };
        let args = Payload(payload);
        out.resp = match self.act(&project, action, &args) {
            Ok(resp) | Err(resp) => resp,
        };
        out
    }

    fn act(&self, p: &Arc<ProjectState>, action: &str, args: &Payload<'_>) -> Result<Response, Response> {
        Ok(match action {
            "ping" => pong(self.started.elapsed().as_secs()),
            "agents" => {
                let agents: Vec<AgentEntry<'_>> = p
                    .config
                    .agents
                    .iter()
                    .map(|a| AgentEntry { name: &a.name, description: &a.description })
                    .collect();
                ok(&json!({ "agents": agents }))
            }
            "workspaces" => {
                let list: Vec<Value> = p
                    .workspaces()
                    .into_iter()
                    .map(|(name, path)| json!({ "name": name, "path": path.display().to_string() }))
                    .collect();
                ok(&json!({ "list": list }))
            }
            "files.tree" => {
                let sub = args.string("path")?;
                let root = self.workspace(p, args)?;
                let listing = match sub {
                    Some(s) => workspace::resolve(&root, s, &p.sensitive).map(|r| r.rel).map_err(refusal)?,
                    None => String::new(),
                };
                let git_listing = git::ls_files(&root, &listing, self.limits.get().git);
                ok(&workspace::tree(&root, sub, &p.sensitive, git_listing).map_err(refusal)?)
            }
            "files.read" => {
                let path = args.required("path")?;
                let root = self.workspace(p, args)?;
                ok(&workspace::read(&root, path, &p.sensitive).map_err(refusal)?)
            }
            "git.status" => {
                let root = self.workspace(p, args)?;
                ok(&git::status(&root, self.limits.get().git).map_err(git_error)?)
            }
            "git.diff" => {
                let paths = args.strings("paths")?;
                let root = self.workspace(p, args)?;
                for path in &paths {
                    workspace::check_pathspec(&root, path, &p.sensitive).map_err(refusal)?;
                }
                let (diff, truncated) = git::diff(&root, &paths, &p.config.sensitive, self.limits.get().git)
                    .map_err(git_error)?;
                if truncated {
                    ok(&json!({ "diff": diff, "truncated": true }))
                } else {
                    ok(&json!({ "diff": diff }))
                }
            }
            "repos.sync" => self.sync(p, args)?,
            "invoke" => self.invoke(p, args)?,
            "stop" => {
                let session = args.string("session")?.unwrap_or("default");
                let stopping = self.runs.stop(&p.config.id, session);
                ok(&json!({ "ok": true, "stopping": stopping }))
            }
            "runs" => {
                let active: Vec<Value> = self
                    .runs
                    .snapshot()
                    .into_iter()
                    .filter(|r| r.project == p.config.id)
                    .map(|r| {
                        json!({
                            "session": r.session,
                            "agent": r.agent,
                            "state": r.state,
                            "ageSeconds": r.age.as_secs(),
                            "posts": r.posts,
                            "pending": r.pending,
                        })
                    })
                    .collect();
                ok(&json!({ "active": active, "finished": self.runs.finished(&p.config.id) }))
            }
            "runs.output" => {
                let session = args.required("session")?;
                let from = match args.0.get("from") {
                    None | Some(Value::Null) => 0,
                    Some(v) => v.as_u64().ok_or_else(|| {
                        detail(400, "bad payload", "payload.from must be a non-negative integer")
                    })?,
                };
                self.runs
                    .output(&p.config.id, session, from)
                    .map(|page| ok(&page))
                    .ok_or_else(|| err(404, "no run"))?
            }
            "terminal.spawn" => {
                let (cols, rows) =
                    (args.dimension("cols")?.unwrap_or(80), args.dimension("rows")?.unwrap_or(24));
                let term = self.terminals.open(p, None, true, cols, rows).map_err(terminal_refused)?;
                ok(&json!({ "ok": true, "sessionId": term.id() }))
            }
            "terminal.input" => {
                let term = self.http_terminal(p, args)?;
                let data = args.string("data")?.unwrap_or("");
                term.try_input(data.as_bytes()).map_err(|e| match e {
                    terminal::InputRefused::Busy => {
                        detail(503, "terminal busy", "the shell is not reading its input")
                    }
                    terminal::InputRefused::Closed => err(404, "no session"),
                })?;
                ok(&json!({ "ok": true }))
            }
            "terminal.output" => {
                let term = self.http_terminal(p, args)?;
                let (data, alive, dropped) = self.terminals.drain(&term);
                #[derive(serde::Serialize)]
                struct Output {
                    ok: bool,
                    data: String,
                    alive: bool,
                    #[serde(skip_serializing_if = "is_zero")]
                    dropped: u64,
                }
                ok(&Output { ok: true, data, alive, dropped })
            }
            "terminal.resize" => {
                // As the original, whose resize was a no-op: without sizes
                // nothing changes, and an unknown (or another project's)
                // terminal is `{"ok":true}` too, resizing nothing; sizes
                // given must both be valid.
                let size = match (args.dimension("cols")?, args.dimension("rows")?) {
                    (None, None) => None,
                    (Some(cols), Some(rows)) => Some((cols, rows)),
                    (cols, _) => {
                        let k = if cols.is_none() { "cols" } else { "rows" };
                        return Err(detail(
                            400,
                            "bad payload",
                            format!("payload.{k} is required with the other"),
                        ));
                    }
                };
                let id = args.string("sessionId")?.unwrap_or("");
                if let (Some((cols, rows)), Some(term)) = (size, self.terminals.find_http(&p.config.id, id)) {
                    term.resize(cols, rows).map_err(|e| detail(500, "terminal failed", e.to_string()))?
                }
                ok(&json!({ "ok": true }))
            }
            "terminal.close" => {
                // Idempotent, as the original: closing what is gone (or never
                // was this project's) is `{"ok":true}` too, and ends nothing.
                let id = args.string("sessionId")?.unwrap_or("");
                if let Some(term) = self.terminals.find_http(&p.config.id, id) {
                    self.terminals.close(&term);
                }
                ok(&json!({ "ok": true }))
            }
            _ => err(400, "unknown action"),
        })
    }

    /// `GET /metrics` with `Authorization: Bearer TOKEN` (a project's token
    /// or `metricsToken`): 401 without one, 403 with a wrong one.
    fn metrics(&self, req: &Request) -> Response {
        let Some(auth) = req.header("authorization") else {
            return err(401, "bearer token required");
        };
        let token = auth.trim().strip_prefix("Bearer ").map(str::trim).unwrap_or("");
        if token.is_empty() || !self.parts.metrics_allowed(token) {
            return err(403, "unauthorized");
        }
        Response::text(200, "text/plain; version=0.0.4; charset=utf-8", self.parts.metrics().into_bytes())
    }

    fn http_terminal(&self, p: &ProjectState, args: &Payload<'_>) -> Result<Arc<terminal::Term>, Response> {
        let id = args.string("sessionId")?.unwrap_or("");
        self.terminals.find_http(&p.config.id, id).ok_or_else(|| err(404, "no session"))
    }

    /// `GET /ws?token=…[&session=ID][&encoding=text|binary][&cols=C&rows=R]`:
    /// checks the origin, the token, the upgrade headers, the query and the
    /// project's terminal limit, all before the 101. Output goes as text
    /// frames (the original's) unless `encoding=binary`.
    ///
    /// The token may come instead in `Sec-WebSocket-Protocol` (a browser can
    /// set no other header): the entry `aion.token.TOKEN`. The 101 echoes
    /// `aion` when the client offered it (so the token is not sent back),
    /// else that entry itself (a browser fails a handshake that answers none
    /// of the protocols it offered).
    fn websocket<'r>(&self, req: &'r Request) -> Outcome<'r> {
        let mut out = Outcome {
            action: Cow::Borrowed("terminal.ws"),
            project: None,
            resp: unanswered(),
            failed_token: false,
        };
        if let (Some(allowed), Some(origin)) = (&self.origins, req.header("origin")) {
            let origin = origin.trim().trim_end_matches('/').to_ascii_lowercase();
            if !allowed.contains(&origin) {
                out.resp = err(403, "origin not allowed");
                return out;
            }
        }
        let query = parse_query(req.target.split_once('?').map_or("", |(_, q)| q));
        let get = |k: &str| query.iter().find(|(name, _)| name == k).map(|(_, v)| v.as_str());
        let offered: Vec<&str> = req
            .header("sec-websocket-protocol")
            .map(|h| h.split(',').map(str::trim).filter(|p| !p.is_empty()).collect())
            .unwrap_or_default();
        let in_protocol = offered.iter().find(|p| p.starts_with(PROTOCOL_TOKEN));
        let token = match (get("token"), in_protocol.map(|p| &p[PROTOCOL_TOKEN.len()..])) {
            (Some(a), Some(b)) if a != b => None,
            (a, b) => a.or(b),
        };
        let protocol = if offered.contains(&PROTOCOL) {
            Some(PROTOCOL.to_string())
        } else {
            in_protocol.map(|p| p.to_string())
        };
        let Some(project) = self.project_of(req, token, &mut out) else {
            return out;
        };
        out.project = Some(Arc::clone(&project));
        let header_has =
            |h: &str, word: &str| req.header(h).is_some_and(|v| v.to_ascii_lowercase().contains(word));
        let key = req.header("sec-websocket-key").map(str::trim).filter(|k| !k.is_empty());
        let Some(key) = key.filter(|_| {
            header_has("connection", "upgrade") && req.header("sec-websocket-version") == Some("13")
        }) else {
            out.resp = err(400, "bad websocket upgrade");
            return out;
        };
        let session = get("session");
        if session.is_some_and(|s| s.is_empty() || s.len() > 128 || s.chars().any(char::is_control)) {
            out.resp = detail(400, "bad payload", "session must be 1-128 characters");
            return out;
        }
        let dim = |k| get(k).and_then(|v| v.parse::<u16>().ok()).filter(|n| (1..=10_000).contains(n));
        let (cols, rows) = (dim("cols").unwrap_or(80), dim("rows").unwrap_or(24));
        let text = match get("encoding") {
            None | Some("text") => true,
            Some("binary") => false,
            Some(_) => {
                out.resp = detail(400, "bad payload", "encoding must be text or binary");
                return out;
            }
        };
        let existing = session.and_then(|s| self.terminals.find_session(&project.config.id, s));
        let term = match existing {
            Some(term) => term,
            None => match self.terminals.open(&project, session, false, cols, rows) {
                Ok(term) => term,
                Err(refused) => {
                    out.resp = terminal_refused(refused);
                    return out;
                }
            },
        };
        let (terminals, key) = (Arc::clone(&self.terminals), key.to_string());
        out.resp = Response::upgrade(Box::new(move |stream: crate::net::stream::Stream| {
            terminals.serve_socket(term, stream, &key, text, protocol.as_deref())
        }));
        out
    }

    /// The payload's `workspace`, else the first one mapped.
    fn workspace(&self, p: &ProjectState, args: &Payload<'_>) -> Result<PathBuf, Response> {
        // `""` is no name: the default workspace, as the original falls back.
        p.workspace(args.string("workspace")?.filter(|w| !w.is_empty())).map_err(refusal)
    }

    fn sync(&self, p: &ProjectState, args: &Payload<'_>) -> Result<Response, Response> {
        let specs = match args.0.get("repos") {
            Some(Value::Array(items)) => repo_specs(items, p.config.allow_file_urls)?,
            _ => return Err(detail(400, "bad payload", "payload.repos must be an array")),
        };
        let results = p.sync_all(&specs, self.limits.get().git);
        match results.iter().find(|r| !r.ok) {
            None => Ok(ok(&json!({ "ok": true, "repos": results }))),
            Some(failed) => {
                let why = format!("{}: {}", failed.name, failed.error.as_deref().unwrap_or("failed"));
                #[derive(serde::Serialize)]
                struct Failed<'a> {
                    error: &'static str,
                    detail: String,
                    repos: &'a [SyncResult],
                }
                let body = Failed { error: "sync failed", detail: why, repos: &results };
                Ok(Response::json(422, &body))
            }
        }
    }

    /// Checks an invoke synchronously, then starts its run and answers at once
    /// (or with the run's live NDJSON stream).
    fn invoke(&self, p: &Arc<ProjectState>, args: &Payload<'_>) -> Result<Response, Response> {
        let agent = args.string("agent")?.unwrap_or("");
        if !p.config.agents.iter().any(|a| a.name == agent) {
            return Err(err(400, "unknown agent"));
        }
        let prompt = args.string("prompt")?.unwrap_or("");
        if prompt.trim().is_empty() {
            return Err(err(400, "empty prompt"));
        }
        let session = args.string("session")?.unwrap_or("default");
        if session.is_empty()
            || session.len() > 200
            || session.starts_with('-')
            || session.chars().any(char::is_control)
        {
            return Err(detail(
                400,
                "bad payload",
                "payload.session must be 1-200 characters, not starting with '-'",
            ));
        }
        let model = args.string("model")?;
        if model.is_some_and(|m| m.is_empty() || m.starts_with('-') || m.chars().any(char::is_control)) {
            return Err(detail(400, "bad payload", "payload.model must not be empty or start with '-'"));
        }
        let callback = args.string("callback")?;
        if let Some(url) = callback
            && !is_http_url(url)
        {
            return Err(detail(
                400,
                "bad payload",
                "payload.callback must be an http:// or https:// URL with a host and a port 1-65535",
            ));
        }
        let repos = match args.0.get("repos") {
            None | Some(Value::Null) => Vec::new(),
            Some(Value::Array(items)) => repo_specs(items, p.config.allow_file_urls)?,
            Some(_) => return Err(detail(400, "bad payload", "payload.repos must be an array")),
        };
        let context = prompt::Context {
            system: args.string("system")?.map(str::to_string),
            memory: args.string("memory")?.map(str::to_string),
            instructions: args.string("instructions")?.map(str::to_string),
            history: history(args.0.get("history"))?,
        };
        let composed = prompt::compose(&context, prompt).len();
        if composed > prompt::MAX_ARGUMENT {
            return Err(detail(
                400,
                "bad payload",
                format!(
                    "the prompt with its system, memory, instructions and history is {composed} bytes; at most {} fit in one argument",
                    prompt::MAX_ARGUMENT
                ),
            ));
        }
        let live = callback.is_none() && args.0.get("stream") == Some(&Value::Bool(true));
        let invoke = Invoke {
            agent: agent.to_string(),
            prompt: prompt.to_string(),
            context,
            session: session.to_string(),
            model: model.map(str::to_string),
            callback: callback.map(str::to_string),
            token: args.string("token")?.unwrap_or("").to_string(),
            repos,
        };
        let (delivery, lines) = if invoke.callback.is_some() {
            (Delivery::Callback, None)
        } else if live {
            let (tx, rx) = crossbeam_channel::bounded(256);
            (Delivery::Live(tx), Some(rx))
        } else {
            (Delivery::Nowhere, None)
        };
        match self.runs.start(Arc::clone(p), invoke, delivery) {
            Err(Refused::Busy) => Err(err(409, "session busy")),
            Err(Refused::TooMany) => Err(err(429, "too many runs")),
            Err(Refused::ShuttingDown) => Err(err(503, "shutting down")),
            Ok(()) => Ok(match lines {
                Some(rx) => Response::ndjson(rx),
                None => ok(&json!({ "ok": true, "sessionId": session })),
            }),
        }
    }
}

/// The WebSocket subprotocol echoed when offered.
const PROTOCOL: &str = "aion";
/// The prefix of the subprotocol entry that carries the token.
const PROTOCOL_TOKEN: &str = "aion.token.";

/// The token of `Authorization: Bearer TOKEN` (another scheme is ignored).
fn bearer(req: &Request) -> Option<&str> {
    let value = req.header("authorization")?.trim();
    let (scheme, token) = value.split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| token.trim()).filter(|t| !t.is_empty())
}

/// `payload.history`: an array of objects whose `role`, `source` and `text`
/// are used when they are strings (400 naming the first item that is not an object).
fn history(v: Option<&Value>) -> Result<Vec<prompt::HistoryItem>, Response> {
    let items = match v {
        None | Some(Value::Null) => return Ok(Vec::new()),
        Some(Value::Array(items)) => items,
        Some(_) => return Err(detail(400, "bad payload", "payload.history must be an array of objects")),
    };
    let mut out = Vec::with_capacity(items.len());
    for (i, item) in items.iter().enumerate() {
        let Value::Object(m) = item else {
            return Err(detail(400, "bad payload", format!("payload.history[{i}] must be an object")));
        };
        let field = |k: &str| m.get(k).and_then(Value::as_str).map(str::to_string);
        out.push(prompt::HistoryItem {
            role: field("role"),
            source: field("source"),
            text: field("text").unwrap_or_default(),
        });
    }
    Ok(out)
}

/// `payload.repos` validated into specs (400 naming the first problem).
fn repo_specs(items: &[Value], allow_file: bool) -> Result<Vec<RepoSpec>, Response> {
    if items.len() > MAX_REPOS {
        return Err(detail(400, "bad payload", format!("payload.repos: at most {MAX_REPOS} repositories")));
    }
    let mut specs = Vec::with_capacity(items.len());
    for (i, item) in items.iter().enumerate() {
        let Value::Object(m) = item else {
            return Err(detail(400, "bad payload", format!("payload.repos[{i}] must be an object")));
        };
        let field = |k: &str| -> Result<Option<String>, Response> {
            match m.get(k) {
                None | Some(Value::Null) => Ok(None),
                Some(Value::String(s)) => Ok(Some(s.clone())),
                Some(_) => {
                    Err(detail(400, "bad payload", format!("payload.repos[{i}].{k} must be a string")))
                }
            }
        };
        let need = |v: Option<String>, k: &str| {
            v.ok_or_else(|| detail(400, "bad payload", format!("payload.repos[{i}].{k} is required")))
        };
        let name = need(field("name")?, "name")?;
        // Credentials in the url travel like `token`, never in argv or on disk.
        let (url, userinfo) = match field("url")? {
            Some(u) => {
                let (stripped, info) = git::split_userinfo(&u);
                (Some(stripped), info)
            }
            None => (None, None),
        };
        let dir = git::repo_dir(&name, url.as_deref()).map_err(|why| detail(400, "bad payload", why))?;
        let token = field("token")?.filter(|t| !t.is_empty()).or(userinfo);
        let spec = RepoSpec { name, dir, url, branch: field("branch")?, token };
        git::check_spec(&spec, allow_file).map_err(|why| detail(400, "bad payload", why))?;
        specs.push(spec);
    }
    Ok(specs)
}

fn terminal_refused(r: terminal::Refused) -> Response {
    match r {
        terminal::Refused::TooMany => err(429, "too many terminals"),
        terminal::Refused::Spawn(msg) => detail(500, "terminal failed", msg),
    }
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

/// `a=1&b=x%20y` → pairs, percent-decoded (`+` is a space).
fn parse_query(q: &str) -> Vec<(String, String)> {
    let decode = |s: &str| crate::text::percent_decode(s, true);
    q.split('&')
        .filter(|kv| !kv.is_empty())
        .map(|kv| {
            let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
            (decode(k), decode(v))
        })
        .collect()
}

fn refusal(r: Refusal) -> Response {
    match r {
        Refusal::Traversal => err(403, "path traversal"),
        Refusal::Denied => err(403, "denied"),
        Refusal::NotFound => err(404, "not found"),
        Refusal::NotAFile => err(400, "not a file"),
        Refusal::NotADirectory => err(400, "not a directory"),
        Refusal::UnknownWorkspace => err(404, "unknown workspace"),
        Refusal::NoWorkspace => err(404, "no workspace"),
        Refusal::TooLong => {
            detail(400, "bad payload", "a path name is longer than 255 bytes or the path than 4096")
        }
        Refusal::Io(msg) => detail(500, "io error", msg),
    }
}

fn git_error(e: GitError) -> Response {
    match e {
        GitError::TimedOut => err(504, "git timed out"),
        GitError::Failed(msg) => detail(500, "git failed", msg),
    }
}

/// Typed access to the payload; a wrong type is a 400 naming the key.
/// The body of a POST as far as the router reads it before the action: what
/// `serde_json::from_slice::<Value>` of the body and `get` of these members
/// gave, without building a map of the whole body. It accepts exactly the
/// bodies that parse as a JSON object (anything else is an error, as every
/// other member is still parsed and checked, never kept); of a member given
/// twice the last counts; a `token` or `action` that is not a string is
/// `None`. The strings are borrowed from the body unless they hold escapes.
#[derive(Default)]
struct Envelope<'a> {
    v: Option<Value>,
    token: Option<Cow<'a, str>>,
    action: Option<Cow<'a, str>>,
    payload: Option<Value>,
}

impl<'de> serde::Deserialize<'de> for Envelope<'de> {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Object;
        impl<'de> serde::de::Visitor<'de> for Object {
            type Value = Envelope<'de>;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<Envelope<'de>, A::Error> {
                let mut body = Envelope::default();
                while let Some(key) = map.next_key::<Member>()? {
                    match key {
                        Member::V => body.v = Some(map.next_value()?),
                        Member::Token => body.token = map.next_value::<AnyStr<'de>>()?.0,
                        Member::Action => body.action = map.next_value::<AnyStr<'de>>()?.0,
                        Member::Payload => body.payload = Some(map.next_value()?),
                        Member::Other => {
                            map.next_value::<AnyStr<'de>>()?;
                        }
                    }
                }
                Ok(body)
            }
        }
        d.deserialize_map(Object)
    }
}

/// A member name of the envelope (the others are [`Member::Other`]); an
/// escaped name (`"\u0074oken"`) is matched once unescaped.
#[derive(serde::Deserialize)]
#[serde(field_identifier, rename_all = "lowercase")]
enum Member {
    V,
    Token,
    Action,
    Payload,
    #[serde(other)]
    Other,
}

/// Any JSON value, parsed and checked as [`Value`] would be (numbers in range,
/// escapes valid, nesting limited), kept only when it is a string.
struct AnyStr<'a>(Option<Cow<'a, str>>);

impl<'de> serde::Deserialize<'de> for AnyStr<'de> {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Any;
        impl<'de> serde::de::Visitor<'de> for Any {
            type Value = AnyStr<'de>;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("any JSON value")
            }
            fn visit_borrowed_str<E: serde::de::Error>(self, s: &'de str) -> Result<AnyStr<'de>, E> {
                Ok(AnyStr(Some(Cow::Borrowed(s))))
            }
            fn visit_str<E: serde::de::Error>(self, s: &str) -> Result<AnyStr<'de>, E> {
                Ok(AnyStr(Some(Cow::Owned(s.to_string()))))
            }
            fn visit_string<E: serde::de::Error>(self, s: String) -> Result<AnyStr<'de>, E> {
                Ok(AnyStr(Some(Cow::Owned(s))))
            }
            fn visit_bool<E: serde::de::Error>(self, _: bool) -> Result<AnyStr<'de>, E> {
                Ok(AnyStr(None))
            }
            fn visit_i64<E: serde::de::Error>(self, _: i64) -> Result<AnyStr<'de>, E> {
                Ok(AnyStr(None))
            }
            fn visit_u64<E: serde::de::Error>(self, _: u64) -> Result<AnyStr<'de>, E> {
                Ok(AnyStr(None))
            }
            fn visit_f64<E: serde::de::Error>(self, _: f64) -> Result<AnyStr<'de>, E> {
                Ok(AnyStr(None))
            }
            fn visit_unit<E: serde::de::Error>(self) -> Result<AnyStr<'de>, E> {
                Ok(AnyStr(None))
            }
            fn visit_none<E: serde::de::Error>(self) -> Result<AnyStr<'de>, E> {
                Ok(AnyStr(None))
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<AnyStr<'de>, A::Error> {
                while seq.next_element::<AnyStr<'de>>()?.is_some() {}
                Ok(AnyStr(None))
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<AnyStr<'de>, A::Error> {
                while map.next_entry::<AnyStr<'de>, AnyStr<'de>>()?.is_some() {}
                Ok(AnyStr(None))
            }
        }
        d.deserialize_any(Any)
    }
}

struct Payload<'a>(&'a Map<String, Value>);

impl Payload<'_> {
    fn string(&self, key: &str) -> Result<Option<&str>, Response> {
        match self.0.get(key) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::String(s)) => Ok(Some(s)),
            Some(_) => Err(detail(400, "bad payload", format!("payload.{key} must be a string"))),
        }
    }

    fn required(&self, key: &str) -> Result<&str, Response> {
        self.string(key)?.ok_or_else(|| detail(400, "bad payload", format!("payload.{key} is required")))
    }

    /// A terminal dimension: an integer 1-10000.
    fn dimension(&self, key: &str) -> Result<Option<u16>, Response> {
        match self.0.get(key) {
            None | Some(Value::Null) => Ok(None),
            Some(v) => {
                v.as_u64().filter(|n| (1..=10_000).contains(n)).map(|n| Some(n as u16)).ok_or_else(|| {
                    detail(400, "bad payload", format!("payload.{key} must be an integer 1-10000"))
                })
            }
        }
    }

    fn strings(&self, key: &str) -> Result<Vec<String>, Response> {
        match self.0.get(key) {
            None | Some(Value::Null) => Ok(Vec::new()),
            Some(Value::Array(items)) => {
                items.iter().map(|v| v.as_str().map(str::to_string)).collect::<Option<Vec<_>>>().ok_or_else(
                    || detail(400, "bad payload", format!("payload.{key} must be an array of strings")),
                )
            }
            Some(_) => Err(detail(400, "bad payload", format!("payload.{key} must be an array of strings"))),
        }
    }
}

#[cfg(test)]
mod tests {
    use serde_json::Value;

    #[test]
    fn pong_is_what_serde_json_writes() {
        for uptime in [0, 7, 86_400, u64::MAX] {
            let pong = super::Pong { ok: true, v: 1, version: crate::version::VERSION, uptime };
            let resp = super::pong(uptime);
            assert_eq!(resp.body, serde_json::to_vec(&pong).unwrap());
            assert_eq!((resp.status, resp.content_type), (200, "application/json"));
        }
    }

    /// The envelope reads what parsing the body into a `Value` and `get`
    /// gave: the same bodies refused, the same members (the last of a
    /// repeated one), strings borrowed unless escaped.
    #[test]
    fn envelope_reads_what_a_value_gave() {
        let deep = format!("{{\"x\":{}1{}}}", "[".repeat(200), "]".repeat(200));
        let bodies = [
            r#"{"v":1,"action":"ping","token":"t"}"#,
            r#" { "token" : "t" , "action" : "ping" } "#,
            r#"{}"#,
            r#"{"v":null,"token":null,"action":3,"payload":null}"#,
            r#"{"v":2,"v":1,"token":"a","token":"b","action":"x","action":{"a":1}}"#,
            r#"{"token":"t","token":7}"#,
            r#"{"v":"1","payload":[1],"x":{"y":[1,{"z":"\u00e9"}]}}"#,
            r#"{"v":{"b":1,"a":2},"payload":{"project":"p","n":1.5}}"#,
            r#"{"\u0074oken":"t\n","act\u0069on":"p\u0069ng"}"#,
            r#"{"v":-0.5,"w":1e400}"#,
            r#"{"x":1e400}"#,
            r#"{"x":"\ud800"}"#,
            r#"{"x":"\q"}"#,
            r#"{"x":1,}"#,
            r#"{"x":1}x"#,
            r#"{"x":18446744073709551616}"#,
            r#"{"x":-9223372036854775809,"v":1.0}"#,
            "{\"x\":\"a\u{7f}\u{e9}\"}",
            "{\"x\":\"a\u{1}\"}",
            r#"[{"token":"t"}]"#,
            r#""{}""#,
            "null",
            "",
            "{",
            &deep,
        ];
        for body in bodies {
            let value = match serde_json::from_slice::<Value>(body.as_bytes()) {
                Ok(v @ Value::Object(_)) => Some(v),
                _ => None,
            };
            let envelope = serde_json::from_slice::<super::Envelope<'_>>(body.as_bytes()).ok();
            let (Some(value), Some(envelope)) = (&value, &envelope) else {
                assert_eq!(value.is_some(), envelope.is_some(), "{body}");
                continue;
            };
            assert_eq!(value.get("v"), envelope.v.as_ref(), "{body}");
            assert_eq!(value.get("payload"), envelope.payload.as_ref(), "{body}");
            assert_eq!(value.get("token").and_then(Value::as_str), envelope.token.as_deref(), "{body}");
            assert_eq!(value.get("action").and_then(Value::as_str), envelope.action.as_deref(), "{body}");
        }
        let body = br#"{"action":"ping","token":"abc"}"#;
        let envelope: super::Envelope<'_> = serde_json::from_slice(body).expect("parses");
        assert!(matches!(envelope.token, Some(std::borrow::Cow::Borrowed("abc"))));
        assert!(matches!(envelope.action, Some(std::borrow::Cow::Borrowed("ping"))));
    }

    #[test]
    fn callback_urls_need_a_host_and_a_real_port() {
        for good in
            ["http://h", "https://h:443/x", "http://127.0.0.1:8080", "http://[::1]:9/p", "http://u:p@h:1"]
        {
            assert!(super::is_http_url(good), "{good}");
        }
        for bad in [
            "ftp://h",
            "http://",
            "http://h:99999",
            "http://h:0",
            "http://h:x",
            "http://:80",
            "http://h /x",
            "http://[::1",
        ] {
            assert!(!super::is_http_url(bad), "{bad}");
        }
    }

    #[test]
    fn queries_decode() {
        let q = super::parse_query("token=a%2Bb%3D&session=my+id&x&bad=%zz%4");
        let want = [("token", "a+b="), ("session", "my id"), ("x", ""), ("bad", "%zz%4")];
        assert_eq!(q, want.map(|(k, v)| (k.to_string(), v.to_string())));
    }
}
