//! Commits through one long-running `git fast-import`: many commits a second from one
//! process, no index (so no `index.lock`), and git's own code writing git's objects.
//!
//! Owns the child process and its stream: [`render_commit`] (pure) writes one commit of the
//! stream; [`FastImport::checkpoint`] makes git write what it was given and move the branch,
//! then checks that the branch really is at the last commit (fast-import only prints an
//! error when it cannot update a ref: a stale lock, a branch moved by someone else). It does
//! not decide what to commit, nor what to do when git fails: the writer does.
//!
//! fast-import keeps an entry in memory for every object it wrote, so the writer ends it
//! after [`MAX_COMMITS`] commits, and whenever it is idle, and starts another from the
//! branch's head. If jitsu-dns dies, fast-import reads the end of its input and writes what
//! it had whole; a commit cut short is dropped.

use std::io::{BufRead, BufReader, Read, Write};
use std::path::Path;
use std::process::{Child, ChildStdin, ChildStdout, Stdio};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{SystemTime, UNIX_EPOCH};

use super::journal::Edits;
use super::repo::{git, run_git};

/// Commits one fast-import process makes before the writer starts another.
pub(crate) const MAX_COMMITS: u64 = 10_000;

/// Who commits.
const COMMITTER: &str = "jitsu-dns <jitsu-dns@localhost>";

/// A path as fast-import reads it: as it is, or C-quoted when it could be misread.
fn quote_path(path: &str) -> String {
    if !path.starts_with('"') && !path.contains(['\n', '\\']) {
        return path.to_string();
    }
    let mut q = String::from("\"");
    for c in path.chars() {
        match c {
            '"' => q.push_str("\\\""),
            '\\' => q.push_str("\\\\"),
            '\n' => q.push_str("\\n"),
            c => q.push(c),
        }
    }
    q.push('"');
    q
}

/// `data <n>` and the bytes, as fast-import reads a message or a file.
fn data(out: &mut Vec<u8>, bytes: &[u8]) {
    out.extend_from_slice(format!("data {}\n", bytes.len()).as_bytes());
    out.extend_from_slice(bytes);
    out.push(b'\n');
}

/// The parents of a commit besides the branch's last one.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Parents<'a> {
    /// The branch's head, for the first commit of a process on an existing branch (later
    /// ones follow the branch).
    pub(crate) from: Option<&'a str>,
    /// A commit merged by this one (a change taken from another branch).
    pub(crate) merge: Option<&'a str>,
}

/// One commit on `branch` (`refs/heads/master`), marked `:mark`, at `when`, on top of
/// `parents`. Files hold their value and a final newline, as `cat` shows them.
pub(crate) fn render_commit(
    out: &mut Vec<u8>,
    branch: &str,
    mark: u64,
    parents: Parents<'_>,
    when: SystemTime,
    message: &str,
    edits: &Edits,
) {
    let secs = when
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    out.extend_from_slice(
        format!("commit {branch}\nmark :{mark}\ncommitter {COMMITTER} {secs} +0000\n").as_bytes(),
    );
    data(out, message.as_bytes());
    if let Some(parent) = parents.from {
        out.extend_from_slice(format!("from {parent}\n").as_bytes());
    }
    if let Some(merged) = parents.merge {
        out.extend_from_slice(format!("merge {merged}\n").as_bytes());
    }
    for path in &edits.removed {
        out.extend_from_slice(format!("D {}\n", quote_path(path)).as_bytes());
    }
    for (path, value) in &edits.written {
        out.extend_from_slice(format!("M 100644 inline {}\n", quote_path(path)).as_bytes());
        data(out, format!("{value}\n").as_bytes());
    }
    out.push(b'\n');
}

/// A running `git fast-import` on one branch.
#[derive(Debug)]
pub(crate) struct FastImport {
    child: Child,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
    /// What it said on stderr, for error messages (the last lines).
    stderr: Arc<Mutex<String>>,
    branch: String,
    /// The head the next commit goes on, until the first commit of this process.
    from: Option<String>,
    /// Commits not yet sent.
    stream: Vec<u8>,
    next_mark: u64,
    checkpoints: u64,
}

impl FastImport {
    /// Starts fast-import in the repository at `dir`, committing to `branch` on top of `head`
    /// (`None` for a branch without commits).
    pub(crate) fn spawn(
        dir: &Path,
        branch: &str,
        head: Option<&str>,
    ) -> Result<FastImport, String> {
        let mut child = git(dir)
            // A pack per checkpoint, never exploded into loose objects: measured, exploding
            // (git's default under 100 objects) took the lag at 200 changes a second from
            // about 25 ms to about 200 ms. The writer rolls the packs up (`repo::repack`).
            .args(["-c", "fastimport.unpackLimit=0", "fast-import", "--quiet"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| format!("git fast-import: {e}"))?;
        let stdin = child.stdin.take().expect("stdin was piped");
        let stdout = BufReader::new(child.stdout.take().expect("stdout was piped"));
        let mut err = child.stderr.take().expect("stderr was piped");
        let stderr = Arc::new(Mutex::new(String::new()));
        let said = stderr.clone();
        // Drained apart, so a chatty git never blocks on a full pipe.
        thread::Builder::new()
            .name("fast-import-stderr".into())
            .spawn(move || {
                let mut buf = [0u8; 4096];
                while let Ok(n) = err.read(&mut buf) {
                    if n == 0 {
                        break;
                    }
                    let mut s = said.lock().unwrap_or_else(|p| p.into_inner());
                    s.push_str(&String::from_utf8_lossy(&buf[..n]));
                    // The last lines are what explain a failure.
                    if s.len() > 4096 {
                        let cut = s.len() - 2048;
                        let cut = (cut..s.len()).find(|i| s.is_char_boundary(*i)).unwrap_or(0);
                        s.drain(..cut);
                    }
                }
            })
            .map_err(|e| format!("cannot read git fast-import's errors: {e}"))?;
        Ok(FastImport {
            child,
            stdin,
            stdout,
            stderr,
            branch: branch.to_string(),
            from: head.map(str::to_string),
            stream: Vec::new(),
            next_mark: 1,
            checkpoints: 0,
        })
    }

    /// Commits made by this process, sent or not.
    pub(crate) fn commits(&self) -> u64 {
        self.next_mark - 1
    }

    /// Adds a commit to the stream (sent at the next checkpoint), merging `merge` if given.
    pub(crate) fn commit(
        &mut self,
        when: SystemTime,
        message: &str,
        edits: &Edits,
        merge: Option<&str>,
    ) {
        let from = self.from.take();
        render_commit(
            &mut self.stream,
            &self.branch,
            self.next_mark,
            Parents {
                from: from.as_deref(),
                merge,
            },
            when,
            message,
            edits,
        );
        self.next_mark += 1;
    }

    fn said(&self) -> String {
        let s = self.stderr.lock().unwrap_or_else(|p| p.into_inner());
        let lines: Vec<&str> = s.lines().filter(|l| !l.trim().is_empty()).collect();
        let tail = &lines[lines.len().saturating_sub(3)..];
        if tail.is_empty() {
            "nothing on stderr".to_string()
        } else {
            tail.join(" / ")
        }
    }

    /// Sends the commits, has git write them and move the branch, and checks that it did.
    /// Returns the new head.
    pub(crate) fn checkpoint(&mut self, dir: &Path) -> Result<String, String> {
        if self.next_mark == 1 {
            return Err("nothing was committed".into());
        }
        self.checkpoints += 1;
        let last = self.next_mark - 1;
        let tag = self.checkpoints;
        self.stream.extend_from_slice(
            format!("checkpoint\nget-mark :{last}\nprogress checkpoint {tag}\n").as_bytes(),
        );
        let stream = std::mem::take(&mut self.stream);
        let died = |me: &Self, what: String| format!("git fast-import: {what} ({})", me.said());
        self.stdin
            .write_all(&stream)
            .and_then(|()| self.stdin.flush())
            .map_err(|e| died(self, format!("cannot send the commits: {e}")))?;
        let mut sha = String::new();
        let mut progress = String::new();
        for line in [&mut sha, &mut progress] {
            match self.stdout.read_line(line) {
                Ok(0) => return Err(died(self, "exited".into())),
                Ok(_) => {}
                Err(e) => return Err(died(self, format!("cannot read its answer: {e}"))),
            }
        }
        let sha = sha.trim().to_string();
        if progress.trim() != format!("progress checkpoint {tag}") {
            return Err(died(
                self,
                format!("unexpected answer {sha:?} {progress:?}"),
            ));
        }
        // fast-import reports a ref it could not update on stderr and carries on: ask git.
        let head = run_git(dir, &["rev-parse", "--verify", "-q", &self.branch])
            .map(|s| s.trim().to_string())
            .unwrap_or_default();
        if head != sha {
            return Err(died(
                self,
                format!("{} was not moved to the new commits", self.branch),
            ));
        }
        Ok(sha)
    }

    /// Ends the process: what it was sent and checkpointed stays.
    pub(crate) fn close(mut self) {
        // Closing its input is the end of the stream; it exits after writing its pack.
        drop(self.stdin);
        let _ = self.child.wait();
    }

    /// Ends the process at once, after a failure.
    pub(crate) fn kill(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn a_commit_is_rendered_as_fast_import_reads_it() {
        let mut out = Vec::new();
        let edits = Edits {
            written: vec![("jitsu/vm/www/state".into(), "running".into())],
            removed: vec!["jitsu/vm/old/state".into()],
        };
        let when = UNIX_EPOCH + Duration::from_millis(1_700_000_000_900);
        render_commit(
            &mut out,
            "refs/heads/master",
            3,
            Parents {
                from: Some("0123abcd"),
                merge: Some("4567ef01"),
            },
            when,
            "www: booting -> running (booted)",
            &edits,
        );
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "commit refs/heads/master\nmark :3\n\
             committer jitsu-dns <jitsu-dns@localhost> 1700000000 +0000\n\
             data 32\nwww: booting -> running (booted)\n\
             from 0123abcd\n\
             merge 4567ef01\n\
             D jitsu/vm/old/state\n\
             M 100644 inline jitsu/vm/www/state\ndata 8\nrunning\n\n\n"
        );
    }

    #[test]
    fn paths_that_could_be_misread_are_quoted() {
        assert_eq!(quote_path("jitsu/vm/a b/state"), "jitsu/vm/a b/state");
        assert_eq!(quote_path("\"x"), "\"\\\"x\"");
        assert_eq!(quote_path("a\nb\\c"), "\"a\\nb\\\\c\"");
    }
}
