//! The embedded default: run with no config at all, the connector writes a
//! starter `aion.config.json` (a fresh random token, mode 0600, the agent CLIs
//! found on PATH, bound to 127.0.0.1:7777) and serves it. The token is only in
//! the file: it is never printed.

use crate::error::Error;
use std::ffi::OsStr;
use std::fs::OpenOptions;
use std::io::{Read, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::Path;

/// The agents acpx knows, with the original README's descriptions.
const KNOWN_AGENTS: &[(&str, &str)] = &[
    ("claude", "Claude Code"),
    ("codex", "Codex"),
    ("pi", "Pi"),
    ("opencode", "OpenCode"),
    ("gemini", "Gemini"),
    ("cursor", "Cursor"),
    ("copilot", "Copilot"),
    ("kiro", "Kiro"),
    ("qwen", "Qwen"),
    ("trae", "Trae"),
    ("openclaw", "OpenClaw"),
    ("droid", "Droid"),
    ("kilocode", "Kilocode"),
    ("kimi", "Kimi"),
    ("qoder", "Qoder"),
    ("iflow", "iFlow"),
];

/// Writes the starter config at `path`; fails if a file is already there
/// (create_new), so a config is never overwritten.
pub fn write(path: &Path) -> Result<Vec<&'static str>, Error> {
    let err = |source| Error::StarterWrite { path: path.to_path_buf(), source };
    let token = random_token().map_err(err)?;
    let path_var = std::env::var_os("PATH").unwrap_or_default();
    let agents: Vec<(&str, &str)> =
        KNOWN_AGENTS.iter().copied().filter(|(name, _)| on_path(&path_var, name)).collect();
    let agents_json: serde_json::Map<String, serde_json::Value> = agents
        .iter()
        .map(|(name, desc)| (name.to_string(), serde_json::json!({ "description": desc })))
        .collect();
    let config = serde_json::json!({
        "host": "127.0.0.1",
        "port": 7777,
        "projects": {
            "default": { "token": token, "dir": "./workspace", "agents": agents_json }
        }
    });
    let mut text = serde_json::to_string_pretty(&config).expect("a JSON value serializes");
    text.push('\n');
    let mut file = OpenOptions::new().write(true).create_new(true).mode(0o600).open(path).map_err(err)?;
    // The umask cannot widen 0600, but make it exact whatever the umask is.
    file.set_permissions(std::fs::Permissions::from_mode(0o600)).map_err(err)?;
    file.write_all(text.as_bytes()).map_err(err)?;
    Ok(agents.into_iter().map(|(name, _)| name).collect())
}

/// 32 bytes from the kernel's CSPRNG, hex-encoded.
fn random_token() -> std::io::Result<String> {
    let mut bytes = [0u8; 32];
    std::fs::File::open("/dev/urandom")?.read_exact(&mut bytes)?;
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
}

/// Whether an executable `name` is in one of PATH's directories.
pub fn on_path(path_var: &OsStr, name: &str) -> bool {
    std::env::split_paths(path_var)
        .filter(|dir| !dir.as_os_str().is_empty())
        .map(|dir| dir.join(name))
        .any(|p| p.metadata().is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0))
}
