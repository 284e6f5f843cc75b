//! Cheap numbers that differ between calls and processes: for ids and for
//! retry jitter, never for secrets (tokens come from /dev/urandom).

use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// The clock's nanoseconds, scrambled (xorshift).
pub fn nonce() -> u64 {
    let t = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default();
    let mut x = (t.as_nanos() as u64) ^ 0x9E37_79B9_7F4A_7C15;
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    x
}

/// `d` times a factor in 1 ± `spread`, so that many clients do not retry or
/// poll in step.
pub fn jitter(d: Duration, spread: f64) -> Duration {
    let unit = (nonce() % 10_001) as f64 / 10_000.0; // 0..=1
    d.mul_f64(1.0 - spread + 2.0 * spread * unit)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jitter_stays_in_its_band() {
        for _ in 0..1000 {
            let j = jitter(Duration::from_millis(1000), 0.25);
            assert!(j >= Duration::from_millis(750) && j <= Duration::from_millis(1250), "{j:?}");
        }
    }
}
