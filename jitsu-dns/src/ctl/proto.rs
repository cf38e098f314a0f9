//! What `jitsu-dns ctl` and the daemon say on the control socket: one request and one
//! response per connection, each one line of JSON of at most [`MAX_LINE`] bytes.
//!
//! A request is `{"cmd":"stop","vm":"www","mode":"destroy"}`; a response is
//! `{"ok":{...}}` or `{"error":{"kind":"unknown_vm","message":"..."}}`. Both ends are this
//! binary, so the contract is here rather than in `shared-proto`; scripts use `ctl --json`,
//! which prints the response's content.

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncWrite, AsyncWriteExt, BufReader};

use super::view::{ColdStartRow, DaemonStatus, VmDetail, VmRow};

/// A request or response line at most, in bytes (a list of many VMs is larger: responses
/// are bounded by [`MAX_RESPONSE`]).
pub const MAX_LINE: usize = 4096;
/// A response at most, in bytes.
pub const MAX_RESPONSE: usize = 16 << 20;

/// What the operator asks.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "lowercase", deny_unknown_fields)]
pub enum Request {
    /// Every VM, one row each.
    List,
    /// Everything known of one VM.
    Show {
        /// The VM.
        vm: String,
    },
    /// Boot it now (pre-warm), answered as a query would be.
    Start {
        /// The VM.
        vm: String,
    },
    /// Stop it.
    Stop {
        /// The VM.
        vm: String,
        /// `destroy`, `suspend` or `shutdown`; its `stop_mode` if absent.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        mode: Option<String>,
    },
    /// Stop it and boot it again.
    Restart {
        /// The VM.
        vm: String,
    },
    /// Never stop it for idleness.
    Pin {
        /// The VM.
        vm: String,
    },
    /// Undo `pin` (or a `pin = true` key).
    Unpin {
        /// The VM.
        vm: String,
    },
    /// Queries no longer boot it; stop it when idle.
    Drain {
        /// The VM.
        vm: String,
    },
    /// Undo `drain`.
    Undrain {
        /// The VM.
        vm: String,
    },
    /// Re-read the configuration, as SIGHUP.
    Reload,
    /// The daemon itself.
    Status,
    /// What the status page shows: the daemon, the VMs and the recent cold starts.
    Page,
}

impl Request {
    /// The VM it is about, if any.
    pub fn vm(&self) -> Option<&str> {
        match self {
            Request::Show { vm }
            | Request::Start { vm }
            | Request::Stop { vm, .. }
            | Request::Restart { vm }
            | Request::Pin { vm }
            | Request::Unpin { vm }
            | Request::Drain { vm }
            | Request::Undrain { vm } => Some(vm),
            Request::List | Request::Reload | Request::Status | Request::Page => None,
        }
    }
}

/// What a request did not get, as a script tells it apart (each has its exit code).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorKind {
    /// The action was refused or failed (exit 1).
    Failed,
    /// The request does not parse (exit 2).
    BadRequest,
    /// No VM of that name (exit 3).
    UnknownVm,
    /// The daemon cannot take requests now (exit 4).
    Unavailable,
    /// The peer is neither root nor the uid allowed (exit 5).
    PermissionDenied,
}

/// The daemon's answer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Response {
    /// Done: what it says.
    Ok(Body),
    /// Not done.
    Error {
        /// Which kind of failure.
        kind: ErrorKind,
        /// Why, for a person.
        message: String,
    },
}

impl Response {
    /// An error of `kind`.
    pub fn error(kind: ErrorKind, message: impl Into<String>) -> Response {
        Response::Error {
            kind,
            message: message.into(),
        }
    }
}

/// What a request that succeeded returns.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Body {
    /// `list`.
    List(Vec<VmRow>),
    /// `show`.
    Show(Box<VmDetail>),
    /// An action: what happened.
    Done {
        /// For a person.
        message: String,
    },
    /// `status`.
    Status(Box<DaemonStatus>),
    /// `page`.
    Page {
        /// The daemon.
        status: Box<DaemonStatus>,
        /// The VMs.
        vms: Vec<VmRow>,
        /// The recent cold starts, newest first.
        cold_starts: Vec<ColdStartRow>,
    },
}

/// Why a line could not be read.
#[derive(Debug, thiserror::Error)]
pub enum LineError {
    /// The connection failed.
    #[error("{0}")]
    Io(#[from] std::io::Error),
    /// The peer closed before a whole line.
    #[error("the connection closed before a whole line")]
    Closed,
    /// Longer than allowed.
    #[error("line longer than {0} bytes")]
    TooLong(usize),
    /// Not the JSON expected.
    #[error("{0}")]
    Json(#[from] serde_json::Error),
}

/// Reads one line of at most `max` bytes and parses it.
pub async fn read_line<T, R>(r: R, max: usize) -> Result<T, LineError>
where
    T: for<'de> Deserialize<'de>,
    R: AsyncRead + Unpin,
{
    let mut line = Vec::new();
    let mut r = BufReader::new(tokio::io::AsyncReadExt::take(r, max as u64 + 1));
    let n = r.read_until(b'\n', &mut line).await?;
    if n > max {
        return Err(LineError::TooLong(max));
    }
    if line.last() != Some(&b'\n') {
        return Err(LineError::Closed);
    }
    Ok(serde_json::from_slice(&line)?)
}

/// Writes `v` as one line.
pub async fn write_line<T: Serialize, W: AsyncWrite + Unpin>(
    mut w: W,
    v: &T,
) -> std::io::Result<()> {
    let mut line = serde_json::to_vec(v).map_err(std::io::Error::other)?;
    line.push(b'\n');
    w.write_all(&line).await?;
    w.flush().await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_read_as_documented_and_unknown_ones_are_refused() {
        let r: Request =
            serde_json::from_str(r#"{"cmd":"stop","vm":"www","mode":"suspend"}"#).unwrap();
        assert_eq!(
            r,
            Request::Stop {
                vm: "www".into(),
                mode: Some("suspend".into())
            }
        );
        assert_eq!(
            serde_json::to_string(&Request::Pin { vm: "a".into() }).unwrap(),
            r#"{"cmd":"pin","vm":"a"}"#
        );
        for bad in [
            r#"{"cmd":"reboot","vm":"www"}"#,
            r#"{"cmd":"start"}"#,
            r#"{"cmd":"start","vm":"a","force":true}"#,
            "[]",
        ] {
            assert!(serde_json::from_str::<Request>(bad).is_err(), "{bad}");
        }
        let e = Response::error(ErrorKind::UnknownVm, "no VM named \"x\"");
        assert_eq!(
            serde_json::to_string(&e).unwrap(),
            r#"{"error":{"kind":"unknown_vm","message":"no VM named \"x\""}}"#
        );
    }

    #[tokio::test(flavor = "current_thread")]
    async fn a_line_too_long_or_cut_short_is_an_error_not_a_hang() {
        let long = vec![b'x'; MAX_LINE + 10];
        let got = read_line::<Request, _>(&long[..], MAX_LINE).await;
        assert!(matches!(got, Err(LineError::TooLong(_))), "{got:?}");
        let got = read_line::<Request, _>(&br#"{"cmd":"list"}"#[..], MAX_LINE).await;
        assert!(matches!(got, Err(LineError::Closed)), "{got:?}");
        let got = read_line::<Request, _>(&b"{\"cmd\":\"list\"}\n"[..], MAX_LINE).await;
        assert_eq!(got.unwrap(), Request::List);
    }
}
