//! jitsu-dns's state store under faults, with the real daemon and process-backend VMs: a
//! store that could not write (disk full, read-only) catches up with the fleet once it can,
//! and says so in its metrics; locks left by a crashed jitsu-dns are recovered at start; a
//! repository that cannot be read at start is moved aside and a fresh one started, while DNS
//! is served throughout; a jitsu-dns killed with SIGKILL finds the truth again at its next
//! start. The history is read with plain git.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use jitsu_tests::curl::{metric_in, metrics};
use jitsu_tests::jitsu_dns::{
    DnsHarness, assert_history, in_mounts_of, on_own_tmpfs, store_log, wait_history,
};
use jitsu_tests::{require_root, require_tool, wait_until};

const LONG: Duration = Duration::from_secs(60);
const METRICS: &str = "127.0.0.1:9153";

fn prerequisites() {
    require_root();
    require_tool("dig", "dnsutils");
    require_tool("git", "git");
    require_tool("setsid", "util-linux");
}

/// VM `name` at 10.77.0.`n`, answered as soon as its command runs, appending its pid to
/// `boots-<name>` in the host's directory at each boot.
fn vm(h: &DnsHarness, name: &str, n: u8) -> String {
    format!(
        "name={name},dns={name}.example.org,ip=10.77.0.{n}/24,response_delay=0,\
         command='echo $$ >> {}; exec sleep 600'",
        h.host.file(&format!("boots-{name}")).display()
    )
}

fn boots(h: &DnsHarness, name: &str) -> usize {
    std::fs::read_to_string(h.host.file(&format!("boots-{name}")))
        .unwrap_or_default()
        .lines()
        .count()
}

fn git(db: &Path, args: &[&str]) -> String {
    let out = Command::new("git")
        .arg("-C")
        .arg(db)
        .args(args)
        .output()
        .unwrap();
    assert!(out.status.success(), "git {args:?}: {out:?}");
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

fn scrape(h: &DnsHarness) -> String {
    metrics(h.host.ns(), METRICS).unwrap_or_default()
}

/// How the store's disk fails while VMs boot.
#[derive(Debug, Clone, Copy)]
enum Fault {
    /// Filled to the last byte.
    Full,
    /// Remounted read-only.
    ReadOnly,
}

/// The store of jitsu-dns `pid` on its own tmpfs, read with plain git inside its mount
/// namespace (the test's own sees the directory under the mount).
struct MountedStore {
    pid: u32,
    db: PathBuf,
}

impl MountedStore {
    fn run(&self, script: &str) -> anyhow::Result<String> {
        in_mounts_of(self.pid, &format!("cd {} && {script}", self.db.display()))
    }

    fn sh(&self, script: &str) -> String {
        self.run(script).unwrap_or_default()
    }

    fn log(&self) -> Vec<String> {
        self.sh("git log --format=%s")
            .lines()
            .map(str::to_string)
            .collect()
    }

    fn state(&self, vm: &str) -> Option<String> {
        let v = self.sh(&format!("git show HEAD:jitsu/vm/{vm}/state 2>/dev/null"));
        (!v.is_empty()).then(|| v.trim().to_string())
    }
}

/// Three VMs boot while the store's disk (a tmpfs of its own) cannot be written; once it can
/// again, the store converges to what runs, and the failure was counted while it lasted.
fn a_store_that_could_not_write_catches_up(fault: Fault, tag: &str) {
    prerequisites();
    require_tool("unshare", "util-linux");
    require_tool("nsenter", "util-linux");
    require_tool("curl", "curl");
    let mut h = DnsHarness::new(tag).unwrap();
    let db = h.db();
    std::fs::create_dir_all(&db).unwrap();
    let specs = [vm(&h, "a", 1), vm(&h, "b", 2), vm(&h, "c", 3)];
    let mut extra = vec!["-t", "60", "--metrics", METRICS];
    extra.extend(specs.iter().map(String::as_str));
    let args = h.args(None, &extra);
    h.start_command(on_own_tmpfs(&h.command(&args), &db, "4m"))
        .unwrap();
    let store = MountedStore {
        pid: h.daemon.as_ref().unwrap().pid(),
        db: db.clone(),
    };
    wait_until("the configuration in the history", LONG, || {
        store
            .log()
            .iter()
            .any(|l| l == "configuration loaded: added a, b, c")
            .then_some(())
    })
    .unwrap();

    let (break_it, mend_it) = match fault {
        // dd stops at ENOSPC, which is the point.
        Fault::Full => (
            "dd if=/dev/zero of=fill bs=64k 2>/dev/null; true",
            "rm fill",
        ),
        Fault::ReadOnly => ("mount -o remount,ro .", "mount -o remount,rw ."),
    };
    // A remount read-only is refused while a file is open for writing there (git's pack
    // being written): tried until the store's writer is between writes.
    wait_until("the store's disk to fail", LONG, || {
        store.run(break_it).ok()
    })
    .unwrap();
    for (name, ip) in [("a", "10.77.0.1"), ("b", "10.77.0.2"), ("c", "10.77.0.3")] {
        let d = h.dig(&[&format!("{name}.example.org"), "A"]);
        assert_eq!(d.addresses(), vec![ip], "DNS is served: {}", d.text);
    }
    wait_until("the VMs' commands to run", LONG, || {
        ["a", "b", "c"]
            .iter()
            .all(|n| boots(&h, n) == 1)
            .then_some(())
    })
    .unwrap();
    // The store's failure is visible while it lasts (waited for here, asserted below, so
    // that a store that never shows it still gets to show whether it catches up).
    let broken = wait_until(
        "the store to say it is unhealthy",
        Duration::from_secs(20),
        || {
            let m = scrape(&h);
            m.lines()
                .any(|l| l == "jitsu_dns_state_store_healthy 0")
                .then_some(m)
        },
    );
    let behind = store.state("a");
    store.run(mend_it).unwrap();

    wait_until("a, b and c running in the store", LONG, || {
        ["a", "b", "c"]
            .iter()
            .all(|n| store.state(n).as_deref() == Some("running"))
            .then_some(())
    })
    .unwrap_or_else(|e| panic!("{e}: {:#?}\njitsu-dns log:\n{}", store.log(), h.log()));
    let log = store.log();
    assert!(
        log.iter()
            .any(|l| l.starts_with("state rewritten from the fleet")),
        "the history says the state was rewritten: {log:#?}"
    );
    assert_eq!(
        log.iter().filter(|l| l.contains("off -> booting")).count(),
        0,
        "lost changes are superseded, not replayed: {log:#?}"
    );
    let broken = broken.unwrap_or_else(|e| panic!("{e}\njitsu-dns log:\n{}", h.log()));
    assert_eq!(behind.as_deref(), Some("off"), "the store was behind");
    assert!(
        metric_in(&broken, "jitsu_dns_state_write_failures_total") >= 1.0,
        "{broken}"
    );
    assert!(
        metric_in(&broken, "jitsu_dns_state_store_lag_seconds") > 0.0,
        "{broken}"
    );
    let after = wait_until("the store to say it is healthy", LONG, || {
        let m = scrape(&h);
        m.lines()
            .any(|l| l == "jitsu_dns_state_store_healthy 1")
            .then_some(m)
    })
    .unwrap();
    assert!(
        metric_in(&after, "jitsu_dns_state_changes_dropped_total") >= 3.0,
        "every lost change counted (three VMs booted): {after}"
    );
    assert_eq!(metric_in(&after, "jitsu_dns_state_store_lag_seconds"), 0.0);
    // The work tree a person cats holds the committed state too.
    assert_eq!(store.sh("cat jitsu/vm/c/state").trim(), "running");
}

#[test]
fn a_store_whose_disk_was_full_catches_up_with_the_running_vms() {
    a_store_that_could_not_write_catches_up(Fault::Full, "sfull");
}

#[test]
fn a_store_whose_disk_was_read_only_catches_up_with_the_running_vms() {
    a_store_that_could_not_write_catches_up(Fault::ReadOnly, "sro");
}

/// A store with a history, its jitsu-dns stopped, and the VM `www` running (left so).
fn store_with_history(tag: &str) -> (DnsHarness, Vec<String>) {
    prerequisites();
    let mut h = DnsHarness::new(tag).unwrap();
    let args = h.args(None, &["-t", "60", &vm(&h, "www", 1)]);
    h.start(&args, &[]).unwrap();
    assert_eq!(
        h.dig(&["www.example.org", "A"]).addresses(),
        vec!["10.77.0.1"]
    );
    h.wait_state("www", "running", LONG);
    assert_eq!(h.stop().unwrap(), Some(0));
    (h, args)
}

#[test]
fn locks_left_by_a_crashed_jitsu_dns_are_recovered_at_start() {
    let (mut h, _) = store_with_history("slock");
    let db = h.db();
    let branch = git(&db, &["symbolic-ref", "HEAD"]);
    // What a jitsu-dns killed in the middle of a commit leaves behind.
    let locks: Vec<PathBuf> = [
        "index.lock".to_string(),
        "HEAD.lock".to_string(),
        format!("{branch}.lock"),
    ]
    .iter()
    .map(|l| db.join(".git").join(l))
    .collect();
    for l in &locks {
        std::fs::write(l, "").unwrap();
    }
    // A second VM, booted by a query, must be recorded.
    let args = h.args(None, &["-t", "60", &vm(&h, "www", 1), &vm(&h, "b", 2)]);
    h.start(&args, &[]).unwrap();
    assert_eq!(
        h.dig(&["b.example.org", "A"]).addresses(),
        vec!["10.77.0.2"]
    );
    h.wait_state("b", "running", LONG);
    assert_history(
        &db,
        &[
            "configuration loaded: added b",
            "www: running (adopted: already running)",
            "b: off -> booting (query from 127.0.0.1)",
        ],
    );
    for l in &locks {
        assert!(!l.exists(), "{} removed", l.display());
    }
    assert!(
        h.log().contains("stale lock"),
        "the removal is logged: {}",
        h.log()
    );
    // And plain git still works on it.
    assert_eq!(git(&db, &["show", "HEAD:jitsu/vm/b/state"]), "running");
    wait_until("the index and work tree to match HEAD", LONG, || {
        git(&db, &["status", "--porcelain"])
            .is_empty()
            .then_some(())
    })
    .unwrap();
}

/// How an object of the store is damaged.
#[derive(Debug, Clone, Copy)]
enum Damage {
    /// Zero bytes, as a crash before the data reached the disk leaves a loose object.
    Empty,
    /// Cut in half.
    Truncated,
}

/// The file holding object `sha` in the store at `db`, relative to it: its loose object, or
/// the pack whose index lists it.
fn file_holding(db: &Path, sha: &str) -> PathBuf {
    let loose = Path::new(".git/objects").join(&sha[..2]).join(&sha[2..]);
    if db.join(&loose).exists() {
        return loose;
    }
    let packs = db.join(".git/objects/pack");
    for e in std::fs::read_dir(&packs).unwrap().flatten() {
        let idx = e.path();
        if idx.extension().is_none_or(|x| x != "idx") {
            continue;
        }
        let listed = Command::new("git")
            .arg("show-index")
            .stdin(std::fs::File::open(&idx).unwrap())
            .output()
            .unwrap();
        if String::from_utf8_lossy(&listed.stdout).contains(sha) {
            return idx
                .with_extension("pack")
                .strip_prefix(db)
                .unwrap()
                .to_path_buf();
        }
    }
    panic!("no file in {} holds {sha}", db.display());
}

/// The store's head commit damaged while jitsu-dns is stopped: at its next start the store is
/// moved aside (kept) and a fresh one started from the configuration and what runs; DNS is
/// served and the running VM adopted, not booted again.
fn a_damaged_store_is_moved_aside_and_started_afresh(damage: Damage, tag: &str) {
    let (mut h, args) = store_with_history(tag);
    let db = h.db();
    let head = git(&db, &["rev-parse", "HEAD"]);
    // Its loose object, or the pack holding it.
    let holder = file_holding(&db, &head);
    let object = db.join(&holder);
    let bytes = std::fs::read(&object).unwrap();
    let keep = match damage {
        Damage::Empty => 0,
        Damage::Truncated => bytes.len() / 2,
    };
    std::fs::write(&object, &bytes[..keep]).unwrap();
    assert!(
        !Command::new("git")
            .arg("-C")
            .arg(&db)
            .args(["log", "-1"])
            .output()
            .unwrap()
            .status
            .success(),
        "the store is damaged"
    );

    h.start(&args, &[]).unwrap();
    assert_eq!(
        h.dig(&["www.example.org", "A"]).addresses(),
        vec!["10.77.0.1"]
    );
    let log = wait_history(&db, "www: off -> running (adopted: already running)", LONG)
        .unwrap_or_else(|e| panic!("{e}\njitsu-dns log:\n{}", h.log()));
    assert!(
        log.iter()
            .any(|l| l.starts_with("state store started afresh")),
        "{log:#?}"
    );
    assert!(log.iter().any(|l| l == "configuration loaded: added www"));
    assert_eq!(boots(&h, "www"), 1, "adopted, not booted again");
    // The damaged one is kept beside it for a person, damaged object and all.
    let parent = db.parent().unwrap();
    let kept: Vec<PathBuf> = std::fs::read_dir(parent)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("db.corrupt-"))
        })
        .collect();
    assert_eq!(kept.len(), 1, "{kept:?}");
    let moved = kept[0].join(&holder);
    assert_eq!(std::fs::read(&moved).unwrap().len(), keep);
    let daemon_log = h.log();
    assert!(
        daemon_log.contains("ERROR") && daemon_log.contains(&kept[0].display().to_string()),
        "logged loudly, saying where it went: {daemon_log}"
    );
}

#[test]
fn a_store_with_an_empty_object_is_moved_aside_and_started_afresh() {
    a_damaged_store_is_moved_aside_and_started_afresh(Damage::Empty, "sempty");
}

#[test]
fn a_store_with_a_truncated_object_is_moved_aside_and_started_afresh() {
    a_damaged_store_is_moved_aside_and_started_afresh(Damage::Truncated, "strunc");
}

#[test]
fn after_sigkill_the_next_start_records_what_runs() {
    prerequisites();
    let mut h = DnsHarness::new("skill").unwrap();
    let args = h.args(None, &["-t", "60", &vm(&h, "a", 1), &vm(&h, "b", 2)]);
    h.start(&args, &[]).unwrap();
    // Killed right after the answers: whatever the store had not committed is lost.
    for name in ["a", "b"] {
        assert_eq!(
            h.dig(&[&format!("{name}.example.org"), "A"]).status,
            "NOERROR"
        );
    }
    h.daemon.as_ref().unwrap().signal("KILL").unwrap();
    h.daemon.as_mut().unwrap().wait_exit(LONG).unwrap();
    h.start(&args, &[]).unwrap();
    for name in ["a", "b"] {
        // The VM's state file says `running` from before the kill: the adoption is a commit
        // of its own, which the store makes when it gets to it (the two VMs' adoptions may go
        // in different batches), so the history is waited for, not the state.
        let recorded = wait_until(&format!("the restart to record {name}"), LONG, || {
            store_log(&h.db())
                .iter()
                .any(|l| {
                    l.starts_with(&format!("{name}: ")) && l.ends_with("(adopted: already running)")
                })
                .then_some(())
        });
        assert!(
            recorded.is_ok(),
            "the restart records {name} as it runs: {:#?}",
            store_log(&h.db())
        );
        h.wait_state(name, "running", LONG);
        assert_eq!(boots(&h, name), 1, "adopted, not booted again");
    }
}
