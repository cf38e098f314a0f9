//! Operating a running jitsu-dns (issue 14): `jitsu-dns ctl` on its control socket, the
//! per-VM policies (pin, drain, idle_timeout, max_boot_attempts) and the status page in a
//! real headless browser, all through the real daemon with the process backend in network
//! namespaces.

use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use jitsu_tests::jitsu_dns::{DnsHarness, assert_history};
use jitsu_tests::{bin_path, require_root, require_tool, wait_until};

const LONG: Duration = Duration::from_secs(60);

fn prerequisites() {
    require_root();
    require_tool("dig", "dnsutils");
    require_tool("git", "git");
    require_tool("setsid", "util-linux");
}

/// What one `jitsu-dns ctl` run printed, and its exit code.
#[derive(Debug)]
struct Ctl {
    code: i32,
    out: String,
    err: String,
}

/// `jitsu-dns ctl --control <socket> <args>`, as `uid` (and its group) if given.
fn ctl_as(socket: &Path, uid: Option<u32>, args: &[&str]) -> Ctl {
    let mut cmd = Command::new(bin_path("jitsu-dns"));
    cmd.arg("ctl").arg("--control").arg(socket).args(args);
    if let Some(uid) = uid {
        cmd.uid(uid).gid(uid);
    }
    let o = cmd.output().expect("jitsu-dns ctl runs");
    Ctl {
        code: o.status.code().unwrap_or(-1),
        out: String::from_utf8_lossy(&o.stdout).into_owned(),
        err: String::from_utf8_lossy(&o.stderr).into_owned(),
    }
}

fn ctl(h: &DnsHarness, args: &[&str]) -> Ctl {
    ctl_as(&h.control(), None, args)
}

/// `ctl` that must succeed; its output.
fn ok(h: &DnsHarness, args: &[&str]) -> String {
    let c = ctl(h, args);
    assert_eq!(
        c.code,
        0,
        "ctl {args:?}: {c:?}\njitsu-dns log:\n{}",
        h.log()
    );
    c.out
}

/// A VM on br0 at 10.77.0.`n` that appends its pid to `boots-<name>` at each boot, masked
/// by 0.2 s unless `extra` says otherwise.
fn vm_table(h: &DnsHarness, name: &str, n: u8, extra: &str) -> String {
    let delay = if extra.contains("response_delay") {
        ""
    } else {
        "response_delay = 0.2\n"
    };
    format!(
        "[[vm]]\nname = \"{name}\"\ndns = [\"{name}.example.org\"]\nip = \"10.77.0.{n}/24\"\n\
         {delay}command = \"echo $$ >> {}; exec sleep 600\"\n{extra}\n",
        h.host.file(&format!("boots-{name}")).display()
    )
}

fn boots(h: &DnsHarness, vm: &str) -> usize {
    std::fs::read_to_string(h.host.file(&format!("boots-{vm}")))
        .unwrap_or_default()
        .lines()
        .count()
}

/// The VM's row of `ctl list --json`.
fn row(h: &DnsHarness, vm: &str) -> serde_json::Value {
    let rows: serde_json::Value = serde_json::from_str(&ok(h, &["list", "--json"])).unwrap();
    rows.as_array()
        .unwrap()
        .iter()
        .find(|r| r["name"] == vm)
        .cloned()
        .unwrap_or_else(|| panic!("{vm} not listed: {rows}"))
}

fn wait_state(h: &DnsHarness, vm: &str, state: &str) {
    wait_until(&format!("{vm} {state} in ctl list"), LONG, || {
        (row(h, vm)["state"] == state).then_some(())
    })
    .unwrap_or_else(|e| panic!("{e}\njitsu-dns log:\n{}", h.log()));
}

#[test]
fn every_ctl_command_acts_refuses_what_it_must_and_each_action_is_a_commit_with_the_uid() {
    prerequisites();
    let mut h = DnsHarness::new("dctl").unwrap();
    let file = h.host.file("jitsu.toml");
    let config = [
        vm_table(&h, "www", 1, ""),
        vm_table(&h, "db", 2, "drained = \"nxdomain\""),
        vm_table(&h, "tmp", 3, "idle_timeout = 1"),
    ]
    .concat();
    std::fs::write(&file, &config).unwrap();
    let args = h.args(None, &["--config", &file.display().to_string()]);
    h.start(&args, &[]).unwrap();

    // list: a table with a header, and its JSON.
    let list = ok(&h, &["list"]);
    let lines: Vec<&str> = list.lines().collect();
    assert!(lines[0].starts_with("NAME  STATE  ADDRESSES"), "{list}");
    assert!(
        lines
            .iter()
            .any(|l| l.starts_with("www   off    10.77.0.1")),
        "{list}"
    );
    assert_eq!(row(&h, "db")["addresses"][0], "10.77.0.2");
    assert_eq!(row(&h, "www")["masking"], "delay 0.2 s");

    // Unknown VMs: exit 3, for every command that names one.
    for cmd in [
        "show", "start", "stop", "restart", "pin", "unpin", "drain", "undrain",
    ] {
        let c = ctl(&h, &[cmd, "nope"]);
        assert_eq!(c.code, 3, "{cmd}: {c:?}");
        assert!(c.err.contains("no VM named \"nope\""), "{cmd}: {c:?}");
    }
    // Usage: exit 2.
    assert_eq!(ctl(&h, &["stop", "www", "--mode", "pause"]).code, 2);
    assert_eq!(ctl(&h, &["frobnicate"]).code, 2);
    let c = ctl(&h, &["show", "nope", "--json"]);
    let e: serde_json::Value = serde_json::from_str(&c.out).unwrap();
    assert_eq!(e["error"]["kind"], "unknown_vm", "{c:?}");

    // start: pre-warms, returns once it is answered; a query is then answered at once.
    assert_eq!(ok(&h, &["start", "www"]), "www is running\n");
    assert_eq!(boots(&h, "www"), 1);
    assert_eq!(h.dig(&["www.example.org"]).addresses(), vec!["10.77.0.1"]);
    assert_eq!(ok(&h, &["start", "www"]), "www is running\n");
    assert_eq!(boots(&h, "www"), 1, "started once");
    let show = ok(&h, &["show", "www"]);
    assert!(show.contains("state:             running"), "{show}");
    assert!(
        show.contains("off -> booting (ctl start by uid 0)"),
        "{show}"
    );
    assert!(
        show.contains("dns:               www.example.org"),
        "{show}"
    );

    // stop in a mode; start resumes it; restart boots it afresh.
    assert_eq!(
        ok(&h, &["stop", "www", "--mode", "suspend"]),
        "www is suspended\n"
    );
    assert_eq!(row(&h, "www")["state"], "suspended");
    assert_eq!(ok(&h, &["start", "www"]), "www is running\n");
    assert_eq!(boots(&h, "www"), 1, "resumed, not booted");
    assert_eq!(ok(&h, &["restart", "www"]), "www restarted and running\n");
    assert_eq!(boots(&h, "www"), 2);
    assert_eq!(ok(&h, &["stop", "db"]), "db is off\n");

    // drain: queries get the VM's drained answer and boot nothing; undrain boots again.
    assert!(ok(&h, &["drain", "db"]).contains("its queries get NXDOMAIN"));
    let d = h.dig(&["db.example.org"]);
    assert_eq!(d.status, "NXDOMAIN", "{}", d.text);
    assert!(d.authority.iter().any(|r| r.rtype == "SOA"), "{}", d.text);
    let c = ctl(&h, &["start", "db"]);
    assert_eq!(c.code, 1, "a drained VM is not started: {c:?}");
    assert!(c.err.contains("db is drained: undrain it first"), "{c:?}");
    assert_eq!(boots(&h, "db"), 0);
    assert_eq!(ok(&h, &["undrain", "db"]), "db undrained\n");
    assert_eq!(h.dig(&["db.example.org"]).addresses(), vec!["10.77.0.2"]);
    // A running VM drained is stopped once idle (tmp: after 1 s), then SERVFAIL.
    ok(&h, &["start", "tmp"]);
    ok(&h, &["pin", "tmp"]);
    ok(&h, &["drain", "tmp"]);
    wait_state(&h, "tmp", "off");
    assert_eq!(h.dig(&["tmp.example.org"]).status, "SERVFAIL");
    assert_eq!(boots(&h, "tmp"), 1);

    // stop of a booting VM is refused (exit 1): a slow boot is one in flight.
    std::fs::write(
        &file,
        format!("{config}{}", vm_table(&h, "slow", 4, "response_delay = 3")),
    )
    .unwrap();
    let reloaded = ok(&h, &["reload"]);
    assert!(
        reloaded.contains("configuration reloaded: added slow (4 VMs)"),
        "{reloaded}"
    );
    let mut bg = Command::new(bin_path("jitsu-dns"))
        .arg("ctl")
        .arg("--control")
        .arg(h.control())
        .args(["start", "slow"])
        .spawn()
        .unwrap();
    wait_until("slow booting", LONG, || {
        (row(&h, "slow")["state"] == "booting").then_some(())
    })
    .unwrap();
    let c = ctl(&h, &["stop", "slow"]);
    assert_eq!(c.code, 1, "{c:?}");
    assert!(
        c.err.contains("slow is booting: stop it once it runs"),
        "{c:?}"
    );
    assert!(bg.wait().unwrap().success());

    // reload refused: the running configuration is kept, and ctl says why.
    std::fs::write(&file, "ttl = \"soon\"\n").unwrap();
    let c = ctl(&h, &["reload"]);
    assert_eq!(c.code, 1, "{c:?}");
    assert!(c.err.contains("configuration not reloaded"), "{c:?}");
    assert!(c.err.contains("ttl"), "{c:?}");
    assert_eq!(row(&h, "slow")["state"], "running");

    // status: the daemon.
    let status = ok(&h, &["status"]);
    for needle in [
        "backend:         process at process://",
        "synjitsu:        not configured",
        ", healthy, lag",
        "limits:          ttl 60s (idle stop 120s), max_running unlimited",
        "vms:             4 (",
    ] {
        assert!(status.contains(needle), "{needle:?} in {status}");
    }
    let s: serde_json::Value = serde_json::from_str(&ok(&h, &["status", "--json"])).unwrap();
    assert_eq!(s["store_healthy"], true);
    assert_eq!(s["limits"]["ttl_s"], 60);

    // The history names each action and who asked.
    h.stop().unwrap();
    assert_history(
        &h.db(),
        &[
            "www: off -> booting (ctl start by uid 0)",
            "www: running -> stopping (ctl stop by uid 0)",
            "www: suspended -> booting (resume, ctl start by uid 0)",
            "www: running -> stopping (ctl restart by uid 0)",
            "www: off -> booting (ctl restart by uid 0)",
            "db: drained (ctl drain by uid 0)",
            "db: undrained (ctl undrain by uid 0)",
            "tmp: pinned (ctl pin by uid 0)",
            "tmp: running -> stopping (drained, idle for 1 s)",
            "configuration reloaded (ctl reload by uid 0): added slow",
        ],
    );
}

#[test]
fn a_pinned_vm_outlives_idleness_and_a_restart_of_jitsu_dns_until_unpinned() {
    prerequisites();
    let mut h = DnsHarness::new("dpin").unwrap();
    let file = h.host.file("jitsu.toml");
    std::fs::write(
        &file,
        [
            vm_table(&h, "kept", 1, "idle_timeout = 1"),
            vm_table(&h, "other", 2, "idle_timeout = 1"),
        ]
        .concat(),
    )
    .unwrap();
    let args = h.args(None, &["--config", &file.display().to_string()]);
    h.start(&args, &[]).unwrap();
    ok(&h, &["start", "kept"]);
    assert_eq!(ok(&h, &["pin", "kept"]), "kept pinned\n");
    assert_eq!(ok(&h, &["pin", "kept"]), "kept is already pinned\n");
    // `other`, as idle, goes; the pinned one stays.
    ok(&h, &["start", "other"]);
    wait_state(&h, "other", "off");
    assert_eq!(row(&h, "kept")["state"], "running");
    assert!(row(&h, "kept")["idle_s"].as_f64().unwrap() > 1.0);

    // A new jitsu-dns on the same store adopts it, still pinned.
    h.stop().unwrap();
    assert_eq!(h.stored("kept", "ctl/pin").as_deref(), Some("true"));
    h.start(&args, &[]).unwrap();
    let show = ok(&h, &["show", "kept"]);
    assert!(show.contains("pinned:            yes (by ctl)"), "{show}");
    ok(&h, &["start", "other"]);
    wait_state(&h, "other", "off");
    assert_eq!(row(&h, "kept")["state"], "running");
    assert_eq!(boots(&h, "kept"), 1, "adopted, never booted again");

    assert_eq!(ok(&h, &["unpin", "kept"]), "kept unpinned\n");
    wait_state(&h, "kept", "off");
    h.stop().unwrap();
    assert_history(
        &h.db(),
        &[
            "kept: pinned (ctl pin by uid 0)",
            "kept: unpinned (ctl unpin by uid 0)",
            "kept: running -> stopping (idle for 1 s)",
        ],
    );
}

#[test]
fn a_vm_failing_max_boot_attempts_times_waits_its_back_off_before_queries_boot_it_again() {
    prerequisites();
    let mut h = DnsHarness::new("dback").unwrap();
    // No bridge nobr0: every boot fails.
    let spec = "name=bad,dns=bad.example.org,ip=10.77.0.5/24,nic=nobr0,max_boot_attempts=2,\
                boot_backoff=3,command='exec sleep 600'";
    let args = h.args(None, &[spec]);
    h.start(&args, &[]).unwrap();
    for _ in 0..2 {
        assert_eq!(h.dig(&["bad.example.org"]).status, "SERVFAIL");
    }
    assert_eq!(h.stored("bad", "starts").as_deref(), Some("2"));
    // Held back: answered at once, nothing booted.
    let d = h.dig(&["bad.example.org"]);
    assert_eq!(d.status, "SERVFAIL");
    let r = row(&h, "bad");
    assert!(r["backoff_s"].as_f64().is_some_and(|s| s > 0.0), "{r}");
    assert_eq!(r["boots"], 2);
    let show = ok(&h, &["show", "bad"]);
    assert!(show.contains("failed boots:      2 (back-off,"), "{show}");
    assert!(show.contains("last error:"), "{show}");
    // Once it passed, the next query tries again (and fails: a back-off twice as long).
    wait_until("the back-off to pass", LONG, || {
        row(&h, "bad")["backoff_s"].is_null().then_some(())
    })
    .unwrap();
    assert_eq!(h.dig(&["bad.example.org"]).status, "SERVFAIL");
    assert_eq!(row(&h, "bad")["boots"], 3);
    let left = row(&h, "bad")["backoff_s"].as_f64().unwrap();
    assert!(left > 3.0 && left <= 6.0, "doubled: {left}");
    // ctl start goes past it, and says why it failed.
    let c = ctl(&h, &["start", "bad"]);
    assert_eq!(c.code, 1, "{c:?}");
    assert!(c.err.contains("bad: boot failed:"), "{c:?}");
    assert_eq!(row(&h, "bad")["boots"], 4);
}

#[test]
fn the_socket_refuses_other_uids_and_a_stopped_daemon_is_said_so_with_exit_4() {
    prerequisites();
    let mut h = DnsHarness::new("duid").unwrap();
    let spec = "name=www,dns=www.example.org,ip=10.77.0.1/24,command='exec sleep 600'";
    let args = h.args(None, &["--control-allow-uid", "65534", spec]);
    h.start(&args, &[]).unwrap();
    let socket = h.control();
    // The allowed uid may act.
    let c = ctl_as(&socket, Some(65534), &["pin", "www"]);
    assert_eq!(c.code, 0, "{c:?}");
    // Another uid cannot even open the socket (0600, owned by the allowed uid)...
    let c = ctl_as(&socket, Some(65533), &["list"]);
    assert_eq!(c.code, 5, "{c:?}");
    assert!(c.err.contains("permission denied on"), "{c:?}");
    // ...and if someone widens its mode, the peer check still refuses it.
    std::fs::set_permissions(&socket, std::os::unix::fs::PermissionsExt::from_mode(0o666)).unwrap();
    let c = ctl_as(&socket, Some(65533), &["list", "--json"]);
    assert_eq!(c.code, 5, "{c:?}");
    assert!(c.err.contains("permission denied for uid 65533"), "{c:?}");
    let e: serde_json::Value = serde_json::from_str(&c.out).unwrap();
    assert_eq!(e["error"]["kind"], "permission_denied");

    h.stop().unwrap();
    assert_history(&h.db(), &["www: pinned (ctl pin by uid 65534)"]);
    let c = ctl_as(&socket, None, &["status"]);
    assert_eq!(c.code, 4, "{c:?}");
    assert!(c.err.contains("jitsu-dns is not running"), "{c:?}");
}

#[test]
fn the_status_page_renders_in_chromium_with_the_vm_booted_and_its_cold_start() {
    prerequisites();
    require_tool("chromium", "chromium");
    let mut h = DnsHarness::new("dpage").unwrap();
    let spec = "name=www,dns=www.example.org,ip=10.77.0.1/24,response_delay=0.3,\
                command='exec sleep 600'";
    let args = h.args(None, &["--metrics", "127.0.0.1:9153", spec]);
    h.start(&args, &[]).unwrap();
    assert_eq!(h.dig(&["www.example.org"]).addresses(), vec!["10.77.0.1"]);

    let shot = h.host.file("status.png");
    let browse = |extra: &[&str]| {
        let out = h
            .host
            .ns()
            .command("chromium")
            .env("HOME", h.host.dir())
            .args([
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-dev-shm-usage",
                "--window-size=1280,720",
            ])
            .args(extra)
            .arg("http://127.0.0.1:9153/")
            .output()
            .unwrap();
        assert!(out.status.success(), "chromium: {out:?}");
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    // The DOM as chromium built it from the page.
    let dom = browse(&["--dump-dom"]);
    let fleet_row = dom
        .split("<tr id=\"vm-www\">")
        .nth(1)
        .and_then(|r| r.split("</tr>").next())
        .unwrap_or_else(|| panic!("no row for www: {dom}"));
    assert!(
        fleet_row.contains("<td class=\"state-running\">running</td>"),
        "{fleet_row}"
    );
    assert!(fleet_row.contains("10.77.0.1"), "{fleet_row}");
    let cold = dom
        .split("<table id=\"cold-starts\">")
        .nth(1)
        .unwrap_or_else(|| panic!("no cold starts: {dom}"));
    assert!(cold.contains("<td>www</td>"), "{cold}");
    assert!(cold.contains("<svg class=\"bars\""), "{cold}");
    assert!(cold.contains("DNS answer: "), "{cold}");
    assert!(dom.contains("http-equiv=\"refresh\""), "{dom}");
    // And a screenshot in the test's directory.
    browse(&[&format!("--screenshot={}", shot.display())]);
    let png = std::fs::read(&shot).unwrap();
    assert!(png.starts_with(b"\x89PNG\r\n\x1a\n"), "not a PNG");
    assert!(png.len() > 5000, "a blank page? {} bytes", png.len());
    // /metrics is still served beside it.
    let m = jitsu_tests::curl::metrics(h.host.ns(), "127.0.0.1:9153").unwrap();
    assert!(m.contains("jitsu_dns_boots_total 1"), "{m}");
}
