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
//! The writing ([`Store`], a thread of its own, `writer`) goes through one long-running
//! `git fast-import` (`fast_import`): measured (`bench/state-store`), it records thousands of
//! changes a second where `git add -A` + `git commit` per change recorded about ten, and it
//! needs no index, so no `index.lock`. The DNS loop never waits for it: its queue is bounded
//! ([`QUEUE`]); a change that does not fit is dropped and counted, and the daemon then sends
//! the whole state ([`Store::rewrite`]), which supersedes what was lost. The same happens when
//! git cannot write (a full or read-only disk): the writer counts what it cannot record, asks
//! for the whole state at each retry, and commits it once it can (`writer`). At start a
//! repository that cannot be read is moved aside and kept, and a fresh one started; locks a
//! crashed jitsu-dns left are removed (`repo`). A jitsu-dns killed outright loses at most the
//! changes of the batch being written; its next start reconciles every VM with the backend
//! and commits what runs.
//!
//! Configuration changes can be pushed to the store's `incoming` branches: what a change
//! does is decided in [`changes`] (pure); reading it, merging it (a commit with two parents,
//! through the same fast-import) and recording a refusal are the functions below.

pub mod changes;
mod fast_import;
mod journal;
mod repo;
mod work_tree;
mod writer;

use std::collections::{BTreeMap, BTreeSet};
use std::ops::Bound;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use shared_proto::Mac;

use crate::config::VmConfig;
use crate::fleet::{Lifecycle, Stored, VmView};
use crate::metrics::Metrics;
use repo::run_git;

/// Changes that can wait for the writer thread; past this the daemon drops and counts them.
pub const QUEUE: usize = 4096;

/// Why the store failed.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    /// git is not installed.
    #[error("the state store needs git (Debian package git): {0}")]
    NoGit(std::io::Error),
    /// The directory could not be made a repository, or read.
    #[error("state store {}: {detail}", path.display())]
    Repo {
        /// The repository.
        path: PathBuf,
        /// What failed.
        detail: String,
    },
    /// Another jitsu-dns writes this store.
    #[error("state store {}: another jitsu-dns uses it (its .git is locked)", path.display())]
    Busy {
        /// The repository.
        path: PathBuf,
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
    /// A change, made at `at` (the commit's time), merging commit `merge` if given.
    Change {
        change: Change,
        at: SystemTime,
        merge: Option<String>,
    },
    /// The whole state as the fleet has it, superseding changes not recorded (`dropped` of
    /// them never reached the writer).
    Rewrite {
        tree: Tree,
        dropped: u64,
        at: SystemTime,
    },
    /// Answered with the tree as of the last commit once everything before it is done.
    Flush(mpsc::Sender<Tree>),
}

/// What the writer reports to, and asks of, the daemon.
pub struct Hooks {
    /// Where failures, drops, health and lag are counted.
    pub metrics: Arc<Metrics>,
    /// Called (from the writer thread) when the writer wants the whole state to write:
    /// answer with [`Store::rewrite`].
    pub want_rewrite: Box<dyn Fn() + Send>,
}

impl std::fmt::Debug for Hooks {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Hooks").finish_non_exhaustive()
    }
}

/// The repository and its writer thread.
#[derive(Debug)]
pub struct Store {
    dir: PathBuf,
    temporary: bool,
    tx: Option<mpsc::SyncSender<Msg>>,
    thread: Option<thread::JoinHandle<()>>,
    processed: Arc<AtomicU64>,
}

/// What the repository held at start-up: path -> value (without the final newline).
pub type Tree = BTreeMap<String, String>;

/// Reads the tree at HEAD (empty for a repository without commits).
pub fn read_head(dir: &Path) -> Result<Tree, StateError> {
    Ok(repo::read_head(dir)?.map(|h| h.tree).unwrap_or_default())
}

/// The branches with a configuration change waiting (see [`changes`]), as git lists them.
pub fn incoming(dir: &Path) -> Result<Vec<changes::Waiting>, StateError> {
    repo::incoming(dir).map_err(|detail| StateError::Repo {
        path: dir.to_path_buf(),
        detail,
    })
}

/// A change as read from the repository, against the branch's head as it is now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReadChange {
    /// Its commit's subject.
    pub subject: String,
    /// Already merged into the branch or recorded as refused: only its branch is left.
    pub handled: bool,
    /// The tree of its merge base with the branch; `None` if they share no history.
    pub base: Option<Tree>,
    /// Its tree.
    pub tip: Tree,
}

/// Reads the change at commit `sha` (blocking: run it off the loop, after a flush).
pub fn read_change(dir: &Path, sha: &str) -> Result<ReadChange, StateError> {
    let subject = repo::subject(dir, sha);
    let head = repo::head_sha(dir);
    let handled = head
        .as_deref()
        .is_some_and(|h| repo::is_ancestor(dir, sha, h))
        || repo::is_ancestor(dir, sha, changes::REFUSED);
    if handled {
        return Ok(ReadChange {
            subject,
            handled,
            base: None,
            tip: Tree::new(),
        });
    }
    let base = match head.and_then(|h| repo::merge_base(dir, sha, &h)) {
        Some(b) => Some(repo::read_tree(dir, &b)?),
        None => None,
    };
    Ok(ReadChange {
        subject,
        handled,
        base,
        tip: repo::read_tree(dir, sha)?,
    })
}

/// True once commit `sha` is in the history of HEAD's branch.
pub fn is_merged(dir: &Path, sha: &str) -> bool {
    repo::head_sha(dir).is_some_and(|h| repo::is_ancestor(dir, sha, &h))
}

/// Records the change at `sha` as refused, with `message`, on [`changes::REFUSED`], then
/// deletes its branch `refname` if it is still there. Returns the refusal's commit.
pub fn refuse_change(
    dir: &Path,
    refname: &str,
    sha: &str,
    message: &str,
) -> Result<String, StateError> {
    let err = |detail| StateError::Repo {
        path: dir.to_path_buf(),
        detail,
    };
    let recorded = repo::record_refused(dir, sha, message).map_err(err)?;
    repo::delete_ref(dir, refname, sha).map_err(err)?;
    Ok(recorded)
}

/// Deletes the branch `refname` of a change taken, if it is still at `sha`.
pub fn close_change(dir: &Path, refname: &str, sha: &str) -> Result<(), StateError> {
    repo::delete_ref(dir, refname, sha).map_err(|detail| StateError::Repo {
        path: dir.to_path_buf(),
        detail,
    })
}

impl Store {
    /// Opens (creating if needed) the repository at `path`, or a temporary one, and starts
    /// the writer. Returns the tree found at HEAD. A repository that cannot be read is moved
    /// aside and a fresh one started; one that cannot be written (a full or read-only disk)
    /// starts the writer broken, retrying, so that DNS is served all the same. Fails only
    /// without git or when another jitsu-dns writes the store.
    pub fn open(path: Option<&Path>, hooks: Hooks) -> Result<(Store, Tree), StateError> {
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
                    SystemTime::now()
                        .duration_since(UNIX_EPOCH)
                        .map(|d| d.as_nanos())
                        .unwrap_or_default()
                ));
                (d, true)
            }
        };
        let mut owner = None;
        // Nothing else writes this store: any lock file in it is a crashed writer's.
        let prepared = match repo::prepare(&dir, &mut owner, Duration::ZERO) {
            Err(e @ StateError::Busy { .. }) => return Err(e),
            other => other,
        };
        let tree = prepared
            .as_ref()
            .ok()
            .and_then(|r| r.head.as_ref())
            .map(|h| h.tree.clone())
            .unwrap_or_default();
        let (tx, rx) = mpsc::sync_channel(QUEUE);
        let processed = Arc::new(AtomicU64::new(0));
        let writer = writer::Writer::new(dir.clone(), hooks, owner, prepared, processed.clone());
        let thread = thread::Builder::new()
            .name("state-store".into())
            .spawn(move || writer.run(rx))
            .map_err(|e| StateError::Repo {
                path: dir.clone(),
                detail: format!("cannot start the writer thread: {e}"),
            })?;
        Ok((
            Store {
                dir,
                temporary,
                tx: Some(tx),
                thread: Some(thread),
                processed,
            },
            tree,
        ))
    }

    /// The repository's directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn send(&self, msg: Msg) -> Result<(), StateError> {
        let tx = self.tx.as_ref().ok_or(StateError::Writer("closed"))?;
        tx.try_send(msg).map_err(|e| match e {
            mpsc::TrySendError::Full(_) => StateError::Writer("queue full"),
            mpsc::TrySendError::Disconnected(_) => StateError::Writer("thread gone"),
        })
    }

    /// Queues a change, made now; never blocks. Fails if the queue is full (the change is
    /// lost: send the whole state with [`Store::rewrite`] soon).
    pub fn apply(&self, change: Change) -> Result<(), StateError> {
        self.send(Msg::Change {
            change,
            at: SystemTime::now(),
            merge: None,
        })
    }

    /// Queues a change, made now, as a commit that merges commit `merge` (a change taken from
    /// another branch); committed even if it changes no file. Fails as [`Store::apply`].
    pub fn apply_merging(&self, change: Change, merge: String) -> Result<(), StateError> {
        self.send(Msg::Change {
            change,
            at: SystemTime::now(),
            merge: Some(merge),
        })
    }

    /// Queues the whole state (every file of the tree, as [`snapshot`] builds it), which
    /// supersedes every change not recorded; `dropped` changes did not fit the queue. Never
    /// blocks; fails if the queue is full.
    pub fn rewrite(&self, tree: Tree, dropped: u64) -> Result<(), StateError> {
        self.send(Msg::Rewrite {
            tree,
            dropped,
            at: SystemTime::now(),
        })
    }

    /// Changes the writer is done with, recorded or lost: for benchmarks.
    pub fn processed(&self) -> u64 {
        self.processed.load(Ordering::Acquire)
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

/// The whole state: every VM's configuration and state files, as the configuration and the
/// state commits write them, for [`Store::rewrite`].
pub fn snapshot(vms: &[VmView], ttl: u32, wall: &Wall) -> Tree {
    vms.iter()
        .flat_map(|v| {
            config_files(&v.cfg, ttl)
                .into_iter()
                .chain(state_files(v, wall))
        })
        .collect()
}

/// The message of a rewrite: how many changes it supersedes, and each VM whose state it
/// changes (`state rewritten from the fleet (3 changes not recorded): a off -> running`).
fn rewrite_message(before: &Tree, after: &Tree, lost: u64) -> String {
    const SHOWN: usize = 8;
    let states = |t: &Tree| -> BTreeMap<String, String> {
        t.iter()
            .filter_map(|(k, v)| {
                let name = k.strip_prefix("jitsu/vm/")?.strip_suffix("/state")?;
                (!name.contains('/')).then(|| (name.to_string(), v.clone()))
            })
            .collect()
    };
    let (was, is) = (states(before), states(after));
    let names: BTreeSet<&String> = was.keys().chain(is.keys()).collect();
    let moved: Vec<String> = names
        .into_iter()
        .filter(|n| was.get(*n) != is.get(*n))
        .map(|n| {
            let s = |m: &BTreeMap<String, String>, none: &str| {
                m.get(n).cloned().unwrap_or_else(|| none.to_string())
            };
            format!("{n} {} -> {}", s(&was, "absent"), s(&is, "removed"))
        })
        .collect();
    let what = match moved.len() {
        0 => "no VM's state differed".to_string(),
        n if n <= SHOWN => moved.join(", "),
        n => format!("{}, and {} more", moved[..SHOWN].join(", "), n - SHOWN),
    };
    let changes = if lost == 1 { "change" } else { "changes" };
    format!("state rewritten from the fleet ({lost} {changes} not recorded): {what}")
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
    files.extend(ctl_files(v));
    files
}

/// The files of what operators said of a VM (`ctl/pin`, `ctl/drain`), present only when
/// they said it: `ctl pin`/`unpin` (true/false) and `ctl drain` outlive restarts.
fn ctl_files(v: &VmView) -> Vec<(String, String)> {
    let p = vm_prefix(&v.cfg.name);
    let mut files = Vec::new();
    if let Some(pin) = v.pin_override {
        files.push((format!("{p}ctl/pin"), pin.to_string()));
    }
    if v.drained {
        files.push((format!("{p}ctl/drain"), "true".into()));
    }
    files
}

/// The commit of an operator's pin or drain: `www: pinned (ctl pin by uid 0)`.
pub fn policy_change(view: &VmView, what: &str, cause: &str) -> Change {
    let p = vm_prefix(&view.cfg.name);
    Change {
        remove: vec![format!("{p}ctl/")],
        files: ctl_files(view),
        message: Some(format!("{}: {what} ({cause})", view.cfg.name)),
        always: true,
    }
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
        pin: get("ctl/pin").and_then(|s| s.parse().ok()),
        drained: get("ctl/drain").is_some_and(|s| s == "true"),
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

    fn hooks() -> Hooks {
        Hooks {
            metrics: Arc::new(Metrics::new()),
            want_rewrite: Box::new(|| {}),
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
            let (store, tree) = Store::open(Some(&dir), hooks()).unwrap();
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
        let (store, tree) = Store::open(Some(&dir), hooks()).unwrap();
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
        let (store, _) = Store::open(None, hooks()).unwrap();
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
    fn after_a_burst_of_changes_a_flush_leaves_the_work_tree_showing_head() {
        let dir = tmp("wt");
        let (store, _) = Store::open(Some(&dir), hooks()).unwrap();
        for i in 0..50 {
            let vm = format!("jitsu/vm/v{i}/state");
            for state in ["off", "booting", "running"] {
                store
                    .apply(change(&[(&vm, state)], Some(&format!("v{i}: {state}"))))
                    .unwrap();
            }
        }
        store
            .apply(Change {
                remove: vec![vm_prefix("v7")],
                ..change(&[], Some("configuration: removed v7"))
            })
            .unwrap();
        let flushed = store.flush().unwrap();
        for i in (0..50).filter(|i| *i != 7) {
            let path = format!("jitsu/vm/v{i}/state");
            assert_eq!(flushed.get(&path).map(String::as_str), Some("running"));
            assert_eq!(
                std::fs::read_to_string(dir.join(&path)).unwrap(),
                "running\n",
                "{path} as a person cats it"
            );
        }
        assert!(!dir.join("jitsu/vm/v7").exists(), "a removed VM's files go");
        assert_eq!(log(&dir).len(), 151, "one commit per change");
        store.close();
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn flush_returns_the_tree_head_holds() {
        let (store, tree) = Store::open(None, hooks()).unwrap();
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
                running_since: None,
                idle_since: None,
                idle_deadline: None,
                pinned: false,
                pin_override: None,
                drained: false,
                failures: 0,
                backoff_until: None,
                last_error: None,
                last_boot_took: None,
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
    fn a_store_that_cannot_write_counts_drops_and_converges_on_the_whole_state() {
        let dir = tmp("broken");
        let metrics = Arc::new(Metrics::new());
        let (asked_tx, asked) = mpsc::channel();
        let asked_tx = std::sync::Mutex::new(asked_tx);
        let (store, _) = Store::open(
            Some(&dir),
            Hooks {
                metrics: metrics.clone(),
                want_rewrite: Box::new(move || {
                    let _ = asked_tx.lock().unwrap().send(());
                }),
            },
        )
        .unwrap();
        let text = || metrics.render().expect("renders");
        let has = |line: &str| text().lines().any(|l| l == line);
        let lag = || -> f64 {
            let t = text();
            let v = t
                .lines()
                .find_map(|l| l.strip_prefix("jitsu_dns_state_store_lag_seconds "))
                .expect("the lag is exposed");
            v.parse().expect("the lag is a number")
        };
        store
            .apply(change(
                &[("jitsu/vm/a/state", "off")],
                Some("configuration: added a"),
            ))
            .unwrap();
        store.flush();
        assert!(has("jitsu_dns_state_store_healthy 1"), "{}", text());
        // A git that holds the branch's lock (fresh, so not taken for stale) refuses.
        let branch = run_git(&dir, &["symbolic-ref", "HEAD"]).unwrap();
        let lock = dir.join(".git").join(format!("{}.lock", branch.trim()));
        std::fs::write(&lock, "").unwrap();
        store
            .apply(change(
                &[("jitsu/vm/a/state", "booting")],
                Some("a: off -> booting"),
            ))
            .unwrap();
        store
            .apply(change(
                &[("jitsu/vm/a/state", "running")],
                Some("a: booting -> running"),
            ))
            .unwrap();
        let head = store.flush().unwrap();
        assert_eq!(
            head.get("jitsu/vm/a/state").map(String::as_str),
            Some("off")
        );
        assert_eq!(log(&dir), ["configuration: added a"]);
        assert!(has("jitsu_dns_state_store_healthy 0"), "{}", text());
        assert!(has("jitsu_dns_state_write_failures_total 1"), "{}", text());
        assert!(has("jitsu_dns_state_changes_dropped_total 2"), "{}", text());
        assert!(lag() > 0.0, "behind: {}", text());

        std::fs::remove_file(&lock).unwrap();
        asked
            .recv_timeout(Duration::from_secs(10))
            .expect("the writer asks for the whole state");
        let mut whole = Tree::new();
        whole.insert("jitsu/vm/a/state".into(), "running".into());
        store.rewrite(whole.clone(), 1).unwrap();
        assert_eq!(store.flush(), Some(whole));
        assert_eq!(
            log(&dir),
            [
                "state rewritten from the fleet (3 changes not recorded): a off -> running",
                "configuration: added a"
            ]
        );
        assert!(has("jitsu_dns_state_store_healthy 1"), "{}", text());
        assert_eq!(lag(), 0.0, "{}", text());
        assert_eq!(
            std::fs::read_to_string(dir.join("jitsu/vm/a/state")).unwrap(),
            "running\n",
            "the work tree follows"
        );
        store.close();
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn the_whole_state_is_what_the_configuration_and_state_commits_write() {
        let wall = Wall::now();
        let mut vms = views(&[A, B]);
        vms[0].state = Lifecycle::Running;
        vms[0].starts = 1;
        let loaded = config_change(&Tree::new(), &vms, 60, &wall, "loaded").change;
        let mut tree = applied(Tree::new(), &loaded);
        for v in &vms {
            tree = applied(tree, &lifecycle_change(v, Lifecycle::Off, "x", &wall));
        }
        assert_eq!(snapshot(&vms, 60, &wall), tree);
    }

    #[test]
    fn a_rewrite_says_what_it_supersedes_and_which_states_it_changes() {
        let t = |pairs: &[(&str, &str)]| -> Tree {
            pairs
                .iter()
                .map(|(n, s)| (format!("jitsu/vm/{n}/state"), s.to_string()))
                .collect()
        };
        let before = t(&[("a", "off"), ("b", "running"), ("gone", "off")]);
        let after = t(&[("a", "running"), ("b", "running"), ("new", "off")]);
        assert_eq!(
            rewrite_message(&before, &after, 1),
            "state rewritten from the fleet (1 change not recorded): \
             a off -> running, gone off -> removed, new absent -> off"
        );
        assert_eq!(
            rewrite_message(&after, &after, 0),
            "state rewritten from the fleet (0 changes not recorded): no VM's state differed"
        );
        let many: Tree = (0..10)
            .map(|i| (format!("jitsu/vm/v{i}/state"), "running".to_string()))
            .collect();
        assert!(
            rewrite_message(&Tree::new(), &many, 20).ends_with("v7 absent -> running, and 2 more")
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
