//! Processes the connector starts: each leads its own process group and none
//! outlives its owner. [`group`] is the mechanism (spawn, signal, wait, reap),
//! [`supervise`] the long-running child (marker, stoppable pipes, sweep,
//! TERM → grace → KILL), [`run`] the bounded command with collected output,
//! [`pty`] the terminal's shell on a pseudo-terminal, [`instance`] the mark
//! that tells a previous connector's leftovers. All of the crate's
//! `unsafe` is in `group.rs` and `pty.rs`.
//!
//! Threads: none; owners read, wait and signal on threads of their own.

pub mod group;
pub mod instance;
pub mod pty;
pub mod run;
pub mod supervise;

pub use group::Group;
pub use run::{Output, last_lines, run};
