//! Counters a person would graph, and the tiny HTTP responder that serves them in the
//! Prometheus text format at `GET /metrics`.
//!
//! Owns the metric set (atomics, cheap enough for the DNS fast path) and its rendering. It
//! does not decide what to count: the DNS handler and the daemon call the `add_*` methods.

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::config::StopMode;
use crate::fleet::Refusal;

/// How a query ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// A VM's address, at once (the VM ran).
    Answer,
    /// A VM's address after waiting for its boot, resume or unpause.
    AnswerAfterBoot,
    /// A VM name, another type: empty NOERROR.
    NoData,
    /// SOA, NS or the NS name's address.
    Zone,
    /// A name inside an owned zone that does not exist.
    NxDomain,
    /// Relayed to a forwarder.
    Forwarded,
    /// Outside the zones, forwarding off (or another class).
    Refused,
    /// Malformed or more than one question.
    FormErr,
    /// A limit, a failed boot, an overload or a failed forward.
    ServFail,
    /// An opcode other than QUERY.
    NotImp,
}

const OUTCOMES: [(Outcome, &str); 10] = [
    (Outcome::Answer, "answer"),
    (Outcome::AnswerAfterBoot, "answer_after_boot"),
    (Outcome::NoData, "nodata"),
    (Outcome::Zone, "zone"),
    (Outcome::NxDomain, "nxdomain"),
    (Outcome::Forwarded, "forwarded"),
    (Outcome::Refused, "refused"),
    (Outcome::FormErr, "formerr"),
    (Outcome::ServFail, "servfail"),
    (Outcome::NotImp, "notimp"),
];

/// Upper bounds of the boot-to-ready histogram, in seconds.
const BOOT_BUCKETS: [f64; 12] = [
    0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
];

const STOP_MODES: [StopMode; 3] = [StopMode::Destroy, StopMode::Suspend, StopMode::Shutdown];
const LIMITS: [Refusal; 2] = [Refusal::MaxRunning, Refusal::BootRate];

/// Every metric of jitsu-dns.
#[derive(Debug, Default)]
pub struct Metrics {
    queries: [AtomicU64; OUTCOMES.len()],
    boots: AtomicU64,
    boot_failures: AtomicU64,
    resumes: AtomicU64,
    boot_buckets: [AtomicU64; BOOT_BUCKETS.len()],
    boot_count: AtomicU64,
    boot_sum_us: AtomicU64,
    running: AtomicU64,
    stops: [AtomicU64; STOP_MODES.len()],
    limit_refusals: [AtomicU64; LIMITS.len()],
    forward_failures: AtomicU64,
    synjitsu_connected: AtomicU64,
    store_dropped: AtomicU64,
    store_write_failures: AtomicU64,
    store_healthy: AtomicU64,
    /// Unix milliseconds of the oldest change the store has not committed; 0: none.
    store_pending_since_ms: AtomicU64,
    backend_events: AtomicU64,
    state_polls: AtomicU64,
}

impl Metrics {
    /// All zero.
    pub fn new() -> Metrics {
        Metrics::default()
    }

    /// One query ended with `o`.
    pub fn add_query(&self, o: Outcome) {
        let i = OUTCOMES
            .iter()
            .position(|(x, _)| *x == o)
            .expect("every outcome is listed");
        self.queries[i].fetch_add(1, Relaxed);
    }

    /// Queries that ended with `o` so far.
    pub fn queries(&self, o: Outcome) -> u64 {
        let i = OUTCOMES
            .iter()
            .position(|(x, _)| *x == o)
            .expect("every outcome is listed");
        self.queries[i].load(Relaxed)
    }

    /// A boot began.
    pub fn add_boot(&self) {
        self.boots.fetch_add(1, Relaxed);
    }

    /// A boot failed.
    pub fn add_boot_failure(&self) {
        self.boot_failures.fetch_add(1, Relaxed);
    }

    /// A resume or unpause began.
    pub fn add_resume(&self) {
        self.resumes.fetch_add(1, Relaxed);
    }

    /// A boot took `d` from its start to the VM being ready.
    pub fn observe_boot(&self, d: Duration) {
        let s = d.as_secs_f64();
        for (i, le) in BOOT_BUCKETS.iter().enumerate() {
            if s <= *le {
                self.boot_buckets[i].fetch_add(1, Relaxed);
            }
        }
        self.boot_count.fetch_add(1, Relaxed);
        self.boot_sum_us
            .fetch_add(u64::try_from(d.as_micros()).unwrap_or(u64::MAX), Relaxed);
    }

    /// VMs running now.
    pub fn set_running(&self, n: usize) {
        self.running.store(n as u64, Relaxed);
    }

    /// A stop in `mode` began.
    pub fn add_stop(&self, mode: StopMode) {
        let i = STOP_MODES
            .iter()
            .position(|m| *m == mode)
            .expect("every mode is listed");
        self.stops[i].fetch_add(1, Relaxed);
    }

    /// A query was refused by a limit.
    pub fn add_limit_refusal(&self, r: Refusal) {
        if let Some(i) = LIMITS.iter().position(|l| *l == r) {
            self.limit_refusals[i].fetch_add(1, Relaxed);
        }
    }

    /// Limit refusals so far.
    pub fn limit_refusals(&self) -> u64 {
        self.limit_refusals.iter().map(|a| a.load(Relaxed)).sum()
    }

    /// A forward found no answer.
    pub fn add_forward_failure(&self) {
        self.forward_failures.fetch_add(1, Relaxed);
    }

    /// The synjitsu client connected or lost its connection.
    pub fn set_synjitsu_connected(&self, up: bool) {
        self.synjitsu_connected.store(u64::from(up), Relaxed);
    }

    /// `n` state changes were not recorded (the store's queue was full, or git could not
    /// write).
    pub fn add_store_dropped(&self, n: u64) {
        self.store_dropped.fetch_add(n, Relaxed);
    }

    /// An attempt to write the state store failed.
    pub fn add_state_write_failure(&self) {
        self.store_write_failures.fetch_add(1, Relaxed);
    }

    /// The state store records every change (true), or has lost some since its last
    /// failure and not yet rewritten the whole state (false).
    pub fn set_state_store_healthy(&self, healthy: bool) {
        self.store_healthy.store(u64::from(healthy), Relaxed);
    }

    /// The oldest change the store has not committed was made at `since` (`None`: it is up
    /// to date).
    pub fn set_state_pending_since(&self, since: Option<SystemTime>) {
        let ms = since
            .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
            .map_or(0, |d| {
                u64::try_from(d.as_millis()).unwrap_or(u64::MAX).max(1)
            });
        self.store_pending_since_ms.store(ms, Relaxed);
    }

    /// How far the store is behind at `now`, in seconds.
    fn state_lag(&self, now: SystemTime) -> f64 {
        let since = self.store_pending_since_ms.load(Relaxed);
        let now_ms = now
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
        if since == 0 {
            return 0.0;
        }
        now_ms.saturating_sub(since) as f64 / 1e3
    }

    /// The backend pushed a lifecycle change (a libvirt event).
    pub fn add_backend_event(&self) {
        self.backend_events.fetch_add(1, Relaxed);
    }

    /// A VM's state was polled from the backend.
    pub fn add_state_poll(&self) {
        self.state_polls.fetch_add(1, Relaxed);
    }

    /// The Prometheus text exposition.
    pub fn render(&self) -> String {
        self.render_at(SystemTime::now())
    }

    /// The exposition, with ages taken at `now`.
    fn render_at(&self, now: SystemTime) -> String {
        let mut o = String::with_capacity(4096);
        family(
            &mut o,
            "jitsu_dns_queries_total",
            "counter",
            "DNS queries by outcome.",
        );
        for ((_, label), n) in OUTCOMES.iter().zip(&self.queries) {
            let _ = writeln!(
                o,
                "jitsu_dns_queries_total{{outcome=\"{label}\"}} {}",
                n.load(Relaxed)
            );
        }
        counter(
            &mut o,
            "jitsu_dns_forwarded_queries_total",
            "Queries relayed to a forwarder.",
            self.queries(Outcome::Forwarded),
        );
        counter(
            &mut o,
            "jitsu_dns_forward_failures_total",
            "Forwarded queries no forwarder answered.",
            self.forward_failures.load(Relaxed),
        );
        counter(
            &mut o,
            "jitsu_dns_boots_total",
            "VM boots begun.",
            self.boots.load(Relaxed),
        );
        counter(
            &mut o,
            "jitsu_dns_boot_failures_total",
            "VM boots that failed.",
            self.boot_failures.load(Relaxed),
        );
        counter(
            &mut o,
            "jitsu_dns_resumes_total",
            "Resumes and unpauses begun.",
            self.resumes.load(Relaxed),
        );
        family(
            &mut o,
            "jitsu_dns_boot_to_ready_seconds",
            "histogram",
            "Time from a boot's start to the VM being ready (masking condition met).",
        );
        for (le, n) in BOOT_BUCKETS.iter().zip(&self.boot_buckets) {
            let _ = writeln!(
                o,
                "jitsu_dns_boot_to_ready_seconds_bucket{{le=\"{le}\"}} {}",
                n.load(Relaxed)
            );
        }
        let count = self.boot_count.load(Relaxed);
        let _ = writeln!(
            o,
            "jitsu_dns_boot_to_ready_seconds_bucket{{le=\"+Inf\"}} {count}\n\
             jitsu_dns_boot_to_ready_seconds_sum {}\n\
             jitsu_dns_boot_to_ready_seconds_count {count}",
            self.boot_sum_us.load(Relaxed) as f64 / 1e6
        );
        gauge(
            &mut o,
            "jitsu_dns_vms_running",
            "VMs running now.",
            self.running.load(Relaxed),
        );
        family(
            &mut o,
            "jitsu_dns_stops_total",
            "counter",
            "VM stops begun, by stop mode.",
        );
        for (m, n) in STOP_MODES.iter().zip(&self.stops) {
            let _ = writeln!(
                o,
                "jitsu_dns_stops_total{{mode=\"{m}\"}} {}",
                n.load(Relaxed)
            );
        }
        family(
            &mut o,
            "jitsu_dns_limit_refusals_total",
            "counter",
            "Queries refused (SERVFAIL) by a limit.",
        );
        for (l, n) in LIMITS.iter().zip(&self.limit_refusals) {
            let _ = writeln!(
                o,
                "jitsu_dns_limit_refusals_total{{limit=\"{}\"}} {}",
                l.as_str(),
                n.load(Relaxed)
            );
        }
        gauge(
            &mut o,
            "jitsu_dns_synjitsu_connected",
            "1 while connected to synjitsu.",
            self.synjitsu_connected.load(Relaxed),
        );
        counter(
            &mut o,
            "jitsu_dns_state_changes_dropped_total",
            "State changes not recorded (the store's queue was full, or git could not write); the whole state is rewritten once it can.",
            self.store_dropped.load(Relaxed),
        );
        counter(
            &mut o,
            "jitsu_dns_state_write_failures_total",
            "Attempts to write the state store that failed (each retried).",
            self.store_write_failures.load(Relaxed),
        );
        gauge(
            &mut o,
            "jitsu_dns_state_store_healthy",
            "1 while the state store records every change; 0 from a failed write until the whole state is rewritten.",
            self.store_healthy.load(Relaxed),
        );
        family(
            &mut o,
            "jitsu_dns_state_store_lag_seconds",
            "gauge",
            "Age of the oldest change the state store has not committed (0: up to date).",
        );
        let _ = writeln!(
            o,
            "jitsu_dns_state_store_lag_seconds {}",
            self.state_lag(now)
        );
        counter(
            &mut o,
            "jitsu_dns_backend_events_total",
            "Lifecycle changes the backend pushed (libvirt events).",
            self.backend_events.load(Relaxed),
        );
        counter(
            &mut o,
            "jitsu_dns_backend_state_polls_total",
            "VM states polled from the backend (not done for backends that push events).",
            self.state_polls.load(Relaxed),
        );
        o
    }
}

/// The `# HELP` and `# TYPE` lines of the metric `name` of type `kind`.
fn family(o: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(o, "# HELP {name} {help}\n# TYPE {name} {kind}");
}

/// A counter without labels.
fn counter(o: &mut String, name: &str, help: &str, value: u64) {
    family(o, name, "counter", help);
    let _ = writeln!(o, "{name} {value}");
}

/// A gauge without labels.
fn gauge(o: &mut String, name: &str, help: &str, value: u64) {
    family(o, name, "gauge", help);
    let _ = writeln!(o, "{name} {value}");
}

/// Serves `GET /metrics` on `listener` until `stop` is cancelled. Anything else gets 404;
/// a client that sends nothing for 5 s is dropped.
pub async fn serve(listener: TcpListener, metrics: Arc<Metrics>, stop: CancellationToken) {
    loop {
        let (mut conn, _) = tokio::select! {
            biased;
            _ = stop.cancelled() => return,
            accepted = listener.accept() => match accepted {
                Ok(c) => c,
                Err(e) => {
                    tracing::debug!(error = %e, "metrics accept");
                    continue;
                }
            },
        };
        let metrics = metrics.clone();
        tokio::spawn(async move {
            let mut buf = Vec::with_capacity(1024);
            let mut chunk = [0u8; 1024];
            let read = tokio::time::timeout(Duration::from_secs(5), async {
                while !buf.windows(4).any(|w| w == b"\r\n\r\n") && buf.len() < 8192 {
                    match conn.read(&mut chunk).await {
                        Ok(0) | Err(_) => return false,
                        Ok(n) => buf.extend_from_slice(&chunk[..n]),
                    }
                }
                true
            })
            .await;
            if !matches!(read, Ok(true)) {
                return;
            }
            let request_line = String::from_utf8_lossy(&buf);
            let mut words = request_line.split_whitespace();
            let (method, path) = (words.next().unwrap_or(""), words.next().unwrap_or(""));
            let response = if method == "GET"
                && (path == "/metrics" || path.starts_with("/metrics?"))
            {
                let body = metrics.render();
                format!(
                    "HTTP/1.1 200 OK\r\nContent-Type: text/plain; version=0.0.4; charset=utf-8\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                )
            } else {
                let body = "not found: try GET /metrics\n";
                format!(
                    "HTTP/1.1 404 Not Found\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                )
            };
            let _ = conn.write_all(response.as_bytes()).await;
            let _ = conn.shutdown().await;
        });
    }
}

/// Binds the metrics listener.
pub async fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    TcpListener::bind(addr).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_prometheus_text() {
        let m = Metrics::new();
        m.add_query(Outcome::Answer);
        m.add_query(Outcome::Answer);
        m.add_query(Outcome::Forwarded);
        m.add_boot();
        m.observe_boot(Duration::from_millis(120));
        m.add_stop(StopMode::Suspend);
        m.add_limit_refusal(Refusal::BootRate);
        m.add_limit_refusal(Refusal::BootFailed);
        m.set_running(3);
        m.set_synjitsu_connected(true);
        m.add_backend_event();
        m.add_state_poll();
        m.add_state_poll();
        m.add_store_dropped(3);
        m.add_state_write_failure();
        m.set_state_store_healthy(true);
        let now = UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        m.set_state_pending_since(Some(now - Duration::from_millis(1500)));
        let t = m.render_at(now);
        for want in [
            "jitsu_dns_queries_total{outcome=\"answer\"} 2",
            "jitsu_dns_queries_total{outcome=\"forwarded\"} 1",
            "jitsu_dns_forwarded_queries_total 1",
            "jitsu_dns_boots_total 1",
            "jitsu_dns_boot_to_ready_seconds_bucket{le=\"0.1\"} 0",
            "jitsu_dns_boot_to_ready_seconds_bucket{le=\"0.25\"} 1",
            "jitsu_dns_boot_to_ready_seconds_bucket{le=\"+Inf\"} 1",
            "jitsu_dns_boot_to_ready_seconds_sum 0.12",
            "jitsu_dns_boot_to_ready_seconds_count 1",
            "jitsu_dns_vms_running 3",
            "jitsu_dns_stops_total{mode=\"suspend\"} 1",
            "jitsu_dns_limit_refusals_total{limit=\"boot_rate\"} 1",
            "jitsu_dns_limit_refusals_total{limit=\"max_running\"} 0",
            "jitsu_dns_synjitsu_connected 1",
            "jitsu_dns_backend_events_total 1",
            "jitsu_dns_backend_state_polls_total 2",
            "jitsu_dns_state_changes_dropped_total 3",
            "jitsu_dns_state_write_failures_total 1",
            "jitsu_dns_state_store_healthy 1",
            "jitsu_dns_state_store_lag_seconds 1.5",
            "# TYPE jitsu_dns_boot_to_ready_seconds histogram",
        ] {
            assert!(t.lines().any(|l| l == want), "missing {want:?} in\n{t}");
        }
        assert_eq!(m.limit_refusals(), 1, "a failed boot is not a limit");
        // Every sample line is `name{labels} value` with a number.
        for l in t.lines().filter(|l| !l.starts_with('#')) {
            let v = l.rsplit(' ').next().unwrap();
            assert!(v.parse::<f64>().is_ok(), "{l}");
        }
    }

    #[tokio::test(flavor = "current_thread")]
    async fn serves_get_metrics_and_404s_the_rest() {
        let l = bind("127.0.0.1:0".parse().unwrap()).await.unwrap();
        let addr = l.local_addr().unwrap();
        let m = Arc::new(Metrics::new());
        m.add_boot();
        let stop = CancellationToken::new();
        let server = tokio::spawn(serve(l, m, stop.clone()));
        let get = |path: &'static str| async move {
            let mut c = tokio::net::TcpStream::connect(addr).await.unwrap();
            c.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes())
                .await
                .unwrap();
            let mut s = String::new();
            c.read_to_string(&mut s).await.unwrap();
            s
        };
        let ok = get("/metrics").await;
        assert!(ok.starts_with("HTTP/1.1 200 OK"), "{ok}");
        assert!(ok.contains("jitsu_dns_boots_total 1"));
        assert!(get("/").await.starts_with("HTTP/1.1 404"));
        stop.cancel();
        server.await.unwrap();
    }
}
