//! Support code for jitsu's end-to-end tests: network namespaces that clean up after
//! themselves, the tests' one wait ([`wait_until`]), scratch directory ([`Scratch`]) and HTTP
//! client ([`curl`]), the host every harness builds on ([`topo::Host`]: `br0` in a namespace
//! of its own, plus daemons), a check for the real tools a test needs, the paths of the built
//! daemons, and a small Xenstore daemon ([`xenstored`]).
//!
//! Every topology lives in namespaces the test creates (addresses such as 10.77.0.0/16 only
//! inside them) and is removed by [`Netns`]'s `Drop`, also when the test fails.

pub mod curl;
pub mod e2e;
pub mod fake_synjitsu;
pub mod jitsu_dns;
pub mod libvirt;
pub mod synjitsu;
pub mod topo;
pub mod unikernel;
pub mod xenstored;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

/// Fails the test, naming the Debian package, if `tool` is not on PATH. Tests never skip
/// themselves: the README's test command installs everything they need.
pub fn require_tool(tool: &str, package: &str) {
    let found = Command::new("sh")
        .args(["-c", &format!("command -v {tool}")])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    assert!(
        found,
        "this test needs `{tool}` (Debian package {package}); the README's test command \
         (scripts/test) installs it"
    );
}

/// Fails the test unless it runs as root, which namespaces and bridges need.
pub fn require_root() {
    // SAFETY-free check: /proc/self/status's Uid line.
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let uid = status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .and_then(|l| l.split_whitespace().next())
        .unwrap_or("?");
    assert_eq!(
        uid, "0",
        "this test creates network namespaces and must run as root (scripts/test does)"
    );
}

/// The target directory the running binary was built into (`target/debug` or
/// `target/release`): test binaries live in its `deps/`, the harness's own binaries in it.
pub fn target_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("the running binary has a path");
    let dir = exe.parent().expect("a binary lives in a directory");
    if dir.file_name().is_some_and(|n| n == "deps") {
        dir.parent()
            .expect("deps/ is inside the profile directory")
            .to_path_buf()
    } else {
        dir.to_path_buf()
    }
}

/// The path of a workspace binary built beside the tests; fails saying how to build it.
pub fn bin_path(name: &str) -> PathBuf {
    let p = target_dir().join(name);
    assert!(
        p.exists(),
        "{} is missing: build the workspace's binaries first (`cargo build --workspace --bins`, \
         which scripts/test runs)",
        p.display()
    );
    p
}

/// The repository's root directory.
pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ is inside the repository")
        .to_path_buf()
}

/// Runs a command; an error carries the command line, status and stderr.
pub fn run(cmd: &mut Command) -> Result<Output> {
    let out = cmd
        .output()
        .with_context(|| format!("could not start {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(out)
}

/// Runs `sh -c script`, returning stdout.
pub fn sh(script: &str) -> Result<String> {
    let out = run(Command::new("sh").args(["-c", script]))?;
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Polls `f` every 10 ms until it returns `Some`, or fails after `timeout` saying what it
/// waited for and how long. Every wait of the tests is this one, never a bare sleep; `f`
/// returns `Some(Err(..))` to give up early (a daemon that exited, a closed connection).
pub fn wait_until<T>(what: &str, timeout: Duration, mut f: impl FnMut() -> Option<T>) -> Result<T> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return Ok(v);
        }
        if Instant::now() > deadline {
            bail!("timed out after {timeout:?} waiting for {what}");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// A temporary directory under `/tmp/jitsu-tests`, removed when dropped.
#[derive(Debug)]
pub struct Scratch {
    dir: PathBuf,
}

impl Scratch {
    /// Creates `/tmp/jitsu-tests/<tag><unique>`.
    pub fn new(tag: &str) -> Result<Scratch> {
        let dir = std::env::temp_dir().join("jitsu-tests").join(unique(tag));
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        Ok(Scratch { dir })
    }

    /// The directory.
    pub fn path(&self) -> &Path {
        &self.dir
    }

    /// A path inside it.
    pub fn join(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        // JITSU_KEEP=1 keeps logs, stores and captures for a post-mortem.
        if std::env::var_os("JITSU_KEEP").is_some() {
            eprintln!("kept {}", self.dir.display());
            return;
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

static COUNTER: AtomicU32 = AtomicU32::new(0);

/// A name unique to this process and call, short enough for an interface name when `tag` is
/// at most 6 characters (`tag` + up to 9).
pub fn unique(tag: &str) -> String {
    let n = COUNTER.fetch_add(1, Ordering::SeqCst);
    format!("{tag}{:x}{n:x}", std::process::id() % 0xfffff)
}

/// A network namespace that kills what runs in it and deletes itself when dropped.
#[derive(Debug)]
pub struct Netns {
    name: String,
}

impl Netns {
    /// Creates a namespace named `jt-<tag><unique>` with its loopback up.
    pub fn new(tag: &str) -> Result<Netns> {
        let name = format!("jt-{}", unique(tag));
        run(Command::new("ip").args(["netns", "add", &name]))?;
        let ns = Netns { name };
        ns.sh("ip link set lo up")?;
        Ok(ns)
    }

    /// The namespace's name, for `ip netns exec` and `ip -n`.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// A command that runs `program` inside the namespace.
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.name]).arg(program);
        c
    }

    /// Runs `sh -c script` inside the namespace, returning stdout.
    pub fn sh(&self, script: &str) -> Result<String> {
        let out = run(self.command("sh").args(["-c", script]))?;
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        // Anything still running inside would keep the namespace alive.
        if let Ok(out) = Command::new("ip")
            .args(["netns", "pids", &self.name])
            .output()
        {
            for pid in String::from_utf8_lossy(&out.stdout).split_whitespace() {
                let _ = Command::new("kill").args(["-9", pid]).status();
            }
        }
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unique_names_fit_an_interface_name() {
        let a = unique("veth-c");
        let b = unique("veth-c");
        assert_ne!(a, b);
        assert!(a.len() <= 15, "{a}");
    }
}
