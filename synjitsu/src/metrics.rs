//! synjitsu's metrics, built from the core's [`Counters`] and the shell's [`ShellStats`] at
//! each scrape, and the page that serves them at `GET /metrics` (through `shared_io::http`).
//!
//! Owns the metric names, help texts and labels. The core lives in the daemon's loop, so a
//! scrape asks the loop for a snapshot ([`Scrapes`]): the loop fills a fresh
//! `prometheus-client` registry with the values of the moment ([`render`]), and the page is
//! encoded off the loop. A VM that is gone is gone from the next scrape.

use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use shared_io::http::{Handler, Response};
use tokio::sync::{mpsc, oneshot};

use crate::hold::{Counters, DropReason, Hold, Verdict, VmPhase};

/// What the shell counts (the core counts the rest).
#[derive(Debug, Clone, Default)]
pub struct ShellStats {
    /// Frames sent on the port.
    pub tx_frames: u64,
    /// Sends that failed.
    pub tx_errors: u64,
    /// Frames received longer than the receive buffer (dropped).
    pub rx_truncated: u64,
    /// Frames this host sent, seen on the socket (ignored).
    pub rx_outgoing: u64,
    /// Frames the kernel dropped because a socket buffer of synjitsu's was full (its port's
    /// or the announcement watcher's).
    pub kernel_drops: u64,
    /// Forwarding-table commands (and writes of their record) that failed.
    pub fdb_errors: u64,
    /// Forwarding entries added or removed as the core asked.
    pub fdb_changes: u64,
    /// Forwarding-table changes tried again after a failure.
    pub fdb_retries: u64,
    /// Releases the loop made itself, in the turn that asked for them.
    pub fdb_releases_now: u64,
    /// Reconciles of the forwarding table with what synjitsu wants.
    pub fdb_reconciles: u64,
    /// Forwarding entries a reconcile added, moved back or removed.
    pub fdb_reconcile_fixes: u64,
    /// MACs whose wanted forwarding entry is not known to be on the bridge yet.
    pub fdb_pending: u64,
    /// Whether steering entries are sticky (the kernel keeps `NTF_STICKY`).
    pub fdb_sticky: bool,
    /// Xenstore resets and removals that failed.
    pub store_errors: u64,
    /// Events produced while no control client was attached.
    pub events_undelivered: u64,
}

/// A counter family: its name, help, label, and each value of the label with its count.
type Labelled<'a> = (&'a str, &'a str, &'static str, &'a [(&'static str, u64)]);

/// Every metric's value now (each name prefixed `synjitsu_`); `client_attached` says
/// whether a control client is attached.
pub fn render(core: &Hold, shell: &ShellStats, client_attached: bool) -> Registry {
    use shared_io::metrics::{counter, counters, gauge};
    let c: &Counters = core.counters();
    let mut r = Registry::with_prefix("synjitsu");
    let drops: Vec<_> = DropReason::all()
        .map(|d| (d.as_str(), c.drops_for(d)))
        .collect();
    #[rustfmt::skip]
    let labelled: [Labelled<'_>; 7] = [
        ("frames", "Frames received on synjitsu's port (and announcements judged by the watcher), by what became of them", "verdict",
            &Verdict::LABELS.into_iter().zip(c.frames).collect::<Vec<_>>()),
        ("dropped", "Frames and held SYNs dropped, by reason", "reason", &drops),
        ("syns_handed_over", "Held SYNs handed over to their guest, by way", "via",
            &[("wire", c.handed_over_wire), ("xenstore", c.handed_over_xenstore)]),
        ("rsts_sent", "RSTs sent to clients for held SYNs, by reason", "reason",
            &[("hold_timeout", c.rst_hold_timeout), ("vm_forgotten", c.rst_vm_forgotten)]),
        ("arp_sent", "ARP frames sent, by kind", "kind",
            &[("gratuitous", c.garp_sent), ("reply", c.arp_replies)]),
        ("na_sent", "IPv6 neighbour advertisements sent, by kind", "kind",
            &[("unsolicited", c.na_unsolicited), ("solicited", c.na_solicited)]),
        ("queue_overflows", "Outputs not queued because their bounded queue was full, by queue", "queue",
            &[("transmit", c.transmit_overflow), ("events", c.events_overflow),
              ("store", c.store_overflow), ("to_guest", c.to_guest_overflow)]),
    ];
    for (name, help, label, samples) in labelled {
        let values: Vec<_> = samples.iter().map(|(v, _)| *v).collect();
        for (counter, (_, n)) in counters(&mut r, name, help, label, &values)
            .iter()
            .zip(samples)
        {
            counter.inc_by(*n);
        }
    }
    #[rustfmt::skip]
    let unlabelled = [
        ("syns_held", "Client SYNs held", c.syns_held),
        ("syn_retransmits_deduplicated", "Retransmitted SYNs (same 4-tuple and ISN) not held twice", c.retransmit_dedup),
        ("checksums_completed", "Partial (offload-pending) checksums completed before holding a SYN or passing a frame to its guest", c.checksums_completed),
        ("announcement_watcher_frames", "Gratuitous ARPs and unsolicited NAs seen arriving on any bridge port (the watcher that checks a guest announces from its own)", c.ingress_frames),
        ("probes_sent", "Probe SYNs sent to guests", c.probes_sent),
        ("probe_resets", "RSTs sent to close a probe the guest accepted", c.probe_resets),
        ("resend_batches", "Batches of held SYNs re-sent to guests at their pace", c.resend_batches),
        ("pace_probes", "Probes sent behind a batch of re-sent SYNs, to pace the next", c.pace_probes),
        ("wake_requests", "Wake requests sent for stopped VMs", c.wake_requests),
        ("guests_announced", "Guests seen announcing themselves (gratuitous ARP or NA)", c.guests_announced),
        ("xenstore_writes", "Held SYNs written to Xenstore", c.xenstore_writes),
        ("xenstore_errors", "Xenstore operations that failed", c.xenstore_errors + shell.store_errors),
        ("xenstore_skipped_managed", "Xenstore writes skipped: the guest marked its address managed", c.xenstore_skipped_managed),
        ("tx_frames", "Frames sent", shell.tx_frames),
        ("tx_errors", "Frame sends that failed", shell.tx_errors),
        ("rx_truncated", "Frames longer than the receive buffer (dropped)", shell.rx_truncated),
        ("rx_outgoing", "This host's own transmissions seen on the socket (ignored)", shell.rx_outgoing),
        ("kernel_drops", "Frames the kernel dropped because a socket buffer of synjitsu's (its port's, the announcement watcher's) was full", shell.kernel_drops),
        ("fdb_errors", "Bridge forwarding-table commands that failed (each is retried)", shell.fdb_errors),
        ("fdb_changes", "Bridge forwarding entries added or removed as VMs were steered and released", shell.fdb_changes),
        ("fdb_retries", "Bridge forwarding-table changes tried again after a failure", shell.fdb_retries),
        ("fdb_releases_now", "Releases of a guest's forwarding entry made by the loop itself, in the turn that asked for them (also in fdb_changes)", shell.fdb_releases_now),
        ("fdb_reconciles", "Comparisons of the bridge's forwarding table (a dump) with what synjitsu wants", shell.fdb_reconciles),
        ("fdb_reconcile_fixes", "Bridge forwarding entries a reconcile added, moved back or removed", shell.fdb_reconcile_fixes),
        ("events_undelivered", "Events produced while no control client was attached", shell.events_undelivered),
    ];
    for (name, help, n) in unlabelled {
        counter(&mut r, name, help).inc_by(n);
    }
    #[rustfmt::skip]
    let gauges = [
        ("control_client_attached", "1 while a control client is attached", usize::from(client_attached)),
        ("held_syns", "SYNs held now, in total", core.held_now()),
        ("held_bytes", "Bytes the held SYNs (and those queued for re-sending) are charged now, bounded by held_bytes_budget", core.held_bytes_now()),
        ("held_bytes_budget", "Bytes the held SYNs may take in total (--max-held-bytes)", core.config().held_bytes),
        ("held_bytes_budget_per_vm", "Bytes the SYNs held for one VM may take (--max-held-bytes-per-vm)", core.config().held_bytes_per_vm),
        ("fdb_pending", "MACs whose wanted forwarding entry is not known to be on the bridge yet", usize::try_from(shell.fdb_pending).unwrap_or(usize::MAX)),
        ("fdb_sticky", "1 if steering entries are sticky (kept on synjitsu's port whatever port the MAC sends from)", usize::from(shell.fdb_sticky)),
    ];
    for (name, help, n) in gauges {
        gauge(&mut r, name, help).set(i64::try_from(n).unwrap_or(i64::MAX));
    }
    let phases = Family::<[(&'static str, String); 2], Gauge>::default();
    let held = Family::<[(&'static str, String); 1], Gauge>::default();
    for (name, phase, n) in core.vms() {
        for p in VmPhase::ALL {
            let labels = [("vm", name.to_string()), ("phase", p.as_str().to_string())];
            phases.get_or_create(&labels).set(i64::from(p == phase));
        }
        held.get_or_create(&[("vm", name.to_string())])
            .set(i64::try_from(n).unwrap_or(i64::MAX));
    }
    r.register("vm_phase", "1 for each known VM's current phase", phases);
    r.register("vm_held_syns", "SYNs held now, per VM", held);
    r
}

/// The metrics page: each scrape asks the daemon's loop, where the core lives, for a
/// [`render`]ing through `ask`.
#[derive(Debug)]
pub struct Scrapes {
    ask: mpsc::Sender<oneshot::Sender<Registry>>,
}

impl Scrapes {
    /// Scrapes through `ask`.
    pub fn new(ask: mpsc::Sender<oneshot::Sender<Registry>>) -> Scrapes {
        Scrapes { ask }
    }
}

/// The metrics address serves `/metrics` and nothing else.
impl Handler for Scrapes {
    async fn get(&self, path: &str) -> Option<Response> {
        if path != shared_io::metrics::PATH {
            return None;
        }
        let (tx, rx) = oneshot::channel();
        // A loop that has stopped leaves an empty page rather than none.
        let registry = match self.ask.send(tx).await {
            Ok(()) => rx.await.unwrap_or_default(),
            Err(_) => Registry::default(),
        };
        Some(shared_io::metrics::response(&registry))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hold::tests::{booting, core};
    use crate::hold::{Checksum, FrameMeta};
    use crate::wire::tests::SYN_V4_PARTIAL;
    use shared_proto::Handover;

    #[test]
    fn every_family_has_help_and_type_and_values_parse() {
        let mut h = core();
        let now = std::time::Instant::now();
        booting(&mut h, now, Handover::Wire);
        h.on_frame(
            now,
            &SYN_V4_PARTIAL,
            FrameMeta {
                checksum: Checksum::Partial,
            },
        );
        h.on_frame(now, &[0u8; 3], FrameMeta::default());
        let text = shared_io::metrics::text(&render(&h, &ShellStats::default(), false)).unwrap();
        let mut families = 0;
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                families += 1;
                assert!(
                    rest.ends_with(" counter") || rest.ends_with(" gauge"),
                    "{line}"
                );
                continue;
            }
            if line.starts_with('#') {
                continue;
            }
            let (_, value) = line.rsplit_once(' ').expect("name value");
            value.parse::<f64>().unwrap_or_else(|_| panic!("{line}"));
        }
        assert!(families > 20);
        assert!(text.contains("synjitsu_frames_total{verdict=\"held\"} 1"));
        assert!(text.contains("synjitsu_dropped_total{reason=\"truncated_ethernet\"} 1"));
        assert!(text.contains("synjitsu_checksums_completed_total 1"));
        assert!(text.contains("synjitsu_vm_phase{vm=\"www\",phase=\"booting\"} 1"));
        assert!(text.contains("synjitsu_vm_held_syns{vm=\"www\"} 1"));
        assert!(text.contains("synjitsu_held_syns 1"));
        assert!(text.contains(&format!("synjitsu_held_bytes {}", h.held_bytes_now())));
        assert!(h.held_bytes_now() > 0);
    }
}
