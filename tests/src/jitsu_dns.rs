//! Support for the tests of jitsu-dns: jitsu-dns started on a host and waited for
//! ([`start`]), a host with jitsu-dns and its process-backend VMs ([`DnsHarness`]), a guard
//! that removes those VMs even when the test fails ([`ProcessVms`]), `dig`/`kdig` output
//! parsed into records ([`Dig`]), and the state store read with plain git.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result, bail};

use crate::topo::{Daemon, Host};
use crate::{Netns, bin_path, unique, wait_until};

/// The cgroup2 mount point of this host (`/sys/fs/cgroup` or `/sys/fs/cgroup/unified`).
pub fn cgroup2_mount() -> Option<PathBuf> {
    let info = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    info.lines().find_map(|l| {
        let (left, right) = l.split_once(" - ")?;
        if right.split(' ').next()? != "cgroup2" {
            return None;
        }
        left.split(' ').nth(4).map(PathBuf::from)
    })
}

/// The v1 freezer's mount point, if the host has one.
pub fn freezer_mount() -> Option<PathBuf> {
    let info = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    info.lines().find_map(|l| {
        let (left, right) = l.split_once(" - ")?;
        let mut r = right.split(' ');
        let (fstype, _, opts) = (r.next()?, r.next()?, r.next()?);
        if fstype != "cgroup" || !opts.split(',').any(|o| o == "freezer") {
            return None;
        }
        left.split(' ').nth(4).map(PathBuf::from)
    })
}

/// What every test of jitsu-dns with the process backend needs: root, `dig`, `git` (the
/// store) and `setsid` (the VMs' sessions); fails saying which package is missing.
pub fn require_dns_tools() {
    crate::require_root();
    crate::require_tool("dig", "dnsutils");
    crate::require_tool("git", "git");
    crate::require_tool("setsid", "util-linux");
}

/// The process-backend VMs of one test: a unique namespace prefix and runtime directory, and
/// on drop every process, cgroup and namespace with that prefix killed and removed.
#[derive(Debug)]
pub struct ProcessVms {
    prefix: String,
    runtime: PathBuf,
}

impl ProcessVms {
    /// VMs named `<unique>-<vm>`, with their records under `runtime`.
    pub fn new(tag: &str, runtime: PathBuf) -> ProcessVms {
        ProcessVms {
            prefix: format!("{}-", unique(tag)),
            runtime,
        }
    }

    /// The backend URI (`cgroup`: `v1`, `v2` or `None` for auto).
    pub fn uri(&self, cgroup: Option<&str>) -> String {
        let mut u = format!(
            "process://{}?netns_prefix={}",
            self.runtime.display(),
            self.prefix
        );
        if let Some(c) = cgroup {
            u.push_str(&format!("&cgroup={c}"));
        }
        u
    }

    /// The namespace of `vm`.
    pub fn netns(&self, vm: &str) -> String {
        format!("{}{vm}", self.prefix)
    }

    /// The cgroup of `vm` in the v1 freezer or the cgroup2 tree.
    pub fn cgroup(&self, version: &str, vm: &str) -> PathBuf {
        let root = if version == "v1" {
            freezer_mount().expect("a v1 freezer mount")
        } else {
            cgroup2_mount().expect("a cgroup2 mount")
        };
        root.join("jitsu").join(self.netns(vm))
    }

    fn cleanup(&self) {
        let roots: Vec<PathBuf> = [cgroup2_mount(), freezer_mount()]
            .into_iter()
            .flatten()
            .map(|m| m.join("jitsu"))
            .collect();
        for root in roots {
            let Ok(entries) = std::fs::read_dir(&root) else {
                continue;
            };
            for e in entries.flatten() {
                if !e.file_name().to_string_lossy().starts_with(&self.prefix) {
                    continue;
                }
                let dir = e.path();
                let _ = std::fs::write(dir.join("cgroup.freeze"), "0");
                let _ = std::fs::write(dir.join("freezer.state"), "THAWED");
                // Best effort: a cgroup that keeps a process is left for the next run.
                let _ = wait_until("the VM's cgroup to empty", Duration::from_secs(5), || {
                    let procs =
                        std::fs::read_to_string(dir.join("cgroup.procs")).unwrap_or_default();
                    let pids: Vec<&str> = procs.split_whitespace().collect();
                    if pids.is_empty() {
                        return Some(());
                    }
                    let _ = Command::new("kill").arg("-9").args(&pids).status();
                    None
                });
                let _ = std::fs::remove_dir(&dir);
            }
        }
        if let Ok(entries) = std::fs::read_dir("/run/netns") {
            for e in entries.flatten() {
                let name = e.file_name().to_string_lossy().into_owned();
                if name.starts_with(&self.prefix) {
                    let _ = Command::new("ip")
                        .args(["netns", "del", &name])
                        .stderr(std::process::Stdio::null())
                        .status();
                    let _ = std::fs::remove_file(e.path());
                }
            }
        }
    }
}

impl Drop for ProcessVms {
    fn drop(&mut self) {
        self.cleanup();
    }
}

/// One resource record of dig's output.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rr {
    /// Owner, as printed (fully qualified).
    pub name: String,
    /// TTL.
    pub ttl: u32,
    /// Type (`A`, `SOA`...).
    pub rtype: String,
    /// The data, as printed.
    pub data: String,
}

/// A `dig` or `kdig` answer.
#[derive(Debug, Clone)]
pub struct Dig {
    /// `NOERROR`, `NXDOMAIN`...
    pub status: String,
    /// Header flags, lower-case (`qr`, `aa`, `rd`...).
    pub flags: Vec<String>,
    /// Answer section.
    pub answer: Vec<Rr>,
    /// Authority section.
    pub authority: Vec<Rr>,
    /// Additional section (without OPT).
    pub additional: Vec<Rr>,
    /// The answer carried an OPT record.
    pub edns: bool,
    /// The whole output, for messages.
    pub text: String,
}

impl Dig {
    /// The AA bit.
    pub fn aa(&self) -> bool {
        self.flags.iter().any(|f| f == "aa")
    }

    /// The data of the answer's A and AAAA records.
    pub fn addresses(&self) -> Vec<String> {
        self.answer
            .iter()
            .filter(|r| r.rtype == "A" || r.rtype == "AAAA")
            .map(|r| r.data.clone())
            .collect()
    }
}

/// Parses dig's or kdig's default output.
pub fn parse_dig(text: &str) -> Dig {
    let mut d = Dig {
        status: String::new(),
        flags: Vec::new(),
        answer: Vec::new(),
        authority: Vec::new(),
        additional: Vec::new(),
        edns: false,
        text: text.to_string(),
    };
    let mut section = "";
    for line in text.lines() {
        if let Some(i) = line.find("status: ") {
            d.status = line[i + 8..]
                .split([',', ';'])
                .next()
                .unwrap_or("")
                .trim()
                .to_string();
        }
        if let Some(i) = line.find("lags: ")
            && line.starts_with(";;")
            && d.flags.is_empty()
        {
            d.flags = line[i + 6..]
                .split(';')
                .next()
                .unwrap_or("")
                .split_whitespace()
                .map(str::to_lowercase)
                .collect();
        }
        if line.contains("EDNS: version") || line.contains("EDNS PSEUDOSECTION") {
            d.edns = true;
        }
        let l = line.trim();
        if l.starts_with(";;") && l.ends_with("SECTION:") {
            section = if l.contains("ANSWER") {
                "answer"
            } else if l.contains("AUTHORITY") {
                "authority"
            } else if l.contains("ADDITIONAL") {
                "additional"
            } else {
                ""
            };
            continue;
        }
        if l.is_empty() || l.starts_with(';') {
            if l.is_empty() {
                section = "";
            }
            continue;
        }
        let w: Vec<&str> = l.split_whitespace().collect();
        if w.len() < 5 || section.is_empty() {
            continue;
        }
        let Ok(ttl) = w[1].parse() else { continue };
        let rr = Rr {
            name: w[0].to_lowercase(),
            ttl,
            rtype: w[3].to_string(),
            data: w[4..].join(" "),
        };
        match section {
            "answer" => d.answer.push(rr),
            "authority" => d.authority.push(rr),
            _ => d.additional.push(rr),
        }
    }
    d
}

/// Runs `dig +time=10 +tries=1 <args>` in `ns`.
pub fn dig(ns: &Netns, args: &[&str]) -> Result<Dig> {
    query(ns, "dig", &["+time=10", "+tries=1"], args)
}

/// Runs `kdig +timeout=10 +retry=0 <args>` in `ns`.
pub fn kdig(ns: &Netns, args: &[&str]) -> Result<Dig> {
    query(ns, "kdig", &["+timeout=10", "+retry=0"], args)
}

fn query(ns: &Netns, tool: &str, limits: &[&str], args: &[&str]) -> Result<Dig> {
    let out = ns
        .command(tool)
        .args(limits)
        .args(args)
        .output()
        .with_context(|| format!("running {tool}"))?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    if !out.status.success() {
        bail!("{tool} {args:?} failed ({}): {text}", out.status);
    }
    Ok(parse_dig(&text))
}

/// A value in the state store at HEAD, read with plain git.
pub fn store_get(db: &Path, path: &str) -> Option<String> {
    let out = Command::new("git")
        .arg("-C")
        .arg(db)
        .args(["show", &format!("HEAD:{path}")])
        .output()
        .ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// The store's history, newest first, one commit message each, read with `git log`.
pub fn store_log(db: &Path) -> Vec<String> {
    Command::new("git")
        .arg("-C")
        .arg(db)
        .args(["log", "--format=%s"])
        .output()
        .map(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .map(str::to_string)
                .collect()
        })
        .unwrap_or_default()
}

/// Fails the test unless each of `lines` is a commit message in the store's history at `db`;
/// returns the history.
pub fn assert_history(db: &Path, lines: &[&str]) -> Vec<String> {
    let log = store_log(db);
    for line in lines {
        assert!(
            log.iter().any(|l| l == line),
            "{line:?} is not in the store's history: {log:#?}"
        );
    }
    log
}

/// Waits until `line` is a commit message in the store's history at `db`; returns the
/// history.
pub fn wait_history(db: &Path, line: &str, timeout: Duration) -> Result<Vec<String>> {
    wait_until(&format!("{line:?} in the store's history"), timeout, || {
        let log = store_log(db);
        log.iter().any(|l| l == line).then_some(log)
    })
}

/// A VM's value (`state`, `starts`...) in the store at `db`.
pub fn vm_value(db: &Path, vm: &str, key: &str) -> Option<String> {
    store_get(db, &format!("jitsu/vm/{vm}/{key}"))
}

/// Waits until the store at `db` says `vm` is in `state`.
pub fn wait_vm_state(db: &Path, vm: &str, state: &str, timeout: Duration) -> Result<()> {
    wait_until(&format!("{vm} to be {state} in the store"), timeout, || {
        (vm_value(db, vm, "state").as_deref() == Some(state)).then_some(())
    })
}

/// Starts jitsu-dns in `host`'s namespace with `args` and `env`, its log in the host's
/// directory, and waits up to 30 s until it answers `dig <probe>` with output containing
/// `needle`; fails with its log if it exits or never answers.
pub fn start(
    host: &Host,
    args: &[&str],
    env: &[(&str, String)],
    probe: &[&str],
    needle: &str,
) -> Result<Daemon> {
    let mut cmd = host.ns().command(bin_path("jitsu-dns"));
    cmd.args(args).envs(env.iter().map(|(k, v)| (k, v)));
    start_command(host, cmd, probe, needle)
}

/// Starts `cmd` (jitsu-dns in `host`'s namespace, as [`start`] builds it, possibly wrapped)
/// and waits as [`start`] does.
pub fn start_command(host: &Host, cmd: Command, probe: &[&str], needle: &str) -> Result<Daemon> {
    let mut daemon = Daemon::start(cmd, "jitsu-dns", host.dir())?;
    let answered = wait_until("jitsu-dns to answer DNS", Duration::from_secs(30), || {
        if daemon.check_running().is_err() {
            return Some(false);
        }
        let out = host
            .ns()
            .command("dig")
            .args(["+time=1", "+tries=1"])
            .args(probe)
            .output()
            .ok()?;
        String::from_utf8_lossy(&out.stdout)
            .contains(needle)
            .then_some(true)
    })
    .with_context(|| format!("jitsu-dns's log:\n{}", daemon.log()))?;
    if !answered {
        bail!("jitsu-dns exited; its log:\n{}", daemon.log());
    }
    Ok(daemon)
}

/// jitsu-dns on a host (as on a dom0 with `br0`, which has 10.77.0.254/24), its VMs joining
/// the bridge, its store (`db`) and runtime (`run`) in the host's directory. Dropped in
/// order: jitsu-dns, the VMs, the host.
#[derive(Debug)]
pub struct DnsHarness {
    /// The running jitsu-dns, if started.
    pub daemon: Option<Daemon>,
    /// Its VMs.
    pub vms: ProcessVms,
    /// The bridge, its namespace, and the directory for the store, logs, and whatever the
    /// test puts there.
    pub host: Host,
}

impl DnsHarness {
    /// A host whose br0 has 10.77.0.254/24; jitsu-dns is not started.
    pub fn new(tag: &str) -> Result<DnsHarness> {
        let host = Host::new(tag)?;
        host.address("10.77.0.254/24")?;
        let vms = ProcessVms::new(tag, host.file("run"));
        Ok(DnsHarness {
            daemon: None,
            vms,
            host,
        })
    }

    /// The store's directory.
    pub fn db(&self) -> PathBuf {
        self.host.file("db")
    }

    /// The usual flags with the process backend with this test's prefix: see
    /// [`DnsHarness::backend_args`].
    pub fn args(&self, cgroup: Option<&str>, extra: &[&str]) -> Vec<String> {
        self.backend_args(&self.vms.uri(cgroup), extra)
    }

    /// The control socket: in the host's directory, so tests never share the host's.
    pub fn control(&self) -> PathBuf {
        self.host.file("control.sock")
    }

    /// The usual flags: DNS on 127.0.0.1:53 in the host namespace (unless `extra` has `-b`),
    /// forwarding off (unless `extra` has `-f`), the backend at `uri` (`-x` in `extra` says
    /// which, the process backend otherwise), the store, the control socket (unless `extra`
    /// has `--control`), debug logs; then `extra`.
    pub fn backend_args(&self, uri: &str, extra: &[&str]) -> Vec<String> {
        let db = self.db().display().to_string();
        let control = self.control().display().to_string();
        let mut a = vec![
            "-l",
            "53",
            "--log-level",
            "debug",
            "-c",
            uri,
            "--persistdb",
            &db,
        ];
        for (flag, default) in [
            ("-b", "127.0.0.1"),
            ("-f", "0.0.0.0"),
            ("--control", control.as_str()),
        ] {
            if !extra.contains(&flag) {
                a.extend([flag, default]);
            }
        }
        a.extend_from_slice(extra);
        a.into_iter().map(str::to_string).collect()
    }

    /// Starts jitsu-dns with `args` (and `env`), and waits until it answers DNS.
    pub fn start(&mut self, args: &[String], env: &[(&str, String)]) -> Result<()> {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        self.daemon = Some(start(&self.host, &args, env, &Self::PROBE, "status: ")?);
        Ok(())
    }

    const PROBE: [&str; 2] = ["@127.0.0.1", "jitsu-test-probe.invalid"];

    /// jitsu-dns with `args` in the host's namespace, not started: to wrap, then give to
    /// [`DnsHarness::start_command`].
    pub fn command(&self, args: &[String]) -> Command {
        let mut cmd = self.host.ns().command(bin_path("jitsu-dns"));
        cmd.args(args);
        cmd
    }

    /// Starts `cmd` (from [`DnsHarness::command`]) and waits until it answers DNS.
    pub fn start_command(&mut self, cmd: Command) -> Result<()> {
        self.daemon = Some(start_command(&self.host, cmd, &Self::PROBE, "status: ")?);
        Ok(())
    }

    /// SIGTERM, then waits for a clean exit; returns the exit code.
    pub fn stop(&mut self) -> Result<Option<i32>> {
        let mut d = self.daemon.take().context("not started")?;
        d.stop(Duration::from_secs(30))
    }

    /// jitsu-dns's log so far.
    pub fn log(&self) -> String {
        self.daemon.as_ref().map(|d| d.log()).unwrap_or_default()
    }

    /// `dig @127.0.0.1 <args>` from the host namespace.
    pub fn dig(&self, args: &[&str]) -> Dig {
        let mut a = vec!["@127.0.0.1"];
        a.extend_from_slice(args);
        dig(self.host.ns(), &a).unwrap_or_else(|e| panic!("{e}\njitsu-dns log:\n{}", self.log()))
    }

    /// A VM's value in the store (`state`, `starts`...).
    pub fn stored(&self, vm: &str, key: &str) -> Option<String> {
        vm_value(&self.db(), vm, key)
    }

    /// Waits until the store says `vm` is in `state`; fails the test with jitsu-dns's log.
    pub fn wait_state(&self, vm: &str, state: &str, timeout: Duration) {
        wait_vm_state(&self.db(), vm, state, timeout)
            .unwrap_or_else(|e| panic!("{e}\njitsu-dns log:\n{}", self.log()));
    }
}

/// `cmd` run in a mount namespace of its own where `dir` is a tmpfs of `size` (`2m`): a disk
/// the test can fill or make read-only ([`in_mounts_of`]) without touching the host's. The
/// mount goes with the namespace, when the last process in it exits.
pub fn on_own_tmpfs(cmd: &Command, dir: &Path, size: &str) -> Command {
    let mut wrapped = Command::new("unshare");
    wrapped
        .args(["--mount", "--propagation", "private", "--", "sh", "-c"])
        .arg(format!(
            "mount -t tmpfs -o size={size} jitsu-test \"$0\" && exec \"$@\""
        ))
        .arg(dir)
        .arg(cmd.get_program())
        .args(cmd.get_args());
    for (k, v) in cmd.get_envs() {
        match v {
            Some(v) => wrapped.env(k, v),
            None => wrapped.env_remove(k),
        };
    }
    wrapped
}

/// Runs `sh -c script` in the mount namespace of process `pid` (one started through
/// [`on_own_tmpfs`]); returns its stdout. A failing script is an error.
pub fn in_mounts_of(pid: u32, script: &str) -> Result<String> {
    let out = crate::run(Command::new("nsenter").args([
        "-t",
        &pid.to_string(),
        "-m",
        "--",
        "sh",
        "-c",
        script,
    ]))?;
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dig_and_kdig_output_is_parsed() {
        let dig_text = "\n; <<>> DiG 9.18.28 <<>> @127.0.0.1 www.example.org\n;; global options: +cmd\n\
            ;; Got answer:\n;; ->>HEADER<<- opcode: QUERY, status: NOERROR, id: 25521\n\
            ;; flags: qr aa rd; QUERY: 1, ANSWER: 1, AUTHORITY: 0, ADDITIONAL: 1\n\n\
            ;; OPT PSEUDOSECTION:\n; EDNS: version: 0, flags:; udp: 1232\n;; QUESTION SECTION:\n\
            ;www.example.org.\t\tIN\tA\n\n;; ANSWER SECTION:\nwww.example.org.\t2\tIN\tA\t10.77.0.1\n\n\
            ;; AUTHORITY SECTION:\nexample.org.\t2\tIN\tSOA\tns.example.org. hostmaster.example.org. 1 3600 600 86400 2\n\n";
        let d = parse_dig(dig_text);
        assert_eq!(d.status, "NOERROR");
        assert_eq!(d.flags, vec!["qr", "aa", "rd"]);
        assert!(d.aa() && d.edns);
        assert_eq!(d.addresses(), vec!["10.77.0.1"]);
        assert_eq!(d.answer[0].ttl, 2);
        assert_eq!(d.authority[0].rtype, "SOA");
        let kdig_text = ";; ->>HEADER<<- opcode: QUERY; status: NXDOMAIN; id: 4242\n\
            ;; Flags: qr aa rd; QUERY: 1; ANSWER: 0; AUTHORITY: 1; ADDITIONAL: 0\n\n\
            ;; QUESTION SECTION:\n;; nope.example.org.  \t\tIN\tA\n\n;; AUTHORITY SECTION:\n\
            example.org.        \t60\tIN\tSOA\tns.example.org. hostmaster.example.org. 1 3600 600 86400 60\n";
        let k = parse_dig(kdig_text);
        assert_eq!(k.status, "NXDOMAIN");
        assert!(k.aa() && !k.edns);
        assert!(k.answer.is_empty());
        assert_eq!(k.authority.len(), 1);
    }
}
