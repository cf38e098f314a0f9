//! The Xenstore wire codec (`synjitsu::store::xs_wire`): what xenstored (or anything on its
//! socket) sends synjitsu's hand-over, read as the client reads it, and written back.
//!
//! Input: a byte stream of messages.
//!
//! Checks, besides never panicking: each message decoded is encoded back to exactly the bytes
//! it came from, and decodes to itself; one byte less is "need more", never an error or
//! another message; the NUL-separated parts put back together give the payload; a
//! permission string that parses prints as one that parses to the same permission, and a
//! `SET_PERMS` built from such parts reads back the same.
#![no_main]

use libfuzzer_sys::fuzz_target;
use synjitsu::store::xs_wire::{Perm, XsMsg, XsType};

fuzz_target!(|data: &[u8]| {
    let mut at = 0;
    while let Ok(Some((msg, used))) = XsMsg::decode(&data[at..]) {
        let bytes = &data[at..at + used];
        check_message(&msg, bytes);
        at += used;
        if used == 0 {
            break;
        }
    }
});

fn check_message(msg: &XsMsg, bytes: &[u8]) {
    let mut out = Vec::new();
    msg.encode(&mut out).expect("a decoded message fits");
    assert_eq!(out, bytes, "encoding changed the bytes");
    assert_eq!(
        XsMsg::decode(&bytes[..bytes.len() - 1]),
        Ok(None),
        "a message cut short is not \"need more\""
    );
    assert_eq!(XsType::from_u32(msg.ty.to_u32()), msg.ty);
    let _ = msg.text();

    let parts = msg.parts();
    let body = msg.payload.strip_suffix(&[0]).unwrap_or(&msg.payload);
    if msg.payload.is_empty() {
        assert!(parts.is_empty());
    } else {
        assert_eq!(parts.join(&0u8), body, "the parts are not the payload");
    }
    if msg.payload.last() == Some(&0) {
        let rebuilt = XsMsg::new(msg.ty, msg.req_id, msg.tx_id, &parts);
        assert_eq!(
            &rebuilt, msg,
            "NUL-terminated parts did not rebuild the message"
        );
    }

    // A SET_PERMS as the server reads it: a path, then permissions.
    let Some((path, rest)) = parts.split_first() else {
        return;
    };
    let perms: Vec<Perm> = rest
        .iter()
        .filter_map(|p| std::str::from_utf8(p).ok()?.parse().ok())
        .collect();
    for p in &perms {
        assert_eq!(p.to_string().parse::<Perm>().as_ref(), Ok(p), "{p:?}");
    }
    let Ok(path) = std::str::from_utf8(path) else {
        return;
    };
    let sp = XsMsg::set_perms(msg.req_id, msg.tx_id, path, &perms);
    let mut wire = Vec::new();
    if sp.encode(&mut wire).is_ok() {
        let (back, used) = XsMsg::decode(&wire).unwrap().unwrap();
        assert_eq!(used, wire.len());
        let back_parts = back.parts();
        assert_eq!(back_parts[0], path.as_bytes());
        let back_perms: Vec<Perm> = back_parts[1..]
            .iter()
            .map(|p| std::str::from_utf8(p).unwrap().parse().unwrap())
            .collect();
        assert_eq!(back_perms, perms);
    }
}
