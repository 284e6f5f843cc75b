//! The systemd unit (install.sh's `/etc/systemd/system/aion-connector.service`
//! by default): its `User=` exists and owns the config and the state dir.
//! The unit and its drop-ins (`FILE.d/*.conf`, in name order) are read as
//! systemd does for the three keys used: the last setting wins.

use super::Finding;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

pub struct Unit {
    pub path: PathBuf,
    /// `User=`; None: root.
    pub user: Option<String>,
    /// The config named on `ExecStart=` (the first argument not an option).
    pub config: Option<PathBuf>,
    /// `StateDirectory=`'s first entry (relative to /var/lib).
    pub state_directory: Option<String>,
}

impl Unit {
    /// None when `path` does not exist or cannot be read.
    pub fn read(path: &Path) -> Option<Unit> {
        let main = std::fs::read_to_string(path).ok()?;
        let mut unit = Unit { path: path.to_path_buf(), user: None, config: None, state_directory: None };
        unit.apply(&main);
        let mut dropins: Vec<PathBuf> = std::fs::read_dir(format!("{}.d", path.display()))
            .map(|d| d.filter_map(Result::ok).map(|e| e.path()).collect())
            .unwrap_or_default();
        dropins.retain(|p| p.extension().is_some_and(|e| e == "conf"));
        dropins.sort();
        for d in dropins {
            if let Ok(text) = std::fs::read_to_string(&d) {
                unit.apply(&text);
            }
        }
        Some(unit)
    }

    fn apply(&mut self, text: &str) {
        let mut in_service = false;
        for line in text.lines().map(str::trim) {
            if line.starts_with('[') {
                in_service = line == "[Service]";
                continue;
            }
            let Some((key, value)) = line.split_once('=').filter(|_| in_service) else { continue };
            let value = value.trim();
            match key.trim() {
                "User" => self.user = Some(value.to_string()).filter(|v| !v.is_empty()),
                "StateDirectory" => {
                    self.state_directory =
                        value.split_whitespace().next().map(|d| d.split(':').next().unwrap_or(d).to_string())
                }
                "ExecStart" => self.config = exec_config(value),
                _ => {}
            }
        }
    }
}

/// `ExecStart=[-@+!:]BIN [ARGS…]`: the first argument that is not an option,
/// when it is not a subcommand.
fn exec_config(value: &str) -> Option<PathBuf> {
    let mut words = value.split_whitespace();
    words.next()?;
    let first = words.find(|w| !w.starts_with('-'))?;
    let subcommands = ["poll", "check", "doctor", "lease", "mcp", "help"];
    (!subcommands.contains(&first)).then(|| PathBuf::from(first))
}

/// The unit's user, and what it must own. `state` is None without a config.
pub fn check(path: &Path, unit: Option<&Unit>, config: &Path, state: Option<&Path>) -> Vec<Finding> {
    let Some(unit) = unit else {
        return vec![Finding::skip("unit", format!("no systemd unit at {}", path.display()))];
    };
    let shown = unit.path.display();
    let name = unit.user.as_deref().unwrap_or("root");
    let user = match nix::unistd::User::from_name(name) {
        Ok(Some(u)) => u,
        Ok(None) => {
            return vec![Finding::fail(
                "unit",
                format!("{shown}: User={name} does not exist"),
                format!(
                    "create it (sh install.sh --user {name} does), or change User= (systemctl edit aion-connector)"
                ),
            )];
        }
        Err(e) => {
            return vec![Finding::warn(
                "unit",
                format!("{shown}: looking up {name}: {e}"),
                "see the message",
            )];
        }
    };
    if user.uid.is_root() {
        return vec![Finding::warn(
            "unit",
            format!("{shown} runs the connector as root: agents and the terminal get root's rights"),
            "sh install.sh --user aion-connector (a system user; the files change hands)",
        )];
    }
    let mut out = vec![Finding::ok("unit", format!("{shown} runs as {name} (uid {})", user.uid))];
    let owner = |p: &Path| std::fs::metadata(p).ok().map(|m| m.uid());
    match owner(config) {
        Some(uid) if uid == user.uid.as_raw() => {
            out.push(Finding::ok("unit", format!("{name} owns {}", config.display())))
        }
        Some(uid) => out.push(Finding::fail(
            "unit",
            format!(
                "{} is owned by uid {uid}, not {name}: the service cannot read it (mode 0600)",
                config.display()
            ),
            format!("chown {name}: {}", config.display()),
        )),
        None => {}
    }
    if let Some(dir) = state
        && let Some(uid) = owner(dir)
    {
        let systemd_fixes =
            unit.state_directory.as_deref().is_some_and(|d| dir == Path::new("/var/lib").join(d));
        if uid == user.uid.as_raw() {
            out.push(Finding::ok("unit", format!("{name} owns {}", dir.display())));
        } else if systemd_fixes {
            out.push(Finding::warn(
                "unit",
                format!("{} is owned by uid {uid}, not {name}", dir.display()),
                "none needed: systemd gives StateDirectory= to User= at the next start",
            ));
        } else {
            out.push(Finding::fail(
                "unit",
                format!("{} is owned by uid {uid}, not {name}: the service cannot write it", dir.display()),
                format!("chown -R {name}: {}", dir.display()),
            ));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_installed_unit_and_a_dropin_are_read() {
        let mut u = Unit { path: "/u".into(), user: None, config: None, state_directory: None };
        u.apply(
            "[Unit]\nUser=nobody\n[Service]\nExecStart=/usr/local/bin/aion-connector /etc/a.json\n\
             User=aion-connector\nStateDirectory=aion-connector\n",
        );
        assert_eq!(u.user.as_deref(), Some("aion-connector"));
        assert_eq!(u.config.as_deref(), Some(Path::new("/etc/a.json")));
        assert_eq!(u.state_directory.as_deref(), Some("aion-connector"));
        u.apply("[Service]\nUser=other\nExecStart=\nExecStart=/bin/aion-connector poll --config x\n");
        assert_eq!(u.user.as_deref(), Some("other"));
        assert_eq!(u.config, None);
    }
}
