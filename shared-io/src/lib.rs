//! What the IO shells of both daemons need, written once.
//!
//! Owns five small things jitsu-dns and synjitsu would otherwise each write: the HTTP
//! responder on the metrics address ([`http`]: routes, limits, status codes), the Prometheus
//! text exposition of a `prometheus-client` registry ([`metrics`]), the rate limiter for
//! repeated log lines ([`ratelimit`], pure: it takes `now`), the private control socket
//! with its peer check ([`unix`]), and the framing of netlink answers ([`netlink`]).
//!
//! It does not own what the daemons say to each other: that contract is `shared-proto`, which
//! any third party can use without this crate. Nor does it own any metric: each daemon names,
//! registers and counts its own.

pub mod http;
pub mod metrics;
pub mod netlink;
pub mod ratelimit;
pub mod unix;

pub use ratelimit::RateLimited;
