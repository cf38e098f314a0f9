//! Keeps the bridge's forwarding table as synjitsu wants it: the MACs the core steers point
//! at synjitsu's port, the ones it released and every one an earlier run made have no entry
//! of synjitsu's left, wherever the entry went.
//!
//! Owns the wanted state (not a queue of operations: each MAC is steered or not, the last
//! wish wins, and nothing is dropped however many change at once), the thread that makes the
//! table say it, and the record of what synjitsu made ([`record`]). The thread:
//! - applies each change as it comes, one netlink request each (a steer or a release on the
//!   hand-over path takes microseconds; a release whose entry is not on synjitsu's port any
//!   more looks for it in a dump);
//! - reconciles: dumps the table and applies what [`plan::plan`] says is missing, at start
//!   (removing what an earlier run left: the record), after every `sync` (the shell asks),
//!   after a failure (retried at 50 ms, doubling up to the interval), and every
//!   `reconcile_interval` (10 s by default) for what changed behind synjitsu's back: an admin's
//!   `bridge fdb del`, a flushed table. With sticky entries the dump is of synjitsu's port
//!   alone (the kernel filters it), so it costs little however much the bridge learnt; every
//!   10 s is noise, and 10 s is the hold timeout: a wrong entry is put right before a client
//!   held meanwhile would have been given up;
//! - at exit, releases everything and removes the record.
//!
//! A release can also be made by the shell itself, in the same loop turn as the announcement
//! that asks for it ([`Steering::release_now`], on a netlink socket of its own: one request,
//! microseconds): through the thread it took a wake-up on each side, ~0.2 ms on a busy
//! machine, during which the guest's first answers to its client (its ARP for the client, the
//! client's reply and ACK) still came to synjitsu. The thread is then told it was done
//! ([`Steering::released`]) and sees to the rest as for any release: its state, the record,
//! and removing the entry again should a steer it was applying meanwhile have put it back.
//!
//! It tells the shell each change once it was tried, never waiting for it (the core waits for a release
//! before sending SYNs for the guest into the bridge), counts what it did ([`SteeringStats`]), and does not decide what to steer
//! ([`crate::hold`]) or speak netlink ([`crate::fdb`]).

pub mod plan;
pub mod record;

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use shared_proto::Mac;
use tokio::sync::Notify;

use self::plan::{Fix, Wanted, plan};
use self::record::Record;
use crate::fdb::Fdb;
use crate::hold::{FdbAction, FdbOp};

/// The first retry after a failed change; doubled each time, up to the reconcile interval.
const FIRST_RETRY: Duration = Duration::from_millis(50);

/// Where the record of the entries synjitsu made on `bridge` lives: beside the control
/// socket (synjitsu's runtime directory), one per bridge.
pub fn record_path(control: &Path, bridge: &str) -> PathBuf {
    control
        .parent()
        .unwrap_or(Path::new("."))
        .join(format!("synjitsu-{bridge}.fdb"))
}

/// What the thread did, for metrics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SteeringStats {
    /// Entries added or removed as asked (not by a reconcile).
    pub changes: u64,
    /// Netlink requests and record writes that failed.
    pub errors: u64,
    /// Changes tried again after a failure.
    pub retries: u64,
    /// Reconciles completed (a dump compared with what is wanted, and the fixes applied).
    pub reconciles: u64,
    /// Entries a reconcile added, moved back or removed.
    pub fixed: u64,
    /// MACs whose wanted state is not known to be on the bridge yet.
    pub pending: u64,
    /// Whether steering entries are sticky.
    pub sticky: bool,
    /// Releases the shell made itself ([`Steering::release_now`]), also in `changes`.
    pub released_now: u64,
}

#[derive(Debug, Default)]
struct Counters {
    changes: AtomicU64,
    errors: AtomicU64,
    retries: AtomicU64,
    reconciles: AtomicU64,
    fixed: AtomicU64,
    pending: AtomicU64,
    sticky: AtomicBool,
    released_now: AtomicU64,
}

/// A wish as the thread takes it.
#[derive(Debug)]
struct Wish {
    op: FdbOp,
    /// A release the shell made already ([`Steering::release_now`]).
    removed: bool,
}

/// What the shell hands the thread: the latest wish per MAC, never more than one each.
#[derive(Debug, Default)]
struct Inbox {
    wishes: HashMap<Mac, Wish>,
    reconcile: bool,
    closing: bool,
}

#[derive(Debug, Default)]
struct Shared {
    inbox: Mutex<Inbox>,
    wake: Condvar,
    /// The ids of the wishes tried since the shell last took them: state the thread adds to
    /// and the shell empties, never a queue the thread could wait on (at most one per wish).
    done: Mutex<Vec<u64>>,
    /// Told when `done` grows.
    done_ready: Arc<Notify>,
    counters: Counters,
}

/// Locks `m`. A panic on the thread while it held the lock leaves what it guards as
/// consistent as ever: both are only ever swapped out or extended whole.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Shared {
    fn inbox(&self) -> MutexGuard<'_, Inbox> {
        lock(&self.inbox)
    }
}

/// The handle the shell keeps: hands over wishes, asks for reconciles, reads the stats.
#[derive(Debug)]
pub struct Steering {
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
    /// The shell's own socket, for [`Steering::release_now`].
    fast: Fdb,
}

impl Steering {
    /// Starts the thread on `fdb`, with the `record` of an earlier run, keeping synjitsu's
    /// own address `own` on its port; `fast`, a second socket on the same bridge and port, is
    /// the shell's ([`Steering::release_now`]).
    pub fn spawn(
        fdb: Fdb,
        fast: Fdb,
        record: Record,
        own: Mac,
        reconcile_interval: Duration,
    ) -> std::io::Result<Steering> {
        let shared = Arc::new(Shared::default());
        let worker = Worker {
            fdb,
            record,
            own,
            steered: HashSet::from([own]),
            releasing: HashSet::new(),
            failed: HashSet::new(),
            interval: reconcile_interval,
            backoff: FIRST_RETRY,
            retry_at: None,
            next_reconcile: Instant::now(),
            shared: shared.clone(),
        };
        let thread = std::thread::Builder::new()
            .name("synjitsu-fdb".into())
            .spawn(move || worker.run())?;
        Ok(Steering {
            shared,
            thread: Some(thread),
            fast,
        })
    }

    /// Makes the release `op` now, on the caller's thread (one netlink request): true if its
    /// entry was on synjitsu's port and is gone, and then the core may take it as done; the
    /// caller hands it on with [`Steering::released`]. False for anything else (a steer, an
    /// entry elsewhere, an error): hand it to [`Steering::want`], which sees to it.
    pub fn release_now(&mut self, op: &FdbOp) -> bool {
        if op.action != FdbAction::Release {
            return false;
        }
        let removed = matches!(self.fast.unsteer(op.mac), Ok(true));
        if removed {
            let c = &self.shared.counters;
            c.changes.fetch_add(1, Ordering::Relaxed);
            c.released_now.fetch_add(1, Ordering::Relaxed);
        }
        removed
    }

    /// Hands over a release [`Steering::release_now`] made: the thread records it, and
    /// removes the entry again if a steer it was applying put it back meanwhile.
    pub fn released(&self, op: FdbOp) {
        let mut inbox = self.shared.inbox();
        inbox.wishes.insert(op.mac, Wish { op, removed: true });
        self.shared.wake.notify_one();
    }

    /// Hands over the core's wishes (the last one per MAC wins), and asks for a reconcile
    /// once they are applied if `then_reconcile`; never blocks on the thread and never drops
    /// a wish.
    pub fn want(&self, ops: impl IntoIterator<Item = FdbOp>, then_reconcile: bool) {
        let mut inbox = self.shared.inbox();
        let mut any = then_reconcile;
        for op in ops {
            inbox.wishes.insert(op.mac, Wish { op, removed: false });
            any = true;
        }
        inbox.reconcile |= then_reconcile;
        if any {
            self.shared.wake.notify_one();
        }
    }

    /// The ids of the wishes tried since the last call (done, or failed and being retried):
    /// the core waits for a release before handing SYNs to the guest.
    pub fn done(&self) -> Vec<u64> {
        std::mem::take(&mut *lock(&self.shared.done))
    }

    /// Told whenever [`Steering::done`] has ids to give (a permit is kept if nobody waits).
    pub fn done_ready(&self) -> Arc<Notify> {
        self.shared.done_ready.clone()
    }

    /// What the thread did so far.
    pub fn stats(&self) -> SteeringStats {
        let c = &self.shared.counters;
        let inbox = self.shared.inbox();
        SteeringStats {
            changes: c.changes.load(Ordering::Relaxed),
            errors: c.errors.load(Ordering::Relaxed),
            retries: c.retries.load(Ordering::Relaxed),
            reconciles: c.reconciles.load(Ordering::Relaxed),
            fixed: c.fixed.load(Ordering::Relaxed),
            pending: c.pending.load(Ordering::Relaxed) + inbox.wishes.len() as u64,
            sticky: c.sticky.load(Ordering::Relaxed),
            released_now: c.released_now.load(Ordering::Relaxed),
        }
    }

    /// Releases every entry synjitsu made, removes the record if that worked, and waits for
    /// the thread to end.
    pub fn shutdown(mut self) {
        self.close();
    }

    fn close(&mut self) {
        self.shared.inbox().closing = true;
        self.shared.wake.notify_one();
        if let Some(t) = self.thread.take()
            && t.join().is_err()
        {
            tracing::warn!(
                "the forwarding-table thread panicked; its entries stay until the next start"
            );
        }
    }
}

impl Drop for Steering {
    fn drop(&mut self) {
        self.close();
    }
}

/// The thread's state.
struct Worker {
    fdb: Fdb,
    record: Record,
    /// synjitsu's own address: steered to its port for good, never recorded (the port's
    /// removal removes it).
    own: Mac,
    /// The MACs wanted on synjitsu's port.
    steered: HashSet<Mac>,
    /// Released, not yet known to be gone.
    releasing: HashSet<Mac>,
    /// Whose last change failed: a reconcile retries them.
    failed: HashSet<Mac>,
    interval: Duration,
    backoff: Duration,
    retry_at: Option<Instant>,
    next_reconcile: Instant,
    shared: Arc<Shared>,
}

impl Worker {
    fn run(mut self) {
        // Steering its own address first finds out whether the kernel keeps sticky entries.
        self.steer(self.own);
        let mut first = true;
        loop {
            let (wishes, asked, closing) = self.wait();
            if !wishes.is_empty() {
                self.apply(wishes);
            }
            if closing {
                self.releasing.extend(self.steered.drain());
                self.steered.insert(self.own);
                self.reconcile();
                break;
            }
            let now = Instant::now();
            let retry = self.retry_at.is_some_and(|t| t <= now);
            if asked || retry || now >= self.next_reconcile {
                if retry {
                    let n = self.failed.len() as u64;
                    self.shared.counters.retries.fetch_add(n, Ordering::Relaxed);
                }
                let before = self.record.macs().len();
                let fixed = self.reconcile();
                if std::mem::take(&mut first) && before > 0 {
                    tracing::info!(
                        recorded = before,
                        removed = fixed,
                        "forwarding entries an earlier run made: removed wherever they pointed"
                    );
                }
            }
        }
        let left = self.record.macs().len();
        if left > 0 {
            tracing::warn!(
                entries = left,
                "forwarding entries could not be removed at exit; the next start removes them"
            );
        }
        if let Err(e) = self.record.close() {
            tracing::warn!(error = %e, "could not remove the forwarding-entry record");
        }
    }

    /// Waits for wishes, a reconcile asked for, or a deadline; takes what the inbox holds.
    fn wait(&self) -> (Vec<Wish>, bool, bool) {
        let mut inbox = self.shared.inbox();
        loop {
            if !inbox.wishes.is_empty() || inbox.reconcile || inbox.closing {
                break;
            }
            let now = Instant::now();
            let deadline = self
                .retry_at
                .map_or(self.next_reconcile, |r| r.min(self.next_reconcile));
            if deadline <= now {
                break;
            }
            inbox = self
                .shared
                .wake
                .wait_timeout(inbox, deadline - now)
                .map(|(g, _)| g)
                .unwrap_or_else(|e| e.into_inner().0);
        }
        // Counted as pending before they leave the inbox (under its lock, as
        // [`Steering::stats`] reads both), so none is ever counted nowhere.
        self.publish_pending(inbox.wishes.len());
        let wishes = std::mem::take(&mut inbox.wishes).into_values().collect();
        let asked = std::mem::take(&mut inbox.reconcile);
        (wishes, asked, inbox.closing)
    }

    fn count(&self, what: &AtomicU64, n: u64) {
        what.fetch_add(n, Ordering::Relaxed);
    }

    /// Records `macs` before their entries are made; a failure is counted, and the entries
    /// made all the same (steering matters now; the record only at the next start).
    fn record_add(&mut self, macs: impl IntoIterator<Item = Mac>) {
        let own = self.own;
        if let Err(e) = self.record.add(macs.into_iter().filter(|m| *m != own)) {
            self.count(&self.shared.counters.errors, 1);
            tracing::warn!(error = %e, "could not record forwarding entries");
        }
    }

    fn record_remove(&mut self, macs: impl IntoIterator<Item = Mac>) {
        if let Err(e) = self.record.remove(macs) {
            self.count(&self.shared.counters.errors, 1);
            tracing::warn!(error = %e, "could not update the forwarding-entry record");
        }
    }

    fn failed(&mut self, mac: Mac, what: &str, e: &dyn std::fmt::Display) {
        self.count(&self.shared.counters.errors, 1);
        tracing::warn!(%mac, error = %e, "forwarding entry: {what} failed; retried");
        self.failed.insert(mac);
    }

    fn steer(&mut self, mac: Mac) -> bool {
        match self.fdb.steer(mac) {
            Ok(()) => {
                self.failed.remove(&mac);
                true
            }
            Err(e) => {
                self.failed(mac, "steer", &e);
                false
            }
        }
    }

    /// Applies the core's wishes one request each; a release whose entry is not on
    /// synjitsu's port is looked for in one dump for all of them. Reports every wish.
    fn apply(&mut self, wishes: Vec<Wish>) {
        let started = Instant::now();
        self.record_add(
            wishes
                .iter()
                .filter(|w| w.op.action == FdbAction::Steer)
                .map(|w| w.op.mac),
        );
        let mut gone = Vec::new();
        let mut elsewhere = HashSet::new();
        for Wish { op, removed } in &wishes {
            match op.action {
                FdbAction::Steer => {
                    self.steered.insert(op.mac);
                    self.releasing.remove(&op.mac);
                    if self.steer(op.mac) {
                        self.count(&self.shared.counters.changes, 1);
                    }
                }
                FdbAction::Release => {
                    self.steered.remove(&op.mac);
                    self.releasing.insert(op.mac);
                    match self.fdb.unsteer(op.mac) {
                        Ok(true) => {
                            self.count(&self.shared.counters.changes, 1);
                            gone.push(op.mac);
                        }
                        // The shell removed it (and counted it); nothing put it back.
                        Ok(false) if *removed => gone.push(op.mac),
                        Ok(false) => {
                            elsewhere.insert(op.mac);
                        }
                        Err(e) => self.failed(op.mac, "release", &e),
                    }
                }
            }
        }
        if !elsewhere.is_empty() {
            gone.extend(self.remove_everywhere(&elsewhere));
        }
        for m in &gone {
            self.releasing.remove(m);
            self.failed.remove(m);
        }
        // The core hands SYNs to the guest once its release is over, done or failed (then it
        // is retried here; the SYNs would otherwise wait for it): told before the record's
        // write, which matters only at the next start.
        lock(&self.shared.done).extend(wishes.iter().map(|w| w.op.id));
        self.shared.done_ready.notify_one();
        self.record_remove(gone);
        if wishes.len() == 1 {
            let op = &wishes[0].op;
            tracing::debug!(vm = %op.vm, mac = %op.mac, action = ?op.action, took_us = started.elapsed().as_micros() as u64, "forwarding entry changed");
        } else {
            tracing::debug!(
                changes = wishes.len(),
                took_ms = started.elapsed().as_millis() as u64,
                "forwarding entries changed"
            );
        }
        self.schedule_retry();
    }

    /// Removes every static entry of `macs` wherever it points (one dump); returns the MACs
    /// known to be gone.
    fn remove_everywhere(&mut self, macs: &HashSet<Mac>) -> Vec<Mac> {
        let table = match self.fdb.dump() {
            Ok(t) => t,
            Err(e) => {
                for m in macs {
                    self.failed(*m, "release (dump)", &e);
                }
                return Vec::new();
            }
        };
        let fixes = plan(
            &table,
            &Wanted {
                port: self.fdb.port_ifindex(),
                steered: &HashSet::new(),
                released: macs,
                sticky: false,
            },
        );
        let mut gone: HashSet<Mac> = macs.clone();
        for fix in fixes {
            if let Fix::Delete(e) = fix
                && macs.contains(&e.mac)
            {
                match self.fdb.delete(&e) {
                    Ok(_) => self.count(&self.shared.counters.changes, 1),
                    Err(err) => {
                        gone.remove(&e.mac);
                        self.failed(e.mac, "release", &err);
                    }
                }
            }
        }
        gone.into_iter().collect()
    }

    /// Dumps the table and applies every fix it needs; returns how many were applied.
    fn reconcile(&mut self) -> u64 {
        let now = Instant::now();
        self.next_reconcile = now + self.interval;
        let released: HashSet<Mac> = self
            .record
            .macs()
            .iter()
            .chain(&self.releasing)
            .filter(|m| !self.steered.contains(m))
            .copied()
            .collect();
        // Synjitsu's port alone says everything when entries are sticky (none of them moves
        // by itself; one moved by hand is missing there, and steered back) and nothing
        // released may have an entry elsewhere; else the whole table. (Whether the kernel
        // keeps them sticky, synjitsu's own entry on its port says.) A start with nothing
        // recorded reads no more than its port, however many entries the bridge learnt.
        let whole = !self.fdb.sticky() || !released.is_empty();
        let table = match if whole {
            self.fdb.dump()
        } else {
            self.fdb.dump_port()
        } {
            Ok(t) => t,
            Err(e) => {
                self.count(&self.shared.counters.errors, 1);
                tracing::warn!(error = %e, "forwarding table: dump failed; retried");
                self.retry_at = Some(now + self.backoff);
                self.backoff = (self.backoff * 2).min(self.interval);
                return 0;
            }
        };
        // A kernel that takes the flag and does not keep it (before 4.20): stop asking.
        let own_port = self.fdb.port_ifindex();
        if self.fdb.sticky()
            && !self.failed.contains(&self.own)
            && table
                .iter()
                .any(|e| e.mac == self.own && e.ifindex == own_port && !e.sticky)
        {
            tracing::warn!(
                "the kernel does not keep forwarding entries sticky (Linux 4.20 does): a booting guest's first frame will move its entry to the guest's port"
            );
            self.fdb.set_sticky(false);
        }
        self.shared
            .counters
            .sticky
            .store(self.fdb.sticky(), Ordering::Relaxed);
        let fixes = plan(
            &table,
            &Wanted {
                port: own_port,
                steered: &self.steered,
                released: &released,
                sticky: self.fdb.sticky(),
            },
        );
        self.record_add(fixes.iter().filter_map(|f| match f {
            Fix::Steer(m) => Some(*m),
            Fix::Delete(_) => None,
        }));
        // What fails now is retried; what failed before and needs no fix now is right.
        self.failed.clear();
        let mut fixed = 0;
        let mut kept = HashSet::new();
        for fix in &fixes {
            let ok = match fix {
                Fix::Steer(m) => self.steer(*m),
                Fix::Delete(e) => match self.fdb.delete(e) {
                    Ok(_) => true,
                    Err(err) => {
                        kept.insert(e.mac);
                        self.failed(e.mac, "delete", &err);
                        false
                    }
                },
            };
            fixed += u64::from(ok);
        }
        if !fixes.is_empty() {
            tracing::info!(
                fixed,
                failed = fixes.len() as u64 - fixed,
                "forwarding table reconciled"
            );
        }
        self.count(&self.shared.counters.fixed, fixed);
        // Whatever was released and is not kept by a failed delete is gone now.
        self.releasing.retain(|m| kept.contains(m));
        let stale: Vec<Mac> = released
            .iter()
            .filter(|m| !kept.contains(m))
            .copied()
            .collect();
        self.record_remove(stale);
        self.schedule_retry();
        self.count(&self.shared.counters.reconciles, 1);
        fixed
    }

    /// Publishes how many MACs are not known to be as wanted: `in_hand` wishes being applied,
    /// the failed ones, the releases not confirmed.
    fn publish_pending(&self, in_hand: usize) {
        let pending = in_hand + self.failed.len() + self.releasing.len();
        self.shared
            .counters
            .pending
            .store(pending as u64, Ordering::Relaxed);
    }

    /// Retries the failed changes soon (backing off while they keep failing), or not at all.
    fn schedule_retry(&mut self) {
        self.publish_pending(0);
        if self.failed.is_empty() {
            self.retry_at = None;
            self.backoff = FIRST_RETRY;
        } else if self.retry_at.is_none_or(|t| t <= Instant::now()) {
            self.retry_at = Some(Instant::now() + self.backoff);
            self.backoff = (self.backoff * 2).min(self.interval);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_record_lives_beside_the_control_socket_one_per_bridge() {
        assert_eq!(
            record_path(Path::new("/run/jitsu/synjitsu.sock"), "br0"),
            PathBuf::from("/run/jitsu/synjitsu-br0.fdb")
        );
        assert_ne!(
            record_path(Path::new("/run/jitsu/s.sock"), "br0"),
            record_path(Path::new("/run/jitsu/s.sock"), "br1")
        );
    }
}
