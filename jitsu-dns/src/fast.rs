//! The fast path: the common query (a running VM's A or AAAA over UDP) answered from bytes
//! encoded when the table was built, before hickory parses anything.
//!
//! Owns recognising a plain query ([`PlainQuery::parse`]), the key its name is looked up
//! under (the name's wire form in lowercase), the answers encoded ahead of time with hickory
//! ([`Encoded`]), and writing a response from them ([`PlainQuery::respond`]): the query's
//! header with the bits an answer keeps, its question exactly as the client wrote it (0x20
//! case randomisation survives), the answer records, whose owner is a pointer to that
//! question, and an OPT record if the query had one.
//!
//! It decides nothing about names: which are answered this way, and for how long, is
//! [`crate::dns`]'s. Whatever it does not recognise takes the slow path (hickory's parsing,
//! the handler, hickory's encoding), which answers a plain query with the same bytes: the
//! transport's tests compare the two on many queries, and on mutations of them.

use hickory_proto::op::{Message, MessageType, OpCode, Query};
use hickory_proto::rr::{Name, Record, RecordType};
use hickory_proto::serialize::binary::{BinEncodable, BinEncoder};

/// Bytes of a DNS header.
const HEADER: usize = 12;
/// The longest name on the wire (RFC 1035 section 3.1), its root label included.
const MAX_NAME: usize = 255;
const TYPE_A: u16 = 1;
const TYPE_AAAA: u16 = 28;
const TYPE_OPT: u16 = 41;
const CLASS_IN: u16 = 1;
/// EDNS options hickory parses into values (NSID, DAU, client subnet), so that a malformed
/// one could make it answer otherwise; a query carrying one takes the slow path. Any other
/// option (a COOKIE, as dig sends) is kept as opaque bytes and changes nothing in the answer.
const PARSED_OPTIONS: [u16; 3] = [3, 5, 8];
/// The least UDP payload size a response advertises (RFC 6891 section 6.2.5).
const MIN_PAYLOAD: u16 = 512;

/// A query the fast path can answer alone: a standard query (QR clear, opcode 0) with one
/// question, of class IN and type A or AAAA, whose name is plain labels (no compression
/// pointer), nothing in the answer and authority sections, and in the additional section at
/// most an EDNS version 0 OPT record (owner the root) whose options are well formed, the
/// message ending where its last record does.
#[derive(Debug)]
pub(crate) struct PlainQuery<'m> {
    msg: &'m [u8],
    /// Where the question (name, type, class) ends in `msg`.
    question_end: usize,
    qtype: RecordType,
    /// The OPT record's UDP payload size, if the query had one.
    edns_payload: Option<u16>,
    /// The name's wire form in lowercase (ASCII: DNS compares names so, RFC 4343).
    key: [u8; MAX_NAME],
    key_len: usize,
}

fn u16_at(msg: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_be_bytes([*msg.get(at)?, *msg.get(at + 1)?]))
}

/// The length of the plain name (labels of at most 63 bytes, ending in the root label, at
/// most 255 bytes) at the start of `bytes`, or `None` if it is not one (a compression
/// pointer, an extended label type, too long, cut short).
pub(crate) fn plain_name_len(bytes: &[u8]) -> Option<usize> {
    let mut at = 0;
    loop {
        let len = usize::from(*bytes.get(at)?);
        if len > 63 || at + 1 + len > MAX_NAME {
            return None;
        }
        at += 1 + len;
        if len == 0 {
            return Some(at);
        }
    }
}

/// True if the OPT record's data `options` is a sequence of whole options, none of which
/// hickory parses into a value.
fn options_opaque(mut options: &[u8]) -> bool {
    while !options.is_empty() {
        let (Some(code), Some(len)) = (u16_at(options, 0), u16_at(options, 2)) else {
            return false;
        };
        let Some(rest) = options.get(4 + usize::from(len)..) else {
            return false;
        };
        if PARSED_OPTIONS.contains(&code) {
            return false;
        }
        options = rest;
    }
    true
}

impl<'m> PlainQuery<'m> {
    /// `msg` as a plain query, or `None`: the slow path answers it.
    pub(crate) fn parse(msg: &'m [u8]) -> Option<PlainQuery<'m>> {
        // QR and the opcode are the top five bits of the third byte.
        if *msg.get(2)? & 0xf8 != 0 {
            return None;
        }
        let counts = [4, 6, 8, 10].map(|at| u16_at(msg, at));
        let [Some(1), Some(0), Some(0), Some(additionals @ (0 | 1))] = counts else {
            return None;
        };
        let name = msg.get(HEADER..)?;
        let name_len = plain_name_len(name)?;
        let mut key = [0u8; MAX_NAME];
        for (k, b) in key.iter_mut().zip(&name[..name_len]) {
            *k = b.to_ascii_lowercase();
        }
        let at = HEADER + name_len;
        let qtype = match u16_at(msg, at)? {
            TYPE_A => RecordType::A,
            TYPE_AAAA => RecordType::AAAA,
            _ => return None,
        };
        if u16_at(msg, at + 2)? != CLASS_IN {
            return None;
        }
        let question_end = at + 4;
        let edns_payload = if additionals == 1 {
            // The OPT record: root owner, type, payload size, extended RCODE, version,
            // flags, data length, options.
            let opt = msg.get(question_end..)?;
            let (Some(0), Some(TYPE_OPT), Some(payload), Some(0), Some(len)) = (
                opt.first().copied(),
                u16_at(opt, 1),
                u16_at(opt, 3),
                opt.get(6).copied(),
                u16_at(opt, 9),
            ) else {
                return None;
            };
            if opt.len() != 11 + usize::from(len) || !options_opaque(&opt[11..]) {
                return None;
            }
            Some(payload)
        } else if msg.len() != question_end {
            return None;
        } else {
            None
        };
        Some(PlainQuery {
            msg,
            question_end,
            qtype,
            edns_payload,
            key,
            key_len: name_len,
        })
    }

    /// The name's wire form in lowercase, the key it is looked up under.
    pub(crate) fn key(&self) -> &[u8] {
        &self.key[..self.key_len]
    }

    /// A or AAAA.
    pub(crate) fn qtype(&self) -> RecordType {
        self.qtype
    }

    /// Writes into `out` (cleared first) the authoritative NOERROR response carrying
    /// `answer`: the header hickory's `Metadata::response_from_request` makes (the ID, RD
    /// and CD copied, every other bit clear) with AA set, the question as the client wrote
    /// it, the answer, and the OPT record the handler gives a query with one (version 0,
    /// no flags, no options, the query's payload size but at least 512).
    pub(crate) fn respond(&self, answer: &Encoded, out: &mut Vec<u8>) {
        let msg = self.msg;
        out.clear();
        out.extend_from_slice(&msg[..2]);
        out.push(0x84 | (msg[2] & 0x01));
        out.push(msg[3] & 0x10);
        out.extend_from_slice(&[0, 1]);
        out.extend_from_slice(&answer.count.to_be_bytes());
        out.extend_from_slice(&[0, 0, 0, u8::from(self.edns_payload.is_some())]);
        out.extend_from_slice(&msg[HEADER..self.question_end]);
        out.extend_from_slice(&answer.records);
        if let Some(payload) = self.edns_payload {
            let [hi, lo] = payload.max(MIN_PAYLOAD).to_be_bytes();
            out.extend_from_slice(&[0, 0, 41, hi, lo, 0, 0, 0, 0, 0, 0]);
        }
    }
}

/// The answer section for one name and type, encoded once, its owner names pointers to the
/// question (offset 12); valid after any question for the same name, whatever its case,
/// since that has the same length.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Encoded {
    count: u16,
    records: Box<[u8]>,
}

impl Encoded {
    /// `records` (owned by `name`) as the answer to `name`/`qtype`, encoded by hickory with
    /// name compression; `None` if there are none or they cannot be encoded.
    pub(crate) fn new(name: &Name, qtype: RecordType, records: &[Record]) -> Option<Encoded> {
        if records.is_empty() {
            return None;
        }
        let mut message = Message::new(0, MessageType::Response, OpCode::Query);
        message.add_query(Query::query(name.clone(), qtype));
        message.add_answers(records.iter().cloned());
        let bytes = message.to_vec().ok()?;
        let question_end = HEADER + plain_name_len(bytes.get(HEADER..)?)? + 4;
        Some(Encoded {
            count: u16::try_from(records.len()).ok()?,
            records: bytes.get(question_end..)?.into(),
        })
    }
}

/// The lowercase wire form of `name`, the key [`PlainQuery::key`] is compared with.
pub(crate) fn key_of(name: &Name) -> Option<Box<[u8]>> {
    let mut bytes = Vec::with_capacity(MAX_NAME);
    name.to_lowercase()
        .emit(&mut BinEncoder::new(&mut bytes))
        .ok()?;
    Some(bytes.into())
}

#[cfg(test)]
mod tests {
    use std::net::{Ipv4Addr, Ipv6Addr};

    use hickory_proto::rr::RData;
    use hickory_proto::rr::rdata::{A, AAAA};

    use super::*;

    /// A query for `WwW.example.org` A, ID 0xbeef, RD set, no EDNS.
    const QUERY: [u8; 33] = [
        0xbe, 0xef, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0, //
        3, b'W', b'w', b'W', 7, b'e', b'x', b'a', b'm', b'p', b'l', b'e', 3, b'o', b'r', b'g', 0,
        0, 1, 0, 1,
    ];
    /// An OPT record: payload 1232, DO set, a client COOKIE.
    const OPT_COOKIE: [u8; 23] = [
        0, 0, 41, 0x04, 0xd0, 0, 0, 0x80, 0, 0, 12, //
        0, 10, 0, 8, 1, 2, 3, 4, 5, 6, 7, 8,
    ];

    fn with_opt(opt: &[u8]) -> Vec<u8> {
        let mut q = QUERY.to_vec();
        q[11] = 1;
        q.extend_from_slice(opt);
        q
    }

    fn www() -> Name {
        Name::from_ascii("www.example.org.").unwrap()
    }

    fn encoded() -> Encoded {
        let a = Record::from_rdata(www(), 60, RData::A(A(Ipv4Addr::new(10, 0, 0, 1))));
        Encoded::new(&www(), RecordType::A, &[a]).unwrap()
    }

    #[test]
    fn a_plain_query_is_keyed_by_its_name_in_lowercase() {
        let q = PlainQuery::parse(&QUERY).unwrap();
        assert_eq!(q.key(), &*key_of(&www()).unwrap());
        assert_eq!(q.qtype(), RecordType::A);
        assert_eq!(q.edns_payload, None);
    }

    #[test]
    fn the_answer_is_encoded_with_its_owner_a_pointer_to_the_question() {
        let e = encoded();
        assert_eq!(e.count, 1);
        assert_eq!(
            &*e.records,
            &[0xc0, 0x0c, 0, 1, 0, 1, 0, 0, 0, 60, 0, 4, 10, 0, 0, 1]
        );
    }

    #[test]
    fn the_response_keeps_the_id_rd_cd_and_the_question_as_written() {
        let mut q = QUERY;
        q[3] = 0x10 | 0x20 | 0x40; // CD, AD and Z: only CD is kept
        q[2] = 0x01 | 0x04 | 0x02; // RD, AA and TC: only RD is kept
        let mut out = Vec::new();
        PlainQuery::parse(&q).unwrap().respond(&encoded(), &mut out);
        assert_eq!(
            &out[..12],
            &[0xbe, 0xef, 0x85, 0x10, 0, 1, 0, 1, 0, 0, 0, 0]
        );
        assert_eq!(
            &out[12..33],
            &q[12..33],
            "the question as the client wrote it"
        );
        assert_eq!(&out[33..], &*encoded().records);
        assert_eq!(out.len(), 49);
    }

    #[test]
    fn edns_gets_an_opt_record_with_at_least_512_and_nothing_else() {
        let mut out = Vec::new();
        let q = with_opt(&OPT_COOKIE);
        PlainQuery::parse(&q).unwrap().respond(&encoded(), &mut out);
        assert_eq!(out[11], 1, "one additional record");
        assert_eq!(&out[49..], &[0, 0, 41, 0x04, 0xd0, 0, 0, 0, 0, 0, 0]);
        let mut small = OPT_COOKIE;
        small[3..5].copy_from_slice(&100u16.to_be_bytes());
        PlainQuery::parse(&with_opt(&small))
            .unwrap()
            .respond(&encoded(), &mut out);
        assert_eq!(&out[49..54], &[0, 0, 41, 0x02, 0x00]);
    }

    #[test]
    fn anything_but_a_plain_query_takes_the_slow_path() {
        let changed = |at: usize, b: u8| {
            let mut q = QUERY.to_vec();
            q[at] = b;
            q
        };
        let rejected: Vec<(&str, Vec<u8>)> = vec![
            ("a response", changed(2, 0x81)),
            ("opcode NOTIFY", changed(2, 0x20)),
            ("two questions", changed(5, 2)),
            ("no question", changed(5, 0)),
            ("an answer record", changed(7, 1)),
            ("an authority record", changed(9, 1)),
            ("type MX", changed(30, 15)),
            ("class CH", changed(32, 3)),
            ("a compression pointer", {
                let mut q = QUERY[..16].to_vec();
                q.extend_from_slice(&[0xc0, 0x0c, 0, 1, 0, 1]);
                q
            }),
            ("a label over 63 bytes", changed(12, 64)),
            ("cut short", QUERY[..31].to_vec()),
            ("trailing bytes", [&QUERY[..], &[0]].concat()),
            ("an additional record missing", changed(11, 1)),
            ("EDNS version 1", {
                let mut o = OPT_COOKIE;
                o[6] = 1;
                with_opt(&o)
            }),
            ("an OPT with a name", {
                let mut o = OPT_COOKIE.to_vec();
                o.insert(0, 1);
                o.insert(1, b'x');
                with_opt(&o)
            }),
            ("not an OPT", {
                let mut o = OPT_COOKIE;
                o[2] = 16;
                with_opt(&o)
            }),
            ("an option longer than the data", {
                let mut o = OPT_COOKIE;
                o[14] = 9;
                with_opt(&o)
            }),
            ("a client subnet option", {
                let mut o = OPT_COOKIE;
                o[12] = 8;
                with_opt(&o)
            }),
            (
                "an NSID option",
                with_opt(&[0, 0, 41, 4, 0, 0, 0, 0, 0, 0, 4, 0, 3, 0, 0]),
            ),
            ("the OPT data longer than the message", {
                let mut o = OPT_COOKIE;
                o[10] = 13;
                with_opt(&o)
            }),
        ];
        for (why, q) in rejected {
            assert!(PlainQuery::parse(&q).is_none(), "{why}");
        }
        assert!(PlainQuery::parse(&with_opt(&OPT_COOKIE)).is_some());
        assert!(
            PlainQuery::parse(&with_opt(&OPT_COOKIE[..11])).is_none(),
            "data length 12, none"
        );
        let mut empty = OPT_COOKIE[..11].to_vec();
        empty[10] = 0;
        assert!(PlainQuery::parse(&with_opt(&empty)).is_some());
    }

    #[test]
    fn the_longest_answer_fits_in_512_bytes_so_none_is_ever_truncated() {
        // A 255-byte name (the most a name can be), AAAA, with EDNS.
        let labels = [[b'a'; 63].as_slice(), &[b'b'; 63], &[b'c'; 63], &[b'd'; 61]];
        let name = Name::from_labels(labels).unwrap();
        let aaaa = Record::from_rdata(name.clone(), 60, RData::AAAA(AAAA(Ipv6Addr::LOCALHOST)));
        let e = Encoded::new(&name, RecordType::AAAA, &[aaaa]).unwrap();
        let mut q = vec![0, 1, 1, 0, 0, 1, 0, 0, 0, 0, 0, 1];
        q.extend_from_slice(&key_of(&name).unwrap());
        assert_eq!(q.len(), 12 + 255);
        q.extend_from_slice(&[0, 28, 0, 1]);
        q.extend_from_slice(&OPT_COOKIE);
        let mut out = Vec::new();
        PlainQuery::parse(&q).unwrap().respond(&e, &mut out);
        assert_eq!(out.len(), 12 + 255 + 4 + 28 + 11);
        assert!(out.len() <= 512);
    }

    #[test]
    fn plain_names_are_labels_up_to_the_root_within_255_bytes() {
        assert_eq!(plain_name_len(&[0]), Some(1));
        assert_eq!(plain_name_len(&[1, b'a', 0, 9]), Some(3));
        assert_eq!(plain_name_len(&[1, b'a']), None);
        assert_eq!(plain_name_len(&[0xc0, 0]), None);
        let mut long = Vec::new();
        for _ in 0..4 {
            long.push(63);
            long.extend_from_slice(&[b'a'; 63]);
        }
        long.push(0);
        assert_eq!(long.len(), 257);
        assert_eq!(plain_name_len(&long), None);
        let fits = [&long[..192], &[61], &[b'a'; 61][..], &[0]].concat();
        assert_eq!(fits.len(), 255);
        assert_eq!(plain_name_len(&fits), Some(255));
    }
}
