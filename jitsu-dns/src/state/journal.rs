//! The tree the store is building, and what each commit and each batch of commits changes in
//! it: pure, no git.
//!
//! Owns the current tree (every change applied, in order) and two journals over it: the value
//! each touched path had at the last commit (so a commit carries only what really changed,
//! and a change that changes nothing makes no commit) and at the last checkpoint, when git
//! last confirmed what HEAD holds (so a batch git refused can be undone). It does not know
//! about processes, files or messages: the writer feeds it and carries out its [`Edits`].

use std::collections::BTreeMap;
use std::ops::Bound;

use super::Tree;

/// What one commit changes: files written (path, content without the final newline) and
/// files removed; git's trees follow from them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Edits {
    /// Files written.
    pub(crate) written: Vec<(String, String)>,
    /// Files removed.
    pub(crate) removed: Vec<String>,
}

impl Edits {
    /// Nothing changes.
    pub(crate) fn is_empty(&self) -> bool {
        self.written.is_empty() && self.removed.is_empty()
    }
}

/// The current tree, and the values its touched paths had at the last commit and checkpoint.
#[derive(Debug, Default)]
pub(crate) struct Journal {
    tree: Tree,
    /// Paths touched since the last commit, with their value then (`None`: absent).
    since_commit: BTreeMap<String, Option<String>>,
    /// Paths touched since the last checkpoint (HEAD as git confirmed it), with their value
    /// then.
    since_checkpoint: BTreeMap<String, Option<String>>,
}

impl Journal {
    /// A journal whose tree, last commit and HEAD are `head`.
    pub(crate) fn new(head: Tree) -> Journal {
        Journal {
            tree: head,
            ..Journal::default()
        }
    }

    fn set(&mut self, path: &str, value: Option<String>) {
        let old = match &value {
            Some(v) => self.tree.insert(path.to_string(), v.clone()),
            None => self.tree.remove(path),
        };
        if old == value {
            return;
        }
        self.since_commit
            .entry(path.to_string())
            .or_insert_with(|| old.clone());
        self.since_checkpoint.entry(path.to_string()).or_insert(old);
    }

    /// The tree, every change applied.
    pub(crate) fn tree(&self) -> &Tree {
        &self.tree
    }

    /// Removes every path under each of `remove` (prefixes such as `jitsu/vm/www/`), then
    /// writes `files`.
    pub(crate) fn apply(&mut self, remove: &[String], files: Vec<(String, String)>) {
        for prefix in remove {
            let gone: Vec<String> = self
                .tree
                .range::<str, _>((Bound::Included(prefix.as_str()), Bound::Unbounded))
                .take_while(|(k, _)| k.starts_with(prefix.as_str()))
                .map(|(k, _)| k.clone())
                .collect();
            for k in gone {
                self.set(&k, None);
            }
        }
        for (path, value) in files {
            self.set(&path, Some(value));
        }
    }

    /// Makes the tree `whole`: every path it lacks removed, every file it has written.
    pub(crate) fn replace(&mut self, whole: Tree) {
        let gone: Vec<String> = self
            .tree
            .keys()
            .filter(|k| !whole.contains_key(*k))
            .cloned()
            .collect();
        for k in gone {
            self.set(&k, None);
        }
        for (path, value) in whole {
            self.set(&path, Some(value));
        }
    }

    /// What changed since the last commit, which this one now is.
    pub(crate) fn take_commit(&mut self) -> Edits {
        let mut edits = Edits::default();
        for (path, before) in std::mem::take(&mut self.since_commit) {
            let now = self.tree.get(&path);
            if now == before.as_ref() {
                continue;
            }
            match now {
                Some(v) => edits.written.push((path, v.clone())),
                None => edits.removed.push(path),
            }
        }
        edits
    }

    /// git confirmed the commits so far: they are HEAD. Returns the paths whose committed
    /// value changed since the last checkpoint, each with that value (`None`: removed), for
    /// the work tree.
    pub(crate) fn checkpointed(&mut self) -> Vec<(String, Option<String>)> {
        let mut out = Vec::new();
        for (path, at_checkpoint) in std::mem::take(&mut self.since_checkpoint) {
            // A path touched since the last commit has that commit's value in HEAD.
            let committed = match self.since_commit.get(&path) {
                Some(at_commit) => at_commit.clone(),
                None => self.tree.get(&path).cloned(),
            };
            if self.since_commit.contains_key(&path) {
                // Still pending: it must be undone from HEAD's value if a later batch fails.
                self.since_checkpoint
                    .insert(path.clone(), committed.clone());
            }
            if committed != at_checkpoint {
                out.push((path, committed));
            }
        }
        out
    }

    /// git refused the commits since the last checkpoint: back to HEAD, as if nothing after
    /// it had been applied.
    pub(crate) fn rollback(&mut self) {
        for (path, value) in std::mem::take(&mut self.since_checkpoint) {
            match value {
                Some(v) => self.tree.insert(path, v),
                None => self.tree.remove(&path),
            };
        }
        self.since_commit.clear();
    }

    /// The tree as of the last commit.
    pub(crate) fn committed(&self) -> Tree {
        let mut t = self.tree.clone();
        for (path, value) in &self.since_commit {
            match value {
                Some(v) => t.insert(path.clone(), v.clone()),
                None => t.remove(path),
            };
        }
        t
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn files(f: &[(&str, &str)]) -> Vec<(String, String)> {
        f.iter()
            .map(|(a, b)| (a.to_string(), b.to_string()))
            .collect()
    }

    fn tree(f: &[(&str, &str)]) -> Tree {
        files(f).into_iter().collect()
    }

    #[test]
    fn a_commit_carries_only_what_changed_since_the_last_one() {
        let mut j = Journal::new(tree(&[("a/state", "off"), ("a/starts", "0")]));
        j.apply(&[], files(&[("a/state", "booting"), ("a/starts", "0")]));
        assert_eq!(
            j.take_commit(),
            Edits {
                written: files(&[("a/state", "booting")]),
                removed: vec![],
            }
        );
        // Changed and changed back: nothing to commit.
        j.apply(&[], files(&[("a/state", "running")]));
        j.apply(&[], files(&[("a/state", "booting")]));
        assert!(j.take_commit().is_empty());
    }

    #[test]
    fn removing_a_prefix_removes_its_files_only() {
        let mut j = Journal::new(tree(&[
            ("vm/a/config/x", "1"),
            ("vm/a/state", "off"),
            ("vm/ab/state", "off"),
        ]));
        j.apply(&["vm/a/".to_string()], vec![]);
        let e = j.take_commit();
        assert_eq!(e.removed, vec!["vm/a/config/x", "vm/a/state"]);
        assert_eq!(j.committed(), tree(&[("vm/ab/state", "off")]));
    }

    #[test]
    fn replacing_the_tree_removes_what_the_new_one_lacks() {
        let mut j = Journal::new(tree(&[("a", "1"), ("b", "2")]));
        j.replace(tree(&[("b", "3"), ("c", "4")]));
        assert_eq!(
            j.take_commit(),
            Edits {
                written: files(&[("b", "3"), ("c", "4")]),
                removed: vec!["a".to_string()],
            }
        );
    }

    #[test]
    fn uncommitted_writes_are_not_in_the_committed_tree_until_a_commit() {
        let mut j = Journal::new(tree(&[("a/requests", "0")]));
        j.apply(&[], files(&[("a/requests", "3")]));
        assert_eq!(j.committed(), tree(&[("a/requests", "0")]));
        assert!(
            j.checkpointed().is_empty(),
            "a checkpoint before the commit leaves HEAD as it was"
        );
        j.apply(&[], files(&[("a/state", "running")]));
        assert_eq!(
            j.take_commit().written.len(),
            2,
            "rides along with the next commit"
        );
        assert_eq!(
            j.checkpointed(),
            vec![
                ("a/requests".to_string(), Some("3".to_string())),
                ("a/state".to_string(), Some("running".to_string()))
            ]
        );
        assert_eq!(
            j.committed(),
            tree(&[("a/requests", "3"), ("a/state", "running")])
        );
    }

    #[test]
    fn a_refused_batch_is_undone_back_to_the_last_checkpoint() {
        let head = tree(&[("a/state", "off"), ("b/state", "off")]);
        let mut j = Journal::new(head.clone());
        j.apply(&[], files(&[("a/state", "booting")]));
        j.take_commit();
        assert_eq!(
            j.checkpointed(),
            vec![("a/state".to_string(), Some("booting".to_string()))]
        );
        let at_checkpoint = j.committed();
        // Then a batch git refuses: a commit, a removal, and a write not yet committed.
        j.apply(&[], files(&[("a/state", "running")]));
        j.take_commit();
        j.apply(&["b/".to_string()], vec![]);
        j.take_commit();
        j.apply(&[], files(&[("c/requests", "1")]));
        j.rollback();
        assert_eq!(j.committed(), at_checkpoint);
        assert!(j.take_commit().is_empty());
        // A pending write that a checkpoint left pending is undone too.
        j.apply(&[], files(&[("a/requests", "5")]));
        j.checkpointed();
        j.rollback();
        assert_eq!(j.committed(), at_checkpoint);
        assert_eq!(j.committed(), {
            let mut t = head;
            t.insert("a/state".into(), "booting".into());
            t
        });
    }
}
