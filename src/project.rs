//! A project as served: its config, its canonical root, the files it never
//! serves, its token's digest, and the syncs of its repositories (one at a
//! time). Built once at start from the config; shared by the router, the
//! runs and the terminals.

use crate::config::{Config, Project};
use crate::workspace::Sensitive;
use crate::workspace::git::{self, RepoSpec, SyncResult};
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
    /// The first repository this process synced: the default workspace.
    first_synced: Mutex<Option<String>>,
    /// Syncs of one project run one at a time.
    sync_lock: Mutex<()>,
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
    #[expect(dead_code, reason = "seam for the mcp server and .acpxrc.json, being built on branches")]
    pub fn mcp_key(&self) -> String {
        crate::delivery::signing::sha256_hex(self.config.token.0.as_bytes(), &[b"aion-mcp"])
    }

    /// The first repository this process synced: the default workspace.
    pub fn first_synced(&self) -> Option<String> {
        self.first_synced.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Syncs `specs` one project-wide sync at a time; the first repository
    /// synced becomes the default workspace.
    pub fn sync_all(&self, specs: &[RepoSpec], timeout: Duration) -> Vec<SyncResult> {
        let _one_at_a_time = self.sync_lock.lock().unwrap_or_else(|e| e.into_inner());
        let results: Vec<SyncResult> = specs
            .iter()
            .map(|spec| git::sync(&self.root, spec, self.config.allow_file_urls, timeout))
            .collect();
        if let Some(first_ok) = results.iter().find(|r| r.ok) {
            let mut first = self.first_synced.lock().unwrap_or_else(|e| e.into_inner());
            first.get_or_insert_with(|| first_ok.name.clone());
        }
        results
    }
}

/// The projects of `config`; `roots[i]` is the canonical dir of project i.
/// Each project is denied, on top of its sensitive files, `own_files` (the
/// config, the state dir) and the dirs of other projects nested inside it.
pub fn projects(config: &mut Config, roots: Vec<PathBuf>, own_files: &[PathBuf]) -> Vec<Arc<ProjectState>> {
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
            Arc::new(ProjectState {
                token_digest: Sha256::digest(p.token.0.as_bytes()).into(),
                sensitive: Sensitive::new(&p.sensitive).deny_paths(deny),
                root,
                config: p,
                first_synced: Mutex::new(None),
                sync_lock: Mutex::new(()),
            })
        })
        .collect()
}

/// Signs push-mode posts with the token of the project they belong to.
pub struct ProjectKeys(pub Vec<Arc<ProjectState>>);

impl crate::delivery::outbox::Signer for ProjectKeys {
    fn headers(&self, key: &str, _url: &str, body: &[u8]) -> Option<Vec<(String, String)>> {
        let p = self.0.iter().find(|p| p.config.id == key)?;
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
