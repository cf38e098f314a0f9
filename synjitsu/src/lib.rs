//! synjitsu: stands in for booting guests on the bridge, holds their clients' TCP SYNs and
//! hands them over once the guest can answer.
//!
//! The library holds everything; `main.rs` only parses flags and starts [`daemon`].
//! The pure core is [`hold`] (with [`wire`] and [`garp`] for bytes and [`filter`] for the
//! kernel filter program); the IO shell is [`daemon`], [`control`], [`metrics`], [`port`],
//! [`store`] and [`sys`].

pub mod control;
pub mod daemon;
pub mod filter;
pub mod garp;
pub mod hold;
pub mod metrics;
pub mod pcap;
pub mod port;
pub mod store;
pub mod sys;
pub mod wire;
