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
    assert_eq!(vm.mac, Mac::derived_from(b"www"));
    assert_eq!(vm.response_delay, Duration::from_millis(100));
    assert_eq!(vm.stop_mode, StopMode::Destroy);
    assert_eq!(vm.handover, HandoverKind::Wire);
    assert_eq!(vm.ifup, Ifup::Jitsu);
    assert_eq!(vm.nic, "br0");
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
        log_level: Some("debug".into()),
        max_running: Some("4".into()),
        max_boots_per_second: Some("2".into()),
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
    assert_eq!(c.log_level, "debug");
    assert_eq!(c.max_running, Some(4));
    assert_eq!(c.max_boots_per_second, Some(2));
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
    assert_eq!(vm.mac.to_string(), "00:16:3e:00:00:02");
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
    assert_eq!(vm.nic, "br1");
    assert_eq!(vm.command.as_deref(), Some("sh -c \"a, b\""));
    assert_eq!(vm.zone, Some(Name::from_ascii("example.org.").unwrap()));
}

#[test]
fn libvirt_keys_are_parsed_for_libvirt() {
    let mut f = flags(&[
        "name=rump,dns=nginx.example.org,ip=10.0.0.3,kernel=/k/nginx.bin,memory=64,\
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
    assert_eq!(vm.memory, Some(64));
    assert_eq!(
        vm.disks,
        vec![PathBuf::from("/d/a.img"), PathBuf::from("/d/b.img")]
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
            "libvirt backend",
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
            "kernel=vmlinux",
            "kernel = \"vmlinux\": must be an absolute path",
        ),
        (
            "initrd=./i.gz",
            "initrd = \"./i.gz\": must be an absolute path",
        ),
        (
            "disk=/ok.img,disk=d.img",
            "disk = \"d.img\": must be an absolute path",
        ),
        (
            "console_log=c.log",
            "console_log = \"c.log\": must be an absolute path",
        ),
        ("domain_type=hvm", "expected qemu, kvm, xenpvh or xenpv"),
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
            "libvirt or process",
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
