//! The SYNs held for one VM, in the orders the policies read them: by age, the clients known
//! to be real apart from the rest, and the rest counted by source prefix.
//!
//! Owns the bookkeeping that keeps these views consistent (a SYN is in exactly one of the two
//! queues and in `seen`, or in none) and answers the policies' questions in O(log n) each:
//! which SYN to evict ([`Table::victim`]), which to send next ([`Table::next_to_send`]), which
//! was held longest ([`Table::oldest`]). What is charged for them and what becomes of an
//! evicted one is [`super::syn`]'s; when they go to the guest is [`super::pace`]'s.
//!
//! Why prefixes: a flood from a few source prefixes (a /24 or a /48 holding more than a
//! sixteenth of what the VM holds) is cut back first, oldest first within it, so that it
//! cannot push out the clients of every other prefix. A flood from random sources across the
//! whole address space puts about one SYN in each prefix, like real clients do: there the
//! prefix says nothing, and the oldest goes (see [`super::WhenFull`]). A prefix that holds a
//! few SYNs more than the others (a NAT, or one client opening several connections) is not
//! cut back for that alone: evicting from the prefix holding the most, whatever it holds,
//! would take every real client of a busy prefix before any of a random flood.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::IpAddr;

use super::vm::Held;
use crate::store::layout::SynKey;

/// A prefix is cut back first when it holds more than one SYN in this many of the VM's
/// never-retransmitted SYNs.
const PREFIX_SHARE: usize = 16;

/// How many of a prefix's oldest the eviction looks through for one of that prefix, before
/// it takes the oldest of all: bounded work per SYN, whatever the order of arrival.
const PREFIX_SCAN: usize = 64;

/// A client's source prefix: its IPv4 /24 or its IPv6 /48.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub(super) enum Prefix {
    V4([u8; 3]),
    V6([u8; 6]),
}

impl Prefix {
    pub(super) fn of(ip: IpAddr) -> Prefix {
        match ip {
            IpAddr::V4(a) => {
                let o = a.octets();
                Prefix::V4([o[0], o[1], o[2]])
            }
            IpAddr::V6(a) => {
                let o = a.octets();
                Prefix::V6([o[0], o[1], o[2], o[3], o[4], o[5]])
            }
        }
    }
}

/// The SYNs held for one VM. See the module documentation.
#[derive(Debug, Default)]
pub(super) struct Table {
    /// Never retransmitted, by id: ids grow with time, so the oldest first.
    unconfirmed: BTreeMap<u64, Held>,
    /// Their clients are known to be real (the SYN was retransmitted, or is the
    /// retransmission of one refused or evicted before), by id.
    real: BTreeMap<u64, Held>,
    /// The id held for each (key, ISN), for retransmissions.
    seen: HashMap<(SynKey, u32), u64>,
    /// How many never-retransmitted SYNs each source prefix holds (none at 0).
    prefixes: HashMap<Prefix, usize>,
    /// The same, in order of count: the heaviest last.
    by_count: BTreeSet<(usize, Prefix)>,
}

impl Table {
    pub(super) fn len(&self) -> usize {
        self.unconfirmed.len() + self.real.len()
    }

    pub(super) fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Every held SYN, in no particular order.
    pub(super) fn iter(&self) -> impl Iterator<Item = &Held> {
        self.unconfirmed.values().chain(self.real.values())
    }

    /// Every held SYN, in no particular order.
    pub(super) fn iter_mut(&mut self) -> impl Iterator<Item = &mut Held> {
        self.unconfirmed.values_mut().chain(self.real.values_mut())
    }

    pub(super) fn contains(&self, id: u64) -> bool {
        self.unconfirmed.contains_key(&id) || self.real.contains_key(&id)
    }

    pub(super) fn get_mut(&mut self, id: u64) -> Option<&mut Held> {
        match self.unconfirmed.get_mut(&id) {
            Some(h) => Some(h),
            None => self.real.get_mut(&id),
        }
    }

    /// The id of the SYN held for `key` and `isn`, if any.
    pub(super) fn lookup(&self, key: &SynKey, isn: u32) -> Option<u64> {
        self.seen.get(&(*key, isn)).copied()
    }

    /// Holds `h`, with the real clients if `real`.
    pub(super) fn insert(&mut self, h: Held, real: bool) {
        self.seen.insert((h.key, h.isn), h.id);
        if real {
            self.real.insert(h.id, h);
        } else {
            self.count(Prefix::of(h.key.dest_ip), true);
            self.unconfirmed.insert(h.id, h);
        }
    }

    /// The client of SYN `id` retransmitted it: it is real from now on.
    pub(super) fn confirm(&mut self, id: u64) {
        if let Some(h) = self.unconfirmed.remove(&id) {
            self.count(Prefix::of(h.key.dest_ip), false);
            self.real.insert(id, h);
        }
    }

    /// Takes the SYN `id` out.
    pub(super) fn remove(&mut self, id: u64) -> Option<Held> {
        let h = match self.unconfirmed.remove(&id) {
            Some(h) => {
                self.count(Prefix::of(h.key.dest_ip), false);
                h
            }
            None => self.real.remove(&id)?,
        };
        self.seen.remove(&(h.key, h.isn));
        Some(h)
    }

    /// The SYN held longest, real or not.
    pub(super) fn oldest(&self) -> Option<&Held> {
        let u = self.unconfirmed.first_key_value().map(|(_, h)| h);
        let r = self.real.first_key_value().map(|(_, h)| h);
        match (u, r) {
            (Some(u), Some(r)) => Some(if r.id < u.id { r } else { u }),
            (u, r) => u.or(r),
        }
    }

    /// The SYN to evict: never one of a real client while another remains; of the rest, the
    /// oldest of a prefix holding more than its share if there is one (among the
    /// [`PREFIX_SCAN`] oldest), else the oldest.
    pub(super) fn victim(&self) -> Option<u64> {
        let Some((&oldest, _)) = self.unconfirmed.first_key_value() else {
            return self.real.first_key_value().map(|(id, _)| *id);
        };
        let heavy = self
            .by_count
            .last()
            .filter(|(n, _)| *n > 1 && n * PREFIX_SHARE > self.unconfirmed.len())
            .map(|(_, p)| *p);
        let Some(heavy) = heavy else {
            return Some(oldest);
        };
        let in_heavy = self
            .unconfirmed
            .values()
            .take(PREFIX_SCAN)
            .find(|h| Prefix::of(h.key.dest_ip) == heavy)
            .map(|h| h.id);
        Some(in_heavy.unwrap_or(oldest))
    }

    /// The newest never-retransmitted SYN `pick` selects (the baseline's policy: O(n)).
    pub(super) fn newest_unconfirmed(&self, pick: impl Fn(&Held) -> bool) -> Option<u64> {
        self.unconfirmed
            .values()
            .rev()
            .find(|h| pick(h))
            .map(|h| h.id)
    }

    /// Up to `n` SYNs that `pick` selects, real clients first, then the oldest first; looks
    /// through at most `scan` SYNs that `pick` refuses, so the work stays bounded however many
    /// wait for a port that is not answering yet.
    pub(super) fn next_to_send(
        &self,
        n: usize,
        scan: usize,
        pick: impl Fn(&Held) -> bool,
    ) -> Vec<u64> {
        let mut refused = 0;
        let mut out = Vec::new();
        for h in self.real.values().chain(self.unconfirmed.values()) {
            if out.len() >= n || refused >= scan {
                break;
            }
            if pick(h) {
                out.push(h.id);
            } else {
                refused += 1;
            }
        }
        out
    }

    /// Counts one SYN in or out of its prefix.
    fn count(&mut self, p: Prefix, add: bool) {
        let n = self.prefixes.entry(p).or_insert(0);
        self.by_count.remove(&(*n, p));
        if add {
            *n += 1;
        } else {
            *n = n.saturating_sub(1);
        }
        if *n == 0 {
            self.prefixes.remove(&p);
        } else {
            self.by_count.insert((*n, p));
        }
    }
}
