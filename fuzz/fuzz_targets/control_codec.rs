//! The control-frame codec (`shared-proto`): bytes from the control socket, read as synjitsu
//! reads requests and as jitsu-dns reads answers and events.
//!
//! Input: one byte of mode, then the bytes. Even mode: the bytes are the stream as they came
//! (length prefixes and all); odd mode: they are one frame's payload (framed here, so the
//! fuzzer works on the JSON). The second byte sets the size of the pieces the stream arrives
//! in.
//!
//! Checks, besides never panicking: the pieces do not matter (the same items, the same end,
//! as from the whole stream at once, and as from the blocking `FrameReader`); a payload error
//! costs only its frame and is never fatal, a stream error always is; every message decoded is
//! encoded again and decodes to itself (both directions).
#![no_main]

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use shared_proto::codec;
use shared_proto::control::Message;
use shared_proto::stream::{ControlCodec, FrameReader, Item, StreamError};
use shared_proto::{ClientCodec, Request, ServerCodec, ServerMessage};

/// What reading a whole stream gives: its items, then how it ended.
type Reading<M> = (Vec<Item<M>>, Result<(), String>);

fuzz_target!(|data: &[u8]| {
    let [mode, piece, rest @ ..] = data else {
        return;
    };
    let stream = if mode & 1 == 1 {
        let mut framed = BytesMut::new();
        if codec::encode_payload(rest, &mut framed).is_err() {
            return;
        }
        framed.to_vec()
    } else {
        rest.to_vec()
    };
    let piece = usize::from(*piece).max(1);
    check::<Request>(&stream, piece, |m| {
        let mut b = BytesMut::new();
        ClientCodec::new().encode_item(m, &mut b).map(|()| b)
    });
    check::<ServerMessage>(&stream, piece, |m| {
        let mut b = BytesMut::new();
        ServerCodec::new().encode_item(m, &mut b).map(|()| b)
    });
});

fn check<M: Message + PartialEq + std::fmt::Debug>(
    stream: &[u8],
    piece: usize,
    encode: impl Fn(&M) -> Result<BytesMut, StreamError>,
) {
    let whole = read_in_pieces::<M>(stream, stream.len().max(1));
    let pieces = read_in_pieces::<M>(stream, piece);
    assert_eq!(whole, pieces, "the pieces changed what was read");
    let blocking = read_blocking::<M>(stream);
    assert_eq!(whole, blocking, "the blocking reader read otherwise");
    for item in &whole.0 {
        match item {
            Ok(msg) => {
                let mut again = encode(msg).expect("a message that was decoded can be encoded");
                let codec = ControlCodec::<M, ()>::new();
                let back = codec
                    .decode_item_eof(&mut again)
                    .expect("one whole frame")
                    .expect("one item");
                assert_eq!(
                    back.as_ref(),
                    Ok(msg),
                    "a message did not survive a round trip"
                );
                assert!(again.is_empty(), "the frame was not consumed whole");
            }
            Err(e) => assert!(!e.is_fatal(), "an item carries a fatal error: {e:?}"),
        }
    }
}

/// Reads `stream` as a `Framed` reader does, `piece` bytes at a time.
fn read_in_pieces<M: Message>(stream: &[u8], piece: usize) -> Reading<M> {
    let codec = ControlCodec::<M, ()>::new();
    let mut buf = BytesMut::new();
    let mut items = Vec::new();
    for chunk in stream.chunks(piece) {
        buf.extend_from_slice(chunk);
        loop {
            match codec.decode_item(&mut buf) {
                Ok(Some(item)) => items.push(item),
                Ok(None) => break,
                Err(e) => return (items, Err(fatal(e))),
            }
        }
    }
    loop {
        match codec.decode_item_eof(&mut buf) {
            Ok(Some(item)) => items.push(item),
            Ok(None) => return (items, Ok(())),
            Err(e) => return (items, Err(fatal(e))),
        }
    }
}

/// Reads `stream` with the blocking reader.
fn read_blocking<M: Message>(stream: &[u8]) -> Reading<M> {
    let mut reader = FrameReader::<_, M>::new(stream);
    let mut items = Vec::new();
    loop {
        match reader.read() {
            Ok(Some(item)) => items.push(item),
            Ok(None) => return (items, Ok(())),
            Err(e) => return (items, Err(fatal(e))),
        }
    }
}

/// A stream error, which must be one that loses the framing.
fn fatal(e: StreamError) -> String {
    match &e {
        StreamError::Codec(c) => assert!(c.is_fatal(), "a stream error is not fatal: {c:?}"),
        StreamError::Io(io) => panic!("reading from memory failed: {io}"),
    }
    e.to_string()
}
