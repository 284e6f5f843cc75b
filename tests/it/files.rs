//! files.tree and files.read: shapes, order, sensitive files, path traversal.

use std::os::unix::fs::symlink;

use crate::util::*;
use serde_json::{Value, json};

const TOKEN: &str = "tok-files-SECRET";

fn start(tmp: &TempDir, dir: &std::path::Path, sensitive: Option<Value>) -> Server {
    let mut project = json!({"token": TOKEN, "dir": dir.to_str().unwrap()});
    if let Some(s) = sensitive {
        project["sensitive"] = s;
    }
    let srv = Server::start(tmp.path(), &config(json!({ "p": project }), None));
    map_project_dir(&srv, TOKEN);
    srv
}

/// `{"name":"."}` maps the project dir itself as the workspace (the baseline's
/// way to serve a dir that is not a cloned repo).
fn map_project_dir(srv: &Server, token: &str) {
    let (status, v) = srv.call(token, "repos.sync", json!({"repos": [{"name": "."}]}));
    assert_eq!(status, 200, "{v}");
}

fn file(name: &str, path: &str) -> Value {
    json!({"name": name, "type": "file", "path": path})
}

fn dir(name: &str, path: &str, children: Vec<Value>) -> Value {
    json!({"name": name, "type": "dir", "path": path, "children": children})
}

/// The same small tree, written into `root`.
fn populate(root: &std::path::Path) {
    write(root.join("b.txt"), "b");
    write(root.join("a.txt"), "a");
    write(root.join("readme.md"), "# hi");
    write(root.join(".envrc"), "use nix");
    write(root.join("src/main.rs"), "fn main() {}");
    write(root.join("src/lib/mod.rs"), "");
    write(root.join("sub/ok.txt"), "ok");
    // sensitive, left out of the tree
    write(root.join(".env"), "SECRET=1");
    write(root.join("sub/.env"), "SECRET=2");
    write(root.join("key.pem"), "-----BEGIN");
}

fn expected_tree() -> Value {
    json!([
        dir(
            "src",
            "src",
            vec![
                dir("lib", "src/lib", vec![file("mod.rs", "src/lib/mod.rs")]),
                file("main.rs", "src/main.rs"),
            ]
        ),
        dir("sub", "sub", vec![file("ok.txt", "sub/ok.txt")]),
        file(".envrc", ".envrc"),
        file("a.txt", "a.txt"),
        file("b.txt", "b.txt"),
        file("readme.md", "readme.md"),
    ])
}

#[test]
fn tree_plain_dir() {
    let tmp = TempDir::new("tree-plain");
    let root = tmp.join("proj");
    populate(&root);
    let srv = start(&tmp, &root, None);
    let (status, v) = srv.call(TOKEN, "files.tree", json!({}));
    assert_eq!(status, 200, "{v}");
    assert_eq!(v, json!({"tree": expected_tree(), "root": "."}));
}

#[test]
fn tree_git_repo_uses_tracked_and_untracked_not_ignored() {
    let tmp = TempDir::new("tree-git");
    let root = tmp.join("proj");
    let repo = root.join("repo");
    populate(&repo);
    repo_with(&repo, &[(".gitignore", "*.log\n")]);
    // untracked but not ignored: listed; ignored: not listed
    write(repo.join("new.txt"), "new");
    write(repo.join("build.log"), "noise");
    let project = json!({"token": TOKEN, "dir": root.to_str().unwrap()});
    let srv = Server::start(tmp.path(), &config(json!({ "p": project }), None));
    let (status, v) = srv.call(TOKEN, "repos.sync", json!({"repos": [{"name": "repo"}]}));
    assert_eq!(status, 200, "{v}");

    let mut want = expected_tree();
    let files = want.as_array_mut().unwrap();
    files.insert(3, file(".gitignore", ".gitignore"));
    files.insert(6, file("new.txt", "new.txt"));
    let want = json!({"tree": want, "root": "."});

    // named workspace, and the default (the first workspace)
    let (status, v) = srv.call(TOKEN, "files.tree", json!({"workspace": "repo"}));
    assert_eq!(status, 200, "{v}");
    assert_eq!(v, want);
    let (status, v) = srv.call(TOKEN, "files.tree", json!({}));
    assert_eq!(status, 200, "{v}");
    assert_eq!(v, want);
}

#[test]
fn tree_of_a_subdirectory() {
    let tmp = TempDir::new("tree-sub");
    let root = tmp.join("proj");
    populate(&root);
    let srv = start(&tmp, &root, None);
    let (status, v) = srv.call(TOKEN, "files.tree", json!({"path": "src"}));
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["root"], "src", "{v}");
    let paths = tree_paths(&v["tree"]);
    assert!(paths.contains(&"src/main.rs".to_string()), "{v}");
    assert!(paths.contains(&"src/lib/mod.rs".to_string()), "{v}");
    assert!(!paths.iter().any(|p| p.ends_with("a.txt")), "{v}");
    // and a tree path outside is refused
    let (status, v) = srv.call(TOKEN, "files.tree", json!({"path": "../"}));
    assert_eq!(status, 403, "{v}");
    assert_eq!(v, json!({"error":"path traversal"}));
}

#[test]
fn tree_plain_dir_does_not_follow_symlinked_dirs() {
    let tmp = TempDir::new("tree-skip");
    let root = tmp.join("proj");
    write(root.join("f.txt"), "f");
    write(tmp.join("elsewhere/deep.txt"), "outside");
    symlink(tmp.join("elsewhere"), root.join("linked")).unwrap();
    let srv = start(&tmp, &root, None);
    let (status, v) = srv.call(TOKEN, "files.tree", json!({}));
    assert_eq!(status, 200, "{v}");
    let paths = tree_paths(&v["tree"]);
    assert!(paths.contains(&"f.txt".to_string()), "{v}");
    assert!(!paths.iter().any(|p| p.contains("deep.txt")), "{v}");
}

#[test]
fn read_text_binary_large_missing_dir() {
    let tmp = TempDir::new("read");
    let root = tmp.join("proj");
    write(root.join("hello.txt"), "hello\nworld\n");
    write(root.join("sub/inner.txt"), "inner");
    write(root.join("bin.dat"), [0xffu8, 0xfe, 0x00, 0x80]);
    write(root.join("exact.txt"), vec![b'x'; 1_000_000]);
    write(root.join("big.txt"), vec![b'y'; 1_000_001]);
    symlink("hello.txt", root.join("ok-link")).unwrap();
    let srv = start(&tmp, &root, None);

    let (status, v) = srv.call(TOKEN, "files.read", json!({"path": "hello.txt"}));
    assert_eq!(status, 200, "{v}");
    assert_eq!(v, json!({"path":"hello.txt","content":"hello\nworld\n","size":12,"binary":false}));

    let (status, v) = srv.call(TOKEN, "files.read", json!({"path": "sub/inner.txt"}));
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["content"], "inner");
    assert_eq!(v["path"], "sub/inner.txt");

    let (status, v) = srv.call(TOKEN, "files.read", json!({"path": "bin.dat"}));
    assert_eq!(status, 200, "{v}");
    assert_eq!(v, json!({"path":"bin.dat","size":4,"binary":true}));

    let (status, v) = srv.call(TOKEN, "files.read", json!({"path": "exact.txt"}));
    assert_eq!(status, 200);
    assert_eq!(v["binary"], false);
    assert_eq!(v["size"], 1_000_000);
    assert_eq!(v["content"].as_str().map(str::len), Some(1_000_000));

    let (status, v) = srv.call(TOKEN, "files.read", json!({"path": "big.txt"}));
    assert_eq!(status, 200, "{v}");
    assert_eq!(v, json!({"path":"big.txt","size":1_000_001,"binary":true,"truncated":true}));

    // a symlink that stays inside is followed
    let (status, v) = srv.call(TOKEN, "files.read", json!({"path": "ok-link"}));
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["content"], "hello\nworld\n");

    let (status, v) = srv.call(TOKEN, "files.read", json!({"path": "nope.txt"}));
    assert_eq!(status, 404, "{v}");
    assert_eq!(v, json!({"error":"not found"}));

    let (status, v) = srv.call(TOKEN, "files.read", json!({"path": "sub"}));
    assert_eq!(status, 400, "{v}");
    assert_eq!(v, json!({"error":"not a file"}));

    let (status, v) = srv.call(TOKEN, "files.read", json!({}));
    assert_eq!(status, 400, "{v}");
    assert_eq!(v, json!({"error":"bad payload","detail":"payload.path is required"}));
}

#[test]
fn read_path_traversal() {
    let tmp = TempDir::new("traversal");
    let root = tmp.join("proj");
    write(root.join("hello.txt"), "hello");
    std::fs::create_dir_all(root.join("a")).unwrap();
    write(tmp.join("outside.txt"), "OUTSIDE-CONTENT");
    write(tmp.join("proj-evil/f"), "EVIL-CONTENT");
    symlink(tmp.join("outside.txt"), root.join("out-link")).unwrap();
    symlink("../outside.txt", root.join("out-rel-link")).unwrap();
    symlink("../proj-evil", root.join("evil-rel")).unwrap();
    symlink(tmp.join("proj-evil"), root.join("evil-abs")).unwrap();
    symlink(tmp.path(), root.join("a/up")).unwrap();
    let srv = start(&tmp, &root, None);

    let abs_inside = root.join("hello.txt");
    let cases = [
        "/etc/passwd".to_string(),
        tmp.join("outside.txt").to_str().unwrap().to_string(),
        abs_inside.to_str().unwrap().to_string(),
        "../outside.txt".to_string(),
        "a/../../outside.txt".to_string(),
        "hello.txt\0".to_string(),
        "hel\0lo.txt".to_string(),
        "out-link".to_string(),
        "out-rel-link".to_string(),
        "evil-rel/f".to_string(),
        "evil-abs/f".to_string(),
        "a/up/outside.txt".to_string(),
        "../proj-evil/f".to_string(),
        // Missing files behind a symlink that leads out: no probing outside.
        "evil-abs/no-such-file".to_string(),
        "a/up/no-such-dir/x".to_string(),
    ];
    for path in &cases {
        let (status, text) = srv.post(&request_body(TOKEN, "files.read", json!({"path": path})));
        assert_eq!(status, 403, "path {path:?}: {text}");
        assert_eq!(text, r#"{"error":"path traversal"}"#, "path {path:?}");
        assert!(!text.contains("CONTENT"));
    }
}

#[test]
fn impossible_names_are_4xx_not_server_errors() {
    let tmp = TempDir::new("longname");
    let root = tmp.join("proj");
    write(root.join("hello.txt"), "hello");
    let srv = start(&tmp, &root, None);
    let long = "x".repeat(256);
    for (path, want) in [
        (long.clone(), 400),
        (format!("a/{long}/b"), 400),
        ("y/".repeat(2100), 400),
        ("hello.txt/inside".to_string(), 404),
    ] {
        for action in ["files.read", "files.tree"] {
            let (status, text) = srv.post(&request_body(TOKEN, action, json!({"path": path})));
            assert_eq!(status, want, "{action} {:.40}: {text}", path);
        }
    }
}

#[test]
fn read_sensitive_denied_and_lookalikes_readable() {
    let tmp = TempDir::new("sensitive");
    let root = tmp.join("proj");
    std::fs::create_dir_all(&root).unwrap();
    git(&root, &["init", "-q"]);
    let denied = [
        ".env",
        ".env.local",
        ".ENV",
        "sub/.env",
        "key.pem",
        "CERT.PEM",
        "server.key",
        "my-credentials.json",
        "conf/aws_credentials",
        ".secret",
        "app.secret",
        "id_rsa",
        "id_ed25519",
        "id_ecdsa_sk",
        "data.sqlite",
        "private/notes.md",
        "a/private/b.txt",
    ];
    for p in denied {
        write(root.join(p), format!("SECRET-CONTENT of {p}"));
    }
    symlink(".env", root.join("notes.txt")).unwrap();
    let readable = [".github/workflows/ci.yml", ".envrc", "id_rsa.pub", "environment.txt"];
    for p in readable {
        write(root.join(p), format!("fine {p}"));
    }
    let srv = start(&tmp, &root, Some(json!(["*.sqlite", "private"])));

    let mut all_denied: Vec<&str> = denied.to_vec();
    all_denied.extend([".git/config", ".git/HEAD", "notes.txt"]);
    for p in &all_denied {
        let (status, text) = srv.post(&request_body(TOKEN, "files.read", json!({"path": p})));
        assert_eq!(status, 403, "path {p:?}: {text}");
        assert_eq!(text, r#"{"error":"denied"}"#, "path {p:?}");
    }
    for p in readable {
        let (status, v) = srv.call(TOKEN, "files.read", json!({"path": p}));
        assert_eq!(status, 200, "{p}: {v}");
        assert_eq!(v["content"], format!("fine {p}"));
    }

    // the tree leaves sensitive files out and keeps the lookalikes
    let (status, v) = srv.call(TOKEN, "files.tree", json!({}));
    assert_eq!(status, 200, "{v}");
    let paths = tree_paths(&v["tree"]);
    for p in denied {
        assert!(!paths.contains(&p.to_string()), "{p} listed: {paths:?}");
    }
    assert!(!paths.iter().any(|p| p.starts_with(".git/")), "{paths:?}");
    for p in readable {
        assert!(paths.contains(&p.to_string()), "{p} not listed: {paths:?}");
    }
    assert!(!v.to_string().contains("SECRET-CONTENT"));
}

#[test]
fn the_connectors_own_files_and_nested_projects_are_never_served() {
    let tmp = TempDir::new("ownfiles");
    write(tmp.join("notes.txt"), "fine");
    write(tmp.join("b/secret-plan.txt"), "project b's");
    let projects = json!({
        "a": {"token": "tok-a-0123456789", "dir": "."},
        "b": {"token": "tok-b-0123456789", "dir": "./b"}
    });
    let srv = Server::start(tmp.path(), &config(projects, Some(json!({"stateDir": "./state"}))));
    map_project_dir(&srv, "tok-a-0123456789");
    map_project_dir(&srv, "tok-b-0123456789");
    let (status, v) = srv.call("tok-a-0123456789", "files.read", json!({"path": "notes.txt"}));
    assert_eq!((status, v["content"].as_str()), (200, Some("fine")), "{v}");
    for path in ["aion.config.json", "b/secret-plan.txt", "state/outbox/.lock"] {
        let (status, text) = srv.post(&request_body("tok-a-0123456789", "files.read", json!({"path": path})));
        assert_eq!((status, text.as_str()), (403, r#"{"error":"denied"}"#), "{path}");
    }
    let (status, v) = srv.call("tok-a-0123456789", "files.tree", json!({}));
    assert_eq!(status, 200, "{v}");
    let listed = tree_paths(&v["tree"]);
    assert!(listed.contains(&"notes.txt".to_string()), "{listed:?}");
    for hidden in ["aion.config.json", "b", "b/secret-plan.txt", "state"] {
        assert!(!listed.contains(&hidden.to_string()), "{hidden} listed: {listed:?}");
    }
    // Project b still sees its own files.
    let (status, v) = srv.call("tok-b-0123456789", "files.read", json!({"path": "secret-plan.txt"}));
    assert_eq!((status, v["content"].as_str()), (200, Some("project b's")), "{v}");
}
