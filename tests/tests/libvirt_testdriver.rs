//! jitsu-dns with `-x libvirt` on libvirt's test driver (no libvirtd, no QEMU: the driver lives
//! inside jitsu-dns, loaded from a node file), in a bridge namespace, queried with real dig:
//! an existing domain is used as defined and its MAC adopted, a missing one is defined from
//! the VM's keys and booted, idle VMs are destroyed or saved (and resumed by the next query),
//! a VM with nothing to define a domain from fails saying why, and states arrive as pushed
//! lifecycle events, never polled. The real libvirtd and QEMU are in `libvirt_dns.rs`.

use std::time::Duration;

use jitsu_tests::jitsu_dns::{DnsHarness, assert_history, store_log};
use jitsu_tests::{require_root, require_tool, wait_until};

const LONG: Duration = Duration::from_secs(60);
const METRICS: &str = "127.0.0.1:9154";

/// The test driver's node: one domain, `pre`, shut off, with a MAC of its own.
const NODE: &str = "<node>
  <domain type='test' xmlns:test='http://libvirt.org/schemas/domain/test/1.0'>
    <name>pre</name>
    <uuid>4dea22b3-1d52-d8f3-2516-782e98ab3f77</uuid>
    <memory unit='MiB'>64</memory>
    <os><type>hvm</type></os>
    <test:runstate>5</test:runstate>
    <devices>
      <interface type='bridge'><mac address='02:aa:00:00:00:77'/><source bridge='br0'/></interface>
    </devices>
  </domain>
</node>
";

fn metric(h: &DnsHarness, name: &str) -> f64 {
    jitsu_tests::curl::metric(h.host.ns(), METRICS, name)
}

#[test]
fn the_test_driver_runs_vms_for_jitsu_dns() {
    require_root();
    require_tool("dig", "dnsutils");
    require_tool("git", "git");
    require_tool("curl", "curl");
    let mut h = DnsHarness::new("lvt").unwrap();
    let node = h.host.file("node.xml");
    std::fs::write(&node, NODE).unwrap();
    let db = h.db();
    let args = h.backend_args(
        &format!("test://{}", node.display()),
        &[
            "-x",
            "libvirt",
            "--metrics",
            METRICS,
            "-t",
            "1",
            "-d",
            "0",
            "name=pre,dns=pre.example.org,ip=10.77.0.20",
            "name=fresh,dns=fresh.example.org,ip=10.77.0.21,kernel=/boot/fresh.vmlinux,memory=64M",
            "name=sleepy,dns=sleepy.example.org,ip=10.77.0.22,kernel=/boot/sleepy.vmlinux,\
             stop_mode=suspend",
            "name=nokeys,dns=nokeys.example.org,ip=10.77.0.23",
        ],
    );
    h.start(&args, &[]).unwrap();

    // The existing domain's MAC is the VM's now (no mac key: it was derived from the name).
    wait_until("pre's MAC from its domain", LONG, || {
        (h.stored("pre", "mac").as_deref() == Some("02:aa:00:00:00:77")).then_some(())
    })
    .unwrap();
    assert_history(&db, &["pre: MAC 02:aa:00:00:00:77 from its domain"]);
    let d = h.dig(&["pre.example.org", "A"]);
    assert_eq!(d.addresses(), vec!["10.77.0.20"], "{}", d.text);
    h.wait_state("pre", "running", LONG);

    // A VM without a domain gets one from its keys, boots, and is destroyed when idle.
    let d = h.dig(&["fresh.example.org", "A"]);
    assert_eq!(d.addresses(), vec!["10.77.0.21"], "{}", d.text);
    h.wait_state("fresh", "running", LONG);
    assert!(
        h.log()
            .contains("defined a domain from the VM's keys vm=fresh"),
        "{}",
        h.log()
    );
    h.wait_state("fresh", "off", LONG);
    let log = store_log(&db);
    assert!(
        log.iter()
            .any(|m| m.starts_with("fresh: running -> stopping (idle for 2 s")),
        "{log:?}"
    );
    assert_history(&db, &["fresh: stopping -> off (stopped (destroy))"]);

    // Suspend mode: a managed save when idle, a resume on the next query.
    let d = h.dig(&["sleepy.example.org", "A"]);
    assert_eq!(d.addresses(), vec!["10.77.0.22"], "{}", d.text);
    h.wait_state("sleepy", "suspended", LONG);
    let d = h.dig(&["sleepy.example.org", "A"]);
    assert_eq!(d.addresses(), vec!["10.77.0.22"], "{}", d.text);
    h.wait_state("sleepy", "running", LONG);
    assert_eq!(
        h.stored("sleepy", "starts").as_deref(),
        Some("1"),
        "a resume is no boot"
    );
    assert_history(
        &db,
        &[
            "sleepy: stopping -> suspended (stopped (suspend))",
            "sleepy: suspended -> booting (resume, query from 127.0.0.1)",
            "sleepy: booting -> running (resumed)",
        ],
    );

    // Nothing to define a domain from: the boot fails saying why, the query gets SERVFAIL.
    let d = h.dig(&["nokeys.example.org", "A"]);
    assert_eq!(d.status, "SERVFAIL", "{}", d.text);
    h.wait_state("nokeys", "failed", LONG);
    assert!(
        store_log(&db)
            .iter()
            .any(|m| m.contains("nokeys: booting -> failed (boot failed: VM nokeys: start: no domain nokeys is defined, and none can be defined from the VM's keys")),
        "{:?}",
        store_log(&db)
    );

    // Every state change came as a pushed event; none was polled.
    assert!(metric(&h, "jitsu_dns_backend_events_total") >= 6.0);
    assert_eq!(metric(&h, "jitsu_dns_backend_state_polls_total"), 0.0);
    assert_eq!(h.stop().unwrap(), Some(0));
}
