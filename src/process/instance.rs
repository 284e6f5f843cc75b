//! Which connector a process belongs to, so that a connector that was killed
//! (`kill -9`, an OOM kill, a power cut of the service) leaves nothing
//! running once it is started again.
//!
//! Every child the connector starts — agents and what they start, git,
//! terminals' shells, background processes, poll sessions — inherits
//! `AION_CONNECTOR=<spool>.<pid>.<nonce>`: `<spool>` names the mode's spool
//! dir in the state dir (`outbox` for push mode, `poll-outbox` for poll mode;
//! one connector per spool dir at a time: the outbox holds its lock), the
//! rest this instance. At start, once the state dir's lock is held and before
//! any work is accepted, [`end_previous`] ends every process whose mark names
//! the same state dir but another instance: they can only be left over from
//! a connector that died (descendants keep the variable through `setsid`,
//! as acpx's queue owner does). Their runs are closed by the outbox's resume
//! with one `error` post each. A process that clears its environment
//! escapes this, as it escapes the sweep of a run; under systemd the unit's
//! control group is killed with the service anyway. Linux only (/proc).

use std::path::Path;
use std::sync::OnceLock;
use std::time::Duration;

/// The variable every child carries.
pub const VAR: &str = "AION_CONNECTOR";

static MARK: OnceLock<String> = OnceLock::new();

/// Sets this instance's mark for the spool dir `spool` (once; later calls
/// keep the first). Children spawned before it carry none.
pub fn set(spool: &Path) -> &'static str {
    MARK.get_or_init(|| {
        let real = spool.canonicalize().unwrap_or_else(|_| spool.to_path_buf());
        let digest =
            crate::delivery::signing::sha256_hex(b"aion-connector", &[real.as_os_str().as_encoded_bytes()]);
        let state = &digest["sha256=".len().."sha256=".len() + 16];
        format!("{state}.{}.{:x}", std::process::id(), crate::nonce::nonce())
    })
}

/// This instance's mark, if set.
pub fn mark() -> Option<&'static str> {
    MARK.get().map(String::as_str)
}

/// Ends (TERM, KILL after `grace`) every process left by an earlier
/// instance on the same spool dir; returns how many there were.
pub fn end_previous(grace: Duration) -> usize {
    let Some(ours) = mark() else { return 0 };
    let state = ours.split('.').next().unwrap_or(ours);
    let prefix = format!("{VAR}={state}.");
    let ours = format!("{VAR}={ours}");
    let stray = super::supervise::marked(|var| var.starts_with(prefix.as_bytes()) && var != ours.as_bytes());
    super::supervise::end_all(stray, grace)
}
