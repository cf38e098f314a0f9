//! QMP, QEMU's machine protocol: one line of JSON per message over the VM's monitor socket.
//! QEMU greets, the client enables commands (`qmp_capabilities`), then sends commands that
//! each get one `return` or `error` (matched by `id`), and QEMU sends events (`STOP`,
//! `RESUME`, `SHUTDOWN`...) whenever they happen. The connection ends when QEMU exits: that
//! end is how the backend learns that a VM stopped, whoever stopped it.
//!
//! Owns the messages (pure: [`parse`], [`command`]) and one connection ([`Qmp`]): a reader
//! thread per VM that answers the greeting, hands replies to the callers waiting for them and
//! events to the backend, and says when the connection closed. What an event means for the
//! VM is the backend's.
//!
//! Hand-written over serde_json rather than the `qapi` crate: its blocking client sees events
//! only while it waits for a command's reply (waiting for one would mean polling with
//! commands) and panics when QEMU closes the socket before greeting; its tokio client
//! unwraps its locks; and its generated schema (a recent QEMU's) is thousands of types for the
//! five commands and three events used here.

use std::collections::HashMap;
use std::io::{self, BufRead as _, BufReader, Read as _, Write as _};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use serde_json::{Map, Value, json};

/// The longest line read from QEMU; a longer one is skipped (no reply or event of ours comes
/// near it).
const MAX_LINE: usize = 64 * 1024;
/// How long a write to QEMU may block.
const WRITE_TIMEOUT: Duration = Duration::from_secs(2);
/// The id of the `qmp_capabilities` the reader sends on the greeting.
const CAPABILITIES_ID: u64 = 0;

/// Why a QMP exchange failed.
#[derive(Debug, Clone, thiserror::Error)]
pub(crate) enum QmpError {
    /// The socket could not be reached.
    #[error("connecting to QMP at {path}: {why}")]
    Connect {
        /// The socket.
        path: String,
        /// Why.
        why: String,
    },
    /// QEMU closed the connection (it exited) before answering.
    #[error("QEMU closed its QMP connection")]
    Closed,
    /// No answer in time.
    #[error("{command}: no answer from QEMU within {timeout:?}")]
    Timeout {
        /// The command.
        command: String,
        /// How long it waited.
        timeout: Duration,
    },
    /// QEMU refused the command.
    #[error("{command}: QEMU says {class}: {desc}")]
    Refused {
        /// The command.
        command: String,
        /// QMP's error class (`GenericError`, `CommandNotFound`...).
        class: String,
        /// QEMU's description.
        desc: String,
    },
    /// Writing the command failed.
    #[error("{command}: writing to QEMU: {why}")]
    Write {
        /// The command.
        command: String,
        /// Why.
        why: String,
    },
    /// A line that is not a QMP message.
    #[error("not a QMP message: {0}")]
    Malformed(String),
}

/// One message from QEMU.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Incoming {
    /// The greeting, with QEMU's version (`7.2.22`).
    Greeting {
        /// `major.minor.micro`.
        version: String,
    },
    /// A command's success.
    Return {
        /// The id it was sent with.
        id: Option<u64>,
        /// What it returned.
        value: Value,
    },
    /// A command's failure.
    Error {
        /// The id it was sent with.
        id: Option<u64>,
        /// QMP's error class.
        class: String,
        /// QEMU's description.
        desc: String,
    },
    /// An event.
    Event {
        /// `STOP`, `RESUME`, `SHUTDOWN`...
        name: String,
        /// Its data (`{}` if none).
        data: Value,
    },
}

/// Reads one line from QEMU.
pub(crate) fn parse(line: &[u8]) -> Result<Incoming, QmpError> {
    let malformed = || QmpError::Malformed(String::from_utf8_lossy(line).trim_end().to_string());
    let v: Map<String, Value> = serde_json::from_slice(line).map_err(|_| malformed())?;
    let id = v.get("id").and_then(Value::as_u64);
    if let Some(greeting) = v.get("QMP") {
        let n = |k: &str| {
            greeting
                .pointer(&format!("/version/qemu/{k}"))
                .and_then(Value::as_u64)
                .unwrap_or(0)
        };
        return Ok(Incoming::Greeting {
            version: format!("{}.{}.{}", n("major"), n("minor"), n("micro")),
        });
    }
    if let Some(value) = v.get("return") {
        return Ok(Incoming::Return {
            id,
            value: value.clone(),
        });
    }
    if let Some(e) = v.get("error") {
        let text = |k: &str| e.get(k).and_then(Value::as_str).unwrap_or("").to_string();
        return Ok(Incoming::Error {
            id,
            class: text("class"),
            desc: text("desc"),
        });
    }
    if let Some(name) = v.get("event").and_then(Value::as_str) {
        return Ok(Incoming::Event {
            name: name.to_string(),
            data: v.get("data").cloned().unwrap_or_else(|| json!({})),
        });
    }
    Err(malformed())
}

/// The line that executes `name` (with `args`, if any) as command `id`.
pub(crate) fn command(id: u64, name: &str, args: Option<Value>) -> Vec<u8> {
    let mut m = json!({ "execute": name, "id": id });
    if let Some(a) = args {
        m["arguments"] = a;
    }
    let mut line = m.to_string().into_bytes();
    line.push(b'\n');
    line
}

/// What the reader thread tells the backend.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Notice {
    /// QEMU sent an event.
    Event(String),
    /// The connection ended: QEMU exited (or closed its monitor).
    Closed,
}

/// What the reader thread and the callers share.
#[derive(Debug, Default)]
struct Shared {
    /// Commands are enabled (the capabilities were accepted).
    ready: bool,
    /// The connection ended.
    closed: bool,
    /// QEMU's version, from the greeting.
    version: Option<String>,
    next_id: u64,
    /// Answers by id: `None` while awaited.
    answers: HashMap<u64, Option<Result<Value, QmpError>>>,
}

/// One QMP connection. Commands may be sent from any thread, one at a time or several; the
/// reader thread matches their answers by id.
#[derive(Debug)]
pub(crate) struct Qmp {
    writer: Mutex<UnixStream>,
    shared: Mutex<Shared>,
    changed: Condvar,
}

impl Qmp {
    /// Connects to the monitor socket at `path` (a QEMU that runs already).
    pub(crate) fn connect(
        path: &Path,
        notify: impl FnMut(Notice) + Send + 'static,
    ) -> Result<Arc<Qmp>, QmpError> {
        let stream = UnixStream::connect(path).map_err(|e| QmpError::Connect {
            path: path.display().to_string(),
            why: e.to_string(),
        })?;
        Self::over(stream, notify).map_err(|e| QmpError::Connect {
            path: path.display().to_string(),
            why: e.to_string(),
        })
    }

    /// Speaks QMP over `stream`, already connected (possibly to a socket QEMU has not
    /// accepted on yet: the greeting comes when it does). `notify` hears of events and of the
    /// end, from the reader thread.
    pub(crate) fn over(
        stream: UnixStream,
        notify: impl FnMut(Notice) + Send + 'static,
    ) -> io::Result<Arc<Qmp>> {
        stream.set_write_timeout(Some(WRITE_TIMEOUT))?;
        let reader = stream.try_clone()?;
        let qmp = Arc::new(Qmp {
            writer: Mutex::new(stream),
            shared: Mutex::new(Shared {
                next_id: CAPABILITIES_ID + 1,
                ..Shared::default()
            }),
            changed: Condvar::new(),
        });
        let q = qmp.clone();
        std::thread::Builder::new()
            .name("jitsu-qmp".into())
            .spawn(move || q.read_loop(reader, notify))?;
        Ok(qmp)
    }

    fn shared(&self) -> MutexGuard<'_, Shared> {
        self.shared.lock().expect("QMP state lock poisoned")
    }

    /// QEMU's version, once it greeted.
    pub(crate) fn version(&self) -> Option<String> {
        self.shared().version.clone()
    }

    /// True once the connection ended.
    pub(crate) fn is_closed(&self) -> bool {
        self.shared().closed
    }

    fn write(&self, line: &[u8]) -> io::Result<()> {
        let mut w = self.writer.lock().expect("QMP writer lock poisoned");
        w.write_all(line)
    }

    /// Runs `name` (with `args`) and returns what it returned; waits at most `timeout` in all
    /// (for the greeting too, on a connection QEMU has not accepted yet).
    pub(crate) fn execute(
        &self,
        name: &str,
        args: Option<Value>,
        timeout: Duration,
    ) -> Result<Value, QmpError> {
        let deadline = Instant::now() + timeout;
        let timed_out = || QmpError::Timeout {
            command: name.to_string(),
            timeout,
        };
        let mut s = self.wait(self.shared(), deadline, |s| s.ready || s.closed);
        if s.closed {
            return Err(QmpError::Closed);
        }
        if !s.ready {
            return Err(timed_out());
        }
        let id = s.next_id;
        s.next_id += 1;
        s.answers.insert(id, None);
        drop(s);
        if let Err(e) = self.write(&command(id, name, args)) {
            self.shared().answers.remove(&id);
            return Err(QmpError::Write {
                command: name.to_string(),
                why: e.to_string(),
            });
        }
        let mut s = self.wait(self.shared(), deadline, |s| {
            s.closed || matches!(s.answers.get(&id), Some(Some(_)))
        });
        match s.answers.remove(&id) {
            Some(Some(Ok(v))) => Ok(v),
            Some(Some(Err(QmpError::Refused { class, desc, .. }))) => Err(QmpError::Refused {
                command: name.to_string(),
                class,
                desc,
            }),
            Some(Some(Err(e))) => Err(e),
            _ if s.closed => Err(QmpError::Closed),
            _ => Err(timed_out()),
        }
    }

    /// Waits on the condition variable until `done` or `deadline`.
    fn wait<'a>(
        &'a self,
        mut s: MutexGuard<'a, Shared>,
        deadline: Instant,
        done: impl Fn(&Shared) -> bool,
    ) -> MutexGuard<'a, Shared> {
        while !done(&s) {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            s = self
                .changed
                .wait_timeout(s, left)
                .expect("QMP state lock poisoned")
                .0;
        }
        s
    }

    fn read_loop(&self, stream: UnixStream, mut notify: impl FnMut(Notice)) {
        let mut r = BufReader::new(stream);
        let mut line = Vec::with_capacity(512);
        loop {
            line.clear();
            let n = match (&mut r)
                .take(MAX_LINE as u64 + 1)
                .read_until(b'\n', &mut line)
            {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    tracing::debug!(error = %e, "QMP read failed: taking the connection as closed");
                    0
                }
            };
            if n == 0 {
                break;
            }
            if line.last() != Some(&b'\n') && line.len() > MAX_LINE {
                tracing::warn!(bytes = line.len(), "QMP line too long: skipped");
                if skip_line(&mut r).is_err() {
                    break;
                }
                continue;
            }
            match parse(&line) {
                Ok(msg) => self.on_message(msg, &mut notify),
                Err(e) => tracing::debug!(error = %e, "QMP line skipped"),
            }
        }
        let mut s = self.shared();
        s.closed = true;
        drop(s);
        self.changed.notify_all();
        notify(Notice::Closed);
    }

    fn on_message(&self, msg: Incoming, notify: &mut impl FnMut(Notice)) {
        match msg {
            Incoming::Greeting { version } => {
                self.shared().version = Some(version);
                if let Err(e) = self.write(&command(CAPABILITIES_ID, "qmp_capabilities", None)) {
                    tracing::warn!(error = %e, "QMP: enabling commands failed");
                }
            }
            Incoming::Return { id, value } => self.answer(id, Ok(value)),
            Incoming::Error { id, class, desc } => self.answer(
                id,
                Err(QmpError::Refused {
                    command: String::new(),
                    class,
                    desc,
                }),
            ),
            Incoming::Event { name, .. } => notify(Notice::Event(name)),
        }
    }

    fn answer(&self, id: Option<u64>, result: Result<Value, QmpError>) {
        let mut s = self.shared();
        match id {
            Some(CAPABILITIES_ID) => {
                if let Err(e) = &result {
                    tracing::warn!(error = %e, "QMP: QEMU refused qmp_capabilities");
                }
                s.ready = true;
            }
            Some(id) => {
                if let Some(slot) = s.answers.get_mut(&id) {
                    *slot = Some(result);
                }
            }
            None => tracing::debug!("QMP answer without an id: ignored"),
        }
        drop(s);
        self.changed.notify_all();
    }
}

/// Reads and drops the rest of an overlong line.
fn skip_line(r: &mut impl io::BufRead) -> io::Result<()> {
    loop {
        let buf = r.fill_buf()?;
        if buf.is_empty() {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        if let Some(i) = buf.iter().position(|b| *b == b'\n') {
            r.consume(i + 1);
            return Ok(());
        }
        let n = buf.len();
        r.consume(n);
    }
}

#[cfg(test)]
mod tests {
    use std::sync::mpsc;

    use super::*;

    /// Lines exactly as QEMU 7.2 writes them.
    const GREETING: &[u8] = br#"{"QMP": {"version": {"qemu": {"micro": 22, "minor": 2, "major": 7}, "package": "Debian 1:7.2+dfsg-7+deb12u18"}, "capabilities": ["oob"]}}"#;
    const STATUS: &[u8] =
        br#"{"return": {"status": "paused", "singlestep": false, "running": false}, "id": 3}"#;
    const STOP: &[u8] =
        br#"{"timestamp": {"seconds": 1796546390, "microseconds": 720403}, "event": "STOP"}"#;
    const REFUSED: &[u8] =
        br#"{"id": 4, "error": {"class": "CommandNotFound", "desc": "The command nope has not been found"}}"#;

    #[test]
    fn qemus_messages_are_read() {
        assert_eq!(
            parse(GREETING).unwrap(),
            Incoming::Greeting {
                version: "7.2.22".into()
            }
        );
        assert_eq!(
            parse(STATUS).unwrap(),
            Incoming::Return {
                id: Some(3),
                value: json!({"status": "paused", "singlestep": false, "running": false})
            }
        );
        assert_eq!(
            parse(STOP).unwrap(),
            Incoming::Event {
                name: "STOP".into(),
                data: json!({})
            }
        );
        assert_eq!(
            parse(REFUSED).unwrap(),
            Incoming::Error {
                id: Some(4),
                class: "CommandNotFound".into(),
                desc: "The command nope has not been found".into()
            }
        );
        for bad in [&b"not json"[..], b"[1]", b"{\"id\": 1}", b""] {
            assert!(matches!(parse(bad), Err(QmpError::Malformed(_))), "{bad:?}");
        }
    }

    #[test]
    fn commands_are_one_line_with_their_id() {
        let line = command(7, "stop", None);
        assert_eq!(line.last(), Some(&b'\n'));
        let v: Value = serde_json::from_slice(&line).unwrap();
        assert_eq!(v, json!({"execute": "stop", "id": 7}));
        let v: Value =
            serde_json::from_slice(&command(8, "migrate", Some(json!({"uri": "x"})))).unwrap();
        assert_eq!(v["arguments"]["uri"], "x");
    }

    /// A QMP peer on the other end of a socket pair: greets, accepts the capabilities, answers
    /// `query-status` running and `stop` with a STOP event before its return, refuses anything
    /// else, and closes after `quit`.
    fn fake_qemu(sock: UnixStream) {
        let mut w = sock.try_clone().unwrap();
        let mut r = BufReader::new(sock);
        w.write_all(GREETING).unwrap();
        w.write_all(b"\r\n").unwrap();
        let mut line = String::new();
        while r.read_line(&mut line).unwrap() > 0 {
            let v: Value = serde_json::from_str(&line).unwrap();
            let id = v["id"].clone();
            let out = match v["execute"].as_str().unwrap() {
                "qmp_capabilities" => json!({"return": {}, "id": id}).to_string(),
                "query-status" => {
                    json!({"return": {"status": "running", "running": true}, "id": id}).to_string()
                }
                "stop" => format!(
                    "{}\r\n{}",
                    String::from_utf8_lossy(STOP),
                    json!({"return": {}, "id": id})
                ),
                "quit" => {
                    w.write_all(format!("{}\r\n", json!({"return": {}, "id": id})).as_bytes())
                        .unwrap();
                    return;
                }
                other => json!({"error": {"class": "CommandNotFound", "desc": format!("The command {other} has not been found")}, "id": id}).to_string(),
            };
            w.write_all(format!("{out}\r\n").as_bytes()).unwrap();
            line.clear();
        }
    }

    #[test]
    fn commands_get_their_answers_events_are_told_and_the_end_is_seen() {
        let (ours, theirs) = UnixStream::pair().unwrap();
        let peer = std::thread::spawn(move || fake_qemu(theirs));
        let (tx, rx) = mpsc::channel();
        let qmp = Qmp::over(ours, move |n| tx.send(n).unwrap()).unwrap();
        let t = Duration::from_secs(10);
        assert_eq!(
            qmp.execute("query-status", None, t).unwrap()["status"],
            "running"
        );
        assert_eq!(qmp.version().as_deref(), Some("7.2.22"));
        qmp.execute("stop", None, t).unwrap();
        assert_eq!(rx.recv().unwrap(), Notice::Event("STOP".into()));
        let e = qmp.execute("nope", None, t).unwrap_err();
        assert_eq!(
            e.to_string(),
            "nope: QEMU says CommandNotFound: The command nope has not been found"
        );
        qmp.execute("quit", None, t).unwrap();
        peer.join().unwrap();
        assert_eq!(rx.recv().unwrap(), Notice::Closed);
        assert!(qmp.is_closed());
        assert!(matches!(
            qmp.execute("query-status", None, t),
            Err(QmpError::Closed)
        ));
    }

    #[test]
    fn a_qemu_that_never_greets_times_out_and_one_that_closes_ends_the_wait() {
        let (ours, theirs) = UnixStream::pair().unwrap();
        let qmp = Qmp::over(ours, |_| {}).unwrap();
        let e = qmp
            .execute("query-status", None, Duration::from_millis(50))
            .unwrap_err();
        assert!(matches!(e, QmpError::Timeout { .. }), "{e}");
        drop(theirs);
        let e = qmp
            .execute("query-status", None, Duration::from_secs(10))
            .unwrap_err();
        assert!(matches!(e, QmpError::Closed), "{e}");
    }
}
