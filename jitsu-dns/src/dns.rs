//! The DNS side: a hickory-server [`RequestHandler`] answering from a table built from the
//! configuration.
//!
//! Owns the answers:
//! - A (and AAAA when the VM has IPv6) for each VM name, authoritative, with the configured
//!   TTL, the owner name as the client wrote the question's (the encoder then points it at
//!   the question, as Knot and NSD answer). For a running VM the answer comes straight from
//!   the table: over UDP a plain query is answered from bytes encoded when the table was
//!   built ([`Handler::answer_fast`], [`crate::fast`]), before hickory parses it; any other
//!   is answered by the handler, with no lock held across an await and no channel. For any
//!   other VM the query goes to the fleet (the slow path) and waits for its answer;
//! - other types on a VM name: empty NOERROR with the zone's SOA, booting nothing;
//! - SOA and NS at each zone's apex, the NS name's address when it lies in the zone;
//! - NXDOMAIN with the SOA for unknown names in an owned zone (NODATA for names that exist
//!   only as parents of VM names);
//! - names outside the zones: relayed by [`crate::forward`] (not authoritative) for the
//!   clients it allows while fewer than its bound are in flight (past it, SERVFAIL at once),
//!   REFUSED for other clients and when forwarding is off;
//! - FORMERR for a query without exactly one question (a message that does not parse gets
//!   its FORMERR from [`crate::transport`]), NOTIMP for other opcodes, BADVERS for EDNS
//!   above 0.
//!
//! Names are compared case-insensitively. The handler counts outcomes and per-VM activity;
//! it never logs above debug per query.

use std::collections::{HashMap, HashSet};
use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use hickory_proto::op::{Edns, Header, HeaderCounts, Metadata, OpCode, ResponseCode};
use hickory_proto::rr::rdata::{A, AAAA, NS, SOA};
use hickory_proto::rr::{DNSClass, LowerName, Name, RData, Record, RecordType};
use hickory_server::net::runtime::Time;
use hickory_server::net::xfer::Protocol;
use hickory_server::server::{Request, RequestHandler, ResponseHandler, ResponseInfo};
use hickory_server::zone_handler::MessageResponseBuilder;
use tokio::sync::{mpsc, oneshot};

use crate::config::{Config, VmConfig};
use crate::fast::{self, Encoded, PlainQuery};
use crate::fleet::{Activity, Answer, Refusal, VmName};
use crate::forward::Forwarder;
use crate::metrics::{Metrics, Outcome};

/// Slow-path queries waiting for the daemon's loop; past this they get SERVFAIL at once.
pub const SLOW_QUEUE: usize = 4096;

/// How long a query may wait for its VM before it gets SERVFAIL; longer than any masking
/// timeout a client would wait for anyway.
pub const MAX_WAIT: Duration = Duration::from_secs(120);

/// Instants as nanoseconds since a base, so they fit an atomic.
#[derive(Debug, Clone, Copy)]
pub struct Clock {
    base: Instant,
}

impl Clock {
    /// Starting now.
    pub fn new() -> Clock {
        Clock {
            base: Instant::now(),
        }
    }

    /// `t` as nanoseconds since the base (at least 1, so 0 means never).
    pub fn nanos(&self, t: Instant) -> u64 {
        u64::try_from(t.saturating_duration_since(self.base).as_nanos())
            .unwrap_or(u64::MAX)
            .max(1)
    }

    /// The instant `nanos` after the base.
    pub fn instant(&self, nanos: u64) -> Instant {
        self.base + Duration::from_nanos(nanos)
    }
}

impl Default for Clock {
    fn default() -> Self {
        Clock::new()
    }
}

/// Per-VM state shared by the handler and the daemon, kept across reloads.
#[derive(Debug)]
pub struct VmSlot {
    /// The VM.
    pub name: VmName,
    /// True while the VM runs: its address queries are answered directly.
    pub direct: AtomicBool,
    /// Direct answers since the daemon last took the count.
    pub queries: AtomicU64,
    /// When the last direct answer was given ([`Clock`] nanoseconds; 0 never).
    pub last_query: AtomicU64,
}

impl VmSlot {
    /// A slot for `name`, not served directly.
    pub fn new(name: VmName) -> Arc<VmSlot> {
        Arc::new(VmSlot {
            name,
            direct: AtomicBool::new(false),
            queries: AtomicU64::new(0),
            last_query: AtomicU64::new(0),
        })
    }

    /// Takes the direct-answer count since the last call, as fleet activity.
    pub fn take_activity(&self, clock: &Clock) -> Option<Activity> {
        let n = self.queries.swap(0, Ordering::Relaxed);
        (n > 0).then(|| Activity {
            vm: self.name.clone(),
            queries: n,
            last: clock.instant(self.last_query.load(Ordering::Relaxed)),
        })
    }
}

/// A VM name's answers.
#[derive(Debug)]
struct NameEntry {
    slot: Arc<VmSlot>,
    a: Vec<Record>,
    aaaa: Vec<Record>,
    zone: usize,
}

/// A VM name's answers for the fast path, encoded.
#[derive(Debug)]
struct FastEntry {
    slot: Arc<VmSlot>,
    a: Option<Encoded>,
    aaaa: Option<Encoded>,
}

/// A zone's records.
#[derive(Debug)]
struct ZoneEntry {
    apex: LowerName,
    soa: Vec<Record>,
    ns: Vec<Record>,
    ns_name: LowerName,
    ns_a: Vec<Record>,
    ns_aaaa: Vec<Record>,
    /// The NS name's addresses, as additional data of an NS answer.
    ns_glue: Vec<Record>,
}

/// Everything the handler answers from; rebuilt on reload and swapped whole.
#[derive(Debug)]
pub struct Table {
    names: HashMap<LowerName, NameEntry>,
    /// The same names' answers, encoded, under their wire form in lowercase.
    fast: HashMap<Box<[u8]>, FastEntry>,
    /// Longest first, so the first match is the closest enclosing zone.
    zones: Vec<ZoneEntry>,
    /// Names that exist only as parents of other names (empty non-terminals).
    parents: HashSet<LowerName>,
    forwarder: Option<Arc<Forwarder>>,
}

fn record(name: &Name, ttl: u32, rdata: RData) -> Record {
    Record::from_rdata(name.clone(), ttl, rdata)
}

impl Table {
    /// Builds the table for `cfg`; `slots` must hold a slot for every VM; `serial` is the
    /// SOA serial (the time the configuration was loaded).
    pub fn build(
        cfg: &Config,
        slots: &HashMap<VmName, Arc<VmSlot>>,
        forwarder: Option<Arc<Forwarder>>,
        serial: u32,
    ) -> Table {
        let ttl = cfg.ttl;
        let mut zones: Vec<&crate::config::ZoneConfig> = cfg.zones.iter().collect();
        zones.sort_by_key(|z| std::cmp::Reverse(z.name.num_labels()));
        let zone_entries: Vec<ZoneEntry> = zones
            .iter()
            .map(|z| {
                let rname = z
                    .name
                    .prepend_label("hostmaster")
                    .unwrap_or_else(|_| z.name.clone());
                let soa = SOA::new(z.ns.clone(), rname, serial, 3600, 600, 86400, ttl);
                let inside = z.name.zone_of(&z.ns);
                let addrs = |v4: bool| -> Vec<Record> {
                    z.ns_addresses
                        .iter()
                        .filter(|a| inside && a.is_ipv4() == v4)
                        .map(|a| match a {
                            IpAddr::V4(a) => record(&z.ns, ttl, RData::A(A(*a))),
                            IpAddr::V6(a) => record(&z.ns, ttl, RData::AAAA(AAAA(*a))),
                        })
                        .collect()
                };
                let (ns_a, ns_aaaa) = (addrs(true), addrs(false));
                ZoneEntry {
                    ns_glue: ns_a.iter().chain(&ns_aaaa).cloned().collect(),
                    apex: LowerName::new(&z.name),
                    soa: vec![record(&z.name, ttl, RData::SOA(soa))],
                    ns: vec![record(&z.name, ttl, RData::NS(NS(z.ns.clone())))],
                    ns_name: LowerName::new(&z.ns),
                    ns_a,
                    ns_aaaa,
                }
            })
            .collect();
        let zone_index = |n: &Name| {
            zone_entries
                .iter()
                .position(|z| z.apex.zone_of(&LowerName::new(n)))
        };
        let mut names = HashMap::new();
        let mut fast = HashMap::new();
        let mut parents = HashSet::new();
        for vm in &cfg.vms {
            let slot = slots
                .get(&vm.name)
                .cloned()
                .unwrap_or_else(|| VmSlot::new(vm.name.clone()));
            for n in &vm.dns {
                let Some(zone) = zone_index(n) else { continue };
                let mut p = n.base_name();
                while zone_entries[zone].apex.zone_of(&LowerName::new(&p))
                    && LowerName::new(&p) != zone_entries[zone].apex
                {
                    parents.insert(LowerName::new(&p));
                    p = p.base_name();
                }
                let entry = NameEntry {
                    slot: slot.clone(),
                    a: vec![record(n, ttl, RData::A(A(vm.ip)))],
                    aaaa: vm
                        .ip6
                        .map(|ip| vec![record(n, ttl, RData::AAAA(AAAA(ip)))])
                        .unwrap_or_default(),
                    zone,
                };
                if let Some(key) = fast::key_of(n) {
                    let fast_entry = FastEntry {
                        slot: slot.clone(),
                        a: Encoded::new(n, RecordType::A, &entry.a),
                        aaaa: Encoded::new(n, RecordType::AAAA, &entry.aaaa),
                    };
                    fast.insert(key, fast_entry);
                }
                names.insert(LowerName::new(n), entry);
            }
        }
        Table {
            names,
            fast,
            zones: zone_entries,
            parents,
            forwarder,
        }
    }

    fn zone_of(&self, name: &LowerName) -> Option<&ZoneEntry> {
        self.zones.iter().find(|z| z.apex.zone_of(name))
    }
}

/// A query the table cannot answer alone: its VM is not running.
#[derive(Debug)]
pub struct SlowQuery {
    /// The VM.
    pub vm: VmName,
    /// The client.
    pub from: IpAddr,
    /// Where the fleet's answer goes.
    pub reply: oneshot::Sender<Answer>,
}

/// The current table, shared by the handler and the daemon (which swaps it on reload).
#[derive(Debug)]
pub struct Tables(RwLock<Arc<Table>>);

impl Tables {
    /// Starting with `table`.
    pub fn new(table: Table) -> Arc<Tables> {
        Arc::new(Tables(RwLock::new(Arc::new(table))))
    }

    /// Swaps in a new table.
    pub fn replace(&self, table: Table) {
        *self
            .0
            .write()
            .expect("table lock is never poisoned: nothing panics holding it") = Arc::new(table);
    }

    /// The table now; queries in flight keep the one they started with.
    pub fn current(&self) -> Arc<Table> {
        self.read().clone()
    }

    /// The table now, for a look that ends before any await (no reference count taken).
    fn read(&self) -> std::sync::RwLockReadGuard<'_, Arc<Table>> {
        self.0
            .read()
            .expect("table lock is never poisoned: nothing panics holding it")
    }
}

/// The hickory request handler.
#[derive(Debug)]
pub struct Handler {
    tables: Arc<Tables>,
    slow: mpsc::Sender<SlowQuery>,
    metrics: Arc<Metrics>,
    clock: Clock,
}

/// What a lookup in the table found.
enum Found<'t> {
    Address(&'t NameEntry, &'t [Record]),
    NoData(&'t ZoneEntry),
    Records(&'t [Record], &'t [Record]),
    NxDomain(&'t ZoneEntry),
    Outside,
}

impl Handler {
    /// A handler answering from `tables`, sending slow-path queries to `slow`.
    pub fn new(
        tables: Arc<Tables>,
        slow: mpsc::Sender<SlowQuery>,
        metrics: Arc<Metrics>,
        clock: Clock,
    ) -> Handler {
        Handler {
            tables,
            slow,
            metrics,
            clock,
        }
    }

    /// Answers the UDP message `msg` into `out` if it is a plain query (see
    /// [`PlainQuery`]) for an address a running VM has, from the answer encoded when the
    /// table was built; false leaves it to [`RequestHandler::handle_request`], which would
    /// answer it with the same bytes. Counted as every direct answer is.
    pub fn answer_fast(&self, msg: &[u8], out: &mut Vec<u8>) -> bool {
        let Some(query) = PlainQuery::parse(msg) else {
            return false;
        };
        let table = self.tables.read();
        let Some(entry) = table.fast.get(query.key()) else {
            return false;
        };
        let answer = match query.qtype() {
            RecordType::A => entry.a.as_ref(),
            _ => entry.aaaa.as_ref(),
        };
        let Some(answer) = answer.filter(|_| entry.slot.direct.load(Ordering::Acquire)) else {
            return false;
        };
        self.count_direct(&entry.slot);
        self.metrics.add_fast_answer();
        tracing::debug!(qtype = ?query.qtype(), vm = %entry.slot.name, "answered (fast path)");
        query.respond(answer, out);
        true
    }

    /// One direct answer for `slot`'s VM: its activity, and the outcome.
    fn count_direct(&self, slot: &VmSlot) {
        slot.queries.fetch_add(1, Ordering::Relaxed);
        slot.last_query
            .store(self.clock.nanos(Instant::now()), Ordering::Relaxed);
        self.metrics.add_query(Outcome::Answer);
    }
}

fn find<'t>(t: &'t Table, name: &LowerName, qtype: RecordType) -> Found<'t> {
    let apex = t.zones.iter().find(|z| &z.apex == name);
    if let Some(z) = apex {
        match qtype {
            RecordType::SOA => return Found::Records(&z.soa, &[]),
            RecordType::NS => return Found::Records(&z.ns, &z.ns_glue),
            _ => {}
        }
    }
    if let Some(e) = t.names.get(name) {
        let records = match qtype {
            RecordType::A => &e.a[..],
            RecordType::AAAA => &e.aaaa[..],
            _ => &[][..],
        };
        return if records.is_empty() {
            Found::NoData(&t.zones[e.zone])
        } else {
            Found::Address(e, records)
        };
    }
    let Some(z) = t.zone_of(name) else {
        return Found::Outside;
    };
    if apex.is_some() {
        return Found::NoData(z);
    }
    if &z.ns_name == name && !(z.ns_a.is_empty() && z.ns_aaaa.is_empty()) {
        return match qtype {
            RecordType::A if !z.ns_a.is_empty() => Found::Records(&z.ns_a, &[]),
            RecordType::AAAA if !z.ns_aaaa.is_empty() => Found::Records(&z.ns_aaaa, &[]),
            _ => Found::NoData(z),
        };
    }
    if t.parents.contains(name) {
        return Found::NoData(z);
    }
    Found::NxDomain(z)
}

/// The response's OPT record, mirroring the request's (RFC 6891: a request with OPT gets
/// one back).
fn response_edns(request: &Request) -> Option<Edns> {
    request.edns.as_ref().map(|req| {
        let mut e = Edns::new();
        e.set_max_payload(req.max_payload().max(512));
        e.set_version(0);
        e
    })
}

async fn send<R: ResponseHandler>(
    request: &Request,
    mut handle: R,
    meta: Metadata,
    edns: Option<&Edns>,
    answers: &[Record],
    authorities: &[Record],
    additionals: &[Record],
) -> ResponseInfo {
    let response = MessageResponseBuilder::new(&request.queries, edns).build(
        meta,
        answers.iter(),
        authorities.iter(),
        std::iter::empty(),
        additionals.iter(),
    );
    match handle.send_response(response).await {
        Ok(info) => info,
        Err(e) => {
            tracing::debug!(error = %e, "sending a response failed");
            ResponseInfo::from(Header {
                metadata: meta,
                counts: HeaderCounts::default(),
            })
        }
    }
}

/// `records`, all owned by the query's name, with that name as the client wrote it (in its
/// case): the encoder then compresses the owner to a pointer to the question, as Knot and
/// NSD answer, and a resolver randomising the case (0x20) finds its own back.
fn as_asked(records: &[Record], asked: &Name) -> Vec<Record> {
    records
        .iter()
        .map(|r| {
            let mut r = r.clone();
            r.name = asked.clone();
            r
        })
        .collect()
}

fn meta(request: &Request, rcode: ResponseCode, authoritative: bool) -> Metadata {
    let mut m = Metadata::response_from_request(&request.metadata);
    m.response_code = rcode;
    m.authoritative = authoritative;
    m
}

#[async_trait::async_trait]
impl RequestHandler for Handler {
    async fn handle_request<R: ResponseHandler, T: Time>(
        &self,
        request: &Request,
        handle: R,
    ) -> ResponseInfo {
        let edns = response_edns(request);
        let edns = edns.as_ref();
        let fail = |rcode: ResponseCode, outcome: Outcome| {
            self.metrics.add_query(outcome);
            meta(request, rcode, false)
        };
        if request.metadata.op_code != OpCode::Query {
            let m = fail(ResponseCode::NotImp, Outcome::NotImp);
            return send(request, handle, m, edns, &[], &[], &[]).await;
        }
        if request.edns.as_ref().is_some_and(|e| e.version() > 0) {
            let m = fail(ResponseCode::BADVERS, Outcome::FormErr);
            return send(request, handle, m, edns, &[], &[], &[]).await;
        }
        let Ok(info) = request.request_info() else {
            // Zero or several questions.
            let m = fail(ResponseCode::FormErr, Outcome::FormErr);
            return send(request, handle, m, edns, &[], &[], &[]).await;
        };
        let name = info.query.name();
        let asked = info.query.original().name();
        let qtype = info.query.query_type();
        if info.query.query_class() != DNSClass::IN {
            let m = fail(ResponseCode::Refused, Outcome::Refused);
            return send(request, handle, m, edns, &[], &[], &[]).await;
        }
        let table = self.tables.current();
        match find(&table, name, qtype) {
            Found::Address(entry, records) => {
                let slot = &entry.slot;
                let records = &as_asked(records, asked);
                if slot.direct.load(Ordering::Acquire) {
                    self.count_direct(slot);
                    tracing::debug!(%name, ?qtype, vm = %slot.name, "answered");
                    let m = meta(request, ResponseCode::NoError, true);
                    return send(request, handle, m, edns, records, &[], &[]).await;
                }
                let (tx, rx) = oneshot::channel();
                let q = SlowQuery {
                    vm: slot.name.clone(),
                    from: info.src.ip(),
                    reply: tx,
                };
                let answer = match self.slow.try_send(q) {
                    Ok(()) => match tokio::time::timeout(MAX_WAIT, rx).await {
                        Ok(Ok(a)) => a,
                        _ => Answer::ServFail(Refusal::Overloaded),
                    },
                    Err(_) => Answer::ServFail(Refusal::Overloaded),
                };
                tracing::debug!(%name, ?qtype, vm = %slot.name, ?answer, "answered after waiting");
                match answer {
                    Answer::Ready => {
                        self.metrics.add_query(Outcome::AnswerAfterBoot);
                        let m = meta(request, ResponseCode::NoError, true);
                        send(request, handle, m, edns, records, &[], &[]).await
                    }
                    Answer::ServFail(_) => {
                        let m = fail(ResponseCode::ServFail, Outcome::ServFail);
                        send(request, handle, m, edns, &[], &[], &[]).await
                    }
                    // A drained VM whose policy is NXDOMAIN: as for a name the zone lacks.
                    Answer::NxDomain => {
                        self.metrics.add_query(Outcome::NxDomain);
                        let z = &table.zones[entry.zone];
                        let m = meta(request, ResponseCode::NXDomain, true);
                        send(request, handle, m, edns, &[], &z.soa, &[]).await
                    }
                }
            }
            Found::Records(records, extra) => {
                self.metrics.add_query(Outcome::Zone);
                tracing::debug!(%name, ?qtype, "zone record");
                let m = meta(request, ResponseCode::NoError, true);
                send(
                    request,
                    handle,
                    m,
                    edns,
                    &as_asked(records, asked),
                    &[],
                    extra,
                )
                .await
            }
            Found::NoData(z) => {
                self.metrics.add_query(Outcome::NoData);
                tracing::debug!(%name, ?qtype, "no data");
                let m = meta(request, ResponseCode::NoError, true);
                send(request, handle, m, edns, &[], &z.soa, &[]).await
            }
            Found::NxDomain(z) => {
                self.metrics.add_query(Outcome::NxDomain);
                tracing::debug!(%name, ?qtype, "nxdomain");
                let m = meta(request, ResponseCode::NXDomain, true);
                send(request, handle, m, edns, &[], &z.soa, &[]).await
            }
            Found::Outside => {
                let Some(fwd) = table.forwarder.clone() else {
                    tracing::debug!(%name, ?qtype, "refused: not ours and forwarding is off");
                    let m = fail(ResponseCode::Refused, Outcome::Refused);
                    return send(request, handle, m, edns, &[], &[], &[]).await;
                };
                drop(table);
                if !fwd.allows(request.src().ip()) {
                    tracing::debug!(%name, ?qtype, client = %request.src().ip(), "refused: this client may not use the forwarders");
                    self.metrics.add_forward_refused();
                    let m = fail(ResponseCode::Refused, Outcome::Refused);
                    return send(request, handle, m, edns, &[], &[], &[]).await;
                }
                let Some(_place) = fwd.try_begin() else {
                    tracing::debug!(%name, ?qtype, "servfail: forward_max forwards in flight");
                    self.metrics.add_forward_busy();
                    let m = fail(ResponseCode::ServFail, Outcome::ServFail);
                    return send(request, handle, m, edns, &[], &[], &[]).await;
                };
                let tcp = request.protocol() != Protocol::Udp;
                match fwd.forward(request.as_slice(), tcp).await {
                    Ok(up) => {
                        self.metrics.add_query(Outcome::Forwarded);
                        tracing::debug!(%name, ?qtype, rcode = ?up.metadata.response_code, "forwarded");
                        let mut m = meta(request, up.metadata.response_code, false);
                        m.recursion_available = up.metadata.recursion_available;
                        send(
                            request,
                            handle,
                            m,
                            edns,
                            &up.answers,
                            &up.authorities,
                            &up.additionals,
                        )
                        .await
                    }
                    Err(e) => {
                        tracing::debug!(%name, ?qtype, error = %e, "forward failed");
                        self.metrics.add_forward_failure();
                        let m = fail(ResponseCode::ServFail, Outcome::ServFail);
                        send(request, handle, m, edns, &[], &[], &[]).await
                    }
                }
            }
        }
    }
}

/// The slots the daemon keeps: one per configured VM, reused across reloads.
pub fn slots_for(
    vms: &[VmConfig],
    old: &HashMap<VmName, Arc<VmSlot>>,
) -> HashMap<VmName, Arc<VmSlot>> {
    vms.iter()
        .map(|v| {
            let slot = old
                .get(&v.name)
                .cloned()
                .unwrap_or_else(|| VmSlot::new(v.name.clone()));
            (v.name.clone(), slot)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Flags, merge};

    fn table(specs: &[&str]) -> Table {
        let f = Flags {
            specs: specs.iter().map(|s| s.to_string()).collect(),
            bind: Some("10.0.0.254".into()),
            ..Flags::default()
        };
        let cfg = merge(&f, None).unwrap();
        let slots = slots_for(&cfg.vms, &HashMap::new());
        Table::build(&cfg, &slots, None, 7)
    }

    fn lower(s: &str) -> LowerName {
        LowerName::new(&Name::from_ascii(s).unwrap())
    }

    #[test]
    fn lookups_follow_the_rules() {
        let t = table(&[
            "name=www,dns=www.example.org,ip=10.0.0.1,ip6=fd00::1,command=x",
            "name=deep,dns=a.b.example.org,ip=10.0.0.2,command=x",
        ]);
        assert!(
            matches!(find(&t, &lower("WWW.Example.ORG."), RecordType::A), Found::Address(_, r) if r.len() == 1)
        );
        assert!(
            matches!(find(&t, &lower("www.example.org."), RecordType::AAAA), Found::Address(_, r) if r.len() == 1)
        );
        assert!(
            matches!(
                find(&t, &lower("a.b.example.org."), RecordType::AAAA),
                Found::NoData(_)
            ),
            "no IPv6: no data"
        );
        assert!(matches!(
            find(&t, &lower("www.example.org."), RecordType::MX),
            Found::NoData(_)
        ));
        assert!(
            matches!(find(&t, &lower("example.org."), RecordType::SOA), Found::Records(r, _) if r[0].record_type() == RecordType::SOA)
        );
        assert!(
            matches!(find(&t, &lower("example.org."), RecordType::NS), Found::Records(r, _) if r[0].record_type() == RecordType::NS)
        );
        assert!(matches!(
            find(&t, &lower("example.org."), RecordType::A),
            Found::NoData(_)
        ));
        assert!(
            matches!(find(&t, &lower("ns.example.org."), RecordType::A), Found::Records(r, _) if r.len() == 1)
        );
        assert!(
            matches!(
                find(&t, &lower("b.example.org."), RecordType::A),
                Found::NoData(_)
            ),
            "a parent of a VM name exists"
        );
        assert!(matches!(
            find(&t, &lower("nope.example.org."), RecordType::A),
            Found::NxDomain(_)
        ));
        assert!(matches!(
            find(&t, &lower("example.com."), RecordType::A),
            Found::Outside
        ));
        assert!(matches!(
            find(&t, &lower("org."), RecordType::SOA),
            Found::Outside
        ));
        let Found::Records(soa, _) = find(&t, &lower("example.org."), RecordType::SOA) else {
            unreachable!()
        };
        let RData::SOA(s) = soa[0].data.clone() else {
            panic!()
        };
        assert_eq!(s.serial, 7);
        assert_eq!(s.mname, Name::from_ascii("ns.example.org.").unwrap());
    }

    #[test]
    fn activity_is_taken_once() {
        let clock = Clock::new();
        let slot = VmSlot::new("www".into());
        assert!(slot.take_activity(&clock).is_none());
        slot.queries.fetch_add(3, Ordering::Relaxed);
        let t = Instant::now();
        slot.last_query.store(clock.nanos(t), Ordering::Relaxed);
        let a = slot.take_activity(&clock).unwrap();
        assert_eq!(a.queries, 3);
        assert!(a.last <= t + Duration::from_micros(1) && a.last + Duration::from_micros(1) >= t);
        assert!(slot.take_activity(&clock).is_none());
    }
}
