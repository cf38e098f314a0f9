//! A small Xenstore daemon speaking the real wire protocol over Unix sockets, for tests, with
//! the permission rules of Xen's own C xenstored.
//!
//! No xenstored can run without Xen, so the Xenstore paths of both daemons are tested against
//! this one, and what they wrote is checked with Debian's `xenstore-*` clients
//! (`XENSTORED_PATH=<socket>`), real clients nobody here wrote. It implements what those
//! clients, the daemons and an original MirageOS guest use: READ, WRITE, MKDIR, RM, DIRECTORY,
//! DIRECTORY_PART, GET_PERMS, SET_PERMS, TRANSACTION_START/END (optimistic: a commit after a
//! conflicting change gets EAGAIN), WATCH/UNWATCH with WATCH_EVENT, GET_DOMAIN_PATH,
//! RESET_WATCHES. Any other type is answered ENOSYS, as `docs/misc/xenstore.txt` says of
//! unsupported types.
//!
//! **Who is asking.** The main socket ([`TestXenstored::path`]) is dom0's, as xenstored's own
//! socket is on a real host. [`TestXenstored::domain_socket`] opens one more socket,
//! `d<domid>.sock` beside it, whose connections are that domain, as a guest's ring would be:
//! `XENSTORED_PATH=<dir>/d7.sock xenstore-write ...` writes as domain 7. (Real xenstored has no
//! way for a socket client to claim a domid; a socket per domain is what lets unmodified
//! clients act as a guest.)
//!
//! **The rules**, each as `tools/xenstored/core.c` of xen-project/xen does it (read at commit
//! c447b7308b13, the same in Debian 12's 4.17; the prose is `docs/misc/xenstore.txt`,
//! "Each node has one or multiple permission entries"):
//! - what a domain may do to a node (`perm_for_conn`): dom0 and the node's owner (the first
//!   entry's domid) everything; else the first further entry naming the domain; else the
//!   first entry's letter, which is what every other domain gets (`n`, `r`, `w`, `b`);
//! - READ, DIRECTORY, DIRECTORY_PART and GET_PERMS need read (`do_read`, `send_directory`,
//!   `send_directory_part`, `do_get_perms`); WRITE and MKDIR of an existing node and RM need
//!   write (`do_write`, `do_mkdir`, `do_rm`); SET_PERMS needs write and ownership, and a
//!   domain other than dom0 may not change the owner: EPERM (`do_set_perms`);
//! - a node that is refused is EACCES; a missing node is ENOENT only if its nearest existing
//!   ancestor grants the access asked for, else EACCES (`get_node_chk_perm`,
//!   `errno_from_parents`, `ask_parents`): so creating a node needs write access on the
//!   nearest existing ancestor;
//! - WRITE and MKDIR create the missing nodes down from that ancestor, each with its parent's
//!   permissions, and a domain other than dom0 owns what it creates: the first entry's domid
//!   becomes the creator's, its letter stays (`construct_node`);
//! - RM removes the whole subtree without looking at the children's permissions
//!   (`rm_node`), and removing a missing node whose parent exists succeeds (`do_rm`);
//! - a watch event goes only to a watcher that may read the changed node or its parent
//!   (`tools/xenstored/watch.c`, `watch_permitted`); here a removed node is judged by its
//!   nearest remaining ancestor, since its own permissions are gone when events fire;
//! - a transaction belongs to the connection that started it.
//!
//! Not modelled: relative paths (refused with EINVAL), quotas, INTRODUCE/RELEASE and the
//! special `@` watches, and the newer xenstored's dropping of entries that name a domain
//! that no longer exists (every domid is taken to exist).

use std::collections::{BTreeMap, HashMap};
use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;

use synjitsu::store::xs_wire::{Access, Perm, XsMsg, XsType};

/// `XS_PERM_READ`, `XS_PERM_WRITE`, `XS_PERM_OWNER`: what a domain may do to a node.
const READ: u8 = 1;
const WRITE: u8 = 2;
const OWNER: u8 = 4;

/// An error answer: the errno's name.
type Errno = &'static str;

fn access_bits(a: Access) -> u8 {
    match a {
        Access::None => 0,
        Access::Read => READ,
        Access::Write => WRITE,
        Access::Both => READ | WRITE,
    }
}

/// What `domid` may do to a node with `perms` (xenstored's `perm_for_conn`).
fn perm_for(domid: u32, perms: &[Perm]) -> u8 {
    let Some((owner, acl)) = perms.split_first() else {
        return 0;
    };
    if domid == 0 || owner.domid == domid {
        return READ | WRITE | OWNER;
    }
    acl.iter()
        .find(|p| p.domid == domid)
        .map_or(access_bits(owner.access), |p| access_bits(p.access))
}

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

fn split(path: &str) -> Result<Vec<&str>, Errno> {
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

/// The node at `path` and the nodes above it, root first; the node itself is missing if the
/// path ends before it.
fn walk<'a>(root: &'a Node, path: &str) -> Result<(Vec<&'a Node>, bool), Errno> {
    let comps = split(path)?;
    let mut chain = vec![root];
    for c in &comps {
        match chain.last().and_then(|n| n.children.get(*c)) {
            Some(n) => chain.push(n),
            None => return Ok((chain, false)),
        }
    }
    Ok((chain, true))
}

/// Whether `domid` has all of `need` on `path`: `Ok` if so, else the errno xenstored gives
/// (`get_node_chk_perm`): EACCES for a node it may not touch, and for a missing one unless
/// the nearest existing ancestor grants `need`, ENOENT then.
fn check(root: &Node, domid: u32, path: &str, need: u8) -> Result<(), Errno> {
    let (chain, found) = walk(root, path)?;
    let last = chain.last().expect("the root is always there");
    let perm = perm_for(domid, &last.perms);
    match (found, perm & need) {
        (true, got) if got == need => Ok(()),
        (true, _) => Err("EACCES"),
        (false, 0) => Err("EACCES"),
        (false, _) => Err("ENOENT"),
    }
}

fn lookup<'a>(root: &'a Node, path: &str) -> Result<&'a Node, Errno> {
    match walk(root, path)? {
        (chain, true) => Ok(chain.last().expect("found")),
        _ => Err("ENOENT"),
    }
}

fn lookup_mut<'a>(root: &'a mut Node, path: &str) -> Result<&'a mut Node, Errno> {
    let mut n = root;
    for c in split(path)? {
        n = n.children.get_mut(c).ok_or("ENOENT")?;
    }
    Ok(n)
}

/// `domid` reads `path` (with `need` on it): the node, or the errno.
fn get<'a>(root: &'a Node, domid: u32, path: &str, need: u8) -> Result<&'a Node, Errno> {
    check(root, domid, path, need)?;
    lookup(root, path)
}

/// Creates `path` and its missing parents as `domid` (the caller checked write access): each
/// new node takes its parent's permissions, and a domain other than dom0 owns what it
/// creates (`construct_node`).
fn create<'a>(root: &'a mut Node, domid: u32, path: &str) -> Result<&'a mut Node, Errno> {
    let mut n = root;
    for c in split(path)? {
        let mut perms = n.perms.clone();
        if domid != 0
            && let Some(owner) = perms.first_mut()
        {
            owner.domid = domid;
        }
        n = n
            .children
            .entry(c.to_string())
            .or_insert_with(|| Node::new(perms));
    }
    Ok(n)
}

/// `domid` writes `path`: the node, created if missing and allowed (WRITE, MKDIR).
fn get_for_write<'a>(root: &'a mut Node, domid: u32, path: &str) -> Result<&'a mut Node, Errno> {
    match check(root, domid, path, WRITE) {
        Ok(()) => lookup_mut(root, path),
        Err("ENOENT") => create(root, domid, path),
        Err(e) => Err(e),
    }
}

/// Whether a watch event for `path` may go to `domid`: it may read the node or its parent.
fn watch_permitted(root: &Node, domid: u32, path: &str) -> bool {
    let Ok((chain, found)) = walk(root, path) else {
        // A special path (`@...`) or anything else: only dom0 gets those.
        return domid == 0;
    };
    let parent = if found {
        chain.len().checked_sub(2).map(|i| chain[i])
    } else {
        chain.last().copied()
    };
    let node = found.then(|| chain[chain.len() - 1]);
    [node, parent]
        .into_iter()
        .flatten()
        .any(|n| perm_for(domid, &n.perms) & READ != 0)
}

/// A transaction's private copy of the tree.
#[derive(Debug)]
struct Tx {
    conn: u64,
    root: Node,
    base_generation: u64,
    changed: Vec<String>,
}

/// A client connection: how to write to it and which domain it is.
#[derive(Debug)]
struct Conn {
    stream: UnixStream,
    domid: u32,
}

#[derive(Debug)]
struct State {
    root: Node,
    generation: u64,
    next_tx: u32,
    txs: HashMap<u32, Tx>,
    /// (connection id, path, token).
    watches: Vec<(u64, String, String)>,
    conns: HashMap<u64, Conn>,
}

/// A change a client made (outside or inside a transaction), as the test's hook sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Change {
    /// The domain of the connection that asked.
    pub domid: u32,
    /// WRITE, MKDIR, RM or SET_PERMS.
    pub ty: XsType,
    /// The transaction (0: none).
    pub tx_id: u32,
    /// The node.
    pub path: String,
    /// WRITE's value; SET_PERMS's permissions, NUL-separated; empty for the others.
    pub value: Vec<u8>,
}

/// Called for every change a client makes, before its answer is sent: the client is still
/// waiting, so whatever the hook looks at is as it was at the moment of the change.
pub type Hook = Box<dyn Fn(&Change) + Send + Sync>;

impl State {
    fn domid(&self, conn: u64) -> u32 {
        self.conns.get(&conn).map_or(0, |c| c.domid)
    }

    fn fire(&mut self, changed: &str) {
        let root = &self.root;
        let conns = &mut self.conns;
        for (conn, path, token) in &self.watches {
            let hit = changed == path
                || (changed.starts_with(path.as_str())
                    && (path == "/" || changed.as_bytes().get(path.len()) == Some(&b'/')));
            if !hit {
                continue;
            }
            if let Some(c) = conns.get_mut(conn)
                && watch_permitted(root, c.domid, changed)
            {
                let mut buf = Vec::new();
                let ev = XsMsg::new(
                    XsType::WatchEvent,
                    0,
                    0,
                    &[changed.as_bytes(), token.as_bytes()],
                );
                if ev.encode(&mut buf).is_ok() {
                    let _ = c.stream.write_all(&buf);
                }
            }
        }
    }

    /// Runs one request; returns the answer, the paths it changed (for watches) and the
    /// change for the hook, if it made one.
    fn handle(&mut self, conn: u64, m: &XsMsg) -> (XsMsg, Vec<String>, Option<Change>) {
        match self.apply(conn, m) {
            Ok((reply_parts, changed, change)) => {
                let parts: Vec<&[u8]> = reply_parts.iter().map(|p| p.as_slice()).collect();
                let mut reply = XsMsg::new(m.ty, m.req_id, m.tx_id, &parts);
                if m.ty == XsType::Read {
                    // READ answers carry the bare value, without a final NUL.
                    reply.payload.pop();
                }
                (reply, changed, change)
            }
            Err(e) => (XsMsg::error(m.req_id, m.tx_id, e), Vec::new(), None),
        }
    }

    #[allow(clippy::type_complexity)]
    fn apply(
        &mut self,
        conn: u64,
        m: &XsMsg,
    ) -> Result<(Vec<Vec<u8>>, Vec<String>, Option<Change>), Errno> {
        let domid = self.domid(conn);
        let parts = m.parts();
        let arg = |i: usize| -> Result<String, Errno> {
            parts
                .get(i)
                .map(|p| String::from_utf8_lossy(p).into_owned())
                .ok_or("EINVAL")
        };
        let ok = || vec![b"OK".to_vec()];
        // Transactions work on a private copy, committed whole; each is its connection's.
        let tx_id = m.tx_id;
        if tx_id != 0 && self.txs.get(&tx_id).is_none_or(|t| t.conn != conn) {
            return Err("ENOENT");
        }
        let root = if tx_id == 0 {
            &mut self.root
        } else {
            &mut self.txs.get_mut(&tx_id).expect("checked above").root
        };
        let change = |ty: XsType, path: &str, value: &[u8]| Change {
            domid,
            ty,
            tx_id,
            path: path.to_string(),
            value: value.to_vec(),
        };
        let mut made = None;
        let result: (Vec<Vec<u8>>, Vec<String>) = match m.ty {
            XsType::Read => (
                vec![get(root, domid, &arg(0)?, READ)?.value.clone()],
                vec![],
            ),
            XsType::Directory => {
                let n = get(root, domid, &arg(0)?, READ)?;
                (
                    n.children.keys().map(|k| k.as_bytes().to_vec()).collect(),
                    vec![],
                )
            }
            XsType::DirectoryPart => {
                let n = get(root, domid, &arg(0)?, READ)?;
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
                let n = get(root, domid, &arg(0)?, READ)?;
                (
                    n.perms.iter().map(|p| p.to_string().into_bytes()).collect(),
                    vec![],
                )
            }
            XsType::Write => {
                let split_at = m.payload.iter().position(|b| *b == 0).ok_or("EINVAL")?;
                let path = String::from_utf8_lossy(&m.payload[..split_at]).into_owned();
                let value = &m.payload[split_at + 1..];
                get_for_write(root, domid, &path)?.value = value.to_vec();
                made = Some(change(m.ty, &path, value));
                (ok(), vec![path])
            }
            XsType::Mkdir => {
                let path = arg(0)?;
                let existed = check(root, domid, &path, WRITE).is_ok();
                get_for_write(root, domid, &path)?;
                made = Some(change(m.ty, &path, b""));
                // Only a node made fires watches.
                (ok(), if existed { vec![] } else { vec![path] })
            }
            XsType::Rm => {
                let path = arg(0)?;
                let comps = split(&path)?;
                let (last, parent) = comps.split_last().ok_or("EINVAL")?;
                let parent_path = format!("/{}", parent.join("/"));
                match check(root, domid, &path, WRITE) {
                    Ok(()) => {
                        lookup_mut(root, &parent_path)?.children.remove(*last);
                    }
                    // Removing a missing node is fine if its parent exists.
                    Err("ENOENT") => {
                        lookup(root, &parent_path)?;
                    }
                    Err(e) => return Err(e),
                }
                made = Some(change(m.ty, &path, b""));
                (ok(), vec![path])
            }
            XsType::SetPerms => {
                let path = arg(0)?;
                let perms = parts
                    .get(1..)
                    .unwrap_or_default()
                    .iter()
                    .filter(|p| !p.is_empty())
                    .map(|p| {
                        std::str::from_utf8(p)
                            .ok()
                            .and_then(|s| s.parse::<Perm>().ok())
                            .ok_or("EINVAL")
                    })
                    .collect::<Result<Vec<_>, _>>()?;
                let Some(new_owner) = perms.first().map(|p| p.domid) else {
                    return Err("EINVAL");
                };
                let node = get(root, domid, &path, WRITE | OWNER)?;
                if domid != 0 && node.perms.first().map(|p| p.domid) != Some(new_owner) {
                    return Err("EPERM");
                }
                lookup_mut(root, &path)?.perms = perms;
                let value = parts.get(1..).unwrap_or_default().join(&0u8);
                made = Some(change(m.ty, &path, &value));
                (ok(), vec![path])
            }
            XsType::TransactionStart => {
                self.next_tx += 1;
                let id = self.next_tx;
                self.txs.insert(
                    id,
                    Tx {
                        conn,
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
                    return Ok((ok(), tx.changed, None));
                } else {
                    (ok(), vec![])
                }
            }
            XsType::Watch => {
                let (path, token) = (arg(0)?, arg(1)?);
                self.watches.push((conn, path, token));
                (ok(), vec![])
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
            _ => return Err("ENOSYS"),
        };
        let (reply, changed) = result;
        if changed.is_empty() {
            return Ok((reply, changed, made));
        }
        if tx_id != 0 {
            // Watches fire when the transaction commits, not before.
            self.txs
                .get_mut(&tx_id)
                .expect("checked above")
                .changed
                .extend(changed);
            Ok((reply, vec![], made))
        } else {
            self.generation += 1;
            Ok((reply, changed, made))
        }
    }
}

/// What the daemon's threads share.
struct Shared {
    state: Mutex<State>,
    hook: Mutex<Option<Arc<Hook>>>,
    stop: AtomicBool,
    next_conn: AtomicU64,
}

impl std::fmt::Debug for Shared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shared").finish_non_exhaustive()
    }
}

/// A running test xenstored; stops and removes its sockets when dropped.
#[derive(Debug)]
pub struct TestXenstored {
    path: PathBuf,
    shared: Arc<Shared>,
    /// Every socket but the main one, by domain.
    domains: Mutex<HashMap<u32, PathBuf>>,
    accepts: Mutex<Vec<thread::JoinHandle<()>>>,
}

impl TestXenstored {
    /// Listens on `socket` (removed first if stale), dom0's socket. The tree starts as
    /// xenstored's: `/` and `/local/domain`, owned by dom0 with no access for others.
    pub fn start(socket: &Path) -> std::io::Result<TestXenstored> {
        let mut root = Node::new(vec![Perm::new(Access::None, 0)]);
        create(&mut root, 0, "/local/domain").expect("a valid path");
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                root,
                generation: 0,
                next_tx: 0,
                txs: HashMap::new(),
                watches: Vec::new(),
                conns: HashMap::new(),
            }),
            hook: Mutex::new(None),
            stop: AtomicBool::new(false),
            next_conn: AtomicU64::new(0),
        });
        let xs = TestXenstored {
            path: socket.to_path_buf(),
            shared,
            domains: Mutex::new(HashMap::new()),
            accepts: Mutex::new(Vec::new()),
        };
        xs.listen(socket, 0)?;
        Ok(xs)
    }

    fn listen(&self, socket: &Path, domid: u32) -> std::io::Result<()> {
        let _ = std::fs::remove_file(socket);
        let listener = UnixListener::bind(socket)?;
        // Polled, so that dropping the daemon never depends on reaching its socket file.
        listener.set_nonblocking(true)?;
        let shared = self.shared.clone();
        let accept = thread::spawn(move || accept_loop(&listener, domid, &shared));
        self.accepts.lock().expect("accepts lock").push(accept);
        Ok(())
    }

    /// dom0's socket, for `XENSTORED_PATH`.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// A socket whose connections are domain `domid` (`d<domid>.sock` beside the main one),
    /// opened on first use: `XENSTORED_PATH=<it> xenstore-read ...` reads as that domain.
    pub fn domain_socket(&self, domid: u32) -> std::io::Result<PathBuf> {
        let mut domains = self.domains.lock().expect("domains lock");
        if let Some(p) = domains.get(&domid) {
            return Ok(p.clone());
        }
        let p = self.path.with_file_name(format!("d{domid}.sock"));
        self.listen(&p, domid)?;
        domains.insert(domid, p.clone());
        Ok(p)
    }

    /// Calls `hook` for every change a client makes from now on (replacing an earlier hook).
    pub fn on_change(&self, hook: impl Fn(&Change) + Send + Sync + 'static) {
        *self.shared.hook.lock().expect("hook lock") = Some(Arc::new(Box::new(hook)));
    }

    /// A node's value, read directly (for assertions).
    pub fn read(&self, path: &str) -> Option<Vec<u8>> {
        let st = self.shared.state.lock().expect("state lock");
        lookup(&st.root, path).ok().map(|n| n.value.clone())
    }

    /// A node's permissions, read directly.
    pub fn perms(&self, path: &str) -> Option<Vec<Perm>> {
        let st = self.shared.state.lock().expect("state lock");
        lookup(&st.root, path).ok().map(|n| n.perms.clone())
    }

    /// Writes a node directly as dom0, firing watches (as another dom0 client would).
    pub fn write(&self, path: &str, value: &[u8]) {
        let mut st = self.shared.state.lock().expect("state lock");
        create(&mut st.root, 0, path).expect("a valid path").value = value.to_vec();
        st.generation += 1;
        st.fire(path);
    }
}

impl Drop for TestXenstored {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        for h in self.accepts.lock().expect("accepts lock").drain(..) {
            let _ = h.join();
        }
        let mut st = self.shared.state.lock().expect("state lock");
        for (_, c) in st.conns.drain() {
            let _ = c.stream.shutdown(std::net::Shutdown::Both);
        }
        let _ = std::fs::remove_file(&self.path);
        for p in self.domains.lock().expect("domains lock").values() {
            let _ = std::fs::remove_file(p);
        }
    }
}

fn accept_loop(listener: &UnixListener, domid: u32, shared: &Arc<Shared>) {
    while !shared.stop.load(Ordering::SeqCst) {
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
        let conn = shared.next_conn.fetch_add(1, Ordering::SeqCst) + 1;
        if let Ok(w) = stream.try_clone() {
            shared
                .state
                .lock()
                .expect("state lock")
                .conns
                .insert(conn, Conn { stream: w, domid });
        }
        let shared = shared.clone();
        thread::spawn(move || serve(conn, stream, &shared));
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

/// Runs Debian's `tool` (`xenstore-read`, `xenstore-write`, `xenstore-list`...) with `args`
/// against `socket` (`XENSTORED_PATH`: dom0's socket, or a domain's, which makes the tool that
/// domain): its output as printed, or `None` if it failed (or could not be run).
pub fn tool(socket: &Path, tool: &str, args: &[&str]) -> Option<String> {
    let out = std::process::Command::new(tool)
        .env("XENSTORED_PATH", socket)
        .args(args)
        .output()
        .ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

fn serve(conn: u64, mut stream: UnixStream, shared: &Shared) {
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
                Err(_) => return drop_conn(conn, shared),
            };
            buf.drain(..used);
            let (reply, changed, change) =
                shared.state.lock().expect("state lock").handle(conn, &msg);
            // The hook runs unlocked (it may look at the daemon), before the answer goes.
            let hook = shared.hook.lock().expect("hook lock").clone();
            if let (Some(hook), Some(change)) = (hook, change) {
                hook(&change);
            }
            let mut out = Vec::new();
            if reply.encode(&mut out).is_err() {
                out.clear();
                XsMsg::error(msg.req_id, msg.tx_id, "E2BIG")
                    .encode(&mut out)
                    .expect("an error fits");
            }
            if msg.ty == XsType::Watch && reply.ty == XsType::Watch {
                // xenstored fires every new watch once, whatever the watcher may read
                // (`do_watch`: "We fire once up front").
                let parts = msg.parts();
                let event = XsMsg::new(XsType::WatchEvent, 0, 0, &parts[..2.min(parts.len())]);
                let _ = event.encode(&mut out);
            }
            let mut st = shared.state.lock().expect("state lock");
            if let Some(c) = st.conns.get_mut(&conn) {
                let _ = c.stream.write_all(&out);
            }
            for path in changed {
                st.fire(&path);
            }
        }
    }
    drop_conn(conn, shared);
}

fn drop_conn(conn: u64, shared: &Shared) {
    let mut st = shared.state.lock().expect("state lock");
    st.conns.remove(&conn);
    st.watches.retain(|(c, _, _)| *c != conn);
    st.txs.retain(|_, t| t.conn != conn);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn call(s: &mut UnixStream, m: XsMsg) -> XsMsg {
        super::call(s, &m).unwrap()
    }

    /// A client connected as `domid` (0: the main socket).
    fn client(xs: &TestXenstored, domid: u32) -> UnixStream {
        let path = if domid == 0 {
            xs.path().to_path_buf()
        } else {
            xs.domain_socket(domid).unwrap()
        };
        let s = UnixStream::connect(path).unwrap();
        s.set_read_timeout(Some(std::time::Duration::from_secs(5)))
            .unwrap();
        s
    }

    /// The answer to a one-path request: `Ok(text)` or `Err(errno)`.
    fn ask(s: &mut UnixStream, ty: XsType, path: &str) -> Result<String, String> {
        let r = call(s, XsMsg::new(ty, 1, 0, &[path.as_bytes()]));
        if r.ty == XsType::Error {
            Err(r.text())
        } else {
            Ok(r.text())
        }
    }

    fn write(s: &mut UnixStream, path: &str, value: &str) -> Result<(), String> {
        let r = call(s, XsMsg::write(1, 0, path, value.as_bytes()));
        if r.ty == XsType::Error {
            Err(r.text())
        } else {
            Ok(())
        }
    }

    fn set_perms(s: &mut UnixStream, path: &str, perms: &[&str]) -> Result<(), String> {
        let perms: Vec<Perm> = perms.iter().map(|p| p.parse().unwrap()).collect();
        let r = call(s, XsMsg::set_perms(1, 0, path, &perms));
        if r.ty == XsType::Error {
            Err(r.text())
        } else {
            Ok(())
        }
    }

    fn perms(xs: &TestXenstored, path: &str) -> Vec<String> {
        xs.perms(path)
            .unwrap()
            .iter()
            .map(Perm::to_string)
            .collect()
    }

    fn daemon(tag: &str) -> (crate::Scratch, TestXenstored) {
        let dir = crate::Scratch::new(tag).unwrap();
        let xs = TestXenstored::start(&dir.join("sock")).unwrap();
        (dir, xs)
    }

    fn errno(r: Result<impl std::fmt::Debug, String>) -> String {
        r.expect_err("refused")
    }

    #[test]
    fn transactions_commit_whole_or_get_eagain() {
        let (_dir, xs) = daemon("xsd-unit");
        let mut a = client(&xs, 0);
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

    #[test]
    fn a_transaction_belongs_to_its_connection() {
        let (_dir, xs) = daemon("xsd-txconn");
        let mut a = client(&xs, 0);
        let mut b = client(&xs, 0);
        let t = call(&mut a, XsMsg::new(XsType::TransactionStart, 1, 0, &[b""]));
        let tx: u32 = t.text().parse().unwrap();
        let r = call(&mut b, XsMsg::write(2, tx, "/x", b"1"));
        assert_eq!((r.ty, r.text().as_str()), (XsType::Error, "ENOENT"));
    }

    #[test]
    fn owners_and_dom0_get_everything_others_their_entry_or_the_first_ones_letter() {
        let (_dir, xs) = daemon("xsd-perm");
        let mut dom0 = client(&xs, 0);
        write(&mut dom0, "/t", "v").unwrap();
        set_perms(&mut dom0, "/t", &["n8", "r5", "w6", "b7"]).unwrap();
        let (mut d5, mut d6, mut d7, mut d8, mut d9) = (
            client(&xs, 5),
            client(&xs, 6),
            client(&xs, 7),
            client(&xs, 8),
            client(&xs, 9),
        );
        // r5: read only.
        assert_eq!(ask(&mut d5, XsType::Read, "/t"), Ok("v".into()));
        assert_eq!(errno(write(&mut d5, "/t", "x")), "EACCES");
        // w6: write only.
        assert_eq!(errno(ask(&mut d6, XsType::Read, "/t")), "EACCES");
        write(&mut d6, "/t", "six").unwrap();
        // b7: both.
        assert_eq!(ask(&mut d7, XsType::Read, "/t"), Ok("six".into()));
        write(&mut d7, "/t", "seven").unwrap();
        // The owner, whatever its own letter says, and dom0.
        assert_eq!(ask(&mut d8, XsType::Read, "/t"), Ok("seven".into()));
        write(&mut d8, "/t", "eight").unwrap();
        // Anyone else gets the first entry's letter: n.
        assert_eq!(errno(ask(&mut d9, XsType::Read, "/t")), "EACCES");
        assert_eq!(errno(write(&mut d9, "/t", "x")), "EACCES");
        set_perms(&mut dom0, "/t", &["r0"]).unwrap();
        assert_eq!(ask(&mut d9, XsType::Read, "/t"), Ok("eight".into()));
        assert_eq!(errno(write(&mut d9, "/t", "x")), "EACCES");
        // DIRECTORY and GET_PERMS need read, as READ does.
        set_perms(&mut dom0, "/t", &["n0", "w6"]).unwrap();
        assert_eq!(errno(ask(&mut d6, XsType::Directory, "/t")), "EACCES");
        assert_eq!(errno(ask(&mut d6, XsType::GetPerms, "/t")), "EACCES");
        assert_eq!(ask(&mut dom0, XsType::GetPerms, "/t"), Ok("n0\0w6".into()));
    }

    #[test]
    fn a_missing_node_is_enoent_only_where_the_nearest_ancestor_grants_the_access() {
        let (_dir, xs) = daemon("xsd-enoent");
        let mut dom0 = client(&xs, 0);
        let mut d5 = client(&xs, 5);
        write(&mut dom0, "/t", "").unwrap();
        // /t is dom0's alone: a missing node under it is none of domain 5's business.
        assert_eq!(errno(ask(&mut d5, XsType::Read, "/t/a/b")), "EACCES");
        assert_eq!(errno(write(&mut d5, "/t/a", "x")), "EACCES");
        assert_eq!(errno(ask(&mut d5, XsType::Mkdir, "/t/a")), "EACCES");
        assert_eq!(xs.read("/t/a"), None);
        // Readable: a missing node reads as missing, but creating one still needs write.
        set_perms(&mut dom0, "/t", &["r0"]).unwrap();
        assert_eq!(errno(ask(&mut d5, XsType::Read, "/t/a/b")), "ENOENT");
        assert_eq!(errno(write(&mut d5, "/t/a", "x")), "EACCES");
    }

    #[test]
    fn created_nodes_take_the_parents_permissions_and_a_domain_owns_what_it_creates() {
        let (_dir, xs) = daemon("xsd-create");
        let mut dom0 = client(&xs, 0);
        let mut d5 = client(&xs, 5);
        write(&mut dom0, "/g", "").unwrap();
        set_perms(&mut dom0, "/g", &["n0", "w5"]).unwrap();
        // Write access on the nearest existing ancestor is enough for a whole path.
        write(&mut d5, "/g/a/b/c", "x").unwrap();
        for p in ["/g/a", "/g/a/b", "/g/a/b/c"] {
            assert_eq!(perms(&xs, p), ["n5", "w5"], "{p}");
        }
        // Domain 5 now owns them: it may read what it could not read in /g.
        assert_eq!(ask(&mut d5, XsType::Read, "/g/a/b/c"), Ok("x".into()));
        assert_eq!(errno(ask(&mut d5, XsType::Read, "/g")), "EACCES");
        // dom0's nodes keep the parent's owner.
        write(&mut dom0, "/g/d/e", "y").unwrap();
        assert_eq!(perms(&xs, "/g/d/e"), ["n0", "w5"]);
        ask(&mut dom0, XsType::Mkdir, "/g/m").unwrap();
        assert_eq!(perms(&xs, "/g/m"), ["n0", "w5"]);
    }

    #[test]
    fn set_perms_is_the_owners_and_only_dom0_gives_a_node_away() {
        let (_dir, xs) = daemon("xsd-setperms");
        let mut dom0 = client(&xs, 0);
        let (mut d5, mut d6) = (client(&xs, 5), client(&xs, 6));
        write(&mut dom0, "/o", "").unwrap();
        set_perms(&mut dom0, "/o", &["n5", "b6"]).unwrap();
        set_perms(&mut d5, "/o", &["n5", "r6"]).unwrap();
        assert_eq!(perms(&xs, "/o"), ["n5", "r6"]);
        assert_eq!(errno(set_perms(&mut d5, "/o", &["n6"])), "EPERM");
        set_perms(&mut d5, "/o", &["n5", "b6"]).unwrap();
        // Write access is not ownership.
        assert_eq!(errno(set_perms(&mut d6, "/o", &["r5", "b6"])), "EACCES");
        set_perms(&mut dom0, "/o", &["n6"]).unwrap();
        assert_eq!(perms(&xs, "/o"), ["n6"]);
        assert_eq!(errno(set_perms(&mut dom0, "/o", &[])), "EINVAL");
    }

    #[test]
    fn rm_needs_write_on_the_node_and_takes_its_whole_subtree() {
        let (_dir, xs) = daemon("xsd-rm");
        let mut dom0 = client(&xs, 0);
        let (mut d7, mut d8) = (client(&xs, 7), client(&xs, 8));
        write(&mut dom0, "/g", "").unwrap();
        set_perms(&mut dom0, "/g", &["n0", "b7"]).unwrap();
        write(&mut dom0, "/g/a/b/c", "x").unwrap();
        // A child domain 7 may not even read goes with the subtree.
        set_perms(&mut dom0, "/g/a/b", &["n0"]).unwrap();
        assert_eq!(errno(ask(&mut d8, XsType::Rm, "/g/a")), "EACCES");
        ask(&mut d7, XsType::Rm, "/g/a").unwrap();
        assert_eq!(xs.read("/g/a"), None);
        // A missing node is removed already, if its parent exists.
        ask(&mut d7, XsType::Rm, "/g/a").unwrap();
        assert_eq!(errno(ask(&mut d7, XsType::Rm, "/g/x/y")), "ENOENT");
        assert_eq!(errno(ask(&mut dom0, XsType::Rm, "/")), "EINVAL");
    }

    #[test]
    fn watch_events_go_only_to_domains_that_may_read_the_node_or_its_parent() {
        let (_dir, xs) = daemon("xsd-watch");
        let mut dom0 = client(&xs, 0);
        let mut d7 = client(&xs, 7);
        for p in ["/h/x", "/g/x"] {
            write(&mut dom0, p, "").unwrap();
        }
        set_perms(&mut dom0, "/g", &["n0", "r7"]).unwrap();
        // Domain 7's side: every message kept, events apart, across requests.
        let mut buf = Vec::new();
        let mut events = Vec::new();
        let mut request = |m: XsMsg, buf: &mut Vec<u8>, events: &mut Vec<String>| {
            let mut out = Vec::new();
            m.encode(&mut out).unwrap();
            d7.write_all(&out).unwrap();
            let mut chunk = [0u8; 4096];
            let mut answered = false;
            loop {
                while let Some((got, used)) = XsMsg::decode(buf).unwrap() {
                    buf.drain(..used);
                    if got.ty == XsType::WatchEvent {
                        events.push(got.text().replace('\0', " "));
                    } else if got.req_id == m.req_id {
                        answered = true;
                    }
                }
                // The answer to the next request comes after what this one caused.
                if answered {
                    return;
                }
                let n = d7.read(&mut chunk).unwrap();
                assert!(n > 0, "closed");
                buf.extend_from_slice(&chunk[..n]);
            }
        };
        request(
            XsMsg::new(XsType::Watch, 1, 0, &[b"/h", b"t0"]),
            &mut buf,
            &mut events,
        );
        request(
            XsMsg::new(XsType::Watch, 2, 0, &[b"/g", b"t1"]),
            &mut buf,
            &mut events,
        );
        write(&mut dom0, "/h/x", "secret").unwrap();
        write(&mut dom0, "/g/x", "seen").unwrap();
        // Everything sent to domain 7 before the answer to its next request.
        request(
            XsMsg::new(XsType::Read, 99, 0, &[b"/g"]),
            &mut buf,
            &mut events,
        );
        // Each new watch fires once, readable or not; then only the readable change does.
        assert_eq!(events, ["/h t0", "/g t1", "/g/x t1"]);
    }

    #[test]
    fn unsupported_types_are_enosys() {
        let (_dir, xs) = daemon("xsd-enosys");
        let mut dom0 = client(&xs, 0);
        let r = call(
            &mut dom0,
            XsMsg::new(XsType::Introduce, 1, 0, &[b"5", b"1", b"2"]),
        );
        assert_eq!((r.ty, r.text().as_str()), (XsType::Error, "ENOSYS"));
    }
}
