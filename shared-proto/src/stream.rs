//! The codec on a byte stream: [`ControlCodec`], tokio-util's `Decoder` and `Encoder` for
//! `Framed` (cargo feature `tokio-codec`), and [`FrameReader`], the same codec over a
//! blocking [`std::io::Read`].
//!
//! Owns the rules a reader of a stream follows, written once for every runtime: a payload
//! error is an item (`Ok(Err(_))`: its frame is consumed and the stream goes on, so the
//! reader can answer and read on), a framing error or an IO error is the stream's error
//! ([`StreamError`]: close the connection), and bytes left at the end of the stream are
//! [`CodecError::Truncated`]. Splitting and decoding frames is [`crate::codec`]'s; this
//! module opens nothing and owns no socket.

use std::io::Read;
use std::marker::PhantomData;

use bytes::BytesMut;

use crate::codec::{self, CodecError};
use crate::control::{Message, Request, ServerMessage};

/// Why a stream of frames cannot go on.
#[derive(Debug, thiserror::Error)]
pub enum StreamError {
    /// Reading or writing the stream failed (a blocking reader's timeout too: call again).
    #[error(transparent)]
    Io(#[from] std::io::Error),
    /// The framing is lost ([`CodecError::is_fatal`]), or a message could not be encoded.
    #[error(transparent)]
    Codec(#[from] CodecError),
}

/// One decoded frame: the message, or the payload error that cost only this frame.
pub type Item<M> = Result<M, CodecError>;

/// Frames `In` messages in, `Out` messages out. It holds no state: the buffer is the
/// caller's (`Framed`'s, or [`FrameReader`]'s).
pub struct ControlCodec<In, Out> {
    // `fn() -> ..`: the codec owns no message, so it is `Send` and `Sync` whatever they are.
    _messages: PhantomData<fn() -> (In, Out)>,
}

/// What a server (synjitsu) speaks: requests in, answers and events out.
pub type ServerCodec = ControlCodec<Request, ServerMessage>;
/// What a client (jitsu-dns) speaks: answers and events in, requests out.
pub type ClientCodec = ControlCodec<ServerMessage, Request>;

impl<In, Out> ControlCodec<In, Out> {
    /// The codec.
    pub fn new() -> Self {
        ControlCodec {
            _messages: PhantomData,
        }
    }
}

impl<In, Out> Default for ControlCodec<In, Out> {
    fn default() -> Self {
        Self::new()
    }
}

impl<In, Out> Clone for ControlCodec<In, Out> {
    fn clone(&self) -> Self {
        Self::new()
    }
}

impl<In, Out> std::fmt::Debug for ControlCodec<In, Out> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ControlCodec")
    }
}

impl<In: Message, Out> ControlCodec<In, Out> {
    /// The next frame off the front of `src`, `Ok(None)` until a whole one is there.
    pub fn decode_item(&self, src: &mut BytesMut) -> Result<Option<Item<In>>, StreamError> {
        match codec::split_frame(src)? {
            Some(payload) => Ok(Some(codec::decode_payload(&payload))),
            None => Ok(None),
        }
    }

    /// The stream has ended: the frames still in `src`, then `Ok(None)`, or
    /// [`CodecError::Truncated`] if it ended inside one.
    pub fn decode_item_eof(&self, src: &mut BytesMut) -> Result<Option<Item<In>>, StreamError> {
        match self.decode_item(src)? {
            Some(item) => Ok(Some(item)),
            None => {
                codec::decode_eof(src)?;
                Ok(None)
            }
        }
    }
}

impl<In, Out: Message> ControlCodec<In, Out> {
    /// Appends `msg` as one frame to `dst`; nothing is written if it cannot be framed.
    pub fn encode_item(&self, msg: &Out, dst: &mut BytesMut) -> Result<(), StreamError> {
        Ok(codec::encode(msg, dst)?)
    }
}

#[cfg(feature = "tokio-codec")]
mod tokio_codec {
    use bytes::BytesMut;
    use tokio_util::codec::{Decoder, Encoder};

    use super::{ControlCodec, Item, StreamError};
    use crate::control::Message;

    impl<In: Message, Out> Decoder for ControlCodec<In, Out> {
        type Item = Item<In>;
        type Error = StreamError;

        fn decode(&mut self, src: &mut BytesMut) -> Result<Option<Item<In>>, StreamError> {
            self.decode_item(src)
        }

        fn decode_eof(&mut self, src: &mut BytesMut) -> Result<Option<Item<In>>, StreamError> {
            self.decode_item_eof(src)
        }
    }

    impl<In, Out: Message> Encoder<Out> for ControlCodec<In, Out> {
        type Error = StreamError;

        fn encode(&mut self, msg: Out, dst: &mut BytesMut) -> Result<(), StreamError> {
            self.encode_item(&msg, dst)
        }
    }
}

/// Reads `In` messages from a blocking reader with [`ControlCodec`]: for clients without an
/// async runtime. Bytes read stay buffered across calls, so a read timeout loses nothing.
#[derive(Debug)]
pub struct FrameReader<R, In> {
    inner: R,
    buf: BytesMut,
    codec: ControlCodec<In, ()>,
}

impl<R: Read, In: Message> FrameReader<R, In> {
    /// Reads from `inner`.
    pub fn new(inner: R) -> Self {
        FrameReader {
            inner,
            buf: BytesMut::with_capacity(4096),
            codec: ControlCodec::new(),
        }
    }

    /// The next frame, blocking until it is whole; `Ok(None)` once the stream has ended
    /// cleanly. A read timeout is [`StreamError::Io`] (`WouldBlock` or `TimedOut`) and may be
    /// retried; a read interrupted by a signal is retried here; other errors end the stream.
    pub fn read(&mut self) -> Result<Option<Item<In>>, StreamError> {
        let mut chunk = [0u8; 4096];
        loop {
            if let Some(item) = self.codec.decode_item(&mut self.buf)? {
                return Ok(Some(item));
            }
            // A read interrupted by a signal is tried again, as `Read::read_exact` does
            // (a socket with a read timeout is not restarted by the kernel).
            match self.inner.read(&mut chunk) {
                Ok(0) => return self.codec.decode_item_eof(&mut self.buf),
                Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e.into()),
            }
        }
    }

    /// The reader, for writing to the same stream.
    pub fn get_mut(&mut self) -> &mut R {
        &mut self.inner
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::control::{ClientMessage, ErrorCode, Event, PROTOCOL_VERSION, Reply};

    fn requests() -> Vec<Request> {
        vec![
            Request {
                id: 1,
                body: ClientMessage::Hello {
                    version: PROTOCOL_VERSION,
                    client: "test".into(),
                },
            },
            Request {
                id: 2,
                body: ClientMessage::Ready { name: "www".into() },
            },
            Request {
                id: 3,
                body: ClientMessage::Sync { vms: vec![] },
            },
        ]
    }

    fn wire(reqs: &[Request]) -> Vec<u8> {
        let client = ClientCodec::new();
        let mut b = BytesMut::new();
        for r in reqs {
            client.encode_item(r, &mut b).unwrap();
        }
        b.to_vec()
    }

    /// A reader that hands out its bytes `step` at a time, then a read timeout once, then
    /// the rest: the blocking reader must lose nothing across either.
    struct Trickle {
        bytes: Vec<u8>,
        at: usize,
        step: usize,
        timeout_at: Option<usize>,
        /// Where a signal interrupts one read.
        interrupt_at: Option<usize>,
    }

    impl Read for Trickle {
        fn read(&mut self, out: &mut [u8]) -> std::io::Result<usize> {
            if self.interrupt_at.is_some_and(|t| self.at >= t) {
                self.interrupt_at = None;
                return Err(std::io::ErrorKind::Interrupted.into());
            }
            if self.timeout_at.is_some_and(|t| self.at >= t) {
                self.timeout_at = None;
                return Err(std::io::ErrorKind::WouldBlock.into());
            }
            let n = self.step.min(out.len()).min(self.bytes.len() - self.at);
            out[..n].copy_from_slice(&self.bytes[self.at..self.at + n]);
            self.at += n;
            Ok(n)
        }
    }

    #[test]
    fn the_decoder_reassembles_frames_split_at_every_byte() {
        let bytes = wire(&requests());
        let server = ServerCodec::new();
        for cut in 1..bytes.len() {
            let mut src = BytesMut::from(&bytes[..cut]);
            let mut got = Vec::new();
            while let Some(item) = server.decode_item(&mut src).unwrap() {
                got.push(item.unwrap());
            }
            src.extend_from_slice(&bytes[cut..]);
            while let Some(item) = server.decode_item_eof(&mut src).unwrap() {
                got.push(item.unwrap());
            }
            assert_eq!(got, requests(), "split at byte {cut}");
            assert!(src.is_empty());
        }
        // The same through the `Decoder` trait `Framed` calls.
        #[cfg(feature = "tokio-codec")]
        {
            use tokio_util::codec::Decoder;
            let mut server = ServerCodec::new();
            let mut src = BytesMut::new();
            let mut got = Vec::new();
            for b in &bytes {
                src.extend_from_slice(&[*b]);
                while let Some(item) = server.decode(&mut src).unwrap() {
                    got.push(item.unwrap());
                }
            }
            assert_eq!(server.decode_eof(&mut src).unwrap(), None);
            assert_eq!(got, requests());
        }
    }

    #[test]
    fn a_payload_error_is_an_item_and_the_next_frame_follows() {
        let mut src = BytesMut::new();
        codec::encode_payload(br#"{"id":5,"type":"reboot"}"#, &mut src).unwrap();
        src.extend_from_slice(&wire(&requests()[1..2]));
        let server = ServerCodec::new();
        let bad = server.decode_item(&mut src).unwrap().unwrap();
        assert!(matches!(
            bad,
            Err(CodecError::UnknownMessage { id: Some(5), .. })
        ));
        assert_eq!(
            server.decode_item(&mut src).unwrap(),
            Some(Ok(requests()[1].clone()))
        );
    }

    #[test]
    fn framing_errors_end_the_stream() {
        let server = ServerCodec::new();
        let mut src = BytesMut::from(&(u32::MAX.to_be_bytes())[..]);
        assert!(matches!(
            server.decode_item(&mut src),
            Err(StreamError::Codec(CodecError::Oversized { .. }))
        ));
        let bytes = wire(&requests()[..1]);
        let mut src = BytesMut::from(&bytes[..bytes.len() - 1]);
        assert!(matches!(
            server.decode_item_eof(&mut src),
            Err(StreamError::Codec(CodecError::Truncated { .. }))
        ));
    }

    #[test]
    fn encoding_refuses_an_oversized_message_and_writes_nothing() {
        let server = ServerCodec::new();
        let mut dst = BytesMut::new();
        let huge = ServerMessage::Error {
            id: 1,
            code: ErrorCode::Failed,
            message: "x".repeat(codec::MAX_FRAME_LEN),
        };
        assert!(matches!(
            server.encode_item(&huge, &mut dst),
            Err(StreamError::Codec(CodecError::Oversized { .. }))
        ));
        assert!(dst.is_empty());
    }

    #[test]
    fn the_blocking_reader_survives_short_reads_and_a_timeout() {
        let bytes = wire(&requests());
        for step in [1, 3, 7, 4096] {
            let mut r = FrameReader::<_, Request>::new(Trickle {
                bytes: bytes.clone(),
                at: 0,
                step,
                timeout_at: Some(bytes.len() / 2),
                interrupt_at: None,
            });
            let mut got = Vec::new();
            let mut timeouts = 0;
            loop {
                match r.read() {
                    Ok(Some(item)) => got.push(item.unwrap()),
                    Ok(None) => break,
                    Err(StreamError::Io(e)) if e.kind() == std::io::ErrorKind::WouldBlock => {
                        timeouts += 1
                    }
                    Err(e) => panic!("{e}"),
                }
            }
            assert_eq!((got, timeouts), (requests(), 1), "step {step}");
        }
    }

    #[test]
    fn the_blocking_reader_reads_again_after_a_signal_interrupted_a_read() {
        let bytes = wire(&requests());
        let mut r = FrameReader::<_, Request>::new(Trickle {
            bytes: bytes.clone(),
            at: 0,
            step: 5,
            timeout_at: None,
            interrupt_at: Some(bytes.len() / 3),
        });
        let mut got = Vec::new();
        while let Some(item) = r.read().expect("an interrupted read is not an error") {
            got.push(item.unwrap());
        }
        assert_eq!(got, requests());
    }

    #[test]
    fn the_blocking_reader_reports_a_truncated_end() {
        let bytes = wire(&requests()[..1]);
        let mut r = FrameReader::<_, Request>::new(&bytes[..bytes.len() - 2]);
        assert!(matches!(
            r.read(),
            Err(StreamError::Codec(CodecError::Truncated { .. }))
        ));
    }

    #[test]
    fn server_messages_go_out_and_come_back() {
        let msgs = vec![
            ServerMessage::Ok {
                id: 1,
                reply: Reply::Ack,
            },
            ServerMessage::Event {
                event: Event::WakeRequest { name: "www".into() },
            },
        ];
        let mut b = BytesMut::new();
        for m in &msgs {
            ServerCodec::new().encode_item(m, &mut b).unwrap();
        }
        let mut r = FrameReader::<_, ServerMessage>::new(&b[..]);
        assert_eq!(r.read().unwrap(), Some(Ok(msgs[0].clone())));
        assert_eq!(r.read().unwrap(), Some(Ok(msgs[1].clone())));
        assert_eq!(r.read().unwrap(), None);
    }
}
