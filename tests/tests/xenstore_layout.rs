//! The held-SYN layout from `synjitsu::store`, written into the test xenstored over the real
//! wire protocol, read back by Debian's `xenstore-ls` and `xenstore-read`: clients nobody
//! here wrote agree with both the layout and the test daemon.

use std::net::IpAddr;
use std::os::unix::net::UnixStream;
use std::process::Command;

use jitsu_tests::xenstored::{TestXenstored, tool as tool_at};
use jitsu_tests::{Scratch, require_tool, run};
use synjitsu::store::layout::{HeldSyn, SynKey, ip_path, options_from_wire};
use synjitsu::store::xs_wire::{Access, Perm, XsMsg, XsType};

fn call(s: &mut UnixStream, m: XsMsg) -> XsMsg {
    let msg = jitsu_tests::xenstored::call(s, &m).unwrap();
    assert_ne!(msg.ty, XsType::Error, "{:?} failed: {}", m.ty, msg.text());
    msg
}

fn xs_cmd(xs: &TestXenstored, tool: &str, args: &[&str]) -> String {
    let out = run(Command::new(tool)
        .env("XENSTORED_PATH", xs.path())
        .args(args))
    .unwrap();
    String::from_utf8(out.stdout).unwrap()
}

#[test]
fn debian_clients_read_the_original_layout() {
    require_tool("xenstore-ls", "xenstore-utils");
    let dir = Scratch::new("xs").unwrap();
    let xs = TestXenstored::start(&dir.join("xenstored.sock")).unwrap();
    let mut c = UnixStream::connect(xs.path()).unwrap();
    c.set_read_timeout(Some(std::time::Duration::from_secs(5)))
        .unwrap();

    let guest: IpAddr = "10.0.0.1".parse().unwrap();
    let key = SynKey {
        local_ip: guest,
        local_port: 80,
        dest_ip: "10.0.0.254".parse().unwrap(),
        dest_port: 41234,
    };
    // A Linux SYN's options area: mss 1460, sackOK, TS val 736287380 ecr 0, nop, wscale 10.
    let linux_syn = [
        0x02, 0x04, 0x05, 0xb4, 0x04, 0x02, 0x08, 0x0a, 0x2b, 0xe2, 0xda, 0x94, 0x00, 0x00, 0x00,
        0x00, 0x01, 0x03, 0x03, 0x0a,
    ];
    let syn = HeldSyn::new(
        64240,
        0xF000_0001,
        options_from_wire(&linux_syn).unwrap(),
        0x1234,
    );
    // One transaction for the guest's subtree and one SYN, as synjitsu does.
    let tx: u32 = call(&mut c, XsMsg::new(XsType::TransactionStart, 1, 0, &[b""]))
        .text()
        .parse()
        .unwrap();
    call(
        &mut c,
        XsMsg::new(XsType::Mkdir, 2, tx, &[ip_path(guest).as_bytes()]),
    );
    let perms = [Perm::new(Access::None, 0), Perm::new(Access::Both, 7)];
    call(&mut c, XsMsg::set_perms(3, tx, &ip_path(guest), &perms));
    for (i, (leaf, value)) in syn.to_leaves().iter().enumerate() {
        call(
            &mut c,
            XsMsg::write(4 + i as u32, tx, &key.leaf_path(leaf), value.as_bytes()),
        );
    }
    call(&mut c, XsMsg::new(XsType::TransactionEnd, 20, tx, &[b"T"]));

    let listing = xs_cmd(&xs, "xenstore-ls", &["-f", "/ip"]);
    let expected = [
        ("tx_wnd", "64240"),
        ("sequence", "-268435455"),
        // As the reference file gives it for this SYN: what the original stack wrote.
        (
            "options",
            "((Window_size_shift 10)Noop(Timestamp 736287380 0)SACK_ok(MSS 1460))",
        ),
        ("tx_isn", "452858420"),
        ("rx_wnd", "65535"),
        ("rx_wnd_scaleoffer", "2"),
    ];
    for (leaf, value) in expected {
        let line = format!("/ip/10-0-0-1/80/10-0-0-254/41234/syn/{leaf} = \"{value}\"");
        assert!(listing.contains(&line), "missing {line:?} in:\n{listing}");
    }
    // Leaves come back through a real reader, and parse back into the same record.
    let back = HeldSyn::from_leaves(|leaf| {
        Some(
            xs_cmd(&xs, "xenstore-read", &[&key.leaf_path(leaf)])
                .trim_end_matches('\n')
                .to_string(),
        )
    })
    .unwrap();
    assert_eq!(back, syn);
    // Children inherit the guest's permissions: dom0 owns, domain 7 reads and writes,
    // nobody else sees anything.
    let perms = xs_cmd(&xs, "xenstore-ls", &["-p", "/ip/10-0-0-1/80"]);
    assert!(perms.contains("(n0,b7)"), "permissions were: {perms}");
}

#[test]
fn the_tests_xenstored_answers_what_xenstore_tools_ask() {
    require_tool("xenstore-write", "xenstore-utils");
    let dir = Scratch::new("xs").unwrap();
    let xs = TestXenstored::start(&dir.join("xenstored.sock")).unwrap();
    xs_cmd(&xs, "xenstore-write", &["/ip/10-0-0-9", "managed"]);
    assert_eq!(xs.read("/ip/10-0-0-9"), Some(b"managed".to_vec()));
    xs_cmd(&xs, "xenstore-chmod", &["/ip/10-0-0-9", "n0", "r3"]);
    assert_eq!(
        xs.perms("/ip/10-0-0-9").unwrap(),
        vec![Perm::new(Access::None, 0), Perm::new(Access::Read, 3)]
    );
    xs_cmd(&xs, "xenstore-rm", &["/ip/10-0-0-9"]);
    assert_eq!(xs.read("/ip/10-0-0-9"), None);
    let out = Command::new("xenstore-read")
        .env("XENSTORED_PATH", xs.path())
        .arg("/ip/10-0-0-9")
        .output()
        .unwrap();
    assert!(!out.status.success(), "reading a removed node must fail");
}

#[test]
fn debian_clients_act_as_the_domain_of_their_socket() {
    for tool in [
        "xenstore-write",
        "xenstore-read",
        "xenstore-rm",
        "xenstore-list",
    ] {
        require_tool(tool, "xenstore-utils");
    }
    let dir = Scratch::new("xs").unwrap();
    let xs = TestXenstored::start(&dir.join("xenstored.sock")).unwrap();
    xs_cmd(&xs, "xenstore-write", &["/ip", "", "/ip/a", "x"]);
    xs_cmd(&xs, "xenstore-chmod", &["/ip", "n0"]);
    xs_cmd(&xs, "xenstore-chmod", &["/ip/a", "n0", "b5"]);
    let (d5, d6) = (xs.domain_socket(5).unwrap(), xs.domain_socket(6).unwrap());
    assert_eq!(
        tool_at(&d5, "xenstore-read", &["/ip/a"]).as_deref(),
        Some("x\n")
    );
    assert!(tool_at(&d5, "xenstore-write", &["/ip/a", "managed"]).is_some());
    assert_eq!(xs.read("/ip/a"), Some(b"managed".to_vec()));
    // No node of its own, no write access on the parent: nothing is created.
    assert!(tool_at(&d5, "xenstore-write", &["/ip/b", "managed"]).is_none());
    assert_eq!(xs.read("/ip/b"), None);
    assert!(
        tool_at(&d5, "xenstore-list", &["/ip"]).is_none(),
        "/ip is dom0's"
    );
    // Under its own node it creates what it likes, and owns it.
    assert!(tool_at(&d5, "xenstore-write", &["/ip/a/80/c", "1"]).is_some());
    assert_eq!(
        xs.perms("/ip/a/80/c").unwrap(),
        vec![Perm::new(Access::None, 5), Perm::new(Access::Both, 5)]
    );
    // Another domain sees nothing and removes nothing.
    assert!(tool_at(&d6, "xenstore-read", &["/ip/a"]).is_none());
    assert!(tool_at(&d6, "xenstore-list", &["/ip/a"]).is_none());
    assert!(tool_at(&d6, "xenstore-rm", &["/ip/a"]).is_none());
    assert_eq!(xs.read("/ip/a"), Some(b"managed".to_vec()));
    assert!(tool_at(&d5, "xenstore-rm", &["/ip/a/80"]).is_some());
    assert_eq!(xs.read("/ip/a/80"), None);
}
