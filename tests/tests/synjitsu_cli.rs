//! synjitsu's command line: every flag explained in `--help`, and set-up errors that stop it
//! with a clear message and a non-zero exit, leaving nothing behind.

use std::process::Command;
use std::time::Duration;

use jitsu_tests::topo::Host;
use jitsu_tests::{Netns, Scratch, bin_path, require_root, require_tool, wait_until};

fn run_with_deadline(mut cmd: Command, timeout: Duration) -> std::process::Output {
    let child = cmd
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let pid = child.id();
    let waiter = std::thread::spawn(move || child.wait_with_output().unwrap());
    if let Err(e) = wait_until("synjitsu to exit", timeout, || {
        waiter.is_finished().then_some(())
    }) {
        let _ = Command::new("kill").args(["-9", &pid.to_string()]).status();
        panic!("{e}");
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
        "--fdb-reconcile-interval",
        "--max-held-bytes-per-vm",
        "--max-held-bytes",
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
    for hidden in [
        "no-bpf-filter",
        "refuse-when-full",
        "--max-held-per-vm",
        "--max-held ",
    ] {
        assert!(
            !help.contains(hidden),
            "the benchmark flag {hidden} stays hidden"
        );
    }
}

#[test]
fn a_missing_bridge_is_a_clear_error_and_nothing_is_left_behind() {
    require_root();
    require_tool("ip", "iproute2");
    let ns = Netns::new("syc").unwrap();
    let dir = Scratch::new("syc").unwrap();
    let control = dir.join("c.sock");
    let mut cmd = ns.command(bin_path("synjitsu"));
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
fn synjitsu_coming_and_going_never_changes_the_bridges_own_mac() {
    require_root();
    require_tool("ip", "iproute2");
    // A bridge takes the lowest MAC of its ports unless its address was set: with ports whose
    // MACs are all high, a random MAC on synjitsu's port would very likely become the
    // bridge's, moving the host's own address on the bridge each time synjitsu starts,
    // stops or crashes.
    let br = Host::new("sym").unwrap();
    let _members: Vec<_> = (0..3)
        .map(|n| {
            let m = br
                .join("m", Some(&format!("f0:00:00:00:00:0{n}")), &[], true)
                .unwrap();
            br.ns()
                .sh(&format!(
                    "ip link set {} address f0:00:00:00:00:1{n}",
                    m.port
                ))
                .unwrap();
            m
        })
        .collect();
    let mac = || br.bridge_mac().unwrap();
    let before = mac();
    assert_eq!(before, "f0:00:00:00:00:10", "the lowest port MAC");
    let control = br.file("c.sock");
    for round in 0..2 {
        let mut d = br
            .spawn(
                bin_path("synjitsu"),
                &[
                    "--bridge",
                    "br0",
                    "--xenstore",
                    "off",
                    "--control",
                    control.to_str().unwrap(),
                ],
            )
            .unwrap();
        wait_until("synjitsu's port", Duration::from_secs(20), || {
            br.ns()
                .sh("ip -o link show master br0")
                .ok()
                .filter(|l| l.contains("syj-br0-p"))
        })
        .unwrap();
        assert_eq!(
            mac(),
            before,
            "round {round}: synjitsu's port changed the bridge's MAC"
        );
        if round == 0 {
            d.stop(Duration::from_secs(20)).unwrap();
        } else {
            // A crash leaves the port behind until the next start removes it.
            d.signal("KILL").unwrap();
            let _ = d.wait_exit(Duration::from_secs(20));
        }
        assert_eq!(
            mac(),
            before,
            "round {round}: synjitsu's exit changed the bridge's MAC"
        );
    }
}

#[test]
fn bad_flags_and_missing_privileges_are_refused() {
    require_root();
    require_tool("setpriv", "util-linux");
    let dir = Scratch::new("syc").unwrap();
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

/// Says hello on `socket` as `uid` (with setpriv); returns the answer or the failure, one
/// line each: `connect: <error>`, `send: <error>`, then the answer, `closed` or `recv: <error>`.
fn hello_as(uid: u32, socket: &std::path::Path) -> String {
    // synjitsu refuses a client by its credentials as soon as it accepts it: it writes its
    // error and closes, often before a client on a busy machine has written its hello
    // (EPIPE, or ECONNRESET once the unread hello is dropped). What it wrote before closing
    // stays readable, so the client goes on to read it.
    let script = r#"
import json, socket, struct, sys
s = socket.socket(socket.AF_UNIX)
try:
    s.connect(sys.argv[1])
except OSError as e:
    print("connect:", e.strerror); sys.exit(0)
b = json.dumps({"id": 1, "type": "hello", "version": 1, "client": "uid test"}).encode()
try:
    s.sendall(struct.pack(">I", len(b)) + b)
except (BrokenPipeError, ConnectionResetError) as e:
    print("send:", e.strerror)
def read(n):
    got = b""
    while len(got) < n:
        try:
            c = s.recv(n - len(got))
        except ConnectionResetError as e:
            print("recv:", e.strerror); sys.exit(0)
        if not c:
            print("closed"); sys.exit(0)
        got += c
    return got
n = struct.unpack(">I", read(4))[0]
print(read(n).decode())
"#;
    let out = Command::new("setpriv")
        .args([
            "--reuid",
            &uid.to_string(),
            "--regid",
            &uid.to_string(),
            "--clear-groups",
        ])
        .args(["/usr/bin/python3", "-c", script])
        .arg(socket)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

#[test]
fn only_root_and_the_allowed_uid_may_use_the_control_socket() {
    use jitsu_tests::synjitsu::SynjitsuHost;
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    require_root();
    require_tool("setpriv", "util-linux");
    let synjitsu = SynjitsuHost::start("syu", &["--allow-uid", "65534"]).unwrap();
    let meta = std::fs::metadata(&synjitsu.control).unwrap();
    assert_eq!(meta.permissions().mode() & 0o777, 0o600);
    assert_eq!(meta.uid(), 65534, "owned by the allowed uid");
    // The parent directory must let the test users reach the socket at all.
    std::fs::set_permissions(synjitsu.host.dir(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let ok = hello_as(65534, &synjitsu.control);
    assert!(ok.contains(r#""type":"ok""#), "{ok}");
    // Anyone else is stopped by the file's mode...
    let denied = hello_as(65533, &synjitsu.control);
    assert!(denied.starts_with("connect:"), "{denied}");
    // ...and, should the mode be widened, by the peer credentials.
    std::fs::set_permissions(&synjitsu.control, std::fs::Permissions::from_mode(0o666)).unwrap();
    let refused = hello_as(65533, &synjitsu.control);
    assert!(
        refused.contains("permission denied for uid 65533"),
        "{refused}"
    );
    assert!(!refused.contains(r#""type":"ok""#), "{refused}");
    // The daemon said why, once: the client stopped by the mode never reached it.
    let log = synjitsu.daemon.log();
    let refusals: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("control client refused: not root nor the allowed uid"))
        .collect();
    assert!(
        refusals.len() == 1 && refusals[0].contains("uid=65533"),
        "{log}"
    );
}

#[test]
fn a_port_taken_down_is_survived_a_port_deleted_stops_synjitsu_with_an_error() {
    use jitsu_tests::synjitsu::SynjitsuHost;
    require_root();
    let mut synjitsu = SynjitsuHost::start("syd", &[]).unwrap();
    let h = synjitsu.host.ns();
    h.sh("ip link set syj-br0 down && ip link set syj-br0 up")
        .unwrap();
    // Still serving, still running.
    assert!(
        synjitsu
            .metrics()
            .unwrap()
            .contains("synjitsu_frames_total")
    );
    synjitsu.daemon.check_running().unwrap();
    h.sh("ip link del syj-br0").unwrap();
    let code = synjitsu.daemon.wait_exit(Duration::from_secs(20)).unwrap();
    assert_ne!(code, Some(0), "{}", synjitsu.daemon.log());
    assert!(
        synjitsu.daemon.log().contains("packet socket"),
        "{}",
        synjitsu.daemon.log()
    );
}

/// A control connection that never says anything: as a crashed script, a stuck monitoring
/// probe or a half-open socket leaves it.
struct Silent {
    conn: shared_proto::FrameReader<std::os::unix::net::UnixStream, shared_proto::ServerMessage>,
}

impl Silent {
    fn open(path: &std::path::Path) -> Silent {
        let s = std::os::unix::net::UnixStream::connect(path).unwrap();
        Silent {
            conn: shared_proto::FrameReader::new(s),
        }
    }

    /// What synjitsu sends before it closes the connection (up to `timeout`): its messages,
    /// and whether it closed.
    fn until_closed(&mut self, timeout: Duration) -> (Vec<shared_proto::ServerMessage>, bool) {
        self.conn.get_mut().set_read_timeout(Some(timeout)).unwrap();
        let mut got = Vec::new();
        loop {
            match self.conn.read() {
                Ok(Some(Ok(m))) => got.push(m),
                Ok(None) => return (got, true),
                Ok(Some(Err(e))) => panic!("synjitsu sent a bad frame: {e}"),
                // Timed out (or reset): not closed in time.
                Err(_) => return (got, false),
            }
        }
    }
}

fn error_text(msgs: &[shared_proto::ServerMessage]) -> String {
    msgs.iter()
        .map(|m| match m {
            shared_proto::ServerMessage::Error { message, .. } => message.clone(),
            other => format!("{other:?}"),
        })
        .collect::<Vec<_>>()
        .join(" | ")
}

#[test]
fn idle_connections_never_lock_out_jitsu_dns_and_are_closed_without_a_hello() {
    use jitsu_tests::synjitsu::{ControlClient, SynjitsuHost};
    require_root();
    let synjitsu = SynjitsuHost::start("syi", &[]).unwrap();
    // More silent connections than synjitsu keeps at once.
    let mut idle: Vec<Silent> = (0..12).map(|_| Silent::open(&synjitsu.control)).collect();
    // jitsu-dns (re)connecting now gets in.
    let mut ctl = ControlClient::connect(&synjitsu.control)
        .unwrap_or_else(|e| panic!("{e}; synjitsu's log:\n{}", synjitsu.daemon.log()));
    ctl.sync(&[]).unwrap();
    // The oldest silent connections made room: each was told why and closed.
    let (said, closed) = idle[0].until_closed(Duration::from_secs(1));
    assert!(closed, "the oldest silent connection is still open");
    let why = error_text(&said);
    assert!(why.contains("too many connections"), "{why}");
    // The others are closed once the hello timeout passes, each told why.
    for (i, c) in idle.iter_mut().enumerate().skip(5) {
        let (said, closed) = c.until_closed(Duration::from_secs(10));
        assert!(closed, "silent connection {i} still open after 10 s");
        let why = error_text(&said);
        assert!(
            why.contains("no hello within") || why.contains("too many connections"),
            "{i}: {why}"
        );
    }
    // The attached client was never disturbed.
    ctl.sync(&[]).unwrap();
    let log = synjitsu.daemon.log();
    assert!(log.contains("no hello"), "{log}");
}

#[test]
fn a_new_client_takes_over_from_a_silent_attached_one() {
    use jitsu_tests::synjitsu::{ControlClient, SynjitsuHost, www};
    use shared_proto::{ErrorCode, Handover, Phase, ServerMessage};
    require_root();
    let synjitsu = SynjitsuHost::start("syt", &[]).unwrap();
    // The old jitsu-dns: attached, then silent for good (stuck, or its host half-gone).
    let mut old = ControlClient::connect(&synjitsu.control).unwrap();
    old.sync(&[(www(Handover::Wire), Phase::Booting)]).unwrap();
    synjitsu
        .wait_steered(jitsu_tests::synjitsu::VM_MAC)
        .unwrap();
    // Its successor says hello and is served.
    let mut new = ControlClient::connect(&synjitsu.control)
        .unwrap_or_else(|e| panic!("{e}; synjitsu's log:\n{}", synjitsu.daemon.log()));
    new.sync(&[(www(Handover::Wire), Phase::Booting)]).unwrap();
    // The old one is told why, then closed.
    let told = old.next_message(Duration::from_secs(5)).unwrap();
    let Some(ServerMessage::Error { code, message, .. }) = told else {
        panic!("the replaced client got {told:?}")
    };
    assert_eq!(code, ErrorCode::Replaced, "{message}");
    assert!(message.contains("replaced"), "{message}");
    assert_eq!(old.next_message(Duration::from_secs(5)).unwrap(), None);
    // The new one keeps working, and the VM is still stood in for.
    new.ok(shared_proto::ClientMessage::Ready { name: "www".into() })
        .unwrap();
    let log = synjitsu.daemon.log();
    let warned = log
        .lines()
        .any(|l| l.contains("WARN") && l.contains("replaced"));
    assert!(warned, "the take-over is logged at warn:\n{log}");
}

/// The times (seconds of the day, UTC) of synjitsu's log lines that contain `needle`.
fn log_times(log: &str, needle: &str) -> Vec<f64> {
    log.lines()
        .filter(|l| l.contains(needle))
        .filter_map(|l| {
            // 2026-12-06T08:04:33.855608Z ...
            let t = l.split_whitespace().next()?.split('T').nth(1)?;
            let t = t.strip_suffix('Z')?;
            let mut parts = t.split(':');
            let (h, m, s) = (parts.next()?, parts.next()?, parts.next()?);
            Some(
                h.parse::<f64>().ok()? * 3600.0
                    + m.parse::<f64>().ok()? * 60.0
                    + s.parse::<f64>().ok()?,
            )
        })
        .collect()
}

#[test]
fn two_jitsu_dns_on_one_host_take_turns_slowly_instead_of_fighting() {
    use jitsu_tests::jitsu_dns::DnsHarness;
    use jitsu_tests::synjitsu::SynjitsuHost;
    require_root();
    require_tool("dig", "dnsutils");
    let synjitsu = SynjitsuHost::start("syf", &[]).unwrap();
    let control = synjitsu.control.to_str().unwrap().to_string();
    let start = |tag: &str| {
        let mut h = DnsHarness::new(tag).unwrap();
        let spec =
            "name=www,dns=www.example.org,ip=10.77.0.1,use_synjitsu=true,command='exec sleep 600'";
        let args = h.args(None, &["--synjitsu", &control, spec]);
        h.start(&args, &[]).unwrap();
        h
    };
    let a = start("dfa");
    wait_until(
        "the first jitsu-dns to attach",
        Duration::from_secs(30),
        || {
            synjitsu
                .daemon
                .log()
                .contains("kind=\"sync\"")
                .then_some(())
        },
    )
    .unwrap();
    let b = start("dfb");
    // Each takes the connection from the other in turn, each turn at least 5 s after the
    // last (jitsu-dns's first back-off once replaced), never in a tight loop.
    let turns = wait_until("three take-overs", Duration::from_secs(60), || {
        let t = log_times(&synjitsu.daemon.log(), "control client replaced");
        (t.len() >= 3).then_some(t)
    })
    .unwrap_or_else(|e| panic!("{e}; synjitsu's log:\n{}", synjitsu.daemon.log()));
    for w in turns.windows(2) {
        assert!(
            w[1] - w[0] >= 5.0,
            "take-overs {:.3} s apart: {turns:?}\n{}",
            w[1] - w[0],
            synjitsu.daemon.log()
        );
    }
    for (name, h) in [("first", &a), ("second", &b)] {
        let log = h.log();
        assert!(
            log.contains("WARN") && log.contains("is a second one running?"),
            "the {name} jitsu-dns says why it lost the connection:\n{log}"
        );
    }
}
