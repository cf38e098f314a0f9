//! Neighbours: ARP and IPv6 neighbour discovery for the VMs synjitsu stands in for and for its
//! own probe addresses.
//!
//! Owns answering ARP requests and neighbour solicitations with a VM's MAC (or synjitsu's own,
//! for a probe address), the gratuitous ARPs and unsolicited NAs sent when a boot starts, and
//! recognising the guest's own announcement ([`is_announcement`]), which ends standing in for
//! it. An announcement seen on synjitsu's port counts only for a guest whose port jitsu-dns
//! did not name; one whose port is known is judged on the announcement watcher's copy, which
//! knows where it came in ([`super::guest`]). What follows the announcement is
//! [`super::handover`]'s; the frames themselves are [`crate::garp`]'s.

use std::net::IpAddr;
use std::time::Instant;

use shared_proto::Mac;

use super::outputs::{Outputs, Tx};
use super::vm::Vm;
use super::{Config, Hold, Verdict};
use crate::garp::NaTo;
use crate::wire::{ArpOp, ArpRepr, EthHeader, NdpKind, NdpRepr, Packet};

/// True if `packet` (in a frame with header `eth`) is `vm`'s guest announcing its own
/// address: a gratuitous ARP (from its MAC, to broadcast, with its address as sender and as
/// target, or a broadcast reply: `arping -U` and `-A`, the kernel's `arp_notify`, MirageOS,
/// the original Synjitsu) or an unsolicited neighbour advertisement (from its MAC, for its
/// IPv6 address, the solicited flag clear). An ARP request for another address, an answer to
/// someone's question, a ping: none is one; they show that the guest's kernel runs, not that
/// it listens.
pub(super) fn is_announcement(vm: &Vm, eth: &EthHeader, packet: &Packet<'_>) -> bool {
    if eth.src != vm.id.mac {
        return false;
    }
    match packet {
        Packet::Arp(a) => {
            a.sender_mac == vm.id.mac
                && a.sender_ip == vm.id.ipv4
                && eth.dst == Mac::BROADCAST
                && (a.target_ip == a.sender_ip || a.op == ArpOp::Reply)
        }
        Packet::Ndp(n) => {
            matches!(
                n.kind,
                NdpKind::Advertisement {
                    solicited: false,
                    ..
                }
            ) && Some(n.target) == vm.id.ipv6
        }
        Packet::Tcp(_) | Packet::Other => false,
    }
}

impl Hold {
    pub(super) fn on_arp(&mut self, now: Instant, eth: &EthHeader, a: &ArpRepr) -> Verdict {
        if let Some(vm) = self.vms.with_mac_mut(a.sender_mac)
            && vm.phase.intercepting()
            && is_announcement(vm, eth, &Packet::Arp(*a))
        {
            // Where it came in is known only to the watcher's copy: it decides if it can.
            if vm.announcing_port(&self.cfg).is_some() {
                return Verdict::Pass;
            }
            vm.announced(&self.cfg, &mut self.out, now);
            return Verdict::Announced;
        }
        if a.op != ArpOp::Request {
            return Verdict::Pass;
        }
        // A probe (RFC 5227, sender 0.0.0.0) is most likely the booting guest checking its
        // own address: answering would make it give the address up.
        if a.sender_ip.is_unspecified() || a.sender_ip == a.target_ip {
            return Verdict::Pass;
        }
        if Some(a.target_ip) == self.cfg.probe_v4 {
            self.out.send(Tx::ArpReply {
                mac: self.cfg.own_mac,
                ip: a.target_ip,
                req: *a,
            });
            self.out.counters.arp_replies += 1;
            return Verdict::Answered;
        }
        let Some(vm) = self.vms.with_ip_mut(IpAddr::V4(a.target_ip)) else {
            return Verdict::Pass;
        };
        if !vm.phase.intercepting() || eth.src == vm.id.mac || a.sender_mac == vm.id.mac {
            return Verdict::Pass;
        }
        self.out.send(Tx::ArpReply {
            mac: vm.id.mac,
            ip: vm.id.ipv4,
            req: *a,
        });
        self.out.counters.arp_replies += 1;
        tracing::debug!(vm = %vm.id.name, asker = %a.sender_ip, "answered ARP");
        vm.wake(&self.cfg, &mut self.out, now, false);
        Verdict::Answered
    }

    pub(super) fn on_ndp(&mut self, now: Instant, eth: &EthHeader, n: &NdpRepr) -> Verdict {
        match n.kind {
            NdpKind::Advertisement { .. } => {
                let Some(vm) = self.vms.with_mac_mut(eth.src) else {
                    return Verdict::Pass;
                };
                if vm.phase.intercepting()
                    && vm.announcing_port(&self.cfg).is_none()
                    && is_announcement(vm, eth, &Packet::Ndp(*n))
                {
                    vm.announced(&self.cfg, &mut self.out, now);
                    return Verdict::Announced;
                }
                Verdict::Pass
            }
            NdpKind::Solicitation => {
                // Duplicate address detection: the guest itself, most likely (see on_arp).
                if n.src_ip.is_unspecified() {
                    return Verdict::Pass;
                }
                let asker = NaTo::Asker {
                    ip: n.src_ip,
                    mac: n.lladdr.unwrap_or(eth.src),
                };
                if Some(n.target) == self.cfg.probe_v6 {
                    self.out.send(Tx::Na {
                        mac: self.cfg.own_mac,
                        ip: n.target,
                        to: asker,
                    });
                    self.out.counters.na_solicited += 1;
                    return Verdict::Answered;
                }
                let Some(vm) = self.vms.with_ip_mut(IpAddr::V6(n.target)) else {
                    return Verdict::Pass;
                };
                if !vm.phase.intercepting() || eth.src == vm.id.mac {
                    return Verdict::Pass;
                }
                self.out.send(Tx::Na {
                    mac: vm.id.mac,
                    ip: n.target,
                    to: asker,
                });
                self.out.counters.na_solicited += 1;
                tracing::debug!(vm = %vm.id.name, asker = %n.src_ip, "answered neighbour solicitation");
                vm.wake(&self.cfg, &mut self.out, now, false);
                Verdict::Answered
            }
        }
    }
}

impl Vm {
    /// Sends the gratuitous ARP (and unsolicited NA) due at `now`, if any, and schedules the
    /// next one.
    pub(super) fn announce_due(&mut self, cfg: &Config, out: &mut Outputs, now: Instant) {
        let Some(at) = self.garp_at else {
            return;
        };
        if at > now {
            return;
        }
        self.garp_left = self.garp_left.saturating_sub(1);
        self.garp_at = (self.garp_left > 0).then(|| now + cfg.garp_interval);
        let mac = self.id.mac;
        out.send(Tx::Garp {
            mac,
            ip: self.id.ipv4,
        });
        out.counters.garp_sent += 1;
        if let Some(ip) = self.id.ipv6 {
            out.send(Tx::Na {
                mac,
                ip,
                to: NaTo::AllNodes,
            });
            out.counters.na_unsolicited += 1;
        }
    }
}
