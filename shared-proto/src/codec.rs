//! Framing of control messages: a 4-byte big-endian length, then that many bytes of JSON.
//!
//! Owns splitting a byte stream into frames and turning frames into typed messages, with a
//! typed [`CodecError`] for everything that can be wrong and no panic on any input. It does
//! not read sockets: the daemons feed it the bytes they received.
//!
//! Framing errors ([`CodecError::Oversized`], [`CodecError::Truncated`]) lose the stream's
//! framing, and the connection should be closed. Payload errors (everything else) consume
//! exactly their frame: the reader may answer with an error and read on.

use bytes::{Buf, BufMut, Bytes, BytesMut};

use crate::control::Message;
use crate::vm::VmError;

/// The largest payload accepted or sent: 4 MiB holds a `Sync` of 10,000 VMs with the longest
/// names and addresses (about 2.3 MB; jitsu-dns sends every VM it tracks in one after each
/// reconnect).
pub const MAX_FRAME_LEN: usize = 4 << 20;

const HEADER_LEN: usize = 4;

/// Everything that can be wrong with a frame.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CodecError {
    /// The length prefix announces more than [`MAX_FRAME_LEN`].
    #[error("frame of {len} bytes exceeds the maximum of {max}")]
    Oversized {
        /// The announced length.
        len: usize,
        /// [`MAX_FRAME_LEN`].
        max: usize,
    },
    /// The stream ended inside a frame.
    #[error("stream ended inside a frame: have {have} of {need} bytes")]
    Truncated {
        /// Bytes received.
        have: usize,
        /// Bytes the frame needed (header included).
        need: usize,
    },
    /// A zero-length frame carries no message.
    #[error("empty frame")]
    Empty,
    /// The payload is not a JSON object with a string `type`.
    #[error("malformed message: {reason}")]
    Malformed {
        /// The request id, if one could be read.
        id: Option<u64>,
        /// What is wrong.
        reason: String,
    },
    /// The payload's `type` is not a message this version knows.
    #[error("unknown message type {kind:?}")]
    UnknownMessage {
        /// The request id, if one could be read.
        id: Option<u64>,
        /// The unknown tag.
        kind: String,
    },
    /// The message parsed but carries a VM that cannot exist.
    #[error("invalid message: {source}")]
    Invalid {
        /// The request id, if one could be read.
        id: Option<u64>,
        /// The rule it breaks.
        #[source]
        source: VmError,
    },
}

impl CodecError {
    /// True if the stream's framing is lost and the connection should be closed.
    pub fn is_fatal(&self) -> bool {
        matches!(
            self,
            CodecError::Oversized { .. } | CodecError::Truncated { .. }
        )
    }

    /// The id of the request this error is about, when it could be read.
    pub fn request_id(&self) -> Option<u64> {
        match self {
            CodecError::Malformed { id, .. }
            | CodecError::UnknownMessage { id, .. }
            | CodecError::Invalid { id, .. } => *id,
            _ => None,
        }
    }
}

/// Appends `msg` as one frame to `dst`.
pub fn encode<M: Message>(msg: &M, dst: &mut BytesMut) -> Result<(), CodecError> {
    let payload = serde_json::to_vec(msg).map_err(|e| CodecError::Malformed {
        id: None,
        reason: e.to_string(),
    })?;
    encode_payload(&payload, dst)
}

/// Appends `payload`, whatever its bytes, as one frame to `dst`; nothing is written if it is
/// longer than [`MAX_FRAME_LEN`].
pub fn encode_payload(payload: &[u8], dst: &mut BytesMut) -> Result<(), CodecError> {
    if payload.len() > MAX_FRAME_LEN {
        return Err(CodecError::Oversized {
            len: payload.len(),
            max: MAX_FRAME_LEN,
        });
    }
    dst.reserve(HEADER_LEN + payload.len());
    dst.put_u32(u32::try_from(payload.len()).expect("bounded by MAX_FRAME_LEN"));
    dst.put_slice(payload);
    Ok(())
}

/// Takes one complete frame's payload off the front of `src`, or `None` if more bytes are
/// needed. An oversized length is refused as soon as its header is read, before buffering.
pub fn split_frame(src: &mut BytesMut) -> Result<Option<Bytes>, CodecError> {
    if src.len() < HEADER_LEN {
        return Ok(None);
    }
    let len = u32::from_be_bytes([src[0], src[1], src[2], src[3]]) as usize;
    if len > MAX_FRAME_LEN {
        return Err(CodecError::Oversized {
            len,
            max: MAX_FRAME_LEN,
        });
    }
    if src.len() < HEADER_LEN + len {
        src.reserve(HEADER_LEN + len - src.len());
        return Ok(None);
    }
    src.advance(HEADER_LEN);
    Ok(Some(src.split_to(len).freeze()))
}

/// Decodes the next message from `src`: `Ok(None)` until a whole frame is there.
pub fn decode<M: Message>(src: &mut BytesMut) -> Result<Option<M>, CodecError> {
    match split_frame(src)? {
        Some(payload) => decode_payload(&payload).map(Some),
        None => Ok(None),
    }
}

/// Call when the stream has ended: leftover bytes are a truncated frame.
pub fn decode_eof(src: &BytesMut) -> Result<(), CodecError> {
    if src.is_empty() {
        return Ok(());
    }
    let need = if src.len() < HEADER_LEN {
        HEADER_LEN
    } else {
        HEADER_LEN + u32::from_be_bytes([src[0], src[1], src[2], src[3]]) as usize
    };
    Err(CodecError::Truncated {
        have: src.len(),
        need,
    })
}

/// Decodes one frame's payload.
pub fn decode_payload<M: Message>(payload: &[u8]) -> Result<M, CodecError> {
    if payload.is_empty() {
        return Err(CodecError::Empty);
    }
    let value: serde_json::Value =
        serde_json::from_slice(payload).map_err(|e| CodecError::Malformed {
            id: None,
            reason: e.to_string(),
        })?;
    let id = value.get("id").and_then(serde_json::Value::as_u64);
    let Some(obj) = value.as_object() else {
        return Err(CodecError::Malformed {
            id,
            reason: "not a JSON object".into(),
        });
    };
    let kind = match obj.get("type") {
        Some(serde_json::Value::String(k)) => k,
        Some(_) => {
            return Err(CodecError::Malformed {
                id,
                reason: "`type` is not a string".into(),
            });
        }
        None => {
            return Err(CodecError::Malformed {
                id,
                reason: "missing `type`".into(),
            });
        }
    };
    if !M::KINDS.contains(&kind.as_str()) {
        return Err(CodecError::UnknownMessage {
            id,
            kind: kind.clone(),
        });
    }
    let msg: M = serde_json::from_value(value).map_err(|e| CodecError::Malformed {
        id,
        reason: e.to_string(),
    })?;
    msg.validate()
        .map_err(|source| CodecError::Invalid { id, source })?;
    Ok(msg)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::control::*;
    use crate::{Handover, Mac, VmIdentity};

    fn vm(name: &str, handover: Handover) -> VmIdentity {
        VmIdentity {
            name: name.into(),
            mac: Mac([0x00, 0x16, 0x3e, 0, 0, 1]),
            ipv4: "10.0.0.1".parse().unwrap(),
            ipv6: Some("fd00::1".parse().unwrap()),
            handover,
            port: Some("vnet0".into()),
            announces_listening: false,
        }
    }

    fn all_requests() -> Vec<Request> {
        let bodies = vec![
            ClientMessage::Hello {
                version: PROTOCOL_VERSION,
                client: "jitsu-dns test".into(),
            },
            ClientMessage::Booting {
                vm: vm("www", Handover::Wire),
            },
            ClientMessage::Ready { name: "www".into() },
            ClientMessage::Port {
                name: "www".into(),
                port: "vnet3".into(),
            },
            ClientMessage::Stopped {
                vm: vm("mirage", Handover::Xenstore { domid: 12 }),
            },
            ClientMessage::Sync {
                vms: vec![
                    VmStatus {
                        vm: vm("a", Handover::Wire),
                        phase: Phase::Booting,
                    },
                    VmStatus {
                        vm: vm("b", Handover::Xenstore { domid: 3 }),
                        phase: Phase::Running,
                    },
                    VmStatus {
                        vm: vm("c", Handover::Wire),
                        phase: Phase::Stopped,
                    },
                ],
            },
            ClientMessage::Sync { vms: vec![] },
        ];
        bodies
            .into_iter()
            .enumerate()
            .map(|(i, body)| Request {
                id: i as u64 + 1,
                body,
            })
            .collect()
    }

    fn all_server_messages() -> Vec<ServerMessage> {
        vec![
            ServerMessage::Ok {
                id: 1,
                reply: Reply::Hello {
                    version: PROTOCOL_VERSION,
                    server: "synjitsu test".into(),
                },
            },
            ServerMessage::Ok {
                id: 2,
                reply: Reply::Ack,
            },
            ServerMessage::Error {
                id: 3,
                code: ErrorCode::UnknownVm,
                message: "no VM named \"x\"".into(),
            },
            ServerMessage::Event {
                event: Event::GuestAnnounced { name: "www".into() },
            },
            ServerMessage::Event {
                event: Event::SynHeld {
                    name: "www".into(),
                    held: 3,
                },
            },
            ServerMessage::Event {
                event: Event::Handover {
                    name: "www".into(),
                    count: 3,
                    via: HandoverVia::Wire,
                },
            },
            ServerMessage::Event {
                event: Event::Handover {
                    name: "mirage".into(),
                    count: 1,
                    via: HandoverVia::Xenstore,
                },
            },
            ServerMessage::Event {
                event: Event::WakeRequest { name: "www".into() },
            },
        ]
    }

    fn frame(payload: &[u8]) -> BytesMut {
        let mut b = BytesMut::new();
        encode_payload(payload, &mut b).unwrap();
        b
    }

    #[test]
    fn every_request_round_trips() {
        for req in all_requests() {
            let mut buf = BytesMut::new();
            encode(&req, &mut buf).unwrap();
            let back: Request = decode(&mut buf).unwrap().expect("a whole frame");
            assert_eq!(back, req);
            assert!(buf.is_empty());
        }
    }

    #[test]
    fn every_server_message_round_trips() {
        for msg in all_server_messages() {
            let mut buf = BytesMut::new();
            encode(&msg, &mut buf).unwrap();
            let back: ServerMessage = decode(&mut buf).unwrap().expect("a whole frame");
            assert_eq!(back, msg);
        }
    }

    #[test]
    fn the_documented_wire_form_decodes() {
        let mut buf = frame(br#"{"id":2,"type":"booting","vm":{"name":"www","mac":"00:16:3e:00:00:01","ipv4":"10.0.0.1","handover":{"via":"wire"}}}"#);
        let req: Request = decode(&mut buf).unwrap().unwrap();
        assert_eq!(req.id, 2);
        assert!(matches!(req.body, ClientMessage::Booting { ref vm } if vm.name == "www"));
        let mut enc = BytesMut::new();
        encode(
            &Request {
                id: 1,
                body: ClientMessage::Ready { name: "www".into() },
            },
            &mut enc,
        )
        .unwrap();
        assert_eq!(&enc[4..], br#"{"id":1,"type":"ready","name":"www"}"#);
    }

    #[test]
    fn frames_split_at_any_byte_boundary() {
        let mut wire = BytesMut::new();
        for req in all_requests() {
            encode(&req, &mut wire).unwrap();
        }
        let wire = wire.freeze();
        let mut src = BytesMut::new();
        let mut got = Vec::new();
        for b in wire.iter() {
            src.put_u8(*b);
            while let Some(req) = decode::<Request>(&mut src).unwrap() {
                got.push(req);
            }
        }
        decode_eof(&src).unwrap();
        assert_eq!(got, all_requests());
    }

    #[test]
    fn a_sync_of_10000_vms_at_their_longest_fits_in_a_frame() {
        use crate::vm::{Handover, MAX_NAME_LEN, VmIdentity};
        use crate::{Phase, VmStatus};
        let vms = (0..10_000u32)
            .map(|i| VmStatus {
                vm: VmIdentity {
                    name: format!("{i:0>width$}", width = MAX_NAME_LEN),
                    mac: crate::Mac([0x02, 0xff, 0xff, 0xff, (i >> 8) as u8, i as u8]),
                    // Every address as long as it can be written.
                    ipv4: std::net::Ipv4Addr::new(
                        100,
                        100 + (i >> 7) as u8,
                        100 + (i & 0x7f) as u8,
                        100,
                    ),
                    ipv6: Some(std::net::Ipv6Addr::new(
                        0xfdff,
                        0xffff,
                        0xffff,
                        0xffff,
                        0xffff,
                        0xffff,
                        0xffff,
                        0x8000 | i as u16,
                    )),
                    handover: Handover::Xenstore { domid: u32::MAX },
                    // An interface name at its longest (15 bytes).
                    port: Some(format!("vif{i:0>12}")),
                    announces_listening: true,
                },
                phase: Phase::Booting,
            })
            .collect();
        let sync = Request {
            id: u64::MAX,
            body: ClientMessage::Sync { vms },
        };
        let mut buf = BytesMut::new();
        encode(&sync, &mut buf).unwrap();
        let back: Request = decode(&mut buf).unwrap().expect("a whole frame");
        assert_eq!(back, sync);
    }

    #[test]
    fn oversized_is_refused_from_the_header_alone() {
        let mut buf = BytesMut::new();
        buf.put_u32(MAX_FRAME_LEN as u32 + 1);
        let err = decode::<Request>(&mut buf).unwrap_err();
        assert_eq!(
            err,
            CodecError::Oversized {
                len: MAX_FRAME_LEN + 1,
                max: MAX_FRAME_LEN
            }
        );
        assert!(err.is_fatal());
        let mut buf = BytesMut::new();
        buf.put_u32(u32::MAX);
        assert!(matches!(
            decode::<Request>(&mut buf),
            Err(CodecError::Oversized { .. })
        ));
    }

    #[test]
    fn encoding_refuses_what_it_could_not_decode() {
        let huge = Request {
            id: 1,
            body: ClientMessage::Hello {
                version: 1,
                client: "x".repeat(MAX_FRAME_LEN),
            },
        };
        let mut buf = BytesMut::new();
        assert!(matches!(
            encode(&huge, &mut buf),
            Err(CodecError::Oversized { .. })
        ));
        assert!(buf.is_empty(), "nothing half-written");
    }

    #[test]
    fn truncated_frames_are_reported_at_eof() {
        let mut full = BytesMut::new();
        encode(&all_requests()[1], &mut full).unwrap();
        for cut in 1..full.len() {
            let mut part = BytesMut::from(&full[..cut]);
            assert_eq!(decode::<Request>(&mut part).unwrap(), None);
            let err = decode_eof(&part).unwrap_err();
            assert!(matches!(err, CodecError::Truncated { have, .. } if have == cut));
            assert!(err.is_fatal());
        }
        assert_eq!(decode_eof(&BytesMut::new()), Ok(()));
    }

    type Check = fn(&CodecError) -> bool;

    #[test]
    fn payload_errors_consume_exactly_their_frame() {
        let cases: Vec<(&[u8], Check)> = vec![
            (b"", |e| *e == CodecError::Empty),
            (b"{not json", |e| matches!(e, CodecError::Malformed { id: None, .. })),
            (b"[1,2]", |e| matches!(e, CodecError::Malformed { .. })),
            (b"{\"id\":4}", |e| matches!(e, CodecError::Malformed { id: Some(4), .. })),
            (b"{\"id\":4,\"type\":7}", |e| matches!(e, CodecError::Malformed { id: Some(4), .. })),
            (b"{\"id\":5,\"type\":\"reboot\"}", |e| {
                matches!(e, CodecError::UnknownMessage { id: Some(5), kind } if kind == "reboot")
            }),
            (b"{\"id\":6,\"type\":\"ready\"}", |e| {
                matches!(e, CodecError::Malformed { id: Some(6), .. })
            }),
            (b"{\"id\":7,\"type\":\"ready\",\"name\":\"www\",\"extra\":1}", |e| {
                matches!(e, CodecError::Malformed { id: Some(7), .. })
            }),
            (b"{\"id\":8,\"type\":\"ready\",\"name\":\"../etc\"}", |e| {
                matches!(e, CodecError::Invalid { id: Some(8), .. })
            }),
            (
                br#"{"id":9,"type":"booting","vm":{"name":"www","mac":"zz","ipv4":"10.0.0.1","handover":{"via":"wire"}}}"#,
                |e| matches!(e, CodecError::Malformed { id: Some(9), .. }),
            ),
            (
                br#"{"id":10,"type":"booting","vm":{"name":"www","mac":"01:00:5e:00:00:01","ipv4":"10.0.0.1","handover":{"via":"wire"}}}"#,
                |e| matches!(e, CodecError::Invalid { id: Some(10), .. }),
            ),
            (
                br#"{"id":11,"type":"booting","vm":{"name":"www","mac":"00:16:3e:00:00:01","ipv4":"10.0.0.1","handover":{"via":"carrier-pigeon"}}}"#,
                |e| matches!(e, CodecError::Malformed { id: Some(11), .. }),
            ),
            (b"{\"id\":12,\"type\":\"hello\",\"version\":-1,\"client\":\"x\"}", |e| {
                matches!(e, CodecError::Malformed { id: Some(12), .. })
            }),
            (b"{\"id\":13,\"type\":\"port\",\"name\":\"www\",\"port\":\"../x\"}", |e| {
                matches!(e, CodecError::Invalid { id: Some(13), .. })
            }),
            (
                br#"{"id":14,"type":"booting","vm":{"name":"www","mac":"00:16:3e:00:00:01","ipv4":"10.0.0.1","handover":{"via":"wire"},"port":"a very long name"}}"#,
                |e| matches!(e, CodecError::Invalid { id: Some(14), .. }),
            ),
            (&[0xff, 0xfe, 0x00], |e| matches!(e, CodecError::Malformed { .. })),
        ];
        for (payload, check) in cases {
            let mut buf = frame(payload);
            let ok = Request {
                id: 99,
                body: ClientMessage::Ready { name: "www".into() },
            };
            encode(&ok, &mut buf).unwrap();
            let err = decode::<Request>(&mut buf).unwrap_err();
            assert!(check(&err), "{payload:?} gave {err:?}");
            assert!(!err.is_fatal());
            // The next frame is intact: a bad request costs only itself.
            assert_eq!(decode::<Request>(&mut buf).unwrap(), Some(ok));
        }
    }

    #[test]
    fn server_side_unknowns_are_typed_too() {
        let mut buf = frame(br#"{"type":"event","event":{"type":"reboot","name":"www"}}"#);
        assert!(matches!(
            decode::<ServerMessage>(&mut buf),
            Err(CodecError::Malformed { .. })
        ));
        let mut buf = frame(br#"{"type":"gossip"}"#);
        assert!(matches!(
            decode::<ServerMessage>(&mut buf),
            Err(CodecError::UnknownMessage { .. })
        ));
        let mut buf = frame(br#"{"type":"event","event":{"type":"wake_request","name":""}}"#);
        assert!(matches!(
            decode::<ServerMessage>(&mut buf),
            Err(CodecError::Invalid { .. })
        ));
    }

    #[test]
    fn arbitrary_bytes_never_panic() {
        // A deterministic generator: every frame length/byte mix, fed in odd-sized pieces.
        let mut x: u32 = 0x1234_5678;
        for _ in 0..2000 {
            let mut src = BytesMut::new();
            let n = (x % 64) as usize;
            for _ in 0..n {
                x ^= x << 13;
                x ^= x >> 17;
                x ^= x << 5;
                src.put_u8(x as u8);
            }
            loop {
                match decode::<Request>(&mut src) {
                    Ok(Some(_)) => continue,
                    Ok(None) => break,
                    Err(e) if e.is_fatal() => break,
                    Err(_) => continue,
                }
            }
            let _ = decode_eof(&src);
        }
    }
}
