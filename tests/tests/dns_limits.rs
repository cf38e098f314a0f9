//! The bounds on jitsu-dns's network paths, against the running binary with small limits:
//! TCP connections in total and per client, forwards in flight, and who may forward at all.
//! The hostile clients are `dns-abuse` (tests/src/bin/dns-abuse.rs) in the host namespace;
//! the forwarder that never answers is its `sink`. Each test checks counts, never timings.

use std::io::{BufRead, BufReader};
use std::process::{Child, Stdio};
use std::time::Duration;

use jitsu_tests::curl::metric;
use jitsu_tests::jitsu_dns::{DnsHarness, dig};
use jitsu_tests::{Netns, bin_path, require_root, require_tool, wait_until};

const METRICS: &str = "127.0.0.1:9153";
const WWW: &str =
    "name=www,dns=www.example.org,ip=10.77.0.1,response_delay=0,command=exec sleep 600";

fn prerequisites() {
    require_root();
    require_tool("dig", "dnsutils");
    require_tool("curl", "curl");
    require_tool("git", "git");
}

/// `dns-abuse <args>` in `ns`, killed on drop; its first line of output.
struct Abuse {
    child: Child,
    first: String,
}

impl Abuse {
    /// `args`: dns-abuse's arguments, separated by spaces.
    fn start(ns: &Netns, args: &str) -> Abuse {
        let mut child = ns
            .command(bin_path("dns-abuse"))
            .args(args.split_whitespace())
            .stdout(Stdio::piped())
            .spawn()
            .expect("dns-abuse starts");
        let mut first = String::new();
        BufReader::new(child.stdout.take().expect("stdout was piped"))
            .read_line(&mut first)
            .expect("dns-abuse writes a line");
        Abuse { child, first }
    }

    /// The value of `key=` in the first line.
    fn get(&self, key: &str) -> String {
        self.first
            .split_whitespace()
            .find_map(|w| w.strip_prefix(key)?.strip_prefix('='))
            .unwrap_or_else(|| panic!("no {key} in {:?}", self.first))
            .to_string()
    }
}

impl Drop for Abuse {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts jitsu-dns with the harness's flags, `extra`, the metrics and the VM `www`, served
/// at `server`, forwarding to the sink; probed with the VM's own name, since other names
/// would go to the sink and never be answered.
fn start_forwarding(h: &mut DnsHarness, server: &str, extra: &[&str]) {
    let mut a = vec!["-b", server, "-f", "127.0.0.53", "-p", "5300"];
    a.extend_from_slice(&["--metrics", METRICS, WWW]);
    a.extend_from_slice(extra);
    let args = h.args(None, &a);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let probe = format!("@{server}");
    let daemon = jitsu_tests::jitsu_dns::start(
        &h.host,
        &args,
        &[],
        &[&probe, "www.example.org"],
        "10.77.0.1",
    )
    .unwrap();
    h.daemon = Some(daemon);
}

fn value(h: &DnsHarness, name: &str) -> f64 {
    metric(h.host.ns(), METRICS, name)
}

#[test]
fn tcp_connections_past_the_bounds_are_closed_and_counted_and_their_places_come_back() {
    prerequisites();
    let mut h = DnsHarness::new("dltcp").unwrap();
    let args = h.args(
        None,
        &[
            "--metrics",
            METRICS,
            "--tcp-max-clients",
            "4",
            "--tcp-max-per-client",
            "2",
            WWW,
        ],
    );
    h.start(&args, &[]).unwrap();
    assert_eq!(
        h.dig(&["+tcp", "www.example.org"]).addresses(),
        ["10.77.0.1"]
    );
    wait_until(
        "dig's connection to be closed",
        Duration::from_secs(30),
        || (value(&h, "jitsu_dns_tcp_connections") == 0.0).then_some(()),
    )
    .unwrap();

    // Three busy connections (a query every second, never idle) from one client: the third
    // is one too many for that client.
    let one = Abuse::start(
        h.host.ns(),
        "tcp 127.0.0.1:53 3 --from 127.0.1.1 --stall query --hold 120",
    );
    assert_eq!(
        (one.get("connected"), one.get("open"), one.get("closed")),
        ("3".into(), "2".into(), "1".into()),
        "{}",
        one.first
    );
    // Four more from four other clients: two fit under the total of four, two do not.
    let four = Abuse::start(
        h.host.ns(),
        "tcp 127.0.0.1:53 4 --sources 4 --from 127.0.2.1 --stall query --hold 120",
    );
    assert_eq!(
        (four.get("open"), four.get("closed")),
        ("2".into(), "2".into()),
        "{}",
        four.first
    );
    assert_eq!(
        value(&h, "jitsu_dns_tcp_refused_total{limit=\"per_client\"}"),
        1.0
    );
    assert_eq!(
        value(&h, "jitsu_dns_tcp_refused_total{limit=\"total\"}"),
        2.0
    );
    assert_eq!(value(&h, "jitsu_dns_tcp_connections"), 4.0);
    // UDP is not held up by a full TCP side.
    assert_eq!(h.dig(&["www.example.org"]).addresses(), ["10.77.0.1"]);

    // Once the clients go, their places come back.
    drop((one, four));
    wait_until(
        "the connections to be closed",
        Duration::from_secs(30),
        || (value(&h, "jitsu_dns_tcp_connections") == 0.0).then_some(()),
    )
    .unwrap();
    assert_eq!(
        h.dig(&["+tcp", "www.example.org"]).addresses(),
        ["10.77.0.1"]
    );
}

#[test]
fn forwards_past_the_bound_get_servfail_at_once_and_owned_names_still_answer() {
    prerequisites();
    let mut h = DnsHarness::new("dlfwd").unwrap();
    let _sink = Abuse::start(h.host.ns(), "sink 127.0.0.53:5300");
    start_forwarding(&mut h, "127.0.0.1", &["--forward-max", "4"]);

    // Twenty forwards at once, then the VM's name: four go to the sink (which never answers,
    // so they end SERVFAIL after the upstream timeout), sixteen find no place and get
    // SERVFAIL at once, and the VM's name is answered meanwhile.
    let burst = Abuse::start(
        h.host.ns(),
        "udp 127.0.0.1:53 20 --rate 100000 --also www.example.org --wait 4",
    );
    assert_eq!(
        (burst.get("sent"), burst.get("servfail"), burst.get("also")),
        ("20".into(), "20".into(), "NOERROR".into()),
        "{}",
        burst.first
    );
    assert_eq!(value(&h, "jitsu_dns_forward_busy_total"), 16.0);
    assert_eq!(value(&h, "jitsu_dns_forward_failures_total"), 4.0);
    // Places come back: the next forward goes upstream again (and times out there).
    let after = h.dig(&["www.fwd.test"]);
    assert_eq!(after.status, "SERVFAIL", "{}", after.text);
    assert_eq!(value(&h, "jitsu_dns_forward_failures_total"), 5.0);
    assert_eq!(value(&h, "jitsu_dns_forward_busy_total"), 16.0);
    assert_eq!(h.dig(&["www.example.org"]).addresses(), ["10.77.0.1"]);
}

#[test]
fn only_clients_in_the_allowed_networks_may_forward() {
    prerequisites();
    let mut h = DnsHarness::new("dlacl").unwrap();
    // A client on another network, routed to jitsu-dns's address through the host.
    h.host.address("10.78.0.1/24").unwrap();
    let client = h.host.join("dlcl", None, &["10.78.0.2/24"], true).unwrap();
    client
        .ns
        .sh("ip route add 10.77.0.0/24 via 10.78.0.1")
        .unwrap();
    let _sink = Abuse::start(h.host.ns(), "sink 127.0.0.53:5300");
    let from_host = |h: &DnsHarness| {
        dig(
            h.host.ns(),
            &["@10.77.0.254", "-b", "10.77.0.254", "example.com"],
        )
        .unwrap()
    };
    let from_client = || dig(&client.ns, &["@10.77.0.254", "example.com"]).unwrap();

    // By default: loopback and the network of the address served on.
    start_forwarding(&mut h, "10.77.0.254", &[]);
    let inside = from_host(&h);
    assert_eq!(
        inside.status, "SERVFAIL",
        "forwarded (to the sink): {}",
        inside.text
    );
    let outside = from_client();
    assert_eq!(outside.status, "REFUSED", "{}", outside.text);
    let own = dig(&client.ns, &["@10.77.0.254", "www.example.org"]).unwrap();
    assert_eq!(
        own.addresses(),
        ["10.77.0.1"],
        "owned names answer everyone"
    );
    assert_eq!(value(&h, "jitsu_dns_forward_refused_total"), 1.0);
    assert_eq!(value(&h, "jitsu_dns_forward_failures_total"), 1.0);
    // And the log says so at start.
    let line = h
        .log()
        .lines()
        .find(|l| l.contains("forwarding names outside the zones for these clients only"))
        .map(str::to_string)
        .unwrap_or_else(|| panic!("no startup line about forwarding:\n{}", h.log()));
    assert!(
        line.contains("clients=127.0.0.0/8, ::1/128, 10.77.0.0/24"),
        "{line}"
    );
    h.stop().unwrap();

    // Configured: only the client's network.
    start_forwarding(
        &mut h,
        "10.77.0.254",
        &["--forward-clients", "10.78.0.0/24"],
    );
    let outside = from_client();
    assert_eq!(outside.status, "SERVFAIL", "forwarded: {}", outside.text);
    let inside = from_host(&h);
    assert_eq!(inside.status, "REFUSED", "{}", inside.text);
    assert_eq!(value(&h, "jitsu_dns_forward_refused_total"), 1.0);
}
