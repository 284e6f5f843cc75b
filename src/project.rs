//! A project as served: its config, its canonical root, the files it never
//! serves, its token's digest, and the syncs of its repositories (one at a
//! time). Built once at start from the config; shared by the router, the
//! runs and the terminals.

use crate::config::{Config, Project};
use crate::logging::warn;
use crate::workspace::git::{self, RepoSpec, SyncResult};
use crate::workspace::{Refusal, Sensitive};
use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// A project as served: its config, its real root and its runtime state.
pub struct ProjectState {
    pub config: Project,
    /// `dir`, created if missing and canonicalized at start.
    pub root: PathBuf,
    token_digest: [u8; 32],
    pub sensitive: Sensitive,
    /// Workspace name → directory under the root (`.` for the root), in the
    /// order first mapped; the first is the default workspace.
    workspaces: Mutex<Vec<Mapping>>,
    /// Where the mapping is kept across restarts.
    mapping_file: PathBuf,
    /// Syncs of one project run one at a time.
    sync_lock: Mutex<()>,
}

#[derive(Clone, serde::Serialize, serde::Deserialize)]
struct Mapping {
    name: String,
    dir: String,
}

impl ProjectState {
    /// Whether `digest` (SHA-256 of a presented token) is this project's, in
    /// constant time: neither timing nor length tells anything about a token.
    pub fn token_matches(&self, digest: &[u8; 32]) -> bool {
        let diff = self.token_digest.iter().zip(digest).fold(0u8, |acc, (a, b)| acc | (a ^ b));
        std::hint::black_box(diff) == 0
    }

    /// The key an `aion-connector mcp` server of this project presents on the
    /// connector's local socket: HMAC-SHA256(project token, "aion-mcp"), so
    /// the token itself is never written into the project dir.
    pub fn mcp_key(&self) -> String {
        crate::delivery::signing::sha256_hex(self.config.token.0.as_bytes(), &[b"aion-mcp"])
    }

    /// Whether `key` is this project's [`ProjectState::mcp_key`], in constant
    /// time (the length of a key is no secret: it is always 71 bytes).
    pub fn mcp_key_matches(&self, key: &str) -> bool {
        let want = self.mcp_key();
        let (want, key) = (want.as_bytes(), key.as_bytes());
        let mut diff = u8::from(want.len() != key.len());
        for (i, w) in want.iter().enumerate() {
            diff |= w ^ key.get(i).copied().unwrap_or(0);
        }
        std::hint::black_box(diff) == 0
    }

    /// The mapped workspaces, in order, with their absolute paths.
    pub fn workspaces(&self) -> Vec<(String, PathBuf)> {
        let dir = |rel: &str| if rel == "." { self.root.clone() } else { self.root.join(rel) };
        self.mapped().iter().map(|m| (m.name.clone(), dir(&m.dir))).collect()
    }

    /// The real directory of workspace `name`, or of the first mapped one
    /// when `name` is None. Nothing mapped: [`Refusal::NoWorkspace`] (the
    /// baseline's answer, on which platforms sync).
    pub fn workspace(&self, name: Option<&str>) -> Result<PathBuf, Refusal> {
        let rel = {
            let mapped = self.mapped();
            let found = match name {
                None => mapped.first().ok_or(Refusal::NoWorkspace)?,
                Some(n) => mapped.iter().find(|m| m.name == n).ok_or(if mapped.is_empty() {
                    Refusal::NoWorkspace
                } else {
                    Refusal::UnknownWorkspace
                })?,
            };
            found.dir.clone()
        };
        crate::workspace::mapped_dir(&self.root, &rel)
    }

    fn mapped(&self) -> std::sync::MutexGuard<'_, Vec<Mapping>> {
        self.workspaces.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Syncs `specs` one project-wide sync at a time; each repo synced is
    /// mapped under its name (a name synced again keeps its place) and the
    /// mapping is saved. A failed sync maps nothing.
    pub fn sync_all(&self, specs: &[RepoSpec], timeout: Duration) -> Vec<SyncResult> {
        let _one_at_a_time = self.sync_lock.lock().unwrap_or_else(|e| e.into_inner());
        let results: Vec<SyncResult> = specs
            .iter()
            .map(|spec| git::sync(&self.root, spec, self.config.allow_file_urls, timeout))
            .collect();
        let saved = {
            let mut mapped = self.mapped();
            let before = mapped.len();
            let mut changed = false;
            // A clone that exists but could not be updated is still there to
            // work on: mapped too (a failed clone is not).
            for (spec, _) in specs.iter().zip(&results).filter(|(_, r)| r.ok || r.existed) {
                match mapped.iter_mut().find(|m| m.name == spec.name) {
                    Some(m) if m.dir == spec.dir => {}
                    Some(m) => {
                        m.dir = spec.dir.clone();
                        changed = true;
                    }
                    None => mapped.push(Mapping { name: spec.name.clone(), dir: spec.dir.clone() }),
                }
            }
            (changed || mapped.len() != before).then(|| mapped.clone())
        };
        if let Some(list) = saved
            && let Err(e) = save_mapping(&self.mapping_file, &self.config.id, &list)
        {
            warn!(
                "project {}: cannot save the workspace mapping to {}: {e}; it holds until a restart",
                self.config.id,
                self.mapping_file.display()
            );
        }
        results
    }
}

/// `<stateDir>/workspaces/<hash of the project id>.json`: the project id is
/// any text, the file name must not be.
fn mapping_path(state_dir: &Path, project: &str) -> PathBuf {
    let digest = Sha256::digest(project.as_bytes());
    let name: String = digest[..16].iter().map(|b| format!("{b:02x}")).collect();
    state_dir.join("workspaces").join(format!("{name}.json"))
}

#[derive(serde::Serialize, serde::Deserialize)]
struct MappingFile {
    project: String,
    workspaces: Vec<Mapping>,
}

fn load_mapping(path: &Path, project: &str) -> Vec<Mapping> {
    let Ok(text) = std::fs::read_to_string(path) else { return Vec::new() };
    match serde_json::from_str::<MappingFile>(&text) {
        Ok(f) if f.project == project => f
            .workspaces
            .into_iter()
            .filter(|m| m.dir == "." || git::repo_dir(&m.dir, None).as_deref() == Ok(m.dir.as_str()))
            .collect(),
        _ => {
            warn!("project {project}: ignoring an unreadable workspace mapping {}", path.display());
            Vec::new()
        }
    }
}

/// Written to a temp file and renamed: a crash leaves the old or the new file.
fn save_mapping(path: &Path, project: &str, list: &[Mapping]) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let body = MappingFile { project: project.to_string(), workspaces: list.to_vec() };
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::OpenOptions::new().write(true).create(true).truncate(true).mode(0o600).open(&tmp)?;
    f.write_all(serde_json::to_string_pretty(&body).map_err(std::io::Error::other)?.as_bytes())?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)
}

/// The projects of `config`; `roots[i]` is the canonical dir of project i.
/// Each project is denied, on top of its sensitive files, `own_files` (the
/// config, the state dir) and the dirs of other projects nested inside it.
pub fn projects(
    config: &mut Config,
    roots: Vec<PathBuf>,
    own_files: &[PathBuf],
    state_dir: &Path,
) -> Vec<Arc<ProjectState>> {
    let all_roots = roots.clone();
    std::mem::take(&mut config.projects)
        .into_iter()
        .zip(roots)
        .map(|(p, root)| {
            let deny: Vec<PathBuf> = own_files
                .iter()
                .chain(all_roots.iter().filter(|other| **other != root))
                .filter(|d| d.starts_with(&root) && **d != root)
                .cloned()
                .collect();
            let mapping_file = mapping_path(state_dir, &p.id);
            Arc::new(ProjectState {
                token_digest: Sha256::digest(p.token.0.as_bytes()).into(),
                sensitive: Sensitive::new(&p.sensitive).deny_paths(deny),
                workspaces: Mutex::new(load_mapping(&mapping_file, &p.id)),
                mapping_file,
                root,
                config: p,
                sync_lock: Mutex::new(()),
            })
        })
        .collect()
}

/// The projects served now. A reload (SIGHUP) swaps the whole list; a
/// request reads it once ([`ProjectSet::current`], a clone of an `Arc`) and
/// keeps that list to its end, so no lock is held while it is served.
///
/// The versions a reload replaced (a project removed, or its token rotated)
/// are kept as `retired`, one per project id: the runs they started still
/// sign their posts and their agents' MCP servers still present the old key.
pub struct ProjectSet {
    now: Mutex<Arc<Vec<Arc<ProjectState>>>>,
    retired: Mutex<Vec<Arc<ProjectState>>>,
}

impl ProjectSet {
    pub fn new(projects: Vec<Arc<ProjectState>>) -> Arc<ProjectSet> {
        Arc::new(ProjectSet { now: Mutex::new(Arc::new(projects)), retired: Mutex::new(Vec::new()) })
    }

    pub fn current(&self) -> Arc<Vec<Arc<ProjectState>>> {
        Arc::clone(&self.now.lock().unwrap_or_else(|e| e.into_inner()))
    }

    /// The last replaced version of project `id`, if a reload replaced one.
    pub fn retired(&self, id: &str) -> Option<Arc<ProjectState>> {
        self.retired.lock().unwrap_or_else(|e| e.into_inner()).iter().find(|p| p.config.id == id).cloned()
    }

    /// Serves `projects` from now on; the versions no longer served are
    /// kept as retired (the last one per id).
    pub fn replace(&self, projects: Vec<Arc<ProjectState>>) {
        let old =
            std::mem::replace(&mut *self.now.lock().unwrap_or_else(|e| e.into_inner()), Arc::new(projects));
        let now = self.current();
        let mut retired = self.retired.lock().unwrap_or_else(|e| e.into_inner());
        for p in old.iter().filter(|p| !now.iter().any(|n| Arc::ptr_eq(n, p))) {
            retired.retain(|r| r.config.id != p.config.id);
            retired.push(Arc::clone(p));
        }
    }
}

/// Signs push-mode posts with the token of the project they belong to (the
/// token of now: a post queued before a token rotation is signed with the new one).
pub struct ProjectKeys(pub Arc<ProjectSet>);

impl crate::delivery::outbox::Signer for ProjectKeys {
    fn headers(&self, key: &str, _url: &str, body: &[u8]) -> Option<Vec<(String, String)>> {
        let projects = self.0.current();
        let retired;
        let p = match projects.iter().find(|p| p.config.id == key) {
            Some(p) => p,
            None => {
                retired = self.0.retired(key)?;
                &retired
            }
        };
        let sig = crate::delivery::signing::sha256_hex(p.config.token.0.as_bytes(), &[body]);
        Some(vec![("X-Aion-Signature".into(), sig)])
    }
}

/// Creates each project dir if missing and returns the canonical roots.
pub fn prepare_roots(config: &Config) -> Result<Vec<PathBuf>, crate::error::Error> {
    config
        .projects
        .iter()
        .map(|p| {
            let fail = |source| crate::error::Error::ProjectDir {
                project: p.id.clone(),
                path: p.dir.clone(),
                source,
            };
            std::fs::create_dir_all(&p.dir).map_err(fail)?;
            Path::new(&p.dir).canonicalize().map_err(fail)
        })
        .collect()
}
