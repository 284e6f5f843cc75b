//! `aion-connector doctor [--unit FILE] [CONFIG]`: every check a support
//! thread asks for, one line each — `OK`, `WARN`, `FAIL` (or `SKIP` when a
//! check does not apply) — with what was found and, unless it is OK, the fix.
//! The exit status is 0 when no line is `FAIL`, 1 otherwise.
//!
//! The checks, in order: the config (the `check` problems, owner-only mode,
//! token length), the port (free, or served by an aion-connector that takes
//! this config's token), acpx, Node.js and the agent CLIs on PATH
//! ([`tools`], shared with `check`), the state dir (writable, free space),
//! TLS (files readable, key matching, not expiring within 14 days), the origins of spooled callback posts
//! (a TCP connect each), the Aion lease socket, and the systemd unit's user.
//!
//! Doctor changes nothing: the one write is a probe file in the state dir,
//! removed at once. Every network probe has a short timeout.
//!
//! Threads: none; everything runs on the caller's thread.

mod reach;
mod state;
pub mod tools;
mod unit;

use crate::config::{self, Config, DEFAULT_CONFIG};
use crate::error::Error;
use crate::version::VERSION;
use std::fmt;
use std::path::{Path, PathBuf};

const HELP: &str = "\
aion-connector doctor — check this machine for serving CONFIG, one line per check

Usage:
  aion-connector doctor [--unit FILE] [CONFIG]

Each line is OK, WARN, FAIL or SKIP (does not apply), what was found and, if
it is not OK, the fix. Checks: the config (problems, owner-only mode, token
length), the port (free, or an aion-connector taking this config's token),
acpx, Node.js 22+, git and each agent CLI on PATH, the state dir (writable,
free space), TLS, the origins of spooled callback posts (reachable), the Aion
lease socket, the systemd unit's User= (exists, owns the config and the state
dir). Run it as the user the connector runs as to see what that user sees.

CONFIG defaults to ./aion.config.json, else the config of the systemd unit.

Options:
  --unit FILE   the systemd unit to check (default
                /etc/systemd/system/aion-connector.service)
  -h, --help    print this help and exit

Exit status: 0 no FAIL, 1 at least one FAIL, 2 usage error.
";

/// The unit install.sh writes.
const DEFAULT_UNIT: &str = "/etc/systemd/system/aion-connector.service";

/// How a check came out; the order is the severity.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Level {
    Ok,
    Skip,
    Warn,
    Fail,
}

impl fmt::Display for Level {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // pad, not write_str: the report aligns its columns with a width.
        f.pad(match self {
            Level::Ok => "OK",
            Level::Skip => "SKIP",
            Level::Warn => "WARN",
            Level::Fail => "FAIL",
        })
    }
}

/// One line of the report.
#[derive(Debug)]
pub struct Finding {
    pub level: Level,
    /// What was checked, one word: `config`, `port`, `acpx`, …
    pub topic: &'static str,
    pub text: String,
    /// What to do about it (not for OK lines).
    pub fix: Option<String>,
}

impl Finding {
    pub fn ok(topic: &'static str, text: impl Into<String>) -> Finding {
        Finding { level: Level::Ok, topic, text: text.into(), fix: None }
    }

    pub fn skip(topic: &'static str, text: impl Into<String>) -> Finding {
        Finding { level: Level::Skip, topic, text: text.into(), fix: None }
    }

    pub fn warn(topic: &'static str, text: impl Into<String>, fix: impl Into<String>) -> Finding {
        Finding { level: Level::Warn, topic, text: text.into(), fix: Some(fix.into()) }
    }

    pub fn fail(topic: &'static str, text: impl Into<String>, fix: impl Into<String>) -> Finding {
        Finding { level: Level::Fail, topic, text: text.into(), fix: Some(fix.into()) }
    }
}

impl fmt::Display for Finding {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:<4}  {:<9} {}", self.level, self.topic, self.text)?;
        match &self.fix {
            Some(fix) => write!(f, " — fix: {fix}"),
            None => Ok(()),
        }
    }
}

pub fn run(args: &[&str]) -> Result<i32, Error> {
    let mut unit_path = PathBuf::from(DEFAULT_UNIT);
    let mut config_arg: Option<PathBuf> = None;
    let mut rest = args.iter();
    while let Some(arg) = rest.next() {
        match *arg {
            "-h" | "--help" => {
                print!("{HELP}");
                return Ok(0);
            }
            "--unit" => match rest.next() {
                Some(p) => unit_path = PathBuf::from(p),
                None => return Err(Error::Usage("--unit needs a FILE".into())),
            },
            other if other.starts_with("--unit=") => unit_path = PathBuf::from(&other["--unit=".len()..]),
            other if other.starts_with('-') => {
                return Err(Error::Usage(format!("doctor: unknown option {other}")));
            }
            other if config_arg.is_none() => config_arg = Some(PathBuf::from(other)),
            _ => return Err(Error::Usage("usage: aion-connector doctor [--unit FILE] [CONFIG]".into())),
        }
    }
    let findings = diagnose(config_arg, &unit_path);
    for f in &findings {
        println!("{f}");
    }
    let count = |l: Level| findings.iter().filter(|f| f.level == l).count();
    let (fails, warns) = (count(Level::Fail), count(Level::Warn));
    println!("doctor: {fails} FAIL, {warns} WARN");
    Ok(if fails > 0 { 1 } else { 0 })
}

/// All the checks, in report order.
fn diagnose(config_arg: Option<PathBuf>, unit_path: &Path) -> Vec<Finding> {
    let mut out = vec![Finding::ok(
        "version",
        format!("aion-connector {VERSION} ({} {})", std::env::consts::OS, std::env::consts::ARCH),
    )];
    let unit = unit::Unit::read(unit_path);
    let path = match config_arg {
        Some(p) => p,
        None => {
            let local = PathBuf::from(DEFAULT_CONFIG);
            match unit.as_ref().and_then(|u| u.config.clone()) {
                Some(served) if !local.exists() => {
                    out.push(Finding::ok(
                        "config",
                        format!(
                            "no ./{DEFAULT_CONFIG}: checking {} (ExecStart= of {})",
                            served.display(),
                            unit_path.display()
                        ),
                    ));
                    served
                }
                _ => local,
            }
        }
    };
    let config = load(&path, &mut out);
    if let Some(u) = &unit
        && let Some(served) = u.config.as_deref()
        && !same_file(served, &path)
    {
        out.push(Finding::warn(
            "config",
            format!("the unit {} serves {}, not {}", u.path.display(), served.display(), path.display()),
            format!("check that one: aion-connector doctor {}", served.display()),
        ));
    }
    let Some(config) = config else {
        for topic in ["port", "agents", "state", "callbacks"] {
            out.push(Finding::skip(topic, "needs a valid config"));
        }
        out.push(reach::lease(None));
        out.extend(unit::check(unit_path, unit.as_ref(), &path, None));
        return out;
    };
    out.push(reach::port(&config));
    out.extend(tools::findings(&config, &std::env::var_os("PATH").unwrap_or_default()));
    let serves_this = unit.as_ref().and_then(|u| u.config.as_deref()).is_some_and(|c| same_file(c, &path));
    let (dir, why) = state_dir(&config, unit.as_ref().filter(|_| serves_this));
    out.extend(state::writable(&dir, why));
    out.push(tls(&config, &dir));
    out.extend(reach::callbacks(&dir.join("outbox")));
    out.push(reach::lease(Some(&config)));
    out.extend(unit::check(unit_path, unit.as_ref(), &path, Some(&dir)));
    out
}

/// The config check: what `check` says (problems, unknown keys) and
/// `config::advice` (mode, token length). None when it cannot be served.
fn load(path: &Path, out: &mut Vec<Finding>) -> Option<Config> {
    let shown = path.display();
    match config::load(path) {
        Ok((config, warnings)) => {
            out.push(Finding::ok("config", format!("{shown}: valid, {} project(s)", config.projects.len())));
            for w in warnings {
                out.push(Finding::warn(
                    "config",
                    format!("{shown}: {w}"),
                    "remove the key, or correct its name",
                ));
            }
            for a in config::advice(path, &config) {
                out.push(Finding::warn("config", a.problem, a.fix));
            }
            Some(config)
        }
        Err(Error::ConfigRead { source, .. }) => {
            let fix = if source.kind() == std::io::ErrorKind::NotFound {
                "name it: aion-connector doctor /etc/aion-connector/aion.config.json (aion-connector with no \
                 argument writes a starter config here)"
                    .to_string()
            } else {
                "run doctor as the user the connector runs as, or as root".to_string()
            };
            out.push(Finding::fail("config", format!("cannot read {shown}: {source}"), fix));
            None
        }
        Err(Error::Config { problems, .. }) => {
            for p in problems {
                out.push(Finding::fail(
                    "config",
                    format!("{shown}: {p}"),
                    format!("edit {shown} (aion-connector check {shown} lists every problem)"),
                ));
            }
            None
        }
        Err(e) => {
            out.push(Finding::fail("config", format!("{shown}: {e}"), "see the message"));
            None
        }
    }
}

/// The state dir the connector uses with this config: `stateDir`, else
/// `$STATE_DIRECTORY`, else — when the unit serves this config — the unit's
/// `StateDirectory=` under /var/lib, else the user's default.
fn state_dir(config: &Config, unit: Option<&unit::Unit>) -> (PathBuf, &'static str) {
    if let Some(dir) = &config.state_dir {
        // `cwd.join("./state")`: shown without the "/./".
        return (dir.components().collect(), "stateDir");
    }
    if std::env::var_os("STATE_DIRECTORY").is_none_or(|v| v.is_empty())
        && let Some(name) = unit.and_then(|u| u.state_directory.as_deref())
    {
        return (Path::new("/var/lib").join(name), "the unit's StateDirectory=");
    }
    (config::state_dir(None), "the default")
}

/// TLS: the cert and key files are readable, the key matches the
/// certificate, and the certificate does not expire within 14 days. A
/// self-signed pair not generated yet is fine (the first start makes it).
#[cfg(not(target_os = "macos"))]
fn tls(config: &Config, state: &Path) -> Finding {
    use crate::net::tls::{Source, inspect};
    let source = match &config.tls {
        None => {
            return Finding::skip(
                "tls",
                "not configured (plain HTTP: add \"tls\" to the config, or put a TLS proxy in front, for remote use)",
            );
        }
        Some(config::TlsSettings::SelfSigned) => Source::SelfSigned { dir: state.join("tls") },
        Some(config::TlsSettings::Files { cert, key }) => {
            Source::Files { cert: cert.clone(), key: key.clone() }
        }
    };
    let (cert, key) = source.files();
    if matches!(source, Source::SelfSigned { .. }) && !cert.exists() && !key.exists() {
        return Finding::ok(
            "tls",
            format!("self-signed: generated into {} on the first start", state.join("tls").display()),
        );
    }
    let (fingerprint, not_after) = match inspect(&source) {
        Ok(found) => found,
        Err(e) => {
            return Finding::fail(
                "tls",
                e,
                format!(
                    "check {} and {} (PEM, readable by the service user, the key of that certificate)",
                    cert.display(),
                    key.display()
                ),
            );
        }
    };
    let now =
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs() as i64);
    let renew = "renew it (certbot renew), then: systemctl reload aion-connector (SIGHUP re-reads the files)";
    match not_after {
        Some(t) if t <= now => Finding::fail(
            "tls",
            format!("{} expired {} day(s) ago", cert.display(), (now - t) / 86_400),
            renew,
        ),
        Some(t) if t - now < 14 * 86_400 => Finding::warn(
            "tls",
            format!("{} expires in {} day(s)", cert.display(), (t - now) / 86_400),
            renew,
        ),
        Some(t) => Finding::ok(
            "tls",
            format!(
                "{}: key matches, valid for {} more days, {fingerprint}",
                cert.display(),
                (t - now) / 86_400
            ),
        ),
        None => Finding::warn(
            "tls",
            format!("{}: cannot read its expiry date", cert.display()),
            "check it: openssl x509 -noout -enddate -in FILE",
        ),
    }
}

#[cfg(target_os = "macos")]
fn tls(_: &Config, _: &Path) -> Finding {
    Finding::skip(
        "tls",
        "not available in macOS builds (plain HTTP: put a TLS proxy in front for remote use)",
    )
}

/// Whether two paths name the same file (or the same path when either is missing).
fn same_file(a: &Path, b: &Path) -> bool {
    match (a.canonicalize(), b.canonicalize()) {
        (Ok(a), Ok(b)) => a == b,
        _ => a == b,
    }
}
