//! The state dir: writable (a probe file written and removed), and free space
//! on its file system (statvfs).

use super::Finding;
use std::fs::OpenOptions;
use std::io::{self, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

/// Under this much free space the state dir gets a WARN: spooled posts wait
/// there while the platform is down.
const LOW_SPACE: u64 = 100 << 20;

/// `why` says where the path came from (`stateDir`, the default, …).
pub fn writable(dir: &Path, why: &str) -> Vec<Finding> {
    let shown = format!("{} ({why})", dir.display());
    let mut out = Vec::new();
    // Where the space is measured: the dir, or its nearest existing ancestor.
    let measured: PathBuf = match std::fs::metadata(dir) {
        Ok(m) if !m.is_dir() => {
            return vec![Finding::fail(
                "state",
                format!("{shown} is not a directory"),
                "set \"stateDir\" to a directory",
            )];
        }
        Ok(_) => {
            for d in [dir.to_path_buf(), dir.join("outbox")] {
                if d.is_dir()
                    && let Err(e) = probe(&d)
                {
                    return vec![Finding::fail(
                        "state",
                        format!("{} is not writable: {e}", d.display()),
                        fix(&e),
                    )];
                }
            }
            out.push(Finding::ok("state", format!("{shown} is writable")));
            dir.to_path_buf()
        }
        Err(e) if matches!(e.kind(), io::ErrorKind::NotFound | io::ErrorKind::NotADirectory) => {
            let Some(parent) = dir.ancestors().skip(1).find(|a| a.exists()) else {
                return vec![Finding::fail(
                    "state",
                    format!("{shown}: no ancestor exists"),
                    "set \"stateDir\"",
                )];
            };
            if !parent.is_dir() {
                return vec![Finding::fail(
                    "state",
                    format!("{shown} cannot be created: {} is not a directory", parent.display()),
                    "set \"stateDir\" to a directory",
                )];
            }
            if let Err(e) = nix::unistd::access(parent, nix::unistd::AccessFlags::W_OK) {
                let e = io::Error::from(e);
                return vec![Finding::fail(
                    "state",
                    format!("{shown} cannot be created: {} is not writable: {e}", parent.display()),
                    fix(&e),
                )];
            }
            out.push(Finding::ok(
                "state",
                format!("{shown} does not exist yet; the connector creates it in {}", parent.display()),
            ));
            parent.to_path_buf()
        }
        Err(e) => return vec![Finding::fail("state", format!("{shown}: {e}"), fix(&e))],
    };
    match nix::sys::statvfs::statvfs(&measured) {
        Ok(s) => {
            // The field types differ between platforms (32 bits on macOS).
            #[allow(clippy::unnecessary_cast)]
            let free = s.blocks_available() as u64 * s.fragment_size() as u64;
            out.push(if free < LOW_SPACE {
                Finding::warn(
                    "state",
                    format!("only {} free on the file system of {}", size(free), measured.display()),
                    "free some space, or move \"stateDir\": spooled posts wait there while the platform is down",
                )
            } else {
                Finding::ok("state", format!("{} free on the file system of {}", size(free), measured.display()))
            });
        }
        Err(e) => out.push(Finding::warn(
            "state",
            format!("statvfs {}: {e}", measured.display()),
            "see the message",
        )),
    }
    out
}

/// Creates, writes and removes a small file in `dir` (a full file system
/// fails the write, not the create).
fn probe(dir: &Path) -> io::Result<()> {
    let path = dir.join(format!(".doctor-probe-{}", std::process::id()));
    let written = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&path)
        .and_then(|mut f| f.write_all(&[0u8; 4096]).and_then(|()| f.sync_all()));
    let removed = std::fs::remove_file(&path);
    written?;
    match removed {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

fn fix(e: &io::Error) -> String {
    use nix::errno::Errno;
    match Errno::from_raw(e.raw_os_error().unwrap_or(0)) {
        Errno::EROFS => "it is on a read-only file system: set \"stateDir\" to a writable directory (under \
                         systemd: StateDirectory= or ReadWritePaths=)"
            .into(),
        Errno::ENOSPC | Errno::EDQUOT => "its file system is full: free some space, or move \"stateDir\"".into(),
        Errno::ENOTDIR => "set \"stateDir\" to a directory".into(),
        _ => "chown it to the user the connector runs as, or set \"stateDir\" to a directory that user can write"
            .into(),
    }
}

/// Bytes in a short human form: 512 B, 3.2 MB, 41.0 GB.
fn size(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "kB", "MB", "GB", "TB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1000.0 && unit < UNITS.len() - 1 {
        value /= 1000.0;
        unit += 1;
    }
    if unit == 0 { format!("{bytes} B") } else { format!("{value:.1} {}", UNITS[unit]) }
}

#[cfg(test)]
mod tests {
    #[test]
    fn sizes() {
        assert_eq!(super::size(512), "512 B");
        assert_eq!(super::size(3_200_000), "3.2 MB");
        assert_eq!(super::size(41_000_000_000), "41.0 GB");
    }
}
