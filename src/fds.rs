//! The open-file budget (`nofile`) shared by both modes: lift the soft limit,
//! keep a reserve for what is not counted (git, agents' pipes, spool files,
//! the log, accept), and say how many of a counted thing fit in the rest —
//! connections and terminals in push mode, sessions in poll mode.
//!
//! Threads: none.

/// Lifts the soft limit to the hard one (capped at 65,536), so that the
/// configured caps, not EMFILE, are what binds. Returns the soft limit now
/// in force (None if it cannot be read).
pub fn raise_limit() -> Option<u64> {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE).ok()?;
    let want = hard.min(65_536);
    if want > soft && setrlimit(Resource::RLIMIT_NOFILE, want, hard).is_ok() {
        return Some(want);
    }
    Some(soft)
}

/// Descriptors kept for everything not counted: a quarter of the limit, at
/// least 32, at most 256.
pub fn reserve(nofile: u64) -> u64 {
    (nofile / 4).clamp(32, 256)
}

/// How many things of `each` descriptors fit in `nofile` after the reserve
/// (at least 1).
pub fn fit(nofile: u64, each: u64) -> usize {
    (nofile.saturating_sub(reserve(nofile)) / each.max(1)).max(1) as usize
}

/// When `wanted` things of `each` descriptors do not fit in the open-file
/// limit `nofile` (see [`fit`]): the limit and how many fit, for the
/// caller's warning. None when they fit or the limit is unknown.
pub fn short(wanted: usize, nofile: Option<u64>, each: u64) -> Option<(u64, usize)> {
    let nofile = nofile?;
    let fits = fit(nofile, each);
    (wanted > fits).then_some((nofile, fits))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn what_fits_leaves_the_reserve() {
        assert_eq!(fit(64, 1), 32);
        assert_eq!(fit(64, 6), 5);
        assert_eq!(fit(1024, 1), 768);
        assert_eq!(fit(8, 1), 1);
        assert_eq!(fit(65_536, 2), 32_640);
    }
}
