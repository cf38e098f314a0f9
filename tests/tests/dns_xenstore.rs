//! `wait_for_key`: jitsu-dns answers once the guest's readiness key appears in Xenstore
//! (the tests' xenstored, reached through `XENSTORED_PATH` as a real xenstored would be; the
//! guest writes its key with Debian's `xenstore-write`), or at `wait_for_timeout` if it never
//! does.

use std::time::{Duration, Instant};

use jitsu_tests::jitsu_dns::{DnsHarness, store_log};
use jitsu_tests::xenstored::TestXenstored;
use jitsu_tests::{require_root, require_tool, unique, wait_until};

const LONG: Duration = Duration::from_secs(60);

#[test]
fn the_answer_waits_for_the_readiness_key() {
    require_root();
    require_tool("dig", "dnsutils");
    require_tool("xenstore-write", "xenstore-utils");
    let mut h = DnsHarness::new("dkey").unwrap();
    let xs = TestXenstored::start(&h.host.file("xenstored.sock")).unwrap();
    let key = format!("/jitsu-test/{}/ready", unique("k"));
    // The guest takes half a second, then says it is ready, as a Xen guest writes its key.
    let spec = format!(
        "name=www,dns=www.example.org,ip=10.77.0.1,response_delay=0,wait_for_key={key},\
         wait_for_timeout=30,command='sleep 0.5; xenstore-write {key} 1; exec sleep 600'"
    );
    let args = h.args(None, &[&spec]);
    h.start(
        &args,
        &[("XENSTORED_PATH", xs.path().display().to_string())],
    )
    .unwrap();
    let asked = Instant::now();
    let d = h.dig(&["+time=20", "www.example.org", "A"]);
    let took = asked.elapsed();
    assert_eq!(d.addresses(), vec!["10.77.0.1"], "{}", d.text);
    assert_eq!(
        xs.read(&key),
        Some(b"1".to_vec()),
        "the key existed before the answer"
    );
    assert!(took >= Duration::from_millis(500), "{took:?}");
    let log = wait_until("the VM running in the history", LONG, || {
        let log = store_log(&h.db());
        log.iter()
            .any(|l| l.starts_with("www: booting -> running"))
            .then_some(log)
    })
    .unwrap();
    assert!(
        log.iter()
            .any(|l| l == "www: booting -> running (readiness key appeared)"),
        "{log:?}"
    );
}

#[test]
fn a_key_that_never_appears_is_answered_at_the_timeout() {
    require_root();
    require_tool("dig", "dnsutils");
    let mut h = DnsHarness::new("dkeyto").unwrap();
    let xs = TestXenstored::start(&h.host.file("xenstored.sock")).unwrap();
    let key = format!("/jitsu-test/{}/ready", unique("k"));
    let spec = format!(
        "name=www,dns=www.example.org,ip=10.77.0.1,response_delay=0,wait_for_key={key},\
         wait_for_timeout=1,command='exec sleep 600'"
    );
    let args = h.args(None, &[&spec]);
    h.start(
        &args,
        &[("XENSTORED_PATH", xs.path().display().to_string())],
    )
    .unwrap();
    let asked = Instant::now();
    let d = h.dig(&["+time=20", "www.example.org", "A"]);
    assert_eq!(d.addresses(), vec!["10.77.0.1"], "{}", d.text);
    assert!(
        asked.elapsed() >= Duration::from_secs(1),
        "{:?}",
        asked.elapsed()
    );
    assert_eq!(xs.read(&key), None);
    let log = wait_until("the VM running in the history", LONG, || {
        let log = store_log(&h.db());
        log.iter()
            .any(|l| l.starts_with("www: booting -> running"))
            .then_some(log)
    })
    .unwrap();
    assert!(
        log.iter()
            .any(|l| l == "www: booting -> running (readiness key did not appear in time)"),
        "{log:?}"
    );
}
