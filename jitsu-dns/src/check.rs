//! `jitsu-dns --check`: what a validated configuration means, as text for a person (and a
//! test) to read: the settings, the backend and how it was chosen, the zones, and per VM
//! every value its keys resolved to (units, paths, NICs and their MACs, disks), with the
//! domain XML a libvirt VM without a domain would be defined with, or the command line a
//! QEMU-backend VM is started with.
//!
//! Pure: it connects to nothing, so a configuration for another host (`-c xen:///`) can be
//! checked anywhere. The hypervisor of the XML is the one the URI's scheme names.

use std::fmt::Write as _;

use crate::backend::libvirt::{Hypervisor, domain_xml};
use crate::backend::qemu::{self, Accel, Plan, qemu_args};
use crate::config::{Announce, BackendKind, Config, DiskKind, Forwarders, VmConfig, WaitFor};
use crate::fleet::fmt_duration;

/// The hypervisor a libvirt URI's scheme names (`xen:`, `xen+ssh:` -> Xen; `qemu:`,
/// `qemu+ssh:` -> QEMU; `test:`), `None` for libvirt's default connection.
pub fn hypervisor_of(uri: Option<&str>) -> Option<Hypervisor> {
    let scheme = uri?.split(':').next()?;
    let driver = scheme.split('+').next().unwrap_or(scheme);
    Some(Hypervisor::from_driver(driver))
}

/// The text `--check` prints for `cfg`.
pub fn render(cfg: &Config) -> String {
    let mut o = String::new();
    let forwarders = match &cfg.forwarders {
        Forwarders::System => "the nameservers of /etc/resolv.conf".to_string(),
        Forwarders::Off => "none (REFUSED)".to_string(),
        Forwarders::List(l) => l
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join(", "),
    };
    let _ = writeln!(o, "dns {}", cfg.dns_addr());
    let _ = writeln!(o, "forwarders {forwarders} port {}", cfg.forwarder_port);
    let _ = writeln!(
        o,
        "ttl {} s (idle VMs stop after {} s)",
        cfg.ttl,
        2 * u64::from(cfg.ttl)
    );
    let _ = writeln!(o, "delay {}", fmt_duration(cfg.delay));
    let _ = writeln!(o, "mode {}", cfg.mode);
    let uri = match (cfg.backend, cfg.connect.as_deref()) {
        (_, Some(u)) if !u.is_empty() => u.to_string(),
        (BackendKind::Process, _) => "process:///run/jitsu/process (default)".to_string(),
        (BackendKind::Libvirt, _) => "libvirt's default".to_string(),
        (BackendKind::Qemu, _) => format!("qemu://{} (default)", qemu::DEFAULT_RUN_DIR),
    };
    let _ = write!(o, "backend {} at {uri}", cfg.backend.as_str());
    match &cfg.backend_why {
        Some(why) => {
            let _ = writeln!(o, " ({why})");
        }
        None => o.push('\n'),
    }
    if let Some(s) = &cfg.synjitsu {
        let _ = writeln!(o, "synjitsu {}", s.display());
    }
    for z in &cfg.zones {
        let _ = writeln!(o, "zone {} ns {}", z.name, z.ns);
    }
    for vm in &cfg.vms {
        render_vm(&mut o, cfg, vm);
    }
    o
}

fn render_vm(o: &mut String, cfg: &Config, vm: &VmConfig) {
    let _ = writeln!(o, "vm {}", vm.name);
    for n in &vm.dns {
        let _ = writeln!(o, "  dns {n}");
    }
    let _ = writeln!(o, "  ip {}/{}", vm.ip, vm.ip_prefix);
    if let Some(ip6) = vm.ip6 {
        let _ = writeln!(o, "  ip6 {ip6}/{}", vm.ip6_prefix);
    }
    let _ = writeln!(o, "  stop_mode {}", vm.stop_mode);
    let _ = writeln!(o, "  response_delay {}", fmt_duration(vm.response_delay));
    match vm.idle_timeout {
        Some(t) => _ = writeln!(o, "  idle_timeout {}", fmt_duration(t)),
        None => {
            _ = writeln!(
                o,
                "  idle_timeout {} (2 x ttl)",
                fmt_duration(std::time::Duration::from_secs(u64::from(cfg.ttl) * 2))
            )
        }
    }
    if vm.pin {
        let _ = writeln!(o, "  pin true");
    }
    let _ = writeln!(o, "  drained {}", vm.drained);
    match vm.max_boot_attempts {
        Some(n) => {
            _ = writeln!(
                o,
                "  max_boot_attempts {n}, then boot_backoff {} doubling",
                fmt_duration(vm.boot_backoff)
            )
        }
        None => _ = writeln!(o, "  max_boot_attempts unlimited"),
    }
    if let Some(k) = &vm.wait_for_key {
        let _ = writeln!(
            o,
            "  wait_for_key {k} (at most {})",
            fmt_duration(vm.wait_for_timeout)
        );
    }
    match vm.wait_for {
        Some(WaitFor::Announce) => {
            let at_most = fmt_duration(vm.wait_for_timeout);
            let _ = writeln!(o, "  wait_for announce (at most {at_most})");
        }
        Some(WaitFor::Tcp(port)) => {
            let at_most = fmt_duration(vm.wait_for_timeout);
            let _ = writeln!(o, "  wait_for tcp:{port} (at most {at_most})");
        }
        None => {}
    }
    if vm.use_synjitsu {
        let _ = writeln!(o, "  use_synjitsu true");
    }
    if vm.announce == Announce::Listening {
        let _ = writeln!(
            o,
            "  announce listening ({})",
            if vm.synjitsu_tracked() {
                "synjitsu hands the held SYNs over at the guest's announcement, no probe"
            } else {
                "no effect: synjitsu does not track this VM"
            }
        );
    }
    for (i, nic) in vm.nics.iter().enumerate() {
        let _ = write!(o, "  nic {i} bridge {} mac {}", nic.bridge, nic.mac);
        if let Some(s) = &nic.script {
            let _ = write!(o, " script {s}");
        }
        o.push_str(if i == 0 { " (steered)\n" } else { "\n" });
    }
    if let Some(c) = &vm.command {
        let _ = writeln!(o, "  command {c}");
    }
    if cfg.backend == BackendKind::Process {
        return;
    }
    if let Some(u) = &vm.uuid {
        let _ = writeln!(o, "  uuid {u}");
    }
    if let Some(t) = vm.domain_type {
        let _ = writeln!(o, "  domain_type {}", t.as_str());
    }
    if let Some(m) = vm.memory_kib {
        let _ = writeln!(o, "  memory {m} KiB");
    }
    for (key, path) in [
        ("kernel", &vm.kernel),
        ("initrd", &vm.initrd),
        ("rumprun_config", &vm.rumprun_config),
    ] {
        if let Some(p) = path {
            let _ = writeln!(o, "  {key} {}", p.display());
        }
    }
    if cfg.backend == BackendKind::Qemu {
        render_qemu(o, cfg, vm);
        return;
    }
    for (i, d) in vm.disks.iter().enumerate() {
        let kind = match d.kind {
            DiskKind::File => "file",
            DiskKind::Block => "block",
        };
        let _ = writeln!(
            o,
            "  disk {i} {} as {} {kind} {} read-write",
            d.source.display(),
            d.vdev.as_deref().unwrap_or("(next free)"),
            d.format()
        );
    }
    let Some(hv) = hypervisor_of(cfg.connect.as_deref()) else {
        let _ = writeln!(
            o,
            "  domain: the one named {} (or defined at its first boot from the keys on \
             libvirt's default connection)",
            vm.uuid.as_deref().unwrap_or(&vm.name)
        );
        return;
    };
    match domain_xml(vm, &hv) {
        Ok(xml) => {
            let _ = writeln!(
                o,
                "  domain: the one named {}, else defined at its first boot as:",
                vm.uuid.as_deref().unwrap_or(&vm.name)
            );
            o.push_str(&xml);
        }
        Err(why) => {
            let _ = writeln!(
                o,
                "  domain: the one named {}, which must be defined ({why})",
                vm.uuid.as_deref().unwrap_or(&vm.name)
            );
        }
    }
}

/// The QEMU command line of a QEMU-backend VM, with the descriptors it inherits as 3 and 4.
fn render_qemu(o: &mut String, cfg: &Config, vm: &VmConfig) {
    if let Some(c) = &vm.cmdline {
        let _ = writeln!(o, "  cmdline {c}");
    }
    let dir = cfg
        .connect
        .as_deref()
        .and_then(|u| qemu::parse_uri(u).ok())
        .map(|u| u.dir)
        .unwrap_or_else(|| qemu::DEFAULT_RUN_DIR.into());
    let pidfile = dir.join(format!("{}.pid", vm.name));
    let accel = match vm.domain_type {
        Some(crate::config::DomainType::Kvm) => Accel::Kvm,
        _ => Accel::Tcg,
    };
    let plan = Plan {
        accel,
        tap_fd: 3,
        qmp_fd: 4,
        pidfile: &pidfile,
        standby: false,
    };
    if let Some(args) = qemu_args(vm, &plan) {
        let line: Vec<String> = args
            .iter()
            .map(|a| {
                let a = a.to_string_lossy();
                if a.contains(' ') {
                    format!("'{a}'")
                } else {
                    a.into_owned()
                }
            })
            .collect();
        let _ = writeln!(
            o,
            "  started as (3: a tap on {}, 4: the QMP socket; kvm only where /dev/kvm opens):\n  \
             qemu-system-x86_64 {}",
            vm.nic(),
            line.join(" ")
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Flags, merge};

    #[test]
    fn the_scheme_names_the_hypervisor() {
        assert_eq!(hypervisor_of(Some("xen:///")), Some(Hypervisor::Xen));
        assert_eq!(
            hypervisor_of(Some("xen+ssh://h/system")),
            Some(Hypervisor::Xen)
        );
        assert_eq!(
            hypervisor_of(Some("qemu:///system")),
            Some(Hypervisor::Qemu)
        );
        assert_eq!(
            hypervisor_of(Some("test:///default")),
            Some(Hypervisor::Test)
        );
        assert_eq!(
            hypervisor_of(Some("vbox:///session")),
            Some(Hypervisor::Other("vbox".into()))
        );
        assert_eq!(hypervisor_of(None), None);
    }

    #[test]
    fn a_check_shows_a_qemu_vms_command_line() {
        let f = Flags {
            backend: Some("qemu".into()),
            connect: Some("qemu:///run/q".into()),
            specs: vec![
                "name=uk,dns=uk.example.org,ip=10.0.0.5,kernel=/k/uk.elf,memory=32M,\
                 cmdline=ip=10.0.0.5/24 gw=10.0.0.1"
                    .into(),
            ],
            ..Flags::default()
        };
        let text = render(&merge(&f, None).unwrap());
        for want in [
            "backend qemu at qemu:///run/q\n",
            "  memory 32768 KiB\n",
            "  kernel /k/uk.elf\n",
            "  cmdline ip=10.0.0.5/24 gw=10.0.0.1\n",
            "  started as (3: a tap on br0, 4: the QMP socket; kvm only where /dev/kvm opens):\n",
            " -accel tcg -m 32768k ",
            " -pidfile /run/q/uk.pid -kernel /k/uk.elf -append 'ip=10.0.0.5/24 gw=10.0.0.1'\n",
        ] {
            assert!(text.contains(want), "{want} missing from\n{text}");
        }
    }

    #[test]
    fn a_check_shows_what_every_key_resolved_to() {
        let f = Flags {
            backend: Some("libxl".into()),
            specs: vec![
                "name=www,dns=www.example.org,ip=10.0.0.1,kernel=/k/www.xen,memory=64000,\
                 disk=/dev/loop5@xvda,disk=/i/data.iso,nic=br0,nic=br1,script=vif-bridge"
                    .into(),
            ],
            ..Flags::default()
        };
        let c = merge(&f, None).unwrap();
        let text = render(&c);
        for want in [
            "backend libvirt at xen:///system (-x libxl: libvirt's libxl driver at xen:///system)\n",
            "vm www\n",
            "  memory 64000 KiB\n",
            "  kernel /k/www.xen\n",
            "  disk 0 /dev/loop5 as xvda block raw read-write\n",
            "  disk 1 /i/data.iso as (next free) file raw read-write\n",
            &format!(
                "  nic 0 bridge br0 mac {} script vif-bridge (steered)\n",
                c.vms[0].mac()
            ),
            &format!(
                "  nic 1 bridge br1 mac {} script vif-bridge\n",
                c.vms[0].nics[1].mac
            ),
            "  domain: the one named www, else defined at its first boot as:\n<domain type='xen'>",
            "<source dev='/dev/loop5'/>",
        ] {
            assert!(text.contains(want), "{want} missing from\n{text}");
        }
    }
}
