//! `wait_for_key`: jitsu-dns answers once the guest's readiness key appears in Xenstore
//! (the tests' xenstored, reached through `XENSTORED_PATH` as a real xenstored would be; the
//! guest writes its key with Debian's `xenstore-write`), or at `wait_for_timeout` if it never
//! does.

use std::time::{Duration, Instant};

use jitsu_tests::jitsu_dns::{Dig, DnsHarness, assert_history, store_log};
use jitsu_tests::xenstored::TestXenstored;
use jitsu_tests::{require_root, require_tool, unique, wait_until};

const LONG: Duration = Duration::from_secs(60);

/// A query for `www`, whose answer waits for its readiness key.
struct Asked {
    xs: TestXenstored,
    h: DnsHarness,
    key: String,
    answer: Dig,
    took: Duration,
}

/// Starts jitsu-dns with `www` waiting up to `timeout` s for a readiness key in the tests'
/// xenstored (reached through `XENSTORED_PATH`), its command made from the key by `command`,
/// and asks for `www`.
fn ask_waiting_for_key(tag: &str, timeout: u32, command: impl FnOnce(&str) -> String) -> Asked {
    require_root();
    require_tool("dig", "dnsutils");
    let mut h = DnsHarness::new(tag).unwrap();
    let xs = TestXenstored::start(&h.host.file("xenstored.sock")).unwrap();
    let key = format!("/jitsu-test/{}/ready", unique("k"));
    let spec = format!(
        "name=www,dns=www.example.org,ip=10.77.0.1,response_delay=0,wait_for_key={key},\
         wait_for_timeout={timeout},command='{}'",
        command(&key)
    );
    let args = h.args(None, &[&spec]);
    h.start(
        &args,
        &[("XENSTORED_PATH", xs.path().display().to_string())],
    )
    .unwrap();
    let asked = Instant::now();
    let answer = h.dig(&["+time=20", "www.example.org", "A"]);
    let took = asked.elapsed();
    assert_eq!(answer.addresses(), vec!["10.77.0.1"], "{}", answer.text);
    Asked {
        xs,
        h,
        key,
        answer,
        took,
    }
}

/// Waits until the store's history has `www` running, for whatever reason.
fn wait_running(h: &DnsHarness) {
    wait_until("the VM running in the history", LONG, || {
        store_log(&h.db())
            .iter()
            .any(|l| l.starts_with("www: booting -> running"))
            .then_some(())
    })
    .unwrap();
}

#[test]
fn the_answer_waits_for_the_readiness_key() {
    require_tool("xenstore-write", "xenstore-utils");
    // The guest takes half a second, then says it is ready, as a Xen guest writes its key.
    let a = ask_waiting_for_key("dkey", 30, |key| {
        format!("sleep 0.5; xenstore-write {key} 1; exec sleep 600")
    });
    assert_eq!(
        a.xs.read(&a.key),
        Some(b"1".to_vec()),
        "the key existed before the answer: {}",
        a.answer.text
    );
    assert!(a.took >= Duration::from_millis(500), "{:?}", a.took);
    wait_running(&a.h);
    assert_history(
        &a.h.db(),
        &["www: booting -> running (readiness key appeared)"],
    );
}

#[test]
fn a_key_that_never_appears_is_answered_at_the_timeout() {
    let a = ask_waiting_for_key("dkeyto", 1, |_| "exec sleep 600".into());
    assert!(a.took >= Duration::from_secs(1), "{:?}", a.took);
    assert_eq!(a.xs.read(&a.key), None);
    wait_running(&a.h);
    assert_history(
        &a.h.db(),
        &["www: booting -> running (readiness key did not appear in time)"],
    );
}
