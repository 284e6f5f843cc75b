//! The integration tests, one crate (one build, one binary): a module per
//! topic and the helpers they share in `util`. Every test starts the real
//! binary (`CARGO_BIN_EXE_aion-connector`) on 127.0.0.1, port 0, and reads the
//! address it prints.
//!
//! Run one topic with `cargo test --test it poll::`, one test by its name.

mod util;

mod acpx_e2e;
mod browser;
mod cli;
mod delivery;
mod doctor;
mod files;
mod git;
mod http;
mod lease;
mod mcp;
mod ops;
mod poll;
mod protocol;
mod runs;
mod security;
mod terminal;
#[cfg(not(target_os = "macos"))]
mod tls;
