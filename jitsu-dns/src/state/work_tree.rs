//! The work tree's own thread: the files a person `cat`s follow HEAD off the commit path.
//!
//! Owns writing the work tree: the writer hands it each checkpoint's changed files (or the
//! whole committed tree), and it writes them, the latest value per path when several wait.
//! Creating a file can cost milliseconds (this project's test machine: ext4 without a
//! journal skips every inode freed in the last 30 s, one inode read each), and written by the
//! writer after every batch they held the next commits back: the history fell 3-4 s behind
//! at 100 boots a second (issue 12). It does not decide what HEAD holds: the writer does.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::thread;

use tracing::debug;

use super::Tree;
use super::repo;

enum Update {
    /// The committed tree, written whole.
    Whole(Tree),
    /// Committed values that changed (`None`: removed).
    Files(Vec<(String, Option<String>)>),
    /// Answered once everything sent before is written.
    Sync(mpsc::Sender<()>),
}

/// The thread writing the work tree of one repository.
#[derive(Debug)]
pub(crate) struct WorkTree {
    tx: Option<mpsc::Sender<Update>>,
    thread: Option<thread::JoinHandle<()>>,
    /// The files may differ from what was committed (a write failed, or the writer reopened
    /// the repository): the next update must be the whole tree.
    stale: Arc<AtomicBool>,
}

impl WorkTree {
    /// Starts the thread for the repository at `dir`.
    pub(crate) fn start(dir: PathBuf) -> WorkTree {
        let (tx, rx) = mpsc::channel();
        let stale = Arc::new(AtomicBool::new(false));
        let stale2 = stale.clone();
        let thread = thread::Builder::new()
            .name("state-work-tree".into())
            .spawn(move || run(&dir, &rx, &stale2));
        match thread {
            Ok(t) => WorkTree {
                tx: Some(tx),
                thread: Some(t),
                stale,
            },
            Err(e) => {
                debug!(error = %e, "state store: no thread for the work tree; it is not written");
                WorkTree {
                    tx: None,
                    thread: None,
                    stale,
                }
            }
        }
    }

    /// The committed tree is `tree`: written whole.
    pub(crate) fn whole(&self, tree: Tree) {
        self.stale.store(false, Ordering::Relaxed);
        self.send(Update::Whole(tree));
    }

    /// The files may differ from what is committed: the next update writes the whole tree.
    pub(crate) fn mark_stale(&self) {
        self.stale.store(true, Ordering::Relaxed);
    }

    /// The committed values of `changed` changed; if the files went stale since the last
    /// whole tree, `committed` is written whole instead.
    pub(crate) fn files(
        &self,
        changed: Vec<(String, Option<String>)>,
        committed: impl FnOnce() -> Tree,
    ) {
        if self.stale.load(Ordering::Relaxed) {
            self.whole(committed());
        } else if !changed.is_empty() {
            self.send(Update::Files(changed));
        }
    }

    /// Waits until everything sent before is written.
    pub(crate) fn sync(&self) {
        let (done_tx, done_rx) = mpsc::channel();
        self.send(Update::Sync(done_tx));
        let _ = done_rx.recv();
    }

    fn send(&self, update: Update) {
        if let Some(tx) = &self.tx {
            let _ = tx.send(update);
        }
    }
}

impl Drop for WorkTree {
    /// Writes what waits, then ends the thread.
    fn drop(&mut self) {
        self.tx = None;
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn run(dir: &std::path::Path, rx: &mpsc::Receiver<Update>, stale: &AtomicBool) {
    while let Ok(first) = rx.recv() {
        // Everything waiting, the latest value per path.
        let mut whole = None;
        let mut files = BTreeMap::new();
        let mut syncs = Vec::new();
        for update in std::iter::once(first).chain(rx.try_iter()) {
            match update {
                Update::Whole(tree) => {
                    whole = Some(tree);
                    files.clear();
                }
                Update::Files(changed) => files.extend(changed),
                Update::Sync(done) => syncs.push(done),
            }
        }
        let mut ok = whole.is_none_or(|tree| {
            repo::rewrite_work_tree(dir, &tree)
                .map_err(|e| debug!(error = %e, "state store: work tree"))
                .is_ok()
        });
        for (path, value) in files {
            if let Err(e) = repo::write_file(dir, &path, value.as_deref()) {
                debug!(error = %e, "state store: work tree");
                ok = false;
            }
        }
        if !ok {
            stale.store(true, Ordering::Relaxed);
        }
        for done in syncs {
            let _ = done.send(());
        }
    }
}
