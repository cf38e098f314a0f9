//! The writer thread: takes changes off the store's queue in batches, commits each as its own
//! commit through fast-import, one checkpoint per batch, and keeps the work tree and git's
//! housekeeping in step; when git cannot write, it counts, says so, and converges again.
//!
//! Batching: whatever is queued when the writer is free goes into one batch (at most
//! [`MAX_BATCH`] messages), so under load a checkpoint costs once for many commits, and a
//! lone change is committed at once. One commit per change all the same, each with its own
//! message and time.
//!
//! The work tree follows each checkpoint on a thread of its own (`work_tree`); a flush is
//! answered once it is written.
//!
//! Failures ([`Health`], pure): a batch git refused is undone and counted, with every change
//! in it; from then on changes are counted and dropped, not queued or replayed, and at each
//! retry (backing off from 1 s to [`MAX_BACKOFF`]) the writer asks the daemon for the whole
//! state as the fleet has it now ([`super::Msg::Rewrite`]). It then prepares the repository
//! again (stale locks, a repository moved aside if it became unreadable) and commits that
//! state in one commit that says what was not recorded. When that commit lands, the store is
//! healthy again.

use std::path::PathBuf;
use std::process::Child;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::time::{Duration, Instant, SystemTime};

use tracing::{debug, error, info, warn};

use super::fast_import::{self, FastImport};
use super::journal::{Edits, Journal};
use super::repo::{self, Owner, Ready};
use super::work_tree::WorkTree;
use super::{Hooks, Msg, StateError, rewrite_message};
use shared_io::RateLimited;

/// Messages taken off the queue for one batch, at most.
pub(crate) const MAX_BATCH: usize = 1024;

/// The longest wait between two attempts to write again.
pub(crate) const MAX_BACKOFF: Duration = Duration::from_secs(10);

/// Quiet for this long, the writer ends its fast-import and does git's housekeeping.
const IDLE: Duration = Duration::from_secs(1);

/// Checkpoints (each a small pack) between two background repacks, for a writer kept busy:
/// git's lookups slow down with the number of packs.
const REPACK_EVERY: u32 = 32;

/// A lock file this old while jitsu-dns runs was left by a git that died: no git holds one
/// for more than a moment.
const STALE_LOCK: Duration = Duration::from_secs(60);

/// Whether the store records every change, and when to try again if not: pure, `now` given.
#[derive(Debug, Default)]
pub(crate) struct Health {
    broken: Option<Broken>,
}

#[derive(Debug)]
struct Broken {
    /// When the first change went unrecorded.
    since: SystemTime,
    /// Failed attempts in a row.
    failures: u32,
    retry_at: Instant,
    /// Changes not recorded since.
    lost: u64,
}

/// The wait after the `failures`-th failure in a row: 1 s, doubling, at most [`MAX_BACKOFF`].
fn backoff(failures: u32) -> Duration {
    let doublings = failures.saturating_sub(1).min(16);
    (Duration::from_secs(1) * (1u32 << doublings)).min(MAX_BACKOFF)
}

impl Health {
    /// An attempt to write failed at `now` (`wall` on the wall clock), losing `lost` changes.
    pub(crate) fn failed(&mut self, now: Instant, wall: SystemTime, lost: u64) {
        let b = self.broken.get_or_insert(Broken {
            since: wall,
            failures: 0,
            retry_at: now,
            lost: 0,
        });
        b.failures += 1;
        b.lost += lost;
        b.retry_at = now + backoff(b.failures);
    }

    /// A change arrived while broken: not recorded.
    pub(crate) fn lose(&mut self) {
        if let Some(b) = &mut self.broken {
            b.lost += 1;
        }
    }

    /// True while changes are not recorded.
    pub(crate) fn is_broken(&self) -> bool {
        self.broken.is_some()
    }

    /// Since when the store is behind the fleet.
    pub(crate) fn since(&self) -> Option<SystemTime> {
        self.broken.as_ref().map(|b| b.since)
    }

    /// Changes not recorded so far.
    pub(crate) fn lost(&self) -> u64 {
        self.broken.as_ref().map_or(0, |b| b.lost)
    }

    /// When to try again.
    pub(crate) fn retry_at(&self) -> Option<Instant> {
        self.broken.as_ref().map(|b| b.retry_at)
    }

    /// True if a retry is due at `now`; the next one is then due a backoff later, in case
    /// this one never gets to an attempt.
    pub(crate) fn retry_due(&mut self, now: Instant) -> bool {
        match &mut self.broken {
            Some(b) if now >= b.retry_at => {
                b.retry_at = now + backoff(b.failures);
                true
            }
            _ => false,
        }
    }

    /// A write landed: healthy again.
    pub(crate) fn recovered(&mut self) {
        self.broken = None;
    }
}

/// One commit to make.
struct Pending {
    at: SystemTime,
    message: String,
    edits: Edits,
    /// A commit this one merges.
    merge: Option<String>,
}

/// The thread's state: the repository it writes, the tree, and how writing goes.
pub(crate) struct Writer {
    dir: PathBuf,
    hooks: Hooks,
    owner: Option<Owner>,
    /// The branch HEAD names; empty until the repository could be prepared.
    branch: String,
    head: Option<String>,
    journal: Journal,
    fast_import: Option<FastImport>,
    health: Health,
    warn: RateLimited,
    processed: Arc<AtomicU64>,
    /// A line for the history before the next commit (a repository started afresh).
    note: Option<String>,
    /// The work tree's thread; written whole after the next commit once marked stale.
    work_tree: WorkTree,
    housekeeping_due: bool,
    /// Packs written since the last repack, and the repack running, if any.
    packs: u32,
    repack: Option<Child>,
}

impl Writer {
    /// A writer for the repository at `dir`, as [`repo::prepare`] left it (or why it could
    /// not); the tree at HEAD is the journal's start.
    pub(crate) fn new(
        dir: PathBuf,
        hooks: Hooks,
        owner: Option<Owner>,
        prepared: Result<Ready, StateError>,
        processed: Arc<AtomicU64>,
    ) -> Writer {
        let mut w = Writer {
            work_tree: WorkTree::start(dir.clone()),
            dir,
            hooks,
            owner,
            branch: String::new(),
            head: None,
            journal: Journal::default(),
            fast_import: None,
            health: Health::default(),
            warn: RateLimited::new(Duration::from_secs(10)),
            processed,
            note: None,
            housekeeping_due: false,
            packs: 0,
            repack: None,
        };
        match prepared {
            Ok(ready) => {
                w.adopt(ready);
                w.work_tree.whole(w.journal.committed());
                w.hooks.metrics.set_state_store_healthy(true);
            }
            Err(e) => {
                error!(store = %w.dir.display(), error = %e, "state store unusable: DNS is served, changes are not recorded until it can be written, then the whole state is");
                w.health.failed(Instant::now(), SystemTime::now(), 0);
                w.hooks.metrics.add_state_write_failure();
                w.hooks.metrics.set_state_store_healthy(false);
                w.hooks.metrics.set_state_pending_since(w.health.since());
            }
        }
        w
    }

    /// Takes over a repository [`repo::prepare`] made ready.
    fn adopt(&mut self, ready: Ready) {
        for lock in &ready.stale_locks {
            warn!(lock = %lock.display(), "state store: removed a stale lock left by a git that died (a crashed jitsu-dns)");
        }
        if let Some((to, why)) = &ready.moved_aside {
            error!(store = %self.dir.display(), moved_to = %to.display(), error = %why, "state store could not be read: moved aside and kept; a fresh one is started from the configuration and what the backend runs");
            let why = why.lines().next().unwrap_or_default();
            self.note = Some(format!(
                "state store started afresh: the previous one could not be read ({why}); kept at {}",
                to.display()
            ));
        }
        self.branch = ready.branch;
        let (head, tree) = ready
            .head
            .map(|h| (Some(h.sha), h.tree))
            .unwrap_or_default();
        self.head = head;
        self.journal = Journal::new(tree);
    }

    /// Runs until the queue's sender is gone.
    pub(crate) fn run(mut self, rx: Receiver<Msg>) {
        loop {
            // Checked whether or not changes keep coming: they are dropped meanwhile.
            if self.health.retry_due(Instant::now()) {
                debug!("state store: asking for the whole state to write again");
                (self.hooks.want_rewrite)();
            }
            let wait = match self.health.retry_at() {
                Some(at) => Some(at.saturating_duration_since(Instant::now())),
                None if self.fast_import.is_some() || self.housekeeping_due => Some(IDLE),
                None => None,
            };
            let first = match wait {
                None => match rx.recv() {
                    Ok(m) => m,
                    Err(_) => break,
                },
                Some(d) => match rx.recv_timeout(d) {
                    Ok(m) => m,
                    Err(RecvTimeoutError::Timeout) => {
                        if !self.health.is_broken() {
                            self.on_idle();
                        }
                        continue;
                    }
                    Err(RecvTimeoutError::Disconnected) => break,
                },
            };
            let mut batch = vec![first];
            while batch.len() < MAX_BATCH {
                match rx.try_recv() {
                    Ok(m) => batch.push(m),
                    Err(_) => break,
                }
            }
            self.run_batch(batch);
        }
        self.work_tree.sync();
        if let Some(fi) = self.fast_import.take() {
            fi.close();
        }
        self.wait_repack();
        if self.housekeeping_due && !self.health.is_broken() {
            let _ = repo::housekeeping(&self.dir);
        }
    }

    /// Waits for a background repack: two at once could remove the packs the other reads.
    fn wait_repack(&mut self) {
        if let Some(mut r) = self.repack.take() {
            let _ = r.wait();
        }
    }

    /// A pack was written: starts a repack every [`REPACK_EVERY`], unless one still runs.
    fn count_pack(&mut self) {
        self.packs += 1;
        let running = self
            .repack
            .as_mut()
            .is_some_and(|r| matches!(r.try_wait(), Ok(None)));
        if self.packs < REPACK_EVERY || running {
            return;
        }
        match repo::repack(&self.dir) {
            Ok(child) => {
                self.repack = Some(child);
                self.packs = 0;
            }
            Err(e) => debug!(error = %e, "state store repack"),
        }
    }

    /// Nothing came for a while: ends fast-import and tidies up.
    fn on_idle(&mut self) {
        if let Some(fi) = self.fast_import.take() {
            fi.close();
        }
        if self.housekeeping_due {
            self.wait_repack();
            match repo::housekeeping(&self.dir) {
                Ok(()) => self.housekeeping_due = false,
                // Cosmetic (the index) or deferred (packing): tried again when quiet.
                Err(e) => debug!(error = %e, "state store housekeeping"),
            }
        }
    }

    fn run_batch(&mut self, batch: Vec<Msg>) {
        let mut flushes = Vec::new();
        let mut commits = Vec::new();
        // Changes taken into this batch's commits (not those dropped while broken), and
        // those the daemon dropped that a rewrite in it supersedes.
        let mut taken = 0u64;
        let mut carried = 0u64;
        let mut accepting = !self.health.is_broken();
        if accepting {
            let oldest = batch
                .iter()
                .filter_map(|m| match m {
                    Msg::Change { at, .. } | Msg::Rewrite { at, .. } => Some(*at),
                    Msg::Flush(_) => None,
                })
                .min();
            self.hooks.metrics.set_state_pending_since(oldest);
        }
        for msg in batch {
            match msg {
                Msg::Flush(done) => flushes.push(done),
                Msg::Change { change, at, merge } => {
                    if !accepting {
                        self.health.lose();
                        self.hooks.metrics.add_store_dropped(1);
                        self.processed.fetch_add(1, Ordering::Relaxed);
                        continue;
                    }
                    taken += 1;
                    self.journal.apply(&change.remove, change.files);
                    if let Some(message) = change.message {
                        let edits = self.journal.take_commit();
                        if !edits.is_empty() || change.always || merge.is_some() {
                            commits.push(Pending {
                                at,
                                message,
                                edits,
                                merge,
                            });
                        }
                    }
                }
                Msg::Rewrite { tree, dropped, at } => {
                    if !accepting {
                        // The repository may have changed under us: start from what it holds.
                        if let Err(e) = self.reopen() {
                            self.failed(&e, 0, dropped);
                            continue;
                        }
                        accepting = true;
                    }
                    let before = self.journal.committed();
                    self.journal.replace(tree);
                    let message =
                        rewrite_message(&before, self.journal.tree(), self.health.lost() + dropped);
                    let edits = self.journal.take_commit();
                    commits.push(Pending {
                        at,
                        message,
                        edits,
                        merge: None,
                    });
                    carried += dropped;
                }
            }
        }
        if accepting && let Some(note) = &self.note {
            commits.insert(
                0,
                Pending {
                    at: SystemTime::now(),
                    message: note.clone(),
                    edits: Edits::default(),
                    merge: None,
                },
            );
        }
        if !commits.is_empty() {
            match self.write(&commits) {
                Ok(()) => {
                    self.note = None;
                    if self.health.is_broken() {
                        info!(
                            lost = self.health.lost(),
                            "state store recovered: the whole state was rewritten from the fleet"
                        );
                        self.health.recovered();
                        self.hooks.metrics.set_state_store_healthy(true);
                    }
                }
                Err(e) => {
                    self.journal.rollback();
                    self.failed(&e, taken, carried);
                }
            }
        }
        if !self.health.is_broken() {
            self.hooks.metrics.set_state_pending_since(None);
        }
        self.processed.fetch_add(taken, Ordering::Relaxed);
        if !flushes.is_empty() {
            self.work_tree.sync();
        }
        for done in flushes {
            let _ = done.send(self.journal.committed());
        }
    }

    /// Commits `commits` and checkpoints; on success the work tree follows.
    fn write(&mut self, commits: &[Pending]) -> Result<(), String> {
        if self.branch.is_empty() {
            return Err("the repository was never ready".into());
        }
        let mut fi = match self.fast_import.take() {
            Some(fi) => fi,
            None => FastImport::spawn(&self.dir, &self.branch, self.head.as_deref())?,
        };
        for c in commits {
            fi.commit(c.at, &c.message, &c.edits, c.merge.as_deref());
        }
        let sha = match fi.checkpoint(&self.dir) {
            Ok(sha) => sha,
            Err(e) => {
                fi.kill();
                return Err(e);
            }
        };
        self.head = Some(sha);
        if fi.commits() >= fast_import::MAX_COMMITS {
            fi.close();
        } else {
            self.fast_import = Some(fi);
        }
        self.housekeeping_due = true;
        self.count_pack();
        let changed = self.journal.checkpointed();
        self.work_tree.files(changed, || self.journal.committed());
        Ok(())
    }

    /// Prepares the repository again, after a failure, and starts over from its HEAD.
    fn reopen(&mut self) -> Result<(), String> {
        if let Some(fi) = self.fast_import.take() {
            fi.kill();
        }
        let ready =
            repo::prepare(&self.dir, &mut self.owner, STALE_LOCK).map_err(|e| e.to_string())?;
        self.adopt(ready);
        self.work_tree.mark_stale();
        Ok(())
    }

    /// A write failed, losing `lost` changes (counted here) and `carried` ones the daemon
    /// dropped and counted already.
    fn failed(&mut self, error: &str, lost: u64, carried: u64) {
        let now = Instant::now();
        let m = &self.hooks.metrics;
        m.add_state_write_failure();
        m.add_store_dropped(lost);
        m.set_state_store_healthy(false);
        self.health.failed(now, SystemTime::now(), lost + carried);
        m.set_state_pending_since(self.health.since());
        if let Some(suppressed) = self.warn.allow(now) {
            warn!(
                store = %self.dir.display(),
                %error,
                lost = self.health.lost(),
                suppressed,
                "state store cannot write: changes are not recorded until it can, then the whole state is rewritten from the fleet"
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SEC: Duration = Duration::from_secs(1);

    #[test]
    fn retries_back_off_from_one_second_to_the_cap() {
        let waits: Vec<Duration> = (1..=6).map(backoff).collect();
        assert_eq!(
            waits,
            [SEC, SEC * 2, SEC * 4, SEC * 8, MAX_BACKOFF, MAX_BACKOFF]
        );
        assert_eq!(backoff(u32::MAX), MAX_BACKOFF);
    }

    #[test]
    fn a_broken_store_counts_what_it_loses_and_asks_again_until_it_recovers() {
        let t0 = Instant::now();
        let wall = SystemTime::UNIX_EPOCH + SEC * 1_700_000_000;
        let mut h = Health::default();
        assert!(!h.is_broken() && h.retry_at().is_none());
        h.lose();
        assert_eq!(h.lost(), 0, "nothing is lost while healthy");
        h.failed(t0, wall, 3);
        h.lose();
        assert_eq!((h.lost(), h.since()), (4, Some(wall)));
        assert_eq!(h.retry_at(), Some(t0 + SEC));
        assert!(!h.retry_due(t0 + SEC / 2));
        assert!(h.retry_due(t0 + SEC));
        assert!(
            !h.retry_due(t0 + SEC * 3 / 2),
            "asked once, again a backoff later"
        );
        assert!(h.retry_due(t0 + SEC * 2));
        // The rewrite failed too: it waits longer, and it is behind since the first failure.
        h.failed(t0 + SEC * 2, wall + SEC * 2, 0);
        assert_eq!(h.retry_at(), Some(t0 + SEC * 4));
        assert_eq!(h.since(), Some(wall));
        h.recovered();
        assert!(!h.is_broken());
        assert_eq!((h.lost(), h.since()), (0, None));
    }
}
