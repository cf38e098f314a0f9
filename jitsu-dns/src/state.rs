//! The state store with history: a git repository, as Jitsu kept its state in Irmin.
//!
//! Owns the repository at `--persistdb` (a temporary one without it): its layout, the thread
//! that writes it, reading it back at start-up, and the `jitsu-dns state tree|log` views.
//! The tree, one file per value (so `cat`, `git log -p` and `git show` read it as is):
//!
//! ```text
//! jitsu/vm/<name>/config/<key>     the VM's spec, one file per key (repeated keys one per line)
//! jitsu/vm/<name>/dns/<fqdn>       the TTL served for that name
//! jitsu/vm/<name>/state            off | booting | running | suspended | paused | stopping | failed
//! jitsu/vm/<name>/ip, ip6, mac     addresses
//! jitsu/vm/<name>/domid            Xen domain id, when there is one
//! jitsu/vm/<name>/starts           boots so far
//! jitsu/vm/<name>/requests         queries so far
//! jitsu/vm/<name>/last_start       Unix time of the last boot
//! jitsu/vm/<name>/last_request     Unix time of the last query
//! ```
//!
//! One commit per lifecycle change and per configuration change, with a message a person
//! reads (`www: off -> booting (query from 10.0.0.2)`); request counters ride along with the
//! next commit or are flushed in a batch every few seconds, never one commit per query.
//!
//! The files and commit messages each change makes are built here, by pure functions: a
//! configuration over the last committed tree ([`config_change`]), a VM's lifecycle change
//! ([`lifecycle_change`]), its state files, a MAC taken from its domain. What changed is not
//! decided here: the fleet says what happened to a VM, the configuration what is configured.
//!
//! A dedicated thread runs the `git` CLI, so the DNS loop never waits for a commit; its queue
//! is bounded ([`QUEUE`]) and a change that does not fit is dropped, logged and counted.

use std::collections::{BTreeMap, BTreeSet};
use std::ops::Bound;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::thread;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use shared_proto::Mac;

use crate::config::VmConfig;
use crate::fleet::{Lifecycle, Stored, VmView};

/// Changes that can wait for the writer thread; past this the daemon drops and counts them.
pub const QUEUE: usize = 4096;

/// Why the store failed.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    /// git is not installed.
    #[error("the state store needs git (Debian package git): {0}")]
    NoGit(std::io::Error),
    /// The directory could not be made a repository.
    #[error("state store {}: {detail}", path.display())]
    Repo {
        /// The repository.
        path: PathBuf,
        /// What failed.
        detail: String,
    },
    /// The writer thread is gone or its queue is full.
    #[error("state store writer: {0}")]
    Writer(&'static str),
}

/// Changes to the tree, and the commit message if they make a commit.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Change {
    /// Subtrees removed first (`jitsu/vm/www/` removes that VM).
    pub remove: Vec<String>,
    /// Files written.
    pub files: Vec<(String, String)>,
    /// Commit after applying, if anything changed since the last commit.
    pub message: Option<String>,
    /// Commit even if nothing changed (an event worth its line in the history, such as a
    /// VM adopted in the state the store already had).
    pub always: bool,
}

enum Msg {
    Change(Change),
    /// Answered with the tree as of the last commit once everything before it is done.
    Flush(mpsc::Sender<Tree>),
}

/// The repository and its writer thread.
#[derive(Debug)]
pub struct Store {
    dir: PathBuf,
    temporary: bool,
    tx: Option<mpsc::SyncSender<Msg>>,
    thread: Option<thread::JoinHandle<()>>,
}

/// What the repository held at start-up: path -> value (without the final newline).
pub type Tree = BTreeMap<String, String>;

fn git(dir: &Path) -> Command {
    let mut c = Command::new("git");
    c.arg("-C")
        .arg(dir)
        .args([
            "-c",
            "user.name=jitsu-dns",
            "-c",
            "user.email=jitsu-dns@localhost",
            "-c",
            "commit.gpgsign=false",
        ])
        .stdin(Stdio::null());
    c
}

fn run_git(dir: &Path, args: &[&str]) -> Result<String, String> {
    let out = git(dir)
        .args(args)
        .output()
        .map_err(|e| format!("git {}: {e}", args.join(" ")))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(format!(
            "git {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// Reads the tree at HEAD (empty for a repository without commits).
pub fn read_head(dir: &Path) -> Result<Tree, StateError> {
    let repo_err = |detail: String| StateError::Repo {
        path: dir.to_path_buf(),
        detail,
    };
    if run_git(dir, &["rev-parse", "--verify", "-q", "HEAD"]).is_err() {
        return Ok(Tree::new());
    }
    let listing =
        run_git(dir, &["ls-tree", "-r", "-z", "--full-tree", "HEAD"]).map_err(repo_err)?;
    let mut objects = Vec::new();
    for entry in listing.split('\0').filter(|e| !e.is_empty()) {
        // "<mode> blob <sha>\t<path>"
        let Some((meta, path)) = entry.split_once('\t') else {
            continue;
        };
        let Some(sha) = meta.split(' ').nth(2) else {
            continue;
        };
        objects.push((path.to_string(), sha.to_string()));
    }
    if objects.is_empty() {
        return Ok(Tree::new());
    }
    let mut child = git(dir)
        .args(["cat-file", "--batch"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .map_err(|e| repo_err(format!("git cat-file: {e}")))?;
    let input: String = objects.iter().map(|(_, sha)| format!("{sha}\n")).collect();
    let mut stdin = child.stdin.take().expect("stdin was piped");
    let writer = thread::spawn(move || {
        use std::io::Write as _;
        let _ = stdin.write_all(input.as_bytes());
    });
    let out = child
        .wait_with_output()
        .map_err(|e| repo_err(format!("git cat-file: {e}")))?;
    let _ = writer.join();
    // "<sha> blob <size>\n<content>\n", repeated.
    let mut tree = Tree::new();
    let mut rest = &out.stdout[..];
    for (path, _) in objects {
        let nl = rest
            .iter()
            .position(|b| *b == b'\n')
            .ok_or_else(|| repo_err("short git cat-file output".into()))?;
        let header = String::from_utf8_lossy(&rest[..nl]).into_owned();
        let size: usize = header
            .rsplit(' ')
            .next()
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| repo_err(format!("unexpected git cat-file header {header:?}")))?;
        let body = rest
            .get(nl + 1..nl + 1 + size)
            .ok_or_else(|| repo_err("short git cat-file output".into()))?;
        let value = String::from_utf8_lossy(body);
        tree.insert(path, value.strip_suffix('\n').unwrap_or(&value).to_string());
        rest = rest.get(nl + 2 + size..).unwrap_or_default();
    }
    Ok(tree)
}

impl Store {
    /// Opens (creating if needed) the repository at `path`, or a temporary one, and starts
    /// the writer. Returns the tree found at HEAD.
    pub fn open(path: Option<&Path>) -> Result<(Store, Tree), StateError> {
        Command::new("git")
            .arg("--version")
            .output()
            .map_err(StateError::NoGit)?;
        let (dir, temporary) = match path {
            Some(p) => (p.to_path_buf(), false),
            None => {
                let d = std::env::temp_dir().join(format!(
                    "jitsu-dns-state-{}-{}",
                    std::process::id(),
                    std::time::SystemTime::now()
                        .duration_since(std::time::UNIX_EPOCH)
                        .map(|d| d.as_nanos())
                        .unwrap_or_default()
                ));
                (d, true)
            }
        };
        let repo_err = |detail: String| StateError::Repo {
            path: dir.clone(),
            detail,
        };
        std::fs::create_dir_all(&dir).map_err(|e| repo_err(e.to_string()))?;
        if !dir.join(".git").exists() {
            run_git(&dir, &["init", "-q"]).map_err(repo_err)?;
        }
        let tree = read_head(&dir)?;
        // The work tree is ours: make it what HEAD says (a crash may have left it ahead).
        let jitsu = dir.join("jitsu");
        if jitsu.exists() {
            std::fs::remove_dir_all(&jitsu).map_err(|e| repo_err(e.to_string()))?;
        }
        for (p, v) in &tree {
            write_file(&dir, p, v).map_err(repo_err)?;
        }
        let (tx, rx) = mpsc::sync_channel(QUEUE);
        let writer_dir = dir.clone();
        let committed = tree.clone();
        let thread = thread::Builder::new()
            .name("state-store".into())
            .spawn(move || writer(writer_dir, committed, rx))
            .map_err(|e| repo_err(format!("cannot start the writer thread: {e}")))?;
        Ok((
            Store {
                dir,
                temporary,
                tx: Some(tx),
                thread: Some(thread),
            },
            tree,
        ))
    }

    /// The repository's directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Queues a change; never blocks. Fails if the queue is full (the change is lost).
    pub fn apply(&self, change: Change) -> Result<(), StateError> {
        let tx = self.tx.as_ref().ok_or(StateError::Writer("closed"))?;
        tx.try_send(Msg::Change(change)).map_err(|e| match e {
            mpsc::TrySendError::Full(_) => StateError::Writer("queue full"),
            mpsc::TrySendError::Disconnected(_) => StateError::Writer("thread gone"),
        })
    }

    /// Waits until everything queued is written and committed. Returns the tree as of the
    /// last commit (what HEAD holds), or `None` if the writer is gone.
    pub fn flush(&self) -> Option<Tree> {
        let tx = self.tx.as_ref()?;
        let (done_tx, done_rx) = mpsc::channel();
        tx.send(Msg::Flush(done_tx)).ok()?;
        done_rx.recv().ok()
    }

    /// Writes everything, stops the writer, and removes a temporary repository.
    pub fn close(mut self) {
        self.shutdown();
    }

    fn shutdown(&mut self) {
        self.flush();
        self.tx = None;
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        if self.temporary {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

impl Drop for Store {
    fn drop(&mut self) {
        self.shutdown();
    }
}

fn write_file(dir: &Path, path: &str, value: &str) -> Result<(), String> {
    let full = dir.join(path);
    if let Some(parent) = full.parent() {
        std::fs::create_dir_all(parent).map_err(|e| format!("{}: {e}", parent.display()))?;
    }
    std::fs::write(&full, format!("{value}\n")).map_err(|e| format!("{}: {e}", full.display()))
}

fn writer(dir: PathBuf, mut committed: Tree, rx: mpsc::Receiver<Msg>) {
    let mut tree = committed.clone();
    while let Ok(msg) = rx.recv() {
        match msg {
            Msg::Flush(done) => {
                let _ = done.send(committed.clone());
            }
            Msg::Change(c) => {
                for prefix in &c.remove {
                    let gone: Vec<String> = tree
                        .keys()
                        .filter(|k| k.starts_with(prefix.as_str()))
                        .cloned()
                        .collect();
                    for k in gone {
                        tree.remove(&k);
                        let _ = std::fs::remove_file(dir.join(&k));
                    }
                    let d = dir.join(prefix);
                    if d.is_dir() {
                        let _ = std::fs::remove_dir_all(&d);
                    }
                }
                for (p, v) in c.files {
                    if tree.get(&p) != Some(&v) {
                        if let Err(e) = write_file(&dir, &p, &v) {
                            tracing::warn!(error = %e, "state store: cannot write");
                        }
                        tree.insert(p, v);
                    }
                }
                if let Some(message) = c.message
                    && (tree != committed || c.always)
                {
                    let result = run_git(&dir, &["add", "-A", "jitsu"]).and_then(|_| {
                        run_git(
                            &dir,
                            &[
                                "commit",
                                "-q",
                                "--no-verify",
                                "--allow-empty",
                                "-m",
                                &message,
                            ],
                        )
                    });
                    match result {
                        Ok(_) => {
                            committed = tree.clone();
                            tracing::debug!(%message, "state committed");
                        }
                        Err(e) => tracing::warn!(error = %e, "state store: commit failed"),
                    }
                }
            }
        }
    }
}

/// The store path of a VM's subtree.
pub fn vm_prefix(name: &str) -> String {
    format!("jitsu/vm/{name}/")
}

/// Wall-clock times for the store: `Instant`s placed against one reading of both clocks.
#[derive(Debug, Clone, Copy)]
pub struct Wall {
    at: Instant,
    unix: SystemTime,
}

impl Wall {
    /// Both clocks, now.
    pub fn now() -> Wall {
        Wall {
            at: Instant::now(),
            unix: SystemTime::now(),
        }
    }

    /// Unix time of `t`, in seconds with milliseconds (`1700000000.250`).
    pub fn stamp(&self, t: Instant) -> String {
        let s = if t >= self.at {
            self.unix + (t - self.at)
        } else {
            self.unix - (self.at - t)
        };
        let secs = s
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs_f64())
            .unwrap_or(0.0);
        format!("{secs:.3}")
    }
}

/// The files of a VM's configuration: its keys as given under `config/` (a repeated key one
/// value per line), its names under `dns/` (each holding the TTL), its addresses and MAC.
pub fn config_files(vm: &VmConfig, ttl: u32) -> Vec<(String, String)> {
    let p = vm_prefix(&vm.name);
    let mut grouped: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
    for (k, v) in &vm.raw {
        grouped.entry(k.as_str()).or_default().push(v.as_str());
    }
    let mut files: Vec<(String, String)> = grouped
        .into_iter()
        .map(|(k, v)| (format!("{p}config/{k}"), v.join("\n")))
        .collect();
    for n in &vm.dns {
        let n = n.to_ascii();
        files.push((
            format!("{p}dns/{}", n.trim_end_matches('.')),
            ttl.to_string(),
        ));
    }
    files.push((format!("{p}ip"), vm.ip.to_string()));
    if let Some(ip6) = vm.ip6 {
        files.push((format!("{p}ip6"), ip6.to_string()));
    }
    files.push((format!("{p}mac"), vm.mac().to_string()));
    files
}

/// The files of a VM's dynamic state: lifecycle state, counters, domain id, times.
pub fn state_files(v: &VmView, wall: &Wall) -> Vec<(String, String)> {
    let p = vm_prefix(&v.cfg.name);
    let mut files = vec![
        (format!("{p}state"), v.state.as_str().to_string()),
        (format!("{p}starts"), v.starts.to_string()),
        (format!("{p}requests"), v.requests.to_string()),
    ];
    if let Some(d) = v.domid {
        files.push((format!("{p}domid"), d.to_string()));
    }
    if let Some(t) = v.last_request {
        files.push((format!("{p}last_request"), wall.stamp(t)));
    }
    if let Some(t) = v.last_start {
        files.push((format!("{p}last_start"), wall.stamp(t)));
    }
    files
}

/// A configuration to commit, and what it changes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigChange {
    /// The change to apply.
    pub change: Change,
    /// `added a, b; removed c; changed d`; `None` when the store held this configuration.
    pub summary: Option<String>,
}

/// The commit of a configuration: `vms` (each VM as the fleet runs it, in the
/// configuration's order) over `old`, the tree as last committed. Every VM's configuration
/// files are written afresh; VMs the tree knows and `vms` lacks are removed; VMs new to the
/// tree get their state files too. A VM is changed when its `config/` or `dns/` files
/// differ. `verb` says what happened (`loaded`, `reloaded`) in the message.
pub fn config_change(
    old: &Tree,
    vms: &[VmView],
    ttl: u32,
    wall: &Wall,
    verb: &str,
) -> ConfigChange {
    let mut change = Change::default();
    let mut added = Vec::new();
    let mut changed = Vec::new();
    let known: BTreeSet<&str> = old
        .keys()
        .filter_map(|k| k.strip_prefix("jitsu/vm/")?.split('/').next())
        .collect();
    let removed: Vec<&str> = known
        .iter()
        .copied()
        .filter(|n| !vms.iter().any(|v| &*v.cfg.name == *n))
        .collect();
    change.remove.extend(removed.iter().map(|n| vm_prefix(n)));
    for view in vms {
        let vm = &view.cfg;
        let p = vm_prefix(&vm.name);
        let (config_dir, dns_dir) = (format!("{p}config/"), format!("{p}dns/"));
        let is_spec = |k: &str| k.starts_with(&config_dir) || k.starts_with(&dns_dir);
        let files = config_files(vm, ttl);
        if !known.contains(&*vm.name) {
            added.push(&*vm.name);
            change.files.extend(state_files(view, wall));
        } else {
            // The VM's subtree only: keys sharing a prefix are adjacent in the tree.
            let before = old
                .range::<str, _>((Bound::Included(p.as_str()), Bound::Unbounded))
                .take_while(|(k, _)| k.starts_with(&p))
                .filter(|(k, _)| is_spec(k));
            let after = files
                .iter()
                .filter(|(k, _)| is_spec(k))
                .map(|(k, v)| (k, v));
            if !before.eq(after) {
                changed.push(&*vm.name);
            }
        }
        change.remove.push(config_dir);
        change.remove.push(dns_dir);
        change.files.extend(files);
    }
    let parts: Vec<String> = [("added", added), ("removed", removed), ("changed", changed)]
        .into_iter()
        .filter(|(_, names)| !names.is_empty())
        .map(|(what, names)| format!("{what} {}", names.join(", ")))
        .collect();
    let summary = (!parts.is_empty()).then(|| parts.join("; "));
    change.message = Some(format!(
        "configuration {verb}: {}",
        summary.as_deref().unwrap_or("unchanged")
    ));
    ConfigChange { change, summary }
}

/// The commit of a VM's lifecycle change from `from` to `view.state`: its state files, and
/// `www: off -> booting (query from 10.0.0.2)` (`www: running (adopted)` when the state
/// stays, a line in the history all the same).
pub fn lifecycle_change(view: &VmView, from: Lifecycle, cause: &str, wall: &Wall) -> Change {
    let (vm, to) = (&view.cfg.name, view.state);
    let message = if from == to {
        format!("{vm}: {to} ({cause})")
    } else {
        format!("{vm}: {from} -> {to} ({cause})")
    };
    Change {
        remove: vec![],
        files: state_files(view, wall),
        message: Some(message),
        always: true,
    }
}

/// The commit of the MAC a VM took from its domain.
pub fn mac_change(vm: &str, mac: Mac) -> Change {
    Change {
        remove: vec![],
        files: vec![(format!("{}mac", vm_prefix(vm)), mac.to_string())],
        message: Some(format!("{vm}: MAC {mac} from its domain")),
        always: false,
    }
}

/// What the store remembers of `name`.
pub fn stored(tree: &Tree, name: &str) -> Option<Stored> {
    let p = vm_prefix(name);
    let get = |k: &str| tree.get(&format!("{p}{k}"));
    let state = get("state")?;
    Some(Stored {
        state: state.parse::<Lifecycle>().ok(),
        starts: get("starts").and_then(|s| s.parse().ok()).unwrap_or(0),
        requests: get("requests").and_then(|s| s.parse().ok()).unwrap_or(0),
    })
}

/// `jitsu-dns state tree`: every path and value at HEAD, like the original `irmin tree`:
/// `/jitsu/vm/www/state....................running`.
pub fn render_tree(tree: &Tree) -> String {
    let width = tree.keys().map(|k| k.len() + 1).max().unwrap_or(0) + 4;
    let mut out = String::new();
    for (k, v) in tree {
        let path = format!("/{k}");
        let dots = ".".repeat(width.saturating_sub(path.len()).max(3));
        out.push_str(&format!("{path}{dots}{}\n", v.replace('\n', ", ")));
    }
    out
}

/// `jitsu-dns state log`: the history, oldest last, one line per commit (time, message).
pub fn render_log(dir: &Path) -> Result<String, StateError> {
    if run_git(dir, &["rev-parse", "--verify", "-q", "HEAD"]).is_err() {
        return Ok(String::new());
    }
    run_git(
        dir,
        &[
            "log",
            "--date=format-local:%Y-%m-%d %H:%M:%S",
            "--format=%ad  %s",
        ],
    )
    .map_err(|detail| StateError::Repo {
        path: dir.to_path_buf(),
        detail,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tmp(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("jitsu-state-test-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        d
    }

    fn change(files: &[(&str, &str)], message: Option<&str>) -> Change {
        Change {
            remove: vec![],
            files: files
                .iter()
                .map(|(a, b)| (a.to_string(), b.to_string()))
                .collect(),
            message: message.map(str::to_string),
            always: false,
        }
    }

    fn log(dir: &Path) -> Vec<String> {
        run_git(dir, &["log", "--format=%s"])
            .unwrap()
            .lines()
            .map(str::to_string)
            .collect()
    }

    #[test]
    fn commits_only_when_asked_and_only_what_changed_then_reads_back() {
        let dir = tmp("a");
        {
            let (store, tree) = Store::open(Some(&dir)).unwrap();
            assert!(tree.is_empty());
            store
                .apply(change(
                    &[("jitsu/vm/www/state", "off"), ("jitsu/vm/www/starts", "0")],
                    Some("configuration: added www"),
                ))
                .unwrap();
            store
                .apply(change(&[("jitsu/vm/www/requests", "3")], None))
                .unwrap();
            store
                .apply(change(
                    &[("jitsu/vm/www/state", "booting")],
                    Some("www: off -> booting (query)"),
                ))
                .unwrap();
            // Nothing changed: no empty commit, unless the event is worth one.
            store
                .apply(change(&[("jitsu/vm/www/state", "booting")], Some("never")))
                .unwrap();
            store
                .apply(Change {
                    always: true,
                    ..change(
                        &[("jitsu/vm/www/state", "booting")],
                        Some("www: booting (adopted)"),
                    )
                })
                .unwrap();
            store.close();
        }
        assert_eq!(
            log(&dir),
            vec![
                "www: booting (adopted)",
                "www: off -> booting (query)",
                "configuration: added www"
            ]
        );
        let (store, tree) = Store::open(Some(&dir)).unwrap();
        assert_eq!(
            tree.get("jitsu/vm/www/state").map(String::as_str),
            Some("booting")
        );
        assert_eq!(
            tree.get("jitsu/vm/www/requests").map(String::as_str),
            Some("3")
        );
        let s = stored(&tree, "www").unwrap();
        assert_eq!(
            (s.state, s.starts, s.requests),
            (Some(Lifecycle::Booting), 0, 3)
        );
        assert!(stored(&tree, "nope").is_none());
        // Plain git reads it.
        let shown = run_git(&dir, &["show", "HEAD:jitsu/vm/www/state"]).unwrap();
        assert_eq!(shown, "booting\n");
        store
            .apply(Change {
                remove: vec![vm_prefix("www")],
                files: vec![],
                message: Some("configuration: removed www".into()),
                always: false,
            })
            .unwrap();
        store.close();
        assert!(read_head(&dir).unwrap().is_empty());
        assert!(!dir.join("jitsu/vm/www").exists());
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn temporary_stores_vanish_and_logs_render() {
        let (store, _) = Store::open(None).unwrap();
        let dir = store.dir().to_path_buf();
        store
            .apply(change(
                &[("jitsu/vm/a/state", "running")],
                Some("a: off -> running (adopted)"),
            ))
            .unwrap();
        store.flush();
        let l = render_log(&dir).unwrap();
        assert!(l.trim_end().ends_with("a: off -> running (adopted)"), "{l}");
        assert!(l.starts_with("20"), "dated: {l}");
        store.close();
        assert!(!dir.exists());
    }

    #[test]
    fn flush_returns_the_tree_head_holds() {
        let (store, tree) = Store::open(None).unwrap();
        assert_eq!(store.flush(), Some(tree));
        store
            .apply(change(
                &[("jitsu/vm/a/state", "off")],
                Some("configuration: added a"),
            ))
            .unwrap();
        // Written but not committed: not in HEAD, not in the flushed tree.
        store
            .apply(change(&[("jitsu/vm/a/requests", "3")], None))
            .unwrap();
        let flushed = store.flush().unwrap();
        assert_eq!(flushed, read_head(store.dir()).unwrap());
        assert_eq!(
            flushed.get("jitsu/vm/a/state").map(String::as_str),
            Some("off")
        );
        assert!(!flushed.contains_key("jitsu/vm/a/requests"));
        store.close();
    }

    fn views(specs: &[&str]) -> Vec<VmView> {
        let flags = crate::config::Flags {
            specs: specs.iter().map(|s| s.to_string()).collect(),
            ..Default::default()
        };
        crate::config::merge(&flags, None)
            .unwrap()
            .vms
            .into_iter()
            .map(|cfg| VmView {
                cfg: std::sync::Arc::new(cfg),
                state: Lifecycle::Off,
                domid: None,
                starts: 0,
                requests: 0,
                last_request: None,
                last_start: None,
            })
            .collect()
    }

    /// `tree` after `c`, as the writer applies it.
    fn applied(mut tree: Tree, c: &Change) -> Tree {
        tree.retain(|k, _| !c.remove.iter().any(|p| k.starts_with(p.as_str())));
        tree.extend(c.files.iter().cloned());
        tree
    }

    const A: &str = "name=a,dns=a.example.org,dns=a2.example.org,ip=10.0.0.1,command=x";
    const B: &str = "name=b,dns=b.example.org,ip=10.0.0.2,command=y";

    #[test]
    fn a_configuration_commit_names_what_it_adds_removes_and_changes() {
        let wall = Wall::now();
        let first = config_change(&Tree::new(), &views(&[A, B]), 60, &wall, "loaded");
        assert_eq!(first.summary.as_deref(), Some("added a, b"));
        assert_eq!(
            first.change.message.as_deref(),
            Some("configuration loaded: added a, b")
        );
        let tree = applied(Tree::new(), &first.change);
        let get = |t: &Tree, k: &str| t.get(k).cloned();
        assert_eq!(get(&tree, "jitsu/vm/a/state").as_deref(), Some("off"));
        assert_eq!(get(&tree, "jitsu/vm/a/starts").as_deref(), Some("0"));
        assert_eq!(
            get(&tree, "jitsu/vm/a/config/dns").as_deref(),
            Some("a.example.org\na2.example.org")
        );
        assert_eq!(
            get(&tree, "jitsu/vm/a/dns/a2.example.org").as_deref(),
            Some("60")
        );
        assert_eq!(get(&tree, "jitsu/vm/b/ip").as_deref(), Some("10.0.0.2"));
        assert!(tree.contains_key("jitsu/vm/b/mac"));

        // The same configuration again: nothing to say, and state left alone.
        let mut running = tree.clone();
        running.insert("jitsu/vm/a/state".into(), "running".into());
        let again = config_change(&running, &views(&[A, B]), 60, &wall, "reloaded");
        assert_eq!(again.summary, None);
        assert_eq!(
            again.change.message.as_deref(),
            Some("configuration reloaded: unchanged")
        );
        assert!(
            !again
                .change
                .files
                .iter()
                .any(|(k, _)| k.ends_with("/state"))
        );
        assert_eq!(
            get(&applied(running.clone(), &again.change), "jitsu/vm/a/state").as_deref(),
            Some("running")
        );

        // A key changed (a name dropped), one VM gone, one new.
        let a = "name=a,dns=a.example.org,ip=10.0.0.1,command=x";
        let c = "name=c,dns=c.example.org,ip=10.0.0.3,command=z";
        let next = config_change(&running, &views(&[c, a]), 60, &wall, "reloaded");
        assert_eq!(
            next.summary.as_deref(),
            Some("added c; removed b; changed a")
        );
        let after = applied(running, &next.change);
        assert!(!after.keys().any(|k| k.starts_with("jitsu/vm/b/")));
        assert!(!after.contains_key("jitsu/vm/a/dns/a2.example.org"));
        assert_eq!(get(&after, "jitsu/vm/c/state").as_deref(), Some("off"));
        // A TTL is part of the names' files: a new one changes every VM.
        let ttl = config_change(&after, &views(&[c, a]), 30, &wall, "reloaded");
        assert_eq!(ttl.summary.as_deref(), Some("changed c, a"));
    }

    #[test]
    fn lifecycle_and_mac_commits_read_as_history() {
        let wall = Wall::now();
        let mut v = views(&[A]).remove(0);
        v.state = Lifecycle::Booting;
        v.starts = 2;
        v.domid = Some(7);
        v.last_start = Some(wall.at);
        let c = lifecycle_change(&v, Lifecycle::Off, "query from 10.0.0.2", &wall);
        assert_eq!(
            c.message.as_deref(),
            Some("a: off -> booting (query from 10.0.0.2)")
        );
        assert!(c.always);
        let files: Tree = c.files.into_iter().collect();
        let file = |k: &str| files.get(&format!("jitsu/vm/a/{k}")).cloned();
        assert_eq!(file("state").as_deref(), Some("booting"));
        assert_eq!(file("starts").as_deref(), Some("2"));
        assert_eq!(file("domid").as_deref(), Some("7"));
        assert_eq!(file("last_start"), Some(wall.stamp(wall.at)));
        assert_eq!(file("last_request"), None);
        let c = lifecycle_change(&v, Lifecycle::Booting, "adopted: already running", &wall);
        assert_eq!(
            c.message.as_deref(),
            Some("a: booting (adopted: already running)")
        );
        let mac: Mac = "02:aa:00:00:00:77".parse().unwrap();
        let c = mac_change("a", mac);
        assert_eq!(c.files, [("jitsu/vm/a/mac".to_string(), mac.to_string())]);
        assert_eq!(
            c.message.as_deref(),
            Some("a: MAC 02:aa:00:00:00:77 from its domain")
        );
    }

    #[test]
    fn wall_stamps_are_unix_seconds_with_milliseconds() {
        let wall = Wall {
            at: Instant::now(),
            unix: UNIX_EPOCH + std::time::Duration::from_millis(1_700_000_000_250),
        };
        let ms = std::time::Duration::from_millis(1500);
        assert_eq!(wall.stamp(wall.at), "1700000000.250");
        assert_eq!(wall.stamp(wall.at + ms), "1700000001.750");
        assert_eq!(wall.stamp(wall.at - ms), "1699999998.750");
    }

    #[test]
    fn the_tree_renders_like_irmin_tree() {
        let mut t = Tree::new();
        t.insert("jitsu/vm/www/state".into(), "running".into());
        t.insert(
            "jitsu/vm/www/config/dns".into(),
            "a.example.org\nb.example.org".into(),
        );
        let out = render_tree(&t);
        let lines: Vec<&str> = out.lines().collect();
        assert_eq!(
            lines[0],
            "/jitsu/vm/www/config/dns....a.example.org, b.example.org"
        );
        assert_eq!(lines[1], "/jitsu/vm/www/state.........running");
    }
}
