// SPDX-License-Identifier: GPL-3.0-only
//! A small HTTP/1.1 server connection, sans IO: bytes from the client go in, response bytes
//! come out, and it says when the connection should close. It answers GET and HEAD with what
//! the caller renders, keeps connections alive (HTTP/1.1's default, or HTTP/1.0 asking for
//! it), answers pipelined requests in order, skips request bodies it is told the length of,
//! and answers anything it cannot read with an error status and a close.
//!
//! Bounds: a request head of at most [`MAX_HEAD`] bytes, a body of at most [`MAX_BODY`].

use alloc::vec::Vec;
use core::fmt::Write;

use thiserror::Error;

/// The longest request head (request line and headers) accepted.
pub const MAX_HEAD: usize = 8 * 1024;
/// The longest request body accepted (and skipped).
pub const MAX_BODY: usize = 64 * 1024;

/// The request methods the server tells apart.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Method {
    /// GET: the page.
    Get,
    /// HEAD: the page's headers.
    Head,
    /// Anything else: 405.
    Other,
}

/// One parsed request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    /// Its method.
    pub method: Method,
    /// Whether the connection stays open after the response.
    pub keep_alive: bool,
    /// Bytes of the request, head and body.
    pub len: usize,
}

/// A request the server cannot answer normally; the connection closes after the error.
#[derive(Debug, Error, Clone, Copy, PartialEq, Eq)]
pub enum HttpError {
    /// Not HTTP/1.x, or a header line without a colon, or a bad Content-Length.
    #[error("malformed request")]
    Malformed,
    /// The head did not end within [`MAX_HEAD`] bytes.
    #[error("request head longer than {MAX_HEAD} bytes")]
    HeadTooLong,
    /// The body is longer than [`MAX_BODY`].
    #[error("request body longer than {MAX_BODY} bytes")]
    BodyTooLong,
    /// A chunked request body, which this server does not read.
    #[error("chunked request bodies are not supported")]
    Chunked,
}

impl HttpError {
    /// The status line's code and reason.
    pub fn status(&self) -> (u16, &'static str) {
        match self {
            HttpError::Malformed => (400, "Bad Request"),
            HttpError::HeadTooLong => (431, "Request Header Fields Too Large"),
            HttpError::BodyTooLong => (413, "Content Too Large"),
            HttpError::Chunked => (501, "Not Implemented"),
        }
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// True if the comma-separated header value holds `token` (case-insensitive).
fn has_token(value: &str, token: &str) -> bool {
    value
        .split(',')
        .any(|t| t.trim().eq_ignore_ascii_case(token))
}

/// Parses the first request in `buf`: `Ok(None)` until all of it (head and body) is there.
pub fn parse_request(buf: &[u8]) -> Result<Option<Request>, HttpError> {
    let Some(head_end) = find(&buf[..buf.len().min(MAX_HEAD)], b"\r\n\r\n") else {
        return if buf.len() >= MAX_HEAD {
            Err(HttpError::HeadTooLong)
        } else {
            Ok(None)
        };
    };
    let head = core::str::from_utf8(&buf[..head_end]).map_err(|_| HttpError::Malformed)?;
    let mut lines = head.split("\r\n");
    let request_line = lines.next().ok_or(HttpError::Malformed)?;
    let mut words = request_line.split(' ');
    let (Some(method), Some(_target), Some(version), None) =
        (words.next(), words.next(), words.next(), words.next())
    else {
        return Err(HttpError::Malformed);
    };
    let mut keep_alive = match version {
        "HTTP/1.1" => true,
        "HTTP/1.0" => false,
        _ => return Err(HttpError::Malformed),
    };
    let mut body = 0usize;
    for line in lines {
        let (name, value) = line.split_once(':').ok_or(HttpError::Malformed)?;
        let value = value.trim();
        if name.eq_ignore_ascii_case("connection") {
            if has_token(value, "close") {
                keep_alive = false;
            } else if has_token(value, "keep-alive") {
                keep_alive = true;
            }
        } else if name.eq_ignore_ascii_case("content-length") {
            body = value.parse().map_err(|_| HttpError::Malformed)?;
            if body > MAX_BODY {
                return Err(HttpError::BodyTooLong);
            }
        } else if name.eq_ignore_ascii_case("transfer-encoding")
            && !value.eq_ignore_ascii_case("identity")
        {
            return Err(HttpError::Chunked);
        }
    }
    let len = head_end + 4 + body;
    if buf.len() < len {
        return Ok(None);
    }
    let method = match method {
        "GET" => Method::Get,
        "HEAD" => Method::Head,
        "" => return Err(HttpError::Malformed),
        _ => Method::Other,
    };
    Ok(Some(Request {
        method,
        keep_alive,
        len,
    }))
}

/// Appends a response: status line, headers, and `body` unless `head_only`.
pub fn write_response(
    out: &mut Vec<u8>,
    (code, reason): (u16, &str),
    keep_alive: bool,
    body: &[u8],
    head_only: bool,
) {
    let mut head = alloc::string::String::with_capacity(160);
    // Writing to a String cannot fail.
    let _ = write!(
        head,
        "HTTP/1.1 {code} {reason}\r\nServer: jitsu-unikernel\r\nContent-Type: text/plain\r\n\
         Content-Length: {}\r\nConnection: {}\r\n",
        body.len(),
        if keep_alive { "keep-alive" } else { "close" }
    );
    if code == 405 {
        head.push_str("Allow: GET, HEAD\r\n");
    }
    head.push_str("\r\n");
    out.extend_from_slice(head.as_bytes());
    if !head_only {
        out.extend_from_slice(body);
    }
}

/// One connection's HTTP state: what the client sent that is not answered yet, the response
/// bytes not yet sent, and whether to close once they are.
#[derive(Debug, Default)]
pub struct HttpConn {
    input: Vec<u8>,
    output: Vec<u8>,
    closing: bool,
}

impl HttpConn {
    /// A fresh connection.
    pub fn new() -> HttpConn {
        HttpConn::default()
    }

    /// Takes bytes from the client and answers every complete request in them: `page` renders
    /// the body of a GET or HEAD (and is called once per such request, so it can count them).
    /// Input after a request that closes the connection is ignored.
    pub fn on_bytes(&mut self, data: &[u8], mut page: impl FnMut() -> Vec<u8>) {
        if self.closing {
            return;
        }
        self.input.extend_from_slice(data);
        loop {
            match parse_request(&self.input) {
                Ok(None) => break,
                Ok(Some(req)) => {
                    match req.method {
                        Method::Get | Method::Head => {
                            let body = page();
                            write_response(
                                &mut self.output,
                                (200, "OK"),
                                req.keep_alive,
                                &body,
                                req.method == Method::Head,
                            );
                        }
                        Method::Other => write_response(
                            &mut self.output,
                            (405, "Method Not Allowed"),
                            req.keep_alive,
                            b"method not allowed\n",
                            false,
                        ),
                    }
                    self.input.drain(..req.len);
                    if !req.keep_alive {
                        self.closing = true;
                        break;
                    }
                }
                Err(e) => {
                    let mut body = alloc::string::String::new();
                    let _ = writeln!(body, "{e}");
                    write_response(&mut self.output, e.status(), false, body.as_bytes(), false);
                    self.closing = true;
                    break;
                }
            }
        }
        if self.closing {
            self.input = Vec::new();
        }
    }

    /// Response bytes waiting to be sent.
    pub fn output(&self) -> &[u8] {
        &self.output
    }

    /// Marks the first `n` output bytes as sent.
    pub fn sent(&mut self, n: usize) {
        self.output.drain(..n.min(self.output.len()));
    }

    /// True once every response is sent and the last one said the connection closes.
    pub fn should_close(&self) -> bool {
        self.closing && self.output.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::string::String;

    fn text(b: &[u8]) -> String {
        String::from_utf8(b.to_vec()).unwrap()
    }

    #[test]
    fn a_get_is_parsed_only_once_its_head_is_complete() {
        let req = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n";
        assert_eq!(parse_request(&req[..20]), Ok(None));
        assert_eq!(
            parse_request(req),
            Ok(Some(Request {
                method: Method::Get,
                keep_alive: true,
                len: req.len()
            }))
        );
    }

    #[test]
    fn keep_alive_follows_the_version_and_the_connection_header() {
        let ka = |r: &[u8]| parse_request(r).unwrap().unwrap().keep_alive;
        assert!(ka(b"GET / HTTP/1.1\r\n\r\n"));
        assert!(!ka(b"GET / HTTP/1.1\r\nConnection: Close\r\n\r\n"));
        assert!(!ka(b"GET / HTTP/1.0\r\n\r\n"));
        assert!(ka(b"GET / HTTP/1.0\r\nconnection: Keep-Alive\r\n\r\n"));
    }

    #[test]
    fn a_body_is_waited_for_and_skipped() {
        let req = b"POST /x HTTP/1.1\r\nContent-Length: 5\r\n\r\nhello";
        assert_eq!(parse_request(&req[..req.len() - 1]), Ok(None));
        let r = parse_request(req).unwrap().unwrap();
        assert_eq!((r.method, r.len), (Method::Other, req.len()));
    }

    #[test]
    fn bad_requests_are_errors_not_panics() {
        for (req, err) in [
            (&b"GET /\r\n\r\n"[..], HttpError::Malformed),
            (b"GET / HTTP/2\r\n\r\n", HttpError::Malformed),
            (b"GET / HTTP/1.1\r\nnocolon\r\n\r\n", HttpError::Malformed),
            (
                b"GET / HTTP/1.1\r\nContent-Length: -1\r\n\r\n",
                HttpError::Malformed,
            ),
            (b"\xff / HTTP/1.1\r\n\r\n", HttpError::Malformed),
            (
                b"POST / HTTP/1.1\r\nContent-Length: 99999999\r\n\r\n",
                HttpError::BodyTooLong,
            ),
            (
                b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n",
                HttpError::Chunked,
            ),
        ] {
            assert_eq!(parse_request(req), Err(err), "{:?}", text(req));
        }
        assert_eq!(
            parse_request(&[b'a'; MAX_HEAD]),
            Err(HttpError::HeadTooLong)
        );
    }

    #[test]
    fn pipelined_requests_are_answered_in_order_on_one_connection() {
        let mut c = HttpConn::new();
        let mut n = 0;
        c.on_bytes(
            b"GET / HTTP/1.1\r\n\r\nHEAD / HTTP/1.1\r\n\r\nGET / HT",
            || {
                n += 1;
                alloc::format!("request {n}\n").into_bytes()
            },
        );
        assert_eq!(n, 2);
        let out = text(c.output());
        assert_eq!(out.matches("HTTP/1.1 200 OK").count(), 2);
        assert!(out.contains("Content-Length: 10\r\nConnection: keep-alive\r\n\r\nrequest 1\n"));
        // HEAD: the headers of the page, no body.
        assert!(out.ends_with("Content-Length: 10\r\nConnection: keep-alive\r\n\r\n"));
        assert!(!c.should_close());
        c.sent(out.len());
        c.on_bytes(b"TP/1.1\r\nConnection: close\r\n\r\n", || {
            b"last\n".to_vec()
        });
        assert!(text(c.output()).ends_with("Connection: close\r\n\r\nlast\n"));
        assert!(!c.should_close(), "not before the response is sent");
        c.sent(c.output().len());
        assert!(c.should_close());
    }

    #[test]
    fn other_methods_get_405_and_the_connection_stays_open() {
        let mut c = HttpConn::new();
        c.on_bytes(b"DELETE / HTTP/1.1\r\n\r\n", || unreachable!());
        let out = text(c.output());
        assert!(
            out.starts_with("HTTP/1.1 405 Method Not Allowed\r\n"),
            "{out}"
        );
        assert!(out.contains("Allow: GET, HEAD\r\n"));
        assert!(!c.should_close());
    }

    #[test]
    fn a_bad_request_gets_an_error_status_and_the_connection_closes() {
        let mut c = HttpConn::new();
        c.on_bytes(
            b"BREW /pot HTCPCP/1.0\r\n\r\nGET / HTTP/1.1\r\n\r\n",
            || unreachable!(),
        );
        let out = text(c.output());
        assert!(out.starts_with("HTTP/1.1 400 Bad Request\r\n"), "{out}");
        assert!(out.ends_with("Connection: close\r\n\r\nmalformed request\n"));
        c.sent(out.len());
        assert!(c.should_close());
        c.on_bytes(b"GET / HTTP/1.1\r\n\r\n", || unreachable!());
        assert!(c.output().is_empty(), "nothing answered after the close");
    }
}
