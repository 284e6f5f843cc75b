//! The connector's version, as `--version`, `ping`, poll mode's status and
//! the HTTP client's User-Agent report it.

pub const VERSION: &str = env!("CARGO_PKG_VERSION");
