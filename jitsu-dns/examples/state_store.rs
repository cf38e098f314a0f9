//! The timing program of `bench/state-store`: how many lifecycle changes a second the state
//! store records, and how long each waits from its submission to its commit, for the store as
//! jitsu-dns runs it (`fast-import`) and, as the baseline, for the writer it replaced
//! (`add-commit`: the files written, then `git add -A jitsu` and `git commit` per change,
//! kept here only).
//!
//! `state_store <vms> <changes> <rate> <modes> <runs>`: a fresh repository per run holding
//! `vms` configured VMs (committed first, not timed), then `changes` lifecycle changes (each
//! VM in turn `off -> booting`, then `booting -> running`, built by the store's own
//! functions) submitted at `rate` a second (0: all at once). Prints one row per run and mode.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use jitsu_dns::config::{Flags, merge};
use jitsu_dns::fleet::{COUNTERS_FLUSH_EVERY, Fleet, Lifecycle, Settings, VmView};
use jitsu_dns::metrics::Metrics;
use jitsu_dns::state::{self, Change, Hooks, Store, Tree, Wall};

/// Where changes go: the store, or the baseline writer.
trait Sink: Sync {
    fn submit(&self, change: Change) -> anyhow::Result<()>;
    /// Changes done so far.
    fn processed(&self) -> u64;
    fn close(self: Box<Self>);
}

impl Sink for Store {
    fn submit(&self, change: Change) -> anyhow::Result<()> {
        Ok(self.apply(change)?)
    }
    fn processed(&self) -> u64 {
        Store::processed(self)
    }
    fn close(self: Box<Self>) {
        Store::close(*self);
    }
}

/// The writer jitsu-dns had before: per change, its files written, `git add -A jitsu`, then
/// `git commit`, on a thread of its own behind a queue.
struct AddCommit {
    tx: Option<mpsc::SyncSender<Change>>,
    done: Arc<AtomicU64>,
    thread: Option<thread::JoinHandle<()>>,
}

fn git(dir: &Path, args: &[&str]) -> anyhow::Result<()> {
    let out = Command::new("git")
        .arg("-C")
        .arg(dir)
        .args(["-c", "user.name=bench", "-c", "user.email=bench@localhost"])
        .args(args)
        .output()?;
    if !out.status.success() {
        bail!("git {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(())
}

impl AddCommit {
    fn open(dir: &Path) -> anyhow::Result<AddCommit> {
        std::fs::create_dir_all(dir)?;
        git(dir, &["init", "-q"])?;
        let (tx, rx) = mpsc::sync_channel::<Change>(state::QUEUE);
        let done = Arc::new(AtomicU64::new(0));
        let (dir, counted) = (dir.to_path_buf(), done.clone());
        let thread = thread::spawn(move || {
            while let Ok(c) = rx.recv() {
                for prefix in &c.remove {
                    let _ = std::fs::remove_dir_all(dir.join(prefix));
                }
                for (p, v) in &c.files {
                    let full = dir.join(p);
                    if let Some(parent) = full.parent() {
                        let _ = std::fs::create_dir_all(parent);
                    }
                    let _ = std::fs::write(&full, format!("{v}\n"));
                }
                if let Some(m) = &c.message {
                    let committed = git(&dir, &["add", "-A", "jitsu"]).and_then(|()| {
                        git(
                            &dir,
                            &["commit", "-q", "--no-verify", "--allow-empty", "-m", m],
                        )
                    });
                    if let Err(e) = committed {
                        eprintln!("add-commit: {e}");
                    }
                }
                counted.fetch_add(1, Ordering::Release);
            }
        });
        Ok(AddCommit {
            tx: Some(tx),
            done,
            thread: Some(thread),
        })
    }
}

impl Sink for AddCommit {
    fn submit(&self, change: Change) -> anyhow::Result<()> {
        let tx = self.tx.as_ref().context("closed")?;
        tx.try_send(change)
            .map_err(|_| anyhow::anyhow!("queue full"))
    }
    fn processed(&self) -> u64 {
        self.done.load(Ordering::Acquire)
    }
    fn close(mut self: Box<Self>) {
        self.tx = None;
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn views(n: usize) -> anyhow::Result<Vec<VmView>> {
    let specs = (0..n)
        .map(|i| {
            format!(
                "name=vm{i},dns=vm{i}.example.org,ip=10.77.{}.{},command=true",
                i / 250,
                i % 250 + 1
            )
        })
        .collect();
    let cfg = merge(
        &Flags {
            specs,
            ..Default::default()
        },
        None,
    )?;
    // Each VM as the fleet holds one before it is reconciled: off.
    let settings = Settings {
        ttl: Duration::from_secs(60),
        max_running: None,
        max_boots_per_second: None,
        flush_every: COUNTERS_FLUSH_EVERY,
    };
    let fleet = Fleet::new(Instant::now(), settings, cfg.vms.into_iter().map(Arc::new));
    Ok(fleet.views())
}

/// The `changes` lifecycle changes: each VM booting, then each running, in turn.
fn workload(vms: &mut [VmView], changes: usize, wall: &Wall) -> Vec<Change> {
    let now = Instant::now();
    (0..changes)
        .map(|k| {
            let v = &mut vms[(k / 2) % vms.len()];
            let from = v.state;
            let (to, cause) = if k % 2 == 0 {
                v.starts += 1;
                v.last_start = Some(now);
                (Lifecycle::Booting, "query from 10.0.0.2")
            } else {
                (Lifecycle::Running, "response delay")
            };
            v.state = to;
            state::lifecycle_change(v, from, cause, wall)
        })
        .collect()
}

struct Row {
    secs: f64,
    lags: Vec<Duration>,
    commits: usize,
}

fn run(mode: &str, dir: &Path, vms: usize, changes: usize, rate: f64) -> anyhow::Result<Row> {
    let _ = std::fs::remove_dir_all(dir);
    let wall = Wall::now();
    let mut views = views(vms)?;
    let sink: Box<dyn Sink> = match mode {
        "fast-import" => Box::new(
            Store::open(
                Some(dir),
                Hooks {
                    metrics: Arc::new(Metrics::new()),
                    want_rewrite: Box::new(|| {}),
                },
            )?
            .0,
        ),
        "add-commit" => Box::new(AddCommit::open(dir)?),
        other => bail!("unknown mode {other}"),
    };
    // The configuration, committed before the clock starts.
    let loaded = state::config_change(&Tree::new(), &views, 60, &wall, "loaded");
    sink.submit(loaded.change)?;
    let work = workload(&mut views, changes, &wall);
    let until = |n: u64| {
        while sink.processed() < n {
            thread::sleep(Duration::from_micros(200));
        }
    };
    until(1);
    let base = sink.processed();
    let t0 = Instant::now();
    let mut submitted = Vec::with_capacity(changes);
    let done_at: Vec<AtomicU64> = (0..changes).map(|_| AtomicU64::new(0)).collect();
    let stop = AtomicBool::new(false);
    thread::scope(|s| -> anyhow::Result<()> {
        // Watches the count of changes done, stamping each as it passes.
        let watcher = s.spawn(|| {
            let mut seen = 0usize;
            while seen < changes && !stop.load(Ordering::Relaxed) {
                let n = (sink.processed() - base) as usize;
                let at = t0.elapsed().as_nanos() as u64;
                for d in &done_at[seen..n.min(changes)] {
                    d.store(at, Ordering::Relaxed);
                }
                seen = seen.max(n);
                thread::sleep(Duration::from_micros(200));
            }
        });
        for (k, c) in work.into_iter().enumerate() {
            if rate > 0.0 {
                let due = t0 + Duration::from_secs_f64(k as f64 / rate);
                if let Some(wait) = due.checked_duration_since(Instant::now()) {
                    thread::sleep(wait);
                }
            }
            submitted.push(t0.elapsed());
            if let Err(e) = sink.submit(c) {
                stop.store(true, Ordering::Relaxed);
                return Err(e);
            }
        }
        watcher.join().expect("the watcher does not panic");
        Ok(())
    })?;
    let secs = t0.elapsed().as_secs_f64();
    until(base + changes as u64);
    sink.close();
    let lags = submitted
        .iter()
        .zip(&done_at)
        .map(|(s, d)| Duration::from_nanos(d.load(Ordering::Relaxed)).saturating_sub(*s))
        .collect();
    let out = Command::new("git")
        .arg("-C")
        .arg(dir)
        .args(["rev-list", "--count", "HEAD"])
        .output()?;
    let commits = String::from_utf8_lossy(&out.stdout).trim().parse()?;
    Ok(Row {
        secs,
        lags,
        commits,
    })
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let [_, vms, changes, rate, modes, runs] = args.as_slice() else {
        bail!("usage: state_store <vms> <changes> <rate (0: at once)> <mode,mode> <runs>");
    };
    let (vms, changes, rate, runs): (usize, usize, f64, usize) =
        (vms.parse()?, changes.parse()?, rate.parse()?, runs.parse()?);
    let dir: PathBuf =
        std::env::temp_dir().join(format!("jitsu-state-bench-{}", std::process::id()));
    println!(
        "{:<12} {:>4} {:>5} {:>8} {:>9} {:>10} {:>9} {:>9} {:>9} {:>8}",
        "mode",
        "run",
        "vms",
        "changes",
        "rate/s",
        "recorded/s",
        "lag p50",
        "lag p99",
        "lag max",
        "commits"
    );
    for run_no in 1..=runs {
        for mode in modes.split(',') {
            let row = run(mode, &dir, vms, changes, rate)?;
            let mut lags = row.lags.clone();
            lags.sort();
            let pct = |p: f64| lags[((lags.len() - 1) as f64 * p).round() as usize];
            println!(
                "{:<12} {:>4} {:>5} {:>8} {:>9} {:>10.1} {:>7.1}ms {:>7.1}ms {:>7.1}ms {:>8}",
                mode,
                run_no,
                vms,
                changes,
                if rate > 0.0 {
                    format!("{rate}")
                } else {
                    "at once".into()
                },
                changes as f64 / row.secs,
                ms(pct(0.5)),
                ms(pct(0.99)),
                ms(pct(1.0)),
                row.commits
            );
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}
