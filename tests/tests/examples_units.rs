//! The systemd units in `examples/systemd/` run the real binaries with flags they accept:
//! each unit's `ExecStart` is run (in a namespace with no bridge and no config file) and must
//! fail only for those missing pieces, never on its command line.

use std::process::Command;

use jitsu_tests::{Netns, bin_path, repo_root, require_root};

/// The unit's `ExecStart` command, continuation lines joined, split on whitespace.
fn exec_start(unit: &str) -> Vec<String> {
    let text = std::fs::read_to_string(repo_root().join("examples/systemd").join(unit)).unwrap();
    let joined = text.replace("\\\n", " ");
    let line = joined
        .lines()
        .find_map(|l| l.strip_prefix("ExecStart="))
        .unwrap_or_else(|| panic!("{unit} has no ExecStart"));
    line.split_whitespace().map(str::to_string).collect()
}

fn run_unit(ns: &Netns, unit: &str) -> String {
    let argv = exec_start(unit);
    let name = argv[0].rsplit('/').next().unwrap().to_string();
    assert!(
        argv[0].starts_with("/usr/local/bin/"),
        "{unit}: {}",
        argv[0]
    );
    let out = Command::new("ip")
        .args(["netns", "exec", ns.name()])
        .arg(bin_path(&name))
        .args(&argv[1..])
        .output()
        .unwrap();
    assert!(
        !out.status.success(),
        "{unit} ran without its bridge or config"
    );
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(
        !err.contains("Usage:") && !err.contains("unexpected argument"),
        "{unit}: the command line was refused:\n{err}"
    );
    err
}

#[test]
fn the_units_command_lines_are_accepted_by_the_binaries() {
    require_root();
    let ns = Netns::new("unit").unwrap();
    let err = run_unit(&ns, "synjitsu.service");
    assert!(err.contains("bridge br0 does not exist"), "{err}");
    let err = run_unit(&ns, "jitsu-dns.service");
    assert!(err.contains("/etc/jitsu/jitsu.toml"), "{err}");
}

#[test]
fn synjitsu_starts_before_jitsu_dns_and_stopping_jitsu_dns_leaves_the_vms() {
    let read =
        |n: &str| std::fs::read_to_string(repo_root().join("examples/systemd").join(n)).unwrap();
    let (syn, dns) = (read("synjitsu.service"), read("jitsu-dns.service"));
    let key = |unit: &str, k: &str| -> Vec<String> {
        unit.lines()
            .filter_map(|l| l.strip_prefix(&format!("{k}=")))
            .flat_map(|v| v.split_whitespace().map(str::to_string).collect::<Vec<_>>())
            .collect()
    };
    assert!(key(&syn, "Before").contains(&"jitsu-dns.service".to_string()));
    assert!(key(&dns, "After").contains(&"synjitsu.service".to_string()));
    assert!(key(&dns, "Wants").contains(&"synjitsu.service".to_string()));
    // The default (control-group) would kill process-backend VMs that are still in it.
    assert_eq!(key(&dns, "KillMode"), ["process"]);
    assert_eq!(key(&dns, "ExecReload"), ["/bin/kill", "-HUP", "$MAINPID"]);
}
