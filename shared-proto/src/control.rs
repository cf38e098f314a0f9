//! The control messages between jitsu-dns (the client) and synjitsu (the server).
//!
//! Owns the message types, their JSON form and the rules a message must meet beyond its type
//! (see [`Message::validate`]). Framing is [`crate::codec`]'s; sockets belong to the daemons.
//!
//! A session: the client connects and sends [`ClientMessage::Hello`] with
//! [`PROTOCOL_VERSION`]; the server answers [`Reply::Hello`] or an [`ErrorCode::VersionMismatch`]
//! error. The client then sends a full [`ClientMessage::Sync`], after every (re)connect, and
//! then [`ClientMessage::Booting`], [`ClientMessage::Ready`], [`ClientMessage::Stopped`] as VMs
//! change. Every request carries an `id` chosen by the client (1 and up) and is answered by
//! exactly one [`ServerMessage::Ok`] or [`ServerMessage::Error`] with that id; id 0 marks an
//! error about a request whose id could not be read. [`ServerMessage::Event`]s arrive at any
//! time, unsolicited.
//!
//! On the wire (one frame each, see [`crate::codec`]):
//! ```text
//! {"id":1,"type":"hello","version":1,"client":"jitsu-dns 0.1.0"}
//! {"type":"ok","id":1,"reply":{"type":"hello","version":1,"server":"synjitsu 0.1.0"}}
//! {"id":2,"type":"booting","vm":{"name":"www","mac":"00:16:3e:00:00:01","ipv4":"10.0.0.1","handover":{"via":"wire"}}}
//! {"type":"ok","id":2,"reply":{"type":"ack"}}
//! {"type":"event","event":{"type":"syn_held","name":"www","held":1}}
//! ```
//!
//! The guest's bridge port ([`crate::VmIdentity::port`]) goes with the VM when the backend
//! names it before the start (the process backend's veth); libvirt names it only once the
//! domain runs, so jitsu-dns then sends [`ClientMessage::Port`], which changes nothing else
//! (a second `Booting` would be a new boot, and stand in again for a guest that may have
//! announced itself meanwhile):
//! ```text
//! {"id":3,"type":"port","name":"www","port":"vnet3"}
//! ```
//! `port` in a VM is optional and left out when unknown, so a client that never knows it
//! sends what it sent before the field existed. A server from before it refuses a `vm` that
//! has one (every object refuses unknown fields) and answers `port` with `unknown_message`:
//! upgrade synjitsu before jitsu-dns.
//!
//! A VM may carry the guest's promise that it announces itself only once it listens
//! ([`crate::VmIdentity::announces_listening`]): synjitsu then re-sends its held SYNs at its
//! announcement instead of probing its ports first. Left out when false, with the same rule
//! for old servers as `port`:
//! ```text
//! {"id":4,"type":"booting","vm":{"name":"uk","mac":"02:00:00:00:00:05","ipv4":"10.0.0.5","handover":{"via":"wire"},"announces_listening":true}}
//! ```
//!
//! The server serves one client at a time, the newest: a hello while another client is
//! attached takes over, and the old connection gets an [`ErrorCode::Replaced`] error (id 0)
//! before it is closed. A connection that has said no hello within a short time is closed.

use serde::{Deserialize, Serialize};

use crate::VmIdentity;
use crate::vm::{VmError, check_name, check_port};

/// The protocol version this crate speaks; a server refuses a hello with another.
pub const PROTOCOL_VERSION: u32 = 1;

/// Something the codec can frame: a JSON object tagged by `type`.
pub trait Message: Serialize + serde::de::DeserializeOwned {
    /// Every `type` tag this message can carry: anything else is an unknown message.
    const KINDS: &'static [&'static str];
    /// Checks what the types cannot express; called on every decode.
    fn validate(&self) -> Result<(), VmError> {
        Ok(())
    }
}

/// A request from jitsu-dns to synjitsu.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Request {
    /// Chosen by the client, echoed in the answer; 1 and up.
    pub id: u64,
    /// What is asked.
    #[serde(flatten)]
    pub body: ClientMessage,
}

/// What jitsu-dns can ask of synjitsu.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum ClientMessage {
    /// First message of a session.
    Hello {
        /// [`PROTOCOL_VERSION`] of the client.
        version: u32,
        /// Free text naming the client, for logs.
        client: String,
    },
    /// The VM is booting: stand in for it on the bridge and hold its SYNs.
    Booting {
        /// The VM.
        vm: VmIdentity,
    },
    /// The VM answers on its own (jitsu-dns knows): hand over what is held now.
    Ready {
        /// The VM's name, as in its [`VmIdentity`].
        name: String,
    },
    /// The guest's host-side bridge port, learnt once the backend started it: its
    /// announcement counts only from there, and frames for it go out there while it is
    /// stood in for. Nothing else about the VM changes.
    Port {
        /// The VM's name, as in its [`VmIdentity`].
        name: String,
        /// The port, as [`VmIdentity::port`].
        port: String,
    },
    /// The VM is known but off: hold SYNs for it and ask for a wake-up.
    Stopped {
        /// The VM.
        vm: VmIdentity,
    },
    /// Everything synjitsu should know, replacing what it knew; sent after every connect.
    /// VMs absent from it are forgotten.
    Sync {
        /// Every VM jitsu-dns manages.
        vms: Vec<VmStatus>,
    },
}

/// One VM in a [`ClientMessage::Sync`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmStatus {
    /// The VM.
    pub vm: VmIdentity,
    /// What jitsu-dns believes it is doing.
    pub phase: Phase,
}

/// A VM's lifecycle as far as synjitsu cares.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    /// Being started: stand in for it.
    Booting,
    /// Up and answering: do not intercept.
    Running,
    /// Off: hold SYNs and ask for a wake-up.
    Stopped,
}

/// A message from synjitsu to jitsu-dns.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum ServerMessage {
    /// The request `id` was done.
    Ok {
        /// The request's id.
        id: u64,
        /// The answer.
        reply: Reply,
    },
    /// The request `id` was refused (0: the request could not be read far enough).
    Error {
        /// The request's id, or 0.
        id: u64,
        /// Machine-readable reason.
        code: ErrorCode,
        /// Human-readable detail.
        message: String,
    },
    /// Something happened on the bridge.
    Event {
        /// What.
        event: Event,
    },
}

/// The answer to a successful request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum Reply {
    /// Answer to [`ClientMessage::Hello`].
    Hello {
        /// [`PROTOCOL_VERSION`] of the server.
        version: u32,
        /// Free text naming the server, for logs.
        server: String,
    },
    /// Done.
    Ack,
}

/// Why a request was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// The hello's version is not the server's.
    VersionMismatch,
    /// A request came before the hello.
    HelloFirst,
    /// The request names a VM the server does not know.
    UnknownVm,
    /// The request is well-formed JSON but not a valid message.
    Malformed,
    /// The request's `type` is not one this version knows.
    UnknownMessage,
    /// The server could not do what was asked (detail in the message).
    Failed,
    /// Another client said hello and took this connection's place (the server serves one
    /// client at a time); the connection is closed after this error. Sent with id 0.
    Replaced,
}

/// What synjitsu reports without being asked.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum Event {
    /// The guest sent its own gratuitous ARP or unsolicited NA: it is on the bridge.
    GuestAnnounced {
        /// The VM.
        name: String,
    },
    /// A client SYN for the VM is now held: sent for the first SYN held, then at most every
    /// 100 ms while more come (a flood is not an event per SYN).
    SynHeld {
        /// The VM.
        name: String,
        /// SYNs held for it now, this one included.
        held: u32,
    },
    /// Held SYNs were given to the guest.
    Handover {
        /// The VM.
        name: String,
        /// How many.
        count: u32,
        /// Which way.
        via: HandoverVia,
    },
    /// A SYN or ARP request arrived for a VM that is stopped: please boot it.
    WakeRequest {
        /// The VM.
        name: String,
    },
}

/// How a hand-over was done.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum HandoverVia {
    /// Written to Xenstore.
    Xenstore,
    /// Re-sent on the bridge.
    Wire,
}

impl ClientMessage {
    /// The `type` tag of this message.
    pub fn kind(&self) -> &'static str {
        match self {
            ClientMessage::Hello { .. } => "hello",
            ClientMessage::Booting { .. } => "booting",
            ClientMessage::Ready { .. } => "ready",
            ClientMessage::Port { .. } => "port",
            ClientMessage::Stopped { .. } => "stopped",
            ClientMessage::Sync { .. } => "sync",
        }
    }
}

impl Message for Request {
    const KINDS: &'static [&'static str] =
        &["hello", "booting", "ready", "port", "stopped", "sync"];

    fn validate(&self) -> Result<(), VmError> {
        match &self.body {
            ClientMessage::Hello { .. } => Ok(()),
            ClientMessage::Booting { vm } | ClientMessage::Stopped { vm } => vm.validate(),
            ClientMessage::Ready { name } => check_name(name),
            ClientMessage::Port { name, port } => {
                check_name(name).and_then(|()| check_port(name, port))
            }
            ClientMessage::Sync { vms } => vms.iter().try_for_each(|s| s.vm.validate()),
        }
    }
}

impl Message for ServerMessage {
    const KINDS: &'static [&'static str] = &["ok", "error", "event"];

    fn validate(&self) -> Result<(), VmError> {
        match self {
            ServerMessage::Event { event } => match event {
                Event::GuestAnnounced { name }
                | Event::SynHeld { name, .. }
                | Event::Handover { name, .. }
                | Event::WakeRequest { name } => check_name(name),
            },
            ServerMessage::Ok { .. } | ServerMessage::Error { .. } => Ok(()),
        }
    }
}
