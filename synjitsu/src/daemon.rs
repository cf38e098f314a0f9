//! The IO shell: sets up the port, the packet socket, the control socket, the Xenstore store,
//! the forwarding-table thread and metrics, then runs one `select!` loop around the core until
//! cancelled, and takes everything down again.
//!
//! The loop, each turn: cancellation first (a stop is never delayed), then the core's timer
//! ([`Hold::poll_at`]: what is due, probes every 5 ms, hold timeouts, is never late behind a
//! flood; it cannot starve the rest, since [`Hold::handle_timeout`] moves every deadline it
//! serves past now), then one of the other sources in turn ([`Turns`]): frames from the packet
//! socket (at most [`BATCH`]), announcements from the watcher (a second packet socket on
//! every interface, which tells the port each came in on; at most [`BATCH`]), a control
//! request, Xenstore results (at most [`BATCH`]), the forwarding-table changes done (after the
//! frames the socket holds: [`settle_fdb`]), a metrics request, housekeeping. Whichever source
//! an outsider keeps ready (the socket under a flood, the metrics port) gets one turn in a
//! round like the others, so a control request waits at most one batch of each. After each
//! turn the shell drains the core's outputs: the releases of guests' MACs, made on the spot
//! (told to the core after the frames the socket holds, as above; a guest's held SYNs then go
//! in the same turn as its announcement), frames to the socket, frames for a guest straight
//! out of its bridge port, events to the attached control client, Xenstore work to the store
//! thread, forwarding-table wishes to [`Steering`], and rebuilds the kernel filter if the
//! guests whose frames it passes on changed; then it
//! yields to the runtime, so that the tasks of the control connections, which read requests
//! and write answers, run between two turns however busy the socket is. Nothing here decides
//! anything; the core does.

use std::future::Future as _;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::task::Poll;
use std::time::{Duration, Instant};

use prometheus_client::registry::Registry;
use shared_proto::{ClientMessage, ServerMessage};
use tokio::io::Interest;
use tokio::io::unix::{AsyncFd, AsyncFdReadyGuard};
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use crate::control::{ControlIn, ControlServer};
use crate::fdb::{Fdb, FdbError};
use crate::filter;
use crate::hold::{Checksum, Config, FrameMeta, Hold, StoreDone, StoreOp, StoreOutcome, WhenFull};
use crate::metrics::{self, Scrapes, ShellStats};
use crate::port::{self, Port};
use crate::steering::{self, Steering, record::Record, record::RecordError};
use crate::store::xenstore::{self, XenstoreClient};
use crate::store::{StoreReport, StoreWorker, SynStore as _};
use crate::sys::packet::{self, PacketSocket};
use crate::turns::Turns;

/// Frames read per loop turn at most.
pub const BATCH: usize = 256;
/// Releases of guests' forwarding entries a turn makes itself at most (a few microseconds
/// each); the rest, a `sync` releasing thousands, go to the forwarding-table thread.
const RELEASES_NOW: usize = 16;
/// The receive buffer: any frame the port can carry (the veth's MTU follows the bridge's).
const RX_BUF: usize = 65_536 + 64;
/// The socket's kernel receive buffer: holds a burst while the loop is busy.
const SOCKET_RCVBUF: usize = 8 << 20;
/// Xenstore operations waiting for the store thread at most.
const STORE_QUEUE: usize = 4096;
/// The announcement watcher's kernel receive buffer: announcements are few, but a storm of
/// spoofed ones must not crowd out the guest's own (about 5000 minimal frames).
const WATCHER_RCVBUF: usize = 4 << 20;

/// Where Xenstore is, as `--xenstore` says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum XenstoreMode {
    /// `$XENSTORED_PATH`, or the default socket if it exists, else off.
    Auto,
    /// This socket.
    Socket(PathBuf),
    /// No Xenstore hand-over.
    Off,
}

/// Everything the daemon is configured with (from the command line).
#[derive(Debug, Clone)]
pub struct Options {
    /// The bridge to sit on.
    pub bridge: String,
    /// The control socket's path.
    pub control: PathBuf,
    /// Xenstore.
    pub xenstore: XenstoreMode,
    /// Probe addresses, at most one per family.
    pub probe_v4: Option<Ipv4Addr>,
    /// IPv6 probe address.
    pub probe_v6: Option<Ipv6Addr>,
    /// Where to serve metrics.
    pub metrics: Option<SocketAddr>,
    /// The one non-root uid allowed on the control socket.
    pub allow_uid: Option<u32>,
    /// Held SYNs older than this get a RST.
    pub hold_timeout: Duration,
    /// Between two reconciles of the forwarding table with what synjitsu wants.
    pub fdb_reconcile_interval: Duration,
    /// Bytes of held SYNs per VM at most.
    pub held_bytes_per_vm: usize,
    /// Bytes of held SYNs in total at most.
    pub held_bytes: usize,
    /// Refuse a SYN that does not fit instead of evicting the oldest (benchmark baseline
    /// only).
    pub refuse_when_full: bool,
    /// SYNs held per VM at most, besides the bytes (benchmark baseline only).
    pub max_held_per_vm: Option<usize>,
    /// SYNs held in total at most, besides the bytes (benchmark baseline only).
    pub max_held: Option<usize>,
    /// Attach no kernel filter (benchmark baseline only).
    pub no_bpf_filter: bool,
    /// Open no announcement watcher (benchmark baseline only): announcements are then taken
    /// from any port.
    pub no_announcement_watcher: bool,
}

/// Why the daemon could not start or had to stop.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    /// Not root.
    #[error("synjitsu must run as root: it creates a bridge port and opens a raw socket")]
    NotRoot,
    /// The port on the bridge.
    #[error(transparent)]
    Port(#[from] port::PortError),
    /// The bridge's forwarding table.
    #[error(transparent)]
    Fdb(#[from] FdbError),
    /// The record of the forwarding entries synjitsu made.
    #[error(transparent)]
    Record(#[from] RecordError),
    /// The packet socket.
    #[error("packet socket on {port}: {source}")]
    Socket {
        /// The interface.
        port: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The control socket.
    #[error(transparent)]
    Control(#[from] shared_io::unix::SocketError),
    /// Xenstore.
    #[error("xenstore at {socket}: {source}")]
    Xenstore {
        /// The socket.
        socket: String,
        /// Why.
        #[source]
        source: crate::store::StoreError,
    },
    /// Metrics listener.
    #[error("metrics address {addr}: {source}")]
    Metrics {
        /// The address.
        addr: SocketAddr,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A thread could not be started.
    #[error("starting the xenstore thread: {0}")]
    Thread(std::io::Error),
    /// The forwarding-table thread could not be started.
    #[error("starting the forwarding-table thread: {0}")]
    SteeringThread(std::io::Error),
}

fn seed() -> u64 {
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    (t.as_nanos() as u64) ^ (u64::from(std::process::id()) << 32)
}

/// Runs the daemon until `cancel` fires; sets up and tears down everything it uses.
pub async fn run(opts: Options, cancel: CancellationToken) -> Result<(), DaemonError> {
    if !rustix::process::geteuid().is_root() {
        return Err(DaemonError::NotRoot);
    }
    // Xenstore first: a configured but broken Xenstore stops start-up before anything is
    // created on the bridge.
    let xs_socket = match &opts.xenstore {
        XenstoreMode::Off => None,
        XenstoreMode::Socket(p) => Some(p.clone()),
        XenstoreMode::Auto => xenstore::auto_socket(),
    };
    let (store_tx, mut store_rx) = mpsc::channel::<StoreReport>(1024);
    let store = match &xs_socket {
        Some(path) => {
            let xs_err = |source| DaemonError::Xenstore {
                socket: path.display().to_string(),
                source,
            };
            let mut client = XenstoreClient::connect(path).map_err(xs_err)?;
            let stale = client.prepare().map_err(xs_err)?;
            tracing::info!(socket = %path.display(), stale, "xenstore ready: stale entries removed, /ip closed to guests");
            Some(
                StoreWorker::spawn(Box::new(client), STORE_QUEUE, store_tx)
                    .map_err(DaemonError::Thread)?,
            )
        }
        None => {
            tracing::info!("xenstore hand-over off");
            None
        }
    };
    let control = ControlServer::bind(&opts.control, opts.allow_uid)?;
    // What an earlier run steered, to be removed wherever it points now (also after a
    // kill -9, which left no chance to remove it then).
    let record = Record::open(&steering::record_path(&opts.control, &opts.bridge))?;
    let metrics_listener = match opts.metrics {
        Some(addr) => Some(
            tokio::net::TcpListener::bind(addr)
                .await
                .map_err(|source| DaemonError::Metrics { addr, source })?,
        ),
        None => None,
    };
    let mut port = Port::create(&opts.bridge)?;
    let prog = filter::program(opts.probe_v4, opts.probe_v6, &[]);
    let filter = if opts.no_bpf_filter {
        tracing::warn!("no kernel filter: every frame on the bridge reaches user space");
        None
    } else {
        Some(prog.as_slice())
    };
    let sock_err = |source| DaemonError::Socket {
        port: port.names.inner.clone(),
        source,
    };
    let sock = PacketSocket::open(port.ifindex, filter, SOCKET_RCVBUF).map_err(sock_err)?;
    let sock = sock.into_async().map_err(sock_err)?;
    // The announcement watcher: every interface, but not those that see each announcement
    // again after the port it came in on (the bridge, synjitsu's own pair).
    let bridge_ifindex: u32 = port::ifindex_of(&opts.bridge)?;
    let outer_ifindex: u32 = port::ifindex_of(&port.names.outer)?;
    let watched = filter::announcements(&[bridge_ifindex, port.ifindex as u32, outer_ifindex]);
    let watcher = if opts.no_announcement_watcher {
        tracing::warn!("no announcement watcher: a guest's announcement is taken from any port");
        None
    } else {
        let w = PacketSocket::open(0, Some(&watched), WATCHER_RCVBUF)
            .and_then(PacketSocket::into_async)
            .map_err(|source| DaemonError::Socket {
                port: "(every interface: the announcement watcher)".into(),
                source,
            })?;
        Some(w)
    };

    let mut cfg = Config::new(port.mac);
    cfg.probe_v4 = opts.probe_v4;
    cfg.probe_v6 = opts.probe_v6;
    cfg.hold_timeout = opts.hold_timeout;
    cfg.held_bytes_per_vm = opts.held_bytes_per_vm;
    cfg.held_bytes = opts.held_bytes;
    if opts.refuse_when_full {
        cfg.when_full = WhenFull::Refuse;
    }
    cfg.max_held_per_vm = opts.max_held_per_vm;
    cfg.max_held = opts.max_held;
    cfg.xenstore_off = match (&xs_socket, &opts.xenstore) {
        (Some(_), _) => None,
        (None, XenstoreMode::Off) => Some("synjitsu runs with --xenstore off".into()),
        (None, _) => Some(format!(
            "no xenstored found (XENSTORED_PATH unset, {} absent)",
            xenstore::DEFAULT_SOCKET
        )),
    };
    cfg.seed = seed();
    cfg.ports_watched = watcher.is_some();
    let core = Hold::new(cfg);

    let (ctl_tx, ctl_rx) = mpsc::channel::<ControlIn>(256);
    let (metrics_tx, metrics_rx) = mpsc::channel::<oneshot::Sender<Registry>>(16);
    let tasks = CancellationToken::new();
    let fdb = Fdb::open(bridge_ifindex, outer_ifindex)?;
    let fast = Fdb::open(bridge_ifindex, outer_ifindex)?;
    let steering = Steering::spawn(fdb, fast, record, port.mac, opts.fdb_reconcile_interval)
        .map_err(DaemonError::SteeringThread)?;
    let control_task = {
        let t = tasks.clone();
        let allow = opts.allow_uid;
        tokio::spawn(async move {
            control.run(allow, ctl_tx, t).await;
            drop(control);
        })
    };
    if let Some(l) = metrics_listener {
        tokio::spawn(shared_io::http::serve(
            l,
            Arc::new(Scrapes::new(metrics_tx)),
            shared_io::http::Limits::default(),
            tasks.clone(),
        ));
    }
    tracing::info!(
        bridge = %opts.bridge,
        control = %opts.control.display(),
        probe_v4 = ?opts.probe_v4,
        probe_v6 = ?opts.probe_v6,
        "synjitsu running"
    );

    let mut shell = Shell {
        core,
        port: port.names.inner.clone(),
        store,
        steering,
        reconcile_fdb: false,
        attached: None,
        stats: ShellStats::default(),
        txbuf: Vec::with_capacity(2048),
        filter: (!opts.no_bpf_filter).then(|| GuestFilter {
            probe_v4: opts.probe_v4,
            probe_v6: opts.probe_v6,
            generation: 0,
            macs: Vec::new(),
        }),
    };
    let outcome = shell
        .run(
            Sockets {
                port: &sock,
                watcher: watcher.as_ref(),
            },
            cancel,
            ctl_rx,
            &mut store_rx,
            metrics_rx,
        )
        .await;
    if let Err(e) = &outcome {
        tracing::error!(error = %e, "packet socket failed; stopping");
    }

    // Tear down: remove every forwarding entry synjitsu made (wherever it points), then the
    // port.
    tasks.cancel();
    let _ = control_task.await;
    shell.steering.shutdown();
    drop(shell.store);
    port.remove()?;
    tracing::info!("synjitsu stopped");
    outcome.map_err(|source| DaemonError::Socket {
        port: port.names.inner.clone(),
        source,
    })
}

struct Attached {
    conn: u64,
    tx: mpsc::Sender<ServerMessage>,
    close: CancellationToken,
}

/// The packet sockets the loop reads.
struct Sockets<'a> {
    /// On synjitsu's port.
    port: &'a AsyncFd<PacketSocket>,
    /// The announcement watcher, on every interface (none with `--no-announcement-watcher`).
    watcher: Option<&'a AsyncFd<PacketSocket>>,
}

/// What the kernel filter on synjitsu's port was last built with.
struct GuestFilter {
    probe_v4: Option<Ipv4Addr>,
    probe_v6: Option<Ipv6Addr>,
    /// The core's [`Hold::guest_macs_generation`] it was checked at.
    generation: u64,
    /// The guests' MACs it lets through.
    macs: Vec<shared_proto::Mac>,
}

struct Shell {
    core: Hold,
    /// The interface the socket is bound to.
    port: String,
    store: Option<StoreWorker>,
    steering: Steering,
    /// A sync was carried out this turn: the table is reconciled after its wishes.
    reconcile_fdb: bool,
    attached: Option<Attached>,
    stats: ShellStats,
    txbuf: Vec<u8>,
    /// `None` with `--no-bpf-filter`.
    filter: Option<GuestFilter>,
}

/// The announcement watcher's readiness, or never if there is none.
async fn watcher_readable(
    sock: Option<&AsyncFd<PacketSocket>>,
) -> Option<tokio::io::unix::AsyncFdReadyGuard<'_, PacketSocket>> {
    match sock {
        Some(s) => s.readable().await.ok(),
        None => std::future::pending().await,
    }
}

async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at.into()).await,
        None => std::future::pending().await,
    }
}

/// What one of the loop's sources, served in turn, brought.
enum Input<'a> {
    /// The packet socket is readable (or failed).
    Frames(std::io::Result<AsyncFdReadyGuard<'a, PacketSocket>>),
    /// The announcement watcher is readable.
    Announcements(AsyncFdReadyGuard<'a, PacketSocket>),
    Control(ControlIn),
    Store(StoreReport),
    /// The forwarding-table thread tried changes ([`Steering::done`]).
    FdbDone,
    Metrics(oneshot::Sender<Registry>),
    Housekeeping,
}

/// The sources [`Input`] comes from, in their order in [`Turns`].
const SOURCES: usize = 7;

/// A message from `rx` if one is there; a closed channel is never ready.
fn poll_some<T>(rx: &mut mpsc::Receiver<T>, cx: &mut std::task::Context<'_>) -> Poll<T> {
    match rx.poll_recv(cx) {
        Poll::Ready(Some(v)) => Poll::Ready(v),
        _ => Poll::Pending,
    }
}

/// One frame from the packet socket, for the core.
fn on_frame(core: &mut Hold, stats: &mut ShellStats, buf: &[u8], meta: packet::RecvMeta) {
    if meta.outgoing {
        stats.rx_outgoing += 1;
        return;
    }
    if meta.truncated {
        stats.rx_truncated += 1;
        return;
    }
    let checksum = if meta.status & packet::TP_STATUS_CSUMNOTREADY != 0 {
        Checksum::Partial
    } else if meta.status & packet::TP_STATUS_CSUM_VALID != 0 {
        Checksum::Valid
    } else {
        Checksum::Unknown
    };
    let verdict = core.on_frame(Instant::now(), &buf[..meta.len], FrameMeta { checksum });
    tracing::trace!(?verdict, len = meta.len, "frame");
}

/// Reads what the packet socket holds into the core, [`BATCH`] frames at most.
fn read_queued(
    core: &mut Hold,
    stats: &mut ShellStats,
    sock: &AsyncFd<PacketSocket>,
    rxbuf: &mut [u8],
) {
    for _ in 0..BATCH {
        match sock.get_ref().recv(rxbuf) {
            Ok(meta) => on_frame(core, stats, rxbuf, meta),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            // Empty; or failing, which the socket's own turn reports.
            Err(_) => break,
        }
    }
}

/// Tells the core that the forwarding-table changes `ids` are over, once `read_queued` has
/// given it the frames the packet socket holds. A frame the bridge sent here while a static
/// entry still steered the guest's MAC came here alone: judged after the core learnt of the
/// release, it would be taken for a flooded copy the guest has too and passed, and the guest
/// would never see it (a client's SYN then waits for its 1 s retransmission). The ids are
/// taken before the read, so what their entries sent here is queued by then (the bridge
/// hands a frame to the socket within the sender's own softirq, microseconds).
fn settle_fdb(core: &mut Hold, ids: Vec<u64>, read_queued: impl FnOnce(&mut Hold)) {
    if ids.is_empty() {
        return;
    }
    read_queued(core);
    let now = Instant::now();
    for id in ids {
        core.on_fdb_done(now, id);
    }
}

impl Shell {
    async fn run(
        &mut self,
        sockets: Sockets<'_>,
        cancel: CancellationToken,
        mut ctl_rx: mpsc::Receiver<ControlIn>,
        store_rx: &mut mpsc::Receiver<StoreReport>,
        mut metrics_rx: mpsc::Receiver<oneshot::Sender<Registry>>,
    ) -> Result<(), std::io::Error> {
        let Sockets {
            port: sock,
            watcher,
        } = sockets;
        let mut rxbuf = vec![0u8; RX_BUF];
        let mut failed = None;
        // Housekeeping once a second: kernel drop counts, and whether the port still exists
        // (a deleted interface is reported to the socket only while it goes down, when it
        // still exists).
        let mut housekeeping = tokio::time::interval(Duration::from_secs(1));
        housekeeping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let fdb_done = self.steering.done_ready();
        let mut turns = Turns::<SOURCES>::default();
        loop {
            let mut readable = std::pin::pin!(sock.ready(Interest::READABLE | Interest::ERROR));
            let mut announced = std::pin::pin!(watcher_readable(watcher));
            let mut fdb_notified = std::pin::pin!(fdb_done.notified());
            let next = std::future::poll_fn(|cx| {
                for i in turns.order() {
                    let input = match i {
                        0 => readable.as_mut().poll(cx).map(Input::Frames),
                        1 => poll_some(&mut ctl_rx, cx).map(Input::Control),
                        2 => poll_some(store_rx, cx).map(Input::Store),
                        3 => fdb_notified.as_mut().poll(cx).map(|()| Input::FdbDone),
                        4 => poll_some(&mut metrics_rx, cx).map(Input::Metrics),
                        5 => match announced.as_mut().poll(cx) {
                            Poll::Ready(Some(g)) => Poll::Ready(Input::Announcements(g)),
                            _ => Poll::Pending,
                        },
                        _ => housekeeping.poll_tick(cx).map(|_| Input::Housekeeping),
                    };
                    if input.is_ready() {
                        turns.served(i);
                        return input;
                    }
                }
                Poll::Pending
            });
            let sending = self.core.transmit_pending();
            tokio::select! {
                biased;
                () = cancel.cancelled() => break,
                () = sleep_until(self.core.poll_at()) => {
                    self.core.handle_timeout(Instant::now());
                }
                input = next => match input {
                    Input::Frames(r) => failed = self.on_readable(r, &mut rxbuf),
                    Input::Control(msg) => self.on_control(msg),
                    Input::Store(report) => {
                        self.on_store(report);
                        for _ in 1..BATCH {
                            let Ok(report) = store_rx.try_recv() else { break };
                            self.on_store(report);
                        }
                    }
                    Input::Announcements(guard) => self.on_announcements(guard, &mut rxbuf),
                    Input::FdbDone => {
                        let ids = self.steering.done();
                        let stats = &mut self.stats;
                        settle_fdb(&mut self.core, ids, |core| {
                            read_queued(core, stats, sock, &mut rxbuf);
                        });
                    }
                    Input::Metrics(reply) => {
                        self.read_kernel_stats(sock, watcher);
                        self.read_steering_stats();
                        let _ = reply.send(metrics::render(
                            &self.core,
                            &self.stats,
                            self.attached.is_some(),
                        ));
                    }
                    Input::Housekeeping => {
                        self.read_kernel_stats(sock, watcher);
                        if !port::exists(&self.port) {
                            failed = Some(std::io::Error::new(
                                std::io::ErrorKind::NotFound,
                                format!("interface {} is gone", self.port),
                            ));
                        }
                    }
                },
                // Frames left queued by the last flush (a large hand-over): the next batch,
                // once every other source has had its turn.
                () = std::future::ready(()), if sending => {}
            }
            self.flush(sock, &mut rxbuf);
            if failed.is_some() {
                break;
            }
            // The control connections' tasks (which read requests and write answers) and
            // the IO driver (which sees their sockets readable) run only when this task
            // yields: under a flood it would not, for as long as the socket stays readable.
            tokio::task::yield_now().await;
        }
        if let Some(a) = self.attached.take() {
            a.close.cancel();
        }
        failed.map_or(Ok(()), Err)
    }

    /// Rebuilds the kernel filter when the guests whose frames synjitsu passes on changed.
    fn refilter(&mut self, sock: &AsyncFd<PacketSocket>) {
        let Some(f) = self.filter.as_mut() else {
            return;
        };
        let generation = self.core.guest_macs_generation();
        if generation == f.generation {
            return;
        }
        f.generation = generation;
        let macs = self.core.guest_macs();
        if macs == f.macs {
            return;
        }
        let prog = filter::program(f.probe_v4, f.probe_v6, &macs);
        match sock.get_ref().set_filter(&prog) {
            Ok(()) => {
                tracing::debug!(guests = macs.len(), "kernel filter rebuilt");
                f.macs = macs;
            }
            Err(e) => {
                tracing::warn!(error = %e, "could not rebuild the kernel filter: frames for guests are not passed on")
            }
        }
    }

    /// Reads up to [`BATCH`] frames from the readable socket; an error if it is gone.
    fn on_readable(
        &mut self,
        ready: std::io::Result<AsyncFdReadyGuard<'_, PacketSocket>>,
        rxbuf: &mut [u8],
    ) -> Option<std::io::Error> {
        let mut guard = match ready {
            Ok(g) => g,
            Err(e) => return Some(e),
        };
        for _ in 0..BATCH {
            match guard.try_io(|s| s.get_ref().recv(rxbuf)) {
                Ok(Ok(meta)) => on_frame(&mut self.core, &mut self.stats, rxbuf, meta),
                Ok(Err(e)) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Ok(Err(e)) => {
                    // Down is passing (the kernel re-attaches the socket when it comes up);
                    // gone is the end.
                    if port::exists(&self.port) {
                        tracing::warn!(error = %e, port = %self.port, "packet socket error; the port is still there");
                        return None;
                    }
                    return Some(e);
                }
                Err(_would_block) => break,
            }
        }
        None
    }

    /// Reads up to [`BATCH`] frames from the readable announcement watcher.
    fn on_announcements(
        &mut self,
        mut guard: AsyncFdReadyGuard<'_, PacketSocket>,
        rxbuf: &mut [u8],
    ) {
        for _ in 0..BATCH {
            match guard.try_io(|s| s.get_ref().recv(rxbuf)) {
                Ok(Ok(meta)) => self.on_ingress(guard.get_ref().get_ref(), rxbuf, meta),
                Ok(Err(e)) => {
                    tracing::debug!(error = %e, "announcement watcher: receive failed");
                    break;
                }
                Err(_would_block) => break,
            }
        }
    }

    fn read_steering_stats(&mut self) {
        let f = self.steering.stats();
        self.stats.fdb_changes = f.changes;
        self.stats.fdb_errors = f.errors;
        self.stats.fdb_retries = f.retries;
        self.stats.fdb_releases_now = f.released_now;
        self.stats.fdb_reconciles = f.reconciles;
        self.stats.fdb_reconcile_fixes = f.fixed;
        self.stats.fdb_pending = f.pending;
        self.stats.fdb_sticky = f.sticky;
    }

    fn read_kernel_stats(
        &mut self,
        sock: &AsyncFd<PacketSocket>,
        watcher: Option<&AsyncFd<PacketSocket>>,
    ) {
        // PACKET_STATISTICS resets on read: accumulate, both sockets.
        for s in std::iter::once(sock).chain(watcher) {
            if let Ok((_, drops)) = s.get_ref().stats() {
                self.stats.kernel_drops += u64::from(drops);
            }
        }
    }

    /// A frame the announcement watcher saw arriving on interface `meta.ifindex`.
    fn on_ingress(&mut self, watcher: &PacketSocket, buf: &[u8], meta: packet::RecvMeta) {
        if meta.outgoing || meta.truncated {
            return;
        }
        let Ok(index) = u32::try_from(meta.ifindex) else {
            return;
        };
        // Looked up per frame: the filter passes only announcements, and an interface may
        // be renamed or its index reused between two of them.
        let port = match rustix::net::netdevice::index_to_name(watcher, index) {
            Ok(name) => name,
            Err(e) => {
                tracing::debug!(ifindex = index, error = %e, "announcement from an interface gone since");
                return;
            }
        };
        let checksum = if meta.status & packet::TP_STATUS_CSUM_VALID != 0 {
            Checksum::Valid
        } else {
            Checksum::Unknown
        };
        let verdict = self.core.on_ingress(
            Instant::now(),
            &buf[..meta.len],
            FrameMeta { checksum },
            &port,
        );
        tracing::trace!(?verdict, %port, "announcement");
    }

    fn on_control(&mut self, msg: ControlIn) {
        match msg {
            ControlIn::Attached { conn, tx, close } => {
                if let Some(old) = self.attached.replace(Attached { conn, tx, close }) {
                    old.close.cancel();
                }
            }
            ControlIn::Detached { conn } => {
                if self.attached.as_ref().is_some_and(|a| a.conn == conn) {
                    self.attached = None;
                }
            }
            ControlIn::Request { conn, req } => {
                tracing::debug!(conn, id = req.id, kind = req.body.kind(), "control request");
                // A sync may change every VM at once: once its wishes are applied, the whole
                // table is compared with them (asked with the wishes, in the flush).
                self.reconcile_fdb |= matches!(req.body, ClientMessage::Sync { .. });
                let answer = match self.core.on_control(Instant::now(), &req.body) {
                    Ok(reply) => ServerMessage::Ok { id: req.id, reply },
                    Err(e) => {
                        tracing::warn!(id = req.id, code = ?e.code, error = %e.message, "control request refused");
                        ServerMessage::Error {
                            id: req.id,
                            code: e.code,
                            message: e.message,
                        }
                    }
                };
                if let Some(a) = self.attached.as_ref().filter(|a| a.conn == conn)
                    && a.tx.try_send(answer).is_err()
                {
                    tracing::warn!(conn, "control client not keeping up; closing it");
                    a.close.cancel();
                }
            }
        }
    }

    fn on_store(&mut self, report: StoreReport) {
        match report {
            StoreReport::Done(done) => {
                if let StoreOutcome::Failed(why) = &done.outcome {
                    tracing::warn!(vm = %done.vm, error = %why, "xenstore write failed");
                }
                self.core.on_store_done(Instant::now(), done);
            }
            StoreReport::Ok(_) => {}
            StoreReport::Failed(f) => {
                self.stats.store_errors += 1;
                tracing::warn!(op = f.op, error = %f.error, "xenstore operation failed");
            }
        }
    }

    /// Takes every output the core queued and hands it to its IO: first the releases of
    /// guests' MACs, made here and now, so that the guest's answers to the SYNs re-sent next
    /// go through the bridge, not to synjitsu's port (where one read after the core learnt
    /// of the release would not be passed on); then the frames (a held SYN re-sent at a
    /// guest's announcement waits for no bookkeeping: rebuilding the kernel filter when the
    /// hand-over ends costs a program's compilation); then events, the filter, and the work
    /// of the other threads.
    fn flush(&mut self, sock: &AsyncFd<PacketSocket>, rxbuf: &mut [u8]) {
        let (released, wishes) = self.release_now(sock, rxbuf);
        self.send_frames(sock);
        // The thread is woken only now: on a busy machine its wake-up can take this thread's
        // core before the frames are out.
        for op in released {
            self.steering.released(op);
        }
        self.hand_over_the_rest(sock, wishes);
    }

    /// Makes the releases the core asks for on the spot ([`Steering::release_now`], at most
    /// [`RELEASES_NOW`]) and tells the core once it has the frames the socket holds (see
    /// [`settle_fdb`]: those came here alone while the entries steered); returns those made,
    /// for [`Steering::released`], and the wishes left for the thread (with any release a
    /// frame read meanwhile asked for).
    fn release_now(
        &mut self,
        sock: &AsyncFd<PacketSocket>,
        rxbuf: &mut [u8],
    ) -> (Vec<crate::hold::FdbOp>, Vec<crate::hold::FdbOp>) {
        let mut done = Vec::new();
        let mut wishes = Vec::new();
        while let Some(op) = self.core.poll_fdb() {
            if done.len() < RELEASES_NOW && self.steering.release_now(&op) {
                done.push(op);
            } else {
                wishes.push(op);
            }
        }
        let ids = done.iter().map(|op| op.id).collect();
        let stats = &mut self.stats;
        settle_fdb(&mut self.core, ids, |core| {
            read_queued(core, stats, sock, rxbuf)
        });
        wishes.extend(std::iter::from_fn(|| self.core.poll_fdb()));
        (done, wishes)
    }

    /// Sends the frames the core queued: for guests' ports, then at most [`BATCH`] others.
    fn send_frames(&mut self, sock: &AsyncFd<PacketSocket>) {
        while let Some(port) = self.core.poll_to_guest(&mut self.txbuf) {
            // Straight out of the guest's port: into the bridge it would come back here.
            let sent = rustix::net::netdevice::name_to_index(sock.get_ref(), &port)
                .map_err(std::io::Error::from)
                .and_then(|i| {
                    let i = i32::try_from(i).map_err(std::io::Error::other)?;
                    sock.get_ref().send_to(i, &self.txbuf)
                });
            match sent {
                Ok(()) => self.stats.tx_frames += 1,
                Err(e) => {
                    self.stats.tx_errors += 1;
                    tracing::debug!(%port, error = %e, "frame for a guest not sent");
                }
            }
        }
        // At most a batch a turn: a hand-over of tens of thousands of SYNs sent at once would
        // hold up every other source, and overflow the kernel's per-CPU backlog
        // (netdev_max_backlog, 1000) on the way to the guest, which drops the rest.
        for _ in 0..BATCH {
            if !self.core.poll_transmit(&mut self.txbuf) {
                break;
            }
            match sock.get_ref().send(&self.txbuf) {
                Ok(()) => self.stats.tx_frames += 1,
                Err(e) => {
                    self.stats.tx_errors += 1;
                    tracing::debug!(error = %e, "send failed");
                }
            }
        }
    }

    /// Hands the core's events, Xenstore work and forwarding-table `wishes` (with any the
    /// core queued since) to where they go, rebuilding the kernel filter on the way.
    fn hand_over_the_rest(
        &mut self,
        sock: &AsyncFd<PacketSocket>,
        mut wishes: Vec<crate::hold::FdbOp>,
    ) {
        while let Some(event) = self.core.poll_event() {
            match &self.attached {
                Some(a) => {
                    if a.tx.try_send(ServerMessage::Event { event }).is_err() {
                        tracing::warn!(conn = a.conn, "control client not keeping up; closing it");
                        a.close.cancel();
                    }
                }
                None => self.stats.events_undelivered += 1,
            }
        }
        // Before the forwarding-table wishes: a MAC steered here must find the filter passing
        // its frames.
        self.refilter(sock);
        while let Some(op) = self.core.poll_store() {
            let refused = match &self.store {
                Some(w) => w.try_send(op).err(),
                None => Some(op),
            };
            if let Some(op) = refused {
                self.stats.store_errors += 1;
                if let StoreOp::Write { id, vm, key, .. } = op {
                    // The core must learn the write will not happen, or the SYN waits for
                    // it forever: it goes on the wire instead.
                    self.core.on_store_done(
                        Instant::now(),
                        StoreDone {
                            id,
                            vm,
                            key,
                            outcome: StoreOutcome::Failed("xenstore queue full".into()),
                        },
                    );
                }
            }
        }
        let reconcile = std::mem::take(&mut self.reconcile_fdb);
        wishes.extend(std::iter::from_fn(|| self.core.poll_fdb()));
        self.steering.want(wishes, reconcile);
    }
}

/// Splits `--probe-ip` values into one per family.
pub fn probe_addrs(addrs: &[IpAddr]) -> Result<(Option<Ipv4Addr>, Option<Ipv6Addr>), String> {
    let (mut v4, mut v6) = (None, None);
    for a in addrs {
        match a {
            IpAddr::V4(x) if v4.is_none() => v4 = Some(*x),
            IpAddr::V6(x) if v6.is_none() => v6 = Some(*x),
            _ => {
                return Err(format!(
                    "--probe-ip {a}: at most one IPv4 and one IPv6 address"
                ));
            }
        }
        if a.is_unspecified() || a.is_multicast() || a.is_loopback() {
            return Err(format!("--probe-ip {a}: not a usable unicast address"));
        }
    }
    Ok((v4, v6))
}

#[cfg(test)]
mod tests {
    use std::time::Instant;

    use shared_proto::{ClientMessage, Handover};

    use super::settle_fdb;
    use crate::hold::tests::{core, drain_tx, edited_syn_v4, fdb_ops, guest_garp, www};
    use crate::hold::{FdbAction, FrameMeta, Verdict, VmPhase};
    use crate::wire::tests::SYN_V4;

    #[test]
    fn a_syn_the_bridge_gave_synjitsu_before_the_guests_release_finished_still_reaches_the_guest() {
        let mut h = core();
        let t0 = Instant::now();
        let mut vm = www(Handover::Wire);
        vm.announces_listening = true;
        h.on_control(t0, &ClientMessage::Booting { vm }).unwrap();
        assert_eq!(
            h.on_frame(t0, &guest_garp(), FrameMeta::default()),
            Verdict::Announced
        );
        let rel = fdb_ops(&mut h);
        assert_eq!(rel.len(), 1);
        assert_eq!(rel[0].action, FdbAction::Release);
        drain_tx(&mut h);
        // The client's SYN came while the static entry still sent the guest's frames here
        // alone, and waits in the socket when the steering thread says the release is over.
        let mut verdict = None;
        settle_fdb(&mut h, vec![rel[0].id], |h| {
            verdict = Some(h.on_frame(t0, &SYN_V4, FrameMeta::default()));
        });
        assert_eq!(verdict, Some(Verdict::Held));
        assert_eq!(
            drain_tx(&mut h),
            vec![SYN_V4.to_vec()],
            "re-sent to the guest"
        );
        assert_eq!(h.vms().next().unwrap().1, VmPhase::Running);
        // One read after that was flooded to the guest too: passed, not sent a second time.
        let later = edited_syn_v4(|f| f[34..36].copy_from_slice(&2000u16.to_be_bytes()));
        assert_eq!(h.on_frame(t0, &later, FrameMeta::default()), Verdict::Pass);
        assert!(drain_tx(&mut h).is_empty());
    }
}
