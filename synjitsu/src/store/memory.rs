//! An in-memory [`SynStore`], beside the real one for unit tests of the store thread and of
//! what the shell does with its results. It keeps the layout's semantics (`managed` skips,
//! permissions per address) without any daemon; it is never used by the daemon itself.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};

use super::layout::{HeldSyn, MANAGED, SynKey, ip_path};
use super::{StoreError, SynStore, WriteOutcome};

/// The nodes, shared with the test that made the store.
pub type Nodes = Arc<Mutex<BTreeMap<String, String>>>;

/// A store whose nodes live in a map: path to value; `<path>@perms` holds permissions.
#[derive(Debug, Default, Clone)]
pub struct MemoryStore {
    /// The nodes.
    pub nodes: Nodes,
    /// When set, every operation fails with this errno (to test failure paths).
    pub fail_with: Option<String>,
}

impl MemoryStore {
    fn check(&self, op: &'static str, path: &str) -> Result<(), StoreError> {
        match &self.fail_with {
            Some(errno) => Err(StoreError::Refused {
                op,
                path: path.to_string(),
                errno: errno.clone(),
            }),
            None => Ok(()),
        }
    }

    fn remove_tree(&self, path: &str) {
        let prefix = format!("{path}/");
        self.nodes.lock().expect("test store lock").retain(|k, _| {
            k != path && !k.starts_with(&prefix) && !k.starts_with(&format!("{path}@"))
        });
    }
}

impl SynStore for MemoryStore {
    fn prepare(&mut self) -> Result<usize, StoreError> {
        self.check("prepare", "/ip")?;
        let mut nodes = self.nodes.lock().expect("test store lock");
        let children: std::collections::BTreeSet<String> = nodes
            .keys()
            .filter_map(|k| k.strip_prefix("/ip/"))
            .map(|rest| {
                rest.split(['/', '@'])
                    .next()
                    .unwrap_or_default()
                    .to_string()
            })
            .collect();
        nodes.retain(|k, _| !k.starts_with("/ip/"));
        nodes.insert("/ip".into(), String::new());
        nodes.insert("/ip@perms".into(), "n0".into());
        Ok(children.len())
    }

    fn open(&mut self, domid: u32, ip: IpAddr) -> Result<(), StoreError> {
        let path = ip_path(ip);
        self.check("open", &path)?;
        self.remove_tree(&path);
        let mut nodes = self.nodes.lock().expect("test store lock");
        nodes.insert(path.clone(), String::new());
        nodes.insert(format!("{path}@perms"), format!("n0,b{domid}"));
        Ok(())
    }

    fn seal(&mut self, ip: IpAddr) -> Result<(), StoreError> {
        let path = ip_path(ip);
        self.check("seal", &path)?;
        self.remove_tree(&path);
        let mut nodes = self.nodes.lock().expect("test store lock");
        nodes.insert(path.clone(), String::new());
        nodes.insert(format!("{path}@perms"), "n0".into());
        Ok(())
    }

    fn close(&mut self, ip: IpAddr) -> Result<(), StoreError> {
        self.check("close", &ip_path(ip))?;
        self.remove_tree(&ip_path(ip));
        Ok(())
    }

    fn write_syn(
        &mut self,
        domid: u32,
        key: &SynKey,
        syn: &HeldSyn,
    ) -> Result<WriteOutcome, StoreError> {
        let ip = ip_path(key.local_ip);
        self.check("write", &ip)?;
        let mut nodes = self.nodes.lock().expect("test store lock");
        if nodes.get(&ip).map(String::as_str) == Some(MANAGED) {
            return Ok(WriteOutcome::Managed);
        }
        nodes.entry(ip.clone()).or_default();
        nodes.insert(format!("{ip}@perms"), format!("n0,b{domid}"));
        for (leaf, value) in syn.to_leaves() {
            nodes.insert(key.leaf_path(leaf), value);
        }
        Ok(WriteOutcome::Written)
    }

    fn remove(&mut self, key: &SynKey) -> Result<(), StoreError> {
        self.check("remove", &key.conn_path())?;
        self.remove_tree(&key.conn_path());
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hold::{StoreOp, StoreOutcome};
    use crate::store::{StoreReport, StoreWorker};

    fn key(port: u16) -> SynKey {
        SynKey {
            local_ip: "10.77.1.10".parse().unwrap(),
            local_port: 80,
            dest_ip: "10.77.1.2".parse().unwrap(),
            dest_port: port,
        }
    }

    #[tokio::test(flavor = "current_thread")]
    async fn the_worker_reports_every_write_in_order() {
        let store = MemoryStore::default();
        let nodes = store.nodes.clone();
        let (tx, mut rx) = tokio::sync::mpsc::channel(16);
        let worker = StoreWorker::spawn(Box::new(store), 4, tx).unwrap();
        let syn = HeldSyn::new(1, 2, vec![], 3);
        for (id, port) in [(1u64, 1000u16), (2, 1001)] {
            worker
                .try_send(StoreOp::Write {
                    id,
                    vm: "www".into(),
                    domid: 5,
                    key: key(port),
                    syn: syn.clone(),
                })
                .unwrap();
        }
        for want in [1u64, 2] {
            match rx.recv().await.unwrap() {
                StoreReport::Done(d) => {
                    assert_eq!((d.id, d.outcome), (want, StoreOutcome::Written));
                }
                other => panic!("{other:?}"),
            }
        }
        nodes
            .lock()
            .unwrap()
            .insert("/ip/10-77-1-10".into(), MANAGED.into());
        worker
            .try_send(StoreOp::Write {
                id: 3,
                vm: "www".into(),
                domid: 5,
                key: key(1002),
                syn,
            })
            .unwrap();
        let StoreReport::Done(d) = rx.recv().await.unwrap() else {
            panic!()
        };
        assert_eq!(d.outcome, StoreOutcome::Managed);
        assert_eq!(
            nodes.lock().unwrap().get("/ip/10-77-1-10@perms").unwrap(),
            "n0,b5"
        );
    }

    #[tokio::test(flavor = "current_thread")]
    async fn failures_come_back_as_failed_writes() {
        let store = MemoryStore {
            fail_with: Some("EACCES".into()),
            ..MemoryStore::default()
        };
        let (tx, mut rx) = tokio::sync::mpsc::channel(16);
        let worker = StoreWorker::spawn(Box::new(store), 4, tx).unwrap();
        worker
            .try_send(StoreOp::Write {
                id: 9,
                vm: "www".into(),
                domid: 5,
                key: key(1),
                syn: HeldSyn::new(1, 2, vec![], 3),
            })
            .unwrap();
        let StoreReport::Done(d) = rx.recv().await.unwrap() else {
            panic!()
        };
        assert!(matches!(d.outcome, StoreOutcome::Failed(ref m) if m.contains("EACCES")));
    }
}
