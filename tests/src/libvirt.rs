//! A real libvirtd for tests, started by hand (no systemd) inside a test's host namespace, so
//! the taps of its QEMU guests join that namespace's `br0`; and the test guest image.
//!
//! libvirtd's sockets and state directories are global to the machine, so only one can run at
//! a time: [`Libvirtd::start`] takes an exclusive lock that the guard holds until it has
//! destroyed and undefined every domain it saw defined and stopped both daemons.
//!
//! For jitsu-dns's libvirt backend: [`GuestVm`] renders the VM spec that boots the project's
//! guest image (what `bench/cold-start --backend libvirt` passes to jitsu-dns), and
//! [`ConsoleWatch`] records the moment the guest prints `jitsu-guest: listening` on its
//! serial console (its `console_log` file), the reference for connection margins.

use std::fs::File;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use anyhow::{Context, Result, bail};

use crate::repo_root;
use crate::topo::{Daemon, Host};

/// The URI tests use: the system QEMU driver of the libvirtd started here.
pub const URI: &str = "qemu:///system";

/// Running `virtlogd` and `libvirtd`; stopped, with every domain removed, when dropped.
#[derive(Debug)]
pub struct Libvirtd {
    // Field order is drop order: domains go before the daemons, the lock last.
    cleanup: DomainCleanup,
    libvirtd: Daemon,
    _virtlogd: Daemon,
    _lock: File,
    host: String,
    log_dir: PathBuf,
}

#[derive(Debug)]
struct DomainCleanup;

impl Drop for DomainCleanup {
    fn drop(&mut self) {
        for name in list_domains().unwrap_or_default() {
            let _ = virsh(&["destroy", &name]);
            let _ = virsh(&["managedsave-remove", &name]);
            let _ = virsh(&["undefine", "--managed-save", "--nvram", &name]);
        }
    }
}

fn virsh(args: &[&str]) -> Result<String> {
    let out = crate::run(Command::new("virsh").arg("-c").arg(URI).args(args))?;
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Every domain libvirtd knows, running or not.
pub fn list_domains() -> Result<Vec<String>> {
    Ok(virsh(&["list", "--all", "--name"])?
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(str::to_string)
        .collect())
}

/// Gives `/dev/kvm` the group and mode Debian's udev rules give it (`root:kvm 0660`; the
/// `libvirt-qemu` user is in `kvm`). Without udev (a container) it stays `root:root 0600`, and
/// libvirt 9.0 then finds its cached QEMU capabilities outdated at every lookup (the node is
/// there but not usable by `libvirt-qemu`) and probes QEMU again each time: 4 s per start,
/// 44 s for the first define. Domains of type `qemu` run under TCG either way.
fn kvm_node_as_udev_sets_it() -> Result<()> {
    if !Path::new("/dev/kvm").exists() {
        return Ok(());
    }
    crate::run(Command::new("chgrp").args(["kvm", "/dev/kvm"]))?;
    crate::run(Command::new("chmod").args(["0660", "/dev/kvm"]))?;
    Ok(())
}

fn wait_answering(libvirtd: &Daemon) -> Result<()> {
    crate::wait_until("libvirtd to answer", Duration::from_secs(60), || {
        virsh(&["version"]).ok()
    })
    .with_context(|| format!("libvirtd's log:\n{}", libvirtd.log()))?;
    Ok(())
}

fn lock(path: &Path) -> Result<File> {
    let f = File::create(path).with_context(|| format!("creating {}", path.display()))?;
    f.lock()
        .with_context(|| format!("locking {}", path.display()))?;
    Ok(f)
}

impl Libvirtd {
    /// Starts virtlogd and libvirtd in `host`'s namespace (their logs in its directory) and
    /// waits until `virsh` answers. Fails saying what is missing if libvirt is not installed.
    pub fn start(host: &Host) -> Result<Libvirtd> {
        crate::require_tool("libvirtd", "libvirt-daemon-system");
        crate::require_tool("virsh", "libvirt-clients");
        crate::require_tool("qemu-system-x86_64", "qemu-system-x86");
        let lock = lock(Path::new("/run/jitsu-tests-libvirtd.lock"))?;
        for dir in ["/var/log/libvirt", "/run/libvirt", "/var/lib/libvirt/qemu"] {
            std::fs::create_dir_all(dir).with_context(|| format!("creating {dir}"))?;
        }
        kvm_node_as_udev_sets_it()?;
        // A libvirtd left by a crashed run would answer instead of ours, from another namespace.
        let _ = Command::new("pkill").args(["-x", "libvirtd"]).status();
        let _ = Command::new("pkill").args(["-x", "virtlogd"]).status();
        let virtlogd = host.spawn("/usr/sbin/virtlogd", &[])?;
        let libvirtd = host.spawn("/usr/sbin/libvirtd", &[])?;
        wait_answering(&libvirtd)?;
        Ok(Libvirtd {
            cleanup: DomainCleanup,
            libvirtd,
            _virtlogd: virtlogd,
            _lock: lock,
            host: host.ns().name().to_string(),
            log_dir: host.dir().to_path_buf(),
        })
    }

    /// Kills libvirtd (SIGKILL: a crash, not a clean stop) and starts it again in the same
    /// namespace, waiting until it answers. Running guests survive, as they do when libvirtd
    /// restarts on a real host; its clients lose their connection.
    pub fn restart(&mut self) -> Result<()> {
        crate::run(Command::new("kill").args(["-KILL", &self.libvirtd.pid().to_string()]))?;
        let _ = self.libvirtd.wait_exit(Duration::from_secs(30));
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.host, "/usr/sbin/libvirtd"]);
        let libvirtd = Daemon::start(cmd, "libvirtd", &self.log_dir)?;
        wait_answering(&libvirtd)?;
        self.libvirtd = libvirtd;
        Ok(())
    }

    /// libvirtd's log so far.
    pub fn log(&self) -> String {
        self.libvirtd.log()
    }

    /// Runs `virsh -c qemu:///system args...`, returning stdout.
    pub fn virsh(&self, args: &[&str]) -> Result<String> {
        let _ = &self.cleanup;
        virsh(args)
    }

    /// `virsh domstate --reason`: e.g. `running (booted)`, `shut off (saved)`.
    pub fn domstate(&self, name: &str) -> Result<String> {
        Ok(self
            .virsh(&["domstate", "--reason", name])?
            .trim()
            .to_string())
    }
}

/// The test guest image (kernel, initramfs), built by `guest/build-image` if needed.
#[derive(Debug, Clone)]
pub struct GuestImage {
    /// Uncompressed, PVH-bootable Debian kernel.
    pub kernel: PathBuf,
    /// Busybox initramfs whose `/init` is `guest/init`.
    pub initrd: PathBuf,
}

impl GuestImage {
    /// Builds (idempotently, cached under `.cache/guest`) and returns the image.
    pub fn build() -> Result<GuestImage> {
        let script = repo_root().join("guest/build-image");
        let out = crate::run(&mut Command::new(&script))
            .context("building the guest image (guest/build-image)")?;
        let text = String::from_utf8_lossy(&out.stdout);
        let mut lines = text.lines();
        let (Some(kernel), Some(initrd)) = (lines.next(), lines.next()) else {
            bail!("guest/build-image printed no paths: {text}");
        };
        Ok(GuestImage {
            kernel: kernel.into(),
            initrd: initrd.into(),
        })
    }
}

/// The process id of the QEMU running domain `name`, from libvirt's pid file, if it runs.
pub fn qemu_pid(name: &str) -> Option<u32> {
    let pid: u32 = std::fs::read_to_string(format!("/run/libvirt/qemu/{name}.pid"))
        .ok()?
        .trim()
        .parse()
        .ok()?;
    Path::new(&format!("/proc/{pid}")).exists().then_some(pid)
}

/// The kernel command line of the project's guest, before its `jitsu.*` keys: the console on
/// the first serial port, and the calibrations TCG would otherwise spend a second on.
pub const GUEST_CMDLINE: &str = "console=ttyS0 tsc_early_khz=2000000 no_timer_check quiet";

/// A jitsu-dns VM running the project's guest image under the libvirt backend.
///
/// ```no_run
/// # use jitsu_tests::libvirt::*;
/// let image = GuestImage::build().unwrap();
/// let vm = GuestVm::new("www", "www.example.org", "10.77.0.10".parse().unwrap(), 24, "02:77:00:00:00:10")
///     .console_log("/tmp/www.console")
///     .keys("use_synjitsu=true");
/// let spec = vm.spec(&image); // a positional argument of `jitsu-dns -x libvirt`
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GuestVm {
    /// The VM's (and its domain's) name.
    pub name: String,
    /// The name it answers to.
    pub dns: String,
    /// Its IPv4 address, given to the guest on its kernel command line.
    pub ip: Ipv4Addr,
    /// The prefix length of `ip`.
    pub prefix: u8,
    /// Its MAC.
    pub mac: String,
    /// The bridge its NIC joins (default `br0`).
    pub bridge: String,
    /// Memory in MiB (default 128).
    pub memory_mib: u64,
    /// Where its serial console goes, if anywhere.
    pub console_log: Option<PathBuf>,
    /// More keys, verbatim (`use_synjitsu=true`, `response_delay=0`, `stop_mode=suspend`...).
    pub extra: Vec<String>,
}

impl GuestVm {
    /// A VM on `br0` with 128 MiB, no console file, no masking keys.
    pub fn new(name: &str, dns: &str, ip: Ipv4Addr, prefix: u8, mac: &str) -> GuestVm {
        GuestVm {
            name: name.into(),
            dns: dns.into(),
            ip,
            prefix,
            mac: mac.into(),
            bridge: "br0".into(),
            memory_mib: 128,
            console_log: None,
            extra: Vec::new(),
        }
    }

    /// Joins `bridge` instead of `br0`.
    pub fn bridge(mut self, bridge: &str) -> GuestVm {
        self.bridge = bridge.into();
        self
    }

    /// Sends the serial console to `path` (to watch for `jitsu-guest: listening`).
    pub fn console_log(mut self, path: impl Into<PathBuf>) -> GuestVm {
        self.console_log = Some(path.into());
        self
    }

    /// Adds keys, comma-separated, verbatim: masking (`use_synjitsu=true`,
    /// `response_delay=0`, `wait_for=announce`), `stop_mode=suspend`, ...
    pub fn keys(mut self, keys: &str) -> GuestVm {
        self.extra.extend(
            keys.split(',')
                .filter(|k| !k.is_empty())
                .map(str::to_string),
        );
        self
    }

    /// The positional spec for `jitsu-dns -x libvirt`: the domain is defined from these keys
    /// at the first boot (machine `pc`, TCG, direct kernel boot of `image`).
    pub fn spec(&self, image: &GuestImage) -> String {
        let mut s = format!(
            "name={name},dns={dns},ip={ip}/{p},mac={mac},nic={br},memory={mem}M,kernel={k},\
             initrd={i},cmdline={GUEST_CMDLINE} jitsu.ip={ip}/{p} jitsu.name={name}",
            name = self.name,
            dns = self.dns,
            ip = self.ip,
            p = self.prefix,
            mac = self.mac,
            br = self.bridge,
            mem = self.memory_mib,
            k = image.kernel.display(),
            i = image.initrd.display(),
        );
        if let Some(c) = &self.console_log {
            s.push_str(&format!(",console_log={}", c.display()));
        }
        for k in &self.extra {
            s.push(',');
            s.push_str(k);
        }
        s
    }
}

/// When a line containing `needle` first appeared in a file, both as an [`Instant`] and as
/// wall-clock time (to compare with capture timestamps).
#[derive(Debug, Clone, Copy)]
pub struct Seen {
    /// The monotonic moment.
    pub at: Instant,
    /// The same moment on the wall clock.
    pub wall: SystemTime,
}

/// A thread that polls a file every 2 ms and records when `needle` first appears in it
/// (the guest's `jitsu-guest: listening` on its serial console). Its resolution is the poll
/// period plus QEMU's write to the file (unbuffered). Stops when dropped.
#[derive(Debug)]
pub struct ConsoleWatch {
    seen: Arc<Mutex<Option<Seen>>>,
    stop: Arc<std::sync::atomic::AtomicBool>,
    path: PathBuf,
}

impl ConsoleWatch {
    /// Starts watching `path` (which may not exist yet) for `needle`.
    pub fn start(path: &Path, needle: &str) -> ConsoleWatch {
        let seen: Arc<Mutex<Option<Seen>>> = Arc::default();
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (s, st, p, n) = (
            seen.clone(),
            stop.clone(),
            path.to_path_buf(),
            needle.to_string(),
        );
        std::thread::spawn(move || {
            while !st.load(std::sync::atomic::Ordering::Relaxed) {
                let text = std::fs::read(&p).unwrap_or_default();
                if String::from_utf8_lossy(&text).contains(&n) {
                    *s.lock().expect("not poisoned") = Some(Seen {
                        at: Instant::now(),
                        wall: SystemTime::now(),
                    });
                    return;
                }
                std::thread::sleep(Duration::from_millis(2));
            }
        });
        ConsoleWatch {
            seen,
            stop,
            path: path.to_path_buf(),
        }
    }

    /// When the needle appeared, if it has.
    pub fn seen(&self) -> Option<Seen> {
        *self.seen.lock().expect("not poisoned")
    }

    /// Waits until the needle appears, failing after `timeout` with the file's content.
    pub fn wait(&self, timeout: Duration) -> Result<Seen> {
        crate::wait_until("the expected console line", timeout, || self.seen()).with_context(|| {
            format!(
                "{} holds:\n{}",
                self.path.display(),
                std::fs::read_to_string(&self.path).unwrap_or_default()
            )
        })
    }
}

impl Drop for ConsoleWatch {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn guest_vm_specs_carry_the_image_the_address_and_the_keys() {
        let image = GuestImage {
            kernel: "/c/vmlinux".into(),
            initrd: "/c/initramfs.cpio.gz".into(),
        };
        let vm = GuestVm::new(
            "www",
            "www.example.org",
            Ipv4Addr::new(10, 77, 0, 10),
            24,
            "02:77:00:00:00:10",
        )
        .console_log("/tmp/www.console")
        .keys("use_synjitsu=true,stop_mode=suspend");
        assert_eq!(
            vm.clone().bridge("xenbr1").spec(&image).split(',').nth(4),
            Some("nic=xenbr1")
        );
        assert_eq!(
            vm.spec(&image),
            "name=www,dns=www.example.org,ip=10.77.0.10/24,mac=02:77:00:00:00:10,nic=br0,\
             memory=128M,kernel=/c/vmlinux,initrd=/c/initramfs.cpio.gz,cmdline=console=ttyS0 \
             tsc_early_khz=2000000 no_timer_check quiet jitsu.ip=10.77.0.10/24 jitsu.name=www,\
             console_log=/tmp/www.console,use_synjitsu=true,stop_mode=suspend"
        );
    }

    #[test]
    fn the_console_watch_sees_a_line_appear() {
        let dir = crate::Scratch::new("cw").unwrap();
        let f = dir.join("console.log");
        let w = ConsoleWatch::start(&f, "jitsu-guest: listening");
        std::fs::write(&f, "jitsu-guest: init uptime=1.5\n").unwrap();
        assert!(w.wait(Duration::from_millis(200)).is_err());
        let wrote = Instant::now();
        std::fs::write(
            &f,
            "jitsu-guest: init uptime=1.5\njitsu-guest: listening uptime=1.7\n",
        )
        .unwrap();
        let seen = w.wait(Duration::from_secs(10)).unwrap();
        assert!(seen.at >= wrote);
    }
}
