//! Support for the tests of jitsu-dns: a bridge namespace with jitsu-dns in it and its
//! process-backend VMs ([`DnsHarness`]), a guard that removes those VMs even when the test
//! fails ([`ProcessVms`]), `dig`/`kdig` output parsed into records ([`Dig`]), the state
//! store read with plain git.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result, bail};

use crate::topo::{Bridge, Daemon};
use crate::{Netns, Scratch, bin_path, unique};

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
                let _ =
                    crate::wait_until("the VM's cgroup to empty", Duration::from_secs(5), || {
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
    let out = ns
        .command("dig")
        .args(["+time=10", "+tries=1"])
        .args(args)
        .output()
        .context("running dig")?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    if !out.status.success() {
        bail!("dig {args:?} failed ({}): {text}", out.status);
    }
    Ok(parse_dig(&text))
}

/// Runs `kdig +timeout=10 +retry=0 <args>` in `ns`.
pub fn kdig(ns: &Netns, args: &[&str]) -> Result<Dig> {
    let out = ns
        .command("kdig")
        .args(["+timeout=10", "+retry=0"])
        .args(args)
        .output()
        .context("running kdig")?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    if !out.status.success() {
        bail!("kdig {args:?} failed ({}): {text}", out.status);
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

/// jitsu-dns in the host namespace of a bridge (as on a dom0 with `br0`), its VMs joining
/// the bridge, its store and runtime in a scratch directory. Dropped in order: jitsu-dns,
/// the VMs, the bridge, the directory.
#[derive(Debug)]
pub struct DnsHarness {
    /// The running jitsu-dns, if started.
    pub daemon: Option<Daemon>,
    /// Its VMs.
    pub vms: ProcessVms,
    /// The bridge and host namespace.
    pub bridge: Bridge,
    /// Files: `db` (the store), `run` (the backend), logs, and whatever the test puts there.
    pub scratch: Scratch,
}

impl DnsHarness {
    /// A bridge namespace (br0 with 10.77.0.254/24) and a scratch directory.
    pub fn new(tag: &str) -> Result<DnsHarness> {
        let scratch = Scratch::new(tag)?;
        let bridge = Bridge::new(tag)?;
        bridge.address("10.77.0.254/24")?;
        let vms = ProcessVms::new(tag, scratch.path().join("run"));
        Ok(DnsHarness {
            daemon: None,
            vms,
            bridge,
            scratch,
        })
    }

    /// The host namespace.
    pub fn host(&self) -> &Netns {
        self.bridge.host()
    }

    /// The store's directory.
    pub fn db(&self) -> PathBuf {
        self.scratch.path().join("db")
    }

    /// A path in the scratch directory.
    pub fn file(&self, name: &str) -> PathBuf {
        self.scratch.path().join(name)
    }

    /// The usual flags: DNS on 127.0.0.1:53 in the host namespace, forwarding off (unless
    /// `extra` has `-f`), the
    /// process backend with this test's prefix, the store, debug logs; then `extra`.
    pub fn args(&self, cgroup: Option<&str>, extra: &[&str]) -> Vec<String> {
        let mut a: Vec<String> = ["-b", "127.0.0.1", "-l", "53", "--log-level", "debug"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        if !extra.contains(&"-f") {
            a.extend(["-f".to_string(), "0.0.0.0".to_string()]);
        }
        a.push("-c".into());
        a.push(self.vms.uri(cgroup));
        a.push("--persistdb".into());
        a.push(self.db().display().to_string());
        a.extend(extra.iter().map(|s| s.to_string()));
        a
    }

    /// Starts jitsu-dns with `args` (and `env`), and waits until it answers DNS.
    pub fn start(&mut self, args: &[String], env: &[(&str, String)]) -> Result<()> {
        let jitsu = bin_path("jitsu-dns");
        let mut full: Vec<String> = env.iter().map(|(k, v)| format!("{k}={v}")).collect();
        full.push(jitsu.display().to_string());
        full.extend(args.iter().cloned());
        let refs: Vec<&str> = full.iter().map(String::as_str).collect();
        let daemon = Daemon::spawn(
            Some(self.bridge.host()),
            Path::new("/usr/bin/env"),
            &refs,
            self.scratch.path(),
        )?;
        self.daemon = Some(daemon);
        let daemon = self.daemon.as_mut().expect("just set");
        wait_answering(
            daemon,
            self.bridge.host(),
            &["@127.0.0.1", "jitsu-test-probe.invalid"],
            "status: ",
        )
    }

    /// SIGTERM, then waits for a clean exit; returns the exit code.
    pub fn stop(&mut self) -> Result<Option<i32>> {
        let mut d = self.daemon.take().context("not started")?;
        d.signal("TERM")?;
        let code = d.wait_exit(Duration::from_secs(30))?;
        Ok(code)
    }

    /// jitsu-dns's log so far.
    pub fn log(&self) -> String {
        self.daemon.as_ref().map(|d| d.log()).unwrap_or_default()
    }

    /// `dig @127.0.0.1 <args>` from the host namespace.
    pub fn dig(&self, args: &[&str]) -> Dig {
        let mut a = vec!["@127.0.0.1"];
        a.extend_from_slice(args);
        dig(self.host(), &a).unwrap_or_else(|e| panic!("{e}\njitsu-dns log:\n{}", self.log()))
    }

    /// A VM's value in the store (`state`, `starts`...).
    pub fn stored(&self, vm: &str, key: &str) -> Option<String> {
        store_get(&self.db(), &format!("jitsu/vm/{vm}/{key}"))
    }

    /// Waits until the store says `vm` is in `state`; fails the test with jitsu-dns's log.
    pub fn wait_state(&self, vm: &str, state: &str, timeout: Duration) {
        crate::wait_until(&format!("{vm} to be {state} in the store"), timeout, || {
            (self.stored(vm, "state").as_deref() == Some(state)).then_some(())
        })
        .unwrap_or_else(|e| panic!("{e}\njitsu-dns log:\n{}", self.log()));
    }
}

/// Waits up to 30 s until jitsu-dns (`daemon`, in `host`) answers `dig <query>` with output
/// containing `needle`; fails with its log if it exits or never answers.
pub fn wait_answering(
    daemon: &mut Daemon,
    host: &Netns,
    query: &[&str],
    needle: &str,
) -> Result<()> {
    let answered = crate::wait_until("jitsu-dns to answer DNS", Duration::from_secs(30), || {
        if daemon.check_running().is_err() {
            return Some(false);
        }
        let out = host
            .command("dig")
            .args(["+time=1", "+tries=1"])
            .args(query)
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
    Ok(())
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
