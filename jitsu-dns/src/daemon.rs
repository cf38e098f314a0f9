//! The IO shell: sockets, the backend, the store, synjitsu and Xenstore around the fleet, in
//! one `select!` loop.
//!
//! Start-up: open the backend and the store, commit the configuration, reconcile every VM
//! (what the store remembered, what the backend sees: a running VM is adopted, never booted
//! twice), then serve DNS on UDP and TCP. The loop: the timer first (the fleet's
//! `poll_at`, and the periodic poll of running VMs' state and counters), then events
//! (backend results, synjitsu, Xenstore), slow-path queries, a reload, and shutdown.
//! Every fleet command is carried out here: backend calls on the blocking pool, answers to
//! waiting queries, table flags, synjitsu requests, key watches, port probes and store
//! commits.
//!
//! SIGHUP (a reload) re-reads the file and the specs: VMs added are reconciled and served,
//! VMs removed are forgotten and left as they are (a running one keeps running, unmanaged;
//! stop it by hand if it should go), changed VMs take their new settings at their next boot.
//! A reload that would remove more than `max_removed_share` of the VMs is refused (an emptied
//! file must not drop the fleet).
//! Settings that need new sockets or another backend (bind, listen, backend, connect,
//! synjitsu, persistdb, metrics, the TCP bounds) need a restart and are ignored with a
//! warning.
//! Changes pushed to the store's incoming branches (`state::changes`) are looked for every
//! second and taken as a reload would be, over the file as last read and the flags: applied
//! and merged into the store's branch, or refused and recorded on its `refused` branch with
//! the fleet untouched. They last until the next reload or restart, which read the file and
//! the flags again (the file is the configuration that persists).
//! SIGTERM/SIGINT stop jitsu-dns and leave every VM as it is; the store is flushed.
//!
//! The control socket (`jitsu-dns ctl`, [`crate::ctl`]) and the status page reach the loop
//! through one bounded queue of calls: reads are answered from the fleet's views at once;
//! actions go through [`Fleet::act`] and are answered at once, or once their VM is up or
//! stopped (their waiter sits beside the DNS queries'); `reload` is the SIGHUP path, which
//! then says what it did.

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
use crate::config::{
    self, Config, ConfigError, EditedVm, FileSettings, Flags, Forwarders, Overlay, StopMode,
    VmConfig,
};
use crate::ctl::page::Pages;
use crate::ctl::proto::{Body, ErrorKind, Request, Response};
use crate::ctl::server::{self as ctl_server, Call};
use crate::ctl::view::{self, History};
use crate::dns::{self, Clock, Handler, SlowQuery, Table, Tables, VmSlot};
use crate::fleet::{
    self, ActError, Acted, Action, Answer, Command, Event, Fleet, Lifecycle, Observed, Persist,
    QueryId, Refusal, Reply, Settings, VmName, VmView,
};
use crate::forward::{self, Forwarder, UpstreamError, parse_resolv_conf};
use crate::metrics::Metrics;
use crate::probe::Prober;
use crate::state::changes::{self, ChangeError, Edit, Waiting};
use crate::state::{self, Change, ConfigChange, StateError, Store, Tree, Wall};
use crate::synjitsu::{self, Outgoing};
use crate::transport;
use crate::xenstore::KeyWatcher;

/// Events from backend calls, synjitsu and Xenstore waiting for the loop.
const EVENT_QUEUE: usize = 4096;

/// How often the store is looked at for changes pushed to it: one `git for-each-ref` a
/// second costs nothing, and a person pushing waits at most this long.
const CHANGES_EVERY: Duration = Duration::from_secs(1);

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
    /// The control socket given with `--control` could not be set up.
    #[error("{0}")]
    Control(#[from] shared_io::unix::SocketError),
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
    /// The configuration file could not be read again.
    #[error(transparent)]
    Config(#[from] ConfigError),
}

/// Why a new configuration (a reload, a change pushed to the store) was not installed; the
/// running one is kept.
#[derive(Debug, thiserror::Error)]
enum InstallError {
    /// The configuration is wrong, or removes too many VMs.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// Its forwarding cannot be set up.
    #[error(transparent)]
    Daemon(#[from] DaemonError),
    /// A pushed change cannot be applied over the running configuration.
    #[error(transparent)]
    Change(#[from] ChangeError),
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

/// Who waits for a [`Command::Answer`].
enum Waiter {
    /// A DNS query for a booting VM.
    Dns(oneshot::Sender<Answer>),
    /// A `ctl` request that waits for its VM (start, stop, restart).
    Ctl {
        reply: oneshot::Sender<Response>,
        vm: VmName,
        action: Action,
    },
}

struct Shell {
    /// When jitsu-dns started.
    started: Instant,
    /// Each VM's last changes of state, for `ctl show`.
    history: History,
    /// The control socket, if it is served.
    control: Option<std::path::PathBuf>,
    flags: Flags,
    /// The configuration file as last read (at start or reload), for changes pushed to the
    /// store, which apply over it and the flags rather than over a file that may have been
    /// edited since.
    file: Option<FileSettings>,
    /// VMs changed through the store since the file was last read.
    overlay: Overlay,
    cfg: Config,
    fleet: Fleet,
    backend: Arc<dyn Backend>,
    store: Store,
    metrics: Arc<Metrics>,
    tables: Arc<Tables>,
    slots: HashMap<VmName, Arc<VmSlot>>,
    clock: Clock,
    wall: Wall,
    pending: HashMap<QueryId, Waiter>,
    next_query: u64,
    events: mpsc::Sender<Event>,
    synjitsu: Option<mpsc::Sender<Outgoing>>,
    keys: KeyWatcher,
    probes: Prober,
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
        self.commit_merging(change, None);
    }

    /// Commits `change`, as a merge of commit `merge` if given.
    fn commit_merging(&mut self, change: Change, merge: Option<String>) {
        // What is due first: the change then lands on the whole state it belongs to.
        if self.rewrite_due {
            self.send_rewrite();
        }
        let queued = match merge {
            Some(m) => self.store.apply_merging(change, m),
            None => self.store.apply(change),
        };
        if let Err(e) = queued {
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

    /// Commits the configuration over `old` (the store's last committed tree), merging commit
    /// `merge` if given; what changed, if anything.
    fn commit_config(&mut self, old: &Tree, verb: &str, merge: Option<String>) -> Option<String> {
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
        if let Some(changes) = &summary {
            info!(%changes, "configuration {verb}");
        }
        self.commit_merging(change, merge);
        summary
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
                match self.pending.remove(&id) {
                    // The client may have given up; nothing to do then.
                    Some(Waiter::Dns(tx)) => _ = tx.send(answer),
                    Some(Waiter::Ctl { reply, vm, action }) => {
                        _ = reply.send(self.ctl_outcome(&vm, action, answer));
                    }
                    None => {}
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
            Command::ProbeTcp { vm, addr, until } => self.probes.probe(vm, addr, until),
            Command::StopProbe { vm } => self.probes.stop(&vm),
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
                self.history.record(&vm, now, from, to, &cause);
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
            Command::Persist(Persist::Policy {
                vm,
                what,
                cause,
                view,
            }) => {
                info!(vm = %vm, %cause, "{what}");
                self.commit(state::policy_change(&view, what, &cause));
            }
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
        self.pending.insert(id, Waiter::Dns(q.reply));
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

    /// Re-reads the configuration (SIGHUP, or `ctl reload` by `by`): the file and the flags
    /// again, replacing the changes pushed to the store since they were last read; what
    /// changed, or why it was refused (the running configuration is kept then).
    async fn reload(&mut self, by: Option<u32>) -> Result<String, String> {
        let refused = |e: &dyn std::fmt::Display| {
            error!(error = %e, "configuration not reloaded: keeping the current one");
            format!("configuration not reloaded (the running one is kept): {e}")
        };
        let file = self
            .flags
            .config
            .as_deref()
            .map(config::read)
            .transpose()
            .map_err(|e| refused(&e))?;
        let new = config::merge(&self.flags, file.as_ref()).map_err(|e| refused(&e))?;
        let verb = match by {
            Some(uid) => format!("reloaded (ctl reload by uid {uid})"),
            None => "reloaded".to_string(),
        };
        let (summary, kept) = self
            .install(new, &verb, None)
            .await
            .map_err(|e| refused(&e))?;
        if !self.overlay.is_empty() {
            let vms: Vec<&str> = self.overlay.keys().map(String::as_str).collect();
            warn!(vms = %vms.join(", "), "the reload replaced what changes pushed to the store had made of these VMs with the file and the flags: put a change in the file to keep it across reloads and restarts");
        }
        self.file = file;
        self.overlay.clear();
        let mut msg = format!(
            "configuration reloaded: {} ({} VMs)",
            summary.as_deref().unwrap_or("unchanged"),
            self.cfg.vms.len()
        );
        if !kept.is_empty() {
            msg.push_str(&format!("; ignored until a restart: {}", kept.join(", ")));
        }
        Ok(msg)
    }

    /// Validates `new` as the successor of the running configuration (the share of VMs it
    /// removes, its forwarding) and installs it: settings, fleet, DNS tables, and a commit
    /// saying what changed (`configuration <verb>: ...`, merging commit `merge` if given).
    /// What changed, and the settings left as they were until a restart.
    async fn install(
        &mut self,
        new: Config,
        verb: &str,
        merge: Option<String>,
    ) -> Result<(Option<String>, Vec<&'static str>), InstallError> {
        new.check_removals(&self.cfg)?;
        let (new, kept) = new.for_reload(&self.cfg);
        for setting in &kept {
            warn!(setting, "this setting changes only with a restart: ignored");
        }
        // Checked against the address served, which a reload does not change.
        let forwarder = forwarder_for(&new)?;
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
        let fleet = &self.fleet;
        self.history.retain(|vm| fleet.state(vm).is_some());
        let summary = self.commit_config(&old_tree, verb, merge);
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
        info!(vms = self.cfg.vms.len(), "configuration {verb}");
        Ok((summary, kept))
    }

    /// Answers one control request (a read now; an action now, or once its VM is up or
    /// stopped).
    async fn on_ctl(&mut self, call: Call) {
        let Call {
            request,
            uid,
            reply,
        } = call;
        let now = Instant::now();
        let unknown =
            |vm: &str| Response::error(ErrorKind::UnknownVm, format!("no VM named {vm:?}"));
        let action = match &request {
            Request::List => {
                let rows = self
                    .fleet
                    .views()
                    .iter()
                    .map(|v| view::row(v, now))
                    .collect();
                _ = reply.send(Response::Ok(Body::List(rows)));
                return;
            }
            Request::Show { vm } => {
                let r = match self.fleet.view(vm) {
                    Some(v) => {
                        let d = view::detail(
                            &v,
                            now,
                            self.fleet.default_idle(),
                            self.history.of(vm, now),
                        );
                        Response::Ok(Body::Show(Box::new(d)))
                    }
                    None => unknown(vm),
                };
                _ = reply.send(r);
                return;
            }
            Request::Status => {
                _ = reply.send(Response::Ok(Body::Status(Box::new(self.status(now)))));
                return;
            }
            Request::Page => {
                let mut cold: Vec<_> = self
                    .fleet
                    .cold_starts()
                    .iter()
                    .map(|c| view::cold_start_row(c, now))
                    .collect();
                cold.reverse();
                _ = reply.send(Response::Ok(Body::Page {
                    status: Box::new(self.status(now)),
                    vms: self
                        .fleet
                        .views()
                        .iter()
                        .map(|v| view::row(v, now))
                        .collect(),
                    cold_starts: cold,
                }));
                return;
            }
            Request::Reload => {
                let Some(uid) = uid else {
                    _ = reply.send(Response::error(ErrorKind::PermissionDenied, "read only"));
                    return;
                };
                let r = match self.reload(Some(uid)).await {
                    Ok(message) => Response::Ok(Body::Done { message }),
                    Err(message) => Response::error(ErrorKind::Failed, message),
                };
                _ = reply.send(r);
                return;
            }
            Request::Start { .. } => Action::Start,
            Request::Stop { mode, .. } => match mode.as_deref().map(str::parse::<StopMode>) {
                None => Action::Stop(None),
                Some(Ok(m)) => Action::Stop(Some(m)),
                Some(Err(e)) => {
                    _ = reply.send(Response::error(
                        ErrorKind::BadRequest,
                        format!("--mode: {e}"),
                    ));
                    return;
                }
            },
            Request::Restart { .. } => Action::Restart,
            Request::Pin { .. } => Action::Pin,
            Request::Unpin { .. } => Action::Unpin,
            Request::Drain { .. } => Action::Drain,
            Request::Undrain { .. } => Action::Undrain,
        };
        let (Some(uid), Some(vm)) = (uid, request.vm()) else {
            _ = reply.send(Response::error(ErrorKind::PermissionDenied, "read only"));
            return;
        };
        self.next_query += 1;
        let id = QueryId(self.next_query);
        match self.fleet.act(now, vm, action, uid, id) {
            Ok(Acted {
                reply: Reply::Done(message),
                commands,
            }) => {
                info!(vm, uid, action = action.as_str(), "ctl: {message}");
                self.execute_all(now, commands);
                _ = reply.send(Response::Ok(Body::Done { message }));
            }
            Ok(Acted {
                reply: Reply::Wait,
                commands,
            }) => {
                info!(vm, uid, action = action.as_str(), "ctl");
                // Waiting before the commands run: an answer may follow from them at once.
                self.pending.insert(
                    id,
                    Waiter::Ctl {
                        reply,
                        vm: vm.into(),
                        action,
                    },
                );
                self.execute_all(now, commands);
            }
            Err(e @ ActError::UnknownVm(_)) => {
                _ = reply.send(Response::error(ErrorKind::UnknownVm, e.to_string()));
            }
            Err(e @ ActError::Refused(_)) => {
                info!(vm, uid, action = action.as_str(), error = %e, "ctl: refused");
                _ = reply.send(Response::error(ErrorKind::Failed, e.to_string()));
            }
        }
        self.metrics
            .set_running(self.fleet.count_in(Lifecycle::Running));
    }

    /// What a `ctl` request that waited is told once its VM is up or stopped (or not).
    fn ctl_outcome(&self, vm: &str, action: Action, answer: Answer) -> Response {
        let view = self.fleet.view(vm);
        let error = view
            .as_ref()
            .and_then(|v| v.last_error.clone())
            .unwrap_or_else(|| "see the log".into());
        match answer {
            Answer::Ready => {
                let message = match (action, &view) {
                    (Action::Stop(_), Some(v)) => format!("{vm} is {}", v.state),
                    (Action::Restart, _) => format!("{vm} restarted and running"),
                    _ => format!("{vm} is running"),
                };
                Response::Ok(Body::Done { message })
            }
            Answer::ServFail(Refusal::BootFailed) => {
                Response::error(ErrorKind::Failed, format!("{vm}: boot failed: {error}"))
            }
            Answer::ServFail(Refusal::StopFailed) => {
                Response::error(ErrorKind::Failed, format!("{vm}: {error}"))
            }
            Answer::ServFail(Refusal::Unknown) => Response::error(
                ErrorKind::UnknownVm,
                format!("{vm} was removed from the configuration meanwhile"),
            ),
            Answer::ServFail(r) => Response::error(
                ErrorKind::Failed,
                format!("{vm} not started: {}", r.as_str()),
            ),
            Answer::NxDomain => Response::error(ErrorKind::Failed, format!("{vm} is drained")),
        }
    }

    /// The daemon, for `ctl status` and the page.
    fn status(&self, now: Instant) -> view::DaemonStatus {
        let (store_healthy, store_lag_s) = self.metrics.store_health();
        let mut vms = std::collections::BTreeMap::new();
        for v in self.fleet.views() {
            *vms.entry(v.state.as_str().to_string()).or_insert(0) += 1;
        }
        let c = &self.cfg;
        view::DaemonStatus {
            version: format!("jitsu-dns {}", env!("CARGO_PKG_VERSION")),
            pid: std::process::id(),
            uptime_s: now.duration_since(self.started).as_secs_f64().floor(),
            dns: c.dns_addr().to_string(),
            backend: self.backend.kind().to_string(),
            connect: c.connect.clone(),
            control: self
                .control
                .as_ref()
                .map_or_else(|| "none".into(), |p| p.display().to_string()),
            metrics: c.metrics.map(|m| m.to_string()),
            config_file: c.file.as_ref().map(|f| f.display().to_string()),
            synjitsu: c.synjitsu.as_ref().map(|p| p.display().to_string()),
            synjitsu_connected: self.fleet.synjitsu_up(),
            store: self.store.dir().display().to_string(),
            store_temporary: c.persistdb.is_none(),
            store_healthy,
            store_lag_s,
            limits: view::Limits {
                ttl_s: c.ttl,
                max_running: c.max_running,
                max_boots_per_second: c.max_boots_per_second,
                forward_max: c.forward_max,
                tcp_max_clients: c.tcp_max_clients,
                tcp_max_per_client: c.tcp_max_per_client,
                max_removed_share: c.max_removed_share,
            },
            vms,
        }
    }

    /// Takes the changes pushed to the store's incoming branches, oldest first, each checked
    /// against the configuration the ones before it left.
    async fn take_changes(&mut self) {
        let dir = self.store.dir().to_path_buf();
        let listed = tokio::task::spawn_blocking(move || state::incoming(&dir)).await;
        let waiting = match listed {
            Ok(Ok(w)) => changes::pending(w),
            Ok(Err(e)) => {
                debug!(error = %e, "cannot list the store's incoming branches");
                return;
            }
            Err(_) => return,
        };
        for w in waiting {
            self.take_change(w).await;
        }
    }

    /// Applies and merges one pushed change, or records why it was refused; then deletes its
    /// branch. Anything that cannot be written leaves the branch, to be taken again.
    async fn take_change(&mut self, w: Waiting) {
        // Read against the branch once everything queued is committed.
        let current = self.store_tree();
        let dir = self.store.dir().to_path_buf();
        let sha = w.sha.clone();
        let read = tokio::task::spawn_blocking(move || state::read_change(&dir, &sha)).await;
        let read = match read {
            Ok(Ok(r)) => r,
            Ok(Err(e)) => {
                warn!(branch = %w.refname, error = %e, "cannot read a change pushed to the store");
                return;
            }
            Err(_) => return,
        };
        let described = changes::describe(&w.refname, &w.sha, &read.subject);
        let dir = self.store.dir().to_path_buf();
        let (refname, sha) = (w.refname.clone(), w.sha.clone());
        if read.handled {
            let _ = tokio::task::spawn_blocking(move || state::close_change(&dir, &refname, &sha))
                .await;
            return;
        }
        let applied = match read.base {
            None => Err(InstallError::Change(ChangeError::Unrelated)),
            Some(base) => {
                self.apply_change(&w.sha, &described, &base, &read.tip, &current)
                    .await
            }
        };
        let done = match applied {
            Ok(()) => {
                info!(change = %described, "change pushed to the store applied and merged");
                self.metrics.add_change(true);
                // Deleted only once the merge is written, so a change is never lost.
                self.store_tree();
                tokio::task::spawn_blocking(move || {
                    if state::is_merged(&dir, &sha) {
                        state::close_change(&dir, &refname, &sha)
                    } else {
                        Err(StateError::Writer("the merge was not written"))
                    }
                })
                .await
            }
            Err(why) => {
                error!(change = %described, error = %why, "change pushed to the store refused: the fleet is left as it was");
                self.metrics.add_change(false);
                let message = changes::refused_message(&described, &why.to_string());
                tokio::task::spawn_blocking(move || {
                    state::refuse_change(&dir, &refname, &sha, &message).map(|_| ())
                })
                .await
            }
        };
        if let Ok(Err(e)) = done {
            warn!(change = %described, error = %e, "the change's branch is kept: it will be taken again");
        }
    }

    /// What the change from `base` to `tip` does over `current` (the store's tree now),
    /// validated as a reload and installed, as a commit merging `sha`.
    async fn apply_change(
        &mut self,
        sha: &str,
        described: &str,
        base: &Tree,
        tip: &Tree,
        current: &Tree,
    ) -> Result<(), InstallError> {
        let edits = changes::rebase(
            &changes::configs(base),
            &changes::configs(tip),
            &changes::configs(current),
        )?;
        let mut overlay = self.overlay.clone();
        let short = &sha[..sha.len().min(7)];
        for (vm, edit) in edits {
            let edited = match edit {
                Edit::Set(keys) => Some(EditedVm {
                    change: short.to_string(),
                    keys: changes::key_pairs(&keys),
                }),
                Edit::Remove => None,
            };
            overlay.insert(vm, edited);
        }
        let new = config::merge_over(&self.flags, self.file.as_ref(), &overlay)?;
        self.install(
            new,
            &format!("changed by {described}"),
            Some(sha.to_string()),
        )
        .await?;
        self.overlay = overlay;
        Ok(())
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
    let file = flags.config.as_deref().map(config::read).transpose()?;
    let mut shell = Shell {
        started: now,
        history: History::default(),
        control: None,
        flags,
        file,
        overlay: Overlay::new(),
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
        probes: Prober::new(events_tx.clone()),
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
    shell.commit_config(&tree, "loaded", None);
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
    let (ctl_tx, mut ctl_rx) = mpsc::channel(ctl_server::CALL_QUEUE);
    match shared_io::unix::PrivateSocket::bind(&shell.cfg.control, shell.cfg.control_allow_uid) {
        Ok(socket) => {
            info!(socket = %shell.cfg.control.display(), allow_uid = ?shell.cfg.control_allow_uid, "control socket (jitsu-dns ctl)");
            shell.control = Some(shell.cfg.control.clone());
            tokio::spawn(ctl_server::serve(
                socket,
                shell.cfg.control_allow_uid,
                ctl_tx.clone(),
                ctl.shutdown.clone(),
            ));
        }
        Err(e) if shell.cfg.control_given => return Err(e.into()),
        // The default path: a second jitsu-dns on the host (tests, a trial run) goes without.
        Err(e) => {
            warn!(error = %e, "no control socket: jitsu-dns ctl cannot reach this daemon (give --control to choose another path)")
        }
    }
    if let Some(maddr) = shell.cfg.metrics {
        let listener = tokio::net::TcpListener::bind(maddr)
            .await
            .map_err(|source| DaemonError::Bind {
                addr: maddr,
                what: "metrics",
                source,
            })?;
        let pages = Arc::new(Pages {
            metrics: metrics.clone(),
            calls: ctl_tx.clone(),
        });
        tokio::spawn(shared_io::http::serve(
            listener,
            pages,
            shared_io::http::Limits::default(),
            ctl.shutdown.clone(),
        ));
        info!(addr = %maddr, "metrics at /metrics, status page at /");
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
    let mut changes_due = tokio::time::interval(CHANGES_EVERY);
    changes_due.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
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
            Some(()) = ctl.reload.recv() => {
                let _ = shell.reload(None).await;
            }
            Some(call) = ctl_rx.recv() => shell.on_ctl(call).await,
            _ = changes_due.tick() => shell.take_changes().await,
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
