//! synjitsu's Xenstore hand-over end to end: the real binary on a real bridge, a client's real
//! SYN, written into the tests' xenstored over the wire protocol (with xenstored's permission
//! rules), and taken over as the original MirageOS guest does it, by Debian's `xenstore-*`
//! clients connected as the guest's domain (clients nobody here wrote): the original
//! Synjitsu's layout; `/ip/<vm-ip>` there from the boot on, so the guest may mark it `managed`
//! whether or not a SYN was held; readable by the guest's domain and dom0 only (another
//! domain gets nothing); reset for the new domain of each boot; gone when the VM is; stale
//! entries gone at start-up; and nothing written once the guest marks its address `managed`.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};
use jitsu_tests::curl::Curl;
use jitsu_tests::synjitsu::*;
use jitsu_tests::xenstored::{self, TestXenstored};
use jitsu_tests::{Scratch, require_root, require_tool, run, wait_until};
use shared_proto::{ClientMessage, Event, Handover, HandoverVia};
use synjitsu::store::layout::{HeldSyn, SynKey, TX_ISN_BASE, TcpOption};
use synjitsu::store::xs_wire::{Access, Perm};

/// `xenstore-ls -p -f <path>`: path to (value, permissions).
fn xenstore_ls(xs: &TestXenstored, path: &str) -> Result<BTreeMap<String, (String, String)>> {
    let out = run(Command::new("xenstore-ls")
        .env("XENSTORED_PATH", xs.path())
        .args(["-p", "-f", path]))?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let mut nodes = BTreeMap::new();
    for line in text.lines() {
        // `/ip/a/b = "value"   (n0,b7)`
        let (p, rest) = line
            .split_once(" = \"")
            .with_context(|| format!("xenstore-ls line {line:?}"))?;
        let (value, perms) = rest
            .rsplit_once("\"")
            .with_context(|| format!("xenstore-ls line {line:?}"))?;
        let perms = perms.trim().trim_start_matches('(').trim_end_matches(')');
        nodes.insert(p.to_string(), (value.to_string(), perms.to_string()));
    }
    Ok(nodes)
}

/// Debian's `tool args...` connected to `socket` (dom0's, or a domain's): its output, `None`
/// if it failed.
fn xs_at(socket: &Path, tool: &str, args: &[&str]) -> Option<String> {
    xenstored::tool(socket, tool, args).map(|out| out.trim_end_matches('\n').to_string())
}

/// `xenstore-list` as the guest: the children, none if it failed.
fn list(guest: &Path, path: &str) -> Vec<String> {
    xs_at(guest, "xenstore-list", &[path])
        .map(|out| out.lines().map(str::to_string).collect())
        .unwrap_or_default()
}

/// What an original guest does when it starts listening on `ip` (`Pcb.watch` of the patched
/// stack), as domain `guest`: writes `managed` at `/ip/<ip>` (it fails if that is refused),
/// lists the held connections once, and for each reads the six leaves and removes the
/// connection's subtree. Returns each connection's path and leaves.
fn guest_takes_over(
    guest: &Path,
    ip_path: &str,
) -> Result<Vec<(String, BTreeMap<String, String>)>> {
    xs_at(guest, "xenstore-write", &[ip_path, "managed"])
        .with_context(|| format!("the guest could not write `managed` at {ip_path}"))?;
    let mut taken = Vec::new();
    for port in list(guest, ip_path) {
        let port_path = format!("{ip_path}/{port}");
        for dest_ip in list(guest, &port_path) {
            let dest_path = format!("{port_path}/{dest_ip}");
            for dest_port in list(guest, &dest_path) {
                let conn = format!("{dest_path}/{dest_port}");
                let mut leaves = BTreeMap::new();
                for leaf in synjitsu::store::layout::LEAVES {
                    let value = xs_at(guest, "xenstore-read", &[&format!("{conn}/syn/{leaf}")])
                        .with_context(|| format!("the guest could not read {conn}/syn/{leaf}"))?;
                    leaves.insert(leaf.to_string(), value);
                }
                xs_at(guest, "xenstore-rm", &[&conn])
                    .with_context(|| format!("the guest could not remove {conn}"))?;
                taken.push((conn, leaves));
            }
        }
    }
    Ok(taken)
}

/// Waits until `/ip/<vm-ip>` is there, empty, childless and `perms`.
fn wait_guest_node(xs: &TestXenstored, path: &str, perms: &[Perm]) -> Result<()> {
    wait_until(
        &format!("{path} empty and {perms:?}"),
        Duration::from_secs(10),
        || {
            (xs.read(path).as_deref() == Some(b"")
                && xs.perms(path).as_deref() == Some(perms)
                && xs_at(xs.path(), "xenstore-list", &[path]).as_deref() == Some(""))
            .then_some(())
        },
    )
}

/// The client's SYN in a capture: (source port, ISN, tcpdump's text of its options).
fn client_syn(lines: &[String]) -> Option<(u16, u32, String)> {
    lines.iter().find_map(|l| {
        let rest = l.split(" IP 10.77.1.2.").nth(1)?;
        if !rest.contains("> 10.77.1.10.80: Flags [S],") {
            return None;
        }
        let port = rest.split_whitespace().next()?.parse().ok()?;
        let seq = rest.split("seq ").nth(1)?.split(',').next()?.parse().ok()?;
        let options = rest.split("options [").nth(1)?.split(']').next()?;
        Some((port, seq, options.to_string()))
    })
}

/// The `options` leaf the original stack writes for options tcpdump printed in wire order
/// (`mss 1460,sackOK,TS val 1 ecr 0,nop,wscale 7`), by the reference file's rules: one element
/// per option and per NOP, the list reversed, int32 atoms signed, sexplib's machine form (a
/// space only between two atoms).
fn original_options_leaf(tcpdump: &str) -> Result<String> {
    let mut elements = Vec::new();
    for opt in tcpdump.split(',') {
        let words: Vec<&str> = opt.split_whitespace().collect();
        let int32 = |w: &str| -> Result<i32> { Ok(w.parse::<u32>()? as i32) };
        elements.push(match words.as_slice() {
            ["mss", n] => format!("(MSS {n})"),
            ["sackOK"] => "SACK_ok".to_string(),
            ["TS", "val", a, "ecr", b] => format!("(Timestamp {} {})", int32(a)?, int32(b)?),
            ["nop"] => "Noop".to_string(),
            ["wscale", n] => format!("(Window_size_shift {n})"),
            _ => bail!("no rule for the option {opt:?}"),
        });
    }
    elements.reverse();
    let mut out = String::from("(");
    let mut after_atom = false;
    for e in elements {
        let atom = !e.starts_with('(');
        if atom && after_atom {
            out.push(' ');
        }
        out.push_str(&e);
        after_atom = atom;
    }
    out.push(')');
    Ok(out)
}

fn scenario() -> Result<()> {
    require_root();
    for (t, p) in [
        ("xenstore-ls", "xenstore-utils"),
        ("xenstore-read", "xenstore-utils"),
        ("xenstore-chmod", "xenstore-utils"),
        ("xenstore-write", "xenstore-utils"),
        ("xenstore-list", "xenstore-utils"),
        ("xenstore-rm", "xenstore-utils"),
        ("curl", "curl"),
        ("tcpdump", "tcpdump"),
    ] {
        require_tool(t, p);
    }
    let dir = Scratch::new("syx")?;
    let xs = TestXenstored::start(&dir.join("xenstored.sock"))?;
    // What an earlier run (or the original Synjitsu's set-up) left behind.
    xs.write("/ip/10-77-1-99/80/10-77-1-2/1234/syn/tx_wnd", b"1");
    xs.write("/ip/10-77-1-10", b"managed");
    run(Command::new("xenstore-chmod")
        .env("XENSTORED_PATH", xs.path())
        .args(["/ip", "b0"]))?;

    let xs_path = xs.path().display().to_string();
    let mut synjitsu =
        SynjitsuHost::start("syx", &["--xenstore", &xs_path, "--hold-timeout", "60s"])?;
    wait_until("stale entries removed", Duration::from_secs(10), || {
        (xs.read("/ip/10-77-1-99").is_none() && xs.read("/ip/10-77-1-10").is_none()).then_some(())
    })?;
    ensure!(
        xs.perms("/ip") == Some(vec![Perm::new(Access::None, 0)]),
        "/ip must be dom0's only, not writable by every domain: {:?}",
        xs.perms("/ip")
    );

    // Checksum offload stays on: the captured SYN's checksum is partial.
    let client = synjitsu
        .host
        .join("cli", Some(CLIENT_MAC), &["10.77.1.2/24"], true)?;
    client.ns.sh(&format!(
        "ip neigh replace 10.77.1.10 lladdr {VM_MAC} dev eth0 nud permanent"
    ))?;
    let mut ctl = ControlClient::connect(&synjitsu.control)?;
    ctl.sync(&[])?;
    ctl.ok(ClientMessage::Booting {
        vm: www(Handover::Xenstore { domid: 7 }),
    })?;
    synjitsu.wait_steered(VM_MAC)?;
    // The guest's node is there from the boot on, before any SYN, its domain's and dom0's
    // only: the stale `managed` is gone.
    let ip_path = "/ip/10-77-1-10";
    let d7_perms = [Perm::new(Access::None, 0), Perm::new(Access::Both, 7)];
    wait_guest_node(&xs, ip_path, &d7_perms)?;
    let (d7, d8) = (xs.domain_socket(7)?, xs.domain_socket(8)?);

    let capture = Capture::start(&client.ns, "eth0", dir.path(), "cli")?;
    // No guest comes up: curl gives up; its SYN stays in Xenstore for the guest.
    let knock = Curl::get("http://10.77.1.10/").connect_timeout(Duration::from_secs(1));
    let _ = knock.run(&client.ns)?;
    ctl.wait_event(Duration::from_secs(10), "xenstore handover", |e| {
        *e == Event::Handover {
            name: "www".into(),
            count: 1,
            via: HandoverVia::Xenstore,
        }
    })?;
    let lines = capture.finish()?;
    let (port, isn, options) = client_syn(&lines).context("the client's SYN in the capture")?;

    let key = SynKey {
        local_ip: "10.77.1.10".parse()?,
        local_port: 80,
        dest_ip: "10.77.1.2".parse()?,
        dest_port: port,
    };
    let tree = xenstore_ls(&xs, "/ip")?;
    println!("xenstore-ls -p -f /ip:");
    for (p, (v, perms)) in &tree {
        println!("  {p} = {v:?} ({perms})");
    }
    let guest_only = "n0,b7";
    ensure!(
        tree.get(ip_path) == Some(&(String::new(), guest_only.into())),
        "the stale `managed` is gone and the guest's subtree is its own: {tree:?}"
    );
    ensure!(
        !tree.keys().any(|p| p.starts_with("/ip/10-77-1-99")),
        "stale entry kept"
    );
    for (p, (_, perms)) in &tree {
        ensure!(
            perms == guest_only,
            "{p} has permissions ({perms}), not ({guest_only})"
        );
    }
    let conn = key.conn_path();
    let leaves: Vec<&str> = tree
        .keys()
        .filter_map(|p| p.strip_prefix(&format!("{conn}/syn/")))
        .collect();
    let mut want = synjitsu::store::layout::LEAVES.to_vec();
    want.sort_unstable();
    ensure!(leaves == want, "leaves of {conn}/syn: {leaves:?}");
    ensure!(
        tree.keys().filter(|p| p.ends_with("/syn")).count() == 1,
        "exactly one SYN written (retransmits are not written twice): {tree:?}"
    );

    // Another domain gets nothing: not the node, not a leaf, not a node of its own beside it.
    for p in [ip_path.to_string(), key.leaf_path("tx_isn")] {
        ensure!(
            xs_at(&d8, "xenstore-read", &[&p]).is_none(),
            "domain 8 read {p}"
        );
        ensure!(
            xs_at(&d8, "xenstore-list", &[&p]).is_none(),
            "domain 8 listed {p}"
        );
    }
    ensure!(
        xs_at(&d8, "xenstore-write", &[ip_path, "managed"]).is_none()
            && xs_at(&d8, "xenstore-write", &["/ip/10-77-1-11", "managed"]).is_none()
            && xs_at(&d8, "xenstore-rm", &[&conn]).is_none(),
        "domain 8 wrote or removed something"
    );
    ensure!(xs.read(ip_path).as_deref() == Some(b"") && xs.read("/ip/10-77-1-11").is_none());

    // The guest takes over after a SYN was held: it reads the leaves and removes the entry.
    let taken = guest_takes_over(&d7, ip_path)?;
    ensure!(
        taken.len() == 1 && taken[0].0 == conn,
        "the guest found {:?}, not {conn}",
        taken.iter().map(|t| &t.0).collect::<Vec<_>>()
    );
    let read = &taken[0].1;
    let syn = HeldSyn::from_leaves(|leaf| read.get(leaf).cloned())?;
    println!("held SYN as the guest read it: {syn:?}");
    ensure!(
        syn.sequence == isn,
        "ISN {} in Xenstore, {isn} on the wire",
        syn.sequence
    );
    ensure!(syn.tx_wnd == 64240, "window {}", syn.tx_wnd);
    let want = original_options_leaf(&options)?;
    ensure!(
        read["options"] == want,
        "options leaf {:?}, the original would write {want:?} for [{options}]",
        read["options"]
    );
    ensure!(
        syn.options.contains(&TcpOption::Mss(1460)),
        "{:?}",
        syn.options
    );
    ensure!(
        syn.options.contains(&TcpOption::SackOk),
        "{:?}",
        syn.options
    );
    ensure!(
        syn.options
            .iter()
            .any(|o| matches!(o, TcpOption::Timestamp(_, 0))),
        "{:?}",
        syn.options
    );
    ensure!(
        (TX_ISN_BASE..TX_ISN_BASE + 65535).contains(&syn.tx_isn),
        "tx_isn {:#x}",
        syn.tx_isn
    );
    ensure!((syn.rx_wnd, syn.rx_wnd_scaleoffer) == (65535, 2));
    ensure!(synjitsu.metric("synjitsu_checksums_completed_total")? >= 1.0);
    ensure!(xs.read(&conn).is_none(), "the guest's rm left {conn}");
    ensure!(xs.read(ip_path).as_deref() == Some(&b"managed"[..]));

    // The guest took over: nothing more is written. (Another knock, until the `n`th write
    // skipped for `managed`.)
    let knock_skipped = |n: f64| -> Result<()> {
        let _ = knock.run(&client.ns)?;
        wait_until(
            &format!("write {n} skipped for `managed`"),
            Duration::from_secs(10),
            || {
                (synjitsu
                    .metric("synjitsu_xenstore_skipped_managed_total")
                    .ok()?
                    >= n)
                    .then_some(())
            },
        )
    };
    knock_skipped(1.0)?;
    let after = xenstore_ls(&xs, "/ip")?;
    ensure!(
        !after.keys().any(|p| p.ends_with("/syn")),
        "a SYN was written after `managed`: {after:?}"
    );
    ensure!(synjitsu.metric("synjitsu_xenstore_writes_total")? == 1.0);

    // The guest is up: what is held goes on the wire, and the VM is stopped.
    ctl.ok(ClientMessage::Ready { name: "www".into() })?;
    wait_until("nothing held", Duration::from_secs(10), || {
        (synjitsu.metric("synjitsu_held_syns").ok()? == 0.0).then_some(())
    })?;
    ctl.ok(ClientMessage::Stopped {
        vm: www(Handover::Xenstore { domid: 7 }),
    })?;
    // The node stays while the VM is declared, empty and dom0's alone: domain 7 is gone, and
    // its id may go to another guest before this VM boots again.
    wait_guest_node(&xs, ip_path, &[Perm::new(Access::None, 0)])?;
    ensure!(
        xs_at(&d7, "xenstore-read", &[ip_path]).is_none(),
        "the stopped domain's id still reads the node"
    );

    // Its next boot is a new domain: the node is reset and that domain's, and the guest
    // takes over before any SYN is held.
    ctl.ok(ClientMessage::Booting {
        vm: www(Handover::Xenstore { domid: 9 }),
    })?;
    let d9_perms = [Perm::new(Access::None, 0), Perm::new(Access::Both, 9)];
    wait_guest_node(&xs, ip_path, &d9_perms)?;
    ensure!(
        xs_at(&d7, "xenstore-read", &[ip_path]).is_none(),
        "the old domain still reads the new boot's node"
    );
    let d9 = xs.domain_socket(9)?;
    let taken = guest_takes_over(&d9, ip_path)?;
    ensure!(
        taken.is_empty(),
        "nothing was held, the guest found {taken:?}"
    );
    ensure!(xs.read(ip_path).as_deref() == Some(&b"managed"[..]));
    knock_skipped(2.0)?;
    ensure!(synjitsu.metric("synjitsu_xenstore_writes_total")? == 1.0);

    // Forgotten (a sync without it): its node goes.
    ctl.sync(&[])?;
    wait_until(
        "the forgotten VM's node removed",
        Duration::from_secs(10),
        || xs.read(ip_path).is_none().then_some(()),
    )?;
    ensure!(xs.perms("/ip") == Some(vec![Perm::new(Access::None, 0)]));

    let code = synjitsu.stop()?;
    if code != Some(0) {
        bail!("synjitsu exited with {code:?}:\n{}", synjitsu.daemon.log());
    }
    Ok(())
}

#[test]
fn held_syns_are_written_in_the_original_layout_for_the_guest_to_take_over() {
    scenario().unwrap();
}
