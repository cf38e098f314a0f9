//! rumprun's configuration (the `rumprun_config` key): a rumprun unikernel reads its JSON
//! configuration from Xenstore at `/local/domain/<domid>/rumprun/cfg` when it boots, so the
//! file's whole content is written there, verbatim, after the domain is created and before
//! it runs, as Jitsu did (`src/rumprun.ml`, called between `Domain.create_new` and
//! `Domain.unpause` in `src/libxl_backend.ml`).
//!
//! Owns reading and checking the file (for the configuration at start-up, and again at each
//! boot: the file may change in between) and the one Xenstore write, through `xenstore-rs`'s
//! blocking client (`XENSTORED_PATH`, then `/run/xenstored/socket`, then the xenbus device),
//! bounded by [`WRITE_TIMEOUT`]. Starting the domain paused and unpausing it after the write
//! is the libvirt backend's.

use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::time::Duration;

use xenstore_rs::Xs;
use xenstore_rs::unix::XsUnix;

/// The longest path the value is written at: domain ids stay below 32752 (Xen's
/// `DOMID_FIRST_RESERVED`), five digits.
const LONGEST_PATH: &str = "/local/domain/65535/rumprun/cfg";
/// The largest file that fits one Xenstore write: a request's payload (path, NUL, value) is
/// at most 4096 bytes (`XENSTORE_PAYLOAD_MAX`), and xenstored drops a client that sends more.
pub const MAX_CFG_BYTES: usize = 4096 - LONGEST_PATH.len() - 1;
/// How long the write may take before the boot fails.
pub const WRITE_TIMEOUT: Duration = Duration::from_secs(5);

/// Why the configuration could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum RumprunError {
    /// The file cannot be read.
    #[error("rumprun_config {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// Xenstore values here are text; a JSON file is UTF-8.
    #[error("rumprun_config {path}: not UTF-8 text (rumprun's configuration is JSON)")]
    NotText {
        /// The file.
        path: PathBuf,
    },
    /// Too large for one Xenstore write.
    #[error(
        "rumprun_config {path}: {len} bytes, more than the {MAX_CFG_BYTES} one Xenstore write holds"
    )]
    TooLarge {
        /// The file.
        path: PathBuf,
        /// Its size.
        len: u64,
    },
    /// xenstored could not be reached or refused the write.
    #[error("writing rumprun's configuration to {node}: {source}")]
    Write {
        /// The Xenstore node.
        node: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// xenstored did not answer in time.
    #[error(
        "writing rumprun's configuration to {node}: no answer from xenstored in {WRITE_TIMEOUT:?}"
    )]
    Timeout {
        /// The Xenstore node.
        node: String,
    },
}

/// Where domain `domid`'s configuration goes.
pub fn cfg_node(domid: u32) -> String {
    format!("/local/domain/{domid}/rumprun/cfg")
}

/// The file's content, checked to be text that fits one Xenstore write.
pub fn read_cfg(path: &Path) -> Result<String, RumprunError> {
    let read_err = |source| RumprunError::Read {
        path: path.to_path_buf(),
        source,
    };
    let meta = std::fs::metadata(path).map_err(read_err)?;
    if !meta.is_file() {
        return Err(read_err(std::io::Error::other("not a regular file")));
    }
    // Checked before reading: a huge file is refused without being read.
    if meta.len() > MAX_CFG_BYTES as u64 {
        return Err(RumprunError::TooLarge {
            path: path.to_path_buf(),
            len: meta.len(),
        });
    }
    let bytes = std::fs::read(path).map_err(read_err)?;
    if bytes.len() > MAX_CFG_BYTES {
        return Err(RumprunError::TooLarge {
            path: path.to_path_buf(),
            len: bytes.len() as u64,
        });
    }
    String::from_utf8(bytes).map_err(|_| RumprunError::NotText {
        path: path.to_path_buf(),
    })
}

/// Writes `cfg` at [`cfg_node`]`(domid)`. Blocks, at most [`WRITE_TIMEOUT`]: the write runs
/// on a thread of its own, which a xenstored that never answers leaves behind.
pub fn write_cfg(domid: u32, cfg: &str) -> Result<(), RumprunError> {
    let node = cfg_node(domid);
    let (tx, rx) = mpsc::channel();
    let (n, value) = (node.clone(), cfg.to_string());
    let spawned = std::thread::Builder::new()
        .name("rumprun-cfg".into())
        .spawn(move || {
            let r = XsUnix::new().and_then(|xs| xs.write(&n, &value));
            let _ = tx.send(r);
        });
    if let Err(source) = spawned {
        return Err(RumprunError::Write { node, source });
    }
    match rx.recv_timeout(WRITE_TIMEOUT) {
        Ok(Ok(())) => Ok(()),
        Ok(Err(source)) => Err(RumprunError::Write { node, source }),
        Err(_) => Err(RumprunError::Timeout { node }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(tag: &str, content: &[u8]) -> PathBuf {
        let p = std::env::temp_dir().join(format!("jitsu-rumprun-{tag}-{}", std::process::id()));
        std::fs::write(&p, content).unwrap();
        p
    }

    #[test]
    fn the_file_is_read_verbatim_if_it_fits_one_write() {
        let json = "{\"net\": {\"if\": \"vioif0\", \"type\": \"inet\"},\n \"cmdline\": \"x\"}\n";
        let p = file("ok", json.as_bytes());
        assert_eq!(read_cfg(&p).unwrap(), json);
        let p = file("max", &vec![b' '; MAX_CFG_BYTES]);
        assert_eq!(read_cfg(&p).unwrap().len(), MAX_CFG_BYTES);
        // The longest node and the largest value make exactly one full payload.
        assert_eq!(cfg_node(65535).len() + 1 + MAX_CFG_BYTES, 4096);
    }

    #[test]
    fn a_missing_large_or_binary_file_is_named_in_the_error() {
        let missing = Path::new("/nonexistent/rumprun.json");
        let e = read_cfg(missing).unwrap_err().to_string();
        assert!(e.contains("/nonexistent/rumprun.json"), "{e}");
        let big = file("big", &vec![b' '; MAX_CFG_BYTES + 1]);
        assert!(matches!(
            read_cfg(&big),
            Err(RumprunError::TooLarge { len, .. }) if len == MAX_CFG_BYTES as u64 + 1
        ));
        let bin = file("bin", &[0xff, 0xfe, b'{']);
        assert!(matches!(read_cfg(&bin), Err(RumprunError::NotText { .. })));
        let dir = std::env::temp_dir();
        assert!(matches!(read_cfg(&dir), Err(RumprunError::Read { .. })));
    }
}
