// SPDX-License-Identifier: GPL-3.0-only
//! The unikernel's machine-independent parts: boot information and command line parsing,
//! the clock's arithmetic, the ARP frames it makes and the HTTP server over smoltcp. No instruction here touches the hardware (that is the binary's `sys` module), so
//! all of it is unit-tested on the host with `cargo test --lib`.

#![cfg_attr(not(test), no_std)]

extern crate alloc;

pub mod arp;
pub mod clock;
pub mod cmdline;
pub mod http;
pub mod pvh;
pub mod server;
