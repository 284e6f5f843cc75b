//! `DIR/.acpxrc.json`, written before an acpx run: acpx's project config,
//! whose `mcpServers` list gets the connector's own MCP server, `aion`
//! (`aion-connector mcp`), with what it needs to reach the platform and the
//! connector. Other servers and other keys of an existing file are kept, in
//! their order; a file that is not a JSON object is left alone (logged).
//! Written atomically (a temporary file renamed over it), mode 0600: it holds
//! the invoke token. In a git repository it is listed in `.git/info/exclude`.

use crate::config::Json as J;
use crate::workspace::git;
use std::fs::OpenOptions;
use std::io::{Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::sync::Mutex;
use std::time::Duration;

pub const FILE: &str = ".acpxrc.json";
/// The pattern added to `.git/info/exclude` (the file and its temporary twins).
const EXCLUDE: &str = "/.acpxrc.json*";
/// A larger existing file is not read (nor replaced).
const READ_CAP: u64 = 1 << 20;

/// Two runs of a project may write at once: one writer at a time.
static WRITING: Mutex<()> = Mutex::new(());

/// The `aion` server's environment, in this order.
pub struct Mcp<'a> {
    /// The connector's own binary (absolute).
    pub command: &'a Path,
    pub callback: &'a str,
    pub token: &'a str,
    pub session: &'a str,
    pub project: &'a str,
    /// The connector's local socket for its MCP servers (absolute).
    pub socket: &'a Path,
    pub key: &'a str,
}

impl Mcp<'_> {
    fn entry(&self) -> J {
        let pair = |name: &str, value: &str| {
            J::Obj(vec![("name".into(), J::Str(name.into())), ("value".into(), J::Str(value.into()))])
        };
        J::Obj(vec![
            ("name".into(), J::Str("aion".into())),
            ("command".into(), J::Str(self.command.display().to_string())),
            ("args".into(), J::Arr(vec![J::Str("mcp".into())])),
            (
                "env".into(),
                J::Arr(vec![
                    pair("AION_CALLBACK", self.callback),
                    pair("AION_TOKEN", self.token),
                    pair("AION_SESSION_ID", self.session),
                    pair("AION_PROJECT", self.project),
                    pair("AION_CONNECTOR_SOCKET", &self.socket.display().to_string()),
                    pair("AION_MCP_KEY", self.key),
                ]),
            ),
        ])
    }
}

/// Writes (or updates) `dir/.acpxrc.json`; Err says why it was left alone.
pub fn write(dir: &Path, mcp: &Mcp<'_>, git_timeout: Duration) -> Result<(), String> {
    let _one_writer = WRITING.lock().unwrap_or_else(|p| p.into_inner());
    let path = dir.join(FILE);
    let mut doc = match read(&path)? {
        None => J::Obj(vec![("mcpServers".into(), J::Arr(Vec::new()))]),
        Some(text) => match serde_json::from_str::<J>(&text) {
            Ok(doc @ J::Obj(_)) => doc,
            Ok(_) => return Err(format!("{FILE} is not a JSON object; left as it is")),
            Err(e) => return Err(format!("{FILE} is not valid JSON ({e}); left as it is")),
        },
    };
    merge(&mut doc, mcp.entry());
    let text = serde_json::to_string_pretty(&doc).expect("JSON serializes");
    let tmp = dir.join(format!("{FILE}.{}-{:x}.tmp", std::process::id(), crate::nonce::nonce()));
    let written = (|| {
        let mut f = OpenOptions::new().write(true).create_new(true).mode(0o600).open(&tmp)?;
        f.write_all(text.as_bytes())?;
        std::fs::rename(&tmp, &path)
    })();
    if let Err(e) = written {
        let _ = std::fs::remove_file(&tmp);
        return Err(format!("cannot write {FILE}: {e}"));
    }
    if dir.join(".git").exists() {
        git::exclude(dir, EXCLUDE, git_timeout)
            .map_err(|e| format!("cannot add {FILE} to .git/info/exclude: {e}"))?;
    }
    Ok(())
}

/// The file's text; None when there is none. A symlink or an oversized file is refused.
fn read(path: &Path) -> Result<Option<String>, String> {
    let file = OpenOptions::new().read(true).custom_flags(nix::libc::O_NOFOLLOW).open(path);
    let file = match file {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) if e.raw_os_error() == Some(nix::libc::ELOOP) => {
            return Err(format!("{FILE} is a symlink; left as it is"));
        }
        Err(e) => return Err(format!("cannot read {FILE}: {e}")),
    };
    let mut text = String::new();
    file.take(READ_CAP + 1).read_to_string(&mut text).map_err(|e| format!("cannot read {FILE}: {e}"))?;
    if text.len() as u64 > READ_CAP {
        return Err(format!("{FILE} is larger than {READ_CAP} bytes; left as it is"));
    }
    Ok(Some(text))
}

/// Puts `entry` in `mcpServers` (made a list if it is not one): in place of
/// the first server named `aion`, else at the end.
fn merge(doc: &mut J, entry: J) {
    let J::Obj(fields) = doc else { return };
    let servers = match fields.iter_mut().find(|(k, _)| k == "mcpServers") {
        Some((_, v)) => v,
        None => {
            fields.push(("mcpServers".into(), J::Arr(Vec::new())));
            &mut fields.last_mut().expect("just pushed").1
        }
    };
    if !matches!(servers, J::Arr(_)) {
        *servers = J::Arr(Vec::new());
    }
    let J::Arr(list) = servers else { unreachable!("made a list above") };
    let named_aion =
        |v: &J| matches!(v, J::Obj(f) if f.iter().any(|(k, v)| k == "name" && *v == J::Str("aion".into())));
    match list.iter_mut().find(|v| named_aion(v)) {
        Some(slot) => *slot = entry,
        None => list.push(entry),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mcp<'a>(exe: &'a Path, socket: &'a Path) -> Mcp<'a> {
        Mcp {
            command: exe,
            callback: "http://cb",
            token: "tok",
            session: "s1",
            project: "p",
            socket,
            key: "k",
        }
    }

    #[test]
    fn merges_in_place_keeping_order_and_other_servers() {
        let (exe, sock) = (Path::new("/bin/aion-connector"), Path::new("/state/mcp.sock"));
        let mut doc: J = serde_json::from_str(
            r#"{"z":1,"mcpServers":[{"name":"other","command":"x"},{"name":"aion","command":"old"},{"name":"aion"}],"a":[1.5,null,true]}"#,
        )
        .unwrap();
        merge(&mut doc, mcp(exe, sock).entry());
        let text = serde_json::to_string(&doc).unwrap();
        assert_eq!(
            text,
            r#"{"z":1,"mcpServers":[{"name":"other","command":"x"},{"name":"aion","command":"/bin/aion-connector","args":["mcp"],"env":[{"name":"AION_CALLBACK","value":"http://cb"},{"name":"AION_TOKEN","value":"tok"},{"name":"AION_SESSION_ID","value":"s1"},{"name":"AION_PROJECT","value":"p"},{"name":"AION_CONNECTOR_SOCKET","value":"/state/mcp.sock"},{"name":"AION_MCP_KEY","value":"k"}]},{"name":"aion"}],"a":[1.5,null,true]}"#
        );
        // mcpServers that is not a list becomes one; a missing one is added.
        let mut doc: J = serde_json::from_str(r#"{"mcpServers":{"x":1}}"#).unwrap();
        merge(&mut doc, J::Null);
        assert_eq!(serde_json::to_string(&doc).unwrap(), r#"{"mcpServers":[null]}"#);
        let mut doc: J = serde_json::from_str(r#"{"k":"v"}"#).unwrap();
        merge(&mut doc, J::Null);
        assert_eq!(serde_json::to_string(&doc).unwrap(), r#"{"k":"v","mcpServers":[null]}"#);
    }
}
