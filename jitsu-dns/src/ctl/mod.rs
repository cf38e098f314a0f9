//! Operating a running jitsu-dns: the control socket and `jitsu-dns ctl`, and the status page.
//!
//! - [`proto`]: the requests and responses on the socket (one JSON line each way);
//! - [`server`]: the socket's thin server, handing requests to the daemon's loop;
//! - [`client`]: the `ctl` subcommand's side, its output and exit codes;
//! - [`view`]: what an operator sees (the rows of `list` and of the page, `show`, `status`),
//!   written once for both;
//! - [`page`]: the HTML status page on the metrics address.
//!
//! What an action does to a VM is the fleet's ([`crate::fleet::Fleet::act`]); carrying it
//! out and answering is the daemon's.

pub mod client;
pub mod page;
pub mod proto;
pub mod server;
pub mod view;
