//! A memory of the SYNs synjitsu recently refused for want of room, so that a client that
//! retransmits one can be told apart from a flood.
//!
//! Why: under a SYN flood from spoofed sources the held-SYN table fills within milliseconds,
//! and a legitimate client's first SYN finds it full like any other. But a real client
//! retransmits its SYN (same 4-tuple and ISN) about a second later, and spoofed ones never do.
//! Recognising the retransmission of a refused SYN lets the core make room for it (see
//! [`crate::hold`]), so real clients get through a flood at their first retransmit.
//!
//! Owns two Bloom filters that take turns (each covers one `window`; an entry is remembered
//! for one to two windows), and the fingerprint of a SYN. Memory is allocated at the first
//! refusal: 2 x [`BITS`] bits (1 MiB). False positives (about 1% with 400 000 refusals per
//! window) only ever let a flood SYN displace another SYN that was never retransmitted.

use std::time::{Duration, Instant};

use crate::store::layout::SynKey;

/// Bits per filter: 2^22, for about 400 000 refusals per window at about 1% false positives.
pub const BITS: usize = 1 << 22;
/// Hash functions per entry.
const K: u64 = 4;

/// The memory. See the module documentation.
#[derive(Debug)]
pub struct Refused {
    filters: [Vec<u64>; 2],
    current: usize,
    rotated_at: Option<Instant>,
    window: Duration,
    seed: u64,
}

fn mix(mut x: u64) -> u64 {
    // splitmix64's finaliser: every input bit moves every output bit.
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

impl Refused {
    /// An empty memory whose entries last one to two `window`s; `seed` keys the hash so
    /// that nobody outside can aim at its false positives.
    pub fn new(window: Duration, seed: u64) -> Refused {
        Refused {
            filters: [Vec::new(), Vec::new()],
            current: 0,
            rotated_at: None,
            window,
            seed,
        }
    }

    /// The fingerprint of a SYN: its 4-tuple and ISN.
    pub fn fingerprint(&self, key: &SynKey, isn: u32) -> u64 {
        let mut h = mix(self.seed ^ u64::from(isn));
        for ip in [key.local_ip, key.dest_ip] {
            let bytes = match ip {
                std::net::IpAddr::V4(v) => u128::from(u32::from(v)),
                std::net::IpAddr::V6(v) => u128::from(v),
            };
            h = mix(h ^ (bytes as u64));
            h = mix(h ^ ((bytes >> 64) as u64));
        }
        mix(h ^ (u64::from(key.local_port) << 16 | u64::from(key.dest_port)))
    }

    fn bits(fp: u64) -> impl Iterator<Item = usize> {
        // Double hashing: k indices from two halves of one fingerprint.
        let (a, b) = (fp & 0xffff_ffff, (fp >> 32) | 1);
        (0..K).map(move |i| (a.wrapping_add(i.wrapping_mul(b)) as usize) & (BITS - 1))
    }

    fn rotate(&mut self, now: Instant) {
        let due = self
            .rotated_at
            .is_none_or(|t| now.duration_since(t) >= self.window);
        if due {
            self.current ^= 1;
            let f = &mut self.filters[self.current];
            if f.is_empty() {
                f.resize(BITS / 64, 0);
            } else {
                f.fill(0);
            }
            self.rotated_at = Some(now);
        }
    }

    /// Remembers a refused SYN.
    pub fn insert(&mut self, now: Instant, fp: u64) {
        self.rotate(now);
        let f = &mut self.filters[self.current];
        for i in Self::bits(fp) {
            f[i / 64] |= 1 << (i % 64);
        }
    }

    /// True if a SYN with this fingerprint was refused in the last one or two windows.
    pub fn contains(&self, fp: u64) -> bool {
        self.filters
            .iter()
            .any(|f| !f.is_empty() && Self::bits(fp).all(|i| f[i / 64] & (1 << (i % 64)) != 0))
    }

    /// Bytes allocated (for metrics and tests).
    pub fn allocated(&self) -> usize {
        self.filters.iter().map(|f| f.len() * 8).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(port: u16) -> SynKey {
        SynKey {
            local_ip: "10.77.1.10".parse().unwrap(),
            local_port: 80,
            dest_ip: "198.18.0.1".parse().unwrap(),
            dest_port: port,
        }
    }

    #[test]
    fn remembered_for_one_to_two_windows_then_forgotten() {
        let mut r = Refused::new(Duration::from_secs(2), 7);
        let t0 = Instant::now();
        assert_eq!(
            r.allocated(),
            0,
            "nothing allocated before the first refusal"
        );
        let fp = r.fingerprint(&key(1), 42);
        assert!(!r.contains(fp));
        r.insert(t0, fp);
        assert!(r.contains(fp));
        assert_ne!(fp, r.fingerprint(&key(1), 43));
        assert_ne!(fp, r.fingerprint(&key(2), 42));
        // A refusal in the next window rotates: the first one is still remembered.
        r.insert(t0 + Duration::from_secs(2), r.fingerprint(&key(9), 1));
        assert!(r.contains(fp));
        // Two rotations later it is gone.
        r.insert(t0 + Duration::from_secs(4), r.fingerprint(&key(9), 2));
        assert!(!r.contains(fp));
        assert_eq!(r.allocated(), 2 * BITS / 8);
    }

    #[test]
    fn false_positives_stay_near_one_percent_at_400k() {
        let mut r = Refused::new(Duration::from_secs(2), 99);
        let t0 = Instant::now();
        for i in 0..400_000u32 {
            let fp = r.fingerprint(&key((i % 60000) as u16), i);
            r.insert(t0, fp);
        }
        let fp_hits = (0..100_000u32)
            .filter(|i| r.contains(r.fingerprint(&key(1), 1_000_000 + i)))
            .count();
        assert!(fp_hits < 2500, "{fp_hits} false positives in 100000");
    }
}
