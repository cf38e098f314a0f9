//! The status page, `GET /` on the metrics address: the daemon, the fleet table (the same
//! rows and columns as `ctl list`) and the recent cold starts, each with a small inline SVG
//! bar per timing (DNS answer, SYN hand-over, first packet from the guest). Plain HTML that
//! the browser refreshes every [`REFRESH_S`] seconds; no script.
//!
//! [`Pages`] serves it beside `/metrics`; what it shows comes from the daemon's loop through
//! the same request as `ctl` (`page`), so the page and the CLI cannot disagree.

use std::fmt::Write as _;
use std::sync::Arc;

use shared_io::http::{Handler, Response, Status};
use tokio::sync::mpsc;

use super::proto::{Body, Request, Response as CtlResponse};
use super::server::{Call, ask};
use super::view::{ColdStartRow, DaemonStatus, VmRow, human, table};
use crate::backend::libvirt::xml::xml_escape as esc;
use crate::metrics::Metrics;

/// The browser reloads the page this often.
pub const REFRESH_S: u32 = 5;
/// The widest bar, in pixels.
const BAR_PX: f64 = 240.0;

/// What the metrics address serves: `/metrics` and the status page at `/`.
#[derive(Debug)]
pub struct Pages {
    /// The metrics.
    pub metrics: Arc<Metrics>,
    /// The daemon's loop.
    pub calls: mpsc::Sender<Call>,
}

impl Handler for Pages {
    async fn get(&self, path: &str) -> Option<Response> {
        if path != "/" {
            return self.metrics.get(path).await;
        }
        Some(match ask(&self.calls, Request::Page, None).await {
            CtlResponse::Ok(Body::Page {
                status,
                vms,
                cold_starts,
            }) => Response::new(
                Status::Ok,
                "text/html; charset=utf-8",
                render(&status, &vms, &cold_starts),
            ),
            other => Response::new(
                Status::InternalError,
                shared_io::http::TEXT,
                format!("the status is not available: {other:?}\n"),
            ),
        })
    }
}

/// The three timings of a cold start, with their colours, in the order drawn.
const TIMINGS: [(&str, &str); 3] = [
    ("DNS answer", "#2f6fb5"),
    ("SYN hand-over", "#d9822b"),
    ("first packet", "#3a9a4b"),
];

fn timings(c: &ColdStartRow) -> [Option<f64>; 3] {
    [c.answered_ms, c.handed_over_ms, c.first_packet_ms]
}

/// One cold start's bars: one row per timing, scaled so that `max_ms` is [`BAR_PX`].
fn bars(c: &ColdStartRow, max_ms: f64) -> String {
    let mut svg = format!(
        r#"<svg class="bars" width="{w}" height="24" viewBox="0 0 {w} 24" role="img" aria-label="timings of {vm}">"#,
        w = BAR_PX as u32 + 4,
        vm = esc(&c.vm)
    );
    for (i, ((label, colour), ms)) in TIMINGS.iter().zip(timings(c)).enumerate() {
        let y = i * 8;
        match ms {
            Some(ms) => {
                let w = (ms / max_ms * BAR_PX).max(1.0);
                let _ = write!(
                    svg,
                    r#"<rect x="0" y="{y}" width="{w:.1}" height="6" fill="{colour}"><title>{label}: {ms:.0} ms</title></rect>"#
                );
            }
            None => {
                let _ = write!(
                    svg,
                    r##"<rect x="0" y="{y}" width="{BAR_PX}" height="6" fill="none" stroke="#ccc" stroke-dasharray="2 2"><title>{label}: not seen</title></rect>"##
                );
            }
        }
    }
    svg.push_str("</svg>");
    svg
}

fn ms_cell(ms: Option<f64>) -> String {
    ms.map_or_else(|| "-".into(), |ms| format!("{ms:.0} ms"))
}

/// The whole page.
pub fn render(status: &DaemonStatus, vms: &[VmRow], cold_starts: &[ColdStartRow]) -> String {
    let mut o = String::new();
    let _ = write!(
        o,
        r#"<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta http-equiv="refresh" content="{REFRESH_S}">
<title>jitsu-dns: {n} VMs</title>
<style>
body {{ font: 14px/1.4 sans-serif; margin: 1.5em; color: #222; }}
table {{ border-collapse: collapse; margin-bottom: 1.5em; }}
th, td {{ text-align: left; padding: 3px 10px; border-bottom: 1px solid #ddd; }}
th {{ background: #f3f3f3; }}
td.num {{ text-align: right; }}
.state-running {{ color: #2a7a2a; font-weight: bold; }}
.state-failed {{ color: #b00; font-weight: bold; }}
.legend span {{ display: inline-block; width: 12px; height: 8px; margin: 0 4px 0 12px; }}
.meta {{ color: #555; }}
</style></head><body>
<h1>jitsu-dns</h1>
<p class="meta">{version}, pid {pid}, up {up}; DNS on {dns}; backend {backend}; synjitsu {syn}; store {store} ({health}). Refreshed every {REFRESH_S} s.</p>
"#,
        n = vms.len(),
        version = esc(&status.version),
        pid = status.pid,
        up = human(status.uptime_s),
        dns = esc(&status.dns),
        backend = esc(&status.backend),
        syn = match (&status.synjitsu, status.synjitsu_connected) {
            (None, _) => "not configured",
            (Some(_), true) => "connected",
            (Some(_), false) => "NOT connected",
        },
        store = esc(&status.store),
        health = if status.store_healthy {
            "healthy"
        } else {
            "NOT healthy"
        },
    );
    o.push_str("<h2>Fleet</h2>\n<table id=\"fleet\">\n<tr>");
    let (head, rows) = table(vms);
    for h in &head {
        let _ = write!(o, "<th>{}</th>", esc(h));
    }
    o.push_str("</tr>\n");
    for (row, cells) in vms.iter().zip(&rows) {
        let _ = write!(o, "<tr id=\"vm-{}\">", esc(&row.name));
        for (i, c) in cells.iter().enumerate() {
            let class = match i {
                1 => format!(" class=\"state-{}\"", esc(c)),
                6 | 7 => " class=\"num\"".into(),
                _ => String::new(),
            };
            let _ = write!(o, "<td{class}>{}</td>", esc(c));
        }
        o.push_str("</tr>\n");
    }
    o.push_str("</table>\n<h2>Recent cold starts</h2>\n<p class=\"legend\">");
    for (label, colour) in TIMINGS {
        let _ = write!(o, "<span style=\"background:{colour}\"></span>{label}");
    }
    o.push_str(" (times from the boot's start; the first packet is seen at the backend poll's granularity)</p>\n");
    if cold_starts.is_empty() {
        o.push_str("<p id=\"cold-starts\">No cold start since jitsu-dns started.</p>\n");
    } else {
        let max_ms = cold_starts
            .iter()
            .flat_map(timings)
            .flatten()
            .fold(1.0_f64, f64::max);
        o.push_str("<table id=\"cold-starts\">\n<tr><th>VM</th><th>when</th><th>DNS answer</th><th>SYN hand-over</th><th>first packet</th><th>timings</th></tr>\n");
        for c in cold_starts {
            let when = if c.failed {
                format!("{} ago, failed", human(c.ago_s))
            } else {
                format!("{} ago", human(c.ago_s))
            };
            let _ = writeln!(
                o,
                "<tr><td>{}</td><td>{when}</td><td class=\"num\">{}</td><td class=\"num\">{}</td><td class=\"num\">{}</td><td>{}</td></tr>",
                esc(&c.vm),
                ms_cell(c.answered_ms),
                ms_cell(c.handed_over_ms),
                ms_cell(c.first_packet_ms),
                bars(c, max_ms)
            );
        }
        o.push_str("</table>\n");
    }
    o.push_str("</body></html>\n");
    o
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    fn status() -> DaemonStatus {
        DaemonStatus {
            version: "jitsu-dns 0.1.0".into(),
            pid: 7,
            uptime_s: 65.0,
            dns: "127.0.0.1:53".into(),
            backend: "process".into(),
            connect: None,
            control: "/run/jitsu/control.sock".into(),
            metrics: Some("127.0.0.1:9153".into()),
            config_file: None,
            synjitsu: None,
            synjitsu_connected: false,
            store: "/var/lib/jitsu".into(),
            store_temporary: false,
            store_healthy: true,
            store_lag_s: 0.0,
            limits: super::super::view::Limits {
                ttl_s: 60,
                max_running: None,
                max_boots_per_second: None,
                forward_max: 150,
                tcp_max_clients: 150,
                tcp_max_per_client: 16,
                max_removed_share: 0.5,
            },
            vms: BTreeMap::new(),
        }
    }

    #[test]
    fn the_page_refreshes_itself_escapes_what_it_shows_and_scales_the_bars() {
        let vm = VmRow {
            name: "w<w".into(),
            state: "running".into(),
            addresses: vec!["10.0.0.1".into()],
            masking: "delay 0.1 s".into(),
            uptime_s: Some(3.0),
            idle_s: Some(1.0),
            boots: 1,
            queries: 2,
            last_cold_start_s: Some(0.2),
            pinned: false,
            drained: false,
            backoff_s: None,
        };
        let cold = ColdStartRow {
            vm: "w<w".into(),
            ago_s: 3.0,
            answered_ms: Some(100.0),
            handed_over_ms: None,
            first_packet_ms: Some(400.0),
            failed: false,
        };
        let html = render(&status(), &[vm], &[cold]);
        assert!(html.contains(r#"<meta http-equiv="refresh" content="5">"#));
        assert!(html.contains("<tr id=\"vm-w&lt;w\">"), "{html}");
        assert!(!html.contains("w<w"), "unescaped: {html}");
        assert!(!html.contains("<script"), "no script");
        // The longest timing is the full width; the others in proportion.
        assert!(
            html.contains(r##"width="240.0" height="6" fill="#3a9a4b""##),
            "{html}"
        );
        assert!(
            html.contains(r##"width="60.0" height="6" fill="#2f6fb5""##),
            "{html}"
        );
        assert!(html.contains("SYN hand-over: not seen"), "{html}");
    }
}
