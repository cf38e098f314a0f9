//! The control socket: a Unix-socket server speaking `shared_proto` to jitsu-dns.
//!
//! Owns the socket (its file and the peer check are `shared_io::unix`'s: mode 0600, a stale
//! one removed, a live one refused, `SO_PEERCRED`: root or the one uid allowed), who is connected
//! ([`Connections`]), and each session's rules ([`Session`]): hello first with a version
//! check, every request answered by exactly one ok or error, events pushed only after the
//! hello. A payload error gets an error reply and the session goes on; a framing error gets
//! one and the connection is closed. Neither touches what the core holds: requests reach the
//! core only once decoded and valid.
//!
//! Nothing that connects can lock jitsu-dns out, neither idle sockets nor a client that said
//! hello and went silent (a stuck process, a half-open connection), since one jitsu-dns per
//! host is the deployment rule and its restarted successor must always get in:
//! - a connection that has not said hello within [`HELLO_TIMEOUT`] is told so and closed;
//! - at most [`MAX_CONNECTIONS`] are open; a new one past that closes the oldest that has
//!   not said hello (there always is one: only one connection is attached at a time);
//! - one client is attached at a time, and the newest wins: a hello while another client is
//!   attached takes over; the old connection gets an error (`replaced`) and is closed, and
//!   the take-over is logged at warn with both peers' pids. jitsu-dns waits before it
//!   reconnects after being replaced, so two of them run by mistake take turns slowly and
//!   loudly instead of fighting.
//!
//! The new client sends a `Sync` after its hello, so what the old one said is replaced.
//! What requests do is the core's ([`crate::hold`]); the daemon's loop passes them on.

use std::collections::{HashMap, VecDeque};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use shared_io::unix::{Peer, PeerError, PrivateSocket, SocketError, check_peer};
use shared_proto::codec::CodecError;
use shared_proto::{
    ClientMessage, ErrorCode, PROTOCOL_VERSION, Reply, Request, ServerCodec, ServerMessage,
    StreamError,
};
use tokio::net::UnixStream;
use tokio::sync::mpsc;
use tokio_util::codec::{FramedRead, FramedWrite};
use tokio_util::sync::CancellationToken;

/// Messages queued for one client at most; a client that reads slower is disconnected
/// (it reconnects and sends a `Sync`).
pub const MAX_OUTGOING: usize = 4096;
/// Connections open at most (attached or not); a new one past this closes the oldest that
/// has not said hello.
pub const MAX_CONNECTIONS: usize = 8;
/// A connection that has not said hello this long after it was accepted is closed. Clients
/// send their hello as soon as they connect: this is scheduling slack on a loaded host.
pub const HELLO_TIMEOUT: Duration = Duration::from_secs(2);

// With one attached connection at most, a full table always holds one to make room with.
const _: () = assert!(MAX_CONNECTIONS >= 2);

/// Who is connected, without IO: the connections that have not said hello, oldest first,
/// and the one attached. Bounded by [`MAX_CONNECTIONS`].
#[derive(Debug, Default)]
pub struct Connections {
    waiting: VecDeque<u64>,
    attached: Option<u64>,
}

impl Connections {
    /// Connections open now.
    pub fn len(&self) -> usize {
        self.waiting.len() + usize::from(self.attached.is_some())
    }

    /// True if none is open.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The connection attached now.
    pub fn attached(&self) -> Option<u64> {
        self.attached
    }

    /// Takes a new connection `conn`; returns the one closed to make room for it, if the
    /// table was full: the oldest that has not said hello.
    pub fn admit(&mut self, conn: u64) -> Option<u64> {
        let evicted = if self.len() >= MAX_CONNECTIONS {
            self.waiting.pop_front()
        } else {
            None
        };
        self.waiting.push_back(conn);
        evicted
    }

    /// `conn` said hello: it is attached; returns the connection it replaces, if another was.
    pub fn attach(&mut self, conn: u64) -> Option<u64> {
        self.waiting.retain(|c| *c != conn);
        self.attached.replace(conn).filter(|old| *old != conn)
    }

    /// `conn` is gone; true if it was the attached one.
    pub fn remove(&mut self, conn: u64) -> bool {
        self.waiting.retain(|c| *c != conn);
        if self.attached == Some(conn) {
            self.attached = None;
            true
        } else {
            false
        }
    }
}

/// How the server reaches a connection's task: its outgoing queue, what closes it, and its
/// peer's pid (for logs).
#[derive(Debug)]
struct Handle {
    tx: mpsc::Sender<ServerMessage>,
    close: CancellationToken,
    pid: Option<i32>,
}

/// What the accept loop and the connections' tasks share.
#[derive(Debug, Default)]
struct Shared {
    book: Connections,
    handles: HashMap<u64, Handle>,
}

impl Shared {
    /// Tells connection `conn` why (an error with `code`) and closes it; its peer's pid.
    fn close(&mut self, conn: u64, code: ErrorCode, why: String) -> Option<i32> {
        let h = self.handles.remove(&conn)?;
        // Queued before the close: the connection's writer sends what is queued, then closes.
        let _ = h.tx.try_send(error(0, code, why));
        h.close.cancel();
        h.pid
    }
}

fn lock(shared: &Mutex<Shared>) -> std::sync::MutexGuard<'_, Shared> {
    // A panic while holding the lock leaves bookkeeping that is still consistent enough to
    // close connections with.
    shared
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// What the server tells the daemon's loop.
#[derive(Debug)]
pub enum ControlIn {
    /// A client said hello: push events and answers to `tx`; cancel `close` to drop it.
    Attached {
        /// The connection.
        conn: u64,
        /// Its outgoing queue.
        tx: mpsc::Sender<ServerMessage>,
        /// Closes it.
        close: CancellationToken,
    },
    /// A valid request from an attached client.
    Request {
        /// The connection.
        conn: u64,
        /// The request.
        req: Request,
    },
    /// The connection is gone.
    Detached {
        /// The connection.
        conn: u64,
    },
}

/// What a session does with one incoming frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Answer, and read on.
    Reply(ServerMessage),
    /// Answer the hello and attach the connection to the daemon.
    Attach(ServerMessage),
    /// Pass the request to the core.
    Forward(Request),
    /// Answer (if anything) and close the connection.
    Close(Option<ServerMessage>),
}

/// The rules of one session, without IO.
#[derive(Debug, Default)]
pub struct Session {
    helloed: bool,
}

fn error(id: u64, code: ErrorCode, message: impl Into<String>) -> ServerMessage {
    ServerMessage::Error {
        id,
        code,
        message: message.into(),
    }
}

impl Session {
    /// Decides what to do with one decoded (or undecodable) frame.
    pub fn on_frame(&mut self, decoded: Result<Request, CodecError>) -> Action {
        let req = match decoded {
            Ok(r) => r,
            Err(e) if e.is_fatal() => {
                return Action::Close(Some(error(
                    0,
                    ErrorCode::Malformed,
                    format!("{e}; closing"),
                )));
            }
            Err(e) => {
                let code = match e {
                    CodecError::UnknownMessage { .. } => ErrorCode::UnknownMessage,
                    _ => ErrorCode::Malformed,
                };
                return Action::Reply(error(e.request_id().unwrap_or(0), code, e.to_string()));
            }
        };
        match (&req.body, self.helloed) {
            (ClientMessage::Hello { version, client }, _) => {
                if *version != PROTOCOL_VERSION {
                    return Action::Close(Some(error(
                        req.id,
                        ErrorCode::VersionMismatch,
                        format!(
                            "client {client:?} speaks version {version}, synjitsu speaks {PROTOCOL_VERSION}"
                        ),
                    )));
                }
                let ok = ServerMessage::Ok {
                    id: req.id,
                    reply: Reply::Hello {
                        version: PROTOCOL_VERSION,
                        server: format!("synjitsu {}", env!("CARGO_PKG_VERSION")),
                    },
                };
                if std::mem::replace(&mut self.helloed, true) {
                    Action::Reply(ok)
                } else {
                    Action::Attach(ok)
                }
            }
            (_, false) => Action::Reply(error(
                req.id,
                ErrorCode::HelloFirst,
                format!("{} before hello", req.body.kind()),
            )),
            (_, true) => Action::Forward(req),
        }
    }
}

/// The bound control socket (`shared_io::unix`: mode 0600, removed on drop).
#[derive(Debug)]
pub struct ControlServer {
    socket: PrivateSocket,
}

impl ControlServer {
    /// Binds `path` with mode 0600 (parent directories created as needed), owned by root,
    /// or by `owner` (the `--allow-uid`) so that this one user can connect at all.
    pub fn bind(path: &Path, owner: Option<u32>) -> Result<ControlServer, SocketError> {
        Ok(ControlServer {
            socket: PrivateSocket::bind(path, owner)?,
        })
    }

    /// Accepts clients until `cancel`; requests and attachments go to `to_core`.
    pub async fn run(
        &self,
        allow_uid: Option<u32>,
        to_core: mpsc::Sender<ControlIn>,
        cancel: CancellationToken,
    ) {
        let mut next_conn = 0u64;
        let shared = Arc::new(Mutex::new(Shared::default()));
        loop {
            let stream = tokio::select! {
                _ = cancel.cancelled() => return,
                r = self.socket.listener().accept() => match r {
                    Ok((s, _)) => s,
                    Err(e) => {
                        tracing::warn!(error = %e, "control socket accept failed");
                        continue;
                    }
                },
            };
            next_conn += 1;
            let conn = next_conn;
            let Peer { uid, pid } = match check_peer(&stream, allow_uid) {
                Ok(p) => p,
                Err(PeerError::NoCredentials(e)) => {
                    tracing::warn!(error = %e, "no peer credentials; refusing");
                    continue;
                }
                Err(e @ PeerError::Refused { uid, .. }) => {
                    tracing::warn!(uid, "control client refused: not root nor the allowed uid");
                    refuse(stream, e.to_string()).await;
                    continue;
                }
            };
            let (out_tx, out_rx) = mpsc::channel::<ServerMessage>(MAX_OUTGOING);
            let close = cancel.child_token();
            {
                let mut sh = lock(&shared);
                if let Some(old) = sh.book.admit(conn) {
                    let old_pid = sh.close(
                        old,
                        ErrorCode::Failed,
                        format!(
                            "too many connections: this one, the oldest without a hello, is closed for a new one (at most {MAX_CONNECTIONS})"
                        ),
                    );
                    tracing::warn!(conn = old, pid = ?old_pid, new_conn = conn, "control connection closed: too many connections, and it had not said hello");
                }
                sh.handles.insert(
                    conn,
                    Handle {
                        tx: out_tx.clone(),
                        close: close.clone(),
                        pid,
                    },
                );
            }
            tracing::info!(conn, uid, pid = ?pid, "control client connected");
            let conn_io = Conn {
                id: conn,
                stream,
                out_tx,
                out_rx,
                close,
            };
            tokio::spawn(serve(conn_io, to_core.clone(), shared.clone()));
        }
    }
}

async fn refuse(stream: UnixStream, message: String) {
    let mut out = FramedWrite::new(stream, ServerCodec::new());
    // The client may be gone already; a refusal needs no answer.
    let _ = out.send(error(0, ErrorCode::Failed, message)).await;
    let _ = out.close().await;
}

/// One accepted connection and what its task needs.
struct Conn {
    id: u64,
    stream: UnixStream,
    out_tx: mpsc::Sender<ServerMessage>,
    out_rx: mpsc::Receiver<ServerMessage>,
    close: CancellationToken,
}

async fn serve(c: Conn, to_core: mpsc::Sender<ControlIn>, shared: Arc<Mutex<Shared>>) {
    let Conn {
        id: conn,
        stream,
        out_tx,
        mut out_rx,
        close,
    } = c;
    let mut attached = false;
    let (rd, wr) = stream.into_split();
    let mut frames = FramedRead::new(rd, ServerCodec::new());
    let writer_close = close.clone();
    let writer = tokio::spawn(async move {
        let mut out = FramedWrite::new(wr, ServerCodec::new());
        loop {
            let msg = tokio::select! {
                m = out_rx.recv() => m,
                _ = writer_close.cancelled() => None,
            };
            let Some(msg) = msg else { break };
            if out.send(msg).await.is_err() {
                break;
            }
        }
        // Whatever is still queued (a final error) goes out before the close.
        while let Ok(msg) = out_rx.try_recv() {
            if out.send(msg).await.is_err() {
                break;
            }
        }
        let _ = out.close().await;
    });
    let hello_by = tokio::time::Instant::now() + HELLO_TIMEOUT;
    let mut session = Session::default();
    loop {
        let next = tokio::select! {
            biased;
            _ = close.cancelled() => break,
            () = tokio::time::sleep_until(hello_by), if !attached => {
                tracing::warn!(conn, "control connection closed: no hello within {HELLO_TIMEOUT:?}");
                let _ = out_tx.try_send(error(
                    0,
                    ErrorCode::Failed,
                    format!("no hello within {HELLO_TIMEOUT:?}; closing"),
                ));
                break;
            }
            next = frames.next() => next,
        };
        let decoded = match next {
            None => break,
            Some(Ok(item)) => item,
            Some(Err(StreamError::Codec(e @ CodecError::Truncated { .. }))) => {
                tracing::debug!(conn, error = %e, "control client left mid-frame");
                break;
            }
            // The framing is lost: the session answers with an error and closes.
            Some(Err(StreamError::Codec(e))) => Err(e),
            Some(Err(StreamError::Io(e))) => {
                tracing::debug!(conn, error = %e, "control read failed");
                break;
            }
        };
        let queued = match session.on_frame(decoded) {
            Action::Reply(m) => out_tx.try_send(m).is_ok(),
            Action::Attach(m) => {
                attached = true;
                take_over(&shared, conn);
                out_tx.try_send(m).is_ok()
                    && to_core
                        .send(ControlIn::Attached {
                            conn,
                            tx: out_tx.clone(),
                            close: close.clone(),
                        })
                        .await
                        .is_ok()
            }
            Action::Forward(req) => to_core.send(ControlIn::Request { conn, req }).await.is_ok(),
            Action::Close(m) => {
                if let Some(m) = m {
                    let _ = out_tx.try_send(m);
                }
                break;
            }
        };
        if !queued {
            tracing::warn!(conn, "control client not keeping up; closing");
            break;
        }
    }
    {
        let mut sh = lock(&shared);
        sh.book.remove(conn);
        sh.handles.remove(&conn);
    }
    if attached {
        // The daemon ignores this if another connection has taken over meanwhile.
        let _ = to_core.send(ControlIn::Detached { conn }).await;
    }
    drop(out_tx);
    close.cancel();
    let _ = writer.await;
    tracing::info!(conn, "control client disconnected");
}

/// Attaches `conn`, closing the connection it replaces (telling it why).
fn take_over(shared: &Mutex<Shared>, conn: u64) {
    let mut sh = lock(shared);
    let Some(old) = sh.book.attach(conn) else {
        return;
    };
    let new_pid = sh.handles.get(&conn).and_then(|h| h.pid);
    let old_pid = sh.close(
        old,
        ErrorCode::Replaced,
        format!(
            "replaced by a newer client (connection {conn}, pid {}): synjitsu serves one client at a time",
            new_pid.map_or_else(|| "unknown".into(), |p| p.to_string())
        ),
    );
    tracing::warn!(
        old_conn = old,
        old_pid = ?old_pid,
        conn,
        pid = ?new_pid,
        "control client replaced by a newer one that said hello (one jitsu-dns per host: is a second one running?)"
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::BytesMut;
    use shared_proto::codec;
    use shared_proto::{ClientCodec, Handover};
    use tokio::io::AsyncWriteExt;
    use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};

    fn req(id: u64, body: ClientMessage) -> Result<Request, CodecError> {
        Ok(Request { id, body })
    }

    fn hello(version: u32) -> ClientMessage {
        ClientMessage::Hello {
            version,
            client: "test".into(),
        }
    }

    #[test]
    fn hello_first_then_forward() {
        let mut s = Session::default();
        let ready = ClientMessage::Ready { name: "www".into() };
        let Action::Reply(ServerMessage::Error { id: 1, code, .. }) =
            s.on_frame(req(1, ready.clone()))
        else {
            panic!()
        };
        assert_eq!(code, ErrorCode::HelloFirst);
        assert!(matches!(
            s.on_frame(req(2, hello(PROTOCOL_VERSION))),
            Action::Attach(ServerMessage::Ok { id: 2, .. })
        ));
        assert_eq!(
            s.on_frame(req(3, ready.clone())),
            Action::Forward(Request { id: 3, body: ready })
        );
        // A second hello is answered but does not attach twice.
        assert!(matches!(
            s.on_frame(req(4, hello(PROTOCOL_VERSION))),
            Action::Reply(ServerMessage::Ok { id: 4, .. })
        ));
    }

    #[test]
    fn a_wrong_version_closes_with_an_error() {
        let mut s = Session::default();
        let Action::Close(Some(ServerMessage::Error { id: 1, code, .. })) =
            s.on_frame(req(1, hello(PROTOCOL_VERSION + 1)))
        else {
            panic!()
        };
        assert_eq!(code, ErrorCode::VersionMismatch);
    }

    #[test]
    fn payload_errors_are_answered_framing_errors_close() {
        let mut s = Session::default();
        s.on_frame(req(1, hello(PROTOCOL_VERSION)));
        for (payload, code) in [
            (&b"{nope"[..], ErrorCode::Malformed),
            (br#"{"id":7,"type":"reboot"}"#, ErrorCode::UnknownMessage),
            (br#"{"id":8,"type":"ready","name":"../x"}"#, ErrorCode::Malformed),
            (
                br#"{"id":9,"type":"booting","vm":{"name":"w","mac":"ff:ff:ff:ff:ff:ff","ipv4":"10.0.0.1","handover":{"via":"wire"}}}"#,
                ErrorCode::Malformed,
            ),
        ] {
            let a = s.on_frame(codec::decode_payload::<Request>(payload));
            let Action::Reply(ServerMessage::Error { code: c, .. }) = a else {
                panic!("{payload:?}: {a:?}")
            };
            assert_eq!(c, code, "{}", String::from_utf8_lossy(payload));
        }
        let fatal = CodecError::Oversized {
            len: usize::MAX,
            max: 1,
        };
        assert!(matches!(s.on_frame(Err(fatal)), Action::Close(Some(_))));
        // The session would still forward a good request (the connection decides to close).
        let booting = ClientMessage::Booting {
            vm: shared_proto::VmIdentity {
                name: "w".into(),
                mac: "02:00:00:00:00:01".parse().unwrap(),
                ipv4: "10.0.0.1".parse().unwrap(),
                ipv6: None,
                handover: Handover::Wire,
                port: None,
                announces_listening: false,
            },
        };
        assert!(matches!(s.on_frame(req(10, booting)), Action::Forward(_)));
    }

    #[test]
    fn a_full_table_makes_room_by_closing_the_oldest_silent_connection() {
        let mut c = Connections::default();
        for conn in 1..=MAX_CONNECTIONS as u64 {
            assert_eq!(c.admit(conn), None);
        }
        assert_eq!(c.attach(3), None);
        assert_eq!(c.admit(100), Some(1), "the oldest without a hello");
        assert_eq!(c.admit(101), Some(2));
        // The attached one is never the one closed for room.
        assert_eq!(c.admit(102), Some(4));
        assert_eq!(c.len(), MAX_CONNECTIONS);
        assert_eq!(c.attached(), Some(3));
    }

    #[test]
    fn the_newest_hello_takes_over_and_a_gone_connection_frees_its_place() {
        let mut c = Connections::default();
        c.admit(1);
        c.admit(2);
        assert_eq!(c.attach(1), None);
        assert_eq!(c.attach(1), None, "a second hello on the same connection");
        assert_eq!(c.attach(2), Some(1));
        // The replaced one is no longer counted; its task's removal is harmless.
        assert_eq!(c.len(), 1);
        assert!(!c.remove(1));
        assert!(c.remove(2));
        assert!(c.is_empty() && c.attached().is_none());
    }

    /// A client's two halves: frames in, raw bytes out.
    struct Client {
        rd: FramedRead<OwnedReadHalf, ClientCodec>,
        wr: OwnedWriteHalf,
    }

    async fn connect(path: &Path) -> Client {
        let (rd, wr) = UnixStream::connect(path).await.unwrap().into_split();
        Client {
            rd: FramedRead::new(rd, ClientCodec::new()),
            wr,
        }
    }

    async fn frame(c: &mut Client, payload: &[u8]) {
        let mut b = BytesMut::new();
        codec::encode_payload(payload, &mut b).unwrap();
        c.wr.write_all(&b).await.unwrap();
    }

    async fn read_msg(c: &mut Client) -> Option<ServerMessage> {
        c.rd.next().await.map(|item| item.unwrap().unwrap())
    }

    #[tokio::test(flavor = "current_thread")]
    async fn the_server_speaks_the_protocol_and_the_newest_client_wins() {
        let dir = std::env::temp_dir().join(format!("syj-ctl-{}", std::process::id()));
        let path = dir.join("sub").join("synjitsu.sock");
        let server = ControlServer::bind(&path, None).unwrap();
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        assert!(matches!(
            ControlServer::bind(&path, None),
            Err(SocketError::InUse(_))
        ));
        let (tx, mut rx) = mpsc::channel(16);
        let cancel = CancellationToken::new();
        let c2 = cancel.clone();
        let run = tokio::spawn(async move {
            server.run(None, tx, c2).await;
            drop(server);
        });
        let mut a = connect(&path).await;
        frame(
            &mut a,
            br#"{"id":1,"type":"hello","version":1,"client":"t"}"#,
        )
        .await;
        let first = read_msg(&mut a).await;
        assert!(
            matches!(first, Some(ServerMessage::Ok { id: 1, .. })),
            "{first:?}"
        );
        let Some(ControlIn::Attached { tx: out, .. }) = rx.recv().await else {
            panic!()
        };
        frame(&mut a, br#"{"id":2,"type":"ready","name":"www"}"#).await;
        let Some(ControlIn::Request { req, .. }) = rx.recv().await else {
            panic!()
        };
        assert_eq!(req.id, 2);
        out.send(ServerMessage::Ok {
            id: 2,
            reply: Reply::Ack,
        })
        .await
        .unwrap();
        assert!(matches!(
            read_msg(&mut a).await,
            Some(ServerMessage::Ok { id: 2, .. })
        ));
        // A second client's hello takes over: the first is told why and closed.
        let mut b = connect(&path).await;
        frame(
            &mut b,
            br#"{"id":1,"type":"hello","version":1,"client":"t2"}"#,
        )
        .await;
        assert!(matches!(
            read_msg(&mut b).await,
            Some(ServerMessage::Ok { id: 1, .. })
        ));
        let Some(ServerMessage::Error { code, message, .. }) = read_msg(&mut a).await else {
            panic!()
        };
        assert_eq!(code, ErrorCode::Replaced);
        assert!(message.contains("replaced"), "{message}");
        assert!(read_msg(&mut a).await.is_none(), "and closed");
        let Some(ControlIn::Attached { conn: b_conn, .. }) = rx.recv().await else {
            panic!()
        };
        assert!(matches!(rx.recv().await, Some(ControlIn::Detached { conn }) if conn != b_conn));
        let mut a = b;
        // A framing error: an error frame, then the connection closes.
        a.wr.write_all(&u32::MAX.to_be_bytes()).await.unwrap();
        assert!(matches!(
            read_msg(&mut a).await,
            Some(ServerMessage::Error { id: 0, .. })
        ));
        assert!(read_msg(&mut a).await.is_none());
        assert!(matches!(rx.recv().await, Some(ControlIn::Detached { .. })));
        cancel.cancel();
        run.await.unwrap();
        assert!(!path.exists(), "socket removed");
        let _ = std::fs::remove_dir_all(dir);
    }
}
