//! The configuration's rules, through [`merge`] and [`from_toml`]: defaults, every flag and
//! key, precedence, and refusals that say where, which key, which value and why.

use std::collections::BTreeSet;
use std::path::Path;
use std::time::Duration;

use hickory_proto::rr::Name;
use shared_proto::Mac;

use super::*;

fn flags(specs: &[&str]) -> Flags {
    Flags {
        specs: specs.iter().map(|s| s.to_string()).collect(),
        ..Flags::default()
    }
}

fn www() -> &'static str {
    "name=www,dns=www.example.org,ip=10.0.0.1,command=sleep 100"
}

fn err(f: &Flags) -> String {
    merge(f, None).unwrap_err().to_string()
}

fn ok(f: &Flags) -> Config {
    merge(f, None).unwrap()
}

#[test]
fn defaults_are_jitsus() {
    let c = ok(&flags(&[www()]));
    assert_eq!(c.bind, DEFAULT_BIND);
    assert_eq!(c.listen, 53);
    assert_eq!(c.forwarders, Forwarders::System);
    assert_eq!(c.forwarder_port, 53);
    assert_eq!(c.delay, Duration::from_millis(100));
    assert_eq!(c.ttl, 60);
    assert_eq!(c.mode, StopMode::Destroy);
    assert_eq!(c.backend, BackendKind::Process);
    let vm = &c.vms[0];
    assert_eq!(&*vm.name, "www");
    assert_eq!(vm.dns, vec![Name::from_ascii("www.example.org.").unwrap()]);
    assert_eq!((vm.ip, vm.ip_prefix), ("10.0.0.1".parse().unwrap(), 24));
    assert_eq!(vm.mac(), Mac::derived_from(b"www"));
    assert_eq!(vm.response_delay, Duration::from_millis(100));
    assert_eq!(vm.stop_mode, StopMode::Destroy);
    assert_eq!(vm.handover, HandoverKind::Wire);
    assert_eq!(vm.ifup, Ifup::Jitsu);
    assert_eq!(vm.nic(), "br0");
    assert_eq!(vm.nics.len(), 1);
    assert_eq!(vm.nics[0].script, None);
    assert_eq!(vm.wait_for_timeout, DEFAULT_WAIT_FOR_TIMEOUT);
    assert_eq!(vm.boot_timeout, DEFAULT_BOOT_TIMEOUT);
    assert!(!vm.use_synjitsu && vm.wait_for.is_none() && vm.wait_for_key.is_none());
    assert_eq!(c.zones.len(), 1);
    assert_eq!(c.zones[0].name, Name::from_ascii("example.org.").unwrap());
    assert_eq!(c.zones[0].ns, Name::from_ascii("ns.example.org.").unwrap());
    assert_eq!(c.zones[0].ns_addresses, vec![DEFAULT_BIND]);
}

#[test]
fn every_flag_is_parsed() {
    let f = Flags {
        bind: Some("10.9.0.1".into()),
        listen: Some("5353".into()),
        forwarder: Some("9.9.9.9,1.1.1.1".into()),
        forwarder_port: Some("5300".into()),
        delay: Some("0.25".into()),
        ttl: Some("1".into()),
        mode: Some("suspend".into()),
        backend: Some("process".into()),
        connect: Some("process:///tmp/x?netns_prefix=t-".into()),
        synjitsu: Some("/run/synjitsu.sock".into()),
        persistdb: Some("/var/lib/jitsu".into()),
        metrics: Some("127.0.0.1:9153".into()),
        control: Some("/run/j/ctl.sock".into()),
        control_allow_uid: Some("1000".into()),
        log_level: Some("debug".into()),
        max_running: Some("4".into()),
        max_boots_per_second: Some("2".into()),
        max_removed_share: Some("0.25".into()),
        forward_clients: Some("10.9.0.0/24, fd00::1".into()),
        forward_max: Some("8".into()),
        tcp_max_clients: Some("30".into()),
        tcp_max_per_client: Some("3".into()),
        specs: vec![www().into()],
        config: None,
    };
    let c = ok(&f);
    assert_eq!(c.bind, "10.9.0.1".parse::<IpAddr>().unwrap());
    assert_eq!(c.listen, 5353);
    assert_eq!(
        c.forwarders,
        Forwarders::List(vec!["9.9.9.9".parse().unwrap(), "1.1.1.1".parse().unwrap()])
    );
    assert_eq!(c.forwarder_port, 5300);
    assert_eq!(c.delay, Duration::from_millis(250));
    assert_eq!(c.ttl, 1);
    assert_eq!(c.mode, StopMode::Suspend);
    assert_eq!(c.vms[0].stop_mode, StopMode::Suspend);
    assert_eq!(c.vms[0].response_delay, Duration::from_millis(250));
    assert_eq!(
        c.connect.as_deref(),
        Some("process:///tmp/x?netns_prefix=t-")
    );
    assert_eq!(c.synjitsu, Some(PathBuf::from("/run/synjitsu.sock")));
    assert_eq!(c.persistdb, Some(PathBuf::from("/var/lib/jitsu")));
    assert_eq!(c.metrics, Some("127.0.0.1:9153".parse().unwrap()));
    assert_eq!(c.control, std::path::PathBuf::from("/run/j/ctl.sock"));
    assert!(c.control_given);
    assert_eq!(c.control_allow_uid, Some(1000));
    assert_eq!(c.log_level, "debug");
    assert_eq!(c.max_running, Some(4));
    assert_eq!(c.max_boots_per_second, Some(2));
    assert_eq!(c.max_removed_share, 0.25);
    assert_eq!(
        c.forward_clients,
        Some(vec![
            "10.9.0.0/24".parse().unwrap(),
            "fd00::1/128".parse().unwrap()
        ])
    );
    assert_eq!(
        (c.forward_max, c.tcp_max_clients, c.tcp_max_per_client),
        (8, 30, 3)
    );
    assert_eq!(
        c.zones[0].ns_addresses,
        vec!["10.9.0.1".parse::<IpAddr>().unwrap()]
    );

    let mut off = flags(&[www()]);
    off.forwarder = Some("0.0.0.0".into());
    assert_eq!(ok(&off).forwarders, Forwarders::Off);
    off.forwarder = Some("".into());
    assert_eq!(ok(&off).forwarders, Forwarders::System);
    let d = ok(&off);
    assert_eq!(
        (
            d.forward_clients,
            d.forward_max,
            d.tcp_max_clients,
            d.tcp_max_per_client
        ),
        (
            None,
            DEFAULT_FORWARD_MAX,
            DEFAULT_TCP_MAX_CLIENTS,
            DEFAULT_TCP_MAX_PER_CLIENT
        )
    );
    // A host bit set is the network it is in; anything else is refused.
    off.forward_clients = Some("10.9.0.7/24".into());
    assert_eq!(
        ok(&off).forward_clients,
        Some(vec!["10.9.0.0/24".parse().unwrap()])
    );
    off.forward_clients = Some("10.9.0.0/24,everyone".into());
    let e = merge(&off, None).unwrap_err().to_string();
    assert!(
        e.starts_with(
            "flag --forward-clients: forward_clients = \"10.9.0.0/24,everyone\": expected networks"
        ),
        "{e}"
    );
}

#[test]
fn every_vm_key_is_parsed() {
    let spec = "name=mirage,dns=Mirage.Example.org,dns=m.example.org,ip=10.0.0.2/16,\
                ip6=fd00::2/80,mac=00:16:3e:00:00:02,response_delay=0.5,\
                wait_for_key=/local/domain/7/data/ready,wait_for=announce,\
                wait_for_timeout=3,boot_timeout=4.5,use_synjitsu=yes,stop_mode=shutdown,\
                handover=wire,\
                ifup=guest,gateway=10.0.0.254,nic=br1,command='sh -c \"a, b\"',\
                zone=example.org";
    let c = ok(&flags(&[spec]));
    let vm = &c.vms[0];
    assert_eq!(vm.dns.len(), 2);
    assert_eq!(vm.dns[0].to_string(), "mirage.example.org.");
    assert_eq!(vm.dns[1].to_string(), "m.example.org.");
    assert_eq!((vm.ip.to_string().as_str(), vm.ip_prefix), ("10.0.0.2", 16));
    assert_eq!(vm.ip6, Some("fd00::2".parse().unwrap()));
    assert_eq!(vm.ip6_prefix, 80);
    assert_eq!(vm.mac().to_string(), "00:16:3e:00:00:02");
    assert_eq!(vm.response_delay, Duration::from_millis(500));
    assert_eq!(
        vm.wait_for_key.as_deref(),
        Some("/local/domain/7/data/ready")
    );
    assert_eq!(vm.wait_for, Some(WaitFor::Announce));
    assert_eq!(vm.wait_for_timeout, Duration::from_secs(3));
    assert_eq!(vm.boot_timeout, Duration::from_millis(4500));
    assert!(vm.use_synjitsu && vm.synjitsu_tracked());
    assert_eq!(vm.stop_mode, StopMode::Shutdown);
    assert_eq!(vm.ifup, Ifup::Guest);
    assert_eq!(vm.gateway, Some("10.0.0.254".parse().unwrap()));
    assert_eq!(vm.nic(), "br1");
    assert_eq!(vm.command.as_deref(), Some("sh -c \"a, b\""));
    assert_eq!(vm.zone, Some(Name::from_ascii("example.org.").unwrap()));
}

#[test]
fn wait_for_tcp_takes_a_port_and_is_not_tracked_by_synjitsu() {
    let c = ok(&flags(&[
        "name=www,dns=www.example.org,ip=10.0.0.1,wait_for=tcp:8080,command=x",
    ]));
    let vm = &c.vms[0];
    assert_eq!(vm.wait_for, Some(WaitFor::Tcp(8080)));
    assert_eq!(vm.wait_for_timeout, DEFAULT_WAIT_FOR_TIMEOUT);
    assert!(!vm.synjitsu_tracked());
}

#[test]
fn libvirt_keys_are_parsed_for_libvirt() {
    let mut f = flags(&[
        "name=rump,dns=nginx.example.org,ip=10.0.0.3,kernel=/k/nginx.bin,memory=64000,\
         disk=/d/a.img,disk=/d/b.img,uuid=4DEA22B3-1D52-D8F3-2516-782E98AB3FA0,\
         cmdline=console=hvc0,handover=xenstore,wait_for_key=data/ready,initrd=/k/initrd,\
         console_log=/var/log/jitsu/rump.console,domain_type=xenpv",
    ]);
    f.backend = Some("libvirt".into());
    let c = ok(&f);
    let vm = &c.vms[0];
    assert_eq!(vm.kernel, Some(PathBuf::from("/k/nginx.bin")));
    assert_eq!(vm.initrd, Some(PathBuf::from("/k/initrd")));
    assert_eq!(
        vm.console_log,
        Some(PathBuf::from("/var/log/jitsu/rump.console"))
    );
    assert_eq!(vm.domain_type, Some(DomainType::XenPv));
    assert_eq!(vm.memory_kib, Some(64000), "KiB, as in Jitsu");
    assert_eq!(
        vm.disks,
        ["/d/a.img", "/d/b.img"]
            .map(|p| Disk {
                source: PathBuf::from(p),
                vdev: None,
                kind: DiskKind::File
            })
            .to_vec()
    );
    assert_eq!(
        vm.uuid.as_deref(),
        Some("4dea22b3-1d52-d8f3-2516-782e98ab3fa0")
    );
    assert_eq!(vm.cmdline.as_deref(), Some("console=hvc0"));
    assert_eq!(vm.handover, HandoverKind::Xenstore);
    assert_eq!(vm.wait_for_key.as_deref(), Some("data/ready"));
    assert!(vm.command.is_none());
}

#[test]
fn bad_specs_name_the_key_the_value_and_why() {
    let cases: &[(&str, &str, &str)] = &[
        (
            "name=www,dns=www.example.org,ip=10.0.0.300,command=x",
            "ip = \"10.0.0.300\"",
            "not an IPv4 address",
        ),
        (
            "name=www,dns=www.example.org,ip=10.0.0.1/33,command=x",
            "ip = \"10.0.0.1/33\"",
            "prefix length",
        ),
        (
            "name=www,dns=www.example.org,ip=127.0.0.1,command=x",
            "ip = \"127.0.0.1\"",
            "cannot be a guest",
        ),
        (
            "name=www,dns=www.example.org,ip=10.0.0.1,ip6=fd00::zz,command=x",
            "ip6 = \"fd00::zz\"",
            "not an IPv6",
        ),
        (
            "name=www,dns=www,ip=10.0.0.1,command=x",
            "dns = \"www\"",
            "two labels",
        ),
        (
            "name=www,dns=*.example.org,ip=10.0.0.1,command=x",
            "dns = \"*.example.org\"",
            "wildcards",
        ),
        (
            "name=www,dns=a b.org,ip=10.0.0.1,command=x",
            "dns = \"a b.org\"",
            "not a domain name",
        ),
        (
            "name=w/w,dns=www.example.org,ip=10.0.0.1,command=x",
            "name = \"w/w\"",
            "characters",
        ),
        (
            "name=www,dns=www.example.org,ip=10.0.0.1,mac=01:00:5e:00:00:01,command=x",
            "mac = \"01:00:5e:00:00:01\"",
            "unicast",
        ),
        (
            "name=www,dns=www.example.org,ip=10.0.0.1,mac=zz,command=x",
            "mac = \"zz\"",
            "invalid MAC",
        ),
        (
            "name=www,dns=www.example.org,ip=10.0.0.1,response_delay=-1,command=x",
            "response_delay = \"-1\"",
            "zero or more",
        ),
        (
            "name=www,dns=www.example.org,ip=10.0.0.1,response_delay=soon,command=x",
            "response_delay = \"soon\"",
            "number of seconds",
        ),
        (
            "name=www,dns=www.example.org,ip=10.0.0.1,wait_for_key=data/ready,command=x",
            "wait_for_key = \"data/ready\"",
            "absolute path",
        ),
        (
            "name=www,dns=www.example.org,ip=10.0.0.1,wait_for_key=/a b,command=x",
            "wait_for_key = \"/a b\"",
            "Xenstore path",
        ),
        (
            "name=www,dns=www.example.org,ip=10.0.0.1,wait_for=key,command=x",
            "wait_for = \"key\"",
            "announce",
        ),
        (
            "name=www,dns=www.example.org,ip=10.0.0.1,wait_for=tcp:0,command=x",
            "wait_for = \"tcp:0\"",
            "tcp:PORT",
        ),
        (
            "name=www,dns=www.example.org,ip=10.0.0.1,wait_for=tcp:http,command=x",
            "wait_for = \"tcp:http\"",
            "1-65535",
        ),
        (
            "name=www,dns=www.example.org,ip=10.0.0.1,wait_for_timeout=0,command=x",
            "wait_for_timeout = \"0\"",
            "more than zero",
        ),
        (
            "name=www,dns=www.example.org,ip=10.0.0.1,boot_timeout=0,command=x",
            "boot_timeout = \"0\"",
            "more than zero",
        ),
        (
            "name=www,dns=www.example.org,ip=10.0.0.1,use_synjitsu=maybe,command=x",
            "use_synjitsu = \"maybe\"",
            "true or false",
        ),
        (
            "name=www,dns=www.example.org,ip=10.0.0.1,stop_mode=pause,command=x",
            "stop_mode = \"pause\"",
            "destroy, suspend or shutdown",
        ),
        (
            "name=www,dns=www.example.org,ip=10.0.0.1,handover=xenstore,command=x",
            "handover = \"xenstore\"",
            "domain id",
        ),
        (
            "name=www,dns=www.example.org,ip=10.0.0.1,handover=pigeon,command=x",
            "handover = \"pigeon\"",
            "wire or xenstore",
        ),
        (
            "name=www,dns=www.example.org,ip=10.0.0.1,ifup=dhcp,command=x",
            "ifup = \"dhcp\"",
            "jitsu or guest",
        ),
        (
            "name=www,dns=www.example.org,ip=10.0.0.1,gateway=gw,command=x",
            "gateway = \"gw\"",
            "not an IP",
        ),
        (
            "name=www,dns=www.example.org,ip=10.0.0.1,nic=a-very-long-bridge-name,command=x",
            "nic = \"a-very-long-bridge-name\"",
            "interface name",
        ),
        (
            "name=www,dns=www.example.org,ip=10.0.0.1,command=",
            "command = \"\"",
            "empty",
        ),
        (
            "name=www,dns=www.example.org,ip=10.0.0.1,kernel=/k,command=x",
            "kernel = \"/k\"",
            "this key is for the libvirt and qemu backends; the process backend does not use it",
        ),
        (
            "name=www,dns=www.example.org,ip=10.0.0.1,colour=blue,command=x",
            "colour = \"blue\"",
            "unknown key",
        ),
        (
            "name=www,dns=www.example.org,ip=10.0.0.1,ip=10.0.0.2,command=x",
            "ip = \"10.0.0.2\"",
            "given twice",
        ),
        (
            "name=www,dns=www.example.org,ip=10.0.0.1,zone=example.net,command=x",
            "zone = \"example.net\"",
            "not inside",
        ),
        (
            "name=www,dns=www.example.org,ip=10.0.0.1,oops,command=x",
            "oops = \"\"",
            "key=value",
        ),
        (
            "name=www,dns=www.example.org,ip=10.0.0.1,command='x",
            "spec = ",
            "unterminated quote",
        ),
    ];
    for (spec, what, why) in cases {
        let e = err(&flags(&[spec]));
        assert!(e.starts_with("VM spec 1"), "{spec}: {e}");
        assert!(e.contains(what), "{spec}: {e} lacks {what}");
        assert!(e.contains(why), "{spec}: {e} lacks {why}");
    }
    let e = err(&flags(&["dns=www.example.org,ip=10.0.0.1,command=x"]));
    assert!(e.contains("name is missing"), "{e}");
    let e = err(&flags(&["name=www,ip=10.0.0.1,command=x"]));
    assert!(e.contains("VM spec 1 (www): dns is missing"), "{e}");
    let e = err(&flags(&["name=www,dns=www.example.org,command=x"]));
    assert!(e.contains("ip is missing"), "{e}");
    let e = err(&flags(&["name=www,dns=www.example.org,ip=10.0.0.1"]));
    assert!(e.contains("command is missing"), "{e}");
    let mut lv = flags(&["name=www,dns=www.example.org,ip=10.0.0.1,command=x"]);
    lv.backend = Some("libvirt".into());
    assert!(err(&lv).contains("process backend"));
    for (spec, what) in [
        (
            "console_log=c.log",
            "console_log = \"c.log\": must be an absolute path",
        ),
        (
            "domain_type=hvm",
            "expected qemu (or tcg), kvm, xenpvh or xenpv",
        ),
    ] {
        let mut lv = flags(&[&format!("name=www,dns=www.example.org,ip=10.0.0.1,{spec}")]);
        lv.backend = Some("libvirt".into());
        let e = err(&lv);
        assert!(e.starts_with("VM spec 1 (www): "), "{e}");
        assert!(e.contains(what), "{spec}: {e}");
    }
}

#[test]
fn vms_may_not_share_names_addresses_or_macs() {
    let e = err(&flags(&[
        www(),
        "name=www,dns=b.example.org,ip=10.0.0.2,command=x",
    ]));
    assert!(
        e.contains("VM spec 2 (www): name = \"www\": another VM"),
        "{e}"
    );
    let e = err(&flags(&[
        www(),
        "name=b,dns=WWW.example.org,ip=10.0.0.2,command=x",
    ]));
    assert!(e.contains("already answers"), "{e}");
    let e = err(&flags(&[
        www(),
        "name=b,dns=b.example.org,ip=10.0.0.1,command=x",
    ]));
    assert!(
        e.contains("ip = \"10.0.0.1\": VM www has this address"),
        "{e}"
    );
    let e = err(&flags(&[
        "name=a,dns=a.example.org,ip=10.0.0.1,mac=02:00:00:00:00:01,command=x",
        "name=b,dns=b.example.org,ip=10.0.0.2,mac=02:00:00:00:00:01,command=x",
    ]));
    assert!(e.contains("has this MAC"), "{e}");
}

#[test]
fn bad_flags_name_the_flag() {
    for (f, want) in [
        (
            Flags {
                ttl: Some("0".into()),
                ..flags(&[www()])
            },
            "flag --ttl: ttl = \"0\": must be between 1",
        ),
        (
            Flags {
                listen: Some("70000".into()),
                ..flags(&[www()])
            },
            "flag --listen",
        ),
        (
            Flags {
                bind: Some("localhost".into()),
                ..flags(&[www()])
            },
            "flag --bind: bind = \"localhost\": not an IP",
        ),
        (
            Flags {
                forwarder: Some("dns.google".into()),
                ..flags(&[www()])
            },
            "flag --forwarder",
        ),
        (
            Flags {
                forwarder: Some("0.0.0.0,1.1.1.1".into()),
                ..flags(&[www()])
            },
            "cannot be mixed",
        ),
        (
            Flags {
                delay: Some("x".into()),
                ..flags(&[www()])
            },
            "flag --delay",
        ),
        (
            Flags {
                mode: Some("pause".into()),
                ..flags(&[www()])
            },
            "flag --mode",
        ),
        (
            Flags {
                backend: Some("xen".into()),
                ..flags(&[www()])
            },
            "flag --backend: backend = \"xen\": expected process, libvirt, qemu or libxl",
        ),
        (
            Flags {
                metrics: Some("9153".into()),
                ..flags(&[www()])
            },
            "address:port",
        ),
        (
            Flags {
                max_running: Some("0".into()),
                ..flags(&[www()])
            },
            "flag --max-running",
        ),
        (
            Flags {
                max_boots_per_second: Some("-1".into()),
                ..flags(&[www()])
            },
            "whole number",
        ),
    ] {
        let e = err(&f);
        assert!(e.contains(want), "{e} lacks {want}");
    }
}

const FILE: &str = r#"# a dom0
bind = "10.0.0.254"
listen = 5353
forwarder = ["192.0.2.53", "192.0.2.54"]
delay = 0.2
ttl = 30
mode = "suspend"
max_running = 8

[[zone]]
name = "example.org"
ns = "ns1.example.org"
ns_address = "10.0.0.254"

[[vm]]
name = "mirage"
dns = ["mirage.example.org", "www.example.org"]
ip = "10.0.0.1"
use_synjitsu = true
response_delay = 0
command = "sleep infinity"

[[vm]]
name = "rump"
dns = "nginx.example.org"
ip = "10.0.0.2"
stop_mode = "destroy"
command = "sleep infinity"
"#;

#[test]
fn the_file_has_the_same_settings_and_flags_win() {
    let path = Path::new("dom0.toml");
    let f = Flags {
        ttl: Some("10".into()),
        specs: vec!["name=extra,dns=extra.example.org,ip=10.0.0.3,command=x".into()],
        ..Flags::default()
    };
    let c = merge(&f, Some(&from_toml(FILE, path).unwrap())).unwrap();
    assert_eq!(c.bind, "10.0.0.254".parse::<IpAddr>().unwrap());
    assert_eq!(c.listen, 5353);
    assert_eq!(
        c.forwarders,
        Forwarders::List(vec![
            "192.0.2.53".parse().unwrap(),
            "192.0.2.54".parse().unwrap()
        ])
    );
    assert_eq!(c.delay, Duration::from_millis(200));
    assert_eq!(c.ttl, 10, "the flag wins");
    assert_eq!(c.mode, StopMode::Suspend);
    assert_eq!(c.max_running, Some(8));
    assert_eq!(c.vms.len(), 3);
    let names: Vec<&str> = c.vms.iter().map(|v| &*v.name).collect();
    assert_eq!(names, ["extra", "mirage", "rump"]);
    let mirage = &c.vms[1];
    assert!(mirage.use_synjitsu);
    assert_eq!(mirage.response_delay, Duration::ZERO);
    assert_eq!(mirage.stop_mode, StopMode::Suspend);
    assert_eq!(mirage.dns.len(), 2);
    assert_eq!(c.vms[2].stop_mode, StopMode::Destroy);
    assert_eq!(c.zones.len(), 1);
    assert_eq!(c.zones[0].ns.to_string(), "ns1.example.org.");
    assert_eq!(
        c.zones[0].ns_addresses,
        vec!["10.0.0.254".parse::<IpAddr>().unwrap()]
    );
}

#[test]
fn bad_files_name_the_file_line_key_and_why() {
    let path = Path::new("dom0.toml");
    let cases: &[(&str, &str)] = &[
        (
            "ttl = 30\nfrobnicate = 1\n",
            "dom0.toml line 2: unknown field `frobnicate`",
        ),
        ("ttl = \n", "dom0.toml line 1"),
        (
            "ttl = 0\n",
            "dom0.toml line 1: ttl = \"0\": must be between 1",
        ),
        (
            "\n\nbind = \"nowhere\"\n",
            "dom0.toml line 3: bind = \"nowhere\": not an IP",
        ),
        (
            "[[vm]]\nname = \"www\"\ndns = \"www.example.org\"\nip = \"10.0.0.999\"\ncommand = \"x\"\n",
            "dom0.toml line 4 (vm www): ip = \"10.0.0.999\": not an IPv4 address",
        ),
        (
            "[[vm]]\nname = \"www\"\ndns = \"www.example.org\"\nip = \"10.0.0.1\"\ncommand = \"x\"\nspeed = 3\n",
            "dom0.toml line 6 (vm www): speed = \"3\": unknown key",
        ),
        (
            "\n[[vm]]\nname = \"www\"\ndns = \"www.example.org\"\ncommand = \"x\"\n",
            "dom0.toml line 2 (vm www): ip is missing",
        ),
        (
            "[[vm]]\nname = \"www\"\ndns = [[1]]\n",
            "dom0.toml line 3 (vm www): dns = \"\": nested",
        ),
        (
            "[[zone]]\nname = \"example.org\"\nttl = 3\n",
            "dom0.toml line 3: unknown field `ttl`",
        ),
        (
            "[[zone]]\nname = \"example.org\"\nns_address = \"x\"\n",
            "dom0.toml line 3: ns_address = \"x\"",
        ),
    ];
    for (text, want) in cases {
        let e = from_toml(text, path)
            .and_then(|f| merge(&Flags::default(), Some(&f)))
            .unwrap_err()
            .to_string();
        assert!(e.starts_with(want), "{text:?}: got {e}, want {want}");
    }
}

#[test]
fn a_root_zone_is_refused_at_its_name() {
    let path = Path::new("dom0.toml");
    let cases: &[(&str, usize)] = &[
        ("[[zone]]\nname = \".\"\n", 2),
        ("[[zone]]\nname = \".\"\nns = \"ns1.example.org\"\n", 2),
        ("[[zone]]\nns = \"ns1.example.org\"\nname = \".\"\n", 3),
    ];
    for (text, line) in cases {
        let e = from_toml(text, path)
            .and_then(|f| merge(&Flags::default(), Some(&f)))
            .unwrap_err();
        match &e {
            ConfigError::Invalid { key, value, .. } => {
                assert_eq!(key, "name", "{text:?}");
                assert_eq!(value, ".", "{text:?}");
            }
            other => panic!("{text:?}: got {other}, want an invalid name"),
        }
        assert_eq!(
            e.to_string(),
            format!("dom0.toml line {line}: name = \".\": jitsu-dns does not serve the root zone"),
            "{text:?}"
        );
    }
}

#[test]
fn zones_default_to_the_parent_and_nest_into_the_outer_one() {
    let c = ok(&flags(&[
        "name=a,dns=www.example.org,ip=10.0.0.1,command=x",
        "name=b,dns=a.www.example.org,ip=10.0.0.2,command=x",
        "name=c,dns=c.example.net,ip=10.0.0.3,command=x",
        "name=d,dns=d.sub.example.com,ip=10.0.0.4,zone=example.com,command=x",
    ]));
    let zones: BTreeSet<String> = c.zones.iter().map(|z| z.name.to_string()).collect();
    assert_eq!(
        zones,
        ["example.com.", "example.net.", "example.org."]
            .iter()
            .map(|s| s.to_string())
            .collect()
    );
    let n = Name::from_ascii("a.www.example.org.").unwrap();
    assert_eq!(c.zone_of(&n).unwrap().name.to_string(), "example.org.");
    assert!(
        c.zone_of(&Name::from_ascii("example.com.").unwrap())
            .is_some()
    );
    assert!(
        c.zone_of(&Name::from_ascii("example.info.").unwrap())
            .is_none()
    );
}

#[test]
fn a_reload_keeps_the_settings_that_need_a_restart() {
    let running = ok(&Flags {
        bind: Some("10.0.0.254".into()),
        metrics: Some("127.0.0.1:9153".into()),
        ..flags(&[www()])
    });
    let read = ok(&Flags {
        bind: Some("10.0.0.1".into()),
        listen: Some("5353".into()),
        backend: Some("libvirt".into()),
        ttl: Some("5".into()),
        metrics: Some("127.0.0.1:9153".into()),
        ..flags(&["name=www,dns=www.example.org,ip=10.0.0.1"])
    });
    let (c, kept) = read.for_reload(&running);
    assert_eq!(kept, ["bind", "listen", "backend"]);
    assert_eq!(c.dns_addr(), running.dns_addr());
    assert_eq!(c.backend, BackendKind::Process);
    assert_eq!(c.ttl, 5, "the rest is the new configuration's");
    let (_, kept) = running.clone().for_reload(&running);
    assert!(kept.is_empty());
}

#[test]
fn rumprun_config_is_a_file_that_must_be_there_at_start() {
    let dir = std::env::temp_dir().join(format!("jitsu-cfg-rumprun-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let json = dir.join("nginx.json");
    std::fs::write(&json, "{\"cmdline\": \"nginx\"}").unwrap();
    let spec = |path: &str| {
        let mut f = flags(&[&format!(
            "name=rump,dns=nginx.example.org,ip=10.0.0.3,kernel=/k/nginx.bin,\
             rumprun_config={path}"
        )]);
        f.backend = Some("libvirt".into());
        f
    };
    let c = ok(&spec(&json.display().to_string()));
    assert_eq!(c.vms[0].rumprun_config.as_deref(), Some(json.as_path()));
    // Jitsu ignored a missing file; here it is refused, naming the key and the file.
    let missing = dir.join("missing.json").display().to_string();
    let e = err(&spec(&missing));
    assert!(
        e.contains("rumprun_config = ") && e.contains(&missing) && e.contains("No such file"),
        "{e}"
    );
    // A relative path is the working directory's, as Jitsu read it.
    let cwd = std::env::current_dir().unwrap();
    let e = err(&spec("no-such-rumprun.json"));
    assert!(
        e.contains(&cwd.join("no-such-rumprun.json").display().to_string()),
        "{e}"
    );
    // It is the libvirt backend's.
    let e = err(&flags(&[&format!(
        "{},rumprun_config={}",
        www(),
        json.display()
    )]));
    assert!(e.contains("libvirt backend"), "{e}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// A name of `len` characters (without the final dot) ending in `.example.org`... made of
/// labels of at most 63: `a.<63 b>.<63 b>.<63 b>.<c..>` as in issue 15, for `len` 193 to 253.
fn long_name(len: usize) -> String {
    let b63 = "b".repeat(63);
    let head = format!("a.{b63}.{b63}.{b63}.");
    assert!(len > head.len() && len - head.len() <= 63);
    let name = format!("{head}{}", "c".repeat(len - head.len()));
    assert_eq!(name.len(), len);
    name
}

#[test]
fn a_name_whose_zone_has_no_room_for_its_ns_is_refused_not_a_panic() {
    // 253 characters is the longest valid name (255 octets on the wire); its zone (the name
    // minus `a.`) has 251, and `ns.<zone>` would have 254: one too many.
    let spec = |n: &str| format!("name=x,dns={n},ip=10.91.0.1,command=true");
    let e = err(&flags(&[&spec(&long_name(253))]));
    assert!(
        e.starts_with(&format!("VM spec 1 (x): dns = \"{}\": ", long_name(253))),
        "{e}"
    );
    assert!(
        e.contains("no room for its NS name ns.") && e.contains("give the zone a [[zone]] table"),
        "{e}"
    );
    // One shorter: ns.<zone> has 253 characters, which is valid.
    let c = ok(&flags(&[&spec(&long_name(252))]));
    assert_eq!(
        c.zones[0].ns.to_ascii().len(),
        254,
        "253 and the root's dot"
    );
    // The same zone through `zone=`.
    let zone = &long_name(253)[2..];
    let e = err(&flags(&[&format!("{},zone={zone}", spec(&long_name(253)))]));
    assert!(
        e.starts_with(&format!("VM spec 1 (x): zone = \"{zone}\": ")),
        "{e}"
    );
    // A [[zone]] of that length: refused without `ns`, served with one.
    let path = Path::new("dom0.toml");
    let file = |ns: &str| {
        from_toml(
            &format!("[[zone]]\nname = \"{zone}\"\n{ns}\n[[vm]]\nname = \"x\"\ndns = \"{}\"\nip = \"10.91.0.1\"\ncommand = \"true\"\n", long_name(253)),
            path,
        )
        .and_then(|f| merge(&Flags::default(), Some(&f)))
    };
    let e = file("").unwrap_err().to_string();
    assert!(
        e.starts_with(&format!("dom0.toml line 2: name = \"{zone}\": ")),
        "{e}"
    );
    assert!(e.contains("no room for its NS name"), "{e}");
    let c = file("ns = \"ns.example.org\"").unwrap();
    assert_eq!(c.zones[0].ns.to_string(), "ns.example.org.");
    // Longer than 253 is no name at all.
    let e = err(&flags(&[&spec(&format!("{}.org", long_name(250)))]));
    assert!(e.contains("not a domain name"), "{e}");
}

#[test]
fn a_reload_may_remove_at_most_its_share_of_the_vms() {
    let vm = |n: u8| format!("name=v{n},dns=v{n}.example.org,ip=10.0.0.{n},command=x");
    let with = |specs: &[String], share: Option<&str>| {
        ok(&Flags {
            max_removed_share: share.map(Into::into),
            ..flags(&specs.iter().map(String::as_str).collect::<Vec<_>>())
        })
    };
    let four: Vec<String> = (1..=4).map(vm).collect();
    let running = with(&four, None);
    assert_eq!(running.max_removed_share, DEFAULT_MAX_REMOVED_SHARE);
    // Half may go by default; more may not, nor all of them.
    assert!(with(&four[2..], None).check_removals(&running).is_ok());
    let e = with(&four[3..], None).check_removals(&running).unwrap_err();
    assert_eq!(
        e.to_string(),
        "it would remove 3 of 4 VMs (v1, v2, v3), more than max_removed_share = 0.5 allows; \
         to remove them set max_removed_share = 1.0 in the file, then reload"
    );
    let e = with(&[], None).check_removals(&running).unwrap_err();
    assert!(
        e.to_string().starts_with("it would remove 4 of 4 VMs"),
        "{e}"
    );
    // Unless the new configuration says so.
    assert!(with(&[], Some("1.0")).check_removals(&running).is_ok());
    assert!(
        with(&four[3..], Some("0.75"))
            .check_removals(&running)
            .is_ok()
    );
    // Adding and changing VMs removes nothing; nor does a first configuration of none.
    let more: Vec<String> = (1..=9).map(vm).collect();
    assert!(with(&more, Some("0")).check_removals(&running).is_ok());
    let none = with(&[], None);
    assert!(with(&[], None).check_removals(&none).is_ok());
    // A long list is cut short.
    let many: Vec<String> = (1..=20).map(vm).collect();
    let e = with(&[], None)
        .check_removals(&with(&many, None))
        .unwrap_err();
    assert!(
        e.to_string()
            .contains("(v1, v2, v3, v4, v5, v6, v7, v8, v9, v10 and 10 more)"),
        "{e}"
    );
    // The share is a share.
    for bad in ["1.5", "-0.1", "half"] {
        let e = err(&Flags {
            max_removed_share: Some(bad.into()),
            ..flags(&[www()])
        });
        assert!(e.contains("expected a share from 0 to 1"), "{bad}: {e}");
    }
}

#[test]
fn the_backend_follows_the_uri_scheme_unless_x_names_it() {
    let with = |x: Option<&str>, c: Option<&str>| {
        merge(
            &Flags {
                backend: x.map(Into::into),
                connect: c.map(Into::into),
                ..flags(&["name=www,dns=www.example.org,ip=10.0.0.1"])
            },
            None,
        )
    };
    // Jitsu's own first example: -c xen:/// alone is libvirt.
    for uri in [
        "xen:///",
        "xen:///system",
        "qemu:///system",
        "test:///default",
        "vbox:///session",
        "qemu+ssh://root@h/system?keyfile=/k",
    ] {
        let c = with(None, Some(uri)).unwrap();
        assert_eq!(c.backend, BackendKind::Libvirt, "{uri}");
        assert_eq!(c.connect.as_deref(), Some(uri));
        let scheme = uri.split(':').next().unwrap();
        assert_eq!(
            c.backend_why,
            Some(format!("libvirt, from the scheme {scheme}: of --connect"))
        );
    }
    let process = |c: Option<&str>| {
        merge(
            &Flags {
                connect: c.map(Into::into),
                ..flags(&[www()])
            },
            None,
        )
        .unwrap()
    };
    let c = process(Some("process:///tmp/p?netns_prefix=t-"));
    assert_eq!((c.backend, c.backend_why), (BackendKind::Process, None));
    let c = process(None);
    assert_eq!((c.backend, c.connect), (BackendKind::Process, None));
    // -x libxl is libvirt's libxl driver.
    let c = with(Some("libxl"), None).unwrap();
    assert_eq!(c.backend, BackendKind::Libvirt);
    assert_eq!(c.connect.as_deref(), Some("xen:///system"));
    assert_eq!(
        c.backend_why.as_deref(),
        Some("-x libxl: libvirt's libxl driver at xen:///system")
    );
    let c = with(Some("libxl"), Some("xen+ssh://dom0/system")).unwrap();
    assert_eq!(c.connect.as_deref(), Some("xen+ssh://dom0/system"));
    let e = with(Some("libxl"), Some("qemu:///system"))
        .unwrap_err()
        .to_string();
    assert!(
        e.starts_with(
            "flag --connect: connect = \"qemu:///system\": -x libxl is libvirt's libxl driver"
        ),
        "{e}"
    );
    // -x wins over the scheme (and the backend refuses a URI that is not its own).
    let c = with(Some("libvirt"), Some("process:///x")).unwrap();
    assert_eq!((c.backend, c.backend_why), (BackendKind::Libvirt, None));
    // XAPI is refused saying what to use.
    let e = with(Some("xapi"), None).unwrap_err().to_string();
    assert!(
        e.starts_with(
            "flag --backend: backend = \"xapi\": XAPI (XenServer, XCP-ng) is not supported"
        ) && e.contains("-x libxl"),
        "{e}"
    );
    // Not a URI at all.
    let e = with(None, Some("/run/jitsu")).unwrap_err().to_string();
    assert!(e.contains("connect = \"/run/jitsu\": not a URI"), "{e}");
    // In the file too.
    let f = from_toml("connect = \"xen:///\"\n", Path::new("j.toml")).unwrap();
    let c = merge(
        &flags(&["name=www,dns=www.example.org,ip=10.0.0.1"]),
        Some(&f),
    )
    .unwrap();
    assert_eq!(c.backend, BackendKind::Libvirt);
}

#[test]
fn synjitsu_takes_a_socket_path_not_a_uuid() {
    let with = |v: &str| {
        merge(
            &Flags {
                synjitsu: Some(v.into()),
                ..flags(&[www()])
            },
            None,
        )
    };
    let e = with("4dea22b3-1d52-d8f3-2516-782e98ab3fa0")
        .unwrap_err()
        .to_string();
    assert!(
        e.starts_with("flag --synjitsu: synjitsu = \"4dea22b3-1d52-d8f3-2516-782e98ab3fa0\": a UUID is how Jitsu 0.2")
            && e.contains("control socket"),
        "{e}"
    );
    // A file or directory that is there and is no socket.
    let e = with("/").unwrap_err().to_string();
    assert!(e.contains("exists and is not a socket"), "{e}");
    let e = with("").unwrap_err().to_string();
    assert!(e.contains("control socket"), "{e}");
    // A socket that is not there yet is fine: synjitsu may start later.
    let c = with("/run/jitsu/no-synjitsu-yet.sock").unwrap();
    assert_eq!(
        c.synjitsu.as_deref(),
        Some(Path::new("/run/jitsu/no-synjitsu-yet.sock"))
    );
    let dir = std::env::temp_dir().join(format!("jitsu-sock-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let sock = dir.join("s.sock");
    let _listener = std::os::unix::net::UnixListener::bind(&sock).unwrap();
    assert!(with(sock.to_str().unwrap()).is_ok());
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn memory_is_kib_as_in_jitsu_with_units_and_no_silent_change() {
    let lv = |mem: &str| {
        merge(
            &Flags {
                backend: Some("libvirt".into()),
                ..flags(&[&format!(
                    "name=m,dns=m.example.org,ip=10.0.0.1,memory={mem}"
                )])
            },
            None,
        )
        .map(|c| c.vms[0].memory_kib.unwrap())
        .map_err(|e| e.to_string())
    };
    // Jitsu's README: memory=64000 is "64MB".
    assert_eq!(lv("64000"), Ok(64000));
    for (given, kib) in [
        ("65536K", 65536),
        ("65536k", 65536),
        ("65536KiB", 65536),
        ("64M", 65536),
        ("64MiB", 65536),
        ("1G", 1 << 20),
        ("1gib", 1 << 20),
        ("4M", 4096),
        ("1024G", 1 << 30),
        ("16384", 16384),
    ] {
        assert_eq!(lv(given), Ok(kib), "{given}");
    }
    // A bare number that was MiB here before and is no size in KiB is refused, saying how to
    // write it now.
    let e = lv("128").unwrap_err();
    assert!(
        e.starts_with("VM spec 1 (m): memory = \"128\": a bare number is KiB, as in Jitsu")
            && e.contains("write 128M for 128 MiB"),
        "{e}"
    );
    assert!(lv("16383").is_err());
    // Absurd sizes and units.
    for (given, why) in [
        ("3M", "between 4 MiB (4M) and 1 TiB"),
        ("2048G", "between 4 MiB"),
        ("1073741825", "between 4 MiB"),
        ("99999999999999999999G", "expected a size"),
        ("18446744073709551615G", "between 4 MiB"),
        ("64MB", "unknown unit"),
        ("64 M", "unknown unit"),
        ("lots", "expected a size"),
        ("-64M", "expected a size"),
        ("", "expected a size"),
    ] {
        let e = lv(given).unwrap_err();
        assert!(e.contains(why), "{given}: {e}");
    }
    // In the file, a unit is required: `memory = 64` meant 64 MiB there, and is refused
    // rather than read as 64 KiB.
    let file = |mem: &str| {
        let text = format!(
            "backend = \"libvirt\"\n[[vm]]\nname = \"m\"\ndns = \"m.example.org\"\nip = \"10.0.0.1\"\nmemory = {mem}\n"
        );
        from_toml(&text, Path::new("dom0.toml"))
            .and_then(|f| merge(&Flags::default(), Some(&f)))
            .map(|c| c.vms[0].memory_kib.unwrap())
            .map_err(|e| e.to_string())
    };
    let e = file("64").unwrap_err();
    assert!(
        e.starts_with("dom0.toml line 6 (vm m): memory = \"64\": give a unit: memory = \"64M\""),
        "{e}"
    );
    assert!(file("64000").is_err() && file("\"64000\"").is_err());
    assert_eq!(file("\"64M\""), Ok(65536));
    assert_eq!(file("\"64000K\""), Ok(64000));
}

/// The working directory of this test process, where a spec's relative paths lead.
fn cwd() -> PathBuf {
    std::env::current_dir().unwrap()
}

#[test]
fn relative_paths_are_read_from_the_working_directory_or_the_files_directory() {
    let lv = |keys: &str| {
        let mut f = flags(&[&format!("name=k,dns=k.example.org,ip=10.0.0.1,{keys}")]);
        f.backend = Some("libvirt".into());
        merge(&f, None).map(|c| c.vms[0].clone())
    };
    // On the command line: the working directory, as Jitsu read `kernel=mirage-www.xen`.
    let vm = lv("kernel=mirage-www.xen,initrd=./boot/i.gz,disk=images/data.iso@xvdb").unwrap();
    assert_eq!(vm.kernel, Some(cwd().join("mirage-www.xen")));
    assert_eq!(vm.initrd, Some(cwd().join("boot/i.gz")));
    assert_eq!(vm.disks[0].source, cwd().join("images/data.iso"));
    // Absolute paths are kept; a console log must be absolute as before (libvirt writes it).
    let vm = lv("kernel=/k/vmlinux").unwrap();
    assert_eq!(vm.kernel, Some(PathBuf::from("/k/vmlinux")));
    let e = lv("console_log=c.log").unwrap_err().to_string();
    assert!(e.contains("must be an absolute path"), "{e}");
    // In a file: the file's directory, wherever jitsu-dns runs from.
    let text = "backend = \"libvirt\"\n[[vm]]\nname = \"k\"\ndns = \"k.example.org\"\n\
                ip = \"10.0.0.1\"\nkernel = \"unikernels/www.xen\"\ndisk = [\"../data.img@xvdb\", \"/dev/loop5@xvda\"]\n";
    for (path, dir) in [
        (
            PathBuf::from("/etc/jitsu/jitsu.toml"),
            PathBuf::from("/etc/jitsu"),
        ),
        (PathBuf::from("conf/jitsu.toml"), cwd().join("conf")),
    ] {
        let f = from_toml(text, &path).unwrap();
        let vm = merge(&Flags::default(), Some(&f)).unwrap().vms[0].clone();
        assert_eq!(vm.kernel, Some(dir.join("unikernels/www.xen")), "{path:?}");
        assert_eq!(vm.disks[0].source, dir.join("../data.img"), "{path:?}");
        assert_eq!(vm.disks[1].source, PathBuf::from("/dev/loop5"), "{path:?}");
    }
}

#[test]
fn disks_are_jitsus_device_or_file_at_guest_device() {
    let disks = |d: &str| {
        let mut f = flags(&[&format!(
            "name=d,dns=d.example.org,ip=10.0.0.1,kernel=/k,{d}"
        )]);
        f.backend = Some("libvirt".into());
        merge(&f, None)
            .map(|c| c.vms[0].disks.clone())
            .map_err(|e| e.to_string())
    };
    let got =
        disks("disk=/dev/loop5@xvda,disk=images/data.iso@xvdb,disk=/d/root.qcow2,disk=/d/x.img@")
            .unwrap();
    assert_eq!(
        got,
        vec![
            Disk {
                source: "/dev/loop5".into(),
                vdev: Some("xvda".into()),
                kind: DiskKind::Block
            },
            Disk {
                source: cwd().join("images/data.iso"),
                vdev: Some("xvdb".into()),
                kind: DiskKind::File
            },
            Disk {
                source: "/d/root.qcow2".into(),
                vdev: None,
                kind: DiskKind::File
            },
            Disk {
                source: "/d/x.img".into(),
                vdev: None,
                kind: DiskKind::File
            },
        ]
    );
    assert_eq!(
        got.iter().map(Disk::format).collect::<Vec<_>>(),
        ["raw", "raw", "qcow2", "raw"]
    );
    for ok in ["vda", "sdb", "hdc", "xvdaa", "xvda1"] {
        assert!(disks(&format!("disk=/d/a.img@{ok}")).is_ok(), "{ok}");
    }
    for (d, why) in [
        (
            "disk=@xvda",
            "expected <image file or /dev/ device>[@<guest device>]",
        ),
        ("disk=", "expected <image file or /dev/ device>"),
        ("disk=/d/a.img@eth0", "eth0 is not a guest disk device"),
        ("disk=/d/a.img@xvd", "xvd is not a guest disk device"),
        ("disk=/d/a.img@xvda@b", "is not a guest disk device"),
        (
            "disk=/d/a.img@xvda,disk=/d/b.img@xvda",
            "disk = \"/d/b.img@xvda\": another disk is xvda",
        ),
    ] {
        let e = disks(d).unwrap_err();
        assert!(
            e.starts_with("VM spec 1 (d): disk = ") && e.contains(why),
            "{d}: {e}"
        );
    }
}

#[test]
fn nics_repeat_with_a_script_each_as_jitsu_gave_them() {
    let lv = |keys: &str| {
        let mut f = flags(&[&format!(
            "name=n,dns=n.example.org,ip=10.0.0.1,kernel=/k,{keys}"
        )]);
        f.backend = Some("libvirt".into());
        merge(&f, None)
            .map(|c| c.vms[0].clone())
            .map_err(|e| e.to_string())
    };
    let vm = lv("nic=br0,nic=br1,nic=br2,script=vif-a,script=vif-b,mac=02:00:00:00:00:01").unwrap();
    let bridges: Vec<&str> = vm.nics.iter().map(|n| n.bridge.as_str()).collect();
    assert_eq!(bridges, ["br0", "br1", "br2"]);
    // NIC i takes script[i mod #scripts].
    let scripts: Vec<Option<&str>> = vm.nics.iter().map(|n| n.script.as_deref()).collect();
    assert_eq!(scripts, [Some("vif-a"), Some("vif-b"), Some("vif-a")]);
    // The first NIC's MAC is `mac`, the one synjitsu steers; the others are the name's.
    assert_eq!(vm.mac(), "02:00:00:00:00:01".parse().unwrap());
    assert_eq!(vm.nics[1].mac, Mac::derived_from(b"n/nic1"));
    assert_eq!(vm.nics[2].mac, Mac::derived_from(b"n/nic2"));
    let macs: BTreeSet<Mac> = vm.nics.iter().map(|n| n.mac).collect();
    assert_eq!(macs.len(), 3);
    // One script for every NIC.
    let vm = lv("nic=br0,nic=br1,script=/etc/xen/scripts/vif-bridge").unwrap();
    assert!(
        vm.nics
            .iter()
            .all(|n| n.script.as_deref() == Some("/etc/xen/scripts/vif-bridge"))
    );
    // A domain's MACs replace the keys', place by place.
    let domain: Vec<Mac> = vec!["02:aa:00:00:00:01".parse().unwrap()];
    let v = vm.with_macs(&domain);
    assert_eq!(v.mac(), domain[0]);
    assert_eq!(v.nics[1].mac, vm.nics[1].mac);
    // The process backend has one interface: a second nic and a script are refused.
    let e = err(&flags(&[
        "name=p,dns=p.example.org,ip=10.0.0.1,command=x,nic=br0,nic=br1",
    ]));
    assert!(
        e.starts_with("VM spec 1 (p): nic = \"br1\": the process backend gives a VM one interface"),
        "{e}"
    );
    let e = err(&flags(&[
        "name=p,dns=p.example.org,ip=10.0.0.1,command=x,script=vif-bridge",
    ]));
    assert!(
        e.contains("script = \"vif-bridge\": this key is for the libvirt backend"),
        "{e}"
    );
    let e = lv("script=").unwrap_err();
    assert!(e.contains("expected a vif script"), "{e}");
    // Another VM's NIC MAC clashes like its first one.
    let mut f = flags(&[
        "name=n,dns=n.example.org,ip=10.0.0.1,kernel=/k,nic=br0,nic=br1",
        &format!(
            "name=m,dns=m.example.org,ip=10.0.0.2,kernel=/k,mac={}",
            Mac::derived_from(b"n/nic1")
        ),
    ]);
    f.backend = Some("libvirt".into());
    assert!(err(&f).contains("VM n has this MAC"), "{}", err(&f));
}

#[test]
fn an_overlay_replaces_adds_and_removes_vms_and_its_errors_name_the_change() {
    let f = flags(&[
        "name=a,dns=a.example.org,ip=10.0.0.1,command=x",
        "name=b,dns=b.example.org,ip=10.0.0.2,command=x",
    ]);
    let keys = |pairs: &[(&str, &str)]| {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect::<Vec<_>>()
    };
    let edited = |pairs: &[(&str, &str)]| {
        Some(EditedVm {
            change: "1a2b3c4".into(),
            keys: keys(pairs),
        })
    };
    let mut overlay = Overlay::new();
    overlay.insert(
        "a".into(),
        edited(&[
            ("name", "a"),
            ("dns", "a.example.org"),
            ("dns", "a2.example.org"),
            ("ip", "10.0.0.1"),
            ("response_delay", "0.5"),
            ("command", "x"),
        ]),
    );
    overlay.insert("b".into(), None);
    overlay.insert(
        "c".into(),
        edited(&[
            ("name", "c"),
            ("dns", "c.example.net"),
            ("ip", "10.0.0.3"),
            ("command", "y"),
        ]),
    );
    let c = merge_over(&f, None, &overlay).unwrap();
    let names: Vec<&str> = c.vms.iter().map(|v| &*v.name).collect();
    assert_eq!(names, vec!["a", "c"]);
    assert_eq!(c.vms[0].response_delay, Duration::from_millis(500));
    assert_eq!(c.vms[0].dns.len(), 2);
    assert!(
        c.zones.iter().any(|z| z.name.to_string() == "example.net."),
        "the added VM's zone is served"
    );

    overlay.insert(
        "c".into(),
        edited(&[
            ("name", "c"),
            ("dns", "c.example.net"),
            ("ip", "10.0.0.1"),
            ("command", "y"),
        ]),
    );
    let e = merge_over(&f, None, &overlay).unwrap_err().to_string();
    assert!(
        e.contains("change 1a2b3c4 (vm c)") && e.contains("10.0.0.1"),
        "{e}"
    );
    overlay.insert(
        "c".into(),
        edited(&[
            ("name", "d"),
            ("dns", "c.example.net"),
            ("ip", "10.0.0.3"),
            ("command", "y"),
        ]),
    );
    let e = merge_over(&f, None, &overlay).unwrap_err().to_string();
    assert!(e.contains("its name must be c"), "{e}");
}

#[test]
fn qemu_uris_are_libvirts_unless_x_qemu_names_the_direct_backend() {
    let with = |x: Option<&str>, c: Option<&str>| {
        merge(
            &Flags {
                backend: x.map(Into::into),
                connect: c.map(Into::into),
                ..flags(&["name=uk,dns=uk.example.org,ip=10.0.0.5,kernel=/k/uk.elf"])
            },
            None,
        )
    };
    // Without -x, libvirt's QEMU URIs stay libvirt's, as in Jitsu.
    for uri in [
        "qemu:///system",
        "qemu:///session",
        "qemu:///embed?root=/var/lib/x",
        "qemu://host/system",
    ] {
        let c = with(None, Some(uri)).unwrap();
        assert_eq!(c.backend, BackendKind::Libvirt, "{uri}");
    }
    // A run directory without -x is refused, saying to add it.
    let e = with(None, Some("qemu:///run/jitsu/qemu"))
        .unwrap_err()
        .to_string();
    assert!(
        e.starts_with(
            "flag --connect: connect = \"qemu:///run/jitsu/qemu\": libvirt's QEMU driver"
        ) && e.contains("add -x qemu"),
        "{e}"
    );
    // -x qemu is the direct backend, with or without -c.
    let c = with(Some("qemu"), Some("qemu:///run/jitsu/qemu")).unwrap();
    assert_eq!(
        (c.backend, c.connect.as_deref(), c.backend_why),
        (BackendKind::Qemu, Some("qemu:///run/jitsu/qemu"), None)
    );
    let c = with(Some("qemu"), None).unwrap();
    assert_eq!((c.backend, c.connect), (BackendKind::Qemu, None));
}

#[test]
fn qemu_vms_take_the_keys_of_a_qemu_command_line() {
    let qemu = |spec: &str| {
        merge(
            &Flags {
                backend: Some("qemu".into()),
                specs: vec![format!("name=uk,dns=uk.example.org,ip=10.0.0.5,{spec}")],
                ..Flags::default()
            },
            None,
        )
    };
    let c = qemu(
        "kernel=/k/uk.elf,initrd=/k/i,cmdline=ip=10.0.0.5/24 gw=10.0.0.1,memory=32M,\
         console_log=/var/log/uk.console,domain_type=kvm,mac=02:00:00:00:00:05,nic=br1",
    )
    .unwrap();
    let vm = &c.vms[0];
    assert_eq!(vm.kernel.as_deref(), Some(Path::new("/k/uk.elf")));
    assert_eq!(vm.initrd.as_deref(), Some(Path::new("/k/i")));
    assert_eq!(vm.cmdline.as_deref(), Some("ip=10.0.0.5/24 gw=10.0.0.1"));
    assert_eq!(vm.memory_kib, Some(32 * 1024));
    assert_eq!(
        vm.console_log.as_deref(),
        Some(Path::new("/var/log/uk.console"))
    );
    assert_eq!(vm.domain_type, Some(DomainType::Kvm));
    assert_eq!(vm.mac().to_string(), "02:00:00:00:00:05");
    assert_eq!(vm.nic(), "br1");
    // tcg is qemu, as libvirt's type 'qemu' is TCG.
    let c = qemu("kernel=/k,domain_type=tcg").unwrap();
    assert_eq!(c.vms[0].domain_type, Some(DomainType::Qemu));
    for (spec, want) in [
        (
            "cmdline=x",
            "VM spec 1 (uk): kernel is missing: the qemu backend boots each VM's kernel directly",
        ),
        (
            "kernel=/k,domain_type=xenpvh",
            "domain_type = \"xenpvh\": the qemu backend runs QEMU: tcg (or qemu) or kvm",
        ),
        (
            "kernel=/k,disk=/d.img",
            "disk = \"/d.img\": this key is for the libvirt backend; the qemu backend does not use it",
        ),
        (
            "kernel=/k,command=x",
            "command = \"x\": this key is for the process backend; the qemu backend does not use it",
        ),
        (
            "kernel=/k,nic=br0,nic=br1",
            "nic = \"br1\": the qemu backend gives a VM one interface (one tap)",
        ),
        ("kernel=/k,handover=xenstore", "the qemu backend has none"),
        (
            "kernel=/k,wait_for_key=ready",
            "the qemu backend has no Xen domain ids",
        ),
    ] {
        let e = qemu(spec).unwrap_err().to_string();
        assert!(e.contains(want), "{spec}: {e}");
    }
    // A key two backends share names both when a third is refused it.
    let e = err(&flags(&[&format!("{},kernel=/k", www())]));
    assert!(
        e.contains("kernel = \"/k\": this key is for the libvirt and qemu backends; the process backend does not use it"),
        "{e}"
    );
}

#[test]
fn announce_listening_is_the_guests_promise_told_to_synjitsu_and_boot_is_the_default() {
    use crate::fleet::identity as synjitsu_identity;
    let c = ok(&flags(&[www()]));
    assert_eq!(c.vms[0].announce, Announce::Boot);
    assert!(!synjitsu_identity(&c.vms[0], None, None).announces_listening);
    let c = ok(&flags(&[&format!(
        "{},use_synjitsu=true,announce=listening",
        www()
    )]));
    assert_eq!(c.vms[0].announce, Announce::Listening);
    assert!(synjitsu_identity(&c.vms[0], None, None).announces_listening);
    let c = ok(&flags(&[&format!("{},announce=boot", www())]));
    assert_eq!(c.vms[0].announce, Announce::Boot);
    let e = err(&flags(&[&format!("{},announce=yes", www())]));
    assert!(
        e.contains("announce") && e.contains("expected boot or listening"),
        "{e}"
    );
    // The same key in a `[[vm]]` table.
    let text = "[[vm]]\nname = \"www\"\ndns = [\"www.example.org\"]\nip = \"10.0.0.1\"\n\
                command = \"sleep 100\"\nannounce = \"listening\"\n";
    let c = merge(
        &flags(&[]),
        Some(&from_toml(text, Path::new("/j.toml")).unwrap()),
    )
    .unwrap();
    assert_eq!(c.vms[0].announce, Announce::Listening);
}
