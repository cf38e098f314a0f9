//! Git-native changes: a configuration change committed by a person (or a program) to a
//! branch of the store and pushed there, as the seed planned ("clients create their own
//! branch of the database, perform changes and then merge with Jitsu's master branch").
//!
//! Owns the decisions, as pure functions over trees: which branches carry changes and in
//! which order they are taken ([`pending`]), what a change does to the configuration
//! running now ([`rebase`], a three-way merge of the VMs' `config/` files against the
//! change's base), and the messages that record it. It reads no repository and applies
//! nothing: the daemon reads the trees, validates the result as a reload would, and merges
//! the change or records its refusal (`repo` does the git calls).
//!
//! A change is read from the `jitsu/vm/<name>/config/<key>` files only (one value per line
//! for a repeated key): a VM directory that appears is a VM added, one whose `config/`
//! disappears is a VM removed, a file that changes is a key changed. The other files are
//! jitsu-dns's record of what runs; edits to them are ignored. The change is what its commit
//! did since its merge base with jitsu-dns's branch, so a change made on an older clone
//! does not undo what happened since; a key changed both by the change and, since its base,
//! by someone else (to another value) is a conflict, and the change is refused.

use std::collections::{BTreeMap, BTreeSet};

use super::Tree;

/// The branch a change is pushed to: `refs/heads/incoming`, or any branch under
/// `refs/heads/incoming/` (one per person or program, so that two never race for one ref).
pub const INCOMING: &str = "refs/heads/incoming";

/// The branch where refused changes are recorded, one commit each, saying why.
pub const REFUSED: &str = "refs/heads/refused";

/// True for the branches changes are taken from.
pub fn is_incoming(refname: &str) -> bool {
    refname == INCOMING
        || refname
            .strip_prefix(INCOMING)
            .is_some_and(|rest| rest.starts_with('/') && rest.len() > 1)
}

/// A branch with a change waiting, as listed by git.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Waiting {
    /// `refs/heads/incoming/alice`.
    pub refname: String,
    /// Its commit.
    pub sha: String,
    /// The commit's committer time (Unix seconds).
    pub time: i64,
}

/// The changes to take, in order: the oldest commit first (ties by branch name), so of two
/// changes pushed at once the later one is checked against the first.
pub fn pending(mut refs: Vec<Waiting>) -> Vec<Waiting> {
    refs.retain(|w| is_incoming(&w.refname));
    refs.sort_by(|a, b| a.time.cmp(&b.time).then_with(|| a.refname.cmp(&b.refname)));
    refs
}

/// A VM's configuration as the store keeps it: key -> the file's value (a repeated key's
/// values one per line).
pub type VmKeys = BTreeMap<String, String>;

/// Every VM's configuration in a tree, by name.
pub fn configs(tree: &Tree) -> BTreeMap<String, VmKeys> {
    let mut out: BTreeMap<String, VmKeys> = BTreeMap::new();
    for (path, value) in tree {
        let Some(rest) = path.strip_prefix("jitsu/vm/") else {
            continue;
        };
        let Some((vm, key)) = rest.split_once("/config/") else {
            continue;
        };
        if vm.contains('/') || key.contains('/') || key.is_empty() {
            continue;
        }
        out.entry(vm.to_string())
            .or_default()
            .insert(key.to_string(), value.clone());
    }
    out
}

/// The `(key, value)` pairs of a VM's keys, a repeated key once per line, as the specs give
/// them; the name first, so errors find it.
pub fn key_pairs(keys: &VmKeys) -> Vec<(String, String)> {
    let name = keys.get_key_value("name").into_iter();
    let rest = keys.iter().filter(|(k, _)| k.as_str() != "name");
    name.chain(rest)
        .flat_map(|(k, v)| {
            v.lines()
                .map(str::trim_end)
                .filter(|l| !l.is_empty())
                .map(move |l| (k.clone(), l.to_string()))
        })
        .collect()
}

/// What a change does to one VM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Edit {
    /// The VM is added, or its keys are now these.
    Set(VmKeys),
    /// The VM is removed.
    Remove,
}

/// Why a change cannot be applied over the running configuration.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ChangeError {
    /// The change shares no history with jitsu-dns's branch.
    #[error(
        "it is not based on this store's history: clone the store, commit on top of its \
         branch, and push that"
    )]
    Unrelated,
    /// A key the change changes was changed to something else since the change's base.
    #[error(
        "conflict: {vm}'s {key} was changed to {current} since the change's base, where it was \
         {base}; the change sets it to {wanted}: fetch, rebase the change and push it again"
    )]
    Conflict {
        /// The VM.
        vm: String,
        /// The key (`-` for the whole VM).
        key: String,
        /// At the base.
        base: String,
        /// Now.
        current: String,
        /// In the change.
        wanted: String,
    },
    /// A VM's `config/name` is missing or not its directory's name.
    #[error("jitsu/vm/{vm}/config/name {found}: a VM's directory is its name")]
    Name {
        /// The directory.
        vm: String,
        /// What was found there.
        found: String,
    },
    /// The change changes no VM's configuration.
    #[error("it changes no jitsu/vm/<name>/config/ file (the other files are jitsu-dns's record)")]
    Empty,
}

fn shown(v: Option<&String>) -> String {
    match v {
        Some(v) => format!("{v:?}"),
        None => "absent".to_string(),
    }
}

fn shown_vm(v: Option<&VmKeys>) -> String {
    match v {
        Some(_) => "present".into(),
        None => "absent".into(),
    }
}

/// What the change from `base` to `tip` does over `current` (each a tree's [`configs`]):
/// per VM the change touches, its edit, or why it cannot be applied. VMs the change does not
/// touch keep what they have now; a VM already as the change wants it needs no edit. Keys of
/// one VM merge key by key, so two changes to different keys of a VM both apply.
pub fn rebase(
    base: &BTreeMap<String, VmKeys>,
    tip: &BTreeMap<String, VmKeys>,
    current: &BTreeMap<String, VmKeys>,
) -> Result<BTreeMap<String, Edit>, ChangeError> {
    let names: BTreeSet<&String> = base.keys().chain(tip.keys()).collect();
    let mut edits = BTreeMap::new();
    let mut touched = false;
    for vm in names {
        let (b, t, c) = (base.get(vm), tip.get(vm), current.get(vm));
        if b == t {
            continue;
        }
        touched = true;
        let conflict =
            |key: &str, base: String, current: String, wanted: String| ChangeError::Conflict {
                vm: vm.clone(),
                key: key.to_string(),
                base,
                current,
                wanted,
            };
        match (b, t) {
            (_, None) if c.is_none() => {}
            (_, None) if c == b => {
                edits.insert(vm.clone(), Edit::Remove);
            }
            (_, None) => {
                return Err(conflict(
                    "-",
                    shown_vm(b),
                    "changed".into(),
                    "removed".into(),
                ));
            }
            (None, Some(t)) => {
                check_name(vm, t)?;
                match c {
                    None => {
                        edits.insert(vm.clone(), Edit::Set(t.clone()));
                    }
                    Some(c) if c == t => {}
                    Some(_) => {
                        return Err(conflict(
                            "-",
                            "absent".into(),
                            "added with other keys".into(),
                            "added".into(),
                        ));
                    }
                }
            }
            (Some(b), Some(t)) => {
                let Some(c) = c else {
                    return Err(conflict(
                        "-",
                        "present".into(),
                        "removed".into(),
                        "changed".into(),
                    ));
                };
                let mut merged = c.clone();
                let keys: BTreeSet<&String> = b.keys().chain(t.keys()).collect();
                for key in keys {
                    let (bv, tv, cv) = (b.get(key), t.get(key), c.get(key));
                    if bv == tv || cv == tv {
                        continue;
                    }
                    if cv != bv {
                        return Err(conflict(key, shown(bv), shown(cv), shown(tv)));
                    }
                    match tv {
                        Some(v) => merged.insert(key.clone(), v.clone()),
                        None => merged.remove(key),
                    };
                }
                check_name(vm, &merged)?;
                if &merged != c {
                    edits.insert(vm.clone(), Edit::Set(merged));
                }
            }
        }
    }
    if !touched {
        return Err(ChangeError::Empty);
    }
    Ok(edits)
}

fn check_name(vm: &str, keys: &VmKeys) -> Result<(), ChangeError> {
    match keys.get("name").map(|n| n.trim()) {
        Some(n) if n == vm => Ok(()),
        found => Err(ChangeError::Name {
            vm: vm.to_string(),
            found: found.map_or("is missing".into(), |n| format!("says {n:?}")),
        }),
    }
}

/// How a change is named in the history and the log: `1a2b3c4 from incoming/alice ("add
/// db")`.
pub fn describe(refname: &str, sha: &str, subject: &str) -> String {
    let branch = refname.strip_prefix("refs/heads/").unwrap_or(refname);
    let short = &sha[..sha.len().min(7)];
    let subject = subject.trim();
    if subject.is_empty() {
        format!("{short} from {branch}")
    } else {
        format!("{short} from {branch} ({subject:?})")
    }
}

/// The message of the commit on the refused branch.
pub fn refused_message(described: &str, why: &str) -> String {
    format!(
        "refused {described}: {why}\n\nThe running configuration and the fleet were left as they were."
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vm(pairs: &[(&str, &str)]) -> VmKeys {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn www() -> VmKeys {
        vm(&[
            ("name", "www"),
            ("dns", "www.example.org"),
            ("ip", "10.0.0.1"),
            ("command", "x"),
        ])
    }

    fn fleet(vms: &[(&str, VmKeys)]) -> BTreeMap<String, VmKeys> {
        vms.iter()
            .map(|(n, k)| (n.to_string(), k.clone()))
            .collect()
    }

    fn with(mut keys: VmKeys, key: &str, value: &str) -> VmKeys {
        keys.insert(key.into(), value.into());
        keys
    }

    #[test]
    fn only_incoming_branches_carry_changes_and_the_oldest_goes_first() {
        let w = |r: &str, t: i64| Waiting {
            refname: r.into(),
            sha: format!("{t}"),
            time: t,
        };
        let order = pending(vec![
            w("refs/heads/incoming/bob", 20),
            w("refs/heads/master", 1),
            w("refs/heads/incoming/alice", 20),
            w("refs/heads/incoming", 10),
            w("refs/heads/incomingx", 5),
            w("refs/heads/incoming/", 5),
        ]);
        let names: Vec<&str> = order.iter().map(|w| w.refname.as_str()).collect();
        assert_eq!(
            names,
            vec![
                "refs/heads/incoming",
                "refs/heads/incoming/alice",
                "refs/heads/incoming/bob"
            ]
        );
    }

    #[test]
    fn a_tree_gives_each_vms_config_files_and_nothing_else() {
        let tree: Tree = [
            ("jitsu/vm/www/config/name", "www"),
            ("jitsu/vm/www/config/dns", "www.example.org\nw.example.org"),
            ("jitsu/vm/www/state", "running"),
            ("jitsu/vm/www/dns/www.example.org", "60"),
            ("README", "x"),
        ]
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        let c = configs(&tree);
        assert_eq!(c.len(), 1);
        assert_eq!(c["www"].len(), 2);
        let pairs = key_pairs(&c["www"]);
        assert_eq!(
            pairs,
            vec![
                ("name".to_string(), "www".to_string()),
                ("dns".to_string(), "www.example.org".to_string()),
                ("dns".to_string(), "w.example.org".to_string()),
            ]
        );
    }

    #[test]
    fn a_change_adds_changes_and_removes_vms_relative_to_its_base() {
        let db = vm(&[
            ("name", "db"),
            ("dns", "db.example.org"),
            ("ip", "10.0.0.2"),
            ("command", "y"),
        ]);
        let base = fleet(&[("www", www()), ("old", with(www(), "name", "old"))]);
        let tip = fleet(&[
            ("www", with(www(), "response_delay", "0.5")),
            ("db", db.clone()),
        ]);
        let edits = rebase(&base, &tip, &base).unwrap();
        assert_eq!(edits.len(), 3);
        assert_eq!(edits["db"], Edit::Set(db));
        assert_eq!(edits["old"], Edit::Remove);
        assert_eq!(
            edits["www"],
            Edit::Set(with(www(), "response_delay", "0.5"))
        );
    }

    #[test]
    fn a_change_from_an_older_base_does_not_undo_what_happened_since() {
        let base = fleet(&[("www", www())]);
        // Since the change's base: db was added and www's delay changed.
        let db = with(with(www(), "name", "db"), "ip", "10.0.0.2");
        let current = fleet(&[("www", with(www(), "response_delay", "1")), ("db", db)]);
        // The change: www's stop mode.
        let tip = fleet(&[("www", with(www(), "stop_mode", "suspend"))]);
        let edits = rebase(&base, &tip, &current).unwrap();
        assert_eq!(edits.len(), 1, "db stays: {edits:?}");
        assert_eq!(
            edits["www"],
            Edit::Set(with(
                with(www(), "response_delay", "1"),
                "stop_mode",
                "suspend"
            )),
            "both keys"
        );
    }

    #[test]
    fn a_key_changed_since_the_base_to_another_value_is_a_conflict() {
        let base = fleet(&[("www", www())]);
        let current = fleet(&[("www", with(www(), "ip", "10.0.0.7"))]);
        let tip = fleet(&[("www", with(www(), "ip", "10.0.0.9"))]);
        let e = rebase(&base, &tip, &current).unwrap_err();
        assert_eq!(
            e,
            ChangeError::Conflict {
                vm: "www".into(),
                key: "ip".into(),
                base: "\"10.0.0.1\"".into(),
                current: "\"10.0.0.7\"".into(),
                wanted: "\"10.0.0.9\"".into(),
            }
        );
        assert!(
            e.to_string()
                .contains("www's ip was changed to \"10.0.0.7\"")
        );
        // The same value on both sides is no conflict, and nothing to do.
        let same = fleet(&[("www", with(www(), "ip", "10.0.0.9"))]);
        assert_eq!(rebase(&base, &tip, &same).unwrap(), BTreeMap::new());
        // A VM removed since, or added meanwhile with other keys, is a conflict too.
        let gone = fleet(&[]);
        assert!(matches!(
            rebase(&base, &tip, &gone),
            Err(ChangeError::Conflict { .. })
        ));
        let added = fleet(&[("www", www())]);
        let other = fleet(&[("www", with(www(), "ip", "10.0.0.3"))]);
        assert!(matches!(
            rebase(&fleet(&[]), &added, &other),
            Err(ChangeError::Conflict { .. })
        ));
    }

    #[test]
    fn a_vm_must_be_named_as_its_directory_and_a_change_must_change_something() {
        let base = fleet(&[]);
        let tip = fleet(&[("db", www())]);
        assert_eq!(
            rebase(&base, &tip, &base).unwrap_err(),
            ChangeError::Name {
                vm: "db".into(),
                found: "says \"www\"".into()
            }
        );
        let current = fleet(&[("www", www())]);
        assert_eq!(
            rebase(&current, &current, &current).unwrap_err(),
            ChangeError::Empty
        );
    }

    #[test]
    fn changes_are_named_by_commit_branch_and_subject() {
        let sha = "1a2b3c4d5e6f";
        assert_eq!(
            describe("refs/heads/incoming", sha, "add db\n"),
            "1a2b3c4 from incoming (\"add db\")"
        );
        assert_eq!(
            describe("refs/heads/incoming/alice", sha, ""),
            "1a2b3c4 from incoming/alice"
        );
        assert!(refused_message("x", "why").starts_with("refused x: why\n"));
    }
}
