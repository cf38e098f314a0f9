//! The process backend's named network namespaces, and its command's way into one: what
//! needs `unshare`, bind mounts and work between fork and exec, without spawning iproute2.
//!
//! A namespace is made as `ip netns add` makes it (an empty file under `/run/netns`, a
//! shared mount point, with a new namespace bind-mounted on it) and removed as `ip netns
//! del` removes it, so `ip netns` lists, enters and deletes ours and we theirs. The command
//! enters one as `ip netns exec` does (the namespace, then a mount namespace of its own whose
//! `/sys` shows the namespace's links), after joining the VM's cgroup and starting a session
//! of its own, all in the child before `exec`: no `setsid`, `sh` launcher or `ip netns exec`
//! in between (30-50 ms a boot on a loaded machine, issue 12).
//!
//! Owns the namespace files and the child's set-up. Does not decide names (the backend does)
//! nor what is inside a namespace (`backend::process_net`). `/etc/netns/<name>` files, which
//! `ip netns exec` binds over `/etc`, are not bound.

use std::ffi::CString;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsFd as _;
use std::os::unix::fs::OpenOptionsExt as _;
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
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

/// Spawns `cmd` in the cgroup whose `cgroup.procs` file is `cgroup_procs`, in a session of
/// its own (it outlives jitsu-dns and no terminal signal reaches it), inside the namespace
/// `name` with a mount namespace of its own whose `/sys` is the namespace's, as `ip netns
/// exec` leaves a command. It is in its cgroup before `exec`, so nothing it starts escapes
/// the freezer. The child is the caller's to reap.
pub(crate) fn spawn_in_netns(
    cmd: &mut Command,
    name: &str,
    cgroup_procs: &Path,
) -> io::Result<Child> {
    let netns_file = netns_path(name);
    let netns = File::open(&netns_file).map_err(|e| at(&netns_file, e))?;
    let cgroup = OpenOptions::new()
        .write(true)
        .open(cgroup_procs)
        .map_err(|e| at(cgroup_procs, e))?;
    // What the child needs, made here: it may not allocate.
    let sysfs_source = CString::new(name.as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "a NUL in a namespace name"))?;
    let sys_read_only = rustix::fs::statvfs("/sys")
        .map(|v| v.f_flag.contains(StatVfsMountFlags::RDONLY))
        .unwrap_or(false);
    // SAFETY: the closure runs in the forked child before exec and makes only system calls
    // (write, setsid, setns, unshare, mount, umount2) through rustix, on descriptors and
    // C strings made above and owned by the closure, allocating nothing; the child has one
    // thread, so unsharing its mount namespace (and with it its filesystem attributes)
    // leaves no other thread behind.
    unsafe {
        cmd.pre_exec(move || {
            // "0": the writing process, in cgroup v1 and v2.
            rustix::io::write(&cgroup, b"0")?;
            rustix::process::setsid()?;
            rustix::thread::move_into_link_name_space(
                netns.as_fd(),
                Some(LinkNameSpaceType::Network),
            )?;
            rustix::thread::unshare_unsafe(UnshareFlags::NEWNS)?;
            // Mounts made here stay here; the host's still reach here (a namespace removed).
            rustix::mount::mount_change(
                c"/",
                MountPropagationFlags::DOWNSTREAM | MountPropagationFlags::REC,
            )?;
            // A sysfs mounted now shows the links of the namespace entered above. One that
            // cannot be unmounted is covered, read-only if it was read-only.
            let flags = match rustix::mount::unmount(c"/sys", UnmountFlags::DETACH) {
                Err(_) if sys_read_only => MountFlags::RDONLY,
                _ => MountFlags::empty(),
            };
            rustix::mount::mount(sysfs_source.as_c_str(), c"/sys", c"sysfs", flags, None)?;
            Ok(())
        });
    }
    cmd.spawn()
}

/// `e` with the path it concerns.
fn at(path: &Path, e: io::Error) -> io::Error {
    io::Error::new(e.kind(), format!("{}: {e}", path.display()))
}
