//! synjitsu's own small, blocking Xenstore client, built on [`super::xs_wire`].
//!
//! Why not `xenstore-rs`: its 0.8 release always sends transaction id 0 and has no
//! `SET_PERMS`, and the hand-over needs both: each held SYN is written in one transaction
//! together with the check for `managed` and the permissions of `/ip/<vm-ip>`, so the guest
//! never sees half a SYN and no other domain ever sees any.
//!
//! Owns the connection (reconnecting once after an IO error), request ids, transactions
//! (retried on `EAGAIN`), and the layout operations of [`super::SynStore`]. It runs on the
//! store thread only ([`super::StoreWorker`]); every call blocks, with a socket timeout so a
//! stuck xenstored cannot hold the thread forever.

use std::io::{Read, Write};
use std::net::IpAddr;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::layout::{HeldSyn, MANAGED, ROOT, SynKey, ip_path};
use super::xs_wire::{Access, Perm, XsMsg, XsType};
use super::{StoreError, SynStore, WriteOutcome};

/// How long one request may take before the connection is given up.
const TIMEOUT: Duration = Duration::from_secs(5);
/// How many times a conflicting transaction is retried.
const MAX_ATTEMPTS: u32 = 16;

/// Where xenstored listens unless told otherwise.
pub const DEFAULT_SOCKET: &str = "/run/xenstored/socket";

/// A connection to xenstored's Unix socket.
#[derive(Debug)]
pub struct XenstoreClient {
    path: PathBuf,
    conn: Option<UnixStream>,
    next_req: u32,
    buf: Vec<u8>,
}

/// A failed call, before it is given a path for the error message.
enum CallError {
    Io(std::io::Error),
    Errno(String),
    Protocol(String),
}

impl XenstoreClient {
    /// Connects to the socket at `path` (fails at once if it cannot).
    pub fn connect(path: &Path) -> Result<XenstoreClient, StoreError> {
        let mut c = XenstoreClient {
            path: path.to_path_buf(),
            conn: None,
            next_req: 1,
            buf: Vec::new(),
        };
        let connected = c.ensure_connected().map(|_| ());
        match connected {
            Ok(()) => Ok(c),
            Err(e) => Err(c.err("connect", "", e)),
        }
    }

    fn ensure_connected(&mut self) -> Result<&mut UnixStream, CallError> {
        if self.conn.is_none() {
            let s = UnixStream::connect(&self.path).map_err(CallError::Io)?;
            s.set_read_timeout(Some(TIMEOUT)).map_err(CallError::Io)?;
            s.set_write_timeout(Some(TIMEOUT)).map_err(CallError::Io)?;
            self.buf.clear();
            self.conn = Some(s);
        }
        Ok(self.conn.as_mut().expect("just set"))
    }

    fn err(&self, op: &'static str, path: &str, e: CallError) -> StoreError {
        match e {
            CallError::Io(source) => StoreError::Io {
                path: self.path.display().to_string(),
                source,
            },
            CallError::Errno(errno) => StoreError::Refused {
                op,
                path: path.to_string(),
                errno,
            },
            CallError::Protocol(m) => StoreError::Protocol(m),
        }
    }

    /// Sends one request and reads its answer (skipping watch events, which this client
    /// never asks for but a daemon may still send after a reconnect).
    fn call(&mut self, msg: XsMsg) -> Result<XsMsg, CallError> {
        let req_id = msg.req_id;
        let mut out = Vec::new();
        msg.encode(&mut out)
            .map_err(|e| CallError::Protocol(e.to_string()))?;
        let r = self.exchange(&out, req_id);
        if let Err(CallError::Io(_)) = r {
            // The connection is unusable; the next call reconnects.
            self.conn = None;
        }
        r
    }

    fn exchange(&mut self, out: &[u8], req_id: u32) -> Result<XsMsg, CallError> {
        self.ensure_connected()?
            .write_all(out)
            .map_err(CallError::Io)?;
        let mut chunk = [0u8; 4096];
        loop {
            match XsMsg::decode(&self.buf) {
                Ok(Some((m, used))) => {
                    self.buf.drain(..used);
                    if m.ty == XsType::WatchEvent {
                        continue;
                    }
                    if m.req_id != req_id {
                        return Err(CallError::Protocol(format!(
                            "answer to request {} while waiting for {req_id}",
                            m.req_id
                        )));
                    }
                    if m.ty == XsType::Error {
                        return Err(CallError::Errno(m.text()));
                    }
                    return Ok(m);
                }
                Ok(None) => {}
                Err(e) => return Err(CallError::Protocol(e.to_string())),
            }
            let conn = self.conn.as_mut().expect("connected above");
            let n = conn.read(&mut chunk).map_err(CallError::Io)?;
            if n == 0 {
                return Err(CallError::Io(std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    "xenstored closed the connection",
                )));
            }
            self.buf.extend_from_slice(&chunk[..n]);
        }
    }

    fn req(&mut self) -> u32 {
        self.next_req = self.next_req.wrapping_add(1).max(1);
        self.next_req
    }

    /// Sends the message `msg` builds with a fresh request id and reads its answer.
    fn request(
        &mut self,
        op: &'static str,
        path: &str,
        msg: impl FnOnce(u32) -> XsMsg,
    ) -> Result<XsMsg, StoreError> {
        let id = self.req();
        self.call(msg(id)).map_err(|e| self.err(op, path, e))
    }

    /// A request of type `ty` naming only `path`.
    fn simple(
        &mut self,
        op: &'static str,
        ty: XsType,
        tx: u32,
        path: &str,
    ) -> Result<XsMsg, StoreError> {
        self.request(op, path, |id| XsMsg::new(ty, id, tx, &[path.as_bytes()]))
    }

    /// Reads a node: `None` if it does not exist.
    pub fn read(&mut self, tx: u32, path: &str) -> Result<Option<Vec<u8>>, StoreError> {
        let m = unless_errno(self.simple("read", XsType::Read, tx, path), "ENOENT")?;
        Ok(m.map(|m| m.payload))
    }

    /// Writes a node (creating its parents).
    pub fn write(&mut self, tx: u32, path: &str, value: &[u8]) -> Result<(), StoreError> {
        self.request("write", path, |id| XsMsg::write(id, tx, path, value))
            .map(|_| ())
    }

    /// Creates a node (and its parents) if absent.
    pub fn mkdir(&mut self, tx: u32, path: &str) -> Result<(), StoreError> {
        self.simple("mkdir", XsType::Mkdir, tx, path).map(|_| ())
    }

    /// Removes a node and its subtree; an absent node is not an error.
    pub fn rm(&mut self, tx: u32, path: &str) -> Result<(), StoreError> {
        unless_errno(self.simple("rm", XsType::Rm, tx, path), "ENOENT").map(|_| ())
    }

    /// Lists a node's children.
    pub fn directory(&mut self, tx: u32, path: &str) -> Result<Vec<String>, StoreError> {
        let m = self.simple("directory", XsType::Directory, tx, path)?;
        Ok(m.parts()
            .into_iter()
            .filter(|p| !p.is_empty())
            .map(|p| String::from_utf8_lossy(p).into_owned())
            .collect())
    }

    /// Sets a node's permissions.
    pub fn set_perms(&mut self, tx: u32, path: &str, perms: &[Perm]) -> Result<(), StoreError> {
        self.request("set_perms", path, |id| {
            XsMsg::set_perms(id, tx, path, perms)
        })
        .map(|_| ())
    }

    /// Starts a transaction; returns its id.
    pub fn transaction_start(&mut self) -> Result<u32, StoreError> {
        let m = self.request("transaction_start", "", |id| {
            XsMsg::new(XsType::TransactionStart, id, 0, &[b""])
        })?;
        m.text()
            .parse()
            .map_err(|_| StoreError::Protocol(format!("transaction id {:?}", m.text())))
    }

    /// Ends a transaction: `Ok(true)` committed, `Ok(false)` conflicted (`EAGAIN`: retry).
    pub fn transaction_end(&mut self, tx: u32, commit: bool) -> Result<bool, StoreError> {
        let flag: &[u8] = if commit { b"T" } else { b"F" };
        let r = self.request("transaction_end", "", |id| {
            XsMsg::new(XsType::TransactionEnd, id, tx, &[flag])
        });
        Ok(unless_errno(r, "EAGAIN")?.is_some())
    }

    fn try_write_syn(
        &mut self,
        tx: u32,
        domid: u32,
        key: &SynKey,
        syn: &HeldSyn,
    ) -> Result<WriteOutcome, StoreError> {
        let ip = ip_path(key.local_ip);
        if self.read(tx, &ip)?.as_deref() == Some(MANAGED.as_bytes()) {
            return Ok(WriteOutcome::Managed);
        }
        // The node is opened at the boot; set again here, in case opening failed or the
        // domain changed since (a new identity while booting).
        self.mkdir(tx, &ip)?;
        self.set_perms(tx, &ip, &guest_perms(domid))?;
        for (leaf, value) in syn.to_leaves() {
            self.write(tx, &key.leaf_path(leaf), value.as_bytes())?;
        }
        Ok(WriteOutcome::Written)
    }

    /// Runs `body` in a transaction until it commits, retrying conflicts; an IO error is
    /// retried once on a new connection.
    fn in_transaction<T>(
        &mut self,
        what: &str,
        mut body: impl FnMut(&mut Self, u32) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        let mut io_retry = true;
        for _ in 0..MAX_ATTEMPTS {
            let tx = match self.transaction_start() {
                Ok(tx) => tx,
                Err(StoreError::Io { .. }) if io_retry => {
                    io_retry = false;
                    continue;
                }
                Err(e) => return Err(e),
            };
            match body(self, tx) {
                Ok(v) => {
                    if self.transaction_end(tx, true)? {
                        return Ok(v);
                    }
                }
                Err(StoreError::Io { .. }) if io_retry => io_retry = false,
                Err(e) => {
                    let _ = self.transaction_end(tx, false);
                    return Err(e);
                }
            }
        }
        Err(StoreError::Conflict {
            path: what.to_string(),
            attempts: MAX_ATTEMPTS,
        })
    }
}

impl SynStore for XenstoreClient {
    fn prepare(&mut self) -> Result<usize, StoreError> {
        self.in_transaction(ROOT, |c, tx| {
            c.mkdir(tx, ROOT)?;
            let stale = c.directory(tx, ROOT)?;
            for child in &stale {
                c.rm(tx, &format!("{ROOT}/{child}"))?;
            }
            // The original made /ip writable by every domain; only dom0 needs it.
            c.set_perms(tx, ROOT, &[Perm::new(Access::None, 0)])?;
            Ok(stale.len())
        })
    }

    fn open(&mut self, domid: u32, ip: IpAddr) -> Result<(), StoreError> {
        let path = ip_path(ip);
        self.in_transaction(&path, |c, tx| {
            c.rm(tx, &path)?;
            c.write(tx, &path, b"")?;
            c.set_perms(tx, &path, &guest_perms(domid))
        })
    }

    fn seal(&mut self, ip: IpAddr) -> Result<(), StoreError> {
        let path = ip_path(ip);
        self.in_transaction(&path, |c, tx| {
            c.rm(tx, &path)?;
            c.write(tx, &path, b"")?;
            c.set_perms(tx, &path, &[Perm::new(Access::None, 0)])
        })
    }

    fn close(&mut self, ip: IpAddr) -> Result<(), StoreError> {
        let path = ip_path(ip);
        self.in_transaction(&path, |c, tx| c.rm(tx, &path))
    }

    fn write_syn(
        &mut self,
        domid: u32,
        key: &SynKey,
        syn: &HeldSyn,
    ) -> Result<WriteOutcome, StoreError> {
        let path = key.syn_path();
        self.in_transaction(&path, |c, tx| c.try_write_syn(tx, domid, key, syn))
    }

    fn remove(&mut self, key: &SynKey) -> Result<(), StoreError> {
        let path = key.conn_path();
        self.in_transaction(&path, |c, tx| c.rm(tx, &path))
    }
}

/// A guest's `/ip/<ip>`: owned by dom0, nobody else may look (`n0`), but the guest's domain
/// reads and writes it (`b<domid>`): it writes `managed` and removes what it took. Nodes
/// synjitsu creates under it inherit this (dom0 creating keeps the owner).
fn guest_perms(domid: u32) -> [Perm; 2] {
    [Perm::new(Access::None, 0), Perm::new(Access::Both, domid)]
}

/// `r`, but `Ok(None)` if xenstored refused the request with `errno`, which the caller
/// expects.
fn unless_errno(r: Result<XsMsg, StoreError>, errno: &str) -> Result<Option<XsMsg>, StoreError> {
    match r {
        Ok(m) => Ok(Some(m)),
        Err(StoreError::Refused { errno: e, .. }) if e == errno => Ok(None),
        Err(e) => Err(e),
    }
}

/// The socket for `--xenstore auto`: `$XENSTORED_PATH` if set, else [`DEFAULT_SOCKET`] if
/// it exists, else none (Xenstore hand-over off).
pub fn auto_socket() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("XENSTORED_PATH") {
        return Some(PathBuf::from(p));
    }
    let p = Path::new(DEFAULT_SOCKET);
    p.exists().then(|| p.to_path_buf())
}
