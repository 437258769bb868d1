//! Content-addressed model artifacts on disk: `<dir>/sha256/<hex>`, written atomically.

use sha2::{Digest, Sha256};
use std::io::Write;
use std::path::{Path, PathBuf};

/// Lower-case hex sha256 of `bytes`.
pub fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

/// Whether `s` looks like a hex sha256 (so it is safe as a file name).
pub fn is_sha256_hex(s: &str) -> bool {
    s.len() == 64
        && s.bytes()
            .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
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

    /// Path of the artifact `sha256`, if the name is a valid hash.
    pub fn path(&self, sha256: &str) -> Option<PathBuf> {
        is_sha256_hex(sha256).then(|| self.dir.join("sha256").join(sha256))
    }

    /// Whether the artifact is present.
    pub fn contains(&self, sha256: &str) -> bool {
        self.path(sha256).is_some_and(|p| p.is_file())
    }

    /// Store `bytes` whose hash the caller has verified to be `sha256`; durable on return.
    pub fn put(&self, sha256: &str, bytes: &[u8]) -> std::io::Result<PathBuf> {
        let dest = self.path(sha256).ok_or_else(|| {
            std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                "artifact name is not a sha256",
            )
        })?;
        if dest.is_file() {
            return Ok(dest);
        }
        let tmp = self
            .dir
            .join("tmp")
            .join(format!("{sha256}.{}", std::process::id()));
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
        let h = sha256_hex(b"abc");
        assert!(!s.contains(&h));
        let p = s.put(&h, b"abc").unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), b"abc");
        s.put(&h, b"abc").unwrap();
        assert!(s.contains(&h));
        assert!(s.path("../etc/passwd").is_none());
        assert!(s.put("ABC", b"x").is_err());
    }
}
