//! The guest's own bridge port, as jitsu-dns names it in `booting`
//! ([`shared_proto::VmIdentity::port`]): where the guest's announcement must come from, and
//! where the frames addressed to the guest go while its MAC is steered to synjitsu.
//!
//! Owns two rules. An announcement ([`super::neighbour::is_announcement`]) seen by the
//! watcher (a socket on every port, [`Hold::on_ingress`]) ends the stand-in only if it came
//! in on the guest's port; from any other port it is `spoofed_announcement`, dropped and
//! counted, since anyone on the bridge can send the guest's MAC and address. And a frame sent
//! to the guest's MAC that synjitsu does not keep (anything but its clients' SYNs and the
//! ARP and neighbour questions it answers) goes on to the guest through that port: an
//! unmodified guest that boots while steered resolves its gateway, gets a ping's replies and
//! its DHCP answers, while the SYNs for it stay held. Without a named port neither rule can
//! be applied: an announcement is taken from any port (see `neighbour`), and frames for the
//! guest stop at synjitsu until it announces itself or jitsu-dns says `ready`.

use std::time::Instant;

use super::neighbour::is_announcement;
use super::{Checksum, DropReason, FrameMeta, Hold, Verdict};
use crate::wire::{self, EthHeader, Packet};

impl Hold {
    /// Looks at one frame the announcement watcher saw arriving on the bridge port named
    /// `port` (any port but synjitsu's own and the bridge itself; the watcher's kernel filter
    /// passes only gratuitous ARPs and unsolicited NAs).
    pub fn on_ingress(
        &mut self,
        now: Instant,
        frame: &[u8],
        meta: FrameMeta,
        port: &str,
    ) -> Verdict {
        self.out.counters.ingress_frames += 1;
        let verdict = self.judge_ingress(now, frame, meta, port);
        // The watcher sees every announcement a second time: only what it decided counts.
        if verdict != Verdict::Pass {
            self.count(now, frame, verdict);
        }
        verdict
    }

    fn judge_ingress(
        &mut self,
        now: Instant,
        frame: &[u8],
        meta: FrameMeta,
        port: &str,
    ) -> Verdict {
        let Ok(parsed) = wire::parse(frame, meta.checksum != Checksum::Unknown) else {
            // synjitsu's port sees it too, and says why it is malformed.
            return Verdict::Pass;
        };
        let sender = match parsed.packet {
            Packet::Arp(a) => a.sender_mac,
            Packet::Ndp(_) => parsed.eth.src,
            Packet::Tcp(_) | Packet::Other => return Verdict::Pass,
        };
        let Some(vm) = self.vms.with_mac_mut(sender) else {
            return Verdict::Pass;
        };
        if !vm.phase.intercepting() || !is_announcement(vm, &parsed.eth, &parsed.packet) {
            return Verdict::Pass;
        }
        match vm.announcing_port(&self.cfg) {
            // Not known: the copy on synjitsu's port decides, unless the port is named
            // before that copy is read.
            None => {
                vm.unjudged_from = Some(port.to_string());
                Verdict::Pass
            }
            Some(own) if own == port => {
                vm.announced(&self.cfg, &mut self.out, now);
                Verdict::Announced
            }
            Some(own) => {
                if let Some(suppressed) = self.spoof_log.allow(now) {
                    tracing::warn!(
                        vm = %vm.id.name,
                        from = port,
                        guest_port = own,
                        suppressed,
                        "announcement for a guest from another port than its own: refused"
                    );
                }
                Verdict::Drop(DropReason::SpoofedAnnouncement)
            }
        }
    }

    /// A frame nothing else kept: if it is for a guest synjitsu stands in for and whose port
    /// it knows, it goes there (its checksum completed if the sender left it to offload: a
    /// frame written to a port carries no offload state).
    pub(super) fn pass_to_guest(
        &mut self,
        frame: &[u8],
        eth: &EthHeader,
        meta: FrameMeta,
    ) -> Verdict {
        let Some(vm) = self.vms.with_mac_mut(eth.dst) else {
            return Verdict::Pass;
        };
        // Only while the bridge sends the guest's frames here.
        if !vm.steered && vm.release_pending.is_none() {
            return Verdict::Pass;
        }
        let Some(port) = vm.guest_port() else {
            return Verdict::Pass;
        };
        let mut copy = frame.to_vec();
        if meta.checksum == Checksum::Partial && wire::complete_transport_checksum(&mut copy) {
            self.out.counters.checksums_completed += 1;
        }
        let port = port.to_string();
        if self.out.queue_to_guest(&port, copy) {
            Verdict::ToGuest
        } else {
            Verdict::Pass
        }
    }
}
