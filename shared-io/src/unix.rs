//! A daemon's private control socket: the file and who may talk on it, the same for
//! synjitsu's and jitsu-dns's.
//!
//! Owns the socket file (created race-free with mode 0600, owned by root or by the one uid
//! allowed; a stale one removed, a live one or a file that is not a socket refused; removed
//! on drop) and the peer check (`SO_PEERCRED`: root, or the one uid allowed). The mode keeps
//! other users from connecting at all; the peer check holds even if someone widens it.
//!
//! What is said on the socket is each daemon's own.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use tokio::net::{UnixListener, UnixStream};

/// Why the socket could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum SocketError {
    /// Another process answers on the socket.
    #[error("control socket {0} is in use by another process")]
    InUse(String),
    /// The path exists and is not a socket.
    #[error("control socket path {0} exists and is not a socket")]
    NotASocket(String),
    /// A filesystem or socket call failed.
    #[error("control socket {path}: {source}")]
    Io {
        /// The path.
        path: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

/// Who is on the other end of a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Peer {
    /// Its uid.
    pub uid: u32,
    /// Its pid, for logs.
    pub pid: Option<i32>,
}

/// Why a peer is not served.
#[derive(Debug, thiserror::Error)]
pub enum PeerError {
    /// The kernel did not say who it is.
    #[error("no peer credentials: {0}")]
    NoCredentials(std::io::Error),
    /// Neither root nor the uid allowed.
    #[error("permission denied for uid {uid}")]
    Refused {
        /// The peer's uid.
        uid: u32,
        /// Its pid.
        pid: Option<i32>,
    },
}

/// Root, or `allow_uid`: the peers a control socket serves.
pub fn check_peer(stream: &UnixStream, allow_uid: Option<u32>) -> Result<Peer, PeerError> {
    let cred = stream.peer_cred().map_err(PeerError::NoCredentials)?;
    let (uid, pid) = (cred.uid(), cred.pid());
    if uid != 0 && Some(uid) != allow_uid {
        return Err(PeerError::Refused { uid, pid });
    }
    Ok(Peer { uid, pid })
}

/// A bound control socket; its file is removed on drop.
#[derive(Debug)]
pub struct PrivateSocket {
    listener: UnixListener,
    path: PathBuf,
}

impl PrivateSocket {
    /// Binds `path` with mode 0600 (parent directories created as needed), owned by root,
    /// or by `owner` (the one uid allowed) so that this one user can connect at all.
    pub fn bind(path: &Path, owner: Option<u32>) -> Result<PrivateSocket, SocketError> {
        let io = |source| SocketError::Io {
            path: path.display().to_string(),
            source,
        };
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(io)?;
        }
        match std::fs::symlink_metadata(path) {
            Ok(meta) => {
                use std::os::unix::fs::FileTypeExt;
                if !meta.file_type().is_socket() {
                    return Err(SocketError::NotASocket(path.display().to_string()));
                }
                if std::os::unix::net::UnixStream::connect(path).is_ok() {
                    return Err(SocketError::InUse(path.display().to_string()));
                }
                std::fs::remove_file(path).map_err(io)?;
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(io(e)),
        }
        // Bound under a temporary name, restricted, then renamed into place: no moment at
        // which the socket is reachable with wider permissions.
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "control".into());
        let tmp = path.with_file_name(format!(".{name}.{}.tmp", std::process::id()));
        let _ = std::fs::remove_file(&tmp);
        let std_listener = std::os::unix::net::UnixListener::bind(&tmp).map_err(io)?;
        let done = std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o600))
            .and_then(|()| match owner {
                Some(uid) => std::os::unix::fs::chown(&tmp, Some(uid), None),
                None => Ok(()),
            })
            .and_then(|()| std::fs::rename(&tmp, path))
            .and_then(|()| std_listener.set_nonblocking(true));
        if let Err(e) = done {
            let _ = std::fs::remove_file(&tmp);
            return Err(io(e));
        }
        let listener = UnixListener::from_std(std_listener).map_err(io)?;
        Ok(PrivateSocket {
            listener,
            path: path.to_path_buf(),
        })
    }

    /// The listening socket.
    pub fn listener(&self) -> &UnixListener {
        &self.listener
    }

    /// Where it is.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for PrivateSocket {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    fn scratch(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("shared-io-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        dir
    }

    #[tokio::test(flavor = "current_thread")]
    async fn the_socket_is_0600_a_live_one_is_refused_a_stale_one_replaced_and_removed_on_drop() {
        let dir = scratch("bind");
        let path = dir.join("sub/control.sock");
        // A stale socket: its server went without removing it.
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        drop(std::os::unix::net::UnixListener::bind(&path).unwrap());
        let s = PrivateSocket::bind(&path, None).unwrap();
        assert_eq!(std::fs::metadata(&path).unwrap().mode() & 0o777, 0o600);
        assert!(matches!(
            PrivateSocket::bind(&path, None),
            Err(SocketError::InUse(_))
        ));
        // Our own uid is served when allowed; another allowed uid does not admit us unless
        // we are root.
        let me = std::fs::metadata("/proc/self").unwrap().uid();
        let _c = UnixStream::connect(&path).await.unwrap();
        let (served, _) = s.listener().accept().await.unwrap();
        assert_eq!(check_peer(&served, Some(me)).unwrap().uid, me);
        let other = check_peer(&served, Some(me.wrapping_add(1)));
        assert_eq!(other.is_ok(), me == 0, "{other:?}");
        drop(s);
        assert!(!path.exists());
        std::fs::write(&path, b"x").unwrap();
        assert!(matches!(
            PrivateSocket::bind(&path, None),
            Err(SocketError::NotASocket(_))
        ));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
