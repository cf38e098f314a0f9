//! The client of synjitsu's control socket.
//!
//! Owns the connection: connect, `hello` with [`PROTOCOL_VERSION`], report
//! [`Event::SynjitsuUp`] (the fleet answers with a full `Sync`), send the fleet's requests
//! with fresh ids and match every answer to its request, forward synjitsu's events, and on
//! any failure report [`Event::SynjitsuDown`] and reconnect with backoff (50 ms doubling to
//! 2 s). Every request the fleet hands over gets exactly one [`Event::SynjitsuReplied`]:
//! acknowledged, refused, or lost with the connection (or never sent because there was
//! none), so the fleet never waits on a synjitsu that is down.
//!
//! synjitsu serves one client, the newest: a jitsu-dns restarted after a crash takes over
//! from its predecessor's connection, whatever state that one is in. A client replaced that
//! way (an [`ErrorCode::Replaced`] error, then the close) logs it at warn and waits
//! [`REPLACED_BACKOFF_MIN`], doubling to [`REPLACED_BACKOFF_MAX`] while it keeps being
//! replaced, before it takes the connection back. Two jitsu-dns run by mistake on one host
//! thus take turns, each holding the connection for up to a minute while the other answers
//! with response delays, with a warning from both and from synjitsu at every turn: slow and
//! loud, never a tight loop.
//!
//! It decides nothing about VMs; what to send is the fleet's.

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use shared_proto::codec::CodecError;
use shared_proto::{
    ClientCodec, ClientMessage, ErrorCode, Event as SynEvent, PROTOCOL_VERSION, Reply, Request,
    ServerMessage, StreamError,
};
use tokio::net::UnixStream;
use tokio::sync::mpsc;
use tokio_util::codec::Framed;
use tokio_util::sync::CancellationToken;

use crate::fleet::Event;

/// Requests waiting to be sent: the daemon hands over with `try_send` and treats a full
/// queue as a refusal.
pub const QUEUE: usize = 1024;
/// First reconnection delay.
pub const BACKOFF_MIN: Duration = Duration::from_millis(50);
/// Longest reconnection delay.
pub const BACKOFF_MAX: Duration = Duration::from_secs(2);
/// How long connect + hello may take.
const HELLO_TIMEOUT: Duration = Duration::from_secs(5);
/// First wait before taking the connection back from the client that replaced this one.
pub const REPLACED_BACKOFF_MIN: Duration = Duration::from_secs(5);
/// Longest such wait.
pub const REPLACED_BACKOFF_MAX: Duration = Duration::from_secs(60);

/// A request from the fleet, tagged so its answer can be matched.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outgoing {
    /// The fleet's tag.
    pub tag: u64,
    /// The request.
    pub msg: ClientMessage,
}

/// Why a session ended.
#[derive(Debug, thiserror::Error)]
enum SessionError {
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("{0}")]
    Stream(#[from] StreamError),
    #[error("synjitsu closed the connection")]
    Closed,
    #[error("synjitsu refused the hello: {0}")]
    Refused(String),
    #[error("no hello answer within {HELLO_TIMEOUT:?}")]
    HelloTimeout,
    #[error("replaced by another client: {0}")]
    Replaced(String),
    #[error("stopping")]
    Cancelled,
}

/// Starts the client task; returns where the fleet's requests go.
pub fn spawn(
    socket: PathBuf,
    events: mpsc::Sender<Event>,
    stop: CancellationToken,
) -> mpsc::Sender<Outgoing> {
    let (tx, rx) = mpsc::channel(QUEUE);
    tokio::spawn(run(socket, rx, events, stop));
    tx
}

async fn run(
    socket: PathBuf,
    mut requests: mpsc::Receiver<Outgoing>,
    events: mpsc::Sender<Event>,
    stop: CancellationToken,
) {
    let mut backoff = BACKOFF_MIN;
    let mut replaced_backoff = REPLACED_BACKOFF_MIN;
    let mut warned = false;
    loop {
        let mut established = false;
        let result = session(&socket, &mut requests, &events, &stop, &mut established).await;
        let wait = match result {
            Err(SessionError::Cancelled) => return,
            Err(SessionError::Replaced(why)) => {
                let wait = replaced_backoff;
                tracing::warn!(socket = %socket.display(), reason = %why, retry_in = ?wait, "synjitsu gave this connection to another client (one jitsu-dns per host: is a second one running?); taking it back later");
                replaced_backoff = (replaced_backoff * 2).min(REPLACED_BACKOFF_MAX);
                wait
            }
            other => {
                if let Err(e) = other {
                    // One warning per outage; the retries are debug.
                    if warned {
                        tracing::debug!(socket = %socket.display(), error = %e, "synjitsu unreachable");
                    } else {
                        tracing::warn!(socket = %socket.display(), error = %e, "synjitsu unreachable: answering with response delays until it is back");
                        warned = true;
                    }
                }
                // A session that got through its hello and was not replaced resets both.
                if established {
                    backoff = BACKOFF_MIN;
                    replaced_backoff = REPLACED_BACKOFF_MIN;
                    warned = false;
                }
                let wait = backoff;
                backoff = (backoff * 2).min(BACKOFF_MAX);
                wait
            }
        };
        let sleep = tokio::time::sleep(wait);
        tokio::pin!(sleep);
        loop {
            tokio::select! {
                biased;
                _ = stop.cancelled() => return,
                _ = &mut sleep => break,
                Some(o) = requests.recv() => {
                    // Nobody to send it to: the fleet falls back at once.
                    let _ = events.send(Event::SynjitsuReplied { tag: o.tag, ok: false }).await;
                }
            }
        }
    }
}

type Connection = Framed<UnixStream, ClientCodec>;

/// The next message, or the payload error that cost one frame; the end of the stream and
/// framing errors end the session.
async fn read_message(
    conn: &mut Connection,
) -> Result<Result<ServerMessage, CodecError>, SessionError> {
    match conn.next().await {
        Some(item) => Ok(item?),
        None => Err(SessionError::Closed),
    }
}

async fn session(
    socket: &std::path::Path,
    requests: &mut mpsc::Receiver<Outgoing>,
    events: &mpsc::Sender<Event>,
    stop: &CancellationToken,
    established: &mut bool,
) -> Result<(), SessionError> {
    let conn = tokio::select! {
        _ = stop.cancelled() => return Err(SessionError::Cancelled),
        c = tokio::time::timeout(HELLO_TIMEOUT, UnixStream::connect(socket)) => {
            c.map_err(|_| SessionError::HelloTimeout)??
        }
    };
    let mut conn = Framed::new(conn, ClientCodec::new());
    let hello = Request {
        id: 1,
        body: ClientMessage::Hello {
            version: PROTOCOL_VERSION,
            client: format!("jitsu-dns {}", env!("CARGO_PKG_VERSION")),
        },
    };
    conn.send(hello).await?;
    let answer = tokio::select! {
        _ = stop.cancelled() => return Err(SessionError::Cancelled),
        a = tokio::time::timeout(HELLO_TIMEOUT, read_message(&mut conn)) => {
            a.map_err(|_| SessionError::HelloTimeout)??
        }
    };
    match answer {
        Ok(ServerMessage::Ok {
            id: 1,
            reply: Reply::Hello { version, server },
        }) if version == PROTOCOL_VERSION => {
            tracing::info!(socket = %socket.display(), %server, "connected to synjitsu");
        }
        Ok(ServerMessage::Error { code, message, .. }) => {
            let why = if code == ErrorCode::VersionMismatch {
                format!("protocol version mismatch (we speak {PROTOCOL_VERSION}): {message}")
            } else {
                format!("{code:?}: {message}")
            };
            return Err(SessionError::Refused(why));
        }
        Ok(other) => {
            return Err(SessionError::Refused(format!(
                "unexpected answer {other:?}"
            )));
        }
        Err(e) => return Err(StreamError::Codec(e).into()),
    }
    *established = true;
    let _ = events.send(Event::SynjitsuUp).await;

    let mut pending: HashMap<u64, u64> = HashMap::new();
    let mut next_id = 2u64;
    let result = loop {
        tokio::select! {
            biased;
            _ = stop.cancelled() => break Err(SessionError::Cancelled),
            msg = read_message(&mut conn) => match msg {
                Err(e) => break Err(e),
                Ok(Err(e)) => {
                    // One bad frame costs only itself.
                    tracing::warn!(error = %e, "synjitsu sent a message that is not valid: ignored");
                }
                Ok(Ok(ServerMessage::Error { code: ErrorCode::Replaced, message, .. })) => {
                    break Err(SessionError::Replaced(message));
                }
                Ok(Ok(ServerMessage::Ok { id, .. })) => {
                    if let Some(tag) = pending.remove(&id) {
                        let _ = events.send(Event::SynjitsuReplied { tag, ok: true }).await;
                    }
                }
                Ok(Ok(ServerMessage::Error { id, code, message })) => {
                    tracing::warn!(id, ?code, %message, "synjitsu refused a request");
                    if let Some(tag) = pending.remove(&id) {
                        let _ = events.send(Event::SynjitsuReplied { tag, ok: false }).await;
                    }
                }
                Ok(Ok(ServerMessage::Event { event })) => match event {
                    SynEvent::GuestAnnounced { name } => {
                        tracing::debug!(vm = %name, "synjitsu: guest announced");
                        let _ = events.send(Event::GuestAnnounced { vm: name.into() }).await;
                    }
                    SynEvent::WakeRequest { name } => {
                        tracing::debug!(vm = %name, "synjitsu: wake request");
                        let _ = events.send(Event::WakeRequest { vm: name.into() }).await;
                    }
                    SynEvent::SynHeld { name, held } => {
                        tracing::debug!(vm = %name, held, "synjitsu holds SYNs");
                    }
                    SynEvent::Handover { name, count, via } => {
                        tracing::debug!(vm = %name, count, ?via, "synjitsu handed SYNs over");
                    }
                },
            },
            Some(o) = requests.recv() => {
                let id = next_id;
                next_id += 1;
                // Pending before it is sent: a request lost with the connection is reported
                // with the others.
                pending.insert(id, o.tag);
                match conn.send(Request { id, body: o.msg }).await {
                    Ok(()) => {}
                    // Not framed, so nothing was written: the session goes on.
                    Err(StreamError::Codec(e)) => {
                        pending.remove(&id);
                        tracing::warn!(error = %e, "cannot encode a request for synjitsu");
                        let _ = events.send(Event::SynjitsuReplied { tag: o.tag, ok: false }).await;
                    }
                    Err(e) => break Err(e.into()),
                }
            }
        }
    };
    for (_, tag) in pending {
        let _ = events.send(Event::SynjitsuReplied { tag, ok: false }).await;
    }
    let _ = events.send(Event::SynjitsuDown).await;
    match &result {
        // Replaced is the caller's to report, with its backoff.
        Err(SessionError::Cancelled | SessionError::Replaced(_)) => {}
        Err(e) => tracing::warn!(error = %e, "lost synjitsu: reconnecting"),
        Ok(()) => {}
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;
    use shared_proto::{Handover, Mac, ServerCodec, VmIdentity};
    use tokio::io::AsyncWriteExt;
    use tokio::net::UnixListener;

    /// The fake synjitsu's end of a connection.
    type Server = Framed<UnixStream, ServerCodec>;

    fn vm() -> VmIdentity {
        VmIdentity {
            name: "www".into(),
            mac: Mac([2, 0, 0, 0, 0, 1]),
            ipv4: "10.0.0.1".parse().unwrap(),
            ipv6: None,
            handover: Handover::Wire,
            port: None,
            announces_listening: false,
        }
    }

    async fn accept(listener: &UnixListener) -> Server {
        let (c, _) = listener.accept().await.unwrap();
        Framed::new(c, ServerCodec::new())
    }

    async fn read_req(c: &mut Server) -> Option<Request> {
        c.next().await.map(|item| item.unwrap().unwrap())
    }

    async fn send(c: &mut Server, m: &ServerMessage) {
        c.send(m.clone()).await.unwrap();
    }

    async fn next_event(rx: &mut mpsc::Receiver<Event>) -> Event {
        tokio::time::timeout(Duration::from_secs(10), rx.recv())
            .await
            .expect("an event within 10 s")
            .expect("client alive")
    }

    /// A fake synjitsu's listening socket in a directory of its own, and the client under
    /// test started on it: where its requests go and where its events come out.
    struct Setup {
        dir: std::path::PathBuf,
        path: std::path::PathBuf,
        listener: UnixListener,
        tx: mpsc::Sender<Outgoing>,
        events: mpsc::Receiver<Event>,
        stop: CancellationToken,
    }

    fn setup(tag: &str) -> Setup {
        let dir =
            std::env::temp_dir().join(format!("jitsu-syn-client-{tag}{}", std::process::id()));
        let _ = std::fs::create_dir_all(&dir);
        let path = dir.join("ctl.sock");
        let _ = std::fs::remove_file(&path);
        let listener = UnixListener::bind(&path).unwrap();
        let (ev_tx, events) = mpsc::channel(64);
        let stop = CancellationToken::new();
        let tx = spawn(path.clone(), ev_tx, stop.clone());
        Setup {
            dir,
            path,
            listener,
            tx,
            events,
            stop,
        }
    }

    /// A fake synjitsu on a real socket with the real codec: hello, acks, an error, events,
    /// a dropped connection, a reconnect, and a garbage frame in between.
    #[tokio::test(flavor = "current_thread")]
    async fn talks_reconnects_and_matches_answers_to_requests() {
        let Setup {
            dir,
            path,
            listener,
            tx,
            events: mut ev_rx,
            stop,
        } = setup("");

        for round in 0..2 {
            let mut c = accept_hello(&listener).await;
            assert_eq!(
                next_event(&mut ev_rx).await,
                Event::SynjitsuUp,
                "round {round}"
            );
            tx.send(Outgoing {
                tag: 10,
                msg: ClientMessage::Sync { vms: vec![] },
            })
            .await
            .unwrap();
            tx.send(Outgoing {
                tag: 11,
                msg: ClientMessage::Booting { vm: vm() },
            })
            .await
            .unwrap();
            tx.send(Outgoing {
                tag: 12,
                msg: ClientMessage::Ready { name: "www".into() },
            })
            .await
            .unwrap();
            let sync = read_req(&mut c).await.unwrap();
            let booting = read_req(&mut c).await.unwrap();
            let ready = read_req(&mut c).await.unwrap();
            assert!(matches!(sync.body, ClientMessage::Sync { .. }));
            assert!(matches!(booting.body, ClientMessage::Booting { .. }));
            let ids = [sync.id, booting.id, ready.id];
            assert!(ids.iter().all(|i| *i > 1) && ids[0] != ids[1] && ids[1] != ids[2]);
            // Answers out of order, a garbage frame, an error, then events.
            send(
                &mut c,
                &ServerMessage::Ok {
                    id: booting.id,
                    reply: Reply::Ack,
                },
            )
            .await;
            // Raw bytes behind the codec's back: `send` flushed, so they follow in order.
            c.get_mut()
                .write_all(&[0, 0, 0, 3, b'{', b'x', b'}'])
                .await
                .unwrap();
            send(
                &mut c,
                &ServerMessage::Ok {
                    id: sync.id,
                    reply: Reply::Ack,
                },
            )
            .await;
            send(
                &mut c,
                &ServerMessage::Error {
                    id: ready.id,
                    code: ErrorCode::UnknownVm,
                    message: "no".into(),
                },
            )
            .await;
            send(
                &mut c,
                &ServerMessage::Event {
                    event: SynEvent::GuestAnnounced { name: "www".into() },
                },
            )
            .await;
            send(
                &mut c,
                &ServerMessage::Event {
                    event: SynEvent::WakeRequest { name: "www".into() },
                },
            )
            .await;
            assert_eq!(
                next_event(&mut ev_rx).await,
                Event::SynjitsuReplied { tag: 11, ok: true }
            );
            assert_eq!(
                next_event(&mut ev_rx).await,
                Event::SynjitsuReplied { tag: 10, ok: true }
            );
            assert_eq!(
                next_event(&mut ev_rx).await,
                Event::SynjitsuReplied { tag: 12, ok: false }
            );
            assert_eq!(
                next_event(&mut ev_rx).await,
                Event::GuestAnnounced { vm: "www".into() }
            );
            assert_eq!(
                next_event(&mut ev_rx).await,
                Event::WakeRequest { vm: "www".into() }
            );
            // A request in flight when the connection drops is reported lost.
            tx.send(Outgoing {
                tag: 13,
                msg: ClientMessage::Ready { name: "www".into() },
            })
            .await
            .unwrap();
            let _ = read_req(&mut c).await.unwrap();
            drop(c);
            assert_eq!(
                next_event(&mut ev_rx).await,
                Event::SynjitsuReplied { tag: 13, ok: false }
            );
            assert_eq!(next_event(&mut ev_rx).await, Event::SynjitsuDown);
        }
        // While nobody listens, requests are answered as lost at once.
        drop(listener);
        let _ = std::fs::remove_file(&path);
        tx.send(Outgoing {
            tag: 20,
            msg: ClientMessage::Ready { name: "www".into() },
        })
        .await
        .unwrap();
        assert_eq!(
            next_event(&mut ev_rx).await,
            Event::SynjitsuReplied { tag: 20, ok: false }
        );
        stop.cancel();
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[tokio::test(flavor = "current_thread")]
    async fn a_version_mismatch_is_not_a_connection() {
        let Setup {
            dir,
            listener,
            tx: _tx,
            events: mut ev_rx,
            stop,
            ..
        } = setup("v-");
        let mut c = accept(&listener).await;
        let hello = read_req(&mut c).await.unwrap();
        send(
            &mut c,
            &ServerMessage::Error {
                id: hello.id,
                code: ErrorCode::VersionMismatch,
                message: "want 2".into(),
            },
        )
        .await;
        // It retries rather than reporting itself up.
        let (_c2, _) = listener.accept().await.unwrap();
        assert!(ev_rx.try_recv().is_err(), "never reported up");
        stop.cancel();
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// Accepts one connection, checks its hello and answers it.
    async fn accept_hello(listener: &UnixListener) -> Server {
        let mut c = accept(listener).await;
        let hello = read_req(&mut c).await.unwrap();
        assert!(matches!(
            hello.body,
            ClientMessage::Hello {
                version: PROTOCOL_VERSION,
                ..
            }
        ));
        send(
            &mut c,
            &ServerMessage::Ok {
                id: hello.id,
                reply: Reply::Hello {
                    version: PROTOCOL_VERSION,
                    server: "fake".into(),
                },
            },
        )
        .await;
        c
    }

    /// Replaced by another client, it waits before taking the connection back, longer each
    /// time it is replaced again; a connection lost any other way is retried at once. (Time
    /// is tokio's paused clock: it advances only while every task waits.)
    #[tokio::test(flavor = "current_thread", start_paused = true)]
    async fn a_replaced_client_backs_off_before_taking_the_connection_back() {
        let Setup {
            dir,
            listener,
            tx: _tx,
            events: mut ev_rx,
            stop,
            ..
        } = setup("r-");
        let replaced = ServerMessage::Error {
            id: 0,
            code: ErrorCode::Replaced,
            message: "replaced by a newer client".into(),
        };
        let mut c = accept_hello(&listener).await;
        assert_eq!(next_event(&mut ev_rx).await, Event::SynjitsuUp);
        // Replaced twice in a row, then lost (synjitsu restarted), then replaced again.
        for (replace, at_least, below) in [
            (true, REPLACED_BACKOFF_MIN, REPLACED_BACKOFF_MIN * 2),
            (true, REPLACED_BACKOFF_MIN * 2, REPLACED_BACKOFF_MIN * 4),
            (false, Duration::ZERO, BACKOFF_MIN * 2),
            (true, REPLACED_BACKOFF_MIN, REPLACED_BACKOFF_MIN * 2),
        ] {
            if replace {
                send(&mut c, &replaced).await;
            }
            drop(c);
            assert_eq!(next_event(&mut ev_rx).await, Event::SynjitsuDown);
            let t = tokio::time::Instant::now();
            c = accept_hello(&listener).await;
            let waited = t.elapsed();
            assert!(
                waited >= at_least && waited < below,
                "replaced {replace}: reconnected after {waited:?}, expected {at_least:?}..{below:?}"
            );
            assert_eq!(next_event(&mut ev_rx).await, Event::SynjitsuUp);
        }
        stop.cancel();
        let _ = std::fs::remove_dir_all(&dir);
    }
}
