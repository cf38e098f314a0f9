//! jitsu-dns's DNS request handler (`jitsu_dns::dns::Handler`), fed raw DNS messages as its
//! sockets feed it, with no socket: `jitsu_dns::transport::answer` reads the header (a
//! message shorter than one, or a response, gets no answer), decodes the message (one that
//! does not decode is answered FORMERR), hands it to the handler, and encodes the handler's
//! response (within the UDP size limit); the bytes it would send are read back here.
//!
//! The handler answers from a table built from a fixed configuration (two zones, VMs with
//! and without IPv6, names of mixed case and one near the longest a name may be). Forwarding
//! is off: a name outside the zones gets REFUSED, and the relay (`jitsu_dns::forward`, which
//! needs sockets) is not covered. The input's first byte says which VMs run (answered from
//! the table) and what the fleet answers for the others on the slow path (ready, SERVFAIL, or
//! no answer at all), and whether the query came over UDP or TCP.
//!
//! Checks, besides never panicking: no answer to what is shorter than a header or is a
//! response; a FORMERR with the message's id to what does not decode; every request the
//! handler gets is answered once (a debug assertion of the transport), with a response
//! hickory can read back, with the request's id, opcode and question; every answer record is
//! for the question's name and type; an authoritative answer is only given for a name inside
//! a configured zone.
#![no_main]

use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Mutex, OnceLock};

use hickory_proto::op::{Header, Message, MessageType, ResponseCode};
use hickory_proto::rr::LowerName;
use hickory_proto::serialize::binary::{BinDecodable, BinDecoder};
use hickory_server::net::xfer::Protocol;
use hickory_server::server::Request;
use jitsu_dns::config::{Flags, from_toml, merge};
use jitsu_dns::dns::{Clock, Handler, SlowQuery, Table, Tables, VmSlot, slots_for};
use jitsu_dns::fleet::{Answer, Refusal};
use jitsu_dns::metrics::Metrics;
use jitsu_dns::transport::answer;
use libfuzzer_sys::fuzz_target;
use tokio::sync::mpsc;

/// The configuration the handler answers from.
const CONFIG: &str = r#"
bind = "10.0.0.254"
forwarder = "0.0.0.0"

[[zone]]
name = "example.org"
ns = "ns1.example.org"
ns_address = ["10.0.0.254", "fd00::fe"]

[[zone]]
name = "example.net"
ns = "ns.elsewhere.test"

[[vm]]
name = "www"
dns = ["www.example.org", "WWW2.Example.ORG"]
ip = "10.0.0.1"
ip6 = "fd00::1"
command = "true"

[[vm]]
name = "deep"
dns = "a.b.c.example.org"
ip = "10.0.0.2"
command = "true"

[[vm]]
name = "long"
dns = "abcdefghijklmnopqrstuvwxyzabcdefghijklmnopqrstuvwxyzabcdefghijk.abcdefghijklmnopqrstuvwxyzabcdefghijklmnopqrstuvwxyzabcdefghijk.abcdefghijklmnopqrstuvwxyzabcdefghijklmnopqrstuvwxyzabcdefghijk.abcdefghijklmnopqrstuvwxyzabcdefghijklmnopq.example.net"
ip = "10.0.0.3"
command = "true"

[[vm]]
name = "other"
dns = "svc.other.test"
ip = "10.0.0.4"
ip6 = "fd00::4"
command = "true"
"#;

/// The handler and what the harness needs beside it, built once.
struct World {
    rt: tokio::runtime::Runtime,
    handler: Handler,
    metrics: Arc<Metrics>,
    slots: Vec<Arc<VmSlot>>,
    slow: Mutex<Option<mpsc::Receiver<SlowQuery>>>,
    zones: Vec<LowerName>,
}

fn world() -> &'static World {
    static WORLD: OnceLock<World> = OnceLock::new();
    WORLD.get_or_init(|| {
        let file = from_toml(CONFIG, Path::new("fuzz.toml")).expect("the fixed configuration");
        let cfg = merge(&Flags::default(), Some(&file)).expect("the fixed configuration");
        let slots = slots_for(&cfg.vms, &Default::default());
        let tables = Tables::new(Table::build(&cfg, &slots, None, 7));
        let (tx, rx) = mpsc::channel(1);
        let metrics = Arc::new(Metrics::new());
        let handler = Handler::new(tables, tx, metrics.clone(), Clock::new());
        let mut slots: Vec<Arc<VmSlot>> = slots.into_values().collect();
        slots.sort_by(|a, b| a.name.cmp(&b.name));
        World {
            rt: tokio::runtime::Builder::new_current_thread()
                .enable_time()
                .build()
                .expect("a runtime"),
            handler,
            metrics,
            slots,
            slow: Mutex::new(Some(rx)),
            zones: cfg.zones.iter().map(|z| LowerName::new(&z.name)).collect(),
        }
    })
}

/// Answers every slow-path query with `answer` (`None`: drops it unanswered).
async fn fleet(rx: &mut mpsc::Receiver<SlowQuery>, answer: Option<Answer>) {
    while let Some(q) = rx.recv().await {
        if let Some(a) = answer {
            let _ = q.reply.send(a);
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((setup, message)) = data.split_first() else {
        return;
    };
    let w = world();
    for (i, slot) in w.slots.iter().enumerate() {
        slot.direct
            .store(setup & (1 << i) != 0, std::sync::atomic::Ordering::Release);
    }
    let fleet_answer = match setup >> 4 & 3 {
        0 | 1 => Some(Answer::Ready),
        2 => Some(Answer::ServFail(Refusal::BootFailed)),
        _ => None,
    };
    let protocol = if setup & 0x80 != 0 {
        Protocol::Tcp
    } else {
        Protocol::Udp
    };
    let src: SocketAddr = "198.18.0.2:5353".parse().expect("an address");
    let mut rx = w
        .slow
        .lock()
        .expect("not poisoned")
        .take()
        .expect("one input at a time");
    let reply = w.rt.block_on(async {
        tokio::select! {
            biased;
            r = answer(&w.handler, &w.metrics, message.to_vec(), src, protocol) => r,
            () = fleet(&mut rx, fleet_answer) => unreachable!("the handler holds the sender"),
        }
    });
    *w.slow.lock().expect("not poisoned") = Some(rx);

    let Ok(header) = Header::read(&mut BinDecoder::new(message)) else {
        assert!(reply.is_none(), "an answer to less than a header");
        return;
    };
    if header.metadata.message_type == MessageType::Response {
        assert!(reply.is_none(), "an answer to a response");
        return;
    }
    let Ok(request) = Request::from_bytes(message.to_vec(), src, protocol) else {
        let bytes = reply.expect("a message that does not decode is answered FORMERR");
        let response = Message::from_vec(&bytes).expect("a FORMERR reads back");
        assert_eq!(response.metadata.id, header.metadata.id);
        assert_eq!(response.metadata.response_code, ResponseCode::FormErr);
        return;
    };
    // None: the handler's response could not be encoded (nothing is sent, as hickory does).
    let Some(bytes) = reply else {
        return;
    };
    check_response(w, &request, &bytes);
});
fn check_response(w: &World, request: &Request, bytes: &[u8]) {
    let asked = request.queries.queries();
    // hickory-server copies the question's bytes as they came: a name compressed with a
    // pointer (into the header, say) may read otherwise in the response, or not at all. Not
    // the handler's doing, and no resolver compresses its question.
    let compressed = question_is_compressed(request.as_slice(), asked.len());
    let response = match Message::from_vec(bytes) {
        Ok(r) => r,
        Err(_) if compressed => return,
        Err(e) => panic!("the response does not read back ({e}): {bytes:?}"),
    };
    let m = &response.metadata;
    assert_eq!(m.id, request.metadata.id);
    assert_eq!(m.message_type, MessageType::Response);
    assert_eq!(m.op_code, request.metadata.op_code);
    assert!(
        response.queries.len() <= asked.len(),
        "more questions in the response than asked"
    );
    for (q, r) in asked.iter().zip(&response.queries) {
        if !compressed {
            assert_eq!(q.name(), &LowerName::new(r.name()), "the question changed");
        }
        assert_eq!(q.query_type(), r.query_type());
    }
    let Some(q) = asked.first().filter(|_| asked.len() == 1) else {
        assert!(response.answers.is_empty(), "answers without one question");
        return;
    };
    for a in &response.answers {
        assert_eq!(
            &LowerName::new(&a.name),
            q.name(),
            "an answer for another name: {a}"
        );
        assert_eq!(
            a.record_type(),
            q.query_type(),
            "an answer of another type: {a}"
        );
    }
    if m.authoritative {
        assert!(
            w.zones.iter().any(|z| z.zone_of(q.name())),
            "authoritative for {} outside the zones",
            q.name()
        );
    }
}

/// True if a name in the first `count` questions of the message `raw` is compressed (holds
/// a pointer, or a label type other than a plain label).
fn question_is_compressed(raw: &[u8], count: usize) -> bool {
    let mut at = 12;
    for _ in 0..count {
        loop {
            let Some(&len) = raw.get(at) else {
                return false;
            };
            if len & 0xc0 != 0 {
                return true;
            }
            at += 1 + usize::from(len);
            if len == 0 {
                break;
            }
        }
        // Type and class.
        at += 4;
    }
    false
}
