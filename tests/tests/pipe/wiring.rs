//! The pipe: jitsu-dns's fleet and synjitsu's hold wired together in memory as the daemons'
//! shells wire them, on a synthetic clock, with no socket (the shape of quiche's
//! `test_utils::Pipe`). The test drives what lies outside both daemons: DNS clients, frames
//! on the bridge, the backend's results, and time.
//!
//! What it carries, each as the shell named does:
//! - the fleet's `Command::Synjitsu` into `Hold::on_control`, whose result comes back as
//!   `Event::SynjitsuReplied` (jitsu-dns `synjitsu.rs`: ok for an `Ok`, not ok for an
//!   `Error`), followed by the hold's events (synjitsu `daemon.rs` answers a request, then
//!   flushes): `GuestAnnounced` and `WakeRequest` become fleet events, `SynHeld` and
//!   `Handover` are only recorded, as jitsu-dns's client only logs them;
//! - the fleet's backend commands to a fake backend: each call stays pending until the test
//!   ends it ([`Pipe::started`], [`Pipe::stopped`]); `Cleanup` reports nothing (jitsu-dns
//!   `daemon.rs`);
//! - `Serve` into the DNS slots: a query for a served VM is answered at once and reaches the
//!   fleet as activity with its next tick, any other as `Event::Query` (jitsu-dns `dns.rs`);
//! - the hold's frames to [`Pipe::take_sent`], its Xenstore work onto an in-memory store
//!   through the store thread's own mapping (`synjitsu::store::run`), its forwarding-table
//!   changes onto a set of steered MACs, each confirmed at once (synjitsu `daemon.rs`);
//! - both timers: [`Pipe::advance_to`] moves the clock from deadline to deadline
//!   (`Fleet::poll_at`, `Hold::poll_at`) and runs `Event::Tick` or `Hold::handle_timeout`
//!   at each.
//!
//! Messages cross as values: the control protocol's framing has its own tests, this is the
//! cores' contract. jitsu-dns's periodic poll of the backend's states and counters is not
//! wired: the fleet's own deadlines decide everything these tests look at.

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::net::IpAddr;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use jitsu_dns::config::{self, Flags, StopMode, VmConfig};
use jitsu_dns::dns::{self, Clock, VmSlot};
use jitsu_dns::fleet::{
    Answer, COUNTERS_FLUSH_EVERY, Command, Event, Fleet, Observed, QueryId, Settings, VmName,
};
use shared_proto::{ClientMessage, Event as SynEvent, Mac};
use synjitsu::hold::{self, FdbAction, FrameMeta, Hold, StoreOp, Verdict};
use synjitsu::store::memory::MemoryStore;
use synjitsu::store::{self, StoreReport, SynStore as _};

/// A backend call, as the fleet asked for it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Call {
    Start(String),
    Resume(String),
    Unpause(String),
    Stop(String, StopMode),
    Cleanup(String),
}

/// Both cores and everything between them. See the module documentation.
#[derive(Debug)]
pub struct Pipe {
    now: Instant,
    fleet: Fleet,
    hold: Hold,
    clock: Clock,
    slots: HashMap<VmName, Arc<VmSlot>>,
    next_query: u64,
    answers: HashMap<QueryId, Answer>,
    /// Every backend call, when it was made.
    calls: Vec<(Instant, Call)>,
    /// Calls the test has not ended yet.
    pending: Vec<Call>,
    store: MemoryStore,
    steered: BTreeSet<Mac>,
    sent: Vec<Vec<u8>>,
    heard: Vec<SynEvent>,
    told: Vec<(ClientMessage, bool)>,
    store_ops: Vec<StoreOp>,
}

impl Pipe {
    /// Both cores, started as the daemons start: jitsu-dns's configuration from `toml`, every
    /// VM reconciled as off (the backend runs none), then synjitsu's client connected (the
    /// hello is its control server's, not the core's: the fleet's `Sync` is the first thing
    /// the hold hears).
    pub fn new(toml: &str, hold: hold::Config) -> Pipe {
        let file = config::from_toml(toml, Path::new("pipe.toml")).expect("the test's TOML");
        let cfg = config::merge(&Flags::default(), Some(&file)).expect("a valid configuration");
        // jitsu-dns's `daemon::settings`.
        let settings = Settings {
            ttl: Duration::from_secs(u64::from(cfg.ttl)),
            max_running: cfg.max_running,
            max_boots_per_second: cfg.max_boots_per_second,
            flush_every: COUNTERS_FLUSH_EVERY,
        };
        let clock = Clock::new();
        // After the clock's base, as every instant the shell converts.
        let now = Instant::now();
        let vms: Vec<Arc<VmConfig>> = cfg.vms.iter().cloned().map(Arc::new).collect();
        let mut store = MemoryStore::default();
        store.prepare().expect("an in-memory store prepares");
        let mut pipe = Pipe {
            now,
            fleet: Fleet::new(now, settings, vms.clone()),
            hold: Hold::new(hold),
            clock,
            slots: dns::slots_for(&cfg.vms, &HashMap::new()),
            next_query: 0,
            answers: HashMap::new(),
            calls: Vec::new(),
            pending: Vec::new(),
            store,
            steered: BTreeSet::new(),
            sent: Vec::new(),
            heard: Vec::new(),
            told: Vec::new(),
            store_ops: Vec::new(),
        };
        for vm in vms {
            pipe.process(Event::Reconciled {
                vm: vm.name.clone(),
                stored: None,
                observed: Observed::Off,
            });
        }
        pipe.process(Event::SynjitsuUp);
        pipe
    }

    /// The synthetic time.
    pub fn now(&self) -> Instant {
        self.now
    }

    /// jitsu-dns's core.
    pub fn fleet(&self) -> &Fleet {
        &self.fleet
    }

    /// synjitsu's core.
    pub fn hold(&self) -> &Hold {
        &self.hold
    }

    // ---- DNS -----------------------------------------------------------------------------

    /// A DNS client at `from` resolves one of `vm`'s names.
    pub fn query(&mut self, vm: &str, from: IpAddr) -> QueryId {
        let slot = self.slots.get(vm).expect("a configured VM").clone();
        self.next_query += 1;
        let id = QueryId(self.next_query);
        if slot.direct.load(Ordering::Acquire) {
            slot.queries.fetch_add(1, Ordering::Relaxed);
            slot.last_query
                .store(self.clock.nanos(self.now), Ordering::Relaxed);
            self.answers.insert(id, Answer::Ready);
        } else {
            self.process(Event::Query {
                id,
                vm: slot.name.clone(),
                from: Some(from),
            });
        }
        id
    }

    /// The answer to `id`, once there is one.
    pub fn answer(&self, id: QueryId) -> Option<Answer> {
        self.answers.get(&id).copied()
    }

    // ---- the backend ---------------------------------------------------------------------

    /// Every backend call so far, when it was made.
    pub fn calls(&self) -> &[(Instant, Call)] {
        &self.calls
    }

    /// The backend calls that have not ended.
    pub fn pending(&self) -> &[Call] {
        &self.pending
    }

    /// The backend's start (or resume, or unpause) of `vm` ends well, with `domid`.
    pub fn started(&mut self, vm: &str, domid: Option<u32>) {
        self.started_on(vm, domid, None);
    }

    /// [`Pipe::started`], the backend naming the guest's bridge port (as libvirt does).
    pub fn started_on(&mut self, vm: &str, domid: Option<u32>, port: Option<&str>) {
        self.end_call(
            |c| matches!(c, Call::Start(n) | Call::Resume(n) | Call::Unpause(n) if n == vm),
        );
        self.process(Event::Started {
            vm: vm.into(),
            domid,
            port: port.map(str::to_string),
        });
    }

    /// The backend's stop of `vm` ends well.
    pub fn stopped(&mut self, vm: &str) {
        self.end_call(|c| matches!(c, Call::Stop(n, _) if n == vm));
        self.process(Event::Stopped { vm: vm.into() });
    }

    fn end_call(&mut self, is: impl Fn(&Call) -> bool) {
        let i =
            self.pending.iter().position(is).unwrap_or_else(|| {
                panic!("no such backend call pending; pending: {:?}", self.pending)
            });
        self.pending.remove(i);
    }

    // ---- the bridge and synjitsu's side --------------------------------------------------

    /// A frame arrives on synjitsu's port.
    pub fn frame(&mut self, frame: &[u8]) -> Verdict {
        // No kernel checksum status, as from a capture: the core checks every checksum.
        let verdict = self.hold.on_frame(self.now, frame, FrameMeta::default());
        let mut follow = VecDeque::new();
        self.flush_hold(&mut follow);
        self.run(&mut follow);
        verdict
    }

    /// An announcement arrives on bridge port `port`, as synjitsu's watcher sees it (its own
    /// port sees a broadcast too: [`Pipe::frame`]).
    pub fn frame_on(&mut self, port: &str, frame: &[u8]) -> Verdict {
        let verdict = self
            .hold
            .on_ingress(self.now, frame, FrameMeta::default(), port);
        let mut follow = VecDeque::new();
        self.flush_hold(&mut follow);
        self.run(&mut follow);
        verdict
    }

    /// The frames synjitsu sent since the last call, in order.
    pub fn take_sent(&mut self) -> Vec<Vec<u8>> {
        std::mem::take(&mut self.sent)
    }

    /// The events jitsu-dns's client received from synjitsu since the last call.
    pub fn take_heard(&mut self) -> Vec<SynEvent> {
        std::mem::take(&mut self.heard)
    }

    /// What the fleet told synjitsu since the last call, each with whether it was accepted.
    pub fn take_told(&mut self) -> Vec<(ClientMessage, bool)> {
        std::mem::take(&mut self.told)
    }

    /// The Xenstore work synjitsu asked for since the last call.
    pub fn take_store_ops(&mut self) -> Vec<StoreOp> {
        std::mem::take(&mut self.store_ops)
    }

    /// A Xenstore node's value.
    pub fn store_node(&self, path: &str) -> Option<String> {
        self.store
            .nodes
            .lock()
            .expect("test store lock")
            .get(path)
            .cloned()
    }

    /// True while the bridge sends `mac`'s frames to synjitsu (a static entry).
    pub fn steered(&self, mac: Mac) -> bool {
        self.steered.contains(&mac)
    }

    // ---- time ----------------------------------------------------------------------------

    /// Moves the clock by `d`.
    pub fn advance(&mut self, d: Duration) {
        self.advance_to(self.now + d);
    }

    /// Moves the clock to `until`, through every deadline of either core on the way, in
    /// order, running what is due at each as the shells' timers do.
    pub fn advance_to(&mut self, until: Instant) {
        assert!(until >= self.now, "time runs forward");
        let mut turns = 0u32;
        while let Some(at) = self.next_deadline().filter(|t| *t <= until) {
            turns += 1;
            assert!(turns < 100_000, "the timers do not move past {at:?}");
            self.now = self.now.max(at);
            let mut follow = VecDeque::new();
            if self.hold.poll_at().is_some_and(|t| t <= self.now) {
                self.hold.handle_timeout(self.now);
                self.flush_hold(&mut follow);
            }
            self.run(&mut follow);
            if self.fleet.poll_at().is_some_and(|t| t <= self.now) {
                let activity = self
                    .slots
                    .values()
                    .filter_map(|s| s.take_activity(&self.clock))
                    .collect();
                self.process(Event::Tick { activity });
            }
        }
        self.now = until;
    }

    fn next_deadline(&self) -> Option<Instant> {
        [self.fleet.poll_at(), self.hold.poll_at()]
            .into_iter()
            .flatten()
            .min()
    }

    // ---- the shells ----------------------------------------------------------------------

    /// Runs `first` through the fleet, and whatever follows from it.
    fn process(&mut self, first: Event) {
        let mut queue = VecDeque::from([first]);
        self.run(&mut queue);
    }

    fn run(&mut self, queue: &mut VecDeque<Event>) {
        while let Some(ev) = queue.pop_front() {
            for cmd in self.fleet.handle(self.now, ev) {
                self.execute(cmd, queue);
            }
        }
    }

    /// One fleet command, as jitsu-dns's shell carries it out.
    fn execute(&mut self, cmd: Command, follow: &mut VecDeque<Event>) {
        let call = match cmd {
            Command::Start { vm } => Call::Start(vm.name.to_string()),
            Command::Resume { vm } => Call::Resume(vm.name.to_string()),
            Command::Unpause { vm } => Call::Unpause(vm.name.to_string()),
            Command::Stop { vm, mode } => Call::Stop(vm.name.to_string(), mode),
            Command::Cleanup { vm } => {
                self.calls
                    .push((self.now, Call::Cleanup(vm.name.to_string())));
                return;
            }
            Command::Answer { id, answer } => {
                self.answers.insert(id, answer);
                return;
            }
            Command::Serve { vm, direct } => {
                if let Some(slot) = self.slots.get(&vm) {
                    slot.direct.store(direct, Ordering::Release);
                }
                return;
            }
            Command::Synjitsu { tag, msg } => {
                let ok = self.hold.on_control(self.now, &msg).is_ok();
                self.told.push((msg, ok));
                follow.push_back(Event::SynjitsuReplied { tag, ok });
                self.flush_hold(follow);
                return;
            }
            // No Xenstore watches or state store here.
            Command::WatchKey { .. } | Command::UnwatchKey { .. } | Command::Persist(_) => return,
        };
        self.calls.push((self.now, call.clone()));
        self.pending.push(call);
    }

    /// Takes every output the hold queued, as synjitsu's shell does after each turn; what
    /// jitsu-dns's client makes of its events goes to `follow`.
    fn flush_hold(&mut self, follow: &mut VecDeque<Event>) {
        let mut buf = Vec::new();
        loop {
            while self.hold.poll_transmit(&mut buf) {
                self.sent.push(std::mem::take(&mut buf));
            }
            while let Some(ev) = self.hold.poll_event() {
                match &ev {
                    SynEvent::GuestAnnounced { name } => {
                        follow.push_back(Event::GuestAnnounced {
                            vm: name.as_str().into(),
                        });
                    }
                    SynEvent::WakeRequest { name } => {
                        follow.push_back(Event::WakeRequest {
                            vm: name.as_str().into(),
                        });
                    }
                    SynEvent::SynHeld { .. } | SynEvent::Handover { .. } => {}
                }
                self.heard.push(ev);
            }
            // Results fed back can queue more: drain again until nothing moves.
            let mut fed_back = false;
            while let Some(op) = self.hold.poll_store() {
                self.store_ops.push(op.clone());
                // Resets and removals report only to the shell's log and metrics.
                if let StoreReport::Done(done) = store::run(&mut self.store, op) {
                    self.hold.on_store_done(self.now, done);
                    fed_back = true;
                }
            }
            while let Some(op) = self.hold.poll_fdb() {
                match op.action {
                    FdbAction::Steer => self.steered.insert(op.mac),
                    FdbAction::Release => self.steered.remove(&op.mac),
                };
                self.hold.on_fdb_done(self.now, op.id);
                fed_back = true;
            }
            if !fed_back {
                break;
            }
        }
    }
}
