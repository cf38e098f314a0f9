//! jitsu-dns's QEMU backend (`-x qemu`) with the project's Rust unikernel under real QEMU
//! microvm (TCG), in namespaces the tests create: dig boots it and curl gets its page; an idle
//! stop leaves no QEMU, no tap and no files; a suspend keeps the guest in memory and the
//! resumed guest its request counter; a restarted jitsu-dns adopts the running QEMU, and a
//! QEMU killed from outside is seen as stopped at once (QMP, not polling); a shutdown ends in
//! a destroy; a standby QEMU (`standby=on`) waits paused off the bridge and a boot wakes it;
//! a kernel QEMU cannot load is a failed boot that leaves nothing behind; the
//! whole chain with synjitsu and with `wait_for=announce` gets the page with one SYN, and so
//! does every one of many woken standby guests, whose own announcement synjitsu counts; and the
//! `qemu:` URI is libvirt's unless `-x qemu` says otherwise.

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use jitsu_dns::backend::qemu::Record;
use jitsu_tests::curl::{Curl, metric_in, metrics};
use jitsu_tests::e2e::{Backend, Mask, Options, Stack, Vm};
use jitsu_tests::jitsu_dns::{DnsHarness, wait_history};
use jitsu_tests::unikernel::{self, QEMU, qemus, taps};
use jitsu_tests::{bin_path, require_root, require_tool, wait_until};

const IP: &str = "10.77.0.5";
const LONG: Duration = Duration::from_secs(60);
const METRICS: &str = "127.0.0.1:9153";

fn prerequisites() {
    require_root();
    for (tool, package) in [
        (QEMU, "qemu-system-x86"),
        ("ip", "iproute2"),
        ("dig", "dnsutils"),
        ("curl", "curl"),
        ("tcpdump", "tcpdump"),
        ("nstat", "iproute2"),
    ] {
        require_tool(tool, package);
    }
}

/// jitsu-dns with the QEMU backend and one unikernel VM `uk` (10.77.0.5 on br0, whose
/// gateway is the host's 10.77.0.254); `keys` and `flags` add to the VM and the command line.
struct Qemu {
    h: DnsHarness,
    args: Vec<String>,
}

impl Qemu {
    fn start(tag: &str, keys: &str, flags: &[&str], uri_query: &str) -> Qemu {
        prerequisites();
        let elf = unikernel::elf().unwrap();
        let mut h = DnsHarness::new(tag).unwrap();
        let uri = format!("qemu://{}{uri_query}", h.host.file("qemu").display());
        let console = h.host.file("uk.console");
        let spec = format!(
            "name=uk,dns=uk.example.org,ip={IP}/24,kernel={},cmdline=ip={IP}/24 gw=10.77.0.254,\
             console_log={},response_delay=0{keys}",
            elf.display(),
            console.display()
        );
        let mut extra = vec!["-x", "qemu", "--metrics", METRICS];
        extra.extend_from_slice(flags);
        extra.push(&spec);
        let args = h.backend_args(&uri, &extra);
        h.start(&args, &[]).unwrap();
        Qemu { h, args }
    }

    fn dir(&self) -> PathBuf {
        self.h.host.file("qemu")
    }

    /// The record of `uk`'s QEMU, while it runs.
    fn record(&self) -> Option<Record> {
        let text = std::fs::read_to_string(self.dir().join("uk.state")).ok()?;
        Record::parse(&text)
    }

    /// `dig uk.example.org`: the VM's address, answered with authority.
    fn dig(&self) {
        let d = self.h.dig(&["uk.example.org", "A"]);
        assert!(d.aa(), "{d:?}\n{}", self.h.log());
        assert_eq!(d.addresses(), vec![IP.to_string()], "{}", self.h.log());
    }

    /// The unikernel's page, fetched from the host, and its request number.
    fn page(&self) -> u64 {
        let got = Curl::get(format!("http://{IP}/"))
            .max_time(Duration::from_secs(30))
            .run(self.h.host.ns())
            .unwrap();
        assert!(got.ok(), "{got:?}\n{}", self.h.log());
        got.body
            .lines()
            .find_map(|l| l.strip_prefix("request ")?.parse().ok())
            .unwrap_or_else(|| panic!("no request number in {:?}", got.body))
    }

    fn metrics(&self) -> String {
        metrics(self.h.host.ns(), METRICS).unwrap()
    }

    /// No QEMU process, no tap device and no run files of `uk` are left.
    fn assert_nothing_left(&self) {
        let ns = self.h.host.ns();
        assert_eq!(qemus(ns).unwrap(), Vec::<u32>::new(), "{}", self.h.log());
        assert_eq!(taps(ns).unwrap(), Vec::<String>::new(), "{}", self.h.log());
        for f in ["uk.state", "uk.pid", "uk.qmp"] {
            assert!(!self.dir().join(f).exists(), "{f} is left");
        }
    }
}

/// The command line of process `pid`, its arguments joined by spaces.
fn cmdline_of(pid: u32) -> String {
    let raw = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap();
    String::from_utf8_lossy(&raw).replace('\0', " ")
}

#[test]
fn dig_boots_the_unikernel_and_an_idle_stop_leaves_no_qemu_no_tap_and_no_files() {
    let q = Qemu::start("qmdes", "", &["-t", "1"], "");
    q.dig();
    assert_eq!(q.page(), 1);
    let rec = q.record().expect("a record while QEMU runs");
    let ns = q.h.host.ns();
    assert_eq!(qemus(ns).unwrap(), vec![rec.pid]);
    let cmdline = cmdline_of(rec.pid);
    assert!(
        cmdline.contains("-M microvm,") && cmdline.contains("-accel tcg"),
        "{cmdline}"
    );
    // Never asked to power off, it runs without ACPI (its devices on its command line).
    assert!(cmdline.contains(",acpi=off "), "{cmdline}");
    // Its tap is a port of the VM's bridge.
    let ports = ns.sh("ip -o link show master br0 type tun").unwrap();
    assert!(ports.contains(&format!(": {}:", rec.tap)), "{ports}");

    // Idle for 2 x TTL: destroyed, and everything of it is gone.
    q.h.wait_state("uk", "off", LONG);
    q.assert_nothing_left();
    let history = wait_history(&q.h.db(), "uk: stopping -> off (stopped (destroy))", LONG)
        .unwrap_or_else(|e| panic!("{e}\n{}", q.h.log()));
    assert!(
        history.contains(&"uk: running -> stopping (idle for 2 s)".to_string()),
        "{history:#?}"
    );
    // Lifecycle came from QMP: states were never polled.
    let m = q.metrics();
    assert!(
        m.lines()
            .any(|l| l == "jitsu_dns_backend_state_polls_total 0"),
        "{m}"
    );
}

#[test]
fn a_suspended_unikernel_stays_in_memory_and_resumes_with_its_request_counter() {
    let q = Qemu::start("qmsus", ",stop_mode=suspend", &["-t", "1"], "");
    q.dig();
    assert_eq!(q.page(), 1);
    let rec = q.record().unwrap();
    q.h.wait_state("uk", "suspended", LONG);
    // Paused, not gone: the same QEMU, its tap still on the bridge.
    let ns = q.h.host.ns();
    assert_eq!(qemus(ns).unwrap(), vec![rec.pid]);
    assert_eq!(taps(ns).unwrap(), vec![rec.tap.clone()]);

    q.dig();
    q.h.wait_state("uk", "running", LONG);
    assert_eq!(q.page(), 2, "the resumed guest lost its request counter");
    assert_eq!(q.record().unwrap(), rec, "resuming started another QEMU");
    assert!(
        jitsu_tests::jitsu_dns::store_log(&q.h.db())
            .iter()
            .any(|l| l.starts_with("uk: suspended -> booting (resume, query")),
        "{}",
        q.h.log()
    );
}

#[test]
fn a_restarted_jitsu_dns_adopts_its_qemu_and_sees_it_killed_from_outside() {
    let mut q = Qemu::start("qmado", "", &["-t", "30"], "");
    q.dig();
    assert_eq!(q.page(), 1);
    let rec = q.record().unwrap();

    // jitsu-dns stops; the VM does not.
    assert_eq!(q.h.stop().unwrap(), Some(0));
    let ns = q.h.host.ns();
    assert_eq!(qemus(ns).unwrap(), vec![rec.pid]);
    let args = q.args.clone();
    q.h.start(&args, &[]).unwrap();
    wait_history(&q.h.db(), "uk: running (adopted: already running)", LONG)
        .unwrap_or_else(|e| panic!("{e}\n{}", q.h.log()));
    assert!(
        q.h.log().contains("adopted a running QEMU"),
        "{}",
        q.h.log()
    );
    q.dig();
    assert_eq!(q.page(), 2, "the adopted guest is not the one that ran");
    assert_eq!(q.record().unwrap(), rec);

    // Killed from outside: the adopted QMP connection ends, the VM is off at once (TTL 30 s:
    // no idle stop) and cleaned up.
    let pid = rec.pid.to_string();
    jitsu_tests::run(Command::new("kill").args(["-9", &pid])).unwrap();
    q.h.wait_state("uk", "off", LONG);
    wait_history(&q.h.db(), "uk: running -> off (exited by itself)", LONG)
        .unwrap_or_else(|e| panic!("{e}\n{}", q.h.log()));
    wait_until("the run files to be removed", LONG, || {
        (!q.dir().join("uk.state").exists()).then_some(())
    })
    .unwrap();
    q.assert_nothing_left();
    let m = q.metrics();
    assert!(
        metric_in(&m, "jitsu_dns_backend_events_total") >= 1.0,
        "{m}"
    );
    assert!(
        m.lines()
            .any(|l| l == "jitsu_dns_backend_state_polls_total 0"),
        "{m}"
    );
}

#[test]
fn a_standby_qemu_waits_paused_off_the_bridge_and_a_boot_wakes_it() {
    let mut q = Qemu::start("qmsby", "", &["-t", "1"], "?standby=on");
    let ns = q.h.host.ns();
    // Looked up at start: the VM is off, its QEMU paused before the guest's first
    // instruction, its tap on no bridge.
    let standby = wait_until("a standby QEMU", LONG, || q.record().filter(|r| r.standby))
        .unwrap_or_else(|e| panic!("{e}\n{}", q.h.log()));
    assert_eq!(q.h.stored("uk", "state").as_deref(), Some("off"));
    assert_eq!(qemus(ns).unwrap(), vec![standby.pid]);
    assert_eq!(taps(ns).unwrap(), vec![standby.tap.clone()]);
    let port = |tap: &str| {
        let ports = ns.sh("ip -o link show master br0 type tun").unwrap();
        ports.contains(&format!(": {tap}:"))
    };
    assert!(!port(&standby.tap), "a standby's tap is a bridge port");

    // A boot wakes it: the same QEMU, now running, its tap on the bridge.
    q.dig();
    assert_eq!(q.page(), 1);
    let woken = q.record().unwrap();
    assert_eq!((woken.pid, woken.standby), (standby.pid, false));
    assert!(port(&woken.tap));

    // Stopped when idle: gone, and a new standby waits.
    q.h.wait_state("uk", "off", LONG);
    let next = wait_until("the next standby QEMU", LONG, || {
        q.record().filter(|r| r.standby && r.pid != standby.pid)
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", q.h.log()));
    assert_eq!(qemus(ns).unwrap(), vec![next.pid]);
    assert_eq!(taps(ns).unwrap(), vec![next.tap.clone()]);

    // A restarted jitsu-dns adopts the standby and boots the VM from it.
    assert_eq!(q.h.stop().unwrap(), Some(0));
    let args = q.args.clone();
    q.h.start(&args, &[]).unwrap();
    assert!(
        q.h.log().contains("adopted a standby QEMU"),
        "{}",
        q.h.log()
    );
    q.dig();
    assert_eq!(q.page(), 1, "not a fresh guest");
    assert_eq!(q.record().unwrap().pid, next.pid);
}

#[test]
fn a_shutdown_that_the_guest_ignores_ends_in_a_destroy() {
    // The unikernel has no ACPI: the power button does nothing, the grace runs out.
    let q = Qemu::start(
        "qmshu",
        ",stop_mode=shutdown",
        &["-t", "1"],
        "?shutdown_grace=0.5",
    );
    q.dig();
    assert_eq!(q.page(), 1);
    // ACPI is kept for the power button.
    let cmdline = cmdline_of(q.record().expect("a record while QEMU runs").pid);
    assert!(
        cmdline.contains("-M microvm,") && !cmdline.contains("acpi=off"),
        "{cmdline}"
    );
    q.h.wait_state("uk", "off", LONG);
    wait_history(&q.h.db(), "uk: stopping -> off (stopped (shutdown))", LONG)
        .unwrap_or_else(|e| panic!("{e}\n{}", q.h.log()));
    q.assert_nothing_left();
}

#[test]
fn a_kernel_qemu_cannot_load_is_a_failed_boot_that_leaves_nothing() {
    prerequisites();
    let mut h = DnsHarness::new("qmbad").unwrap();
    let not_a_kernel = h.host.file("not-a-kernel");
    std::fs::write(&not_a_kernel, "not an ELF").unwrap();
    let uri = format!("qemu://{}", h.host.file("qemu").display());
    // Still booting (its answer waits 2 s) when QEMU gives up on the kernel.
    let spec = format!(
        "name=uk,dns=uk.example.org,ip={IP}/24,kernel={},response_delay=2",
        not_a_kernel.display()
    );
    let args = h.backend_args(&uri, &["-x", "qemu", &spec]);
    h.start(&args, &[]).unwrap();
    let _ = h.dig(&["uk.example.org", "A"]);
    h.wait_state("uk", "failed", LONG);
    assert!(
        jitsu_tests::jitsu_dns::store_log(&h.db())
            .iter()
            .any(|l| l == "uk: booting -> failed (boot failed: exited while booting)"),
        "{}",
        h.log()
    );
    // What QEMU said is in jitsu-dns's log.
    assert!(
        h.log().contains("qemu: invalid kernel header"),
        "{}",
        h.log()
    );
    let ns = h.host.ns();
    wait_until("the failed VM's files to be removed", LONG, || {
        (!h.host.file("qemu/uk.state").exists()).then_some(())
    })
    .unwrap();
    assert_eq!(qemus(ns).unwrap(), Vec::<u32>::new());
    assert_eq!(taps(ns).unwrap(), Vec::<String>::new());
}

#[test]
fn the_whole_chain_gets_the_unikernels_page_with_one_syn_with_synjitsu_and_with_announce() {
    prerequisites();
    // Synjitsu with the unikernel's promise to announce itself only once it listens (no
    // probe), synjitsu without it (the port probed first), and waiting for the announcement.
    let vms = vec![
        Vm::new(0, Mask::Synjitsu, Duration::ZERO),
        Vm::new(1, Mask::SynjitsuProbe, Duration::ZERO),
        Vm::new(2, Mask::Announce, Duration::ZERO),
    ];
    let opts = Options {
        backend: Backend::Qemu,
        ..Options::default()
    };
    let stack = Stack::start("qme2e", vms.clone(), opts).unwrap();
    let bridge_mac = stack
        .host
        .ns()
        .sh("cat /sys/class/net/br0/address")
        .unwrap()
        .trim()
        .to_string();
    for vm in &vms {
        let got = stack.cold_start(vm).unwrap();
        assert!(got.ok(), "{got:?}\n{}", stack.logs());
        assert_eq!(got.syns, 1, "{}: {got:?}", vm.mask.label());
        assert_eq!(got.syn_retransmits, 0, "{}: {got:?}", vm.mask.label());
        // The guest's own announcement came, and before the page: it listened first.
        let after = got
            .after_listening_us
            .unwrap_or_else(|| panic!("no announcement from the guest: {got:?}"));
        assert!(
            after >= 0,
            "the page came before the guest listened: {got:?}"
        );
        let guest = got.guest.as_ref().expect("the unikernel's listening line");
        assert_eq!(guest.endpoint, format!("{}:80", vm.ip));
        // It asked for its gateway (the host's bridge) as it booted and got the answer (before
        // it listened, or on a loaded host after): while synjitsu stood in for it, from
        // synjitsu, which the answer to its MAC reached.
        let learnt = guest.gateway_mac.clone().or_else(|| {
            wait_until("the gateway's MAC on the console", LONG, || {
                unikernel::gateway_mac(
                    &std::fs::read_to_string(stack.console(vm)).unwrap_or_default(),
                )
            })
            .ok()
        });
        assert_eq!(
            learnt.as_deref(),
            Some(bridge_mac.as_str()),
            "{}: {}\n{}",
            vm.mask.label(),
            guest.line,
            stack.logs()
        );
        // Cold starts run one after the other: the counter so far is the VMs' before it.
        let probes = stack.synjitsu_metric("synjitsu_probes_sent_total");
        match vm.mask {
            Mask::Synjitsu => assert_eq!(
                probes,
                0.0,
                "synjitsu probed the unikernel that promised it listens\n{}",
                stack.logs()
            ),
            Mask::SynjitsuProbe => assert!(probes >= 1.0, "no probe\n{}", stack.logs()),
            _ => {}
        }
    }
    assert!(stack.synjitsu_metric("synjitsu_syns_handed_over_total{via=\"wire\"}") >= 1.0);
    // jitsu-dns named the synjitsu VM's tap as its bridge port once QEMU had it, so synjitsu
    // took the guest's announcement from there alone.
    let log = stack.synjitsu_log();
    assert!(
        log.lines().any(|l| l.contains("guest's bridge port")
            && l.contains(&format!("vm={}", vms[0].name))
            && l.contains("port=\"jq")),
        "{}",
        stack.logs()
    );
    stack.wait_all_off(LONG).unwrap();
    let ns = stack.host.ns();
    assert_eq!(qemus(ns).unwrap(), Vec::<u32>::new(), "{}", stack.logs());
    assert_eq!(taps(ns).unwrap(), Vec::<String>::new(), "{}", stack.logs());
}

/// How many standby guests the wake test wakes: one woken connection in 40 missed the guest's
/// announcement before the fix (the bench's standby series, twice).
const WAKES: usize = 20;

#[test]
fn every_woken_standby_unikernel_is_reached_with_its_first_syn_and_its_own_announcement() {
    // A standby wakes in a few ms, fast enough to race synjitsu learning of the boot and of
    // the guest's port: each wake must still end synjitsu's stand-in with the guest's one
    // gratuitous ARP, so the held SYN is handed over at once.
    prerequisites();
    let vms: Vec<Vm> = (0..WAKES)
        .map(|n| Vm::new(n, Mask::Synjitsu, Duration::ZERO))
        .collect();
    let opts = Options {
        backend: Backend::Qemu,
        qemu_standby: true,
        ..Options::default()
    };
    let stack = Stack::start("qmwak", vms.clone(), opts).unwrap();
    let dir = stack.qemu_dir();
    wait_until("every VM's standby QEMU", LONG, || {
        vms.iter()
            .all(|vm| {
                std::fs::read_to_string(dir.join(format!("{}.state", vm.name)))
                    .is_ok_and(|t| t.contains("\nstandby=1\n"))
            })
            .then_some(())
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", stack.logs()));
    let announced = "synjitsu_guests_announced_total";
    for (i, vm) in vms.iter().enumerate() {
        let before = stack.synjitsu_metric(announced);
        let got = stack.cold_start(vm).unwrap();
        assert!(got.ok(), "wake {i}: {got:?}\n{}", stack.logs());
        assert_eq!(
            (got.syns, got.syn_retransmits),
            (1, 0),
            "wake {i}: {got:?}\n{}",
            stack.logs()
        );
        assert!(
            got.after_listening_us.is_some(),
            "wake {i}: no announcement from the guest: {got:?}"
        );
        assert_eq!(
            stack.synjitsu_metric(announced),
            before + 1.0,
            "wake {i}: synjitsu did not count the guest's own announcement\n{}",
            stack.logs()
        );
    }
}

#[test]
fn qemu_uris_are_libvirts_unless_x_qemu_is_given() {
    prerequisites();
    let run = |args: &[&str]| {
        // Bounded: a jitsu-dns that wrongly accepted would serve forever.
        let out = Command::new("timeout")
            .arg("30")
            .arg(bin_path("jitsu-dns"))
            .args(["-l", "1053", "-f", "0.0.0.0"])
            .args(args)
            .arg("name=uk,dns=uk.example.org,ip=10.77.0.5,kernel=/k")
            .output()
            .unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    // A run directory without -x: refused at start, saying to add it.
    let (code, err) = run(&["-c", "qemu:///run/jitsu-test-q"]);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("add -x qemu"), "{err}");
    // libvirt's URI with -x qemu: refused by the backend, saying what it is.
    let (code, err) = run(&["-x", "qemu", "-c", "qemu:///system"]);
    assert_eq!(code, Some(1), "{err}");
    assert!(
        err.contains("this is libvirt's QEMU URI: use -x libvirt"),
        "{err}"
    );
    // --check says which backend each means.
    let (code, out) = {
        let o = Command::new(bin_path("jitsu-dns"))
            .args(["--check", "-c", "qemu:///system"])
            .arg("name=uk,dns=uk.example.org,ip=10.77.0.5,kernel=/k")
            .output()
            .unwrap();
        (
            o.status.code(),
            String::from_utf8_lossy(&o.stdout).into_owned(),
        )
    };
    assert_eq!(code, Some(0), "{out}");
    assert!(out.contains("backend libvirt at qemu:///system"), "{out}");
}
