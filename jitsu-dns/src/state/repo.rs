//! The repository on disk: made ready to write (created, locked, stale locks removed, HEAD read
//! back whole), moved aside when it cannot be read, its work tree kept as HEAD says, and
//! git's housekeeping.
//!
//! Owns every git call but fast-import's. What counts as unreadable: any git error reading
//! HEAD's commit, tree or files (an empty or truncated object, a branch that points nowhere).
//! Such a repository is renamed `<dir>.corrupt-<unix time>` beside the store (or, when the
//! directory itself cannot be renamed, its `.git` inside it), never deleted: a person may
//! want it back. It does not decide when to prepare the repository: the writer does, at
//! start and after a failure.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::thread;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use super::{StateError, Tree};

/// git with jitsu-dns's identity, in `dir`, reading nothing from stdin.
pub(crate) fn git(dir: &Path) -> Command {
    let mut c = Command::new("git");
    c.arg("-C")
        .arg(dir)
        .args([
            "-c",
            "user.name=jitsu-dns",
            "-c",
            "user.email=jitsu-dns@localhost",
            "-c",
            "commit.gpgsign=false",
        ])
        .stdin(Stdio::null());
    c
}

/// Runs git; its stdout, or what it said on stderr.
pub(crate) fn run_git(dir: &Path, args: &[&str]) -> Result<String, String> {
    let out = git(dir)
        .args(args)
        .output()
        .map_err(|e| format!("git {}: {e}", args.join(" ")))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(format!(
            "git {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

fn repo_err(dir: &Path, detail: impl Into<String>) -> StateError {
    StateError::Repo {
        path: dir.to_path_buf(),
        detail: detail.into(),
    }
}

/// The head commit and its tree, for a branch that has commits.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Head {
    /// The commit.
    pub(crate) sha: String,
    /// Its tree: path -> value (without the final newline).
    pub(crate) tree: Tree,
}

/// Reads HEAD (`None` for a branch without commits) and every file of its tree.
pub(crate) fn read_head(dir: &Path) -> Result<Option<Head>, StateError> {
    let Ok(sha) = run_git(dir, &["rev-parse", "--verify", "-q", "HEAD"]) else {
        // No commit yet, unless a branch exists that HEAD cannot be resolved to.
        let refs = run_git(dir, &["for-each-ref", "--count=1"]).map_err(|e| repo_err(dir, e))?;
        if !refs.trim().is_empty() {
            return Err(repo_err(dir, "HEAD does not resolve to a commit"));
        }
        return Ok(None);
    };
    let sha = sha.trim().to_string();
    let listing = run_git(dir, &["ls-tree", "-r", "-z", "--full-tree", &sha])
        .map_err(|e| repo_err(dir, e))?;
    let mut objects = Vec::new();
    for entry in listing.split('\0').filter(|e| !e.is_empty()) {
        // "<mode> blob <sha>\t<path>"
        let Some((meta, path)) = entry.split_once('\t') else {
            continue;
        };
        let Some(blob) = meta.split(' ').nth(2) else {
            continue;
        };
        objects.push((path.to_string(), blob.to_string()));
    }
    let mut tree = Tree::new();
    if objects.is_empty() {
        return Ok(Some(Head { sha, tree }));
    }
    let mut child = git(dir)
        .args(["cat-file", "--batch"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| repo_err(dir, format!("git cat-file: {e}")))?;
    let input: String = objects.iter().map(|(_, sha)| format!("{sha}\n")).collect();
    let mut stdin = child.stdin.take().expect("stdin was piped");
    let writer = thread::spawn(move || {
        use std::io::Write as _;
        let _ = stdin.write_all(input.as_bytes());
    });
    let out = child
        .wait_with_output()
        .map_err(|e| repo_err(dir, format!("git cat-file: {e}")))?;
    let _ = writer.join();
    if !out.status.success() {
        return Err(repo_err(
            dir,
            format!(
                "git cat-file --batch failed: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            ),
        ));
    }
    // "<sha> blob <size>\n<content>\n", repeated.
    let short = || repo_err(dir, "short git cat-file output");
    let mut rest = &out.stdout[..];
    for (path, _) in objects {
        let nl = rest.iter().position(|b| *b == b'\n').ok_or_else(short)?;
        let header = String::from_utf8_lossy(&rest[..nl]).into_owned();
        let size: usize = header
            .rsplit(' ')
            .next()
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| repo_err(dir, format!("{path}: git cat-file says {header:?}")))?;
        let body = rest.get(nl + 1..nl + 1 + size).ok_or_else(short)?;
        let value = String::from_utf8_lossy(body);
        tree.insert(path, value.strip_suffix('\n').unwrap_or(&value).to_string());
        rest = rest.get(nl + 2 + size..).unwrap_or_default();
    }
    Ok(Some(Head { sha, tree }))
}

/// Lock files git leaves when killed mid-write; under `.git`, `refs/` included.
fn lock_files(git_dir: &Path) -> Vec<PathBuf> {
    let mut found = Vec::new();
    let mut dirs = vec![git_dir.to_path_buf()];
    while let Some(d) = dirs.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in entries.flatten() {
            let p = e.path();
            let is_dir = e.file_type().is_ok_and(|t| t.is_dir());
            // Objects have no locks; refs (and logs of refs) can be deep.
            if is_dir && (d != git_dir || matches!(e.file_name().to_str(), Some("refs"))) {
                dirs.push(p);
            } else if !is_dir && p.extension().is_some_and(|x| x == "lock") {
                found.push(p);
            }
        }
    }
    found
}

/// Removes git's lock files under `<dir>/.git` older than `min_age` (all of them for zero,
/// when no other writer can hold one); returns those removed.
pub(crate) fn remove_stale_locks(dir: &Path, min_age: Duration) -> Vec<PathBuf> {
    let now = SystemTime::now();
    lock_files(&dir.join(".git"))
        .into_iter()
        .filter(|p| {
            let age = std::fs::metadata(p)
                .and_then(|m| m.modified())
                .ok()
                .and_then(|m| now.duration_since(m).ok())
                .unwrap_or_default();
            age >= min_age && std::fs::remove_file(p).is_ok()
        })
        .collect()
}

/// Moves the unreadable repository at `dir` aside, beside it if the directory can be renamed,
/// else its `.git` inside it; returns where it went. `dir` is left absent or without `.git`.
fn move_aside(dir: &Path) -> Result<PathBuf, StateError> {
    let stamp = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let mut beside = dir.as_os_str().to_owned();
    beside.push(format!(".corrupt-{stamp}"));
    let beside = PathBuf::from(beside);
    if std::fs::rename(dir, &beside).is_ok() {
        return Ok(beside);
    }
    // A mount point, or a parent we may not write: keep it inside.
    let inside = dir.join(format!(".git.corrupt-{stamp}"));
    std::fs::rename(dir.join(".git"), &inside).map_err(|e| {
        repo_err(
            dir,
            format!("cannot move the unreadable repository aside: {e}"),
        )
    })?;
    Ok(inside)
}

/// A repository ready to write: locked for this jitsu-dns, its branch and head known.
#[derive(Debug)]
pub(crate) struct Ready {
    /// The branch HEAD names (`refs/heads/master`).
    pub(crate) branch: String,
    /// Its head, if it has commits.
    pub(crate) head: Option<Head>,
    /// Where an unreadable repository found here went, and why it was unreadable.
    pub(crate) moved_aside: Option<(PathBuf, String)>,
    /// Stale lock files removed.
    pub(crate) stale_locks: Vec<PathBuf>,
}

/// Holds `<dir>/.git` for one jitsu-dns: two writing one store would undo each other.
#[derive(Debug)]
pub(crate) struct Owner {
    _locked: File,
}

/// How long a lock held by someone else is waited for before the store is called busy. The
/// lock belongs to an open file, which a child forked by the previous owner shares until it
/// execs or exits: a jitsu-dns restarted at once (or a store dropped and taken again in one
/// process) may find it held for a moment.
const OWN_PATIENCE: Duration = Duration::from_secs(2);

fn own(dir: &Path) -> Result<Owner, StateError> {
    let git_dir = dir.join(".git");
    let f =
        File::open(&git_dir).map_err(|e| repo_err(dir, format!("{}: {e}", git_dir.display())))?;
    let give_up = std::time::Instant::now() + OWN_PATIENCE;
    loop {
        match f.try_lock() {
            Ok(()) => return Ok(Owner { _locked: f }),
            Err(std::fs::TryLockError::WouldBlock) if std::time::Instant::now() < give_up => {
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(std::fs::TryLockError::WouldBlock) => {
                return Err(StateError::Busy {
                    path: dir.to_path_buf(),
                });
            }
            Err(std::fs::TryLockError::Error(e)) => {
                return Err(repo_err(dir, format!("cannot lock .git: {e}")));
            }
        }
    }
}

/// Makes the repository at `dir` ready to write: created if absent, owned (`owner` holds it
/// once taken), lock files older than `stale_after` removed, HEAD read back whole; moved aside
/// and made afresh if it cannot be read.
pub(crate) fn prepare(
    dir: &Path,
    owner: &mut Option<Owner>,
    stale_after: Duration,
) -> Result<Ready, StateError> {
    let mut moved_aside = None;
    loop {
        std::fs::create_dir_all(dir).map_err(|e| repo_err(dir, e.to_string()))?;
        if !dir.join(".git").exists() {
            run_git(dir, &["init", "-q"]).map_err(|e| repo_err(dir, e))?;
        }
        if owner.is_none() {
            *owner = Some(own(dir)?);
        }
        let stale_locks = remove_stale_locks(dir, stale_after);
        let read = run_git(dir, &["symbolic-ref", "-q", "HEAD"])
            .map_err(|e| repo_err(dir, format!("HEAD names no branch: {e}")))
            .and_then(|branch| Ok((branch.trim().to_string(), read_head(dir)?)));
        match read {
            Ok((branch, head)) => {
                return Ok(Ready {
                    branch,
                    head,
                    moved_aside,
                    stale_locks,
                });
            }
            // Once only: a fresh repository that cannot be read is not corruption.
            Err(e) if moved_aside.is_none() => {
                let to = move_aside(dir)?;
                *owner = None;
                moved_aside = Some((to, e.to_string()));
            }
            Err(e) => return Err(e),
        }
    }
}

/// Makes the work tree's `jitsu/` what `tree` says, from scratch.
pub(crate) fn rewrite_work_tree(dir: &Path, tree: &Tree) -> Result<(), String> {
    let jitsu = dir.join("jitsu");
    if jitsu.exists() {
        std::fs::remove_dir_all(&jitsu).map_err(|e| format!("{}: {e}", jitsu.display()))?;
    }
    for (p, v) in tree {
        write_file(dir, p, Some(v))?;
    }
    Ok(())
}

/// Writes (or with `None` removes) one file of the work tree, as `cat` shows it.
pub(crate) fn write_file(dir: &Path, path: &str, value: Option<&str>) -> Result<(), String> {
    let full = dir.join(path);
    let Some(value) = value else {
        if let Err(e) = std::fs::remove_file(&full)
            && e.kind() != std::io::ErrorKind::NotFound
        {
            return Err(format!("{}: {e}", full.display()));
        }
        // Directories left empty go too, as git shows no empty tree.
        let mut parent = full.parent();
        while let Some(d) = parent
            && d != dir
            && std::fs::remove_dir(d).is_ok()
        {
            parent = d.parent();
        }
        return Ok(());
    };
    if let Some(parent) = full.parent() {
        std::fs::create_dir_all(parent).map_err(|e| format!("{}: {e}", parent.display()))?;
    }
    std::fs::write(&full, format!("{value}\n")).map_err(|e| format!("{}: {e}", full.display()))
}

/// Starts rolling fast-import's small packs up (`git repack -d -l --geometric=2`: only the
/// small ones are rewritten, so it stays cheap however large the history), in the background.
pub(crate) fn repack(dir: &Path) -> Result<Child, String> {
    git(dir)
        .args(["repack", "-d", "-l", "-q", "--geometric=2"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| format!("git repack: {e}"))
}

/// git's housekeeping, as `git commit` did it for the store: the index made HEAD's (so `git
/// status` is clean; commits never use it) and `git gc --auto`, which packs loose objects and
/// small packs in the background once there are many.
pub(crate) fn housekeeping(dir: &Path) -> Result<(), String> {
    run_git(dir, &["read-tree", "HEAD"])?;
    run_git(dir, &["gc", "--auto", "--quiet"])?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tmp(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("jitsu-repo-test-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        d
    }

    #[test]
    fn a_store_is_owned_by_one_jitsu_dns_at_a_time() {
        let dir = tmp("own");
        let mut first = None;
        prepare(&dir, &mut first, Duration::ZERO).unwrap();
        let mut second = None;
        let err = prepare(&dir, &mut second, Duration::ZERO).unwrap_err();
        assert!(err.to_string().contains("another jitsu-dns"), "{err}");
        drop(first);
        // Released: a blocking lock (a git forked by another test may hold a copy of the
        // descriptor until it execs) is then granted.
        File::open(dir.join(".git")).unwrap().lock().unwrap();
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn stale_locks_are_removed_and_fresh_ones_kept() {
        let dir = tmp("locks");
        let mut owner = None;
        prepare(&dir, &mut owner, Duration::ZERO).unwrap();
        let refs = dir.join(".git/refs/heads");
        for l in [dir.join(".git/index.lock"), refs.join("master.lock")] {
            std::fs::write(l, "").unwrap();
        }
        assert!(remove_stale_locks(&dir, Duration::from_secs(60)).is_empty());
        let mut removed = remove_stale_locks(&dir, Duration::ZERO);
        removed.sort();
        assert_eq!(
            removed,
            vec![dir.join(".git/index.lock"), refs.join("master.lock")]
        );
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn an_unreadable_repository_is_moved_aside_and_a_fresh_one_made() {
        let dir = tmp("aside");
        let mut owner = None;
        prepare(&dir, &mut owner, Duration::ZERO).unwrap();
        std::fs::write(dir.join("x"), "1\n").unwrap();
        run_git(&dir, &["add", "x"]).unwrap();
        let c = git(&dir)
            .args(["commit", "-q", "-m", "one"])
            .status()
            .unwrap();
        assert!(c.success());
        let head = run_git(&dir, &["rev-parse", "HEAD"]).unwrap();
        let head = head.trim();
        let object = dir.join(".git/objects").join(&head[..2]).join(&head[2..]);
        std::fs::write(&object, "").unwrap();
        assert!(read_head(&dir).is_err());

        drop(owner);
        let mut owner = None;
        let ready = prepare(&dir, &mut owner, Duration::ZERO).unwrap();
        assert_eq!(ready.head, None, "fresh");
        let (to, why) = ready.moved_aside.unwrap();
        assert!(why.contains("empty"), "{why}");
        assert_eq!(
            std::fs::read(to.join(".git/objects").join(&head[..2]).join(&head[2..]))
                .unwrap()
                .len(),
            0
        );
        let _ = std::fs::remove_dir_all(&dir);
        let _ = std::fs::remove_dir_all(&to);
    }
}
