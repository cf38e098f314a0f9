//! synjitsu's Xenstore client against the tests' small xenstored (`jitsu_tests::xenstored`),
//! over the real wire protocol: start-up clean-up, a guest's node opened empty for its domain at
//! each boot and closed, one SYN written whole with the guest's permissions, `managed`
//! respected, and a dead daemon an error, not a hang.
//!
//! An integration test rather than a unit test beside the client: the test daemon is built on
//! `synjitsu::store::xs_wire`, and only here are its permission values and ours one type.
#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};

use jitsu_tests::xenstored::TestXenstored;
use synjitsu::store::layout::{HeldSyn, SynKey, TcpOption};
use synjitsu::store::xenstore::XenstoreClient;
use synjitsu::store::xs_wire::{Access, Perm};
use synjitsu::store::{SynStore, WriteOutcome};

fn key() -> SynKey {
    SynKey {
        local_ip: "10.77.1.10".parse().unwrap(),
        local_port: 80,
        dest_ip: "10.77.1.2".parse().unwrap(),
        dest_port: 40436,
    }
}

fn syn() -> HeldSyn {
    HeldSyn::new(64240, 1_727_484_408, vec![TcpOption::Mss(1460)], 7)
}

fn daemon(tag: &str) -> (TestXenstored, PathBuf) {
    let dir = std::env::temp_dir().join(format!("syj-xs-{tag}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let xs = TestXenstored::start(&dir.join("sock")).unwrap();
    (xs, dir)
}

#[test]
fn prepare_clears_stale_entries_and_closes_ip() {
    let (xs, dir) = daemon("prep");
    xs.write("/ip/10-0-0-9/80/10-0-0-1/1/syn/tx_wnd", b"1");
    xs.write("/ip/10-0-0-8", b"managed");
    let mut c = XenstoreClient::connect(xs.path()).unwrap();
    assert_eq!(c.prepare().unwrap(), 2);
    assert_eq!(xs.read("/ip/10-0-0-9"), None);
    assert_eq!(xs.perms("/ip").unwrap(), vec![Perm::new(Access::None, 0)]);
    drop(xs);
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn a_syn_is_written_whole_with_the_guests_permissions_unless_managed() {
    let (xs, dir) = daemon("write");
    let mut c = XenstoreClient::connect(xs.path()).unwrap();
    c.prepare().unwrap();
    assert_eq!(
        c.write_syn(7, &key(), &syn()).unwrap(),
        WriteOutcome::Written
    );
    let perms = vec![Perm::new(Access::None, 0), Perm::new(Access::Both, 7)];
    assert_eq!(xs.perms("/ip/10-77-1-10").unwrap(), perms);
    assert_eq!(xs.perms(&key().leaf_path("options")).unwrap(), perms);
    let back = HeldSyn::from_leaves(|leaf| {
        xs.read(&key().leaf_path(leaf))
            .map(|v| String::from_utf8(v).unwrap())
    })
    .unwrap();
    assert_eq!(back, syn());
    xs.write("/ip/10-77-1-10", b"managed");
    let mut other = key();
    other.dest_port = 1;
    assert_eq!(
        c.write_syn(7, &other, &syn()).unwrap(),
        WriteOutcome::Managed
    );
    assert_eq!(xs.read(&other.conn_path()), None);
    c.remove(&key()).unwrap();
    assert_eq!(xs.read(&key().conn_path()), None);
    c.close(key().local_ip).unwrap();
    assert_eq!(xs.read("/ip/10-77-1-10"), None);
    drop(xs);
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn opening_makes_an_empty_node_for_the_new_domain_alone() {
    let (xs, dir) = daemon("open");
    let mut c = XenstoreClient::connect(xs.path()).unwrap();
    c.prepare().unwrap();
    let ip = key().local_ip;
    c.open(7, ip).unwrap();
    assert_eq!(xs.read("/ip/10-77-1-10"), Some(vec![]));
    assert_eq!(
        xs.perms("/ip/10-77-1-10").unwrap(),
        vec![Perm::new(Access::None, 0), Perm::new(Access::Both, 7)]
    );
    c.write_syn(7, &key(), &syn()).unwrap();
    xs.write("/ip/10-77-1-10", b"managed");
    // The next boot: the old `managed` and SYN are gone, the node is domain 9's.
    c.open(9, ip).unwrap();
    assert_eq!(xs.read("/ip/10-77-1-10"), Some(vec![]));
    assert_eq!(xs.read(&key().conn_path()), None);
    assert_eq!(
        xs.perms("/ip/10-77-1-10").unwrap(),
        vec![Perm::new(Access::None, 0), Perm::new(Access::Both, 9)]
    );
    c.close(ip).unwrap();
    assert_eq!(xs.read("/ip/10-77-1-10"), None);
    // Closing what is gone is no error.
    c.close(ip).unwrap();
    drop(xs);
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn a_dead_daemon_is_an_error_not_a_hang() {
    let (xs, dir) = daemon("dead");
    let mut c = XenstoreClient::connect(xs.path()).unwrap();
    drop(xs);
    assert!(c.write_syn(7, &key(), &syn()).is_err());
    let _ = std::fs::remove_dir_all(dir);
    assert!(XenstoreClient::connect(Path::new("/nonexistent/xs.sock")).is_err());
}
