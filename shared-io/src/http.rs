//! The small HTTP/1.1 responder both daemons run on their metrics address.
//!
//! Owns the connection and the protocol's rules, the same for both daemons: one request per
//! connection, answered and closed. `GET` and `HEAD` go to the daemon's [`Handler`] with the
//! path (a query string is ignored); `HEAD` gets the same head without the body. A path the
//! handler does not serve is `404`; any other method is `405` with `Allow: GET, HEAD`; a
//! request that does not parse is `400`, one whose head does not fit [`Limits::max_head`] is
//! `431`. Every connection is bounded ([`Limits`]): its head in size, the whole exchange in
//! time, and the connections served at once in number.
//!
//! What a path shows is the handler's: this module routes nothing itself, so a daemon adds a
//! page by answering one more path.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

/// The content type of the responder's own plain-text answers.
pub const TEXT: &str = "text/plain; charset=utf-8";

/// The status codes this responder uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    /// 200.
    Ok,
    /// 400: the request does not parse.
    BadRequest,
    /// 404: no page at that path.
    NotFound,
    /// 405: a method other than `GET` and `HEAD`.
    MethodNotAllowed,
    /// 431: the request's head is larger than [`Limits::max_head`].
    HeaderTooLarge,
    /// 500: the page could not be made.
    InternalError,
}

impl Status {
    fn line(self) -> &'static str {
        match self {
            Status::Ok => "200 OK",
            Status::BadRequest => "400 Bad Request",
            Status::NotFound => "404 Not Found",
            Status::MethodNotAllowed => "405 Method Not Allowed",
            Status::HeaderTooLarge => "431 Request Header Fields Too Large",
            Status::InternalError => "500 Internal Server Error",
        }
    }
}

/// An answer: its status, content type and body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    /// The status.
    pub status: Status,
    /// The `Content-Type`.
    pub content_type: &'static str,
    /// The body (sent for `GET`, counted but not sent for `HEAD`).
    pub body: String,
}

impl Response {
    /// An answer with `body`.
    pub fn new(status: Status, content_type: &'static str, body: String) -> Response {
        Response {
            status,
            content_type,
            body,
        }
    }

    fn plain(status: Status, body: &str) -> Response {
        Response::new(status, TEXT, body.into())
    }
}

/// What a daemon serves: the page at each path it knows.
pub trait Handler: Send + Sync + 'static {
    /// The page at `path` (the request target without its query string), or `None` for a
    /// path this daemon does not serve (the client gets a 404).
    fn get(&self, path: &str) -> impl Future<Output = Option<Response>> + Send;
}

/// The bounds on every connection.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// The request's head (request line and headers) at most, in bytes.
    pub max_head: usize,
    /// The whole exchange, from accepting to closing, at most; a slower client is dropped.
    pub timeout: Duration,
    /// Connections served at once at most; further ones wait in the listen backlog.
    pub max_connections: usize,
}

impl Default for Limits {
    /// 8 KiB of head, 5 s per connection, 16 connections at once.
    fn default() -> Limits {
        Limits {
            max_head: 8192,
            timeout: Duration::from_secs(5),
            max_connections: 16,
        }
    }
}

/// Serves `handler` on `listener` until `stop` is cancelled.
pub async fn serve<H: Handler>(
    listener: TcpListener,
    handler: Arc<H>,
    limits: Limits,
    stop: CancellationToken,
) {
    let slots = Arc::new(Semaphore::new(limits.max_connections));
    loop {
        // A slot first, then the connection: past the bound, clients wait in the backlog
        // rather than in a task each.
        let slot = tokio::select! {
            biased;
            _ = stop.cancelled() => return,
            slot = slots.clone().acquire_owned() => {
                slot.expect("the semaphore is never closed")
            }
        };
        let conn = tokio::select! {
            biased;
            _ = stop.cancelled() => return,
            accepted = listener.accept() => match accepted {
                Ok((conn, _)) => conn,
                Err(e) => {
                    tracing::debug!(error = %e, "http accept failed");
                    continue;
                }
            },
        };
        let handler = handler.clone();
        tokio::spawn(async move {
            let _slot = slot;
            if tokio::time::timeout(limits.timeout, exchange(conn, &*handler, limits.max_head))
                .await
                .is_err()
            {
                tracing::debug!("http client too slow: dropped");
            }
        });
    }
}

/// What the request asked for, once its head is read.
enum Asked {
    Page { path: String, head: bool },
    Refused(Response),
    Gone,
}

/// One request and its answer.
async fn exchange<H: Handler>(mut conn: TcpStream, handler: &H, max_head: usize) {
    let (response, head_only) = match read_head(&mut conn, max_head).await {
        Asked::Gone => return,
        Asked::Refused(r) => (r, false),
        Asked::Page { path, head } => match handler.get(&path).await {
            Some(page) => (page, head),
            None => (Response::plain(Status::NotFound, "not found\n"), head),
        },
    };
    let allow = if response.status == Status::MethodNotAllowed {
        "Allow: GET, HEAD\r\n"
    } else {
        ""
    };
    let mut out = format!(
        "HTTP/1.1 {}\r\nContent-Type: {}\r\nContent-Length: {}\r\n{allow}Connection: close\r\n\r\n",
        response.status.line(),
        response.content_type,
        response.body.len()
    )
    .into_bytes();
    if !head_only {
        out.extend_from_slice(response.body.as_bytes());
    }
    // The client may be gone already; there is nobody left to tell.
    let _ = conn.write_all(&out).await;
    let _ = conn.shutdown().await;
}

/// Reads until the request's head is whole, then decides what it asks for.
async fn read_head(conn: &mut TcpStream, max_head: usize) -> Asked {
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 1024];
    loop {
        let mut headers = [httparse::EMPTY_HEADER; 32];
        let mut req = httparse::Request::new(&mut headers);
        match req.parse(&buf) {
            Ok(httparse::Status::Complete(_)) => {
                let (method, target) = (req.method.unwrap_or(""), req.path.unwrap_or(""));
                let path = target.split_once('?').map_or(target, |(p, _)| p);
                return match method {
                    "GET" | "HEAD" => Asked::Page {
                        path: path.to_string(),
                        head: method == "HEAD",
                    },
                    _ => Asked::Refused(Response::plain(
                        Status::MethodNotAllowed,
                        "only GET and HEAD\n",
                    )),
                };
            }
            Ok(httparse::Status::Partial) => {}
            Err(httparse::Error::TooManyHeaders) => {
                return Asked::Refused(Response::plain(
                    Status::HeaderTooLarge,
                    "too many headers\n",
                ));
            }
            Err(e) => {
                return Asked::Refused(Response::plain(Status::BadRequest, &format!("{e}\n")));
            }
        }
        if buf.len() >= max_head {
            return Asked::Refused(Response::plain(
                Status::HeaderTooLarge,
                "request head too large\n",
            ));
        }
        let room = chunk.len().min(max_head - buf.len());
        match conn.read(&mut chunk[..room]).await {
            Ok(0) | Err(_) => return Asked::Gone,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::SocketAddr;

    /// Serves `/metrics` (with the body "m 1\n") and `/slow`, which never answers.
    #[derive(Debug)]
    struct Pages;

    impl Handler for Pages {
        async fn get(&self, path: &str) -> Option<Response> {
            match path {
                "/metrics" => Some(Response::new(Status::Ok, "text/x-test", "m 1\n".into())),
                "/slow" => std::future::pending().await,
                _ => None,
            }
        }
    }

    async fn start(limits: Limits) -> (SocketAddr, CancellationToken) {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let stop = CancellationToken::new();
        tokio::spawn(serve(l, Arc::new(Pages), limits, stop.clone()));
        (addr, stop)
    }

    async fn ask(addr: SocketAddr, request: &[u8]) -> String {
        let mut c = TcpStream::connect(addr).await.unwrap();
        c.write_all(request).await.unwrap();
        let mut s = String::new();
        c.read_to_string(&mut s).await.unwrap();
        s
    }

    fn get(target: &str) -> Vec<u8> {
        format!("GET {target} HTTP/1.1\r\nHost: x\r\n\r\n").into_bytes()
    }

    #[tokio::test(flavor = "current_thread")]
    async fn get_and_head_serve_the_page_with_or_without_a_query() {
        let (addr, stop) = start(Limits::default()).await;
        for target in ["/metrics", "/metrics?", "/metrics?name[]=x"] {
            let got = ask(addr, &get(target)).await;
            assert!(got.starts_with("HTTP/1.1 200 OK\r\n"), "{target}: {got}");
            assert!(got.contains("\r\nContent-Type: text/x-test\r\n"), "{got}");
            assert!(got.ends_with("\r\nContent-Length: 4\r\nConnection: close\r\n\r\nm 1\n"));
        }
        let head = ask(addr, b"HEAD /metrics HTTP/1.1\r\n\r\n").await;
        assert!(head.starts_with("HTTP/1.1 200 OK\r\n"), "{head}");
        assert!(
            head.ends_with("Content-Length: 4\r\nConnection: close\r\n\r\n"),
            "{head}"
        );
        stop.cancel();
    }

    #[tokio::test(flavor = "current_thread")]
    async fn unknown_paths_are_404_other_methods_405_with_allow() {
        let (addr, stop) = start(Limits::default()).await;
        for target in ["/", "/metricsx", "/metrics/", "/other?x"] {
            let got = ask(addr, &get(target)).await;
            assert!(
                got.starts_with("HTTP/1.1 404 Not Found\r\n"),
                "{target}: {got}"
            );
        }
        for method in ["POST", "PUT", "DELETE", "OPTIONS"] {
            let got = ask(
                addr,
                format!("{method} /metrics HTTP/1.1\r\n\r\n").as_bytes(),
            )
            .await;
            assert!(got.starts_with("HTTP/1.1 405 "), "{method}: {got}");
            assert!(got.contains("\r\nAllow: GET, HEAD\r\n"), "{got}");
        }
        stop.cancel();
    }

    #[tokio::test(flavor = "current_thread")]
    async fn garbage_is_400_and_a_huge_head_431() {
        let (addr, stop) = start(Limits::default()).await;
        let got = ask(addr, b"\x00\x01 nonsense\r\n\r\n").await;
        assert!(got.starts_with("HTTP/1.1 400 "), "{got}");
        // Each request is sent whole and read whole by the server before it answers: unread
        // bytes at the close would reset the connection before the client read the answer.
        let mut many = b"GET /metrics HTTP/1.1\r\n".to_vec();
        for i in 0..40 {
            many.extend_from_slice(format!("X-{i}: a\r\n").as_bytes());
        }
        many.extend_from_slice(b"\r\n");
        let got = ask(addr, &many).await;
        assert!(got.starts_with("HTTP/1.1 431 "), "{got}");
        let mut long = b"GET /metrics HTTP/1.1\r\nX-Long: ".to_vec();
        long.resize(Limits::default().max_head, b'a');
        let got = ask(addr, &long).await;
        assert!(got.starts_with("HTTP/1.1 431 "), "{got}");
        stop.cancel();
    }

    #[tokio::test(flavor = "current_thread")]
    async fn a_silent_or_stuck_exchange_is_dropped_at_the_timeout() {
        let limits = Limits {
            timeout: Duration::from_millis(200),
            ..Limits::default()
        };
        let (addr, stop) = start(limits).await;
        // Nothing sent: the server closes without a word.
        let mut c = TcpStream::connect(addr).await.unwrap();
        let mut s = String::new();
        let read = tokio::time::timeout(Duration::from_secs(10), c.read_to_string(&mut s)).await;
        assert!(matches!(read, Ok(Ok(0))), "{read:?} {s:?}");
        // A page that never comes: the same.
        assert_eq!(ask(addr, &get("/slow")).await, "");
        stop.cancel();
    }

    #[tokio::test(flavor = "current_thread")]
    async fn connections_past_the_bound_wait_for_a_free_slot() {
        let limits = Limits {
            max_connections: 1,
            ..Limits::default()
        };
        let (addr, stop) = start(limits).await;
        // The one slot is taken by a client that has not finished its request.
        let mut first = TcpStream::connect(addr).await.unwrap();
        first.write_all(b"GET /metrics HTTP/1.1\r\n").await.unwrap();
        let mut second = TcpStream::connect(addr).await.unwrap();
        second.write_all(&get("/metrics")).await.unwrap();
        let mut byte = [0u8; 1];
        let early = tokio::time::timeout(Duration::from_millis(300), second.read(&mut byte)).await;
        assert!(early.is_err(), "served past the bound: {early:?}");
        // The first finishes; its slot goes to the second.
        first.write_all(b"\r\n").await.unwrap();
        let mut s = String::new();
        first.read_to_string(&mut s).await.unwrap();
        assert!(s.starts_with("HTTP/1.1 200 OK"), "{s}");
        let mut s = String::new();
        second.read_to_string(&mut s).await.unwrap();
        assert!(s.starts_with("HTTP/1.1 200 OK"), "{s}");
        stop.cancel();
    }
}
