//! The project directory as the platform sees it: which workspaces (synced
//! repositories) it holds, how a client-supplied path is resolved inside one,
//! which files are sensitive, and the `files.tree` / `files.read` answers.
//!
//! Paths are checked twice: lexically (NUL, absolute, `..` above the root) and
//! after every symlink is resolved, by path components (so `<dir>-evil` is not
//! "inside" `<dir>`). Sensitive files are matched on path components, on the
//! path as asked and on the path it really leads to.

pub mod git;

use serde::Serialize;
use std::collections::BTreeMap;
use std::fs::File;
use std::io::Read;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Component, Path, PathBuf};

/// Why a path was not served; each maps to one answer in `channel`.
#[derive(Debug, PartialEq)]
pub enum Refusal {
    Traversal,
    Denied,
    NotFound,
    NotAFile,
    NotADirectory,
    UnknownWorkspace,
    /// Nothing is mapped yet: the platform is expected to `repos.sync`.
    NoWorkspace,
    /// A name over 255 bytes or a path over 4096: no file can have it.
    TooLong,
    Io(String),
}

/// Files never served or listed. Built-in rules plus a project's own patterns.
pub struct Sensitive {
    extra: Vec<String>,
    /// Real paths never served (the connector's own files, nested projects).
    deny: Vec<PathBuf>,
}

const SSH_KEYS: &[&str] = &["id_rsa", "id_dsa", "id_ecdsa", "id_ed25519", "id_ecdsa_sk", "id_ed25519_sk"];

impl Sensitive {
    pub fn new(extra: &[String]) -> Sensitive {
        let extra = extra.iter().map(|p| p.trim_matches('/').to_lowercase()).collect();
        Sensitive { extra, deny: Vec::new() }
    }

    pub fn deny_paths(mut self, paths: Vec<PathBuf>) -> Sensitive {
        self.deny = paths;
        self
    }

    /// Whether the real path `path` is, or is under, a denied path.
    pub fn denies(&self, path: &Path) -> bool {
        self.deny.iter().any(|d| path.starts_with(d))
    }

    /// Whether the relative path `rel` (with `/` separators) is sensitive.
    pub fn matches(&self, rel: &str) -> bool {
        let rel = rel.to_lowercase();
        let parts: Vec<&str> = rel.split('/').filter(|c| !c.is_empty() && *c != ".").collect();
        if parts.iter().any(|c| builtin(c)) {
            return true;
        }
        self.extra.iter().any(|pat| {
            if pat.contains('/') {
                // A path pattern matches that path or anything under it.
                let depth = pat.split('/').count();
                parts.len() >= depth && glob(pat, &parts[..depth].join("/"))
            } else {
                parts.iter().any(|c| glob(pat, c))
            }
        })
    }
}

fn builtin(c: &str) -> bool {
    c == ".git"
        // The MCP config written before each acpx run (it holds the invoke
        // token), and its temporary twins while it is written.
        || c == ".acpxrc.json"
        || c.starts_with(".acpxrc.json.")
        || c == ".env"
        || c.starts_with(".env.")
        || c.ends_with(".pem")
        || c.ends_with(".key")
        || c.contains("credentials")
        || c == ".secret"
        || c.ends_with(".secret")
        || SSH_KEYS.contains(&c)
}

/// `*` (any run of characters except `/`) and `?` (one character).
fn glob(pat: &str, text: &str) -> bool {
    let (p, t): (Vec<char>, Vec<char>) = (pat.chars().collect(), text.chars().collect());
    let (mut pi, mut ti) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while ti < t.len() {
        if pi < p.len() && (p[pi] == '?' && t[ti] != '/' || p[pi] == t[ti]) {
            pi += 1;
            ti += 1;
        } else if pi < p.len() && p[pi] == '*' {
            star = Some((pi, ti));
            pi += 1;
        } else if let Some((sp, st)) = star.filter(|&(_, st)| t[st] != '/') {
            pi = sp + 1;
            ti = st + 1;
            star = Some((sp, st + 1));
        } else {
            return false;
        }
    }
    p[pi..].iter().all(|&c| c == '*')
}

/// A path inside a workspace, resolved.
pub struct Resolved {
    /// The real path (every symlink resolved).
    pub real: PathBuf,
    /// `real` relative to the root, with `/` separators ("" for the root).
    pub rel: String,
}

/// Resolves a client path inside `root` (which must be canonical).
pub fn resolve(root: &Path, asked: &str, sensitive: &Sensitive) -> Result<Resolved, Refusal> {
    if asked.contains('\0') || asked.starts_with('/') {
        return Err(Refusal::Traversal);
    }
    if asked.len() > 4096 {
        return Err(Refusal::TooLong);
    }
    let mut depth: usize = 0;
    for c in Path::new(asked).components() {
        match c {
            Component::Normal(name) if name.len() > 255 => return Err(Refusal::TooLong),
            Component::Normal(_) => depth += 1,
            Component::ParentDir => depth = depth.checked_sub(1).ok_or(Refusal::Traversal)?,
            Component::CurDir => {}
            Component::RootDir | Component::Prefix(_) => return Err(Refusal::Traversal),
        }
    }
    if sensitive.matches(asked) {
        return Err(Refusal::Denied);
    }
    let joined = root.join(asked);
    let real = match joined.canonicalize() {
        Ok(real) => real,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            // Missing inside, or missing behind a symlink that leads out? The
            // deepest part that exists tells; no probing of outside files.
            let existing = joined.ancestors().skip(1).find_map(|a| a.canonicalize().ok());
            return match existing.and_then(|e| inside(root, &e)) {
                Some(_) => Err(Refusal::NotFound),
                None => Err(Refusal::Traversal),
            };
        }
        Err(e) => {
            return Err(match e.raw_os_error().map(nix::errno::Errno::from_raw) {
                // through a file (`a.txt/x`), or a symlink loop: nothing there
                Some(nix::errno::Errno::ENOTDIR | nix::errno::Errno::ELOOP) => Refusal::NotFound,
                Some(nix::errno::Errno::ENAMETOOLONG) => Refusal::TooLong,
                _ => Refusal::Io(e.to_string()),
            });
        }
    };
    let rel = inside(root, &real).ok_or(Refusal::Traversal)?;
    if sensitive.matches(&rel) || sensitive.denies(&real) {
        return Err(Refusal::Denied);
    }
    Ok(Resolved { real, rel })
}

/// A path given to `git.diff`: the same checks as a read, but it may name a
/// file that no longer exists (a deletion is part of a diff).
pub fn check_pathspec(root: &Path, asked: &str, sensitive: &Sensitive) -> Result<(), Refusal> {
    match resolve(root, asked, sensitive) {
        Ok(_) | Err(Refusal::NotFound) => Ok(()),
        Err(e) => Err(e),
    }
}

/// `path` relative to `root` by components, or None when it is not inside.
fn inside(root: &Path, path: &Path) -> Option<String> {
    let rest = path.strip_prefix(root).ok()?;
    let parts: Vec<String> =
        rest.components().map(|c| c.as_os_str().to_string_lossy().into_owned()).collect();
    Some(parts.join("/"))
}

/// The real directory of a mapped workspace (`rel` is `.` for the project
/// dir itself, else one directory below it): it must still exist, and once
/// symlinks are resolved it must still be the project dir or inside it.
pub fn mapped_dir(project_root: &Path, rel: &str) -> Result<PathBuf, Refusal> {
    let path = if rel == "." { project_root.to_path_buf() } else { project_root.join(rel) };
    let real = path.canonicalize().map_err(|_| Refusal::NotFound)?;
    inside(project_root, &real).ok_or(Refusal::Traversal)?;
    if !real.is_dir() {
        return Err(Refusal::NotADirectory);
    }
    Ok(real)
}

// ---- files.read ----

pub const READ_LIMIT: u64 = 1_000_000;

#[derive(Serialize)]
pub struct ReadAnswer {
    pub path: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub content: Option<String>,
    pub size: u64,
    pub binary: bool,
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub truncated: bool,
}

pub fn read(root: &Path, asked: &str, sensitive: &Sensitive) -> Result<ReadAnswer, Refusal> {
    let target = resolve(root, asked, sensitive)?;
    // O_NONBLOCK: a FIFO planted in the workspace cannot hang us; O_NOFOLLOW:
    // the last component cannot have been swapped for a symlink since.
    let flags = (nix::fcntl::OFlag::O_NONBLOCK | nix::fcntl::OFlag::O_NOFOLLOW).bits();
    let file =
        std::fs::OpenOptions::new().read(true).custom_flags(flags).open(&target.real).map_err(|e| match e
            .kind()
        {
            std::io::ErrorKind::NotFound => Refusal::NotFound,
            _ if target.real.is_dir() => Refusal::NotAFile,
            _ => Refusal::Io(e.to_string()),
        })?;
    let meta = file.metadata().map_err(|e| Refusal::Io(e.to_string()))?;
    if !meta.is_file() {
        return Err(Refusal::NotAFile);
    }
    still_inside(&file, root)?;
    let path = asked.to_string();
    let too_big =
        |size| ReadAnswer { path: path.clone(), content: None, size, binary: true, truncated: true };
    if meta.len() > READ_LIMIT {
        return Ok(too_big(meta.len()));
    }
    let mut bytes = Vec::with_capacity(meta.len() as usize);
    (&file).take(READ_LIMIT + 1).read_to_end(&mut bytes).map_err(|e| Refusal::Io(e.to_string()))?;
    if bytes.len() as u64 > READ_LIMIT {
        return Ok(too_big(bytes.len() as u64));
    }
    let size = bytes.len() as u64;
    Ok(match String::from_utf8(bytes) {
        Ok(text) => ReadAnswer { path, content: Some(text), size, binary: false, truncated: false },
        Err(_) => ReadAnswer { path, content: None, size, binary: true, truncated: false },
    })
}

/// Where the kernel can say which file an fd really is, check it once more
/// (closes the race of a directory swapped for a symlink after `resolve`).
#[cfg(target_os = "linux")]
fn still_inside(file: &File, root: &Path) -> Result<(), Refusal> {
    use std::os::fd::AsRawFd;
    match std::fs::read_link(format!("/proc/self/fd/{}", file.as_raw_fd())) {
        Ok(real) if inside(root, &real).is_none() => Err(Refusal::Traversal),
        _ => Ok(()),
    }
}

#[cfg(not(target_os = "linux"))]
fn still_inside(_file: &File, _root: &Path) -> Result<(), Refusal> {
    Ok(())
}

// ---- files.tree ----

pub const TREE_ENTRIES: usize = 100_000;
const TREE_DEPTH: usize = 64;

#[derive(Serialize)]
pub struct Node {
    name: String,
    #[serde(rename = "type")]
    kind: &'static str,
    path: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    children: Option<Vec<Node>>,
}

#[derive(Serialize)]
pub struct TreeAnswer {
    pub tree: Vec<Node>,
    pub root: String,
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub truncated: bool,
}

/// Directories and files, built from relative paths.
#[derive(Default)]
struct Dir {
    dirs: BTreeMap<String, Dir>,
    files: Vec<String>,
}

impl Dir {
    fn insert(&mut self, parts: &[&str], is_dir: bool) {
        match parts {
            [] => {}
            [last] if !is_dir => self.files.push((*last).to_string()),
            [first, rest @ ..] => self.dirs.entry((*first).to_string()).or_default().insert(rest, is_dir),
        }
    }

    fn nodes(self, prefix: &str) -> Vec<Node> {
        let path = |name: &str| if prefix.is_empty() { name.to_string() } else { format!("{prefix}/{name}") };
        let mut out: Vec<Node> = Vec::with_capacity(self.dirs.len() + self.files.len());
        for (name, dir) in self.dirs {
            let p = path(&name);
            let children = Some(dir.nodes(&p));
            out.push(Node { name, kind: "dir", path: p, children });
        }
        let mut files = self.files;
        files.sort();
        files.dedup();
        out.extend(files.into_iter().map(|name| Node {
            path: path(&name),
            name,
            kind: "file",
            children: None,
        }));
        out
    }
}

/// Entries under `sub` (relative to `root`, "" for all): git's view in a
/// repository (tracked plus untracked-not-ignored), else a directory walk.
pub fn tree(
    root: &Path,
    asked: Option<&str>,
    sensitive: &Sensitive,
    git_listing: Option<Vec<String>>,
) -> Result<TreeAnswer, Refusal> {
    let sub = match asked {
        None | Some("") | Some(".") => String::new(),
        Some(a) => {
            let r = resolve(root, a, sensitive)?;
            if !r.real.is_dir() {
                return Err(Refusal::NotADirectory);
            }
            r.rel
        }
    };
    let mut top = Dir::default();
    let mut count = 0;
    let mut truncated = false;
    let mut add = |rel: &str, is_dir: bool| {
        if sensitive.matches(rel) || sensitive.denies(&root.join(rel)) {
            return true;
        }
        let parts: Vec<&str> = rel.split('/').filter(|p| !p.is_empty()).collect();
        if count >= TREE_ENTRIES || parts.len() > TREE_DEPTH {
            truncated = true;
            return count < TREE_ENTRIES;
        }
        count += 1;
        top.insert(&parts, is_dir);
        true
    };
    match git_listing {
        Some(paths) => {
            for rel in paths {
                // git lists the index too: a file deleted from the tree is not served.
                match root.join(&rel).symlink_metadata() {
                    Ok(m) if !add(&rel, m.is_dir()) => break,
                    _ => {}
                }
            }
        }
        None => walk(root, &sub, &mut add),
    }
    // The tree starts at `sub`: descend to it.
    let mut node = top;
    for part in sub.split('/').filter(|p| !p.is_empty()) {
        node = node.dirs.remove(part).unwrap_or_default();
    }
    let root_label = asked.filter(|a| !a.is_empty()).unwrap_or(".").to_string();
    Ok(TreeAnswer { tree: node.nodes(&sub), root: root_label, truncated })
}

/// Depth-first walk of `root/sub`: `.git` skipped, symlinks listed but never followed.
fn walk(root: &Path, sub: &str, add: &mut dyn FnMut(&str, bool) -> bool) {
    let mut stack = vec![sub.to_string()];
    while let Some(rel) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(root.join(&rel)) else { continue };
        for entry in entries.filter_map(Result::ok) {
            let Ok(name) = entry.file_name().into_string() else { continue };
            if name == ".git" {
                continue;
            }
            let child = if rel.is_empty() { name } else { format!("{rel}/{name}") };
            let is_dir = entry.file_type().is_ok_and(|t| t.is_dir());
            if !add(&child, is_dir) {
                return;
            }
            if is_dir && child.matches('/').count() < TREE_DEPTH {
                stack.push(child);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sensitive_rules_match_components_not_substrings() {
        let s = Sensitive::new(&["*.sqlite".into(), "private/keys".into()]);
        for denied in [
            ".env",
            "a/.env",
            ".env.local",
            ".git/config",
            ".git",
            "k.pem",
            "tls/server.key",
            "my-credentials.json",
            ".secret",
            "app.secret",
            "id_rsa",
            "home/.ssh/id_ed25519",
            "ID_RSA",
            "data/x.sqlite",
            "private/keys/a",
            "private/keys",
            ".acpxrc.json",
            ".acpxrc.json.123-ab.tmp",
        ] {
            assert!(s.matches(denied), "{denied} should be sensitive");
        }
        for fine in [
            ".github/workflows/ci.yml",
            ".envrc",
            "acpxrc.json",
            "id_rsa.pub",
            "keys.txt",
            "environment.md",
            "src/.gitignore",
            "secret.txt",
            "private/other",
            "x.sqlite3",
        ] {
            assert!(!s.matches(fine), "{fine} should be readable");
        }
    }

    #[test]
    fn globs() {
        assert!(glob("*.db", "a.db") && glob("a?c", "abc") && glob("*", "x"));
        assert!(!glob("*.db", "a.dbx") && !glob("a*", "a/b") && !glob("?", ""));
    }
}
