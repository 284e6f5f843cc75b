//! Everything the connector asks of git: status, diff, the file listing behind
//! `files.tree`, and `repos.sync`. git never prompts (no terminal, no stdin,
//! ssh in batch mode), never runs repository hooks or external diff tools,
//! never detaches background work, and is killed with its process group at the
//! configured timeout. A repo token reaches git only as an HTTP header passed
//! through the environment of one command: never in argv, `.git/config`, a log
//! or an error text.

use crate::process::{self as proc, Output};
use serde::Serialize;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

/// Upper bound on what one git command may print before we stop keeping it
/// (a file listing of about 200,000 paths).
const OUTPUT_CAP: usize = 16 << 20;
/// Upper bound on a `git.diff` answer.
pub const DIFF_CAP: usize = 8 << 20;

#[derive(Debug)]
pub enum GitError {
    /// git failed; the text is safe to show (credentials scrubbed).
    Failed(String),
    TimedOut,
}

impl std::fmt::Display for GitError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            GitError::Failed(msg) => f.write_str(msg),
            GitError::TimedOut => f.write_str("git timed out"),
        }
    }
}

/// One git invocation's settings. `secret` is scrubbed from every message.
struct Git<'a> {
    cwd: &'a Path,
    deadline: Instant,
    token: Option<&'a str>,
    allow_file: bool,
}

impl Git<'_> {
    fn command(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new("git");
        cmd.current_dir(self.cwd).args(args);
        cmd.env("GIT_TERMINAL_PROMPT", "0")
            .env("GCM_INTERACTIVE", "never")
            .env("LC_ALL", "C")
            .env_remove("GIT_ASKPASS")
            .env_remove("SSH_ASKPASS");
        if std::env::var_os("GIT_SSH_COMMAND").is_none() {
            cmd.env("GIT_SSH_COMMAND", "ssh -o BatchMode=yes");
        }
        let mut config: Vec<(&str, String)> = vec![
            ("core.hooksPath", "/dev/null".into()),
            ("core.fsmonitor", "false".into()),
            ("core.quotePath", "false".into()),
            ("protocol.ext.allow", "never".into()),
            ("protocol.file.allow", if self.allow_file { "always" } else { "never" }.into()),
            ("gc.autoDetach", "false".into()),
            ("maintenance.autoDetach", "false".into()),
            ("http.lowSpeedLimit", "1000".into()),
            ("http.lowSpeedTime", "60".into()),
            ("credential.interactive", "false".into()),
        ];
        if let Some(token) = self.token {
            // `user:password` (from a url's userinfo, or a token such as
            // `oauth2:glpat-…`) is sent as it is; a bare token as GitHub's
            // `x-access-token:TOKEN`.
            let credentials =
                if token.contains(':') { token.to_string() } else { format!("x-access-token:{token}") };
            let basic = base64(credentials.as_bytes());
            config.push(("http.extraHeader", format!("Authorization: Basic {basic}")));
        }
        cmd.env("GIT_CONFIG_COUNT", config.len().to_string());
        for (i, (k, v)) in config.into_iter().enumerate() {
            cmd.env(format!("GIT_CONFIG_KEY_{i}"), k).env(format!("GIT_CONFIG_VALUE_{i}"), v);
        }
        cmd
    }

    fn run(&self, args: &[&str]) -> Result<Output, GitError> {
        self.run_capped(args, OUTPUT_CAP)
    }

    /// Keeps at most `cap` bytes of stdout (the rest is read and dropped).
    fn run_capped(&self, args: &[&str], cap: usize) -> Result<Output, GitError> {
        let left = self.deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(GitError::TimedOut);
        }
        let out = proc::run(&mut self.command(args), left, cap)
            .map_err(|e| GitError::Failed(format!("cannot run git: {e}")))?;
        if out.status.is_none() {
            return Err(GitError::TimedOut);
        }
        Ok(out)
    }

    /// Runs and requires success; the error is git's last words, scrubbed.
    fn ok(&self, args: &[&str]) -> Result<String, GitError> {
        let out = self.run(args)?;
        if out.success() {
            Ok(String::from_utf8_lossy(&out.stdout).into_owned())
        } else {
            Err(GitError::Failed(self.scrub(&out.stderr)))
        }
    }

    /// The tail of git's stderr, without credentials of any kind.
    fn scrub(&self, stderr: &[u8]) -> String {
        let mut msg = proc::last_lines(stderr, 3, "; ");
        if let Some(token) = self.token.filter(|t| !t.is_empty()) {
            msg = msg.replace(token, "***");
        }
        let msg = crate::text::redact_userinfo(&msg);
        if msg.is_empty() { "git failed".into() } else { msg.chars().take(500).collect() }
    }
}

fn base64(bytes: &[u8]) -> String {
    const A: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let n = chunk.iter().enumerate().fold(0u32, |n, (i, &b)| n | u32::from(b) << (16 - 8 * i));
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(A[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

fn local(cwd: &Path, timeout: Duration) -> Git<'_> {
    Git { cwd, deadline: Instant::now() + timeout, token: None, allow_file: false }
}

fn is_repo(dir: &Path) -> bool {
    dir.join(".git").exists()
}

#[derive(Serialize, Debug, PartialEq)]
pub struct Change {
    pub status: String,
    pub path: String,
}

/// `git status`: untracked files one by one, renames under their new path.
/// Not a repository: nothing changed, as the original answers.
pub fn status(dir: &Path, timeout: Duration) -> Result<Vec<Change>, GitError> {
    if !is_repo(dir) {
        return Ok(Vec::new());
    }
    let out = local(dir, timeout).ok(&["status", "--porcelain=v1", "-z", "--untracked-files=all"])?;
    Ok(parse_status(&out))
}

pub fn parse_status(out: &str) -> Vec<Change> {
    let mut changes = Vec::new();
    let mut fields = out.split('\0');
    while let Some(entry) = fields.next() {
        if entry.len() < 4 {
            continue;
        }
        let (xy, path) = entry.split_at(2);
        if xy.contains(['R', 'C']) {
            fields.next(); // the old path follows a rename or copy
        }
        changes.push(Change { status: xy.trim().to_string(), path: path[1..].to_string() });
    }
    changes
}

/// The commit checked out, if `dir` is a repository with one.
pub fn head(dir: &Path, timeout: Duration) -> Option<String> {
    dir.join(".git").exists().then_some(())?;
    let out = local(dir, timeout).ok(&["rev-parse", "--verify", "-q", "HEAD"]).ok()?;
    Some(out.trim().to_string()).filter(|h| !h.is_empty())
}

/// Files touched by the commits between `from` and `to` (renames: new path).
pub fn committed(dir: &Path, from: &str, to: &str, timeout: Duration) -> Vec<Change> {
    let range = format!("{from}..{to}");
    let Ok(out) = local(dir, timeout).ok(&["diff", "--name-status", "-z", "-M", &range, "--"]) else {
        return Vec::new();
    };
    let mut fields = out.split('\0').filter(|f| !f.is_empty());
    let mut changes = Vec::new();
    while let Some(status) = fields.next() {
        let mut path = fields.next();
        if status.starts_with(['R', 'C']) {
            path = fields.next(); // old path, then new
        }
        if let Some(path) = path {
            changes.push(Change { status: status[..1].to_string(), path: path.to_string() });
        }
    }
    changes
}

/// Adds `pattern` to the repository's `info/exclude` (the one git reads for
/// `dir`, a linked worktree's too) unless a line already says it. Ok(true):
/// added.
pub fn exclude(dir: &Path, pattern: &str, timeout: Duration) -> Result<bool, GitError> {
    if !is_repo(dir) {
        return Err(GitError::Failed("not a git repository".into()));
    }
    let out = local(dir, timeout).ok(&["rev-parse", "--git-path", "info/exclude"])?;
    let file = dir.join(out.trim_end_matches('\n'));
    let io = |e: std::io::Error| GitError::Failed(format!("{}: {e}", file.display()));
    let current = match std::fs::read_to_string(&file) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
        Err(e) => return Err(io(e)),
    };
    if current.lines().any(|l| l.trim_end() == pattern) {
        return Ok(false);
    }
    if let Some(parent) = file.parent() {
        std::fs::create_dir_all(parent).map_err(io)?;
    }
    let mut add = String::new();
    if !current.is_empty() && !current.ends_with('\n') {
        add.push('\n');
    }
    add.push_str(pattern);
    add.push('\n');
    use std::io::Write;
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&file)
        .and_then(|mut f| f.write_all(add.as_bytes()))
        .map_err(io)?;
    Ok(true)
}

/// Tracked plus untracked-but-not-ignored files under `sub` ("" for all).
pub fn ls_files(dir: &Path, sub: &str, timeout: Duration) -> Option<Vec<String>> {
    dir.join(".git").exists().then_some(())?;
    let mut args = vec!["ls-files", "-z", "--cached", "--others", "--exclude-standard"];
    if !sub.is_empty() {
        args.extend(["--", sub]);
    }
    let out = local(dir, timeout).ok(&args).ok()?;
    Some(out.split('\0').filter(|p| !p.is_empty()).map(str::to_string).collect())
}

/// Pathspecs that keep sensitive files out of a diff.
fn exclusions(sensitive_extra: &[String]) -> Vec<String> {
    let mut pats: Vec<String> = [
        ".env",
        ".env.*",
        "*.pem",
        "*.key",
        "*credentials*",
        ".secret",
        "*.secret",
        "id_rsa",
        "id_dsa",
        "id_ecdsa",
        "id_ed25519",
        "id_ecdsa_sk",
        "id_ed25519_sk",
    ]
    .iter()
    .map(|p| p.to_string())
    .collect();
    pats.extend(sensitive_extra.iter().map(|p| p.trim_matches('/').to_string()));
    let mut out = Vec::new();
    for p in pats {
        let anywhere = if p.contains('/') { String::new() } else { "**/".to_string() };
        out.push(format!(":(exclude,icase,glob){anywhere}{p}"));
        out.push(format!(":(exclude,icase,glob){anywhere}{p}/**"));
    }
    out
}

/// `git diff HEAD` (staged and unstaged; against the empty tree before the
/// first commit), sensitive files left out, cut at [`DIFF_CAP`]. Not a
/// repository: an empty diff, as the original answers.
pub fn diff(
    dir: &Path,
    paths: &[String],
    extra: &[String],
    timeout: Duration,
) -> Result<(String, bool), GitError> {
    if !is_repo(dir) {
        return Ok((String::new(), false));
    }
    let git = local(dir, timeout);
    let base = match git.ok(&["rev-parse", "--verify", "-q", "HEAD"]) {
        Ok(head) => head.trim().to_string(),
        Err(GitError::Failed(_)) => git.ok(&["hash-object", "-t", "tree", "/dev/null"])?.trim().to_string(),
        Err(e) => return Err(e),
    };
    let mut args: Vec<String> = ["diff", "--no-color", "--no-ext-diff", "--no-textconv", &base, "--"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    args.extend(paths.iter().map(|p| format!(":(literal){p}")));
    args.extend(exclusions(extra));
    let argv: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = git.run_capped(&argv, DIFF_CAP + 1)?;
    if !out.success() {
        return Err(GitError::Failed(git.scrub(&out.stderr)));
    }
    let mut text = out.stdout;
    let truncated = out.truncated || text.len() > DIFF_CAP;
    text.truncate(DIFF_CAP);
    Ok((String::from_utf8_lossy(&text).into_owned(), truncated))
}

// ---- repos.sync ----

/// One repository to sync, as validated from the payload.
#[derive(Clone)]
pub struct RepoSpec {
    /// The workspace name the platform maps (any text; `.` is the project dir).
    pub name: String,
    /// The clone's directory under the project dir ([`repo_dir`]), `.` for
    /// the project dir itself.
    pub dir: String,
    pub url: Option<String>,
    pub branch: Option<String>,
    pub token: Option<String>,
}

#[derive(Serialize)]
pub struct SyncResult {
    pub name: String,
    pub ok: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub action: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub branch: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub head: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// The target already was a git repository (an update, not a clone): a
    /// failed update leaves a usable clone behind. Not part of the answer.
    #[serde(skip)]
    pub existed: bool,
}

/// Why a repo spec is refused before git is run (the caller answers 400).
/// Takes the credentials out of `scheme://user:pass@host/…`: the url without
/// them, and `user:pass` percent-decoded (None when the url has none). They
/// then travel like a repo `token` (an HTTP header through the environment):
/// never in git's argv, `.git/config` or a log.
pub fn split_userinfo(url: &str) -> (String, Option<String>) {
    let Some(start) = url.find("://").map(|i| i + 3) else { return (url.to_string(), None) };
    let rest = &url[start..];
    let end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let Some(at) = rest[..end].rfind('@') else { return (url.to_string(), None) };
    let info = crate::text::percent_decode(&rest[..at], false);
    let stripped = format!("{}{}", &url[..start], &rest[at + 1..]);
    (stripped, Some(info).filter(|i| !i.is_empty() && i != ":"))
}

/// Where the baseline clones a repo: the URL's last path segment without
/// `.git` (`…/app.git` → `app`), else the `name`; `{"name":"."}` without a url
/// is the project dir itself (`.`). The result must be one plain directory
/// name: not `.`/`..`, not hidden, not an option, at most 255 bytes.
pub fn repo_dir(name: &str, url: Option<&str>) -> Result<String, String> {
    let from_url = url.map(|u| {
        let u = u.trim().trim_end_matches('/');
        let u = u.strip_suffix(".git").unwrap_or(u);
        u.rsplit(['/', ':']).next().unwrap_or("").to_string()
    });
    let dir = match from_url.filter(|d| !d.is_empty()) {
        Some(d) => d,
        None if name == "." => return Ok(".".into()),
        None => name.to_string(),
    };
    if dir.starts_with(['.', '-']) || dir.contains(['/', '\\', '\0']) || dir.chars().any(char::is_control) {
        return Err(format!(
            "repo {name}: directory {dir:?} (from the url, else the name) must be one plain, non-hidden directory name"
        ));
    }
    if dir.len() > 255 {
        return Err(format!("repo {name}: directory name longer than 255 bytes"));
    }
    Ok(dir)
}

pub fn check_spec(spec: &RepoSpec, allow_file: bool) -> Result<(), String> {
    let n = &spec.name;
    if n.is_empty() || n.len() > 255 || n.chars().any(char::is_control) {
        return Err(format!("repo name {n:?} must be 1-255 characters without control characters"));
    }
    let Some(url) = spec.url.as_deref().map(str::trim) else {
        return Ok(());
    };
    if url.is_empty() || url.starts_with('-') || url.chars().any(char::is_control) {
        return Err(format!("repo {n}: url must not be empty or start with '-'"));
    }
    match url_kind(url) {
        UrlKind::Helper => {
            return Err(format!(
                "repo {n}: transport '{}' is not allowed",
                url.split("::").next().unwrap_or("")
            ));
        }
        UrlKind::Local if !allow_file => {
            return Err(format!("repo {n}: local and file:// urls are refused (allowFileUrls is off)"));
        }
        UrlKind::Unknown(scheme) => return Err(format!("repo {n}: url scheme '{scheme}' is not allowed")),
        _ => {}
    }
    if let Some(b) = &spec.branch
        && (b.is_empty()
            || b.starts_with('-')
            || b.contains("..")
            || b.chars().any(|c| c.is_control() || c.is_whitespace() || "~^:?*[\\".contains(c)))
    {
        return Err(format!("repo {n}: branch {b:?} is not a valid branch name"));
    }
    Ok(())
}

#[derive(Debug, PartialEq)]
enum UrlKind {
    Remote,
    Local,
    Helper,
    Unknown(String),
}

fn url_kind(url: &str) -> UrlKind {
    let lower = url.to_ascii_lowercase();
    if let Some((scheme, _)) = lower.split_once("://") {
        return match scheme {
            "https" | "http" | "ssh" | "git" | "git+ssh" | "ssh+git" => UrlKind::Remote,
            "file" => UrlKind::Local,
            other => UrlKind::Unknown(other.to_string()),
        };
    }
    // `<transport>::<address>` runs a remote helper (ext:: runs any command).
    if let Some(i) = lower.find("::")
        && !lower[..i].contains('/')
    {
        return UrlKind::Helper;
    }
    // scp-like `[user@]host:path` is ssh; a ':' after the first '/' is a local path.
    match lower.find(':') {
        Some(colon) if !lower[..colon].contains('/') && colon > 0 => UrlKind::Remote,
        _ => UrlKind::Local,
    }
}

/// Clones or fast-forwards one repository under `project_root`. Never
/// discards work: local changes (when the work tree would have to move) or
/// divergence are reported, nothing is reset. A dirty tree already at
/// origin's head (or ahead of it) is fine.
pub fn sync(project_root: &Path, spec: &RepoSpec, allow_file: bool, timeout: Duration) -> SyncResult {
    let target = if spec.dir == "." { project_root.to_path_buf() } else { project_root.join(&spec.dir) };
    let mut result = SyncResult {
        name: spec.name.clone(),
        ok: false,
        action: None,
        branch: None,
        head: None,
        path: Some(target.display().to_string()),
        error: None,
        existed: false,
    };
    let deadline = Instant::now() + timeout;
    let at = |cwd| Git { cwd, deadline, token: spec.token.as_deref(), allow_file };
    let meta = target.symlink_metadata();
    let is_repo = meta.as_ref().is_ok_and(|m| m.is_dir()) && target.join(".git").exists();
    result.existed = is_repo;
    let outcome = match spec.url.as_deref() {
        Some(_) if meta.is_err() => clone(&at(project_root), spec, &target),
        Some(url) if is_repo => update(&at(&target), spec, url),
        Some(_) => Err(GitError::Failed(format!(
            "{} exists and is not a git repository (symlinks are not followed)",
            spec.dir
        ))),
        // No url: only an existing directory can be mapped (the project dir
        // for "."); nothing is fetched.
        None if meta.as_ref().is_ok_and(|m| m.is_dir()) => Ok("mapped"),
        None => Err(GitError::Failed(format!("{} does not exist and no url was given to clone", spec.dir))),
    };
    if let Ok(action) = outcome
        && !target.join(".git").exists()
    {
        // A plain directory mapped without git: no branch or head to report.
        result.ok = true;
        result.action = Some(action);
        return result;
    }
    match outcome {
        Ok(action) => {
            let git = at(&target);
            let trimmed =
                |args: &[&str]| git.ok(args).map(|s| s.trim().to_string()).ok().filter(|s| !s.is_empty());
            result.ok = true;
            result.action = Some(action);
            result.branch = trimmed(&["symbolic-ref", "--short", "-q", "HEAD"]);
            result.head = trimmed(&["rev-parse", "HEAD"]);
        }
        Err(e) => result.error = Some(e.to_string()),
    }
    result
}

fn clone(git: &Git<'_>, spec: &RepoSpec, target: &Path) -> Result<&'static str, GitError> {
    let target_str = target.to_string_lossy();
    let mut args = vec!["clone", "--no-recurse-submodules"];
    if let Some(b) = &spec.branch {
        args.extend(["--branch", b]);
    }
    args.extend(["--", spec.url.as_deref().unwrap_or("").trim(), &target_str]);
    match git.ok(&args) {
        Ok(_) => {
            // Owner-only, whatever the umask: it names the remote.
            let _ = std::fs::set_permissions(
                target.join(".git/config"),
                std::os::unix::fs::PermissionsExt::from_mode(0o600),
            );
            Ok("cloned")
        }
        Err(e) => {
            // Only what this clone created is removed (the target did not exist).
            let _ = std::fs::remove_dir_all(target);
            Err(e)
        }
    }
}

fn update(git: &Git<'_>, spec: &RepoSpec, url: &str) -> Result<&'static str, GitError> {
    let url = url.trim();
    let current = git.ok(&["remote", "get-url", "origin"]).map(|u| u.trim().to_string());
    if current.as_deref().ok() != Some(url) {
        // A changed url is followed; an absent origin is added.
        if git.ok(&["remote", "set-url", "origin", url]).is_err() {
            git.ok(&["remote", "add", "origin", url])?;
        }
    }
    git.ok(&["fetch", "--prune", "--no-recurse-submodules", "origin"])?;
    // Local changes to tracked files matter only when the work tree must move
    // (a checkout or a fast-forward); untracked files never do.
    let refuse_if_dirty = || -> Result<(), GitError> {
        let dirty = git.ok(&["status", "--porcelain=v1", "-z", "--untracked-files=no"])?;
        let dirty = parse_status(&dirty);
        if dirty.is_empty() {
            return Ok(());
        }
        let names: Vec<&str> = dirty.iter().take(5).map(|c| c.path.as_str()).collect();
        Err(GitError::Failed(format!("local changes ({}); not updated", names.join(", "))))
    };
    let branch = match &spec.branch {
        Some(b) => b.clone(),
        None => remote_default(git)?,
    };
    let remote_ref = format!("refs/remotes/origin/{branch}");
    let theirs = git
        .ok(&["rev-parse", "--verify", "-q", &format!("{remote_ref}^{{commit}}")])
        .map_err(|_| GitError::Failed(format!("origin has no branch {branch}")))?;
    let theirs = theirs.trim();
    let current = git.ok(&["symbolic-ref", "--short", "-q", "HEAD"]).unwrap_or_default();
    if current.trim() != branch {
        refuse_if_dirty()?;
        let local_ref = format!("refs/heads/{branch}");
        if git.ok(&["rev-parse", "--verify", "-q", &local_ref]).is_ok() {
            git.ok(&["checkout", "-q", &branch, "--"])?;
        } else {
            git.ok(&["checkout", "-q", "-b", &branch, "--track", &format!("origin/{branch}"), "--"])?;
        }
    }
    let ours = git.ok(&["rev-parse", "HEAD"])?;
    if ours.trim() == theirs {
        return Ok("unchanged");
    }
    let is_ancestor = |a: &str, b: &str| {
        git.run(&["merge-base", "--is-ancestor", a, b]).map(|o| o.status.and_then(|s| s.code()) == Some(0))
    };
    if is_ancestor("HEAD", theirs)? {
        refuse_if_dirty()?;
        git.ok(&["merge", "--ff-only", "-q", theirs])?;
        Ok("updated")
    } else if is_ancestor(theirs, "HEAD")? {
        Ok("ahead")
    } else {
        Err(GitError::Failed(format!("diverged from origin/{branch}: local commits kept; not updated")))
    }
}

/// The branch the remote's HEAD points at (no hard-coded `main`).
fn remote_default(git: &Git<'_>) -> Result<String, GitError> {
    let out = git.ok(&["ls-remote", "--symref", "origin", "HEAD"])?;
    out.lines()
        .find_map(|l| l.strip_prefix("ref: refs/heads/")?.split('\t').next().map(str::to_string))
        .ok_or_else(|| GitError::Failed("the remote has no default branch; name one".into()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_lines_parse_with_renames() {
        let out = " M a.txt\0R  new.txt\0old.txt\0?? dir/u.txt\0D  gone\0";
        let got: Vec<(String, String)> = parse_status(out).into_iter().map(|c| (c.status, c.path)).collect();
        let want = [("M", "a.txt"), ("R", "new.txt"), ("??", "dir/u.txt"), ("D", "gone")];
        assert_eq!(got, want.map(|(a, b)| (a.to_string(), b.to_string())));
    }

    #[test]
    fn urls_are_classified() {
        assert_eq!(url_kind("https://github.com/a/b.git"), UrlKind::Remote);
        assert_eq!(url_kind("git@github.com:a/b.git"), UrlKind::Remote);
        assert_eq!(url_kind("ext::sh -c touch% /tmp/x"), UrlKind::Helper);
        assert_eq!(url_kind("fd::3"), UrlKind::Helper);
        assert_eq!(url_kind("file:///srv/x"), UrlKind::Local);
        assert_eq!(url_kind("/srv/x"), UrlKind::Local);
        assert_eq!(url_kind("./a:b"), UrlKind::Local);
        assert_eq!(url_kind("ftp://x/y"), UrlKind::Unknown("ftp".into()));
    }

    #[test]
    fn userinfo_is_taken_out_of_urls() {
        assert_eq!(
            split_userinfo("https://u%40x:p%3Ass@host/org/r.git"),
            ("https://host/org/r.git".to_string(), Some("u@x:p:ss".to_string()))
        );
        assert_eq!(split_userinfo("https://tok@h/r"), ("https://h/r".to_string(), Some("tok".to_string())));
        assert_eq!(split_userinfo("https://h/a@b"), ("https://h/a@b".to_string(), None));
        assert_eq!(split_userinfo("git@github.com:a/b.git"), ("git@github.com:a/b.git".to_string(), None));
    }

    #[test]
    fn base64_is_standard() {
        assert_eq!(base64(b"x-access-token:abc"), "eC1hY2Nlc3MtdG9rZW46YWJj");
        assert_eq!(base64(b"ab"), "YWI=");
    }
}
