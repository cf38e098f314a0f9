//! jitsu-dns's libvirt backend, driven through its trait against a real libvirtd and QEMU
//! (TCG) in a test namespace, with the project's guest image: the domain is defined from the
//! VM's keys, boots and serves; MAC and domain id come from its XML; the interface counters
//! are the guest's side of the host's `vnet` device; a pause by someone else is seen and
//! undone; suspend is a managed save that ends QEMU (its memory freed) and resume restores
//! it; shutdown is the guest's own ACPI power-off; a guest that powers itself off is reported
//! by a lifecycle event; and after libvirtd crashes and restarts, the backend reconnects and
//! events flow again. Slow (several TCG boots): one test, serialized by the libvirtd lock.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use jitsu_dns::backend::libvirt::LibvirtBackend;
use jitsu_dns::backend::{Backend, LifecycleEvent};
use jitsu_dns::config::{Flags, StopMode, VmConfig, merge};
use jitsu_dns::fleet::Observed;
use jitsu_tests::curl::Curl;
use jitsu_tests::libvirt::{ConsoleWatch, GuestImage, GuestVm, Libvirtd, URI, qemu_pid};
use jitsu_tests::topo::Host;
use jitsu_tests::{Netns, require_root, require_tool, unique, wait_until};

const BOOT: Duration = Duration::from_secs(180);

fn vm_config(spec: &str) -> VmConfig {
    let flags = Flags {
        backend: Some("libvirt".into()),
        specs: vec![spec.to_string()],
        ..Flags::default()
    };
    merge(&flags, None).unwrap().vms.remove(0)
}

/// Lifecycle events the backend pushed, consumed in order by [`Events::wait`].
#[derive(Default, Clone)]
struct Events(Arc<Mutex<Vec<LifecycleEvent>>>);

impl Events {
    fn wait(&self, name: &str, what: &str, pred: impl Fn(Observed) -> bool) {
        wait_until(&format!("a {what} event for {name}"), BOOT, || {
            let mut evs = self.0.lock().unwrap();
            let i = evs.iter().position(|e| e.name == name && pred(e.state))?;
            evs.drain(..=i);
            Some(())
        })
        .unwrap();
    }
}

fn running(o: Observed) -> bool {
    matches!(o, Observed::Running { .. })
}

/// The guest's page, fetched from the host namespace until it answers.
fn page(host: &Netns, ip: &str) -> String {
    wait_until(&format!("the guest's page at {ip}"), BOOT, || {
        Curl::get(format!("http://{ip}/"))
            .max_time(Duration::from_secs(2))
            .body(host)
            .ok()
    })
    .unwrap()
}

/// Packets received and transmitted by `dev` as the host sees them.
fn proc_net_dev(host: &Netns, dev: &str) -> (u64, u64) {
    let text = host.sh("cat /proc/net/dev").unwrap();
    let line = text
        .lines()
        .find(|l| l.split(':').next().map(str::trim) == Some(dev))
        .unwrap_or_else(|| panic!("{dev} not in /proc/net/dev:\n{text}"));
    let f: Vec<u64> = line
        .split_once(':')
        .unwrap()
        .1
        .split_whitespace()
        .map(|x| x.parse().unwrap())
        .collect();
    (f[1], f[9])
}

#[test]
fn the_libvirt_backend_drives_real_qemu_guests() {
    require_root();
    require_tool("curl", "curl");
    require_tool("ping", "iputils-ping");
    let image = GuestImage::build().unwrap();
    let dom0 = Host::new("lvb").unwrap();
    dom0.address("10.77.4.1/24").unwrap();
    let host = dom0.ns();
    let mut lv = Libvirtd::start(&dom0).unwrap();
    let name = unique("jt-lvb");
    let ip = "10.77.4.10";
    let console = dom0.file("console.log");
    let g = GuestVm::new(
        &name,
        "b.example.org",
        ip.parse().unwrap(),
        24,
        "02:77:00:04:00:10",
    )
    .console_log(&console);
    let vm = vm_config(&g.spec(&image));
    let b = LibvirtBackend::open(Some(&format!("{URI}?shutdown_grace=60"))).unwrap();
    let events = Events::default();
    let sink = events.0.clone();
    assert!(
        b.subscribe(Box::new(move |e| sink.lock().unwrap().push(e)))
            .unwrap()
    );
    let d = b.lookup(&vm).unwrap();
    assert_eq!((d.state, d.mac()), (Observed::Off, None), "no domain yet");

    // Defined from the keys, booted, serving.
    let watch = ConsoleWatch::start(&console, "jitsu-guest: listening");
    let t0 = Instant::now();
    let started = b.start(&vm).unwrap();
    let start_returned = t0.elapsed();
    events.wait(&name, "running", running);
    let listening = watch.wait(BOOT).unwrap().at - t0;
    assert_eq!(page(host, ip), format!("hello from {name}\n"));
    let served = t0.elapsed();
    eprintln!(
        "boot: start() returned after {:.2} s, the guest listened {:.2} s after it was called, \
         served at {:.2} s",
        start_returned.as_secs_f64(),
        listening.as_secs_f64(),
        served.as_secs_f64()
    );
    let xml = lv.virsh(&["dumpxml", &name]).unwrap();
    for want in [
        "<domain type='qemu'",
        "machine='pc",
        "<acpi/>",
        "<source bridge='br0'/>",
        "<mac address='02:77:00:04:00:10'/>",
        "<memballoon model='none'/>",
        "Defined by jitsu-dns",
    ] {
        assert!(xml.contains(want), "{want} not in\n{xml}");
    }
    let d = b.lookup(&vm).unwrap();
    assert_eq!(
        d.state,
        Observed::Running {
            domid: started.domid
        }
    );
    assert_eq!(d.mac(), Some(vm.mac()));
    let domid: u32 = lv.virsh(&["domid", &name]).unwrap().trim().parse().unwrap();
    assert_eq!(started.domid, Some(domid));

    // Counters: the guest's transmissions are the packets the host's vnet device received.
    let dev = xml
        .split("<target dev='")
        .nth(1)
        .and_then(|r| r.split('\'').next())
        .filter(|d| d.starts_with("vnet"))
        .unwrap_or_else(|| panic!("no vnet device in\n{xml}"))
        .to_string();
    host.sh(&format!("ping -c 5 -i 0.2 -W 2 {ip}")).unwrap();
    let before = proc_net_dev(host, &dev);
    let c = b.counters(&vm).unwrap().expect("counters of a running VM");
    let after = proc_net_dev(host, &dev);
    assert!(
        (before.0..=after.0).contains(&c.rx_packets),
        "{before:?} {c:?} {after:?}"
    );
    assert!(
        (before.1..=after.1).contains(&c.tx_packets),
        "{before:?} {c:?} {after:?}"
    );
    assert!(c.rx_packets >= 5, "the five ping replies at least: {c:?}");

    // Paused by someone else: seen as paused, unpaused.
    lv.virsh(&["suspend", &name]).unwrap();
    events.wait(&name, "paused", |o| o == Observed::Paused);
    assert_eq!(b.state(&vm).unwrap(), Observed::Paused);
    b.unpause(&vm).unwrap();
    events.wait(&name, "running", running);
    assert_eq!(lv.domstate(&name).unwrap(), "running (unpaused)");
    assert_eq!(page(host, ip), format!("hello from {name}\n"));

    // Suspend: a managed save; QEMU exits and its memory is freed. Resume restores it.
    let qemu = qemu_pid(&name).expect("QEMU's pid while the guest runs");
    let t = Instant::now();
    b.stop(&vm, StopMode::Suspend).unwrap();
    let save_took = t.elapsed();
    events.wait(&name, "suspended", |o| o == Observed::Suspended);
    assert_eq!(b.state(&vm).unwrap(), Observed::Suspended);
    assert_eq!(lv.domstate(&name).unwrap(), "shut off (saved)");
    let save = std::path::Path::new("/var/lib/libvirt/qemu/save").join(format!("{name}.save"));
    let save_size = std::fs::metadata(&save).map(|m| m.len()).unwrap_or(0);
    assert!(save_size > 0, "no managed save at {}", save.display());
    assert!(
        !std::path::Path::new(&format!("/proc/{qemu}")).exists() && qemu_pid(&name).is_none(),
        "QEMU {qemu} still runs after the managed save"
    );
    let t = Instant::now();
    let resumed = b.resume(&vm).unwrap();
    let resume_returned = t.elapsed();
    assert_eq!(page(host, ip), format!("hello from {name}\n"));
    let resume_served = t.elapsed();
    events.wait(&name, "running", running);
    assert_eq!(lv.domstate(&name).unwrap(), "running (restored)");
    assert!(!save.exists(), "the save is removed once restored");
    eprintln!(
        "suspend: managed save of {} MiB took {:.2} s; resume() returned after {:.2} s, served \
         at {:.2} s (boot: served at {:.2} s)",
        save_size >> 20,
        save_took.as_secs_f64(),
        resume_returned.as_secs_f64(),
        resume_served.as_secs_f64(),
        served.as_secs_f64()
    );
    assert_eq!(resumed.domid, b.domid(&vm).unwrap());

    // Shutdown: the ACPI power button, and the guest powers off before the grace period.
    let t = Instant::now();
    b.stop(&vm, StopMode::Shutdown).unwrap();
    eprintln!("shutdown: off after {:.2} s", t.elapsed().as_secs_f64());
    events.wait(&name, "off", |o| o == Observed::Off);
    assert_eq!(
        lv.domstate(&name).unwrap(),
        "shut off (shutdown)",
        "the guest did not power off on the ACPI power button (destroyed after the grace period)"
    );

    // A guest that powers itself off is reported by a lifecycle event.
    let watch = ConsoleWatch::start(&console, "jitsu-guest: listening");
    b.start(&vm).unwrap();
    watch.wait(BOOT).unwrap();
    assert_eq!(page(host, ip), format!("hello from {name}\n"));
    let t = Instant::now();
    let said = Curl::get(format!("http://{ip}/cgi-bin/poweroff"))
        .max_time(Duration::from_secs(5))
        .body(host)
        .unwrap();
    assert!(said.contains("powering off"), "{said}");
    events.wait(&name, "off", |o| o == Observed::Off);
    eprintln!(
        "the guest powered itself off: the event came {:.3} s after its request",
        t.elapsed().as_secs_f64()
    );
    assert_eq!(lv.domstate(&name).unwrap(), "shut off (shutdown)");

    // libvirtd crashes and comes back: the backend reconnects, pushes the current state, and
    // events flow on the new connection.
    b.start(&vm).unwrap();
    events.wait(&name, "running", running);
    assert_eq!(page(host, ip), format!("hello from {name}\n"));
    // Every event of that start has arrived by now: what comes next is the resync's.
    events.0.lock().unwrap().clear();
    lv.restart().unwrap();
    events.wait(&name, "running (resync after the reconnect)", running);
    assert!(running(b.state(&vm).unwrap()));
    lv.virsh(&["destroy", &name]).unwrap();
    events.wait(&name, "off", |o| o == Observed::Off);
    assert_eq!(b.state(&vm).unwrap(), Observed::Off);
    let d = b.lookup(&vm).unwrap();
    assert_eq!(d.mac(), Some(vm.mac()));
    drop(lv);
}
