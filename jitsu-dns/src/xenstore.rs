//! Waiting for a VM's readiness key (`wait_for_key`) in Xenstore, with the `xenstore-rs`
//! crate (`XsTokio` honours `XENSTORED_PATH`, then `/run/xenstored/socket`, then the xenbus
//! device).
//!
//! Owns one watch task per booting VM: it sets a Xenstore watch on the key, reads the key on
//! every watch event (xenstored fires each new watch once, so a key written before the watch
//! is seen too), and reports [`Event::KeyAppeared`] once it exists. It does not time out:
//! the fleet answers at `wait_for_timeout` anyway, and a Xenstore that cannot be reached only
//! logs a warning.

use std::collections::HashMap;

use futures_util::StreamExt;
use tokio::sync::mpsc;
use tokio::task::AbortHandle;
use xenstore_rs::tokio::XsTokio;
use xenstore_rs::{AsyncWatch, AsyncXs};

use crate::fleet::{Event, VmName};

/// The watch tasks, one per VM at most.
#[derive(Debug)]
pub struct KeyWatcher {
    events: mpsc::Sender<Event>,
    tasks: HashMap<VmName, AbortHandle>,
}

/// Why a key could not be watched.
#[derive(Debug, thiserror::Error)]
enum WatchError {
    #[error(
        "cannot reach xenstored (XENSTORED_PATH, /run/xenstored/socket or the xenbus device): {0}"
    )]
    Connect(std::io::Error),
    #[error("cannot watch {path}: {source}")]
    Watch {
        path: String,
        source: std::io::Error,
    },
}

impl KeyWatcher {
    /// Reports to `events`.
    pub fn new(events: mpsc::Sender<Event>) -> KeyWatcher {
        KeyWatcher {
            events,
            tasks: HashMap::new(),
        }
    }

    /// Watches `path` for `vm`, replacing an earlier watch of the VM's.
    pub fn watch(&mut self, vm: VmName, path: String) {
        self.unwatch(&vm);
        let events = self.events.clone();
        let name = vm.clone();
        let task = tokio::spawn(async move {
            match wait_for(&path).await {
                Ok(true) => {
                    tracing::debug!(vm = %name, %path, "readiness key appeared");
                    let _ = events.send(Event::KeyAppeared { vm: name }).await;
                }
                Ok(false) => {
                    tracing::warn!(vm = %name, %path, "lost xenstored while waiting for the readiness key: answering at the timeout");
                }
                Err(e) => {
                    tracing::warn!(vm = %name, error = %e, "readiness key cannot be watched: answering at the timeout");
                }
            }
        });
        self.tasks.insert(vm, task.abort_handle());
    }

    /// Stops watching for `vm`.
    pub fn unwatch(&mut self, vm: &VmName) {
        if let Some(t) = self.tasks.remove(vm) {
            t.abort();
        }
    }
}

impl Drop for KeyWatcher {
    fn drop(&mut self) {
        for (_, t) in self.tasks.drain() {
            t.abort();
        }
    }
}

/// Waits until `path` exists: `Ok(true)` when it does, `Ok(false)` if xenstored went away.
async fn wait_for(path: &str) -> Result<bool, WatchError> {
    let xs = XsTokio::new().await.map_err(WatchError::Connect)?;
    let mut watch = xs.watch(path).await.map_err(|source| WatchError::Watch {
        path: path.to_string(),
        source,
    })?;
    loop {
        if xs.read(path).await.is_ok() {
            return Ok(true);
        }
        if watch.next().await.is_none() {
            return Ok(false);
        }
    }
}
