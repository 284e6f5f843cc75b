//! git.status, git.diff, workspaces and repos.sync against real git.

use std::io::{BufRead, BufReader, Write};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::thread;

use crate::util::*;
use serde_json::{Value, json};

const TOKEN: &str = "tok-git-SECRET";

fn start(tmp: &TempDir, dir: &Path, allow_file_urls: bool) -> Server {
    let project = json!({
        "token": TOKEN,
        "dir": dir.to_str().unwrap(),
        "allowFileUrls": allow_file_urls
    });
    Server::start(tmp.path(), &config(json!({ "p": project }), None))
}

/// Maps each of `names` (existing directories under the project dir, or `.`
/// for the project dir itself) as a workspace, as a platform does with
/// `repos.sync` entries without a url.
fn map(srv: &Server, names: &[&str]) {
    let repos: Vec<Value> = names.iter().map(|n| json!({ "name": n })).collect();
    let (status, v) = srv.call(TOKEN, "repos.sync", json!({ "repos": repos }));
    assert_eq!(status, 200, "{v}");
}

fn sorted_status(v: &Value) -> Vec<(String, String)> {
    let arr = v.as_array().unwrap_or_else(|| panic!("not a bare array: {v}"));
    let mut out: Vec<(String, String)> = arr
        .iter()
        .map(|e| {
            assert_eq!(e.as_object().unwrap().len(), 2, "{e}");
            (e["status"].as_str().unwrap().to_string(), e["path"].as_str().unwrap().to_string())
        })
        .collect();
    out.sort();
    out
}

fn pairs(items: &[(&str, &str)]) -> Vec<(String, String)> {
    let mut v: Vec<(String, String)> = items.iter().map(|(a, b)| (a.to_string(), b.to_string())).collect();
    v.sort();
    v
}

#[test]
fn status_lists_every_kind_of_change() {
    let tmp = TempDir::new("status");
    let root = tmp.join("proj");
    let repo = root.join("repo");
    repo_with(
        &repo,
        &[
            ("mod.txt", "one\n"),
            ("del.txt", "gone soon\n"),
            ("old.txt", "a file that will be renamed\nwith some lines\nof text\n"),
            ("keep.txt", "unchanged\n"),
        ],
    );
    write(repo.join("mod.txt"), "two\n");
    write(repo.join("added.txt"), "added\n");
    git(&repo, &["add", "added.txt"]);
    std::fs::remove_file(repo.join("del.txt")).unwrap();
    git(&repo, &["mv", "old.txt", "new.txt"]);
    write(repo.join("untracked.txt"), "u\n");
    write(repo.join("ud/x.txt"), "x\n");
    write(repo.join("ud/y.txt"), "y\n");
    let srv = start(&tmp, &root, false);
    map(&srv, &["repo"]);

    let (status, v) = srv.call(TOKEN, "git.status", json!({}));
    assert_eq!(status, 200, "{v}");
    assert_eq!(
        sorted_status(&v),
        pairs(&[
            ("M", "mod.txt"),
            ("A", "added.txt"),
            ("D", "del.txt"),
            ("R", "new.txt"),
            ("??", "untracked.txt"),
            ("??", "ud/x.txt"),
            ("??", "ud/y.txt"),
        ]),
        "{v}"
    );
    // staged and then modified again: both letters
    write(repo.join("added.txt"), "added and changed\n");
    let (status, v) = srv.call(TOKEN, "git.status", json!({"workspace": "repo"}));
    assert_eq!(status, 200, "{v}");
    assert!(sorted_status(&v).contains(&("AM".to_string(), "added.txt".to_string())), "{v}");
}

#[test]
fn clean_repo_status_is_empty_array() {
    let tmp = TempDir::new("clean");
    let root = tmp.join("proj");
    repo_with(&root.join("repo"), &[("a.txt", "a\n")]);
    let srv = start(&tmp, &root, false);
    map(&srv, &["repo"]);
    let (status, text) = srv.post(&request_body(TOKEN, "git.status", json!({})));
    assert_eq!(status, 200);
    assert_eq!(text, "[]");
}

#[test]
fn diff_content_sensitive_excluded_and_paths_filter() {
    let tmp = TempDir::new("diff");
    let root = tmp.join("proj");
    let repo = root.join("repo");
    repo_with(&repo, &[("a.txt", "one\n"), ("b.txt", "bee\n"), (".env", "SECRET=1\n")]);
    write(repo.join("a.txt"), "two\n");
    write(repo.join("b.txt"), "staged bee\n");
    git(&repo, &["add", "b.txt"]);
    write(repo.join(".env"), "SECRET=2\n");
    let srv = start(&tmp, &root, false);
    map(&srv, &["repo"]);

    let (status, v) = srv.call(TOKEN, "git.diff", json!({}));
    assert_eq!(status, 200, "{v}");
    let diff = v["diff"].as_str().unwrap_or_else(|| panic!("{v}"));
    assert!(diff.contains("a.txt"), "{diff}");
    assert!(diff.contains("-one\n") && diff.contains("+two\n"), "{diff}");
    assert!(diff.contains("+staged bee\n"), "staged change missing:\n{diff}");
    assert!(!diff.contains(".env"), "sensitive file in diff:\n{diff}");
    assert!(!diff.contains("SECRET"), "sensitive content in diff:\n{diff}");

    let (status, v) = srv.call(TOKEN, "git.diff", json!({"paths": ["a.txt"]}));
    assert_eq!(status, 200, "{v}");
    let diff = v["diff"].as_str().unwrap();
    assert!(diff.contains("+two\n"), "{diff}");
    assert!(!diff.contains("b.txt"), "{diff}");

    let (status, text) = srv.post(&request_body(TOKEN, "git.diff", json!({"paths": [".env"]})));
    assert_eq!(status, 403);
    assert_eq!(text, r#"{"error":"denied"}"#);
    for bad in ["../x", "/etc/passwd", "a/../../x"] {
        let (status, text) = srv.post(&request_body(TOKEN, "git.diff", json!({"paths": [bad]})));
        assert_eq!(status, 403, "{bad}: {text}");
        assert_eq!(text, r#"{"error":"path traversal"}"#, "{bad}");
    }
}

#[test]
fn diff_before_the_first_commit() {
    let tmp = TempDir::new("diff0");
    let root = tmp.join("proj");
    let repo = root.join("repo");
    std::fs::create_dir_all(&repo).unwrap();
    git(&repo, &["init", "-q"]);
    write(repo.join("s.txt"), "staged\n");
    git(&repo, &["add", "s.txt"]);
    write(repo.join("s.txt"), "staged\nthen changed\n");
    let srv = start(&tmp, &root, false);
    map(&srv, &["repo"]);
    let (status, v) = srv.call(TOKEN, "git.diff", json!({}));
    assert_eq!(status, 200, "{v}");
    let diff = v["diff"].as_str().unwrap();
    assert!(diff.contains("s.txt"), "{diff}");
    assert!(diff.contains("+staged\n"), "{diff}");
    assert!(diff.contains("+then changed\n"), "{diff}");
}

#[test]
fn not_a_git_repository_has_no_changes_as_the_original_answers() {
    let tmp = TempDir::new("norepo");
    let root = tmp.join("proj");
    write(root.join("f.txt"), "f");
    let srv = start(&tmp, &root, false);
    map(&srv, &["."]);
    let (status, text) = srv.post(&request_body(TOKEN, "git.status", json!({})));
    assert_eq!((status, text.as_str()), (200, "[]"), "git.status");
    for payload in [json!({}), json!({"paths": ["f.txt"]})] {
        let (status, text) = srv.post(&request_body(TOKEN, "git.diff", payload));
        assert_eq!((status, text.as_str()), (200, r#"{"diff":""}"#), "git.diff");
    }
}

#[test]
fn workspaces_list_and_selection() {
    let tmp = TempDir::new("workspaces");
    let root = tmp.join("proj");
    repo_with(&root.join("zeta"), &[("which.txt", "zeta")]);
    repo_with(&root.join("alpha"), &[("which.txt", "alpha")]);
    write(root.join("notrepo/which.txt"), "notrepo");
    write(root.join("which.txt"), "root");
    let srv = start(&tmp, &root, false);

    // Nothing mapped yet: the baseline's answer, on which platforms sync.
    let (status, v) = srv.call(TOKEN, "workspaces", json!({}));
    assert_eq!((status, v), (200, json!({"list": []})));
    for action in ["files.tree", "git.status", "git.diff"] {
        let (status, text) = srv.post(&request_body(TOKEN, action, json!({})));
        assert_eq!((status, text.as_str()), (404, r#"{"error":"no workspace"}"#), "{action}");
    }
    let (status, text) = srv.post(&request_body(TOKEN, "files.read", json!({"path":"which.txt"})));
    assert_eq!((status, text.as_str()), (404, r#"{"error":"no workspace"}"#));

    // Mapped in the order synced; the first mapped is the default.
    map(&srv, &["zeta", "alpha", "."]);
    let (status, v) = srv.call(TOKEN, "workspaces", json!({}));
    assert_eq!(status, 200, "{v}");
    assert_eq!(
        v,
        json!({"list":[
            {"name":"zeta","path":root.join("zeta").to_str().unwrap()},
            {"name":"alpha","path":root.join("alpha").to_str().unwrap()},
            {"name":".","path":root.to_str().unwrap()}
        ]})
    );
    let (status, v) = srv.call(TOKEN, "files.read", json!({"path":"which.txt"}));
    assert_eq!((status, v["content"].as_str()), (200, Some("zeta")), "{v}");
    for (ws, want) in [("alpha", "alpha"), (".", "root")] {
        let (status, v) = srv.call(TOKEN, "files.read", json!({"workspace": ws, "path":"which.txt"}));
        assert_eq!((status, v["content"].as_str()), (200, Some(want)), "{ws}: {v}");
    }
    // An empty name is no name: the default, as the original falls back.
    let (status, v) = srv.call(TOKEN, "files.read", json!({"workspace": "", "path":"which.txt"}));
    assert_eq!((status, v["content"].as_str()), (200, Some("zeta")), "{v}");
    for ws in ["nope", "notrepo", "../proj", "..", "zeta/.."] {
        let (status, text) =
            srv.post(&request_body(TOKEN, "files.read", json!({"workspace": ws, "path":"which.txt"})));
        assert_eq!(status, 404, "workspace {ws:?}: {text}");
        assert_eq!(text, r#"{"error":"unknown workspace"}"#, "workspace {ws:?}");
    }
    // Without a url only an existing directory can be mapped.
    let (status, v) = srv.call(TOKEN, "repos.sync", json!({"repos": [{"name": "missing"}]}));
    assert_eq!(status, 422, "{v}");
}

#[test]
fn the_mapping_survives_a_restart() {
    let tmp = TempDir::new("wsrestart");
    let root = tmp.join("proj");
    repo_with(&root.join("app"), &[("which.txt", "app")]);
    let srv = start(&tmp, &root, false);
    map(&srv, &["app", "."]);
    drop(srv);
    let srv = start(&tmp, &root, false);
    let (status, v) = srv.call(TOKEN, "workspaces", json!({}));
    assert_eq!(status, 200, "{v}");
    assert_eq!(
        v,
        json!({"list":[
            {"name":"app","path":root.join("app").to_str().unwrap()},
            {"name":".","path":root.to_str().unwrap()}
        ]})
    );
    let (status, v) = srv.call(TOKEN, "files.read", json!({"path":"which.txt"}));
    assert_eq!((status, v["content"].as_str()), (200, Some("app")), "{v}");
}

#[test]
fn symlinked_repo_outside_is_not_a_workspace() {
    let tmp = TempDir::new("wslink");
    let outside = tmp.join("outside-repo");
    repo_with(&outside, &[("outside-secret.txt", "theirs\n")]);
    write(outside.join("outside-secret.txt"), "theirs, modified\n");
    let root = tmp.join("proj");
    repo_with(&root.join("zzz"), &[("mine.txt", "mine\n")]);
    std::os::unix::fs::symlink(&outside, root.join("aaa-link")).unwrap();
    let srv = start(&tmp, &root, false);
    let (status, v) = srv.call(TOKEN, "repos.sync", json!({"repos": [{"name": "aaa-link"}]}));
    assert_eq!(status, 422, "a symlink mapped as a workspace: {v}");
    map(&srv, &["zzz"]);

    let (status, v) = srv.call(TOKEN, "workspaces", json!({}));
    assert_eq!(status, 200, "{v}");
    assert_eq!(v, json!({"list":[{"name":"zzz","path":root.join("zzz").to_str().unwrap()}]}));

    let (status, v) = srv.call(TOKEN, "files.tree", json!({}));
    assert_eq!(status, 200, "{v}");
    assert!(!v.to_string().contains("outside-secret"), "another directory's repo listed: {v}");
    let (status, v) = srv.call(TOKEN, "git.status", json!({}));
    assert_eq!(status, 200, "{v}");
    assert!(!v.to_string().contains("outside-secret"), "another directory's repo: {v}");
    let (status, v) = srv.call(TOKEN, "git.diff", json!({}));
    assert_eq!(status, 200, "{v}");
    assert!(!v.to_string().contains("outside-secret"), "another directory's repo: {v}");

    let (status, v) = srv.call(TOKEN, "files.tree", json!({"workspace":"aaa-link"}));
    assert_eq!(status, 404, "{v}");
    assert_eq!(v, json!({"error":"unknown workspace"}));
}

#[test]
fn sync_never_follows_a_symlinked_target_out_of_the_project() {
    let tmp = TempDir::new("synclink");
    let upstream = tmp.join("upstream");
    repo_with(&upstream, &[("a.txt", "one\n")]);
    let outside = tmp.join("outside-clone");
    git(tmp.path(), &["clone", "-q", upstream.to_str().unwrap(), outside.to_str().unwrap()]);
    write(upstream.join("a.txt"), "two\n");
    git(&upstream, &["commit", "-qam", "two"]);
    let before = git(&outside, &["rev-parse", "HEAD"]);
    let root = tmp.join("proj");
    std::fs::create_dir_all(&root).unwrap();
    // The clone's directory comes from the url: `…/upstream` → `upstream`.
    std::os::unix::fs::symlink(&outside, root.join("upstream")).unwrap();
    let srv = start(&tmp, &root, true);
    let url = format!("file://{}", upstream.display());
    let (status, v) = srv.call(TOKEN, "repos.sync", json!({"repos":[{"name":"repo","url":url}]}));
    assert_eq!(status, 422, "{v}");
    assert_eq!(v["repos"][0]["ok"], false, "{v}");
    assert_eq!(git(&outside, &["rev-parse", "HEAD"]), before, "the outside clone was moved");
}

#[test]
fn diff_over_8_mib_is_truncated() {
    let tmp = TempDir::new("bigdiff");
    let root = tmp.join("proj");
    let repo = root.join("repo");
    repo_with(&repo, &[("big.txt", "")]);
    let line = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcde\n";
    write(repo.join("big.txt"), line.repeat(9 * 1024 * 1024 / line.len() + 1));
    let srv = start(&tmp, &root, false);
    map(&srv, &["repo"]);
    let (status, v) = srv.call(TOKEN, "git.diff", json!({}));
    assert_eq!(status, 200);
    assert_eq!(v["truncated"], true, "no truncated flag");
    let diff = v["diff"].as_str().unwrap();
    assert!(diff.len() <= 8 * 1024 * 1024, "diff is {} bytes", diff.len());
    assert!(diff.len() > 7 * 1024 * 1024, "diff is only {} bytes", diff.len());
    assert!(diff.starts_with("diff --git a/big.txt b/big.txt"), "{:.200}", diff);
}

// ------------------------------------------------------------ repos.sync

struct Upstream {
    work: PathBuf,
    bare: PathBuf,
}

impl Upstream {
    /// A working repo on `branch` with one commit, and a bare clone of it.
    fn new(tmp: &TempDir, name: &str, branch: &str, content: &str) -> Upstream {
        let work = tmp.join(format!("{name}-work"));
        std::fs::create_dir_all(&work).unwrap();
        git(&work, &["init", "-q", "-b", branch]);
        write(work.join("README"), content);
        git(&work, &["add", "-A"]);
        git(&work, &["commit", "-qm", "first"]);
        let bare = tmp.join(format!("{name}.git"));
        git(tmp.path(), &["clone", "-q", "--bare", work.to_str().unwrap(), bare.to_str().unwrap()]);
        Upstream { work, bare }
    }

    fn url(&self) -> String {
        format!("file://{}", self.bare.display())
    }

    /// Commit a change to `file` on the current branch and push it.
    fn commit(&self, file: &str, content: &str) -> String {
        write(self.work.join(file), content);
        git(&self.work, &["add", "-A"]);
        git(&self.work, &["commit", "-qm", "change"]);
        let branch = git(&self.work, &["rev-parse", "--abbrev-ref", "HEAD"]);
        git(&self.work, &["push", "-q", self.bare.to_str().unwrap(), &branch]);
        self.head()
    }

    fn head(&self) -> String {
        git(&self.work, &["rev-parse", "HEAD"])
    }
}

fn sync(srv: &Server, repos: Value) -> (u16, Value) {
    srv.call(TOKEN, "repos.sync", json!({ "repos": repos }))
}

/// A project (file urls allowed) whose repo `r` is a clone of upstream `up`
/// (one commit, README `v1`) at `proj/up`: the upstream, the server and the clone.
fn cloned(tmp: &TempDir) -> (Upstream, Server, PathBuf) {
    let up = Upstream::new(tmp, "up", "main", "v1\n");
    let root = tmp.join("proj");
    let srv = start(tmp, &root, true);
    let (status, v) = sync(&srv, json!([{"name":"r","url":up.url()}]));
    assert_eq!(status, 200, "{v}");
    (up, srv, root.join("up"))
}

fn assert_head(got: &Value, full: &str) {
    let h = got.as_str().unwrap_or_else(|| panic!("head {got}"));
    assert!(h.len() >= 7 && full.starts_with(h), "head {h} vs {full}");
}

#[test]
fn sync_clone_update_unchanged() {
    let tmp = TempDir::new("sync");
    let up = Upstream::new(&tmp, "up", "main", "v1\n");
    let root = tmp.join("proj");
    let srv = start(&tmp, &root, true);
    // The baseline's rule: the clone goes to the url's last segment without
    // `.git` (`…/up.git` → `up`), whatever the name.
    let dest = root.join("up");

    let (status, v) = sync(&srv, json!([{"name":"r","url":up.url()}]));
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["ok"], true);
    let r = &v["repos"][0];
    assert_eq!(v["repos"].as_array().unwrap().len(), 1, "{v}");
    assert_eq!(r["name"], "r");
    assert_eq!(r["ok"], true);
    assert_eq!(r["action"], "cloned");
    assert_eq!(r["branch"], "main");
    assert_eq!(r["path"], dest.to_str().unwrap());
    assert_head(&r["head"], &up.head());
    assert_eq!(std::fs::read_to_string(dest.join("README")).unwrap(), "v1\n");

    let (status, v) = sync(&srv, json!([{"name":"r","url":up.url()}]));
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["repos"][0]["action"], "unchanged", "{v}");

    let new_head = up.commit("README", "v2\n");
    let (status, v) = sync(&srv, json!([{"name":"r","url":up.url()}]));
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["repos"][0]["action"], "updated", "{v}");
    assert_head(&v["repos"][0]["head"], &new_head);
    assert_eq!(git(&dest, &["rev-parse", "HEAD"]), new_head);
    assert_eq!(std::fs::read_to_string(dest.join("README")).unwrap(), "v2\n");

    // the synced repo is now a workspace
    let (status, v) = srv.call(TOKEN, "workspaces", json!({}));
    assert_eq!(status, 200);
    assert_eq!(v, json!({"list":[{"name":"r","path":dest.to_str().unwrap()}]}));
}

#[test]
fn sync_uses_remote_default_branch_or_the_given_one() {
    let tmp = TempDir::new("trunk");
    let up = Upstream::new(&tmp, "up", "trunk", "on trunk\n");
    git(&up.work, &["checkout", "-q", "-b", "dev"]);
    let dev_head = up.commit("README", "on dev\n");
    let root = tmp.join("proj");
    let srv = start(&tmp, &root, true);

    let (status, v) = sync(&srv, json!([{"name":"t","url":up.url()}]));
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["repos"][0]["branch"], "trunk", "{v}");
    assert_eq!(git(&root.join("up"), &["rev-parse", "--abbrev-ref", "HEAD"]), "trunk");
    assert_eq!(std::fs::read_to_string(root.join("up/README")).unwrap(), "on trunk\n");

    let (status, v) = sync(&srv, json!([{"name":"d","url":up.url(),"branch":"dev"}]));
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["repos"][0]["branch"], "dev", "{v}");
    assert_head(&v["repos"][0]["head"], &dev_head);
    // Same url, same directory: the clone is switched to the branch asked for.
    assert_eq!(std::fs::read_to_string(root.join("up/README")).unwrap(), "on dev\n");
}

#[test]
fn sync_default_workspace_is_first_synced() {
    let tmp = TempDir::new("firstsynced");
    let zz = Upstream::new(&tmp, "zz", "main", "zz\n");
    let aa = Upstream::new(&tmp, "aa", "main", "aa\n");
    let root = tmp.join("proj");
    let srv = start(&tmp, &root, true);
    let (status, v) = sync(&srv, json!([{"name":"zz","url":zz.url()},{"name":"aa","url":aa.url()}]));
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["repos"][0]["name"], "zz");
    assert_eq!(v["repos"][1]["name"], "aa");
    let (status, v) = srv.call(TOKEN, "files.read", json!({"path":"README"}));
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["content"], "zz\n");
}

#[test]
fn sync_keeps_local_changes_and_refuses_only_a_fast_forward_over_them() {
    let tmp = TempDir::new("dirty");
    let (up, srv, dest) = cloned(&tmp);
    let root = tmp.join("proj");
    let cloned_head = git(&dest, &["rev-parse", "HEAD"]);

    write(dest.join("README"), "my local edit\n");
    write(dest.join("untracked.txt"), "new\n");
    // Dirty but already at origin's head: nothing to move, so that is fine.
    let (status, v) = sync(&srv, json!([{"name":"r","url":up.url()}]));
    assert_eq!((status, &v["repos"][0]["action"]), (200, &json!("unchanged")), "{v}");
    up.commit("README", "v2\n");
    let (status, v) = sync(&srv, json!([{"name":"r","url":up.url()}]));
    assert_eq!(status, 422, "{v}");
    assert_eq!(v["error"], "sync failed", "{v}");
    let detail = v["detail"].as_str().unwrap_or_else(|| panic!("{v}"));
    assert!(detail.starts_with("r: "), "{detail}");
    assert!(detail.contains("local changes"), "{detail}");
    assert_eq!(v["repos"][0]["name"], "r");
    assert_eq!(v["repos"][0]["ok"], false);
    assert!(v["repos"][0]["error"].as_str().unwrap().contains("local changes"), "{v}");
    assert_eq!(std::fs::read_to_string(dest.join("README")).unwrap(), "my local edit\n");
    assert_eq!(git(&dest, &["rev-parse", "HEAD"]), cloned_head);

    // A dirty clone the connector did not make (the original's, say) is
    // refused the same way but mapped: it is there to work on.
    let other = Upstream::new(&tmp, "other", "main", "o1\n");
    let theirs = root.join("other");
    git(&root, &["clone", "-q", &other.url(), theirs.to_str().unwrap()]);
    write(theirs.join("README"), "their edit\n");
    other.commit("README", "o2\n");
    let (status, v) = sync(&srv, json!([{"name":"o","url":other.url()}]));
    assert_eq!(status, 422, "{v}");
    let (status, v) = srv.call(TOKEN, "files.read", json!({"workspace": "o", "path": "README"}));
    assert_eq!((status, v["content"].as_str()), (200, Some("their edit\n")), "{v}");
}

#[test]
fn sync_refuses_diverged_history() {
    let tmp = TempDir::new("diverged");
    let (up, srv, dest) = cloned(&tmp);

    write(dest.join("local.txt"), "mine\n");
    git(&dest, &["add", "local.txt"]);
    git(&dest, &["commit", "-qm", "local work"]);
    let local_head = git(&dest, &["rev-parse", "HEAD"]);
    up.commit("README", "v2\n");

    let (status, v) = sync(&srv, json!([{"name":"r","url":up.url()}]));
    assert_eq!(status, 422, "{v}");
    assert_eq!(v["error"], "sync failed");
    let detail = v["detail"].as_str().unwrap();
    assert!(detail.contains("diverged from origin/main"), "{detail}");
    assert_eq!(v["repos"][0]["ok"], false);
    assert_eq!(git(&dest, &["rev-parse", "HEAD"]), local_head);
    assert_eq!(std::fs::read_to_string(dest.join("local.txt")).unwrap(), "mine\n");
}

#[test]
fn sync_rejects_dangerous_urls_names_and_branches() {
    let tmp = TempDir::new("badsync");
    let up = Upstream::new(&tmp, "up", "main", "v1\n");
    let root = tmp.join("proj");
    let srv = start(&tmp, &root, true);
    let pwned = tmp.join("pwned");
    let bad = [
        json!({"name":"r","url":"--upload-pack=touch /tmp/x"}),
        json!({"name":"r","url":"-oProxyCommand=touch /tmp/x"}),
        json!({"name":"r","url":format!("ext::sh -c touch% {}", pwned.display())}),
        json!({"name":"r","url":up.url(),"branch":"--upload-pack=x"}),
        json!({"name":"","url":up.url()}),
        json!({"name":"a\nb","url":up.url()}),
        // the directory comes from the url: it must be one plain name
        json!({"name":"r","url":format!("{}/..", up.url())}),
        json!({"name":"r","url":"https://example.com/org/-evil.git"}),
        json!({"name":"r","url":"https://example.com/org/.hidden.git"}),
        json!({"name":"r","url":format!("https://example.com/{}.git", "x".repeat(256))}),
        // without a url the name is the directory
        json!({"name":"../escape"}),
        json!({"name":"a/b"}),
        json!({"name":".."}),
    ];
    for repo in bad {
        let (status, v) = sync(&srv, json!([repo.clone()]));
        assert_eq!(status, 400, "{repo}: {v}");
        assert_eq!(v["error"], "bad payload", "{repo}: {v}");
    }
    assert!(!pwned.exists(), "ext:: url was run");
    assert!(!tmp.join("escape").exists());
    assert!(!root.join("a").exists());
}

#[test]
fn sync_refuses_local_urls_without_allow_file_urls() {
    let tmp = TempDir::new("nofile");
    let up = Upstream::new(&tmp, "up", "main", "v1\n");
    let root = tmp.join("proj");
    let srv = start(&tmp, &root, false);
    for url in [up.url(), up.bare.to_str().unwrap().to_string()] {
        let (status, v) = sync(&srv, json!([{"name":"r","url":url}]));
        assert!((400..500).contains(&status), "{url}: {status} {v}");
        assert!(!root.join("up/README").exists(), "{url} was cloned");
    }
}

/// A fake HTTP git server that records request heads and answers 404.
fn fake_http_git() -> (String, Arc<Mutex<String>>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let seen = Arc::new(Mutex::new(String::new()));
    let seen2 = seen.clone();
    thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut conn) = conn else { return };
            let mut r = BufReader::new(conn.try_clone().unwrap());
            loop {
                let mut line = String::new();
                if r.read_line(&mut line).unwrap_or(0) == 0 || line == "\r\n" {
                    break;
                }
                seen2.lock().unwrap().push_str(&line);
            }
            let _ =
                conn.write_all(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n");
        }
    });
    (addr, seen)
}

#[test]
fn sync_repo_token_never_leaks() {
    const REPO_TOKEN: &str = "tok-SECRET-123";
    let tmp = TempDir::new("repotoken");
    let up = Upstream::new(&tmp, "up", "main", "v1\n");
    let root = tmp.join("proj");
    let srv = start(&tmp, &root, true);

    let (status, v) = sync(&srv, json!([{"name":"r","url":up.url(),"token":REPO_TOKEN}]));
    assert_eq!(status, 200, "{v}");
    assert!(!v.to_string().contains(REPO_TOKEN), "{v}");
    let cfg = std::fs::read_to_string(root.join("up/.git/config")).unwrap();
    assert!(!cfg.contains(REPO_TOKEN), "{cfg}");

    // over HTTP the token is sent, but never in the URL, the answer or the config
    let (addr, seen) = fake_http_git();
    let (status, v) =
        sync(&srv, json!([{"name":"h","url":format!("http://{addr}/org/repo.git"),"token":REPO_TOKEN}]));
    assert_eq!(status, 422, "{v}");
    assert!(!v.to_string().contains(REPO_TOKEN), "{v}");
    let requests = seen.lock().unwrap().clone();
    assert!(!requests.is_empty(), "git never reached the fake server");
    for line in requests.lines().filter(|l| l.starts_with("GET ") || l.starts_with("POST ")) {
        assert!(!line.contains(REPO_TOKEN), "token in the request line: {line}");
    }
    if let Ok(cfg) = std::fs::read_to_string(root.join("repo/.git/config")) {
        assert!(!cfg.contains(REPO_TOKEN), "{cfg}");
    }

    let err = srv.wait_stderr("the repos.sync log lines", |s| {
        s.lines().filter(|l| l.contains("repos.sync")).count() >= 2
    });
    assert!(!err.contains(REPO_TOKEN), "{err}");
    assert!(!err.contains(TOKEN), "{err}");
}

#[test]
fn a_clone_the_node_connector_made_is_reused() {
    let tmp = TempDir::new("migrate");
    let up = Upstream::new(&tmp, "app", "main", "v1\n");
    let root = tmp.join("proj");
    // The original cloned into the url's last segment with the token in the
    // origin url (https only; a file url stands in for it here).
    std::fs::create_dir_all(&root).unwrap();
    git(&root, &["clone", "-q", up.bare.to_str().unwrap(), "app"]);
    git(&root.join("app"), &["remote", "set-url", "origin", &format!("{}?tok-OLD", up.url())]);
    let new_head = up.commit("README", "v2\n");
    let srv = start(&tmp, &root, true);
    let (status, v) = sync(&srv, json!([{"name":"my-app","url":up.url()}]));
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["repos"][0]["action"], "updated", "not reused: {v}");
    assert_eq!(git(&root.join("app"), &["rev-parse", "HEAD"]), new_head);
    assert_eq!(git(&root.join("app"), &["remote", "get-url", "origin"]), up.url());
    let (status, v) = srv.call(TOKEN, "workspaces", json!({}));
    assert_eq!(status, 200);
    assert_eq!(v, json!({"list":[{"name":"my-app","path":root.join("app").to_str().unwrap()}]}));
}

/// `https://user:PASS@host/…` is cloned for real from a smart-HTTP server
/// that requires those credentials, through a `git` first on the
/// connector's PATH that records its argv (and the names of its
/// environment): the password is in no argv, not in `.git/config` (mode
/// 600), not in the answer and not in the log.
#[test]
fn credentials_in_a_repo_url_travel_like_a_token() {
    use std::os::unix::fs::PermissionsExt;
    const PASS: &str = "PASS-in-url-SECRET";
    let tmp = TempDir::new("urlcreds");
    let up = Upstream::new(&tmp, "up", "main", "v1\n");
    let served = tmp.join("served");
    std::fs::create_dir_all(served.join("org")).unwrap();
    std::fs::rename(&up.bare, served.join("org/app.git")).unwrap();
    let http = GitHttp::start(&served, "alice", PASS);
    // the recording git, first on the connector's PATH
    let real = String::from_utf8(
        std::process::Command::new("sh").args(["-c", "command -v git"]).output().unwrap().stdout,
    )
    .unwrap()
    .trim()
    .to_string();
    let bin = tmp.join("bin");
    std::fs::create_dir_all(&bin).unwrap();
    let record = tmp.join("git-calls.log");
    let wrapper = format!(
        "#!/bin/sh\n{{ printf 'argv:'; for a in \"$@\"; do printf ' [%s]' \"$a\"; done; echo; \
         printf 'env:'; env | sed -n 's/^\\([A-Za-z_][A-Za-z0-9_]*\\)=.*/ \\1/p' | tr -d '\\n'; echo; }} >> '{}'\n\
         exec '{real}' \"$@\"\n",
        record.display()
    );
    write(bin.join("git"), wrapper);
    std::fs::set_permissions(bin.join("git"), std::fs::Permissions::from_mode(0o755)).unwrap();
    let path = format!("{}:{}", bin.display(), std::env::var("PATH").unwrap_or_default());

    let root = tmp.join("proj");
    std::fs::create_dir_all(&root).unwrap();
    let project = json!({"token": TOKEN, "dir": root.to_str().unwrap()});
    let cfg_path = tmp.join("aion.config.json");
    std::fs::write(&cfg_path, config(json!({ "p": project }), None)).unwrap();
    let srv = Server::start_args(&[cfg_path.to_str().unwrap()], tmp.path(), &[("PATH", &path)]);

    let url = format!("http://alice:{PASS}@{}/org/app.git", http.addr);
    let (status, v) = sync(&srv, json!([{"name":"app","url":url}]));
    let seen = http.seen.lock().unwrap().clone();
    assert_eq!(status, 200, "{v}; server saw {seen:#?}");
    assert!(!v.to_string().contains(PASS), "{v}");
    assert_eq!(std::fs::read_to_string(root.join("app/README")).unwrap(), "v1\n");
    assert!(seen.iter().any(|l| l.ends_with("-> 200")), "no authenticated request: {seen:#?}");

    let calls = std::fs::read_to_string(&record).unwrap_or_default();
    assert!(
        calls.lines().any(|l| l.starts_with("argv: [clone]")),
        "the connector's git is not the recording one:\n{calls}"
    );
    assert!(!calls.contains(PASS), "the password in git's argv:\n{calls}");
    assert!(!calls.contains("alice"), "the URL's userinfo in git's argv:\n{calls}");
    // (they travel as a header in git's environment, as a `token` does)
    assert!(calls.contains(" GIT_CONFIG_VALUE_"), "no credentials in git's environment:\n{calls}");
    let cfg_file = root.join("app/.git/config");
    let cfg = std::fs::read_to_string(&cfg_file).unwrap();
    assert!(!cfg.contains(PASS) && !cfg.contains("alice"), "{cfg}");
    let mode = std::fs::metadata(&cfg_file).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600, "{mode:o}");
    let err = srv.wait_stderr("the repos.sync log line", |s| s.contains("repos.sync"));
    assert!(!err.contains(PASS), "{err}");
}

#[test]
fn a_clone_s_git_config_is_owner_only() {
    use std::os::unix::fs::PermissionsExt;
    let tmp = TempDir::new("cfgmode");
    let (_up, _srv, dest) = cloned(&tmp);
    let mode = std::fs::metadata(dest.join(".git/config")).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600, "{mode:o}");
}
