//! `wait_for=tcp:PORT` through the real daemon: jitsu-dns (process backend) on a host with
//! `br0`, an unmodified guest (the project's test guest, which configures its address and
//! listens only after its boot time), a real `dig`, and a real `curl` the moment the answer
//! arrives.

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use jitsu_tests::jitsu_dns::{DnsHarness, require_dns_tools, wait_history};
use jitsu_tests::{bin_path, require_tool};

const LONG: Duration = Duration::from_secs(60);

fn prerequisites() {
    require_dns_tools();
    require_tool("arping", "iputils-arping");
    require_tool("curl", "curl");
}

fn unix_ns() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_nanos()
}

/// When the guest `name` started listening, from its report (`listening <name> <ns>`).
fn listened_at(report: &std::path::Path, name: &str) -> Option<u128> {
    std::fs::read_to_string(report)
        .ok()?
        .lines()
        .find_map(|l| l.strip_prefix(&format!("listening {name} "))?.parse().ok())
}

/// A guest that configures its address and listens on `port` `boot_ms` after its start.
fn guest(h: &DnsHarness, name: &str, n: u8, port: u16, boot_ms: u64, extra: &str) -> String {
    format!(
        "name={name},dns={name}.example.org,ip=10.77.0.{n}/24,ifup=guest,response_delay=0{extra},\
         command='exec {} --boot-ms {boot_ms} --http-port {port} --report {}'",
        bin_path("jitsu-test-guest").display(),
        h.host.file("report").display()
    )
}

#[test]
fn a_guest_that_listens_late_is_answered_once_it_accepts_a_connection_and_not_before() {
    prerequisites();
    let mut h = DnsHarness::new("dtcp").unwrap();
    let slow = guest(&h, "slow", 1, 8080, 1500, ",wait_for=tcp:8080");
    let args = h.args(None, &["-t", "60", &slow]);
    h.start(&args, &[]).unwrap();

    let asked = Instant::now();
    let d = h.dig(&["slow.example.org", "A"]);
    let answered_ns = unix_ns();
    let took = asked.elapsed();
    assert_eq!(d.addresses(), vec!["10.77.0.1"], "{}", d.text);
    // At once, with nothing retried: the port the answer promised is open.
    let page = h
        .host
        .ns()
        .command("curl")
        .args(["-sS", "--max-time", "2", "http://10.77.0.1:8080/"])
        .output()
        .unwrap();
    assert!(
        page.status.success(),
        "curl right after the answer: {}\n{}",
        String::from_utf8_lossy(&page.stderr),
        h.log()
    );
    let listened = listened_at(&h.host.file("report"), "slow").expect("the guest's report");
    assert!(
        answered_ns >= listened,
        "answered {} ms before the guest listened",
        (listened - answered_ns) / 1_000_000
    );
    assert!(
        took >= Duration::from_millis(1500),
        "answered after {took:?}, before the guest's 1.5 s boot"
    );
    wait_history(
        &h.db(),
        "slow: booting -> running (guest accepted a connection on its port)",
        LONG,
    )
    .unwrap_or_else(|e| panic!("{e}\n{}", h.log()));
}

#[test]
fn a_port_that_never_opens_is_answered_at_wait_for_timeout() {
    prerequisites();
    let mut h = DnsHarness::new("dtcpto").unwrap();
    // It listens on 80, not on the port waited for.
    let deaf = guest(
        &h,
        "deaf",
        2,
        80,
        0,
        ",wait_for=tcp:9999,wait_for_timeout=1.5",
    );
    let args = h.args(None, &["-t", "60", &deaf]);
    h.start(&args, &[]).unwrap();

    let asked = Instant::now();
    let d = h.dig(&["deaf.example.org", "A"]);
    let took = asked.elapsed();
    assert_eq!(d.addresses(), vec!["10.77.0.2"], "{}", d.text);
    assert!(
        took >= Duration::from_millis(1500) && took < Duration::from_secs(5),
        "answered after {took:?}: expected the 1.5 s timeout"
    );
    wait_history(
        &h.db(),
        "deaf: booting -> running (port did not open in time)",
        LONG,
    )
    .unwrap_or_else(|e| panic!("{e}\n{}", h.log()));
}
