//! jitsu-dns: an authoritative DNS server that boots a VM when one of its names is resolved.
//!
//! The library holds everything; `main.rs` only parses flags, installs logging, builds the
//! runtime and calls [`daemon::run`]. Module map:
//! - [`config`]: flags, VM specs and the TOML file, validated into typed values;
//! - [`check`]: what a configuration means, as `--check` prints it;
//! - [`ctl`]: the control socket, `jitsu-dns ctl` and the status page;
//! - [`fleet`]: the pure core deciding, per VM, what each query, tick and result leads to;
//! - [`dns`]: the hickory-server request handler (answers from a table, asks the fleet on
//!   the slow path), `fast`, the plain queries it answers from pre-encoded bytes,
//!   [`forward`], the relay to the forwarders, and [`transport`], the UDP and TCP sockets
//!   in front of the handler with their bounds (`udp_batch`: many datagrams a system call);
//! - [`backend`]: the trait the VMs are run through, the process backend and the libvirt one;
//! - [`state`]: the state store with history (a git repository);
//! - [`synjitsu`]: the client of synjitsu's control socket;
//! - [`xenstore`]: waiting for a readiness key; [`probe`], for a guest's TCP port;
//! - [`rumprun`]: a rumprun guest's configuration, written to Xenstore before it runs;
//! - [`metrics`]: the Prometheus metrics (served by `shared_io::http`);
//! - [`daemon`]: the IO shell tying them together in one `select!` loop.

pub mod backend;
pub mod check;
pub mod config;
pub mod ctl;
pub mod daemon;
pub mod dns;
mod fast;
pub mod fleet;
pub mod forward;
pub mod metrics;
pub mod probe;
pub mod rumprun;
pub mod state;
pub mod synjitsu;
mod sys;
pub mod transport;
mod udp_batch;
pub mod xenstore;
