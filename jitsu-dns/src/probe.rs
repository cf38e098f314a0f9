//! Probing a booting guest's TCP port from the host (`wait_for=tcp:PORT`): readiness of an
//! unmodified guest, without synjitsu and without a key written by the guest.
//!
//! Owns one probe task per booting VM: it connects to the guest's address and port, and on
//! a refusal (nothing listens yet: the guest's RST comes back at once) or an attempt that
//! takes longer than [`ATTEMPT`] (the SYN was lost or its ARP is still unanswered) tries
//! again [`EVERY`] after the last try began, until a connection is accepted, which it closes
//! at once and reports as [`Event::PortOpened`], or the fleet's deadline passes. It decides
//! nothing: the fleet answers at `wait_for_timeout` whether a probe reported or not.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio::task::AbortHandle;

use crate::fleet::{Event, VmName};

/// How often a new attempt starts: "every few milliseconds", so the answer trails the
/// guest's `listen` by at most this much plus one round trip on the bridge.
pub const EVERY: Duration = Duration::from_millis(5);

/// How long one attempt may take before it is given up for a new one. A SYN that reaches a
/// guest is answered within a bridge's round trip; one that was lost would be retransmitted
/// by the kernel only after a second.
pub const ATTEMPT: Duration = Duration::from_millis(100);

/// The probe tasks, one per VM at most.
#[derive(Debug)]
pub struct Prober {
    events: mpsc::Sender<Event>,
    tasks: HashMap<VmName, AbortHandle>,
}

impl Prober {
    /// Reports to `events`.
    pub fn new(events: mpsc::Sender<Event>) -> Prober {
        Prober {
            events,
            tasks: HashMap::new(),
        }
    }

    /// Probes `addr` for `vm` until it accepts a connection or `until`, replacing an earlier
    /// probe of the VM's.
    pub fn probe(&mut self, vm: VmName, addr: SocketAddr, until: Instant) {
        self.stop(&vm);
        let events = self.events.clone();
        let name = vm.clone();
        let task = tokio::spawn(async move {
            let mut attempts = 0u64;
            let mut next = Instant::now();
            while next < until {
                attempts += 1;
                let attempt = tokio::time::timeout(ATTEMPT, TcpStream::connect(addr)).await;
                if let Ok(Ok(stream)) = attempt {
                    drop(stream);
                    tracing::debug!(vm = %name, %addr, attempts, "the guest accepts connections");
                    let _ = events.send(Event::PortOpened { vm: name }).await;
                    return;
                }
                next += EVERY;
                tokio::time::sleep_until(next.max(Instant::now()).into()).await;
            }
            tracing::debug!(vm = %name, %addr, attempts, "the guest's port did not open in time");
        });
        self.tasks.insert(vm, task.abort_handle());
    }

    /// Stops probing for `vm`.
    pub fn stop(&mut self, vm: &VmName) {
        if let Some(t) = self.tasks.remove(vm) {
            t.abort();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A prober, its events, and a local port nobody listens on (taken, then freed).
    fn setup() -> (Prober, mpsc::Receiver<Event>, SocketAddr) {
        let (tx, rx) = mpsc::channel(4);
        let addr = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap();
        (Prober::new(tx), rx, addr)
    }

    #[tokio::test]
    async fn a_port_that_opens_late_is_reported_once_it_listens() {
        let (mut p, mut rx, addr) = setup();
        p.probe("www".into(), addr, Instant::now() + Duration::from_secs(10));
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(rx.try_recv().is_err(), "reported before anything listened");
        let listening = tokio::net::TcpListener::bind(addr).await.unwrap();
        let since = Instant::now();
        let ev = tokio::time::timeout(Duration::from_secs(5), rx.recv())
            .await
            .expect("reported once it listened");
        assert_eq!(ev, Some(Event::PortOpened { vm: "www".into() }));
        assert!(since.elapsed() < Duration::from_secs(1));
        drop(listening);
    }

    #[tokio::test]
    async fn a_probe_ends_at_its_deadline_without_a_report() {
        let (mut p, mut rx, addr) = setup();
        p.probe(
            "www".into(),
            addr,
            Instant::now() + Duration::from_millis(30),
        );
        // The task ends, dropping its sender: the channel closes with nothing in it.
        drop(p);
        let ev = tokio::time::timeout(Duration::from_secs(5), rx.recv())
            .await
            .expect("the probe ended");
        assert_eq!(ev, None);
    }
}
