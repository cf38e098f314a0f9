//! The libvirt harness itself: a hand-started libvirtd in a test namespace boots the project's
//! guest image under QEMU (TCG), its tap joins the namespace's br0, and the guest serves HTTP.
//! Everything (domain, daemons, namespace) is gone afterwards.

use std::time::{Duration, Instant};

use jitsu_tests::curl::Curl;
use jitsu_tests::libvirt::{GUEST_CMDLINE, GuestImage, Libvirtd, list_domains};
use jitsu_tests::topo::Host;
use jitsu_tests::{require_root, require_tool, unique, wait_until};

#[test]
fn a_hand_started_libvirtd_boots_the_guest_image_on_the_bridge() {
    require_root();
    require_tool("curl", "curl");
    let image = GuestImage::build().unwrap();
    let host = Host::new("lvh").unwrap();
    host.address("10.77.3.1/24").unwrap();
    let name = unique("jt-lvh");
    {
        let lv = Libvirtd::start(&host).unwrap();
        let console = host.file("console.log");
        let xml = format!(
            "<domain type='qemu'><name>{name}</name><memory unit='MiB'>256</memory><vcpu>1</vcpu>\
             <os><type arch='x86_64' machine='pc'>hvm</type><kernel>{}</kernel><initrd>{}</initrd>\
             <cmdline>{GUEST_CMDLINE} jitsu.ip=10.77.3.10/24 jitsu.name={name}</cmdline></os>\
             <on_poweroff>destroy</on_poweroff><on_reboot>destroy</on_reboot>\
             <devices><controller type='usb' model='none'/><memballoon model='none'/>\
             <interface type='bridge'><source bridge='br0'/><mac address='02:77:00:03:00:10'/><model type='virtio'/></interface>\
             <serial type='file'><source path='{}'/></serial></devices></domain>",
            image.kernel.display(),
            image.initrd.display(),
            console.display()
        );
        let xml_path = host.file("dom.xml");
        std::fs::write(&xml_path, xml).unwrap();
        lv.virsh(&["define", xml_path.to_str().unwrap()]).unwrap();
        let started = Instant::now();
        lv.virsh(&["start", &name]).unwrap();
        let page = wait_until("the guest to serve", Duration::from_secs(120), || {
            Curl::get("http://10.77.3.10/")
                .max_time(Duration::from_secs(1))
                .body(host.ns())
                .ok()
        })
        .unwrap_or_else(|e| {
            panic!(
                "{e}; console:\n{}",
                std::fs::read_to_string(&console).unwrap_or_default()
            )
        });
        assert_eq!(page, format!("hello from {name}\n"));
        let console_text = std::fs::read_to_string(&console).unwrap_or_default();
        eprintln!(
            "guest served {:.2} s after `virsh start`; console:\n{}",
            started.elapsed().as_secs_f64(),
            console_text
                .lines()
                .filter(|l| l.contains("jitsu-guest"))
                .collect::<Vec<_>>()
                .join("\n")
        );
        assert!(list_domains().unwrap().contains(&name));
    }
    // The guard destroyed and undefined the domain and stopped libvirtd.
    assert!(
        std::process::Command::new("pgrep")
            .args(["-x", "libvirtd"])
            .status()
            .map(|s| !s.success())
            .unwrap_or(true),
        "libvirtd still running after the guard dropped"
    );
}
