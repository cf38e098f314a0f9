//! jitsu-dns refuses what it cannot run, at start, saying where, which key, which value and
//! why; a libvirt it cannot reach included.

use std::process::Command;

use jitsu_tests::{Scratch, bin_path};

fn run(args: &[&str]) -> (Option<i32>, String) {
    let out = Command::new(bin_path("jitsu-dns"))
        .args(args)
        .output()
        .unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn bad_specs_flags_and_files_are_refused_at_start() {
    let (code, err) = run(&[
        "-f",
        "0.0.0.0",
        "name=www,dns=www.example.org,ip=10.0.0.300,command=x",
    ]);
    assert_eq!(code, Some(2), "{err}");
    assert!(
        err.contains("VM spec 1 (www): ip = \"10.0.0.300\": not an IPv4 address"),
        "{err}"
    );

    let (code, err) = run(&[
        "-t",
        "never",
        "name=www,dns=www.example.org,ip=10.0.0.1,command=x",
    ]);
    assert_eq!(code, Some(2));
    assert!(
        err.contains("flag --ttl: ttl = \"never\": expected a whole number"),
        "{err}"
    );

    let dir = Scratch::new("cli").unwrap();
    let file = dir.path().join("dom0.toml");
    std::fs::write(&file, "ttl = 30\n\n[[vm]]\nname = \"www\"\ndns = \"www.example.org\"\nip = \"10.0.0.1\"\ncommand = \"x\"\ncolour = \"blue\"\n").unwrap();
    let (code, err) = run(&["--config", file.to_str().unwrap()]);
    assert_eq!(code, Some(2));
    assert!(
        err.contains("dom0.toml line 8 (vm www): colour = \"blue\": unknown key"),
        "{err}"
    );
    std::fs::write(&file, "tll = 30\n").unwrap();
    let (_, err) = run(&["--config", file.to_str().unwrap()]);
    assert!(
        err.contains("dom0.toml line 1: unknown field `tll`"),
        "{err}"
    );
    let (code, err) = run(&[
        "--config",
        dir.path().join("missing.toml").to_str().unwrap(),
    ]);
    assert_eq!(code, Some(2));
    assert!(err.contains("cannot read configuration file"), "{err}");
}

#[test]
fn an_unreachable_libvirt_is_refused_at_start() {
    let dir = Scratch::new("clilv").unwrap();
    let db = dir.path().join("db");
    // A socket that does not exist: no libvirtd another test may run answers instead.
    let uri = format!(
        "qemu:///system?socket={}",
        dir.path().join("no-libvirtd.sock").display()
    );
    let (code, err) = run(&[
        "-x",
        "libvirt",
        "-c",
        &uri,
        "-l",
        "5399",
        "--persistdb",
        db.to_str().unwrap(),
        "name=www,dns=www.example.org,ip=10.0.0.1,kernel=/boot/mirage.xen,memory=64M",
    ]);
    assert_eq!(code, Some(1), "{err}");
    assert!(
        err.contains(&format!("cannot connect to libvirt at {uri}")),
        "{err}"
    );
    // A process backend URI is not libvirt's.
    let (code, err) = run(&[
        "-x",
        "libvirt",
        "-c",
        "process:///run/jitsu/process",
        "name=www,dns=www.example.org,ip=10.0.0.1,kernel=/k",
    ]);
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("this is a process backend URI"), "{err}");
    // And process keys are not libvirt's.
    let (code, err) = run(&[
        "-x",
        "libvirt",
        "name=www,dns=www.example.org,ip=10.0.0.1,command=x",
    ]);
    assert_eq!(code, Some(2));
    assert!(
        err.contains("command = \"x\": this key is for the process backend"),
        "{err}"
    );
}

#[test]
fn state_views_refuse_a_directory_that_is_no_store() {
    let dir = Scratch::new("clist").unwrap();
    for view in ["tree", "log"] {
        let (code, err) = run(&["state", view, "--persistdb", dir.path().to_str().unwrap()]);
        assert_eq!(code, Some(1), "{err}");
        assert!(err.contains("no state store at"), "{err}");
    }
}

/// `a.<63 b>.<63 b>.<63 b>.<59 c>`: 253 characters, the longest valid name (issue 15).
fn longest_name() -> String {
    let b63 = "b".repeat(63);
    format!("a.{b63}.{b63}.{b63}.{}", "c".repeat(59))
}

#[test]
fn a_valid_name_too_long_for_its_zones_ns_is_refused_at_start_not_a_panic() {
    let name = longest_name();
    let (code, err) = run(&[
        "-l",
        "5399",
        "-f",
        "0.0.0.0",
        &format!("name=x,dns={name},ip=10.91.0.1,command=true"),
    ]);
    assert_eq!(code, Some(2), "{err}");
    assert!(!err.contains("panicked"), "{err}");
    assert!(
        err.contains(&format!("VM spec 1 (x): dns = \"{name}\": ")) && err.contains("no room"),
        "{err}"
    );
    // The same zone as a [[zone]] table without `ns`.
    let dir = Scratch::new("clilong").unwrap();
    let file = dir.path().join("jitsu.toml");
    std::fs::write(&file, format!("[[zone]]\nname = \"{}\"\n", &name[2..])).unwrap();
    let (code, err) = run(&["-l", "5399", "--config", file.to_str().unwrap()]);
    assert_eq!(code, Some(2), "{err}");
    assert!(!err.contains("panicked"), "{err}");
    assert!(
        err.contains("jitsu.toml line 2: name = ") && err.contains("no room"),
        "{err}"
    );
}

#[test]
fn jitsus_flags_mean_what_they_meant_and_its_leftovers_are_refused_at_start() {
    let vm = "name=www,dns=www.example.org,ip=10.0.0.1,kernel=/k";
    let check = |args: &[&str]| {
        let out = Command::new(bin_path("jitsu-dns"))
            .arg("--check")
            .args(args)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    // -p/--port is the forwarders' port, as in Jitsu; -l is the one served.
    let out = check(&["-c", "xen:///", "--port", "5300", "-f", "192.0.2.53", vm]);
    assert!(out.contains("forwarders 192.0.2.53 port 5300\n"), "{out}");
    assert!(out.contains("dns 127.0.0.1:53\n"), "{out}");
    // Long flags cut short, as cmdliner allowed.
    let out = check(&["--conn", "qemu:///system", "--ttl", "7", vm]);
    assert!(out.contains("backend libvirt at qemu:///system"), "{out}");
    assert!(out.contains("ttl 7 s"), "{out}");
    // Refused at start (exit 2), saying what to do instead.
    for (args, why) in [
        (
            &["-x", "xapi", vm][..],
            "backend = \"xapi\": XAPI (XenServer, XCP-ng) is not supported",
        ),
        (
            &[
                "-c",
                "xen:///",
                "--synjitsu",
                "4dea22b3-1d52-d8f3-2516-782e98ab3fa0",
                vm,
            ],
            "a UUID is how Jitsu 0.2 named its synjitsu unikernel",
        ),
        (
            &["-x", "libxl", "-c", "qemu:///system", vm],
            "-x libxl is libvirt's libxl driver",
        ),
        (
            &[
                "-c",
                "xen:///",
                "name=www,dns=www.example.org,ip=10.0.0.1,memory=64",
            ],
            "memory = \"64\": a bare number is KiB, as in Jitsu",
        ),
    ] {
        let (code, err) = run(args);
        assert_eq!(code, Some(2), "{args:?}: {err}");
        assert!(err.contains(why), "{args:?}: {err}");
    }
    // Every flag's default is in --help.
    let out = Command::new(bin_path("jitsu-dns"))
        .arg("--help")
        .output()
        .unwrap();
    let help = String::from_utf8_lossy(&out.stdout);
    for want in [
        "[default: 127.0.0.1]",
        "[default: 53]",
        "[default: 0.1]",
        "[default: 60]",
        "[default: destroy]",
        "[default: 0.5]",
        "--port",
    ] {
        assert!(help.contains(want), "{want} missing from\n{help}");
    }
}
