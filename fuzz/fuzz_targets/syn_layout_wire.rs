//! The Xenstore layout of a held SYN (`synjitsu::store::layout` and `sexp`), from the values
//! a captured SYN gives to the text the guest reads, and back.
//!
//! Input: the SYN's window (2 bytes), ISN (4), the random draw of `tx_isn` (2), the two
//! addresses' families and ports (1 + 2 + 2), the addresses (16 + 16, the first 4 used for
//! IPv4), then the TCP options area as it came off the wire.
//!
//! Checks, besides never panicking: options read off the wire are written back to bytes that
//! read the same, and to an S-expression that reads the same; the six leaves of the record
//! read back to the record; the connection's paths read back to its key; an address encodes
//! to a component of Xenstore's path alphabet that decodes to it.
#![no_main]

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use libfuzzer_sys::fuzz_target;
use synjitsu::store::layout::{self, HeldSyn, LEAVES, SynKey, options_from_wire, options_to_wire};
use synjitsu::store::sexp::{options_from_sexp, options_to_sexp};

const HEAD: usize = 2 + 4 + 2 + 1 + 2 + 2 + 16 + 16;

fuzz_target!(|data: &[u8]| {
    if data.len() < HEAD {
        return;
    }
    let (head, wire) = data.split_at(HEAD);
    let window = u16::from_be_bytes([head[0], head[1]]);
    let isn = u32::from_be_bytes([head[2], head[3], head[4], head[5]]);
    let random = u16::from_be_bytes([head[6], head[7]]);
    let families = head[8];
    let local_port = u16::from_be_bytes([head[9], head[10]]);
    let dest_port = u16::from_be_bytes([head[11], head[12]]);
    let addr = |bytes: &[u8], v6: bool| -> IpAddr {
        if v6 {
            IpAddr::V6(Ipv6Addr::from(<[u8; 16]>::try_from(bytes).unwrap()))
        } else {
            IpAddr::V4(Ipv4Addr::new(bytes[0], bytes[1], bytes[2], bytes[3]))
        }
    };
    let key = SynKey {
        local_ip: addr(&head[13..29], families & 1 == 1),
        local_port,
        dest_ip: addr(&head[29..45], families & 2 == 2),
        dest_port,
    };
    check_key(&key);

    let Ok(options) = options_from_wire(wire) else {
        return;
    };
    let bytes = options_to_wire(&options);
    assert_eq!(bytes.len() % 4, 0, "options are padded to words");
    assert_eq!(
        options_from_wire(&bytes).as_ref(),
        Ok(&options),
        "options did not survive the wire: {bytes:?}"
    );
    let text = options_to_sexp(&options);
    assert_eq!(
        options_from_sexp(&text).as_ref(),
        Ok(&options),
        "options did not survive the S-expression {text:?}"
    );

    let syn = HeldSyn::new(window, isn, options, random);
    let leaves = syn.to_leaves();
    assert_eq!(
        leaves.each_ref().map(|(l, _)| *l),
        LEAVES,
        "the leaves, in the original's order"
    );
    for (_, value) in &leaves {
        assert!(
            value.bytes().all(|b| (0x20..0x7f).contains(&b)),
            "a leaf that is not printable ASCII: {value:?}"
        );
    }
    let back = HeldSyn::from_leaves(|leaf| {
        leaves
            .iter()
            .find(|(l, _)| *l == leaf)
            .map(|(_, v)| v.clone())
    });
    assert_eq!(
        back.as_ref(),
        Ok(&syn),
        "the record did not survive its leaves"
    );
});

fn check_key(key: &SynKey) {
    for ip in [key.local_ip, key.dest_ip] {
        let c = layout::encode_addr(ip);
        assert!(
            c.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-_@".contains(&b)),
            "{ip} encodes to {c:?}, outside Xenstore's path alphabet"
        );
        assert_eq!(layout::decode_addr(&c), Ok(ip), "{ip} -> {c:?}");
    }
    assert_eq!(SynKey::from_path(&key.conn_path()).as_ref(), Ok(key));
    assert_eq!(SynKey::from_path(&key.syn_path()).as_ref(), Ok(key));
    for leaf in LEAVES {
        assert_eq!(SynKey::from_path(&key.leaf_path(leaf)).as_ref(), Ok(key));
    }
}
