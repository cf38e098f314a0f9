//! The record of the forwarding entries synjitsu made, in a file that outlives it (also a
//! `kill -9`), so that its next start removes them wherever they point by then.
//!
//! Owns the file's format and its upkeep: one line per change, `+<mac>` before an entry is
//! made and `-<mac>` once it is known to be gone, appended (one write per batch, no fsync: a
//! killed process loses nothing the kernel has, and a host that loses its page cache lost
//! its bridge too); rewritten whole when the changes outnumber the MACs they leave. A line
//! that does not read is skipped with a warning, never trusted. Which MACs to add and remove
//! is the worker's ([`super`]).

use std::collections::HashSet;
use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use shared_proto::Mac;

/// Lines kept beyond twice the MACs recorded before the file is rewritten.
const SLACK_LINES: usize = 1024;

/// The record could not be read or written.
#[derive(Debug, thiserror::Error)]
#[error("forwarding-entry record {path}: {source}")]
pub struct RecordError {
    /// The file.
    pub path: PathBuf,
    /// Why.
    #[source]
    pub source: io::Error,
}

/// The MACs recorded in `text`, and how many lines did not read.
pub fn parse(text: &str) -> (HashSet<Mac>, usize) {
    let mut macs = HashSet::new();
    let mut bad = 0;
    for line in text.lines().filter(|l| !l.trim().is_empty()) {
        let (op, mac) = line.split_at(line.len().min(1));
        match (op, mac.trim().parse::<Mac>()) {
            ("+", Ok(m)) => {
                macs.insert(m);
            }
            ("-", Ok(m)) => {
                macs.remove(&m);
            }
            _ => bad += 1,
        }
    }
    (macs, bad)
}

/// The record: the MACs it holds, and the file they are appended to.
#[derive(Debug)]
pub struct Record {
    path: PathBuf,
    file: File,
    macs: HashSet<Mac>,
    lines: usize,
}

impl Record {
    /// Opens the record at `path` (creating it), reading what an earlier run left there.
    pub fn open(path: &Path) -> Result<Record, RecordError> {
        let err = |source| RecordError {
            path: path.to_path_buf(),
            source,
        };
        let text = match std::fs::read(path) {
            Ok(b) => String::from_utf8_lossy(&b).into_owned(),
            Err(e) if e.kind() == io::ErrorKind::NotFound => String::new(),
            Err(e) => return Err(err(e)),
        };
        let (macs, bad) = parse(&text);
        if bad > 0 {
            tracing::warn!(path = %path.display(), lines = bad, "forwarding-entry record: lines that do not read were skipped");
        }
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .map_err(err)?;
        Ok(Record {
            path: path.to_path_buf(),
            file,
            lines: text.lines().count(),
            macs,
        })
    }

    /// The MACs recorded.
    pub fn macs(&self) -> &HashSet<Mac> {
        &self.macs
    }

    /// Records `macs` (those not recorded yet), before their entries are made.
    pub fn add(&mut self, macs: impl IntoIterator<Item = Mac>) -> Result<(), RecordError> {
        let new: Vec<Mac> = macs.into_iter().filter(|m| self.macs.insert(*m)).collect();
        self.append('+', &new)
    }

    /// Forgets `macs` (those recorded), once their entries are gone.
    pub fn remove(&mut self, macs: impl IntoIterator<Item = Mac>) -> Result<(), RecordError> {
        let gone: Vec<Mac> = macs.into_iter().filter(|m| self.macs.remove(m)).collect();
        self.append('-', &gone)?;
        if self.lines > 2 * self.macs.len() + SLACK_LINES {
            self.rewrite()?;
        }
        Ok(())
    }

    fn append(&mut self, op: char, macs: &[Mac]) -> Result<(), RecordError> {
        if macs.is_empty() {
            return Ok(());
        }
        let mut text = String::with_capacity(macs.len() * 19);
        for m in macs {
            text.push(op);
            text.push_str(&m.to_string());
            text.push('\n');
        }
        self.file
            .write_all(text.as_bytes())
            .map_err(|source| RecordError {
                path: self.path.clone(),
                source,
            })?;
        self.lines += macs.len();
        Ok(())
    }

    /// Replaces the file with one line per recorded MAC (written aside, then renamed over it,
    /// so a crash leaves the old file or the new one).
    fn rewrite(&mut self) -> Result<(), RecordError> {
        let err = |source| RecordError {
            path: self.path.clone(),
            source,
        };
        let mut tmp = self.path.clone().into_os_string();
        tmp.push(".new");
        let tmp = PathBuf::from(tmp);
        let mut text = String::with_capacity(self.macs.len() * 19);
        for m in &self.macs {
            text.push('+');
            text.push_str(&m.to_string());
            text.push('\n');
        }
        std::fs::write(&tmp, text).map_err(err)?;
        std::fs::rename(&tmp, &self.path).map_err(err)?;
        self.file = OpenOptions::new()
            .append(true)
            .open(&self.path)
            .map_err(err)?;
        self.lines = self.macs.len();
        Ok(())
    }

    /// Removes the file if it records nothing (a clean exit).
    pub fn close(self) -> Result<(), RecordError> {
        if self.macs.is_empty() {
            std::fs::remove_file(&self.path).map_err(|source| RecordError {
                path: self.path.clone(),
                source,
            })?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mac(n: u8) -> Mac {
        Mac([0x02, 0x77, 0, 0, 0, n])
    }

    #[test]
    fn the_record_is_the_sum_of_its_lines_and_bad_lines_are_skipped() {
        let text = "+02:77:00:00:00:01\n+02:77:00:00:00:02\n-02:77:00:00:00:01\n\
                    +nonsense\n*02:77:00:00:00:03\n\n+02:77:00:00:00:04";
        let (macs, bad) = parse(text);
        assert_eq!(macs, [mac(2), mac(4)].into_iter().collect());
        assert_eq!(bad, 2);
        assert_eq!(parse("").0.len(), 0);
        assert_eq!(parse("+").1, 1);
    }

    #[test]
    fn what_is_recorded_survives_a_reopen_and_a_rewrite_and_an_empty_record_is_removed() {
        let dir = std::env::temp_dir().join(format!("syj-record-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("r.fdb");
        let _ = std::fs::remove_file(&path);
        let mut r = Record::open(&path).unwrap();
        r.add([mac(1), mac(2), mac(1)]).unwrap();
        // A process killed here leaves both.
        drop(r);
        let mut r = Record::open(&path).unwrap();
        assert_eq!(r.macs(), &[mac(1), mac(2)].into_iter().collect());
        // Enough churn to rewrite the file: it then holds one line per MAC.
        for _ in 0..SLACK_LINES {
            r.add([mac(3)]).unwrap();
            r.remove([mac(3)]).unwrap();
        }
        r.remove([mac(1)]).unwrap();
        let lines = std::fs::read_to_string(&path).unwrap().lines().count();
        assert!(lines < SLACK_LINES, "{lines} lines");
        drop(r);
        let r = Record::open(&path).unwrap();
        assert_eq!(r.macs(), &[mac(2)].into_iter().collect());
        r.close().unwrap();
        assert!(path.exists(), "a record that holds a MAC is kept");
        let mut r = Record::open(&path).unwrap();
        r.remove([mac(2)]).unwrap();
        r.close().unwrap();
        assert!(!path.exists());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
