//! Git-native changes through the real daemon: a person clones jitsu-dns's state store,
//! commits a configuration change and pushes it to an incoming branch with plain git; jitsu-dns
//! (process backend, in a network namespace) applies and merges it, or refuses it and records
//! why on the `refused` branch without touching the fleet. Queries are real `dig`s.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use jitsu_tests::jitsu_dns::{DnsHarness, require_dns_tools, store_log, wait_history};
use jitsu_tests::wait_until;

const LONG: Duration = Duration::from_secs(60);

fn prerequisites() {
    require_dns_tools();
}

/// Runs git in `dir` (with a person's identity and, if given, a commit date); its stdout.
fn git_at(dir: &Path, date: Option<&str>, args: &[&str]) -> String {
    let mut cmd = Command::new("git");
    cmd.arg("-C")
        .arg(dir)
        .args([
            "-c",
            "user.name=Alice Operator",
            "-c",
            "user.email=alice@example.org",
        ])
        .args(args);
    if let Some(d) = date {
        cmd.env("GIT_COMMITTER_DATE", d).env("GIT_AUTHOR_DATE", d);
    }
    let out = cmd.output().expect("git runs");
    assert!(
        out.status.success(),
        "git {args:?} in {}: {}",
        dir.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

fn git(dir: &Path, args: &[&str]) -> String {
    git_at(dir, None, args)
}

/// A clone of the store at `db`, in the test's directory.
fn clone(h: &DnsHarness, db: &Path, name: &str) -> PathBuf {
    let dir = h.host.file(name);
    git(
        h.host.dir(),
        &["clone", "-q", db.to_str().unwrap(), dir.to_str().unwrap()],
    );
    dir
}

/// The message of the last refusal recorded in the store at `db`, once there is one.
fn wait_refusal(h: &DnsHarness, db: &Path) -> String {
    wait_until("a refusal to be recorded", LONG, || {
        has_ref(db, "refs/heads/refused").then(|| git(db, &["log", "-1", "--format=%B", "refused"]))
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", h.log()))
}

/// Writes `jitsu/vm/<vm>/config/<key>` files in the clone `dir`.
fn write_vm(dir: &Path, vm: &str, keys: &[(&str, &str)]) {
    let config = dir.join("jitsu/vm").join(vm).join("config");
    std::fs::create_dir_all(&config).unwrap();
    for (k, v) in keys {
        std::fs::write(config.join(k), format!("{v}\n")).unwrap();
    }
}

/// Commits everything in the clone `dir` with `message` (at `date` if given); the commit.
fn commit(dir: &Path, message: &str, date: Option<&str>) -> String {
    git(dir, &["add", "-A"]);
    git_at(dir, date, &["commit", "-q", "-m", message]);
    git(dir, &["rev-parse", "HEAD"])
}

fn push(dir: &Path, branch: &str) {
    git(
        dir,
        &["push", "-q", "origin", &format!("HEAD:refs/heads/{branch}")],
    );
}

fn has_ref(db: &Path, refname: &str) -> bool {
    Command::new("git")
        .arg("-C")
        .arg(db)
        .args(["rev-parse", "--verify", "-q", refname])
        .output()
        .unwrap()
        .status
        .success()
}

fn vm_spec(name: &str, n: u8) -> Vec<(String, String)> {
    vec![
        ("name".into(), name.into()),
        ("dns".into(), format!("{name}.example.org")),
        ("ip".into(), format!("10.77.0.{n}/24")),
        ("response_delay".into(), "0".into()),
        ("command".into(), "exec sleep 600".into()),
    ]
}

fn write_spec(dir: &Path, name: &str, n: u8) {
    let keys = vm_spec(name, n);
    let pairs: Vec<(&str, &str)> = keys.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    write_vm(dir, name, &pairs);
}

fn start(h: &mut DnsHarness) {
    let www =
        "name=www,dns=www.example.org,ip=10.77.0.1/24,response_delay=0,command=exec sleep 600";
    let args = h.args(None, &["-t", "60", www]);
    h.start(&args, &[]).unwrap();
}

#[test]
fn a_pushed_change_is_applied_and_merged_and_a_bad_one_is_refused_with_the_fleet_untouched() {
    prerequisites();
    let mut h = DnsHarness::new("dgit").unwrap();
    start(&mut h);
    let db = h.db();
    wait_history(&db, "configuration loaded: added www", LONG).unwrap();
    let work = clone(&h, &db, "work");

    // A VM added by a change.
    write_spec(&work, "db", 2);
    let added = commit(&work, "add db", None);
    push(&work, "incoming");
    let line = format!(
        "configuration changed by {} from incoming (\"add db\"): added db",
        &added[..7]
    );
    wait_history(&db, &line, LONG).unwrap_or_else(|e| panic!("{e}\n{}", h.log()));
    let d = h.dig(&["db.example.org", "A"]);
    assert_eq!(d.addresses(), vec!["10.77.0.2"], "{}\n{}", d.text, h.log());
    h.wait_state("db", "running", LONG);
    // Merged: the change is in the branch's history, by a commit with two parents.
    git(&db, &["merge-base", "--is-ancestor", &added, "HEAD"]);
    let merge = git(
        &db,
        &[
            "log",
            "--format=%H %P",
            "--grep",
            "configuration changed by",
            "-1",
        ],
    );
    assert_eq!(merge.split(' ').count(), 3, "a merge commit: {merge}");
    assert!(merge.ends_with(&added), "{merge}");
    wait_until("the incoming branch to be deleted", LONG, || {
        (!has_ref(&db, "refs/heads/incoming")).then_some(())
    })
    .unwrap();

    // A bad change: refused, recorded with why, and nothing changes.
    std::fs::write(work.join("jitsu/vm/www/config/ip"), "10.77.0.300/24\n").unwrap();
    let bad = commit(&work, "move www", None);
    push(&work, "incoming");
    let refused = wait_refusal(&h, &db);
    assert!(
        refused.starts_with(&format!(
            "refused {} from incoming (\"move www\"): ",
            &bad[..7]
        )),
        "{refused}"
    );
    assert!(
        refused.contains("change ") && refused.contains("(vm www): ip = \"10.77.0.300/24\""),
        "the reason names the change, the VM, the key and the value: {refused}"
    );
    // The refused work stays reachable from the refused branch.
    git(&db, &["merge-base", "--is-ancestor", &bad, "refused"]);
    wait_until("the incoming branch to be deleted", LONG, || {
        (!has_ref(&db, "refs/heads/incoming")).then_some(())
    })
    .unwrap();
    assert_eq!(
        h.stored("www", "config/ip").as_deref(),
        Some("10.77.0.1/24"),
        "the store's configuration is untouched"
    );
    assert!(
        !store_log(&db).iter().any(|l| l.contains(&bad[..7])),
        "no commit of the refused change on the branch"
    );
    let d = h.dig(&["www.example.org", "A"]);
    assert_eq!(d.addresses(), vec!["10.77.0.1"], "the fleet is untouched");
    assert!(h.log().contains("change pushed to the store refused"));
}

#[test]
fn of_two_concurrent_changes_the_second_is_validated_against_the_first() {
    prerequisites();
    let mut h = DnsHarness::new("dgit2").unwrap();
    start(&mut h);
    let db = h.db();
    wait_history(&db, "configuration loaded: added www", LONG).unwrap();
    // Three people clone the same state.
    let (alice, bob, carol) = (
        clone(&h, &db, "alice"),
        clone(&h, &db, "bob"),
        clone(&h, &db, "carol"),
    );
    // Alice adds a at 10.77.0.3; Bob, not knowing, adds b at the same address: valid alone,
    // not after Alice's. Carol changes www's delay: no conflict with either.
    write_spec(&alice, "a", 3);
    let a = commit(&alice, "add a", Some("2026-01-01T10:00:00Z"));
    write_spec(&bob, "b", 3);
    let b = commit(&bob, "add b", Some("2026-01-01T10:00:01Z"));
    std::fs::write(carol.join("jitsu/vm/www/config/response_delay"), "0.3\n").unwrap();
    let c = commit(&carol, "slower www", Some("2026-01-01T10:00:02Z"));
    push(&alice, "incoming/alice");
    push(&bob, "incoming/bob");
    push(&carol, "incoming/carol");

    let applied_a = format!(
        "configuration changed by {} from incoming/alice (\"add a\"): added a",
        &a[..7]
    );
    let applied_c = format!(
        "configuration changed by {} from incoming/carol (\"slower www\"): changed www",
        &c[..7]
    );
    wait_history(&db, &applied_a, LONG).unwrap_or_else(|e| panic!("{e}\n{}", h.log()));
    wait_history(&db, &applied_c, LONG).unwrap_or_else(|e| panic!("{e}\n{}", h.log()));
    let refused = wait_refusal(&h, &db);
    assert!(
        refused.starts_with(&format!(
            "refused {} from incoming/bob (\"add b\"): ",
            &b[..7]
        )) && refused.contains("VM a has this address"),
        "{refused}"
    );
    // What runs: a, and www with Carol's delay; b is unknown.
    assert_eq!(
        h.dig(&["a.example.org", "A"]).addresses(),
        vec!["10.77.0.3"]
    );
    assert_eq!(h.dig(&["b.example.org", "A"]).status, "NXDOMAIN");
    assert_eq!(h.stored("a", "config/name").as_deref(), Some("a"));
    assert_eq!(
        h.stored("www", "config/response_delay").as_deref(),
        Some("0.3")
    );
    wait_until("every incoming branch to be deleted", LONG, || {
        let left = git(&db, &["for-each-ref", "refs/heads/incoming"]);
        left.is_empty().then_some(())
    })
    .unwrap();
}
