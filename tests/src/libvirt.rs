//! A real libvirtd for tests, started by hand (no systemd) inside a test's host namespace, so
//! the taps of its QEMU guests join that namespace's `br0`; and the test guest image.
//!
//! libvirtd's sockets and state directories are global to the machine, so only one can run at
//! a time: [`Libvirtd::start`] takes an exclusive lock that the guard holds until it has
//! destroyed and undefined every domain it saw defined and stopped both daemons.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use crate::topo::Daemon;
use crate::{Netns, repo_root};

/// The URI tests use: the system QEMU driver of the libvirtd started here.
pub const URI: &str = "qemu:///system";

/// Running `virtlogd` and `libvirtd`; stopped, with every domain removed, when dropped.
#[derive(Debug)]
pub struct Libvirtd {
    // Field order is drop order: domains go before the daemons, the lock last.
    cleanup: DomainCleanup,
    _libvirtd: Daemon,
    _virtlogd: Daemon,
    _lock: File,
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

fn lock(path: &Path) -> Result<File> {
    let f = File::create(path).with_context(|| format!("creating {}", path.display()))?;
    f.lock()
        .with_context(|| format!("locking {}", path.display()))?;
    Ok(f)
}

impl Libvirtd {
    /// Starts virtlogd and libvirtd inside `host` and waits until `virsh` answers. Fails saying
    /// what is missing if libvirt is not installed.
    pub fn start(host: &Netns, log_dir: &Path) -> Result<Libvirtd> {
        crate::require_tool("libvirtd", "libvirt-daemon-system");
        crate::require_tool("virsh", "libvirt-clients");
        crate::require_tool("qemu-system-x86_64", "qemu-system-x86");
        let lock = lock(Path::new("/run/jitsu-tests-libvirtd.lock"))?;
        for dir in ["/var/log/libvirt", "/run/libvirt", "/var/lib/libvirt/qemu"] {
            std::fs::create_dir_all(dir).with_context(|| format!("creating {dir}"))?;
        }
        // A libvirtd left by a crashed run would answer instead of ours, from another namespace.
        let _ = Command::new("pkill").args(["-x", "libvirtd"]).status();
        let _ = Command::new("pkill").args(["-x", "virtlogd"]).status();
        let virtlogd = Daemon::spawn(Some(host), Path::new("/usr/sbin/virtlogd"), &[], log_dir)?;
        let libvirtd = Daemon::spawn(Some(host), Path::new("/usr/sbin/libvirtd"), &[], log_dir)?;
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if virsh(&["version"]).is_ok() {
                break;
            }
            if Instant::now() > deadline {
                bail!(
                    "libvirtd did not answer within 60 s; its log:\n{}",
                    libvirtd.log()
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        Ok(Libvirtd {
            cleanup: DomainCleanup,
            _libvirtd: libvirtd,
            _virtlogd: virtlogd,
            _lock: lock,
        })
    }

    /// Runs `virsh -c qemu:///system args...`, returning stdout.
    pub fn virsh(&self, args: &[&str]) -> Result<String> {
        let _ = &self.cleanup;
        virsh(args)
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
