//! `jitsu-dns ctl`: sends one request to the daemon's control socket, prints the answer
//! (a table or text, or its JSON with `--json`) and says how it went in its exit code.
//!
//! Exit codes, for scripts: [`EXIT_OK`] 0, [`EXIT_FAILED`] 1 (the action was refused or
//! failed), [`EXIT_USAGE`] 2 (bad arguments), [`EXIT_UNKNOWN_VM`] 3,
//! [`EXIT_UNREACHABLE`] 4 (no daemon on the socket, or it did not answer), and
//! [`EXIT_DENIED`] 5 (neither root nor the uid the daemon allows).

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use super::proto::{Body, ErrorKind, MAX_RESPONSE, Request, Response};
use super::view::{render_detail, render_list, render_status};

/// Done.
pub const EXIT_OK: u8 = 0;
/// Refused or failed.
pub const EXIT_FAILED: u8 = 1;
/// Bad arguments (clap's own code for them).
pub const EXIT_USAGE: u8 = 2;
/// No VM of that name.
pub const EXIT_UNKNOWN_VM: u8 = 3;
/// No daemon reachable on the socket.
pub const EXIT_UNREACHABLE: u8 = 4;
/// Not allowed on the socket.
pub const EXIT_DENIED: u8 = 5;

/// The exit code for an error of `kind`.
pub fn exit_code(kind: ErrorKind) -> u8 {
    match kind {
        ErrorKind::Failed => EXIT_FAILED,
        ErrorKind::BadRequest => EXIT_USAGE,
        ErrorKind::UnknownVm => EXIT_UNKNOWN_VM,
        ErrorKind::Unavailable => EXIT_UNREACHABLE,
        ErrorKind::PermissionDenied => EXIT_DENIED,
    }
}

/// Sends `request` to the daemon at `control` and waits at most `timeout` for its answer.
pub fn call(control: &Path, request: &Request, timeout: Duration) -> Response {
    let at = control.display();
    let mut stream = match UnixStream::connect(control) {
        Ok(s) => s,
        Err(e) => {
            use std::io::ErrorKind as Io;
            return match e.kind() {
                Io::PermissionDenied => Response::error(
                    ErrorKind::PermissionDenied,
                    format!(
                        "permission denied on {at}: run as root, or as the uid jitsu-dns allows \
                         (--control-allow-uid)"
                    ),
                ),
                Io::NotFound | Io::ConnectionRefused => Response::error(
                    ErrorKind::Unavailable,
                    format!("jitsu-dns is not running: nothing answers on {at} ({e})"),
                ),
                _ => Response::error(
                    ErrorKind::Unavailable,
                    format!("cannot reach jitsu-dns on {at}: {e}"),
                ),
            };
        }
    };
    let mut exchange = || -> std::io::Result<Vec<u8>> {
        stream.set_read_timeout(Some(timeout))?;
        stream.set_write_timeout(Some(timeout))?;
        let mut line = serde_json::to_vec(request).map_err(std::io::Error::other)?;
        line.push(b'\n');
        // A daemon that refuses the peer answers without reading: a failed write is not the
        // end, its answer may be there.
        let _ = stream.write_all(&line);
        let mut answer = Vec::new();
        BufReader::new((&stream).take(MAX_RESPONSE as u64)).read_until(b'\n', &mut answer)?;
        Ok(answer)
    };
    match exchange() {
        Ok(answer) if answer.ends_with(b"\n") => {
            serde_json::from_slice(&answer).unwrap_or_else(|e| {
                Response::error(
                    ErrorKind::Unavailable,
                    format!("jitsu-dns on {at} answered something unreadable: {e}"),
                )
            })
        }
        Ok(_) => Response::error(
            ErrorKind::Unavailable,
            format!("jitsu-dns on {at} closed the connection without an answer"),
        ),
        Err(e)
            if matches!(
                e.kind(),
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
            ) =>
        {
            Response::error(
                ErrorKind::Unavailable,
                format!(
                    "jitsu-dns on {at} did not answer within {} s (the action may still \
                     complete: see `jitsu-dns ctl show`)",
                    timeout.as_secs()
                ),
            )
        }
        Err(e) => Response::error(
            ErrorKind::Unavailable,
            format!("talking to jitsu-dns on {at}: {e}"),
        ),
    }
}

/// Prints `response` (as text, or its JSON) and returns the exit code.
pub fn print(response: &Response, json: bool) -> u8 {
    match response {
        Response::Ok(body) => {
            let text = if json {
                let v = match body {
                    Body::List(rows) => serde_json::to_string_pretty(rows),
                    Body::Show(d) => serde_json::to_string_pretty(d),
                    Body::Status(s) => serde_json::to_string_pretty(s),
                    Body::Done { .. } | Body::Page { .. } => serde_json::to_string_pretty(body),
                };
                v.map(|mut s| {
                    s.push('\n');
                    s
                })
                .unwrap_or_default()
            } else {
                match body {
                    Body::List(rows) => render_list(rows),
                    Body::Show(d) => render_detail(d),
                    Body::Status(s) => render_status(s),
                    Body::Done { message } => format!("{message}\n"),
                    Body::Page { status, vms, .. } => {
                        format!("{}\n{}", render_status(status), render_list(vms))
                    }
                }
            };
            print!("{text}");
            EXIT_OK
        }
        Response::Error { kind, message } => {
            if json && let Ok(s) = serde_json::to_string_pretty(response) {
                println!("{s}");
            }
            eprintln!("jitsu-dns ctl: {message}");
            exit_code(*kind)
        }
    }
}
