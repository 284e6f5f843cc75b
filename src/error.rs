//! The one error type of the binary. Each variant carries the context a user
//! needs to act on it; `Display` says it in one place and `exit_code` maps it
//! to the process exit status in one place.

use std::fmt;
use std::io;
use std::path::PathBuf;

#[derive(Debug)]
pub enum Error {
    /// The command line did not parse.
    Usage(String),
    /// The config file could not be read.
    ConfigRead { path: PathBuf, source: io::Error },
    /// The config file was read but has problems; each names its JSON path.
    Config { path: PathBuf, problems: Vec<String> },
    /// The starter config could not be written.
    StarterWrite { path: PathBuf, source: io::Error },
    /// The listening socket could not be bound.
    Bind { addr: String, source: io::Error },
    /// A project directory could not be created.
    ProjectDir { project: String, path: PathBuf, source: io::Error },
    /// The state directory (undelivered posts) cannot be used.
    StateDir { path: PathBuf, source: io::Error },
    /// Any other I/O failure while running.
    Io { what: &'static str, source: io::Error },
}

impl Error {
    /// 2 for what the user typed or wrote, 1 for what went wrong at run time.
    pub fn exit_code(&self) -> i32 {
        match self {
            Error::Usage(_) | Error::ConfigRead { .. } | Error::Config { .. } => 2,
            Error::StarterWrite { .. }
            | Error::Bind { .. }
            | Error::ProjectDir { .. }
            | Error::StateDir { .. }
            | Error::Io { .. } => 1,
        }
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Usage(msg) => write!(f, "{msg}\nTry 'aion-connector --help'."),
            Error::ConfigRead { path, source } => {
                write!(f, "{}: cannot read config: {source}", path.display())
            }
            Error::Config { path, problems } => {
                for (i, p) in problems.iter().enumerate() {
                    if i > 0 {
                        write!(f, "\naion-connector: ")?;
                    }
                    write!(f, "{}: {p}", path.display())?;
                }
                Ok(())
            }
            Error::StarterWrite { path, source } => {
                write!(f, "{}: cannot write starter config: {source}", path.display())
            }
            Error::Bind { addr, source } => write!(f, "cannot listen on {addr}: {source}"),
            Error::ProjectDir { project, path, source } => {
                write!(f, "projects.{project}.dir: cannot create {}: {source}", path.display())
            }
            Error::StateDir { path, source } => write!(
                f,
                "state directory {}: {source} (set \"stateDir\" in the config to a writable directory)",
                path.display()
            ),
            Error::Io { what, source } => write!(f, "{what}: {source}"),
        }
    }
}

impl std::error::Error for Error {}
