//! jitsu-dns with the process backend in network namespaces: VMs are commands in namespaces
//! of their own on the host namespace's `br0`; real `dig` queries boot them; the store's
//! history is read with plain git.

use std::path::Path;
use std::process::Command;
use std::thread;
use std::time::Duration;

use jitsu_tests::curl::metrics;
use jitsu_tests::jitsu_dns::{
    DnsHarness, assert_history, in_mounts_of, parse_dig, require_dns_tools, store_log, wait_history,
};
use jitsu_tests::{bin_path, require_tool, wait_until};

const LONG: Duration = Duration::from_secs(60);

fn prerequisites() {
    require_dns_tools();
}

/// Lines of the file the VM command appends its pid to at every boot.
fn boots(path: &Path) -> Vec<u32> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(|l| l.trim().parse().unwrap())
        .collect()
}

/// True if `pid` runs (a zombie does not).
fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| s.rsplit(')').next().map(|r| r.trim().chars().next()))
        .flatten()
        .is_some_and(|state| state != 'Z' && state != 'X')
}

fn www(h: &DnsHarness, extra: &str) -> String {
    let boots = h.host.file("boots");
    format!(
        "name=www,dns=www.example.org,ip=10.77.0.1/24,response_delay=0.2{extra},\
         command='echo $$ >> {}; exec sleep 600'",
        boots.display()
    )
}

fn count(log: &[String], what: &str) -> usize {
    log.iter().filter(|l| l.contains(what)).count()
}

#[test]
fn fifty_parallel_queries_boot_once_and_the_idle_vm_stops_after_twice_the_ttl() {
    prerequisites();
    // kdig, not dig: under load dig 9.18 now and then reports a timeout for an answer that
    // a capture shows on the wire within a second (measured: 2 of 3250 cold-start queries
    // with two CPU hogs running; kdig: 0 of 2000).
    require_tool("kdig", "knot-dnsutils");
    let mut h = DnsHarness::new("dboot").unwrap();
    let args = h.args(None, &["-t", "1", &www(&h, "")]);
    h.start(&args, &[]).unwrap();

    let host = h.host.ns().name().to_string();
    let clients: Vec<_> = (0..50)
        .map(|_| {
            let host = host.clone();
            thread::spawn(move || {
                let started = std::time::Instant::now();
                let out = Command::new("ip")
                    .args([
                        "netns",
                        "exec",
                        &host,
                        "kdig",
                        "+timeout=20",
                        "+retry=0",
                        "@127.0.0.1",
                        "www.example.org",
                        "A",
                    ])
                    .output()
                    .unwrap();
                let why = format!(
                    "kdig exited {} after {:?}, stderr: {}",
                    out.status,
                    started.elapsed(),
                    String::from_utf8_lossy(&out.stderr)
                );
                (parse_dig(&String::from_utf8_lossy(&out.stdout)), why)
            })
        })
        .collect();
    for c in clients {
        let (d, why) = c.join().unwrap();
        assert_eq!(
            d.status,
            "NOERROR",
            "{why}\n{}\njitsu-dns log:\n{}",
            d.text,
            h.log()
        );
        assert_eq!(d.addresses(), vec!["10.77.0.1"], "{}", d.text);
        assert!(d.aa());
    }
    // Booted once: the VM's own record of its starts, the store's counter, the history.
    h.wait_state("www", "running", LONG);
    let pids = boots(&h.host.file("boots"));
    assert_eq!(pids.len(), 1, "the command ran once: {pids:?}");
    assert!(alive(pids[0]));
    assert_eq!(h.stored("www", "starts").as_deref(), Some("1"));
    let log = store_log(&h.db());
    assert_eq!(count(&log, "www: off -> booting"), 1, "{log:?}");
    // The VM is really on the bridge, with its address.
    h.host.ns().sh("ping -c1 -W2 10.77.0.1").unwrap();

    // No more queries: stopped after 2 x TTL (TTL 1 s), in the default mode, destroy.
    h.wait_state("www", "off", LONG);
    assert_history(
        &h.db(),
        &[
            "www: running -> stopping (idle for 2 s)",
            "www: stopping -> off (stopped (destroy))",
        ],
    );
    wait_until("the VM's process to be gone", LONG, || {
        (!alive(pids[0])).then_some(())
    })
    .unwrap();
    assert!(
        !Path::new("/run/netns").join(h.vms.netns("www")).exists(),
        "namespace removed"
    );
    assert_eq!(
        h.stored("www", "requests").as_deref(),
        Some("50"),
        "every query counted"
    );
    // The stop came no sooner than 2 s after the last query (commit times are whole seconds).
    let last_request: f64 = h.stored("www", "last_request").unwrap().parse().unwrap();
    let out = Command::new("git")
        .arg("-C")
        .arg(h.db())
        .args(["log", "--format=%ct %s"])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let stopped_at: f64 = text
        .lines()
        .find(|l| l.contains("running -> stopping"))
        .and_then(|l| l.split(' ').next()?.parse().ok())
        .unwrap();
    assert!(
        stopped_at + 1.0 > last_request + 2.0,
        "stopped at {stopped_at}, last query {last_request}"
    );
    // The next query boots it again.
    let again = h.dig(&["www.example.org", "A"]);
    assert_eq!(again.addresses(), vec!["10.77.0.1"]);
    assert_eq!(boots(&h.host.file("boots")).len(), 2);
}

#[test]
fn a_restarted_jitsu_dns_adopts_the_running_vm_and_never_boots_it_twice() {
    prerequisites();
    let mut h = DnsHarness::new("dadopt").unwrap();
    let args = h.args(None, &["-t", "60", &www(&h, "")]);
    h.start(&args, &[]).unwrap();
    assert_eq!(
        h.dig(&["www.example.org", "A"]).addresses(),
        vec!["10.77.0.1"]
    );
    let pids = boots(&h.host.file("boots"));
    assert_eq!(pids.len(), 1);
    assert_eq!(h.stop().unwrap(), Some(0));
    assert!(alive(pids[0]), "SIGTERM leaves the VMs running");

    h.start(&args, &[]).unwrap();
    let d = h.dig(&["www.example.org", "A"]);
    assert_eq!(d.addresses(), vec!["10.77.0.1"], "{}", d.text);
    assert_eq!(
        boots(&h.host.file("boots")),
        pids,
        "adopted, not booted again"
    );
    assert_eq!(h.stored("www", "starts").as_deref(), Some("1"));
    let log = wait_history(&h.db(), "www: running (adopted: already running)", LONG).unwrap();
    assert_eq!(count(&log, "www: off -> booting"), 1, "{log:?}");

    // The state views a person uses.
    let jitsu = bin_path("jitsu-dns");
    let db = h.db();
    let tree = Command::new(&jitsu)
        .args(["state", "tree", "--persistdb", db.to_str().unwrap()])
        .output()
        .unwrap();
    let tree = String::from_utf8_lossy(&tree.stdout);
    let state_line = tree
        .lines()
        .find(|l| l.starts_with("/jitsu/vm/www/state."))
        .unwrap_or_else(|| panic!("{tree}"));
    assert!(state_line.ends_with("...running"), "{state_line}");
    assert!(
        tree.lines()
            .any(|l| l.starts_with("/jitsu/vm/www/ip.") && l.ends_with("10.77.0.1")),
        "{tree}"
    );
    assert!(
        tree.lines()
            .any(|l| l.starts_with("/jitsu/vm/www/dns/www.example.org.") && l.ends_with(".60")),
        "{tree}"
    );
    let hist = Command::new(&jitsu)
        .args(["state", "log", "--persistdb", db.to_str().unwrap()])
        .output()
        .unwrap();
    let hist = String::from_utf8_lossy(&hist.stdout);
    assert!(
        hist.lines()
            .next()
            .is_some_and(|l| l.contains("www: running (adopted: already running)")),
        "{hist}"
    );
}

fn suspend_and_resume(cgroup: &str) {
    prerequisites();
    let mut h = DnsHarness::new(&format!("dsus{cgroup}")).unwrap();
    let args = h.args(Some(cgroup), &["-t", "1", &www(&h, ",stop_mode=suspend")]);
    h.start(&args, &[]).unwrap();
    assert_eq!(
        h.dig(&["www.example.org", "A"]).addresses(),
        vec!["10.77.0.1"]
    );
    let pids = boots(&h.host.file("boots"));
    h.wait_state("www", "suspended", LONG);
    let cg = h.vms.cgroup(cgroup, "www");
    let frozen = || match cgroup {
        "v1" => {
            std::fs::read_to_string(cg.join("freezer.state"))
                .unwrap()
                .trim()
                == "FROZEN"
        }
        _ => std::fs::read_to_string(cg.join("cgroup.events"))
            .unwrap()
            .lines()
            .any(|l| l == "frozen 1"),
    };
    assert!(frozen(), "{} is frozen", cg.display());
    assert!(alive(pids[0]), "suspended, not killed");
    let procs = std::fs::read_to_string(cg.join("cgroup.procs")).unwrap();
    assert!(
        procs.split_whitespace().any(|p| p == pids[0].to_string()),
        "the VM is in its cgroup"
    );

    let d = h.dig(&["www.example.org", "A"]);
    assert_eq!(d.addresses(), vec!["10.77.0.1"], "{}", d.text);
    h.wait_state("www", "running", LONG);
    assert!(!frozen(), "thawed");
    assert_eq!(boots(&h.host.file("boots")), pids, "resumed, not booted");
    assert_history(
        &h.db(),
        &[
            "www: running -> stopping (idle for 2 s)",
            "www: stopping -> suspended (stopped (suspend))",
            "www: suspended -> booting (resume, query from 127.0.0.1)",
            "www: booting -> running (resumed)",
        ],
    );
}

#[test]
fn suspend_freezes_the_vm_and_the_next_query_resumes_it_cgroup_v1() {
    suspend_and_resume("v1");
}

#[test]
fn suspend_freezes_the_vm_and_the_next_query_resumes_it_cgroup_v2() {
    suspend_and_resume("v2");
}

#[test]
fn shutdown_mode_delivers_sigterm() {
    prerequisites();
    let mut h = DnsHarness::new("dshut").unwrap();
    let term = h.host.file("term");
    let spec = format!(
        "name=www,dns=www.example.org,ip=10.77.0.1,response_delay=0,stop_mode=shutdown,\
         command='trap \"echo term >> {}; exit 0\" TERM; echo $$ >> {}; while :; do sleep 0.1; done'",
        term.display(),
        h.host.file("boots").display()
    );
    let args = h.args(Some("v2"), &["-t", "1", &spec]);
    h.start(&args, &[]).unwrap();
    assert_eq!(
        h.dig(&["www.example.org", "A"]).addresses(),
        vec!["10.77.0.1"]
    );
    h.wait_state("www", "off", LONG);
    let got = std::fs::read_to_string(&term).unwrap_or_default();
    assert_eq!(got.trim(), "term", "the VM got SIGTERM and handled it");
    assert_history(&h.db(), &["www: stopping -> off (stopped (shutdown))"]);
    let pid = boots(&h.host.file("boots"))[0];
    wait_until("the VM to be gone", LONG, || (!alive(pid)).then_some(())).unwrap();
}

fn toml_vm(name: &str, n: u8, boots: &Path) -> String {
    format!(
        "[[vm]]\nname = \"{name}\"\ndns = \"{name}.example.org\"\nip = \"10.77.0.{n}\"\nresponse_delay = 0\n\
         command = \"echo $$ >> {}; exec sleep 600\"\n\n",
        boots.display()
    )
}

/// Starts jitsu-dns with `text` as its `--config` file; returns the file.
fn start_with_file(h: &mut DnsHarness, text: &str) -> std::path::PathBuf {
    let file = h.host.file("jitsu.toml");
    std::fs::write(&file, text).unwrap();
    let args = h.args(None, &["--config", file.to_str().unwrap()]);
    h.start(&args, &[]).unwrap();
    file
}

#[test]
fn sighup_adds_and_removes_vms_without_a_restart() {
    prerequisites();
    let mut h = DnsHarness::new("dhup").unwrap();
    let (ba, bb) = (h.host.file("boots-a"), h.host.file("boots-b"));
    let file = start_with_file(&mut h, &format!("ttl = 60\n\n{}", toml_vm("a", 1, &ba)));
    assert_eq!(
        h.dig(&["a.example.org", "A"]).addresses(),
        vec!["10.77.0.1"]
    );
    assert_eq!(h.dig(&["b.example.org", "A"]).status, "NXDOMAIN");

    std::fs::write(
        &file,
        format!(
            "ttl = 60\n\n{}{}",
            toml_vm("a", 1, &ba),
            toml_vm("b", 2, &bb)
        ),
    )
    .unwrap();
    h.daemon.as_ref().unwrap().signal("HUP").unwrap();
    wait_until("b to be served after SIGHUP", LONG, || {
        (h.dig(&["b.example.org", "A"]).addresses() == vec!["10.77.0.2"]).then_some(())
    })
    .unwrap();
    // With no response delay the answer comes once the backend started b, maybe before b's
    // command wrote its pid: wait for that, then make sure it ran once.
    wait_until("b's command to start", LONG, || {
        (!boots(&bb).is_empty()).then_some(())
    })
    .unwrap();
    assert_eq!(boots(&bb).len(), 1);
    wait_history(&h.db(), "configuration reloaded: added b", LONG).unwrap();

    // Removing a running VM forgets it and leaves it running.
    let a_pid = boots(&ba)[0];
    std::fs::write(&file, format!("ttl = 60\n\n{}", toml_vm("b", 2, &bb))).unwrap();
    h.daemon.as_ref().unwrap().signal("HUP").unwrap();
    wait_until("a to be gone from DNS after SIGHUP", LONG, || {
        (h.dig(&["a.example.org", "A"]).status == "NXDOMAIN").then_some(())
    })
    .unwrap();
    assert!(alive(a_pid), "a removed VM is left running");
    wait_history(&h.db(), "configuration reloaded: removed a", LONG).unwrap();
    assert!(
        h.stored("a", "state").is_none(),
        "its subtree is gone from the store"
    );
    // A broken file is refused and the running configuration kept.
    std::fs::write(&file, "ttl = \"soon\"\n").unwrap();
    h.daemon.as_ref().unwrap().signal("HUP").unwrap();
    wait_until("the refusal to be logged", LONG, || {
        h.log().contains("configuration not reloaded").then_some(())
    })
    .unwrap();
    assert_eq!(
        h.dig(&["b.example.org", "A"]).addresses(),
        vec!["10.77.0.2"]
    );
    assert!(
        h.log().contains("jitsu.toml line 1: ttl = \"soon\""),
        "{}",
        h.log()
    );
}

/// Sends SIGHUP and waits until jitsu-dns has logged one more reload outcome than `before`
/// (see [`outcomes`]); fails at once, with its log, if it exits.
fn hup_and_wait(h: &mut DnsHarness, before: usize) -> String {
    let daemon = h.daemon.as_mut().unwrap();
    daemon.signal("HUP").unwrap();
    wait_until("the reload's outcome in the log", LONG, || {
        if let Err(e) = daemon.check_running() {
            return Some(Err(e));
        }
        let log = daemon.log();
        (count_outcomes(&log) > before).then_some(Ok(log))
    })
    .unwrap()
    .unwrap()
}

/// The last reload refusal in `log` (empty if none).
fn last_refusal(log: &str) -> &str {
    log.lines()
        .rfind(|l| l.contains("configuration not reloaded"))
        .unwrap_or("")
}

/// Reloads that ended in `log`: refused, or done (its last line, which counts the VMs; the
/// store's line of changes comes before it).
fn count_outcomes(log: &str) -> usize {
    log.lines()
        .filter(|l| {
            l.contains("configuration not reloaded") || l.contains("configuration reloaded vms=")
        })
        .count()
}

/// Reloads that have ended so far.
fn outcomes(h: &DnsHarness) -> usize {
    count_outcomes(&h.log())
}

#[test]
fn a_reload_with_a_name_too_long_for_its_zone_is_refused_and_the_old_configuration_kept() {
    prerequisites();
    let mut h = DnsHarness::new("dhlong").unwrap();
    let ba = h.host.file("boots-a");
    let file = start_with_file(&mut h, &format!("ttl = 60\n\n{}", toml_vm("a", 1, &ba)));
    assert_eq!(
        h.dig(&["a.example.org", "A"]).addresses(),
        vec!["10.77.0.1"]
    );
    let b63 = "b".repeat(63);
    let long = format!("a.{b63}.{b63}.{b63}.{}", "c".repeat(59));
    for extra in [
        // A VM whose implicit zone has no room for ns.<zone>.
        format!("[[vm]]\nname = \"x\"\ndns = \"{long}\"\nip = \"10.77.0.9\"\ncommand = \"true\"\n"),
        // A [[zone]] of that length without `ns`.
        format!("[[zone]]\nname = \"{}\"\n", &long[2..]),
    ] {
        let before = outcomes(&h);
        std::fs::write(
            &file,
            format!("ttl = 60\n\n{}{extra}", toml_vm("a", 1, &ba)),
        )
        .unwrap();
        let log = hup_and_wait(&mut h, before);
        assert!(!log.contains("panicked"), "{log}");
        let last = last_refusal(&log);
        assert!(last.contains("no room for its NS name"), "{log}");
        assert_eq!(
            h.dig(&["a.example.org", "A"]).addresses(),
            vec!["10.77.0.1"]
        );
    }
}

#[test]
fn a_reload_that_would_remove_too_many_vms_is_refused_unless_the_file_allows_it() {
    prerequisites();
    let mut h = DnsHarness::new("dhempty").unwrap();
    let boots: Vec<_> = (1..=3)
        .map(|i| h.host.file(&format!("boots-{i}")))
        .collect();
    let vms = |names: &[(&str, u8)]| -> String {
        names
            .iter()
            .map(|(n, i)| toml_vm(n, *i, &boots[*i as usize - 1]))
            .collect()
    };
    let all = [("a", 1), ("b", 2), ("c", 3)];
    let file = start_with_file(&mut h, &format!("ttl = 60\n\n{}", vms(&all)));
    for (n, i) in all {
        assert_eq!(
            h.dig(&[&format!("{n}.example.org"), "A"]).addresses(),
            vec![format!("10.77.0.{i}")]
        );
    }
    h.wait_state("a", "running", LONG);

    // An emptied file: every VM would go. Refused, and every name still answered.
    let before = outcomes(&h);
    std::fs::write(&file, "").unwrap();
    let log = hup_and_wait(&mut h, before);
    let last = last_refusal(&log);
    assert!(
        last.contains("would remove 3 of 3 VMs") && last.contains("max_removed_share"),
        "{log}"
    );
    assert!(!log.contains("configuration reloaded vms=0"), "{log}");
    for (n, i) in all {
        assert_eq!(
            h.dig(&[&format!("{n}.example.org"), "A"]).addresses(),
            vec![format!("10.77.0.{i}")]
        );
    }
    assert_eq!(
        h.stored("a", "state").as_deref(),
        Some("running"),
        "a is still managed"
    );

    // Two of three is more than the default share (half): refused too.
    let before = outcomes(&h);
    std::fs::write(&file, format!("ttl = 60\n\n{}", vms(&[("a", 1)]))).unwrap();
    let log = hup_and_wait(&mut h, before);
    let last = last_refusal(&log);
    assert!(last.contains("would remove 2 of 3 VMs"), "{log}");
    assert_eq!(
        h.dig(&["c.example.org", "A"]).addresses(),
        vec!["10.77.0.3"]
    );

    // One of three is within it.
    let before = outcomes(&h);
    std::fs::write(&file, format!("ttl = 60\n\n{}", vms(&[("a", 1), ("b", 2)]))).unwrap();
    let log = hup_and_wait(&mut h, before);
    assert!(log.contains("configuration reloaded vms=2"), "{log}");
    wait_until("c to be gone from DNS", LONG, || {
        (h.dig(&["c.example.org", "A"]).status == "NXDOMAIN").then_some(())
    })
    .unwrap();

    // The file says so explicitly: everything may go.
    let before = outcomes(&h);
    std::fs::write(&file, "max_removed_share = 1.0\n").unwrap();
    let log = hup_and_wait(&mut h, before);
    assert!(log.contains("configuration reloaded vms=0"), "{log}");
    // No VM left, no zone left: the name is not ours, and forwarding is off.
    wait_until("a to be gone from DNS", LONG, || {
        (h.dig(&["a.example.org", "A"]).status == "REFUSED").then_some(())
    })
    .unwrap();
}

#[test]
fn limits_answer_servfail_and_are_counted() {
    prerequisites();
    require_tool("curl", "curl");
    let mut h = DnsHarness::new("dlim").unwrap();
    let b = "name=b,dns=b.example.org,ip=10.77.0.2,response_delay=0,command='exec sleep 600'";
    let args = h.args(
        None,
        &[
            "--max-running",
            "1",
            "--metrics",
            "127.0.0.1:9153",
            &www(&h, ""),
            b,
        ],
    );
    h.start(&args, &[]).unwrap();
    assert_eq!(
        h.dig(&["www.example.org", "A"]).addresses(),
        vec!["10.77.0.1"]
    );
    let refused = h.dig(&["b.example.org", "A"]);
    assert_eq!(refused.status, "SERVFAIL", "{}", refused.text);
    assert_eq!(h.stored("b", "starts").as_deref(), Some("0"));
    let m = metrics(h.host.ns(), "127.0.0.1:9153").unwrap();
    assert!(
        m.lines()
            .any(|l| l == "jitsu_dns_limit_refusals_total{limit=\"max_running\"} 1"),
        "{m}"
    );
    assert!(
        h.log().contains("query refused (SERVFAIL): limit reached"),
        "{}",
        h.log()
    );
}

#[test]
fn ifup_guest_leaves_the_interface_to_the_command_with_its_settings_in_the_environment() {
    prerequisites();
    let mut h = DnsHarness::new("difup").unwrap();
    let env_file = h.host.file("env");
    // The guest configures its own NIC, as a unikernel does, from what jitsu-dns tells it.
    let guest = format!(
        "ip -o addr show dev $JITSU_IFACE | sed s/^/addr:/ > {env}; \
         echo operstate:$(cat /sys/class/net/$JITSU_IFACE/operstate) >> {env}; \
         echo disable_ipv6:$(cat /proc/sys/net/ipv6/conf/$JITSU_IFACE/disable_ipv6) >> {env}; \
         env | grep ^JITSU_ | sort >> {env}; \
         ip addr add $JITSU_IP/$JITSU_IP_PREFIX dev $JITSU_IFACE; \
         echo 0 > /proc/sys/net/ipv6/conf/$JITSU_IFACE/disable_ipv6; \
         ip -6 addr add $JITSU_IP6/$JITSU_IP6_PREFIX dev $JITSU_IFACE nodad; \
         ip route add default via $JITSU_GATEWAY; exec sleep 600",
        env = env_file.display()
    );
    let spec = format!(
        "name=g,dns=g.example.org,ip=10.77.0.5/16,ip6=fd77::5/80,mac=02:77:00:00:00:05,ifup=guest,\
         gateway=10.77.0.254,response_delay=0.3,command=\"{guest}\""
    );
    let args = h.args(None, &[&spec]);
    h.start(&args, &[]).unwrap();
    assert_eq!(
        h.dig(&["g.example.org", "A"]).addresses(),
        vec!["10.77.0.5"]
    );
    let env = wait_until("the guest's environment", LONG, || {
        let e = std::fs::read_to_string(&env_file).ok()?;
        e.contains("JITSU_NAME").then_some(e)
    })
    .unwrap();
    let want = [
        "JITSU_GATEWAY=10.77.0.254",
        "JITSU_IFACE=eth0",
        "JITSU_IP6=fd77::5",
        "JITSU_IP6_PREFIX=80",
        "JITSU_IP=10.77.0.5",
        "JITSU_IP_PREFIX=16",
        "JITSU_MAC=02:77:00:00:00:05",
        "JITSU_NAME=g",
    ];
    // eth0 is up (so its bridge port forwards by the time the guest speaks) but silent: no
    // address of either family, IPv6 off until the guest turns it on.
    assert!(
        !env.contains("addr:"),
        "eth0 had an address before the command configured it: {env}"
    );
    assert!(env.contains("operstate:up"), "eth0 was not up: {env}");
    assert!(env.contains("disable_ipv6:1"), "IPv6 was on: {env}");
    // The command also inherits jitsu-dns's own environment; these are the ones it sets.
    let mut got: Vec<&str> = env
        .lines()
        .filter(|l| {
            want.iter()
                .any(|w| w.split('=').next() == l.split('=').next())
        })
        .collect();
    got.sort_unstable();
    assert_eq!(got, want);
    wait_until("the guest to answer ping", LONG, || {
        h.host.ns().sh("ping -c1 -W1 10.77.0.5").ok()
    })
    .unwrap();
    // The guest's MAC is the configured one, as the bridge learnt it.
    let fdb = h.host.fdb().unwrap();
    assert!(fdb.iter().any(|e| e.mac == "02:77:00:00:00:05"), "{fdb:?}");
}

/// The command is spawned straight into its cgroup, a session of its own and its namespace,
/// with a `/sys` of that namespace (as `ip netns exec` left it); the namespace is one `ip
/// netns` lists and identifies the command by, in jitsu-dns's mount namespace, until a stop
/// removes it.
#[test]
fn the_command_runs_in_its_session_cgroup_and_a_namespace_ip_netns_lists_until_the_stop() {
    prerequisites();
    require_tool("nsenter", "util-linux");
    let mut h = DnsHarness::new("dspawn").unwrap();
    let facts = h.host.file("facts");
    let spec = format!(
        "name=www,dns=www.example.org,ip=10.77.0.1/24,response_delay=0,\
         command='echo $$ $(ls /sys/class/net) > {}; exec sleep 600'",
        facts.display()
    );
    let args = h.args(None, &[&spec]);
    h.start(&args, &[]).unwrap();
    assert_eq!(
        h.dig(&["www.example.org", "A"]).addresses(),
        vec!["10.77.0.1"]
    );
    let text = wait_until("the command's facts", LONG, || {
        let t = std::fs::read_to_string(&facts).ok()?;
        t.ends_with('\n').then_some(t)
    })
    .unwrap();
    let mut words = text.split_whitespace();
    let pid: u32 = words.next().unwrap().parse().unwrap();
    let links: Vec<&str> = words.collect();
    assert_eq!(
        links,
        ["eth0", "lo"],
        "the command's /sys shows its namespace's links"
    );
    // Field 6 of /proc/<pid>/stat: the session, led by the command itself.
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let session = stat.rsplit(')').next().unwrap().split_whitespace().nth(3);
    assert_eq!(session, Some(pid.to_string().as_str()), "{stat}");
    // Started in jitsu-dns's memory with every signal blocked (as after vfork): it runs with
    // none blocked, and SIGPIPE (which Rust ignores) not ignored.
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let mask = |field: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(field))
            .and_then(|m| u64::from_str_radix(m.trim(), 16).ok())
            .unwrap_or_else(|| panic!("no {field} in {status}"))
    };
    assert_eq!(mask("SigBlk:"), 0, "no signal blocked: {status}");
    let sigpipe = 1u64 << (13 - 1);
    assert_eq!(
        mask("SigIgn:") & sigpipe,
        0,
        "SIGPIPE not ignored: {status}"
    );
    let cgroup = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap();
    let netns = h.vms.netns("www");
    assert!(
        cgroup.contains(&format!("/jitsu/{netns}")),
        "the command is in the VM's cgroup: {cgroup}"
    );
    let jitsu_dns = h.daemon.as_ref().unwrap().pid();
    let in_jitsu_dns = |script: &str| in_mounts_of(jitsu_dns, script).unwrap();
    assert!(
        in_jitsu_dns("ip netns list")
            .lines()
            .any(|l| l.split(' ').next() == Some(&netns)),
        "ip netns lists {netns}"
    );
    assert_eq!(
        in_jitsu_dns(&format!("ip netns identify {pid}")).trim(),
        netns
    );

    let out = Command::new(bin_path("jitsu-dns"))
        .arg("ctl")
        .arg("--control")
        .arg(h.control())
        .args(["stop", "www"])
        .output()
        .unwrap();
    assert!(out.status.success(), "ctl stop: {out:?}");
    h.wait_state("www", "off", LONG);
    assert!(!alive(pid), "the command is gone");
    assert!(
        !in_jitsu_dns("ip netns list")
            .lines()
            .any(|l| l.split(' ').next() == Some(&netns)),
        "ip netns no longer lists {netns}"
    );
    assert!(!Path::new("/run/netns").join(&netns).exists());
}

#[test]
fn vms_coming_and_going_never_change_the_bridges_own_mac() {
    prerequisites();
    // A bridge whose address was never set takes the lowest MAC of its ports. With one
    // member on a high MAC, a VM port with a random MAC would most likely become the bridge's,
    // and the host's own address on the bridge would move at each boot and stop, leaving
    // every client's ARP cache wrong (seen: DNS queries to br0 lost for seconds).
    let mut h = DnsHarness::new("dmac").unwrap();
    let member = h.host.join("m", None, &[], true).unwrap();
    h.host
        .ns()
        .sh(&format!(
            "ip link set {} address f0:00:00:00:00:10",
            member.port
        ))
        .unwrap();
    let mac = |h: &DnsHarness| h.host.bridge_mac().unwrap();
    let before = mac(&h);
    assert_eq!(
        before, "f0:00:00:00:00:10",
        "the member's port is the lowest"
    );
    let args = h.args(None, &["-t", "1", &www(&h, "")]);
    h.start(&args, &[]).unwrap();
    assert_eq!(
        h.dig(&["www.example.org", "A"]).addresses(),
        vec!["10.77.0.1"]
    );
    h.wait_state("www", "running", LONG);
    assert_eq!(mac(&h), before, "a VM's port changed the bridge's MAC");
    h.wait_state("www", "off", LONG);
    assert_eq!(mac(&h), before, "a VM's stop changed the bridge's MAC");
}

#[test]
fn a_restart_after_kill_9_during_boots_sweeps_the_half_built_vms_and_adopts_the_running_ones() {
    prerequisites();
    let mut h = DnsHarness::new("dkill").unwrap();
    // Ports on br1 take 8 s to forward (STP, a 4 s forward delay), so each boot there waits
    // 3 s (the backend's wait for a forwarding port) with its namespace, port and cgroup
    // made and no command yet: a kill -9 then lands in the middle of every one.
    h.host
        .ns()
        .sh("ip link add br1 type bridge stp_state 1 forward_delay 400 && ip link set br1 up")
        .unwrap();
    let spec = |name: &str, ip: &str, nic: &str| {
        format!(
            "name={name},dns={name}.example.org,ip={ip},nic={nic},response_delay=0,\
             command='echo $$ >> {}; exec sleep 600'",
            h.host.file(&format!("boots-{name}")).display()
        )
    };
    let running: Vec<String> = (0..3).map(|i| format!("r{i}")).collect();
    let booting: Vec<String> = (0..12).map(|i| format!("s{i}")).collect();
    let mut specs: Vec<String> = running
        .iter()
        .enumerate()
        .map(|(i, n)| spec(n, &format!("10.77.0.{}", 10 + i), "br0"))
        .collect();
    specs.extend(
        booting
            .iter()
            .enumerate()
            .map(|(i, n)| spec(n, &format!("10.77.0.{}", 100 + i), "br1")),
    );
    let mut extra = vec!["-t", "600"];
    extra.extend(specs.iter().map(String::as_str));
    let args = h.args(None, &extra);
    h.start(&args, &[]).unwrap();
    for (i, n) in running.iter().enumerate() {
        let d = h.dig(&[&format!("{n}.example.org")]);
        assert_eq!(
            d.addresses(),
            vec![format!("10.77.0.{}", 10 + i)],
            "{}",
            d.text
        );
    }
    // The answer may come before the command's first line has recorded its pid.
    let pids: Vec<Vec<u32>> = running
        .iter()
        .map(|n| {
            let file = h.host.file(&format!("boots-{n}"));
            wait_until(&format!("{n}'s command to record its pid"), LONG, || {
                Some(boots(&file)).filter(|b| !b.is_empty())
            })
            .unwrap_or_else(|e| panic!("{e}\n{}", h.log()))
        })
        .collect();

    // Every slow VM booting at once, then jitsu-dns killed once all their namespaces exist.
    let mut digs: Vec<std::process::Child> = booting
        .iter()
        .map(|n| {
            h.host
                .ns()
                .command("dig")
                .args([
                    "+time=30",
                    "+tries=1",
                    "@127.0.0.1",
                    &format!("{n}.example.org"),
                ])
                .stdout(std::process::Stdio::null())
                .spawn()
                .unwrap()
        })
        .collect();
    let netns_exists =
        |h: &DnsHarness, vm: &str| Path::new("/run/netns").join(h.vms.netns(vm)).exists();
    wait_until("every booting VM's namespace", LONG, || {
        booting.iter().all(|n| netns_exists(&h, n)).then_some(())
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", h.log()));
    let mut daemon = h.daemon.take().unwrap();
    daemon.signal("KILL").unwrap();
    daemon.wait_exit(Duration::from_secs(10)).unwrap();
    for d in &mut digs {
        let _ = d.kill();
        let _ = d.wait();
    }
    let launched = |h: &DnsHarness, n: &str| {
        boots(&h.host.file(&format!("boots-{n}")))
            .first()
            .is_some_and(|p| alive(*p))
    };
    let half_built: Vec<&String> = booting.iter().filter(|n| !launched(&h, n)).collect();
    assert!(
        !half_built.is_empty(),
        "the kill landed after every boot: nothing was left half-built"
    );

    h.start(&args, &[]).unwrap();
    // The VMs that ran are adopted: the same process, recorded as running, never booted again.
    for (n, before) in running.iter().zip(&pids) {
        assert_eq!(&boots(&h.host.file(&format!("boots-{n}"))), before, "{n}");
        assert!(alive(before[0]), "{n} was not killed");
        h.wait_state(n, "running", LONG);
    }
    // A slow VM whose command had started and been recorded runs on and is adopted too
    // (one started but not yet recorded is swept with the rest); every other one has nothing
    // left: no namespace, no cgroup, no record, no port on the bridge.
    let mut ran = 0;
    for n in &booting {
        if launched(&h, n) {
            ran += 1;
            h.wait_state(n, "running", LONG);
            continue;
        }
        assert!(
            !netns_exists(&h, n),
            "{n}'s namespace is left:\n{}",
            h.log()
        );
        let cg = h.vms.cgroup("v2", n);
        assert!(!cg.exists(), "{} is left", cg.display());
        let record = h.host.file(&format!("run/{n}.state"));
        assert!(!record.exists(), "{} is left", record.display());
    }
    let ports = h
        .host
        .ns()
        .sh("ip -o link show master br1")
        .unwrap()
        .lines()
        .count();
    assert_eq!(ports, ran, "only the ports of running VMs stay on br1");
    let swept = count(
        &h.log().lines().map(str::to_string).collect::<Vec<_>>(),
        "removed what an earlier run left of a VM that does not run",
    );
    assert!(swept >= half_built.len(), "{}", h.log());
    assert_eq!(swept, booting.len() - ran, "{}", h.log());
}

#[test]
fn a_cold_vms_answer_waits_on_no_tool_that_sleeps() {
    // iputils' `arping -U -c 1` sends its gratuitous ARP at once, then waits a second for
    // replies that never come: the backend's boot of every default VM took that second
    // (a cold VM's answer came 1.09 s after the query, issue 12). This `arping` first on
    // jitsu-dns's PATH records its call and sleeps far longer than dig waits: an answer
    // means the boot path waited on no such tool, and no call means it ran none.
    prerequisites();
    let mut h = DnsHarness::new("dnosleep").unwrap();
    let bin = h.host.file("bin");
    std::fs::create_dir_all(&bin).unwrap();
    let calls = h.host.file("arping.calls");
    let fake = bin.join("arping");
    std::fs::write(
        &fake,
        format!(
            "#!/bin/sh\necho \"$*\" >> {}\nexec sleep 60\n",
            calls.display()
        ),
    )
    .unwrap();
    std::fs::set_permissions(&fake, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let path = format!(
        "{}:{}",
        bin.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let spec = "name=www,dns=www.example.org,ip=10.77.0.1/24,ip6=fd77::1/64,response_delay=0,\
                command='exec sleep 600'";
    let args = h.args(None, &[spec]);
    h.start(&args, &[("PATH", path)]).unwrap();
    let d = h.dig(&["+time=20", "+tries=1", "www.example.org", "A"]);
    assert_eq!(d.addresses(), vec!["10.77.0.1"], "{}\n{}", d.text, h.log());
    assert!(
        !calls.exists(),
        "the boot ran arping: {:?}",
        std::fs::read_to_string(&calls)
    );
    h.wait_state("www", "running", LONG);
}
