//! The domain XML jitsu-dns writes and reads, as pure text functions: the definition of a
//! VM that has no domain yet ([`domain_xml`], for the connection's [`Hypervisor`]), and the
//! first interface's MAC and host-side device from a domain's own XML.
//!
//! No libvirt call is made here: the session defines what this writes and hands over what
//! it reads.

use std::fmt::Write as _;
use std::path::Path;

use shared_proto::Mac;

use crate::config::{Disk, DiskKind, DomainType, VmConfig};

/// Memory of a domain defined from keys without `memory`, in KiB (128 MiB).
pub const DEFAULT_MEMORY_KIB: u64 = 128 << 10;

/// The hypervisor behind a connection, from `virConnectGetType`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Hypervisor {
    /// QEMU or KVM (`QEMU`).
    Qemu,
    /// Xen through libxl (`Xen`).
    Xen,
    /// libvirt's test driver (`Test`).
    Test,
    /// Anything else (LXC, VirtualBox...): domains are used, never defined.
    Other(String),
}

impl Hypervisor {
    /// From the driver's name as `virConnectGetType` gives it.
    pub fn from_driver(t: &str) -> Hypervisor {
        match t.to_ascii_lowercase().as_str() {
            "qemu" | "kvm" => Hypervisor::Qemu,
            "xen" | "libxl" | "xenlight" => Hypervisor::Xen,
            "test" => Hypervisor::Test,
            _ => Hypervisor::Other(t.to_string()),
        }
    }
}

/// Escapes text for an XML attribute or element.
fn xml_escape(s: &str) -> String {
    let mut o = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => o.push_str("&amp;"),
            '<' => o.push_str("&lt;"),
            '>' => o.push_str("&gt;"),
            '\'' => o.push_str("&apos;"),
            '"' => o.push_str("&quot;"),
            c => o.push(c),
        }
    }
    o
}

fn path_text(p: &Path) -> String {
    xml_escape(&p.to_string_lossy())
}

/// The shape of a domain defined from keys.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Layout {
    /// A PC (`hvm`, machine `pc`) of this libvirt domain type (`qemu`, `kvm`, `test`).
    Pc(&'static str),
    XenPvh,
    XenPv,
}

/// The domain XML for `vm` on `hv`: what jitsu-dns defines when the VM has no domain.
///
/// QEMU: a `pc` machine (libvirt 9 refuses `microvm` without PCI) of domain type `qemu`
/// (TCG) unless `domain_type=kvm`, direct kernel boot (`kernel`, `initrd`, `cmdline`) or BIOS
/// from the first disk, ACPI (so `shutdown` works), no USB controller and no memballoon (a
/// unikernel has no driver for either), virtio disks and a virtio NIC on the `nic` bridge
/// with the VM's MAC, and the serial console to `console_log` (else a pty).
/// Xen: PVH (`xenpvh`, the default) or PV (`domain_type=xenpv`) with `kernel` required, `xvd*`
/// disks, a vif on the bridge, and a pty console (libxl has no file consoles).
pub fn domain_xml(vm: &VmConfig, hv: &Hypervisor) -> Result<String, String> {
    let layout = match (vm.domain_type, hv) {
        (None, Hypervisor::Test) => Layout::Pc("test"),
        (None | Some(DomainType::Qemu), Hypervisor::Qemu) => Layout::Pc("qemu"),
        (Some(DomainType::Kvm), Hypervisor::Qemu) => Layout::Pc("kvm"),
        (None | Some(DomainType::XenPvh), Hypervisor::Xen) => Layout::XenPvh,
        (Some(DomainType::XenPv), Hypervisor::Xen) => Layout::XenPv,
        (Some(t), Hypervisor::Qemu | Hypervisor::Xen) => {
            return Err(format!(
                "domain_type={} does not run on this connection's hypervisor ({hv:?})",
                t.as_str()
            ));
        }
        // The test driver takes any shape: it lets the other layouts be exercised.
        (Some(DomainType::Qemu | DomainType::Kvm), Hypervisor::Test) => Layout::Pc("test"),
        (Some(DomainType::XenPvh), Hypervisor::Test) => Layout::XenPvh,
        (Some(DomainType::XenPv), Hypervisor::Test) => Layout::XenPv,
        (_, Hypervisor::Other(t)) => {
            return Err(format!(
                "jitsu-dns defines domains for QEMU/KVM and Xen only, and this connection's \
                 driver is {t}: define the domain {} yourself",
                vm.name
            ));
        }
    };
    let xen = matches!(layout, Layout::XenPvh | Layout::XenPv);
    if vm.kernel.is_none() && (xen || vm.disks.is_empty()) {
        return Err(if xen {
            "a Xen domain is defined from a `kernel` key, and the VM has none".to_string()
        } else {
            "a domain is defined from a `kernel` (or at least a `disk`) key, and the VM has \
             neither"
                .to_string()
        });
    }
    if xen && vm.console_log.is_some() {
        return Err(
            "console_log: libxl gives Xen guests pty consoles only (read them with \
                    `virsh console` or `xl console`)"
                .to_string(),
        );
    }
    let virt_type = match layout {
        Layout::Pc(t) => t,
        _ if *hv == Hypervisor::Test => "test",
        _ => "xen",
    };
    let mut x = String::with_capacity(2048);
    let _ = writeln!(x, "<domain type='{virt_type}'>");
    let _ = writeln!(x, "  <name>{}</name>", xml_escape(&vm.name));
    if let Some(u) = &vm.uuid {
        let _ = writeln!(x, "  <uuid>{}</uuid>", xml_escape(u));
    }
    let _ = writeln!(
        x,
        "  <description>Defined by jitsu-dns from the keys of VM {}.</description>",
        xml_escape(&vm.name)
    );
    let _ = writeln!(
        x,
        "  <memory unit='KiB'>{}</memory>",
        vm.memory_kib.unwrap_or(DEFAULT_MEMORY_KIB)
    );
    x.push_str("  <vcpu>1</vcpu>\n  <os>\n");
    let arch = std::env::consts::ARCH;
    match layout {
        Layout::Pc(_) => {
            let machine = match arch {
                "x86_64" | "x86" => " machine='pc'",
                "aarch64" => " machine='virt'",
                _ => "",
            };
            // The test driver knows no machine types.
            let machine = if *hv == Hypervisor::Test { "" } else { machine };
            let _ = writeln!(x, "    <type arch='{arch}'{machine}>hvm</type>");
        }
        Layout::XenPvh => {
            let _ = writeln!(x, "    <type arch='{arch}' machine='xenpvh'>xenpvh</type>");
        }
        Layout::XenPv => {
            let _ = writeln!(x, "    <type arch='{arch}' machine='xenpv'>xen</type>");
        }
    }
    if let Some(k) = &vm.kernel {
        let _ = writeln!(x, "    <kernel>{}</kernel>", path_text(k));
        if let Some(i) = &vm.initrd {
            let _ = writeln!(x, "    <initrd>{}</initrd>", path_text(i));
        }
        if let Some(c) = &vm.cmdline {
            let _ = writeln!(x, "    <cmdline>{}</cmdline>", xml_escape(c));
        }
    } else {
        x.push_str("    <boot dev='hd'/>\n");
    }
    x.push_str("  </os>\n");
    if !xen {
        // Without it libvirt runs QEMU with -no-acpi, and the power button does nothing.
        x.push_str("  <features>\n    <acpi/>\n  </features>\n");
    }
    x.push_str(
        "  <on_poweroff>destroy</on_poweroff>\n  <on_reboot>restart</on_reboot>\n  \
         <on_crash>destroy</on_crash>\n  <devices>\n",
    );
    if !xen {
        x.push_str("    <controller type='usb' model='none'/>\n    <memballoon model='none'/>\n");
    }
    for (d, (dev, bus)) in vm.disks.iter().zip(disk_targets(&vm.disks, xen)?) {
        // Raw and read-write, as Jitsu's libxl backend attached every disk; on Xen a block
        // device goes through blkback (`phy`), as libxl picks for one.
        let (kind, source, driver) = match d.kind {
            DiskKind::File => ("file", "file", "qemu"),
            DiskKind::Block if xen => ("block", "dev", "phy"),
            DiskKind::Block => ("block", "dev", "qemu"),
        };
        let _ = writeln!(
            x,
            "    <disk type='{kind}' device='disk'>\n      <driver name='{driver}' type='{}'/>\n      \
             <source {source}='{}'/>\n      <target dev='{}' bus='{bus}'/>\n    </disk>",
            d.format(),
            path_text(&d.source),
            xml_escape(&dev),
        );
    }
    for nic in &vm.nics {
        let _ = writeln!(
            x,
            "    <interface type='bridge'>\n      <mac address='{}'/>\n      <source bridge='{}'/>",
            nic.mac,
            xml_escape(&nic.bridge)
        );
        match (&nic.script, xen) {
            (Some(s), true) => {
                let _ = writeln!(x, "      <script path='{}'/>", xml_escape(s));
            }
            (Some(s), false) => {
                return Err(format!(
                    "script={s}: a vif script is Xen's; QEMU runs none for a bridge interface"
                ));
            }
            (None, _) => {}
        }
        if !xen {
            x.push_str("      <model type='virtio'/>\n");
        }
        x.push_str("    </interface>\n");
    }
    if xen {
        x.push_str(
            "    <console type='pty'>\n      <target type='xen' port='0'/>\n    </console>\n",
        );
    } else if let Some(log) = &vm.console_log {
        let _ = writeln!(
            x,
            "    <serial type='file'>\n      <source path='{}'/>\n      <target port='0'/>\n    </serial>",
            path_text(log)
        );
    } else {
        x.push_str("    <serial type='pty'>\n      <target port='0'/>\n    </serial>\n");
    }
    x.push_str("  </devices>\n</domain>\n");
    Ok(x)
}

/// The guest device and bus of each disk: its own `vdev` if given, else the next free
/// `xvdX` (Xen) or `vdX` (virtio). On Xen every disk is on the `xen` bus whatever its name
/// (libxl takes `hda` and `sda` for PV guests too); on QEMU the name says the bus, and a Xen
/// name is refused.
fn disk_targets(disks: &[Disk], xen: bool) -> Result<Vec<(String, &'static str)>, String> {
    let prefix = if xen { "xvd" } else { "vd" };
    let taken: Vec<&str> = disks.iter().filter_map(|d| d.vdev.as_deref()).collect();
    let mut free = (0..).map(|i| format!("{prefix}{}", disk_letters(i)));
    let mut out = Vec::with_capacity(disks.len());
    let mut chosen = Vec::new();
    for d in disks {
        let dev = match &d.vdev {
            Some(v) => v.clone(),
            None => {
                let dev = free
                    .by_ref()
                    .find(|n| !taken.contains(&n.as_str()) && !chosen.contains(n))
                    .expect("the names never run out");
                chosen.push(dev.clone());
                dev
            }
        };
        let bus = if xen {
            "xen"
        } else if let Some(rest) = dev.strip_prefix("xvd") {
            return Err(format!(
                "disk {}@{dev}: {dev} is a Xen device name, and this domain runs on QEMU: use \
                 vd{rest} (virtio), sd{rest} or hd{rest}",
                d.source.display(),
            ));
        } else if dev.starts_with("vd") {
            "virtio"
        } else if dev.starts_with("sd") {
            "scsi"
        } else {
            "ide"
        };
        out.push((dev, bus));
    }
    Ok(out)
}

/// The letters of the `i`th disk: `a` to `z`, then `aa`, `ab`... as Linux names them.
fn disk_letters(i: usize) -> String {
    let mut n = i + 1;
    let mut s = Vec::new();
    while n > 0 {
        n -= 1;
        s.push(b'a' + (n % 26) as u8);
        n /= 26;
    }
    s.reverse();
    String::from_utf8(s).expect("ASCII letters")
}

/// The value of attribute `name` in the start tag `tag` (`<mac address='..'/>`).
fn attr<'a>(tag: &'a str, name: &str) -> Option<&'a str> {
    let mut rest = tag;
    while let Some(i) = rest.find(name) {
        let before = rest[..i].chars().last();
        let after = &rest[i + name.len()..];
        let after_eq = after.trim_start().strip_prefix('=').map(str::trim_start);
        if before.is_some_and(char::is_whitespace)
            && let Some(v) = after_eq
            && let Some(q) = v.chars().next().filter(|q| *q == '\'' || *q == '"')
        {
            let v = &v[1..];
            return v.find(q).map(|end| &v[..end]);
        }
        rest = &rest[i + name.len()..];
    }
    None
}

/// The first start tag `<name ...>` in `text`.
fn start_tag<'a>(text: &'a str, name: &str) -> Option<&'a str> {
    let open = format!("<{name}");
    let mut from = 0;
    while let Some(i) = text[from..].find(&open) {
        let at = from + i;
        let next = text[at + open.len()..].chars().next();
        if next.is_some_and(|c| c.is_whitespace() || c == '>' || c == '/') {
            let end = text[at..].find('>')?;
            return Some(&text[at..=at + end]);
        }
        from = at + open.len();
    }
    None
}

/// The bodies of a domain XML's `<interface>` elements, in order.
fn interfaces(xml: &str) -> impl Iterator<Item = &str> {
    let mut rest = xml;
    std::iter::from_fn(move || {
        let start = rest.find("<interface ")?;
        let body = &rest[start..];
        let end = body.find("</interface>").unwrap_or(body.len());
        rest = &body[end..];
        Some(&body[..end])
    })
}

fn interface_mac(body: &str) -> Option<Mac> {
    start_tag(body, "mac")
        .and_then(|t| attr(t, "address"))
        .and_then(|a| a.parse().ok())
}

/// The first `<interface>` of a domain's XML: its MAC and (while running) its host-side
/// device. libvirt writes this XML itself, so a scan for two tags suffices.
pub(super) fn first_interface(xml: &str) -> (Option<Mac>, Option<String>) {
    let Some(body) = interfaces(xml).next() else {
        return (None, None);
    };
    let dev = start_tag(body, "target")
        .and_then(|t| attr(t, "dev"))
        .map(str::to_string);
    (interface_mac(body), dev)
}

/// The MACs of every `<interface>` of a domain's XML, in order (one without a readable MAC
/// ends the list, so that the places stay right).
pub(super) fn interface_macs(xml: &str) -> Vec<Mac> {
    interfaces(xml).map_while(interface_mac).collect()
}

#[cfg(test)]
mod tests {
    use std::process::Command;

    use super::super::tests::{unique, vm};
    use super::*;

    #[test]
    fn hypervisors_come_from_the_driver_name() {
        assert_eq!(Hypervisor::from_driver("QEMU"), Hypervisor::Qemu);
        assert_eq!(Hypervisor::from_driver("Xen"), Hypervisor::Xen);
        assert_eq!(Hypervisor::from_driver("TEST"), Hypervisor::Test);
        assert_eq!(
            Hypervisor::from_driver("LXC"),
            Hypervisor::Other("LXC".into())
        );
    }

    const GUEST: &str = "name=www,dns=www.example.org,ip=10.77.0.10/24,mac=02:77:00:00:00:10,\
                         kernel=/g/vmlinux,initrd=/g/initramfs.cpio.gz,memory=96M,\
                         cmdline=console=ttyS0 jitsu.ip=10.77.0.10/24 jitsu.name=<www&co>";

    /// The domain XML of the VM `spec` on `hv`, which libvirt's schema accepts.
    fn valid_xml(spec: &str, hv: &Hypervisor) -> String {
        let x = domain_xml(&vm(spec), hv).unwrap();
        validate(&x);
        x
    }

    /// Fails unless `text` holds every one of `wants`.
    fn has_all(text: &str, wants: &[&str]) {
        for want in wants {
            assert!(text.contains(want), "{want} missing from\n{text}");
        }
    }

    /// Runs libvirt's schema check (virt-xml-validate) on `xml`.
    fn validate(xml: &str) {
        let dir = std::env::temp_dir().join(unique("jitsu-xml"));
        std::fs::create_dir_all(&dir).unwrap();
        let f = dir.join("domain.xml");
        std::fs::write(&f, xml).unwrap();
        let out = Command::new("virt-xml-validate")
            .arg(&f)
            .arg("domain")
            .output()
            .expect(
                "virt-xml-validate (Debian packages libvirt-clients and libxml2-utils) runs; \
                 scripts/test installs them",
            );
        let _ = std::fs::remove_dir_all(&dir);
        assert!(
            out.status.success(),
            "libvirt's domain schema refuses:\n{xml}\n{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }

    #[test]
    fn qemu_domains_are_pcs_with_direct_kernel_boot_on_the_bridge() {
        let x = domain_xml(&vm(GUEST), &Hypervisor::Qemu).unwrap();
        validate(&x);
        has_all(
            &x,
            &[
                "<domain type='qemu'>",
                "<name>www</name>",
                "<memory unit='KiB'>98304</memory>",
                "machine='pc'>hvm</type>",
                "<kernel>/g/vmlinux</kernel>",
                "<initrd>/g/initramfs.cpio.gz</initrd>",
                "<cmdline>console=ttyS0 jitsu.ip=10.77.0.10/24 jitsu.name=&lt;www&amp;co&gt;</cmdline>",
                "<acpi/>",
                "<controller type='usb' model='none'/>",
                "<memballoon model='none'/>",
                "<mac address='02:77:00:00:00:10'/>",
                "<source bridge='br0'/>",
                "<model type='virtio'/>",
                "<serial type='pty'>",
            ],
        );
        assert!(!x.contains("<uuid>") && !x.contains("<disk"), "{x}");
        // KVM only when asked, a UUID when given, disks, a console file.
        let x = domain_xml(
            &vm(&format!(
                "{GUEST},domain_type=kvm,uuid=4dea22b3-1d52-d8f3-2516-782e98ab3fa0,\
                 disk=/d/root.qcow2,disk=/d/data.img,console_log=/var/log/www.console,nic=xenbr1"
            )),
            &Hypervisor::Qemu,
        )
        .unwrap();
        validate(&x);
        has_all(
            &x,
            &[
                "<domain type='kvm'>",
                "<uuid>4dea22b3-1d52-d8f3-2516-782e98ab3fa0</uuid>",
                "<driver name='qemu' type='qcow2'/>\n      <source file='/d/root.qcow2'/>\n      <target dev='vda' bus='virtio'/>",
                "<driver name='qemu' type='raw'/>\n      <source file='/d/data.img'/>\n      <target dev='vdb' bus='virtio'/>",
                "<serial type='file'>\n      <source path='/var/log/www.console'/>",
                "<source bridge='xenbr1'/>",
            ],
        );
        // A disk alone boots through the BIOS.
        let x = domain_xml(
            &vm("name=d,dns=d.example.org,ip=10.0.0.2,disk=/d/disk.img"),
            &Hypervisor::Qemu,
        )
        .unwrap();
        validate(&x);
        assert!(
            x.contains("<boot dev='hd'/>") && !x.contains("<kernel>"),
            "{x}"
        );
        assert!(x.contains(&format!("<memory unit='KiB'>{DEFAULT_MEMORY_KIB}</memory>")));
        assert_eq!(DEFAULT_MEMORY_KIB, 131_072, "128 MiB");
    }

    #[test]
    fn xen_domains_are_pvh_or_pv_with_xen_devices() {
        // Xen cannot run on this machine: the XML is checked against libvirt's schema and
        // for the shape libxl needs.
        let pvh = domain_xml(&vm(&format!("{GUEST},disk=/d/a.img")), &Hypervisor::Xen).unwrap();
        validate(&pvh);
        has_all(
            &pvh,
            &[
                "<domain type='xen'>",
                "machine='xenpvh'>xenpvh</type>",
                "<kernel>/g/vmlinux</kernel>",
                "<target dev='xvda' bus='xen'/>",
                "<source bridge='br0'/>",
                "<console type='pty'>\n      <target type='xen' port='0'/>",
            ],
        );
        for absent in ["<acpi/>", "usb", "memballoon", "virtio", "<serial"] {
            assert!(!pvh.contains(absent), "{absent} in\n{pvh}");
        }
        let pv = domain_xml(&vm(&format!("{GUEST},domain_type=xenpv")), &Hypervisor::Xen).unwrap();
        validate(&pv);
        assert!(pv.contains("machine='xenpv'>xen</type>"), "{pv}");
    }

    #[test]
    fn disks_are_raw_read_write_files_or_block_devices_on_the_devices_given() {
        // Jitsu's README: files relative to the working directory as xvda and xvdb, or loop
        // devices; here with a disk left to take the next free device.
        let spec = format!(
            "{GUEST},disk=/dev/loop5@xvdb,disk=/i/stubetc.iso,disk=/i/data.iso@xvda,disk=/i/c.qcow2"
        );
        let xen = valid_xml(&spec, &Hypervisor::Xen);
        has_all(
            &xen,
            &[
                "<disk type='block' device='disk'>\n      <driver name='phy' type='raw'/>\n      \
                 <source dev='/dev/loop5'/>\n      <target dev='xvdb' bus='xen'/>",
                "<disk type='file' device='disk'>\n      <driver name='qemu' type='raw'/>\n      \
                 <source file='/i/stubetc.iso'/>\n      <target dev='xvdc' bus='xen'/>",
                "<source file='/i/data.iso'/>\n      <target dev='xvda' bus='xen'/>",
                "<driver name='qemu' type='qcow2'/>\n      <source file='/i/c.qcow2'/>\n      \
                 <target dev='xvdd' bus='xen'/>",
            ],
        );
        // Read-write: nothing says otherwise.
        assert!(
            !xen.contains("<readonly/>") && !xen.contains("<shareable/>"),
            "{xen}"
        );
        // On QEMU the device name says the bus; a Xen name is refused, saying what to use.
        let spec = format!(
            "{GUEST},disk=/dev/vg/www@vda,disk=/i/a.img@sdb,disk=/i/b.img@hdc,disk=/i/c.img"
        );
        let q = valid_xml(&spec, &Hypervisor::Qemu);
        has_all(
            &q,
            &[
                "<disk type='block' device='disk'>\n      <driver name='qemu' type='raw'/>\n      \
                 <source dev='/dev/vg/www'/>\n      <target dev='vda' bus='virtio'/>",
                "<target dev='sdb' bus='scsi'/>",
                "<target dev='hdc' bus='ide'/>",
                "<source file='/i/c.img'/>\n      <target dev='vdb' bus='virtio'/>",
            ],
        );
        let e = domain_xml(
            &vm(&format!("{GUEST},disk=/i/a.img@xvda")),
            &Hypervisor::Qemu,
        )
        .unwrap_err();
        assert!(
            e.contains("xvda is a Xen device name") && e.contains("use vda (virtio)"),
            "{e}"
        );
        assert_eq!(
            (0..28).map(disk_letters).collect::<Vec<_>>()[24..],
            ["y", "z", "aa", "ab"]
        );
    }

    #[test]
    fn every_nic_joins_its_bridge_with_its_mac_and_its_vif_script() {
        let spec =
            format!("{GUEST},nic=br0,nic=xenbr1,script=vif-bridge,script=/etc/xen/scripts/vif-nat");
        let v = vm(&spec);
        let xen = domain_xml(&v, &Hypervisor::Xen).unwrap();
        validate(&xen);
        let want = format!(
            "    <interface type='bridge'>\n      <mac address='02:77:00:00:00:10'/>\n      \
             <source bridge='br0'/>\n      <script path='vif-bridge'/>\n    </interface>\n    \
             <interface type='bridge'>\n      <mac address='{}'/>\n      \
             <source bridge='xenbr1'/>\n      <script path='/etc/xen/scripts/vif-nat'/>\n    \
             </interface>\n",
            v.nics[1].mac
        );
        assert!(xen.contains(&want), "{want} missing from\n{xen}");
        // What jitsu-dns reads back from such a domain: every MAC, in order.
        assert_eq!(interface_macs(&xen), [v.mac(), v.nics[1].mac]);
        assert_eq!(first_interface(&xen).0, Some(v.mac()));
        // QEMU: virtio NICs; a vif script is refused, saying why.
        let v = vm(&format!("{GUEST},nic=br0,nic=br1"));
        let q = domain_xml(&v, &Hypervisor::Qemu).unwrap();
        validate(&q);
        assert_eq!(q.matches("<model type='virtio'/>").count(), 2, "{q}");
        assert_eq!(interface_macs(&q), [v.mac(), v.nics[1].mac]);
        let e = domain_xml(
            &vm(&format!("{GUEST},script=vif-bridge")),
            &Hypervisor::Qemu,
        )
        .unwrap_err();
        assert!(
            e.contains("script=vif-bridge: a vif script is Xen's"),
            "{e}"
        );
    }

    #[test]
    fn domains_that_cannot_be_defined_say_why() {
        let nothing = vm("name=n,dns=n.example.org,ip=10.0.0.3");
        let e = domain_xml(&nothing, &Hypervisor::Qemu).unwrap_err();
        assert!(e.contains("`kernel`"), "{e}");
        let disk_only = vm("name=n,dns=n.example.org,ip=10.0.0.3,disk=/d/a.img");
        let e = domain_xml(&disk_only, &Hypervisor::Xen).unwrap_err();
        assert!(e.contains("Xen domain is defined from a `kernel`"), "{e}");
        let e = domain_xml(&vm(&format!("{GUEST},console_log=/l")), &Hypervisor::Xen).unwrap_err();
        assert!(e.contains("pty consoles only"), "{e}");
        let e = domain_xml(
            &vm(&format!("{GUEST},domain_type=xenpvh")),
            &Hypervisor::Qemu,
        )
        .unwrap_err();
        assert!(e.contains("domain_type=xenpvh"), "{e}");
        let e = domain_xml(&vm(GUEST), &Hypervisor::Other("LXC".into())).unwrap_err();
        assert!(
            e.contains("driver is LXC: define the domain www yourself"),
            "{e}"
        );
    }

    #[test]
    fn the_first_interface_gives_mac_and_device() {
        let xml = "<domain type='qemu' id='3'>\n  <name>www</name>\n  <devices>\n\
            <disk type='file' device='disk'><target dev='vda' bus='virtio'/></disk>\n\
            <interface type='bridge'>\n      <mac address='02:77:00:00:00:10'/>\n\
            <source bridge='br0'/>\n      <target dev='vnet7'/>\n      <model type='virtio'/>\n\
            <alias name='net0'/>\n    </interface>\n\
            <interface type='network'><mac address='52:54:00:00:00:99'/><target dev='vnet8'/></interface>\n\
            </devices>\n</domain>";
        assert_eq!(
            first_interface(xml),
            (
                Some("02:77:00:00:00:10".parse().unwrap()),
                Some("vnet7".to_string())
            )
        );
        // Off: no target yet. Double quotes are XML too.
        let off = r#"<domain><devices><interface type="bridge"><mac address="02:00:00:00:00:01"/><source bridge="br0"/></interface></devices></domain>"#;
        assert_eq!(
            first_interface(off),
            (Some("02:00:00:00:00:01".parse().unwrap()), None)
        );
        assert_eq!(first_interface("<domain><devices/></domain>"), (None, None));
        assert_eq!(
            interface_macs(xml),
            [
                "02:77:00:00:00:10".parse().unwrap(),
                "52:54:00:00:00:99".parse().unwrap()
            ]
        );
        assert_eq!(interface_macs("<domain><devices/></domain>"), []);
        // A <target> outside the interface is not its device.
        let stray = "<interface type='bridge'><mac address='zz'/></interface><target dev='x'/>";
        assert_eq!(first_interface(stray), (None, None));
        assert_eq!(attr("<x naddress='1' address='2'/>", "address"), Some("2"));
        assert_eq!(
            start_tag("<macro/><mac address='a'/>", "mac"),
            Some("<mac address='a'/>")
        );
    }
}
