//! synjitsu: stands in for booting guests on the bridge, holds their clients' TCP SYNs and
//! hands them over once the guest can answer.
//!
//! The library holds everything; `main.rs` only parses flags and starts [`daemon`].
//!
//! - The pure core, no IO: [`hold`] decides; [`wire`] reads and writes frames, [`garp`]
//!   builds the neighbour frames synjitsu sends, [`refused`] remembers SYNs refused under a
//!   flood, [`filter`] is the kernel filter program.
//! - The IO shell: [`daemon`] (set-up and the one `select!` loop, its sources served in
//!   [`turns`]), [`control`] (the control socket), [`metrics`] (the Prometheus metrics, served by `shared_io::http`),
//!   [`port`] (the veth pair), [`fdb`] (the bridge's forwarding entries, over netlink),
//!   [`steering`] (keeping them as the core wants, on their own thread), [`store`] (the
//!   Xenstore hand-over on its own thread), and [`sys`] (the packet socket: the only
//!   `unsafe`).

pub mod control;
pub mod daemon;
pub mod fdb;
pub mod filter;
pub mod garp;
pub mod hold;
pub mod metrics;
pub mod port;
pub mod refused;
pub mod steering;
pub mod store;
pub mod sys;
pub mod turns;
pub mod wire;
