//! Pure: what to change so that the bridge's forwarding table, as dumped, says what synjitsu
//! wants. No netlink, no state: [`plan`] takes a dump and the wanted sets and returns the
//! [`Fix`]es; the worker in [`super`] applies them.

use std::collections::HashSet;

use shared_proto::Mac;

use crate::fdb::FdbEntry;

/// One change that brings the table closer to what synjitsu wants.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fix {
    /// Add (or replace, wherever it points) the MAC's static entry on synjitsu's port.
    Steer(Mac),
    /// Remove this entry.
    Delete(FdbEntry),
}

/// What synjitsu wants of the bridge's forwarding table.
#[derive(Debug, Clone, Copy)]
pub struct Wanted<'a> {
    /// synjitsu's port.
    pub port: u32,
    /// Each of these MACs has one static entry without a VLAN, on synjitsu's port.
    pub steered: &'a HashSet<Mac>,
    /// None of these has a static entry without a VLAN anywhere on the bridge (synjitsu made
    /// one once; these are not in `steered`).
    pub released: &'a HashSet<Mac>,
    /// Steering entries are sticky (the kernel keeps the flag): one that is not is replaced.
    pub sticky: bool,
}

/// The fixes that make `table` (every entry of the bridge's ports) what `want` says, each
/// MAC at most once. Besides the two sets: no static entry on synjitsu's port for any other
/// MAC (a stray: synjitsu's port carries only what it steers). Entries synjitsu did not make
/// elsewhere (learnt ones, someone else's static ones, any with a VLAN) are left alone.
pub fn plan(table: &[FdbEntry], want: &Wanted<'_>) -> Vec<Fix> {
    let mut fixes = Vec::new();
    let mut steered_ok: HashSet<Mac> = HashSet::new();
    let mut steering: HashSet<Mac> = HashSet::new();
    for e in table.iter().filter(|e| e.is_static) {
        let ours = e.vlan.is_none() && want.steered.contains(&e.mac);
        if e.ifindex == want.port {
            if !ours {
                fixes.push(Fix::Delete(*e));
            } else if want.sticky && !e.sticky {
                steering
                    .insert(e.mac)
                    .then(|| fixes.push(Fix::Steer(e.mac)));
            } else {
                steered_ok.insert(e.mac);
            }
        } else if ours {
            // It moved: the replace puts it back.
            steering
                .insert(e.mac)
                .then(|| fixes.push(Fix::Steer(e.mac)));
        } else if e.vlan.is_none() && want.released.contains(&e.mac) {
            fixes.push(Fix::Delete(*e));
        }
    }
    let mut missing: Vec<Mac> = want
        .steered
        .iter()
        .filter(|m| !steered_ok.contains(m) && !steering.contains(m))
        .copied()
        .collect();
    missing.sort_unstable();
    fixes.extend(missing.into_iter().map(Fix::Steer));
    fixes
}

#[cfg(test)]
mod tests {
    use super::*;

    const PORT: u32 = 7;
    const GUEST_PORT: u32 = 8;

    fn mac(n: u8) -> Mac {
        Mac([0x02, 0x77, 0, 0, 0, n])
    }

    fn entry(n: u8, ifindex: u32, is_static: bool, sticky: bool) -> FdbEntry {
        FdbEntry {
            ifindex,
            mac: mac(n),
            vlan: None,
            master: Some(3),
            is_static,
            sticky,
        }
    }

    fn set(ns: &[u8]) -> HashSet<Mac> {
        ns.iter().map(|&n| mac(n)).collect()
    }

    fn plan_for(table: &[FdbEntry], steered: &[u8], released: &[u8], sticky: bool) -> Vec<Fix> {
        plan(
            table,
            &Wanted {
                port: PORT,
                steered: &set(steered),
                released: &set(released),
                sticky,
            },
        )
    }

    #[test]
    fn a_table_that_says_what_is_wanted_needs_nothing() {
        let table = [
            entry(1, PORT, true, true),
            entry(2, GUEST_PORT, false, false),
            entry(9, GUEST_PORT, true, false),
        ];
        assert_eq!(plan_for(&table, &[1], &[2], true), vec![]);
    }

    #[test]
    fn a_steered_mac_without_its_entry_or_moved_away_is_steered_again() {
        let table = [
            entry(2, GUEST_PORT, true, false),
            entry(3, GUEST_PORT, false, false),
        ];
        assert_eq!(
            plan_for(&table, &[1, 2, 3], &[], true),
            vec![Fix::Steer(mac(2)), Fix::Steer(mac(1)), Fix::Steer(mac(3))]
        );
    }

    #[test]
    fn a_released_mac_loses_its_static_entry_wherever_it_points_and_nothing_else() {
        let moved = entry(2, GUEST_PORT, true, false);
        let on_port = entry(1, PORT, true, true);
        let learnt = entry(3, GUEST_PORT, false, false);
        let mut tagged = entry(4, GUEST_PORT, true, false);
        tagged.vlan = Some(10);
        let table = [on_port, moved, learnt, tagged];
        assert_eq!(
            plan_for(&table, &[], &[1, 2, 3, 4], true),
            vec![Fix::Delete(on_port), Fix::Delete(moved)]
        );
    }

    #[test]
    fn a_stray_static_entry_on_synjitsus_port_is_removed() {
        let stray = entry(5, PORT, true, false);
        let mut tagged = entry(1, PORT, true, true);
        tagged.vlan = Some(2);
        assert_eq!(
            plan_for(&[stray, tagged], &[1], &[], true),
            vec![Fix::Delete(stray), Fix::Delete(tagged), Fix::Steer(mac(1))]
        );
    }

    #[test]
    fn an_entry_that_lost_its_stickiness_is_replaced_only_where_the_kernel_keeps_it() {
        let table = [entry(1, PORT, true, false)];
        assert_eq!(plan_for(&table, &[1], &[], true), vec![Fix::Steer(mac(1))]);
        assert_eq!(plan_for(&table, &[1], &[], false), vec![]);
    }
}
