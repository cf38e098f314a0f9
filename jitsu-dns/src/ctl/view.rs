//! What an operator sees of the fleet, written once: the rows of `ctl list` (also the status
//! page's table), one VM in full (`ctl show`), the daemon (`ctl status`), the recent cold
//! starts, and their text rendering.
//!
//! Built from the fleet's views at `now`, so times are ages and durations in seconds (JSON
//! numbers, `--json`), never instants. Pure: the shell gathers, this shapes.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::fmt::Write as _;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::config::{VmConfig, WaitFor};
use crate::fleet::{ColdStart, Lifecycle, VmName, VmView};

/// One VM in `ctl list` and on the status page.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VmRow {
    /// Its name.
    pub name: String,
    /// Its lifecycle state (`off`, `booting`, `running`, ...).
    pub state: String,
    /// Its addresses (IPv4, then IPv6 if any).
    pub addresses: Vec<String>,
    /// How a boot is masked (`delay 0.1 s`, `synjitsu`, `announce`, `key <path>`).
    pub masking: String,
    /// Seconds it has been running.
    pub uptime_s: Option<f64>,
    /// Seconds without a query or traffic, while it runs.
    pub idle_s: Option<f64>,
    /// Boots so far.
    pub boots: u64,
    /// Queries so far.
    pub queries: u64,
    /// Seconds its last fresh boot took to be ready.
    pub last_cold_start_s: Option<f64>,
    /// Never stopped for idleness.
    pub pinned: bool,
    /// Drained.
    pub drained: bool,
    /// Seconds left of its back-off (failed boots in a row), if queries wait for one.
    pub backoff_s: Option<f64>,
}

/// One change of state, for `ctl show`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Transition {
    /// Seconds ago.
    pub ago_s: f64,
    /// Before.
    pub from: String,
    /// After.
    pub to: String,
    /// Why.
    pub cause: String,
}

/// Everything known of one VM (`ctl show`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VmDetail {
    /// What `list` shows.
    #[serde(flatten)]
    pub row: VmRow,
    /// The names it answers.
    pub dns: Vec<String>,
    /// Its MAC.
    pub mac: String,
    /// Its domain id, if the backend has them.
    pub domid: Option<u32>,
    /// How it is stopped when idle.
    pub stop_mode: String,
    /// Seconds without queries or traffic before it is stopped.
    pub idle_timeout_s: f64,
    /// Seconds until it is stopped for idleness, while it runs and is not pinned.
    pub idle_stop_in_s: Option<f64>,
    /// Who pinned it: `key` (`pin = true`), `ctl`, or `null`; `unpinned by ctl` shows as
    /// `pinned: false` with `pin_source: "ctl"`.
    pub pin_source: Option<String>,
    /// What its queries get while it is drained and not running.
    pub drained_answer: String,
    /// Failed boots in a row before queries wait for a back-off (`null`: never).
    pub max_boot_attempts: Option<u32>,
    /// Failed boots in a row now.
    pub failures: u32,
    /// Why the last boot or stop failed.
    pub last_error: Option<String>,
    /// Seconds since its last query.
    pub last_query_ago_s: Option<f64>,
    /// Seconds since its last boot began.
    pub last_boot_ago_s: Option<f64>,
    /// Its last changes of state, newest first.
    pub transitions: Vec<Transition>,
}

/// The fleet-wide limits in force.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Limits {
    /// The TTL of answers, in seconds.
    pub ttl_s: u32,
    /// VMs booting, running or stopping at most.
    pub max_running: Option<usize>,
    /// Boots per second at most.
    pub max_boots_per_second: Option<u32>,
    /// Forwards in flight at most.
    pub forward_max: usize,
    /// DNS-over-TCP connections at most.
    pub tcp_max_clients: usize,
    /// DNS-over-TCP connections per client at most.
    pub tcp_max_per_client: usize,
    /// A reload may remove at most this share of the VMs.
    pub max_removed_share: f64,
}

/// The daemon (`ctl status`, the status page's head).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DaemonStatus {
    /// `jitsu-dns 0.1.0`.
    pub version: String,
    /// Its pid.
    pub pid: u32,
    /// Seconds since it started.
    pub uptime_s: f64,
    /// Where it serves DNS.
    pub dns: String,
    /// The backend (`process`, `libvirt`).
    pub backend: String,
    /// The backend's URI, if one was given.
    pub connect: Option<String>,
    /// The control socket.
    pub control: String,
    /// The metrics and status page address.
    pub metrics: Option<String>,
    /// The configuration file.
    pub config_file: Option<String>,
    /// synjitsu's control socket, if configured.
    pub synjitsu: Option<String>,
    /// The link to synjitsu is up.
    pub synjitsu_connected: bool,
    /// The state store's directory.
    pub store: String,
    /// The store is a temporary repository (no `--persistdb`).
    pub store_temporary: bool,
    /// Every change has been recorded since the last failure.
    pub store_healthy: bool,
    /// Seconds the oldest change not yet committed has waited.
    pub store_lag_s: f64,
    /// The limits in force.
    pub limits: Limits,
    /// VMs in each state.
    pub vms: BTreeMap<String, usize>,
}

/// One recent fresh boot, times in milliseconds from its start.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ColdStartRow {
    /// The VM.
    pub vm: String,
    /// Seconds since it began.
    pub ago_s: f64,
    /// Until the DNS answer.
    pub answered_ms: Option<f64>,
    /// Until synjitsu's hold ended (the guest announced itself or was said ready).
    pub handed_over_ms: Option<f64>,
    /// Until the host saw the guest's first packet (at the poll's granularity).
    pub first_packet_ms: Option<f64>,
    /// The boot failed.
    pub failed: bool,
}

fn secs(d: Duration) -> f64 {
    (d.as_secs_f64() * 1000.0).round() / 1000.0
}

fn since(now: Instant, t: Instant) -> f64 {
    secs(now.saturating_duration_since(t))
}

/// How `cfg` masks a boot, by the fleet's precedence.
pub fn masking(cfg: &VmConfig) -> String {
    if cfg.wait_for == Some(WaitFor::Announce) {
        "announce".into()
    } else if let Some(k) = &cfg.wait_for_key {
        format!("key {k}")
    } else if cfg.use_synjitsu {
        "synjitsu".into()
    } else {
        format!("delay {}", crate::fleet::fmt_duration(cfg.response_delay))
    }
}

/// The row of `v` at `now`.
pub fn row(v: &VmView, now: Instant) -> VmRow {
    let mut addresses = vec![v.cfg.ip.to_string()];
    addresses.extend(v.cfg.ip6.map(|a| a.to_string()));
    VmRow {
        name: v.cfg.name.to_string(),
        state: v.state.as_str().into(),
        addresses,
        masking: masking(&v.cfg),
        uptime_s: v.running_since.map(|t| since(now, t)),
        idle_s: v.idle_since.map(|t| since(now, t)),
        boots: v.starts,
        queries: v.requests,
        last_cold_start_s: v.last_boot_took.map(secs),
        pinned: v.pinned,
        drained: v.drained,
        backoff_s: v.backoff_until.filter(|t| *t > now).map(|t| secs(t - now)),
    }
}

/// Everything of `v` at `now`; `default_idle` is the fleet's (2 x TTL).
pub fn detail(
    v: &VmView,
    now: Instant,
    default_idle: Duration,
    transitions: Vec<Transition>,
) -> VmDetail {
    let pin_source = match (v.pin_override, v.cfg.pin) {
        (Some(_), _) => Some("ctl".into()),
        (None, true) => Some("key".into()),
        (None, false) => None,
    };
    VmDetail {
        row: row(v, now),
        dns: v
            .cfg
            .dns
            .iter()
            .map(|n| n.to_ascii().trim_end_matches('.').to_string())
            .collect(),
        mac: v.cfg.mac().to_string(),
        domid: v.domid,
        stop_mode: v.cfg.stop_mode.as_str().into(),
        idle_timeout_s: secs(v.cfg.idle_timeout.unwrap_or(default_idle)),
        idle_stop_in_s: v
            .idle_deadline
            .map(|t| secs(t.saturating_duration_since(now))),
        pin_source,
        drained_answer: v.cfg.drained.as_str().into(),
        max_boot_attempts: v.cfg.max_boot_attempts,
        failures: v.failures,
        last_error: v.last_error.clone(),
        last_query_ago_s: v.last_request.map(|t| since(now, t)),
        last_boot_ago_s: v.last_start.map(|t| since(now, t)),
        transitions,
    }
}

/// The row of a cold start at `now`.
pub fn cold_start_row(c: &ColdStart, now: Instant) -> ColdStartRow {
    let ms = |t: Option<Instant>| t.map(|t| secs(t.saturating_duration_since(c.at)) * 1000.0);
    ColdStartRow {
        vm: c.vm.to_string(),
        ago_s: since(now, c.at),
        answered_ms: ms(c.answered),
        handed_over_ms: ms(c.handed_over),
        first_packet_ms: ms(c.first_packet),
        failed: c.failed,
    }
}

/// Each VM's last changes of state, kept by the shell as it commits them.
#[derive(Debug, Default)]
pub struct History {
    per_vm: HashMap<VmName, VecDeque<(Instant, Lifecycle, Lifecycle, String)>>,
}

impl History {
    /// Changes kept per VM.
    pub const KEPT: usize = 10;

    /// `vm` went from `from` to `to` at `at`, because of `cause`.
    pub fn record(
        &mut self,
        vm: &VmName,
        at: Instant,
        from: Lifecycle,
        to: Lifecycle,
        cause: &str,
    ) {
        let h = self.per_vm.entry(vm.clone()).or_default();
        if h.len() >= Self::KEPT {
            h.pop_front();
        }
        h.push_back((at, from, to, cause.to_string()));
    }

    /// Forgets VMs `keep` rejects (removed by a reload).
    pub fn retain(&mut self, keep: impl Fn(&str) -> bool) {
        self.per_vm.retain(|vm, _| keep(vm));
    }

    /// `vm`'s changes at `now`, newest first.
    pub fn of(&self, vm: &str, now: Instant) -> Vec<Transition> {
        self.per_vm
            .get(vm)
            .map(|h| {
                h.iter()
                    .rev()
                    .map(|(at, from, to, cause)| Transition {
                        ago_s: since(now, *at),
                        from: from.as_str().into(),
                        to: to.as_str().into(),
                        cause: cause.clone(),
                    })
                    .collect()
            })
            .unwrap_or_default()
    }
}

/// `3h02m`, `4m05s`, `12s`, `0.35s`: an age or duration for a table.
pub fn human(s: f64) -> String {
    if s < 10.0 {
        let t = format!("{s:.2}");
        return format!("{}s", t.trim_end_matches('0').trim_end_matches('.'));
    }
    let s = s as u64;
    match s {
        0..60 => format!("{s}s"),
        60..3600 => format!("{}m{:02}s", s / 60, s % 60),
        3600..86400 => format!("{}h{:02}m", s / 3600, s % 3600 / 60),
        _ => format!("{}d{:02}h", s / 86400, s % 86400 / 3600),
    }
}

fn opt(s: Option<f64>) -> String {
    s.map_or_else(|| "-".into(), human)
}

/// The flags column of a row: `pinned`, `drained`, `back-off 8s`.
pub fn flags(r: &VmRow) -> String {
    let mut f = Vec::new();
    if r.pinned {
        f.push("pinned".to_string());
    }
    if r.drained {
        f.push("drained".to_string());
    }
    if let Some(b) = r.backoff_s {
        f.push(format!("back-off {}", human(b)));
    }
    if f.is_empty() {
        "-".into()
    } else {
        f.join(",")
    }
}

/// The columns of `ctl list` and the status page's table, with each row's cells.
pub fn table(rows: &[VmRow]) -> (Vec<&'static str>, Vec<Vec<String>>) {
    let head = vec![
        "NAME",
        "STATE",
        "ADDRESSES",
        "MASKING",
        "UPTIME",
        "IDLE",
        "BOOTS",
        "QUERIES",
        "COLD START",
        "FLAGS",
    ];
    let cells = rows
        .iter()
        .map(|r| {
            vec![
                r.name.clone(),
                r.state.clone(),
                r.addresses.join(","),
                r.masking.clone(),
                opt(r.uptime_s),
                opt(r.idle_s),
                r.boots.to_string(),
                r.queries.to_string(),
                opt(r.last_cold_start_s),
                flags(r),
            ]
        })
        .collect();
    (head, cells)
}

/// `ctl list`: a table as `virsh list` prints one, columns padded to their widest cell.
pub fn render_list(rows: &[VmRow]) -> String {
    let (head, cells) = table(rows);
    let mut width: Vec<usize> = head.iter().map(|h| h.len()).collect();
    for r in &cells {
        for (w, c) in width.iter_mut().zip(r) {
            *w = (*w).max(c.chars().count());
        }
    }
    let mut o = String::new();
    let line = |o: &mut String, cells: Vec<&str>| {
        let mut l = String::new();
        for (c, w) in cells.iter().zip(&width) {
            let _ = write!(l, "{c:<w$}  ");
        }
        o.push_str(l.trim_end());
        o.push('\n');
    };
    line(&mut o, head.clone());
    for r in &cells {
        line(&mut o, r.iter().map(String::as_str).collect());
    }
    o
}

/// `ctl show`: one `key: value` per line, then the transitions.
pub fn render_detail(d: &VmDetail) -> String {
    let r = &d.row;
    let mut o = String::new();
    let mut kv = |k: &str, v: String| {
        let _ = writeln!(o, "{k:<18} {v}");
    };
    kv("name:", r.name.clone());
    kv("state:", r.state.clone());
    kv("dns:", d.dns.join(", "));
    kv("addresses:", r.addresses.join(", "));
    kv("mac:", d.mac.clone());
    if let Some(id) = d.domid {
        kv("domid:", id.to_string());
    }
    kv("masking:", r.masking.clone());
    kv("stop mode:", d.stop_mode.clone());
    kv("uptime:", opt(r.uptime_s));
    kv("idle:", opt(r.idle_s));
    kv(
        "idle timeout:",
        match d.idle_stop_in_s {
            Some(left) => format!("{} (stop in {})", human(d.idle_timeout_s), human(left)),
            None => human(d.idle_timeout_s),
        },
    );
    kv(
        "pinned:",
        match (&d.pin_source, r.pinned) {
            (Some(src), true) => format!("yes (by {src})"),
            (Some(src), false) => format!("no (by {src})"),
            (None, _) => "no".into(),
        },
    );
    kv(
        "drained:",
        if r.drained {
            format!("yes (queries get {})", d.drained_answer.to_uppercase())
        } else {
            format!("no (policy {})", d.drained_answer)
        },
    );
    kv("boots:", r.boots.to_string());
    kv("queries:", r.queries.to_string());
    kv("last cold start:", opt(r.last_cold_start_s));
    kv(
        "last query:",
        d.last_query_ago_s
            .map_or("-".into(), |s| format!("{} ago", human(s))),
    );
    kv(
        "failed boots:",
        match (d.max_boot_attempts, r.backoff_s) {
            (_, Some(b)) => format!("{} (back-off, {} left)", d.failures, human(b)),
            (Some(m), None) => format!("{} (back-off from {m})", d.failures),
            (None, None) => format!("{} (no back-off)", d.failures),
        },
    );
    if let Some(e) = &d.last_error {
        kv("last error:", e.clone());
    }
    o.push_str("transitions (newest first):\n");
    if d.transitions.is_empty() {
        o.push_str("  none since jitsu-dns started\n");
    }
    for t in &d.transitions {
        let change = if t.from == t.to {
            t.to.clone()
        } else {
            format!("{} -> {}", t.from, t.to)
        };
        let _ = writeln!(o, "  {:>8} ago  {change} ({})", human(t.ago_s), t.cause);
    }
    o
}

/// `ctl status`.
pub fn render_status(s: &DaemonStatus) -> String {
    let mut o = String::new();
    let mut kv = |k: &str, v: String| {
        let _ = writeln!(o, "{k:<16} {v}");
    };
    kv(
        "daemon:",
        format!("{} (pid {}), up {}", s.version, s.pid, human(s.uptime_s)),
    );
    kv("dns:", s.dns.clone());
    kv(
        "backend:",
        match &s.connect {
            Some(c) => format!("{} at {c}", s.backend),
            None => s.backend.clone(),
        },
    );
    kv(
        "synjitsu:",
        match &s.synjitsu {
            Some(p) if s.synjitsu_connected => format!("connected ({p})"),
            Some(p) => format!("NOT connected ({p})"),
            None => "not configured".into(),
        },
    );
    kv(
        "store:",
        format!(
            "{}{}, {}, lag {}",
            s.store,
            if s.store_temporary {
                " (temporary)"
            } else {
                ""
            },
            if s.store_healthy {
                "healthy"
            } else {
                "NOT healthy"
            },
            human(s.store_lag_s)
        ),
    );
    kv("control:", s.control.clone());
    kv(
        "metrics:",
        s.metrics.clone().unwrap_or_else(|| "off".into()),
    );
    if let Some(f) = &s.config_file {
        kv("config:", f.clone());
    }
    let l = &s.limits;
    let lim = |v: Option<String>| v.unwrap_or_else(|| "unlimited".into());
    kv(
        "limits:",
        format!(
            "ttl {}s (idle stop {}s), max_running {}, max_boots_per_second {}, forward_max {}, \
             tcp_max_clients {}, tcp_max_per_client {}, max_removed_share {}",
            l.ttl_s,
            u64::from(l.ttl_s) * 2,
            lim(l.max_running.map(|n| n.to_string())),
            lim(l.max_boots_per_second.map(|n| n.to_string())),
            l.forward_max,
            l.tcp_max_clients,
            l.tcp_max_per_client,
            l.max_removed_share
        ),
    );
    let total: usize = s.vms.values().sum();
    let by: Vec<String> = s.vms.iter().map(|(k, n)| format!("{n} {k}")).collect();
    kv("vms:", format!("{total} ({})", by.join(", ")));
    o
}

#[cfg(test)]
mod tests {
    use super::*;

    fn r(name: &str) -> VmRow {
        VmRow {
            name: name.into(),
            state: "running".into(),
            addresses: vec!["10.0.0.1".into()],
            masking: "delay 0.1 s".into(),
            uptime_s: Some(3725.0),
            idle_s: Some(4.25),
            boots: 2,
            queries: 17,
            last_cold_start_s: Some(0.31),
            pinned: true,
            drained: false,
            backoff_s: None,
        }
    }

    #[test]
    fn durations_read_as_an_operator_expects() {
        assert_eq!(human(0.35), "0.35s");
        assert_eq!(human(4.0), "4s");
        assert_eq!(human(12.7), "12s");
        assert_eq!(human(245.0), "4m05s");
        assert_eq!(human(3725.0), "1h02m");
        assert_eq!(human(90000.0), "1d01h");
    }

    #[test]
    fn the_list_is_a_padded_table_with_a_header() {
        let mut long = r("a-much-longer-name");
        long.pinned = false;
        long.drained = true;
        long.backoff_s = Some(8.0);
        let t = render_list(&[r("www"), long]);
        let lines: Vec<&str> = t.lines().collect();
        assert!(lines[0].starts_with("NAME                STATE"), "{t}");
        assert!(
            lines[1].starts_with("www                 running  10.0.0.1"),
            "{t}"
        );
        assert!(lines[1].contains("1h02m"), "{t}");
        assert!(lines[1].ends_with("pinned"), "{t}");
        assert!(lines[2].ends_with("drained,back-off 8s"), "{t}");
    }
}
