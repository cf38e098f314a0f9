//! The IO shell: sockets, the backend, the store, synjitsu and Xenstore around the fleet, in
//! one `select!` loop.
//!
//! Start-up: open the backend and the store, commit the configuration, reconcile every VM
//! (what the store remembered, what the backend sees: a running VM is adopted, never booted
//! twice), then serve DNS on UDP and TCP. The loop: the timer first (the fleet's
//! `poll_at`, and the periodic poll of running VMs' state and counters), then events
//! (backend results, synjitsu, Xenstore), slow-path queries, a reload, and shutdown.
//! Every fleet command is carried out here: backend calls on the blocking pool, answers to
//! waiting queries, table flags, synjitsu requests, key watches and store commits.
//!
//! SIGHUP (a reload) re-reads the file and the specs: VMs added are reconciled and served,
//! VMs removed are forgotten and left as they are (a running one keeps running, unmanaged;
//! stop it by hand if it should go), changed VMs take their new settings at their next boot.
//! A reload that would remove more than `max_removed_share` of the VMs is refused (an emptied
//! file must not drop the fleet).
//! Settings that need new sockets or another backend (bind, listen, backend, connect,
//! synjitsu, persistdb, metrics, the TCP bounds) need a restart and are ignored with a
//! warning.
//! SIGTERM/SIGINT stop jitsu-dns and leave every VM as it is; the store is flushed.

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use shared_io::RateLimited;
use tokio::sync::{Notify, mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn};

use crate::backend::{self, Backend, BackendError};
use crate::config::{self, Config, Flags, Forwarders, StopMode, VmConfig};
use crate::dns::{self, Clock, Handler, SlowQuery, Table, Tables, VmSlot};
use crate::fleet::{
    self, Answer, Command, Event, Fleet, Lifecycle, Observed, Persist, QueryId, Settings, VmName,
    VmView,
};
use crate::forward::{self, Forwarder, UpstreamError, parse_resolv_conf};
use crate::metrics::Metrics;
use crate::state::{self, Change, ConfigChange, StateError, Store, Tree, Wall};
use crate::synjitsu::{self, Outgoing};
use crate::transport;
use crate::xenstore::KeyWatcher;

/// Events from backend calls, synjitsu and Xenstore waiting for the loop.
const EVENT_QUEUE: usize = 4096;

/// How the daemon is told to stop or reload.
#[derive(Debug)]
pub struct Control {
    /// Cancelled on SIGTERM/SIGINT.
    pub shutdown: CancellationToken,
    /// One message per SIGHUP.
    pub reload: mpsc::Receiver<()>,
}

/// Why the daemon could not start (once running, it logs and carries on).
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    /// The backend could not be opened.
    #[error(transparent)]
    Backend(#[from] BackendError),
    /// The store could not be opened.
    #[error(transparent)]
    State(#[from] StateError),
    /// A socket could not be bound.
    #[error("cannot listen on {addr} ({what}): {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// DNS over UDP or TCP, or metrics.
        what: &'static str,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// Forwarding is misconfigured.
    #[error("forwarding: {0}")]
    Forward(#[from] UpstreamError),
}

/// The forwarder for `cfg`, `None` when forwarding is off (or nothing to forward to).
fn forwarder_for(cfg: &Config) -> Result<Option<Arc<Forwarder>>, DaemonError> {
    let (ips, from_system) = match &cfg.forwarders {
        Forwarders::Off => {
            info!("forwarding off: names outside the zones are refused");
            return Ok(None);
        }
        Forwarders::List(l) => (l.clone(), false),
        Forwarders::System => {
            let text = std::fs::read_to_string("/etc/resolv.conf").unwrap_or_default();
            (parse_resolv_conf(&text), true)
        }
    };
    let up = forward::upstreams(&ips, cfg.forwarder_port, cfg.dns_addr(), from_system)?;
    for s in &up.skipped {
        warn!(forwarder = %s, "skipping the /etc/resolv.conf nameserver that is jitsu-dns itself");
    }
    if up.servers.is_empty() {
        warn!(
            "no forwarder (no usable nameserver in /etc/resolv.conf): names outside the zones are refused"
        );
        return Ok(None);
    }
    let clients = match &cfg.forward_clients {
        Some(nets) => nets.clone(),
        None => forward::default_clients(cfg.bind, &local_networks()),
    };
    let list = |items: Vec<String>| items.join(", ");
    info!(
        servers = %list(up.servers.iter().map(ToString::to_string).collect()),
        clients = %list(clients.iter().map(ToString::to_string).collect()),
        max_in_flight = cfg.forward_max,
        "forwarding names outside the zones for these clients only (others are refused)"
    );
    Ok(Some(Arc::new(Forwarder::new(
        up.servers,
        clients,
        cfg.forward_max,
    ))))
}

/// Every address of this host with its prefix length (none if they cannot be read: then
/// only loopback clients may forward).
fn local_networks() -> Vec<(std::net::IpAddr, u8)> {
    match if_addrs::get_if_addrs() {
        Ok(ifs) => ifs
            .into_iter()
            .map(|i| match i.addr {
                if_addrs::IfAddr::V4(a) => (a.ip.into(), a.prefixlen),
                if_addrs::IfAddr::V6(a) => (a.ip.into(), a.prefixlen),
            })
            .collect(),
        Err(e) => {
            warn!(error = %e, "cannot list this host's addresses: only loopback clients may forward");
            Vec::new()
        }
    }
}

fn settings(cfg: &Config) -> Settings {
    Settings {
        ttl: Duration::from_secs(u64::from(cfg.ttl)),
        max_running: cfg.max_running,
        max_boots_per_second: cfg.max_boots_per_second,
        flush_every: fleet::COUNTERS_FLUSH_EVERY,
    }
}

/// How often running VMs' state and counters are polled: often enough for idle detection
/// over 2 x TTL and to notice a VM that exited, rarely enough to cost nothing.
fn poll_interval(ttl: u32) -> Duration {
    (Duration::from_secs(u64::from(ttl)) / 2)
        .clamp(Duration::from_millis(200), Duration::from_secs(5))
}

fn serial_now() -> u32 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as u32)
        .unwrap_or(1)
}

#[derive(Debug, Clone, Copy)]
enum Op {
    Start,
    Resume,
    Unpause,
    Stop(StopMode),
    Cleanup,
}

struct Shell {
    flags: Flags,
    cfg: Config,
    fleet: Fleet,
    backend: Arc<dyn Backend>,
    store: Store,
    metrics: Arc<Metrics>,
    tables: Arc<Tables>,
    slots: HashMap<VmName, Arc<VmSlot>>,
    clock: Clock,
    wall: Wall,
    pending: HashMap<QueryId, oneshot::Sender<Answer>>,
    next_query: u64,
    events: mpsc::Sender<Event>,
    synjitsu: Option<mpsc::Sender<Outgoing>>,
    keys: KeyWatcher,
    poll_busy: Arc<AtomicBool>,
    /// The backend pushes lifecycle changes: states are not polled, only counters.
    pushes_states: bool,
    /// A pushed change was lost (full queue): the next poll reads states once.
    push_lost: Arc<AtomicBool>,
    limit_log: RateLimited,
    persisted_requests: HashMap<VmName, u64>,
    /// Changes that did not fit the store's queue since the whole state was last sent: the
    /// whole state is due.
    store_dropped: u64,
    /// The store's writer asked for the whole state, or changes were dropped: send it.
    rewrite_due: bool,
    store_log: RateLimited,
}

impl Shell {
    fn commit(&mut self, change: Change) {
        // What is due first: the change then lands on the whole state it belongs to.
        if self.rewrite_due {
            self.send_rewrite();
        }
        if let Err(e) = self.store.apply(change) {
            self.metrics.add_store_dropped(1);
            self.store_dropped += 1;
            self.rewrite_due = true;
            if let Some(suppressed) = self.store_log.allow(Instant::now()) {
                warn!(error = %e, suppressed, "state change not recorded: the whole state will be written instead");
            }
        }
    }

    /// Sends the store the whole state as the fleet has it now, superseding every change it
    /// did not record; if that does not fit either, it stays due (the next tick).
    fn send_rewrite(&mut self) {
        let views = self.fleet.views();
        let tree = state::snapshot(&views, self.cfg.ttl, &self.wall);
        match self.store.rewrite(tree, self.store_dropped) {
            Ok(()) => {
                self.rewrite_due = false;
                self.store_dropped = 0;
                for v in views {
                    self.persisted_requests
                        .insert(v.cfg.name.clone(), v.requests);
                }
            }
            Err(e) => {
                self.rewrite_due = true;
                debug!(error = %e, "the whole state waits for room in the store's queue");
            }
        }
    }

    /// Commits the configuration over `old` (the store's last committed tree).
    fn commit_config(&mut self, old: &Tree, verb: &str) {
        // Each VM as the fleet runs it (with a MAC taken from its domain), in the
        // configuration's order.
        let vms: Vec<VmView> = self
            .cfg
            .vms
            .iter()
            .filter_map(|v| self.fleet.view(&v.name))
            .collect();
        let ConfigChange { change, summary } =
            state::config_change(old, &vms, self.cfg.ttl, &self.wall, verb);
        if let Some(changes) = summary {
            info!(%changes, "configuration {verb}");
        }
        self.commit(change);
    }

    fn run_blocking(&self, vm: Arc<VmConfig>, op: Op) {
        let backend = self.backend.clone();
        let events = self.events.clone();
        tokio::task::spawn_blocking(move || {
            let name = vm.name.clone();
            let event = match op {
                Op::Start | Op::Resume | Op::Unpause => {
                    let started = match op {
                        Op::Start => backend.start(&vm),
                        Op::Resume => backend.resume(&vm),
                        _ => backend.unpause(&vm),
                    };
                    match started {
                        Ok(s) => Event::Started {
                            vm: name,
                            domid: s.domid,
                            port: s.port,
                        },
                        Err(e) => Event::StartFailed {
                            vm: name,
                            error: e.to_string(),
                        },
                    }
                }
                Op::Stop(mode) => match backend.stop(&vm, mode) {
                    Ok(()) => Event::Stopped { vm: name },
                    Err(e) => Event::StopFailed {
                        vm: name,
                        error: e.to_string(),
                    },
                },
                Op::Cleanup => {
                    if let Err(e) = backend.stop(&vm, StopMode::Destroy) {
                        warn!(vm = %name, error = %e, "cleaning up after a VM that exited");
                    }
                    return;
                }
            };
            let _ = events.blocking_send(event);
        });
    }

    /// Runs `first` through the fleet, and whatever follows from it.
    fn process(&mut self, now: Instant, first: Event) {
        let mut queue = VecDeque::from([first]);
        while let Some(ev) = queue.pop_front() {
            match &ev {
                Event::SynjitsuUp => self.metrics.set_synjitsu_connected(true),
                Event::SynjitsuDown => self.metrics.set_synjitsu_connected(false),
                Event::StartFailed { vm, error } => warn!(vm = %vm, %error, "boot failed"),
                Event::StopFailed { vm, error } => warn!(vm = %vm, %error, "stop failed"),
                _ => {}
            }
            for cmd in self.fleet.handle(now, ev) {
                self.execute(now, cmd, &mut queue);
            }
        }
        self.metrics
            .set_running(self.fleet.count_in(Lifecycle::Running));
    }

    fn execute(&mut self, now: Instant, cmd: Command, follow: &mut VecDeque<Event>) {
        match cmd {
            Command::Start { vm } => {
                self.metrics.add_boot();
                self.run_blocking(vm, Op::Start);
            }
            Command::Resume { vm } => {
                self.metrics.add_resume();
                self.run_blocking(vm, Op::Resume);
            }
            Command::Unpause { vm } => {
                self.metrics.add_resume();
                self.run_blocking(vm, Op::Unpause);
            }
            Command::Stop { vm, mode } => {
                self.metrics.add_stop(mode);
                self.run_blocking(vm, Op::Stop(mode));
            }
            Command::Cleanup { vm } => self.run_blocking(vm, Op::Cleanup),
            Command::Answer { id, answer } => {
                if let Answer::ServFail(r) = answer
                    && r.is_limit()
                {
                    self.metrics.add_limit_refusal(r);
                    if let Some(suppressed) = self.limit_log.allow(now) {
                        warn!(
                            limit = r.as_str(),
                            suppressed, "query refused (SERVFAIL): limit reached"
                        );
                    }
                }
                if let Some(tx) = self.pending.remove(&id) {
                    // The client may have given up; nothing to do then.
                    let _ = tx.send(answer);
                }
            }
            Command::Serve { vm, direct } => {
                if let Some(slot) = self.slots.get(&vm) {
                    slot.direct.store(direct, Ordering::Release);
                }
            }
            Command::Synjitsu { tag, msg } => {
                let sent = self
                    .synjitsu
                    .as_ref()
                    .is_some_and(|tx| tx.try_send(Outgoing { tag, msg }).is_ok());
                if !sent {
                    follow.push_back(Event::SynjitsuReplied { tag, ok: false });
                }
            }
            Command::WatchKey { vm, path } => self.keys.watch(vm, path),
            Command::UnwatchKey { vm } => self.keys.unwatch(&vm),
            Command::Persist(Persist::Lifecycle {
                vm,
                from,
                to,
                cause,
                boot_took,
                view,
            }) => {
                if let Some(d) = boot_took {
                    self.metrics.observe_boot(d);
                }
                if to == Lifecycle::Failed {
                    self.metrics.add_boot_failure();
                }
                info!(vm = %vm, from = %from, to = %to, %cause, "lifecycle");
                self.persisted_requests.insert(vm, view.requests);
                self.commit(state::lifecycle_change(&view, from, &cause, &self.wall));
            }
            Command::Persist(Persist::Mac {
                vm,
                mac,
                configured,
                keyed,
            }) => {
                if keyed {
                    warn!(vm = %vm, %configured, domain = %mac, "the domain's MAC differs from the VM's mac key: using the domain's, which its guest sends from");
                } else {
                    info!(vm = %vm, %mac, "using the MAC of the VM's existing domain");
                }
                self.commit(state::mac_change(&vm, mac));
            }
            Command::Persist(Persist::Counters) => self.flush_counters(None),
        }
    }

    /// Carries out `cmds` (from outside [`Self::process`]), then runs the events they led to.
    fn execute_all(&mut self, now: Instant, cmds: Vec<Command>) {
        let mut follow = VecDeque::new();
        for c in cmds {
            self.execute(now, c, &mut follow);
        }
        while let Some(ev) = follow.pop_front() {
            self.process(now, ev);
        }
    }

    /// Commits request counters that changed since they were last committed.
    fn flush_counters(&mut self, why: Option<&str>) {
        let mut files = Vec::new();
        let mut moved = Vec::new();
        for v in self.fleet.views() {
            let before = self.persisted_requests.get(&v.cfg.name).copied();
            if before != Some(v.requests) {
                moved.push(format!("{} {}", v.cfg.name, v.requests));
                self.persisted_requests
                    .insert(v.cfg.name.clone(), v.requests);
            }
            files.extend(state::state_files(&v, &self.wall));
        }
        let message = if moved.is_empty() {
            None
        } else {
            Some(match why {
                Some(w) => format!("requests: {} ({w})", moved.join(", ")),
                None => format!("requests: {}", moved.join(", ")),
            })
        };
        self.commit(Change {
            remove: vec![],
            files,
            message,
            always: false,
        });
    }

    fn query(&mut self, q: SlowQuery) {
        self.next_query += 1;
        let id = QueryId(self.next_query);
        self.pending.insert(id, q.reply);
        self.process(
            Instant::now(),
            Event::Query {
                id,
                vm: q.vm,
                from: Some(q.from),
            },
        );
    }

    fn take_activity(&self) -> Vec<fleet::Activity> {
        self.slots
            .values()
            .filter_map(|s| s.take_activity(&self.clock))
            .collect()
    }

    fn poll_backend(&self) {
        if self.poll_busy.swap(true, Ordering::AcqRel) {
            return;
        }
        let vms = self.fleet.polled();
        let backend = self.backend.clone();
        let events = self.events.clone();
        let busy = self.poll_busy.clone();
        let metrics = self.metrics.clone();
        let poll_states = !self.pushes_states || self.push_lost.swap(false, Ordering::AcqRel);
        tokio::task::spawn_blocking(move || {
            for (vm, epoch) in vms {
                match backend.counters(&vm) {
                    Ok(counters) => {
                        let _ = events.blocking_send(Event::Counters {
                            vm: vm.name.clone(),
                            counters,
                        });
                    }
                    Err(e) => debug!(vm = %vm.name, error = %e, "counters"),
                }
                if !poll_states {
                    continue;
                }
                metrics.add_state_poll();
                match backend.state(&vm) {
                    Ok(state) => {
                        let _ = events.blocking_send(Event::Observed {
                            vm: vm.name.clone(),
                            state,
                            epoch: Some(epoch),
                        });
                    }
                    Err(e) => debug!(vm = %vm.name, error = %e, "state"),
                }
            }
            busy.store(false, Ordering::Release);
        });
    }

    /// Asks the backend about `vms` (blocking pool) and reconciles them with what the store
    /// remembered.
    async fn reconcile(&mut self, vms: Vec<Arc<VmConfig>>, tree: &Tree) {
        let backend = self.backend.clone();
        let looked = tokio::task::spawn_blocking(move || {
            vms.iter()
                .map(|v| (v.name.clone(), backend.lookup(v)))
                .collect::<Vec<_>>()
        })
        .await
        .unwrap_or_default();
        // The fleet takes each domain's own MAC (and the port the backend always gives it)
        // before it hears of the VM's state.
        for (vm, found) in &looked {
            let Ok(found) = found else { continue };
            if !found.macs.is_empty() {
                self.process(
                    Instant::now(),
                    Event::MacFound {
                        vm: vm.clone(),
                        macs: found.macs.clone(),
                    },
                );
            }
            if let Some(port) = &found.fixed_port {
                self.process(
                    Instant::now(),
                    Event::PortFound {
                        vm: vm.clone(),
                        port: port.clone(),
                    },
                );
            }
        }
        for (name, found) in looked {
            let observed = match found {
                Ok(d) => d.state,
                Err(e) => {
                    warn!(vm = %name, error = %e, "backend lookup failed: taking the VM as off");
                    Observed::Off
                }
            };
            let stored = state::stored(tree, &name);
            if let Some(s) = &stored {
                self.persisted_requests.insert(name.clone(), s.requests);
            }
            self.process(
                Instant::now(),
                Event::Reconciled {
                    vm: name,
                    stored,
                    observed,
                },
            );
        }
    }

    async fn reload(&mut self) {
        let new = match config::load(&self.flags) {
            Ok(c) => c,
            Err(e) => {
                error!(error = %e, "configuration not reloaded: keeping the current one");
                return;
            }
        };
        if let Err(e) = new.check_removals(&self.cfg) {
            error!(error = %e, "configuration not reloaded: keeping the current one");
            return;
        }
        let (new, kept) = new.for_reload(&self.cfg);
        for setting in kept {
            warn!(setting, "this setting changes only with a restart: ignored");
        }
        // Checked against the address served, which a reload does not change.
        let forwarder = match forwarder_for(&new) {
            Ok(f) => f,
            Err(e) => {
                error!(error = %e, "configuration not reloaded: keeping the current one");
                return;
            }
        };
        let added: Vec<Arc<VmConfig>> = new
            .vms
            .iter()
            .filter(|v| self.fleet.state(&v.name).is_none())
            .cloned()
            .map(Arc::new)
            .collect();
        for v in &self.cfg.vms {
            if !new.vms.iter().any(|n| n.name == v.name) {
                info!(vm = %v.name, state = ?self.fleet.state(&v.name), "removed from the configuration: left as it is, no longer managed");
            }
        }
        let now = Instant::now();
        self.fleet.set_settings(settings(&new));
        let old_tree = self.store_tree();
        let cmds = self
            .fleet
            .reconfigure(now, new.vms.iter().cloned().map(Arc::new));
        self.slots = dns::slots_for(&new.vms, &self.slots);
        self.cfg = new;
        self.commit_config(&old_tree, "reloaded");
        self.execute_all(now, cmds);
        // New VMs are looked up before their names are served, so one that already runs is
        // adopted rather than booted again.
        self.reconcile(added, &old_tree).await;
        self.tables.replace(Table::build(
            &self.cfg,
            &self.slots,
            forwarder,
            serial_now(),
        ));
        info!(vms = self.cfg.vms.len(), "configuration reloaded");
    }

    /// The store's view as of the last commit (from its writer; read back from the
    /// repository if the writer is gone).
    fn store_tree(&self) -> Tree {
        self.store
            .flush()
            .unwrap_or_else(|| state::read_head(self.store.dir()).unwrap_or_default())
    }
}

/// Runs jitsu-dns until `ctl.shutdown` is cancelled.
pub async fn run(flags: Flags, cfg: Config, mut ctl: Control) -> Result<(), DaemonError> {
    if let Some(why) = &cfg.backend_why {
        info!(backend = cfg.backend.as_str(), "backend: {why}");
    }
    let backend = backend::open(cfg.backend, cfg.connect.as_deref())?;
    let metrics = Arc::new(Metrics::new());
    let rewrite_wanted = Arc::new(Notify::new());
    let wanted = rewrite_wanted.clone();
    let (store, tree) = Store::open(
        cfg.persistdb.as_deref(),
        state::Hooks {
            metrics: metrics.clone(),
            want_rewrite: Box::new(move || wanted.notify_one()),
        },
    )?;
    info!(store = %store.dir().display(), temporary = cfg.persistdb.is_none(), "state store");
    let forwarder = forwarder_for(&cfg)?;
    let clock = Clock::new();
    let (events_tx, mut events_rx) = mpsc::channel(EVENT_QUEUE);
    let synjitsu = cfg
        .synjitsu
        .clone()
        .map(|path| synjitsu::spawn(path, events_tx.clone(), ctl.shutdown.clone()));
    let now = Instant::now();
    let vms: Vec<Arc<VmConfig>> = cfg.vms.iter().cloned().map(Arc::new).collect();
    let slots = dns::slots_for(&cfg.vms, &HashMap::new());
    let tables = Tables::new(Table::build(&cfg, &slots, forwarder, serial_now()));
    let mut shell = Shell {
        flags,
        fleet: Fleet::new(now, settings(&cfg), vms.clone()),
        cfg,
        backend,
        store,
        metrics: metrics.clone(),
        tables: tables.clone(),
        slots,
        clock,
        wall: Wall::now(),
        pending: HashMap::new(),
        next_query: 0,
        events: events_tx.clone(),
        synjitsu,
        keys: KeyWatcher::new(events_tx.clone()),
        poll_busy: Arc::new(AtomicBool::new(false)),
        pushes_states: false,
        push_lost: Arc::new(AtomicBool::new(false)),
        // One warning a second about refused queries, however many there are.
        limit_log: RateLimited::new(Duration::from_secs(1)),
        persisted_requests: HashMap::new(),
        store_dropped: 0,
        rewrite_due: false,
        store_log: RateLimited::new(Duration::from_secs(10)),
    };
    shell.commit_config(&tree, "loaded");
    // Backends that push lifecycle changes (libvirt) report them as current observations;
    // the others are polled. Subscribed before reconciling: a change after a VM's lookup is
    // then queued and handled after it, so the fleet ends with the latest state.
    let pushed = events_tx.clone();
    let push_metrics = metrics.clone();
    let push_lost = shell.push_lost.clone();
    let sink: backend::EventSink = Box::new(move |ev| {
        push_metrics.add_backend_event();
        let event = Event::Observed {
            vm: ev.name.as_str().into(),
            state: ev.state,
            epoch: None,
        };
        if pushed.try_send(event).is_err() {
            push_lost.store(true, Ordering::Release);
            warn!(vm = %ev.name, "lifecycle event dropped: the event queue is full; states are polled once");
        }
    });
    let backend2 = shell.backend.clone();
    let subscribed = tokio::task::spawn_blocking(move || backend2.subscribe(sink))
        .await
        .unwrap_or(Ok(false));
    match subscribed {
        Ok(true) => {
            shell.pushes_states = true;
            info!("the backend pushes lifecycle events: states are not polled");
        }
        Ok(false) => debug!("the backend is polled for lifecycle changes"),
        Err(e) => warn!(error = %e, "lifecycle events unavailable: polling instead"),
    }
    shell.reconcile(vms, &tree).await;
    let backend2 = shell.backend.clone();
    if let Ok(Ok(listed)) = tokio::task::spawn_blocking(move || backend2.list()).await {
        for l in listed {
            if shell.fleet.state(&l.name).is_none() && l.state != Observed::Off {
                info!(vm = %l.name, state = ?l.state, "the backend runs a VM that is not configured: left alone");
            }
        }
    }

    let addr = shell.cfg.dns_addr();
    let udp = tokio::net::UdpSocket::bind(addr)
        .await
        .map_err(|source| DaemonError::Bind {
            addr,
            what: "DNS over UDP",
            source,
        })?;
    let tcp = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|source| DaemonError::Bind {
            addr,
            what: "DNS over TCP",
            source,
        })?;
    let (slow_tx, mut slow_rx) = mpsc::channel(dns::SLOW_QUEUE);
    let handler = Arc::new(Handler::new(tables, slow_tx, metrics.clone(), clock));
    let limits = transport::Limits {
        udp_in_flight: transport::UDP_IN_FLIGHT,
        tcp_max_clients: shell.cfg.tcp_max_clients,
        tcp_max_per_client: shell.cfg.tcp_max_per_client,
    };
    let serving = ctl.shutdown.child_token();
    let mut server = tokio::spawn(transport::serve(
        udp,
        tcp,
        handler,
        metrics.clone(),
        limits,
        serving.clone(),
    ));
    if let Some(maddr) = shell.cfg.metrics {
        let listener = tokio::net::TcpListener::bind(maddr)
            .await
            .map_err(|source| DaemonError::Bind {
                addr: maddr,
                what: "metrics",
                source,
            })?;
        tokio::spawn(shared_io::http::serve(
            listener,
            metrics.clone(),
            shared_io::http::Limits::default(),
            ctl.shutdown.clone(),
        ));
        info!(addr = %maddr, "metrics at /metrics");
    }
    info!(
        dns = %addr,
        backend = shell.backend.kind(),
        vms = shell.cfg.vms.len(),
        ttl = shell.cfg.ttl,
        tcp_max_clients = limits.tcp_max_clients,
        tcp_max_per_client = limits.tcp_max_per_client,
        "jitsu-dns ready"
    );

    let poll_every = poll_interval(shell.cfg.ttl);
    let mut next_poll = Instant::now() + poll_every;
    loop {
        let wake = shell
            .fleet
            .poll_at()
            .map_or(next_poll, |t| t.min(next_poll));
        tokio::select! {
            biased;
            _ = tokio::time::sleep_until(wake.into()) => {
                let now = Instant::now();
                if now >= next_poll {
                    shell.poll_backend();
                    next_poll = now + poll_every;
                }
                let activity = shell.take_activity();
                shell.process(now, Event::Tick { activity });
                if shell.rewrite_due {
                    shell.send_rewrite();
                }
            }
            Some(ev) = events_rx.recv() => shell.process(Instant::now(), ev),
            () = rewrite_wanted.notified() => shell.send_rewrite(),
            Some(q) = slow_rx.recv() => shell.query(q),
            Some(()) = ctl.reload.recv() => shell.reload().await,
            _ = ctl.shutdown.cancelled() => break,
        }
    }

    info!("stopping; VMs are left as they are");
    serving.cancel();
    if tokio::time::timeout(Duration::from_secs(2), &mut server)
        .await
        .is_err()
    {
        debug!("the DNS sockets were not closed within 2 s");
        server.abort();
    }
    // Counted, not acted upon: nothing is stopped on the way out.
    let activity = shell.take_activity();
    shell.fleet.record_activity(activity);
    shell.flush_counters(Some("jitsu-dns stopped"));
    // Dropping the store writes what is queued and ends its thread.
    drop(shell);
    Ok(())
}
