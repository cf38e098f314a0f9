//! jitsu-dns as real DNS clients see it: `dig` and `kdig` over UDP and TCP against the
//! running binary, raw datagrams for what no client sends, and a real BIND as forwarder.

use std::time::Duration;

use jitsu_tests::curl::metrics;
use jitsu_tests::jitsu_dns::{DnsHarness, kdig};
use jitsu_tests::{bin_path, require_root, require_tool, wait_until};

fn vm(name: &str, n: u8, extra: &str) -> String {
    format!(
        "name={name},dns={name}.example.org,ip=10.77.0.{n},response_delay=0,command=exec sleep 600{extra}"
    )
}

/// A DNS query in wire format: id 0x4a17, RD, the given questions (name, type), class IN.
fn query(questions: &[(&str, u16)]) -> Vec<u8> {
    let mut m = vec![0x4a, 0x17, 0x01, 0x00];
    m.extend_from_slice(&(questions.len() as u16).to_be_bytes());
    m.extend_from_slice(&[0, 0, 0, 0, 0, 0]);
    for (name, qtype) in questions {
        for label in name.split('.').filter(|l| !l.is_empty()) {
            m.push(label.len() as u8);
            m.extend_from_slice(label.as_bytes());
        }
        m.push(0);
        m.extend_from_slice(&qtype.to_be_bytes());
        m.extend_from_slice(&1u16.to_be_bytes());
    }
    m
}

/// Sends `msg` over UDP from the host namespace; the reply's bytes, or None on timeout.
fn probe(h: &DnsHarness, msg: &[u8]) -> Option<Vec<u8>> {
    let hex: String = msg.iter().map(|b| format!("{b:02x}")).collect();
    let out = h
        .host
        .ns()
        .command(bin_path("udp-probe"))
        .args(["127.0.0.1:53", &hex, "2000"])
        .output()
        .unwrap();
    if !out.status.success() {
        return None;
    }
    let text = String::from_utf8_lossy(&out.stdout);
    let t = text.trim();
    Some(
        (0..t.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&t[i..i + 2], 16).unwrap())
            .collect(),
    )
}

fn rcode(reply: &[u8]) -> u8 {
    reply[3] & 0x0f
}

/// jitsu-dns started with metrics at 127.0.0.1:9153, TTL `ttl`, www (A and AAAA) and the
/// VMs `more`, once the tools the protocol tests use are there.
fn started(tag: &str, ttl: &str, more: &[&str]) -> DnsHarness {
    require_root();
    for (tool, pkg) in [
        ("dig", "dnsutils"),
        ("kdig", "knot-dnsutils"),
        ("curl", "curl"),
        ("git", "git"),
    ] {
        require_tool(tool, pkg);
    }
    let mut h = DnsHarness::new(tag).unwrap();
    let www = vm("www", 1, ",ip6=fd77::1");
    let flags = ["-t", ttl, "--metrics", "127.0.0.1:9153", &www];
    let args = h.args(None, &[&flags[..], more].concat());
    h.start(&args, &[]).unwrap();
    h
}

#[test]
fn authoritative_answers_over_udp_and_tcp() {
    let mut h = started("dproto", "7", &[&vm("mail", 2, "")]);

    // A over UDP: boots www, authoritative, the configured TTL, EDNS echoed.
    let a = h.dig(&["www.example.org", "A"]);
    assert_eq!(a.status, "NOERROR", "{}", a.text);
    assert!(a.aa(), "own names are authoritative: {}", a.text);
    assert_eq!(a.addresses(), vec!["10.77.0.1"]);
    assert_eq!(a.answer[0].ttl, 7);
    assert!(a.edns, "a query with EDNS gets EDNS back: {}", a.text);
    // Over TCP, and without EDNS.
    let t = h.dig(&["+tcp", "www.example.org", "A"]);
    assert_eq!(
        (t.status.as_str(), t.aa(), t.addresses()),
        ("NOERROR", true, vec!["10.77.0.1".to_string()])
    );
    let n = h.dig(&["+noedns", "www.example.org", "A"]);
    assert!(!n.edns && n.addresses() == vec!["10.77.0.1"], "{}", n.text);
    // Names are case-insensitive.
    let c = h.dig(&["WwW.ExAmPlE.oRg", "A"]);
    assert_eq!(c.addresses(), vec!["10.77.0.1"], "{}", c.text);
    // AAAA.
    let six = h.dig(&["www.example.org", "AAAA"]);
    assert_eq!(
        (six.aa(), six.addresses()),
        (true, vec!["fd77::1".to_string()]),
        "{}",
        six.text
    );
    let six = h.dig(&["+tcp", "www.example.org", "AAAA"]);
    assert_eq!(six.addresses(), vec!["fd77::1"]);

    // SOA and NS of the zone, over UDP and TCP, with kdig as well as dig.
    for tcp in ["+notcp", "+tcp"] {
        let soa = kdig(h.host.ns(), &["@127.0.0.1", tcp, "example.org", "SOA"]).unwrap();
        assert_eq!(soa.status, "NOERROR", "{}", soa.text);
        assert!(soa.aa());
        assert_eq!(soa.answer.len(), 1, "{}", soa.text);
        assert_eq!(soa.answer[0].rtype, "SOA");
        assert!(
            soa.answer[0]
                .data
                .starts_with("ns.example.org. hostmaster.example.org. "),
            "{}",
            soa.text
        );
        let ns = h.dig(&[tcp, "example.org", "NS"]);
        assert!(ns.aa());
        assert_eq!(
            ns.answer
                .iter()
                .map(|r| r.data.as_str())
                .collect::<Vec<_>>(),
            vec!["ns.example.org."]
        );
        assert_eq!(
            ns.additional
                .iter()
                .map(|r| r.data.as_str())
                .collect::<Vec<_>>(),
            vec!["127.0.0.1"],
            "glue: {}",
            ns.text
        );
    }
    let nsa = h.dig(&["ns.example.org", "A"]);
    assert_eq!(
        (nsa.aa(), nsa.addresses()),
        (true, vec!["127.0.0.1".to_string()])
    );

    // NXDOMAIN inside the zone, with the SOA as authority, over both transports.
    for tcp in ["+notcp", "+tcp"] {
        let nx = h.dig(&[tcp, "nope.example.org", "A"]);
        assert_eq!(nx.status, "NXDOMAIN", "{}", nx.text);
        assert!(nx.aa() && nx.answer.is_empty());
        assert_eq!(nx.authority.len(), 1);
        assert_eq!(nx.authority[0].rtype, "SOA");
    }

    // Another type on a VM name: empty NOERROR, and it boots nothing.
    let mx = h.dig(&["www.example.org", "MX"]);
    assert_eq!(
        (mx.status.as_str(), mx.aa(), mx.answer.len()),
        ("NOERROR", true, 0),
        "{}",
        mx.text
    );
    assert_eq!(mx.authority[0].rtype, "SOA");
    let txt = h.dig(&["mail.example.org", "TXT"]);
    assert_eq!((txt.status.as_str(), txt.answer.len()), ("NOERROR", 0));
    assert_eq!(
        h.stored("mail", "state").as_deref(),
        Some("off"),
        "a TXT query boots nothing"
    );
    assert_eq!(h.stored("mail", "starts").as_deref(), Some("0"));

    // Outside the zones with forwarding off: REFUSED, not authoritative.
    for tcp in ["+notcp", "+tcp"] {
        let r = h.dig(&[tcp, "example.com", "A"]);
        assert_eq!(r.status, "REFUSED", "{}", r.text);
        assert!(!r.aa());
    }

    // FORMERR for two questions and for a broken message; the server carries on.
    let two = probe(
        &h,
        &query(&[("www.example.org", 1), ("www.example.org", 28)]),
    )
    .expect("an answer to two questions");
    assert_eq!(&two[..2], &[0x4a, 0x17], "the id is echoed");
    assert!(two[2] & 0x80 != 0, "a response");
    assert_eq!(rcode(&two), 1, "FORMERR");
    let mut broken = query(&[("www.example.org", 1)]);
    broken.truncate(12 + 6); // the name's first label says 3 bytes, then the message ends
    broken[12] = 63;
    let b = probe(&h, &broken).expect("an answer to a broken message");
    assert_eq!(rcode(&b), 1, "FORMERR");
    assert!(
        probe(&h, &[0x01, 0x02, 0x03]).is_none(),
        "no header, no answer"
    );
    let after = h.dig(&["www.example.org", "A"]);
    assert_eq!(
        after.addresses(),
        vec!["10.77.0.1"],
        "still serving after bad input"
    );

    // The counters saw all of it.
    let m = metrics(h.host.ns(), "127.0.0.1:9153").unwrap();
    let value = |name: &str| -> u64 {
        m.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
            .unwrap_or_else(|| panic!("no {name} in\n{m}"))
    };
    assert_eq!(
        value("jitsu_dns_queries_total{outcome=\"answer_after_boot\"}"),
        1
    );
    assert_eq!(value("jitsu_dns_queries_total{outcome=\"nxdomain\"}"), 2);
    assert_eq!(value("jitsu_dns_queries_total{outcome=\"nodata\"}"), 2);
    assert_eq!(
        value("jitsu_dns_queries_total{outcome=\"formerr\"}"),
        2,
        "two questions, and the message that does not parse"
    );
    assert_eq!(
        value("jitsu_dns_dropped_total{reason=\"short\"}"),
        1,
        "no header, no answer, but counted"
    );
    // The harness's readiness probe is refused too.
    assert!(value("jitsu_dns_queries_total{outcome=\"refused\"}") >= 2);
    assert!(value("jitsu_dns_queries_total{outcome=\"answer\"}") >= 6);
    assert_eq!(value("jitsu_dns_boots_total"), 1);
    assert_eq!(value("jitsu_dns_vms_running"), 1);
    assert_eq!(h.stop().unwrap(), Some(0), "SIGTERM is a clean exit");
}

const NAMED_CONF: &str = r#"options {
  directory "@DIR@";
  pid-file "@DIR@/named.pid";
  listen-on port 5300 { 127.0.0.1; };
  listen-on-v6 { none; };
  recursion no;
  dnssec-validation no;
};
controls { };
zone "fwd.test" { type primary; file "@DIR@/fwd.test.zone"; };
"#;

const ZONE: &str = "$TTL 300
@   IN SOA ns.fwd.test. hostmaster.fwd.test. 1 3600 600 86400 300
@   IN NS  ns.fwd.test.
ns  IN A   127.0.0.1
www IN A   192.0.2.80
";

#[test]
fn other_names_are_forwarded_to_a_real_server_without_aa() {
    require_root();
    require_tool("dig", "dnsutils");
    require_tool("named", "bind9");
    let mut h = DnsHarness::new("dfwd").unwrap();
    let dir = h.host.file("named");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(
        dir.join("named.conf"),
        NAMED_CONF.replace("@DIR@", dir.to_str().unwrap()),
    )
    .unwrap();
    std::fs::write(dir.join("fwd.test.zone"), ZONE).unwrap();
    let conf = dir.join("named.conf");
    let _named = h
        .host
        .spawn("/usr/sbin/named", &["-g", "-c", conf.to_str().unwrap()])
        .unwrap();
    wait_until("named to answer", Duration::from_secs(30), || {
        let out = h
            .host
            .ns()
            .command("dig")
            .args([
                "+time=1",
                "+tries=1",
                "@127.0.0.1",
                "-p",
                "5300",
                "www.fwd.test",
                "+short",
            ])
            .output()
            .ok()?;
        (String::from_utf8_lossy(&out.stdout).trim() == "192.0.2.80").then_some(())
    })
    .unwrap();
    // BIND itself answers authoritatively...
    let direct =
        jitsu_tests::jitsu_dns::dig(h.host.ns(), &["@127.0.0.1", "-p", "5300", "www.fwd.test"])
            .unwrap();
    assert!(direct.aa());
    let args = h.args(None, &["-f", "127.0.0.1", "-p", "5300", &vm("www", 1, "")]);
    h.start(&args, &[]).unwrap();
    // ...and jitsu-dns relays its answers without claiming them.
    for tcp in ["+notcp", "+tcp"] {
        let f = h.dig(&[tcp, "www.fwd.test", "A"]);
        assert_eq!(f.status, "NOERROR", "{}", f.text);
        assert_eq!(f.addresses(), vec!["192.0.2.80"]);
        assert!(
            !f.aa(),
            "forwarded answers are not authoritative: {}",
            f.text
        );
        let nx = h.dig(&[tcp, "nope.fwd.test", "A"]);
        assert_eq!(nx.status, "NXDOMAIN", "{}", nx.text);
        assert!(!nx.aa());
        assert_eq!(
            nx.authority.first().map(|r| r.name.as_str()),
            Some("fwd.test."),
            "BIND's SOA: {}",
            nx.text
        );
    }
    // Its own names stay authoritative.
    let own = h.dig(&["www.example.org", "A"]);
    assert!(
        own.aa() && own.addresses() == vec!["10.77.0.1"],
        "{}",
        own.text
    );
    // A forwarder that does not answer means SERVFAIL, not a hang.
    drop(_named);
    let dead = h.dig(&["www.fwd.test", "A"]);
    assert_eq!(dead.status, "SERVFAIL", "{}", dead.text);
}

/// The size dig (`MSG SIZE  rcvd: N`) or kdig (`Received N B`) reports.
fn size(d: &jitsu_tests::jitsu_dns::Dig) -> usize {
    d.text
        .lines()
        .find_map(|l| {
            let n = l
                .split_once("MSG SIZE  rcvd: ")
                .map(|(_, n)| n)
                .or_else(|| {
                    l.strip_prefix(";; Received ")
                        .and_then(|r| r.split_once(" B").map(|(n, _)| n))
                })?;
            n.trim().parse().ok()
        })
        .unwrap_or_else(|| panic!("no size in {}", d.text))
}

/// The first answer record's owner as the tool printed it (in its case).
fn owner(d: &jitsu_tests::jitsu_dns::Dig) -> String {
    let mut lines = d
        .text
        .lines()
        .skip_while(|l| !l.contains("ANSWER SECTION:"));
    lines
        .nth(1)
        .and_then(|l| l.split_whitespace().next())
        .unwrap_or_else(|| panic!("no answer in {}", d.text))
        .to_string()
}

#[test]
fn running_vms_addresses_over_udp_come_from_the_fast_path_and_mean_what_hickorys_do() {
    let mut h = started("dfast", "60", &[]);
    let fast = || -> u64 {
        let m = metrics(h.host.ns(), "127.0.0.1:9153").unwrap();
        m.lines()
            .find_map(|l| {
                l.strip_prefix("jitsu_dns_fast_answers_total ")?
                    .parse()
                    .ok()
            })
            .unwrap_or_else(|| panic!("no fast_answers in\n{m}"))
    };
    // The first query waits for the boot: the slow path.
    let first = h.dig(&["www.example.org", "A"]);
    assert_eq!(first.addresses(), vec!["10.77.0.1"], "{}", first.text);
    assert_eq!(fast(), 0);

    // Over UDP the fast path answers; over TCP hickory does. The same status, flags,
    // records, EDNS and size from both, with dig and kdig, and with dig (kdig sends names
    // in lowercase) the question's case (0x20) in the owner. An ID not echoed would make
    // the tools wait for another answer and fail.
    let q = |tool: &str, args: &[&str]| {
        let mut a = vec!["@127.0.0.1"];
        a.extend_from_slice(args);
        let run = if tool == "dig" {
            jitsu_tests::jitsu_dns::dig
        } else {
            kdig
        };
        run(h.host.ns(), &a).unwrap_or_else(|e| panic!("{e}\njitsu-dns log:\n{}", h.log()))
    };
    let mut udp_fast = 0;
    for (tool, edns_on) in [("dig", "+nocookie"), ("kdig", "+edns")] {
        for qtype in ["A", "AAAA"] {
            for edns in [edns_on, "+noedns"] {
                let args = ["WwW.ExAmPlE.oRg", qtype, edns];
                let udp = q(tool, &[&args[..], &["+notcp"]].concat());
                let tcp = q(tool, &[&args[..], &["+tcp"]].concat());
                let what = format!("{tool} {args:?}:\nUDP\n{}\nTCP\n{}", udp.text, tcp.text);
                assert_eq!(udp.status, "NOERROR", "{what}");
                assert!(udp.aa(), "{what}");
                assert_eq!(udp.flags, tcp.flags, "{what}");
                assert_eq!(udp.answer, tcp.answer, "{what}");
                assert_eq!(udp.addresses().len(), 1, "{what}");
                assert_eq!(udp.edns, edns != "+noedns", "an OPT for an OPT: {what}");
                assert_eq!(tcp.edns, udp.edns, "{what}");
                assert_eq!(size(&udp), size(&tcp), "{what}");
                assert_eq!(owner(&udp), owner(&tcp), "{what}");
                if tool == "dig" {
                    assert_eq!(owner(&udp), "WwW.ExAmPlE.oRg.", "{what}");
                }
                udp_fast += 1;
                assert_eq!(fast(), udp_fast, "only UDP is fast: {what}");
            }
        }
    }
    // Compressed as Knot answers: the owner is a pointer to the question.
    assert_eq!(size(&q("dig", &["www.example.org", "A", "+nocookie"])), 60);
    assert_eq!(size(&q("dig", &["www.example.org", "A", "+noedns"])), 49);
    assert_eq!(
        size(&q("dig", &["www.example.org", "AAAA", "+nocookie"])),
        72
    );
    udp_fast += 3;
    // dig's COOKIE and DO bit change nothing in the answer: fast.
    for extra in ["+cookie", "+dnssec"] {
        let d = q("dig", &["www.example.org", "A", extra]);
        assert!(d.edns && d.addresses() == vec!["10.77.0.1"], "{}", d.text);
    }
    udp_fast += 2;
    assert_eq!(fast(), udp_fast);

    // Options hickory interprets, another EDNS version, another type: hickory's path, and
    // the same answer where there is one.
    let nsid = q("kdig", &["www.example.org", "A", "+nsid"]);
    let subnet = q("dig", &["www.example.org", "A", "+subnet=192.0.2.0/24"]);
    for d in [&nsid, &subnet] {
        assert_eq!(d.status, "NOERROR", "{}", d.text);
        assert!(d.edns && d.aa(), "{}", d.text);
        assert_eq!(d.addresses(), vec!["10.77.0.1"], "{}", d.text);
    }
    let v1 = q("dig", &["www.example.org", "A", "+edns=1", "+noednsneg"]);
    assert_eq!(v1.status, "BADVERS", "{}", v1.text);
    let mx = q("kdig", &["www.example.org", "MX"]);
    assert_eq!((mx.status.as_str(), mx.answer.len()), ("NOERROR", 0));
    assert_eq!(
        fast(),
        udp_fast,
        "none of these was answered by the fast path"
    );
    assert_eq!(h.stop().unwrap(), Some(0));
}
