//! The contract between `jitsu-dns` and `synjitsu`, usable by any third party.
//!
//! This crate owns the vocabulary both daemons share: the [`Mac`] type and the VM identity
//! jitsu-dns hands to synjitsu ([`vm`]), the control messages ([`control`]) and their framing
//! ([`codec`]), the Xenstore layout of a held SYN as the original Synjitsu and its patched
//! MirageOS TCP stack read it ([`xenstore`]), and the Xenstore wire protocol ([`xs_wire`]).
//!
//! It does no IO: no tokio, no sockets, no clock. Everything here turns bytes into values and
//! values into bytes, so it can be tested on static inputs and reused from any runtime.

pub mod codec;
pub mod control;
pub mod mac;
pub mod vm;
pub mod xenstore;
pub mod xs_wire;

pub use codec::{CodecError, MAX_FRAME_LEN};
pub use control::{
    ClientMessage, ErrorCode, Event, HandoverVia, PROTOCOL_VERSION, Phase, Reply, Request,
    ServerMessage, VmStatus,
};
pub use mac::{Mac, MacParseError};
pub use vm::{Handover, VmIdentity};
