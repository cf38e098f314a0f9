//! The test guest does what a booting guest does, in order: nothing on the wire during its
//! boot time, then its gratuitous ARP, then it listens (HTTP and echo) and reports when.

use std::process::Command;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use jitsu_tests::curl::Curl;
use jitsu_tests::topo::Host;
use jitsu_tests::{bin_path, require_root, require_tool, wait_until};

#[test]
fn the_guest_boots_announces_and_serves() {
    require_root();
    require_tool("curl", "curl");
    require_tool("tcpdump", "tcpdump");
    let host = Host::new("tg").unwrap();
    let client = host
        .join(
            "tgc",
            Some("02:77:00:02:00:02"),
            &["10.77.2.2/24", "fd77:2::2/64"],
            true,
        )
        .unwrap();
    let guest = host
        .join("tgg", Some("02:77:00:02:00:10"), &[], false)
        .unwrap();
    // As the process backend leaves it for a guest that configures itself: link up, no
    // address, IPv6 off, so the guest's MAC is silent until it boots.
    guest
        .ns
        .sh("sysctl -qw net.ipv6.conf.eth0.disable_ipv6=1 && ip link set eth0 up")
        .unwrap();

    let pcap = host.file("br0.pcap");
    let pcap_s = pcap.to_str().unwrap().to_string();
    let mut dump = host
        .spawn(
            "/usr/bin/tcpdump",
            &[
                "-i",
                "br0",
                "-U",
                "--immediate-mode",
                "-n",
                "-w",
                &pcap_s,
                "arp or icmp6",
            ],
        )
        .unwrap();
    // tcpdump is capturing once it says so.
    wait_until("tcpdump to listen", Duration::from_secs(10), || {
        dump.log().contains("listening on").then_some(())
    })
    .unwrap_or_else(|e| panic!("{e}: {}", dump.log()));

    let report = host.file("report");
    let started = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    let guest_bin = bin_path("jitsu-test-guest");
    let mut g = guest.ns.command(guest_bin);
    g.args(["--boot-ms", "200", "--report", report.to_str().unwrap()])
        .env("JITSU_NAME", "www")
        .env("JITSU_IP", "10.77.2.10")
        .env("JITSU_IP6", "fd77:2::10");
    let mut child = g.spawn().unwrap();

    let line = wait_until(
        "the guest to report listening",
        Duration::from_secs(20),
        || {
            std::fs::read_to_string(&report)
                .ok()
                .filter(|s| !s.is_empty())
        },
    )
    .unwrap();
    let fields: Vec<&str> = line.split_whitespace().collect();
    assert_eq!(&fields[..2], ["listening", "www"], "report line {line:?}");
    let listening: u128 = fields[2].parse().unwrap();
    assert!(
        listening >= started + 200_000_000,
        "listened {} ms after start, before its 200 ms boot time",
        (listening - started) / 1_000_000
    );

    for url in ["http://10.77.2.10/", "http://[fd77:2::10]/"] {
        let page = Curl::get(url)
            .max_time(Duration::from_secs(5))
            .body(&client.ns)
            .unwrap();
        assert_eq!(page, "hello from www\n", "{url}");
    }
    let echo = client
        .ns
        .sh("printf ping | timeout 5 busybox nc 10.77.2.10 7 || true")
        .unwrap();
    assert_eq!(echo, "ping");

    dump.signal("INT").unwrap();
    dump.wait_exit(Duration::from_secs(10)).unwrap();
    let seen = String::from_utf8(
        Command::new("tcpdump")
            .args(["-n", "-e", "-r", &pcap_s])
            .output()
            .unwrap()
            .stdout,
    )
    .unwrap();
    // Nothing from the guest's MAC before it reported listening minus its announcement: the
    // first frame from it is its announcement.
    let first = seen
        .lines()
        .find(|l| l.split_whitespace().nth(1) == Some("02:77:00:02:00:10"))
        .unwrap_or_default();
    assert!(
        first.contains("ARP") || first.contains("neighbor advertisement"),
        "the guest's first frame is not an announcement: {first}\n{seen}"
    );
    let garp = seen.lines().any(|l| {
        l.contains("02:77:00:02:00:10 > ff:ff:ff:ff:ff:ff")
            && l.contains("ARP")
            && l.contains("who-has 10.77.2.10")
            && l.contains("tell 10.77.2.10")
    });
    assert!(garp, "no gratuitous ARP from the guest in:\n{seen}");
    let na = seen.lines().any(|l| {
        l.contains("02:77:00:02:00:10 > 33:33:00:00:00:01")
            && l.contains("neighbor advertisement, tgt is fd77:2::10")
    });
    assert!(na, "no unsolicited NA from the guest in:\n{seen}");
    let _ = child.kill();
    let _ = child.wait();
}
