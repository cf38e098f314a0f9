//! The harness itself: a bridge in its own namespace, two members that reach each other
//! through it, a forwarding table that shows who is where, and nothing left behind.

use jitsu_tests::topo::Host;
use jitsu_tests::{require_root, require_tool, sh};

#[test]
fn members_talk_through_the_bridge_and_everything_is_removed() {
    require_root();
    require_tool("ip", "iproute2");
    let names;
    {
        let host = Host::new("topo").unwrap();
        let a = host
            .join(
                "a",
                Some("02:77:00:00:00:0a"),
                &["10.77.0.10/24", "fd77::a/64"],
                true,
            )
            .unwrap();
        let b = host
            .join(
                "b",
                Some("02:77:00:00:00:0b"),
                &["10.77.0.11/24", "fd77::b/64"],
                true,
            )
            .unwrap();
        a.ns.sh("ping -c1 -W2 10.77.0.11").unwrap();
        a.ns.sh("ping -c1 -W2 fd77::b").unwrap();
        let fdb = host.fdb().unwrap();
        for (mac, port) in [
            ("02:77:00:00:00:0a", &a.port),
            ("02:77:00:00:00:0b", &b.port),
        ] {
            assert!(
                fdb.iter()
                    .any(|e| e.mac == mac && &e.port == port && !e.is_static),
                "{mac} not learnt on {port}: {fdb:?}"
            );
        }
        names = [
            host.ns().name().to_string(),
            a.ns.name().to_string(),
            b.ns.name().to_string(),
        ];
    }
    let left = sh("ip netns list").unwrap();
    for n in names {
        assert!(!left.contains(&n), "namespace {n} was left behind:\n{left}");
    }
}
