//! The process backend's named network namespaces, and its command's way into one: what
//! needs `unshare`, bind mounts and work between fork and exec, without spawning iproute2.
//!
//! A namespace is made as `ip netns add` makes it (an empty file under `/run/netns`, a
//! shared mount point, with a new namespace bind-mounted on it) and removed as `ip netns
//! del` removes it, so `ip netns` lists, enters and deletes ours and we theirs. The command
//! enters one as `ip netns exec` does (the namespace, then a mount namespace of its own whose
//! `/sys` shows the namespace's links), born in the VM's cgroup (`clone3`) and starting a
//! session of its own, all in the child before `exec`, which runs in jitsu-dns's memory as
//! after `vfork` (x86-64; a fork elsewhere): no `setsid`, `sh` launcher or `ip
//! netns exec` in between (30-50 ms a boot on a loaded machine, issue 12), and no write to
//! `cgroup.procs` with cgroup2 (see [`Cgroup::Born`]).
//!
//! Owns the namespace files and the child's set-up. Does not decide names (the backend does)
//! nor what is inside a namespace (`backend::process_net`). `/etc/netns/<name>` files, which
//! `ip netns exec` binds over `/etc`, are not bound.

use std::ffi::CString;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::{AsFd, AsRawFd as _, OwnedFd};
use std::os::unix::fs::OpenOptionsExt as _;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use rustix::fs::StatVfsMountFlags;
use rustix::io::Errno;
use rustix::mount::{MountFlags, MountPropagationFlags, UnmountFlags};
use rustix::thread::{LinkNameSpaceType, UnshareFlags};

/// Where named network namespaces live (iproute2's `NETNS_RUN_DIR`).
pub(crate) const NETNS_DIR: &str = "/run/netns";

/// The file of the namespace `name`.
pub(crate) fn netns_path(name: &str) -> PathBuf {
    Path::new(NETNS_DIR).join(name)
}

/// Makes [`NETNS_DIR`] a shared mount point, bind-mounting it on itself first if it is none,
/// as iproute2 does: a namespace mounted there afterwards then shows in the mount namespaces
/// of commands already running, and its unmount reaches them too (else each command's copy
/// would keep every later VM's namespace alive). Once per process: two threads binding the
/// directory on itself at once would stack two mounts.
fn share_netns_dir() -> io::Result<()> {
    static SHARED: OnceLock<Result<(), String>> = OnceLock::new();
    SHARED
        .get_or_init(|| {
            std::fs::create_dir_all(NETNS_DIR).map_err(|e| format!("{NETNS_DIR}: {e}"))?;
            let shared = MountPropagationFlags::SHARED | MountPropagationFlags::REC;
            match rustix::mount::mount_change(NETNS_DIR, shared) {
                Ok(()) => Ok(()),
                // Not a mount point yet.
                Err(Errno::INVAL) => rustix::mount::mount_bind_recursive(NETNS_DIR, NETNS_DIR)
                    .and_then(|()| rustix::mount::mount_change(NETNS_DIR, shared))
                    .map_err(|e| format!("making {NETNS_DIR} a shared mount point: {e}")),
                Err(e) => Err(format!("making {NETNS_DIR} shared: {e}")),
            }
        })
        .clone()
        .map_err(io::Error::other)
}

/// Creates the named network namespace `name` (its file must not exist) and returns its file.
/// The namespace has only `lo`, down.
pub(crate) fn create_netns(name: &str) -> io::Result<PathBuf> {
    share_netns_dir()?;
    let path = netns_path(name);
    // Mode 0, as iproute2: nothing opens the file but to enter the namespace mounted on it.
    OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o000)
        .open(&path)
        .map_err(|e| at(&path, e))?;
    // On a thread of its own, which the new namespace dies with but for the mount: the
    // caller's thread stays where it is.
    let made = std::thread::scope(|s| {
        s.spawn(|| -> io::Result<()> {
            // SAFETY: `unshare_unsafe` is unsafe for `FILES`, which could leave other threads
            // with descriptors this one no longer has; `NEWNET` changes only this thread's
            // network namespace, which nothing else of the process sees.
            unsafe { rustix::thread::unshare_unsafe(UnshareFlags::NEWNET) }?;
            rustix::mount::mount_bind("/proc/thread-self/ns/net", &path)?;
            Ok(())
        })
        .join()
        .unwrap_or_else(|_| Err(io::Error::other("the namespace's thread panicked")))
    });
    match made {
        Ok(()) => Ok(path),
        Err(e) => {
            let _ = std::fs::remove_file(&path);
            Err(io::Error::new(
                e.kind(),
                format!("creating namespace {name}: {e}"),
            ))
        }
    }
}

/// Removes the named network namespace `name`, as `ip netns del`: its mount, lazily (a
/// process still inside keeps the namespace, not the name), then its file. A namespace that
/// is not there is no error.
pub(crate) fn remove_netns(name: &str) -> io::Result<()> {
    let path = netns_path(name);
    match rustix::mount::unmount(&path, UnmountFlags::DETACH) {
        // EINVAL: not a mount point (a creation cut short); ENOENT: no file.
        Ok(()) | Err(Errno::INVAL) | Err(Errno::NOENT) => {}
        Err(e) => return Err(at(&path, e.into())),
    }
    match std::fs::remove_file(&path) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(at(&path, e)),
        _ => Ok(()),
    }
}

/// Where the command's cgroup is joined.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Cgroup<'a> {
    /// A cgroup2 directory: the child is born in it (`clone3` with `CLONE_INTO_CGROUP`).
    /// Moving a process by writing `cgroup.procs` waits for an RCU grace period under a
    /// lock of the whole host (`cgroup_threadgroup_rwsem`): 11-26 ms a write on a loaded
    /// machine, and 200 boots at once queue behind each other's (issue 12).
    Born(&'a Path),
    /// A v1 freezer directory: the child writes its own pid to its `cgroup.procs` before
    /// `exec` (also where the kernel has no `CLONE_INTO_CGROUP`).
    Joined(&'a Path),
}

/// What [`spawn_in_netns`] runs: `/bin/sh -c <command>` with jitsu-dns's environment and
/// `env` over it, stdin `/dev/null`, stdout and stderr `log`.
#[derive(Debug)]
pub(crate) struct Spawn<'a> {
    /// The shell command.
    pub command: &'a str,
    /// Variables set over jitsu-dns's own.
    pub env: &'a [(&'static str, String)],
    /// The log file.
    pub log: &'a File,
    /// The namespace (its name under [`NETNS_DIR`]).
    pub netns: &'a str,
    /// The cgroup.
    pub cgroup: Cgroup<'a>,
}

/// `CLONE_INTO_CGROUP` (Linux 5.7).
const CLONE_INTO_CGROUP: u64 = 0x2_0000_0000;

/// `struct clone_args` up to `cgroup` (`CLONE_ARGS_SIZE_VER2`, 88 bytes).
#[repr(C)]
#[derive(Default)]
struct CloneArgs {
    flags: u64,
    pidfd: u64,
    child_tid: u64,
    parent_tid: u64,
    exit_signal: u64,
    stack: u64,
    stack_size: u64,
    tls: u64,
    set_tid: u64,
    set_tid_size: u64,
    cgroup: u64,
}

fn cstring(bytes: &[u8]) -> io::Result<CString> {
    CString::new(bytes).map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "a NUL byte"))
}

/// Spawns `spawn`'s command in its cgroup, in a session of its own (it outlives jitsu-dns
/// and no terminal signal reaches it), inside the namespace with a mount namespace of its
/// own whose `/sys` is the namespace's, as `ip netns exec` leaves a command; returns its
/// pid once it has `exec`uted (an error if it could not). It is in its cgroup before it
/// runs, so nothing it starts escapes the freezer. The child is the caller's to reap.
pub(crate) fn spawn_in_netns(spawn: &Spawn<'_>) -> io::Result<u32> {
    let netns_file = netns_path(spawn.netns);
    let netns = File::open(&netns_file).map_err(|e| at(&netns_file, e))?;
    let dev_null = File::open("/dev/null")?;
    // Everything the child needs is made here: between fork and exec it may not allocate.
    let argv_owned = [
        cstring(b"/bin/sh")?,
        cstring(b"-c")?,
        cstring(spawn.command.as_bytes())?,
    ];
    let mut envp_owned = Vec::new();
    for (k, v) in std::env::vars_os() {
        if !spawn.env.iter().any(|(key, _)| k == *key) {
            let mut kv = k.into_encoded_bytes();
            kv.push(b'=');
            kv.extend_from_slice(v.as_encoded_bytes());
            envp_owned.push(cstring(&kv)?);
        }
    }
    for (k, v) in spawn.env {
        envp_owned.push(cstring(format!("{k}={v}").as_bytes())?);
    }
    let argv: Vec<*const libc::c_char> = argv_owned
        .iter()
        .map(|c| c.as_ptr())
        .chain([std::ptr::null()])
        .collect();
    let envp: Vec<*const libc::c_char> = envp_owned
        .iter()
        .map(|c| c.as_ptr())
        .chain([std::ptr::null()])
        .collect();
    let sysfs_source = cstring(spawn.netns.as_bytes())?;
    let sys_read_only = rustix::fs::statvfs("/sys")
        .map(|v| v.f_flag.contains(StatVfsMountFlags::RDONLY))
        .unwrap_or(false);
    let (born_in, join) = match spawn.cgroup {
        Cgroup::Born(dir) => (Some(File::open(dir).map_err(|e| at(dir, e))?), None),
        Cgroup::Joined(dir) => (None, Some(open_procs(dir)?)),
    };
    let child = Child {
        argv: &argv,
        envp: &envp,
        netns: &netns,
        dev_null: &dev_null,
        log: spawn.log,
        sysfs_source: &sysfs_source,
        sys_read_only,
    };
    match (child.start(born_in.as_ref(), join.as_ref()), spawn.cgroup) {
        // No CLONE_INTO_CGROUP (before Linux 5.7) or no clone3 (5.3): join by writing.
        (Err(e), Cgroup::Born(dir))
            if matches!(e.raw_os_error(), Some(libc::ENOSYS | libc::E2BIG)) =>
        {
            child.start(None, Some(&open_procs(dir)?))
        }
        (done, _) => done,
    }
}

/// The `cgroup.procs` file of the cgroup `dir`, for writing.
fn open_procs(dir: &Path) -> io::Result<File> {
    let procs = dir.join("cgroup.procs");
    OpenOptions::new()
        .write(true)
        .open(&procs)
        .map_err(|e| at(&procs, e))
}

/// The child's side: descriptors and C strings made by the parent.
struct Child<'a> {
    argv: &'a [*const libc::c_char],
    envp: &'a [*const libc::c_char],
    netns: &'a File,
    dev_null: &'a File,
    log: &'a File,
    sysfs_source: &'a CString,
    sys_read_only: bool,
}

impl Child<'_> {
    /// Forks (born in `born_in` if given), runs [`Self::exec`] in the child, and waits until
    /// it has exec'd or failed: its errno comes back over a close-on-exec pipe.
    fn start(&self, born_in: Option<&File>, join: Option<&File>) -> io::Result<u32> {
        let (rx, tx) = rustix::pipe::pipe_with(rustix::pipe::PipeFlags::CLOEXEC)?;
        #[cfg(target_arch = "x86_64")]
        let shared = match self.clone_sharing_memory(born_in, join, &tx) {
            // No clone3 (before Linux 5.3): fork below, unless the caller must fall back.
            Err(e) if born_in.is_none() && e.raw_os_error() == Some(libc::ENOSYS) => None,
            done => Some(done?),
        };
        #[cfg(not(target_arch = "x86_64"))]
        let shared = None;
        let pid = match (shared, born_in) {
            (Some(pid), _) => pid,
            (None, Some(dir)) => {
                let args = CloneArgs {
                    flags: CLONE_INTO_CGROUP,
                    exit_signal: libc::SIGCHLD as u64,
                    cgroup: dir.as_raw_fd() as u64,
                    ..CloneArgs::default()
                };
                // SAFETY: clone3 reads `args` (88 bytes, `CLONE_ARGS_SIZE_VER2`), which lives
                // across the call; without CLONE_VM the child has a copy of this process's
                // memory, as after fork, and runs only `exec` (no allocation, no locks).
                unsafe {
                    libc::syscall(
                        libc::SYS_clone3,
                        &raw const args,
                        std::mem::size_of::<CloneArgs>(),
                    )
                }
            }
            // SAFETY: the child runs only `exec` (no allocation, no locks).
            (None, None) => i64::from(unsafe { libc::fork() }),
        };
        if pid < 0 {
            return Err(io::Error::last_os_error());
        }
        if pid == 0 {
            // SAFETY: in the child, between fork and exec.
            unsafe { self.exec(join, &tx) }
        }
        drop(tx);
        let pid = u32::try_from(pid).map_err(|_| io::Error::other("a pid out of range"))?;
        let mut errno = [0u8; 4];
        let mut got = 0;
        while got < errno.len() {
            match rustix::io::read(&rx, &mut errno[got..]) {
                Ok(0) => break,
                Ok(n) => got += n,
                Err(Errno::INTR) => {}
                Err(e) => return Err(e.into()),
            }
        }
        if got == 0 {
            return Ok(pid);
        }
        // It failed before exec and exits: reap it here.
        let _ = rustix::process::waitpid(
            rustix::process::Pid::from_raw(pid as i32),
            rustix::process::WaitOptions::empty(),
        );
        Err(io::Error::from_raw_os_error(i32::from_ne_bytes(errno)))
    }

    /// Starts the child as `vfork` does (`clone3` with `CLONE_VM | CLONE_VFORK`, born in
    /// `born_in` if given): it runs [`Self::exec`] in this process's memory, on a stack of its
    /// own, while the calling thread waits for its `exec` or exit. A fork copied jitsu-dns's
    /// page tables (a VMA per thread stack: ~1,900 with 200 boots in flight) and `exec` tore
    /// the copy down again: 40% of a boot's CPU in a profile of 200 boots (issue 12).
    /// Returns the pid, or the error of `clone3`.
    #[cfg(target_arch = "x86_64")]
    fn clone_sharing_memory(
        &self,
        born_in: Option<&File>,
        join: Option<&File>,
        tx: &OwnedFd,
    ) -> io::Result<i64> {
        const CLONE_VM: u64 = libc::CLONE_VM as u64;
        const CLONE_VFORK: u64 = libc::CLONE_VFORK as u64;
        let mut stack = vec![0u8; CHILD_STACK];
        let base = stack.as_mut_ptr() as u64;
        // The ABI wants the stack pointer 16-byte aligned at a call.
        let top = (base + CHILD_STACK as u64) & !15;
        let args = CloneArgs {
            flags: CLONE_VM | CLONE_VFORK | born_in.map_or(0, |_| CLONE_INTO_CGROUP),
            exit_signal: libc::SIGCHLD as u64,
            stack: base,
            stack_size: top - base,
            cgroup: born_in.map_or(0, |d| d.as_raw_fd() as u64),
            ..CloneArgs::default()
        };
        let start = Start {
            child: self,
            join,
            tx,
        };
        // SAFETY: sigfillset and pthread_sigmask take pointers to sigsets living across the
        // calls. Every signal is blocked while the child runs in this process's memory: a
        // handler of jitsu-dns's run there would act on jitsu-dns's state; the child puts the
        // handlers back to their defaults before it unblocks them (`exec`).
        let mut all: libc::sigset_t = unsafe { std::mem::zeroed() };
        let mut old: libc::sigset_t = unsafe { std::mem::zeroed() };
        unsafe {
            libc::sigfillset(&mut all);
            libc::pthread_sigmask(libc::SIG_SETMASK, &all, &mut old);
        }
        let ret: i64;
        // SAFETY: clone3 reads `args` (88 bytes), which lives across the call. The child
        // starts on `stack` (alive until this function returns, which is after the child
        // exec'd or exited: CLONE_VFORK suspends this thread until then) and at once calls
        // `child_entry(&start)`, which never returns; `start` and what it borrows live on
        // this thread's stack, unchanged while it waits. The child uses registers r12 and
        // r13, copied from this thread's; this thread sees only rax, rcx and r11 change (the
        // syscall instruction), and no stack of its own used (`nostack`).
        unsafe {
            std::arch::asm!(
                "syscall",
                "test rax, rax",
                "jnz 2f",
                "mov rdi, r12",
                "call r13",
                "ud2",
                "2:",
                inlateout("rax") libc::SYS_clone3 => ret,
                in("rdi") &raw const args,
                in("rsi") std::mem::size_of::<CloneArgs>(),
                in("r12") &raw const start,
                in("r13") child_entry as extern "C" fn(*const Start<'_>) -> !,
                lateout("rcx") _,
                lateout("r11") _,
                options(nostack),
            );
        }
        // SAFETY: `old` is the mask read above.
        unsafe { libc::pthread_sigmask(libc::SIG_SETMASK, &old, std::ptr::null_mut()) };
        drop(stack);
        if ret < 0 {
            return Err(io::Error::from_raw_os_error(
                i32::try_from(-ret).unwrap_or(libc::EIO),
            ));
        }
        Ok(ret)
    }

    /// In the child: joins the cgroup by writing (`join`), starts a session, enters the
    /// namespace and a mount namespace of its own with the namespace's `/sys`, sets up
    /// stdio, the signal mask and SIGPIPE (ignored by Rust's runtime), and `exec`s; on
    /// failure writes its errno to `tx` and exits 127.
    ///
    /// # Safety
    /// Only between fork and exec, in the child.
    unsafe fn exec(&self, join: Option<&File>, tx: &impl AsFd) -> ! {
        let prepared = (|| -> Result<(), Errno> {
            if let Some(procs) = join {
                // "0": the writing process, in cgroup v1 and v2.
                rustix::io::write(procs, b"0")?;
            }
            rustix::process::setsid()?;
            rustix::thread::move_into_link_name_space(
                self.netns.as_fd(),
                Some(LinkNameSpaceType::Network),
            )?;
            // SAFETY: the child has one thread: no other shares the filesystem attributes
            // that unsharing the mount namespace unshares too.
            unsafe { rustix::thread::unshare_unsafe(UnshareFlags::NEWNS) }?;
            // Mounts made here stay here; the host's still reach here (a namespace removed).
            rustix::mount::mount_change(
                c"/",
                MountPropagationFlags::DOWNSTREAM | MountPropagationFlags::REC,
            )?;
            // A sysfs mounted now shows the links of the namespace entered above. One that
            // cannot be unmounted is covered, read-only if it was read-only.
            let flags = match rustix::mount::unmount(c"/sys", UnmountFlags::DETACH) {
                Err(_) if self.sys_read_only => MountFlags::RDONLY,
                _ => MountFlags::empty(),
            };
            rustix::mount::mount(self.sysfs_source.as_c_str(), c"/sys", c"sysfs", flags, None)?;
            for (from, to) in [(self.dev_null, 0), (self.log, 1), (self.log, 2)] {
                // SAFETY: dup2 and fcntl take descriptors only; the child's copies of
                // `from` are open.
                let r = unsafe {
                    if from.as_raw_fd() == to {
                        libc::fcntl(to, libc::F_SETFD, 0)
                    } else {
                        libc::dup2(from.as_raw_fd(), to)
                    }
                };
                if r < 0 {
                    return Err(Errno::from_raw_os_error(errno()));
                }
            }
            // SAFETY: sigaction reads and writes `sigaction` structs living across each
            // call; a zeroed `sigset_t` emptied by sigemptyset, passed by pointer for the
            // call; signal() takes no pointers. Handlers go back to their defaults before
            // the signals are unblocked: a child started in jitsu-dns's memory must not run
            // jitsu-dns's handlers (its handler table is its own copy: no CLONE_SIGHAND).
            unsafe {
                for sig in 1..=libc::SIGRTMAX() {
                    let mut action: libc::sigaction = std::mem::zeroed();
                    if libc::sigaction(sig, std::ptr::null(), &mut action) == 0
                        && action.sa_sigaction != libc::SIG_IGN
                        && action.sa_sigaction != libc::SIG_DFL
                    {
                        action.sa_sigaction = libc::SIG_DFL;
                        libc::sigaction(sig, &action, std::ptr::null_mut());
                    }
                }
                let mut set: libc::sigset_t = std::mem::zeroed();
                libc::sigemptyset(&mut set);
                libc::pthread_sigmask(libc::SIG_SETMASK, &set, std::ptr::null_mut());
                libc::signal(libc::SIGPIPE, libc::SIG_DFL);
            }
            // SAFETY: `argv` and `envp` are null-terminated arrays of pointers to C strings
            // the parent made, copied into this process with them.
            unsafe { libc::execve(self.argv[0], self.argv.as_ptr(), self.envp.as_ptr()) };
            Err(Errno::from_raw_os_error(errno()))
        })();
        let code = prepared.err().map_or(0, |e| e.raw_os_error());
        let _ = rustix::io::write(tx, &code.to_ne_bytes());
        // SAFETY: _exit ends the child without running the parent's destructors or atexit
        // handlers.
        unsafe { libc::_exit(127) }
    }
}

/// The stack of a child started in jitsu-dns's memory, until it `exec`s: [`Child::exec`]'s few
/// frames.
#[cfg(target_arch = "x86_64")]
const CHILD_STACK: usize = 256 * 1024;

/// What a child started in jitsu-dns's memory is given.
#[cfg(target_arch = "x86_64")]
struct Start<'a> {
    child: &'a Child<'a>,
    join: Option<&'a File>,
    tx: &'a OwnedFd,
}

/// Where a child started in jitsu-dns's memory begins, on its own stack.
#[cfg(target_arch = "x86_64")]
extern "C" fn child_entry(start: *const Start<'_>) -> ! {
    // SAFETY: `start` points to the `Start` of the suspended parent thread
    // (`clone_sharing_memory`), alive and unchanged until this child execs or exits; this is
    // the child, between clone and exec.
    unsafe {
        let start = &*start;
        start.child.exec(start.join, start.tx)
    }
}

/// The calling thread's errno.
fn errno() -> i32 {
    io::Error::last_os_error()
        .raw_os_error()
        .unwrap_or(libc::EIO)
}

/// `e` with the path it concerns.
fn at(path: &Path, e: io::Error) -> io::Error {
    io::Error::new(e.kind(), format!("{}: {e}", path.display()))
}
