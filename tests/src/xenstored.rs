//! A small Xenstore daemon speaking the real wire protocol over a Unix socket, for tests.
//!
//! No xenstored can run without Xen, so the Xenstore paths of both daemons are tested against
//! this one, and what they wrote is checked with Debian's `xenstore-ls`/`xenstore-read`
//! (`XENSTORED_PATH=<socket>`), real clients nobody here wrote. It implements what those
//! clients and the daemons use: READ, WRITE, MKDIR, RM, DIRECTORY, DIRECTORY_PART,
//! GET_PERMS, SET_PERMS, TRANSACTION_START/END (optimistic: a commit after a conflicting
//! change gets EAGAIN), WATCH/UNWATCH with WATCH_EVENT, GET_DOMAIN_PATH, RESET_WATCHES.
//! Every connection is dom0 (the socket is the privileged interface), so permissions are
//! stored and reported but not enforced.

use std::collections::{BTreeMap, HashMap};
use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;

use synjitsu::store::xs_wire::{Access, Perm, XsMsg, XsType};

/// One node: a value, permissions and children.
#[derive(Debug, Clone)]
struct Node {
    value: Vec<u8>,
    perms: Vec<Perm>,
    children: BTreeMap<String, Node>,
}

impl Node {
    fn new(perms: Vec<Perm>) -> Node {
        Node {
            value: Vec::new(),
            perms,
            children: BTreeMap::new(),
        }
    }
}

fn split(path: &str) -> Result<Vec<&str>, &'static str> {
    let valid = path.starts_with('/')
        && path
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"/_@-".contains(&b))
        && !path.contains("//")
        && (path == "/" || !path.ends_with('/'));
    if !valid {
        return Err("EINVAL");
    }
    Ok(path.split('/').filter(|c| !c.is_empty()).collect())
}

fn lookup<'a>(root: &'a Node, path: &str) -> Result<&'a Node, &'static str> {
    let mut n = root;
    for c in split(path)? {
        n = n.children.get(c).ok_or("ENOENT")?;
    }
    Ok(n)
}

fn lookup_mut<'a>(root: &'a mut Node, path: &str) -> Result<&'a mut Node, &'static str> {
    let mut n = root;
    for c in split(path)? {
        n = n.children.get_mut(c).ok_or("ENOENT")?;
    }
    Ok(n)
}

/// Creates `path` and missing parents; new nodes inherit their parent's permissions, as in
/// xenstored.
fn create<'a>(root: &'a mut Node, path: &str) -> Result<&'a mut Node, &'static str> {
    let mut n = root;
    for c in split(path)? {
        let perms = n.perms.clone();
        n = n
            .children
            .entry(c.to_string())
            .or_insert_with(|| Node::new(perms));
    }
    Ok(n)
}

/// A named tree: the store or a transaction's private copy of it.
#[derive(Debug)]
struct Tx {
    root: Node,
    base_generation: u64,
    changed: Vec<String>,
}

#[derive(Debug)]
struct State {
    root: Node,
    generation: u64,
    next_tx: u32,
    txs: HashMap<u32, Tx>,
    /// (connection id, path, token).
    watches: Vec<(u64, String, String)>,
    conns: HashMap<u64, UnixStream>,
}

impl State {
    fn fire(&mut self, changed: &str) {
        for (conn, path, token) in &self.watches {
            let hit = changed == path
                || (changed.starts_with(path.as_str())
                    && (path == "/" || changed.as_bytes().get(path.len()) == Some(&b'/')));
            if hit && let Some(stream) = self.conns.get_mut(conn) {
                let mut buf = Vec::new();
                let ev = XsMsg::new(
                    XsType::WatchEvent,
                    0,
                    0,
                    &[changed.as_bytes(), token.as_bytes()],
                );
                if ev.encode(&mut buf).is_ok() {
                    let _ = stream.write_all(&buf);
                }
            }
        }
    }

    /// Runs one request; returns the answer and the paths it changed (for watches).
    fn handle(&mut self, conn: u64, m: &XsMsg) -> (XsMsg, Vec<String>) {
        match self.apply(conn, m) {
            Ok((reply_parts, changed)) => {
                let parts: Vec<&[u8]> = reply_parts.iter().map(|p| p.as_slice()).collect();
                let mut reply = XsMsg::new(m.ty, m.req_id, m.tx_id, &parts);
                if m.ty == XsType::Read {
                    // READ answers carry the bare value, without a final NUL.
                    reply.payload.pop();
                }
                (reply, changed)
            }
            Err(e) => (XsMsg::error(m.req_id, m.tx_id, e), Vec::new()),
        }
    }

    #[allow(clippy::type_complexity)]
    fn apply(&mut self, conn: u64, m: &XsMsg) -> Result<(Vec<Vec<u8>>, Vec<String>), &'static str> {
        let parts = m.parts();
        let arg = |i: usize| -> Result<String, &'static str> {
            parts
                .get(i)
                .map(|p| String::from_utf8_lossy(p).into_owned())
                .ok_or("EINVAL")
        };
        let ok = || vec![b"OK".to_vec()];
        // Transactions work on a private copy, committed whole.
        let tx_id = m.tx_id;
        if tx_id != 0 && !self.txs.contains_key(&tx_id) {
            return Err("ENOENT");
        }
        let root = if tx_id == 0 {
            &mut self.root
        } else {
            &mut self.txs.get_mut(&tx_id).expect("checked above").root
        };
        let result: (Vec<Vec<u8>>, Vec<String>) = match m.ty {
            XsType::Read => (vec![lookup(root, &arg(0)?)?.value.clone()], vec![]),
            XsType::Directory => {
                let n = lookup(root, &arg(0)?)?;
                (
                    n.children.keys().map(|k| k.as_bytes().to_vec()).collect(),
                    vec![],
                )
            }
            XsType::DirectoryPart => {
                let n = lookup(root, &arg(0)?)?;
                let offset: usize = arg(1)?.parse().map_err(|_| "EINVAL")?;
                let mut listing = Vec::new();
                for k in n.children.keys() {
                    listing.extend_from_slice(k.as_bytes());
                    listing.push(0);
                }
                let rest = listing.get(offset..).unwrap_or_default().to_vec();
                let mut out = vec![self.generation.to_string().into_bytes()];
                out.extend(rest.split(|b| *b == 0).map(<[u8]>::to_vec));
                (out, vec![])
            }
            XsType::GetPerms => {
                let n = lookup(root, &arg(0)?)?;
                (
                    n.perms.iter().map(|p| p.to_string().into_bytes()).collect(),
                    vec![],
                )
            }
            XsType::Write => {
                let split_at = m.payload.iter().position(|b| *b == 0).ok_or("EINVAL")?;
                let path = String::from_utf8_lossy(&m.payload[..split_at]).into_owned();
                create(root, &path)?.value = m.payload[split_at + 1..].to_vec();
                (ok(), vec![path])
            }
            XsType::Mkdir => {
                let path = arg(0)?;
                create(root, &path)?;
                (ok(), vec![path])
            }
            XsType::Rm => {
                let path = arg(0)?;
                let comps = split(&path)?;
                let (last, parent) = comps.split_last().ok_or("EINVAL")?;
                let parent_path = format!("/{}", parent.join("/"));
                let p = lookup_mut(root, &parent_path)?;
                // xenstored: removing an absent child of an existing node is not an error.
                p.children.remove(*last);
                (ok(), vec![path])
            }
            XsType::SetPerms => {
                let path = arg(0)?;
                let perms = parts[1..]
                    .iter()
                    .filter(|p| !p.is_empty())
                    .map(|p| {
                        std::str::from_utf8(p)
                            .ok()
                            .and_then(|s| s.parse::<Perm>().ok())
                            .ok_or("EINVAL")
                    })
                    .collect::<Result<Vec<_>, _>>()?;
                if perms.is_empty() {
                    return Err("EINVAL");
                }
                lookup_mut(root, &path)?.perms = perms;
                (ok(), vec![path])
            }
            XsType::TransactionStart => {
                self.next_tx += 1;
                let id = self.next_tx;
                self.txs.insert(
                    id,
                    Tx {
                        root: self.root.clone(),
                        base_generation: self.generation,
                        changed: Vec::new(),
                    },
                );
                (vec![id.to_string().into_bytes()], vec![])
            }
            XsType::TransactionEnd => {
                let tx = self.txs.remove(&tx_id).ok_or("ENOENT")?;
                if arg(0)? == "T" {
                    if tx.base_generation != self.generation && !tx.changed.is_empty() {
                        return Err("EAGAIN");
                    }
                    if !tx.changed.is_empty() {
                        self.root = tx.root;
                        self.generation += 1;
                    }
                    // The transaction is gone: its changes are reported, not recorded again.
                    return Ok((ok(), tx.changed));
                } else {
                    (ok(), vec![])
                }
            }
            XsType::Watch => {
                let (path, token) = (arg(0)?, arg(1)?);
                self.watches.push((conn, path.clone(), token));
                // xenstored fires every new watch once.
                (ok(), vec![path])
            }
            XsType::Unwatch => {
                let (path, token) = (arg(0)?, arg(1)?);
                self.watches
                    .retain(|(c, p, t)| !(*c == conn && *p == path && *t == token));
                (ok(), vec![])
            }
            XsType::ResetWatches => {
                self.watches.retain(|(c, _, _)| *c != conn);
                (ok(), vec![])
            }
            XsType::GetDomainPath => {
                let domid: u32 = arg(0)?.parse().map_err(|_| "EINVAL")?;
                (vec![format!("/local/domain/{domid}").into_bytes()], vec![])
            }
            _ => return Err("EINVAL"),
        };
        let (reply, changed) = result;
        if changed.is_empty() || m.ty == XsType::Watch {
            return Ok((reply, changed));
        }
        if tx_id != 0 {
            // Watches fire when the transaction commits, not before.
            self.txs
                .get_mut(&tx_id)
                .expect("checked above")
                .changed
                .extend(changed);
            Ok((reply, vec![]))
        } else {
            self.generation += 1;
            Ok((reply, changed))
        }
    }
}

/// A running test xenstored; stops and removes its socket when dropped.
#[derive(Debug)]
pub struct TestXenstored {
    path: PathBuf,
    state: Arc<Mutex<State>>,
    stop: Arc<AtomicBool>,
    accept: Option<thread::JoinHandle<()>>,
}

impl TestXenstored {
    /// Listens on `socket` (removed first if stale). The tree starts as xenstored's:
    /// `/` and `/local/domain`, owned by dom0 with no access for others.
    pub fn start(socket: &Path) -> std::io::Result<TestXenstored> {
        let _ = std::fs::remove_file(socket);
        let listener = UnixListener::bind(socket)?;
        let mut root = Node::new(vec![Perm::new(Access::None, 0)]);
        create(&mut root, "/local/domain").expect("a valid path");
        let state = Arc::new(Mutex::new(State {
            root,
            generation: 0,
            next_tx: 0,
            txs: HashMap::new(),
            watches: Vec::new(),
            conns: HashMap::new(),
        }));
        let stop = Arc::new(AtomicBool::new(false));
        let (st, sp) = (state.clone(), stop.clone());
        // Polled, so that dropping the daemon never depends on reaching its socket file.
        listener.set_nonblocking(true)?;
        let accept = thread::spawn(move || {
            let mut next_conn = 0u64;
            while !sp.load(Ordering::SeqCst) {
                let stream = match listener.accept() {
                    Ok((s, _)) => s,
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                        thread::sleep(std::time::Duration::from_millis(5));
                        continue;
                    }
                    Err(_) => continue,
                };
                if stream.set_nonblocking(false).is_err() {
                    continue;
                }
                next_conn += 1;
                let conn = next_conn;
                if let Ok(w) = stream.try_clone() {
                    st.lock().expect("state lock").conns.insert(conn, w);
                }
                let st = st.clone();
                thread::spawn(move || serve(conn, stream, &st));
            }
        });
        Ok(TestXenstored {
            path: socket.to_path_buf(),
            state,
            stop,
            accept: Some(accept),
        })
    }

    /// The socket path, for `XENSTORED_PATH`.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// A node's value, read directly (for assertions).
    pub fn read(&self, path: &str) -> Option<Vec<u8>> {
        let st = self.state.lock().expect("state lock");
        lookup(&st.root, path).ok().map(|n| n.value.clone())
    }

    /// A node's permissions, read directly.
    pub fn perms(&self, path: &str) -> Option<Vec<Perm>> {
        let st = self.state.lock().expect("state lock");
        lookup(&st.root, path).ok().map(|n| n.perms.clone())
    }

    /// Writes a node directly, firing watches (as another domain would).
    pub fn write(&self, path: &str, value: &[u8]) {
        let mut st = self.state.lock().expect("state lock");
        create(&mut st.root, path).expect("a valid path").value = value.to_vec();
        st.generation += 1;
        st.fire(path);
    }
}

impl Drop for TestXenstored {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(h) = self.accept.take() {
            let _ = h.join();
        }
        let mut st = self.state.lock().expect("state lock");
        for (_, s) in st.conns.drain() {
            let _ = s.shutdown(std::net::Shutdown::Both);
        }
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Sends one request on `stream` and reads its answer (which may be an `ERROR`): a minimal
/// blocking client for tests that talk to a xenstored directly.
pub fn call(stream: &mut UnixStream, msg: &XsMsg) -> std::io::Result<XsMsg> {
    let mut out = Vec::new();
    msg.encode(&mut out).map_err(std::io::Error::other)?;
    stream.write_all(&out)?;
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        if let Some((answer, _)) = XsMsg::decode(&buf).map_err(std::io::Error::other)? {
            return Ok(answer);
        }
        let n = stream.read(&mut chunk)?;
        if n == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

fn serve(conn: u64, mut stream: UnixStream, state: &Mutex<State>) {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 8192];
    loop {
        let n = match stream.read(&mut chunk) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        buf.extend_from_slice(&chunk[..n]);
        loop {
            let (msg, used) = match XsMsg::decode(&buf) {
                Ok(Some(x)) => x,
                Ok(None) => break,
                // A client that breaks framing is dropped, as xenstored does.
                Err(_) => return drop_conn(conn, state),
            };
            buf.drain(..used);
            let mut st = state.lock().expect("state lock");
            let (reply, changed) = st.handle(conn, &msg);
            let mut out = Vec::new();
            if reply.encode(&mut out).is_err() {
                out.clear();
                XsMsg::error(msg.req_id, msg.tx_id, "E2BIG")
                    .encode(&mut out)
                    .expect("an error fits");
            }
            if let Some(w) = st.conns.get_mut(&conn) {
                let _ = w.write_all(&out);
            }
            for path in changed {
                st.fire(&path);
            }
        }
    }
    drop_conn(conn, state);
}

fn drop_conn(conn: u64, state: &Mutex<State>) {
    let mut st = state.lock().expect("state lock");
    st.conns.remove(&conn);
    st.watches.retain(|(c, _, _)| *c != conn);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn call(s: &mut UnixStream, m: XsMsg) -> XsMsg {
        super::call(s, &m).unwrap()
    }

    #[test]
    fn transactions_commit_whole_or_get_eagain() {
        let dir = crate::Scratch::new("xsd-unit").unwrap();
        let xs = TestXenstored::start(&dir.join("sock")).unwrap();
        let mut a = UnixStream::connect(xs.path()).unwrap();
        a.set_read_timeout(Some(std::time::Duration::from_secs(5)))
            .unwrap();
        let t = call(&mut a, XsMsg::new(XsType::TransactionStart, 1, 0, &[b""]));
        let tx: u32 = t.text().parse().unwrap();
        call(&mut a, XsMsg::write(2, tx, "/ip/a", b"1"));
        assert_eq!(xs.read("/ip/a"), None, "invisible before commit");
        call(&mut a, XsMsg::new(XsType::TransactionEnd, 3, tx, &[b"T"]));
        assert_eq!(xs.read("/ip/a"), Some(b"1".to_vec()));

        let t = call(&mut a, XsMsg::new(XsType::TransactionStart, 4, 0, &[b""]));
        let tx: u32 = t.text().parse().unwrap();
        call(&mut a, XsMsg::write(5, tx, "/ip/b", b"2"));
        xs.write("/ip/c", b"conflict");
        let end = call(&mut a, XsMsg::new(XsType::TransactionEnd, 6, tx, &[b"T"]));
        assert_eq!((end.ty, end.text().as_str()), (XsType::Error, "EAGAIN"));
        assert_eq!(xs.read("/ip/b"), None);

        let r = call(&mut a, XsMsg::new(XsType::Read, 7, 0, &[b"/nope"]));
        assert_eq!(r.text(), "ENOENT");
        let r = call(&mut a, XsMsg::new(XsType::Read, 8, 0, &[b"/bad.path"]));
        assert_eq!(r.text(), "EINVAL");
    }
}
