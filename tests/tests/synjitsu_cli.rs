//! synjitsu's command line: every flag explained in `--help`, and set-up errors that stop it
//! with a clear message and a non-zero exit, leaving nothing behind.

use std::process::Command;
use std::time::{Duration, Instant};

use jitsu_tests::synjitsu::TempDir;
use jitsu_tests::{Netns, bin_path, require_root, require_tool};

fn run_with_deadline(mut cmd: Command, timeout: Duration) -> std::process::Output {
    let child = cmd
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let pid = child.id();
    let start = Instant::now();
    let waiter = std::thread::spawn(move || child.wait_with_output().unwrap());
    while !waiter.is_finished() {
        if start.elapsed() > timeout {
            let _ = Command::new("kill").args(["-9", &pid.to_string()]).status();
            panic!("synjitsu did not exit within {timeout:?}");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    waiter.join().unwrap()
}

#[test]
fn help_explains_every_flag() {
    let out = Command::new(bin_path("synjitsu"))
        .arg("--help")
        .output()
        .unwrap();
    assert!(out.status.success());
    let help = String::from_utf8_lossy(&out.stdout);
    for flag in [
        "--bridge",
        "--control",
        "--xenstore",
        "--probe-ip",
        "--metrics",
        "--log-level",
        "--allow-uid",
        "--hold-timeout",
        "--max-held-per-vm",
        "--max-held",
    ] {
        let line = help
            .lines()
            .position(|l| l.trim_start().starts_with(flag))
            .unwrap_or_else(|| panic!("{flag} missing from --help:\n{help}"));
        let explained = help
            .lines()
            .nth(line + 1)
            .is_some_and(|l| l.trim().len() > 10);
        assert!(explained, "{flag} is not explained:\n{help}");
    }
    assert!(
        help.contains("waits for jitsu-dns's `ready`"),
        "--help says what the wire hand-over does without a probe address:\n{help}"
    );
    assert!(
        !help.contains("no-bpf-filter"),
        "the benchmark flag stays hidden"
    );
}

#[test]
fn a_missing_bridge_is_a_clear_error_and_nothing_is_left_behind() {
    require_root();
    require_tool("ip", "iproute2");
    let ns = Netns::new("syc").unwrap();
    let dir = TempDir::new("syc").unwrap();
    let control = dir.join("c.sock");
    let mut cmd = ns.command(bin_path("synjitsu").to_str().unwrap());
    cmd.args(["--bridge", "br0", "--xenstore", "off", "--control"])
        .arg(&control);
    let out = run_with_deadline(cmd, Duration::from_secs(20));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("bridge br0 does not exist"), "{err}");
    assert!(!control.exists(), "control socket left behind");
    let links = ns.sh("ip -o link").unwrap();
    assert!(!links.contains("syj-"), "{links}");
}

#[test]
fn bad_flags_and_missing_privileges_are_refused() {
    require_root();
    require_tool("setpriv", "util-linux");
    let dir = TempDir::new("syc").unwrap();
    let control = dir.join("c.sock");
    // Two IPv4 probe addresses.
    let out = Command::new(bin_path("synjitsu"))
        .args([
            "--probe-ip",
            "10.0.0.1",
            "--probe-ip",
            "10.0.0.2",
            "--control",
        ])
        .arg(&control)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("at most one IPv4"));
    let out = Command::new(bin_path("synjitsu"))
        .args(["--hold-timeout", "soon"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    // Not root.
    let out = Command::new("setpriv")
        .args(["--reuid", "65534", "--regid", "65534", "--clear-groups"])
        .arg(bin_path("synjitsu"))
        .arg("--control")
        .arg(&control)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("must run as root"), "{err}");
}
