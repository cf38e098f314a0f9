//! `rumprun_config`: jitsu-dns writes the file's whole content to
//! `/local/domain/<domid>/rumprun/cfg` before the domain runs, as Jitsu did, into the tests'
//! xenstored (`XENSTORED_PATH`), where Debian's `xenstore-read` reads it back.
//!
//! - libvirt's test driver (inside jitsu-dns, which gives domain ids): the value at the
//!   domain's id is the file, byte for byte; it was written once, by dom0, after libvirt
//!   reported the domain paused and before it reported it resumed (the test xenstored holds
//!   its answer while the test looks); a write xenstored refuses fails the boot, saying so, and
//!   the paused domain is destroyed (Jitsu left it behind); a missing file is refused at start
//!   (Jitsu ignored it).
//! - a real libvirtd and QEMU: `virsh domstate` says `paused` at the moment of the write, and
//!   the domain runs after it.

use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use jitsu_tests::jitsu_dns::{DnsHarness, store_log};
use jitsu_tests::libvirt::{GuestImage, GuestVm, Libvirtd, URI};
use jitsu_tests::xenstored::{self, Change, TestXenstored};
use jitsu_tests::{bin_path, require_root, require_tool, unique, wait_until};
use synjitsu::store::xs_wire::XsType;

const LONG: Duration = Duration::from_secs(60);

/// The changes the hook saw, each with what the test noted at that moment.
type Seen<T> = Arc<Mutex<Vec<(Change, T)>>>;

/// rumprun's JSON as a person writes it: several lines, quotes, a final newline, non-ASCII.
const CFG: &str = "{\n  \"net\": {\"if\": \"vioif0\", \"type\": \"inet\", \"method\": \"static\",\n    \"addr\": \"10.77.0.30\", \"mask\": \"24\"},\n  \"cmdline\": \"nginx -c /data/conf/nginx.conf\",\n  \"hostname\": \"caf\u{e9}\"\n}\n";

/// The test driver's node: no domain; jitsu-dns defines them from the VMs' keys.
const NODE: &str = "<node></node>\n";

fn tools() {
    require_root();
    require_tool("dig", "dnsutils");
    require_tool("git", "git");
    require_tool("xenstore-read", "xenstore-utils");
}

/// `xenstore-read -R` (raw: the value's bytes, not escaped, no newline added) at `socket`.
fn xenstore_read_raw(socket: &std::path::Path, path: &str) -> Option<String> {
    xenstored::tool(socket, "xenstore-read", &["-R", path])
}

/// jitsu-dns's lifecycle events for `vm` in its (debug) log, in order: `started`,
/// `suspended`, `resumed`, `stopped`...
fn events(log: &str, vm: &str) -> Vec<String> {
    log.lines()
        .filter(|l| l.contains("libvirt lifecycle event") && l.contains(&format!("vm={vm} ")))
        .filter_map(|l| l.split("event=").nth(1)?.split_whitespace().next())
        .map(|e| e.trim_matches('"'))
        // State changes only (not `defined`).
        .filter(|e| ["started", "suspended", "resumed", "stopped"].contains(e))
        .map(str::to_string)
        .collect()
}

#[test]
fn the_test_drivers_domain_gets_its_rumprun_config_while_paused() {
    tools();
    let mut h = DnsHarness::new("lvr").unwrap();
    let node = h.host.file("node.xml");
    std::fs::write(&node, NODE).unwrap();
    let cfg = h.host.file("nginx.json");
    std::fs::write(&cfg, CFG).unwrap();
    let xs = TestXenstored::start(&h.host.file("xenstored.sock")).unwrap();
    let spec = |name: &str, last: u8| {
        format!(
            "name={name},dns={name}.example.org,ip=10.77.0.{last},kernel=/boot/{name}.bin,\
             response_delay=0,rumprun_config={}",
            cfg.display()
        )
    };
    let args = h.backend_args(
        &format!("test://{}", node.display()),
        &["-x", "libvirt", "-t", "60", &spec("rump", 30)],
    );

    h.start(
        &args,
        &[("XENSTORED_PATH", xs.path().display().to_string())],
    )
    .unwrap();
    // Each write of a configuration, with the events jitsu-dns had seen when it arrived. The
    // hook runs before xenstored answers: the backend waits, nothing can resume the domain.
    let seen: Seen<Vec<String>> = Arc::default();
    let record = seen.clone();
    let log_at_write = h.daemon.as_ref().unwrap().log_path().to_path_buf();
    xs.on_change(move |c| {
        if !c.path.ends_with("/rumprun/cfg") {
            return;
        }
        // The pause is reported by libvirt's event loop: wait for it (well within the 5 s
        // jitsu-dns gives the write; the domain cannot move on while it is unanswered).
        let evs = wait_until("the paused event", Duration::from_secs(3), || {
            let log = std::fs::read_to_string(&log_at_write).ok()?;
            let evs = events(&log, "rump");
            evs.contains(&"suspended".to_string()).then_some(evs)
        })
        .unwrap_or_default();
        record.lock().unwrap().push((c.clone(), evs));
    });
    let d = h.dig(&["rump.example.org", "A"]);
    assert_eq!(d.addresses(), vec!["10.77.0.30"], "{}", d.text);
    h.wait_state("rump", "running", LONG);
    let domid: u32 = h.stored("rump", "domid").unwrap().parse().unwrap();
    let node_path = format!("/local/domain/{domid}/rumprun/cfg");

    let seen = seen.lock().unwrap().clone();
    assert_eq!(seen.len(), 1, "{seen:?}\n{}", h.log());
    let (write, evs_then) = &seen[0];
    assert_eq!(
        (write.domid, write.ty, write.tx_id, write.path.as_str()),
        (0, XsType::Write, 0, node_path.as_str())
    );
    assert_eq!(
        evs_then,
        &["started", "suspended"],
        "at the write:\n{}",
        h.log()
    );
    // Byte for byte, as a real client reads it.
    assert_eq!(
        xenstore_read_raw(xs.path(), &node_path).as_deref(),
        Some(CFG)
    );
    wait_until("the resumed event", LONG, || {
        let evs = events(&h.log(), "rump");
        (evs.len() >= 3).then_some(())
    })
    .unwrap();
    assert_eq!(
        events(&h.log(), "rump")[..3],
        ["started", "suspended", "resumed"]
    );
    assert_eq!(h.stop().unwrap(), Some(0));

    // A xenstored that refuses the write (here: jitsu-dns connected as an unprivileged
    // domain, which may not write under /local/domain): the boot fails saying why, and the
    // paused domain is destroyed.
    let d5 = xs.domain_socket(5).unwrap();
    let args = h.backend_args(
        &format!("test://{}", node.display()),
        &["-x", "libvirt", &spec("refused", 31)],
    );
    h.start(&args, &[("XENSTORED_PATH", d5.display().to_string())])
        .unwrap();
    let d = h.dig(&["refused.example.org", "A"]);
    assert_eq!(d.status, "SERVFAIL", "{}", d.text);
    h.wait_state("refused", "failed", LONG);
    let log = store_log(&h.db());
    assert!(
        log.iter().any(|m| m.contains("refused: booting -> failed")
            && m.contains("writing rumprun's configuration to /local/domain/")
            && m.contains("EACCES")
            && m.contains("the paused domain was destroyed")),
        "{log:?}"
    );
    wait_until("the destroyed domain's event", LONG, || {
        let evs = events(&h.log(), "refused");
        evs.contains(&"stopped".to_string()).then_some(())
    })
    .unwrap();
    assert_eq!(
        events(&h.log(), "refused")[..3],
        ["started", "suspended", "stopped"],
        "{}",
        h.log()
    );
    assert_eq!(h.stop().unwrap(), Some(0));

    // A missing file is refused at start, naming the key and the file.
    let missing = h.host.file("missing.json");
    let out = Command::new(bin_path("jitsu-dns"))
        .args([
            "-x",
            "libvirt",
            "-c",
            "test:///default",
            &format!(
                "name=gone,dns=gone.example.org,ip=10.77.0.32,kernel=/boot/k,rumprun_config={}",
                missing.display()
            ),
        ])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.contains("rumprun_config = ")
            && err.contains(&missing.display().to_string())
            && err.contains("No such file"),
        "{err}"
    );
}

#[test]
fn a_qemu_domain_is_paused_while_its_rumprun_config_is_written() {
    tools();
    require_tool("virsh", "libvirt-clients");
    let image = GuestImage::build().unwrap();
    let mut h = DnsHarness::new("lvq").unwrap();
    let _lv = Libvirtd::start(&h.host).unwrap();
    let cfg = h.host.file("nginx.json");
    std::fs::write(&cfg, CFG).unwrap();
    let xs = TestXenstored::start(&h.host.file("xenstored.sock")).unwrap();
    let name = unique("jt-rump");
    let g = GuestVm::new(
        &name,
        "rump.example.org",
        "10.77.0.30".parse().unwrap(),
        24,
        "02:77:00:00:00:30",
    )
    .keys(&format!(
        "response_delay=0,rumprun_config={}",
        cfg.display()
    ));

    // libvirtd is shared: what virsh says at the moment of the write is the domain's state
    // then (the hook runs before xenstored answers; the backend waits for that answer).
    let seen: Seen<String> = Arc::default();
    let record = seen.clone();
    let dom = name.clone();
    xs.on_change(move |c| {
        if c.path.ends_with("/rumprun/cfg") {
            let out = Command::new("virsh")
                .args(["-c", URI, "domstate", "--reason", &dom])
                .output()
                .unwrap();
            let state = String::from_utf8_lossy(&out.stdout).trim().to_string();
            record.lock().unwrap().push((c.clone(), state));
        }
    });
    let args = h.backend_args(URI, &["-x", "libvirt", "-t", "60", &g.spec(&image)]);
    h.start(
        &args,
        &[("XENSTORED_PATH", xs.path().display().to_string())],
    )
    .unwrap();
    let d = h.dig(&["+time=60", "rump.example.org", "A"]);
    assert_eq!(d.addresses(), vec!["10.77.0.30"], "{}", d.text);
    h.wait_state(&name, "running", Duration::from_secs(120));

    let virsh = |args: &[&str]| {
        let out = Command::new("virsh")
            .args(["-c", URI])
            .args(args)
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    };
    let domid = virsh(&["domid", &name]);
    let node_path = format!("/local/domain/{domid}/rumprun/cfg");
    let seen = seen.lock().unwrap().clone();
    assert_eq!(seen.len(), 1, "{seen:?}");
    let (write, state) = &seen[0];
    assert_eq!((write.domid, write.path.as_str()), (0, node_path.as_str()));
    assert!(state.starts_with("paused"), "state at the write: {state}");
    assert_eq!(virsh(&["domstate", &name]), "running");
    assert_eq!(
        xenstore_read_raw(xs.path(), &node_path).as_deref(),
        Some(CFG)
    );
    assert_eq!(h.stop().unwrap(), Some(0));
}
