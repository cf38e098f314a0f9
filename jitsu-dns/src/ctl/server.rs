//! The control socket's server: a thin shell that admits a peer, reads its one request and
//! hands it to the daemon's loop, then writes the answer back.
//!
//! The socket file and the peer check are `shared_io::unix`'s (mode 0600, `SO_PEERCRED`:
//! root or `--control-allow-uid`). Bounded: [`MAX_CONNECTIONS`] served at once (more wait
//! in the backlog), a request must arrive within [`REQUEST_TIMEOUT`] and fit
//! [`super::proto::MAX_LINE`], and the loop's queue holds [`CALL_QUEUE`] requests (past it:
//! `unavailable`). What a request does is the daemon's.

use std::sync::Arc;
use std::time::Duration;

use shared_io::unix::{PeerError, PrivateSocket, check_peer};
use tokio::net::UnixStream;
use tokio::sync::{Semaphore, mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use super::proto::{ErrorKind, MAX_LINE, Request, Response, read_line, write_line};

/// Connections served at once.
pub const MAX_CONNECTIONS: usize = 16;
/// A request must be whole this long after the connection was accepted.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// Requests waiting for the daemon's loop at most.
pub const CALL_QUEUE: usize = 64;

/// A request for the daemon's loop, with who asked and where the answer goes.
#[derive(Debug)]
pub struct Call {
    /// The request.
    pub request: Request,
    /// The peer's uid (`None`: the status page, which only reads).
    pub uid: Option<u32>,
    /// The answer.
    pub reply: oneshot::Sender<Response>,
}

/// Serves `socket` until `stop`, passing requests to `calls`.
pub async fn serve(
    socket: PrivateSocket,
    allow_uid: Option<u32>,
    calls: mpsc::Sender<Call>,
    stop: CancellationToken,
) {
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    loop {
        let slot = tokio::select! {
            biased;
            _ = stop.cancelled() => return,
            s = slots.clone().acquire_owned() => s.expect("the semaphore is never closed"),
        };
        let stream = tokio::select! {
            biased;
            _ = stop.cancelled() => return,
            r = socket.listener().accept() => match r {
                Ok((s, _)) => s,
                Err(e) => {
                    tracing::warn!(error = %e, "control socket accept failed");
                    continue;
                }
            },
        };
        let calls = calls.clone();
        let stop = stop.clone();
        tokio::spawn(async move {
            let _slot = slot;
            tokio::select! {
                _ = stop.cancelled() => {}
                () = session(stream, allow_uid, calls) => {}
            }
        });
    }
}

/// One connection: the peer check, its request, the answer.
async fn session(mut stream: UnixStream, allow_uid: Option<u32>, calls: mpsc::Sender<Call>) {
    let response = match check_peer(&stream, allow_uid) {
        Ok(peer) => {
            let (rd, _) = stream.split();
            match tokio::time::timeout(REQUEST_TIMEOUT, read_line::<Request, _>(rd, MAX_LINE)).await
            {
                Err(_) => Response::error(
                    ErrorKind::BadRequest,
                    format!("no whole request within {} s", REQUEST_TIMEOUT.as_secs()),
                ),
                Ok(Err(e)) => Response::error(ErrorKind::BadRequest, format!("bad request: {e}")),
                Ok(Ok(request)) => {
                    tracing::debug!(uid = peer.uid, pid = ?peer.pid, ?request, "control request");
                    ask(&calls, request, Some(peer.uid)).await
                }
            }
        }
        Err(PeerError::NoCredentials(e)) => {
            tracing::warn!(error = %e, "control client without credentials: refused");
            Response::error(ErrorKind::PermissionDenied, "no peer credentials")
        }
        Err(e @ PeerError::Refused { uid, pid }) => {
            tracing::warn!(
                uid,
                ?pid,
                "control client refused: not root nor the allowed uid"
            );
            Response::error(ErrorKind::PermissionDenied, e.to_string())
        }
    };
    // The client may be gone; nobody is left to tell.
    let _ = write_line(&mut stream, &response).await;
}

/// Passes `request` to the daemon's loop and waits for its answer.
pub async fn ask(calls: &mpsc::Sender<Call>, request: Request, uid: Option<u32>) -> Response {
    let (tx, rx) = oneshot::channel();
    let call = Call {
        request,
        uid,
        reply: tx,
    };
    if calls.try_send(call).is_err() {
        return Response::error(
            ErrorKind::Unavailable,
            "jitsu-dns is busy or stopping: try again",
        );
    }
    rx.await.unwrap_or_else(|_| {
        Response::error(ErrorKind::Unavailable, "jitsu-dns stopped before answering")
    })
}
