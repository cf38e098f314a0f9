//! Metrics in the Prometheus text format (version 0.0.4), and a tiny HTTP responder that
//! serves them at `GET /metrics`.
//!
//! Owns the metric names, help texts and labels, and rendering them from the core's
//! [`Counters`] and the shell's [`ShellStats`]. The responder asks the daemon's loop for a
//! fresh rendering per request (the core lives there); it serves nothing else, one request
//! per connection, with bounded reads and a timeout.

use std::fmt::Write as _;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

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
    /// Frames the kernel dropped because synjitsu's socket buffer was full.
    pub kernel_drops: u64,
    /// Forwarding-table commands (and writes of their record) that failed.
    pub fdb_errors: u64,
    /// Forwarding entries added or removed as the core asked.
    pub fdb_changes: u64,
    /// Forwarding-table changes tried again after a failure.
    pub fdb_retries: u64,
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
    /// Events produced while no client was attached.
    pub events_undelivered: u64,
}

fn counter(out: &mut String, name: &str, help: &str, value: u64) {
    let _ = writeln!(
        out,
        "# HELP {name} {help}\n# TYPE {name} counter\n{name} {value}"
    );
}

fn family(out: &mut String, name: &str, help: &str, kind: &str) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
}

/// Renders every metric; `client_attached` says whether a control client is attached.
pub fn render(core: &Hold, shell: &ShellStats, client_attached: bool) -> String {
    let c: &Counters = core.counters();
    let mut o = String::with_capacity(8192);
    family(
        &mut o,
        "synjitsu_frames_total",
        "Frames received on synjitsu's port, by what became of them.",
        "counter",
    );
    for (label, v) in Verdict::LABELS.iter().zip(c.frames) {
        let _ = writeln!(o, "synjitsu_frames_total{{verdict=\"{label}\"}} {v}");
    }
    family(
        &mut o,
        "synjitsu_dropped_total",
        "Frames and held SYNs dropped, by reason.",
        "counter",
    );
    for r in DropReason::all() {
        let _ = writeln!(
            o,
            "synjitsu_dropped_total{{reason=\"{}\"}} {}",
            r.as_str(),
            c.drops_for(r)
        );
    }
    counter(
        &mut o,
        "synjitsu_syns_held_total",
        "Client SYNs held.",
        c.syns_held,
    );
    family(
        &mut o,
        "synjitsu_syns_handed_over_total",
        "Held SYNs handed over to their guest, by way.",
        "counter",
    );
    let _ = writeln!(
        o,
        "synjitsu_syns_handed_over_total{{via=\"wire\"}} {}\nsynjitsu_syns_handed_over_total{{via=\"xenstore\"}} {}",
        c.handed_over_wire, c.handed_over_xenstore
    );
    counter(
        &mut o,
        "synjitsu_syn_retransmits_deduplicated_total",
        "Retransmitted SYNs (same 4-tuple and ISN) not held twice.",
        c.retransmit_dedup,
    );
    counter(
        &mut o,
        "synjitsu_checksums_completed_total",
        "Partial (offload-pending) TCP checksums completed before holding.",
        c.checksums_completed,
    );
    family(
        &mut o,
        "synjitsu_rsts_sent_total",
        "RSTs sent to clients for held SYNs, by reason.",
        "counter",
    );
    let _ = writeln!(
        o,
        "synjitsu_rsts_sent_total{{reason=\"hold_timeout\"}} {}\nsynjitsu_rsts_sent_total{{reason=\"vm_forgotten\"}} {}",
        c.rst_hold_timeout, c.rst_vm_forgotten
    );
    family(
        &mut o,
        "synjitsu_arp_sent_total",
        "ARP frames sent, by kind.",
        "counter",
    );
    let _ = writeln!(
        o,
        "synjitsu_arp_sent_total{{kind=\"gratuitous\"}} {}\nsynjitsu_arp_sent_total{{kind=\"reply\"}} {}",
        c.garp_sent, c.arp_replies
    );
    family(
        &mut o,
        "synjitsu_na_sent_total",
        "IPv6 neighbour advertisements sent, by kind.",
        "counter",
    );
    let _ = writeln!(
        o,
        "synjitsu_na_sent_total{{kind=\"unsolicited\"}} {}\nsynjitsu_na_sent_total{{kind=\"solicited\"}} {}",
        c.na_unsolicited, c.na_solicited
    );
    counter(
        &mut o,
        "synjitsu_probes_sent_total",
        "Probe SYNs sent to guests.",
        c.probes_sent,
    );
    counter(
        &mut o,
        "synjitsu_probe_resets_total",
        "RSTs sent to close a probe the guest accepted.",
        c.probe_resets,
    );
    counter(
        &mut o,
        "synjitsu_wake_requests_total",
        "Wake requests sent for stopped VMs.",
        c.wake_requests,
    );
    counter(
        &mut o,
        "synjitsu_guests_announced_total",
        "Guests seen announcing themselves (gratuitous ARP or NA).",
        c.guests_announced,
    );
    counter(
        &mut o,
        "synjitsu_xenstore_writes_total",
        "Held SYNs written to Xenstore.",
        c.xenstore_writes,
    );
    counter(
        &mut o,
        "synjitsu_xenstore_errors_total",
        "Xenstore operations that failed.",
        c.xenstore_errors + shell.store_errors,
    );
    counter(
        &mut o,
        "synjitsu_xenstore_skipped_managed_total",
        "Xenstore writes skipped: the guest marked its address managed.",
        c.xenstore_skipped_managed,
    );
    family(
        &mut o,
        "synjitsu_queue_overflows_total",
        "Outputs not queued because their bounded queue was full, by queue.",
        "counter",
    );
    for (q, v) in [
        ("transmit", c.transmit_overflow),
        ("events", c.events_overflow),
        ("store", c.store_overflow),
    ] {
        let _ = writeln!(o, "synjitsu_queue_overflows_total{{queue=\"{q}\"}} {v}");
    }
    counter(
        &mut o,
        "synjitsu_tx_frames_total",
        "Frames sent.",
        shell.tx_frames,
    );
    counter(
        &mut o,
        "synjitsu_tx_errors_total",
        "Frame sends that failed.",
        shell.tx_errors,
    );
    counter(
        &mut o,
        "synjitsu_rx_truncated_total",
        "Frames longer than the receive buffer (dropped).",
        shell.rx_truncated,
    );
    counter(
        &mut o,
        "synjitsu_rx_outgoing_total",
        "This host's own transmissions seen on the socket (ignored).",
        shell.rx_outgoing,
    );
    counter(
        &mut o,
        "synjitsu_kernel_drops_total",
        "Frames the kernel dropped because synjitsu's socket buffer was full.",
        shell.kernel_drops,
    );
    counter(
        &mut o,
        "synjitsu_fdb_errors_total",
        "Bridge forwarding-table commands that failed (each is retried).",
        shell.fdb_errors,
    );
    counter(
        &mut o,
        "synjitsu_fdb_changes_total",
        "Bridge forwarding entries added or removed as VMs were steered and released.",
        shell.fdb_changes,
    );
    counter(
        &mut o,
        "synjitsu_fdb_retries_total",
        "Bridge forwarding-table changes tried again after a failure.",
        shell.fdb_retries,
    );
    counter(
        &mut o,
        "synjitsu_fdb_reconciles_total",
        "Comparisons of the bridge's forwarding table (a dump) with what synjitsu wants.",
        shell.fdb_reconciles,
    );
    counter(
        &mut o,
        "synjitsu_fdb_reconcile_fixes_total",
        "Bridge forwarding entries a reconcile added, moved back or removed.",
        shell.fdb_reconcile_fixes,
    );
    family(
        &mut o,
        "synjitsu_fdb_pending",
        "MACs whose wanted forwarding entry is not known to be on the bridge yet.",
        "gauge",
    );
    let _ = writeln!(o, "synjitsu_fdb_pending {}", shell.fdb_pending);
    family(
        &mut o,
        "synjitsu_fdb_sticky",
        "1 if steering entries are sticky (kept on synjitsu's port whatever port the MAC sends from).",
        "gauge",
    );
    let _ = writeln!(o, "synjitsu_fdb_sticky {}", u8::from(shell.fdb_sticky));
    counter(
        &mut o,
        "synjitsu_events_undelivered_total",
        "Events produced while no control client was attached.",
        shell.events_undelivered,
    );
    family(
        &mut o,
        "synjitsu_control_client_attached",
        "1 while a control client is attached.",
        "gauge",
    );
    let _ = writeln!(
        o,
        "synjitsu_control_client_attached {}",
        u8::from(client_attached)
    );
    family(
        &mut o,
        "synjitsu_held_syns",
        "SYNs held now, in total.",
        "gauge",
    );
    let _ = writeln!(o, "synjitsu_held_syns {}", core.held_now());
    family(
        &mut o,
        "synjitsu_vm_phase",
        "1 for each known VM's current phase.",
        "gauge",
    );
    for (name, phase, _) in core.vms() {
        for p in VmPhase::ALL {
            let _ = writeln!(
                o,
                "synjitsu_vm_phase{{vm=\"{name}\",phase=\"{}\"}} {}",
                p.as_str(),
                u8::from(p == phase)
            );
        }
    }
    family(
        &mut o,
        "synjitsu_vm_held_syns",
        "SYNs held now, per VM.",
        "gauge",
    );
    for (name, _, held) in core.vms() {
        let _ = writeln!(o, "synjitsu_vm_held_syns{{vm=\"{name}\"}} {held}");
    }
    o
}

/// Serves `GET /metrics` until `cancel`: each request asks the loop for a rendering through
/// `ask`. VM names need no escaping: they are `[A-Za-z0-9._-]` (shared-proto checks).
pub async fn serve(
    listener: TcpListener,
    ask: mpsc::Sender<oneshot::Sender<String>>,
    cancel: CancellationToken,
) {
    loop {
        let (mut stream, _) = tokio::select! {
            _ = cancel.cancelled() => return,
            r = listener.accept() => match r {
                Ok(s) => s,
                Err(e) => {
                    tracing::warn!(error = %e, "metrics accept failed");
                    continue;
                }
            },
        };
        let ask = ask.clone();
        tokio::spawn(async move {
            let _ = tokio::time::timeout(Duration::from_secs(5), async {
                let mut req = Vec::with_capacity(1024);
                let mut chunk = [0u8; 1024];
                // Only the request line and headers matter; 8 KiB is plenty.
                while !req.windows(4).any(|w| w == b"\r\n\r\n") && req.len() < 8192 {
                    match stream.read(&mut chunk).await {
                        Ok(0) | Err(_) => break,
                        Ok(n) => req.extend_from_slice(&chunk[..n]),
                    }
                }
                let line = req.split(|b| *b == b'\n').next().unwrap_or_default();
                let line = String::from_utf8_lossy(line);
                let mut words = line.split_whitespace();
                let (method, path) = (words.next(), words.next());
                let (status, body) = match (method, path) {
                    (Some("GET"), Some("/metrics")) => {
                        let (tx, rx) = oneshot::channel();
                        let body = match ask.send(tx).await {
                            Ok(()) => rx.await.unwrap_or_default(),
                            Err(_) => String::new(),
                        };
                        ("200 OK", body)
                    }
                    (Some("GET"), _) => ("404 Not Found", "try /metrics\n".to_string()),
                    _ => ("405 Method Not Allowed", "GET /metrics only\n".to_string()),
                };
                let head = format!(
                    "HTTP/1.1 {status}\r\nContent-Type: text/plain; version=0.0.4; charset=utf-8\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                    body.len()
                );
                let _ = stream.write_all(head.as_bytes()).await;
                let _ = stream.write_all(body.as_bytes()).await;
                let _ = stream.shutdown().await;
            })
            .await;
        });
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
        let text = render(&h, &ShellStats::default(), false);
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
    }
}
