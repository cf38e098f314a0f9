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
//! A dedicated thread runs the `git` CLI, so the DNS loop never waits for a commit; its queue
//! is bounded ([`QUEUE`]) and a change that does not fit is dropped, logged and counted. This
//! module does not decide what changed: the daemon tells it.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::thread;

use crate::fleet::{Lifecycle, Stored};

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
