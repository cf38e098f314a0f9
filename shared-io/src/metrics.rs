//! The Prometheus text exposition (format 0.0.4) of a `prometheus-client` registry, and the
//! path it is served at.
//!
//! Owns turning a registry into the page and its content type, so both daemons serve the
//! same format. It does not own any metric or decide when a registry is built: jitsu-dns
//! keeps one registry of live atomics, synjitsu builds one per scrape from its core's counters.

use prometheus_client::encoding::prometheus_text;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

use crate::http::{Response, Status};

/// Where both daemons serve their metrics.
pub const PATH: &str = "/metrics";

/// Registers a counter without labels under `name` (`_total` is added to it) and returns it.
pub fn counter(registry: &mut Registry, name: &str, help: &str) -> Counter {
    let c = Counter::default();
    registry.register(name, help, c.clone());
    c
}

/// Registers a gauge without labels under `name` and returns it.
pub fn gauge(registry: &mut Registry, name: &str, help: &str) -> Gauge {
    let g = Gauge::default();
    registry.register(name, help, g.clone());
    g
}

/// Registers the counter family `name` (`_total` is added to it) with one sample per value of
/// `label`, and returns their counters in the order of `values`: every sample is exposed from
/// the start, and counting is one atomic add with no lookup in the family.
pub fn counters(
    registry: &mut Registry,
    name: &str,
    help: &str,
    label: &'static str,
    values: &[&'static str],
) -> Vec<Counter> {
    let family = Family::<[(&'static str, &'static str); 1], Counter>::default();
    let counters = values
        .iter()
        .map(|v| family.get_or_create_owned(&[(label, *v)]))
        .collect();
    registry.register(name, help, family);
    counters
}

/// The registry as Prometheus text: `# HELP`, `# TYPE` and the samples of every metric.
pub fn text(registry: &Registry) -> Result<String, std::fmt::Error> {
    let mut out = String::with_capacity(8192);
    prometheus_text::encode(&mut out, registry)?;
    Ok(out)
}

/// The page for [`PATH`]: the registry's text, or a 500 if it cannot be encoded.
pub fn response(registry: &Registry) -> Response {
    match text(registry) {
        Ok(body) => Response::new(Status::Ok, prometheus_text::CONTENT_TYPE, body),
        Err(e) => {
            tracing::warn!(error = %e, "metrics could not be encoded");
            Response::new(
                Status::InternalError,
                crate::http::TEXT,
                "metrics could not be encoded\n".into(),
            )
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use prometheus_client::metrics::counter::Counter;

    #[test]
    fn counters_keep_a_single_total_suffix_and_help_its_period() {
        let mut r = Registry::default();
        let c = Counter::<u64>::default();
        r.register("x_frames", "Frames seen", c.clone());
        c.inc_by(3);
        let page = response(&r);
        assert_eq!(page.status, Status::Ok);
        assert_eq!(
            page.content_type,
            "text/plain; version=0.0.4; charset=utf-8"
        );
        assert_eq!(
            page.body,
            "# HELP x_frames_total Frames seen.\n# TYPE x_frames_total counter\nx_frames_total 3\n"
        );
    }

    #[test]
    fn a_family_shows_every_value_and_counts_through_the_returned_counters() {
        let mut r = Registry::default();
        let c = counters(&mut r, "x_queries", "Queries", "outcome", &["a", "b"]);
        c[1].inc_by(2);
        let text = text(&r).unwrap();
        let mut samples: Vec<&str> = text.lines().filter(|l| !l.starts_with('#')).collect();
        samples.sort();
        assert_eq!(
            samples,
            [
                "x_queries_total{outcome=\"a\"} 0",
                "x_queries_total{outcome=\"b\"} 2"
            ]
        );
    }
}
