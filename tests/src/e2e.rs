//! The whole chain on one bridge, as on a Xen dom0: a host namespace with `br0`, synjitsu and
//! jitsu-dns on it, jitsu-dns's VMs (the process backend running `jitsu-test-guest`, QEMU
//! guests of the project's image under a hand-started libvirtd, or the project's unikernel
//! under QEMU microvm started by jitsu-dns itself) joining `br0`, and a client namespace whose
//! resolver is jitsu-dns.
//! [`Stack::cold_start`] runs one cold start the way a user's client does (`curl http://name/`)
//! and measures it; the end-to-end tests, the README's main job (`jitsu-e2e demo`) and
//! `bench/cold-start` (`jitsu-e2e bench`) are all built on it.
//!
//! Everything lives in namespaces the stack creates and is removed when it is dropped, also
//! on failure: daemons first, then VMs, then namespaces and files.

use std::fmt::Write as _;
use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result};

use crate::bin_path;
use crate::curl::Curl;
use crate::jitsu_dns::{Dig, ProcessVms, store_log, vm_value, wait_vm_state};
use crate::libvirt::{ConsoleWatch, GUEST_CMDLINE, GuestImage, Libvirtd};
use crate::synjitsu::Capture;
use crate::topo::{Daemon, Host, Member};
use crate::unikernel::{self, Listening};

/// The bridge's own address, where jitsu-dns serves DNS (dom0's address on `br0`).
pub const DNS_ADDR: &str = "10.77.0.1";
/// The client's address.
pub const CLIENT_ADDR: &str = "10.77.0.2";
/// The client's MAC.
pub const CLIENT_MAC: &str = "02:77:00:00:00:02";
/// synjitsu's probe address.
pub const PROBE_ADDR: &str = "10.77.0.253";
/// Prefix length of the stack's subnet.
pub const PREFIX: u8 = 16;
/// The zone the VMs' names are in.
pub const ZONE: &str = "example.org";
/// Where synjitsu's metrics are served inside the host namespace.
pub const SYNJITSU_METRICS: &str = "127.0.0.1:9477";
/// Where jitsu-dns's metrics are served inside the host namespace.
pub const JITSU_METRICS: &str = "127.0.0.1:9153";

/// What the stack needs: root, and the clients and tools it runs (`curl`, `dig`, `tcpdump`,
/// `nstat`, `arping`); fails saying which package is missing.
pub fn require_stack_tools() {
    crate::require_root();
    for (tool, package) in [
        ("curl", "curl"),
        ("dig", "dnsutils"),
        ("tcpdump", "tcpdump"),
        ("nstat", "iproute2"),
        ("arping", "iputils-arping"),
    ] {
        crate::require_tool(tool, package);
    }
}

/// How a VM's boot is masked.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Mask {
    /// Answered as soon as the backend started it (`response_delay=0`).
    None,
    /// A fixed `response_delay`, in milliseconds.
    Delay(u64),
    /// `wait_for=announce`: answered when synjitsu sees the guest's gratuitous ARP.
    Announce,
    /// `use_synjitsu`: answered at once, synjitsu holds the client's SYNs; with
    /// `announce=listening` where the guest keeps that promise (the unikernel, the test
    /// guest; not the Linux guest, whose echo port opens after its announcement): the held
    /// SYNs go at the guest's announcement, no probe.
    Synjitsu,
    /// `use_synjitsu` without the promise (`announce=boot`, the default): synjitsu probes
    /// the held port after the guest's announcement and re-sends the SYNs once it answers.
    SynjitsuProbe,
    /// `wait_for=tcp:80`: answered when the guest accepts a connection on its HTTP port,
    /// probed from the host (no synjitsu, no guest change).
    Tcp,
}

impl Mask {
    /// Every mode, in the order tables show them.
    pub const ALL: [Mask; 5] = [
        Mask::None,
        Mask::Delay(100),
        Mask::Announce,
        Mask::Synjitsu,
        Mask::Tcp,
    ];

    /// A short name for tables and VM names.
    pub fn label(self) -> String {
        match self {
            Mask::None => "none".into(),
            Mask::Delay(ms) => format!("delay {ms}ms"),
            Mask::Announce => "announce".into(),
            Mask::Synjitsu => "synjitsu".into(),
            Mask::SynjitsuProbe => "synjitsu+probe".into(),
            Mask::Tcp => "tcp:80".into(),
        }
    }

    fn slug(self) -> &'static str {
        match self {
            Mask::None => "none",
            Mask::Delay(_) => "delay",
            Mask::Announce => "announce",
            Mask::Synjitsu => "synjitsu",
            Mask::SynjitsuProbe => "probe",
            Mask::Tcp => "tcp",
        }
    }

    /// Its `[[vm]]` keys, for a guest that announces itself only once it listens
    /// (`listens_first`) or not.
    fn keys(self, listens_first: bool) -> String {
        match self {
            Mask::None => "response_delay = 0".into(),
            Mask::Delay(ms) => format!("response_delay = {}", ms as f64 / 1000.0),
            Mask::Announce => "wait_for = \"announce\"\nresponse_delay = 0".into(),
            Mask::Synjitsu if listens_first => {
                "use_synjitsu = true\nannounce = \"listening\"\nresponse_delay = 0".into()
            }
            Mask::Synjitsu | Mask::SynjitsuProbe => {
                "use_synjitsu = true\nresponse_delay = 0".into()
            }
            Mask::Tcp => "wait_for = \"tcp:80\"\nresponse_delay = 0".into(),
        }
    }
}

/// One VM of the stack.
#[derive(Debug, Clone)]
pub struct Vm {
    /// Its name; its DNS name is `<name>.example.org`.
    pub name: String,
    /// Its address.
    pub ip: Ipv4Addr,
    /// Its masking.
    pub mask: Mask,
    /// The guest's boot time (before it announces itself and listens).
    pub boot: Duration,
    /// Extra `key = value` lines for its `[[vm]]` table.
    pub extra: String,
    /// Who configures its interface (process backend): `guest` (the test guest, as a
    /// unikernel does) or `jitsu` (the backend, its default).
    pub ifup: &'static str,
}

impl Vm {
    /// The `n`th VM of the stack (addresses from 10.77.1.0 on).
    pub fn new(n: usize, mask: Mask, boot: Duration) -> Vm {
        let ip = Ipv4Addr::new(10, 77, 1 + (n / 200) as u8, 10 + (n % 200) as u8);
        Vm {
            name: format!("{}{n}", mask.slug()),
            ip,
            mask,
            boot,
            extra: String::new(),
            ifup: "guest",
        }
    }

    /// Its DNS name.
    pub fn dns(&self) -> String {
        format!("{}.{ZONE}", self.name)
    }

    /// The MAC jitsu-dns derives for it (no `mac` key is given).
    pub fn mac(&self) -> shared_proto::Mac {
        shared_proto::Mac::derived_from(self.name.as_bytes())
    }
}

/// What runs the VMs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// `jitsu-test-guest` in a network namespace, with the VM's boot time.
    Process,
    /// A QEMU guest (TCG) of `guest/build-image` under libvirtd; it boots as fast as it can.
    Libvirt,
    /// The Rust unikernel (`guest/unikernel`) under QEMU microvm (TCG), started by jitsu-dns
    /// itself (`-x qemu`); it boots as fast as it can.
    Qemu,
    /// The same unikernel under libvirtd: a microvm domain defined beforehand (libvirt 9
    /// starts microvm only without PCI devices, which jitsu-dns's definitions have), which
    /// jitsu-dns's libvirt backend uses as it is.
    LibvirtUnikernel,
}

impl Backend {
    /// `process`, `libvirt` or `qemu`, as `-x` names it.
    pub fn as_str(self) -> &'static str {
        match self {
            Backend::Process => "process",
            Backend::Libvirt | Backend::LibvirtUnikernel => "libvirt",
            Backend::Qemu => "qemu",
        }
    }
}

/// How the stack is set up.
#[derive(Debug, Clone)]
pub struct Options {
    /// What runs the VMs.
    pub backend: Backend,
    /// TTL of answers; VMs idle for twice this are stopped.
    pub ttl_secs: u32,
    /// synjitsu's `--hold-timeout`.
    pub hold_timeout: Duration,
    /// The client starts with every VM's MAC in its neighbour cache (`stale`), as a client
    /// that talked to it before: its SYN leaves at once instead of waiting for ARP.
    pub client_knows_macs: bool,
    /// Run synjitsu at all.
    pub synjitsu: bool,
    /// jitsu-dns's and synjitsu's `--log-level`.
    pub log_level: String,
    /// With the QEMU backend: keep a paused QEMU ready for each VM that is off
    /// (`standby=on`).
    pub qemu_standby: bool,
}

impl Default for Options {
    fn default() -> Options {
        Options {
            backend: Backend::Process,
            ttl_secs: 1,
            hold_timeout: Duration::from_secs(10),
            client_knows_macs: true,
            synjitsu: true,
            // JITSU_E2E_LOG=debug shows every decision of both daemons in failure messages.
            log_level: std::env::var("JITSU_E2E_LOG").unwrap_or_else(|_| "info".into()),
            qemu_standby: false,
        }
    }
}

/// The running chain. Fields drop in order: daemons, VMs, client, host (bridge, files).
#[derive(Debug)]
pub struct Stack {
    jitsu: Option<Daemon>,
    synjitsu: Option<Daemon>,
    /// libvirtd with the libvirt backend (destroys its domains when dropped).
    _libvirt: Option<Libvirtd>,
    image: Option<GuestImage>,
    /// The unikernel's ELF, with the QEMU backend.
    unikernel: Option<PathBuf>,
    /// The process backend's VMs (removed on drop).
    pub process_vms: ProcessVms,
    /// The client namespace.
    pub client: Member,
    _resolv: ResolvConf,
    /// The host namespace with `br0`, and its directory: logs, the store, the backend's
    /// runtime, the guests' report.
    pub host: Host,
    /// The VMs.
    pub vms: Vec<Vm>,
    opts: Options,
}

/// `/etc/netns/<client>/resolv.conf`, which `ip netns exec` mounts over `/etc/resolv.conf`.
#[derive(Debug)]
struct ResolvConf(PathBuf);

impl Drop for ResolvConf {
    fn drop(&mut self) {
        if let Some(dir) = self.0.parent() {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

/// One cold start, as the client saw it.
#[derive(Debug, Clone)]
pub struct ColdStart {
    /// The VM.
    pub vm: String,
    /// Name resolution (curl's `time_namelookup`).
    pub dns: Duration,
    /// TCP connected (`time_connect`).
    pub connect: Duration,
    /// First byte of the page (`time_starttransfer`).
    pub first_byte: Duration,
    /// When the first byte of the page reached the client, minus when the guest started
    /// listening, in microseconds: both from the same clock (the client's capture and the
    /// guest's report).
    pub after_listening_us: Option<i64>,
    /// When the first byte of the page reached the client, minus when the client sent its
    /// first SYN, in microseconds (the client's capture): for a guest already listening, what
    /// a connection costs at all, the floor of `after_listening_us`.
    pub after_syn_us: Option<i64>,
    /// From the client's DNS query leaving to the page's first byte arriving, both from its
    /// capture.
    pub query_to_first_byte: Option<Duration>,
    /// With the QEMU backend: from the client's DNS query leaving to jitsu-dns starting QEMU
    /// (its record), in microseconds.
    pub query_to_spawn_us: Option<i64>,
    /// With the QEMU backend: from jitsu-dns starting QEMU to the guest listening (its
    /// gratuitous ARP at the client), in microseconds.
    pub spawn_to_listening_us: Option<i64>,
    /// With the QEMU backend: the unikernel's own listening line (its time from entry, the
    /// firmware's before it).
    pub guest: Option<Listening>,
    /// SYNs the client sent for the connection (from its capture): 1 when it never waited
    /// for a retransmit timer.
    pub syns: usize,
    /// The client's SYN retransmissions during the connection (`TcpExtTCPSynRetrans`).
    pub syn_retransmits: u64,
    /// What went wrong, if the page did not arrive.
    pub error: Option<String>,
}

impl ColdStart {
    /// True if the page arrived.
    pub fn ok(&self) -> bool {
        self.error.is_none()
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// The wall clock in ns since the epoch, the clock of the guests' reports.
pub fn now_ns() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock after 1970")
        .as_nanos()
}

impl Stack {
    /// Builds the bridge, client and daemons for `vms` with the process backend running
    /// `jitsu-test-guest`, and waits until jitsu-dns answers.
    pub fn start(tag: &str, vms: Vec<Vm>, opts: Options) -> Result<Stack> {
        let host = Host::new(tag)?;
        host.address(&format!("{DNS_ADDR}/{PREFIX}"))?;
        let client = host.join(
            "cli",
            Some(CLIENT_MAC),
            &[&format!("{CLIENT_ADDR}/{PREFIX}")],
            true,
        )?;
        // The classic 1 s, 3 s, 7 s SYN timers (this kernel defaults to linear 1 s ones), so
        // the tables show what most clients on the Internet do.
        let _ = client
            .ns
            .sh("sysctl -qw net.ipv4.tcp_syn_linear_timeouts=0 2>/dev/null; true");
        let resolv_dir = PathBuf::from("/etc/netns").join(client.ns.name());
        std::fs::create_dir_all(&resolv_dir)?;
        let resolv = ResolvConf(resolv_dir.join("resolv.conf"));
        std::fs::write(
            &resolv.0,
            format!("nameserver {DNS_ADDR}\noptions timeout:10 attempts:1\n"),
        )?;
        let process_vms = ProcessVms::new(tag, host.file("run"));
        let (libvirt, image) = match opts.backend {
            Backend::Process | Backend::Qemu => (None, None),
            Backend::Libvirt => {
                let image = GuestImage::build()?;
                (Some(Libvirtd::start(&host)?), Some(image))
            }
            Backend::LibvirtUnikernel => (Some(Libvirtd::start(&host)?), None),
        };
        let unikernel = match opts.backend {
            Backend::Qemu | Backend::LibvirtUnikernel => Some(unikernel::elf()?),
            _ => None,
        };
        if let (Some(libvirtd), Some(elf), Backend::LibvirtUnikernel) =
            (&libvirt, &unikernel, opts.backend)
        {
            for vm in &vms {
                let xml = host.file(&format!("{}.xml", vm.name));
                let console = host.file(&format!("console-{}.log", vm.name));
                std::fs::write(
                    &xml,
                    unikernel::libvirt_domain_xml(
                        &vm.name,
                        &vm.mac().to_string(),
                        elf,
                        &format!("ip={}/{PREFIX} gw={DNS_ADDR}", vm.ip),
                        &console,
                    ),
                )?;
                libvirtd.virsh(&["define", &xml.display().to_string()])?;
            }
        }
        let mut stack = Stack {
            jitsu: None,
            synjitsu: None,
            _libvirt: libvirt,
            image,
            unikernel,
            process_vms,
            client,
            _resolv: resolv,
            host,
            vms,
            opts,
        };
        if stack.opts.synjitsu {
            stack.start_synjitsu()?;
        }
        stack.start_jitsu()?;
        Ok(stack)
    }

    fn control(&self) -> PathBuf {
        self.host.file("synjitsu.sock")
    }

    /// jitsu-dns's control socket (`jitsu-dns ctl`).
    fn jitsu_control(&self) -> PathBuf {
        self.host.file("jitsu.ctl")
    }

    /// Stops `vm` through `jitsu-dns ctl stop` (an error on a non-zero exit, with its stderr)
    /// and waits until the store says it is off.
    pub fn stop_vm(&self, vm: &str, timeout: Duration) -> Result<()> {
        crate::run(
            std::process::Command::new(bin_path("jitsu-dns"))
                .arg("ctl")
                .arg("--control")
                .arg(self.jitsu_control())
                .args(["stop", vm]),
        )?;
        self.wait_state(vm, "off", timeout)
    }

    /// The client's `dig @10.77.0.1 <name> A`, resolving through jitsu-dns.
    pub fn dig(&self, name: &str) -> Result<Dig> {
        crate::jitsu_dns::dig(&self.client.ns, &[&format!("@{DNS_ADDR}"), name, "A"])
    }

    /// The guests' report: `listening <name> <unix-ns>` lines.
    pub fn report(&self) -> PathBuf {
        self.host.file("report")
    }

    /// The state store.
    pub fn db(&self) -> PathBuf {
        self.host.file("db")
    }

    /// Starts (or restarts) synjitsu on `br0` and waits for its control socket.
    pub fn start_synjitsu(&mut self) -> Result<()> {
        let hold = format!("{}ms", self.opts.hold_timeout.as_millis());
        let args = [
            "--probe-ip",
            PROBE_ADDR,
            "--xenstore",
            "off",
            "--metrics",
            SYNJITSU_METRICS,
            "--hold-timeout",
            &hold,
            "--log-level",
            &self.opts.log_level,
        ];
        let d =
            crate::synjitsu::start(&self.host, &self.control(), &args, Duration::from_secs(30))?;
        self.synjitsu = Some(d);
        Ok(())
    }

    /// Kills synjitsu (SIGKILL: no clean-up, as a crash).
    pub fn kill_synjitsu(&mut self) {
        self.synjitsu = None;
    }

    /// Where a libvirt or QEMU guest's serial console goes.
    pub fn console(&self, vm: &Vm) -> PathBuf {
        self.host.file(&format!("console-{}.log", vm.name))
    }

    /// The QEMU backend's run directory.
    pub fn qemu_dir(&self) -> PathBuf {
        self.host.file("qemu")
    }

    /// When jitsu-dns started `vm`'s QEMU (or woke its standby), in ns since the epoch (its
    /// record), while it runs.
    pub fn qemu_spawned_ns(&self, vm: &Vm) -> Option<u128> {
        let text =
            std::fs::read_to_string(self.qemu_dir().join(format!("{}.state", vm.name))).ok()?;
        // jitsu-dns's record: `key=value` lines (backend::qemu::Record).
        text.lines()
            .find_map(|l| l.strip_prefix("spawned_ns="))?
            .parse()
            .ok()
    }

    fn config_toml(&self) -> String {
        let guest = bin_path("jitsu-test-guest");
        let mut t = String::new();
        if self.opts.backend == Backend::LibvirtUnikernel {
            // Their domains are defined: jitsu-dns uses them as they are.
            for vm in &self.vms {
                let _ = write!(
                    t,
                    "[[vm]]\nname = \"{}\"\ndns = [\"{}\"]\nip = \"{}/{PREFIX}\"\n{}\n{}\n\n",
                    vm.name,
                    vm.dns(),
                    vm.ip,
                    vm.mask.keys(true),
                    vm.extra,
                );
            }
            return t;
        }
        if let Some(elf) = &self.unikernel {
            for vm in &self.vms {
                let _ = write!(
                    t,
                    "[[vm]]\nname = \"{n}\"\ndns = [\"{d}\"]\nip = \"{ip}/{PREFIX}\"\nnic = \"br0\"\n\
                     kernel = \"{k}\"\ncmdline = \"ip={ip}/{PREFIX} gw={DNS_ADDR}\"\n\
                     console_log = \"{c}\"\n{m}\n{x}\n\n",
                    n = vm.name,
                    d = vm.dns(),
                    ip = vm.ip,
                    k = elf.display(),
                    c = self.console(vm).display(),
                    m = vm.mask.keys(true),
                    x = vm.extra,
                );
            }
            return t;
        }
        if let Some(image) = &self.image {
            for vm in &self.vms {
                let _ = write!(
                    t,
                    "[[vm]]\nname = \"{n}\"\ndns = [\"{d}\"]\nip = \"{ip}/{PREFIX}\"\nnic = \"br0\"\n\
                     memory = \"128M\"\nkernel = \"{k}\"\ninitrd = \"{i}\"\n\
                     cmdline = \"{GUEST_CMDLINE} jitsu.ip={ip}/{PREFIX} jitsu.name={n}\"\n\
                     console_log = \"{c}\"\n{m}\n{x}\n\n",
                    n = vm.name,
                    d = vm.dns(),
                    ip = vm.ip,
                    k = image.kernel.display(),
                    i = image.initrd.display(),
                    c = self.console(vm).display(),
                    m = vm.mask.keys(false),
                    x = vm.extra,
                );
            }
            return t;
        }
        for vm in &self.vms {
            let _ = write!(
                t,
                "[[vm]]\nname = \"{}\"\ndns = [\"{}\"]\nip = \"{}/{PREFIX}\"\nifup = \"{}\"\n\
                 command = \"exec {} --boot-ms {} --report {}\"\n{}\n{}\n\n",
                vm.name,
                vm.dns(),
                vm.ip,
                vm.ifup,
                guest.display(),
                vm.boot.as_millis(),
                self.report().display(),
                vm.mask.keys(true),
                vm.extra,
            );
        }
        t
    }

    /// Starts (or restarts) jitsu-dns and waits until it answers DNS.
    pub fn start_jitsu(&mut self) -> Result<()> {
        let config = self.host.file("jitsu.toml");
        std::fs::write(&config, self.config_toml())?;
        let ttl = self.opts.ttl_secs.to_string();
        let uri = match self.opts.backend {
            Backend::Process => self.process_vms.uri(None),
            Backend::Libvirt | Backend::LibvirtUnikernel => crate::libvirt::URI.to_string(),
            Backend::Qemu => format!(
                "qemu://{}?standby={}",
                self.qemu_dir().display(),
                if self.opts.qemu_standby { "on" } else { "off" }
            ),
        };
        let backend = self.opts.backend.as_str();
        let (config_s, db_s, control_s, jitsu_control_s) = (
            config.display().to_string(),
            self.db().display().to_string(),
            self.control().display().to_string(),
            self.jitsu_control().display().to_string(),
        );
        let mut args = vec![
            "-b",
            DNS_ADDR,
            "-l",
            "53",
            "-f",
            "0.0.0.0",
            "-t",
            &ttl,
            "-x",
            backend,
            "-c",
            &uri,
            "--persistdb",
            &db_s,
            "--config",
            &config_s,
            "--metrics",
            JITSU_METRICS,
            "--log-level",
            &self.opts.log_level,
            "--control",
            &jitsu_control_s,
        ];
        if self.opts.synjitsu {
            args.extend(["--synjitsu", &control_s]);
        }
        // Answering for its zone: the configuration is loaded.
        let d = crate::jitsu_dns::start(
            &self.host,
            &args,
            &[],
            &[&format!("@{DNS_ADDR}"), ZONE, "SOA"],
            "status: NOERROR",
        )?;
        self.jitsu = Some(d);
        Ok(())
    }

    /// Stops jitsu-dns with SIGTERM (its VMs keep running) and waits for it to exit.
    pub fn stop_jitsu(&mut self) -> Result<Option<i32>> {
        let mut d = self.jitsu.take().context("jitsu-dns is not running")?;
        d.stop(Duration::from_secs(30))
    }

    /// jitsu-dns's log so far.
    pub fn jitsu_log(&self) -> String {
        self.jitsu.as_ref().map(Daemon::log).unwrap_or_default()
    }

    /// synjitsu's log so far.
    pub fn synjitsu_log(&self) -> String {
        self.synjitsu.as_ref().map(Daemon::log).unwrap_or_default()
    }

    /// Both daemons' logs, for failure messages.
    pub fn logs(&self) -> String {
        format!(
            "--- jitsu-dns ---\n{}\n--- synjitsu ---\n{}",
            self.jitsu_log(),
            self.synjitsu_log()
        )
    }

    /// A VM's value in the store (`state`, `starts`...).
    pub fn stored(&self, vm: &str, key: &str) -> Option<String> {
        vm_value(&self.db(), vm, key)
    }

    /// The store's history, newest first.
    pub fn history(&self) -> Vec<String> {
        store_log(&self.db())
    }

    /// Waits until the store says `vm` is `state`.
    pub fn wait_state(&self, vm: &str, state: &str, timeout: Duration) -> Result<()> {
        wait_vm_state(&self.db(), vm, state, timeout).with_context(|| self.logs())
    }

    /// One of synjitsu's metric samples (exact name with labels); 0 if absent.
    pub fn synjitsu_metric(&self, name: &str) -> f64 {
        crate::curl::metric(self.host.ns(), SYNJITSU_METRICS, name)
    }

    fn syn_retrans(&self) -> Result<u64> {
        let out = self.client.ns.sh("nstat -asz TcpExtTCPSynRetrans")?;
        Ok(out
            .lines()
            .find_map(|l| {
                let mut w = l.split_whitespace();
                (w.next() == Some("TcpExtTCPSynRetrans"))
                    .then(|| w.next().and_then(|v| v.parse().ok()))
                    .flatten()
            })
            .unwrap_or(0))
    }

    /// The last time `vm`'s guest reported listening, at or after `since_ns`.
    pub fn listening_since(&self, vm: &str, since_ns: u128) -> Option<u128> {
        let text = std::fs::read_to_string(self.report()).ok()?;
        text.lines()
            .filter_map(|l| {
                let w: Vec<&str> = l.split_whitespace().collect();
                (w.len() == 3 && w[0] == "listening" && w[1] == vm)
                    .then(|| w[2].parse::<u128>().ok())
                    .flatten()
            })
            .filter(|t| *t >= since_ns)
            .max()
    }

    /// One cold start of `vm` from the client: `curl http://<name>/`, resolving through
    /// jitsu-dns. Never fails for the client's sake: a client failure is in the result.
    pub fn cold_start(&self, vm: &Vm) -> Result<ColdStart> {
        self.fetch(vm, &vm.dns())
    }

    /// Like [`Stack::cold_start`] but to the address, with no DNS (a client that cached it).
    pub fn cached_start(&self, vm: &Vm) -> Result<ColdStart> {
        self.fetch(vm, &vm.ip.to_string())
    }

    fn fetch(&self, vm: &Vm, host: &str) -> Result<ColdStart> {
        if self.opts.client_knows_macs {
            // Set just before each fetch: the kernel collects stale entries after a minute
            // once it holds more than 128, and a client that must ARP instead sends its SYN
            // only when the guest's gratuitous ARP arrives: another experiment.
            self.client.ns.sh(&format!(
                "ip neigh replace {} lladdr {} dev eth0 nud stale",
                vm.ip,
                vm.mac()
            ))?;
        }
        // A libvirt guest says when it listens on its serial console, which QEMU truncates
        // at every start.
        let console = (self.opts.backend == Backend::Libvirt).then(|| {
            let path = self.console(vm);
            let _ = std::fs::remove_file(&path);
            ConsoleWatch::start(&path, "jitsu-guest: listening")
        });
        // On `any`, so each frame says whether the client sent it (`Out`) or received it: a
        // SYN synjitsu re-sends to the guest may be flooded back to the client's port.
        let capture = Capture::start(&self.client.ns, "any", self.host.dir(), "cold")?;
        let before = self.syn_retrans()?;
        let started_ns = now_ns();
        let got = Curl::get(format!("http://{host}/"))
            .max_time(Duration::from_secs(20))
            .run(&self.client.ns)?;
        let after = self.syn_retrans()?;
        let frames = capture.finish()?;
        let error = (!got.ok()).then(|| {
            format!(
                "curl exit {}, HTTP {}: {}",
                got.exit, got.http_code, got.error
            )
        });
        let ip = vm.ip.to_string();
        // The unikernel's first frame is its gratuitous ARP, sent as it starts listening:
        // seen at the client, on the same clock as the page's first byte.
        let listening = match (&console, self.opts.backend) {
            (Some(watch), _) => watch.seen().map(|s| {
                s.wall
                    .duration_since(UNIX_EPOCH)
                    .expect("clock after 1970")
                    .as_nanos()
            }),
            (None, Backend::Qemu | Backend::LibvirtUnikernel) => garp_from(&frames, &ip),
            (None, _) => self.listening_since(&vm.name, started_ns),
        };
        let first_data = first_data_from(&frames, &ip).filter(|_| error.is_none());
        let us = |a: Option<u128>, b: Option<u128>| match (a, b) {
            (Some(a), Some(b)) => Some(((a as i128 - b as i128) / 1000) as i64),
            _ => None,
        };
        let query = dns_query_from(&frames);
        let spawned = (self.opts.backend == Backend::Qemu)
            .then(|| self.qemu_spawned_ns(vm))
            .flatten()
            .filter(|t| *t >= started_ns);
        let guest = matches!(self.opts.backend, Backend::Qemu | Backend::LibvirtUnikernel)
            .then(|| {
                let text = std::fs::read_to_string(self.console(vm)).unwrap_or_default();
                unikernel::parse_listening(&text)
            })
            .flatten();
        Ok(ColdStart {
            vm: vm.name.clone(),
            dns: got.namelookup,
            connect: got.connect,
            first_byte: got.first_byte,
            after_listening_us: us(first_data, listening),
            after_syn_us: us(first_data, first_syn_to(&frames, &ip)),
            query_to_first_byte: us(first_data, query)
                .and_then(|u| u64::try_from(u).ok())
                .map(Duration::from_micros),
            query_to_spawn_us: us(spawned, query),
            spawn_to_listening_us: us(listening, spawned),
            guest,
            syns: syns_to(&frames, &ip),
            syn_retransmits: after.saturating_sub(before),
            error,
        })
    }

    /// Waits until every VM is off in the store (idle stop), returning how long it took.
    pub fn wait_all_off(&self, timeout: Duration) -> Result<Duration> {
        let t0 = Instant::now();
        for vm in &self.vms {
            self.wait_state(&vm.name, "off", timeout.saturating_sub(t0.elapsed()))?;
        }
        Ok(t0.elapsed())
    }

    /// Runs `jitsu-dns state <what>` on the store.
    pub fn state_cli(&self, what: &str) -> Result<String> {
        let out = crate::run(
            std::process::Command::new(bin_path("jitsu-dns"))
                .args(["state", what, "--persistdb"])
                .arg(self.db()),
        )?;
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// The options the stack runs with.
    pub fn options(&self) -> &Options {
        &self.opts
    }
}

/// SYNs the client sent to `ip:80`, in `tcpdump -i any -nn -tt` lines.
pub fn syns_to(frames: &[String], ip: &str) -> usize {
    let to = " Out IP ";
    let dst = format!("> {ip}.80:");
    frames
        .iter()
        .filter(|l| l.contains(to) && l.contains(&dst) && l.contains("Flags [S]"))
        .count()
}

/// The capture time at the start of a `tcpdump -tt` line, in ns since the epoch.
fn capture_ns(line: &str) -> Option<u128> {
    let ts = line.split_whitespace().next()?;
    let (secs, frac) = ts.split_once('.')?;
    let frac = format!("{frac:0<9}");
    Some(secs.parse::<u128>().ok()? * 1_000_000_000 + frac.get(..9)?.parse::<u128>().ok()?)
}

/// When the first frame carrying data from `ip:80` reached the client, in ns since the
/// epoch (`tcpdump -i any -nn -tt` lines).
pub fn first_data_from(frames: &[String], ip: &str) -> Option<u128> {
    let from = format!(" In  IP {ip}.80 > ");
    frames
        .iter()
        .find(|l| l.contains(&from) && !l.ends_with("length 0"))
        .and_then(|l| capture_ns(l))
}

/// When the client's first DNS query to jitsu-dns left, in ns since the epoch.
pub fn dns_query_from(frames: &[String]) -> Option<u128> {
    let to = format!(" Out IP {CLIENT_ADDR}.");
    let dst = format!(" > {DNS_ADDR}.53: ");
    frames
        .iter()
        .find(|l| l.contains(&to) && l.contains(&dst))
        .and_then(|l| capture_ns(l))
}

/// When the guest's own gratuitous ARP (the request form, which synjitsu's stand-in replies
/// are not) reached the client, in ns since the epoch. tcpdump marks a received broadcast
/// `B`, not `In`.
pub fn garp_from(frames: &[String], ip: &str) -> Option<u128> {
    let garp = format!(" ARP, Request who-has {ip} tell {ip}, ");
    frames
        .iter()
        .find(|l| l.contains(&garp) && !l.contains(" Out "))
        .and_then(|l| capture_ns(l))
}

/// When the client sent its first SYN to `ip:80`, in ns since the epoch.
pub fn first_syn_to(frames: &[String], ip: &str) -> Option<u128> {
    let dst = format!("> {ip}.80:");
    frames
        .iter()
        .find(|l| l.contains(" Out IP ") && l.contains(&dst) && l.contains("Flags [S]"))
        .and_then(|l| capture_ns(l))
}

/// A millisecond figure for tables.
pub fn fmt_ms(d: Duration) -> String {
    format!("{:.1}", ms(d))
}

/// Renders cold starts as the table the README's main job prints.
pub fn table(rows: &[(String, ColdStart)]) -> String {
    let mut t = String::new();
    let _ = writeln!(
        t,
        "{:<14} {:>8} {:>11} {:>12} {:>16} {:>5} {:>8}  result",
        "mode", "DNS ms", "connect ms", "1st byte ms", "after listen ms", "SYNs", "SYN rtx",
    );
    for (label, c) in rows {
        let after = c
            .after_listening_us
            .map(|us| format!("{:.1}", us as f64 / 1000.0))
            .unwrap_or_else(|| "-".into());
        let _ = writeln!(
            t,
            "{:<14} {:>8} {:>11} {:>12} {:>16} {:>5} {:>8}  {}",
            label,
            fmt_ms(c.dns),
            fmt_ms(c.connect),
            fmt_ms(c.first_byte),
            after,
            c.syns,
            c.syn_retransmits,
            c.error.as_deref().unwrap_or("ok")
        );
    }
    t
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn captures_give_syns_and_the_first_data() {
        let frames: Vec<String> = [
            "1795697218.356099 eth0  Out ARP, Request who-has 10.77.0.1 tell 10.77.0.2, length 28",
            "1795697218.400000 eth0  Out IP 10.77.0.2.40000 > 10.77.1.10.80: Flags [S], seq 1, length 0",
            "1795697218.800000 eth0  In  IP 10.77.0.2.40000 > 10.77.1.10.80: Flags [S], seq 1, length 0",
            "1795697219.400000 eth0  Out IP 10.77.0.2.40000 > 10.77.1.10.80: Flags [S], seq 1, length 0",
            "1795697219.400100 eth0  In  IP 10.77.1.10.80 > 10.77.0.2.40000: Flags [S.], seq 9, ack 2, length 0",
            "1795697219.400200 eth0  Out IP 10.77.0.2.40000 > 10.77.1.10.80: Flags [P.], seq 1:80, length 79",
            "1795697219.4005 eth0  In  IP 10.77.1.10.80 > 10.77.0.2.40000: Flags [P.], seq 1:120, length 119",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        assert_eq!(syns_to(&frames, "10.77.1.10"), 2);
        assert_eq!(syns_to(&frames, "10.77.1.11"), 0);
        assert_eq!(
            first_data_from(&frames, "10.77.1.10"),
            Some(1_795_697_219_400_500_000)
        );
        assert_eq!(
            first_syn_to(&frames, "10.77.1.10"),
            Some(1_795_697_218_400_000_000)
        );
        assert_eq!(dns_query_from(&frames), None);
    }

    #[test]
    fn captures_give_the_dns_query_and_the_guests_own_announcement() {
        let frames: Vec<String> = [
            "1795697218.300000 eth0  Out IP 10.77.0.2.51234 > 10.77.0.1.53: 4242+ A? uk0.example.org. (33)",
            "1795697218.300900 eth0  In  IP 10.77.0.1.53 > 10.77.0.2.51234: 4242* 1/0/0 A 10.77.1.10 (49)",
            "1795697218.301000 eth0  In  ARP, Reply 10.77.1.10 is-at 0a:00:00:00:00:01, length 46",
            "1795697218.330000 eth0  Out ARP, Request who-has 10.77.1.10 tell 10.77.1.10, length 28",
            "1795697218.340123 eth0  B   ARP, Request who-has 10.77.1.10 tell 10.77.1.10, length 46",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        assert_eq!(dns_query_from(&frames), Some(1_795_697_218_300_000_000));
        // synjitsu's stand-in replies are not the guest's announcement.
        assert_eq!(
            garp_from(&frames, "10.77.1.10"),
            Some(1_795_697_218_340_123_000)
        );
        assert_eq!(garp_from(&frames, "10.77.1.11"), None);
    }
}
