//! The Xenstore layout of a held SYN (`synjitsu::store::layout` and `sexp`), from the text a
//! reader finds in Xenstore to values, and back: what the tests' reader (standing for the
//! patched MirageOS guest) does with whatever a node holds.
//!
//! Input: one byte saying what the text is, then the text (lossy UTF-8: Xenstore values are
//! bytes). 0: an `options` leaf; 1: a path; 2: an address component; 3: the six leaves,
//! separated by newlines.
//!
//! Checks, besides never panicking: whatever reads is written back to text that reads the
//! same (and is then stable); options that can be on the wire survive the wire too.
#![no_main]

use libfuzzer_sys::fuzz_target;
use synjitsu::store::layout::{
    self, HeldSyn, LEAVES, SynKey, TcpOption, options_from_wire, options_to_wire,
};
use synjitsu::store::sexp::{options_from_sexp, options_to_sexp};

fuzz_target!(|data: &[u8]| {
    let Some((what, text)) = data.split_first() else {
        return;
    };
    let text = String::from_utf8_lossy(text);
    match what % 4 {
        0 => options(&text),
        1 => path(&text),
        2 => address(&text),
        _ => leaves(&text),
    }
});

fn options(text: &str) {
    let Ok(opts) = options_from_sexp(text) else {
        return;
    };
    let written = options_to_sexp(&opts);
    assert_eq!(
        options_from_sexp(&written).as_ref(),
        Ok(&opts),
        "{text:?} read back from {written:?}"
    );
    assert_eq!(
        options_to_sexp(&options_from_sexp(&written).unwrap()),
        written
    );
    if opts.iter().all(on_the_wire) {
        let bytes = options_to_wire(&opts);
        assert_eq!(options_from_wire(&bytes).as_ref(), Ok(&opts), "{bytes:?}");
    }
}

/// True if `o` is an option as `options_from_wire` makes it (and so one it can read back).
fn on_the_wire(o: &TcpOption) -> bool {
    match o {
        TcpOption::Sack(blocks) => blocks.len() <= 31,
        TcpOption::Unknown(kind, data) => {
            !matches!(
                (kind, data.len()),
                (0 | 1 | 5, _) | (2, 2) | (3, 1) | (4, 0) | (8, 8)
            ) && data.len() <= 253
        }
        _ => true,
    }
}

fn path(text: &str) {
    let Ok(key) = SynKey::from_path(text) else {
        return;
    };
    let conn = key.conn_path();
    assert_eq!(SynKey::from_path(&conn), Ok(key), "{text:?} -> {conn:?}");
    for leaf in LEAVES {
        assert_eq!(SynKey::from_path(&key.leaf_path(leaf)), Ok(key));
    }
}

fn address(text: &str) {
    let Ok(ip) = layout::decode_addr(text) else {
        return;
    };
    let c = layout::encode_addr(ip);
    assert_eq!(layout::decode_addr(&c), Ok(ip), "{text:?} -> {ip} -> {c:?}");
}

fn leaves(text: &str) {
    let values: Vec<&str> = text.split('\n').collect();
    let get = |leaf: &str| {
        let i = LEAVES.iter().position(|l| *l == leaf)?;
        values.get(i).map(|v| v.to_string())
    };
    let Ok(syn) = HeldSyn::from_leaves(get) else {
        return;
    };
    let written = syn.to_leaves();
    let back = HeldSyn::from_leaves(|leaf| {
        written
            .iter()
            .find(|(l, _)| *l == leaf)
            .map(|(_, v)| v.clone())
    });
    assert_eq!(back.as_ref(), Ok(&syn), "{written:?}");
}
