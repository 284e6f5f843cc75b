//! Failed tokens counted per peer address: past `limits.failedTokensPerMinute`
//! wrong (or missing) tokens in one minute, the peer is refused with 429
//! until that minute is over, whatever token it sends then, so guessing
//! goes no faster than the limit. Loopback peers are counted too unless
//! `limits.failedTokensExemptLoopback` (a reverse proxy on this machine makes
//! every client loopback: exempting it would exempt them all).
//!
//! Shared by the connection threads behind one mutex, held for a map lookup.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// The window the count is kept for.
const WINDOW: Duration = Duration::from_secs(60);

/// Peers remembered before stale ones are dropped (bounds the memory a flood
/// of addresses can take).
const PRUNE_AT: usize = 4096;

pub struct Failures {
    /// 0: no limit.
    per_minute: u32,
    exempt_loopback: bool,
    peers: Mutex<HashMap<IpAddr, Window>>,
}

struct Window {
    start: Instant,
    count: u32,
}

/// `::ffff:a.b.c.d` is the IPv4 peer a.b.c.d (a dual-stack listener's view).
pub fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

impl Failures {
    pub fn new(per_minute: u32, exempt_loopback: bool) -> Failures {
        Failures { per_minute, exempt_loopback, peers: Mutex::new(HashMap::new()) }
    }

    fn counted(&self, ip: IpAddr) -> bool {
        self.per_minute > 0 && !(self.exempt_loopback && ip.is_loopback())
    }

    fn peers(&self) -> std::sync::MutexGuard<'_, HashMap<IpAddr, Window>> {
        self.peers.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Whether `ip` has used up its failures for this minute.
    pub fn blocked(&self, ip: IpAddr) -> bool {
        if !self.counted(ip) {
            return false;
        }
        let peers = self.peers();
        peers.get(&ip).is_some_and(|w| w.start.elapsed() < WINDOW && w.count >= self.per_minute)
    }

    /// Counts one failed token of `ip`; returns its count in this minute.
    pub fn failed(&self, ip: IpAddr) -> u32 {
        if !self.counted(ip) {
            return 0;
        }
        let now = Instant::now();
        let mut peers = self.peers();
        if peers.len() >= PRUNE_AT {
            peers.retain(|_, w| now.duration_since(w.start) < WINDOW);
        }
        let w = peers.entry(ip).or_insert(Window { start: now, count: 0 });
        if now.duration_since(w.start) >= WINDOW {
            *w = Window { start: now, count: 0 };
        }
        w.count = w.count.saturating_add(1);
        w.count
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_peer_is_blocked_past_the_limit_and_others_are_not() {
        let f = Failures::new(3, false);
        let (a, b): (IpAddr, IpAddr) = ("192.0.2.1".parse().unwrap(), "192.0.2.2".parse().unwrap());
        for n in 1..=3 {
            assert!(!f.blocked(a));
            assert_eq!(f.failed(a), n);
        }
        assert!(f.blocked(a));
        assert!(!f.blocked(b));
        let exempt = Failures::new(1, true);
        let lo: IpAddr = "127.0.0.1".parse().unwrap();
        exempt.failed(lo);
        exempt.failed(lo);
        assert!(!exempt.blocked(lo));
        let off = Failures::new(0, false);
        off.failed(a);
        assert!(!off.blocked(a));
    }
}
