//! The node's libp2p key: an Ed25519 keypair kept beside its node key (`peer.key`, libp2p's
//! protobuf encoding, mode 0600). Its [`PeerId`] is what the coordinator binds to the node at
//! join, and what callers check when they dial the node.

use libp2p::identity::Keypair;
use libp2p::PeerId;
use std::path::Path;

/// The file name of the key in a node's data directory.
pub const PEER_KEY_FILE: &str = "peer.key";

/// Errors loading or creating the key.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PeerKeyError {
    /// The file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// Why.
        source: std::io::Error,
    },
    /// The file holds no valid key.
    #[error("{path} is not a libp2p key: {reason}")]
    Invalid {
        /// The file.
        path: String,
        /// Why.
        reason: String,
    },
}

/// The keypair in `dir/peer.key`, created (and stored) when missing.
pub fn load_or_create(dir: &Path) -> Result<Keypair, PeerKeyError> {
    let path = dir.join(PEER_KEY_FILE);
    let shown = path.display().to_string();
    let io = |source| PeerKeyError::Io {
        path: shown.clone(),
        source,
    };
    match std::fs::read(&path) {
        Ok(bytes) => Keypair::from_protobuf_encoding(&bytes).map_err(|e| PeerKeyError::Invalid {
            path: shown.clone(),
            reason: e.to_string(),
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let key = Keypair::generate_ed25519();
            let bytes = key
                .to_protobuf_encoding()
                .map_err(|e| PeerKeyError::Invalid {
                    path: shown.clone(),
                    reason: e.to_string(),
                })?;
            std::fs::create_dir_all(dir).map_err(io)?;
            write_private(&path, &bytes).map_err(io)?;
            Ok(key)
        }
        Err(e) => Err(io(e)),
    }
}

/// The [`PeerId`] of the key in `dir` (created if missing).
pub fn peer_id(dir: &Path) -> Result<PeerId, PeerKeyError> {
    Ok(load_or_create(dir)?.public().to_peer_id())
}

#[cfg(unix)]
fn write_private(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)?;
    f.write_all(bytes)?;
    f.sync_all()
}

#[cfg(not(unix))]
fn write_private(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    std::fs::write(path, bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_key_is_made_once_and_kept() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("node");
        let a = peer_id(&dir).unwrap();
        let b = peer_id(&dir).unwrap();
        assert_eq!(a, b);
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(dir.join(PEER_KEY_FILE))
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600);
        }
    }

    #[test]
    fn a_damaged_key_file_is_an_error_naming_the_file() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        std::fs::write(dir.join(PEER_KEY_FILE), b"not a key").unwrap();
        let e = load_or_create(dir).unwrap_err();
        assert!(e.to_string().contains(PEER_KEY_FILE), "{e}");
    }
}
