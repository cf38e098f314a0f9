//! Where held SYNs go for guests that replay them themselves: Xenstore, in the original
//! Synjitsu's layout ([`layout`], with the `options` leaf's S-expression in [`sexp`]), one
//! transaction per SYN.
//!
//! Owns the layout and the Xenstore wire codec ([`xs_wire`]), the [`SynStore`] trait (what a
//! hand-over store must do), its implementations ([`xenstore`], the real one; [`memory`], a
//! fake for unit tests beside it), and the [`StoreWorker`]: a dedicated thread that runs the
//! blocking store, fed by a bounded channel, so the core and the packet loop never wait on
//! Xenstore. Which SYN to write and when is the core's ([`crate::hold`]).

pub mod layout;
pub mod memory;
pub mod sexp;
pub mod xenstore;
pub mod xs_wire;

use std::net::IpAddr;
use std::sync::mpsc;
use std::thread;

use layout::{HeldSyn, SynKey};

use crate::hold::{StoreDone, StoreOp, StoreOutcome};

/// How a write ended when it did not fail.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WriteOutcome {
    /// Committed.
    Written,
    /// The guest marked its address `managed`: nothing written.
    Managed,
}

/// Why a store operation failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The connection to xenstored failed.
    #[error("xenstore socket {path}: {source}")]
    Io {
        /// The socket.
        path: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// xenstored refused an operation.
    #[error("xenstore {op} {path}: {errno}")]
    Refused {
        /// The operation.
        op: &'static str,
        /// The node.
        path: String,
        /// The error name xenstored gave (`EACCES`, `EINVAL`...).
        errno: String,
    },
    /// xenstored answered something that is not an answer.
    #[error("xenstore protocol: {0}")]
    Protocol(String),
    /// A transaction kept conflicting with other writers.
    #[error("xenstore transaction for {path} still conflicting after {attempts} attempts")]
    Conflict {
        /// The node.
        path: String,
        /// How many times it was tried.
        attempts: u32,
    },
}

/// What a hand-over store does. Implementations block; they run on the [`StoreWorker`].
pub trait SynStore: Send {
    /// At start-up: remove every stale child of `/ip` and make `/ip` readable by dom0 only.
    /// Returns how many children were removed.
    fn prepare(&mut self) -> Result<usize, StoreError>;
    /// At a boot: `/ip/<ip>` made empty with nothing under it (a previous boot's `managed`
    /// and SYNs are stale), readable and writable by `domid` and dom0 only, so that the guest
    /// can mark it `managed` whether or not a SYN is ever written (under xenstored's rules it
    /// could not create the node itself: `/ip` is dom0's).
    fn open(&mut self, domid: u32, ip: IpAddr) -> Result<(), StoreError>;
    /// At a stop: `/ip/<ip>` emptied and made dom0's alone. The domain that had it is gone,
    /// and Xen may give its id to another guest before this VM boots again; the node stays,
    /// as the VM is still declared, for its next boot's [`SynStore::open`].
    fn seal(&mut self, ip: IpAddr) -> Result<(), StoreError>;
    /// Removes `/ip/<ip>` and everything under it (the VM is no longer declared).
    fn close(&mut self, ip: IpAddr) -> Result<(), StoreError>;
    /// Writes one held SYN in one transaction, readable and writable by `domid` and dom0
    /// only; skipped if `/ip/<ip>` reads `managed`.
    fn write_syn(
        &mut self,
        domid: u32,
        key: &SynKey,
        syn: &HeldSyn,
    ) -> Result<WriteOutcome, StoreError>;
    /// Removes one connection's entry.
    fn remove(&mut self, key: &SynKey) -> Result<(), StoreError>;
}

/// The thread that runs a [`SynStore`]. Dropping it closes the channel; the thread ends after
/// the operations already queued.
#[derive(Debug)]
pub struct StoreWorker {
    tx: Option<mpsc::SyncSender<StoreOp>>,
    handle: Option<thread::JoinHandle<()>>,
}

/// A store operation that failed outside a write (opening, closing, removals), for logs and
/// metrics.
#[derive(Debug)]
pub struct StoreFailure {
    /// What was tried.
    pub op: &'static str,
    /// Why it failed.
    pub error: StoreError,
}

/// What the worker reports back.
#[derive(Debug)]
pub enum StoreReport {
    /// A write's result, for the core.
    Done(StoreDone),
    /// Another operation (`open`, `close`, `remove`) succeeded.
    Ok(&'static str),
    /// Another operation failed.
    Failed(StoreFailure),
}

impl StoreWorker {
    /// Starts the thread; at most `capacity` operations wait in its channel. Results go to
    /// `report` (a bounded tokio channel: the thread waits for the loop, never the reverse).
    pub fn spawn(
        mut store: Box<dyn SynStore>,
        capacity: usize,
        report: tokio::sync::mpsc::Sender<StoreReport>,
    ) -> std::io::Result<StoreWorker> {
        let (tx, rx) = mpsc::sync_channel::<StoreOp>(capacity);
        let handle = thread::Builder::new()
            .name("xenstore".into())
            .spawn(move || {
                for op in rx {
                    let r = run(store.as_mut(), op);
                    if report.blocking_send(r).is_err() {
                        break;
                    }
                }
            })?;
        Ok(StoreWorker {
            tx: Some(tx),
            handle: Some(handle),
        })
    }

    /// Queues an operation; gives it back if the channel is full or the thread is gone.
    pub fn try_send(&self, op: StoreOp) -> Result<(), StoreOp> {
        let tx = self.tx.as_ref().expect("present until drop");
        tx.try_send(op).map_err(|e| match e {
            mpsc::TrySendError::Full(op) | mpsc::TrySendError::Disconnected(op) => op,
        })
    }
}

impl Drop for StoreWorker {
    fn drop(&mut self) {
        self.tx.take();
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

/// Carries out one operation on `store` and says how it went, as the worker's thread does
/// with each: public so that a test wiring the core to an in-memory store (the tests crate's
/// pipe) runs the same mapping, synchronously.
pub fn run(store: &mut dyn SynStore, op: StoreOp) -> StoreReport {
    match op {
        StoreOp::Write {
            id,
            vm,
            domid,
            key,
            syn,
        } => {
            let outcome = match store.write_syn(domid, &key, &syn) {
                Ok(WriteOutcome::Written) => StoreOutcome::Written,
                Ok(WriteOutcome::Managed) => StoreOutcome::Managed,
                Err(e) => StoreOutcome::Failed(e.to_string()),
            };
            StoreReport::Done(StoreDone {
                id,
                vm,
                key,
                outcome,
            })
        }
        StoreOp::Open { vm, domid, ips } => each_ip(&vm, "open", ips, |ip| store.open(domid, ip)),
        StoreOp::Seal { vm, ips } => each_ip(&vm, "seal", ips, |ip| store.seal(ip)),
        StoreOp::Close { vm, ips } => each_ip(&vm, "close", ips, |ip| store.close(ip)),
        StoreOp::Remove { key } => match store.remove(&key) {
            Ok(()) => StoreReport::Ok("remove"),
            Err(error) => StoreReport::Failed(StoreFailure {
                op: "remove",
                error,
            }),
        },
    }
}

/// Runs `op` for each address of `vm`, stopping at the first failure.
fn each_ip(
    vm: &str,
    what: &'static str,
    ips: Vec<IpAddr>,
    mut op: impl FnMut(IpAddr) -> Result<(), StoreError>,
) -> StoreReport {
    for ip in ips {
        if let Err(error) = op(ip) {
            tracing::warn!(vm = %vm, ip = %ip, error = %error, "xenstore {what} failed");
            return StoreReport::Failed(StoreFailure { op: what, error });
        }
    }
    StoreReport::Ok(what)
}
