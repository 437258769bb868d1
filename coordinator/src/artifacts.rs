//! Content-addressed model artifacts on disk: `<dir>/sha256/<hex>`, written atomically. An
//! [`ArtifactId`] is a valid sha256, so it is safe as a file name.

use sha2::{Digest, Sha256};
use skein_proto::ArtifactId;
use std::io::Write;
use std::path::{Path, PathBuf};

/// The id (sha256) of `bytes`.
pub fn artifact_id(bytes: &[u8]) -> ArtifactId {
    ArtifactId::from_digest(&Sha256::digest(bytes).into())
}

/// Lower-case hex sha256 of `bytes`.
pub fn sha256_hex(bytes: &[u8]) -> String {
    artifact_id(bytes).to_string()
}

/// The artifact store.
#[derive(Debug, Clone)]
pub struct ArtifactStore {
    dir: PathBuf,
    /// Artifact bytes sent to fetchers since the store was opened (shared by clones).
    sent: std::sync::Arc<std::sync::atomic::AtomicU64>,
}

impl ArtifactStore {
    /// Open (or create) the store under `dir`.
    pub fn open(dir: &Path) -> std::io::Result<ArtifactStore> {
        let dir = dir.join("artifacts");
        std::fs::create_dir_all(dir.join("sha256"))?;
        std::fs::create_dir_all(dir.join("tmp"))?;
        Ok(ArtifactStore {
            dir,
            sent: Default::default(),
        })
    }

    /// Count `n` artifact bytes sent to a fetcher.
    pub fn count_sent(&self, n: u64) {
        self.sent.fetch_add(n, std::sync::atomic::Ordering::Relaxed);
    }

    /// Artifact bytes sent to fetchers since the store was opened: a resumed fetch adds only
    /// what the fetcher did not have.
    pub fn bytes_sent(&self) -> u64 {
        self.sent.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Path of the artifact `id`.
    pub fn path(&self, id: &ArtifactId) -> PathBuf {
        self.dir.join("sha256").join(id.as_str())
    }

    /// Whether the artifact is present.
    pub fn contains(&self, id: &ArtifactId) -> bool {
        self.path(id).is_file()
    }

    /// Store `bytes` whose hash the caller has verified to be `id`; durable on return.
    pub fn put(&self, id: &ArtifactId, bytes: &[u8]) -> std::io::Result<PathBuf> {
        let dest = self.path(id);
        if dest.is_file() {
            return Ok(dest);
        }
        let tmp = self
            .dir
            .join("tmp")
            .join(format!("{id}.{}", std::process::id()));
        {
            let mut f = std::fs::File::create(&tmp)?;
            f.write_all(bytes)?;
            f.sync_all()?;
        }
        std::fs::rename(&tmp, &dest)?;
        Ok(dest)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn put_is_content_addressed_and_idempotent() {
        let dir = tempfile::tempdir().unwrap();
        let s = ArtifactStore::open(dir.path()).unwrap();
        let h = artifact_id(b"abc");
        assert_eq!(h.as_str(), sha256_hex(b"abc"));
        assert!(!s.contains(&h));
        let p = s.put(&h, b"abc").unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), b"abc");
        assert_eq!(p.file_name().unwrap(), h.as_str());
        s.put(&h, b"abc").unwrap();
        assert!(s.contains(&h));
        // Names that are not a sha256 (paths, upper case) never become an id, so never a path.
        assert!("../etc/passwd".parse::<ArtifactId>().is_err());
        assert!(h
            .as_str()
            .to_ascii_uppercase()
            .parse::<ArtifactId>()
            .is_err());
    }
}
