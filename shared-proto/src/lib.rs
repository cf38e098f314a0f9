//! The contract between `jitsu-dns` and `synjitsu`, usable by any third party.
//!
//! This crate owns the vocabulary both daemons share: the [`Mac`] type and the VM identity
//! jitsu-dns hands to synjitsu ([`vm`]), the control messages ([`control`]), their framing
//! ([`codec`]) and the codec on a stream ([`stream`]). What only one daemon uses lives with
//! it: the Xenstore layout of a held SYN and the Xenstore wire protocol are synjitsu's
//! (`synjitsu::store`).
//!
//! It opens no socket and reads no clock. Everything here turns bytes into values and values
//! into bytes, so it can be tested on static inputs and reused from any runtime: with the
//! cargo feature `tokio-codec` the codec is a tokio-util `Decoder`/`Encoder` for `Framed`;
//! without it (no tokio at all), [`stream::FrameReader`] reads frames from any blocking
//! `std::io::Read`.

pub mod codec;
pub mod control;
pub mod mac;
pub mod stream;
pub mod vm;

pub use codec::{CodecError, MAX_FRAME_LEN};
pub use control::{
    ClientMessage, ErrorCode, Event, HandoverVia, PROTOCOL_VERSION, Phase, Reply, Request,
    ServerMessage, VmStatus,
};
pub use mac::{Mac, MacParseError};
pub use stream::{ClientCodec, ControlCodec, FrameReader, ServerCodec, StreamError};
pub use vm::{Handover, VmIdentity};
