//! Counters a person would graph, in a `prometheus-client` registry served at `GET /metrics`
//! (through `shared_io::http`).
//!
//! Owns the metric set: names, help texts, labels and buckets. Every counter is an atomic
//! held here directly (a labelled one is taken out of its family once, at start), so the DNS
//! fast path costs one atomic add and takes no lock. It does not decide what to count: the
//! DNS handler and the daemon call the `add_*` methods.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use shared_io::http::{Handler, Response};

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

/// Why a message got no answer at all.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dropped {
    /// Shorter than a DNS header: there is no id to answer with.
    Short,
    /// A response (QR set), never answered: answering would make jitsu-dns a reflector.
    Response,
    /// Over UDP while the bound on queries in flight was reached.
    Busy,
    /// From an address no answer can go to (port 0, a broadcast address).
    BadSource,
    /// Answered, but the kernel did not take the answer (a full send buffer: UDP answers
    /// are sent without waiting, as the kernel itself drops what does not fit).
    Unsent,
}

const DROPPED: [(Dropped, &str); 5] = [
    (Dropped::Short, "short"),
    (Dropped::Response, "response"),
    (Dropped::Busy, "busy"),
    (Dropped::BadSource, "bad_source"),
    (Dropped::Unsent, "unsent"),
];

/// Which bound closed a new DNS-over-TCP connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TcpLimit {
    /// `tcp_max_clients` connections were open.
    Total,
    /// `tcp_max_per_client` connections from the same client were open.
    PerClient,
}

const TCP_LIMITS: [(TcpLimit, &str); 2] = [
    (TcpLimit::Total, "total"),
    (TcpLimit::PerClient, "per_client"),
];

/// Upper bounds of the boot-to-ready histogram, in seconds.
const BOOT_BUCKETS: [f64; 12] = [
    0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
];

/// What became of a configuration change pushed to the store.
const CHANGE_OUTCOMES: [&str; 2] = ["applied", "refused"];

const STOP_MODES: [StopMode; 3] = [StopMode::Destroy, StopMode::Suspend, StopMode::Shutdown];
const LIMITS: [Refusal; 2] = [Refusal::MaxRunning, Refusal::BootRate];

/// Every metric of jitsu-dns, and the registry that exposes them (each name prefixed
/// `jitsu_dns_`).
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    /// In the order of [`OUTCOMES`].
    queries: Vec<Counter>,
    boots: Counter,
    boot_failures: Counter,
    resumes: Counter,
    boot_to_ready: Histogram,
    running: Gauge,
    /// In the order of [`STOP_MODES`].
    stops: Vec<Counter>,
    /// In the order of [`LIMITS`].
    limit_refusals: Vec<Counter>,
    forward_failures: Counter,
    synjitsu_connected: Gauge,
    store_dropped: Counter,
    store_write_failures: Counter,
    store_healthy: Gauge,
    /// Set from `store_pending_since_ms` when scraped.
    store_lag: Gauge<f64, AtomicU64>,
    /// Unix milliseconds of the oldest change the store has not committed; 0: none.
    store_pending_since_ms: AtomicU64,
    backend_events: Counter,
    state_polls: Counter,
    /// In the order of [`DROPPED`].
    dropped: Vec<Counter>,
    /// In the order of [`TCP_LIMITS`].
    tcp_refused: Vec<Counter>,
    tcp_connections: Gauge,
    forward_busy: Counter,
    forward_refused: Counter,
    /// In the order of [`CHANGE_OUTCOMES`].
    changes: Vec<Counter>,
    fast_answers: Counter,
}

impl Default for Metrics {
    fn default() -> Metrics {
        Metrics::new()
    }
}

impl Metrics {
    /// All zero, every labelled sample present from the start.
    pub fn new() -> Metrics {
        use shared_io::metrics::{counter, counters, gauge};
        let mut r = Registry::with_prefix("jitsu_dns");
        #[rustfmt::skip]
        let [queries, stops, limit_refusals, dropped, tcp_refused, changes] = [
            ("queries", "DNS queries by outcome", "outcome", &OUTCOMES.map(|(_, l)| l)[..]),
            ("stops", "VM stops begun, by stop mode", "mode", &STOP_MODES.map(StopMode::as_str)[..]),
            ("limit_refusals", "Queries refused (SERVFAIL) by a limit", "limit", &LIMITS.map(Refusal::as_str)[..]),
            ("dropped", "Messages given no answer at all, by reason", "reason", &DROPPED.map(|(_, l)| l)[..]),
            ("tcp_refused", "DNS-over-TCP connections closed at once, by the bound reached", "limit", &TCP_LIMITS.map(|(_, l)| l)[..]),
            ("changes", "Configuration changes pushed to the state store, applied or refused", "outcome", &CHANGE_OUTCOMES[..]),
        ]
        .map(|(name, help, label, values)| counters(&mut r, name, help, label, values));
        #[rustfmt::skip]
        let [forward_failures, boots, boot_failures, resumes, store_dropped, store_write_failures, backend_events, state_polls, forward_busy, forward_refused, fast_answers] = [
            ("forward_failures", "Forwarded queries no forwarder answered"),
            ("boots", "VM boots begun"),
            ("boot_failures", "VM boots that failed"),
            ("resumes", "Resumes and unpauses begun"),
            ("state_changes_dropped", "State changes not recorded: the store's queue was full or git could not write"),
            ("state_write_failures", "Attempts to write the state store that failed"),
            ("backend_events", "Lifecycle changes the backend pushed (libvirt events)"),
            ("backend_state_polls", "VM states polled from the backend (not done for backends that push events)"),
            ("forward_busy", "Queries outside the zones answered SERVFAIL at once: forward_max forwards were in flight"),
            ("forward_refused", "Queries outside the zones refused: the client may not use the forwarders"),
            ("fast_answers", "Running VMs' addresses answered over UDP from pre-encoded bytes (also counted in queries_total{outcome=\"answer\"})"),
        ]
        .map(|(name, help)| counter(&mut r, name, help));
        let running = gauge(&mut r, "vms_running", "VMs running now");
        let store_healthy = gauge(
            &mut r,
            "state_store_healthy",
            "0 from a failed state store write until the whole state is rewritten",
        );
        let store_lag = Gauge::<f64, AtomicU64>::default();
        r.register(
            "state_store_lag_seconds",
            "Age of the oldest state change not yet committed",
            store_lag.clone(),
        );
        let tcp_connections = gauge(
            &mut r,
            "tcp_connections",
            "DNS-over-TCP connections open now",
        );
        let synjitsu_connected = gauge(
            &mut r,
            "synjitsu_connected",
            "1 while connected to synjitsu",
        );
        let forwarded = OUTCOMES
            .iter()
            .position(|(o, _)| *o == Outcome::Forwarded)
            .expect("every outcome is listed");
        // The same atomic under a second name: forwards are graphed on their own.
        r.register(
            "forwarded_queries",
            "Queries relayed to a forwarder",
            queries[forwarded].clone(),
        );
        let boot_to_ready = Histogram::new(BOOT_BUCKETS);
        r.register(
            "boot_to_ready_seconds",
            "Time from a boot's start to the VM being ready (masking condition met)",
            boot_to_ready.clone(),
        );
        Metrics {
            registry: r,
            queries,
            boots,
            boot_failures,
            resumes,
            boot_to_ready,
            running,
            stops,
            limit_refusals,
            forward_failures,
            synjitsu_connected,
            store_dropped,
            store_write_failures,
            store_healthy,
            store_lag,
            store_pending_since_ms: AtomicU64::new(0),
            backend_events,
            state_polls,
            dropped,
            tcp_refused,
            tcp_connections,
            forward_busy,
            forward_refused,
            changes,
            fast_answers,
        }
    }

    /// A change pushed to the store was applied (true) or refused (false).
    pub fn add_change(&self, applied: bool) {
        self.changes[usize::from(!applied)].inc();
    }

    fn query_counter(&self, o: Outcome) -> &Counter {
        let i = OUTCOMES
            .iter()
            .position(|(x, _)| *x == o)
            .expect("every outcome is listed");
        &self.queries[i]
    }

    /// One query ended with `o`.
    pub fn add_query(&self, o: Outcome) {
        self.query_counter(o).inc();
    }

    /// A running VM's address was answered from pre-encoded bytes.
    pub fn add_fast_answer(&self) {
        self.fast_answers.inc();
    }

    /// Answers from pre-encoded bytes so far.
    pub fn fast_answers(&self) -> u64 {
        self.fast_answers.get()
    }

    /// Queries that ended with `o` so far.
    pub fn queries(&self, o: Outcome) -> u64 {
        self.query_counter(o).get()
    }

    /// A boot began.
    pub fn add_boot(&self) {
        self.boots.inc();
    }

    /// A boot failed.
    pub fn add_boot_failure(&self) {
        self.boot_failures.inc();
    }

    /// A resume or unpause began.
    pub fn add_resume(&self) {
        self.resumes.inc();
    }

    /// A boot took `d` from its start to the VM being ready.
    pub fn observe_boot(&self, d: Duration) {
        self.boot_to_ready.observe(d.as_secs_f64());
    }

    /// VMs running now.
    pub fn set_running(&self, n: usize) {
        self.running.set(i64::try_from(n).unwrap_or(i64::MAX));
    }

    /// A stop in `mode` began.
    pub fn add_stop(&self, mode: StopMode) {
        let i = STOP_MODES
            .iter()
            .position(|m| *m == mode)
            .expect("every mode is listed");
        self.stops[i].inc();
    }

    /// A query was refused by a limit.
    pub fn add_limit_refusal(&self, r: Refusal) {
        if let Some(i) = LIMITS.iter().position(|l| *l == r) {
            self.limit_refusals[i].inc();
        }
    }

    /// Limit refusals so far.
    pub fn limit_refusals(&self) -> u64 {
        self.limit_refusals.iter().map(Counter::get).sum()
    }

    /// A forward found no answer.
    pub fn add_forward_failure(&self) {
        self.forward_failures.inc();
    }

    /// The synjitsu client connected or lost its connection.
    pub fn set_synjitsu_connected(&self, up: bool) {
        self.synjitsu_connected.set(i64::from(up));
    }

    /// `n` state changes were not recorded (the store's queue was full, or git could not
    /// write).
    pub fn add_store_dropped(&self, n: u64) {
        self.store_dropped.inc_by(n);
    }

    /// An attempt to write the state store failed.
    pub fn add_state_write_failure(&self) {
        self.store_write_failures.inc();
    }

    /// The state store records every change (true), or has lost some since its last
    /// failure and not yet rewritten the whole state (false).
    pub fn set_state_store_healthy(&self, healthy: bool) {
        self.store_healthy.set(i64::from(healthy));
    }

    /// The oldest change the store has not committed was made at `since` (`None`: it is up
    /// to date).
    pub fn set_state_pending_since(&self, since: Option<SystemTime>) {
        let ms = since.map_or(0, |t| unix_ms(t).max(1));
        self.store_pending_since_ms.store(ms, Relaxed);
    }

    /// How far the store is behind at `now`, in seconds.
    fn state_lag(&self, now: SystemTime) -> f64 {
        match self.store_pending_since_ms.load(Relaxed) {
            0 => 0.0,
            since => unix_ms(now).saturating_sub(since) as f64 / 1e3,
        }
    }

    /// The store's health and how far it is behind now, in seconds (for `ctl status`).
    pub fn store_health(&self) -> (bool, f64) {
        (
            self.store_healthy.get() != 0,
            self.state_lag(SystemTime::now()),
        )
    }

    /// The backend pushed a lifecycle change (a libvirt event).
    pub fn add_backend_event(&self) {
        self.backend_events.inc();
    }

    /// A VM's state was polled from the backend.
    pub fn add_state_poll(&self) {
        self.state_polls.inc();
    }

    fn dropped_counter(&self, why: Dropped) -> &Counter {
        let i = DROPPED
            .iter()
            .position(|(d, _)| *d == why)
            .expect("every reason is listed");
        &self.dropped[i]
    }

    /// A message got no answer, for `why`.
    pub fn add_dropped(&self, why: Dropped) {
        self.dropped_counter(why).inc();
    }

    /// Messages given no answer for `why` so far.
    pub fn dropped(&self, why: Dropped) -> u64 {
        self.dropped_counter(why).get()
    }

    /// A new TCP connection was closed at once: `limit` was reached.
    pub fn add_tcp_refused(&self, limit: TcpLimit) {
        let i = TCP_LIMITS
            .iter()
            .position(|(l, _)| *l == limit)
            .expect("every limit is listed");
        self.tcp_refused[i].inc();
    }

    /// A TCP connection was accepted (`+1`) or closed (`-1`).
    pub fn add_tcp_connections(&self, delta: i64) {
        self.tcp_connections.inc_by(delta);
    }

    /// A query was not forwarded: `forward_max` forwards were in flight.
    pub fn add_forward_busy(&self) {
        self.forward_busy.inc();
    }

    /// A query was not forwarded: its client may not use the forwarders.
    pub fn add_forward_refused(&self) {
        self.forward_refused.inc();
    }

    /// The Prometheus text exposition.
    pub fn render(&self) -> Result<String, std::fmt::Error> {
        self.render_at(SystemTime::now())
    }

    /// The exposition with the store's lag as of `now`.
    fn render_at(&self, now: SystemTime) -> Result<String, std::fmt::Error> {
        self.store_lag.set(self.state_lag(now));
        shared_io::metrics::text(&self.registry)
    }
}

fn unix_ms(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// The metrics address serves `/metrics` and nothing else.
impl Handler for Metrics {
    async fn get(&self, path: &str) -> Option<Response> {
        if path != shared_io::metrics::PATH {
            return None;
        }
        self.store_lag.set(self.state_lag(SystemTime::now()));
        Some(shared_io::metrics::response(&self.registry))
    }
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
        m.add_dropped(Dropped::Busy);
        m.add_tcp_refused(TcpLimit::PerClient);
        m.add_tcp_connections(2);
        m.add_tcp_connections(-1);
        m.add_forward_busy();
        m.add_forward_refused();
        let now = UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        m.set_state_pending_since(Some(now - Duration::from_millis(1500)));
        let t = m.render_at(now).unwrap();
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
            "jitsu_dns_dropped_total{reason=\"busy\"} 1",
            "jitsu_dns_dropped_total{reason=\"short\"} 0",
            "jitsu_dns_dropped_total{reason=\"unsent\"} 0",
            "jitsu_dns_tcp_refused_total{limit=\"per_client\"} 1",
            "jitsu_dns_tcp_refused_total{limit=\"total\"} 0",
            "jitsu_dns_tcp_connections 1",
            "jitsu_dns_forward_busy_total 1",
            "jitsu_dns_forward_refused_total 1",
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
        use std::sync::Arc;
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        use tokio_util::sync::CancellationToken;

        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let m = Arc::new(Metrics::new());
        m.add_boot();
        let stop = CancellationToken::new();
        let server = tokio::spawn(shared_io::http::serve(
            l,
            m,
            shared_io::http::Limits::default(),
            stop.clone(),
        ));
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
