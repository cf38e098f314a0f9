//! What a VM's QEMU is started with and what is kept of it, as pure functions: the command
//! line ([`qemu_args`]) and the record of a running QEMU ([`Record`]).
//!
//! Starting it, and reading and writing the files, is the backend's.

use std::ffi::OsString;
use std::os::fd::RawFd;
use std::path::Path;

use crate::backend::libvirt::DEFAULT_MEMORY_KIB;
use crate::backend::record_value;
use crate::config::{StopMode, VmConfig};

/// QEMU's seccomp filter, as libvirt sets it: no obsolete system calls, no privilege changes,
/// no new processes, no resource controls (QEMU runs as root here; it costs no measurable
/// start-up time).
pub const SANDBOX: &str = "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny";

/// microvm without the legacy devices a PVH guest on virtio-mmio does not use: each costs
/// start-up time (`x-option-roms=off` alone saves the option ROMs' load and run).
pub const MACHINE: &str = "microvm,x-option-roms=off,pit=off,pic=off,rtc=off";

/// Added to [`MACHINE`] for a VM that is never asked to power off: without ACPI the firmware
/// has no tables to load and QEMU writes the virtio-mmio devices on the guest's command line
/// (which Linux and jitsu's unikernel both read) instead of leaving them to be probed. Measured
/// here under TCG: ~3 ms less CPU from exec to the unikernel listening (of ~40), all of it
/// after the guest's first instruction (QEMU's own start is the same either way).
/// ACPI stays for `stop_mode=shutdown`: on microvm the power button (`system_powerdown`) is an
/// ACPI event, and a guest without it would only ever be destroyed after the grace.
pub const NO_ACPI: &str = ",acpi=off";

/// The `-M` value for `vm`: [`MACHINE`], and [`NO_ACPI`] unless its stop mode is `shutdown`.
pub fn machine(vm: &VmConfig) -> String {
    match vm.stop_mode {
        StopMode::Shutdown => MACHINE.to_string(),
        StopMode::Destroy | StopMode::Suspend => format!("{MACHINE}{NO_ACPI}"),
    }
}

/// How the guest's CPU runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Accel {
    /// QEMU's own translator.
    Tcg,
    /// The host's KVM, with QEMU's default CPU model: what any KVM runs (`-cpu host` fails
    /// on nested KVMs that do not pass every MSR through, as here), and all a PVH guest
    /// needs.
    Kvm,
}

impl Accel {
    /// `tcg` or `kvm`.
    pub fn as_str(self) -> &'static str {
        match self {
            Accel::Tcg => "tcg",
            Accel::Kvm => "kvm",
        }
    }
}

/// Where a started QEMU finds what jitsu-dns prepared for it.
#[derive(Debug, Clone, Copy)]
pub struct Plan<'a> {
    /// The accelerator.
    pub accel: Accel,
    /// The tap device's descriptor, inherited.
    pub tap_fd: RawFd,
    /// The QMP socket's listening descriptor, inherited.
    pub qmp_fd: RawFd,
    /// Where QEMU writes (and locks) its pid.
    pub pidfile: &'a Path,
    /// Started paused before the guest's first instruction (`-S`), to be woken by `cont`.
    pub standby: bool,
}

/// QEMU's arguments for `vm` (the program itself not included): microvm, the kernel booted
/// directly (PVH) with its command line, one virtio-net device on the tap, QMP on the
/// inherited socket, the serial console to `console_log` (or nowhere), no reboot (a guest
/// that resets has stopped), no ACPI unless the guest may be asked to power off ([`machine`]),
/// QEMU's seccomp sandbox; paused before the first instruction for a standby. `None` if the
/// VM has no kernel.
pub fn qemu_args(vm: &VmConfig, p: &Plan<'_>) -> Option<Vec<OsString>> {
    let kernel = vm.kernel.as_deref()?;
    let mut a: Vec<OsString> = Vec::with_capacity(40);
    let mut push = |s: &str| a.push(s.into());
    push("-name");
    push(&format!("guest={},debug-threads=off", vm.name));
    push("-M");
    push(&machine(vm));
    push("-accel");
    push(p.accel.as_str());
    push("-m");
    push(&format!("{}k", vm.memory_kib.unwrap_or(DEFAULT_MEMORY_KIB)));
    for s in [
        "-nodefaults",
        "-no-user-config",
        "-display",
        "none",
        "-no-reboot",
    ] {
        push(s);
    }
    if p.standby {
        push("-S");
    }
    push("-sandbox");
    push(SANDBOX);
    push("-netdev");
    push(&format!("tap,id=net0,fd={}", p.tap_fd));
    push("-device");
    push(&format!("virtio-net-device,netdev=net0,mac={}", vm.mac()));
    push("-chardev");
    push(&format!("socket,id=qmp,fd={},server=on,wait=off", p.qmp_fd));
    push("-mon");
    push("chardev=qmp,mode=control");
    push("-serial");
    let serial = match &vm.console_log {
        Some(path) => {
            let mut s = OsString::from("file:");
            s.push(path);
            s
        }
        None => OsString::from("null"),
    };
    a.push(serial);
    a.push("-pidfile".into());
    a.push(p.pidfile.into());
    a.push("-kernel".into());
    a.push(kernel.into());
    if let Some(initrd) = &vm.initrd {
        a.push("-initrd".into());
        a.push(initrd.into());
    }
    if let Some(cmdline) = &vm.cmdline {
        a.push("-append".into());
        a.push(cmdline.into());
    }
    Some(a)
}

/// The fingerprint of what `vm`'s QEMU is started with (its command line, descriptors
/// aside): a standby QEMU started for other keys is not the VM any more.
pub fn fingerprint(vm: &VmConfig, accel: Accel, pidfile: &Path) -> u64 {
    let plan = Plan {
        accel,
        tap_fd: -1,
        qmp_fd: -1,
        pidfile,
        standby: false,
    };
    // 64-bit FNV-1a: stable across versions, unlike std's hasher.
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for arg in qemu_args(vm, &plan).unwrap_or_default() {
        for b in arg.as_encoded_bytes().iter().chain([&0u8]) {
            h ^= u64::from(*b);
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
    }
    h
}

/// A running QEMU as recorded at its start: its pid and that pid's start time (a reused pid
/// is not the VM), its tap, its accelerator, when its guest started running (Unix
/// nanoseconds: its spawn, or its wake-up for a standby), whether it is a standby not woken
/// yet, and the fingerprint of its command line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    /// The QEMU process.
    pub pid: u32,
    /// Its start time, in clock ticks after boot (`/proc/<pid>/stat`).
    pub start: u64,
    /// The tap device.
    pub tap: String,
    /// The accelerator it runs with.
    pub accel: Accel,
    /// When jitsu-dns started it (or woke it, for a standby), in nanoseconds since the Unix
    /// epoch.
    pub spawned_ns: u128,
    /// Paused before its first instruction, waiting to be woken (not running, to the fleet).
    pub standby: bool,
    /// [`fingerprint`] of the keys it was started with.
    pub config: u64,
}

impl Record {
    /// The record as its file holds it: `key=value` lines.
    pub fn to_text(&self) -> String {
        format!(
            "pid={}\nstart={}\ntap={}\naccel={}\nspawned_ns={}\nstandby={}\nconfig={:016x}\n",
            self.pid,
            self.start,
            self.tap,
            self.accel.as_str(),
            self.spawned_ns,
            u8::from(self.standby),
            self.config
        )
    }

    /// Reads a record's text; `None` if anything is missing or malformed.
    pub fn parse(text: &str) -> Option<Record> {
        let get = |k: &str| record_value(text, k);
        Some(Record {
            pid: get("pid")?.parse().ok()?,
            start: get("start")?.parse().ok()?,
            tap: get("tap")?.to_string(),
            accel: match get("accel")? {
                "tcg" => Accel::Tcg,
                "kvm" => Accel::Kvm,
                _ => return None,
            },
            spawned_ns: get("spawned_ns")?.parse().ok()?,
            standby: match get("standby")? {
                "0" => false,
                "1" => true,
                _ => return None,
            },
            config: u64::from_str_radix(get("config")?, 16).ok()?,
        })
    }
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use super::*;
    use crate::config::{Flags, merge};

    fn vm(spec: &str) -> VmConfig {
        let f = Flags {
            backend: Some("qemu".into()),
            specs: vec![format!("name=uk,dns=uk.example.org,ip=10.0.0.5,{spec}")],
            ..Flags::default()
        };
        merge(&f, None).unwrap().vms.remove(0)
    }

    fn line(vm: &VmConfig, accel: Accel) -> String {
        let pidfile = PathBuf::from("/run/jitsu/qemu/uk.pid");
        let plan = Plan {
            accel,
            tap_fd: 7,
            qmp_fd: 9,
            pidfile: &pidfile,
            standby: false,
        };
        let args = qemu_args(vm, &plan).unwrap();
        args.iter()
            .map(|a| a.to_string_lossy().into_owned())
            .collect::<Vec<_>>()
            .join(" ")
    }

    #[test]
    fn a_vm_is_microvm_with_its_kernel_tap_and_qmp_on_inherited_descriptors() {
        let v = vm(
            "kernel=/k/uk.elf,cmdline=ip=10.0.0.5/24 gw=10.0.0.1,mac=02:00:00:00:00:05,\
                    memory=32M,console_log=/var/log/uk.console",
        );
        let l = line(&v, Accel::Tcg);
        assert_eq!(
            l,
            "-name guest=uk,debug-threads=off \
             -M microvm,x-option-roms=off,pit=off,pic=off,rtc=off,acpi=off \
             -accel tcg -m 32768k -nodefaults -no-user-config -display none -no-reboot \
             -sandbox on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny \
             -netdev tap,id=net0,fd=7 -device virtio-net-device,netdev=net0,mac=02:00:00:00:00:05 \
             -chardev socket,id=qmp,fd=9,server=on,wait=off -mon chardev=qmp,mode=control \
             -serial file:/var/log/uk.console -pidfile /run/jitsu/qemu/uk.pid -kernel /k/uk.elf \
             -append ip=10.0.0.5/24 gw=10.0.0.1"
        );
        // The command line is one argument, spaces and all.
        let pidfile = PathBuf::from("/p");
        let args = qemu_args(
            &v,
            &Plan {
                accel: Accel::Tcg,
                tap_fd: 7,
                qmp_fd: 9,
                pidfile: &pidfile,
                standby: false,
            },
        )
        .unwrap();
        assert_eq!(args.last().unwrap(), "ip=10.0.0.5/24 gw=10.0.0.1");
    }

    #[test]
    fn kvm_is_asked_for_and_defaults_are_libvirts() {
        let v = vm("kernel=/k/uk.elf,initrd=/k/i");
        let l = line(&v, Accel::Kvm);
        assert!(l.contains(" -accel kvm -m 131072k "), "{l}");
        assert!(l.contains(" -serial null "), "{l}");
        assert!(l.ends_with(" -kernel /k/uk.elf -initrd /k/i"), "{l}");
        assert!(l.contains(&format!("mac={}", v.mac())), "{l}");
    }

    #[test]
    fn acpi_is_kept_only_for_a_vm_that_is_shut_down_with_the_power_button() {
        for (spec, acpi) in [
            ("kernel=/k/uk.elf", false),
            ("kernel=/k/uk.elf,stop_mode=destroy", false),
            ("kernel=/k/uk.elf,stop_mode=suspend", false),
            ("kernel=/k/uk.elf,stop_mode=shutdown", true),
        ] {
            let l = line(&vm(spec), Accel::Tcg);
            assert_eq!(!l.contains(",acpi=off "), acpi, "{spec}: {l}");
            assert!(l.contains(&format!(" -M {MACHINE}")), "{spec}: {l}");
        }
    }

    #[test]
    fn a_standby_is_paused_at_birth_and_the_fingerprint_follows_the_keys() {
        let v = vm("kernel=/k/uk.elf");
        let pidfile = PathBuf::from("/p");
        let plan = Plan {
            accel: Accel::Tcg,
            tap_fd: 7,
            qmp_fd: 9,
            pidfile: &pidfile,
            standby: true,
        };
        let args = qemu_args(&v, &plan).unwrap();
        assert!(args.iter().any(|a| a == "-S"));
        let f = fingerprint(&v, Accel::Tcg, &pidfile);
        assert_eq!(f, fingerprint(&v, Accel::Tcg, &pidfile));
        assert_ne!(f, fingerprint(&v, Accel::Kvm, &pidfile));
        assert_ne!(
            f,
            fingerprint(&vm("kernel=/k/uk.elf,memory=64M"), Accel::Tcg, &pidfile)
        );
        assert_ne!(
            f,
            fingerprint(&vm("kernel=/k/uk.elf,cmdline=x"), Accel::Tcg, &pidfile)
        );
    }

    #[test]
    fn records_round_trip_and_bad_ones_are_none() {
        let r = Record {
            pid: 42,
            start: 1234,
            tap: "jq0".into(),
            accel: Accel::Kvm,
            spawned_ns: 1_796_546_390_720_403_000,
            standby: true,
            config: 0x0123_4567_89ab_cdef,
        };
        assert_eq!(Record::parse(&r.to_text()), Some(r.clone()));
        assert_eq!(Record::parse("pid=1\n"), None);
        assert_eq!(
            Record::parse(&r.to_text().replace("accel=kvm", "accel=xen")),
            None
        );
    }
}
